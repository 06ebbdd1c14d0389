/*
 * proxy/headers — header fields across the proxy.  See headers.h.
 */
#include "headers.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_OVERRIDE_MS 86400000.0

static const char *const HOP_BY_HOP[] = {
    "connection", "keep-alive", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-connection", "proxy-authorization", NULL};

/* 1 when `name` is one of the comma-separated tokens of list. */
static int in_token_list(const char *name, size_t len, const char *list,
                         size_t list_len) {
  size_t i = 0;
  while (i < list_len) {
    while (i < list_len && (list[i] == ' ' || list[i] == '\t' || list[i] == ','))
      i++;
    size_t start = i;
    while (i < list_len && list[i] != ',' && list[i] != ' ' && list[i] != '\t')
      i++;
    if (i - start == len && strncasecmp(list + start, name, len) == 0) return 1;
  }
  return 0;
}

int rsl_fwd_hop_by_hop(const char *name, size_t len, const char *connection,
                       size_t connection_len) {
  for (int i = 0; HOP_BY_HOP[i]; i++)
    if (rsl_http_name_is(name, len, HOP_BY_HOP[i])) return 1;
  return connection && in_token_list(name, len, connection, connection_len);
}

__attribute__((format(printf, 2, 3)))
static int add_line(rsl_fwd_lines *l, const char *fmt, ...) {
  if (l->n == RSL_FWD_MAX_LINES) return -ENOMEM; /* cannot happen: sized */
  char *s = NULL;
  va_list ap;
  va_start(ap, fmt);
  int n = vasprintf(&s, fmt, ap);
  va_end(ap);
  if (n < 0) return -ENOMEM;
  l->line[l->n++] = s;
  return 0;
}

/* A positive integer no larger than max, or -1. */
static double parse_positive(const char *v, size_t len, double max) {
  if (len == 0 || len > 12) return -1;
  double x = 0;
  for (size_t i = 0; i < len; i++) {
    if (v[i] < '0' || v[i] > '9') return -1;
    x = x * 10 + (v[i] - '0');
  }
  return x >= 1 && x <= max ? x : -1;
}

int rsl_fwd_request(const rsl_http_request *req, const char *peer,
                    int keep_host, const char *request_id,
                    rsl_fwd_lines *out, rsl_fwd_overrides *ov,
                    const char **why) {
  size_t conn_len = 0, xff_len = 0, via_len = 0;
  const char *conn = rsl_http_header_get(req, "connection", &conn_len);
  const char *xff = rsl_http_header_get(req, "x-forwarded-for", &xff_len);
  const char *via = rsl_http_header_get(req, "via", &via_len);
  int has_proto = 0, has_accept = 0, has_type = 0, rc = 0;
  *ov = (rsl_fwd_overrides){0};
  out->n = 0;
  for (size_t i = 0; rc == 0 && i < req->nheaders; i++) {
    const rsl_http_header *h = &req->headers[i];
    const char *name = h->name, *value = h->value;
    size_t nl = h->name_len, vl = h->value_len;
    if (nl >= 10 && strncasecmp(name, "x-resilua-", 10) == 0) {
      double v;
      if (rsl_http_name_is(name, nl, "x-resilua-deadline-ms")) {
        if ((v = parse_positive(value, vl, MAX_OVERRIDE_MS)) < 0) {
          *why = "x-resilua-deadline-ms: expected a whole number of ms";
          rc = -EINVAL;
          break;
        }
        ov->deadline_ms = v;
      } else if (rsl_http_name_is(name, nl, "x-resilua-max-attempts")) {
        if ((v = parse_positive(value, vl, 100)) < 0) {
          *why = "x-resilua-max-attempts: expected a whole number, 1 to 100";
          rc = -EINVAL;
          break;
        }
        ov->max_attempts = (int)v;
      }
      continue;
    }
    if (rsl_fwd_hop_by_hop(name, nl, conn, conn_len) ||
        rsl_http_name_is(name, nl, "content-length") ||
        rsl_http_name_is(name, nl, "expect") || /* answered by the proxy */
        rsl_http_name_is(name, nl, "x-forwarded-for") ||
        rsl_http_name_is(name, nl, "via") ||
        rsl_http_name_is(name, nl, "x-request-id") ||
        (!keep_host && rsl_http_name_is(name, nl, "host")))
      continue;
    has_proto |= rsl_http_name_is(name, nl, "x-forwarded-proto");
    has_accept |= rsl_http_name_is(name, nl, "accept");
    has_type |= rsl_http_name_is(name, nl, "content-type");
    /* curl sends "Name;" as a field with an empty value ("Name:" would
     * remove one of its own). */
    rc = vl ? add_line(out, "%.*s: %.*s", (int)nl, name, (int)vl, value)
            : add_line(out, "%.*s;", (int)nl, name);
  }
  if (rc == 0)
    rc = xff ? add_line(out, "X-Forwarded-For: %.*s, %s", (int)xff_len, xff, peer)
             : add_line(out, "X-Forwarded-For: %s", peer);
  if (rc == 0 && !has_proto) rc = add_line(out, "X-Forwarded-Proto: http");
  if (rc == 0)
    rc = via ? add_line(out, "Via: %.*s, " RSL_FWD_VIA, (int)via_len, via)
             : add_line(out, "Via: " RSL_FWD_VIA);
  if (rc == 0) rc = add_line(out, "X-Request-Id: %s", request_id);
  /* curl's own defaults, which a proxy must not add: */
  if (rc == 0 && !has_accept) rc = add_line(out, "Accept:");
  if (rc == 0 && !has_type) rc = add_line(out, "Content-Type:");
  if (rc != 0) rsl_fwd_lines_free(out);
  return rc;
}

void rsl_fwd_lines_free(rsl_fwd_lines *l) {
  for (size_t i = 0; i < l->n; i++) free(l->line[i]);
  l->n = 0;
}

int rsl_fwd_response(const rsl_response *res, int keep_length, rsl_buf *out,
                     size_t limit) {
  const char *conn = rsl_response_header(res, "connection");
  size_t conn_len = conn ? strlen(conn) : 0;
  int rc = 0;
  for (size_t i = 0; rc == 0 && i < res->header_count; i++) {
    const char *name = res->headers[i].name, *value = res->headers[i].value;
    size_t nl = strlen(name);
    if (rsl_fwd_hop_by_hop(name, nl, conn, conn_len) ||
        (!keep_length && rsl_http_name_is(name, nl, "content-length")) ||
        rsl_http_name_is(name, nl, "via") ||
        rsl_http_name_is(name, nl, "x-request-id") ||
        rsl_http_name_is(name, nl, "x-should-retry") ||
        (nl >= 10 && strncasecmp(name, "x-resilua-", 10) == 0))
      continue;
    if ((rc = rsl_buf_add(out, name, nl, limit)) == 0 &&
        (rc = rsl_buf_add(out, ": ", 2, limit)) == 0 &&
        (rc = rsl_buf_str(out, value, limit)) == 0)
      rc = rsl_buf_add(out, "\r\n", 2, limit);
  }
  return rc;
}
