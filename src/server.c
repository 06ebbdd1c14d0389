/*
 * server — the scriptable upstream: HTTP/1.1 on the resilua loop.  See
 * server.h.
 *
 * Uses: loop (one watcher per socket, timers for delays and lingering
 * closes), http-parser (request parsing, paused after each request so a
 * connection is answered in order), libc sockets.
 *
 * A connection handles one request at a time: it parses until a request is
 * complete, runs the handler, and parses the next one only once the answer
 * is sent, so pipelined bytes wait in `in` and at most one response sits in
 * `out`.  A delayed or hanging answer is a `job`; jobs and connections are
 * linked from the server, which frees whatever is left when it closes.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* accept4, SOCK_NONBLOCK */
#endif
#include "server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <http_parser.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define IN_MAX_BYTES (64 * 1024) /* unparsed input kept while one waits */
#define READ_CHUNK_BYTES (16 * 1024)
#define RESPONSE_HEAD_MAX_BYTES (64 * 1024)
#define OUT_KEEP_BYTES (64 * 1024) /* larger out buffers are freed once sent */
#define STATS_MAX_BYTES (64 * 1024)
#define LINGER_MS 2000            /* see conn_linger */
#define LINGER_MAX_BYTES (4 * 1024 * 1024)
#define ACCEPT_RETRY_MS 100       /* out of descriptors: pause accepting */
#define ACCEPTS_PER_WAKEUP 64
#define KEY_BUCKETS 16384         /* power of two */
#define NS_PER_MS 1000000ull

/* Result of anything that may free the connection it works on. */
enum { CONN_OK = 0, CONN_GONE = -1 };

/* A growable byte buffer with a hard cap given at each append. */
typedef struct buf {
  char *data;
  size_t len, cap;
} buf;

struct rsl_server_response {
  int status;
  uint64_t delay_ms;
  rsl_server_action action;
  buf head; /* "Name: value\r\n" lines */
  buf body;
};

typedef struct conn conn;
typedef struct job job;

/* An Idempotency-Key: in flight while its first request is handled or
 * waits, then (maybe) stored with the response it got. */
typedef struct key {
  struct key *next;          /* hash chain */
  struct key *older, *newer; /* stored keys, oldest first (eviction order) */
  job *owner;                /* in flight and waiting: the job that holds it */
  uint64_t hash, fingerprint;
  int stored;
  rsl_server_response res; /* when stored */
  size_t len;
  char name[];
} key;

/* A request whose answer waits: a delay timer, or a hang.  conn is NULL
 * once the client left (see job_abandon). */
struct job {
  rsl_server *srv;
  job *prev, *next; /* srv->jobs */
  conn *conn;
  key *key; /* held in flight, or NULL */
  rsl_server_response res;
  rsl_timer timer; /* inactive for a hang */
  int keep_alive, head_only;
};

struct conn {
  rsl_server *srv;
  conn *prev, *next; /* srv->conns */
  rsl_io io;
  rsl_timer linger;
  http_parser parser;
  buf in;   /* received, not parsed yet (IN_MAX_BYTES) */
  buf head; /* URL, then header names and values, of the request parsed */
  buf body;
  struct {
    uint32_t name, name_len, value, value_len; /* offsets into head */
  } hdr[RSL_SERVER_MAX_HEADERS];
  size_t nhdr, url_len, lingered;
  enum { HS_URL, HS_FIELD, HS_VALUE } hstate;
  int reject;       /* status to answer once the parser stops: 400/413/431 */
  int message_done; /* a request is complete (the parser is paused) */
  int close_after;  /* close once out is sent */
  int lingering;    /* our side is shut: discard input until EOF */
  buf out;
  size_t out_sent;
  job *job;
};

struct rsl_server {
  rsl_loop *loop;
  rsl_server_handler handler;
  void *ud;
  rsl_io listener;
  rsl_timer accept_retry;
  conn *conns;
  size_t nconns;
  job *jobs;
  key **buckets;
  key *oldest, *newest; /* stored keys */
  size_t nstored;
  int dedup;      /* Idempotency-Key dedup is on (the default) */
  int in_handler; /* the handler is running (the loop cannot re-enter) */
  int closing;    /* rsl_server_free was called from inside the handler */
  rsl_server_stats stats;
  char address[INET6_ADDRSTRLEN + 8];
};

static const char *const counter_names[RSL_SERVER_NCOUNTERS] = {
  "requests", "handler_runs", "handler_errors", "duplicates", "conflicts",
  "mismatches", "delayed", "action_hang", "action_reset", "action_close",
  "abandoned", "rejected", "connections",
};

const char *rsl_server_counter_name(rsl_server_counter c) {
  return (unsigned)c < RSL_SERVER_NCOUNTERS ? counter_names[c] : NULL;
}

/* --- buffers and responses ---------------------------------------------- */

static int buf_add(buf *b, const void *data, size_t n, size_t limit) {
  if (b->len > limit || n > limit - b->len) return -E2BIG;
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n) cap *= 2;
    if (cap > limit) cap = limit;
    char *d = realloc(b->data, cap);
    if (!d) return -ENOMEM;
    b->data = d;
    b->cap = cap;
  }
  if (n) memcpy(b->data + b->len, data, n);
  b->len += n;
  return 0;
}

static int buf_str(buf *b, const char *s, size_t limit) {
  return buf_add(b, s, strlen(s), limit);
}

static void buf_consume(buf *b, size_t n) {
  memmove(b->data, b->data + n, b->len - n);
  b->len -= n;
}

static void buf_free(buf *b) {
  free(b->data);
  *b = (buf){0};
}

static uint64_t fnv1a(uint64_t h, const void *data, size_t n) {
  const unsigned char *p = data;
  for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}
#define FNV_OFFSET 0xcbf29ce484222325ull

static void response_init(rsl_server_response *res) {
  *res = (rsl_server_response){.status = 200, .action = RSL_SERVER_RESPOND};
}

static void response_free(rsl_server_response *res) {
  buf_free(&res->head);
  buf_free(&res->body);
}

int rsl_server_response_status(rsl_server_response *res, int status) {
  if (status < 100 || status > 599) return -EINVAL;
  res->status = status;
  return 0;
}

static int is_token_char(unsigned char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
         (ch >= '0' && ch <= '9') || (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static int name_is(const char *name, size_t len, const char *lower) {
  return strlen(lower) == len && strncasecmp(name, lower, len) == 0;
}

int rsl_server_response_header(rsl_server_response *res, const char *name,
                               size_t name_len, const char *value,
                               size_t value_len) {
  if (name_len == 0) return -EINVAL;
  for (size_t i = 0; i < name_len; i++)
    if (!is_token_char((unsigned char)name[i])) return -EINVAL;
  for (size_t i = 0; i < value_len; i++)
    if (value[i] == '\r' || value[i] == '\n' || value[i] == '\0')
      return -EINVAL; /* no response splitting */
  /* Framing is the server's: a wrong length would break the connection. */
  if (name_is(name, name_len, "content-length") ||
      name_is(name, name_len, "transfer-encoding") ||
      name_is(name, name_len, "connection"))
    return 0;
  size_t before = res->head.len;
  int rc = buf_add(&res->head, name, name_len, RESPONSE_HEAD_MAX_BYTES);
  if (rc == 0) rc = buf_add(&res->head, ": ", 2, RESPONSE_HEAD_MAX_BYTES);
  if (rc == 0)
    rc = buf_add(&res->head, value, value_len, RESPONSE_HEAD_MAX_BYTES);
  if (rc == 0) rc = buf_add(&res->head, "\r\n", 2, RESPONSE_HEAD_MAX_BYTES);
  if (rc != 0) res->head.len = before;
  return rc;
}

int rsl_server_response_body(rsl_server_response *res, const char *body,
                             size_t len) {
  res->body.len = 0;
  return buf_add(&res->body, body, len, RSL_SERVER_MAX_RESPONSE_BYTES);
}

int rsl_server_response_delay(rsl_server_response *res, uint64_t delay_ms) {
  if (delay_ms > RSL_SERVER_MAX_DELAY_MS) return -EINVAL;
  res->delay_ms = delay_ms;
  return 0;
}

void rsl_server_response_action(rsl_server_response *res,
                                rsl_server_action action) {
  res->action = action;
}

/* Replaces whatever the handler set with a plain-text answer. */
static void response_text(rsl_server_response *res, int status,
                          const char *text) {
  response_free(res);
  response_init(res);
  res->status = status;
  rsl_server_response_header(res, "Content-Type", 12, "text/plain", 10);
  size_t len = strlen(text);
  if (len > RSL_SERVER_MAX_RESPONSE_BYTES) len = RSL_SERVER_MAX_RESPONSE_BYTES;
  rsl_server_response_body(res, text, len);
}

/* --- the model stub ----------------------------------------------------- */

/* Without a script: a deterministic "prediction" in [0, 1) from the body. */
static int model_stub(void *ud, const rsl_server_request *req,
                      rsl_server_response *res, char **err) {
  (void)ud;
  uint64_t h = fnv1a(FNV_OFFSET, req->body, req->body_len);
  char json[64];
  int n = snprintf(json, sizeof json, "{\"prediction\":%.6f}",
                   (double)(h >> 11) / 9007199254740992.0);
  int rc = rsl_server_response_header(res, "Content-Type", 12,
                                      "application/json", 16);
  if (rc == 0) rc = rsl_server_response_body(res, json, (size_t)n);
  if (rc != 0) *err = strdup("model stub: out of memory");
  return rc;
}

/* --- idempotency keys ------------------------------------------------------
 *
 * What a careful server does (draft-ietf-httpapi-idempotency-key-header):
 * the first request with a key runs; a repeat gets the stored response
 * (handler not run), 409 while the first is still in flight, 422 if the
 * request differs (fingerprint: method, target and body).
 *
 * Which outcomes complete a key:
 * - A response the server produced completes the key even when the client
 *   left before reading it (a delayed answer whose client timed out): the
 *   work was done, and a retry must not do it twice.  This is the case keys
 *   exist for.
 * - Except 408, 429 and 5xx: they say the request was not (or not surely)
 *   carried out, as load shedding and gateways answer before the work, so
 *   the key stays free for a retry instead of replaying the failure.
 * - hang, reset and close produce no response: the key is freed (for a
 *   hang, when the client gives up and closes), so a retry runs.
 * Stored keys are evicted oldest first past RSL_SERVER_MAX_STORED_KEYS;
 * keys in flight are bounded by the connections and never evicted.
 */

static key *key_find(rsl_server *s, const char *name, size_t len, uint64_t h) {
  for (key *k = s->buckets[h & (KEY_BUCKETS - 1)]; k; k = k->next)
    if (k->hash == h && k->len == len && memcmp(k->name, name, len) == 0)
      return k;
  return NULL;
}

static key *key_new(rsl_server *s, const char *name, size_t len, uint64_t h,
                    uint64_t fingerprint) {
  key *k = calloc(1, sizeof *k + len);
  if (!k) return NULL;
  memcpy(k->name, name, len);
  k->len = len;
  k->hash = h;
  k->fingerprint = fingerprint;
  key **bucket = &s->buckets[h & (KEY_BUCKETS - 1)];
  k->next = *bucket;
  *bucket = k;
  return k;
}

static void key_release(rsl_server *s, key *k) {
  key **p = &s->buckets[k->hash & (KEY_BUCKETS - 1)];
  while (*p != k) p = &(*p)->next;
  *p = k->next;
  if (k->stored) {
    if (k->older) k->older->newer = k->newer; else s->oldest = k->newer;
    if (k->newer) k->newer->older = k->older; else s->newest = k->older;
    s->nstored--;
  }
  response_free(&k->res);
  free(k);
}

/* Completes k with res (moved into it), or frees k if res does not count. */
static void key_complete(rsl_server *s, key *k, rsl_server_response *res) {
  int st = res->status;
  if (st >= 500 || st == 408 || st == 429) {
    key_release(s, k);
    return;
  }
  k->owner = NULL;
  k->stored = 1;
  k->res = *res;
  response_init(res);
  k->older = s->newest;
  if (s->newest) s->newest->newer = k; else s->oldest = k;
  s->newest = k;
  if (++s->nstored > RSL_SERVER_MAX_STORED_KEYS) key_release(s, s->oldest);
}

/* --- connections: output ------------------------------------------------ */

static void conn_close(conn *c, int reset);
static int conn_process(conn *c);

/* Watches what the connection's state needs. */
static void conn_watch(conn *c) {
  unsigned ev = RSL_IO_READ;
  if (c->out_sent < c->out.len)
    ev = RSL_IO_WRITE;
  else if (c->in.len >= IN_MAX_BYTES && !c->lingering &&
           !(c->job && c->job->res.action == RSL_SERVER_HANG))
    ev = 0; /* full: read again once a request is handled */
  /* A failure (ENOMEM) leaves it unwatched until the server closes. */
  rsl_io_set(c->srv->loop, &c->io, ev);
}

static void linger_expired(void *ud) { conn_close(ud, 0); }

/* Closing with unread input makes the kernel send a RST, which can destroy
 * the answer (a 413 before the body was read) before the client reads it.
 * So shut our side, discard what comes until the client closes, and give
 * up after LINGER_MS or LINGER_MAX_BYTES, as web servers do. */
static int conn_linger(conn *c) {
  if (shutdown(c->io.fd, SHUT_WR) < 0 ||
      rsl_timer_start(c->srv->loop, &c->linger, LINGER_MS * NS_PER_MS) < 0) {
    conn_close(c, 0);
    return CONN_GONE;
  }
  c->lingering = 1;
  c->in.len = 0;
  conn_watch(c);
  return CONN_OK;
}

/* Sends what it can of out; the rest when the socket is writable. */
static int conn_flush(conn *c) {
  while (c->out_sent < c->out.len) {
    ssize_t n = send(c->io.fd, c->out.data + c->out_sent,
                     c->out.len - c->out_sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n < 0) { /* EPIPE, ECONNRESET: the client is gone */
      conn_close(c, 0);
      return CONN_GONE;
    }
    c->out_sent += (size_t)n;
  }
  if (c->out_sent < c->out.len) {
    conn_watch(c);
    return CONN_OK;
  }
  if (c->out.cap > OUT_KEEP_BYTES) buf_free(&c->out);
  c->out.len = c->out_sent = 0;
  if (c->close_after) return conn_linger(c);
  conn_watch(c);
  return CONN_OK;
}

static int has_body(int status) {
  return status >= 200 && status != 204 && status != 304;
}

/* Serialises res after whatever out holds and starts sending it. */
static int conn_send(conn *c, const rsl_server_response *res, int keep_alive,
                     int head_only) {
  const size_t limit =
      RSL_SERVER_MAX_RESPONSE_BYTES + RESPONSE_HEAD_MAX_BYTES + 1024;
  const char *reason = http_status_str((enum http_status)res->status);
  char line[160];
  snprintf(line, sizeof line, "HTTP/1.1 %d %s\r\n", res->status,
           reason[0] == '<' ? "" : reason); /* "<unknown>" */
  int rc = buf_str(&c->out, line, limit);
  if (rc == 0) rc = buf_add(&c->out, res->head.data, res->head.len, limit);
  if (rc == 0 && has_body(res->status)) {
    snprintf(line, sizeof line, "Content-Length: %zu\r\n", res->body.len);
    rc = buf_str(&c->out, line, limit);
  }
  if (rc == 0 && !keep_alive)
    rc = buf_str(&c->out, "Connection: close\r\n", limit);
  else if (rc == 0 && c->parser.http_minor == 0)
    rc = buf_str(&c->out, "Connection: keep-alive\r\n", limit);
  if (rc == 0) rc = buf_add(&c->out, "\r\n", 2, limit);
  if (rc == 0 && has_body(res->status) && !head_only)
    rc = buf_add(&c->out, res->body.data, res->body.len, limit);
  if (rc != 0) { /* only ENOMEM: the sizes are capped below the limit */
    conn_close(c, 0);
    return CONN_GONE;
  }
  c->close_after = !keep_alive;
  return conn_flush(c);
}

static int conn_send_text(conn *c, int status, const char *text,
                          int keep_alive) {
  rsl_server_response res;
  response_init(&res);
  response_text(&res, status, text);
  int rc = conn_send(c, &res, keep_alive, c->parser.method == HTTP_HEAD);
  response_free(&res);
  return rc;
}

/* Answers a request that could not be parsed, then closes. */
static int conn_reject(conn *c, int status) {
  c->srv->stats.counter[RSL_SERVER_REJECTED]++;
  const char *text = status == 431 ? "request header fields too large\n"
                     : status == 413 ? "request body too large\n"
                     : status == 503 ? "out of memory\n"
                                     : "bad request\n";
  return conn_send_text(c, status, text, 0);
}

/* --- jobs: delayed and hanging answers ---------------------------------- */

static void job_fire(void *ud);

static job *job_new(conn *c, key *k, rsl_server_response *res, int keep_alive,
                    int head_only) {
  rsl_server *s = c->srv;
  job *j = calloc(1, sizeof *j);
  if (!j) return NULL;
  *j = (job){.srv = s, .conn = c, .key = k, .res = *res,
             .keep_alive = keep_alive, .head_only = head_only};
  response_init(res);
  rsl_timer_init(&j->timer, job_fire, j);
  j->next = s->jobs;
  if (s->jobs) s->jobs->prev = j;
  s->jobs = j;
  if (k) k->owner = j;
  c->job = j;
  return j;
}

static void job_free(job *j) {
  rsl_server *s = j->srv;
  rsl_timer_stop(s->loop, &j->timer);
  if (j->prev) j->prev->next = j->next; else s->jobs = j->next;
  if (j->next) j->next->prev = j->prev;
  if (j->conn) j->conn->job = NULL;
  if (j->key) key_release(s, j->key);
  response_free(&j->res);
  free(j);
}

/* The client left while its answer waited.  A delayed answer that holds a
 * key still completes it when due (see the note on keys); anything else
 * has no one to answer and goes. */
static void job_abandon(job *j) {
  rsl_server *s = j->srv;
  j->conn->job = NULL;
  j->conn = NULL;
  if (j->res.action == RSL_SERVER_HANG) {
    job_free(j);
    return;
  }
  s->stats.counter[RSL_SERVER_ABANDONED]++;
  if (!j->key) job_free(j);
}

/* Carries out res for a request: answers on c (NULL if the client left),
 * completes or frees the key k, and counts.  Takes res and k. */
static int finish(rsl_server *s, conn *c, key *k, rsl_server_response *res,
                  int keep_alive, int head_only) {
  int rc = CONN_OK;
  switch (res->action) {
  case RSL_SERVER_HANG: /* only from conn_dispatch: c is there */
    s->stats.counter[RSL_SERVER_HANGS]++;
    if (job_new(c, k, res, keep_alive, head_only)) {
      conn_watch(c);
      return CONN_OK;
    }
    if (k) key_release(s, k);
    response_free(res);
    return conn_reject(c, 503);
  case RSL_SERVER_RESET:
  case RSL_SERVER_CLOSE:
    s->stats.counter[res->action == RSL_SERVER_RESET ? RSL_SERVER_RESETS
                                                     : RSL_SERVER_CLOSES]++;
    if (k) key_release(s, k);
    if (c) conn_close(c, res->action == RSL_SERVER_RESET);
    response_free(res);
    return CONN_GONE;
  case RSL_SERVER_RESPOND:
    if (c) {
      s->stats.status[res->status]++;
      rc = conn_send(c, res, keep_alive, head_only);
    }
    if (k) key_complete(s, k, res);
    response_free(res);
    return c ? rc : CONN_GONE;
  }
  return rc;
}

static void job_fire(void *ud) {
  job *j = ud;
  rsl_server *s = j->srv;
  conn *c = j->conn;
  key *k = j->key;
  int keep_alive = j->keep_alive, head_only = j->head_only;
  rsl_server_response res = j->res;
  response_init(&j->res);
  j->key = NULL;
  job_free(j);
  if (finish(s, c, k, &res, keep_alive, head_only) == CONN_OK)
    conn_process(c); /* pipelined requests waited for this answer */
}

/* --- connections: requests ---------------------------------------------- */

static int on_message_begin(http_parser *p) {
  conn *c = p->data;
  c->head.len = c->body.len = 0;
  c->nhdr = c->url_len = 0;
  c->hstate = HS_URL;
  return 0;
}

/* Sets the status to answer once the parser stops, and stops it. */
static int parse_fail(conn *c, int rc, int too_big_status) {
  c->reject = rc == -E2BIG ? too_big_status : 503;
  return -1;
}

static int on_url(http_parser *p, const char *at, size_t len) {
  conn *c = p->data;
  int rc = buf_add(&c->head, at, len, RSL_SERVER_MAX_HEADER_BYTES);
  if (rc != 0) return parse_fail(c, rc, 431);
  c->url_len += len;
  return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len) {
  conn *c = p->data;
  if (c->hstate != HS_FIELD) {
    if (c->nhdr == RSL_SERVER_MAX_HEADERS) return parse_fail(c, -E2BIG, 431);
    c->hdr[c->nhdr].name = c->hdr[c->nhdr].value = (uint32_t)c->head.len;
    c->hdr[c->nhdr].name_len = c->hdr[c->nhdr].value_len = 0;
    c->nhdr++;
    c->hstate = HS_FIELD;
  }
  size_t at_off = c->head.len;
  int rc = buf_add(&c->head, at, len, RSL_SERVER_MAX_HEADER_BYTES);
  if (rc != 0) return parse_fail(c, rc, 431);
  for (size_t i = at_off; i < c->head.len; i++)
    if (c->head.data[i] >= 'A' && c->head.data[i] <= 'Z')
      c->head.data[i] = (char)(c->head.data[i] - 'A' + 'a');
  c->hdr[c->nhdr - 1].name_len += (uint32_t)len;
  return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len) {
  conn *c = p->data;
  if (c->hstate != HS_VALUE) {
    c->hdr[c->nhdr - 1].value = (uint32_t)c->head.len;
    c->hstate = HS_VALUE;
  }
  int rc = buf_add(&c->head, at, len, RSL_SERVER_MAX_HEADER_BYTES);
  if (rc != 0) return parse_fail(c, rc, 431);
  c->hdr[c->nhdr - 1].value_len += (uint32_t)len;
  return 0;
}

/* The value of header `lower` (the first one), or NULL. */
static const char *conn_header(const conn *c, const char *lower, size_t *len) {
  for (size_t i = 0; i < c->nhdr; i++)
    if (name_is(c->head.data + c->hdr[i].name, c->hdr[i].name_len, lower)) {
      *len = c->hdr[i].value_len;
      return c->head.data + c->hdr[i].value;
    }
  return NULL;
}

static int on_headers_complete(http_parser *p) {
  conn *c = p->data;
  /* http-parser sets content_length to ULLONG_MAX when there is none. */
  if (p->content_length != ULLONG_MAX &&
      p->content_length > RSL_SERVER_MAX_BODY_BYTES)
    return parse_fail(c, -E2BIG, 413); /* before reading it */
  size_t len;
  const char *expect = conn_header(c, "expect", &len);
  if (expect && name_is(expect, len, "100-continue")) {
    /* The client waits for this before sending the body; conn_process
     * sends it and parses on once it is out. */
    int rc = buf_str(&c->out, "HTTP/1.1 100 Continue\r\n\r\n", OUT_KEEP_BYTES);
    if (rc != 0) return parse_fail(c, rc, 503);
  }
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t len) {
  conn *c = p->data;
  int rc = buf_add(&c->body, at, len, RSL_SERVER_MAX_BODY_BYTES);
  return rc == 0 ? 0 : parse_fail(c, rc, 413);
}

static int on_message_complete(http_parser *p) {
  conn *c = p->data;
  c->message_done = 1;
  http_parser_pause(p, 1); /* one request at a time: see conn_process */
  return 0;
}

static const http_parser_settings parser_settings = {
  .on_message_begin = on_message_begin,
  .on_url = on_url,
  .on_header_field = on_header_field,
  .on_header_value = on_header_value,
  .on_headers_complete = on_headers_complete,
  .on_body = on_body,
  .on_message_complete = on_message_complete,
};

static int conn_send_stats(conn *c, int keep_alive) {
  const rsl_server_stats *st = &c->srv->stats;
  rsl_server_response res;
  response_init(&res);
  char item[64];
  int rc = rsl_server_response_header(&res, "Content-Type", 12,
                                      "application/json", 16);
  for (int i = 0; rc == 0 && i < RSL_SERVER_NCOUNTERS; i++) {
    snprintf(item, sizeof item, "%s\"%s\":%llu", i ? "," : "{",
             counter_names[i], (unsigned long long)st->counter[i]);
    rc = buf_str(&res.body, item, STATS_MAX_BYTES);
  }
  if (rc == 0) rc = buf_str(&res.body, ",\"status\":{", STATS_MAX_BYTES);
  for (int code = 100, first = 1; rc == 0 && code < 600; code++) {
    if (!st->status[code]) continue;
    snprintf(item, sizeof item, "%s\"%d\":%llu", first ? "" : ",", code,
             (unsigned long long)st->status[code]);
    rc = buf_str(&res.body, item, STATS_MAX_BYTES);
    first = 0;
  }
  if (rc == 0) rc = buf_str(&res.body, "}}", STATS_MAX_BYTES);
  rc = rc == 0 ? conn_send(c, &res, keep_alive, 0) : conn_reject(c, 503);
  response_free(&res);
  return rc;
}

/* The owner of an in-flight key hangs and its client has closed, but that
 * event may not have been dispatched yet: look, so that a retry after a
 * timeout does not get a 409 by a race. */
static int key_owner_gone(const key *k) {
  if (!k->owner || !k->owner->conn || k->owner->res.action != RSL_SERVER_HANG)
    return 0;
  char ch;
  ssize_t n = recv(k->owner->conn->io.fd, &ch, 1, MSG_PEEK | MSG_DONTWAIT);
  return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK &&
                    errno != EINTR);
}

/* Calls the handler for a complete request and answers, now or later. */
static int conn_dispatch(conn *c) {
  rsl_server *s = c->srv;
  http_parser *p = &c->parser;
  int keep_alive = http_should_keep_alive(p) && !p->upgrade;
  int head_only = p->method == HTTP_HEAD;
  const char *url = c->head.data ? c->head.data : "";
  struct http_parser_url u;
  http_parser_url_init(&u);
  if (http_parser_parse_url(url, c->url_len, p->method == HTTP_CONNECT, &u))
    return conn_reject(c, 400);

  rsl_server_request req = {.method = http_method_str(p->method),
                            .path = "/", .path_len = 1, .query = ""};
  if (u.field_set & (1 << UF_PATH)) {
    req.path = url + u.field_data[UF_PATH].off;
    req.path_len = u.field_data[UF_PATH].len;
  }
  if (u.field_set & (1 << UF_QUERY)) {
    req.query = url + u.field_data[UF_QUERY].off;
    req.query_len = u.field_data[UF_QUERY].len;
  }
  if (p->method == HTTP_GET && req.path_len == 7 &&
      memcmp(req.path, "/_stats", 7) == 0)
    return conn_send_stats(c, keep_alive);

  rsl_server_header hs[RSL_SERVER_MAX_HEADERS];
  for (size_t i = 0; i < c->nhdr; i++)
    hs[i] = (rsl_server_header){
        c->head.data + c->hdr[i].name, c->hdr[i].name_len,
        c->head.data + c->hdr[i].value, c->hdr[i].value_len};
  req.headers = hs;
  req.nheaders = c->nhdr;
  req.body = c->body.data ? c->body.data : "";
  req.body_len = c->body.len;
  req.n = ++s->stats.counter[RSL_SERVER_REQUESTS];

  size_t key_len;
  const char *key_name =
      s->dedup ? conn_header(c, "idempotency-key", &key_len) : NULL;
  key *k = NULL;
  if (key_name) {
    if (key_len == 0 || key_len > RSL_SERVER_MAX_KEY_BYTES) {
      s->stats.status[400]++;
      return conn_send_text(c, 400, "invalid Idempotency-Key\n", keep_alive);
    }
    uint64_t h = fnv1a(FNV_OFFSET, key_name, key_len);
    uint64_t fp = fnv1a(fnv1a(FNV_OFFSET, req.method, strlen(req.method) + 1),
                        url, c->url_len);
    fp = fnv1a(fnv1a(fp, "", 1), req.body, req.body_len);
    k = key_find(s, key_name, key_len, h);
    if (k && k->fingerprint != fp) {
      s->stats.counter[RSL_SERVER_MISMATCHES]++;
      s->stats.status[422]++;
      return conn_send_text(c, 422, "Idempotency-Key reused for a different "
                            "request\n", keep_alive);
    }
    if (k && !k->stored && key_owner_gone(k)) {
      conn_close(k->owner->conn, 0); /* frees k */
      k = NULL;
    }
    if (k && !k->stored) {
      s->stats.counter[RSL_SERVER_CONFLICTS]++;
      s->stats.status[409]++;
      return conn_send_text(c, 409, "a request with this Idempotency-Key is "
                            "in flight\n", keep_alive);
    }
    if (k) {
      s->stats.counter[RSL_SERVER_DUPLICATES]++;
      s->stats.status[k->res.status]++;
      return conn_send(c, &k->res, keep_alive, head_only);
    }
    if (!(k = key_new(s, key_name, key_len, h, fp))) return conn_reject(c, 503);
  }

  rsl_server_response res;
  response_init(&res);
  char *err = NULL;
  s->in_handler = 1;
  int hrc = s->handler(s->ud, &req, &res, &err);
  s->in_handler = 0;
  s->stats.counter[RSL_SERVER_HANDLER_RUNS]++;
  if (s->closing) { /* closed from inside the handler */
    free(err);
    response_free(&res);
    if (k) key_release(s, k);
    rsl_server_free(s);
    return CONN_GONE;
  }
  if (hrc != 0) {
    const char *msg = err ? err : "handler failed";
    fprintf(stderr, "resilua serve: request %llu: %s\n",
            (unsigned long long)req.n, msg);
    s->stats.counter[RSL_SERVER_HANDLER_ERRORS]++;
    response_text(&res, 500, msg);
    free(err);
  }
  if (res.delay_ms == 0 || res.action == RSL_SERVER_HANG)
    return finish(s, c, k, &res, keep_alive, head_only);
  job *j = job_new(c, k, &res, keep_alive, head_only);
  if (!j ||
      rsl_timer_start(s->loop, &j->timer, j->res.delay_ms * NS_PER_MS) < 0) {
    if (j) job_free(j); /* releases k */
    else if (k) key_release(s, k);
    response_free(&res);
    return conn_reject(c, 503);
  }
  s->stats.counter[RSL_SERVER_DELAYED]++;
  conn_watch(c); /* keep reading: pipelined bytes, or the client leaving */
  return CONN_OK;
}

/* Parses buffered input and handles complete requests, one at a time and
 * only while nothing is pending or unsent. */
static int conn_process(conn *c) {
  while (c->in.len && !c->job && !c->lingering &&
         c->out_sent == c->out.len) {
    if (HTTP_PARSER_ERRNO(&c->parser) == HPE_PAUSED)
      http_parser_pause(&c->parser, 0);
    size_t n = http_parser_execute(&c->parser, &parser_settings, c->in.data,
                                   c->in.len);
    buf_consume(&c->in, n);
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    if (c->message_done) {
      c->message_done = 0;
      if (conn_dispatch(c) != CONN_OK) return CONN_GONE;
    } else if (e != HPE_OK) {
      return conn_reject(c, c->reject ? c->reject
                            : e == HPE_HEADER_OVERFLOW ? 431 : 400);
    } else if (c->out.len && conn_flush(c) != CONN_OK) { /* 100 Continue */
      return CONN_GONE;
    }
  }
  conn_watch(c);
  return CONN_OK;
}

static void conn_read(conn *c) {
  char chunk[READ_CHUNK_BYTES];
  int discard =
      c->lingering || (c->job && c->job->res.action == RSL_SERVER_HANG);
  size_t room = discard ? sizeof chunk : IN_MAX_BYTES - c->in.len;
  if (room > sizeof chunk) room = sizeof chunk;
  if (room == 0) {
    conn_watch(c);
    return;
  }
  ssize_t n = recv(c->io.fd, chunk, room, 0);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
    return;
  if (n <= 0) { /* the client closed, or the connection broke */
    conn_close(c, 0);
    return;
  }
  if (c->lingering) {
    c->lingered += (size_t)n;
    if (c->lingered > LINGER_MAX_BYTES) conn_close(c, 0);
    return;
  }
  if (discard) return; /* a hung request: what follows is never answered */
  if (buf_add(&c->in, chunk, (size_t)n, IN_MAX_BYTES) != 0) {
    conn_close(c, 0);
    return;
  }
  conn_process(c);
}

static void conn_on_io(void *ud, int fd, unsigned events) {
  (void)fd;
  conn *c = ud;
  if ((events & RSL_IO_WRITE) &&
      (conn_flush(c) != CONN_OK || conn_process(c) != CONN_OK))
    return;
  if (events & (RSL_IO_READ | RSL_IO_ERROR)) conn_read(c);
}

static void conn_close(conn *c, int reset) {
  rsl_server *s = c->srv;
  if (c->job) job_abandon(c->job);
  rsl_io_set(s->loop, &c->io, 0);
  rsl_timer_stop(s->loop, &c->linger);
  if (reset) {
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(c->io.fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  }
  close(c->io.fd);
  if (c->prev) c->prev->next = c->next; else s->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  s->nconns--;
  buf_free(&c->in);
  buf_free(&c->head);
  buf_free(&c->body);
  buf_free(&c->out);
  free(c);
}

static void conn_new(rsl_server *s, int fd) {
  conn *c = calloc(1, sizeof *c);
  if (!c) {
    close(fd);
    return;
  }
  c->srv = s;
  rsl_io_init(&c->io, fd, conn_on_io, c);
  rsl_timer_init(&c->linger, linger_expired, c);
  http_parser_init(&c->parser, HTTP_REQUEST);
  c->parser.data = c;
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  c->next = s->conns;
  if (s->conns) s->conns->prev = c;
  s->conns = c;
  s->nconns++;
  s->stats.counter[RSL_SERVER_CONNECTIONS]++;
  if (rsl_io_set(s->loop, &c->io, RSL_IO_READ) < 0) conn_close(c, 0);
}

/* --- the listener ------------------------------------------------------- */

static void accept_resume(void *ud) {
  rsl_server *s = ud;
  rsl_io_set(s->loop, &s->listener, RSL_IO_READ);
}

static void listener_on_io(void *ud, int fd, unsigned events) {
  (void)events;
  rsl_server *s = ud;
  for (int i = 0; i < ACCEPTS_PER_WAKEUP; i++) {
    int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (cfd < 0 && (errno == EINTR || errno == ECONNABORTED)) continue;
    if (cfd < 0 && (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
                    errno == ENOMEM)) {
      /* Level-triggered: retrying now would spin.  Pause instead. */
      rsl_io_set(s->loop, &s->listener, 0);
      rsl_timer_start(s->loop, &s->accept_retry, ACCEPT_RETRY_MS * NS_PER_MS);
      return;
    }
    if (cfd < 0) return; /* EAGAIN: all taken */
    if (s->nconns >= RSL_SERVER_MAX_CONNECTIONS) close(cfd);
    else conn_new(s, cfd);
  }
}

/* Splits "HOST:PORT" / "[V6]:PORT" into host (NULL if empty) and port. */
static int split_listen(const char *addr, char *host, size_t host_cap,
                        const char **port) {
  const char *colon = strrchr(addr, ':');
  if (!colon || !colon[1] ||
      strspn(colon + 1, "0123456789") != strlen(colon + 1))
    return -EINVAL;
  const char *h = addr;
  size_t len = (size_t)(colon - addr);
  if (len >= 2 && h[0] == '[' && h[len - 1] == ']') {
    h++;
    len -= 2;
  }
  if (len >= host_cap || memchr(h, '[', len) || memchr(h, ']', len))
    return -EINVAL;
  memcpy(host, h, len);
  host[len] = '\0';
  *port = colon + 1;
  return 0;
}

static int set_err(char **err, int rc, const char *addr, const char *why) {
  char msg[512];
  snprintf(msg, sizeof msg, "cannot listen on %s: %s", addr, why);
  if (err) *err = strdup(msg);
  return rc;
}

/* Binds and listens on the first address of `addr` that works. */
static int listen_on(const char *addr, int *fd_out, char **err) {
  char host[256];
  const char *port;
  if (split_listen(addr, host, sizeof host, &port) < 0)
    return set_err(err, -EINVAL, addr, "expected HOST:PORT");
  struct addrinfo hints = {.ai_flags = AI_PASSIVE | AI_NUMERICSERV,
                           .ai_socktype = SOCK_STREAM};
  struct addrinfo *ai = NULL;
  int gai = getaddrinfo(host[0] ? host : NULL, port, &hints, &ai);
  if (gai != 0) return set_err(err, -EINVAL, addr, gai_strerror(gai));
  int rc = -EADDRNOTAVAIL;
  for (struct addrinfo *a = ai; a; a = a->ai_next) {
    int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    a->ai_protocol);
    if (fd < 0) {
      rc = -errno;
      continue;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        listen(fd, SOMAXCONN) == 0) {
      *fd_out = fd;
      rc = 0;
      break;
    }
    rc = -errno;
    close(fd);
  }
  freeaddrinfo(ai);
  return rc == 0 ? 0 : set_err(err, rc, addr, strerror(-rc));
}

static void format_address(rsl_server *s) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  char ip[INET6_ADDRSTRLEN] = "?";
  unsigned port = 0;
  if (getsockname(s->listener.fd, (struct sockaddr *)&ss, &len) == 0) {
    if (ss.ss_family == AF_INET6) {
      struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
      inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
      port = ntohs(a->sin6_port);
    } else {
      struct sockaddr_in *a = (struct sockaddr_in *)&ss;
      inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
      port = ntohs(a->sin_port);
    }
  }
  snprintf(s->address, sizeof s->address,
           ss.ss_family == AF_INET6 ? "[%s]:%u" : "%s:%u", ip, port);
}

void rsl_server_set_dedup(rsl_server *s, int on) { s->dedup = on != 0; }

int rsl_server_new(rsl_server **out, rsl_loop *loop, const char *addr,
                   rsl_server_handler handler, void *ud, char **err) {
  int fd = -1, rc = listen_on(addr, &fd, err);
  if (rc < 0) return rc;
  rsl_server *s = calloc(1, sizeof *s);
  if (s) s->buckets = calloc(KEY_BUCKETS, sizeof *s->buckets);
  if (!s || !s->buckets) {
    rc = set_err(err, -ENOMEM, addr, "out of memory");
    goto fail;
  }
  s->loop = loop;
  s->dedup = 1;
  s->handler = handler ? handler : model_stub;
  s->ud = ud;
  rsl_io_init(&s->listener, fd, listener_on_io, s);
  rsl_timer_init(&s->accept_retry, accept_resume, s);
  rc = rsl_io_set(loop, &s->listener, RSL_IO_READ);
  if (rc < 0) {
    set_err(err, rc, addr, strerror(-rc));
    goto fail;
  }
  format_address(s);
  *out = s;
  return 0;
fail:
  if (s) free(s->buckets);
  free(s);
  close(fd);
  return rc;
}

void rsl_server_free(rsl_server *s) {
  if (!s) return;
  if (s->in_handler) { /* conn_dispatch finishes this when it returns */
    s->closing = 1;
    return;
  }
  rsl_io_set(s->loop, &s->listener, 0);
  rsl_timer_stop(s->loop, &s->accept_retry);
  close(s->listener.fd);
  while (s->jobs) job_free(s->jobs); /* releases the keys in flight */
  while (s->conns) conn_close(s->conns, 0);
  while (s->oldest) key_release(s, s->oldest);
  free(s->buckets);
  free(s);
}

const char *rsl_server_address(const rsl_server *s) { return s->address; }

const rsl_server_stats *rsl_server_stats_get(const rsl_server *s) {
  return &s->stats;
}
