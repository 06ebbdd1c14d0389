/*
 * proxy/headers — header fields across the proxy.  See headers.h.
 */
#include "headers.h"

#include <errno.h>
#include <string.h>
#include <strings.h>

#define MAX_OVERRIDE_MS 86400000.0

/* rsl_http_name_is for a literal, its length known when compiled: most
 * names differ in length, and then cost one comparison (this runs for
 * every header field, both ways, of every request). */
#define NAME_IS(name, len, literal)   \
  ((len) == sizeof literal - 1 && strncasecmp(name, literal, len) == 0)

typedef struct hop_name {
  const char *name;
  size_t len;
} hop_name;

#define HOP(literal) {literal, sizeof literal - 1}
static const hop_name HOP_BY_HOP[] = {
    HOP("connection"), HOP("keep-alive"), HOP("te"), HOP("trailer"),
    HOP("transfer-encoding"), HOP("upgrade"), HOP("proxy-connection"),
    HOP("proxy-authorization"), {NULL, 0}};

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
  for (const hop_name *h = HOP_BY_HOP; h->name; h++)
    if (h->len == len && strncasecmp(name, h->name, len) == 0) return 1;
  return connection && in_token_list(name, len, connection, connection_len);
}

/* A piece of a line: n bytes at s. */
typedef struct line_piece {
  const char *s;
  size_t n;
} line_piece;

#define PIECE(literal) ((line_piece){literal, sizeof literal - 1})
#define LINE_TEXT_MAX ((size_t)1 << 30) /* the request's headers bound it */

/* Appends a line made of np pieces (no stdio: this runs for every header
 * of every request). */
static int add_line(rsl_fwd_lines *l, const line_piece *p, size_t np) {
  if (l->n == RSL_FWD_MAX_LINES) return -ENOMEM; /* cannot happen: sized */
  size_t start = l->text.len;
  int rc = 0;
  for (size_t i = 0; rc == 0 && i < np; i++)
    rc = rsl_buf_add(&l->text, p[i].s, p[i].n, LINE_TEXT_MAX);
  if (rc == 0) rc = rsl_buf_add(&l->text, "", 1, LINE_TEXT_MAX);
  if (rc != 0) return -ENOMEM;
  l->start[l->n++] = start;
  return 0;
}

#define ADD_LINE(l, ...)                                                   \
  add_line(l, (const line_piece[]){__VA_ARGS__},                           \
           sizeof((const line_piece[]){__VA_ARGS__}) / sizeof(line_piece))

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
  out->text = (rsl_buf){0};
  size_t peer_len = strlen(peer), id_len = strlen(request_id);
  for (size_t i = 0; rc == 0 && i < req->nheaders; i++) {
    const rsl_http_header *h = &req->headers[i];
    const char *name = h->name, *value = h->value;
    size_t nl = h->name_len, vl = h->value_len;
    if (nl >= 10 && strncasecmp(name, "x-resilua-", 10) == 0) {
      double v;
      if (NAME_IS(name, nl, "x-resilua-deadline-ms")) {
        if ((v = parse_positive(value, vl, MAX_OVERRIDE_MS)) < 0) {
          *why = "x-resilua-deadline-ms: expected a whole number of ms";
          rc = -EINVAL;
          break;
        }
        ov->deadline_ms = v;
      } else if (NAME_IS(name, nl, "x-resilua-max-attempts")) {
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
        NAME_IS(name, nl, "content-length") ||
        NAME_IS(name, nl, "expect") || /* answered by the proxy */
        NAME_IS(name, nl, "x-forwarded-for") ||
        NAME_IS(name, nl, "via") ||
        NAME_IS(name, nl, "x-request-id") ||
        (!keep_host && NAME_IS(name, nl, "host")))
      continue;
    has_proto |= NAME_IS(name, nl, "x-forwarded-proto");
    has_accept |= NAME_IS(name, nl, "accept");
    has_type |= NAME_IS(name, nl, "content-type");
    /* curl sends "Name;" as a field with an empty value ("Name:" would
     * remove one of its own). */
    rc = vl ? ADD_LINE(out, {name, nl}, PIECE(": "), {value, vl})
            : ADD_LINE(out, {name, nl}, PIECE(";"));
  }
  if (rc == 0)
    rc = xff ? ADD_LINE(out, PIECE("X-Forwarded-For: "), {xff, xff_len},
                        PIECE(", "), {peer, peer_len})
             : ADD_LINE(out, PIECE("X-Forwarded-For: "), {peer, peer_len});
  if (rc == 0 && !has_proto) rc = ADD_LINE(out, PIECE("X-Forwarded-Proto: http"));
  if (rc == 0)
    rc = via ? ADD_LINE(out, PIECE("Via: "), {via, via_len},
                        PIECE(", " RSL_FWD_VIA))
             : ADD_LINE(out, PIECE("Via: " RSL_FWD_VIA));
  if (rc == 0)
    rc = ADD_LINE(out, PIECE("X-Request-Id: "), {request_id, id_len});
  /* curl's own defaults, which a proxy must not add: */
  if (rc == 0 && !has_accept) rc = ADD_LINE(out, PIECE("Accept:"));
  if (rc == 0 && !has_type) rc = ADD_LINE(out, PIECE("Content-Type:"));
  if (rc != 0) {
    rsl_fwd_lines_free(out);
    return rc;
  }
  for (size_t i = 0; i < out->n; i++) out->line[i] = out->text.data + out->start[i];
  return 0;
}

void rsl_fwd_lines_free(rsl_fwd_lines *l) {
  rsl_buf_free(&l->text);
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
        (!keep_length && NAME_IS(name, nl, "content-length")) ||
        NAME_IS(name, nl, "via") ||
        NAME_IS(name, nl, "x-request-id") ||
        NAME_IS(name, nl, "x-should-retry") ||
        (nl >= 10 && strncasecmp(name, "x-resilua-", 10) == 0))
      continue;
    if ((rc = rsl_buf_add(out, name, nl, limit)) == 0 &&
        (rc = rsl_buf_add(out, ": ", 2, limit)) == 0 &&
        (rc = rsl_buf_str(out, value, limit)) == 0)
      rc = rsl_buf_add(out, "\r\n", 2, limit);
  }
  return rc;
}
