/*
 * throttle — client-side adaptive throttling.  See throttle.h.
 */
#include "throttle.h"

void rsl_throttle_init(rsl_throttle *t, double k, double window_ms) {
  *t = (rsl_throttle){.k = k >= 1 ? k : 1,
                      .window_ms = window_ms >= RSL_THROTTLE_SLOTS
                                       ? window_ms
                                       : RSL_THROTTLE_SLOTS,
                      .slot = -1};
}

/* Moves the window to now_ms: slots it slid past are emptied. */
static void slide(rsl_throttle *t, double now_ms) {
  long long slot =
      (long long)(now_ms / (t->window_ms / RSL_THROTTLE_SLOTS));
  if (t->slot < 0 || slot - t->slot >= RSL_THROTTLE_SLOTS) {
    for (int i = 0; i < RSL_THROTTLE_SLOTS; i++)
      t->requests[i] = t->accepts[i] = 0;
  } else {
    for (long long s = t->slot + 1; s <= slot; s++) {
      t->requests[s % RSL_THROTTLE_SLOTS] = 0;
      t->accepts[s % RSL_THROTTLE_SLOTS] = 0;
    }
  }
  if (slot > t->slot) t->slot = slot;
}

void rsl_throttle_counts(rsl_throttle *t, double now_ms, double *requests,
                         double *accepts) {
  slide(t, now_ms);
  *requests = *accepts = 0;
  for (int i = 0; i < RSL_THROTTLE_SLOTS; i++) {
    *requests += t->requests[i];
    *accepts += t->accepts[i];
  }
}

double rsl_throttle_p(rsl_throttle *t, double now_ms) {
  double requests, accepts;
  rsl_throttle_counts(t, now_ms, &requests, &accepts);
  double p = (requests - t->k * accepts) / (requests + 1);
  return p > 0 ? p : 0;
}

int rsl_throttle_admit(rsl_throttle *t, double now_ms, double u) {
  double p = rsl_throttle_p(t, now_ms);
  t->requests[t->slot % RSL_THROTTLE_SLOTS] += 1;
  if (u < p) {
    t->refused += 1;
    return 0;
  }
  return 1;
}

void rsl_throttle_accept(rsl_throttle *t, double now_ms) {
  slide(t, now_ms);
  t->accepts[t->slot % RSL_THROTTLE_SLOTS] += 1;
}
