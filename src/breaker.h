/*
 * breaker — circuit breakers on consecutive failures, keyed (per host by
 * default).  closed → open after `failures` consecutive failed attempts;
 * open → half-open once `open_ms` passed; half-open admits `half_open`
 * probes at a time; a probe success closes, a probe failure reopens.
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

typedef struct rsl_breaker_conf {
  int failures;   /* consecutive failures that open it */
  double open_ms; /* how long it stays open before probing */
  int half_open;  /* probes admitted at a time when half-open */
} rsl_breaker_conf;

typedef struct rsl_breaker {
  char *key; /* owned */
  rsl_breaker_conf conf;
  rsl_breaker_state state;
  int consecutive_failures;
  int probes_in_flight;
  double opened_at_ms;
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
/* Records the result of an admitted attempt. */
void rsl_breaker_record(rsl_breaker *b, int probe, int success, double now_ms,
                        rsl_breaker_change *change);
/* An admitted attempt ended with no result (cancelled). */
void rsl_breaker_release(rsl_breaker *b, int probe);

/* A set of breakers by key; owns them. */
typedef struct rsl_breakers {
  rsl_breaker **items;
  size_t len, cap;
} rsl_breakers;

/* The breaker for key, created closed with conf when new; NULL on ENOMEM.
 * The pointer stays valid until rsl_breakers_free. */
rsl_breaker *rsl_breakers_get(rsl_breakers *set, const char *key,
                              const rsl_breaker_conf *conf);
void rsl_breakers_free(rsl_breakers *set);

#endif
