/*
 * redact — what must never reach a log, a result or a report: secrets in
 * URLs.  One function masks them everywhere (the event log, error
 * messages, and through resilua.core the Lua side's reports): in
 * "https://user:pass@host/p?api_key=SECRET&x=1#token=T" the userinfo
 * "user:pass" and the values SECRET and T each become RSL_REDACT_MASK.
 *
 * A query (or fragment) parameter is secret when its name, percent-decoded
 * and compared case-insensitively, is one of RSL_REDACT_DEFAULT_NAMES or a
 * name added with rsl_redact_add (`--redact NAME`).  (No event carries
 * headers; the list holds the usual secret header names too, for when a
 * header's name is used as a parameter's.)
 * Uses: nothing.  The added names are process-wide.
 */
#ifndef RSL_REDACT_H
#define RSL_REDACT_H

#include <stddef.h>

#define RSL_REDACT_MASK "***"
#define RSL_REDACT_NAME_MAX 64 /* longer names are never secret */
#define RSL_REDACT_MAX_NAMES 256

/* Adds a query parameter's name to mask.  0; -1 when the name
 * is empty, longer than RSL_REDACT_NAME_MAX or the list is full; -2 on
 * ENOMEM.  A name already known is not added twice. */
int rsl_redact_add(const char *name);

/* url with its user:password and secret parameters' values masked.  The
 * caller frees it; NULL on ENOMEM. */
char *rsl_redact_url(const char *url);

#endif
