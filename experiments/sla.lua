--- sla.lua — the mini challenge: which retry plan meets "p95 < 800 ms"
-- with the highest success rate?
--
-- A model with a heavy tail (lognormal service times, median 185 ms, about
-- 1 in 20 over 690 ms), 6 % 503s and 2 % requests that hang.  Each plan is
-- a per-try timeout, a number of attempts and a backoff; every plan faces
-- the same arrivals and faults; none has a budget or a breaker, to isolate
-- those three knobs.  The summary says which plans meet the SLO over the
-- run and which of those succeeds most.
--
--   resilua run experiments/sla.lua [--out DIR] [--seed N] [--quiet]
local experiment = require "resilua.experiment"

local function plan(per_try_ms, attempts, base_ms)
  return { per_try_timeout_ms = per_try_ms, max_attempts = attempts, deadline_ms = 5000,
           backoff = { base_ms = base_ms, max_ms = 1000, jitter = base_ms > 0 and "full" or "none" },
           breaker = false, budget = false }
end

return experiment.run{
  name = "sla",
  description = "candidate plans of per-try timeout, attempts and backoff for p95 < 800 ms",
  duration = 20,
  seed = 1,
  upstream = {
    workers = 64,
    service_ms = { dist = "lognormal", median = 185, sigma = 0.8 },
    queue = 1000,
    faults = { { p = 0.06, status = 503 }, { p = 0.02, action = "hang" } },
  },
  load = { rate = 80, poisson = true },
  slo = { p95_ms = 800, windows_ok = 0 }, -- judged over the whole run
  policies = {
    { name = "1 x 2000 ms", policy = plan(2000, 1, 0) },
    { name = "3 x 2000 ms, 100 ms", policy = plan(2000, 3, 100) },
    { name = "3 x 600 ms, 50 ms", policy = plan(600, 3, 50) },
    { name = "4 x 400 ms, 25 ms", policy = plan(400, 4, 25) },
    { name = "2 x 1000 ms, 100 ms", policy = plan(1000, 2, 100) },
  },
}
