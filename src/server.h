/*
 * server — the scriptable upstream behind `resilua serve`: a non-blocking
 * HTTP/1.1 server on the resilua loop that hands each request to a
 * synchronous handler and answers now, later (delay_ms), or misbehaves on
 * purpose (hang, reset, close).  It deduplicates by Idempotency-Key (the
 * rules: "idempotency keys" in server.c), answers GET /_stats with JSON
 * counters, and is a model stub without a handler.
 *
 * A connection that opens with the HTTP/2 preface (h2c with prior
 * knowledge) is handed to src/http2/h2c.c, which answers HTTP/2 and gRPC
 * through the same handler.
 *
 * Provides: rsl_server_* (this file).
 * Uses: http/conn (connections), http2/h2c, loop (timers), libc.
 * Never includes lua.h: the Lua bridge is lua_server.c.
 */
#ifndef RSL_SERVER_H
#define RSL_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "http/conn.h"
#include "loop.h"

/* Hard limits, enforced per connection / per server. */
#define RSL_SERVER_MAX_HEADER_BYTES (16 * 1024)   /* URL + header fields: 431 */
#define RSL_SERVER_MAX_BODY_BYTES (1024 * 1024)   /* request body: 413 */
#define RSL_SERVER_MAX_RESPONSE_BYTES (8 * 1024 * 1024) /* handler's body */
#define RSL_SERVER_MAX_DELAY_MS (24 * 3600 * 1000ull)
#define RSL_SERVER_MAX_KEY_BYTES 255              /* Idempotency-Key: 400 */
#define RSL_SERVER_MAX_STORED_KEYS 10000          /* completed keys kept */
#define RSL_SERVER_MAX_STORED_BYTES (64u << 20)   /* and their bytes */
#define RSL_SERVER_IDLE_TIMEOUT_MS 60000          /* idle keep-alive: closed */
#define RSL_SERVER_MAX_IDLE_TIMEOUT_MS (24 * 3600 * 1000ull)
#define RSL_SERVER_MAX_CONNECTIONS 10000          /* more are closed at once */

typedef struct rsl_server rsl_server;

typedef rsl_http_header rsl_server_header; /* name lower-case */

/* One request, as the handler sees it.  Everything is borrowed from the
 * server and valid only during the handler call; strings are not
 * NUL-terminated (the method is). */
typedef struct rsl_server_request {
  const char *method;
  const char *path, *query; /* query: after '?', "" if none */
  size_t path_len, query_len;
  const rsl_server_header *headers;
  size_t nheaders;
  const char *body;
  size_t body_len;
  uint64_t n; /* request number, from 1; /_stats is not counted */
  int grpc;   /* a gRPC call over HTTP/2: body is its message, unframed */
} rsl_server_request;

typedef enum rsl_server_action {
  RSL_SERVER_RESPOND, /* send the response */
  RSL_SERVER_HANG,    /* never answer; keep the connection till the peer
                         closes it */
  RSL_SERVER_RESET,   /* close with SO_LINGER 0: the peer sees a RST */
  RSL_SERVER_CLOSE    /* close without answering */
} rsl_server_action;

/* What the handler answers.  The server initialises it to 200, no headers,
 * empty body, no delay, RSL_SERVER_RESPOND, and owns it. */
typedef struct rsl_server_response rsl_server_response;

/* Each returns 0, -EINVAL (status outside 100..599, header name not an
 * HTTP token or value with CR/LF/NUL, delay over RSL_SERVER_MAX_DELAY_MS),
 * -E2BIG (over RSL_SERVER_MAX_RESPONSE_BYTES) or -ENOMEM.  Header and body
 * bytes are copied.  Content-Length, Transfer-Encoding and Connection are
 * the server's: a handler's value for them is ignored. */
int rsl_server_response_status(rsl_server_response *res, int status);
int rsl_server_response_header(rsl_server_response *res, const char *name,
                               size_t name_len, const char *value,
                               size_t value_len);
int rsl_server_response_body(rsl_server_response *res, const char *body,
                             size_t len);
int rsl_server_response_delay(rsl_server_response *res, uint64_t delay_ms);
void rsl_server_response_action(rsl_server_response *res,
                                rsl_server_action action);
/* A gRPC call's status (0..16) and message (copied; NULL: none); -EINVAL
 * for a code outside 0..16 or a message over 4 KiB, -ENOMEM. */
int rsl_server_response_grpc(rsl_server_response *res, int code,
                             const char *message, size_t len);

/* Fills *res for *req.  Returns 0, or nonzero after setting *err to a
 * malloc'd message (or NULL) that the server frees: the request is then
 * answered 500 with the message as body and logged once to stderr.
 * It may close the server (the free waits until it returns); it cannot
 * run the loop, which refuses to step from inside its own callbacks. */
typedef int (*rsl_server_handler)(void *ud, const rsl_server_request *req,
                                  rsl_server_response *res, char **err);

/* Counters, in the order /_stats lists them (rsl_server_counter_name). */
typedef enum rsl_server_counter {
  RSL_SERVER_REQUESTS,      /* handled requests, /_stats excluded */
  RSL_SERVER_HANDLER_RUNS,
  RSL_SERVER_HANDLER_ERRORS, /* answered 500 because the handler failed */
  RSL_SERVER_DUPLICATES,    /* stored responses replayed (handler not run) */
  RSL_SERVER_CONFLICTS,     /* 409: same key still in flight */
  RSL_SERVER_MISMATCHES,    /* 422: same key, different request */
  RSL_SERVER_DELAYED,       /* answered (or acted) after delay_ms */
  RSL_SERVER_HANGS,
  RSL_SERVER_RESETS,
  RSL_SERVER_CLOSES,
  RSL_SERVER_ABANDONED,     /* the client left before its delayed answer */
  RSL_SERVER_REJECTED,      /* 400/413/431 before a request was complete */
  RSL_SERVER_CONNECTIONS,   /* accepted */
  RSL_SERVER_NCOUNTERS
} rsl_server_counter;

typedef struct rsl_server_stats {
  uint64_t counter[RSL_SERVER_NCOUNTERS];
  uint64_t status[600]; /* responses sent to handled requests, by status */
} rsl_server_stats;

const char *rsl_server_counter_name(rsl_server_counter c);

/* Listens on `addr` ("HOST:PORT", "[V6]:PORT"; port 0 = ephemeral) and
 * serves on `loop`.  handler NULL = the model stub.  A connection (HTTP/1.1
 * or h2c) without input for idle_timeout_ms (1..RSL_SERVER_MAX_IDLE_
 * TIMEOUT_MS; usually RSL_SERVER_IDLE_TIMEOUT_MS) and nothing in progress
 * is closed.  On success *out is owned by the caller (rsl_server_free); on
 * failure returns -errno or -EINVAL and sets *err to a malloc'd message the
 * caller frees. */
int rsl_server_new(rsl_server **out, rsl_loop *loop, const char *addr,
                   uint64_t idle_timeout_ms, rsl_server_handler handler,
                   void *ud, char **err);

/* Turns Idempotency-Key dedup on (the default) or off: off, a repeated key
 * runs the handler again, as on a server that does not dedup (most model
 * servers), and the key header is passed through like any other. */
void rsl_server_set_dedup(rsl_server *s, int on);

/* Closes the listener and every connection and frees everything.  Safe
 * from inside the handler: the free then happens when the handler returns,
 * and the handler is not called again.  NULL is a no-op. */
void rsl_server_free(rsl_server *s);

/* The bound address, "127.0.0.1:PORT" or "[::1]:PORT"; owned by s. */
const char *rsl_server_address(const rsl_server *s);

/* Live counters; owned by s. */
const rsl_server_stats *rsl_server_stats_get(rsl_server *s);

/* --- for the HTTP/2 side (http2/h2c.c) ------------------------------------ */

/* A handler's answer, read-only; borrowed from the response. */
typedef struct rsl_server_answer {
  int status;
  uint64_t delay_ms;
  rsl_server_action action;
  const char *head; /* "Name: value\r\n" lines */
  size_t head_len;
  const char *body;
  size_t body_len;
  int grpc_status; /* -1: the handler set none */
  const char *grpc_message; /* NULL: none */
  size_t grpc_message_len;
} rsl_server_answer;

void rsl_server_response_view(const rsl_server_response *res,
                              rsl_server_answer *out);
/* Runs the handler for req (numbered and counted as an HTTP/1.1 request
 * is; a failing handler's answer is a 500).  *out is the caller's (free it
 * with rsl_server_response_free).  0; -ENOMEM; or 1 when the handler
 * closed the server: *out is then NULL and the caller calls
 * rsl_server_free once it is out of its own callbacks. */
int rsl_server_handle(rsl_server *s, rsl_server_request *req,
                      rsl_server_response **out);
void rsl_server_response_free(rsl_server_response *res);
/* Counts a response sent (the status counters of /_stats). */
void rsl_server_count_status(rsl_server *s, int status);
rsl_loop *rsl_server_loop(const rsl_server *s);

/* The idle timeout rsl_server_new was given, in ns. */
uint64_t rsl_server_idle_timeout_ns(const rsl_server *s);

#endif
