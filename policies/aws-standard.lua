-- aws-standard — the AWS SDKs' "standard" retry mode
-- (AWS SDKs and Tools Reference Guide, "Retry behavior"; the constants are
-- those of the SDKs' code, e.g. aws-sdk-js-v3 middleware-retry and
-- botocore retries/standard.py):
--
-- - 3 attempts in all.
-- - Exponential backoff with full jitter, base 1 s, capped at 20 s:
--   retry n waits random(0, min(1 s * 2^(n-1), 20 s)).
-- - Retried: transient errors (no response: connect failure, reset, DNS,
--   timeout; HTTP 500, 502, 503, 504) and throttling (HTTP 429).  The SDKs
--   also read service error codes (ThrottlingException, RequestTimeout, ...)
--   from the body; a plain HTTP client sees only the status.
-- - The retry quota: 500 tokens, shared by every call of the client; a
--   retry costs 5 tokens (10 after a timeout) and is refused when the quota
--   cannot pay (outcome `budget`); a call that succeeds gives back what its
--   last retry cost, or 1 token when it needed no retry.  resilua's
--   `budget = { kind = "quota" }` is this quota.
-- - The SDKs keep no circuit breaker (the quota is their outage guard) and
--   do not read Retry-After in this mode.
--
-- This is the long-standing standard mode; AWS announced changed backoff
-- timing and quota costs for 2026 (opt-in AWS_NEW_RETRIES_2026), not
-- modelled here.  Timeouts and the deadline are resilua's defaults.
return {
  name = "aws-standard",
  max_attempts = 3,
  backoff = { base_ms = 1000, max_ms = 20000, jitter = "full" },
  retry_on = { status = { 429, 500, 502, 503, 504 },
               errors = { "timeout", "connect", "reset", "dns" } },
  retry_after = false,
  breaker = false,
  budget = { kind = "quota", max_tokens = 500, retry_cost = 5, timeout_cost = 10,
             success_refund = 1 },

  tests = {
    { name = "503 is retried within 1 s", attempt = { attempt = 1, status = 503 },
      expect = { retry = true, delay_ms = { 0, 1000 } } },
    { name = "the backoff doubles", attempt = { attempt = 2, status = 500 },
      expect = { retry = true, delay_ms = { 0, 2000 } } },
    { name = "the backoff is capped at 20 s", attempt = { attempt = 9, status = 502 },
      expect = { retry = true, delay_ms = { 0, 20000 } } },
    { name = "throttling (429) is retried", attempt = { attempt = 1, status = 429 },
      expect = { retry = true } },
    { name = "a timeout is retried", attempt = { attempt = 1, error = "timeout" },
      expect = { retry = true } },
    { name = "400 is not retried", attempt = { attempt = 1, status = 400 },
      expect = { retry = false } },
    { name = "501 is not retried", attempt = { attempt = 1, status = 501 },
      expect = { retry = false } },
  },
}
