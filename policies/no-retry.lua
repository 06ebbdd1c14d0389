-- no-retry — one attempt, and timeouts only.  For calls that must not be
-- repeated by the client (a retry layer sits elsewhere, or the operation is
-- not idempotent and carries no key), and as the baseline "no resilience"
-- arm of an experiment.  Semantics: the plain client with deadlines that
-- Google SRE's "Addressing Cascading Failures" recommends as the floor —
-- bound every call in time — and nothing else: no retries, so no backoff,
-- no Retry-After, no breaker and no budget to count anything.
return {
  name = "no-retry",
  max_attempts = 1,
  per_try_timeout_ms = 2000,
  connect_timeout_ms = 1000,
  deadline_ms = 2000,
  retry_on = { status = {}, errors = {}, grpc = {} },
  retry_after = false,
  idempotency = false,
  breaker = false,
  budget = false,

  tests = {
    { name = "503 is not retried", attempt = { attempt = 1, status = 503 },
      expect = { retry = false } },
    { name = "429 is not retried", attempt = { attempt = 1, status = 429 },
      expect = { retry = false } },
    { name = "a timeout is not retried", attempt = { attempt = 1, error = "timeout" },
      expect = { retry = false } },
    { name = "a refused connection is not retried", attempt = { attempt = 1, error = "connect" },
      expect = { retry = false } },
  },
}
