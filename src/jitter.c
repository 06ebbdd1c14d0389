/*
 * jitter — xoshiro256** seeded through splitmix64, and backoff formulas
 * (https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/).
 */
#include "jitter.h"

#include <math.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void rsl_prng_seed(rsl_prng *p, uint64_t seed) {
  for (int i = 0; i < 4; i++) p->s[i] = splitmix64(&seed);
}

void rsl_prng_seed_random(rsl_prng *p) {
  uint64_t seed;
  if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed)
    seed = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)p;
  rsl_prng_seed(p, seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t rsl_prng_next(rsl_prng *p) {
  uint64_t *s = p->s;
  uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

double rsl_prng_uniform(rsl_prng *p, double lo, double hi) {
  double unit = (double)(rsl_prng_next(p) >> 11) * 0x1.0p-53; /* [0, 1) */
  return lo + unit * (hi - lo);
}

static const char *const JITTER_NAMES[] = {"full", "equal", "decorrelated",
                                           "none"};

int rsl_jitter_parse(const char *name, rsl_jitter *out) {
  for (int i = 0; i <= RSL_JITTER_NONE; i++) {
    if (strcmp(name, JITTER_NAMES[i]) == 0) {
      *out = (rsl_jitter)i;
      return 0;
    }
  }
  return -1;
}


double rsl_backoff_ms(rsl_prng *p, rsl_jitter j, double base_ms, double max_ms,
                      int attempt, double prev_ms) {
  if (attempt < 1) attempt = 1;
  /* 2^1023 is the largest finite power; beyond it the cap decides anyway. */
  double exp_ms = base_ms * ldexp(1.0, attempt - 1 > 1000 ? 1000 : attempt - 1);
  double capped = fmin(max_ms, exp_ms);
  switch (j) {
  case RSL_JITTER_NONE:
    return capped;
  case RSL_JITTER_FULL:
    return rsl_prng_uniform(p, 0, capped);
  case RSL_JITTER_EQUAL:
    return capped / 2 + rsl_prng_uniform(p, 0, capped / 2);
  case RSL_JITTER_DECORRELATED:
    if (prev_ms < base_ms) prev_ms = base_ms;
    return fmin(max_ms, rsl_prng_uniform(p, base_ms, prev_ms * 3));
  }
  return capped;
}
