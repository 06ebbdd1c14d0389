/*
 * http/buf — a growable byte buffer with a hard cap given at each append,
 * for the HTTP layer and `resilua serve` (requests in, answers out).
 *
 * Provides: rsl_buf_* (this file).  Uses: libc.  No lua.h.
 * Ownership: the buffer owns data; rsl_buf_free releases it.
 */
#ifndef RSL_HTTP_BUF_H
#define RSL_HTTP_BUF_H

#include <stddef.h>

typedef struct rsl_buf {
  char *data;
  size_t len, cap;
} rsl_buf;

/* Appends n bytes unless len would pass limit.  0, -E2BIG or -ENOMEM (the
 * buffer unchanged). */
int rsl_buf_add(rsl_buf *b, const void *data, size_t n, size_t limit);
int rsl_buf_str(rsl_buf *b, const char *s, size_t limit);
/* Drops the first n bytes (n <= len). */
void rsl_buf_consume(rsl_buf *b, size_t n);
void rsl_buf_free(rsl_buf *b);

#endif
