/*
 * grpc — the gRPC wire protocol over HTTP/2 (grpc/grpc's
 * doc/PROTOCOL-HTTP2.md), for unary calls: the 5-byte message prefix, the
 * grpc-timeout header, the status codes and their names, grpc-status and
 * grpc-message from trailers (or a Trailers-Only response), the HTTP to
 * gRPC status mapping of doc/http-grpc-status-mapping.md, and metadata
 * lines (binary "-bin" values in base64).
 * Uses: transport (types only).  Plain C: never includes lua.h.
 */
#ifndef RSL_GRPC_H
#define RSL_GRPC_H

#include <stddef.h>

#include "../transport.h"

enum {
  RSL_GRPC_OK = 0,
  RSL_GRPC_CANCELLED = 1,
  RSL_GRPC_UNKNOWN = 2,
  RSL_GRPC_INVALID_ARGUMENT = 3,
  RSL_GRPC_DEADLINE_EXCEEDED = 4,
  RSL_GRPC_NOT_FOUND = 5,
  RSL_GRPC_ALREADY_EXISTS = 6,
  RSL_GRPC_PERMISSION_DENIED = 7,
  RSL_GRPC_RESOURCE_EXHAUSTED = 8,
  RSL_GRPC_FAILED_PRECONDITION = 9,
  RSL_GRPC_ABORTED = 10,
  RSL_GRPC_OUT_OF_RANGE = 11,
  RSL_GRPC_UNIMPLEMENTED = 12,
  RSL_GRPC_INTERNAL = 13,
  RSL_GRPC_UNAVAILABLE = 14,
  RSL_GRPC_DATA_LOSS = 15,
  RSL_GRPC_UNAUTHENTICATED = 16,
  RSL_GRPC_CODE_COUNT
};

/* The largest message we frame or accept: the 4-byte prefix's range is
 * bounded again by the response size limit. */
#define RSL_GRPC_PREFIX_BYTES 5
/* Room for "grpc-timeout: " + 8 digits + unit. */
#define RSL_GRPC_TIMEOUT_LINE_MAX 32

/* "UNAVAILABLE" for 14; NULL outside 0..16. */
const char *rsl_grpc_code_name(int code);

/* The code called `name` ("UNAVAILABLE"): 0 with *out set, or -1. */
int rsl_grpc_code_parse(const char *name, int *out);

/* A method path "pkg.Service/Method" (one '/', no leading '/', visible
 * ASCII): 1 if good. */
int rsl_grpc_method_ok(const char *method);

/* The request URL: base without its trailing '/' + "/" + method.
 * malloc'd (the caller frees it), or NULL when out of memory. */
char *rsl_grpc_url(const char *base, const char *method);

/* The framed message: flag 0 (uncompressed), 4-byte big-endian length,
 * the bytes.  malloc'd into *out; 0, or -1 (out of memory, or a message
 * over 4 GiB). */
int rsl_grpc_frame(const char *msg, size_t len, char **out, size_t *out_len);

/* "grpc-timeout: <ms>m" for an attempt that may take timeout_ms (>= 1,
 * rounded up, at most 8 digits as the spec wants). */
void rsl_grpc_timeout_line(double timeout_ms, char *out, size_t size);

/* A metadata entry as a header line "key: value", malloc'd; a key ending
 * in "-bin" gets its value base64-encoded (the spec's binary headers).
 * NULL with *err (static) on a key that is not a lower-case header name,
 * a reserved one ("grpc-" or ':' prefixed), or a non-binary value with
 * bytes a header cannot carry; NULL with *err "out of memory". */
char *rsl_grpc_metadata_line(const char *key, const char *value,
                             size_t value_len, const char **err);

/* Reads a unary gRPC answer into res: res->grpc = 1, grpc_status and
 * grpc_message (percent-decoded) from grpc-status/grpc-message (trailers
 * or Trailers-Only headers), or the HTTP status mapped when it has none,
 * or the error class mapped when there was no response (timeout:
 * DEADLINE_EXCEEDED; connect, dns, tls, reset: UNAVAILABLE; too_large:
 * RESOURCE_EXHAUSTED; protocol: INTERNAL).  On OK, the body becomes the
 * one message, unframed; a body that is not exactly one well-formed
 * uncompressed message turns the status into INTERNAL.  Out of memory,
 * grpc_message stays NULL. */
void rsl_grpc_read_response(rsl_response *res);

/* Whether a gRPC status says the server side is unhealthy (what breakers
 * and budgets count): UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
 * INTERNAL, UNAVAILABLE, DATA_LOSS. */
int rsl_grpc_is_dependency_failure(int code);

#endif
