/*
 * budget — retry budgets: the gRPC token bucket and the AWS retry quota.
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

static void refund(rsl_budget *b, double n) {
  b->tokens += n;
  if (b->tokens > b->max_tokens) b->tokens = b->max_tokens;
}

void rsl_budget_record(rsl_budget *b, int success) {
  /* A quota moves only when a retry pays and when a call succeeds. */
  if (b->kind == RSL_BUDGET_QUOTA) return;
  if (success) {
    refund(b, b->token_ratio);
  } else {
    b->tokens -= 1;
    if (b->tokens < 0) b->tokens = 0;
  }
}

int rsl_budget_allows_retry(const rsl_budget *b) {
  if (b->kind == RSL_BUDGET_QUOTA) return b->tokens >= b->retry_cost;
  return b->tokens > b->max_tokens / 2;
}

int rsl_budget_take_retry(rsl_budget *b, int after_timeout, double *paid) {
  *paid = 0;
  if (b->kind == RSL_BUDGET_BUCKET) return rsl_budget_allows_retry(b);
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
