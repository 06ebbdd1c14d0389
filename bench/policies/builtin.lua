-- bench: the default recipe through the core's built-in rules (no decide).
return { name = "bench-builtin" }
