/*
 * breaker — the consecutive-failure and the failure-rate circuit breakers.
 * See breaker.h for the rules.
 */
#include "breaker.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const STATE_NAMES[] = {"closed", "open", "half_open"};

enum { OUTCOME_FAILED = 1, OUTCOME_SLOW = 2 }; /* bits of a ring entry */

const char *rsl_breaker_state_name(rsl_breaker_state s) {
  return STATE_NAMES[s];
}

static void window_clear(rsl_breaker *b) {
  if (b->ring) memset(b->ring, 0, (size_t)b->conf.window_size);
  b->ring_next = b->ring_len = b->ring_failures = b->ring_slow = 0;
  for (int i = 0; i < RSL_BREAKER_BUCKETS; i++)
    b->buckets[i] = (rsl_breaker_bucket){.epoch = -1};
}

static long long bucket_epoch(const rsl_breaker *b, double now_ms) {
  return (long long)floor(now_ms /
                          (b->conf.window_ms / RSL_BREAKER_BUCKETS));
}

static void window_add(rsl_breaker *b, int failed, int slow, double now_ms) {
  if (b->conf.time_window) {
    long long epoch = bucket_epoch(b, now_ms);
    rsl_breaker_bucket *k = &b->buckets[epoch % RSL_BREAKER_BUCKETS];
    if (k->epoch != epoch) *k = (rsl_breaker_bucket){.epoch = epoch};
    k->calls++;
    k->failures += failed;
    k->slow += slow;
    return;
  }
  /* The ring keeps running sums, so a record is O(1) whatever the size. */
  unsigned char *e = &b->ring[b->ring_next];
  if (b->ring_len == b->conf.window_size) {
    b->ring_failures -= (*e & OUTCOME_FAILED) != 0;
    b->ring_slow -= (*e & OUTCOME_SLOW) != 0;
  } else {
    b->ring_len++;
  }
  *e = (unsigned char)((failed ? OUTCOME_FAILED : 0) | (slow ? OUTCOME_SLOW : 0));
  b->ring_failures += failed;
  b->ring_slow += slow;
  b->ring_next = (b->ring_next + 1) % b->conf.window_size;
}

static void window_totals(const rsl_breaker *b, double now_ms, int *calls,
                          int *failures, int *slow) {
  if (!b->conf.time_window) {
    *calls = b->ring_len;
    *failures = b->ring_failures;
    *slow = b->ring_slow;
    return;
  }
  /* Buckets older than the window are skipped here rather than swept, so
   * a quiet breaker costs nothing. */
  long long oldest = bucket_epoch(b, now_ms) - RSL_BREAKER_BUCKETS + 1;
  *calls = *failures = *slow = 0;
  for (int i = 0; i < RSL_BREAKER_BUCKETS; i++) {
    const rsl_breaker_bucket *k = &b->buckets[i];
    if (k->epoch < oldest) continue;
    *calls += k->calls;
    *failures += k->failures;
    *slow += k->slow;
  }
}

/* Are `failures` (or `slow`) out of `calls` at or over the thresholds? */
static int over_threshold(const rsl_breaker_conf *c, int calls, int failures,
                          int slow) {
  if (calls <= 0) return 0;
  if ((double)failures / calls >= c->failure_rate) return 1;
  return c->slow_call_ms > 0 && (double)slow / calls >= c->slow_call_rate;
}

static void move_to(rsl_breaker *b, rsl_breaker_state to, double now_ms,
                    rsl_breaker_change *change) {
  change->from = b->state;
  change->to = to;
  b->state = to;
  if (to == RSL_BREAKER_OPEN) {
    b->opened_at_ms = now_ms;
    if (b->opens < RSL_BREAKER_OPEN_STEPS) b->opens++;
  }
  if (to == RSL_BREAKER_CLOSED) b->opens = 0;
  b->forced = 0;
  b->probes_in_flight = 0;
  b->probe_results = b->probe_failures = b->probe_slow = 0;
  b->consecutive_failures = 0;
  window_clear(b);
}

/* How long the current opening lasts: the n-th in a row takes the n-th
 * duration, the last one once they run out. */
static double open_duration(const rsl_breaker *b) {
  int n = b->opens < 1 ? 1 : b->opens;
  if (n > b->conf.open_ms_count) n = b->conf.open_ms_count;
  double d = b->conf.open_ms[n - 1];
  return d > b->rest_ms ? d : b->rest_ms;
}

double rsl_breaker_probe_in_ms(const rsl_breaker *b, double now_ms) {
  if (b->state != RSL_BREAKER_OPEN || b->forced) return -1;
  double left = b->opened_at_ms + open_duration(b) - now_ms;
  return left > 0 ? left : 0;
}

int rsl_breaker_admit(rsl_breaker *b, double now_ms, int *probe,
                      rsl_breaker_change *change) {
  change->from = change->to = b->state;
  *probe = 0;
  if (b->state == RSL_BREAKER_OPEN) {
    if (b->forced || now_ms - b->opened_at_ms < open_duration(b)) return 0;
    move_to(b, RSL_BREAKER_HALF_OPEN, now_ms, change);
  }
  if (b->state == RSL_BREAKER_HALF_OPEN) {
    if (b->probes_in_flight >= b->conf.half_open) return 0;
    b->probes_in_flight++;
    *probe = 1;
  }
  return 1;
}

void rsl_breaker_wait(rsl_breaker *b, rsl_breaker_waiter *w) {
  if (w->linked) return;
  w->prev = NULL;
  w->next = b->waiters;
  if (w->next) w->next->prev = w;
  b->waiters = w;
  w->linked = 1;
}

void rsl_breaker_unwait(rsl_breaker *b, rsl_breaker_waiter *w) {
  if (!w->linked) return;
  if (w->prev) w->prev->next = w->next;
  else b->waiters = w->next;
  if (w->next) w->next->prev = w->prev;
  w->prev = w->next = NULL;
  w->linked = 0;
}

rsl_breaker_waiter *rsl_breaker_next_waiter(rsl_breaker *b) {
  rsl_breaker_waiter *w = b->waiters;
  if (w) rsl_breaker_unwait(b, w);
  return w;
}

int rsl_breaker_probing(const rsl_breaker *b) {
  return b->state == RSL_BREAKER_HALF_OPEN &&
         b->probes_in_flight >= b->conf.half_open;
}

void rsl_breaker_release(rsl_breaker *b, int probe) {
  if (probe && b->state == RSL_BREAKER_HALF_OPEN && b->probes_in_flight > 0)
    b->probes_in_flight--;
}

/* Rate kind, half-open: judge the probes as the window would be judged.
 * Reopen as soon as the outcome is certain (failures already at the rate
 * over all `half_open` probes), close once every probe answered below it. */
static void record_probe_rate(rsl_breaker *b, int failed, int slow,
                              double now_ms, rsl_breaker_change *change) {
  const rsl_breaker_conf *c = &b->conf;
  b->probe_results++;
  b->probe_failures += failed;
  b->probe_slow += slow;
  if (over_threshold(c, c->half_open, b->probe_failures, b->probe_slow))
    move_to(b, RSL_BREAKER_OPEN, now_ms, change);
  else if (b->probe_results >= c->half_open)
    move_to(b, RSL_BREAKER_CLOSED, now_ms, change);
}

void rsl_breaker_record(rsl_breaker *b, int probe, int success,
                        double latency_ms, double now_ms,
                        rsl_breaker_change *change) {
  const rsl_breaker_conf *c = &b->conf;
  int failed = !success;
  int slow = c->slow_call_ms > 0 && latency_ms > c->slow_call_ms;
  change->from = change->to = b->state;
  switch (b->state) {
  case RSL_BREAKER_CLOSED:
    if (c->kind == RSL_BREAKER_RATE) {
      int calls, failures, slows;
      window_add(b, failed, slow, now_ms);
      window_totals(b, now_ms, &calls, &failures, &slows);
      int minimum = c->minimum_calls;
      /* A count window never holds more than window_size calls. */
      if (!c->time_window && minimum > c->window_size)
        minimum = c->window_size;
      if (calls >= minimum && over_threshold(c, calls, failures, slows))
        move_to(b, RSL_BREAKER_OPEN, now_ms, change);
    } else if (success) {
      b->consecutive_failures = 0;
    } else if (++b->consecutive_failures >= c->failures) {
      move_to(b, RSL_BREAKER_OPEN, now_ms, change);
    }
    break;
  case RSL_BREAKER_HALF_OPEN:
    /* Only probes speak for the dependency's health now; an attempt sent
     * before the breaker opened says nothing about the present. */
    if (!probe) break;
    if (c->kind == RSL_BREAKER_RATE)
      record_probe_rate(b, failed, slow, now_ms, change);
    else
      move_to(b, success ? RSL_BREAKER_CLOSED : RSL_BREAKER_OPEN, now_ms,
              change);
    break;
  case RSL_BREAKER_OPEN:
    break;
  }
  /* A dependency that fails slowly (timeouts, a long queue) is
   * overloaded: probing it sooner than its last answer took would add to
   * its queue.  One that fails fast (503 at once) costs nothing to probe. */
  if (change->to == RSL_BREAKER_OPEN && change->from != RSL_BREAKER_OPEN)
    b->rest_ms = latency_ms;
}

int rsl_breaker_force(rsl_breaker *b, const char *to, double now_ms,
                      rsl_breaker_change *change) {
  change->from = change->to = b->state;
  if (strcmp(to, "open") == 0) {
    move_to(b, RSL_BREAKER_OPEN, now_ms, change);
    b->forced = 1;
  } else if (strcmp(to, "closed") == 0) {
    int opens = b->opens;
    move_to(b, RSL_BREAKER_CLOSED, now_ms, change);
    /* "closed" only lifts the state; "reset" also forgets the history. */
    b->opens = opens;
  } else if (strcmp(to, "reset") == 0) {
    move_to(b, RSL_BREAKER_CLOSED, now_ms, change);
  } else {
    return -1;
  }
  return 0;
}

void rsl_breaker_counts(rsl_breaker *b, double now_ms, int *failures,
                        int *calls) {
  if (b->conf.kind != RSL_BREAKER_RATE) {
    *failures = b->consecutive_failures;
    *calls = 0;
    return;
  }
  int slow;
  window_totals(b, now_ms, calls, failures, &slow);
}

static void breaker_free(rsl_breaker *b) {
  if (!b) return;
  free(b->key);
  free(b->ring);
  free(b);
}

rsl_breaker *rsl_breakers_get(rsl_breakers *set, const char *key,
                              const rsl_breaker_conf *conf) {
  for (size_t i = 0; i < set->len; i++)
    if (strcmp(set->items[i]->key, key) == 0) return set->items[i];
  if (set->len == set->cap) {
    size_t cap = set->cap ? set->cap * 2 : 8;
    rsl_breaker **items = realloc(set->items, cap * sizeof *items);
    if (!items) return NULL;
    set->items = items;
    set->cap = cap;
  }
  rsl_breaker *b = calloc(1, sizeof *b);
  if (!b) return NULL;
  b->key = strdup(key);
  b->conf = *conf;
  /* A conf built by hand (a C test) may leave the durations out. */
  if (b->conf.open_ms_count < 1) b->conf.open_ms_count = 1;
  int ring = conf->kind == RSL_BREAKER_RATE && !conf->time_window;
  if (ring) b->ring = calloc((size_t)conf->window_size, 1);
  if (!b->key || (ring && !b->ring)) {
    breaker_free(b);
    return NULL;
  }
  b->state = RSL_BREAKER_CLOSED;
  window_clear(b);
  set->items[set->len++] = b;
  return b;
}

void rsl_breakers_free(rsl_breakers *set) {
  for (size_t i = 0; i < set->len; i++) breaker_free(set->items[i]);
  free(set->items);
  memset(set, 0, sizeof *set);
}
