/*
 * proxy/metrics — the proxy's counters per route, and their Prometheus
 * text form (names in the style of Envoy and Linkerd: resilua_proxy_*).
 *
 * Provides: rsl_metrics_* (this file).
 * Uses: call (outcomes), transport (error classes), libc.  No lua.h.
 *
 * Counters are kept by route name, so they carry over a config reload;
 * an entry lives until the proxy is freed.
 */
#ifndef RSL_PROXY_METRICS_H
#define RSL_PROXY_METRICS_H

#include <stdint.h>
#include <stdio.h>

#include "../call.h"

#define RSL_METRICS_OUTCOMES (RSL_OUTCOME_POLICY_ERROR + 1)
#define RSL_METRICS_BUCKETS 14 /* latency histogram, see metrics.c */

typedef struct rsl_route_metrics {
  struct rsl_route_metrics *next;
  char *route;
  uint64_t requests[RSL_METRICS_OUTCOMES];
  uint64_t attempts_status[600];
  uint64_t attempts_error[RSL_ERR_COUNT];
  uint64_t retries, budget_refusals, reloads, stream_aborts;
  uint64_t latency_bucket[RSL_METRICS_BUCKETS]; /* not cumulative */
  uint64_t latency_count;
  double latency_sum_s;
} rsl_route_metrics;

/* Answers the proxy gave without a call, by reason. */
typedef enum {
  RSL_REJECT_OVERLOAD,    /* in-flight cap: 503 */
  RSL_REJECT_NO_ROUTE,    /* 404 */
  RSL_REJECT_BAD_REQUEST, /* 400 (malformed, bad override) */
  RSL_REJECT_TOO_LARGE,   /* 413 */
  RSL_REJECT_HEADERS,     /* 431 */
  RSL_REJECT_CONNECTIONS, /* connection cap: 503 and close */
  RSL_REJECT_COUNT
} rsl_reject_reason;

typedef struct rsl_metrics {
  rsl_route_metrics *routes;
  uint64_t rejected[RSL_REJECT_COUNT];
} rsl_metrics;

/* The entry for route `name`, created when new; NULL on ENOMEM. */
rsl_route_metrics *rsl_metrics_route(rsl_metrics *m, const char *name);
void rsl_metrics_attempt(rsl_route_metrics *r, long status,
                         rsl_error_class error);
void rsl_metrics_call(rsl_route_metrics *r, rsl_outcome outcome,
                      int attempts, double seconds);
/* Writes the counters in Prometheus text format (0.0.4). */
void rsl_metrics_write(const rsl_metrics *m, FILE *out);
/* Writes `s` as a label value (escaped). */
void rsl_metrics_label(FILE *out, const char *s);
void rsl_metrics_free(rsl_metrics *m);

#endif
