/*
 * http/head — the response head check of the proxy's engines.  See head.h.
 */
#include "head.h"

#include <string.h>
#include <strings.h>

#define MAX_LENGTH_DIGITS 18 /* below 2^63: no overflow where it is read */

/* RFC 9110 section 5.6.2: tchar. */
static int is_tchar(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
         (c >= 'A' && c <= 'Z') || (c && strchr("!#$%&'*+-.^_`|~", c));
}

static int is_token(const char *s) {
  if (!*s) return 0;
  for (; *s; s++)
    if (!is_tchar((unsigned char)*s)) return 0;
  return 1;
}

static int is_length(const char *s) {
  size_t n = strspn(s, "0123456789");
  return n > 0 && n <= MAX_LENGTH_DIGITS && !s[n];
}

const char *rsl_head_check(long status, const rsl_header *fields, size_t n) {
  int lengths = 0, codings = 0;
  if (status == 101) return "upstream switched protocols (101)";
  for (size_t i = 0; i < n; i++) {
    const char *name = fields[i].name, *value = fields[i].value;
    /* a C string: a NUL ends it, and both engines refuse one before */
    if (!is_token(name))
      return "malformed response: a field name that is not a token";
    if (strpbrk(value, "\r\n"))
      return "malformed response: CR or LF in a field value";
    if (strcasecmp(name, "content-length") == 0) {
      if (!is_length(value) || lengths++)
        return "malformed response: a bad or second Content-Length";
    } else if (strcasecmp(name, "transfer-encoding") == 0) {
      if (strcasecmp(value, "chunked") != 0 || codings++)
        return "malformed response: a transfer coding other than chunked";
    }
  }
  if (lengths && codings)
    return "malformed response: both Content-Length and Transfer-Encoding";
  return NULL;
}
