/*
 * json — the strict JSON scanner (see json.h): recursive descent over the
 * bytes, with a depth limit, and checks on what lenient parsers let
 * through (NaN, 1e999, broken UTF-8, lone surrogates).  Uses only libc.
 */
#include "json.h"
#include "log.h" /* rsl_utf8_sequence: one UTF-8 check for all our JSON */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Numbers longer than this are normalised to their leading significant
 * digits and a decimal exponent before the range check. */
#define NUMBER_COPY_MAX 64
#define NUMBER_SIG_DIGITS 40

typedef struct scanner {
  const char *s;
  size_t n, pos;
  int depth;
  rsl_json_scan_args *args;
  const char *error; /* a static message once invalid */
  size_t error_pos;
  int stopped; /* the visitor said stop */
} scanner;

static int fail(scanner *sc, const char *msg) {
  if (!sc->error) {
    sc->error = msg;
    sc->error_pos = sc->pos;
  }
  return -1;
}

static int stop(scanner *sc) {
  sc->stopped = 1;
  return -1;
}

static void skip_ws(scanner *sc) {
  while (sc->pos < sc->n) {
    char c = sc->s[sc->pos];
    if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
    sc->pos++;
  }
}

int rsl_json_utf8_valid(const char *s, size_t n) {
  const unsigned char *u = (const unsigned char *)s;
  size_t i = 0;
  while (i < n) {
    if (u[i] < 0x80) {
      i++;
      continue;
    }
    size_t len = rsl_utf8_sequence(u + i, n - i);
    if (!len) return 0;
    i += len;
  }
  return 1;
}

static int hex4(const char *p, unsigned *out) {
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    char c = p[i];
    v <<= 4;
    if (c >= '0' && c <= '9')
      v |= (unsigned)(c - '0');
    else if (c >= 'a' && c <= 'f')
      v |= (unsigned)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F')
      v |= (unsigned)(c - 'A' + 10);
    else
      return -1;
  }
  *out = v;
  return 0;
}

static size_t put_utf8(char *out, unsigned cp) {
  if (cp < 0x80) {
    out[0] = (char)cp;
    return 1;
  }
  if (cp < 0x800) {
    out[0] = (char)(0xc0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3f));
    return 2;
  }
  if (cp < 0x10000) {
    out[0] = (char)(0xe0 | (cp >> 12));
    out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[2] = (char)(0x80 | (cp & 0x3f));
    return 3;
  }
  out[0] = (char)(0xf0 | (cp >> 18));
  out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
  out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
  out[3] = (char)(0x80 | (cp & 0x3f));
  return 4;
}

/* A string at sc->pos (its opening quote).  With out, the unescaped text
 * goes there and its length to *out_len. */
static int scan_string(scanner *sc, char *out, size_t *out_len) {
  const unsigned char *u = (const unsigned char *)sc->s;
  size_t w = 0;
  sc->pos++; /* the quote */
  for (;;) {
    if (sc->pos >= sc->n) return fail(sc, "unterminated string");
    unsigned char c = u[sc->pos];
    if (c == '"') {
      sc->pos++;
      break;
    }
    if (c < 0x20) return fail(sc, "control character in a string");
    if (c == '\\') {
      if (sc->pos + 1 >= sc->n) return fail(sc, "unterminated string");
      char e = sc->s[sc->pos + 1];
      char plain = 0;
      switch (e) {
      case '"':
        plain = '"';
        break;
      case '\\':
        plain = '\\';
        break;
      case '/':
        plain = '/';
        break;
      case 'b':
        plain = '\b';
        break;
      case 'f':
        plain = '\f';
        break;
      case 'n':
        plain = '\n';
        break;
      case 'r':
        plain = '\r';
        break;
      case 't':
        plain = '\t';
        break;
      case 'u':
        break;
      default:
        return fail(sc, "bad escape in a string");
      }
      if (plain) {
        if (out) out[w++] = plain;
        sc->pos += 2;
        continue;
      }
      unsigned cp;
      if (sc->pos + 6 > sc->n || hex4(sc->s + sc->pos + 2, &cp) < 0)
        return fail(sc, "bad \\u escape");
      sc->pos += 6;
      if (cp >= 0xdc00 && cp <= 0xdfff)
        return fail(sc, "lone low surrogate in a \\u escape");
      if (cp >= 0xd800 && cp <= 0xdbff) {
        unsigned low;
        if (sc->pos + 6 > sc->n || sc->s[sc->pos] != '\\' ||
            sc->s[sc->pos + 1] != 'u' || hex4(sc->s + sc->pos + 2, &low) < 0 ||
            low < 0xdc00 || low > 0xdfff)
          return fail(sc, "lone high surrogate in a \\u escape");
        sc->pos += 6;
        cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
      }
      if (out) w += put_utf8(out + w, cp);
      continue;
    }
    size_t len = rsl_utf8_sequence(u + sc->pos, sc->n - sc->pos);
    if (!len) return fail(sc, "invalid UTF-8 in a string");
    if (out) memcpy(out + w, sc->s + sc->pos, len);
    w += len;
    sc->pos += len;
  }
  if (out_len) *out_len = w;
  return 0;
}

/* Whether the number s[0, n) (valid JSON grammar) overflows a double.
 * Short numbers go to strtod as they are; long ones are first cut to
 * their leading significant digits and a decimal exponent. */
static int number_overflows(const char *s, size_t n) {
  char buf[NUMBER_COPY_MAX + 32];
  if (n < NUMBER_COPY_MAX) {
    memcpy(buf, s, n);
    buf[n] = '\0';
  } else {
    size_t i = 0, sig = 0;
    long exp10 = 0; /* the value is 0.DIGITS x 10^exp10 */
    int seen_nonzero = 0, in_fraction = 0;
    char digits[NUMBER_SIG_DIGITS + 1];
    if (s[i] == '-') i++;
    for (; i < n && s[i] != 'e' && s[i] != 'E'; i++) {
      if (s[i] == '.') {
        in_fraction = 1;
        continue;
      }
      if (!seen_nonzero && s[i] == '0') {
        if (in_fraction) exp10--;
        continue;
      }
      seen_nonzero = 1;
      if (!in_fraction && exp10 < 1000000000L) exp10++;
      if (sig < NUMBER_SIG_DIGITS) digits[sig++] = s[i];
    }
    if (!seen_nonzero) return 0;
    if (i < n) { /* the exponent, saturated: only its size matters */
      i++;
      int neg = 0;
      if (s[i] == '-' || s[i] == '+') neg = s[i++] == '-';
      long e = 0;
      for (; i < n; i++)
        if (e < 1000000000L) e = e * 10 + (s[i] - '0');
      exp10 += neg ? -e : e;
    }
    if (exp10 > 400) return 1;
    if (exp10 < -400) return 0; /* underflow is not out of range */
    digits[sig] = '\0';
    snprintf(buf, sizeof buf, "0.%se%ld", digits, exp10);
  }
  return isinf(strtod(buf, NULL));
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

static int scan_number(scanner *sc) {
  size_t start = sc->pos;
  const char *s = sc->s;
  if (s[sc->pos] == '-') sc->pos++;
  if (sc->pos >= sc->n || !is_digit(s[sc->pos])) return fail(sc, "bad number");
  if (s[sc->pos] == '0')
    sc->pos++;
  else
    while (sc->pos < sc->n && is_digit(s[sc->pos]))
      sc->pos++;
  if (sc->pos < sc->n && s[sc->pos] == '.') {
    sc->pos++;
    if (sc->pos >= sc->n || !is_digit(s[sc->pos]))
      return fail(sc, "bad number: digits must follow '.'");
    while (sc->pos < sc->n && is_digit(s[sc->pos]))
      sc->pos++;
  }
  if (sc->pos < sc->n && (s[sc->pos] == 'e' || s[sc->pos] == 'E')) {
    sc->pos++;
    if (sc->pos < sc->n && (s[sc->pos] == '+' || s[sc->pos] == '-')) sc->pos++;
    if (sc->pos >= sc->n || !is_digit(s[sc->pos]))
      return fail(sc, "bad number: digits must follow the exponent");
    while (sc->pos < sc->n && is_digit(s[sc->pos]))
      sc->pos++;
  }
  if (number_overflows(s + start, sc->pos - start)) {
    sc->pos = start;
    return fail(sc, "number out of range");
  }
  const rsl_json_visitor *v = sc->args->visitor;
  if (v && v->scalar(v->ud, RSL_JSON_NUMBER, s + start, sc->pos - start))
    return stop(sc);
  return 0;
}

static int scan_literal(scanner *sc, const char *word, rsl_json_type type) {
  size_t len = strlen(word);
  if (sc->n - sc->pos < len || memcmp(sc->s + sc->pos, word, len) != 0)
    return fail(sc, "unexpected character");
  const rsl_json_visitor *v = sc->args->visitor;
  if (v && v->scalar(v->ud, type, sc->s + sc->pos, len)) return stop(sc);
  sc->pos += len;
  return 0;
}

static int scan_value(scanner *sc, rsl_json_type *type);

/* A top-level key that names one of the wanted fields, or NULL. */
static rsl_json_field *wanted_field(scanner *sc, size_t key_start,
                                    size_t key_end) {
  rsl_json_scan_args *a = sc->args;
  size_t len = key_end - key_start;
  for (size_t i = 0; i < a->field_count; i++) {
    rsl_json_field *f = &a->fields[i];
    if (f->name_len == len && memcmp(f->name, sc->s + key_start, len) == 0)
      return f;
  }
  return NULL;
}

static int scan_container(scanner *sc, rsl_json_type kind) {
  const rsl_json_visitor *v = sc->args->visitor;
  char close = kind == RSL_JSON_OBJECT ? '}' : ']';
  if (++sc->depth > sc->args->max_depth) return fail(sc, "nested too deep");
  if (v && v->open(v->ud, kind)) return stop(sc);
  sc->pos++;
  skip_ws(sc);
  if (sc->pos < sc->n && sc->s[sc->pos] == close) {
    sc->pos++;
  } else {
    for (;;) {
      rsl_json_field *field = NULL;
      if (kind == RSL_JSON_OBJECT) {
        if (sc->pos >= sc->n || sc->s[sc->pos] != '"')
          return fail(sc, "expected a string key");
        size_t key_start = sc->pos + 1;
        size_t klen = 0;
        if (scan_string(sc, v ? sc->args->scratch : NULL, &klen) < 0) return -1;
        if (sc->depth == 1) field = wanted_field(sc, key_start, sc->pos - 1);
        if (field && field->found) return fail(sc, "duplicate key");
        if (v && v->key(v->ud, sc->args->scratch, klen)) return stop(sc);
        skip_ws(sc);
        if (sc->pos >= sc->n || sc->s[sc->pos] != ':')
          return fail(sc, "expected ':'");
        sc->pos++;
        skip_ws(sc);
      }
      size_t value_start = sc->pos;
      rsl_json_type t;
      if (scan_value(sc, &t) < 0) return -1;
      if (field) {
        field->found = 1;
        field->start = value_start;
        field->len = sc->pos - value_start;
      }
      skip_ws(sc);
      if (sc->pos < sc->n && sc->s[sc->pos] == ',') {
        sc->pos++;
        skip_ws(sc);
        continue;
      }
      if (sc->pos < sc->n && sc->s[sc->pos] == close) {
        sc->pos++;
        break;
      }
      return fail(sc, kind == RSL_JSON_OBJECT ? "expected ',' or '}'"
                                              : "expected ',' or ']'");
    }
  }
  sc->depth--;
  if (v && v->close(v->ud, kind)) return stop(sc);
  return 0;
}

static int scan_value(scanner *sc, rsl_json_type *type) {
  if (sc->pos >= sc->n) return fail(sc, "unexpected end");
  const rsl_json_visitor *v = sc->args->visitor;
  switch (sc->s[sc->pos]) {
  case '{':
    *type = RSL_JSON_OBJECT;
    return scan_container(sc, *type);
  case '[':
    *type = RSL_JSON_ARRAY;
    return scan_container(sc, *type);
  case '"': {
    size_t len = 0;
    *type = RSL_JSON_STRING;
    if (scan_string(sc, v ? sc->args->scratch : NULL, &len) < 0) return -1;
    if (v && v->scalar(v->ud, RSL_JSON_STRING, sc->args->scratch, len))
      return stop(sc);
    return 0;
  }
  case 't':
    *type = RSL_JSON_TRUE;
    return scan_literal(sc, "true", *type);
  case 'f':
    *type = RSL_JSON_FALSE;
    return scan_literal(sc, "false", *type);
  case 'n':
    *type = RSL_JSON_NULL;
    return scan_literal(sc, "null", *type);
  default:
    *type = RSL_JSON_NUMBER;
    if (sc->s[sc->pos] != '-' && !is_digit(sc->s[sc->pos]))
      return fail(sc, "unexpected character (NaN and Infinity are not JSON)");
    return scan_number(sc);
  }
}

int rsl_json_scan(const char *s, size_t n, rsl_json_scan_args *args,
                  rsl_json_type *type, char *err, size_t err_cap) {
  scanner sc = {.s = s, .n = n, .args = args};
  for (size_t i = 0; i < args->field_count; i++)
    args->fields[i].found = 0;
  skip_ws(&sc);
  int rc = scan_value(&sc, type);
  if (rc == 0) {
    skip_ws(&sc);
    if (sc.pos < n) rc = fail(&sc, "text after the value");
  }
  if (rc == 0) return RSL_JSON_OK;
  if (sc.stopped) return RSL_JSON_STOPPED;
  if (err_cap)
    snprintf(err, err_cap, "at byte %zu: %s", sc.error_pos + 1, sc.error);
  return RSL_JSON_INVALID;
}

size_t rsl_json_minify(const char *s, size_t n, char *out) {
  size_t w = 0;
  int in_string = 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (in_string) {
      out[w++] = c;
      if (c == '\\' && i + 1 < n)
        out[w++] = s[++i];
      else if (c == '"')
        in_string = 0;
    } else if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
      out[w++] = c;
      if (c == '"') in_string = 1;
    }
  }
  return w;
}

size_t rsl_json_string(const char *s, size_t n, char *out) {
  static const char HEX[] = "0123456789abcdef";
  const unsigned char *u = (const unsigned char *)s;
  size_t w = 0;
  out[w++] = '"';
  for (size_t i = 0; i < n; i++) {
    unsigned char c = u[i];
    if (c >= 0x80) {
      size_t seq = rsl_utf8_sequence(u + i, n - i);
      if (seq) {
        memcpy(out + w, s + i, seq);
        w += seq;
        i += seq - 1;
        continue;
      }
      /* Not UTF-8 (binary, Latin-1): JSON text must be, so the byte is
       * escaped as the code point of the same value, \u00XX (Latin-1
       * text then reads right, a binary byte keeps its value), as
       * resilua.json does. */
    }
    switch (c) {
    case '"':
    case '\\':
      out[w++] = '\\';
      out[w++] = (char)c;
      break;
    case '\n':
      out[w++] = '\\';
      out[w++] = 'n';
      break;
    case '\r':
      out[w++] = '\\';
      out[w++] = 'r';
      break;
    case '\t':
      out[w++] = '\\';
      out[w++] = 't';
      break;
    default:
      if (c < 0x20 || c >= 0x7f) {
        memcpy(out + w, "\\u00", 4);
        out[w + 4] = HEX[c >> 4];
        out[w + 5] = HEX[c & 15];
        w += 6;
      } else
        out[w++] = (char)c;
    }
  }
  out[w++] = '"';
  return w;
}
