/*
 * http/client — HTTP/1.1 attempts on pooled connections.  See client.h.
 *
 * An attempt takes an idle connection of its origin (checked: a readable
 * idle connection is closed by the peer or out of step, and is dropped),
 * or opens one; writes the request with one sendmsg when the socket takes
 * it; reads with one recv per readiness event into the client's buffer and
 * feeds http-parser, which calls back with the head and the body pieces.
 * A connection goes back to the pool only after a complete answer that
 * allows it, with nothing read past the answer; any other end closes it.
 */
#include "client.h"

#include "../hints.h"
#include "buf.h"
#include "head.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <http_parser.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_ORIGINS 256 /* past this, attempts are declined (curl's) */
#define MAX_IDLE_PER_ORIGIN 256
/* An idle connection older than this is closed, not reused: a server
 * with a shorter keep-alive timeout may be closing it as we send. */
#define IDLE_TIMEOUT_NS (30ull * 1000000000ull)
#define MAX_SPARE_ATTEMPTS 256 /* finished attempts kept for reuse */
#define READ_BYTES (64u << 10) /* one recv; bounds a paused attempt's hold */
#define HEAD_LIMIT ((size_t)1 << 30) /* the caller's lines bound it */
#define MAX_AUTHORITY 280 /* "[v6 address]:port" fits, with room */
#define STATUS_LINE_BYTES 16 /* "HTTP/1.1 200 " and CRLF, for the cap */

typedef struct h1_conn h1_conn;

/* The pool of one host:port. */
typedef struct h1_origin {
  char authority[MAX_AUTHORITY]; /* as the URL spells it: the key */
  char host_line[MAX_AUTHORITY + 16]; /* "Host: ...\r\n", as curl sends it */
  size_t host_line_len;
  char host[INET6_ADDRSTRLEN + 2]; /* for messages */
  unsigned port;
  struct sockaddr_storage addr;
  socklen_t addr_len;
  h1_conn *idle_head, *idle_tail; /* newest first */
  size_t idle_count;
} h1_origin;

struct h1_conn {
  rsl_io io;
  rsl_h1_client *cl;
  h1_origin *origin;
  rsl_h1_attempt *a; /* the attempt using it; NULL while idle */
  h1_conn *prev, *next; /* in origin's idle list */
  uint64_t idle_since_ns;
  int connected;
  int reused; /* it carried an answer before this attempt's */
};

struct rsl_h1_attempt {
  int tag; /* RSL_H1_TAG: see client.h */
  rsl_h1_client *cl;
  rsl_h1_attempt *prev, *next; /* cl->attempts */
  h1_origin *origin;
  h1_conn *conn;
  rsl_attempt_done cb;
  void *ud;
  rsl_attempt_data on_data;
  /* The request: head is ours, body borrowed from the caller. */
  rsl_buf head;
  const char *body;
  size_t body_len, sent;
  /* The peer stopped taking the request (errno): it may have answered
   * first (an early 413, then a close), so the answer is read on. */
  int send_errno;
  int head_only;
  long timeout_ms, connect_timeout_ms;
  uint64_t started_ns;
  rsl_timer timeout, connect_timer, defer;
  int queued, on_wire; /* waiting for max_active; counted in cl->active */
  size_t queue_limit;
  rsl_h1_attempt *queue_prev, *queue_next;
  /* The response. */
  http_parser parser;
  rsl_response res;
  size_t headers_cap, body_cap;
  rsl_buf field; /* the header being read: name, then value */
  size_t name_len;
  int in_value;
  /* Where the last value piece ended, and the bytes being parsed: a piece
   * that starts elsewhere follows an obs-fold (see on_header_value). */
  const char *value_end, *parsing;
  int trailers; /* the head is read: fields now are a chunked trailer's */
  size_t header_bytes, max_body_bytes, received;
  int got_byte, complete, leftover;
  /* Paused by the hook: held has the piece it refused (held_piece bytes)
   * and then the bytes read but not parsed yet. */
  int paused, resuming;
  rsl_buf held;
  size_t held_piece;
  /* Failed: why, until finish hands it over. */
  int failed;
};

struct rsl_h1_client {
  rsl_loop *loop;
  rsl_h1_attempt *attempts;
  rsl_h1_attempt *queue_head, *queue_tail;
  size_t active;
  int closing;
  h1_origin *origins[MAX_ORIGINS];
  size_t origin_count;
  rsl_h1_attempt *spare[MAX_SPARE_ATTEMPTS];
  size_t spare_count;
  char *rbuf; /* READ_BYTES: every recv lands here, parsed at once */
};

static const http_parser_settings SETTINGS;
static void on_conn_io(void *ud, int fd, unsigned events);
static void conclude(rsl_h1_attempt *a);

int rsl_h1_owns(const void *attempt) {
  return *(const int *)attempt == RSL_H1_TAG;
}

/* --- failures ------------------------------------------------------------ */

/* Records why a failed (the first reason wins). */
__attribute__((format(printf, 4, 5)))
static void fail(rsl_h1_attempt *a, rsl_error_class error, int local,
                 const char *fmt, ...) {
  if (a->failed) return;
  va_list ap;
  a->failed = 1;
  a->res.error = error;
  a->res.local = local;
  va_start(ap, fmt);
  vsnprintf(a->res.message, sizeof a->res.message, fmt, ap);
  va_end(ap);
}

/* The connection broke before the answer was complete: a reused one that
 * gave no byte is the case curl would have resent behind our back
 * (docs/internals.md, hidden resends); never resent here either. */
static void broken(rsl_h1_attempt *a, const char *what) {
  char unsent[128];
  if (!what && a->send_errno) {
    snprintf(unsent, sizeof unsent, "Send failure: %s",
             strerror(a->send_errno));
    what = unsent;
  }
  if (!a->got_byte && a->conn && a->conn->reused)
    fail(a, RSL_ERR_RESET, 0,
         "reused connection died before the answer; not resent");
  else if (!a->got_byte)
    fail(a, RSL_ERR_RESET, 0, "Empty reply from server%s%s",
         what ? ": " : "", what ? what : "");
  else
    fail(a, RSL_ERR_RESET, 0,
         "connection closed before the response was complete (%zu bytes "
         "received)%s%s", a->received, what ? ": " : "", what ? what : "");
}

/* --- the pool ------------------------------------------------------------ */

static void idle_unlink(h1_conn *c) {
  h1_origin *o = c->origin;
  if (c->prev) c->prev->next = c->next;
  else o->idle_head = c->next;
  if (c->next) c->next->prev = c->prev;
  else o->idle_tail = c->prev;
  c->prev = c->next = NULL;
  o->idle_count--;
}

static void conn_close(h1_conn *c) {
  if (!c->a) idle_unlink(c);
  else c->a->conn = NULL;
  rsl_io_set(c->cl->loop, &c->io, 0);
  close(c->io.fd);
  free(c);
}

/* Takes a live idle connection of o, or NULL.  Idle ones past
 * IDLE_TIMEOUT_NS go first (from the old end); then a connection with
 * anything to read (a FIN, or bytes nobody asked for) is dropped. */
static h1_conn *pool_take(h1_origin *o, rsl_h1_attempt *a) {
  uint64_t now = rsl_now_ns();
  while (o->idle_tail && now - o->idle_tail->idle_since_ns > IDLE_TIMEOUT_NS)
    conn_close(o->idle_tail);
  h1_conn *c;
  while ((c = o->idle_head)) {
    char byte;
    ssize_t n = recv(c->io.fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      idle_unlink(c);
      c->a = a;
      rsl_io_set_weak(c->cl->loop, &c->io, 0);
      return c;
    }
    conn_close(c);
  }
  return NULL;
}

/* Keeps c, its answer complete, for the next attempt to o; watched (weak:
 * it does not keep the loop alive) so that a close by the peer frees it. */
static void pool_put(h1_conn *c) {
  h1_origin *o = c->origin;
  c->a = NULL;
  if (o->idle_count >= MAX_IDLE_PER_ORIGIN || c->cl->closing ||
      rsl_io_set(c->cl->loop, &c->io, RSL_IO_READ) < 0) {
    rsl_io_set(c->cl->loop, &c->io, 0);
    close(c->io.fd);
    free(c);
    return;
  }
  rsl_io_set_weak(c->cl->loop, &c->io, 1);
  c->reused = 1;
  c->idle_since_ns = rsl_now_ns();
  c->prev = NULL;
  c->next = o->idle_head;
  if (c->next) c->next->prev = c;
  else o->idle_tail = c;
  o->idle_head = c;
  o->idle_count++;
}

/* Opens a connection to a's origin (non-blocking: usually still
 * connecting).  NULL when it failed (a's failure recorded). */
static h1_conn *conn_open(rsl_h1_attempt *a) {
  h1_origin *o = a->origin;
  int fd = socket(o->addr.ss_family,
                  SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    int e = errno;
    int local = e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM;
    fail(a, RSL_ERR_CONNECT, local, "%sFailed to connect to %s port %u: %s",
         local ? "out of file descriptors: " : "", o->host, o->port,
         strerror(e));
    return NULL;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  h1_conn *c = calloc(1, sizeof *c);
  if (!c) {
    close(fd);
    fail(a, RSL_ERR_CONNECT, 1, "out of memory");
    return NULL;
  }
  c->cl = a->cl;
  c->origin = o;
  c->a = a;
  rsl_io_init(&c->io, fd, on_conn_io, c);
  if (connect(fd, (const struct sockaddr *)&o->addr, o->addr_len) == 0) {
    c->connected = 1;
  } else if (errno != EINPROGRESS) {
    int e = errno;
    close(fd);
    free(c);
    fail(a, RSL_ERR_CONNECT, 0, "Failed to connect to %s port %u: %s",
         o->host, o->port, strerror(e));
    return NULL;
  }
  return c;
}

/* --- the request --------------------------------------------------------- */

/* Appends n as decimal digits. */
static int add_number(rsl_buf *b, size_t n) {
  char digits[24], *p = digits + sizeof digits;
  do *--p = (char)('0' + n % 10);
  while ((n /= 10));
  return rsl_buf_add(b, p, (size_t)(digits + sizeof digits - p), HEAD_LIMIT);
}

/* 1 when s (n bytes) is only spaces and tabs. */
static int blank(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (s[i] != ' ' && s[i] != '\t') return 0;
  return 1;
}

/* The request head, as curl writes it for the same rsl_request: the
 * request line, Host (the caller's "Host:" line's value, else the URL's
 * authority), the lines in order, Content-Length with a body. */
static int build_head(rsl_h1_attempt *a, const rsl_request *req,
                      const char *path, size_t path_len) {
  rsl_buf *b = &a->head;
  const char *host = NULL;
  size_t host_len = 0;
  for (size_t i = 0; i < req->header_count; i++) {
    const char *l = req->headers[i];
    if (strncasecmp(l, "host:", 5) == 0 && !blank(l + 5, strlen(l + 5))) {
      host = l + 5;
      host_len = strlen(host);
    }
  }
  b->len = 0;
  int rc = rsl_buf_str(b, req->method, HEAD_LIMIT);
  if (rc == 0) rc = rsl_buf_add(b, " ", 1, HEAD_LIMIT);
  /* no path, or "?q" only: curl sends "/" first */
  if (rc == 0 && (!path_len || path[0] != '/'))
    rc = rsl_buf_add(b, "/", 1, HEAD_LIMIT);
  if (rc == 0) rc = rsl_buf_add(b, path, path_len, HEAD_LIMIT);
  if (rc == 0) rc = rsl_buf_add(b, " HTTP/1.1\r\n", 11, HEAD_LIMIT);
  if (rc == 0 && host) {
    rc = rsl_buf_add(b, "Host:", 5, HEAD_LIMIT);
    if (rc == 0) rc = rsl_buf_add(b, host, host_len, HEAD_LIMIT);
    if (rc == 0) rc = rsl_buf_add(b, "\r\n", 2, HEAD_LIMIT);
  } else if (rc == 0) {
    rc = rsl_buf_add(b, a->origin->host_line, a->origin->host_line_len,
                     HEAD_LIMIT);
  }
  for (size_t i = 0; rc == 0 && i < req->header_count; i++) {
    const char *l = req->headers[i];
    size_t n = strlen(l), name_len = strcspn(l, ":");
    if (name_len == n) { /* "Name;": the field with an empty value */
      name_len = strcspn(l, ";");
      if (name_len == n || !blank(l + name_len + 1, n - name_len - 1))
        continue; /* no separator: curl sends nothing either */
      rc = rsl_buf_add(b, l, name_len, HEAD_LIMIT);
      if (rc == 0) rc = rsl_buf_add(b, ":\r\n", 3, HEAD_LIMIT);
      continue;
    }
    if (blank(l + name_len + 1, n - name_len - 1)) continue; /* "Name:" */
    if (name_len == 4 && strncasecmp(l, "host", 4) == 0) continue; /* above */
    rc = rsl_buf_add(b, l, n, HEAD_LIMIT);
    if (rc == 0) rc = rsl_buf_add(b, "\r\n", 2, HEAD_LIMIT);
  }
  if (rc == 0 && req->body) {
    rc = rsl_buf_add(b, "Content-Length: ", 16, HEAD_LIMIT);
    if (rc == 0) rc = add_number(b, req->body_len);
    if (rc == 0) rc = rsl_buf_add(b, "\r\n", 2, HEAD_LIMIT);
  }
  if (rc == 0) rc = rsl_buf_add(b, "\r\n", 2, HEAD_LIMIT);
  return rc;
}

/* Writes what the socket takes of the request; then waits for the answer
 * (and, while some is left, for room).  Failures are recorded. */
static void write_request(rsl_h1_attempt *a) {
  h1_conn *c = a->conn;
  size_t total = a->head.len + a->body_len;
  while (a->sent < total && !a->send_errno) {
    struct iovec iov[2];
    struct msghdr msg = {.msg_iov = iov};
    if (a->sent < a->head.len) {
      iov[0] = (struct iovec){a->head.data + a->sent, a->head.len - a->sent};
      iov[1] = (struct iovec){(void *)a->body, a->body_len};
      msg.msg_iovlen = a->body_len ? 2 : 1;
    } else {
      size_t off = a->sent - a->head.len;
      iov[0] = (struct iovec){(void *)(a->body + off), a->body_len - off};
      msg.msg_iovlen = 1;
    }
    ssize_t n = sendmsg(c->io.fd, &msg, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n < 0) {
      a->send_errno = errno; /* see there; broken() tells it otherwise */
      break;
    }
    a->sent += (size_t)n;
  }
  /* An answer may come before the request is all out (an early 413). */
  unsigned want =
      RSL_IO_READ | (a->sent < total && !a->send_errno ? RSL_IO_WRITE : 0);
  if (c->io.events != want && rsl_io_set(a->cl->loop, &c->io, want) < 0)
    fail(a, RSL_ERR_CONNECT, 1, "out of memory");
}

/* --- the response -------------------------------------------------------- */

static int header_cap(rsl_h1_attempt *a, size_t more) {
  a->header_bytes += more;
  if (a->header_bytes <= RSL_MAX_RESPONSE_HEADER_BYTES) return 0;
  fail(a, RSL_ERR_TOO_LARGE, 0, "response over the size limit");
  return -1;
}

/* Adds the field in a->field to the response: the name lower-cased, the
 * value without surrounding blanks (http-parser has refused control
 * characters already). */
static int commit_header(rsl_h1_attempt *a) {
  rsl_response *res = &a->res;
  const char *name = a->field.data, *v = a->field.data + a->name_len;
  const char *end = a->field.data + a->field.len;
  size_t name_len = a->name_len;
  a->in_value = 0;
  /* "Name : v": a proxy removes the blank (RFC 9112 section 5.1) */
  while (name_len && (name[name_len - 1] == ' ' || name[name_len - 1] == '\t'))
    name_len--;
  while (v < end && (*v == ' ' || *v == '\t')) v++;
  while (end > v && (end[-1] == ' ' || end[-1] == '\t')) end--;
  if (res->header_count == a->headers_cap) {
    size_t cap = a->headers_cap ? 2 * a->headers_cap : 8;
    rsl_header *grown = realloc(res->headers, cap * sizeof *grown);
    if (!grown) goto oom;
    res->headers = grown;
    a->headers_cap = cap;
  }
  char *n = strndup(name, name_len), *value = strndup(v, (size_t)(end - v));
  if (!n || !value) {
    free(n);
    free(value);
    goto oom;
  }
  for (char *p = n; *p; p++) *p = (char)tolower((unsigned char)*p);
  res->headers[res->header_count].name = n;
  res->headers[res->header_count].value = value;
  res->header_count++;
  a->field.len = a->name_len = 0;
  return 0;
oom:
  fail(a, RSL_ERR_PROTOCOL, 1, "out of memory");
  return -1;
}

static void forget_headers(rsl_response *res) {
  for (size_t i = 0; i < res->header_count; i++) {
    free(res->headers[i].name);
    free(res->headers[i].value);
  }
  res->header_count = 0;
}

static int on_status(http_parser *p, const char *at, size_t len) {
  return header_cap(p->data, len + STATUS_LINE_BYTES);
}

static int on_header_field(http_parser *p, const char *at, size_t len) {
  rsl_h1_attempt *a = p->data;
  if (a->trailers) return header_cap(a, len + 4); /* not passed on */
  if (a->in_value && commit_header(a) < 0) return -1;
  if (header_cap(a, len + 4) < 0) return -1;
  if (rsl_buf_add(&a->field, at, len, HEAD_LIMIT) < 0) {
    fail(a, RSL_ERR_PROTOCOL, 1, "out of memory");
    return -1;
  }
  return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len) {
  rsl_h1_attempt *a = p->data;
  if (a->trailers) return header_cap(a, len);
  if (header_cap(a, len) < 0) return -1;
  if (!a->in_value) {
    a->in_value = 1;
    a->name_len = a->field.len;
  } else if (at != a->value_end && at != a->parsing &&
             rsl_buf_add(&a->field, " ", 1, HEAD_LIMIT) < 0) {
    /* a folded line (RFC 9112 section 5.2): a proxy joins it with SP */
    fail(a, RSL_ERR_PROTOCOL, 1, "out of memory");
    return -1;
  }
  a->value_end = at + len;
  if (rsl_buf_add(&a->field, at, len, HEAD_LIMIT) < 0) {
    fail(a, RSL_ERR_PROTOCOL, 1, "out of memory");
    return -1;
  }
  return 0;
}

static int on_headers_complete(http_parser *p) {
  rsl_h1_attempt *a = p->data;
  if (a->in_value && commit_header(a) < 0) return -1;
  if (p->status_code / 100 == 1 && p->status_code != 101)
    return 0; /* interim: see message_complete */
  const char *why =
      rsl_head_check(p->status_code, a->res.headers, a->res.header_count);
  if (why) {
    fail(a, RSL_ERR_PROTOCOL, 0, "%s", why);
    return -1;
  }
  a->res.status = p->status_code;
  a->trailers = 1;
  return a->head_only ? 1 : 0; /* 1: no body (HEAD) */
}

/* Keeps a piece of the body in res.body, under max_body_bytes. */
static int keep_body(rsl_h1_attempt *a, const char *at, size_t len) {
  rsl_response *res = &a->res;
  if (len > a->max_body_bytes - res->body_len) {
    fail(a, RSL_ERR_TOO_LARGE, 0, "response over the size limit");
    return -1;
  }
  if (res->body_len + len + 1 > a->body_cap) {
    size_t cap = a->body_cap ? a->body_cap : 1024;
    while (cap < res->body_len + len + 1) cap *= 2;
    char *grown = realloc(res->body, cap);
    if (!grown) {
      fail(a, RSL_ERR_PROTOCOL, 1, "out of memory");
      return -1;
    }
    res->body = grown;
    a->body_cap = cap;
  }
  memcpy(res->body + res->body_len, at, len);
  res->body_len += len;
  res->body[res->body_len] = '\0';
  return 0;
}

/* Hands a piece of body to the hook, or keeps it.  0, 1 when the hook
 * paused (the piece comes again after rsl_h1_resume), -1 on failure. */
static int deliver(rsl_h1_attempt *a, const char *at, size_t len) {
  if (a->on_data) {
    switch (a->on_data(a->ud, &a->res, at, len)) {
    case RSL_DATA_TAKEN: return 0;
    case RSL_DATA_PAUSE: return 1;
    case RSL_DATA_ABORT:
      fail(a, RSL_ERR_PROTOCOL, 0, "Failure writing output to destination");
      return -1;
    default: break;
    }
  }
  return keep_body(a, at, len);
}

static int on_body(http_parser *p, const char *at, size_t len) {
  rsl_h1_attempt *a = p->data;
  int rc = deliver(a, at, len);
  if (rc == 1) {
    /* parse() keeps the piece and what follows it */
    a->paused = 1;
    a->held_piece = len;
    a->held.len = 0;
    if (rsl_buf_add(&a->held, at, len, (size_t)-1) < 0) {
      fail(a, RSL_ERR_PROTOCOL, 1, "out of memory");
      return -1;
    }
    http_parser_pause(p, 1);
  }
  return rc < 0 ? -1 : 0;
}

static int on_message_complete(http_parser *p) {
  rsl_h1_attempt *a = p->data;
  if (p->status_code / 100 == 1) {
    forget_headers(&a->res); /* 100 Continue and friends: the next answer */
    a->res.status = 0;
    return 0;
  }
  a->complete = 1;
  http_parser_pause(p, 1); /* one answer: what follows is out of step */
  return 0;
}

static const http_parser_settings SETTINGS = {
    .on_status = on_status,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* Parses n bytes of the answer.  When the hook pauses, the rest waits in
 * a->held (the piece it refused first), and reading stops. */
static void parse(rsl_h1_attempt *a, const char *data, size_t n) {
  a->parsing = data;
  size_t done = http_parser_execute(&a->parser, &SETTINGS, data, n);
  if (a->failed) return;
  if (a->paused) {
    if (rsl_buf_add(&a->held, data + done, n - done, (size_t)-1) < 0)
      fail(a, RSL_ERR_PROTOCOL, 1, "out of memory");
    else if (a->conn && a->conn->io.events)
      rsl_io_set(a->cl->loop, &a->conn->io, 0);
    return;
  }
  if (a->complete) {
    a->leftover = done < n;
    return;
  }
  enum http_errno e = HTTP_PARSER_ERRNO(&a->parser);
  if (e != HPE_OK)
    fail(a, RSL_ERR_PROTOCOL, 0, "malformed response: %s",
         http_errno_description(e));
  else if (a->parser.upgrade)
    fail(a, RSL_ERR_PROTOCOL, 0, "malformed response: an upgrade");
}

/* The peer closed: the end of a close-delimited body, or a break. */
static void on_eof(rsl_h1_attempt *a) {
  if (a->got_byte) {
    http_parser_execute(&a->parser, &SETTINGS, NULL, 0);
    if (a->complete || a->failed) {
      a->leftover = 1; /* closed: not to be pooled */
      return;
    }
  }
  broken(a, NULL);
}

static void read_answer(rsl_h1_attempt *a) {
  ssize_t n = recv(a->conn->io.fd, a->cl->rbuf, READ_BYTES, 0);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
    char what[128];
    snprintf(what, sizeof what, "Recv failure: %s", strerror(errno));
    broken(a, what);
    return;
  }
  if (n == 0) {
    on_eof(a);
    return;
  }
  a->got_byte = 1;
  a->received += (size_t)n;
  parse(a, a->cl->rbuf, (size_t)n);
}

/* --- the attempt's life -------------------------------------------------- */

static void on_conn_io(void *ud, int fd, unsigned events) {
  h1_conn *c = ud;
  rsl_h1_attempt *a = c->a;
  if (!a) { /* idle, and closed by the peer or sent something unasked */
    conn_close(c);
    return;
  }
  if (!c->connected) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err) {
      fail(a, RSL_ERR_CONNECT, 0,
           "Failed to connect to %s port %u after %.0f ms: %s",
           a->origin->host, a->origin->port,
           (double)(rsl_now_ns() - a->started_ns) / 1e6, strerror(err));
      conclude(a);
      return;
    }
    c->connected = 1;
    rsl_timer_stop(a->cl->loop, &a->connect_timer);
    write_request(a);
  } else {
    if (events & RSL_IO_WRITE) write_request(a);
    if (!a->failed && (events & (RSL_IO_READ | RSL_IO_ERROR)))
      read_answer(a);
  }
  if (a->failed || a->complete) conclude(a);
}

static void dequeue(rsl_h1_attempt *a) {
  rsl_h1_client *cl = a->cl;
  if (a->queue_prev) a->queue_prev->queue_next = a->queue_next;
  else cl->queue_head = a->queue_next;
  if (a->queue_next) a->queue_next->queue_prev = a->queue_prev;
  else cl->queue_tail = a->queue_prev;
  a->queue_prev = a->queue_next = NULL;
  a->queued = 0;
}

static void pump(rsl_h1_client *cl);

/* Ends a: it goes back to the spare list or is freed; its connection, if
 * it still has one, is closed.  A queued attempt may start. */
static void attempt_release(rsl_h1_attempt *a) {
  rsl_h1_client *cl = a->cl;
  if (a->conn) conn_close(a->conn);
  if (a->prev) a->prev->next = a->next;
  else cl->attempts = a->next;
  if (a->next) a->next->prev = a->prev;
  if (a->queued) dequeue(a);
  if (a->on_wire) cl->active--;
  rsl_timer_stop(cl->loop, &a->timeout);
  rsl_timer_stop(cl->loop, &a->connect_timer);
  rsl_timer_stop(cl->loop, &a->defer);
  rsl_response_free(&a->res);
  rsl_buf_free(&a->held);
  if (cl->spare_count == MAX_SPARE_ATTEMPTS) {
    rsl_buf_free(&a->head);
    rsl_buf_free(&a->field);
    free(a);
  } else {
    rsl_buf head = a->head, field = a->field;
    memset(a, 0, sizeof *a);
    a->head = head; /* their room is kept */
    a->field = field;
    a->field.len = 0;
    cl->spare[cl->spare_count++] = a;
  }
  pump(cl);
}

/* Hands a's result to its callback, after releasing a (and pooling or
 * closing its connection). */
static void conclude(rsl_h1_attempt *a) {
  rsl_response *res = &a->res;
  res->latency_ms = (double)(rsl_now_ns() - a->started_ns) / 1e6;
  if (a->failed) {
    res->status = 0; /* the hook may have seen one */
  } else {
    res->error = RSL_ERR_NONE;
    res->retry_after_ms = rsl_hints_retry_after_ms(res, (double)time(NULL));
    if (!a->leftover && a->sent == a->head.len + a->body_len &&
        http_should_keep_alive(&a->parser)) {
      h1_conn *c = a->conn;
      a->conn = NULL;
      pool_put(c);
    }
  }
  rsl_response handed = *res;
  memset(res, 0, sizeof *res); /* ownership moves to the callback */
  rsl_attempt_done cb = a->cb;
  void *ud = a->ud;
  attempt_release(a);
  cb(ud, &handed);
}

/* The attempt's whole time is up (timeout_ms, counted from the send). */
static void on_timeout(void *ud) {
  rsl_h1_attempt *a = ud;
  long ms = a->timeout_ms;
  if (a->queued) {
    dequeue(a);
    fail(a, RSL_ERR_TIMEOUT, 0, "Timeout was reached");
  } else if (!a->conn || !a->conn->connected) {
    /* curl's classification: no connection yet is a connect failure */
    fail(a, RSL_ERR_CONNECT, 0, "Connection timed out after %ld milliseconds",
         ms);
  } else {
    fail(a, RSL_ERR_TIMEOUT, 0,
         "Operation timed out after %ld milliseconds with %zu bytes received",
         ms, a->received);
  }
  conclude(a);
}

static void on_connect_timeout(void *ud) {
  rsl_h1_attempt *a = ud;
  fail(a, RSL_ERR_CONNECT, 0, "Connection timed out after %ld milliseconds",
       a->connect_timeout_ms);
  conclude(a);
}

/* Hands the held piece to the hook again, then parses what was held after
 * it and reads on. */
static void resume_now(rsl_h1_attempt *a) {
  int rc = deliver(a, a->held.data, a->held_piece);
  if (rc != 0) return; /* paused again, or failed */
  rsl_buf held = a->held;
  size_t piece = a->held_piece;
  a->held = (rsl_buf){0};
  a->paused = 0;
  http_parser_pause(&a->parser, 0);
  if (held.len > piece) /* (0 bytes would tell http-parser of an EOF) */
    parse(a, held.data + piece, held.len - piece);
  rsl_buf_free(&held);
  if (!a->failed && !a->complete && !a->paused && a->conn &&
      rsl_io_set(a->cl->loop, &a->conn->io, RSL_IO_READ) < 0)
    fail(a, RSL_ERR_PROTOCOL, 1, "out of memory");
}

/* From the loop: a failure found outside it, or a resume. */
static void on_defer(void *ud) {
  rsl_h1_attempt *a = ud;
  if (a->resuming && !a->failed) {
    a->resuming = 0;
    resume_now(a);
  }
  if (a->failed || a->complete) conclude(a);
}

/* Puts a on the wire: a pooled connection, or a new one. */
static void start(rsl_h1_attempt *a) {
  rsl_h1_client *cl = a->cl;
  a->on_wire = 1;
  cl->active++;
  a->conn = pool_take(a->origin, a);
  if (!a->conn) a->conn = conn_open(a);
  if (!a->conn) {
    rsl_timer_start(cl->loop, &a->defer, 0);
    return;
  }
  if (a->conn->connected) {
    write_request(a);
  } else {
    if (rsl_io_set(cl->loop, &a->conn->io, RSL_IO_WRITE) < 0)
      fail(a, RSL_ERR_CONNECT, 1, "out of memory");
    else if (a->connect_timeout_ms > 0)
      rsl_timer_start(cl->loop, &a->connect_timer,
                      (uint64_t)a->connect_timeout_ms * 1000000u);
  }
  if (a->failed || a->complete) rsl_timer_start(cl->loop, &a->defer, 0);
}

/* Starts queued attempts while there is room under their limit. */
static void pump(rsl_h1_client *cl) {
  rsl_h1_attempt *a;
  while (!cl->closing && (a = cl->queue_head) && cl->active < a->queue_limit) {
    dequeue(a);
    start(a);
  }
}

/* --- URLs and origins ---------------------------------------------------- */

/* The origin of an http:// URL with a numeric host (added if new), and
 * its path ("/" when none; the fragment cut, as curl does).  NULL when
 * the URL is not one for this client. */
static h1_origin *url_origin(rsl_h1_client *cl, const char *url,
                             const char **path, size_t *path_len) {
  if (strncasecmp(url, "http://", 7) != 0) return NULL;
  const char *auth = url + 7;
  size_t auth_len = strcspn(auth, "/?#");
  if (auth_len == 0 || auth_len >= MAX_AUTHORITY ||
      memchr(auth, '@', auth_len))
    return NULL;
  const char *rest = auth + auth_len;
  *path = rest;
  *path_len = strcspn(rest, "#");
  for (size_t i = 0; i < cl->origin_count; i++) {
    h1_origin *o = cl->origins[i];
    if (strncmp(o->authority, auth, auth_len) == 0 && !o->authority[auth_len])
      return o;
  }
  if (cl->origin_count == MAX_ORIGINS) return NULL;
  /* host, port */
  char host[MAX_AUTHORITY];
  const char *port = NULL;
  size_t host_len;
  if (auth[0] == '[') {
    const char *close = memchr(auth, ']', auth_len);
    if (!close) return NULL;
    host_len = (size_t)(close - auth - 1);
    memcpy(host, auth + 1, host_len);
    if (close + 1 < rest) {
      if (close[1] != ':') return NULL;
      port = close + 2;
    }
  } else {
    const char *colon = memchr(auth, ':', auth_len);
    host_len = colon ? (size_t)(colon - auth) : auth_len;
    memcpy(host, auth, host_len);
    if (colon) port = colon + 1;
  }
  host[host_len] = '\0';
  unsigned long port_num = 80;
  if (port) {
    size_t digits = (size_t)(rest - port);
    if (digits == 0 || digits > 5 || strspn(port, "0123456789") < digits)
      return NULL;
    port_num = strtoul(port, NULL, 10);
    if (port_num == 0 || port_num > 65535) return NULL;
  }
  h1_origin *o = calloc(1, sizeof *o);
  if (!o) return NULL;
  struct sockaddr_in *v4 = (struct sockaddr_in *)&o->addr;
  struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&o->addr;
  if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons((uint16_t)port_num);
    o->addr_len = sizeof *v4;
  } else if (auth[0] == '[' && inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons((uint16_t)port_num);
    o->addr_len = sizeof *v6;
  } else {
    free(o); /* a name: DNS is curl's (its resolver does not block) */
    return NULL;
  }
  memcpy(o->authority, auth, auth_len);
  o->authority[auth_len] = '\0';
  memcpy(o->host, host, host_len + 1); /* an address: it fits */
  o->port = (unsigned)port_num;
  /* curl leaves the default port out of Host */
  size_t shown = port_num == 80 && port ? (size_t)(port - 1 - auth) : auth_len;
  o->host_line_len = (size_t)snprintf(o->host_line, sizeof o->host_line,
                                      "Host: %.*s\r\n", (int)shown, auth);
  cl->origins[cl->origin_count++] = o;
  return o;
}

/* --- the interface ------------------------------------------------------- */

int rsl_h1_client_new(rsl_h1_client **out, rsl_loop *loop) {
  rsl_h1_client *cl = calloc(1, sizeof *cl);
  if (cl) cl->rbuf = malloc(READ_BYTES);
  if (!cl || !cl->rbuf) {
    free(cl);
    return -ENOMEM;
  }
  cl->loop = loop;
  *out = cl;
  return 0;
}

void rsl_h1_client_free(rsl_h1_client *cl) {
  if (!cl) return;
  cl->closing = 1;
  while (cl->attempts) attempt_release(cl->attempts);
  for (size_t i = 0; i < cl->origin_count; i++) {
    while (cl->origins[i]->idle_head) conn_close(cl->origins[i]->idle_head);
    free(cl->origins[i]);
  }
  while (cl->spare_count) {
    rsl_h1_attempt *a = cl->spare[--cl->spare_count];
    rsl_buf_free(&a->head);
    rsl_buf_free(&a->field);
    free(a);
  }
  free(cl->rbuf);
  free(cl);
}

int rsl_h1_send(rsl_h1_client *cl, const rsl_request *req,
                rsl_attempt_done cb, void *ud, rsl_h1_attempt **out,
                const char **err) {
  const char *path;
  size_t path_len;
  if (!req->raw || req->http2) return RSL_H1_DECLINED;
  h1_origin *o = url_origin(cl, req->url, &path, &path_len);
  if (!o) return RSL_H1_DECLINED;
  rsl_h1_attempt *a =
      cl->spare_count ? cl->spare[--cl->spare_count] : calloc(1, sizeof *a);
  if (!a) {
    *err = "out of memory";
    return -1;
  }
  a->tag = RSL_H1_TAG;
  a->cl = cl;
  a->origin = o;
  if (build_head(a, req, path, path_len) < 0) {
    rsl_buf_free(&a->head);
    rsl_buf_free(&a->field);
    free(a);
    *err = "out of memory";
    return -1;
  }
  a->cb = cb;
  a->ud = ud;
  a->on_data = req->on_data;
  a->body = req->body;
  a->body_len = req->body ? req->body_len : 0;
  a->head_only = strcmp(req->method, "HEAD") == 0;
  a->timeout_ms = req->timeout_ms;
  a->connect_timeout_ms = req->connect_timeout_ms;
  a->max_body_bytes = req->max_response_bytes ? req->max_response_bytes
                                              : RSL_MAX_RESPONSE_BYTES_DEFAULT;
  a->res.retry_after_ms = -1;
  a->started_ns = rsl_now_ns();
  http_parser_init(&a->parser, HTTP_RESPONSE);
  a->parser.data = a;
  rsl_timer_init(&a->timeout, on_timeout, a);
  rsl_timer_init(&a->connect_timer, on_connect_timeout, a);
  rsl_timer_init(&a->defer, on_defer, a);
  a->next = cl->attempts;
  if (a->next) a->next->prev = a;
  cl->attempts = a;
  if (a->timeout_ms > 0 &&
      rsl_timer_start(cl->loop, &a->timeout,
                      (uint64_t)a->timeout_ms * 1000000u) < 0) {
    attempt_release(a);
    *err = "out of memory";
    return -1;
  }
  *out = a;
  if (req->max_active && (cl->active >= req->max_active || cl->queue_head)) {
    a->queued = 1;
    a->queue_limit = req->max_active;
    a->queue_prev = cl->queue_tail;
    if (cl->queue_tail) cl->queue_tail->queue_next = a;
    else cl->queue_head = a;
    cl->queue_tail = a;
    return 0;
  }
  start(a);
  return 0;
}

void rsl_h1_cancel(rsl_h1_attempt *a) { attempt_release(a); }

void rsl_h1_resume(rsl_h1_attempt *a) {
  if (!a->paused || a->resuming) return;
  a->resuming = 1;
  rsl_timer_start(a->cl->loop, &a->defer, 0);
}
