/*
 * budget — retry budgets, three kinds:
 *
 * - bucket (the default): gRPC retry throttling (gRFC A6).  The bucket
 *   starts full at max_tokens; every failed attempt takes 1 token, every
 *   success gives back token_ratio (capped at max_tokens); a retry is
 *   allowed only while tokens > max_tokens / 2.
 * - quota: the AWS SDKs' standard-mode retry quota.  It starts full at
 *   max_tokens; a retry must pay retry_cost (timeout_cost after a timeout)
 *   and is refused when the quota cannot pay; a call that succeeds gives
 *   back what its last retry paid, or success_refund when it did not retry
 *   (capped at max_tokens).  Failed attempts cost nothing by themselves.
 * - ratio: Finagle's RetryBudget / Linkerd's retry budget.  Over the last
 *   ttl_ms, retries may be at most ratio x requests (first attempts), plus
 *   min_per_s x ttl_s always allowed.  The window is RSL_BUDGET_SLOTS
 *   counters of ttl_ms / RSL_BUDGET_SLOTS each, so it slides one slot at a
 *   time.  tokens = the retries still allowed in the window, max_tokens =
 *   all the window allows (reserve + ratio x requests).
 *
 * Uses: nothing.
 */
#ifndef RSL_BUDGET_H
#define RSL_BUDGET_H

typedef enum {
  RSL_BUDGET_BUCKET,
  RSL_BUDGET_QUOTA,
  RSL_BUDGET_RATIO
} rsl_budget_kind;

#define RSL_BUDGET_SLOTS 10

typedef struct rsl_budget {
  rsl_budget_kind kind;
  double max_tokens;
  double token_ratio; /* bucket */
  double retry_cost, timeout_cost, success_refund; /* quota */
  double tokens;
  double ratio, ttl_ms, min_per_s; /* ratio */
  double requests[RSL_BUDGET_SLOTS], retries[RSL_BUDGET_SLOTS];
  long long slot; /* the newest slot: now / (ttl_ms / SLOTS); -1: none yet */
} rsl_budget;

/* A token bucket. */
void rsl_budget_init(rsl_budget *b, double max_tokens, double token_ratio);
/* A retry quota. */
void rsl_budget_init_quota(rsl_budget *b, double max_tokens, double retry_cost,
                           double timeout_cost, double success_refund);
/* A retry ratio: ratio in [0, 1000], ttl_ms >= 1, min_per_s >= 0. */
void rsl_budget_init_ratio(rsl_budget *b, double ratio, double ttl_ms,
                           double min_per_s);
/* Moves a ratio budget's window to now_ms (monotonic) and recomputes its
 * tokens; call it before asking for a retry.  A no-op for other kinds. */
void rsl_budget_tick(rsl_budget *b, double now_ms);
/* A call sent its first attempt at now_ms (a ratio's "request"; a no-op
 * for other kinds). */
void rsl_budget_request(rsl_budget *b, double now_ms);
/* After every attempt that reached the dependency (a no-op for a quota). */
void rsl_budget_record(rsl_budget *b, int success);
/* Whether a retry may go now; a quota also takes the retry's cost, given
 * back through *paid (0 for a bucket) for rsl_budget_call_succeeded. */
int rsl_budget_take_retry(rsl_budget *b, int after_timeout, double *paid);
/* A call ended with success; paid is what its last retry paid (0: it did
 * not retry).  Refunds a quota; a no-op for a bucket. */
void rsl_budget_call_succeeded(rsl_budget *b, double paid);
/* The bucket's rule, for a bucket; for a quota: it can pay a retry. */
int rsl_budget_allows_retry(const rsl_budget *b);

#endif
