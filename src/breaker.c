/*
 * breaker — the consecutive-failure circuit breaker.  See breaker.h.
 */
#include "breaker.h"

#include <stdlib.h>
#include <string.h>

static const char *const STATE_NAMES[] = {"closed", "open", "half_open"};

const char *rsl_breaker_state_name(rsl_breaker_state s) {
  return STATE_NAMES[s];
}

static void move_to(rsl_breaker *b, rsl_breaker_state to, double now_ms,
                    rsl_breaker_change *change) {
  change->from = b->state;
  change->to = to;
  b->state = to;
  if (to == RSL_BREAKER_OPEN) b->opened_at_ms = now_ms;
  if (to != RSL_BREAKER_HALF_OPEN) b->probes_in_flight = 0;
  b->consecutive_failures = 0;
}

int rsl_breaker_admit(rsl_breaker *b, double now_ms, int *probe,
                      rsl_breaker_change *change) {
  change->from = change->to = b->state;
  *probe = 0;
  if (b->state == RSL_BREAKER_OPEN) {
    if (now_ms - b->opened_at_ms < b->conf.open_ms) return 0;
    move_to(b, RSL_BREAKER_HALF_OPEN, now_ms, change);
  }
  if (b->state == RSL_BREAKER_HALF_OPEN) {
    if (b->probes_in_flight >= b->conf.half_open) return 0;
    b->probes_in_flight++;
    *probe = 1;
  }
  return 1;
}

void rsl_breaker_release(rsl_breaker *b, int probe) {
  if (probe && b->state == RSL_BREAKER_HALF_OPEN && b->probes_in_flight > 0)
    b->probes_in_flight--;
}

void rsl_breaker_record(rsl_breaker *b, int probe, int success, double now_ms,
                        rsl_breaker_change *change) {
  change->from = change->to = b->state;
  switch (b->state) {
  case RSL_BREAKER_CLOSED:
    if (success) {
      b->consecutive_failures = 0;
    } else if (++b->consecutive_failures >= b->conf.failures) {
      move_to(b, RSL_BREAKER_OPEN, now_ms, change);
    }
    break;
  case RSL_BREAKER_HALF_OPEN:
    /* Only probes speak for the dependency's health now; an attempt sent
     * before the breaker opened says nothing about the present. */
    if (!probe) break;
    move_to(b, success ? RSL_BREAKER_CLOSED : RSL_BREAKER_OPEN, now_ms,
            change);
    break;
  case RSL_BREAKER_OPEN:
    break;
  }
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
  char *k = strdup(key);
  if (!b || !k) {
    free(b);
    free(k);
    return NULL;
  }
  b->key = k;
  b->conf = *conf;
  b->state = RSL_BREAKER_CLOSED;
  set->items[set->len++] = b;
  return b;
}

void rsl_breakers_free(rsl_breakers *set) {
  for (size_t i = 0; i < set->len; i++) {
    free(set->items[i]->key);
    free(set->items[i]);
  }
  free(set->items);
  memset(set, 0, sizeof *set);
}
