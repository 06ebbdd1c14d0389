/*
 * redact — secrets masked in URLs.  See redact.h.
 */
#include "redact.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Parameters that carry credentials in the wild: API keys, OAuth tokens,
 * signed-URL signatures (AWS, GCS), passwords. */
static const char *const DEFAULT_NAMES[] = {
    "api_key", "apikey", "api-key", "x-api-key", "key",
    "token", "access_token", "refresh_token", "id_token",
    "secret", "client_secret", "password", "passwd",
    "sig", "signature", "x-amz-signature", "x-goog-signature",
    "x-amz-credential", "x-goog-credential", "x-amz-security-token",
    "auth", "authorization", "proxy-authorization", "cookie", "set-cookie",
};

static char *added[RSL_REDACT_MAX_NAMES];
static size_t added_count;

static int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* name[0..len) percent-decoded ('+' is a space in a query) into out
 * (RSL_REDACT_NAME_MAX + 1 bytes); its length, or -1 when too long. */
static int decode_name(const char *name, size_t len, char *out) {
  size_t n = 0;
  for (size_t i = 0; i < len; i++) {
    char c = name[i];
    if (c == '%' && i + 2 < len &&
        hex_value(name[i + 1]) >= 0 && hex_value(name[i + 2]) >= 0) {
      c = (char)(hex_value(name[i + 1]) * 16 + hex_value(name[i + 2]));
      i += 2;
    } else if (c == '+') {
      c = ' ';
    }
    if (n == RSL_REDACT_NAME_MAX) return -1;
    out[n++] = c;
  }
  out[n] = '\0';
  return (int)n;
}

/* Whether name[0..len) (percent-encoding allowed) is a secret's name. */
static int is_secret(const char *name, size_t len) {
  char plain[RSL_REDACT_NAME_MAX + 1];
  if (decode_name(name, len, plain) <= 0) return 0;
  for (size_t i = 0; i < sizeof DEFAULT_NAMES / sizeof *DEFAULT_NAMES; i++)
    if (strcasecmp(plain, DEFAULT_NAMES[i]) == 0) return 1;
  for (size_t i = 0; i < added_count; i++)
    if (strcasecmp(plain, added[i]) == 0) return 1;
  return 0;
}

int rsl_redact_add(const char *name) {
  size_t len = strlen(name);
  if (len == 0 || len > RSL_REDACT_NAME_MAX) return -1;
  if (is_secret(name, len)) return 0;
  if (added_count == RSL_REDACT_MAX_NAMES) return -1;
  char *copy = strdup(name);
  if (!copy) return -2;
  added[added_count++] = copy;
  return 0;
}

/* Appends [s, s+n) to out at *len. */
static void put(char *out, size_t *len, const char *s, size_t n) {
  memcpy(out + *len, s, n);
  *len += n;
}

/* Copies the parameters of [p, end) ('&' or ';' between them) to out,
 * the values of secret ones masked. */
static void put_params(char *out, size_t *len, const char *p,
                       const char *end) {
  while (p < end) {
    const char *stop = p;
    while (stop < end && *stop != '&' && *stop != ';') stop++;
    const char *eq = memchr(p, '=', (size_t)(stop - p));
    if (eq && eq + 1 < stop && is_secret(p, (size_t)(eq - p))) {
      put(out, len, p, (size_t)(eq + 1 - p));
      put(out, len, RSL_REDACT_MASK, strlen(RSL_REDACT_MASK));
    } else {
      put(out, len, p, (size_t)(stop - p));
    }
    if (stop < end) put(out, len, stop, 1);
    p = stop + 1;
  }
}

char *rsl_redact_url(const char *url) {
  size_t n = strlen(url);
  /* A mask is 3 bytes and replaces at least 1 (a value, a userinfo) that
   * comes with at least 2 more ("k=", ":@"): never more than twice. */
  char *out = malloc(2 * n + 8);
  if (!out) return NULL;
  size_t len = 0;
  const char *p = url, *end = url + n;
  const char *auth = strstr(url, "://");
  if (auth) {
    auth += 3;
    size_t span = strcspn(auth, "/?#");
    const char *at = NULL;
    for (const char *q = auth; q < auth + span; q++)
      if (*q == '@') at = q; /* the last '@' ends the userinfo */
    put(out, &len, url, (size_t)(auth - url));
    if (at) {
      put(out, &len, RSL_REDACT_MASK, strlen(RSL_REDACT_MASK));
      p = at;
    } else {
      p = auth;
    }
  }
  const char *query = strpbrk(p, "?#");
  if (!query) query = end;
  put(out, &len, p, (size_t)(query - p));
  while (query < end) { /* '?' query, then '#' fragment */
    put(out, &len, query, 1);
    const char *next = query[0] == '?' ? strchr(query + 1, '#') : NULL;
    if (!next) next = end;
    put_params(out, &len, query + 1, next);
    query = next;
  }
  out[len] = '\0';
  return out;
}
