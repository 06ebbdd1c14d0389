/*
 * http/head — whether an upstream's response head may be passed on to a
 * client: the one check both of the proxy's engines (src/http/client.c
 * and libcurl in src/transport.c) run on a final head before it counts,
 * so that a head that would split the client's response, or frame its
 * body in a way the proxy does not, is a `protocol` error (502, and an
 * attempt the policy may retry) whichever engine read it.
 *
 * Provides: rsl_head_check.  Uses: transport.h (rsl_header), libc.
 * No lua.h.
 */
#ifndef RSL_HTTP_HEAD_H
#define RSL_HTTP_HEAD_H

#include <stddef.h>

#include "../transport.h"

/* NULL when a final head (status, fields as the engine unfolded and
 * trimmed them) may be passed on, else why not (static text):
 * - 101: the proxy does not switch protocols (RFC 9110 section 15.2.2);
 * - a field name that is not a token, a value with CR, LF or NUL (RFC
 *   9110 section 5.5: "invalid and dangerous");
 * - a Content-Length that is not one run of digits, or two of them
 *   (RFC 9112 section 6.3: a proxy answers 502);
 * - a Transfer-Encoding other than one "chunked" (a coding the proxy
 *   would strip without decoding), or with a Content-Length. */
const char *rsl_head_check(long status, const rsl_header *fields, size_t n);

#endif
