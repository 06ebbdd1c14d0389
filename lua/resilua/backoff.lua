--- resilua.backoff — the core's backoff formulas, for policies whose
-- `decide` wants the standard delays (AWS "Exponential Backoff and
-- Jitter"): n is the attempt that just failed (1-based); the exponential
-- term is base * 2^(n-1), capped at max.  Randomness comes from the core's
-- PRNG, so `--seed` makes these reproducible too.
local core = require "resilua.core"

local M = {}

function M.none(base_ms, n, max_ms) return core.backoff("none", base_ms, max_ms, n) end
function M.full(base_ms, n, max_ms) return core.backoff("full", base_ms, max_ms, n) end
function M.equal(base_ms, n, max_ms) return core.backoff("equal", base_ms, max_ms, n) end

--- Decorrelated jitter: min(max, random(base, prev * 3)).
function M.decorrelated(base_ms, prev_ms, max_ms)
  return core.backoff("decorrelated", base_ms, max_ms, 1, prev_ms)
end

--- The delay the policy's own backoff settings give after attempt a.
-- cfg defaults to a.policy.backoff ({ base_ms, max_ms, jitter }).
function M.delay(a, cfg)
  cfg = cfg or a.policy.backoff
  return core.backoff(cfg.jitter, cfg.base_ms, cfg.max_ms, a.attempt, a.prev_delay_ms)
end

return M
