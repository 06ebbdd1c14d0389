/*
 * throttle — client-side adaptive throttling (Google SRE book, "Handling
 * Overload"): over the last window_ms the client counts `requests` (every
 * attempt it wanted to send, those it refused included) and `accepts`
 * (attempts the dependency answered without a dependency failure), and
 * refuses a new attempt locally with probability
 *
 *     max(0, (requests - k * accepts) / (requests + 1))
 *
 * Healthy, accepts ~ requests and nothing is refused; once fewer than 1/k
 * of the attempts are accepted, the excess is shed before it leaves the
 * client, in proportion to how bad things are, with no state to trip or
 * reset.  The window is RSL_THROTTLE_SLOTS counters of window_ms / SLOTS,
 * so it slides one slot at a time.
 * Uses: nothing.  Time and the random draw are passed in.
 */
#ifndef RSL_THROTTLE_H
#define RSL_THROTTLE_H

#define RSL_THROTTLE_SLOTS 10

typedef struct rsl_throttle {
  double k;
  double window_ms;
  double requests[RSL_THROTTLE_SLOTS], accepts[RSL_THROTTLE_SLOTS];
  long long slot; /* the newest slot: now / (window_ms / SLOTS); -1: none */
  double refused; /* attempts refused since init (for reports) */
} rsl_throttle;

/* k >= 1 (Google: 2), window_ms >= RSL_THROTTLE_SLOTS. */
void rsl_throttle_init(rsl_throttle *t, double k, double window_ms);
/* The probability of refusing an attempt at now_ms (slides the window). */
double rsl_throttle_p(rsl_throttle *t, double now_ms);
/* Counts an attempt the client wants to send at now_ms and decides it:
 * 1 send, 0 refused.  u is a uniform draw in [0, 1). */
int rsl_throttle_admit(rsl_throttle *t, double now_ms, double u);
/* An admitted attempt was accepted by the dependency (no dependency
 * failure).  Failures need no call: they simply are not accepts. */
void rsl_throttle_accept(rsl_throttle *t, double now_ms);
/* The requests and accepts in the window at now_ms. */
void rsl_throttle_counts(rsl_throttle *t, double now_ms, double *requests,
                         double *accepts);

#endif
