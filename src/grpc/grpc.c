/*
 * grpc — the gRPC wire protocol for unary calls.  See grpc.h.
 */
#include "grpc.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const CODE_NAMES[RSL_GRPC_CODE_COUNT] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

/* A grpc-message longer than this is cut (it is for humans). */
#define MAX_MESSAGE_BYTES 4096

const char *rsl_grpc_code_name(int code) {
  return code >= 0 && code < RSL_GRPC_CODE_COUNT ? CODE_NAMES[code] : NULL;
}

int rsl_grpc_code_parse(const char *name, int *out) {
  for (int i = 0; i < RSL_GRPC_CODE_COUNT; i++) {
    if (strcmp(name, CODE_NAMES[i]) == 0) {
      *out = i;
      return 0;
    }
  }
  return -1;
}

int rsl_grpc_method_ok(const char *method) {
  const char *slash = strchr(method, '/');
  if (!slash || slash == method || !slash[1] || strchr(slash + 1, '/'))
    return 0;
  if (strlen(method) > 1024) return 0;
  for (const unsigned char *p = (const unsigned char *)method; *p; p++)
    if (*p <= ' ' || *p >= 0x7f || *p == '?' || *p == '#' || *p == '%')
      return 0;
  return 1;
}

char *rsl_grpc_url(const char *base, const char *method) {
  size_t n = strlen(base);
  while (n > 0 && base[n - 1] == '/') n--;
  size_t size = n + 1 + strlen(method) + 1;
  char *url = malloc(size);
  if (url) snprintf(url, size, "%.*s/%s", (int)n, base, method);
  return url;
}

int rsl_grpc_frame(const char *msg, size_t len, char **out, size_t *out_len) {
  if (len > UINT32_MAX) return -1;
  char *framed = malloc(RSL_GRPC_PREFIX_BYTES + len + 1);
  if (!framed) return -1;
  framed[0] = 0; /* not compressed */
  framed[1] = (char)(len >> 24 & 0xff);
  framed[2] = (char)(len >> 16 & 0xff);
  framed[3] = (char)(len >> 8 & 0xff);
  framed[4] = (char)(len & 0xff);
  if (len) memcpy(framed + RSL_GRPC_PREFIX_BYTES, msg, len);
  framed[RSL_GRPC_PREFIX_BYTES + len] = '\0';
  *out = framed;
  *out_len = RSL_GRPC_PREFIX_BYTES + len;
  return 0;
}

void rsl_grpc_timeout_line(double timeout_ms, char *out, size_t size) {
  /* TimeoutValue is at most 8 digits: 99999999 ms is 27 h, more than any
   * policy allows (a day); seconds beyond that, to be safe. */
  double ms = ceil(timeout_ms < 1 ? 1 : timeout_ms);
  if (ms <= 99999999.0)
    snprintf(out, size, "grpc-timeout: %.0fm", ms);
  else
    snprintf(out, size, "grpc-timeout: %.0fS",
             fmin(ceil(ms / 1000.0), 99999999.0));
}

static int is_header_name_char(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '_' || c == '.';
}

static char *base64(const unsigned char *in, size_t n) {
  static const char ALPHABET[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  char *out = malloc((n + 2) / 3 * 4 + 1);
  if (!out) return NULL;
  char *o = out;
  size_t i = 0;
  for (; i + 2 < n; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
    *o++ = ALPHABET[v >> 18 & 63];
    *o++ = ALPHABET[v >> 12 & 63];
    *o++ = ALPHABET[v >> 6 & 63];
    *o++ = ALPHABET[v & 63];
  }
  if (i < n) {
    uint32_t v = (uint32_t)in[i] << 16;
    if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
    *o++ = ALPHABET[v >> 18 & 63];
    *o++ = ALPHABET[v >> 12 & 63];
    *o++ = i + 1 < n ? ALPHABET[v >> 6 & 63] : '=';
    *o++ = '=';
  }
  *o = '\0';
  return out;
}

char *rsl_grpc_metadata_line(const char *key, const char *value,
                             size_t value_len, const char **err) {
  size_t key_len = strlen(key);
  if (key_len == 0 || key_len > 256) {
    *err = "metadata keys must be 1 to 256 characters";
    return NULL;
  }
  for (size_t i = 0; i < key_len; i++) {
    if (!is_header_name_char((unsigned char)key[i])) {
      *err = "metadata keys must be lower-case header names "
             "(a-z 0-9 - _ .)";
      return NULL;
    }
  }
  if (strncmp(key, "grpc-", 5) == 0) {
    *err = "metadata keys starting with grpc- are reserved";
    return NULL;
  }
  int binary = key_len > 4 && strcmp(key + key_len - 4, "-bin") == 0;
  char *encoded = NULL;
  if (binary) {
    encoded = base64((const unsigned char *)value, value_len);
    if (!encoded) goto oom;
    value = encoded;
    value_len = strlen(encoded);
  } else {
    for (size_t i = 0; i < value_len; i++) {
      unsigned char c = (unsigned char)value[i];
      if (c < 0x20 || c > 0x7e) {
        *err = "metadata values must be printable ASCII (use a -bin key "
               "for bytes)";
        return NULL;
      }
    }
  }
  size_t size = key_len + 2 + value_len + 1;
  char *line = malloc(size);
  if (!line) goto oom;
  snprintf(line, size, "%s: %.*s", key, (int)value_len, value);
  free(encoded);
  return line;
oom:
  free(encoded);
  *err = "out of memory";
  return NULL;
}

/* doc/http-grpc-status-mapping.md: the code for an HTTP status when the
 * response carries no grpc-status. */
static int code_of_http(long status) {
  switch (status) {
  case 400: return RSL_GRPC_INTERNAL;
  case 401: return RSL_GRPC_UNAUTHENTICATED;
  case 403: return RSL_GRPC_PERMISSION_DENIED;
  case 404: return RSL_GRPC_UNIMPLEMENTED;
  case 429:
  case 502:
  case 503:
  case 504: return RSL_GRPC_UNAVAILABLE;
  default: return RSL_GRPC_UNKNOWN;
  }
}

/* What a gRPC client reports when the attempt got no response. */
static int code_of_error(rsl_error_class e) {
  switch (e) {
  case RSL_ERR_TIMEOUT: return RSL_GRPC_DEADLINE_EXCEEDED;
  case RSL_ERR_TOO_LARGE: return RSL_GRPC_RESOURCE_EXHAUSTED;
  case RSL_ERR_PROTOCOL: return RSL_GRPC_INTERNAL;
  default: return RSL_GRPC_UNAVAILABLE;
  }
}

static int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* grpc-message is percent-encoded; a malformed escape is kept as is (the
 * spec: decode what can be decoded, never fail the call for it). */
static char *percent_decode(const char *in) {
  size_t n = strlen(in);
  if (n > MAX_MESSAGE_BYTES) n = MAX_MESSAGE_BYTES;
  char *out = malloc(n + 1), *o = out;
  if (!out) return NULL;
  for (size_t i = 0; i < n; i++) {
    int hi, lo;
    if (in[i] == '%' && i + 2 < n && (hi = hex_value(in[i + 1])) >= 0 &&
        (lo = hex_value(in[i + 2])) >= 0) {
      *o++ = (char)(hi << 4 | lo);
      i += 2;
    } else {
      *o++ = in[i];
    }
  }
  *o = '\0';
  return out;
}

/* A grpc-status value: 1 to 10 ASCII digits.  -1 when malformed. */
static long parse_status(const char *s) {
  size_t n = strspn(s, "0123456789");
  if (n == 0 || n > 10 || s[n]) return -1;
  return strtol(s, NULL, 10);
}

/* Sets res's status to `code`, with an explanation (copied) or none. */
static void set_status(rsl_response *res, int code, const char *why) {
  free(res->grpc_message);
  res->grpc_status = code;
  res->grpc_message = why ? strdup(why) : NULL;
}

/* On OK: the body must be exactly one uncompressed message; it is
 * replaced by the message's bytes.  NULL, or what is wrong with it. */
static const char *unframe(rsl_response *res) {
  const unsigned char *b = (const unsigned char *)res->body;
  if (res->body_len == 0) return "no response message for a unary call";
  if (res->body_len < RSL_GRPC_PREFIX_BYTES)
    return "truncated gRPC message prefix";
  if (b[0] == 1) return "compressed gRPC message, none was accepted";
  if (b[0] != 0) return "bad gRPC message flag";
  size_t len = (size_t)b[1] << 24 | (size_t)b[2] << 16 | (size_t)b[3] << 8 |
               (size_t)b[4];
  if (len > res->body_len - RSL_GRPC_PREFIX_BYTES)
    return "truncated gRPC message";
  if (len < res->body_len - RSL_GRPC_PREFIX_BYTES)
    return "more than one response message for a unary call";
  memmove(res->body, res->body + RSL_GRPC_PREFIX_BYTES, len);
  res->body_len = len;
  res->body[len] = '\0';
  return NULL;
}

void rsl_grpc_read_response(rsl_response *res) {
  res->grpc = 1;
  const char *status = res->status ? rsl_response_header(res, "grpc-status")
                                   : NULL;
  long code = status ? parse_status(status) : -1;
  if (!res->status) {
    set_status(res, code_of_error(res->error), res->message);
  } else if (!status) {
    /* No grpc-status: the HTTP status speaks for the call (a proxy or a
     * server that is not gRPC answered).  200 without one is UNKNOWN. */
    if (res->status == 200)
      set_status(res, RSL_GRPC_UNKNOWN, "no grpc-status in the response");
    else
      set_status(res, code_of_http(res->status), NULL);
  } else if (code < 0 || code >= RSL_GRPC_CODE_COUNT) {
    /* A status outside the known codes is UNKNOWN, as grpc-core does. */
    set_status(res, RSL_GRPC_UNKNOWN, "unknown grpc-status");
  } else {
    res->grpc_status = (int)code;
    const char *message = rsl_response_header(res, "grpc-message");
    if (message) res->grpc_message = percent_decode(message);
    const char *bad = code == RSL_GRPC_OK ? unframe(res) : NULL;
    if (bad) set_status(res, RSL_GRPC_INTERNAL, bad);
  }
}

int rsl_grpc_is_dependency_failure(int code) {
  return code == RSL_GRPC_UNKNOWN || code == RSL_GRPC_DEADLINE_EXCEEDED ||
         code == RSL_GRPC_RESOURCE_EXHAUSTED || code == RSL_GRPC_INTERNAL ||
         code == RSL_GRPC_UNAVAILABLE || code == RSL_GRPC_DATA_LOSS;
}
