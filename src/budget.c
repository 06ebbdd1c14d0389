/*
 * budget — token-bucket retry throttling.  See budget.h.
 */
#include "budget.h"

void rsl_budget_init(rsl_budget *b, double max_tokens, double token_ratio) {
  b->max_tokens = max_tokens;
  b->token_ratio = token_ratio;
  b->tokens = max_tokens;
}

void rsl_budget_record(rsl_budget *b, int success) {
  if (success) {
    b->tokens += b->token_ratio;
    if (b->tokens > b->max_tokens) b->tokens = b->max_tokens;
  } else {
    b->tokens -= 1;
    if (b->tokens < 0) b->tokens = 0;
  }
}

int rsl_budget_allows_retry(const rsl_budget *b) {
  return b->tokens > b->max_tokens / 2;
}
