/*
 * proxy/headers — what a forwarding proxy does to header fields (RFC 9110
 * section 7.6): the hop-by-hop fields are dropped both ways (Connection and
 * the fields it names, Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade,
 * Proxy-Connection, Proxy-Authorization), X-Forwarded-For/-Proto and Via
 * are added, x-resilua-* are read and dropped.
 *
 * Provides: rsl_fwd_* (this file).
 * Uses: http/conn (request headers), transport (response headers), libc.
 */
#ifndef RSL_PROXY_HEADERS_H
#define RSL_PROXY_HEADERS_H

#include <stddef.h>

#include "../http/buf.h"
#include "../http/conn.h"
#include "../transport.h"

#define RSL_FWD_MAX_LINES (RSL_HTTP_MAX_HEADERS + 12)
#define RSL_FWD_VIA "1.1 resilua"

/* The request header lines to send upstream: line[i] points into text,
 * one allocation for them all, owned by the caller (rsl_fwd_lines_free). */
typedef struct rsl_fwd_lines {
  char *line[RSL_FWD_MAX_LINES];
  size_t n;
  size_t start[RSL_FWD_MAX_LINES]; /* line[i]'s offset in text */
  rsl_buf text;                    /* the lines, each ending in NUL */
} rsl_fwd_lines;

/* What the request asks of the proxy (x-resilua-*); 0 when absent. */
typedef struct rsl_fwd_overrides {
  double deadline_ms;
  int max_attempts;
} rsl_fwd_overrides;

/* Builds the upstream request's header lines from req's: hop-by-hop and
 * x-resilua-* dropped, Host kept only with keep_host, X-Forwarded-For
 * (peer appended), X-Forwarded-Proto (kept, else "http"), Via and
 * X-Request-Id (request_id) set.  Reads the overrides.  0, -ENOMEM, or
 * -EINVAL for a malformed override (*why says which). */
int rsl_fwd_request(const rsl_http_request *req, const char *peer,
                    int keep_host, const char *request_id,
                    rsl_fwd_lines *out, rsl_fwd_overrides *ov,
                    const char **why);
void rsl_fwd_lines_free(rsl_fwd_lines *l);

/* Appends res's header fields for the client ("Name: value\r\n") to out,
 * the hop-by-hop ones, Content-Length, Via, X-Request-Id and X-Should-Retry
 * left out (the proxy sets those).  keep_length: Content-Length passes.
 * 0, or rsl_buf_add's error past limit bytes or out of memory. */
int rsl_fwd_response(const rsl_response *res, int keep_length, rsl_buf *out,
                     size_t limit);

/* 1 when the name is hop-by-hop, or named in connection (a Connection
 * field's value, or NULL). */
int rsl_fwd_hop_by_hop(const char *name, size_t len, const char *connection,
                       size_t connection_len);

#endif
