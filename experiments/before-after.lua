--- before-after.lua — success rate and latency, without and with retries,
-- when 5 % of requests fail transiently.
--
-- The upstream has room to spare (50 workers, lognormal service times
-- around 30 ms); 4 % of requests get a 503 and 1 % a reset connection.
-- One lane makes a single attempt, the other retries under the default
-- policy.  Retries lift the success rate to about 100 % and cost a little
-- tail latency and about 5 % more requests.
--
--   resilua run experiments/before-after.lua [--out DIR] [--seed N] [--quiet]
local experiment = require "resilua.experiment"

return experiment.run{
  name = "before-after",
  description = "without and with retries, under 5 % transient errors",
  duration = 20,
  seed = 1,
  upstream = {
    workers = 50,
    service_ms = { dist = "lognormal", median = 30, sigma = 0.5 },
    queue = 1000,
    faults = { { p = 0.04, status = 503 }, { p = 0.01, action = "reset" } },
  },
  load = { rate = 100, poisson = true },
  policies = {
    { name = "without retries", policy = "no-retry" },
    { name = "with retries (default)", policy = "default" },
  },
}
