/*
 * http/buf — capped byte buffers.  See buf.h.
 */
#include "buf.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int rsl_buf_add(rsl_buf *b, const void *data, size_t n, size_t limit) {
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

int rsl_buf_str(rsl_buf *b, const char *s, size_t limit) {
  return rsl_buf_add(b, s, strlen(s), limit);
}

void rsl_buf_consume(rsl_buf *b, size_t n) {
  memmove(b->data, b->data + n, b->len - n);
  b->len -= n;
}

void rsl_buf_free(rsl_buf *b) {
  free(b->data);
  *b = (rsl_buf){0};
}
