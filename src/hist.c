/*
 * hist — log-linear latency histogram (see hist.h).  The indexing is
 * HdrHistogram's with a unit of 1 µs: bucket b holds values of 2^(b+11)
 * µs range in 1024 sub-buckets of width 2^b, bucket 0 all 2048 values
 * below 2048 µs exactly.  The width of a sub-bucket is never more than
 * 1/1024 of the values it holds, hence 3 significant digits.
 */
#include "hist.h"

#include <math.h>
#include <string.h>

#define SUB_MASK ((uint64_t)(2 * RSL_HIST_SUB_HALF - 1))

static int bucket_of(uint64_t v) {
  /* v | SUB_MASK so values below 2048 land in bucket 0. */
  return 63 - __builtin_clzll(v | SUB_MASK) - (RSL_HIST_SUB_BITS - 1);
}

static size_t index_of(uint64_t v) {
  int b = bucket_of(v);
  uint64_t sub = v >> b;
  return ((size_t)(b + 1) << (RSL_HIST_SUB_BITS - 1)) +
         (size_t)(sub - RSL_HIST_SUB_HALF);
}

/* The highest value (µs) that lands in counts[i]. */
static uint64_t highest_of(size_t i) {
  int b = (int)(i >> (RSL_HIST_SUB_BITS - 1)) - 1;
  uint64_t sub = (i & (RSL_HIST_SUB_HALF - 1)) + RSL_HIST_SUB_HALF;
  if (b < 0) { /* bucket 0's lower half: width 1 */
    b = 0;
    sub -= RSL_HIST_SUB_HALF;
  }
  return ((sub + 1) << b) - 1;
}

void rsl_hist_reset(rsl_hist *h) { memset(h, 0, sizeof *h); }

void rsl_hist_record(rsl_hist *h, double ms) {
  if (isnan(ms)) return;
  if (ms < 0) ms = 0;
  double us = ms * 1000.0;
  uint64_t v;
  if (us >= (double)RSL_HIST_MAX_US) {
    v = (uint64_t)RSL_HIST_MAX_US;
    h->clamped++;
  } else {
    v = (uint64_t)llround(us);
  }
  h->counts[index_of(v)]++;
  if (h->total == 0 || ms < h->min_ms) h->min_ms = ms;
  if (h->total == 0 || ms > h->max_ms) h->max_ms = ms;
  h->total++;
  h->sum_ms += ms;
}

void rsl_hist_merge(rsl_hist *dst, const rsl_hist *src) {
  if (src->total == 0) return; /* the common idle window: skip the array */
  for (size_t i = 0; i < RSL_HIST_COUNTS; i++)
    dst->counts[i] += src->counts[i];
  if (dst->total == 0 || src->min_ms < dst->min_ms) dst->min_ms = src->min_ms;
  if (dst->total == 0 || src->max_ms > dst->max_ms) dst->max_ms = src->max_ms;
  dst->total += src->total;
  dst->clamped += src->clamped;
  dst->sum_ms += src->sum_ms;
}

double rsl_hist_percentile(const rsl_hist *h, double p) {
  if (h->total == 0) return 0;
  if (p < 0) p = 0;
  if (p > 100) p = 100;
  /* The rank of the value wanted, 1-based, as HdrHistogram counts it. */
  uint64_t rank = (uint64_t)ceil(p / 100.0 * (double)h->total);
  if (rank < 1) rank = 1;
  if (rank >= h->total) return h->max_ms;
  uint64_t seen = 0;
  for (size_t i = 0; i < RSL_HIST_COUNTS; i++) {
    seen += h->counts[i];
    if (seen >= rank) {
      double v = (double)highest_of(i) / 1000.0;
      if (v > h->max_ms) v = h->max_ms;
      if (v < h->min_ms) v = h->min_ms;
      return v;
    }
  }
  return h->max_ms;
}

double rsl_hist_mean(const rsl_hist *h) {
  return h->total ? h->sum_ms / (double)h->total : 0;
}
