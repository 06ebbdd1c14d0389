/*
 * hints — the retry hints a server may send, read from a response's headers
 * and normalised into one struct (a.server for a policy's decide):
 *
 *   Retry-After (RFC 9110: delay-seconds or an HTTP-date, parsed here
 *   strictly; see rsl_hints_retry_after_ms),
 *   retry-after-ms, x-amz-retry-after (ms), X-RateLimit-Reset (epoch or
 *   delta seconds) and X-RateLimit-Remaining, the IETF RateLimit /
 *   RateLimit-Policy fields (draft-ietf-httpapi-ratelimit-headers: t=, r=,
 *   q=, w=), grpc-retry-pushback-ms and x-should-retry.
 *
 * Parsing is defensive: values are bounded numbers, anything malformed is
 * ignored (except pushback, where gRFC A6 says malformed = do not retry).
 * Uses: transport (types only).  Never includes lua.h.
 */
#ifndef RSL_HINTS_H
#define RSL_HINTS_H

#include "transport.h"

/* A hint longer than this is nonsense (a day, as for policy durations). */
#define RSL_HINTS_MAX_MS 86400000.0

typedef struct rsl_hints {
  /* The server's wait from Retry-After, else retry-after-ms, else
   * x-amz-retry-after; -1 when none said it.  retry_after_from names the
   * header that did (lower-case, static), or NULL. */
  double retry_after_ms;
  const char *retry_after_from;
  /* Rate limits: ms until the window resets, requests left, the policy's
   * quota and window (s); -1 when absent. */
  double reset_ms, remaining, quota, window_s;
  /* grpc-retry-pushback-ms: the wait, or -1; pushback_stop when it was
   * negative or malformed (gRFC A6: do not retry). */
  double pushback_ms;
  int pushback_stop;
  /* x-should-retry: -1 absent, 0 false, 1 true. */
  int should_retry;
  /* What the core waits for at least, capped like Retry-After: the
   * retry-after family, else pushback, else the rate-limit reset when the
   * response says the limit is hit (429, or 0 remaining); -1 for none. */
  double wait_ms;
} rsl_hints;

/* Retry-After wider than this saturates here (RFC 9111 1.2.2's rule for
 * delta-seconds): past any policy's cap, so the call gives up. */
#define RSL_HINTS_RETRY_AFTER_MAX_S 2147483648.0

/* The wait res's Retry-After asks for, in ms, or -1 when it has none that
 * is valid.  RFC 9110 10.2.3: a value is delay-seconds (1*DIGIT, nothing
 * else: no sign, fraction, exponent or trailing text; saturating) or an
 * HTTP-date (IMF-fixdate, or the obsolete RFC 850 and asctime forms; a
 * date in the past is 0).  Surrounding spaces are allowed.  Each field is
 * read alone; malformed ones are ignored, and with several valid ones the
 * longest wait wins (never retry sooner than any of them asked).  now_s is
 * the wall clock in seconds since the epoch.  Borrows res. */
double rsl_hints_retry_after_ms(const rsl_response *res, double now_s);

/* Reads res's headers (and res->retry_after_ms, the parsed Retry-After).
 * now_s is the wall clock in seconds since the epoch, to tell an absolute
 * X-RateLimit-Reset from a delta.  Borrows res; keeps no pointer into it. */
void rsl_hints_parse(rsl_hints *h, const rsl_response *res, double now_s);

#endif
