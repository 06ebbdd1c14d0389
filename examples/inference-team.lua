-- examples/inference-team.lua — a team policy, the worked example of
-- docs/policies.md: an inference API that rate-limits with 429 +
-- Retry-After, answers 503 + X-Model-Loading while a model warms up, and
-- sits behind a product page with a tight latency budget.
local backoff = require "resilua.backoff"

-- Transient failures of this API besides the special cases below.
local RETRY_STATUS = { [502] = true, [503] = true, [504] = true }
local RETRY_ERRORS = { timeout = true, connect = true, reset = true }

return {
  name = "inference-team",
  max_attempts = 4,
  per_try_timeout_ms = 800,
  deadline_ms = 2500,                  -- the page renders without a prediction after that
  backoff = { base_ms = 50, max_ms = 400, jitter = "full" },
  retry_after = { respect = true, max_ms = 1500 },  -- a longer Retry-After: give up at once
  budget = { max_tokens = 20, token_ratio = 0.2 },
  breaker = { failures = 10, open_ms = 5000, half_open = 1 },

  decide = function(a)
    if a.status == 429 then
      -- The core raises the delay to Retry-After (and gives up when it is
      -- over retry_after.max_ms or past the deadline).
      return { retry = true, delay_ms = backoff.delay(a), reason = "rate limited" }
    end
    if a.status == 503 and a.headers["x-model-loading"] then
      if a.remaining_ms < 1000 then
        return { retry = false, reason = "model loading, no time left to wait" }
      end
      return { retry = true, delay_ms = 500, reason = "model loading" }
    end
    if RETRY_STATUS[a.status] or RETRY_ERRORS[a.error] then
      return { retry = true, delay_ms = backoff.delay(a),
               reason = a.status and ("status " .. a.status) or a.error }
    end
    return { retry = false, reason = "not transient" }   -- 400, 404, 500 (a model bug), ...
  end,

  tests = {
    { name = "429 waits for Retry-After",
      attempt = { status = 429, headers = { ["Retry-After"] = "1" } },
      expect = { retry = true, reason = "rate limited" } },
    { name = "model loading",
      attempt = { status = 503, headers = { ["X-Model-Loading"] = "1" } },
      expect = { retry = true, delay_ms = 500 } },
    { name = "model loading, deadline close",
      attempt = { status = 503, headers = { ["X-Model-Loading"] = "1" }, remaining_ms = 600 },
      expect = { retry = false } },
    { name = "502 backs off", attempt = { status = 502, attempt = 2 },
      expect = { retry = true, delay_ms = { 0, 100 } } },
    { name = "500 is a model bug", attempt = { status = 500 }, expect = { retry = false } },
    { name = "timeout", attempt = { error = "timeout" }, expect = { retry = true } },
  },
}
