-- grpc — gRPC client retries as gRFC A6 defines them
-- (https://github.com/grpc/proposal/blob/master/A6-client-retries.md),
-- for gRPC calls (client:call{grpc = ...}, resilua call --grpc) and over
-- plain HTTP:
--
-- - retryPolicy: maxAttempts (values over 5 are treated as 5, as A6 says),
--   initialBackoff, maxBackoff, backoffMultiplier.  The delay before retry
--   n is random(0, min(initialBackoff * backoffMultiplier^(n-1), maxBackoff)).
-- - retryableStatusCodes: gRPC codes.  A gRPC call's status is its own
--   (a.grpc_status: grpc-status from the trailers, or the HTTP status mapped
--   as grpc/grpc's doc/http-grpc-status-mapping.md says, or DEADLINE_EXCEEDED
--   / UNAVAILABLE for a timeout / a failed connection); a plain HTTP call's
--   is what stands for it over HTTP (CODES below).  The HTTP statuses follow Google's
--   google.rpc.Code <-> HTTP mapping (UNAVAILABLE = 503, RESOURCE_EXHAUSTED
--   = 429, DEADLINE_EXCEEDED = 504, ...), plus 502, which gRPC itself reads
--   as UNAVAILABLE (doc/http-grpc-status-mapping.md); a connection that
--   fails or resets is UNAVAILABLE, a per-try timeout DEADLINE_EXCEEDED.
-- - Retry throttling (maxTokens, tokenRatio) is resilua's token-bucket
--   budget, which implements exactly A6's rule (-1 per failure, +tokenRatio
--   per success, retry only while tokens > maxTokens / 2).
-- - Server pushback: a `grpc-retry-pushback-ms` header with a non-negative
--   integer means "retry after exactly that many ms" (instead of backoff);
--   a negative or malformed value means "do not retry".  Pushback never
--   makes a non-retryable code retryable.
--
-- Transparent retries (a stream the server refused before any
-- application saw it) happen below the policy, in libcurl and the
-- transport (docs/grpc.md).  Not modelled: hedging, and A6's reset of the
-- backoff exponent after a pushback (decide sees only the attempt number).
-- gRPC has no per-try timeout and no breaker, so neither does this policy.
local grpc = require "resilua.grpc"

-- gRPC's defaults are for you to set; these are the values of A6's examples.
local RETRY_POLICY = {
  maxAttempts = 4,
  initialBackoff_ms = 100,
  maxBackoff_ms = 1000,
  backoffMultiplier = 2,
  retryableStatusCodes = { "UNAVAILABLE", "RESOURCE_EXHAUSTED" },
}
-- The built-in backoff doubles: another multiplier needs its own delay in decide.
assert(RETRY_POLICY.backoffMultiplier == 2, "backoffMultiplier: the built-in backoff doubles")
local RETRY_THROTTLING = { maxTokens = 10, tokenRatio = 0.1 }
local DEADLINE_MS = 10000

-- gRPC code -> the HTTP statuses and error classes that stand for it here.
local CODES = {
  CANCELLED           = { status = { 499 } },
  UNKNOWN             = { status = {} },
  INVALID_ARGUMENT    = { status = { 400 } },
  DEADLINE_EXCEEDED   = { status = { 504 }, errors = { "timeout" } },
  NOT_FOUND           = { status = { 404 } },
  ALREADY_EXISTS      = { status = {} },            -- 409 is ABORTED's
  PERMISSION_DENIED   = { status = { 403 } },
  RESOURCE_EXHAUSTED  = { status = { 429 } },
  FAILED_PRECONDITION = { status = {} },            -- 400 is INVALID_ARGUMENT's
  ABORTED             = { status = { 409 } },
  OUT_OF_RANGE        = { status = {} },
  UNIMPLEMENTED       = { status = { 501 } },
  INTERNAL            = { status = { 500 } },
  UNAVAILABLE         = { status = { 502, 503 },
                          errors = { "connect", "reset", "dns", "refused_stream" } },
  DATA_LOSS           = { status = {} },
  UNAUTHENTICATED     = { status = { 401 } },
}

local retryable = {}
local retry_status, retry_errors = {}, {}
for _, name in ipairs(RETRY_POLICY.retryableStatusCodes) do
  local code = assert(CODES[name], "unknown gRPC code " .. name)
  retryable[name] = true
  for _, s in ipairs(code.status) do retry_status[#retry_status + 1] = s end
  for _, e in ipairs(code.errors or {}) do retry_errors[#retry_errors + 1] = e end
end

-- The gRPC code an attempt stands for (nil when none does).
local function code_of(a)
  if a.grpc_status then return grpc.names[a.grpc_status] end
  for name, code in pairs(CODES) do
    for _, s in ipairs(code.status) do
      if a.status == s then return name end
    end
    for _, e in ipairs(code.errors or {}) do
      if a.error == e then return name end
    end
  end
end

local MAX_DELAY_MS = 86400000  -- the core's limit on a delay

local function decide(a)
  local code = code_of(a)
  local what = a.grpc_status and "gRPC status"
    or a.status and ("status " .. a.status) or ("error " .. tostring(a.error))
  if not (code and retryable[code]) then
    return { retry = false, reason = ("%s (%s) is not retryable"):format(what, code or "no gRPC code") }
  end
  local pushback = a.headers and a.headers["grpc-retry-pushback-ms"]
  if pushback then
    local ms = pushback:match("^%s*(%-?%d+)%s*$")
    ms = ms and tonumber(ms)
    if not ms or ms < 0 then
      return { retry = false, reason = ("server pushback '%s': do not retry"):format(pushback) }
    end
    return { retry = true, delay_ms = math.min(ms, MAX_DELAY_MS),
             reason = ("server pushback %d ms"):format(ms) }
  end
  -- No opinion: retry_on (the same retryable codes) and backoff (full
  -- jitter, doubling from initialBackoff to maxBackoff: A6's random(0,
  -- min(initialBackoff * 2^(n-1), maxBackoff))) decide.
  return nil
end

return {
  name = "grpc",
  max_attempts = math.min(RETRY_POLICY.maxAttempts, 5),
  per_try_timeout_ms = DEADLINE_MS,   -- gRPC's deadline covers the whole RPC
  deadline_ms = DEADLINE_MS,
  backoff = { base_ms = RETRY_POLICY.initialBackoff_ms, max_ms = RETRY_POLICY.maxBackoff_ms,
              jitter = "full" },
  retry_on = { status = retry_status, errors = retry_errors,
               grpc = RETRY_POLICY.retryableStatusCodes },
  retry_after = false,                -- gRPC pushes back with its own header
  breaker = false,
  budget = { max_tokens = RETRY_THROTTLING.maxTokens, token_ratio = RETRY_THROTTLING.tokenRatio },
  decide = decide,

  tests = {
    { name = "UNAVAILABLE (503) is retried within initialBackoff",
      attempt = { attempt = 1, status = 503 }, expect = { retry = true, delay_ms = { 0, 100 } } },
    { name = "the backoff grows by backoffMultiplier",
      attempt = { attempt = 3, status = 503 }, expect = { retry = true, delay_ms = { 0, 400 } } },
    { name = "the backoff is capped at maxBackoff",
      attempt = { attempt = 5, status = 502 }, expect = { retry = true, delay_ms = { 0, 1000 } } },
    { name = "RESOURCE_EXHAUSTED (429) is retried",
      attempt = { attempt = 1, status = 429 }, expect = { retry = true } },
    { name = "a refused connection is UNAVAILABLE",
      attempt = { attempt = 1, error = "connect" }, expect = { retry = true } },
    { name = "INTERNAL (500) is not retried",
      attempt = { attempt = 1, status = 500 }, expect = { retry = false } },
    { name = "DEADLINE_EXCEEDED (timeout) is not retried",
      attempt = { attempt = 1, error = "timeout" }, expect = { retry = false } },
    { name = "pushback sets the delay",
      attempt = { attempt = 1, status = 503, headers = { ["grpc-retry-pushback-ms"] = "250" } },
      expect = { retry = true, delay_ms = { 250, 250 } } },
    { name = "a negative pushback stops the retries",
      attempt = { attempt = 1, status = 503, headers = { ["grpc-retry-pushback-ms"] = "-1" } },
      expect = { retry = false } },
    { name = "a malformed pushback stops the retries",
      attempt = { attempt = 1, status = 503, headers = { ["grpc-retry-pushback-ms"] = "soon" } },
      expect = { retry = false } },
    { name = "a gRPC call's UNAVAILABLE is retried",
      attempt = { attempt = 1, grpc_status = 14 }, expect = { retry = true, delay_ms = { 0, 100 } } },
    { name = "a gRPC call's INVALID_ARGUMENT is not",
      attempt = { attempt = 1, grpc_status = 3 }, expect = { retry = false } },
    { name = "a gRPC call's status wins over its HTTP status",
      attempt = { attempt = 1, status = 200, grpc_status = 13 }, expect = { retry = false } },
    { name = "gRPC pushback from the trailers sets the delay",
      attempt = { attempt = 1, grpc_status = 14, headers = { ["grpc-retry-pushback-ms"] = "40" } },
      expect = { retry = true, delay_ms = { 40, 40 } } },
    { name = "pushback does not make INTERNAL retryable",
      attempt = { attempt = 1, status = 500, headers = { ["grpc-retry-pushback-ms"] = "10" } },
      expect = { retry = false } },
  },
}
