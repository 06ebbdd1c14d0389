-- default — the seed recipe, rebuilt on what experiments/gauntlet.lua
-- measures (docs/policies.md, "Choosing a policy"): retry only what is
-- transient and cheap for the dependency (429, 5xx gateway errors, refused
-- or reset connections, DNS; not timeouts: a timed-out try may still be
-- running there, and retrying it is how an overload turns into a retry
-- storm), at most 4 attempts in all, 2 s per try and 10 s for the whole
-- call, exponential backoff from 200 ms with full jitter (AWS "Exponential
-- Backoff and Jitter"), Retry-After honoured up to 30 s, an Idempotency-Key
-- on POST and PATCH;
-- - a failure-rate breaker per host (resilience4j): it opens when half the
--   attempts of the last 2 s failed (20 at least), probes every 50 ms (or,
--   after a slow failure, as long as it took), and so re-admits within
--   about a tenth of a second of the recovery; a try it refuses waits its
--   backoff, or less when the probe is due or has its verdict, and tries
--   again (retry_on.refused) rather than failing while the dependency is
--   already back;
-- - a retry ratio budget (Finagle, Linkerd): retries at most 20 % of the
--   requests of the last 10 s, plus 10 a second.
-- Adaptive throttling (throttle = { kind = "adaptive" }) is built in but
-- off: after a long outage it re-admits over seconds, not half a second.
--
-- Every field is optional in a policy of your own: what you leave out takes
-- these values.
return {
  name = "default",
  max_attempts = 4,                   -- attempts in all, the first included
  per_try_timeout_ms = 2000,          -- each attempt
  connect_timeout_ms = 1000,
  deadline_ms = 10000,                -- the whole call: attempts and waits together
  max_response_bytes = 16 * 1024 * 1024,
  backoff = { base_ms = 200, max_ms = 5000, jitter = "full" },
  retry_on = { status = { 429, 500, 502, 503, 504 },
               errors = { "connect", "reset", "dns", "refused_stream" }, refused = true,
               grpc = { "UNAVAILABLE", "RESOURCE_EXHAUSTED" } },  -- gRPC calls: status codes
  retry_after = { respect = true, max_ms = 30000 },
  idempotency = { header = "Idempotency-Key", methods = { "POST", "PATCH" } },
  breaker = { kind = "rate", window = "time", window_ms = 2000, minimum_calls = 20,
              failure_rate = 0.5, slow_call_rate = 1.0, open_ms = 50, half_open = 1,
              key = "host" },
  budget = { kind = "ratio", ratio = 0.2, ttl_ms = 10000, min_per_s = 10 },
  throttle = false,
  hedge = false,

  -- Checked by `resilua check default`.
  tests = {
    { name = "503 is retried", attempt = { attempt = 1, status = 503 },
      expect = { retry = true, delay_ms = { 0, 200 } } },
    { name = "backoff doubles", attempt = { attempt = 3, status = 503 },
      expect = { retry = true, delay_ms = { 0, 800 } } },
    { name = "404 is not", attempt = { attempt = 1, status = 404 }, expect = { retry = false } },
    { name = "timeouts are not", attempt = { attempt = 1, error = "timeout" },
      expect = { retry = false } },
    { name = "TLS errors are not", attempt = { attempt = 1, error = "tls" }, expect = { retry = false } },
  },
}
