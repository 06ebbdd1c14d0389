/*
 * jitter — a seeded PRNG and the backoff formulas of AWS's "Exponential
 * Backoff and Jitter": none (plain exponential), full, equal, decorrelated.
 * Uses: nothing.  A fixed seed makes every delay reproducible.
 */
#ifndef RSL_JITTER_H
#define RSL_JITTER_H

#include <stdint.h>

typedef struct rsl_prng {
  uint64_t s[4]; /* xoshiro256** state */
} rsl_prng;

typedef enum {
  RSL_JITTER_FULL,
  RSL_JITTER_EQUAL,
  RSL_JITTER_DECORRELATED,
  RSL_JITTER_NONE,
} rsl_jitter;

void rsl_prng_seed(rsl_prng *p, uint64_t seed);
/* Seeds from the kernel's entropy (getrandom). */
void rsl_prng_seed_random(rsl_prng *p);
uint64_t rsl_prng_next(rsl_prng *p);
/* Uniform in [lo, hi). */
double rsl_prng_uniform(rsl_prng *p, double lo, double hi);

/* "full" etc. to the enum; 0, or -1 for an unknown name. */
int rsl_jitter_parse(const char *name, rsl_jitter *out);

/* The delay before the retry that follows failed attempt `attempt` (1-based):
 * the exponential term is base * 2^(attempt-1), capped at max.  `prev_ms` is
 * the previous delay (decorrelated only; pass base_ms for the first). */
double rsl_backoff_ms(rsl_prng *p, rsl_jitter j, double base_ms, double max_ms,
                      int attempt, double prev_ms);

#endif
