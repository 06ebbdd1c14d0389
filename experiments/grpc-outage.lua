--- grpc-outage.lua — a gRPC model server through an outage, the policies
-- side by side (contract 8).
--
-- The same inference upstream as outage.lua (10 workers, about 240
-- requests/s, a queue of 300), served over HTTP/2 cleartext, takes 150
-- unary gRPC calls/s (Poisson) of inference.Model/Predict.  From 5 s to 9 s
-- it fails every call (HTTP 503 without grpc-status, which the client reads
-- as UNAVAILABLE, as gRPC's http-grpc-status-mapping.md says: what a proxy
-- in front of a dead backend sends); from 14 s to 17 s it loses 7 of its 10
-- workers.  Each call has a 1 s deadline, carried to the server in
-- grpc-timeout.  Lanes:
--   no retry        one attempt;
--   naive retry     5 attempts at once on UNAVAILABLE and DEADLINE_EXCEEDED;
--   seed recipe     the seed's gRPC client: retries only UNAVAILABLE and
--                   DEADLINE_EXCEEDED, exponential backoff with full jitter,
--                   within the per-RPC deadline;
--   grpc (A6)       policies/grpc.lua: gRFC A6's retry policy with retry
--                   throttling (maxTokens 10, tokenRatio 0.1).
--
--   resilua run experiments/grpc-outage.lua [--out DIR] [--seed N] [--quiet]
local experiment = require "resilua.experiment"
local extend = require("resilua.policy").extend

local DEADLINE_MS = 1000

return experiment.run{
  name = "grpc-outage",
  description = "unary gRPC calls (h2c) through a full outage and a capacity drop: "
    .. "no retry vs naive retry vs the seed's gRPC recipe vs gRFC A6 with throttling",
  duration = 25,
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
  request = function(i)
    return { grpc = "inference.Model/Predict", body = ("\10\5input%d"):format(i % 1000),
             metadata = { ["x-request-n"] = tostring(i) } }
  end,
  policies = {
    { name = "no retry", policy = extend("no-retry", {
        per_try_timeout_ms = DEADLINE_MS, deadline_ms = DEADLINE_MS }) },
    { name = "naive retry", policy = {
        max_attempts = 5, per_try_timeout_ms = DEADLINE_MS, deadline_ms = DEADLINE_MS,
        backoff = { base_ms = 0, max_ms = 0, jitter = "none" },
        retry_on = { grpc = { "UNAVAILABLE", "DEADLINE_EXCEEDED" }, errors = { "timeout", "connect", "reset" } },
        retry_after = false, breaker = false, budget = false } },
    { name = "seed recipe", policy = {
        max_attempts = 4, per_try_timeout_ms = DEADLINE_MS, deadline_ms = DEADLINE_MS,
        backoff = { base_ms = 50, max_ms = 400, jitter = "full" },
        retry_on = { grpc = { "UNAVAILABLE", "DEADLINE_EXCEEDED" }, errors = { "connect", "reset" } },
        retry_after = false, breaker = false, budget = false } },
    { name = "grpc (A6)", policy = extend("grpc", {
        per_try_timeout_ms = DEADLINE_MS, deadline_ms = DEADLINE_MS }) },
  },
}
