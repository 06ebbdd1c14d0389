/*
 * budget — the retry budget as gRPC retry throttling defines it (gRFC A6):
 * a bucket starts full at max_tokens; every failed attempt takes 1 token,
 * every success gives back token_ratio (capped at max_tokens); a retry is
 * allowed only while tokens > max_tokens / 2.
 * Uses: nothing.
 */
#ifndef RSL_BUDGET_H
#define RSL_BUDGET_H

typedef struct rsl_budget {
  double max_tokens;
  double token_ratio;
  double tokens;
} rsl_budget;

void rsl_budget_init(rsl_budget *b, double max_tokens, double token_ratio);
void rsl_budget_record(rsl_budget *b, int success);
int rsl_budget_allows_retry(const rsl_budget *b);

#endif
