/*
 * breaker — circuit breakers, keyed (per host by default), of two kinds:
 *
 * - consecutive (the default): closed → open after `failures` consecutive
 *   failed attempts; half-open admits `half_open` probes at a time; the
 *   first probe result decides: a success closes, a failure reopens.
 * - rate (resilience4j's CircuitBreaker, Polly's advanced breaker): the
 *   last `window_size` attempts (count window) or those of the last
 *   `window_ms` (time window, RSL_BREAKER_BUCKETS buckets that slide one
 *   bucket at a time) are kept; once the window holds `minimum_calls`
 *   (capped at window_size for a count window, as resilience4j does), it
 *   opens when failures/calls >= failure_rate or, with slow_call_ms > 0,
 *   slow/calls >= slow_call_rate (slow: latency > slow_call_ms, failed or
 *   not).  Half-open admits `half_open` probes in all; their results are
 *   judged with the same thresholds: it reopens as soon as the probes'
 *   failures (or slow calls) reach the rate whatever the rest return, and
 *   closes when all `half_open` results are in below it (so with the
 *   default failure_rate all must succeed only when half_open = 1).
 *
 * Both kinds: open → half-open once the open duration passed.  The n-th
 * opening in a row (n counts openings since the breaker last closed) stays
 * open open_ms[min(n, open_ms_count) - 1]: a growing break duration, and
 * at least as long as the answer that opened it took (a dependency that
 * fails slowly is overloaded: an earlier probe would only join its queue).
 * Windows are cleared on every state change.
 * Uses: nothing.  Time is passed in, so the machine is testable alone.
 */
#ifndef RSL_BREAKER_H
#define RSL_BREAKER_H

#include <stddef.h>

typedef enum {
  RSL_BREAKER_CLOSED,
  RSL_BREAKER_OPEN,
  RSL_BREAKER_HALF_OPEN,
} rsl_breaker_state;

typedef enum {
  RSL_BREAKER_CONSECUTIVE,
  RSL_BREAKER_RATE,
} rsl_breaker_kind;

#define RSL_BREAKER_OPEN_STEPS 32 /* open durations kept (n = 1..32) */
#define RSL_BREAKER_BUCKETS 10    /* of a time window */
#define RSL_BREAKER_MAX_WINDOW 100000 /* calls in a count window */

typedef struct rsl_breaker_conf {
  rsl_breaker_kind kind;
  int failures; /* consecutive: failures that open it */
  /* How long it stays open, by opening in a row: a plain value in the
   * struct (no pointer) so a breaker can outlive the policy it came from. */
  double open_ms[RSL_BREAKER_OPEN_STEPS];
  int open_ms_count; /* >= 1 */
  int half_open;     /* probes: at a time (consecutive), in all (rate) */
  /* rate only */
  int time_window;   /* 0: count window of window_size calls */
  int window_size;
  double window_ms;
  int minimum_calls;
  double failure_rate;   /* 0..1 */
  double slow_call_ms;   /* 0: no slow-call check */
  double slow_call_rate; /* 0..1 */
} rsl_breaker_conf;

typedef struct rsl_breaker_bucket {
  long long epoch; /* floor(time / bucket width); -1: empty */
  int calls, failures, slow;
} rsl_breaker_bucket;

/* A call waiting for the breaker's next verdict (see rsl_breaker_wait):
 * a node of an intrusive list, embedded in the waiting call. */
typedef struct rsl_breaker_waiter {
  struct rsl_breaker_waiter *prev, *next;
  int linked;
} rsl_breaker_waiter;

typedef struct rsl_breaker {
  char *key; /* owned */
  rsl_breaker_conf conf;
  rsl_breaker_state state;
  int consecutive_failures;
  int probes_in_flight; /* consecutive: at a time; rate: admitted in all */
  double opened_at_ms;
  double rest_ms; /* the answer that opened it took this long: rest as long */
  int opens;  /* openings since it last closed: picks the open duration */
  int forced; /* held open by rsl_breaker_force until forced otherwise */
  /* rate: the count window (a ring of outcome bits) or the time window */
  unsigned char *ring; /* owned; window_size entries, bit 0 failed, 1 slow */
  int ring_next, ring_len, ring_failures, ring_slow;
  rsl_breaker_bucket buckets[RSL_BREAKER_BUCKETS];
  int probe_results, probe_failures, probe_slow; /* rate, half-open */
  rsl_breaker_waiter *waiters; /* first of the list; not owned */
} rsl_breaker;

/* A state change, reported so the caller can log it; from == to: none. */
typedef struct rsl_breaker_change {
  rsl_breaker_state from, to;
} rsl_breaker_change;

const char *rsl_breaker_state_name(rsl_breaker_state s);

/* May an attempt go out at now_ms?  1 yes (*probe tells whether it is a
 * half-open probe, to be passed back to record/release), 0 no. */
int rsl_breaker_admit(rsl_breaker *b, double now_ms, int *probe,
                      rsl_breaker_change *change);
/* Records the result of an admitted attempt that took latency_ms. */
void rsl_breaker_record(rsl_breaker *b, int probe, int success,
                        double latency_ms, double now_ms,
                        rsl_breaker_change *change);
/* Time until an open breaker admits its next probe; -1 when not open (or
 * held open by rsl_breaker_force: unknown). */
double rsl_breaker_probe_in_ms(const rsl_breaker *b, double now_ms);
/* An admitted attempt ended with no result (cancelled). */
void rsl_breaker_release(rsl_breaker *b, int probe);

/* Waiting for the verdict: a caller the breaker refused may wait for the
 * half-open probes' verdict (closed or open again) rather than a blind
 * backoff.  The breaker only keeps the list; whoever reports a change out
 * of half-open takes the waiters with rsl_breaker_next_waiter and wakes
 * them.  A waiter is unlinked before it goes away (unwait is a no-op on
 * one that is not linked). */
void rsl_breaker_wait(rsl_breaker *b, rsl_breaker_waiter *w);
void rsl_breaker_unwait(rsl_breaker *b, rsl_breaker_waiter *w);
/* Unlinks and returns the first waiter, or NULL. */
rsl_breaker_waiter *rsl_breaker_next_waiter(rsl_breaker *b);
/* Is every half-open probe slot taken (a verdict is on its way)? */
int rsl_breaker_probing(const rsl_breaker *b);

/* Forces the state: "open" holds it open (no probes) until forced again;
 * "closed" closes it with an empty window; "reset" also forgets how many
 * times it opened.  0, or -1 on an unknown name. */
int rsl_breaker_force(rsl_breaker *b, const char *to, double now_ms,
                      rsl_breaker_change *change);

/* The failures and calls in the window now (rate), or the consecutive
 * failures and 0 (consecutive). */
void rsl_breaker_counts(rsl_breaker *b, double now_ms, int *failures,
                        int *calls);

/* A set of breakers by key; owns them. */
typedef struct rsl_breakers {
  rsl_breaker **items;
  size_t len, cap;
} rsl_breakers;

/* The breaker for key, created closed with conf when new; NULL on ENOMEM.
 * The pointer stays valid until rsl_breakers_free.  An existing breaker
 * keeps the conf it was created with (its window is sized by it). */
rsl_breaker *rsl_breakers_get(rsl_breakers *set, const char *key,
                              const rsl_breaker_conf *conf);
void rsl_breakers_free(rsl_breakers *set);

#endif
