/*
 * hist — a log-linear latency histogram in the manner of HdrHistogram:
 * 3 significant digits from 1 µs to 1 hour in a fixed array of counts, so
 * its size never depends on how much was recorded.  Two histograms always
 * share one layout, so merging is adding counts.  Values go in and come
 * out in milliseconds (doubles); they are kept as whole microseconds.
 * Exact min, max and sum are kept beside the counts.
 * Uses nothing but libc.  Never includes lua.h.
 */
#ifndef RSL_HIST_H
#define RSL_HIST_H

#include <stdint.h>

/* 2048 sub-buckets (2·10^3 rounded up to a power of two) give 3
 * significant digits; 22 doublings of 2048 µs reach past 1 hour. */
#define RSL_HIST_SUB_BITS 11
#define RSL_HIST_SUB_HALF (1 << (RSL_HIST_SUB_BITS - 1))
#define RSL_HIST_BUCKETS 22
#define RSL_HIST_COUNTS ((RSL_HIST_BUCKETS + 1) * RSL_HIST_SUB_HALF)
#define RSL_HIST_MAX_US 3600000000LL /* 1 h: larger values are clamped */

/* Plain data: the caller owns it (inline in a Lua userdata, say). */
typedef struct rsl_hist {
  uint64_t total;
  uint64_t clamped; /* values above RSL_HIST_MAX_US, counted at the top */
  double min_ms, max_ms, sum_ms;
  uint64_t counts[RSL_HIST_COUNTS];
} rsl_hist;

void rsl_hist_reset(rsl_hist *h);
/* Records one value in ms; negatives count as 0, NaN is ignored. */
void rsl_hist_record(rsl_hist *h, double ms);
/* dst += src. */
void rsl_hist_merge(rsl_hist *dst, const rsl_hist *src);
/* The value (ms) at or below which p percent (0..100) of the values fall,
 * to within 0.1 % (the highest value its bucket holds, capped at max);
 * 0 when empty. */
double rsl_hist_percentile(const rsl_hist *h, double p);
double rsl_hist_mean(const rsl_hist *h); /* 0 when empty */

#endif
