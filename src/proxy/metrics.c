/*
 * proxy/metrics — counters per route and the Prometheus text.  See
 * metrics.h.
 */
#include "metrics.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* Upper bounds of the latency buckets, in seconds (the last is +Inf). */
static const double BUCKET_LE[RSL_METRICS_BUCKETS - 1] = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25,  0.5,    1,     2.5,  10,    60};

static const char *const REJECT_NAMES[RSL_REJECT_COUNT] = {
    "overload", "no_route", "bad_request", "too_large",
    "headers_too_large", "connections"};

rsl_route_metrics *rsl_metrics_route(rsl_metrics *m, const char *name) {
  for (rsl_route_metrics *r = m->routes; r; r = r->next)
    if (strcmp(r->route, name) == 0) return r;
  rsl_route_metrics *r = calloc(1, sizeof *r);
  if (!r || !(r->route = strdup(name))) {
    free(r);
    return NULL;
  }
  r->next = m->routes;
  m->routes = r;
  return r;
}

void rsl_metrics_attempt(rsl_route_metrics *r, long status,
                         rsl_error_class error) {
  if (status > 0 && status < 600) r->attempts_status[status]++;
  else if (!status && (unsigned)error < RSL_ERR_COUNT) r->attempts_error[error]++;
}

void rsl_metrics_call(rsl_route_metrics *r, rsl_outcome outcome,
                      int attempts, double seconds) {
  r->requests[outcome]++;
  if (attempts > 1) r->retries += (uint64_t)(attempts - 1);
  if (outcome == RSL_OUTCOME_BUDGET) r->budget_refusals++;
  int b = 0;
  while (b < RSL_METRICS_BUCKETS - 1 && seconds > BUCKET_LE[b]) b++;
  r->latency_bucket[b]++;
  r->latency_count++;
  r->latency_sum_s += seconds;
}

void rsl_metrics_label(FILE *out, const char *s) {
  fputc('"', out);
  for (; *s; s++) {
    if (*s == '"' || *s == '\\') fputc('\\', out);
    if (*s == '\n') fputs("\\n", out);
    else fputc(*s, out);
  }
  fputc('"', out);
}

static void route_label(FILE *out, const rsl_route_metrics *r) {
  fputs("route=", out);
  rsl_metrics_label(out, r->route);
}

void rsl_metrics_write(const rsl_metrics *m, FILE *out) {
  const rsl_route_metrics *r;
  fputs("# HELP resilua_proxy_requests_total Requests answered through a "
        "call, by route and outcome.\n"
        "# TYPE resilua_proxy_requests_total counter\n", out);
  for (r = m->routes; r; r = r->next)
    for (int o = 0; o < RSL_METRICS_OUTCOMES; o++) {
      fputs("resilua_proxy_requests_total{", out);
      route_label(out, r);
      fprintf(out, ",outcome=\"%s\"} %llu\n", rsl_outcome_name((rsl_outcome)o),
              (unsigned long long)r->requests[o]);
    }
  fputs("# HELP resilua_proxy_attempts_total Attempts sent upstream, by "
        "route and status or error class.\n"
        "# TYPE resilua_proxy_attempts_total counter\n", out);
  for (r = m->routes; r; r = r->next) {
    for (int s = 100; s < 600; s++) {
      if (!r->attempts_status[s]) continue;
      fputs("resilua_proxy_attempts_total{", out);
      route_label(out, r);
      fprintf(out, ",result=\"%d\"} %llu\n", s,
              (unsigned long long)r->attempts_status[s]);
    }
    for (int e = RSL_ERR_TIMEOUT; e < RSL_ERR_COUNT; e++) {
      if (!r->attempts_error[e]) continue;
      fputs("resilua_proxy_attempts_total{", out);
      route_label(out, r);
      fprintf(out, ",result=\"%s\"} %llu\n",
              rsl_error_class_name((rsl_error_class)e),
              (unsigned long long)r->attempts_error[e]);
    }
  }
  static const struct {
    const char *name, *help;
    size_t off;
  } COUNTERS[] = {
      {"resilua_proxy_retries_total", "Attempts after the first.",
       offsetof(rsl_route_metrics, retries)},
      {"resilua_proxy_budget_refusals_total",
       "Retries the retry budget refused.",
       offsetof(rsl_route_metrics, budget_refusals)},
      {"resilua_proxy_stream_aborts_total",
       "Responses cut after the commit point (upstream failed mid-body).",
       offsetof(rsl_route_metrics, stream_aborts)},
      {"resilua_policy_reloads_total",
       "Policy versions swapped in for the route since start.",
       offsetof(rsl_route_metrics, reloads)},
  };
  for (size_t i = 0; i < sizeof COUNTERS / sizeof *COUNTERS; i++) {
    fprintf(out, "# HELP %s %s\n# TYPE %s counter\n", COUNTERS[i].name,
            COUNTERS[i].help, COUNTERS[i].name);
    for (r = m->routes; r; r = r->next) {
      fprintf(out, "%s{", COUNTERS[i].name);
      route_label(out, r);
      fprintf(out, "} %llu\n",
              (unsigned long long)*(const uint64_t *)((const char *)r +
                                                      COUNTERS[i].off));
    }
  }
  fputs("# HELP resilua_proxy_request_duration_seconds Time from the "
        "request to the end of its answer, by route.\n"
        "# TYPE resilua_proxy_request_duration_seconds histogram\n", out);
  for (r = m->routes; r; r = r->next) {
    uint64_t cum = 0;
    for (int b = 0; b < RSL_METRICS_BUCKETS; b++) {
      cum += r->latency_bucket[b];
      fputs("resilua_proxy_request_duration_seconds_bucket{", out);
      route_label(out, r);
      if (b < RSL_METRICS_BUCKETS - 1)
        fprintf(out, ",le=\"%g\"} %llu\n", BUCKET_LE[b], (unsigned long long)cum);
      else
        fprintf(out, ",le=\"+Inf\"} %llu\n", (unsigned long long)cum);
    }
    fputs("resilua_proxy_request_duration_seconds_sum{", out);
    route_label(out, r);
    fprintf(out, "} %.6f\n", r->latency_sum_s);
    fputs("resilua_proxy_request_duration_seconds_count{", out);
    route_label(out, r);
    fprintf(out, "} %llu\n", (unsigned long long)r->latency_count);
  }
  fputs("# HELP resilua_proxy_rejected_total Requests answered by the proxy "
        "itself, by reason.\n"
        "# TYPE resilua_proxy_rejected_total counter\n", out);
  for (int i = 0; i < RSL_REJECT_COUNT; i++)
    fprintf(out, "resilua_proxy_rejected_total{reason=\"%s\"} %llu\n",
            REJECT_NAMES[i], (unsigned long long)m->rejected[i]);
}

void rsl_metrics_free(rsl_metrics *m) {
  while (m->routes) {
    rsl_route_metrics *r = m->routes;
    m->routes = r->next;
    free(r->route);
    free(r);
  }
}
