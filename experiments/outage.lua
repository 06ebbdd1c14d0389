--- outage.lua — what retries do to an upstream in trouble.
--
-- An inference upstream with 10 workers (about 240 requests/s) and a queue
-- of 300 takes 150 calls/s (Poisson).  Two things go wrong:
--   * from 5 s to 9 s it answers every request with 503 (a full outage);
--   * from 14 s to 17 s it loses 7 of its 10 workers (a capacity drop).
-- Four policies face the identical load and fault schedule, each against
-- its own copy of the upstream:
--   no retry            one attempt;
--   naive retry         5 attempts at once, no backoff, no budget, no breaker;
--   backoff + jitter    the seed recipe: backoff and jitter, timeouts retried,
--                       no budget and no breaker;
--   default             the shipped default (docs/policies.md, "Choosing a
--                       policy"): backoff + jitter, no retry of timeouts, a
--                       retry ratio budget and a failure-rate breaker.
-- Every policy waits at most 1 s per try.  A full queue holds more than 1 s
-- of work, so once it fills, every request times out at the client while
-- still costing the upstream a worker: naive retries then keep it overloaded
-- long after the capacity has come back (a metastable failure), while the
-- budget and the breaker shed the extra load and it recovers.
--
--   resilua run experiments/outage.lua [--out DIR] [--seed N] [--quiet]
local experiment = require "resilua.experiment"
local extend = require("resilua.policy").extend

local PER_TRY_MS = 1000
-- What the seed recipe retries: timeouts too (the default no longer does).
local RETRY_ALL = { status = { 429, 500, 502, 503, 504 },
                    errors = { "timeout", "connect", "reset", "dns" } }

return experiment.run{
  name = "outage",
  description = "no retry vs naive retry vs backoff vs the default policy "
    .. "(backoff + budget + breaker) through a full outage and a capacity drop",
  duration = 30,
  seed = 1,
  upstream = {
    workers = 10,
    service_ms = { dist = "lognormal", median = 40, sigma = 0.3 },
    queue = 300,
    phases = {
      { name = "outage", from = 5, to = 9, faults = { { p = 1, status = 503 } } },
      { name = "capacity drop", from = 14, to = 17, workers = 3 },
      { name = "after", from = 17 },
    },
  },
  load = { rate = 150, poisson = true },
  policies = {
    { name = "no retry", policy = extend("no-retry", {
        per_try_timeout_ms = PER_TRY_MS, deadline_ms = PER_TRY_MS }) },
    { name = "naive retry", policy = {
        max_attempts = 5, per_try_timeout_ms = PER_TRY_MS, deadline_ms = 10000,
        backoff = { base_ms = 0, max_ms = 0, jitter = "none" }, retry_on = RETRY_ALL,
        retry_after = false, breaker = false, budget = false } },
    { name = "backoff + jitter", policy = extend("default", {
        per_try_timeout_ms = PER_TRY_MS, retry_on = RETRY_ALL, breaker = false, budget = false }) },
    { name = "default", policy = extend("default", { per_try_timeout_ms = PER_TRY_MS }) },
  },
}
