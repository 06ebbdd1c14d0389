/*
 * transport — HTTP attempts on libcurl's multi_socket API, driven by the
 * loop.  One attempt is one easy handle; the multi handle keeps connections
 * alive between attempts and calls.  Every CURLcode is classified into the
 * error classes of contract 2.
 * Uses: loop, libcurl.  Never includes lua.h.
 */
#ifndef RSL_TRANSPORT_H
#define RSL_TRANSPORT_H

#include <stddef.h>

#include "loop.h"

typedef enum {
  RSL_ERR_NONE,
  RSL_ERR_TIMEOUT,
  RSL_ERR_CONNECT,
  RSL_ERR_DNS,
  RSL_ERR_TLS,
  RSL_ERR_RESET,
  RSL_ERR_PROTOCOL,
  RSL_ERR_TOO_LARGE,
  /* HTTP/2: the server refused the stream unprocessed (RST_STREAM
   * REFUSED_STREAM, or above a GOAWAY's last-stream-id): nothing reached
   * its application, so it is always safe to send again. */
  RSL_ERR_REFUSED_STREAM,
  RSL_ERR_COUNT
} rsl_error_class;

const char *rsl_error_class_name(rsl_error_class e);
/* 0, or -1 for an unknown name. */
int rsl_error_class_parse(const char *name, rsl_error_class *out);

#define RSL_MAX_RESPONSE_BYTES_DEFAULT (16u << 20)
#define RSL_MAX_RESPONSE_HEADER_BYTES (64u << 10)

typedef struct rsl_header {
  char *name; /* lower-case */
  char *value;
} rsl_header;

/* What one attempt produced.  Owned by whoever holds it: free its contents
 * with rsl_response_free. */
typedef struct rsl_response {
  long status;           /* 0 when no HTTP response */
  rsl_error_class error; /* RSL_ERR_NONE when status is set */
  int local;             /* failed on our side (out of fds), not the peer's */
  char message[256];     /* what failed, for humans */
  rsl_header *headers;
  size_t header_count;
  char *body;
  size_t body_len;
  double latency_ms;
  double retry_after_ms; /* -1 when the response had no usable Retry-After */
  /* A gRPC call's status (grpc/grpc.h), set by the call, not the
   * transport: meaningful when `grpc` is 1; grpc_message is malloc'd or
   * NULL. */
  int grpc;
  int grpc_status;
  char *grpc_message;
} rsl_response;

void rsl_response_free(rsl_response *res);
/* The value of the first header called `name` (lower-case), or NULL. */
const char *rsl_response_header(const rsl_response *res, const char *name);

/* Streaming: what an rsl_attempt_data hook answers for a piece of body. */
enum {
  RSL_DATA_KEEP,  /* the transport keeps it in res.body, as without a hook */
  RSL_DATA_TAKEN, /* consumed by the hook */
  RSL_DATA_PAUSE, /* not consumed: the transfer pauses, and this piece comes
                     again after rsl_transport_resume */
  RSL_DATA_ABORT  /* fail the attempt now (error class protocol) */
};
/* Called with each piece of the response body as it arrives; head holds
 * the status and headers so far (no body).  ud is the attempt's ud. */
typedef int (*rsl_attempt_data)(void *ud, const rsl_response *head,
                                const char *data, size_t len);

/* Borrowed by the transport until the attempt ends. */
typedef struct rsl_request {
  const char *method;
  const char *url;
  const char *const *headers; /* "Name: value" lines */
  size_t header_count;
  const char *body; /* NULL: none */
  size_t body_len;
  long timeout_ms;
  long connect_timeout_ms;
  size_t max_response_bytes;
  /* 0: none.  Otherwise the attempt waits, first come first served, while
   * this many attempts are on the wire (curl's connection handling costs
   * O(connections) per transfer: an open-loop load that fell behind used
   * to open thousands of connections and collapse).  The wait counts in
   * the attempt's timeout and latency. */
  size_t max_active;
  rsl_attempt_data on_data; /* NULL: the body is kept whole */
  int raw; /* pass the body as sent: no Accept-Encoding, no decoding */
  /* HTTP/2: with prior knowledge (h2c) on http://, by ALPN on https://;
   * attempts to one origin share a connection, multiplexed.  0: curl's
   * default (HTTP/1.1 on http://). */
  int http2;
  /* A new connection, not one from the cache; on http:// with http2,
   * with prior knowledge (the attempt after a refused stream: the
   * connection that refused it takes no new stream). */
  int fresh;
} rsl_request;

/* Whether url is one an attempt can be sent to: http or https, a host, a
 * port in 1..65535.  0, or -1 with what is wrong written to why ("no
 * scheme ...", "bad port ..."), for a message that also shows the URL. */
int rsl_transport_check_url(const char *url, char *why, size_t size);

typedef struct rsl_transport rsl_transport;
typedef struct rsl_attempt rsl_attempt;

/* Called once per attempt unless cancelled; `res` is handed over to it. */
typedef void (*rsl_attempt_done)(void *ud, rsl_response *res);

int rsl_transport_new(rsl_transport **out, rsl_loop *loop);
/* Cancels every attempt still running (their callbacks are not called). */
void rsl_transport_free(rsl_transport *t);

/* Starts an attempt.  *out identifies it for rsl_transport_cancel and is
 * valid until its callback runs.  0, or -1 with *err (static) set. */
int rsl_transport_send(rsl_transport *t, const rsl_request *req,
                       rsl_attempt_done cb, void *ud, rsl_attempt **out,
                       const char **err);
void rsl_transport_cancel(rsl_transport *t, rsl_attempt *a);
/* Resumes an attempt whose on_data hook answered RSL_DATA_PAUSE. */
void rsl_transport_resume(rsl_transport *t, rsl_attempt *a);

#endif
