/*
 * http/conn — HTTP/1.1 connections on the resilua loop.  See conn.h.
 *
 * Uses: loop (one watcher per socket; a timer per connection for the idle
 * timeout and lingering closes), http-parser (paused after each request,
 * so a connection is answered in order), libc sockets.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* accept4, SOCK_NONBLOCK */
#endif
#include "conn.h"
#include "buf.h"

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
#define OUT_KEEP_BYTES (64 * 1024) /* larger out buffers are freed once sent */
#define OUT_MAX_BYTES (64u << 20)  /* one answer's bytes queued at most */
#define LINGER_MS 2000             /* see conn_linger */
#define LINGER_MAX_BYTES (4 * 1024 * 1024)
#define ACCEPT_RETRY_MS 100 /* out of descriptors: pause accepting */
#define ACCEPTS_PER_WAKEUP 64
#define NS_PER_MS 1000000ull
#define H2_PREFACE "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#define H2_PREFACE_BYTES 24

struct rsl_http_conn {
  rsl_http_listener *l;
  rsl_http_conn *prev, *next; /* l->conns */
  rsl_io io;
  rsl_timer timer; /* idle timeout, or the lingering close */
  uint64_t last_input_ns;
  http_parser parser;
  rsl_buf in;   /* received, not parsed yet (IN_MAX_BYTES) */
  rsl_buf head; /* URL, then header names and values, of the request parsed */
  rsl_buf body;
  struct {
    uint32_t name, name_len, value, value_len; /* offsets into head */
  } hdr[RSL_HTTP_MAX_HEADERS];
  size_t nhdr, url_len, lingered;
  enum { HS_URL, HS_FIELD, HS_VALUE } hstate;
  int reject;       /* status to answer once the parser stops: 400/413/431 */
  int message_done; /* a request is complete (the parser is paused) */
  int busy;         /* handed to the owner, not ended */
  int dispatching;  /* inside on_request */
  int close_after;  /* close once out is sent */
  int lingering;    /* our side is shut: discard input until EOF */
  int discard;      /* rsl_http_conn_discard_input */
  int want_drain;
  int fresh; /* nothing parsed yet: the HTTP/2 preface may come (on_h2c) */
  rsl_buf out;
  size_t out_sent;
  void *data;
  char peer[INET6_ADDRSTRLEN];
};

struct rsl_http_listener {
  rsl_loop *loop;
  rsl_http_limits limits;
  rsl_http_handlers h;
  void *ud;
  rsl_io io; /* fd -1 once stopped */
  rsl_timer accept_retry;
  rsl_http_conn *conns;
  size_t nconns;
  uint64_t accepted, refused;
  char address[INET6_ADDRSTRLEN + 8];
};

/* --- names and status lines ------------------------------------------------ */

int rsl_http_name_is(const char *name, size_t len, const char *lower) {
  return strlen(lower) == len && strncasecmp(name, lower, len) == 0;
}

void rsl_http_status_line(char *out, size_t cap, int status) {
  const char *reason = http_status_str((enum http_status)status);
  snprintf(out, cap, "HTTP/1.1 %d %s\r\n", status,
           reason[0] == '<' ? "" : reason); /* "<unknown>" */
}

/* --- output ----------------------------------------------------------------- */

static void conn_free(rsl_http_conn *c, int reset, int notify);
static void conn_to_h2c(rsl_http_conn *c);
static int conn_process(rsl_http_conn *c);

/* Watches what the connection's state needs. */
static void conn_watch(rsl_http_conn *c) {
  int room = c->in.len < IN_MAX_BYTES || c->lingering || c->discard;
  unsigned ev = room ? RSL_IO_READ : 0; /* full: read again once handled */
  if (c->out_sent < c->out.len)
    ev = RSL_IO_WRITE | (c->busy ? ev : 0); /* busy: see the client leave */
  /* A failure (ENOMEM) leaves it unwatched until the listener closes. */
  rsl_io_set(c->l->loop, &c->io, ev);
}

static void on_timer(void *ud);

/* Closing with unread input makes the kernel send a RST, which can destroy
 * the answer (a 413 before the body was read) before the client reads it.
 * So shut our side, discard what comes until the client closes, and give
 * up after LINGER_MS or LINGER_MAX_BYTES, as web servers do. */
static int conn_linger(rsl_http_conn *c) {
  if (shutdown(c->io.fd, SHUT_WR) < 0 ||
      rsl_timer_start(c->l->loop, &c->timer, LINGER_MS * NS_PER_MS) < 0) {
    conn_free(c, 0, 1);
    return RSL_HTTP_GONE;
  }
  c->lingering = 1;
  c->in.len = 0;
  conn_watch(c);
  return RSL_HTTP_OK;
}

/* Sends what it can of out; the rest when the socket is writable. */
static int conn_flush(rsl_http_conn *c) {
  while (c->out_sent < c->out.len) {
    ssize_t n = send(c->io.fd, c->out.data + c->out_sent,
                     c->out.len - c->out_sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n < 0) { /* EPIPE, ECONNRESET: the client is gone */
      conn_free(c, 0, 1);
      return RSL_HTTP_GONE;
    }
    c->out_sent += (size_t)n;
  }
  if (c->out_sent < c->out.len) {
    conn_watch(c);
    return RSL_HTTP_OK;
  }
  if (c->out.cap > OUT_KEEP_BYTES) rsl_buf_free(&c->out);
  c->out.len = c->out_sent = 0;
  if (c->close_after && !c->busy) return conn_linger(c);
  conn_watch(c);
  if (c->want_drain && c->busy) {
    c->want_drain = 0;
    c->l->h.on_drain(c->l->ud, c);
  }
  return RSL_HTTP_OK;
}

int rsl_http_conn_write(rsl_http_conn *c, const void *data, size_t len) {
  if (c->out_sent && c->out_sent == c->out.len) c->out.len = c->out_sent = 0;
  if (rsl_buf_add(&c->out, data, len, OUT_MAX_BYTES) != 0) {
    conn_free(c, 0, 1);
    return RSL_HTTP_GONE;
  }
  if (c->io.events & RSL_IO_WRITE) return RSL_HTTP_OK; /* when writable */
  return conn_flush(c);
}

int rsl_http_conn_append(rsl_http_conn *c, const void *data, size_t len) {
  if (c->out_sent && c->out_sent == c->out.len) c->out.len = c->out_sent = 0;
  if (rsl_buf_add(&c->out, data, len, OUT_MAX_BYTES) == 0) return RSL_HTTP_OK;
  conn_free(c, 0, 1);
  return RSL_HTTP_GONE;
}

size_t rsl_http_conn_pending(const rsl_http_conn *c) {
  return c->out.len - c->out_sent;
}

void rsl_http_conn_want_drain(rsl_http_conn *c) { c->want_drain = 1; }

int rsl_http_conn_end(rsl_http_conn *c, int keep_alive) {
  c->busy = 0;
  c->data = NULL;
  c->want_drain = 0;
  c->discard = 0;
  c->last_input_ns = rsl_loop_now_ns(c->l->loop);
  if (!keep_alive) c->close_after = 1;
  if (c->out_sent == c->out.len) {
    if (c->close_after) return conn_linger(c);
  }
  if (c->dispatching) return RSL_HTTP_OK; /* conn_process goes on */
  return conn_process(c);
}

void rsl_http_conn_discard_input(rsl_http_conn *c) {
  c->discard = 1;
  c->in.len = 0;
  conn_watch(c);
}

void rsl_http_conn_close(rsl_http_conn *c, int reset) { conn_free(c, reset, 0); }

int rsl_http_conn_reject(rsl_http_conn *c, int status) {
  const char *text = status == 431 ? "request header fields too large\n"
                     : status == 413 ? "request body too large\n"
                     : status == 503 ? "out of memory\n"
                                     : "bad request\n";
  if (c->l->h.on_reject) c->l->h.on_reject(c->l->ud, status);
  char head[256];
  rsl_http_status_line(head, sizeof head, status);
  size_t n = strlen(head);
  snprintf(head + n, sizeof head - n,
           "Content-Type: text/plain\r\nContent-Length: %zu\r\n"
           "Connection: close\r\n\r\n",
           strlen(text));
  /* Queued whole before the close is set: a flush of the head alone
   * would start the lingering close, and the body would then meet EPIPE. */
  if (rsl_http_conn_append(c, head, strlen(head)) != RSL_HTTP_OK ||
      (c->parser.method != HTTP_HEAD &&
       rsl_http_conn_append(c, text, strlen(text)) != RSL_HTTP_OK))
    return RSL_HTTP_GONE;
  c->busy = 0;
  c->close_after = 1;
  return conn_flush(c);
}

void rsl_http_conn_set_data(rsl_http_conn *c, void *data) { c->data = data; }
void *rsl_http_conn_data(const rsl_http_conn *c) { return c->data; }
int rsl_http_conn_fd(const rsl_http_conn *c) { return c->io.fd; }
const char *rsl_http_conn_peer(const rsl_http_conn *c) { return c->peer; }

/* --- input ------------------------------------------------------------------ */

static int on_message_begin(http_parser *p) {
  rsl_http_conn *c = p->data;
  c->head.len = c->body.len = 0;
  c->nhdr = c->url_len = 0;
  c->hstate = HS_URL;
  return 0;
}

/* Sets the status to answer once the parser stops, and stops it. */
static int parse_fail(rsl_http_conn *c, int rc, int too_big_status) {
  c->reject = rc == -E2BIG ? too_big_status : 503;
  return -1;
}

static int on_url(http_parser *p, const char *at, size_t len) {
  rsl_http_conn *c = p->data;
  int rc = rsl_buf_add(&c->head, at, len, c->l->limits.max_header_bytes);
  if (rc != 0) return parse_fail(c, rc, 431);
  c->url_len += len;
  return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len) {
  rsl_http_conn *c = p->data;
  if (c->hstate != HS_FIELD) {
    if (c->nhdr == RSL_HTTP_MAX_HEADERS) return parse_fail(c, -E2BIG, 431);
    c->hdr[c->nhdr].name = c->hdr[c->nhdr].value = (uint32_t)c->head.len;
    c->hdr[c->nhdr].name_len = c->hdr[c->nhdr].value_len = 0;
    c->nhdr++;
    c->hstate = HS_FIELD;
  }
  size_t at_off = c->head.len;
  int rc = rsl_buf_add(&c->head, at, len, c->l->limits.max_header_bytes);
  if (rc != 0) return parse_fail(c, rc, 431);
  for (size_t i = at_off; i < c->head.len; i++)
    if (c->head.data[i] >= 'A' && c->head.data[i] <= 'Z')
      c->head.data[i] = (char)(c->head.data[i] - 'A' + 'a');
  c->hdr[c->nhdr - 1].name_len += (uint32_t)len;
  return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len) {
  rsl_http_conn *c = p->data;
  if (c->hstate != HS_VALUE) {
    c->hdr[c->nhdr - 1].value = (uint32_t)c->head.len;
    c->hstate = HS_VALUE;
  }
  int rc = rsl_buf_add(&c->head, at, len, c->l->limits.max_header_bytes);
  if (rc != 0) return parse_fail(c, rc, 431);
  c->hdr[c->nhdr - 1].value_len += (uint32_t)len;
  return 0;
}

static const char *conn_header(const rsl_http_conn *c, const char *lower,
                               size_t *len) {
  for (size_t i = 0; i < c->nhdr; i++)
    if (rsl_http_name_is(c->head.data + c->hdr[i].name, c->hdr[i].name_len,
                         lower)) {
      *len = c->hdr[i].value_len;
      return c->head.data + c->hdr[i].value;
    }
  return NULL;
}

const char *rsl_http_header_get(const rsl_http_request *req,
                                const char *lower, size_t *len) {
  for (size_t i = 0; i < req->nheaders; i++)
    if (rsl_http_name_is(req->headers[i].name, req->headers[i].name_len,
                         lower)) {
      *len = req->headers[i].value_len;
      return req->headers[i].value;
    }
  return NULL;
}

static int on_headers_complete(http_parser *p) {
  rsl_http_conn *c = p->data;
  /* http-parser sets content_length to ULLONG_MAX when there is none. */
  if (p->content_length != ULLONG_MAX &&
      p->content_length > c->l->limits.max_body_bytes)
    return parse_fail(c, -E2BIG, 413); /* before reading it */
  size_t len;
  const char *expect = conn_header(c, "expect", &len);
  if (expect && rsl_http_name_is(expect, len, "100-continue") &&
      p->http_minor >= 1) {
    /* The client waits for this before sending the body; conn_process
     * sends it and parses on once it is out. */
    int rc = rsl_buf_add(&c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25,
                     OUT_KEEP_BYTES);
    if (rc != 0) return parse_fail(c, rc, 503);
  }
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t len) {
  rsl_http_conn *c = p->data;
  int rc = rsl_buf_add(&c->body, at, len, c->l->limits.max_body_bytes);
  return rc == 0 ? 0 : parse_fail(c, rc, 413);
}

static int on_message_complete(http_parser *p) {
  rsl_http_conn *c = p->data;
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

/* Hands a complete request to the owner. */
static int conn_dispatch(rsl_http_conn *c) {
  http_parser *p = &c->parser;
  const char *url = c->head.data ? c->head.data : "";
  if (p->upgrade && p->method != HTTP_CONNECT)
    p->upgrade = 0; /* answered as a plain request, Upgrade ignored */
  if (p->method == HTTP_CONNECT) return rsl_http_conn_reject(c, 400);
  struct http_parser_url u;
  http_parser_url_init(&u);
  if (http_parser_parse_url(url, c->url_len, 0, &u))
    return rsl_http_conn_reject(c, 400);
  rsl_http_request req = {.method = http_method_str(p->method),
                          .target = url, .target_len = c->url_len,
                          .path = "/", .path_len = 1, .query = "",
                          .http_minor = p->http_minor,
                          .keep_alive = http_should_keep_alive(p),
                          .head_only = p->method == HTTP_HEAD};
  if (u.field_set & (1 << UF_PATH)) {
    req.path = url + u.field_data[UF_PATH].off;
    req.path_len = u.field_data[UF_PATH].len;
  }
  if (u.field_set & (1 << UF_QUERY)) {
    req.query = url + u.field_data[UF_QUERY].off;
    req.query_len = u.field_data[UF_QUERY].len;
  }
  rsl_http_header hs[RSL_HTTP_MAX_HEADERS];
  for (size_t i = 0; i < c->nhdr; i++)
    hs[i] = (rsl_http_header){
        c->head.data + c->hdr[i].name, c->hdr[i].name_len,
        c->head.data + c->hdr[i].value, c->hdr[i].value_len};
  req.headers = hs;
  req.nheaders = c->nhdr;
  req.body = c->body.data ? c->body.data : "";
  req.body_len = c->body.len;
  c->busy = 1;
  c->dispatching = 1;
  int rc = c->l->h.on_request(c->l->ud, c, &req);
  if (rc == RSL_HTTP_GONE) return rc;
  c->dispatching = 0;
  return RSL_HTTP_OK;
}

/* Parses buffered input and hands over complete requests, one at a time
 * and only while nothing is pending or unsent. */
static int conn_process(rsl_http_conn *c) {
  while (c->in.len && !c->busy && !c->lingering && !c->close_after &&
         c->out_sent == c->out.len) {
    if (HTTP_PARSER_ERRNO(&c->parser) == HPE_PAUSED)
      http_parser_pause(&c->parser, 0);
    size_t n = http_parser_execute(&c->parser, &parser_settings, c->in.data,
                                   c->in.len);
    rsl_buf_consume(&c->in, n);
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    if (c->message_done) {
      c->message_done = 0;
      if (conn_dispatch(c) != RSL_HTTP_OK) return RSL_HTTP_GONE;
    } else if (e != HPE_OK) {
      return rsl_http_conn_reject(c, c->reject ? c->reject
                                  : e == HPE_HEADER_OVERFLOW ? 431 : 400);
    } else if (c->out.len && conn_flush(c) != RSL_HTTP_OK) { /* 100 Continue */
      return RSL_HTTP_GONE;
    }
  }
  conn_watch(c);
  return RSL_HTTP_OK;
}

static void conn_read(rsl_http_conn *c) {
  char chunk[READ_CHUNK_BYTES];
  int discard = c->lingering || c->discard;
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
    conn_free(c, 0, 1);
    return;
  }
  c->last_input_ns = rsl_loop_now_ns(c->l->loop);
  if (c->lingering) {
    c->lingered += (size_t)n;
    if (c->lingered > LINGER_MAX_BYTES) conn_free(c, 0, 1);
    return;
  }
  if (discard) return; /* a request never answered: what follows waits too */
  if (rsl_buf_add(&c->in, chunk, (size_t)n, IN_MAX_BYTES) != 0) {
    conn_free(c, 0, 1);
    return;
  }
  if (c->fresh) {
    size_t k = c->in.len < H2_PREFACE_BYTES ? c->in.len : H2_PREFACE_BYTES;
    if (memcmp(c->in.data, H2_PREFACE, k) != 0) c->fresh = 0;
    else if (k < H2_PREFACE_BYTES) return; /* maybe the preface: wait */
    else {
      conn_to_h2c(c);
      return;
    }
  }
  conn_process(c);
}

static void conn_on_io(void *ud, int fd, unsigned events) {
  (void)fd;
  rsl_http_conn *c = ud;
  if ((events & RSL_IO_WRITE) &&
      (conn_flush(c) != RSL_HTTP_OK || conn_process(c) != RSL_HTTP_OK))
    return;
  if (events & (RSL_IO_READ | RSL_IO_ERROR)) conn_read(c);
}

/* The lingering close gave up, or the idle timeout is due: a connection
 * with a request in progress or bytes to send is not idle. */
static void on_timer(void *ud) {
  rsl_http_conn *c = ud;
  uint64_t idle_ns = c->l->limits.idle_timeout_ms * NS_PER_MS;
  if (c->lingering || idle_ns == 0) {
    conn_free(c, 0, 1);
    return;
  }
  uint64_t now = rsl_loop_now_ns(c->l->loop);
  uint64_t due = c->last_input_ns + idle_ns;
  if (!c->busy && c->out_sent == c->out.len && now >= due) {
    conn_free(c, 0, 1);
    return;
  }
  rsl_timer_start(c->l->loop, &c->timer, now >= due ? idle_ns : due - now);
}

/* Unlinks c from its listener and frees it; its socket is left open. */
static void conn_forget(rsl_http_conn *c) {
  rsl_http_listener *l = c->l;
  rsl_io_set(l->loop, &c->io, 0);
  rsl_timer_stop(l->loop, &c->timer);
  if (c->prev) c->prev->next = c->next; else l->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  l->nconns--;
  rsl_buf_free(&c->in);
  rsl_buf_free(&c->head);
  rsl_buf_free(&c->body);
  rsl_buf_free(&c->out);
  free(c);
}

static void conn_free(rsl_http_conn *c, int reset, int notify) {
  rsl_http_listener *l = c->l;
  if (notify && c->busy && l->h.on_close) l->h.on_close(l->ud, c);
  if (reset) {
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(c->io.fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  }
  close(c->io.fd);
  conn_forget(c);
}

/* Hands c, which opened with the HTTP/2 preface, to the owner's on_h2c
 * with the socket and what was read, and forgets it here. */
static void conn_to_h2c(rsl_http_conn *c) {
  rsl_http_listener *l = c->l;
  int fd = c->io.fd;
  rsl_buf read = c->in; /* kept: conn_forget frees the rest */
  c->in = (rsl_buf){0};
  conn_forget(c);
  /* Last but the free: on_h2c may run a handler that frees the listener. */
  l->h.on_h2c(l->ud, fd, read.data, read.len);
  rsl_buf_free(&read);
}

static void conn_new(rsl_http_listener *l, int fd,
                     const struct sockaddr_storage *ss) {
  rsl_http_conn *c = calloc(1, sizeof *c);
  if (!c) {
    close(fd);
    return;
  }
  c->l = l;
  c->fresh = l->h.on_h2c != NULL;
  rsl_io_init(&c->io, fd, conn_on_io, c);
  rsl_timer_init(&c->timer, on_timer, c);
  http_parser_init(&c->parser, HTTP_REQUEST);
  c->parser.data = c;
  if (ss->ss_family == AF_INET6)
    inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ss)->sin6_addr, c->peer,
              sizeof c->peer);
  else
    inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, c->peer,
              sizeof c->peer);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  c->next = l->conns;
  if (l->conns) l->conns->prev = c;
  l->conns = c;
  l->nconns++;
  l->accepted++;
  c->last_input_ns = rsl_loop_now_ns(l->loop);
  if (l->limits.idle_timeout_ms)
    rsl_timer_start(l->loop, &c->timer, l->limits.idle_timeout_ms * NS_PER_MS);
  if (rsl_io_set(l->loop, &c->io, RSL_IO_READ) < 0) conn_free(c, 0, 0);
}

/* --- the listener ------------------------------------------------------------ */

static void accept_resume(void *ud) {
  rsl_http_listener *l = ud;
  if (l->io.fd >= 0) rsl_io_set(l->loop, &l->io, RSL_IO_READ);
}

/* Over the connection cap: a 503 at once (what the socket takes now),
 * never a connection left waiting. */
static void refuse(rsl_http_listener *l, int fd) {
  static const char BUSY[] =
      "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
      "Content-Length: 21\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
      "too many connections\n";
  l->refused++;
  ssize_t n = send(fd, BUSY, sizeof BUSY - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
  (void)n; /* a client that cannot take it sees the close */
  shutdown(fd, SHUT_WR);
  close(fd);
}

static void listener_on_io(void *ud, int fd, unsigned events) {
  (void)events;
  rsl_http_listener *l = ud;
  for (int i = 0; i < ACCEPTS_PER_WAKEUP; i++) {
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    int cfd = accept4(fd, (struct sockaddr *)&ss, &sl,
                      SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (cfd < 0 && (errno == EINTR || errno == ECONNABORTED)) continue;
    if (cfd < 0 && (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
                    errno == ENOMEM)) {
      /* Level-triggered: retrying now would spin.  Pause instead. */
      rsl_io_set(l->loop, &l->io, 0);
      rsl_timer_start(l->loop, &l->accept_retry, ACCEPT_RETRY_MS * NS_PER_MS);
      return;
    }
    if (cfd < 0) return; /* EAGAIN: all taken */
    if (l->nconns >= l->limits.max_connections) refuse(l, cfd);
    else conn_new(l, cfd, &ss);
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

static void format_address(rsl_http_listener *l) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  char ip[INET6_ADDRSTRLEN] = "?";
  unsigned port = 0;
  if (getsockname(l->io.fd, (struct sockaddr *)&ss, &len) == 0) {
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
  snprintf(l->address, sizeof l->address,
           ss.ss_family == AF_INET6 ? "[%s]:%u" : "%s:%u", ip, port);
}

int rsl_http_listener_new(rsl_http_listener **out, rsl_loop *loop,
                          const char *addr, const rsl_http_limits *limits,
                          const rsl_http_handlers *h, void *ud, char **err) {
  int fd = -1, rc = listen_on(addr, &fd, err);
  if (rc < 0) return rc;
  rsl_http_listener *l = calloc(1, sizeof *l);
  if (!l) {
    close(fd);
    return set_err(err, -ENOMEM, addr, "out of memory");
  }
  l->loop = loop;
  l->limits = *limits;
  l->h = *h;
  l->ud = ud;
  rsl_io_init(&l->io, fd, listener_on_io, l);
  rsl_timer_init(&l->accept_retry, accept_resume, l);
  rc = rsl_io_set(loop, &l->io, RSL_IO_READ);
  if (rc < 0) {
    set_err(err, rc, addr, strerror(-rc));
    close(fd);
    free(l);
    return rc;
  }
  format_address(l);
  *out = l;
  return 0;
}

void rsl_http_listener_stop(rsl_http_listener *l) {
  if (l->io.fd < 0) return;
  rsl_io_set(l->loop, &l->io, 0);
  rsl_timer_stop(l->loop, &l->accept_retry);
  close(l->io.fd);
  l->io.fd = -1;
}

void rsl_http_listener_free(rsl_http_listener *l) {
  if (!l) return;
  rsl_http_listener_stop(l);
  while (l->conns) conn_free(l->conns, 0, 1);
  free(l);
}

const char *rsl_http_listener_address(const rsl_http_listener *l) {
  return l->address;
}

size_t rsl_http_listener_connections(const rsl_http_listener *l) {
  return l->nconns;
}

uint64_t rsl_http_listener_accepted(const rsl_http_listener *l) {
  return l->accepted;
}

uint64_t rsl_http_listener_refused(const rsl_http_listener *l) {
  return l->refused;
}
