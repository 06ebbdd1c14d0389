-- bench: the load and in-flight runs.  The defaults, except one attempt
-- (the upstreams never fail, and a retry would hide a problem) and a per-try
-- timeout well above the delayed upstream's 2 s answers.
return {
  name = "bench-load",
  max_attempts = 1,
  per_try_timeout_ms = 15000,
  connect_timeout_ms = 10000,
  deadline_ms = 20000,
}
