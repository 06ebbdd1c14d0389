/*
 * budget — retry budgets: the gRPC token bucket, the AWS retry quota and
 * the Finagle/Linkerd retry ratio.
 * See budget.h.
 */
#include "budget.h"

void rsl_budget_init(rsl_budget *b, double max_tokens, double token_ratio) {
  *b = (rsl_budget){.kind = RSL_BUDGET_BUCKET,
                    .max_tokens = max_tokens,
                    .token_ratio = token_ratio,
                    .tokens = max_tokens};
}

void rsl_budget_init_quota(rsl_budget *b, double max_tokens, double retry_cost,
                           double timeout_cost, double success_refund) {
  *b = (rsl_budget){.kind = RSL_BUDGET_QUOTA,
                    .max_tokens = max_tokens,
                    .retry_cost = retry_cost,
                    .timeout_cost = timeout_cost,
                    .success_refund = success_refund,
                    .tokens = max_tokens};
}

void rsl_budget_init_ratio(rsl_budget *b, double ratio, double ttl_ms,
                           double min_per_s) {
  *b = (rsl_budget){.kind = RSL_BUDGET_RATIO,
                    .ratio = ratio,
                    .ttl_ms = ttl_ms >= 1 ? ttl_ms : 1,
                    .min_per_s = min_per_s,
                    .slot = -1};
  /* Empty window: only the reserve. */
  b->tokens = b->max_tokens = min_per_s * b->ttl_ms / 1000;
}

void rsl_budget_tick(rsl_budget *b, double now_ms) {
  if (b->kind != RSL_BUDGET_RATIO) return;
  long long slot = (long long)(now_ms / (b->ttl_ms / RSL_BUDGET_SLOTS));
  if (b->slot < 0 || slot - b->slot >= RSL_BUDGET_SLOTS) {
    /* first use, or idle for a whole window: everything expired */
    for (int i = 0; i < RSL_BUDGET_SLOTS; i++) b->requests[i] = b->retries[i] = 0;
  } else {
    /* clear the slots the window slid past (a clock that went back, which
     * a monotonic one does not, leaves the window as it is) */
    for (long long s = b->slot + 1; s <= slot; s++) {
      b->requests[s % RSL_BUDGET_SLOTS] = 0;
      b->retries[s % RSL_BUDGET_SLOTS] = 0;
    }
  }
  if (slot > b->slot) b->slot = slot;
  double requests = 0, retries = 0;
  for (int i = 0; i < RSL_BUDGET_SLOTS; i++) {
    requests += b->requests[i];
    retries += b->retries[i];
  }
  b->max_tokens = b->min_per_s * b->ttl_ms / 1000 + b->ratio * requests;
  b->tokens = b->max_tokens - retries;
  if (b->tokens < 0) b->tokens = 0;
}

void rsl_budget_request(rsl_budget *b, double now_ms) {
  if (b->kind != RSL_BUDGET_RATIO) return;
  rsl_budget_tick(b, now_ms);
  b->requests[b->slot % RSL_BUDGET_SLOTS] += 1;
  b->max_tokens += b->ratio;
  b->tokens += b->ratio;
}

static void refund(rsl_budget *b, double n) {
  b->tokens += n;
  if (b->tokens > b->max_tokens) b->tokens = b->max_tokens;
}

void rsl_budget_record(rsl_budget *b, int success) {
  /* A quota moves only when a retry pays and when a call succeeds; a
   * ratio only counts requests and retries. */
  if (b->kind != RSL_BUDGET_BUCKET) return;
  if (success) {
    refund(b, b->token_ratio);
  } else {
    b->tokens -= 1;
    if (b->tokens < 0) b->tokens = 0;
  }
}

int rsl_budget_allows_retry(const rsl_budget *b) {
  if (b->kind == RSL_BUDGET_QUOTA) return b->tokens >= b->retry_cost;
  /* A whole retry must fit: 0.5 tokens left is no retry. */
  if (b->kind == RSL_BUDGET_RATIO) return b->tokens >= 1;
  return b->tokens > b->max_tokens / 2;
}

int rsl_budget_take_retry(rsl_budget *b, int after_timeout, double *paid) {
  *paid = 0;
  if (b->kind == RSL_BUDGET_BUCKET) return rsl_budget_allows_retry(b);
  if (b->kind == RSL_BUDGET_RATIO) {
    if (!rsl_budget_allows_retry(b) || b->slot < 0) return 0;
    b->retries[b->slot % RSL_BUDGET_SLOTS] += 1;
    b->tokens -= 1;
    return 1;
  }
  /* AWS charges more for a timeout: the dependency may still be working on
   * the first try, so retrying it is the costlier kind of extra load. */
  double cost = after_timeout ? b->timeout_cost : b->retry_cost;
  if (b->tokens < cost) return 0;
  b->tokens -= cost;
  *paid = cost;
  return 1;
}

void rsl_budget_call_succeeded(rsl_budget *b, double paid) {
  if (b->kind == RSL_BUDGET_QUOTA) refund(b, paid > 0 ? paid : b->success_refund);
}
