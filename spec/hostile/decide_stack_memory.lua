-- when: decide  expect: memory limit exceeded
-- The cap refuses the stack's own growth (each frame passes one more
-- argument): Lua 5.4.6+ calls the allocator while the frames hold offsets,
-- so the sandbox must not look at the stack from its allocator.
local function deep(n, ...) return 1 + deep(n + 1, n, ...) end
return { memory_mb = 1, decide = function(a) return deep(1) > 0 end,
         tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
