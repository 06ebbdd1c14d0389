/*
 * h2c — HTTP/2 (and gRPC) for the scriptable upstream.  See h2c.h.
 *
 * nghttp2 does the framing; this file moves bytes between it and the
 * socket (nghttp2_session_mem_recv / mem_send), collects each stream's
 * request, runs the server's handler and submits the answer, now or when
 * the stream's delay timer fires.
 */
#include "h2c.h"

#include <errno.h>
#include <nghttp2/nghttp2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../grpc/grpc.h"

#define PREFACE_BYTES 24 /* the client preface (http/conn checked it) */
#define MAX_CONCURRENT_STREAMS 100000 /* what we announce (see transport.c) */
#define READ_CHUNK_BYTES (16 * 1024)
#define NS_PER_MS 1000000ull
#define MAX_NV 128 /* header fields of one answer we build */

typedef struct stream stream;

struct rsl_h2c {
  rsl_server *srv;
  rsl_h2c **list, *prev, *next;
  rsl_io io;
  nghttp2_session *session;
  stream *streams;
  /* Idle timeout, as HTTP/1.1's (the server's): GOAWAY, then
   * the close, after that long without input and no stream open. */
  rsl_timer idle;
  uint64_t last_input_ns;
  /* What nghttp2 produced that the socket did not take yet. */
  char *out;
  size_t out_len, out_sent;
  int server_closed; /* a handler closed the server: free it after recv */
  /* Where the input stands in the frame sequence (see drop_late_resets):
   * preface bytes still to come, a frame header being read, or the
   * payload left of the current frame, which is dropped or fed. */
  size_t preface_left;
  uint8_t frame_head[9];
  size_t head_have, payload_left;
  int dropping;
};

/* Request header fields: names and values in one buffer (offsets). */
typedef struct field {
  size_t name, name_len, value, value_len;
} field;

struct stream {
  rsl_h2c *conn;
  stream *prev, *next;
  int32_t id;
  char *text; /* header names and values, then :path */
  size_t text_len, text_cap;
  field fields[RSL_HTTP_MAX_HEADERS];
  size_t nfields;
  char method[16];
  size_t path, path_len;
  int has_path;
  char *body;
  size_t body_len, body_cap;
  int reject; /* 413/431: answered without the handler */
  int grpc;
  double grpc_timeout_ms; /* -1: none */
  int deadline_hit;       /* answer DEADLINE_EXCEEDED instead */
  rsl_server_response *res;
  rsl_timer timer;
  /* the DATA being sent, and the trailers after it */
  char *data;
  size_t data_len, data_off;
  int trailers;
};

/* --- streams -------------------------------------------------------------- */

static void stream_free(stream *st) {
  rsl_h2c *c = st->conn;
  rsl_timer_stop(rsl_server_loop(c->srv), &st->timer);
  if (st->prev) st->prev->next = st->next;
  else c->streams = st->next;
  if (st->next) st->next->prev = st->prev;
  rsl_server_response_free(st->res);
  free(st->text);
  free(st->body);
  free(st->data);
  free(st);
}

/* Appends n bytes to st->text; its offset, or -1 past the header cap. */
static long text_add(stream *st, const uint8_t *p, size_t n) {
  if (st->text_len + n > RSL_SERVER_MAX_HEADER_BYTES) return -1;
  if (st->text_len + n > st->text_cap) {
    size_t cap = st->text_cap ? st->text_cap * 2 : 512;
    while (cap < st->text_len + n) cap *= 2;
    char *grown = realloc(st->text, cap);
    if (!grown) return -1;
    st->text = grown;
    st->text_cap = cap;
  }
  memcpy(st->text + st->text_len, p, n);
  st->text_len += n;
  return (long)(st->text_len - n);
}

static const char *field_value(const stream *st, const char *name,
                               size_t *len) {
  size_t n = strlen(name);
  for (size_t i = 0; i < st->nfields; i++) {
    const field *f = &st->fields[i];
    if (f->name_len == n && memcmp(st->text + f->name, name, n) == 0) {
      *len = f->value_len;
      return st->text + f->value;
    }
  }
  return NULL;
}

/* grpc-timeout: up to 8 digits and a unit; -1 when absent or malformed. */
static double parse_grpc_timeout(const char *v, size_t n) {
  if (n < 2 || n > 9) return -1;
  double x = 0;
  for (size_t i = 0; i + 1 < n; i++) {
    if (v[i] < '0' || v[i] > '9') return -1;
    x = x * 10 + (v[i] - '0');
  }
  switch (v[n - 1]) {
  case 'H': return x * 3600000.0;
  case 'M': return x * 60000.0;
  case 'S': return x * 1000.0;
  case 'm': return x;
  case 'u': return x / 1000.0;
  case 'n': return x / 1000000.0;
  default: return -1;
  }
}

/* --- answers -------------------------------------------------------------- */

static nghttp2_nv make_nv(const char *name, size_t name_len, const char *value,
                          size_t value_len) {
  return (nghttp2_nv){(uint8_t *)name, (uint8_t *)value, name_len, value_len,
                      NGHTTP2_NV_FLAG_NONE};
}

static int is_hop_by_hop(const char *name, size_t n) {
  static const char *const NAMES[] = {"connection", "keep-alive",
                                      "proxy-connection", "transfer-encoding",
                                      "upgrade", "te", "content-length"};
  for (size_t i = 0; i < sizeof NAMES / sizeof *NAMES; i++)
    if (strlen(NAMES[i]) == n && strncasecmp(name, NAMES[i], n) == 0) return 1;
  return 0;
}

/* The handler's header lines as fields, names lower-cased into `lower`
 * (as long as the head); which = 0: all, 1: not grpc-* (a gRPC answer's
 * headers), 2: only grpc-* (its trailers).  A gRPC answer's content-type
 * is ours.  Returns the number added after nv[n]. */
static size_t head_fields(const rsl_server_answer *a, char *lower, int which,
                          int grpc, nghttp2_nv *nv, size_t n) {
  const char *p = a->head, *end = a->head + a->head_len;
  memcpy(lower, a->head, a->head_len);
  while (p < end && n < MAX_NV) {
    const char *eol = memchr(p, '\r', (size_t)(end - p));
    const char *colon = memchr(p, ':', (size_t)(end - p));
    if (!eol || !colon || colon > eol) break;
    size_t name_len = (size_t)(colon - p);
    char *name = lower + (p - a->head);
    for (size_t i = 0; i < name_len; i++)
      if (name[i] >= 'A' && name[i] <= 'Z') name[i] = (char)(name[i] + 32);
    const char *value = colon + 2 <= eol ? colon + 2 : eol;
    int is_grpc = name_len > 5 && memcmp(name, "grpc-", 5) == 0;
    int skip = is_hop_by_hop(name, name_len) || (which == 1 && is_grpc) ||
               (which == 2 && !is_grpc) ||
               (grpc && name_len == 12 && memcmp(name, "content-type", 12) == 0);
    if (!skip) nv[n++] = make_nv(name, name_len, value, (size_t)(eol - value));
    p = eol + 2;
  }
  return n;
}

/* grpc-message is percent-encoded (PROTOCOL-HTTP2.md): every byte
 * outside 0x20..0x7e, and '%'.  out holds 3 * n bytes. */
static size_t percent_encode(const char *in, size_t n, char *out) {
  static const char HEX[] = "0123456789ABCDEF";
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)in[i];
    if (ch < 0x20 || ch > 0x7e || ch == '%') {
      out[k++] = '%';
      out[k++] = HEX[ch >> 4];
      out[k++] = HEX[ch & 15];
    } else {
      out[k++] = (char)ch;
    }
  }
  return k;
}

/* The gRPC status of st's answer: the handler's, or DEADLINE_EXCEEDED,
 * or OK for a plain 200; -1 when the handler answered another HTTP status
 * without one (then sent as plain HTTP: the client maps it). */
static int grpc_code(const stream *st, const rsl_server_answer *a) {
  if (st->deadline_hit) return RSL_GRPC_DEADLINE_EXCEEDED;
  if (a->grpc_status >= 0) return a->grpc_status;
  return a->status == 200 ? RSL_GRPC_OK : -1;
}

/* Fills nv with st's gRPC trailers; storage for the status and the
 * encoded message in `buf` (3 * message + 128 bytes). */
static size_t grpc_trailers(const stream *st, const rsl_server_answer *a,
                            char *lower, char *buf, nghttp2_nv *nv,
                            size_t n) {
  int code = grpc_code(st, a);
  int len = snprintf(buf, 16, "%d", code);
  nv[n++] = make_nv("grpc-status", 11, buf, (size_t)len);
  const char *msg = st->deadline_hit ? "deadline exceeded" : a->grpc_message;
  size_t msg_len = st->deadline_hit ? 17 : a->grpc_message_len;
  if (msg) {
    char *enc = buf + 16;
    nv[n++] = make_nv("grpc-message", 12, enc, percent_encode(msg, msg_len, enc));
  }
  if (!st->deadline_hit) n = head_fields(a, lower, 2, 1, nv, n);
  return n;
}

static ssize_t read_data(nghttp2_session *session, int32_t id, uint8_t *out,
                         size_t length, uint32_t *flags,
                         nghttp2_data_source *source, void *ud) {
  (void)ud;
  stream *st = source->ptr;
  size_t n = st->data_len - st->data_off;
  if (n > length) n = length;
  memcpy(out, st->data + st->data_off, n);
  st->data_off += n;
  if (st->data_off < st->data_len) return (ssize_t)n;
  *flags |= NGHTTP2_DATA_FLAG_EOF;
  if (!st->trailers) return (ssize_t)n;
  /* gRPC: status in the trailers */
  rsl_server_answer a;
  rsl_server_response_view(st->res, &a);
  char *lower = malloc(a.head_len + 1), *buf = malloc(3 * a.grpc_message_len + 128);
  nghttp2_nv nv[MAX_NV];
  if (!lower || !buf) {
    free(lower);
    free(buf);
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* resets the stream */
  }
  size_t count = grpc_trailers(st, &a, lower, buf, nv, 0);
  *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
  int rc = nghttp2_submit_trailer(session, id, nv, count);
  free(lower);
  free(buf);
  return rc == 0 ? (ssize_t)n : NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
}

/* Submits st's answer (the handler's response, or a DEADLINE_EXCEEDED).
 * 0, or -1 when out of memory. */
static int submit_answer(stream *st) {
  rsl_h2c *c = st->conn;
  nghttp2_session *session = c->session;
  rsl_server_answer a;
  rsl_server_response_view(st->res, &a);
  if (!st->deadline_hit && a.action == RSL_SERVER_HANG) return 0;
  if (!st->deadline_hit && a.action == RSL_SERVER_RESET)
    return nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, st->id,
                                     NGHTTP2_INTERNAL_ERROR) == 0 ? 0 : -1;
  if (!st->deadline_hit && a.action == RSL_SERVER_CLOSE) {
    /* Graceful: the streams before this one are answered, this one is
     * refused (not processed), and the connection ends when they are. */
    int rc = nghttp2_submit_goaway(session, NGHTTP2_FLAG_NONE,
                                   st->id > 2 ? st->id - 2 : 0,
                                   NGHTTP2_NO_ERROR, NULL, 0);
    if (rc == 0)
      rc = nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, st->id,
                                     NGHTTP2_REFUSED_STREAM);
    return rc == 0 ? 0 : -1;
  }
  int code = st->grpc ? grpc_code(st, &a) : -1;
  int status = code >= 0 ? 200 : a.status;
  rsl_server_count_status(c->srv, status);
  char status_text[8], length_text[24];
  snprintf(status_text, sizeof status_text, "%d", status);
  char *lower = malloc(a.head_len + 1);
  char *buf = malloc(3 * a.grpc_message_len + 128);
  nghttp2_nv nv[MAX_NV];
  int rc = -1;
  if (!lower || !buf) goto out;
  size_t n = 0;
  nv[n++] = make_nv(":status", 7, status_text, strlen(status_text));
  const char *body = a.body;
  size_t body_len = a.body_len;
  if (code >= 0) {
    nv[n++] = make_nv("content-type", 12, "application/grpc", 16);
    n = head_fields(&a, lower, 1, 1, nv, n);
    if (code != RSL_GRPC_OK && body_len == 0) { /* Trailers-Only */
      n = grpc_trailers(st, &a, lower, buf, nv, n);
      rc = nghttp2_submit_response(session, st->id, nv, n, NULL) == 0 ? 0 : -1;
      goto out;
    }
    if (st->deadline_hit) body_len = 0;
    if (rsl_grpc_frame(body, body_len, &st->data, &st->data_len) < 0) goto out;
    st->trailers = 1;
  } else {
    n = head_fields(&a, lower, 0, 0, nv, n);
    int has_body = status >= 200 && status != 204 && status != 304 &&
                   strcmp(st->method, "HEAD") != 0;
    body_len = has_body ? body_len : 0;
    snprintf(length_text, sizeof length_text, "%zu", body_len);
    if (has_body)
      nv[n++] = make_nv("content-length", 14, length_text, strlen(length_text));
    if (body_len) {
      if (!(st->data = malloc(body_len))) goto out;
      memcpy(st->data, body, body_len);
      st->data_len = body_len;
    }
  }
  nghttp2_data_provider provider = {.source.ptr = st, .read_callback = read_data};
  rc = nghttp2_submit_response(session, st->id, nv, n,
                               st->data || st->trailers ? &provider : NULL) == 0
           ? 0 : -1;
out:
  free(lower);
  free(buf);
  return rc;
}

static void flush(rsl_h2c *c);

static void on_delay(void *ud) {
  stream *st = ud;
  rsl_h2c *c = st->conn;
  if (submit_answer(st) < 0)
    nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, st->id,
                              NGHTTP2_INTERNAL_ERROR);
  flush(c);
}

/* Answers st at once, without the handler and without a body: HTTP
 * `status`, or for a gRPC call a Trailers-Only answer with grpc_code and
 * the (already percent-encoded) message. */
static void answer_at_once(rsl_h2c *c, stream *st, int status,
                           const char *grpc_code, const char *message) {
  char text[8];
  nghttp2_nv nv[4];
  size_t n = 0;
  if (grpc_code) {
    nv[n++] = make_nv(":status", 7, "200", 3);
    nv[n++] = make_nv("content-type", 12, "application/grpc", 16);
    nv[n++] = make_nv("grpc-status", 11, grpc_code, strlen(grpc_code));
    nv[n++] = make_nv("grpc-message", 12, message, strlen(message));
    status = 200;
  } else {
    snprintf(text, sizeof text, "%d", status);
    nv[n++] = make_nv(":status", 7, text, strlen(text));
  }
  if (nghttp2_submit_response(c->session, st->id, nv, n, NULL) == 0)
    rsl_server_count_status(c->srv, status);
}

/* A complete request: answer it without the handler (a bad one), or run
 * the handler and answer now or after its delay. */
static void dispatch(rsl_h2c *c, stream *st) {
  if (c->server_closed) return;
  if (!st->has_path || !st->method[0]) {
    nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, st->id,
                              NGHTTP2_PROTOCOL_ERROR);
    return;
  }
  size_t len;
  const char *ct = field_value(st, "content-type", &len);
  st->grpc = ct && len >= 16 && memcmp(ct, "application/grpc", 16) == 0;
  if (st->reject) { /* 413 or 431, as HTTP/1.1 answers them */
    answer_at_once(c, st, st->reject, st->grpc ? "8" : NULL,
                   st->reject == 413 ? "request%20too%20large"
                                     : "request%20header%20fields%20too%20large");
    return;
  }
  const char *path = st->text + st->path;
  const char *q = memchr(path, '?', st->path_len);
  rsl_server_header hs[RSL_HTTP_MAX_HEADERS];
  for (size_t i = 0; i < st->nfields; i++)
    hs[i] = (rsl_server_header){st->text + st->fields[i].name,
                                st->fields[i].name_len,
                                st->text + st->fields[i].value,
                                st->fields[i].value_len};
  rsl_server_request req = {
      .method = st->method,
      .path = path,
      .path_len = q ? (size_t)(q - path) : st->path_len,
      .query = q ? q + 1 : "",
      .query_len = q ? st->path_len - (size_t)(q - path) - 1 : 0,
      .headers = hs,
      .nheaders = st->nfields,
      .body = st->body ? st->body : "",
      .body_len = st->body_len,
  };
  if (st->grpc) {
    const unsigned char *b = (const unsigned char *)req.body;
    size_t msg_len = req.body_len >= 5 ? (size_t)b[1] << 24 |
                                             (size_t)b[2] << 16 |
                                             (size_t)b[3] << 8 | b[4]
                                       : 0;
    if (req.body_len < 5 || b[0] != 0 || msg_len != req.body_len - 5) {
      /* a gRPC server answers INTERNAL (or UNIMPLEMENTED: compressed) */
      answer_at_once(c, st, 200, req.body_len >= 5 && b[0] == 1 ? "12" : "13",
                     "bad%20message%20framing");
      return;
    }
    req.grpc = 1;
    req.body += 5;
    req.body_len -= 5;
    const char *t = field_value(st, "grpc-timeout", &len);
    st->grpc_timeout_ms = t ? parse_grpc_timeout(t, len) : -1;
  }
  int rc = rsl_server_handle(c->srv, &req, &st->res);
  if (rc == 1) {
    c->server_closed = 1;
    return;
  }
  if (rc < 0) {
    nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, st->id,
                              NGHTTP2_INTERNAL_ERROR);
    return;
  }
  rsl_server_answer a;
  rsl_server_response_view(st->res, &a);
  uint64_t delay_ms = a.action == RSL_SERVER_HANG ? UINT64_MAX : a.delay_ms;
  if (st->grpc && st->grpc_timeout_ms >= 0 &&
      (double)delay_ms > st->grpc_timeout_ms) {
    st->deadline_hit = 1; /* the client gives up then: say so, as gRPC does */
    delay_ms = (uint64_t)st->grpc_timeout_ms;
  }
  if (delay_ms == UINT64_MAX) return; /* hang */
  if (delay_ms == 0) {
    if (submit_answer(st) < 0)
      nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, st->id,
                                NGHTTP2_INTERNAL_ERROR);
    return;
  }
  if (rsl_timer_start(rsl_server_loop(c->srv), &st->timer,
                      delay_ms * NS_PER_MS) < 0)
    nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, st->id,
                              NGHTTP2_INTERNAL_ERROR);
}

/* --- nghttp2 callbacks ---------------------------------------------------- */

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame,
                            void *ud) {
  rsl_h2c *c = ud;
  if (frame->hd.type != NGHTTP2_HEADERS ||
      frame->headers.cat != NGHTTP2_HCAT_REQUEST)
    return 0;
  stream *st = calloc(1, sizeof *st);
  if (!st) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
  st->conn = c;
  st->id = frame->hd.stream_id;
  st->grpc_timeout_ms = -1;
  rsl_timer_init(&st->timer, on_delay, st);
  st->next = c->streams;
  if (st->next) st->next->prev = st;
  c->streams = st;
  nghttp2_session_set_stream_user_data(session, st->id, st);
  return 0;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame,
                     const uint8_t *name, size_t name_len,
                     const uint8_t *value, size_t value_len, uint8_t flags,
                     void *ud) {
  (void)flags;
  (void)ud;
  stream *st = nghttp2_session_get_stream_user_data(session,
                                                    frame->hd.stream_id);
  if (!st || frame->headers.cat != NGHTTP2_HCAT_REQUEST || st->reject)
    return 0; /* request trailers: not used */
  if (name_len == 7 && memcmp(name, ":method", 7) == 0) {
    if (value_len >= sizeof st->method) st->reject = 431;
    else memcpy(st->method, value, value_len);
    return 0;
  }
  if (name_len == 5 && memcmp(name, ":path", 5) == 0) {
    long at = text_add(st, value, value_len);
    if (at < 0) st->reject = 431;
    st->path = (size_t)(at < 0 ? 0 : at);
    st->path_len = value_len;
    st->has_path = at >= 0;
    return 0;
  }
  int authority = name_len == 10 && memcmp(name, ":authority", 10) == 0;
  if (name_len && name[0] == ':' && !authority) return 0;
  if (st->nfields == RSL_HTTP_MAX_HEADERS) {
    st->reject = 431;
    return 0;
  }
  /* :authority is what Host is in HTTP/1.1, and handlers read it so */
  long n_at = authority ? text_add(st, (const uint8_t *)"host", 4)
                        : text_add(st, name, name_len);
  long v_at = n_at < 0 ? -1 : text_add(st, value, value_len);
  if (v_at < 0) {
    st->reject = 431;
    return 0;
  }
  st->fields[st->nfields++] = (field){(size_t)n_at, authority ? 4 : name_len,
                                      (size_t)v_at, value_len};
  return 0;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t id,
                         const uint8_t *data, size_t len, void *ud) {
  (void)flags;
  (void)ud;
  stream *st = nghttp2_session_get_stream_user_data(session, id);
  if (!st || st->reject) return 0;
  const size_t cap = RSL_SERVER_MAX_BODY_BYTES + 5; /* + gRPC's prefix */
  if (len > cap - st->body_len) {
    st->reject = 413;
    return 0;
  }
  if (st->body_len + len > st->body_cap) {
    size_t want = st->body_cap ? st->body_cap * 2 : 1024;
    while (want < st->body_len + len) want *= 2;
    char *grown = realloc(st->body, want);
    if (!grown) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    st->body = grown;
    st->body_cap = want;
  }
  memcpy(st->body + st->body_len, data, len);
  st->body_len += len;
  return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                         void *ud) {
  rsl_h2c *c = ud;
  if ((frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) ||
      !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
    return 0;
  stream *st = nghttp2_session_get_stream_user_data(session,
                                                    frame->hd.stream_id);
  if (st && !st->res) dispatch(c, st);
  return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t id,
                           uint32_t error_code, void *ud) {
  (void)error_code;
  (void)ud;
  stream *st = nghttp2_session_get_stream_user_data(session, id);
  if (st) stream_free(st);
  return 0;
}

/* --- the connection ------------------------------------------------------- */

void rsl_h2c_close(rsl_h2c *c) {
  rsl_timer_stop(rsl_server_loop(c->srv), &c->idle);
  rsl_io_set(rsl_server_loop(c->srv), &c->io, 0);
  close(c->io.fd);
  while (c->streams) stream_free(c->streams);
  nghttp2_session_del(c->session);
  if (c->prev) c->prev->next = c->next;
  else *c->list = c->next;
  if (c->next) c->next->prev = c->prev;
  free(c->out);
  free(c);
}

/* Sends what nghttp2 has to send, as far as the socket takes it; closes
 * the connection when neither side has more to say. */
static void flush(rsl_h2c *c) {
  for (;;) {
    while (c->out_sent < c->out_len) {
      ssize_t n = send(c->io.fd, c->out + c->out_sent, c->out_len - c->out_sent,
                       MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        rsl_io_set(rsl_server_loop(c->srv), &c->io,
                   RSL_IO_READ | RSL_IO_WRITE);
        return;
      }
      if (n < 0) {
        rsl_h2c_close(c);
        return;
      }
      c->out_sent += (size_t)n;
    }
    c->out_len = c->out_sent = 0;
    const uint8_t *data;
    ssize_t n = nghttp2_session_mem_send(c->session, &data);
    if (n < 0) {
      rsl_h2c_close(c);
      return;
    }
    if (n == 0) break;
    char *grown = realloc(c->out, (size_t)n);
    if (!grown) {
      rsl_h2c_close(c);
      return;
    }
    c->out = grown;
    memcpy(c->out, data, (size_t)n);
    c->out_len = (size_t)n;
  }
  if (!nghttp2_session_want_read(c->session) &&
      !nghttp2_session_want_write(c->session)) {
    rsl_h2c_close(c);
    return;
  }
  rsl_io_set(rsl_server_loop(c->srv), &c->io, RSL_IO_READ);
}

/* Whether stream id is one nghttp2 has finished with. */
static int stream_closed(rsl_h2c *c, int32_t id) {
  if (id <= 0 || id > nghttp2_session_get_last_proc_stream_id(c->session))
    return 0;
  nghttp2_stream *st = nghttp2_session_find_stream(c->session, id);
  return !st || nghttp2_stream_get_state(st) == NGHTTP2_STREAM_STATE_CLOSED;
}

/* Copies data to out (room for n + 8 bytes: see feed) without the
 * RST_STREAM frames for streams already closed; returns the bytes left.
 * libcurl 7.88 resets every stream once
 * its answer is in, and Debian's libnghttp2 counts those resets against
 * its rapid-reset limit (CVE-2023-44487: 1000, then 33/s) and ends the
 * connection with GOAWAY after about a thousand calls; a peer MUST ignore
 * a reset of a closed stream anyway (RFC 9113, 5.1).  Resets of streams
 * still open go through, and are counted, as before. */
static size_t drop_late_resets(rsl_h2c *c, const uint8_t *data, size_t n,
                               uint8_t *out) {
  size_t i = 0, k = 0;
  while (i < n) {
    size_t take;
    if (c->preface_left) {
      take = n - i < c->preface_left ? n - i : c->preface_left;
      memcpy(out + k, data + i, take);
      k += take;
      c->preface_left -= take;
    } else if (c->payload_left) {
      take = n - i < c->payload_left ? n - i : c->payload_left;
      if (!c->dropping) memcpy(out + k, data + i, take), k += take;
      c->payload_left -= take;
    } else {
      take = n - i < 9 - c->head_have ? n - i : 9 - c->head_have;
      memcpy(c->frame_head + c->head_have, data + i, take);
      c->head_have += take;
      if (c->head_have == 9) {
        const uint8_t *h = c->frame_head;
        size_t len = (size_t)h[0] << 16 | (size_t)h[1] << 8 | h[2];
        int32_t id = (int32_t)(((uint32_t)h[5] << 24 | (uint32_t)h[6] << 16 |
                                (uint32_t)h[7] << 8 | h[8]) & 0x7fffffffu);
        c->dropping = h[3] == NGHTTP2_RST_STREAM && len == 4 &&
                      stream_closed(c, id);
        if (!c->dropping) memcpy(out + k, h, 9), k += 9;
        c->payload_left = len;
        c->head_have = 0;
      }
    }
    i += take;
  }
  return k;
}

/* Feeds n bytes to nghttp2; 0, or -1 after closing the connection (or
 * the whole server, when a handler closed it). */
static int feed(rsl_h2c *c, const char *data, size_t n) {
  /* + 9: a frame header split across reads goes out whole, with the up
   * to 8 bytes of it that came with the previous read. */
  uint8_t *kept = malloc(n + 9);
  if (!kept) {
    rsl_h2c_close(c);
    return -1;
  }
  n = drop_late_resets(c, (const uint8_t *)data, n, kept);
  ssize_t rc = nghttp2_session_mem_recv(c->session, kept, n);
  free(kept);
  if (c->server_closed) {
    rsl_server_free(c->srv); /* closes c with the rest */
    return -1;
  }
  if (rc < 0) {
    rsl_h2c_close(c);
    return -1;
  }
  return 0;
}

/* The idle timeout is due: a connection with a stream open or bytes to
 * send is not idle; an idle one says GOAWAY (no error), and flush closes
 * it once that is sent. */
static void on_idle(void *ud) {
  rsl_h2c *c = ud;
  rsl_loop *loop = rsl_server_loop(c->srv);
  uint64_t idle_ns = rsl_server_idle_timeout_ns(c->srv);
  uint64_t now = rsl_loop_now_ns(loop), due = c->last_input_ns + idle_ns;
  if (c->streams || c->out_sent < c->out_len || now < due) {
    rsl_timer_start(loop, &c->idle, now >= due ? idle_ns : due - now);
    return;
  }
  if (nghttp2_session_terminate_session(c->session, NGHTTP2_NO_ERROR) != 0) {
    rsl_h2c_close(c);
    return;
  }
  flush(c);
}

static void on_io(void *ud, int fd, unsigned events) {
  rsl_h2c *c = ud;
  if (events & (RSL_IO_READ | RSL_IO_ERROR)) {
    char chunk[READ_CHUNK_BYTES];
    ssize_t n = recv(fd, chunk, sizeof chunk, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
      n = -2;
    if (n == 0 || n == -1) {
      rsl_h2c_close(c);
      return;
    }
    if (n > 0) c->last_input_ns = rsl_loop_now_ns(rsl_server_loop(c->srv));
    if (n > 0 && feed(c, chunk, (size_t)n) < 0) return;
  }
  flush(c);
}

int rsl_h2c_start(rsl_server *s, int fd, const char *read, size_t n,
                  rsl_h2c **list) {
  rsl_h2c *c = calloc(1, sizeof *c);
  nghttp2_session_callbacks *cbs = NULL;
  if (!c || nghttp2_session_callbacks_new(&cbs) != 0) goto fail;
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
  int rc = nghttp2_session_server_new(&c->session, cbs, c);
  nghttp2_session_callbacks_del(cbs);
  if (rc != 0) goto fail;
  nghttp2_settings_entry settings[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS}};
  if (nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, settings, 1) != 0)
    goto fail;
  c->srv = s;
  c->preface_left = PREFACE_BYTES;
  c->list = list;
  c->next = *list;
  if (c->next) c->next->prev = c;
  *list = c;
  rsl_io_init(&c->io, fd, on_io, c);
  rsl_timer_init(&c->idle, on_idle, c);
  c->last_input_ns = rsl_loop_now_ns(rsl_server_loop(s));
  if (rsl_timer_start(rsl_server_loop(s), &c->idle,
                      rsl_server_idle_timeout_ns(s)) < 0) {
    rsl_h2c_close(c);
    return 0; /* fd closed with it */
  }
  if (feed(c, read, n) < 0) return 0; /* closed already */
  flush(c);
  return 0;
fail:
  if (c && c->session) nghttp2_session_del(c->session);
  free(c);
  return -1;
}
