/*
 * http/conn — the HTTP/1.1 server side shared by `resilua serve` (server.c)
 * and `resilua proxy` (proxy/): a listener on the resilua loop, and
 * connections that parse one request at a time (http-parser, with limits),
 * hand it to the owner complete (body buffered), and send what the owner
 * writes, in order, with backpressure.  A connection that opens with the
 * HTTP/2 preface goes to the owner's on_h2c when it has one (serve: h2c).
 *
 * Provides: rsl_http_* (this file).
 * Uses: loop (watchers, timers), http-parser, libc sockets.  No lua.h.
 *
 * A connection is busy from the moment a request is handed over until the
 * owner calls rsl_http_conn_end; pipelined bytes wait meanwhile.  Every
 * function that may close a connection returns RSL_HTTP_GONE when it did:
 * the pointer is then invalid.  The owner learns of a close while busy
 * through on_close.
 */
#ifndef RSL_HTTP_CONN_H
#define RSL_HTTP_CONN_H

#include <stddef.h>
#include <stdint.h>

#include "../loop.h"

#define RSL_HTTP_MAX_HEADERS 100 /* header fields per request: 431 */

enum { RSL_HTTP_OK = 0, RSL_HTTP_GONE = -1 };

typedef struct rsl_http_listener rsl_http_listener;
typedef struct rsl_http_conn rsl_http_conn;

typedef struct rsl_http_header {
  const char *name; /* lower-case */
  size_t name_len;
  const char *value;
  size_t value_len;
} rsl_http_header;

/* One complete request; borrowed, valid until rsl_http_conn_end (or the
 * close).  Strings are not NUL-terminated, except method. */
typedef struct rsl_http_request {
  const char *method;
  const char *target; /* the request-target as sent */
  size_t target_len;
  const char *path, *query; /* query: after '?', "" if none */
  size_t path_len, query_len;
  const rsl_http_header *headers;
  size_t nheaders;
  const char *body; /* decoded (chunked framing removed) */
  size_t body_len;
  int http_minor; /* HTTP/1.x */
  int keep_alive; /* the client allows another request after this one */
  int head_only;  /* HEAD: the answer has no body */
} rsl_http_request;

typedef struct rsl_http_limits {
  size_t max_header_bytes; /* request line and fields: 431 */
  size_t max_body_bytes;   /* 413 */
  size_t max_connections;  /* more get a 503 and are closed at once */
  uint64_t idle_timeout_ms; /* 0: none.  A connection with no request in
                               progress and nothing to send is closed after
                               this long without input. */
} rsl_http_limits;

typedef struct rsl_http_handlers {
  /* A complete request.  The connection is busy until rsl_http_conn_end.
   * Returns RSL_HTTP_GONE if it closed the connection. */
  int (*on_request)(void *ud, rsl_http_conn *c, const rsl_http_request *req);
  /* c closes while busy (the client left, or the server closes): the
   * owner drops what it holds for c.  Its data pointer is still set. */
  void (*on_close)(void *ud, rsl_http_conn *c);
  /* What c had to send is sent (after rsl_http_conn_want_drain). */
  void (*on_drain)(void *ud, rsl_http_conn *c);
  /* Answered 400/413/431 (or 503, out of memory) before a request was
   * complete; then closed. */
  void (*on_reject)(void *ud, int status);
  /* Optional.  A connection that opens with the HTTP/2 client preface
   * (h2c with prior knowledge, RFC 9113 section 3.4) is handed over: the
   * owner takes fd (non-blocking, its to close) and the n bytes read from
   * it so far, preface first; the connection is gone from here.  It may
   * free the listener.  NULL: the preface is parsed as HTTP/1.1 (a 400). */
  void (*on_h2c)(void *ud, int fd, const char *read, size_t n);
} rsl_http_handlers;

/* Listens on `addr` ("HOST:PORT", "[V6]:PORT"; port 0 = ephemeral).  On
 * success *out is owned by the caller (rsl_http_listener_free); on failure
 * returns -errno or -EINVAL and sets *err to a malloc'd message. */
int rsl_http_listener_new(rsl_http_listener **out, rsl_loop *loop,
                          const char *addr, const rsl_http_limits *limits,
                          const rsl_http_handlers *h, void *ud, char **err);
/* Closes the listener and every connection (on_close for busy ones). */
void rsl_http_listener_free(rsl_http_listener *l);
/* Stops accepting (the listening socket is closed); connections go on. */
void rsl_http_listener_stop(rsl_http_listener *l);
/* "127.0.0.1:PORT" or "[::1]:PORT"; owned by l. */
const char *rsl_http_listener_address(const rsl_http_listener *l);
size_t rsl_http_listener_connections(const rsl_http_listener *l);
uint64_t rsl_http_listener_accepted(const rsl_http_listener *l);
/* Connections over max_connections: answered 503 and closed at once. */
uint64_t rsl_http_listener_refused(const rsl_http_listener *l);

/* The owner's pointer for c's current request (NULL when none). */
void rsl_http_conn_set_data(rsl_http_conn *c, void *data);
void *rsl_http_conn_data(const rsl_http_conn *c);
int rsl_http_conn_fd(const rsl_http_conn *c);
/* The client's address, "1.2.3.4" or "::1". */
const char *rsl_http_conn_peer(const rsl_http_conn *c);
/* The value of header `lower` in req (the first), or NULL. */
const char *rsl_http_header_get(const rsl_http_request *req,
                                const char *lower, size_t *len);
int rsl_http_name_is(const char *name, size_t len, const char *lower);

/* Queues bytes and sends what the socket takes.  OK or GONE (the client is
 * gone, or out of memory). */
int rsl_http_conn_write(rsl_http_conn *c, const void *data, size_t len);
/* Queues bytes to go out with the next write (one send for a response
 * head and its first bytes).  OK or GONE (out of memory). */
int rsl_http_conn_append(rsl_http_conn *c, const void *data, size_t len);
/* Bytes queued, not sent yet. */
size_t rsl_http_conn_pending(const rsl_http_conn *c);
/* Calls on_drain once what is queued now is sent. */
void rsl_http_conn_want_drain(rsl_http_conn *c);
/* The answer is complete: keep_alive 0 closes once it is sent; else the
 * next pipelined request is parsed.  OK or GONE. */
int rsl_http_conn_end(rsl_http_conn *c, int keep_alive);
/* Input from now on is read and dropped (a request that never ends). */
void rsl_http_conn_discard_input(rsl_http_conn *c);
/* Closes now; reset: with SO_LINGER 0 (the peer sees a RST).  on_close is
 * not called for a close the owner asks for. */
void rsl_http_conn_close(rsl_http_conn *c, int reset);
/* Answers with status and a text body, and closes after it (a request the
 * parser refused).  OK or GONE. */
int rsl_http_conn_reject(rsl_http_conn *c, int status);

/* "HTTP/1.1 200 OK\r\n" for status into out (>= 64 bytes). */
void rsl_http_status_line(char *out, size_t cap, int status);

#endif
