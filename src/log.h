/*
 * log — the JSON-lines event log (contract 3).  A line is built in memory
 * and written with one write(2) on an O_APPEND descriptor, so concurrent
 * writers never interleave and nothing is left in a user-space buffer.
 * Strings are written as JSON text must be: valid UTF-8, any byte that is
 * not (binary in a body, Latin-1 in a reason) escaped as \u00XX.
 * Uses: redact.
 */
#ifndef RSL_LOG_H
#define RSL_LOG_H

#include <stddef.h>

typedef struct rsl_log rsl_log;

/* path: a file (appended to), "-" for stderr, NULL for no log at all.
 * *out is owned by the caller (rsl_log_free).  0 or -errno. */
int rsl_log_open(rsl_log **out, const char *path);
void rsl_log_free(rsl_log *log);
/* A log that keeps its lines in memory (for the test kit's plays). */
int rsl_log_open_memory(rsl_log **out);
/* A memory log's lines so far (*len bytes, not NUL-terminated). */
const char *rsl_log_memory(const rsl_log *log, size_t *len);
int rsl_log_enabled(const rsl_log *log);

/* One event being built.  Fields are appended in order; on out-of-memory
 * the line is dropped at emit, never half-written. */
typedef struct rsl_event {
  char *buf;
  size_t len, cap;
  int failed;
} rsl_event;

/* Starts {"ts": now (RFC 3339, ms, UTC), "event": name. */
void rsl_event_begin(rsl_event *e, const char *name);
void rsl_event_str(rsl_event *e, const char *key, const char *value);
/* Like rsl_event_str, with the URL's secrets masked (rsl_redact_url). */
void rsl_event_url(rsl_event *e, const char *key, const char *url);
void rsl_event_num(rsl_event *e, const char *key, double value);
void rsl_event_int(rsl_event *e, const char *key, long long value);
void rsl_event_bool(rsl_event *e, const char *key, int value);
void rsl_event_null(rsl_event *e, const char *key);
/* Closes the object, writes the line (when the log is enabled) and frees
 * the buffer. */
void rsl_event_emit(rsl_event *e, rsl_log *log);

/* The length of the well-formed UTF-8 sequence that starts s[0..n) (n >
 * 0; 1 for ASCII), or 0 when none does (RFC 3629: no overlong forms, no
 * surrogates, nothing past U+10FFFF). */
size_t rsl_utf8_sequence(const unsigned char *s, size_t n);

#endif
