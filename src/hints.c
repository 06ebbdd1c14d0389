/*
 * hints — server retry hints, normalised.  See hints.h.
 *
 * Table-driven: one row per header name, each with a small parser that
 * fills its own slot; rsl_hints_parse then combines the slots by
 * precedence.  Every value is length-capped before it is looked at, and
 * every number must be a plain decimal in range, so a hostile header can
 * make a hint absent but never make us wait for ever or read past a buffer.
 */
#include "hints.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define HINT_VALUE_MAX 256  /* longer values are ignored */
#define HINT_MEMBERS_MAX 16 /* RateLimit list members looked at */

/* The slots the parsers fill; -1 = absent. */
typedef struct slots {
  double ra_ms, amz_ms, reset_ms, remaining, quota, window_s, pushback_ms;
  double xrl_reset_ms, xrl_remaining;
  int pushback_stop, should_retry;
  double now_s;
} slots;

static int is_ows(char c) { return c == ' ' || c == '\t'; }

/* Parses [s, s+n) (surrounding spaces allowed) as a plain decimal with an
 * optional sign and fraction: no hex, exponents, inf or nan, which strtod
 * would accept.  0, or -1 when it is not one. */
static int parse_num(const char *s, size_t n, double *out) {
  while (n && is_ows(*s)) s++, n--;
  while (n && is_ows(s[n - 1])) n--;
  if (n == 0 || n > 32) return -1;
  char buf[40];
  size_t digits = 0, dots = 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (c >= '0' && c <= '9') digits++;
    else if (c == '.') dots++;
    else if (!(c == '-' && i == 0)) return -1;
    buf[i] = c;
  }
  if (!digits || dots > 1) return -1;
  buf[n] = '\0';
  *out = strtod(buf, NULL);
  return isfinite(*out) ? 0 : -1;
}

/* A non-negative number of ms no longer than a day, or -1. */
static double ms_or_absent(const char *v, double scale) {
  double x;
  if (parse_num(v, strlen(v), &x) < 0 || x < 0) return -1;
  x *= scale;
  return x <= RSL_HINTS_MAX_MS ? x : -1;
}

static void on_retry_after_ms(slots *s, const char *v) {
  s->ra_ms = ms_or_absent(v, 1);
}

static void on_amz_retry_after(slots *s, const char *v) {
  s->amz_ms = ms_or_absent(v, 1);
}

/* X-RateLimit-Reset: GitHub sends epoch seconds, others (Envoy, many
 * gateways) delta seconds.  No delta is anywhere near half the current
 * epoch (decades), so a value past that is a point in time. */
static void on_x_reset(slots *s, const char *v) {
  double x;
  if (parse_num(v, strlen(v), &x) < 0 || x < 0) return;
  if (x > s->now_s / 2) x = x > s->now_s ? x - s->now_s : 0;
  if (x * 1000 <= RSL_HINTS_MAX_MS) s->xrl_reset_ms = x * 1000;
}

static void on_x_remaining(slots *s, const char *v) {
  double x;
  if (parse_num(v, strlen(v), &x) == 0 && x >= 0) s->xrl_remaining = x;
}

/* Calls fn(s, member, key, value) for every key=value parameter of a
 * structured-field list ("a";r=1;t=2, "b";q=3) and of the older drafts'
 * forms (limit=100, remaining=50, reset=30 and 100;w=60, where a bare
 * number in first place is the quota).  Quotes around values are dropped. */
typedef void param_fn(slots *s, int member, const char *key, size_t klen,
                      const char *val, size_t vlen);

static void scan_params(slots *s, const char *v, param_fn *fn) {
  int member = 0, first = 1;
  const char *p = v;
  while (*p && member < HINT_MEMBERS_MAX) {
    size_t n = strcspn(p, ",;");
    const char *seg = p, *end = p + n;
    while (seg < end && is_ows(*seg)) seg++;
    while (end > seg && is_ows(end[-1])) end--;
    const char *eq = memchr(seg, '=', (size_t)(end - seg));
    if (eq) {
      const char *val = eq + 1;
      size_t vlen = (size_t)(end - val);
      if (vlen >= 2 && val[0] == '"' && val[vlen - 1] == '"') val++, vlen -= 2;
      fn(s, member, seg, (size_t)(eq - seg), val, vlen);
    } else if (first) {
      fn(s, member, "", 0, seg, (size_t)(end - seg));
    }
    first = 0;
    if (p[n] == ',') member++, first = 1;
    if (!p[n]) break;
    p += n + 1;
  }
}

static int key_is(const char *key, size_t klen, const char *want) {
  return strlen(want) == klen && strncasecmp(key, want, klen) == 0;
}

/* RateLimit may list several limits; the most restrictive reading wins:
 * the fewest requests left and the latest reset. */
static void ratelimit_param(slots *s, int member, const char *key, size_t klen,
                            const char *val, size_t vlen) {
  (void)member;
  double x;
  if (parse_num(val, vlen, &x) < 0 || x < 0) return;
  if ((key_is(key, klen, "r") || key_is(key, klen, "remaining")) &&
      (s->remaining < 0 || x < s->remaining))
    s->remaining = x;
  if ((key_is(key, klen, "t") || key_is(key, klen, "reset")) &&
      x * 1000 <= RSL_HINTS_MAX_MS && x * 1000 > s->reset_ms)
    s->reset_ms = x * 1000;
}

static void on_ratelimit(slots *s, const char *v) {
  scan_params(s, v, ratelimit_param);
}

/* RateLimit-Policy: the first policy's quota and window. */
static void policy_param(slots *s, int member, const char *key, size_t klen,
                         const char *val, size_t vlen) {
  double x;
  if (member != 0 || parse_num(val, vlen, &x) < 0 || x < 0) return;
  if (klen == 0 || key_is(key, klen, "q") || key_is(key, klen, "limit"))
    s->quota = x;
  else if (key_is(key, klen, "w")) s->window_s = x;
}

static void on_ratelimit_policy(slots *s, const char *v) {
  scan_params(s, v, policy_param);
}

/* The draft's older split fields. */
static void on_rl_reset(slots *s, const char *v) {
  double x = ms_or_absent(v, 1000);
  if (x >= 0) s->reset_ms = x;
}

static void on_rl_remaining(slots *s, const char *v) {
  double x;
  if (parse_num(v, strlen(v), &x) == 0 && x >= 0) s->remaining = x;
}

/* gRFC A6: an integer >= 0 is the wait; anything else means the server
 * does not want a retry. */
static void on_pushback(slots *s, const char *v) {
  double x;
  if (parse_num(v, strlen(v), &x) < 0 || x < 0 || x != floor(x) ||
      x > RSL_HINTS_MAX_MS) {
    s->pushback_stop = 1;
    s->pushback_ms = -1;
    return;
  }
  s->pushback_ms = x;
}

static void on_should_retry(slots *s, const char *v) {
  if (strcasecmp(v, "true") == 0) s->should_retry = 1;
  else if (strcasecmp(v, "false") == 0) s->should_retry = 0;
}

static const struct {
  const char *name; /* lower-case, as rsl_response stores them */
  void (*parse)(slots *s, const char *value);
} HINT_HEADERS[] = {
    {"retry-after-ms", on_retry_after_ms},
    {"x-amz-retry-after", on_amz_retry_after},
    {"x-ratelimit-reset", on_x_reset},
    {"x-ratelimit-remaining", on_x_remaining},
    {"ratelimit", on_ratelimit},
    {"ratelimit-policy", on_ratelimit_policy},
    {"ratelimit-reset", on_rl_reset},
    {"ratelimit-remaining", on_rl_remaining},
    {"grpc-retry-pushback-ms", on_pushback},
    {"x-should-retry", on_should_retry},
};

/* --- Retry-After (RFC 9110 10.2.3, 5.6.7) --------------------------------- */

static const char *const WEEKDAYS[7] = {"Mon", "Tue", "Wed", "Thu",
                                        "Fri", "Sat", "Sun"};
static const char *const WEEKDAYS_LONG[7] = {
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday",
    "Sunday"};
static const char *const MONTHS[12] = {"Jan", "Feb", "Mar", "Apr",
                                       "May", "Jun", "Jul", "Aug",
                                       "Sep", "Oct", "Nov", "Dec"};

/* A cursor over one field value: every reader consumes exactly what it
 * accepts and fails otherwise (the names are case-sensitive, as RFC 9110
 * 5.6.7 says). */
typedef struct cursor {
  const char *p, *end;
} cursor;

static int take_lit(cursor *c, const char *lit) {
  size_t n = strlen(lit);
  if ((size_t)(c->end - c->p) < n || memcmp(c->p, lit, n) != 0) return -1;
  c->p += n;
  return 0;
}

/* Exactly `n` digits. */
static int take_digits(cursor *c, int n, int *out) {
  int v = 0;
  for (int i = 0; i < n; i++) {
    if (c->p == c->end || *c->p < '0' || *c->p > '9') return -1;
    v = v * 10 + (*c->p++ - '0');
  }
  *out = v;
  return 0;
}

static int take_name(cursor *c, const char *const *names, int count) {
  for (int i = 0; i < count; i++)
    if (take_lit(c, names[i]) == 0) return i;
  return -1;
}

/* hour ":" minute ":" second; 60 allowed as a leap second. */
static int take_time(cursor *c, int *h, int *m, int *s) {
  if (take_digits(c, 2, h) < 0 || take_lit(c, ":") < 0 ||
      take_digits(c, 2, m) < 0 || take_lit(c, ":") < 0 ||
      take_digits(c, 2, s) < 0)
    return -1;
  return *h <= 23 && *m <= 59 && *s <= 60 ? 0 : -1;
}

/* Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
 * days_from_civil): no timegm, no time zone, no locale. */
static long long days_from_civil(long long y, int m, int d) {
  y -= m <= 2;
  long long era = (y >= 0 ? y : y - 399) / 400;
  long long yoe = y - era * 400;
  long long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + doe - 719468;
}

static int days_in_month(int y, int m) {
  static const int DAYS[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
  return DAYS[m] + (m == 1 && leap);
}

/* An HTTP-date in [p, end) as seconds since the epoch; 0 or -1.  The
 * weekday must be well-formed but is not checked against the date (as
 * most recipients do). */
static int parse_http_date(const char *p, const char *end, double now_s,
                           double *out) {
  cursor c = {p, end};
  int year = 0, month, day, h, m, s;
  if (take_name(&c, WEEKDAYS, 7) >= 0 && take_lit(&c, ", ") == 0) {
    /* IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT */
    if (take_digits(&c, 2, &day) < 0 || take_lit(&c, " ") < 0 ||
        (month = take_name(&c, MONTHS, 12)) < 0 || take_lit(&c, " ") < 0 ||
        take_digits(&c, 4, &year) < 0 || take_lit(&c, " ") < 0 ||
        take_time(&c, &h, &m, &s) < 0 || take_lit(&c, " GMT") < 0)
      return -1;
  } else if ((c = (cursor){p, end}), take_name(&c, WEEKDAYS_LONG, 7) >= 0) {
    /* RFC 850: Sunday, 06-Nov-94 08:49:37 GMT.  A two-digit year more
     * than 50 years ahead is the latest past year with those digits. */
    int yy;
    if (take_lit(&c, ", ") < 0 || take_digits(&c, 2, &day) < 0 ||
        take_lit(&c, "-") < 0 || (month = take_name(&c, MONTHS, 12)) < 0 ||
        take_lit(&c, "-") < 0 || take_digits(&c, 2, &yy) < 0 ||
        take_lit(&c, " ") < 0 || take_time(&c, &h, &m, &s) < 0 ||
        take_lit(&c, " GMT") < 0)
      return -1;
    long long this_year = 1970 + (long long)(now_s / 31556952.0);
    year = (int)(this_year / 100 * 100) + yy;
    if (year > this_year + 50) year -= 100;
  } else if ((c = (cursor){p, end}), take_name(&c, WEEKDAYS, 7) >= 0) {
    /* asctime: Sun Nov  6 08:49:37 1994 */
    if (take_lit(&c, " ") < 0 || (month = take_name(&c, MONTHS, 12)) < 0 ||
        take_lit(&c, " ") < 0)
      return -1;
    if (take_lit(&c, " ") == 0) {
      if (take_digits(&c, 1, &day) < 0) return -1;
    } else if (take_digits(&c, 2, &day) < 0) {
      return -1;
    }
    if (take_lit(&c, " ") < 0 || take_time(&c, &h, &m, &s) < 0 ||
        take_lit(&c, " ") < 0 || take_digits(&c, 4, &year) < 0)
      return -1;
  } else {
    return -1;
  }
  if (c.p != c.end || day < 1 || day > days_in_month(year, month)) return -1;
  *out = (double)days_from_civil(year, month + 1, day) * 86400.0 +
         h * 3600.0 + m * 60.0 + s;
  return 0;
}

/* One Retry-After field value as ms, or -1 when malformed. */
static double retry_after_value_ms(const char *v, double now_s) {
  const char *end = v + strlen(v);
  while (is_ows(*v)) v++;
  while (end > v && is_ows(end[-1])) end--;
  if (v == end) return -1;
  size_t digits = strspn(v, "0123456789");
  if (v + digits >= end) { /* delay-seconds, saturating */
    double seconds = 0;
    for (const char *d = v; d < end; d++) {
      seconds = seconds * 10 + (*d - '0');
      if (seconds >= RSL_HINTS_RETRY_AFTER_MAX_S) {
        seconds = RSL_HINTS_RETRY_AFTER_MAX_S;
        break;
      }
    }
    return seconds * 1000.0;
  }
  double at;
  if (parse_http_date(v, end, now_s, &at) < 0) return -1;
  return at > now_s ? (at - now_s) * 1000.0 : 0;
}

double rsl_hints_retry_after_ms(const rsl_response *res, double now_s) {
  double wait_ms = -1;
  for (size_t i = 0; i < res->header_count; i++) {
    if (strcmp(res->headers[i].name, "retry-after") != 0 ||
        !res->headers[i].value)
      continue;
    double ms = retry_after_value_ms(res->headers[i].value, now_s);
    if (ms > wait_ms) wait_ms = ms;
  }
  return wait_ms;
}

/* --- all hints ----------------------------------------------------------- */

void rsl_hints_parse(rsl_hints *h, const rsl_response *res, double now_s) {
  slots s = {.ra_ms = -1, .amz_ms = -1, .reset_ms = -1, .remaining = -1,
             .quota = -1, .window_s = -1, .pushback_ms = -1,
             .xrl_reset_ms = -1, .xrl_remaining = -1, .should_retry = -1,
             .now_s = now_s};
  for (size_t i = 0; i < res->header_count; i++) {
    const char *value = res->headers[i].value;
    if (!value || strnlen(value, HINT_VALUE_MAX + 1) > HINT_VALUE_MAX)
      continue;
    for (size_t k = 0; k < sizeof HINT_HEADERS / sizeof *HINT_HEADERS; k++)
      if (strcmp(res->headers[i].name, HINT_HEADERS[k].name) == 0)
        HINT_HEADERS[k].parse(&s, value);
  }
  *h = (rsl_hints){.retry_after_ms = -1,
                   .reset_ms = s.reset_ms >= 0 ? s.reset_ms : s.xrl_reset_ms,
                   .remaining = s.remaining >= 0 ? s.remaining
                                                 : s.xrl_remaining,
                   .quota = s.quota,
                   .window_s = s.window_s,
                   .pushback_ms = s.pushback_ms,
                   .pushback_stop = s.pushback_stop,
                   .should_retry = s.should_retry,
                   .wait_ms = -1};
  /* Precedence: the standard header first, then the vendors' ms forms. */
  if (res->retry_after_ms >= 0) {
    h->retry_after_ms = res->retry_after_ms;
    h->retry_after_from = "retry-after";
  } else if (s.ra_ms >= 0) {
    h->retry_after_ms = s.ra_ms;
    h->retry_after_from = "retry-after-ms";
  } else if (s.amz_ms >= 0) {
    h->retry_after_ms = s.amz_ms;
    h->retry_after_from = "x-amz-retry-after";
  }
  /* A reset alone is sent on every answer; it asks for a wait only when
   * the limit is hit. */
  int limited = res->status == 429 || h->remaining == 0;
  if (h->retry_after_ms >= 0) h->wait_ms = h->retry_after_ms;
  else if (h->pushback_ms >= 0) h->wait_ms = h->pushback_ms;
  else if (limited && h->reset_ms >= 0) h->wait_ms = h->reset_ms;
}
