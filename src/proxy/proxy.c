/*
 * proxy — requests in, calls out, answers back.  See proxy.h.
 *
 * One request is one `exchange`: it holds its route, its call and its
 * client connection, whichever ends first.  The answer is either the
 * upstream's response, sent whole when the call ends with it, or streamed
 * from the commit point on (the call's first body byte of a successful
 * response); or the proxy's own JSON error.  A stream follows the client's
 * pace: past HIGH_WATER_BYTES unsent, the call is paused until the
 * connection drains, so a fast upstream cannot fill the proxy's memory.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* open_memstream, asprintf */
#endif
#include "proxy.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#include "../http/conn.h"
#include "headers.h"
#include "metrics.h"

#define HIGH_WATER_BYTES (256 * 1024) /* unsent to a client: pause */
#define REQUEST_ID_MAX 128            /* a longer X-Request-Id is replaced */
#define NS_PER_S 1e9
#define HEAD_MAX_BYTES ((size_t)1 << 30) /* a response head: no real cap */

typedef struct route {
  int refs;
  char *name, *prefix, *host, *upstream;
  size_t prefix_len;
  int keep_host;
  rsl_client *client;
  rsl_policy *policy;
  rsl_route_metrics *m; /* owned by the proxy's metrics */
} route;

typedef struct exchange {
  rsl_proxy *p;
  struct exchange *prev, *next; /* p->exchanges */
  rsl_http_conn *conn;          /* NULL once the client left */
  route *r;                     /* a ref */
  rsl_call *call;               /* NULL once the call ended */
  char *url;                    /* upstream URL (the breaker's key) */
  rsl_call_stream stream;
  rsl_timer resume; /* the connection drained: resume the stream */
  int keep_alive, head_only, http10;
  int committed, chunked, in_cb, attempts;
  uint64_t started_ns;
  char request_id[REQUEST_ID_MAX + 1];
} exchange;

struct rsl_proxy {
  rsl_call_env *env;
  rsl_http_listener *l;
  char *admin_prefix; /* NULL: off */
  size_t admin_len, max_in_flight;
  route **routes;
  size_t nroutes;
  exchange *exchanges;
  size_t in_flight;
  int draining;
  rsl_metrics metrics;
};

/* --- routes --------------------------------------------------------------- */

static void route_unref(route *r) {
  if (!r || --r->refs > 0) return;
  free(r->name);
  free(r->prefix);
  free(r->host);
  free(r->upstream);
  rsl_client_unref(r->client);
  rsl_policy_unref(r->policy);
  free(r);
}

static route *route_new(rsl_proxy *p, const rsl_proxy_route *rc) {
  route *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->refs = 1;
  r->name = strdup(rc->name);
  r->prefix = strdup(rc->prefix ? rc->prefix : "");
  r->host = rc->host ? strdup(rc->host) : NULL;
  r->upstream = strdup(rc->upstream);
  r->m = r->name ? rsl_metrics_route(&p->metrics, r->name) : NULL;
  r->client = rc->client;
  rc->client->refs++;
  r->policy = rc->policy;
  rsl_policy_ref(rc->policy);
  r->keep_host = rc->keep_host;
  if (!r->name || !r->prefix || (rc->host && !r->host) || !r->upstream ||
      !r->m) {
    route_unref(r);
    return NULL;
  }
  size_t n = strlen(r->upstream); /* the target brings its own '/' */
  while (n && r->upstream[n - 1] == '/') r->upstream[--n] = '\0';
  r->prefix_len = strlen(r->prefix);
  return r;
}

int rsl_proxy_set_routes(rsl_proxy *p, const rsl_proxy_route *routes,
                         size_t n) {
  route **next = calloc(n ? n : 1, sizeof *next);
  if (!next) return -ENOMEM;
  for (size_t i = 0; i < n; i++) {
    if (!(next[i] = route_new(p, &routes[i]))) {
      while (i--) route_unref(next[i]);
      free(next);
      return -ENOMEM;
    }
    for (size_t j = 0; j < p->nroutes; j++)
      if (strcmp(p->routes[j]->name, next[i]->name) == 0 &&
          strcmp(rsl_policy_version(p->routes[j]->policy),
                 rsl_policy_version(next[i]->policy)) != 0)
        next[i]->m->reloads++;
  }
  for (size_t j = 0; j < p->nroutes; j++) route_unref(p->routes[j]);
  free(p->routes);
  p->routes = next;
  p->nroutes = n;
  return 0;
}

/* The first route whose Host (port ignored) and path prefix match. */
static route *route_match(const rsl_proxy *p, const rsl_http_request *req) {
  size_t host_len = 0;
  const char *host = rsl_http_header_get(req, "host", &host_len);
  if (host) {
    const char *colon = memchr(host, ':', host_len);
    if (colon && host[0] != '[') host_len = (size_t)(colon - host);
  }
  for (size_t i = 0; i < p->nroutes; i++) {
    route *r = p->routes[i];
    if (r->host && !(host && strlen(r->host) == host_len &&
                     strncasecmp(r->host, host, host_len) == 0))
      continue;
    if (r->prefix_len > req->path_len ||
        memcmp(req->path, r->prefix, r->prefix_len) != 0)
      continue;
    return r;
  }
  return NULL;
}

/* --- answers -------------------------------------------------------------- */

static void json_str(FILE *out, const char *s) {
  fputc('"', out);
  for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
    if (*c == '"' || *c == '\\') fprintf(out, "\\%c", *c);
    else if (*c < 0x20 || *c >= 0x7f) fprintf(out, "\\u%04x", *c);
    else fputc(*c, out);
  }
  fputc('"', out);
}

static int has_body(long status) {
  return status >= 200 && status != 204 && status != 304;
}

/* A response head being built: appended to straight, with no stdio
 * stream (a memstream per answer cost more than the rest of the head). */
typedef struct answer_head {
  rsl_buf b;
  int failed; /* out of memory: the answer cannot go out */
} answer_head;

static void head_add(answer_head *h, const char *s, size_t n) {
  if (!h->failed && rsl_buf_add(&h->b, s, n, HEAD_MAX_BYTES) != 0) h->failed = 1;
}

static void head_str(answer_head *h, const char *s) { head_add(h, s, strlen(s)); }

/* For numbers: fmt's output is short. */
__attribute__((format(printf, 2, 3)))
static void head_fmt(answer_head *h, const char *fmt, ...) {
  char s[128];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(s, sizeof s, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= sizeof s) h->failed = 1;
  else head_add(h, s, (size_t)n);
}

static void head_status(answer_head *h, int status) {
  char line[128];
  rsl_http_status_line(line, sizeof line, status);
  head_str(h, line);
}

/* Writes (or with `hold`, only queues) the head and frees it.  OK or GONE. */
static int send_head(rsl_http_conn *c, answer_head *h, int hold) {
  int rc = h->failed ? RSL_HTTP_GONE
           : hold    ? rsl_http_conn_append(c, h->b.data, h->b.len)
                     : rsl_http_conn_write(c, h->b.data, h->b.len);
  if (h->failed) rsl_http_conn_close(c, 0);
  rsl_buf_free(&h->b);
  return rc;
}

/* The headers every answer carries: what the call did. */
static void write_call_headers(answer_head *h, const exchange *ex,
                               const char *outcome, int attempts, int no_retry) {
  head_str(h, "X-Request-Id: ");
  head_str(h, ex->request_id);
  head_fmt(h, "\r\nx-resilua-attempts: %d\r\nx-resilua-outcome: ", attempts);
  head_str(h, outcome);
  head_str(h, no_retry ? "\r\nx-should-retry: false\r\n" : "\r\n");
}

static void write_connection(answer_head *h, int keep_alive, int http10) {
  if (!keep_alive) head_str(h, "Connection: close\r\n");
  else if (http10) head_str(h, "Connection: keep-alive\r\n");
}

/* An answer of the proxy's own: JSON, then the request ends. */
static int answer_json(rsl_http_conn *c, int status, const char *error,
                       const char *outcome, int attempts,
                       const char *request_id, double retry_after_s,
                       int keep_alive, int head_only, int http10) {
  char *body = NULL;
  size_t body_len = 0;
  FILE *b = open_memstream(&body, &body_len);
  if (!b) {
    rsl_http_conn_close(c, 0);
    return RSL_HTTP_GONE;
  }
  fputs("{\"error\":", b);
  json_str(b, error);
  fputs(",\"outcome\":", b);
  json_str(b, outcome);
  fprintf(b, ",\"attempts\":%d,\"request_id\":", attempts);
  json_str(b, request_id);
  fputs("}\n", b);
  if (fclose(b) != 0 || !body) {
    free(body);
    rsl_http_conn_close(c, 0);
    return RSL_HTTP_GONE;
  }
  answer_head h = {0};
  head_status(&h, status);
  head_fmt(&h, "Content-Type: application/json\r\nContent-Length: %zu\r\n"
               "Via: " RSL_FWD_VIA "\r\nX-Request-Id: ", body_len);
  head_str(&h, request_id);
  head_fmt(&h, "\r\nx-resilua-attempts: %d\r\nx-resilua-outcome: ", attempts);
  head_str(&h, outcome);
  head_str(&h, "\r\n");
  /* The proxy refused or already retried: a client's own retries would
   * multiply ours (the OpenAI and Anthropic SDKs obey this). */
  if (attempts > 1 || strcmp(outcome, "breaker_open") == 0 ||
      strcmp(outcome, "budget") == 0 || strcmp(outcome, "overloaded") == 0)
    head_str(&h, "x-should-retry: false\r\n");
  if (retry_after_s >= 0) head_fmt(&h, "Retry-After: %.0f\r\n", retry_after_s);
  write_connection(&h, keep_alive, http10);
  head_str(&h, "\r\n");
  int rc = send_head(c, &h, !head_only);
  if (rc == RSL_HTTP_OK && !head_only) rc = rsl_http_conn_write(c, body, body_len);
  free(body);
  return rc == RSL_HTTP_OK ? rsl_http_conn_end(c, keep_alive) : rc;
}

/* The status for a call that ended without a response (contract 7). */
static int error_status(const rsl_call_result *res) {
  switch (res->outcome) {
  case RSL_OUTCOME_BREAKER_OPEN:
  case RSL_OUTCOME_BUDGET:
    return 503;
  case RSL_OUTCOME_DEADLINE:
    return 504;
  default:
    return res->last.error == RSL_ERR_TIMEOUT ? 504 : 502;
  }
}

static int should_not_retry(const rsl_call_result *res) {
  return res->attempts > 1 || res->outcome == RSL_OUTCOME_BUDGET ||
         res->outcome == RSL_OUTCOME_BREAKER_OPEN;
}

/* The upstream's Via, then ours. */
static void write_via(answer_head *h, const rsl_response *res) {
  const char *via = rsl_response_header(res, "via");
  head_str(h, "Via: ");
  if (via) {
    head_str(h, via);
    head_str(h, ", ");
  }
  head_str(h, RSL_FWD_VIA "\r\n");
}

/* The upstream's fields, as rsl_fwd_response passes them. */
static void write_upstream_fields(answer_head *h, const rsl_response *res,
                                  int keep_length) {
  if (!h->failed && rsl_fwd_response(res, keep_length, &h->b, HEAD_MAX_BYTES) != 0)
    h->failed = 1;
}

/* Sends the upstream's final response, whole. */
static int answer_response(exchange *ex, rsl_http_conn *c,
                           const rsl_call_result *res, int keep_alive) {
  const rsl_response *up = &res->last;
  answer_head h = {0};
  head_status(&h, (int)up->status);
  /* HEAD: the upstream's Content-Length says what a GET would get. */
  write_upstream_fields(&h, up, ex->head_only);
  if (has_body(up->status) && !ex->head_only)
    head_fmt(&h, "Content-Length: %zu\r\n", up->body_len);
  write_via(&h, up);
  write_call_headers(&h, ex, rsl_outcome_name(res->outcome), res->attempts,
                     should_not_retry(res));
  write_connection(&h, keep_alive, ex->http10);
  head_str(&h, "\r\n");
  int with_body = has_body(up->status) && !ex->head_only && up->body_len;
  int rc = send_head(c, &h, with_body);
  if (rc == RSL_HTTP_OK && with_body)
    rc = rsl_http_conn_write(c, up->body, up->body_len);
  return rc == RSL_HTTP_OK ? rsl_http_conn_end(c, keep_alive) : rc;
}

/* --- exchanges ------------------------------------------------------------ */

static void exchange_free(exchange *ex) {
  rsl_proxy *p = ex->p;
  rsl_timer_stop(p->env->loop, &ex->resume);
  if (ex->prev) ex->prev->next = ex->next; else p->exchanges = ex->next;
  if (ex->next) ex->next->prev = ex->prev;
  p->in_flight--;
  route_unref(ex->r);
  free(ex->url);
  free(ex);
}

/* The stream's commit point: the response head goes out. */
static int on_commit(void *ud, const rsl_response *head) {
  exchange *ex = ud;
  if (!ex->conn) return -1;
  int keep_length = rsl_response_header(head, "content-length") != NULL;
  if (!keep_length && ex->http10) ex->keep_alive = 0; /* ends at close */
  ex->chunked = !keep_length && !ex->http10;
  answer_head h = {0};
  head_status(&h, (int)head->status);
  write_upstream_fields(&h, head, keep_length);
  if (ex->chunked) head_str(&h, "Transfer-Encoding: chunked\r\n");
  write_via(&h, head);
  write_call_headers(&h, ex, "ok", ex->attempts + 1, ex->attempts > 0);
  write_connection(&h, ex->keep_alive, ex->http10);
  head_str(&h, "\r\n");
  if (h.failed) { /* as when the memstream could not be opened */
    rsl_buf_free(&h.b);
    return -1;
  }
  ex->committed = 1;
  ex->in_cb = 1;
  int rc = send_head(ex->conn, &h, 1); /* sent with the body */
  ex->in_cb = 0;
  return rc == RSL_HTTP_OK ? 0 : -1;
}

static int on_chunk(void *ud, const char *data, size_t len) {
  exchange *ex = ud;
  if (!ex->conn) return RSL_CHUNK_ABORT;
  if (rsl_http_conn_pending(ex->conn) >= HIGH_WATER_BYTES) {
    rsl_http_conn_want_drain(ex->conn);
    return RSL_CHUNK_PAUSE;
  }
  ex->in_cb = 1;
  int rc = RSL_HTTP_OK;
  if (ex->chunked && len) { /* a chunk of 0 bytes would end the body */
    char size[24];
    int n = snprintf(size, sizeof size, "%zx\r\n", len);
    rc = rsl_http_conn_write(ex->conn, size, (size_t)n);
  }
  if (rc == RSL_HTTP_OK) rc = rsl_http_conn_write(ex->conn, data, len);
  if (rc == RSL_HTTP_OK && ex->chunked && len)
    rc = rsl_http_conn_write(ex->conn, "\r\n", 2);
  ex->in_cb = 0;
  return rc == RSL_HTTP_OK ? RSL_CHUNK_TAKEN : RSL_CHUNK_ABORT;
}

static void on_attempt(void *ud, long status, rsl_error_class error) {
  exchange *ex = ud;
  ex->attempts++;
  rsl_metrics_attempt(ex->r->m, status, error);
}

static void on_resume(void *ud) {
  exchange *ex = ud;
  if (ex->call) rsl_call_resume(ex->call);
}

/* Seconds until the route's breaker for this call's URL admits a probe,
 * or -1 when unknown. */
static double probe_in_s(const exchange *ex) {
  rsl_breaker *b = rsl_client_breaker(
      ex->r->client, rsl_policy_conf_of(ex->r->policy), ex->url);
  double ms = b ? rsl_breaker_probe_in_ms(b, rsl_loop_now_ms(ex->p->env->loop))
                : -1;
  return ms < 0 ? -1 : ceil(ms / 1000); /* whole seconds, rounded up */
}

static void on_call_done(void *ud, rsl_call_result *res) {
  exchange *ex = ud;
  rsl_proxy *p = ex->p;
  rsl_http_conn *c = ex->conn;
  ex->call = NULL;
  double seconds =
      (double)(rsl_loop_now_ns(p->env->loop) - ex->started_ns) / NS_PER_S;
  rsl_metrics_call(ex->r->m, res->outcome, res->attempts, seconds);
  if (ex->committed && res->outcome != RSL_OUTCOME_OK) ex->r->m->stream_aborts++;
  if (c) {
    rsl_http_conn_set_data(c, NULL); /* a close from here on is ours */
    int keep_alive = ex->keep_alive && !p->draining;
    if (ex->committed && res->outcome == RSL_OUTCOME_OK) {
      int rc = ex->chunked ? rsl_http_conn_write(c, "0\r\n\r\n", 5)
                           : RSL_HTTP_OK;
      if (rc == RSL_HTTP_OK) rsl_http_conn_end(c, keep_alive);
    } else if (ex->committed) {
      /* Past the commit point: a reset, so the client sees an error and
       * not a short body that looks complete. */
      rsl_http_conn_close(c, 1);
    } else if (res->last.status >= 100 && res->last.status <= 599) {
      answer_response(ex, c, res, keep_alive);
    } else if (res->last.status) { /* not an HTTP status (RFC 9110 15) */
      answer_json(c, 502, "protocol: the upstream's status is out of range",
                  "failed", res->attempts, ex->request_id, -1, keep_alive,
                  ex->head_only, ex->http10);
    } else {
      double retry_after = res->outcome == RSL_OUTCOME_BREAKER_OPEN
                               ? probe_in_s(ex) : -1;
      answer_json(c, error_status(res),
                  res->message[0] ? res->message : "no response",
                  rsl_outcome_name(res->outcome), res->attempts,
                  ex->request_id, retry_after, keep_alive, ex->head_only,
                  ex->http10);
    }
  }
  rsl_response_free(&res->last);
  exchange_free(ex);
}

/* --- requests ------------------------------------------------------------- */

/* The client's X-Request-Id, or a new one: 16 random hex digits drawn
 * once per process, then a counter (unique without a system call per
 * request). */
static void request_id(const rsl_http_request *req, char *out) {
  static char prefix[17];
  static unsigned long long counter;
  size_t len = 0;
  const char *id = rsl_http_header_get(req, "x-request-id", &len);
  if (id && len > 0 && len <= REQUEST_ID_MAX) {
    memcpy(out, id, len);
    out[len] = '\0';
    return;
  }
  if (!prefix[0]) {
    unsigned long long r = 0;
    if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r)
      r = (unsigned long long)rsl_now_ns();
    snprintf(prefix, sizeof prefix, "%016llx", r);
  }
  snprintf(out, REQUEST_ID_MAX + 1, "%s%016llx", prefix, ++counter);
}

static int answer_admin(rsl_proxy *p, rsl_http_conn *c,
                        const rsl_http_request *req);

static int on_request(void *ud, rsl_http_conn *c, const rsl_http_request *req) {
  rsl_proxy *p = ud;
  int keep_alive = req->keep_alive && !p->draining;
  int http10 = req->http_minor == 0;
  char rid[REQUEST_ID_MAX + 1];
  if (p->admin_prefix && req->path_len > p->admin_len &&
      memcmp(req->path, p->admin_prefix, p->admin_len) == 0 &&
      req->path[p->admin_len] == '/')
    return answer_admin(p, c, req);
  request_id(req, rid);
  if (p->in_flight >= p->max_in_flight) {
    p->metrics.rejected[RSL_REJECT_OVERLOAD]++;
    return answer_json(c, 503, "too many requests in flight", "overloaded", 0,
                       rid, 1, keep_alive, req->head_only, http10);
  }
  route *r = route_match(p, req);
  if (!r) {
    p->metrics.rejected[RSL_REJECT_NO_ROUTE]++;
    return answer_json(c, 404, "no route for this request", "no_route", 0,
                       rid, -1, keep_alive, req->head_only, http10);
  }
  rsl_fwd_lines lines;
  rsl_fwd_overrides ov;
  const char *why = NULL;
  int rc = rsl_fwd_request(req, rsl_http_conn_peer(c), r->keep_host, rid,
                           &lines, &ov, &why);
  if (rc == -EINVAL) {
    p->metrics.rejected[RSL_REJECT_BAD_REQUEST]++;
    return answer_json(c, 400, why, "bad_request", 0, rid, -1, keep_alive,
                       req->head_only, http10);
  }
  char *url = NULL;
  exchange *ex = rc == 0 ? calloc(1, sizeof *ex) : NULL;
  /* The target as sent (origin-form); an absolute-form's path and query. */
  if (ex && req->target_len && req->target[0] == '/')
    rc = asprintf(&url, "%s%.*s", r->upstream, (int)req->target_len,
                  req->target);
  else if (ex)
    rc = asprintf(&url, "%s%.*s%s%.*s", r->upstream, (int)req->path_len,
                  req->path, req->query_len ? "?" : "", (int)req->query_len,
                  req->query);
  if (!ex || rc < 0) {
    free(ex);
    rsl_fwd_lines_free(&lines);
    return rsl_http_conn_reject(c, 503);
  }
  *ex = (exchange){.p = p, .conn = c, .r = r, .keep_alive = keep_alive,
                   .head_only = req->head_only, .http10 = http10,
                   .started_ns = rsl_loop_now_ns(p->env->loop)};
  memcpy(ex->request_id, rid, sizeof rid);
  ex->url = url;
  ex->stream = (rsl_call_stream){.on_commit = on_commit, .on_chunk = on_chunk,
                                 .on_attempt = on_attempt, .ud = ex};
  rsl_timer_init(&ex->resume, on_resume, ex);
  r->refs++;
  ex->next = p->exchanges;
  if (ex->next) ex->next->prev = ex;
  p->exchanges = ex;
  p->in_flight++;
  rsl_http_conn_set_data(c, ex);

  int with_body = req->body_len || strcmp(req->method, "POST") == 0 ||
                  strcmp(req->method, "PUT") == 0 ||
                  strcmp(req->method, "PATCH") == 0;
  rsl_call_request creq = {
      .method = req->method,
      .url = url,
      .headers = (const char *const *)lines.line,
      .header_count = lines.n,
      .body = with_body ? req->body : NULL,
      .body_len = req->body_len,
      .stream = &ex->stream,
      .raw = 1,
      .deadline_ms = ov.deadline_ms,
      .max_attempts = ov.max_attempts,
      .route = r->name,
      .request_id = rid,
      .handle = &ex->call,
  };
  const char *err = NULL;
  rc = rsl_call_start(p->env, r->client, r->policy, NULL, &creq, on_call_done,
                      ex, &err);
  rsl_fwd_lines_free(&lines);
  if (rc < 0) {
    rsl_http_conn_set_data(c, NULL);
    exchange_free(ex);
    return answer_json(c, 502, err, "failed", 0, rid, -1, keep_alive,
                       req->head_only, http10);
  }
  return RSL_HTTP_OK;
}

/* The client left (or the proxy closes) with its request in flight. */
static void on_close(void *ud, rsl_http_conn *c) {
  (void)ud;
  exchange *ex = rsl_http_conn_data(c);
  if (!ex) return;
  ex->conn = NULL;
  if (ex->in_cb) return; /* the stream callback aborts the call */
  if (ex->call) rsl_call_cancel(ex->call);
  exchange_free(ex);
}

static void on_drain(void *ud, rsl_http_conn *c) {
  (void)ud;
  exchange *ex = rsl_http_conn_data(c);
  /* Not from here: resuming can write to c from inside its own flush. */
  if (ex) rsl_timer_start(ex->p->env->loop, &ex->resume, 0);
}

static void on_reject(void *ud, int status) {
  rsl_proxy *p = ud;
  p->metrics.rejected[status == 413   ? RSL_REJECT_TOO_LARGE
                      : status == 431 ? RSL_REJECT_HEADERS
                                      : RSL_REJECT_BAD_REQUEST]++;
}

static const rsl_http_handlers HANDLERS = {
    .on_request = on_request,
    .on_close = on_close,
    .on_drain = on_drain,
    .on_reject = on_reject,
};

/* --- admin ---------------------------------------------------------------- */

static void write_gauges(const rsl_proxy *p, FILE *f) {
  fputs("# HELP resilua_breaker_state Circuit breaker state per route and "
        "key: 0 closed, 1 open, 2 half-open.\n"
        "# TYPE resilua_breaker_state gauge\n", f);
  for (size_t i = 0; i < p->nroutes; i++) {
    const rsl_breakers *set = &p->routes[i]->client->breakers;
    for (size_t k = 0; k < set->len; k++) {
      fputs("resilua_breaker_state{route=", f);
      rsl_metrics_label(f, p->routes[i]->name);
      fputs(",key=", f);
      rsl_metrics_label(f, set->items[k]->key);
      fprintf(f, "} %d\n", (int)set->items[k]->state); /* as documented */
    }
  }
  fputs("# HELP resilua_policy_info The policy version in force per route.\n"
        "# TYPE resilua_policy_info gauge\n", f);
  for (size_t i = 0; i < p->nroutes; i++) {
    fputs("resilua_policy_info{route=", f);
    rsl_metrics_label(f, p->routes[i]->name);
    fputs(",policy=", f);
    rsl_metrics_label(f, rsl_policy_name(p->routes[i]->policy));
    fputs(",version=", f);
    rsl_metrics_label(f, rsl_policy_version(p->routes[i]->policy));
    fputs("} 1\n", f);
  }
  fprintf(f, "# HELP resilua_proxy_in_flight Requests in flight.\n"
             "# TYPE resilua_proxy_in_flight gauge\n"
             "resilua_proxy_in_flight %zu\n"
             "# HELP resilua_proxy_connections Client connections open.\n"
             "# TYPE resilua_proxy_connections gauge\n"
             "resilua_proxy_connections %zu\n"
             "# HELP resilua_proxy_draining 1 while draining (SIGTERM).\n"
             "# TYPE resilua_proxy_draining gauge\n"
             "resilua_proxy_draining %d\n",
          p->in_flight, rsl_http_listener_connections(p->l), p->draining);
}

static int answer_admin(rsl_proxy *p, rsl_http_conn *c,
                        const rsl_http_request *req) {
  const char *what = req->path + p->admin_len;
  size_t what_len = req->path_len - p->admin_len;
  int keep_alive = req->keep_alive && !p->draining;
  int status = 200;
  const char *type = "text/plain; charset=utf-8";
  char *body = NULL;
  size_t body_len = 0;
  FILE *b = open_memstream(&body, &body_len);
  if (!b) return rsl_http_conn_reject(c, 503);
  if (rsl_http_name_is(what, what_len, "/health")) {
    status = p->draining ? 503 : 200;
    fputs(p->draining ? "draining\n" : "ok\n", b);
  } else if (rsl_http_name_is(what, what_len, "/metrics")) {
    type = "text/plain; version=0.0.4; charset=utf-8";
    p->metrics.rejected[RSL_REJECT_CONNECTIONS] =
        rsl_http_listener_refused(p->l);
    rsl_metrics_write(&p->metrics, b);
    write_gauges(p, b);
  } else {
    status = 404;
    fputs("not found\n", b);
  }
  if (fclose(b) != 0 || !body) {
    free(body);
    return rsl_http_conn_reject(c, 503);
  }
  answer_head h = {0};
  head_status(&h, status);
  head_fmt(&h, "Content-Type: %s\r\nContent-Length: %zu\r\n", type, body_len);
  write_connection(&h, keep_alive, req->http_minor == 0);
  head_str(&h, "\r\n");
  int rc = send_head(c, &h, !req->head_only);
  if (rc == RSL_HTTP_OK && !req->head_only)
    rc = rsl_http_conn_write(c, body, body_len);
  free(body);
  return rc == RSL_HTTP_OK ? rsl_http_conn_end(c, keep_alive) : rc;
}

/* --- the proxy ------------------------------------------------------------ */

int rsl_proxy_new(rsl_proxy **out, rsl_call_env *env,
                  const rsl_proxy_conf *conf, char **err) {
  rsl_proxy *p = calloc(1, sizeof *p);
  if (!p || (conf->admin_prefix &&
             !(p->admin_prefix = strdup(conf->admin_prefix)))) {
    free(p);
    if (err) *err = strdup("out of memory");
    return -ENOMEM;
  }
  p->env = env;
  p->admin_len = p->admin_prefix ? strlen(p->admin_prefix) : 0;
  p->max_in_flight = conf->max_in_flight;
  const rsl_http_limits limits = {
      .max_header_bytes = conf->max_header_bytes,
      .max_body_bytes = conf->max_body_bytes,
      .max_connections = conf->max_connections,
      .idle_timeout_ms = conf->idle_timeout_ms,
  };
  int rc = rsl_http_listener_new(&p->l, env->loop, conf->listen, &limits,
                                 &HANDLERS, p, err);
  if (rc < 0) {
    free(p->admin_prefix);
    free(p);
    return rc;
  }
  *out = p;
  return 0;
}

/* Open connections stay: a health probe on one sees the 503, and each
 * closes after its next answer (Connection: close). */
void rsl_proxy_drain(rsl_proxy *p) {
  p->draining = 1;
  rsl_http_listener_stop(p->l);
}

size_t rsl_proxy_in_flight(const rsl_proxy *p) { return p->in_flight; }

const char *rsl_proxy_address(const rsl_proxy *p) {
  return rsl_http_listener_address(p->l);
}

void rsl_proxy_free(rsl_proxy *p) {
  if (!p) return;
  rsl_http_listener_free(p->l); /* on_close ends each exchange */
  while (p->exchanges) { /* none left: each had a connection */
    if (p->exchanges->call) rsl_call_cancel(p->exchanges->call);
    exchange_free(p->exchanges);
  }
  rsl_proxy_set_routes(p, NULL, 0);
  free(p->routes);
  rsl_metrics_free(&p->metrics);
  free(p->admin_prefix);
  free(p);
}
