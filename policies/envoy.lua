-- envoy — the retry policy of an Envoy route
-- (https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_filters/router_filter#x-envoy-retry-on
--  and config.route.v3.RetryPolicy):
--
-- - retry_on conditions (ROUTE.retry_on below):
--     5xx                     any 5xx, or no response at all (connect failure,
--                             reset, timeout: Envoy turns a per-try timeout
--                             into a 504)
--     gateway-error           502, 503, 504 (and the per-try timeout's 504)
--     reset                   no response: disconnect, reset, read timeout
--     connect-failure         the connection could not be made (here also DNS)
--     retriable-4xx           409
--     retriable-status-codes  the codes in ROUTE.retriable_status_codes
-- - num_retries: Envoy's default is 1, so 2 attempts in all.
-- - Back-off: fully jittered exponential, base_interval 25 ms, max_interval
--   10 x base_interval; retry n waits random(0, (2^n - 1) * base), capped
--   (so 0-25, 0-75, 0-175 ms, ...).
-- - rate_limited_retry_back_off: when the answer carries a reset header
--   (Retry-After, then X-RateLimit-Reset, both in seconds), the retry waits
--   that long instead; a header over its max_interval (300 s) is ignored
--   and the next one tried, and without a usable one the exponential
--   back-off applies.
-- - Envoy's outlier detection (consecutive_5xx = 5, base_ejection_time =
--   30 s) is the breaker below.  Envoy bounds retries by concurrency (the
--   max_retries circuit breaker, or retry_budget); resilua has no such
--   bound, so the default token-bucket budget stands in for it.
-- - No per-try timeout by default; the route timeout is 15 s.
local backoff = require "resilua.backoff"

local ROUTE = {
  retry_on = { "5xx", "reset", "connect-failure", "retriable-4xx", "retriable-status-codes" },
  retriable_status_codes = { 429 },
  num_retries = 1,
  base_interval_ms = 25,
  rate_limited = { reset_headers = { "retry-after", "x-ratelimit-reset" }, max_interval_ms = 300000 },
  timeout_ms = 15000,
}
ROUTE.max_interval_ms = 10 * ROUTE.base_interval_ms

local NO_RESPONSE = { reset = true, timeout = true, protocol = true }
local CONNECT = { connect = true, dns = true }

-- Each condition: does it retry this attempt?
local CONDITIONS = {
  ["5xx"] = function(a)
    return (a.status and a.status >= 500) or NO_RESPONSE[a.error] or CONNECT[a.error]
  end,
  ["gateway-error"] = function(a)
    return a.status == 502 or a.status == 503 or a.status == 504 or a.error == "timeout"
  end,
  reset = function(a) return NO_RESPONSE[a.error] end,
  ["connect-failure"] = function(a) return CONNECT[a.error] end,
  ["retriable-4xx"] = function(a) return a.status == 409 end,
  ["retriable-status-codes"] = function(a)
    for _, s in ipairs(ROUTE.retriable_status_codes) do
      if a.status == s then return true end
    end
  end,
}
for _, c in ipairs(ROUTE.retry_on) do assert(CONDITIONS[c], "unknown retry_on condition " .. c) end

-- The rate-limited back-off in ms, from the first usable reset header.
local function rate_limited_ms(a)
  for _, name in ipairs(ROUTE.rate_limited.reset_headers) do
    local ms
    if name == "retry-after" then
      ms = a.retry_after_ms     -- the core parsed both of its forms
    else
      local v = a.headers and a.headers[name]
      local s = v and tonumber(v:match("^%s*(%d+%.?%d*)%s*$"))
      ms = s and s * 1000
    end
    if ms and ms <= ROUTE.rate_limited.max_interval_ms then return ms, name end
  end
end

local function decide(a)
  local what = a.status and ("status " .. a.status) or ("error " .. tostring(a.error))
  local matched
  for _, c in ipairs(ROUTE.retry_on) do
    if CONDITIONS[c](a) then matched = c break end
  end
  if not matched then return { retry = false, reason = what .. " matches no retry_on condition" } end
  local ms, header = rate_limited_ms(a)
  if ms then
    return { retry = true, delay_ms = ms, reason = ("%s (%s), %s %.0f ms"):format(what, matched, header, ms) }
  end
  local cap = math.min((2 ^ a.attempt - 1) * ROUTE.base_interval_ms, ROUTE.max_interval_ms)
  return { retry = true, delay_ms = backoff.full(cap, 1, cap),   -- random(0, cap)
           reason = ("%s (%s), back-off up to %.0f ms"):format(what, matched, cap) }
end

local retry_status = {}
for s = 400, 599 do
  if CONDITIONS["5xx"]({ status = s }) or CONDITIONS["retriable-4xx"]({ status = s })
     or CONDITIONS["retriable-status-codes"]({ status = s }) then
    retry_status[#retry_status + 1] = s
  end
end

return {
  name = "envoy",
  max_attempts = ROUTE.num_retries + 1,
  per_try_timeout_ms = ROUTE.timeout_ms,
  deadline_ms = ROUTE.timeout_ms,
  backoff = { base_ms = ROUTE.base_interval_ms, max_ms = ROUTE.max_interval_ms, jitter = "full" },
  retry_on = { status = retry_status, errors = { "timeout", "connect", "reset", "dns", "protocol" } },
  retry_after = false,   -- decide reads the reset headers (over the cap: back-off, not give up)
  breaker = { failures = 5, open_ms = 30000, half_open = 1, key = "host" },
  decide = decide,

  tests = {
    { name = "5xx: 500 is retried within base_interval",
      attempt = { attempt = 1, status = 500 }, expect = { retry = true, delay_ms = { 0, 25 } } },
    { name = "the second retry waits up to 3 x base",
      attempt = { attempt = 2, status = 503 }, expect = { retry = true, delay_ms = { 0, 75 } } },
    { name = "the back-off is capped at 10 x base",
      attempt = { attempt = 6, status = 503 }, expect = { retry = true, delay_ms = { 0, 250 } } },
    { name = "reset is retried", attempt = { attempt = 1, error = "reset" }, expect = { retry = true } },
    { name = "connect-failure is retried", attempt = { attempt = 1, error = "connect" },
      expect = { retry = true } },
    { name = "retriable-4xx: 409", attempt = { attempt = 1, status = 409 }, expect = { retry = true } },
    { name = "retriable-status-codes: 429", attempt = { attempt = 1, status = 429 },
      expect = { retry = true } },
    { name = "404 is not retried", attempt = { attempt = 1, status = 404 }, expect = { retry = false } },
    { name = "TLS errors are not", attempt = { attempt = 1, error = "tls" }, expect = { retry = false } },
    { name = "Retry-After sets the delay",
      attempt = { attempt = 1, status = 429, retry_after_ms = 2000 },
      expect = { retry = true, delay_ms = { 2000, 2000 } } },
    { name = "X-RateLimit-Reset (seconds) sets the delay",
      attempt = { attempt = 1, status = 503, headers = { ["x-ratelimit-reset"] = "3" } },
      expect = { retry = true, delay_ms = { 3000, 3000 } } },
    { name = "a reset header over max_interval falls back to the back-off",
      attempt = { attempt = 1, status = 503, retry_after_ms = 600000 },
      expect = { retry = true, delay_ms = { 0, 25 } } },
  },
}
