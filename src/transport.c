/*
 * transport — libcurl multi_socket on the resilua loop (the pattern of
 * curl's docs/examples/multi-uv.c).  See transport.h.
 */
#include "transport.h"

#include "hints.h"
#include "http/client.h"
#include "http/head.h"
#include "http2/refused.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* The connection cache's floor.  curl counts every connection in its
 * cache, in use or idle, against CURLMOPT_MAXCONNECTS, and when a transfer
 * ends with the cache over the limit it closes the oldest *idle* one: with
 * more attempts in flight than the limit, that is the connection just
 * handed back, so every later attempt opened a new one (a connect per
 * call, thousands of sockets in TIME_WAIT, and a collapse of the rate).
 * The limit therefore follows the attempts in flight (see
 * grow_connection_cache); this is only where it starts. */
#define MIN_CACHED_CONNECTIONS 1024
#define MAX_SPARE_ATTEMPTS 256 /* finished attempts kept for reuse */
#define MAX_H2C_ORIGINS 1024     /* past this, h2c attempts always ask for
                                    prior knowledge (see h2c_origin) */
#define MAX_ORIGIN_BYTES 256
/* Streams per HTTP/2 connection, on our side.  High, so that one h2c
 * connection carries every call in flight: with a second one being
 * opened, curl 7.88 sends the attempts that find the first full over new
 * HTTP/1.1 Upgrade connections (see h2c_origin) rather than wait. */
#define H2_MAX_CONCURRENT_STREAMS 100000L

/* An http:// origin spoken to in HTTP/2 (h2c).  libcurl 7.88 fails an
 * attempt that asks for prior knowledge on a connection it reuses ("Error
 * in the HTTP2 framing layer": curl#10634, fixed in curl 8.0), and one
 * that asks for plain HTTP/2 opens an HTTP/1.1 Upgrade connection, which
 * gRPC servers refuse, when there is no HTTP/2 connection to reuse.  So an
 * attempt asks for prior knowledge only when its origin has no h2c
 * connection, open or being opened; otherwise for HTTP/2, which reuses it
 * (and, with PIPEWAIT, waits for the one being opened). */
typedef struct h2c_origin {
  char name[MAX_ORIGIN_BYTES]; /* "http://host:port" as the URL spells it */
  int opening; /* prior-knowledge attempts in flight */
  int conns;   /* h2c connection sockets open */
  /* A stream was refused here since the last prior-knowledge attempt:
   * curl takes no new stream on that connection (REFUSED_STREAM, GOAWAY),
   * though its socket stays open for the others, so the next attempt
   * opens a new one with prior knowledge rather than an HTTP/1.1
   * Upgrade. */
  int refused;
} h2c_origin;

struct rsl_transport {
  rsl_loop *loop;
  CURLM *multi;
  /* Raw attempts to http:// numeric addresses (the proxy's): our own
   * HTTP/1.1 client, at a third of curl's cost per request. */
  rsl_h1_client *h1;
  rsl_timer timer; /* curl's single timeout */
  rsl_attempt *attempts; /* running, doubly linked, for free() */
  rsl_attempt *done_head, *done_tail; /* finished, not yet called back */
  rsl_attempt *queue_head, *queue_tail; /* waiting for max_active */
  size_t active; /* attempts added to the multi handle */
  int closing;   /* in rsl_transport_free: start no queued attempt */
  /* curl before 8.1.0 keeps, on a handle used again, a pointer to the
   * last header field of its previous transfer, which it frees; a
   * response whose first field line is folded then makes it free that
   * memory again (curl#11101): any server could crash the process.  With
   * such a curl, every attempt gets a fresh easy handle. */
  int fresh_handles;
  long max_connects;      /* CURLMOPT_MAXCONNECTS as set */
  /* Finished attempts, kept with their easy handle: creating one per
   * attempt was a good share of the client's allocations, and a handle
   * kept configured need not be set up again (see rsl_transport_send). */
  rsl_attempt *spare[MAX_SPARE_ATTEMPTS];
  int spare_count;
  /* The header list of a request with no headers of its own: built once. */
  struct curl_slist *default_headers;
  /* The connection sockets curl opened through opensocket_cb, by fd. */
  struct socket_ctx **by_fd;
  size_t by_fd_cap;
  h2c_origin *origins;
  size_t origin_count;
};

struct rsl_attempt {
  int tag; /* 0: not an http/client attempt (see rsl_h1_owns) */
  rsl_transport *t;
  CURL *easy;
  /* The options every attempt sets the same way are set on the handle;
   * and none of a request's own (a method, a body) is left on it.  A
   * handle that is not `plain` is reset before reuse. */
  int configured, plain;
  int raw; /* set for raw bodies (rsl_request.raw); kept like `configured` */
  struct curl_slist *header_list; /* owned, or NULL: t->default_headers */
  rsl_response res;
  size_t header_bytes, max_body_bytes;
  int too_large;
  /* The proxy's HTTP/1.1 attempts (raw, not HTTP/2) read their final head
   * as the HTTP/1.1 client does: checked (http/head.h; `bad_head` says why
   * not), and a chunked trailer is dropped rather than taken for header
   * fields.  head_status is the status of the head being read. */
  int proxied, head_done;
  long head_status;
  const char *bad_head;
  /* Requests curl started for this attempt (see prereq_cb); resent: it
   * tried a second, which was stopped before it went out.  refused: the
   * server refused its HTTP/2 stream unprocessed (see on_refused);
   * unsent: an HTTP/2 request that never went out (see prereq_cb). */
  int sends, resent, refused, unsent;
  int upgrade_stopped; /* an HTTP/1.1 Upgrade stopped (see prereq_cb) */
  int answered; /* its HTTP/2 stream began an answer (on_stream_event) */
  int http2; /* asked for HTTP/2 (rsl_request.http2) */
  uint64_t started_ns;
  rsl_attempt_done cb;
  void *ud;
  rsl_attempt_data on_data; /* streaming hook, or NULL */
  rsl_attempt *prev, *next;
  int added;  /* to the multi handle */
  /* 1 + the index of its h2c origin in t->origins, or 0; `opening`: it
   * asked for prior knowledge (counted in the origin's `opening`);
   * `h2c_resent`: it was sent again (see h2c_resend). */
  int h2c_origin, opening, h2c_resent;
  int queued; /* in t's queue, waiting for fewer than queue_limit active */
  size_t queue_limit;
  /* A queued attempt's timeout runs while it waits: when it fires first,
   * the attempt fails with `timeout` without ever being sent. */
  rsl_timer expiry;
  int expired;
  long timeout_ms;
  rsl_attempt *queue_prev, *queue_next;
  /* In t's done list (see drain_done) with its result, when `done`. */
  int done;
  CURLcode result;
  rsl_attempt *done_prev, *done_next;
  char errbuf[CURL_ERROR_SIZE];
};

/* Per-socket context, attached with curl_multi_assign.
 *
 * curl stops watching a keep-alive connection's socket when its transfer
 * ends (CURL_POLL_REMOVE) and watches it again when the next transfer
 * takes the connection: unregistering and registering it with epoll every
 * call was a visible share of a call's cost.  So a connection socket (one
 * curl opened through opensocket_cb, and closes through closesocket_cb) is
 * only `parked` on REMOVE: it stays registered for reading, weak (it does
 * not keep the loop alive), and unregistered only if it becomes readable
 * meanwhile (the server closed it), or when curl closes it.  Other sockets
 * (a resolver's, say) are unregistered on REMOVE, as curl expects. */
typedef struct socket_ctx {
  rsl_io io;
  rsl_transport *t;
  int conn;   /* a connection socket, in t->by_fd */
  int parked; /* curl does not watch it now */
  int h2c_origin; /* 1 + index in t->origins: an h2c connection; or 0 */
} socket_ctx;

static const char *const ERROR_CLASS_NAMES[RSL_ERR_COUNT] = {
    "none",  "timeout",  "connect",  "dns",
    "tls",   "reset",    "protocol", "too_large", "refused_stream"};

const char *rsl_error_class_name(rsl_error_class e) {
  return ERROR_CLASS_NAMES[e];
}

int rsl_error_class_parse(const char *name, rsl_error_class *out) {
  for (int i = RSL_ERR_TIMEOUT; i < RSL_ERR_COUNT; i++) {
    if (strcmp(name, ERROR_CLASS_NAMES[i]) == 0) {
      *out = (rsl_error_class)i;
      return 0;
    }
  }
  return -1;
}

void rsl_response_free(rsl_response *res) {
  for (size_t i = 0; i < res->header_count; i++) {
    free(res->headers[i].name);
    free(res->headers[i].value);
  }
  free(res->headers);
  free(res->body);
  free(res->grpc_message);
  res->grpc_message = NULL;
  res->headers = NULL;
  res->header_count = 0;
  res->body = NULL;
  res->body_len = 0;
}

const char *rsl_response_header(const rsl_response *res, const char *name) {
  for (size_t i = 0; i < res->header_count; i++)
    if (strcmp(res->headers[i].name, name) == 0) return res->headers[i].value;
  return NULL;
}

/* --- URLs ---------------------------------------------------------------- */

int rsl_transport_check_url(const char *url, char *why, size_t size) {
  const char *sep = strstr(url, "://");
  size_t scheme_len = sep ? (size_t)(sep - url) : 0;
  if (!*url) {
    snprintf(why, size, "empty");
    return -1;
  }
  if (!sep || scheme_len == 0 || strcspn(url, "/?#") < scheme_len) {
    snprintf(why, size, "no scheme (expected http:// or https://)");
    return -1;
  }
  if (!((scheme_len == 4 && strncasecmp(url, "http", 4) == 0) ||
        (scheme_len == 5 && strncasecmp(url, "https", 5) == 0))) {
    snprintf(why, size, "unsupported scheme '%.*s' (expected http or https)",
             (int)(scheme_len > 16 ? 16 : scheme_len), url);
    return -1;
  }
  if (strchr("/?#", sep[3])) { /* curl takes http:///x as host "x" */
    snprintf(why, size, "no host");
    return -1;
  }
  CURLU *u = curl_url();
  char *port = NULL;
  CURLUcode rc = u ? curl_url_set(u, CURLUPART_URL, url, 0) : CURLUE_OUT_OF_MEMORY;
  if (rc == CURLUE_OK &&
      curl_url_get(u, CURLUPART_PORT, &port, 0) == CURLUE_OK &&
      strcmp(port, "0") == 0)
    rc = CURLUE_BAD_PORT_NUMBER;
  curl_free(port);
  curl_url_cleanup(u);
  switch (rc) {
  case CURLUE_OK:
    return 0;
  case CURLUE_BAD_PORT_NUMBER:
    snprintf(why, size, "bad port (expected a number from 1 to 65535)");
    break;
  case CURLUE_NO_HOST:
    snprintf(why, size, "no host");
    break;
  case CURLUE_BAD_HOSTNAME:
    snprintf(why, size, "bad host name (a space or a character not allowed)");
    break;
  case CURLUE_BAD_IPV6:
    snprintf(why, size, "bad IPv6 address (expected [address])");
    break;
  default:
    snprintf(why, size, "%s", curl_url_strerror(rc));
    break;
  }
  return -1;
}

/* --- curl → loop --------------------------------------------------------- */

static void drain_done(rsl_transport *t);
static void on_stream_event(void *stream_data, rsl_h2_stream_event ev);

static void on_socket_ready(void *ud, int fd, unsigned events) {
  socket_ctx *ctx = ud;
  rsl_transport *t = ctx->t; /* ctx may be freed by socket_action */
  if (ctx->parked) {
    /* Idle, and closed by the peer (or sent something unasked): curl
     * finds out when it next looks at the connection. */
    rsl_io_set(t->loop, &ctx->io, 0);
    return;
  }
  int flags = 0, running;
  if (events & RSL_IO_READ) flags |= CURL_CSELECT_IN;
  if (events & RSL_IO_WRITE) flags |= CURL_CSELECT_OUT;
  if (events & RSL_IO_ERROR) flags |= CURL_CSELECT_ERR;
  curl_multi_socket_action(t->multi, fd, flags, &running);
  drain_done(t);
}

static socket_ctx *conn_socket(const rsl_transport *t, curl_socket_t s) {
  return s >= 0 && (size_t)s < t->by_fd_cap ? t->by_fd[s] : NULL;
}

static int socket_cb(CURL *easy, curl_socket_t s, int what, void *userp,
                     void *socketp) {
  (void)easy;
  rsl_transport *t = userp;
  socket_ctx *ctx = socketp ? socketp : conn_socket(t, s);
  if (what == CURL_POLL_REMOVE) {
    if (!ctx) return 0;
    if (ctx->conn) {
      ctx->parked = 1;
      rsl_io_set_weak(t->loop, &ctx->io, 1);
      if (ctx->io.events && ctx->io.events != RSL_IO_READ &&
          rsl_io_set(t->loop, &ctx->io, RSL_IO_READ) < 0)
        rsl_io_set(t->loop, &ctx->io, 0);
    } else {
      rsl_io_set(t->loop, &ctx->io, 0);
      free(ctx);
    }
    return 0;
  }
  if (!ctx) {
    ctx = calloc(1, sizeof *ctx);
    if (!ctx) return -1;
    ctx->t = t;
    rsl_io_init(&ctx->io, s, on_socket_ready, ctx);
  }
  if (!socketp) curl_multi_assign(t->multi, s, ctx);
  if (ctx->parked) {
    ctx->parked = 0;
    rsl_io_set_weak(t->loop, &ctx->io, 0);
  }
  unsigned events = 0;
  if (what & CURL_POLL_IN) events |= RSL_IO_READ;
  if (what & CURL_POLL_OUT) events |= RSL_IO_WRITE;
  return rsl_io_set(t->loop, &ctx->io, events) < 0 ? -1 : 0;
}

/* curl opens its connection sockets here (CURLOPT_OPENSOCKETFUNCTION), so
 * that the transport knows them (see socket_ctx), and which are h2c (see
 * h2c_origin); close-on-exec, so that a child process never holds one
 * open.  clientp is the attempt that opens the connection. */
static curl_socket_t opensocket_cb(void *clientp, curlsocktype purpose,
                                   struct curl_sockaddr *address) {
  const rsl_attempt *opener = clientp;
  rsl_transport *t = opener->t;
  curl_socket_t s =
      socket(address->family, address->socktype | SOCK_CLOEXEC,
             address->protocol);
  if (s < 0 || purpose != CURLSOCKTYPE_IPCXN) return s;
  if ((size_t)s >= t->by_fd_cap) {
    size_t cap = t->by_fd_cap ? t->by_fd_cap : 64;
    while (cap <= (size_t)s) cap *= 2;
    socket_ctx **by_fd = realloc(t->by_fd, cap * sizeof *by_fd);
    if (!by_fd) return s; /* an ordinary socket, unregistered on REMOVE */
    memset(by_fd + t->by_fd_cap, 0, (cap - t->by_fd_cap) * sizeof *by_fd);
    t->by_fd = by_fd;
    t->by_fd_cap = cap;
  }
  socket_ctx *ctx = t->by_fd[s];
  if (ctx) {
    /* Left from a socket closed behind our back: the close dropped its
     * registration; this puts our books right. */
    rsl_io_set(t->loop, &ctx->io, 0);
    if (ctx->h2c_origin) t->origins[ctx->h2c_origin - 1].conns--;
  } else {
    ctx = calloc(1, sizeof *ctx);
    if (!ctx) return s;
    t->by_fd[s] = ctx;
  }
  memset(ctx, 0, sizeof *ctx);
  ctx->t = t;
  ctx->conn = 1;
  rsl_io_init(&ctx->io, s, on_socket_ready, ctx);
  if (opener->opening) { /* a prior-knowledge attempt: h2c, reusable */
    ctx->h2c_origin = opener->h2c_origin;
    t->origins[ctx->h2c_origin - 1].conns++;
  }
  return s;
}

/* curl closes its connection sockets here (CURLOPT_CLOSESOCKETFUNCTION),
 * after CURL_POLL_REMOVE: a parked socket is unregistered before close. */
static int closesocket_cb(void *clientp, curl_socket_t s) {
  rsl_transport *t = clientp;
  socket_ctx *ctx = conn_socket(t, s);
  if (ctx) {
    rsl_io_set(t->loop, &ctx->io, 0);
    if (ctx->h2c_origin) t->origins[ctx->h2c_origin - 1].conns--;
    t->by_fd[s] = NULL;
    free(ctx);
  }
  return close(s);
}

static void on_timeout(void *ud) {
  rsl_transport *t = ud;
  int running;
  curl_multi_socket_action(t->multi, CURL_SOCKET_TIMEOUT, 0, &running);
  drain_done(t);
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp) {
  (void)multi;
  rsl_transport *t = userp;
  if (timeout_ms < 0) {
    rsl_timer_stop(t->loop, &t->timer);
    return 0;
  }
  /* socket_action must not be called from here: a 0 timeout runs on the
   * next step instead. */
  return rsl_timer_start(t->loop, &t->timer, (uint64_t)timeout_ms * 1000000u)
             < 0 ? -1 : 0;
}

int rsl_transport_new(rsl_transport **out, rsl_loop *loop) {
  static int curl_ready;
  if (!curl_ready) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return -1;
    curl_ready = 1;
  }
  rsl_transport *t = calloc(1, sizeof *t);
  if (!t) return -1;
  t->loop = loop;
  t->fresh_handles = curl_version_info(CURLVERSION_NOW)->version_num < 0x080100;
  t->multi = curl_multi_init();
  if (!t->multi) {
    free(t);
    return -1;
  }
  rsl_timer_init(&t->timer, on_timeout, t);
  curl_multi_setopt(t->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
  curl_multi_setopt(t->multi, CURLMOPT_SOCKETDATA, t);
  curl_multi_setopt(t->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
  curl_multi_setopt(t->multi, CURLMOPT_TIMERDATA, t);
  /* curl's default cache (4 x the handles added) shrinks between one call's
   * end and the next one's start, and then closes idle keep-alive
   * connections it will need again a moment later. */
  /* "Expect:" turns off 100-continue: a round trip for nothing here. */
  t->default_headers = curl_slist_append(NULL, "Expect:");
  if (!t->default_headers || rsl_h1_client_new(&t->h1, loop) < 0) {
    curl_slist_free_all(t->default_headers);
    curl_multi_cleanup(t->multi);
    free(t);
    return -1;
  }
  rsl_h2_refused_listen(on_stream_event);
  t->max_connects = MIN_CACHED_CONNECTIONS;
  curl_multi_setopt(t->multi, CURLMOPT_MAXCONNECTS, t->max_connects);
  /* HTTP/2 attempts to one origin share a connection (see set_http2), up
   * to the server's SETTINGS_MAX_CONCURRENT_STREAMS and ours (curl's
   * default, 100, would open a connection per 100 calls in flight). */
  curl_multi_setopt(t->multi, CURLMOPT_PIPELINING, CURLPIPE_MULTIPLEX);
  curl_multi_setopt(t->multi, CURLMOPT_MAX_CONCURRENT_STREAMS,
                    H2_MAX_CONCURRENT_STREAMS);
  *out = t;
  return 0;
}

/* Keeps CURLMOPT_MAXCONNECTS at twice the most attempts ever in flight
 * (never lower: it only stops curl from closing connections it will need
 * again; idle ones still age out after CURLOPT_MAXAGE_CONN).  Called
 * outside curl's callbacks, where curl_multi_setopt is allowed. */
static void grow_connection_cache(rsl_transport *t) {
  if ((long)t->active <= t->max_connects / 2) return;
  long want = (long)t->active * 2;
  if (curl_multi_setopt(t->multi, CURLMOPT_MAXCONNECTS, want) == CURLM_OK)
    t->max_connects = want;
}

static void pump(rsl_transport *t);

/* Appends attempt a, finished with `result`, to t's done list. */
static void done_push(rsl_transport *t, rsl_attempt *a, CURLcode result) {
  a->done = 1;
  a->result = result;
  a->done_next = NULL;
  a->done_prev = t->done_tail;
  if (t->done_tail) t->done_tail->done_next = a;
  else t->done_head = a;
  t->done_tail = a;
}

/* Takes queued attempt a out of t's queue, its expiry stopped. */
static void dequeue(rsl_transport *t, rsl_attempt *a) {
  if (a->queue_prev) a->queue_prev->queue_next = a->queue_next;
  else t->queue_head = a->queue_next;
  if (a->queue_next) a->queue_next->queue_prev = a->queue_prev;
  else t->queue_tail = a->queue_prev;
  a->queue_prev = a->queue_next = NULL;
  a->queued = 0;
  rsl_timer_stop(t->loop, &a->expiry);
}

/* Fails attempt a, taken out of the queue, with a timeout. */
static void expire(rsl_transport *t, rsl_attempt *a) {
  a->expired = 1;
  done_push(t, a, CURLE_OPERATION_TIMEDOUT);
}

static void on_queue_expiry(void *ud) {
  rsl_attempt *a = ud;
  rsl_transport *t = a->t;
  dequeue(t, a);
  expire(t, a);
  drain_done(t);
}

/* Ends attempt a (added to the multi handle or not): it goes back to the
 * spare list, with its easy handle, or is freed.  A queued attempt may
 * start in its place. */
static void attempt_free(rsl_attempt *a) {
  rsl_transport *t = a->t;
  if (a->prev) a->prev->next = a->next;
  else t->attempts = a->next;
  if (a->next) a->next->prev = a->prev;
  if (a->done) {
    if (a->done_prev) a->done_prev->done_next = a->done_next;
    else t->done_head = a->done_next;
    if (a->done_next) a->done_next->done_prev = a->done_prev;
    else t->done_tail = a->done_prev;
  }
  if (a->queued) dequeue(t, a);
  if (a->opening) t->origins[a->h2c_origin - 1].opening--;
  if (a->added) {
    curl_multi_remove_handle(t->multi, a->easy);
    t->active--;
  }
  curl_slist_free_all(a->header_list);
  rsl_response_free(&a->res);
  if (!a->easy || t->fresh_handles || t->spare_count == MAX_SPARE_ATTEMPTS) {
    if (a->easy) curl_easy_cleanup(a->easy);
    free(a);
    pump(t);
    return;
  }
  if (!a->plain) {
    curl_easy_reset(a->easy);
    a->configured = a->raw = 0;
  }
  CURL *easy = a->easy;
  int configured = a->configured, raw = a->raw;
  memset(a, 0, sizeof *a);
  a->t = t;
  a->easy = easy;
  a->configured = configured;
  a->raw = raw;
  t->spare[t->spare_count++] = a;
  pump(t);
}

/* Hands attempt a to curl; 0 or -1. */
static int attempt_add(rsl_transport *t, rsl_attempt *a) {
  if (curl_multi_add_handle(t->multi, a->easy) != CURLM_OK) return -1;
  a->added = 1;
  t->active++;
  grow_connection_cache(t);
  return 0;
}

/* Starts queued attempts while there is room under their limit, each
 * with what is left of its timeout; one whose time is up, or that curl
 * refuses, fails through the done list. */
static void pump(rsl_transport *t) {
  rsl_attempt *a;
  while (!t->closing && (a = t->queue_head) && t->active < a->queue_limit) {
    dequeue(t, a);
    long waited_ms = (long)((rsl_now_ns() - a->started_ns) / 1000000u);
    if (waited_ms >= a->timeout_ms) {
      expire(t, a);
      continue;
    }
    if (curl_easy_setopt(a->easy, CURLOPT_TIMEOUT_MS,
                         a->timeout_ms - waited_ms) == CURLE_OK &&
        attempt_add(t, a) == 0)
      continue;
    a->plain = 0;
    done_push(t, a, CURLE_OUT_OF_MEMORY);
    rsl_timer_start(t->loop, &t->timer, 0); /* on_timeout drains it */
  }
}

void rsl_transport_free(rsl_transport *t) {
  if (!t) return;
  t->closing = 1;
  while (t->attempts) attempt_free(t->attempts);
  while (t->spare_count) {
    rsl_attempt *a = t->spare[--t->spare_count];
    curl_easy_cleanup(a->easy);
    free(a);
  }
  curl_multi_cleanup(t->multi); /* closes sockets through socket_cb */
  for (size_t i = 0; i < t->by_fd_cap; i++) {
    if (!t->by_fd[i]) continue; /* none: curl closed them all above */
    rsl_io_set(t->loop, &t->by_fd[i]->io, 0);
    free(t->by_fd[i]);
  }
  free(t->by_fd);
  free(t->origins);
  rsl_h1_client_free(t->h1);
  curl_slist_free_all(t->default_headers);
  rsl_timer_stop(t->loop, &t->timer);
  free(t);
}

void rsl_transport_cancel(rsl_transport *t, rsl_attempt *a) {
  (void)t;
  if (rsl_h1_owns(a)) {
    rsl_h1_cancel((rsl_h1_attempt *)(void *)a);
    return;
  }
  a->plain = 0; /* stopped halfway: start the handle afresh */
  attempt_free(a);
}

/* --- one attempt --------------------------------------------------------- */

/* Hands a piece of body to the attempt's streaming hook: 1 when the hook
 * disposed of it (*ret is what curl gets), 0 to keep it. */
static int stream_body(rsl_attempt *a, char *data, size_t n, size_t *ret) {
  if (!a->res.status)
    curl_easy_getinfo(a->easy, CURLINFO_RESPONSE_CODE, &a->res.status);
  switch (a->on_data(a->ud, &a->res, data, n)) {
  case RSL_DATA_TAKEN: *ret = n; return 1;
  case RSL_DATA_PAUSE: *ret = CURL_WRITEFUNC_PAUSE; return 1;
  case RSL_DATA_ABORT: *ret = 0; return 1;
  default: return 0;
  }
}

void rsl_transport_resume(rsl_transport *t, rsl_attempt *a) {
  (void)t;
  if (rsl_h1_owns(a)) {
    rsl_h1_resume((rsl_h1_attempt *)(void *)a);
    return;
  }
  curl_easy_pause(a->easy, CURLPAUSE_CONT); /* curl runs it on its timer */
}

static size_t on_body(char *data, size_t size, size_t nmemb, void *ud) {
  rsl_attempt *a = ud;
  size_t n = size * nmemb, ret;
  rsl_response *res = &a->res;
  if (a->on_data && stream_body(a, data, n, &ret)) return ret;
  if (n > a->max_body_bytes - res->body_len) {
    a->too_large = 1;
    return 0; /* curl fails the transfer with CURLE_WRITE_ERROR */
  }
  char *body = realloc(res->body, res->body_len + n + 1);
  if (!body) return 0;
  memcpy(body + res->body_len, data, n);
  res->body = body;
  res->body_len += n;
  res->body[res->body_len] = '\0';
  return n;
}

/* The status code of a status line ("HTTP/1.1 200 OK", "HTTP/2 200"). */
static long status_of(const char *line, size_t n) {
  const char *sp = memchr(line, ' ', n);
  long code = 0;
  for (size_t i = sp ? (size_t)(sp - line) + 1 : n, digits = 0;
       i < n && digits < 3 && isdigit((unsigned char)line[i]); i++, digits++)
    code = code * 10 + (line[i] - '0');
  return code;
}

/* The blank line: a head is read.  A proxied attempt's final head is
 * checked; -1 refuses it (curl then fails the transfer, a protocol
 * error), before any of its body is taken. */
static int head_end(rsl_attempt *a) {
  if (!a->proxied || (a->head_status / 100 == 1 && a->head_status != 101))
    return 0; /* 1xx: interim, the final head follows */
  a->head_done = 1;
  a->bad_head = rsl_head_check(a->head_status, a->res.headers,
                              a->res.header_count);
  return a->bad_head ? -1 : 0;
}

/* A folded line (obs-fold, RFC 9112 section 5.2): joined to the value
 * before it with a space, as a proxy must and as the HTTP/1.1 client
 * does.  0, or -1 (out of memory; a proxied head that opens with one). */
static int unfold(rsl_attempt *a, const char *data, size_t n) {
  rsl_response *res = &a->res;
  const char *v = data, *end = data + n;
  while (v < end && (*v == ' ' || *v == '\t')) v++;
  while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ' ||
                     end[-1] == '\t'))
    end--;
  if (!res->header_count) {
    if (a->proxied) a->bad_head = "malformed response: a folded line first";
    return a->proxied ? -1 : 0;
  }
  char **value = &res->headers[res->header_count - 1].value;
  size_t len = strlen(*value), more = (size_t)(end - v);
  char *joined = realloc(*value, len + 1 + more + 1);
  if (!joined) return -1;
  joined[len] = ' ';
  memcpy(joined + len + 1, v, more);
  joined[len + 1 + more] = '\0';
  *value = joined;
  return 0;
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *ud) {
  rsl_attempt *a = ud;
  rsl_response *res = &a->res;
  size_t n = size * nmemb;
  a->header_bytes += n;
  if (a->header_bytes > RSL_MAX_RESPONSE_HEADER_BYTES) {
    a->too_large = 1;
    return 0;
  }
  if (!n || (a->proxied && a->head_done)) return n; /* a trailer: dropped */
  if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) {
    /* A new status line (after a 1xx): forget the interim headers. */
    for (size_t i = 0; i < res->header_count; i++) {
      free(res->headers[i].name);
      free(res->headers[i].value);
    }
    res->header_count = 0;
    a->head_status = status_of(data, n);
    return n;
  }
  if (data[0] == '\r' || data[0] == '\n') return head_end(a) < 0 ? 0 : n;
  if (data[0] == ' ' || data[0] == '\t') return unfold(a, data, n) < 0 ? 0 : n;
  const char *colon = memchr(data, ':', n);
  if (!colon) {
    if (!a->proxied) return n;
    a->bad_head = "malformed response: a field line without a colon";
    return 0;
  }
  size_t name_len = (size_t)(colon - data);
  /* "Name : v": a proxy removes the blank (RFC 9112 section 5.1) */
  while (name_len && (data[name_len - 1] == ' ' || data[name_len - 1] == '\t'))
    name_len--;
  const char *v = colon + 1, *end = data + n;
  while (v < end && (*v == ' ' || *v == '\t')) v++;
  while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ' ||
                     end[-1] == '\t'))
    end--;
  /* Room for 4, then doubled: res->headers holds 2^k (k >= 2) slots once
   * header_count has passed 2^(k-1). */
  size_t count = res->header_count;
  if (count == 0 || (count >= 4 && (count & (count - 1)) == 0)) {
    rsl_header *grown =
        realloc(res->headers, (count ? 2 * count : 4) * sizeof *grown);
    if (!grown) return 0;
    res->headers = grown;
  }
  rsl_header *headers = res->headers;
  char *name = strndup(data, name_len), *value = strndup(v, (size_t)(end - v));
  if (!name || !value) {
    free(name);
    free(value);
    return 0;
  }
  for (char *p = name; *p; p++) *p = (char)tolower((unsigned char)*p);
  headers[res->header_count].name = name;
  headers[res->header_count].value = value;
  res->header_count++;
  return n;
}

/* Hidden resends (docs/internals.md): when a reused keep-alive connection
 * dies before any byte of the answer, curl sends the request again on a
 * fresh connection by itself ("Connection died, retrying a fresh
 * connect"), up to five times, and reports one transfer.  The server may
 * have run the first request: a POST would run twice behind the policy's
 * back, and the attempts counted would be fewer than those sent.  curl
 * calls this before every request it sends (CURLOPT_PREREQFUNCTION), so
 * the second call of a transfer is such a resend: it is stopped before it
 * goes out, and the attempt ends as a `reset` for the policy to judge. */
static int prereq_cb(void *ud, char *conn_primary_ip, char *conn_local_ip,
                     int conn_primary_port, int conn_local_port) {
  rsl_attempt *a = ud;
  long sent = 0, connects = 0;
  if (a->sends++ == 0) {
    /* An h2c attempt without prior knowledge on a connection curl just
     * opened is about to send an HTTP/1.1 Upgrade request, which h2c-only
     * servers (gRPC's) refuse: it is stopped before it goes out, and
     * h2c_resend sends it with prior knowledge instead. */
    if (a->h2c_origin && !a->opening && !a->h2c_resent &&
        curl_easy_getinfo(a->easy, CURLINFO_NUM_CONNECTS, &connects) ==
            CURLE_OK &&
        connects > 0) {
      a->upgrade_stopped = a->unsent = 1;
      return CURL_PREREQFUNC_ABORT;
    }
    return CURL_PREREQFUNC_OK;
  }
  a->resent = 1;
  /* An HTTP/2 request that curl could not even hand to its connection
   * (no byte counted: nghttp2 takes no new stream once a GOAWAY came)
   * never left: as safe to send again as a refused stream.  An HTTP/1.1
   * one keeps the rule above (spec/19). */
  if (a->http2 &&
      curl_easy_getinfo(a->easy, CURLINFO_REQUEST_SIZE, &sent) == CURLE_OK &&
      sent == 0)
    a->unsent = 1;
  return CURL_PREREQFUNC_ABORT;
}

/* An attempt's HTTP/2 stream began an answer, or the server refused it
 * (see http2/refused.h).  A stream refused before any answer was not
 * processed: curl 7.88 then resends it by itself (stopped by prereq_cb:
 * the call sends it again, as a logged attempt), or fails it as a framing
 * error (GOAWAY); either way the attempt ends as a `refused_stream`,
 * which is safe to send again.  Every easy handle in the process is an
 * attempt's (CURLOPT_PRIVATE); the check is cheap. */
static void on_stream_event(void *stream_data, rsl_h2_stream_event ev) {
  CURL *easy = stream_data;
  rsl_attempt *a = NULL;
  if (curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&a) != CURLE_OK ||
      !a || a->easy != easy)
    return;
  if (ev == RSL_H2_STREAM_ANSWERED) {
    a->answered = 1;
    return;
  }
  if (a->answered) return; /* it began an answer: processed */
  a->refused = 1;
  if (a->h2c_origin) a->t->origins[a->h2c_origin - 1].refused = 1;
}

static rsl_error_class classify(const rsl_attempt *a, CURLcode code) {
  curl_off_t connect_us = 0;
  if (a->expired) return RSL_ERR_TIMEOUT; /* never sent: nothing to ask */
  if ((a->refused || a->unsent) && code != CURLE_OK)
    return RSL_ERR_REFUSED_STREAM;
  if (a->resent) return RSL_ERR_RESET;
  switch (code) {
  case CURLE_OK:
    return RSL_ERR_NONE;
  case CURLE_OPERATION_TIMEDOUT:
    /* A reused keep-alive connection reads a connect time of 0, but it was
     * connected: the request went out (pretransfer time set). */
    curl_easy_getinfo(a->easy, CURLINFO_CONNECT_TIME_T, &connect_us);
    if (connect_us == 0)
      curl_easy_getinfo(a->easy, CURLINFO_PRETRANSFER_TIME_T, &connect_us);
    return connect_us > 0 ? RSL_ERR_TIMEOUT : RSL_ERR_CONNECT;
  case CURLE_COULDNT_CONNECT:
  case CURLE_COULDNT_RESOLVE_PROXY:
    return RSL_ERR_CONNECT;
  case CURLE_COULDNT_RESOLVE_HOST:
    return RSL_ERR_DNS;
  case CURLE_SSL_CONNECT_ERROR:
  case CURLE_PEER_FAILED_VERIFICATION:
  case CURLE_SSL_CERTPROBLEM:
  case CURLE_SSL_CIPHER:
  case CURLE_SSL_CACERT_BADFILE:
  case CURLE_SSL_ENGINE_NOTFOUND:
  case CURLE_SSL_ENGINE_SETFAILED:
  case CURLE_SSL_ENGINE_INITFAILED:
  case CURLE_SSL_CRL_BADFILE:
  case CURLE_SSL_ISSUER_ERROR:
  case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
  case CURLE_SSL_INVALIDCERTSTATUS:
  case CURLE_SSL_SHUTDOWN_FAILED:
  case CURLE_USE_SSL_FAILED:
  case CURLE_SSL_CLIENTCERT:
    return RSL_ERR_TLS;
  case CURLE_RECV_ERROR:
    /* curl fails a malformed chunked body with RECV_ERROR too ("... in
     * chunked-encoding", "invalid chunk size"...): the peer sent bytes
     * that are not HTTP, which no retry mends.  A truncated one is
     * PARTIAL_FILE, a reset. */
    if (strstr(a->errbuf, "chunk")) return RSL_ERR_PROTOCOL;
    return RSL_ERR_RESET;
  case CURLE_SEND_ERROR:
  case CURLE_GOT_NOTHING:
  case CURLE_PARTIAL_FILE:
    return RSL_ERR_RESET;
  case CURLE_FILESIZE_EXCEEDED:
    return RSL_ERR_TOO_LARGE;
  case CURLE_WRITE_ERROR:
    return a->too_large ? RSL_ERR_TOO_LARGE : RSL_ERR_PROTOCOL;
  default: /* malformed replies, HTTP/2 framing, encodings, out of memory */
    return RSL_ERR_PROTOCOL;
  }
}

/* curl reports a socket() that failed for want of descriptors as a failed
 * connect, with no errno; asking for a descriptor ourselves tells. */
static int out_of_fds(void) {
  int fd = fcntl(0, F_DUPFD_CLOEXEC, 0);
  if (fd >= 0) {
    close(fd);
    return 0;
  }
  return errno == EMFILE || errno == ENFILE;
}

static void finish(rsl_attempt *a, CURLcode code) {
  rsl_response *res = &a->res;
  /* curl takes a close for the end of a head cut short (no blank line):
   * for the proxy a break, as for the HTTP/1.1 client, not an answer */
  if (code == CURLE_OK && a->proxied && !a->head_done) {
    a->bad_head = "connection closed before the response head was complete";
    code = CURLE_PARTIAL_FILE;
  }
  res->latency_ms = (double)(rsl_now_ns() - a->started_ns) / 1e6;
  res->error = classify(a, code);
  if (res->error == RSL_ERR_NONE) {
    curl_easy_getinfo(a->easy, CURLINFO_RESPONSE_CODE, &res->status);
    res->retry_after_ms = rsl_hints_retry_after_ms(res, (double)time(NULL));
  } else {
    res->local = code == CURLE_COULDNT_CONNECT && out_of_fds();
    res->status = 0; /* a streaming hook may have seen the status */
    snprintf(res->message, sizeof res->message, "%s%.200s",
             res->local ? "out of file descriptors: " : "",
             a->too_large ? "response over the size limit"
             : a->bad_head ? a->bad_head
             : res->error == RSL_ERR_REFUSED_STREAM && a->refused
                 ? "HTTP/2 stream refused by the server (REFUSED_STREAM or "
                   "GOAWAY): not processed"
             : res->error == RSL_ERR_REFUSED_STREAM && a->upgrade_stopped
                 ? "HTTP/1.1 Upgrade to h2c not sent (no time left to send "
                   "it with prior knowledge)"
             : res->error == RSL_ERR_REFUSED_STREAM
                 ? "HTTP/2 connection took no new stream (GOAWAY): request "
                   "not sent"
             : a->resent ? "reused connection died before the answer; "
                           "not resent"
             : a->errbuf[0] ? a->errbuf
                            : curl_easy_strerror(code));
  }
  rsl_response handed = *res;
  memset(res, 0, sizeof *res); /* ownership moves to the callback */
  rsl_attempt_done cb = a->cb;
  void *ud = a->ud;
  attempt_free(a);
  cb(ud, &handed);
}

/* Sends an h2c attempt again, once, when the way it went out reached no
 * application, so that the workaround in h2c_origin never shows:
 * - curl failed it as it tried to reuse an h2c connection with prior
 *   knowledge (CURLE_HTTP2 before a byte was sent): again as HTTP/2,
 *   which reuses it;
 * - it asked for HTTP/2 but found no h2c connection to reuse (one closed
 *   meanwhile, say), so curl sent an HTTP/1.1 Upgrade request that the
 *   h2c-only server answered with HTTP/2 frames (curl: "HTTP/0.9"):
 *   again with prior knowledge, on a fresh connection.
 * Returns 1 when it was sent again. */
static int h2c_resend(rsl_transport *t, rsl_attempt *a, CURLcode code) {
  long request_bytes = -1;
  if (!a->h2c_origin || a->h2c_resent || !a->added) return 0;
  curl_easy_getinfo(a->easy, CURLINFO_REQUEST_SIZE, &request_bytes);
  int reused_pk = code == CURLE_HTTP2 && a->opening && request_bytes == 0;
  int upgrade_refused =
      (code == CURLE_UNSUPPORTED_PROTOCOL || a->upgrade_stopped) && !a->opening;
  if (!reused_pk && !upgrade_refused) return 0;
  long waited_ms = (long)((rsl_now_ns() - a->started_ns) / 1000000u);
  if (waited_ms >= a->timeout_ms) return 0;
  curl_multi_remove_handle(t->multi, a->easy);
  a->added = 0;
  t->active--;
  rsl_response_free(&a->res);
  a->res.retry_after_ms = -1;
  a->header_bytes = 0;
  a->too_large = 0;
  a->h2c_resent = 1;
  /* a new transfer: not a hidden resend */
  a->sends = a->refused = a->unsent = a->upgrade_stopped = a->answered = 0;
  a->plain = 0; /* FRESH_CONNECT, a version: start the handle afresh */
  if (a->opening) t->origins[a->h2c_origin - 1].opening--;
  a->opening = upgrade_refused;
  if (a->opening) t->origins[a->h2c_origin - 1].opening++;
  CURLcode rc = curl_easy_setopt(a->easy, CURLOPT_HTTP_VERSION,
                                 upgrade_refused
                                     ? CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE
                                     : CURL_HTTP_VERSION_2_0);
  if (rc == CURLE_OK)
    rc = curl_easy_setopt(a->easy, CURLOPT_FRESH_CONNECT,
                          (long)upgrade_refused);
  if (rc == CURLE_OK)
    rc = curl_easy_setopt(a->easy, CURLOPT_TIMEOUT_MS,
                          a->timeout_ms - waited_ms);
  if (rc != CURLE_OK || attempt_add(t, a) < 0) {
    a->result = CURLE_OUT_OF_MEMORY;
    return 0;
  }
  return 1;
}

/* Reads every finished transfer first, then calls back: curl's
 * curl_multi_remove_handle looks through the messages not yet read, so
 * finishing each as it was read cost O(n^2) when many finished at once
 * (thousands, when an open-loop run falls behind).  A callback may cancel
 * an attempt still in the done list: attempt_free takes it out. */
static void drain_done(rsl_transport *t) {
  CURLMsg *msg;
  int left;
  while ((msg = curl_multi_info_read(t->multi, &left))) {
    if (msg->msg != CURLMSG_DONE) continue;
    rsl_attempt *a = NULL;
    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&a);
    if (a) done_push(t, a, msg->data.result);
  }
  rsl_attempt *a;
  while ((a = t->done_head)) {
    t->done_head = a->done_next;
    if (t->done_head) t->done_head->done_prev = NULL;
    else t->done_tail = NULL;
    a->done = 0;
    if (!h2c_resend(t, a, a->result)) finish(a, a->result);
  }
}

/* The h2c origin of url (1 + its index in t->origins, added if new), or
 * 0 when it cannot be kept (too long, too many, out of memory). */
static int origin_index(rsl_transport *t, const char *url) {
  const char *host = strstr(url, "://");
  size_t n = host ? strcspn(host + 3, "/?#") + (size_t)(host + 3 - url)
                  : strlen(url);
  if (n >= MAX_ORIGIN_BYTES) return 0;
  for (size_t i = 0; i < t->origin_count; i++)
    if (strncmp(t->origins[i].name, url, n) == 0 && !t->origins[i].name[n])
      return (int)i + 1;
  if (t->origin_count == MAX_H2C_ORIGINS) return 0;
  h2c_origin *grown =
      realloc(t->origins, (t->origin_count + 1) * sizeof *grown);
  if (!grown) return 0;
  t->origins = grown;
  h2c_origin *o = &t->origins[t->origin_count++];
  memcpy(o->name, url, n);
  o->name[n] = '\0';
  o->opening = o->conns = o->refused = 0;
  return (int)t->origin_count;
}

/* The HTTP version of an attempt, set on every one (handles are reused):
 * HTTP/2 by ALPN on https://; on http://, h2c (see h2c_origin); or
 * curl's default.  PIPEWAIT makes an HTTP/2 attempt wait for a connection
 * being set up to the same origin rather than open its own, so that many
 * attempts started at once multiplex on one connection. */
static CURLcode set_http2(rsl_transport *t, rsl_attempt *a,
                          const rsl_request *req) {
  long version = CURL_HTTP_VERSION_NONE;
  a->http2 = req->http2 != 0;
  if (req->http2 && strncasecmp(req->url, "https:", 6) == 0) {
    version = CURL_HTTP_VERSION_2TLS;
  } else if (req->http2) {
    a->h2c_origin = origin_index(t, req->url);
    const h2c_origin *o = a->h2c_origin ? &t->origins[a->h2c_origin - 1] : NULL;
    if (o && !req->fresh && (o->opening || (o->conns && !o->refused))) {
      version = CURL_HTTP_VERSION_2_0;
    } else {
      version = CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE;
      a->opening = a->h2c_origin != 0;
      if (a->opening) {
        t->origins[a->h2c_origin - 1].opening++;
        t->origins[a->h2c_origin - 1].refused = 0;
      }
    }
  }
  CURLcode rc = curl_easy_setopt(a->easy, CURLOPT_HTTP_VERSION, version);
  if (rc == CURLE_OK)
    rc = curl_easy_setopt(a->easy, CURLOPT_PIPEWAIT, req->http2 ? 1L : 0L);
  if (rc == CURLE_OK && req->fresh) {
    a->plain = 0; /* FRESH_CONNECT stays set: start the handle afresh */
    rc = curl_easy_setopt(a->easy, CURLOPT_FRESH_CONNECT, 1L);
  }
  return rc;
}

int rsl_transport_send(rsl_transport *t, const rsl_request *req,
                       rsl_attempt_done cb, void *ud, rsl_attempt **out,
                       const char **err) {
  rsl_h1_attempt *native;
  int rc_h1 = rsl_h1_send(t->h1, req, cb, ud, &native, err);
  if (rc_h1 != RSL_H1_DECLINED) {
    if (rc_h1 == 0) *out = (rsl_attempt *)(void *)native;
    return rc_h1;
  }
  rsl_attempt *a = t->spare_count ? t->spare[--t->spare_count] : NULL;
  if (!a) {
    a = calloc(1, sizeof *a);
    if (a) a->easy = curl_easy_init();
    if (!a || !a->easy) {
      free(a);
      *err = "out of memory";
      return -1;
    }
    a->t = t;
  }
  a->plain = 1;
  a->proxied = req->raw && !req->http2;
  a->cb = cb;
  a->ud = ud;
  a->on_data = req->on_data;
  a->res.retry_after_ms = -1;
  a->max_body_bytes = req->max_response_bytes ? req->max_response_bytes
                                              : RSL_MAX_RESPONSE_BYTES_DEFAULT;
  a->next = t->attempts;
  if (a->next) a->next->prev = a;
  t->attempts = a;

  CURL *e = a->easy;
  CURLcode rc = CURLE_OK;
  /* Fails the attempt setup at the first option curl refuses. */
#define SET(opt, val) \
  if (rc == CURLE_OK) rc = curl_easy_setopt(e, opt, val)
  if (!a->configured) {
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_PRIVATE, a);
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_ERRORBUFFER, a->errbuf);
    SET(CURLOPT_WRITEFUNCTION, on_body);
    SET(CURLOPT_WRITEDATA, a);
    SET(CURLOPT_HEADERFUNCTION, on_header);
    SET(CURLOPT_HEADERDATA, a);
    SET(CURLOPT_ACCEPT_ENCODING, "");
    SET(CURLOPT_OPENSOCKETFUNCTION, opensocket_cb);
    SET(CURLOPT_OPENSOCKETDATA, a);
    SET(CURLOPT_CLOSESOCKETFUNCTION, closesocket_cb);
    SET(CURLOPT_CLOSESOCKETDATA, t);
    SET(CURLOPT_PREREQFUNCTION, prereq_cb);
    SET(CURLOPT_PREREQDATA, a);
    a->configured = rc == CURLE_OK;
  }
  a->errbuf[0] = '\0';
  SET(CURLOPT_URL, req->url);
  SET(CURLOPT_TIMEOUT_MS, req->timeout_ms);
  SET(CURLOPT_CONNECTTIMEOUT_MS, req->connect_timeout_ms);
  /* A streamed body is not kept: on_body caps only what it keeps. */
  SET(CURLOPT_MAXFILESIZE_LARGE,
      req->on_data ? (curl_off_t)0 : (curl_off_t)a->max_body_bytes);
  if (rc == CURLE_OK) rc = set_http2(t, a, req);
  if (req->body) {
    a->plain = 0;
    SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req->body_len);
    SET(CURLOPT_POSTFIELDS, req->body);
  }
  if (!req->raw != !a->raw) { /* a proxy: the client's Accept-Encoding,
                                   the bytes as sent */
    SET(CURLOPT_ACCEPT_ENCODING, req->raw ? NULL : "");
    SET(CURLOPT_HTTP_CONTENT_DECODING, req->raw ? 0L : 1L);
    a->raw = req->raw != 0;
  }
  if (strcmp(req->method, "HEAD") == 0) {
    a->plain = 0;
    SET(CURLOPT_NOBODY, 1L);
  } else if (strcmp(req->method, "GET") != 0 || req->body) {
    a->plain = 0;
    SET(CURLOPT_CUSTOMREQUEST, req->method);
  }
#undef SET
  struct curl_slist *list = t->default_headers;
  if (req->header_count) {
    /* "Expect:" first, as in t->default_headers. */
    list = curl_slist_append(NULL, "Expect:");
    for (size_t i = 0; list && i < req->header_count; i++) {
      struct curl_slist *more = curl_slist_append(list, req->headers[i]);
      if (!more) curl_slist_free_all(list);
      list = more;
    }
    a->header_list = list;
    if (rc == CURLE_OK && !list) rc = CURLE_OUT_OF_MEMORY;
  }
  if (rc == CURLE_OK) rc = curl_easy_setopt(e, CURLOPT_HTTPHEADER, list);
  if (rc != CURLE_OK) {
    *err = curl_easy_strerror(rc);
    a->plain = 0;
    attempt_free(a);
    return -1;
  }
  a->started_ns = rsl_now_ns();
  a->timeout_ms = req->timeout_ms;
  if (req->max_active && (t->active >= req->max_active || t->queue_head)) {
    a->queued = 1;
    a->queue_limit = req->max_active;
    a->queue_next = NULL;
    a->queue_prev = t->queue_tail;
    if (t->queue_tail) t->queue_tail->queue_next = a;
    else t->queue_head = a;
    t->queue_tail = a;
    rsl_timer_init(&a->expiry, on_queue_expiry, a);
    if (rsl_timer_start(t->loop, &a->expiry,
                        (uint64_t)a->timeout_ms * 1000000u) < 0) {
      *err = "out of memory";
      attempt_free(a);
      return -1;
    }
    *out = a;
    return 0;
  }
  if (attempt_add(t, a) < 0) {
    *err = "curl_multi_add_handle failed";
    a->plain = 0;
    attempt_free(a);
    return -1;
  }
  *out = a;
  return 0;
}
