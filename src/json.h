/*
 * json — a strict JSON scanner (RFC 8259) for untrusted text: batch input
 * lines, ledger lines, upstream bodies.  Plain C; it allocates nothing.
 *
 * Strict means: one value and nothing but whitespace around it; no NaN,
 * Infinity, comments or trailing commas; numbers that overflow a double
 * ("1e999") refused; strings of valid UTF-8 (no overlong forms, no
 * surrogates) without raw control characters, and \u escapes that pair
 * their surrogates; nesting up to a depth limit.
 *
 * The scan can hand back the raw text of chosen top-level fields of an
 * object (an id is compared by its JSON text, never through a double), and
 * can walk the value with a visitor (the Lua decoder builds tables from it).
 */
#ifndef RSL_JSON_H
#define RSL_JSON_H

#include <stddef.h>

typedef enum rsl_json_type {
  RSL_JSON_NULL,
  RSL_JSON_FALSE,
  RSL_JSON_TRUE,
  RSL_JSON_NUMBER,
  RSL_JSON_STRING,
  RSL_JSON_ARRAY,
  RSL_JSON_OBJECT,
} rsl_json_type;

/* A top-level field of an object to find: name (raw bytes between the
 * quotes of the key) in; out: found, and the value's raw text as
 * [start, start + len) of the scanned text. */
typedef struct rsl_json_field {
  const char *name;
  size_t name_len;
  int found;
  size_t start, len;
} rsl_json_field;

/* Called as the scan meets each part of the value; a non-zero return
 * stops the scan (rsl_json_scan then returns RSL_JSON_STOPPED).  Strings
 * and keys come unescaped (UTF-8), numbers and literals raw. */
typedef struct rsl_json_visitor {
  void *ud;
  int (*open)(void *ud, rsl_json_type container);
  int (*close)(void *ud, rsl_json_type container);
  int (*key)(void *ud, const char *s, size_t n);
  int (*scalar)(void *ud, rsl_json_type type, const char *s, size_t n);
} rsl_json_visitor;

enum { RSL_JSON_OK = 0, RSL_JSON_INVALID = -1, RSL_JSON_STOPPED = -2 };

typedef struct rsl_json_scan_args {
  int max_depth;          /* containers nested deeper are refused */
  rsl_json_field *fields; /* may be NULL */
  size_t field_count;
  const rsl_json_visitor *visitor; /* may be NULL: validate only */
  char *scratch; /* with a visitor: room for n bytes (unescaped strings) */
} rsl_json_scan_args;

/* Scans s[0, n).  Returns RSL_JSON_OK and the top-level type in *type,
 * RSL_JSON_INVALID with a message ("at byte N: ...") in err[0, err_cap),
 * or RSL_JSON_STOPPED when the visitor stopped it.  A field found twice at
 * the top level is invalid (which one would count is ambiguous). */
int rsl_json_scan(const char *s, size_t n, rsl_json_scan_args *args,
                  rsl_json_type *type, char *err, size_t err_cap);

/* Copies valid JSON s[0, n) to out without the whitespace outside
 * strings (out has room for n bytes); returns the length written. */
size_t rsl_json_minify(const char *s, size_t n, char *out);

/* Whether s[0, n) is valid UTF-8 (RFC 3629: no overlong forms, no
 * surrogates, nothing above U+10FFFF). */
int rsl_json_utf8_valid(const char *s, size_t n);

/* The JSON string literal (with quotes) for s[0, n) into out, which has
 * room for rsl_json_string_max(n) bytes; returns the length written.  The
 * one JSON string writer in C (core.json.quote, the event log): a byte
 * that is not part of well-formed UTF-8 becomes \u00XX, so the result is
 * always valid UTF-8 JSON. */
size_t rsl_json_string(const char *s, size_t n, char *out);
#define rsl_json_string_max(n) ((n)*6 + 2)

#endif
