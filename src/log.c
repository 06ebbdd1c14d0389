/*
 * log — JSON-lines events.  See log.h.
 */
#include "log.h"

#include "json.h" /* rsl_json_string: one JSON string writer */
#include "redact.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct rsl_log {
  int fd;       /* -1 when disabled */
  int owns_fd;
  int memory;   /* lines are kept in buf instead (rsl_log_open_memory) */
  char *buf;
  size_t len, cap;
};

int rsl_log_open_memory(rsl_log **out) {
  rsl_log *log = calloc(1, sizeof *log);
  if (!log) return -ENOMEM;
  log->fd = -1;
  log->memory = 1;
  *out = log;
  return 0;
}

const char *rsl_log_memory(const rsl_log *log, size_t *len) {
  *len = log && log->memory ? log->len : 0;
  return log && log->buf ? log->buf : "";
}

int rsl_log_open(rsl_log **out, const char *path) {
  rsl_log *log = calloc(1, sizeof *log);
  if (!log) return -ENOMEM;
  log->fd = -1;
  if (path && strcmp(path, "-") == 0) {
    log->fd = STDERR_FILENO;
  } else if (path) {
    log->fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log->fd < 0) {
      int err = -errno;
      free(log);
      return err;
    }
    log->owns_fd = 1;
  }
  *out = log;
  return 0;
}

void rsl_log_free(rsl_log *log) {
  if (!log) return;
  if (log->owns_fd) close(log->fd);
  free(log->buf);
  free(log);
}

int rsl_log_enabled(const rsl_log *log) {
  return log && (log->fd >= 0 || log->memory);
}

/* Keeps a line in a memory log; a line that does not fit is dropped whole,
 * as an unwritable log drops it. */
static void keep_line(rsl_log *log, const char *line, size_t n) {
  if (log->len + n > log->cap) {
    size_t cap = log->cap ? log->cap : 4096;
    while (cap < log->len + n) cap *= 2;
    char *buf = realloc(log->buf, cap);
    if (!buf) return;
    log->buf = buf;
    log->cap = cap;
  }
  memcpy(log->buf + log->len, line, n);
  log->len += n;
}

/* Room for n more bytes (and the final newline) at the end of e's buffer,
 * or NULL once the event has failed (out of memory): it is then dropped. */
static char *reserve(rsl_event *e, size_t n) {
  if (e->failed) return NULL;
  if (e->len + n + 1 > e->cap) {
    size_t cap = e->cap ? e->cap : 256;
    while (cap < e->len + n + 1) cap *= 2;
    char *buf = realloc(e->buf, cap);
    if (!buf) {
      e->failed = 1;
      return NULL;
    }
    e->buf = buf;
    e->cap = cap;
  }
  return e->buf + e->len;
}

static void append(rsl_event *e, const char *s, size_t n) {
  char *at = reserve(e, n);
  if (!at) return;
  memcpy(at, s, n);
  e->len += n;
}

/* s as a JSON string literal, by json.c's one writer. */
static void quote(rsl_event *e, const char *s, size_t n) {
  if (n > (SIZE_MAX - 2) / 6 - 1) {
    e->failed = 1;
    return;
  }
  char *at = reserve(e, rsl_json_string_max(n));
  if (at) e->len += rsl_json_string(s, n, at);
}

size_t rsl_utf8_sequence(const unsigned char *s, size_t n) {
  unsigned char c = s[0];
  size_t len;
  unsigned lo = 0x80, hi = 0xbf; /* the second byte's range */
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) len = 2;
  else if (c >= 0xe0 && c <= 0xef) {
    len = 3;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    len = 4;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  if (n < len || s[1] < lo || s[1] > hi) return 0;
  for (size_t i = 2; i < len; i++)
    if (s[i] < 0x80 || s[i] > 0xbf) return 0;
  return len;
}

static void key(rsl_event *e, const char *k) {
  append(e, ",", 1);
  quote(e, k, strlen(k));
  append(e, ":", 1);
}

void rsl_event_begin(rsl_event *e, const char *name) {
  memset(e, 0, sizeof *e);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  char stamp[48];
  int n = snprintf(stamp, sizeof stamp,
                   "{\"ts\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\"",
                   tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                   tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
  append(e, stamp, (size_t)n);
  rsl_event_str(e, "event", name);
}

void rsl_event_str(rsl_event *e, const char *k, const char *value) {
  key(e, k);
  quote(e, value, strlen(value));
}

void rsl_event_url(rsl_event *e, const char *k, const char *url) {
  char *masked = rsl_redact_url(url);
  if (!masked) {
    e->failed = 1;
    return;
  }
  rsl_event_str(e, k, masked);
  free(masked);
}

void rsl_event_num(rsl_event *e, const char *k, double value) {
  char num[32];
  key(e, k);
  if (!isfinite(value)) {
    append(e, "null", 4);
    return;
  }
  /* Milliseconds are worth three decimals, not seventeen. */
  int n = value == (double)(long long)value && fabs(value) < 1e15
              ? snprintf(num, sizeof num, "%lld", (long long)value)
              : snprintf(num, sizeof num, "%.3f", value);
  append(e, num, (size_t)n);
}

void rsl_event_int(rsl_event *e, const char *k, long long value) {
  char num[24];
  key(e, k);
  append(e, num, (size_t)snprintf(num, sizeof num, "%lld", value));
}

void rsl_event_bool(rsl_event *e, const char *k, int value) {
  key(e, k);
  append(e, value ? "true" : "false", value ? 4 : 5);
}

void rsl_event_null(rsl_event *e, const char *k) {
  key(e, k);
  append(e, "null", 4);
}

void rsl_event_emit(rsl_event *e, rsl_log *log) {
  append(e, "}\n", 2);
  if (!e->failed && rsl_log_enabled(log) && log->memory) {
    keep_line(log, e->buf, e->len);
  } else if (!e->failed && rsl_log_enabled(log)) {
    size_t off = 0;
    while (off < e->len) {
      ssize_t n = write(log->fd, e->buf + off, e->len - off);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break; /* a log that cannot be written must not stop calls */
      off += (size_t)n;
    }
  }
  free(e->buf);
  memset(e, 0, sizeof *e);
}
