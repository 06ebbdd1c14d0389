-- default — the seed recipe, hardened so that the default is safe in an
-- outage: retry only what is transient (429, 5xx gateway errors, timeouts,
-- refused or reset connections, DNS), at most 4 attempts in all, 2 s per try
-- and 10 s for the whole call, exponential backoff from 200 ms with full
-- jitter (AWS "Exponential Backoff and Jitter"), Retry-After honoured up to
-- 30 s, an Idempotency-Key on POST and PATCH, a circuit breaker per host
-- and a gRPC-style retry budget (gRFC A6 retry throttling).
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
               errors = { "timeout", "connect", "reset", "dns" },
               grpc = { "UNAVAILABLE", "RESOURCE_EXHAUSTED" } },  -- gRPC calls: status codes
  retry_after = { respect = true, max_ms = 30000 },
  idempotency = { header = "Idempotency-Key", methods = { "POST", "PATCH" } },
  breaker = { failures = 5, open_ms = { 1000, 2000, 5000, 10000, 30000 }, half_open = 1,
              key = "host" },
  budget = { max_tokens = 10, token_ratio = 0.1 },

  -- Checked by `resilua check default`.
  tests = {
    { name = "503 is retried", attempt = { attempt = 1, status = 503 },
      expect = { retry = true, delay_ms = { 0, 200 } } },
    { name = "backoff doubles", attempt = { attempt = 3, status = 503 },
      expect = { retry = true, delay_ms = { 0, 800 } } },
    { name = "404 is not", attempt = { attempt = 1, status = 404 }, expect = { retry = false } },
    { name = "timeouts are", attempt = { attempt = 1, error = "timeout" }, expect = { retry = true } },
    { name = "TLS errors are not", attempt = { attempt = 1, error = "tls" }, expect = { retry = false } },
  },
}
