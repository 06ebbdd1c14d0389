--- hedging.lua — hedged requests against a heavy tail (issue 11).
--
-- The upstream's service times are Pareto (scale 10 ms, shape 1.5): a
-- median of 16 ms, a p95 of 74 ms and a p99 of 215 ms, with no queueing
-- (unlimited workers) and no errors: the slowness of one request says
-- nothing of the next.  250 calls/s (Poisson), GET.  One lane makes one
-- attempt per call; the other
-- hedges: once a call has waited the client's recent p95, a second
-- attempt goes out, the first answer wins and the other is cancelled.
-- Hedges count against the retry budget (a ratio budget, 20 % + 10/s).
-- What to read: p99 (cut about in half) against amplification (about
-- 1.06: the hedges, 6 % more attempts).
--
--   resilua run experiments/hedging.lua [--out DIR] [--seed N] [--quiet]
local experiment = require "resilua.experiment"
local extend = require("resilua.policy").extend

local ONE_TRY = { per_try_timeout_ms = 10000, deadline_ms = 10000 }

return experiment.run{
  name = "hedging",
  description = "one attempt vs a hedge after the recent p95, Pareto service times",
  duration = 24,
  seed = 1,
  upstream = { service_ms = { dist = "pareto", scale = 10, shape = 1.5 } },
  load = { rate = 250, poisson = true },
  request = function() return { method = "GET", path = "/v1/predict" } end,
  policies = {
    { name = "no hedge", policy = extend("no-retry", ONE_TRY) },
    { name = "hedge at p95", policy = extend("no-retry", {
        per_try_timeout_ms = ONE_TRY.per_try_timeout_ms, deadline_ms = ONE_TRY.deadline_ms,
        budget = { kind = "ratio" }, hedge = { after_ms = "p95", max = 2 } }) },
  },
}
