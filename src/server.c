/*
 * server — the scriptable upstream: HTTP/1.1 on the resilua loop.  See
 * server.h.
 *
 * Uses: http/conn (connections: parsing, limits, ordered answers), loop
 * (timers for delayed answers), libc.
 *
 * A connection hands over one request at a time and parses the next one
 * only once the answer is sent.  A delayed or hanging answer is a `job`,
 * linked from the server, which frees whatever is left when it closes.
 */
#include "server.h"

#include <errno.h>
#include <http_parser.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include "http/buf.h"
#include "http/conn.h"
#include "http2/h2c.h"

#define RESPONSE_HEAD_MAX_BYTES (64 * 1024)
#define STATS_MAX_BYTES (64 * 1024)
#define KEY_BUCKETS 16384         /* power of two */
#define NS_PER_MS 1000000ull

struct rsl_server_response {
  int status;
  uint64_t delay_ms;
  rsl_server_action action;
  rsl_buf head; /* "Name: value\r\n" lines */
  rsl_buf body;
  int grpc_status; /* -1: none */
  rsl_buf grpc_message;
};

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

/* How to answer a request: what the request allowed. */
typedef struct answer {
  int keep_alive, head_only, http10;
} answer;

/* A request whose answer waits: a delay timer, or a hang.  conn is NULL
 * once the client left (see job_abandon). */
struct job {
  rsl_server *srv;
  job *prev, *next; /* srv->jobs */
  rsl_http_conn *conn;
  key *key; /* held in flight, or NULL */
  rsl_server_response res;
  rsl_timer timer; /* inactive for a hang */
  answer how;
};

struct rsl_server {
  rsl_loop *loop;
  rsl_server_handler handler;
  void *ud;
  rsl_http_listener *listener;
  job *jobs;
  key **buckets;
  key *oldest, *newest; /* stored keys */
  size_t nstored, stored_bytes;
  uint64_t idle_timeout_ms;
  int dedup;      /* Idempotency-Key dedup is on (the default) */
  int in_handler; /* the handler is running (the loop cannot re-enter) */
  int closing;    /* rsl_server_free was called from inside the handler */
  rsl_h2c *h2c;   /* HTTP/2 connections (http2/h2c.c keeps the list) */
  rsl_server_stats stats;
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

static uint64_t fnv1a(uint64_t h, const void *data, size_t n) {
  const unsigned char *p = data;
  for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}
#define FNV_OFFSET 0xcbf29ce484222325ull

static void response_init(rsl_server_response *res) {
  *res = (rsl_server_response){
      .status = 200, .action = RSL_SERVER_RESPOND, .grpc_status = -1};
}

static void response_free(rsl_server_response *res) {
  rsl_buf_free(&res->head);
  rsl_buf_free(&res->body);
  rsl_buf_free(&res->grpc_message);
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
  int rc = rsl_buf_add(&res->head, name, name_len, RESPONSE_HEAD_MAX_BYTES);
  if (rc == 0) rc = rsl_buf_add(&res->head, ": ", 2, RESPONSE_HEAD_MAX_BYTES);
  if (rc == 0)
    rc = rsl_buf_add(&res->head, value, value_len, RESPONSE_HEAD_MAX_BYTES);
  if (rc == 0) rc = rsl_buf_add(&res->head, "\r\n", 2, RESPONSE_HEAD_MAX_BYTES);
  if (rc != 0) res->head.len = before;
  return rc;
}

int rsl_server_response_body(rsl_server_response *res, const char *body,
                             size_t len) {
  res->body.len = 0;
  return rsl_buf_add(&res->body, body, len, RSL_SERVER_MAX_RESPONSE_BYTES);
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

#define GRPC_MESSAGE_MAX_BYTES 4096

int rsl_server_response_grpc(rsl_server_response *res, int code,
                             const char *message, size_t len) {
  if (code < 0 || code > 16 || len > GRPC_MESSAGE_MAX_BYTES) return -EINVAL;
  res->grpc_status = code;
  res->grpc_message.len = 0;
  if (!message) return 0;
  /* one byte more, so that an empty message is there too */
  int rc = rsl_buf_add(&res->grpc_message, message, len, GRPC_MESSAGE_MAX_BYTES + 1);
  if (rc == 0) rc = rsl_buf_add(&res->grpc_message, "", 1, GRPC_MESSAGE_MAX_BYTES + 1);
  return rc;
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
 * Stored keys are evicted oldest first past RSL_SERVER_MAX_STORED_KEYS
 * or RSL_SERVER_MAX_STORED_BYTES (their responses' bytes count);
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

/* What a stored key holds in memory, as the byte cap counts it. */
static size_t key_bytes(const key *k) {
  return sizeof *k + k->len + k->res.head.cap + k->res.body.cap;
}

static void key_release(rsl_server *s, key *k) {
  key **p = &s->buckets[k->hash & (KEY_BUCKETS - 1)];
  while (*p != k) p = &(*p)->next;
  *p = k->next;
  if (k->stored) {
    if (k->older) k->older->newer = k->newer; else s->oldest = k->newer;
    if (k->newer) k->newer->older = k->older; else s->newest = k->older;
    s->nstored--;
    s->stored_bytes -= key_bytes(k);
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
  s->nstored++;
  s->stored_bytes += key_bytes(k);
  while (s->oldest && (s->nstored > RSL_SERVER_MAX_STORED_KEYS ||
                       s->stored_bytes > RSL_SERVER_MAX_STORED_BYTES))
    key_release(s, s->oldest);
}

/* --- answers ------------------------------------------------------------ */

static int has_body(int status) {
  return status >= 200 && status != 204 && status != 304;
}

/* Sends res on c and ends the request (the connection goes on to the
 * next one, or closes).  OK or GONE. */
static int conn_send(rsl_http_conn *c, const rsl_server_response *res,
                     const answer *how) {
  char line[160];
  rsl_buf head = {0};
  const size_t limit = RESPONSE_HEAD_MAX_BYTES + 1024;
  rsl_http_status_line(line, sizeof line, res->status);
  int rc = rsl_buf_str(&head, line, limit);
  if (rc == 0) rc = rsl_buf_add(&head, res->head.data, res->head.len, limit);
  if (rc == 0 && has_body(res->status)) {
    snprintf(line, sizeof line, "Content-Length: %zu\r\n", res->body.len);
    rc = rsl_buf_str(&head, line, limit);
  }
  if (rc == 0 && !how->keep_alive)
    rc = rsl_buf_str(&head, "Connection: close\r\n", limit);
  else if (rc == 0 && how->http10)
    rc = rsl_buf_str(&head, "Connection: keep-alive\r\n", limit);
  if (rc == 0) rc = rsl_buf_add(&head, "\r\n", 2, limit);
  if (rc != 0) { /* only ENOMEM: the sizes are capped below the limit */
    rsl_buf_free(&head);
    rsl_http_conn_close(c, 0);
    return RSL_HTTP_GONE;
  }
  rc = rsl_http_conn_write(c, head.data, head.len);
  rsl_buf_free(&head);
  if (rc == RSL_HTTP_OK && has_body(res->status) && !how->head_only)
    rc = rsl_http_conn_write(c, res->body.data, res->body.len);
  return rc == RSL_HTTP_OK ? rsl_http_conn_end(c, how->keep_alive) : rc;
}

static int conn_send_text(rsl_http_conn *c, int status, const char *text,
                          const answer *how) {
  rsl_server_response res;
  response_init(&res);
  response_text(&res, status, text);
  int rc = conn_send(c, &res, how);
  response_free(&res);
  return rc;
}

/* Out of memory while handling a request: 503, then close. */
static int conn_reject(rsl_http_conn *c, int status) {
  return rsl_http_conn_reject(c, status);
}

/* --- jobs: delayed and hanging answers ---------------------------------- */

static void job_fire(void *ud);

static job *job_new(rsl_server *s, rsl_http_conn *c, key *k,
                    rsl_server_response *res, const answer *how) {
  job *j = calloc(1, sizeof *j);
  if (!j) return NULL;
  *j = (job){.srv = s, .conn = c, .key = k, .res = *res, .how = *how};
  response_init(res);
  rsl_timer_init(&j->timer, job_fire, j);
  j->next = s->jobs;
  if (s->jobs) s->jobs->prev = j;
  s->jobs = j;
  if (k) k->owner = j;
  rsl_http_conn_set_data(c, j);
  return j;
}

static void job_free(job *j) {
  rsl_server *s = j->srv;
  rsl_timer_stop(s->loop, &j->timer);
  if (j->prev) j->prev->next = j->next; else s->jobs = j->next;
  if (j->next) j->next->prev = j->prev;
  if (j->conn) rsl_http_conn_set_data(j->conn, NULL);
  if (j->key) key_release(s, j->key);
  response_free(&j->res);
  free(j);
}

/* The client left while its answer waited.  A delayed answer that holds a
 * key still completes it when due (see the note on keys); anything else
 * has no one to answer and goes. */
static void job_abandon(job *j) {
  rsl_server *s = j->srv;
  rsl_http_conn_set_data(j->conn, NULL);
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
static int finish(rsl_server *s, rsl_http_conn *c, key *k,
                  rsl_server_response *res, const answer *how) {
  int rc = RSL_HTTP_OK;
  switch (res->action) {
  case RSL_SERVER_HANG: /* only from conn_dispatch: c is there */
    s->stats.counter[RSL_SERVER_HANGS]++;
    if (job_new(s, c, k, res, how)) {
      rsl_http_conn_discard_input(c);
      return RSL_HTTP_OK;
    }
    if (k) key_release(s, k);
    response_free(res);
    return conn_reject(c, 503);
  case RSL_SERVER_RESET:
  case RSL_SERVER_CLOSE:
    s->stats.counter[res->action == RSL_SERVER_RESET ? RSL_SERVER_RESETS
                                                     : RSL_SERVER_CLOSES]++;
    if (k) key_release(s, k);
    if (c) rsl_http_conn_close(c, res->action == RSL_SERVER_RESET);
    response_free(res);
    return RSL_HTTP_GONE;
  case RSL_SERVER_RESPOND:
    if (c) {
      s->stats.status[res->status]++;
      rc = conn_send(c, res, how);
    }
    if (k) key_complete(s, k, res);
    response_free(res);
    return c ? rc : RSL_HTTP_GONE;
  }
  return rc;
}

static void job_fire(void *ud) {
  job *j = ud;
  rsl_server *s = j->srv;
  rsl_http_conn *c = j->conn;
  key *k = j->key;
  answer how = j->how;
  rsl_server_response res = j->res;
  response_init(&j->res);
  j->key = NULL;
  job_free(j);
  finish(s, c, k, &res, &how);
}

static int conn_send_stats(rsl_server *s, rsl_http_conn *c,
                           const answer *how) {
  const rsl_server_stats *st = rsl_server_stats_get(s);
  rsl_server_response res;
  response_init(&res);
  char item[64];
  int rc = rsl_server_response_header(&res, "Content-Type", 12,
                                      "application/json", 16);
  for (int i = 0; rc == 0 && i < RSL_SERVER_NCOUNTERS; i++) {
    snprintf(item, sizeof item, "%s\"%s\":%llu", i ? "," : "{",
             counter_names[i], (unsigned long long)st->counter[i]);
    rc = rsl_buf_str(&res.body, item, STATS_MAX_BYTES);
  }
  if (rc == 0) rc = rsl_buf_str(&res.body, ",\"status\":{", STATS_MAX_BYTES);
  for (int code = 100, first = 1; rc == 0 && code < 600; code++) {
    if (!st->status[code]) continue;
    snprintf(item, sizeof item, "%s\"%d\":%llu", first ? "" : ",", code,
             (unsigned long long)st->status[code]);
    rc = rsl_buf_str(&res.body, item, STATS_MAX_BYTES);
    first = 0;
  }
  if (rc == 0) rc = rsl_buf_str(&res.body, "}}", STATS_MAX_BYTES);
  rc = rc == 0 ? conn_send(c, &res, how) : conn_reject(c, 503);
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
  ssize_t n = recv(rsl_http_conn_fd(k->owner->conn), &ch, 1,
                   MSG_PEEK | MSG_DONTWAIT);
  return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK &&
                    errno != EINTR);
}

/* Calls the handler for a complete request and answers, now or later. */
static int on_request(void *ud, rsl_http_conn *c,
                      const rsl_http_request *hreq) {
  rsl_server *s = ud;
  answer how = {.keep_alive = hreq->keep_alive, .head_only = hreq->head_only,
                .http10 = hreq->http_minor == 0};
  rsl_server_request req = {.method = hreq->method,
                            .path = hreq->path, .path_len = hreq->path_len,
                            .query = hreq->query, .query_len = hreq->query_len};
  if (strcmp(req.method, "GET") == 0 && req.path_len == 7 &&
      memcmp(req.path, "/_stats", 7) == 0)
    return conn_send_stats(s, c, &how);

  req.headers = hreq->headers;
  req.nheaders = hreq->nheaders;
  req.body = hreq->body;
  req.body_len = hreq->body_len;
  req.n = ++s->stats.counter[RSL_SERVER_REQUESTS];

  size_t key_len;
  const char *key_name =
      s->dedup ? rsl_http_header_get(hreq, "idempotency-key", &key_len) : NULL;
  key *k = NULL;
  if (key_name) {
    if (key_len == 0 || key_len > RSL_SERVER_MAX_KEY_BYTES) {
      s->stats.status[400]++;
      return conn_send_text(c, 400, "invalid Idempotency-Key\n", &how);
    }
    uint64_t h = fnv1a(FNV_OFFSET, key_name, key_len);
    uint64_t fp = fnv1a(fnv1a(FNV_OFFSET, req.method, strlen(req.method) + 1),
                        hreq->target, hreq->target_len);
    fp = fnv1a(fnv1a(fp, "", 1), req.body, req.body_len);
    k = key_find(s, key_name, key_len, h);
    if (k && k->fingerprint != fp) {
      s->stats.counter[RSL_SERVER_MISMATCHES]++;
      s->stats.status[422]++;
      return conn_send_text(c, 422, "Idempotency-Key reused for a different "
                            "request\n", &how);
    }
    if (k && !k->stored && key_owner_gone(k)) {
      /* frees k (on_close abandons the hung job) */
      rsl_http_conn *gone = k->owner->conn;
      job_abandon(k->owner);
      rsl_http_conn_close(gone, 0);
      k = NULL;
    }
    if (k && !k->stored) {
      s->stats.counter[RSL_SERVER_CONFLICTS]++;
      s->stats.status[409]++;
      return conn_send_text(c, 409, "a request with this Idempotency-Key is "
                            "in flight\n", &how);
    }
    if (k) {
      s->stats.counter[RSL_SERVER_DUPLICATES]++;
      s->stats.status[k->res.status]++;
      return conn_send(c, &k->res, &how);
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
    return RSL_HTTP_GONE;
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
    return finish(s, c, k, &res, &how);
  job *j = job_new(s, c, k, &res, &how);
  if (!j ||
      rsl_timer_start(s->loop, &j->timer, j->res.delay_ms * NS_PER_MS) < 0) {
    if (j) job_free(j); /* releases k */
    else if (k) key_release(s, k);
    response_free(&res);
    return conn_reject(c, 503);
  }
  s->stats.counter[RSL_SERVER_DELAYED]++;
  return RSL_HTTP_OK; /* the connection reads on: the client may leave */
}

/* The client left while its answer waited. */
static void on_close(void *ud, rsl_http_conn *c) {
  (void)ud;
  job *j = rsl_http_conn_data(c);
  if (j) job_abandon(j);
}

static void on_reject(void *ud, int status) {
  rsl_server *s = ud;
  (void)status;
  s->stats.counter[RSL_SERVER_REJECTED]++;
}

/* A connection that opened with the HTTP/2 preface: h2c serves it. */
static void on_h2c(void *ud, int fd, const char *read, size_t n) {
  rsl_server *s = ud;
  if (rsl_h2c_start(s, fd, read, n, &s->h2c) < 0) close(fd);
}

static const rsl_http_handlers http_handlers = {
  .on_request = on_request,
  .on_close = on_close,
  .on_reject = on_reject,
  .on_h2c = on_h2c,
};

void rsl_server_set_dedup(rsl_server *s, int on) { s->dedup = on != 0; }

int rsl_server_new(rsl_server **out, rsl_loop *loop, const char *addr,
                   uint64_t idle_timeout_ms, rsl_server_handler handler,
                   void *ud, char **err) {
  if (idle_timeout_ms == 0 || idle_timeout_ms > RSL_SERVER_MAX_IDLE_TIMEOUT_MS) {
    if (err) *err = strdup("idle timeout out of range");
    return -EINVAL;
  }
  rsl_server *s = calloc(1, sizeof *s);
  if (s) s->buckets = calloc(KEY_BUCKETS, sizeof *s->buckets);
  if (!s || !s->buckets) {
    if (s) free(s->buckets);
    free(s);
    if (err) *err = strdup("cannot listen: out of memory");
    return -ENOMEM;
  }
  s->loop = loop;
  s->dedup = 1;
  s->idle_timeout_ms = idle_timeout_ms;
  s->handler = handler ? handler : model_stub;
  s->ud = ud;
  const rsl_http_limits limits = {
      .max_header_bytes = RSL_SERVER_MAX_HEADER_BYTES,
      .max_body_bytes = RSL_SERVER_MAX_BODY_BYTES,
      .max_connections = RSL_SERVER_MAX_CONNECTIONS,
      .idle_timeout_ms = idle_timeout_ms,
  };
  int rc = rsl_http_listener_new(&s->listener, loop, addr, &limits,
                                 &http_handlers, s, err);
  if (rc < 0) {
    free(s->buckets);
    free(s);
    return rc;
  }
  *out = s;
  return 0;
}

void rsl_server_response_view(const rsl_server_response *res,
                              rsl_server_answer *out) {
  *out = (rsl_server_answer){
      .status = res->status,
      .delay_ms = res->delay_ms,
      .action = res->action,
      .head = res->head.data ? res->head.data : "",
      .head_len = res->head.len,
      .body = res->body.data ? res->body.data : "",
      .body_len = res->body.len,
      .grpc_status = res->grpc_status,
      .grpc_message = res->grpc_message.len ? res->grpc_message.data : NULL,
      .grpc_message_len = res->grpc_message.len ? res->grpc_message.len - 1 : 0,
  };
}

int rsl_server_handle(rsl_server *s, rsl_server_request *req,
                      rsl_server_response **out) {
  rsl_server_response *res = malloc(sizeof *res);
  *out = NULL;
  if (!res) return -ENOMEM;
  response_init(res);
  req->n = ++s->stats.counter[RSL_SERVER_REQUESTS];
  char *err = NULL;
  s->in_handler = 1;
  int hrc = s->handler(s->ud, req, res, &err);
  s->in_handler = 0;
  s->stats.counter[RSL_SERVER_HANDLER_RUNS]++;
  if (s->closing) {
    free(err);
    rsl_server_response_free(res);
    return 1;
  }
  if (hrc != 0) {
    const char *msg = err ? err : "handler failed";
    fprintf(stderr, "resilua serve: request %llu: %s\n",
            (unsigned long long)req->n, msg);
    s->stats.counter[RSL_SERVER_HANDLER_ERRORS]++;
    response_text(res, 500, msg);
    free(err);
  }
  if (res->delay_ms && res->action != RSL_SERVER_HANG)
    s->stats.counter[RSL_SERVER_DELAYED]++;
  *out = res;
  return 0;
}

void rsl_server_response_free(rsl_server_response *res) {
  if (!res) return;
  response_free(res);
  free(res);
}

void rsl_server_count_status(rsl_server *s, int status) {
  if (status >= 100 && status < 600) s->stats.status[status]++;
}

rsl_loop *rsl_server_loop(const rsl_server *s) { return s->loop; }

uint64_t rsl_server_idle_timeout_ns(const rsl_server *s) {
  return s->idle_timeout_ms * NS_PER_MS;
}

void rsl_server_free(rsl_server *s) {
  if (!s) return;
  if (s->in_handler) { /* on_request finishes this when it returns */
    s->closing = 1;
    return;
  }
  while (s->jobs) job_free(s->jobs); /* releases the keys in flight */
  rsl_http_listener_free(s->listener);
  while (s->h2c) rsl_h2c_close(s->h2c);
  while (s->oldest) key_release(s, s->oldest);
  free(s->buckets);
  free(s);
}

const char *rsl_server_address(const rsl_server *s) {
  return rsl_http_listener_address(s->listener);
}

const rsl_server_stats *rsl_server_stats_get(rsl_server *s) {
  s->stats.counter[RSL_SERVER_CONNECTIONS] =
      rsl_http_listener_accepted(s->listener);
  return &s->stats;
}
