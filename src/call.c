/*
 * call — the call state machine.  See call.h.
 *
 * One call: the first attempt starts on the next loop step (so the caller's
 * callback never runs inside rsl_call_start); each attempt asks the breaker,
 * goes out through the transport with timeout = min(per-try, time left),
 * and its response feeds the breaker, the budget and then the policy.  The
 * core enforces what no policy may break: attempts, the deadline, the
 * Retry-After cap, the budget and the breaker.
 */
#include "call.h"

#include "grpc/grpc.h"
#include "redact.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

struct rsl_call {
  rsl_call_env *env;
  rsl_client *client;
  rsl_policy *policy;
  rsl_policy *shadow; /* the candidate asked beside it, or NULL */
  const rsl_policy_conf *conf; /* the policy's, for brevity */
  rsl_call_done cb;
  void *ud;
  rsl_call *prev, *next;

  /* the request, owned */
  char *method, *url;
  char **headers;
  size_t header_count;
  char *body;
  size_t body_len;
  size_t max_active;
  int http2;
  int grpc; /* a unary gRPC call: url, body and headers are its wire form */
  char idempotency_key[37]; /* empty when none is sent */
  int has_key; /* our key or the caller's is sent (409/422 rules) */

  rsl_breaker *breaker; /* NULL without one; owned by the client */
  int probe;            /* the attempt in flight is a half-open probe */
  rsl_attempt *attempt; /* in flight, or NULL */
  rsl_timer timer;      /* the wait before the next attempt */
  uint64_t started_ns;
  double prev_delay_ms;
  double quota_paid; /* what the last retry took from a quota budget */
  int refused; /* tries the breaker or the throttle refused (nothing sent) */
  int transparent; /* attempts sent again as refused streams (not counted) */
  /* Waiting for the breaker's verdict after a refusal (see await_verdict). */
  rsl_breaker_waiter verdict;
  int verdict_wait;   /* VERDICT_*: what the timer is waiting for */
  int verdict_waited; /* a call waits for one verdict at most */
  uint64_t backoff_end_ns; /* VERDICT_PROBE_DUE: when the backoff ends */
  /* hedging: more attempts of the same try in flight beside `attempt` */
  struct hedge_slot {
    rsl_call *call;
    rsl_attempt *attempt; /* in flight, or NULL */
  } hedges[RSL_HEDGE_MAX - 1];
  rsl_timer hedge_timer;
  int hedges_sent; /* in all, for the call event */
  double try_sent_ms; /* when the try's first attempt went out */
  rsl_call_result result;

  /* Per-request overrides (a copy of the policy's conf), or NULL. */
  rsl_policy_conf *own_conf;
  char *route, *request_id; /* for the events, or NULL */
  /* Streaming and the byte timeouts (contract 7; see "streaming"). */
  rsl_call_stream stream;
  int has_stream, raw;
  int committed, paused, consumer_abort, got_byte;
  double try_timeout_ms; /* this attempt's: min(per-try, time left) */
  uint64_t try_started_ns, last_byte_ns, committed_ns;
  rsl_timer watchdog;
};

enum {
  VERDICT_NONE,      /* not waiting */
  VERDICT_BACKOFF,   /* the timer is the backoff; a verdict ends it early */
  VERDICT_PROBE_DUE, /* the timer is the next probe's due time */
};

static const char *const OUTCOME_NAMES[] = {
    "ok", "failed", "gave_up", "deadline", "budget", "breaker_open",
    "policy_error", "throttled"};

const char *rsl_outcome_name(rsl_outcome o) { return OUTCOME_NAMES[o]; }

/* --- client ------------------------------------------------------------- */

rsl_client *rsl_client_new(const char *name) {
  rsl_client *c = calloc(1, sizeof *c);
  if (!c || !(c->name = strdup(name))) {
    free(c);
    return NULL;
  }
  c->refs = 1;
  return c;
}

void rsl_client_unref(rsl_client *c) {
  if (!c || --c->refs > 0) return;
  rsl_breakers_free(&c->breakers);
  free(c->name);
  free(c);
}

/* What breaker_key and url_ok last worked out.  A load run sends one URL
 * over and over, and parsing it with curl_url was a good share of a call's
 * cost; both are pure functions of their arguments, so the last answer is
 * kept (for URLs up to URL_MEMO_MAX bytes). */
#define URL_MEMO_MAX 1024
typedef struct url_memo {
  char url[URL_MEMO_MAX];
  int kind; /* breaker_key: the rsl_breaker_key; url_ok: unused */
  int rc;
  char out[URL_MEMO_MAX];
} url_memo;

static int memo_hit(const url_memo *m, const char *url, int kind) {
  return m->url[0] && m->kind == kind && strcmp(m->url, url) == 0;
}

static void memo_keep(url_memo *m, const char *url, int kind, int rc,
                      const char *out) {
  size_t n = strlen(url);
  if (n == 0 || n >= sizeof m->url || (out && strlen(out) >= sizeof m->out)) {
    m->url[0] = '\0';
    return;
  }
  memcpy(m->url, url, n + 1);
  m->kind = kind;
  m->rc = rc;
  snprintf(m->out, sizeof m->out, "%s", out ? out : "");
}

static int breaker_key_parse(rsl_breaker_key kind, const char *url, char *out,
                             size_t size);

/* The breaker key of url ("scheme://host:port" by default) written to out
 * as snprintf does: its length, which may be >= size (then ask again with
 * more room), or -1 when the URL does not parse. */
static int breaker_key(rsl_breaker_key kind, const char *url, char *out,
                       size_t size) {
  static url_memo memo;
  if (kind == RSL_BREAKER_KEY_GLOBAL) return snprintf(out, size, "*");
  if (memo_hit(&memo, url, (int)kind))
    return memo.rc < 0 ? -1 : snprintf(out, size, "%s", memo.out);
  int rc = breaker_key_parse(kind, url, out, size);
  if (rc < 0 || (size_t)rc < size)
    memo_keep(&memo, url, (int)kind, rc, rc >= 0 ? out : NULL);
  return rc;
}

static int breaker_key_parse(rsl_breaker_key kind, const char *url, char *out,
                             size_t size) {
  CURLU *u = curl_url();
  char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL;
  int rc = -1;
  if (!u || curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK) goto out;
  if (curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
      curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
      curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK ||
      curl_url_get(u, CURLUPART_PATH, &path, 0) != CURLUE_OK)
    goto out;
  rc = kind == RSL_BREAKER_KEY_URL
           ? snprintf(out, size, "%s://%s:%s%s", scheme, host, port, path)
           : snprintf(out, size, "%s://%s:%s", scheme, host, port);
  if (rc < 0) rc = -1;
out:
  curl_free(scheme);
  curl_free(host);
  curl_free(port);
  curl_free(path);
  curl_url_cleanup(u);
  return rc;
}

/* Keys of any length: on the stack when they fit, else on the heap (a
 * fixed buffer used to turn key = "url" off for long URLs). */
#define BREAKER_KEY_STACK 1024

rsl_breaker *rsl_client_breaker(rsl_client *c, const rsl_policy_conf *conf,
                                const char *url) {
  if (!conf->breaker_enabled) return NULL;
  char buf[BREAKER_KEY_STACK], *heap = NULL;
  int n = breaker_key(conf->breaker_key, url, buf, sizeof buf);
  if (n < 0) return NULL;
  if ((size_t)n >= sizeof buf) {
    heap = malloc((size_t)n + 1);
    if (!heap ||
        breaker_key(conf->breaker_key, url, heap, (size_t)n + 1) != n) {
      free(heap);
      return NULL;
    }
  }
  rsl_breaker *b =
      rsl_breakers_get(&c->breakers, heap ? heap : buf, &conf->breaker);
  free(heap);
  return b;
}

rsl_budget *rsl_client_budget(rsl_client *c, const rsl_policy_conf *conf) {
  if (!conf->budget_enabled) return NULL;
  /* The state carries over reloads, unless the kind of budget changed (or
   * a ratio's ttl_ms: its slots would stand for other spans of time). */
  if (!c->has_budget || c->budget.kind != conf->budget_kind ||
      (conf->budget_kind == RSL_BUDGET_RATIO &&
       c->budget.ttl_ms != conf->budget_ttl_ms)) {
    if (conf->budget_kind == RSL_BUDGET_RATIO)
      rsl_budget_init_ratio(&c->budget, conf->budget_ratio,
                            conf->budget_ttl_ms, conf->budget_min_per_s);
    else if (conf->budget_kind == RSL_BUDGET_QUOTA)
      rsl_budget_init_quota(&c->budget, conf->budget_max_tokens,
                            conf->budget_retry_cost, conf->budget_timeout_cost,
                            conf->budget_success_refund);
    else
      rsl_budget_init(&c->budget, conf->budget_max_tokens,
                      conf->budget_token_ratio);
    c->has_budget = 1;
  }
  if (conf->budget_kind == RSL_BUDGET_RATIO) {
    /* A reloaded ratio applies to the requests already counted. */
    c->budget.ratio = conf->budget_ratio;
    c->budget.min_per_s = conf->budget_min_per_s;
  }
  return &c->budget;
}

/* The adaptive throttle, created from conf on first use (again when its
 * settings change); NULL without one.  Owned by the client. */
static rsl_throttle *client_throttle(rsl_client *c, const rsl_policy_conf *conf) {
  if (!conf->throttle_enabled) return NULL;
  /* Counts carry over reloads that keep the window: they are the
   * dependency's recent history, whatever the policy's version. */
  if (!c->has_throttle || c->throttle.window_ms != conf->throttle_window_ms) {
    rsl_throttle_init(&c->throttle, conf->throttle_k, conf->throttle_window_ms);
    c->has_throttle = 1;
  }
  c->throttle.k = conf->throttle_k;
  return &c->throttle;
}

/* --- helpers ------------------------------------------------------------- */

static double elapsed_ms(const rsl_call *call) {
  return (double)(rsl_loop_now_ns(call->env->loop) - call->started_ns) / 1e6;
}

static double now_ms(const rsl_call *call) {
  return rsl_loop_now_ms(call->env->loop);
}

static int send_through(rsl_call_env *env, const rsl_request *req,
                        rsl_attempt_done cb, void *ud, rsl_attempt **out,
                        const char **err) {
  if (env->sender)
    return env->sender->send(env->sender_impl, req, cb, ud, out, err);
  return rsl_transport_send(env->transport, req, cb, ud, out, err);
}

static void cancel_through(rsl_call_env *env, rsl_attempt *a) {
  if (env->sender) env->sender->cancel(env->sender_impl, a);
  else rsl_transport_cancel(env->transport, a);
}

/* Random bytes from a buffer refilled with getrandom(2): one system call
 * per call (for its id) was a visible share of a call's cost.  A child
 * forked from here starts with an empty buffer, so parent and child never
 * hand out the same bytes. */
#define RANDOM_POOL_BYTES 256 /* getrandom is never short up to 256 */
static unsigned char random_pool[RANDOM_POOL_BYTES];
static size_t random_left;
static int random_atfork_set;

static void random_pool_drop(void) { random_left = 0; }

static int random_bytes(unsigned char *out, size_t n) {
  if (n > RANDOM_POOL_BYTES) return -1;
  if (!random_atfork_set)
    random_atfork_set = pthread_atfork(NULL, NULL, random_pool_drop) == 0;
  if (random_left < n) {
    if (getrandom(random_pool, sizeof random_pool, 0) !=
        (ssize_t)sizeof random_pool)
      return -1;
    random_left = sizeof random_pool;
  }
  random_left -= n;
  memcpy(out, random_pool + random_left, n);
  memset(random_pool + random_left, 0, n); /* handed out once */
  return 0;
}

static void random_hex(char *out, size_t bytes) {
  static const char HEX[] = "0123456789abcdef";
  unsigned char raw[16];
  if (random_bytes(raw, bytes) < 0) {
    /* never fails for 16 bytes once the pool is ready; stay unique anyway */
    static rsl_prng fallback;
    static int ready;
    if (!ready) rsl_prng_seed_random(&fallback), ready = 1;
    for (size_t i = 0; i < bytes; i++) raw[i] = (unsigned char)rsl_prng_next(&fallback);
  }
  for (size_t i = 0; i < bytes; i++) {
    out[2 * i] = HEX[raw[i] >> 4];
    out[2 * i + 1] = HEX[raw[i] & 15];
  }
  out[2 * bytes] = '\0';
}

/* A random (version 4) UUID. */
static void uuid4(char out[37]) {
  char hex[33];
  random_hex(hex, 16);
  hex[12] = '4';
  hex[16] = "89ab"[hex[16] % 4];
  snprintf(out, 37, "%.8s-%.4s-%.4s-%.4s-%.12s", hex, hex + 8, hex + 12,
           hex + 16, hex + 20);
}

static int has_header(const rsl_call_request *req, const char *name) {
  size_t n = strlen(name);
  for (size_t i = 0; i < req->header_count; i++)
    if (strncasecmp(req->headers[i], name, n) == 0 && req->headers[i][n] == ':')
      return 1;
  return 0;
}

static int wants_idempotency_key(const rsl_policy_conf *c,
                                 const rsl_call_request *req) {
  if (!c->idempotency_header || has_header(req, c->idempotency_header))
    return 0;
  for (size_t i = 0; i < c->idempotency_method_count; i++)
    if (strcmp(c->idempotency_methods[i], req->method) == 0) return 1;
  return 0;
}

static int is_http_success(long status) {
  return status >= 200 && status < 400;
}

static int is_success(const rsl_response *res) {
  if (res->grpc) return res->grpc_status == RSL_GRPC_OK;
  return is_http_success(res->status);
}

/* What the breaker and the budget count as a failure: the dependency did
 * not answer, answered 5xx, or pushed back with 429.  Other 4xx are the
 * caller's fault and say nothing about the dependency's health. */
static int is_dependency_failure(const rsl_response *res) {
  if (res->grpc) return rsl_grpc_is_dependency_failure(res->grpc_status);
  return res->status == 0 || res->status >= 500 || res->status == 429;
}

/* --- hedging (helpers; the machine's part is below) ---------------------- */

static int hedges_in_flight(const rsl_call *call) {
  int n = 0;
  for (int i = 0; i < RSL_HEDGE_MAX - 1; i++) n += call->hedges[i].attempt != NULL;
  return n;
}

/* Cancels the hedges in flight and the next one's timer.  Hedges never go
 * out half-open, so none holds a breaker probe. */
static void cancel_hedges(rsl_call *call) {
  rsl_timer_stop(call->env->loop, &call->hedge_timer);
  for (int i = 0; i < RSL_HEDGE_MAX - 1; i++) {
    if (call->hedges[i].attempt) cancel_through(call->env, call->hedges[i].attempt);
    call->hedges[i].attempt = NULL;
  }
}

/* --- lifecycle ----------------------------------------------------------- */

static void call_free(rsl_call *call) {
  rsl_call_env *env = call->env;
  if (call->prev) call->prev->next = call->next;
  else env->calls = call->next;
  if (call->next) call->next->prev = call->prev;
  rsl_timer_stop(env->loop, &call->timer);
  rsl_timer_stop(env->loop, &call->watchdog);
  if (call->breaker) rsl_breaker_unwait(call->breaker, &call->verdict);
  cancel_hedges(call);
  if (call->attempt) {
    cancel_through(env, call->attempt);
    if (call->breaker) rsl_breaker_release(call->breaker, call->probe);
  }
  for (size_t i = 0; i < call->header_count; i++) free(call->headers[i]);
  free(call->headers);
  free(call->method);
  free(call->url);
  free(call->body);
  free(call->own_conf);
  free(call->route);
  free(call->request_id);
  rsl_response_free(&call->result.last);
  rsl_policy_unref(call->policy);
  if (call->shadow) rsl_policy_unref(call->shadow);
  rsl_client_unref(call->client);
  free(call);
}

void rsl_call_cancel_all(rsl_call_env *env) {
  while (env->calls) call_free(env->calls);
}

void rsl_call_cancel(rsl_call *call) { call_free(call); }

/* The request's route and id, on every event of the call. */
static void event_ids(rsl_event *e, const rsl_call *call) {
  if (call->route) rsl_event_str(e, "route", call->route);
  if (call->request_id) rsl_event_str(e, "request_id", call->request_id);
}

/* Logs a transition and runs the policy's on_change hook; a failing hook
 * changes nothing but the event, which carries its error. */
static void log_breaker_change(rsl_call *call, rsl_breaker_change ch) {
  if (ch.from == ch.to) return;
  char *hook_err = NULL;
  int hook_rc = rsl_policy_breaker_changed(
      call->policy, call->breaker->key, rsl_breaker_state_name(ch.from),
      rsl_breaker_state_name(ch.to), &hook_err);
  rsl_event e;
  rsl_event_begin(&e, "breaker");
  rsl_event_str(&e, "key", call->breaker->key);
  rsl_event_str(&e, "from", rsl_breaker_state_name(ch.from));
  rsl_event_str(&e, "to", rsl_breaker_state_name(ch.to));
  rsl_event_str(&e, "client", call->client->name);
  rsl_event_str(&e, "policy_version", rsl_policy_version(call->policy));
  event_ids(&e, call);
  if (hook_rc < 0)
    rsl_event_str(&e, "hook_error", hook_err ? hook_err : "out of memory");
  rsl_event_emit(&e, call->env->log);
  free(hook_err);
}

static void finish(rsl_call *call, rsl_outcome outcome) {
  rsl_call_result *r = &call->result;
  r->outcome = outcome;
  r->elapsed_ms = elapsed_ms(call);
  if (rsl_log_enabled(call->env->log)) { /* building the line costs */
    rsl_event e;
    rsl_event_begin(&e, "call");
    rsl_event_str(&e, "call_id", r->call_id);
    rsl_event_str(&e, "outcome", rsl_outcome_name(outcome));
    rsl_event_int(&e, "attempts", r->attempts);
    rsl_event_num(&e, "elapsed_ms", r->elapsed_ms);
    if (r->last.status) rsl_event_int(&e, "status", r->last.status);
    else rsl_event_null(&e, "status");
    if (r->last.grpc) rsl_event_int(&e, "grpc_status", r->last.grpc_status);
    if (r->committed) rsl_event_bool(&e, "streamed", 1);
    event_ids(&e, call);
    if (outcome == RSL_OUTCOME_THROTTLED || outcome == RSL_OUTCOME_BREAKER_OPEN)
      rsl_event_str(&e, "reason", r->message);
    if (call->refused) rsl_event_int(&e, "refused", call->refused);
    if (call->transparent)
      rsl_event_int(&e, "transparent_retries", call->transparent);
    if (call->hedges_sent) rsl_event_int(&e, "hedges", call->hedges_sent);
    rsl_event_emit(&e, call->env->log);
  }

  rsl_call_result handed = *r;
  memset(&r->last, 0, sizeof r->last); /* ownership moves to the callback */
  rsl_call_done cb = call->cb;
  void *ud = call->ud;
  call_free(call);
  cb(ud, &handed);
}

static void log_attempt(rsl_call *call, const char *decision,
                        const rsl_decision *d) {
  const rsl_response *res = &call->result.last;
  if (!rsl_log_enabled(call->env->log)) return;
  rsl_event e;
  rsl_event_begin(&e, "attempt");
  rsl_event_str(&e, "call_id", call->result.call_id);
  rsl_event_int(&e, "attempt", call->result.attempts);
  rsl_event_str(&e, "method", call->method);
  rsl_event_url(&e, "url", call->url);
  if (res->status) rsl_event_int(&e, "status", res->status);
  else rsl_event_str(&e, "error", rsl_error_class_name(res->error));
  if (res->grpc) rsl_event_int(&e, "grpc_status", res->grpc_status);
  rsl_event_num(&e, "latency_ms", res->latency_ms);
  rsl_event_str(&e, "decision", decision);
  rsl_event_num(&e, "delay_ms", d ? d->delay_ms : 0);
  rsl_event_str(&e, "reason", d ? d->reason : "success");
  if (call->idempotency_key[0])
    rsl_event_str(&e, "idempotency_key", call->idempotency_key);
  else rsl_event_null(&e, "idempotency_key");
  rsl_event_str(&e, "policy", rsl_policy_name(call->policy));
  rsl_event_str(&e, "policy_version", rsl_policy_version(call->policy));
  if (call->breaker)
    rsl_event_str(&e, "breaker", rsl_breaker_state_name(call->breaker->state));
  else rsl_event_null(&e, "breaker");
  event_ids(&e, call);
  rsl_throttle *throttle = client_throttle(call->client, call->conf);
  if (throttle)
    rsl_event_num(&e, "throttle", rsl_throttle_p(throttle, now_ms(call)));
  rsl_event_emit(&e, call->env->log);
}

/* --- streaming ----------------------------------------------------------
 *
 * Byte timeouts and the stream consumer (contract 7).  One watchdog timer
 * per call bounds what curl's own timeout cannot: the time to the first
 * body byte, the gaps between bytes, and, for a call with a consumer, the
 * per-try timeout until the commit (curl's timeout would also cut the
 * stream after it) and stream_timeout_ms after it.  The timer is not moved
 * for every byte: when it fires it works out the due time again. */

static void on_attempt_done(void *ud, rsl_response *res);

static uint64_t ms_to_ns(double ms) { return (uint64_t)(ms * 1e6); }

/* When the attempt in flight times out (UINT64_MAX: never), and why. */
static uint64_t watchdog_due(const rsl_call *call, const char **why) {
  const rsl_policy_conf *c = call->conf;
  uint64_t due = UINT64_MAX;
#define CONSIDER(at, what) \
  if ((at) < due) { due = (at); *why = (what); }
  if (!call->committed) {
    if (call->has_stream)
      CONSIDER(call->try_started_ns + ms_to_ns(call->try_timeout_ms),
               "per-try timeout");
    if (c->first_byte_timeout_ms && !call->got_byte)
      CONSIDER(call->try_started_ns + ms_to_ns(c->first_byte_timeout_ms),
               "first_byte_timeout_ms");
  } else if (c->stream_timeout_ms) {
    CONSIDER(call->committed_ns + ms_to_ns(c->stream_timeout_ms),
             "stream_timeout_ms");
  }
  if (c->idle_timeout_ms && call->got_byte && !call->paused)
    CONSIDER(call->last_byte_ns + ms_to_ns(c->idle_timeout_ms),
             "idle_timeout_ms");
#undef CONSIDER
  return due;
}

static void watchdog_arm(rsl_call *call) {
  const char *why = NULL;
  uint64_t due = watchdog_due(call, &why),
           now = rsl_loop_now_ns(call->env->loop);
  if (due == UINT64_MAX) rsl_timer_stop(call->env->loop, &call->watchdog);
  else rsl_timer_start(call->env->loop, &call->watchdog,
                       due > now ? due - now : 0);
}

/* The attempt in flight timed out: it ends as a `timeout` (before the
 * commit the policy may retry it; after it the call fails). */
static void on_watchdog(void *ud) {
  rsl_call *call = ud;
  const char *why = "timeout";
  uint64_t due = watchdog_due(call, &why),
           now = rsl_loop_now_ns(call->env->loop);
  if (!call->attempt) return;
  if (due > now) {
    watchdog_arm(call);
    return;
  }
  cancel_through(call->env, call->attempt);
  call->attempt = NULL;
  rsl_response res = {.error = RSL_ERR_TIMEOUT, .retry_after_ms = -1,
                      .latency_ms = (double)(now - call->try_started_ns) / 1e6};
  snprintf(res.message, sizeof res.message, "%s reached", why);
  on_attempt_done(call, &res);
}

/* The transport's body hook, set for a call with a consumer or a byte
 * timeout.  The consumer's callbacks must not cancel the call. */
static int on_data(void *ud, const rsl_response *head, const char *data,
                   size_t len) {
  rsl_call *call = ud;
  call->got_byte = 1;
  call->last_byte_ns = rsl_loop_now_ns(call->env->loop);
  if (!call->has_stream) return RSL_DATA_KEEP;
  if (!call->committed) {
    if (!is_http_success(head->status)) return RSL_DATA_KEEP; /* for the policy */
    call->committed = call->result.committed = 1;
    call->committed_ns = call->last_byte_ns;
    watchdog_arm(call); /* the per-try timeout and the deadline are off */
    if (call->stream.on_commit(call->stream.ud, head) < 0) {
      call->consumer_abort = 1;
      return RSL_DATA_ABORT;
    }
  }
  int rc = call->stream.on_chunk(call->stream.ud, data, len);
  if (rc == RSL_CHUNK_PAUSE) {
    call->paused = 1;
    return RSL_DATA_PAUSE;
  }
  if (rc < 0) {
    call->consumer_abort = 1;
    return RSL_DATA_ABORT;
  }
  return RSL_DATA_TAKEN;
}

void rsl_call_resume(rsl_call *call) {
  if (!call->paused) return;
  call->paused = 0;
  call->last_byte_ns = rsl_loop_now_ns(call->env->loop); /* our wait */
  watchdog_arm(call);
  if (call->attempt && !call->env->sender)
    rsl_transport_resume(call->env->transport, call->attempt);
}

/* --- the machine --------------------------------------------------------- */

/* The request of an attempt with at most `remaining` ms: the caller's
 * headers, then our idempotency key in the slot reserved at the end of
 * call->headers (key_line holds it; valid until the send returns, after
 * which the slot must be cleared). */
typedef struct request_lines {
  char key[512];
  char timeout[RSL_GRPC_TIMEOUT_LINE_MAX];
  char previous[64];
} request_lines;

static void build_request(rsl_call *call, rsl_request *req,
                          request_lines *lines, double remaining) {
  const rsl_policy_conf *c = call->conf;
  size_t n = call->header_count;
  if (call->idempotency_key[0]) {
    snprintf(lines->key, sizeof lines->key, "%s: %s", c->idempotency_header,
             call->idempotency_key);
    call->headers[n++] = lines->key;
  }
  double timeout = remaining < c->per_try_timeout_ms ? remaining
                                                     : c->per_try_timeout_ms;
  /* gRPC: the attempt's own time on the wire, and how many went before
   * (slots reserved after the key's). */
  if (call->grpc) {
    rsl_grpc_timeout_line(timeout < 1 ? 1 : timeout, lines->timeout,
                          sizeof lines->timeout);
    call->headers[n++] = lines->timeout;
    if (call->result.attempts > 0) {
      snprintf(lines->previous, sizeof lines->previous,
               "grpc-previous-rpc-attempts: %d", call->result.attempts);
      call->headers[n++] = lines->previous;
    }
  }
  *req = (rsl_request){
      .method = call->method,
      .url = call->url,
      .headers = (const char *const *)call->headers,
      .header_count = n,
      .body = call->body,
      .body_len = call->body_len,
      .timeout_ms = (long)(timeout < 1 ? 1 : timeout),
      .connect_timeout_ms = (long)c->connect_timeout_ms,
      .max_response_bytes = c->max_response_bytes,
      .max_active = call->max_active,
      .raw = call->raw,
      .http2 = call->http2,
      /* after a refused stream: that connection takes no new one */
      .fresh = call->result.last.error == RSL_ERR_REFUSED_STREAM &&
               !call->result.last.status,
  };
}

/* After the send: the lines build_request added die with `lines`. */
static void clear_request_lines(rsl_call *call, const rsl_request *req) {
  for (size_t i = call->header_count; i < req->header_count; i++)
    call->headers[i] = NULL;
}

static void hedge_arm(rsl_call *call);

/* A try the breaker refused waits its backoff, as any retry, but the
 * breaker's verdict on its half-open probe ends the wait: a verdict of
 * closed lets the call go at once (the backoff alone kept the first calls
 * of a recovery waiting after the dependency was back: in
 * experiments/gauntlet.lua their p95 was above no retry's), one of open
 * again sends it to be refused and back off.  When the next probe is due
 * before the backoff ends, the call wakes then (a probe needs a caller),
 * and waits on for the verdict if another call became the probe.  Once
 * per call: after a verdict the call backs off blindly, so that in a long
 * outage the calls waiting for one stay few (those refused since the last
 * probe) and a recovery is not met by all the refused calls at once.
 * The call's timer already runs for delay_ms. */
static void await_verdict(rsl_call *call, double delay_ms) {
  rsl_breaker *b = call->breaker;
  call->verdict_wait = VERDICT_BACKOFF;
  if (!rsl_breaker_probing(b)) {
    double due_ms = rsl_breaker_probe_in_ms(b, now_ms(call));
    if (due_ms >= 0 && due_ms < delay_ms) {
      call->backoff_end_ns =
          rsl_loop_now_ns(call->env->loop) + (uint64_t)(delay_ms * 1e6);
      /* Restarting an armed timer cannot fail: stopping it made room. */
      rsl_timer_start(call->env->loop, &call->timer, (uint64_t)(due_ms * 1e6));
      call->verdict_wait = VERDICT_PROBE_DUE;
    }
  }
  rsl_breaker_wait(b, &call->verdict);
}

/* Woken by the timer at the probe's due time: another waiter may have
 * become the probe; then this one waits on for its verdict, until its
 * backoff ends.  1 when it waits on. */
static int wait_on_for_verdict(rsl_call *call) {
  int due = call->verdict_wait == VERDICT_PROBE_DUE;
  rsl_breaker_unwait(call->breaker, &call->verdict);
  call->verdict_wait = VERDICT_NONE;
  uint64_t now = rsl_loop_now_ns(call->env->loop);
  if (!due || !rsl_breaker_probing(call->breaker) ||
      call->backoff_end_ns <= now ||
      rsl_timer_start(call->env->loop, &call->timer,
                      call->backoff_end_ns - now) < 0)
    return 0;
  call->verdict_wait = VERDICT_BACKOFF;
  rsl_breaker_wait(call->breaker, &call->verdict);
  return 1;
}

/* The breaker's probes had their verdict: the calls waiting for it go now
 * (closed: sent; open again: refused, and they back off). */
static void wake_waiters(rsl_breaker *b) {
  rsl_breaker_waiter *w;
  while ((w = rsl_breaker_next_waiter(b))) {
    rsl_call *call =
        (rsl_call *)(void *)((char *)w - offsetof(rsl_call, verdict));
    call->verdict_wait = VERDICT_NONE;
    call->verdict_waited = 1;
    rsl_timer_start(call->env->loop, &call->timer, 0); /* armed: cannot fail */
  }
}

/* The breaker or the throttle refused this try (result.message says
 * why).  With retry_on.refused the call tries again after the backoff, as
 * after a failed attempt, while attempts (refused ones count) and the
 * deadline allow: a refusal sends nothing, so it spends no budget token.
 * Otherwise, or once out of tries, the call ends with `outcome`. */
static void refuse(rsl_call *call, rsl_outcome outcome) {
  const rsl_policy_conf *c = call->conf;
  call->refused++;
  int tries = call->result.attempts + call->refused - call->transparent;
  if (c->retry_refused && tries < c->max_attempts) {
    double delay = rsl_backoff_ms(call->env->prng, c->jitter, c->base_ms,
                                  c->max_ms, tries, call->prev_delay_ms);
    if (delay < c->deadline_ms - elapsed_ms(call) &&
        rsl_timer_start(call->env->loop, &call->timer,
                        (uint64_t)(delay * 1e6)) == 0) {
      call->prev_delay_ms = delay;
      if (outcome == RSL_OUTCOME_BREAKER_OPEN && !call->verdict_waited)
        await_verdict(call, delay);
      return;
    }
  }
  finish(call, outcome);
}

static void send_attempt(void *ud) {
  rsl_call *call = ud;
  const rsl_policy_conf *c = call->conf;
  double remaining = c->deadline_ms - elapsed_ms(call);
  if (remaining < 1) {
    snprintf(call->result.message, sizeof call->result.message,
             "deadline of %.0f ms reached", c->deadline_ms);
    finish(call, RSL_OUTCOME_DEADLINE);
    return;
  }
  if (call->verdict_wait && wait_on_for_verdict(call)) return;
  if (call->breaker) {
    rsl_breaker_change ch;
    int admitted = rsl_breaker_admit(call->breaker, now_ms(call), &call->probe,
                                     &ch);
    log_breaker_change(call, ch);
    if (!admitted) {
      snprintf(call->result.message, sizeof call->result.message,
               "circuit breaker %s is %s: nothing sent", call->breaker->key,
               rsl_breaker_state_name(call->breaker->state));
      refuse(call, RSL_OUTCOME_BREAKER_OPEN);
      return;
    }
  }
  rsl_throttle *throttle = client_throttle(call->client, c);
  if (throttle) {
    double p = rsl_throttle_p(throttle, now_ms(call));
    if (!rsl_throttle_admit(throttle, now_ms(call),
                            rsl_prng_uniform(call->env->prng, 0, 1))) {
      if (call->breaker) rsl_breaker_release(call->breaker, call->probe);
      double requests, accepts;
      rsl_throttle_counts(throttle, now_ms(call), &requests, &accepts);
      snprintf(call->result.message, sizeof call->result.message,
               "adaptive throttle refused (p %.2f: %.0f requests, %.0f "
               "accepted in %.0f ms, k %g): nothing sent",
               p, requests, accepts, throttle->window_ms, throttle->k);
      refuse(call, RSL_OUTCOME_THROTTLED);
      return;
    }
  }
  request_lines lines;
  rsl_request req;
  build_request(call, &req, &lines, remaining);
  int watched = call->has_stream || c->first_byte_timeout_ms ||
                c->idle_timeout_ms;
  if (watched) {
    req.on_data = on_data;
    call->try_timeout_ms = (double)req.timeout_ms;
    call->got_byte = call->paused = 0;
    if (call->has_stream) req.timeout_ms = 0; /* the watchdog's, see above */
  }
  const char *err = NULL;
  call->result.attempts++;
  if (call->result.attempts == 1) {
    /* A ratio budget earns its retries from first attempts. */
    rsl_budget *budget = rsl_client_budget(call->client, c);
    if (budget) rsl_budget_request(budget, now_ms(call));
  }
  int rc = send_through(call->env, &req, on_attempt_done, call,
                        &call->attempt, &err);
  clear_request_lines(call, &req);
  if (rc == 0 && watched) {
    call->try_started_ns = rsl_loop_now_ns(call->env->loop);
    watchdog_arm(call);
  }
  if (rc < 0) {
    call->attempt = NULL;
    if (call->breaker) rsl_breaker_release(call->breaker, call->probe);
    snprintf(call->result.message, sizeof call->result.message,
             "cannot send: %s", err);
    finish(call, RSL_OUTCOME_FAILED);
    return;
  }
  hedge_arm(call);
}

/* The core's stateless limits under conf c: attempts, Retry-After and the
 * deadline (elapsed: the call's time so far).  Returns the outcome when
 * the call must stop, or -1 to retry.  Touches no shared state, so a
 * shadow policy's decision goes through it too. */
static int limit_decision(const rsl_policy_conf *c, const rsl_response *res,
                          int attempts, double elapsed, rsl_decision *d) {
  if (!d->retry)
    return d->exhausted || attempts >= c->max_attempts
               ? RSL_OUTCOME_GAVE_UP
               : RSL_OUTCOME_FAILED;
  if (attempts >= c->max_attempts) {
    snprintf(d->reason, sizeof d->reason, "max_attempts %d reached",
             c->max_attempts);
    return RSL_OUTCOME_GAVE_UP;
  }
  if (c->retry_after_respect && res->retry_after_ms >= 0) {
    if (res->retry_after_ms > c->retry_after_max_ms) {
      snprintf(d->reason, sizeof d->reason,
               "retry-after %.0f ms over the cap of %.0f ms",
               res->retry_after_ms, c->retry_after_max_ms);
      return RSL_OUTCOME_GAVE_UP;
    }
    if (res->retry_after_ms > d->delay_ms) {
      d->delay_ms = res->retry_after_ms;
      snprintf(d->reason, sizeof d->reason, "retry-after %.0f ms",
               res->retry_after_ms);
    }
  }
  double remaining = c->deadline_ms - elapsed;
  if (d->delay_ms >= remaining) {
    snprintf(d->reason, sizeof d->reason,
             "deadline: waiting %.0f ms would pass the %.0f ms left",
             d->delay_ms, remaining);
    return RSL_OUTCOME_DEADLINE;
  }
  return -1;
}

/* An attempt that timed out (gRPC: DEADLINE_EXCEEDED, the server's or our
 * own timeout) when the call's deadline is up: its timeout was the time
 * left, so the call ended at its deadline, whatever the policy thinks of
 * the timeout (most do not retry one: the call was not "failed"). */
static int ran_out_of_time(const rsl_call *call, const rsl_response *res) {
  int timed_out = res->grpc ? res->grpc_status == RSL_GRPC_DEADLINE_EXCEEDED
                            : !res->status && res->error == RSL_ERR_TIMEOUT;
  return timed_out && call->conf->deadline_ms - elapsed_ms(call) < 1;
}

/* Applies the core's limits to the policy's decision; returns the outcome
 * when the call must stop, or -1 to retry. */
static int enforce(rsl_call *call, rsl_decision *d, rsl_budget *budget) {
  const rsl_response *res = &call->result.last;
  int outcome = limit_decision(call->conf, res,
                               call->result.attempts + call->refused -
                                   call->transparent,
                               elapsed_ms(call), d);
  if (outcome >= 0 || !d->retry) return outcome;
  /* Last: a quota budget takes the retry's cost here, so nothing may
   * refuse the retry after it.  A retry of an attempt that never left
   * (our own fd shortage) adds no load to the dependency: no charge. */
  if (budget && !res->local && !rsl_budget_take_retry(budget, !res->status &&
                                                   res->error == RSL_ERR_TIMEOUT,
                                       &call->quota_paid)) {
    snprintf(d->reason, sizeof d->reason, "budget %.1f/%.0f tokens",
             budget->tokens, budget->max_tokens);
    return RSL_OUTCOME_BUDGET;
  }
  return -1;
}

/* --- shadow rollout ------------------------------------------------------ */

#define SHADOW_DELAY_SLACK_MS 1.0 /* rounding, not a disagreement */

static const char *shadow_decision_name(int rc, int outcome) {
  return rc < 0 ? "error" : outcome < 0 ? "retry" : "stop";
}

/* Asks the candidate (call->shadow) about the attempt the live policy has
 * just decided, and logs a `shadow` event when the two disagree.  Both
 * decisions go through the core's stateless limits, each under its own
 * policy (max_attempts, Retry-After and its cap, deadline_ms); the budget
 * and the breaker are left out of both sides, as the candidate must not
 * spend shared state.  The candidate draws the same random numbers the
 * live decision drew (`drawn`: the PRNG before it), so the same backoff
 * settings give the same delay and jitter cancels out; two retries
 * disagree when their delays differ by more than SHADOW_DELAY_SLACK_MS.
 * A candidate that fails (raises, runs past the instruction limit, returns
 * a bad value) is logged with decision "error" and changes nothing. */
static void shadow_compare(rsl_call *call, const rsl_attempt_info *info,
                           const rsl_decision *live_raw,
                           const rsl_prng *drawn) {
  const rsl_policy_conf *sc = rsl_policy_conf_of(call->shadow);
  const rsl_response *res = &call->result.last;
  rsl_decision live = *live_raw, cand = {0};
  int live_out = limit_decision(call->conf, res, info->attempt,
                                info->elapsed_ms, &live);
  rsl_attempt_info si = *info;
  si.remaining_ms = sc->deadline_ms - info->elapsed_ms;
  rsl_prng after = *call->env->prng; /* the live stream goes on from here */
  *call->env->prng = *drawn;
  char *err = NULL;
  int rc = rsl_policy_decide(call->shadow, &si, &cand, &err);
  *call->env->prng = after;
  int cand_out = rc < 0 ? -1
                        : limit_decision(sc, res, info->attempt,
                                         info->elapsed_ms, &cand);
  double gap = live.delay_ms - cand.delay_ms;
  if (rc == 0 && (live_out < 0) == (cand_out < 0) &&
      (live_out >= 0 || (gap <= SHADOW_DELAY_SLACK_MS &&
                         -gap <= SHADOW_DELAY_SLACK_MS)))
    return;
  if (rc < 0)
    snprintf(cand.reason, sizeof cand.reason, "policy error: %s",
             err ? err : "out of memory");
  free(err);
  rsl_event e;
  rsl_event_begin(&e, "shadow");
  rsl_event_str(&e, "call_id", call->result.call_id);
  rsl_event_int(&e, "attempt", info->attempt);
  rsl_event_str(&e, "method", call->method);
  rsl_event_url(&e, "url", call->url);
  if (res->status) rsl_event_int(&e, "status", res->status);
  else rsl_event_str(&e, "error", rsl_error_class_name(res->error));
  rsl_event_str(&e, "policy", rsl_policy_name(call->policy));
  rsl_event_str(&e, "policy_version", rsl_policy_version(call->policy));
  rsl_event_str(&e, "decision", shadow_decision_name(0, live_out));
  rsl_event_num(&e, "delay_ms", live_out < 0 ? live.delay_ms : 0);
  rsl_event_str(&e, "reason", live.reason);
  rsl_event_str(&e, "shadow_policy", rsl_policy_name(call->shadow));
  rsl_event_str(&e, "shadow_version", rsl_policy_version(call->shadow));
  rsl_event_str(&e, "shadow_decision", shadow_decision_name(rc, cand_out));
  rsl_event_num(&e, "shadow_delay_ms",
                rc == 0 && cand_out < 0 ? cand.delay_ms : 0);
  rsl_event_str(&e, "shadow_reason", cand.reason);
  rsl_event_emit(&e, call->env->log);
}

/* What an attempt's answer says of the dependency, told to the breaker
 * (probe: whether it was a half-open probe), the budget and the throttle. */
static void record_health(rsl_call *call, const rsl_response *res, int probe) {
  int failure = is_dependency_failure(res);
  rsl_budget *budget = rsl_client_budget(call->client, call->conf);
  if (budget) rsl_budget_tick(budget, now_ms(call));
  if (res->local || res->error == RSL_ERR_REFUSED_STREAM) {
    /* Our own shortage (no fds), or a stream the server refused before
     * its application saw it (gRFC A6: not a failure for throttling): it
     * says nothing of the application, so it moves neither the breaker
     * nor the budget. */
    if (call->breaker) rsl_breaker_release(call->breaker, probe);
    return;
  }
  if (call->breaker) {
    rsl_breaker_change ch;
    rsl_breaker_record(call->breaker, probe, !failure, res->latency_ms,
                       now_ms(call), &ch);
    log_breaker_change(call, ch);
    if (ch.from == RSL_BREAKER_HALF_OPEN && ch.to != ch.from)
      wake_waiters(call->breaker);
  }
  if (budget) rsl_budget_record(budget, !failure);
  rsl_throttle *throttle = client_throttle(call->client, call->conf);
  if (throttle && !failure) rsl_throttle_accept(throttle, now_ms(call));
}

static void note_latency(rsl_client *c, double ms) {
  c->recent_ms[c->recent_next] = (float)ms;
  c->recent_next = (c->recent_next + 1) % RSL_CLIENT_RECENT;
  if (c->recent_len < RSL_CLIENT_RECENT) c->recent_len++;
}

/* gRFC A6's transparent retry: a stream the server refused unprocessed
 * (refused_stream: RST_STREAM REFUSED_STREAM, or above a GOAWAY's
 * last-stream-id) never reached its application, so sending it again
 * cannot double a side effect.  It goes out again now, whatever the
 * policy's retry_on or decide say, as a logged attempt that counts
 * neither against max_attempts nor as a failure (record_health); at most
 * RSL_CALL_TRANSPARENT_MAX times per call (a peer that refuses everything
 * must not spin us), and within the deadline (send_attempt checks it).
 * Then the policy judges the refusal like any error.  Returns 1 when the
 * retry is under way. */
static int transparent_retry(rsl_call *call) {
  const rsl_response *res = &call->result.last;
  if (res->error != RSL_ERR_REFUSED_STREAM || res->status || call->committed ||
      call->transparent >= RSL_CALL_TRANSPARENT_MAX ||
      call->conf->deadline_ms - elapsed_ms(call) < 1 ||
      rsl_timer_start(call->env->loop, &call->timer, 0) < 0)
    return 0;
  call->transparent++;
  rsl_decision d = {0};
  snprintf(d.reason, sizeof d.reason,
           "refused_stream: not processed, transparent retry %d of %d",
           call->transparent, RSL_CALL_TRANSPARENT_MAX);
  log_attempt(call, "retry", &d);
  return 1;
}

static void on_attempt_done(void *ud, rsl_response *res) {
  rsl_call *call = ud;
  const rsl_policy_conf *c = call->conf;
  call->attempt = NULL;
  rsl_timer_stop(call->env->loop, &call->watchdog);
  if (call->consumer_abort) res->local = 1; /* not the dependency's doing */
  if (call->has_stream && call->stream.on_attempt)
    call->stream.on_attempt(call->stream.ud, res->status, res->error);
  if (call->grpc) rsl_grpc_read_response(res);
  if (!is_success(res) && hedges_in_flight(call)) {
    /* A hedge may still answer: this failure only tells of the dependency. */
    record_health(call, res, call->probe);
    call->probe = 0;
    rsl_response_free(res);
    return;
  }
  cancel_hedges(call);
  int k = call->result.attempts - 1;
  if (k >= 0 && k < RSL_CALL_MAX_ATTEMPTS)
    call->result.attempt_ms[k] = (float)res->latency_ms;
  rsl_response_free(&call->result.last);
  call->result.last = *res;
  record_health(call, res, call->probe);
  if (transparent_retry(call)) return;
  rsl_budget *budget = rsl_client_budget(call->client, c);

  if (call->committed && !is_success(res)) {
    /* Past the commit point: the consumer has part of the body. */
    rsl_decision d = {0};
    snprintf(d.reason, sizeof d.reason, "%s after the first body byte went "
             "out: no retry", call->consumer_abort ? "consumer gone"
                                                   : "response broken");
    snprintf(call->result.message, sizeof call->result.message,
             "%s (%.200s): %s", rsl_error_class_name(res->error),
             res->message, d.reason);
    log_attempt(call, "stop", &d);
    finish(call, RSL_OUTCOME_FAILED);
    return;
  }

  if (is_success(res)) {
    if (budget) rsl_budget_call_succeeded(budget, call->quota_paid);
    /* The try's latency as the caller saw it, from its first attempt: a
     * won hedge's own latency would pull the p95 down, and hedge more. */
    note_latency(call->client, now_ms(call) - call->try_sent_ms);
    log_attempt(call, "ok", NULL);
    finish(call, RSL_OUTCOME_OK);
    return;
  }

  /* The server's hints (a.server).  Their wait (retry-after-ms and the
   * like, pushback, a hit rate limit's reset) is enforced as Retry-After
   * is; a.retry_after_ms stays the Retry-After header's own value. */
  rsl_hints hints;
  struct timespec wall;
  clock_gettime(CLOCK_REALTIME, &wall);
  rsl_hints_parse(&hints, res, (double)wall.tv_sec);
  call->result.last.retry_after_ms = hints.wait_ms;
  double elapsed = elapsed_ms(call);
  rsl_attempt_info info = {
      .attempt = call->result.attempts - call->transparent,
      .method = call->method,
      .url = call->url,
      .res = res,
      .elapsed_ms = elapsed,
      .remaining_ms = c->deadline_ms - elapsed,
      .budget_tokens = budget ? budget->tokens : -1,
      .breaker = call->breaker ? rsl_breaker_state_name(call->breaker->state)
                               : NULL,
      .prev_delay_ms = call->prev_delay_ms,
      .prng = call->env->prng,
      .hints = &hints,
      .has_idempotency_key = call->has_key,
  };
  rsl_decision d = {0};
  char *err = NULL;
  rsl_prng drawn = *call->env->prng; /* the shadow draws the same numbers */
  if (rsl_policy_decide(call->policy, &info, &d, &err) < 0) {
    snprintf(d.reason, sizeof d.reason, "policy error: %s",
             err ? err : "out of memory");
    snprintf(call->result.message, sizeof call->result.message, "%s", d.reason);
    free(err);
    log_attempt(call, "stop", &d);
    finish(call, RSL_OUTCOME_POLICY_ERROR);
    return;
  }
  rsl_decision live_raw = d;
  int outcome = enforce(call, &d, budget);
  if (outcome >= 0 && outcome != RSL_OUTCOME_DEADLINE &&
      ran_out_of_time(call, res)) {
    outcome = RSL_OUTCOME_DEADLINE;
    snprintf(d.reason, sizeof d.reason, "deadline of %.0f ms reached",
             c->deadline_ms);
  }
  if (call->shadow) shadow_compare(call, &info, &live_raw, &drawn);
  if (outcome >= 0) {
    d.delay_ms = 0;
    log_attempt(call, "stop", &d);
    if (res->grpc)
      snprintf(call->result.message, sizeof call->result.message,
               "gRPC %s%s%.200s after %d attempt%s: %s",
               rsl_grpc_code_name(res->grpc_status),
               res->grpc_message ? ": " : "",
               res->grpc_message ? res->grpc_message : "",
               call->result.attempts, call->result.attempts == 1 ? "" : "s",
               d.reason);
    else if (res->status)
      snprintf(call->result.message, sizeof call->result.message,
               "HTTP %ld after %d attempt%s: %s", res->status,
               call->result.attempts, call->result.attempts == 1 ? "" : "s",
               d.reason);
    else
      snprintf(call->result.message, sizeof call->result.message,
               "%s (%.200s) after %d attempt%s: %s",
               rsl_error_class_name(res->error), res->message,
               call->result.attempts, call->result.attempts == 1 ? "" : "s",
               d.reason);
    finish(call, (rsl_outcome)outcome);
    return;
  }
  log_attempt(call, "retry", &d);
  call->prev_delay_ms = d.delay_ms;
  if (rsl_timer_start(call->env->loop, &call->timer,
                      (uint64_t)(d.delay_ms * 1e6)) < 0) {
    snprintf(call->result.message, sizeof call->result.message,
             "out of memory");
    finish(call, RSL_OUTCOME_FAILED);
  }
}

/* --- hedging -------------------------------------------------------------- */

/* Methods a server may see twice without harm (RFC 9110, 9.2.2). */
static int is_idempotent_method(const char *m) {
  static const char *const SAFE[] = {"GET", "HEAD", "OPTIONS", "PUT", "DELETE",
                                     "TRACE"};
  for (size_t i = 0; i < sizeof SAFE / sizeof *SAFE; i++)
    if (strcmp(m, SAFE[i]) == 0) return 1;
  return 0;
}

static int cmp_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

/* The p95 of the client's recent successful attempts, or -1 while it has
 * too few to say (HEDGE_MIN_SAMPLES). */
#define HEDGE_MIN_SAMPLES 20
static double recent_p95(const rsl_client *c) {
  if (c->recent_len < HEDGE_MIN_SAMPLES) return -1;
  float sorted[RSL_CLIENT_RECENT];
  memcpy(sorted, c->recent_ms, (size_t)c->recent_len * sizeof *sorted);
  qsort(sorted, (size_t)c->recent_len, sizeof *sorted, cmp_float);
  return sorted[(int)(0.95 * (c->recent_len - 1))];
}

/* After a try went out: the timer for its first hedge, when the policy
 * hedges and the request may be sent twice (an idempotent method, or an
 * idempotency key the server dedups by). */
static void hedge_arm(rsl_call *call) {
  const rsl_policy_conf *c = call->conf;
  call->try_sent_ms = now_ms(call);
  /* A body consumer (or a byte timeout) watches one attempt: no hedge. */
  if (!c->hedge_enabled || call->has_stream || c->first_byte_timeout_ms ||
      c->idle_timeout_ms ||
      !(is_idempotent_method(call->method) || call->has_key))
    return;
  double after = c->hedge_after_ms >= 0 ? c->hedge_after_ms
                                        : recent_p95(call->client);
  if (after < 0) return;
  if (rsl_timer_start(call->env->loop, &call->hedge_timer,
                      (uint64_t)(after * 1e6)) < 0)
    return; /* no hedge is no harm */
}

static void on_hedge_done(void *ud, rsl_response *res);

/* The try is still out after after_ms: send another attempt of it, if the
 * breaker is closed (a hedge is never a probe) and the budget pays it as a
 * retry, and arm the next while fewer than max are in flight. */
static void hedge_fire(void *ud) {
  rsl_call *call = ud;
  const rsl_policy_conf *c = call->conf;
  struct hedge_slot *slot = NULL;
  for (int i = 0; i < RSL_HEDGE_MAX - 1 && !slot; i++)
    if (!call->hedges[i].attempt) slot = &call->hedges[i];
  double remaining = c->deadline_ms - elapsed_ms(call);
  if (!call->attempt || !slot || call->probe || remaining < 1 ||
      1 + hedges_in_flight(call) >= c->hedge_max)
    return;
  /* Not while the dependency is judged sick: an open or half-open breaker,
   * or a throttle that refuses some. */
  if (call->breaker && call->breaker->state != RSL_BREAKER_CLOSED) return;
  rsl_throttle *throttle = client_throttle(call->client, c);
  if (throttle && rsl_throttle_p(throttle, now_ms(call)) > 0) return;
  rsl_budget *budget = rsl_client_budget(call->client, c);
  double paid = 0;
  if (budget && !rsl_budget_take_retry(budget, 0, &paid)) return;
  if (paid > 0) call->quota_paid = paid;
  request_lines lines;
  rsl_request req;
  build_request(call, &req, &lines, remaining);
  const char *err = NULL;
  slot->call = call;
  int rc = send_through(call->env, &req, on_hedge_done, slot, &slot->attempt,
                        &err);
  clear_request_lines(call, &req);
  if (rc < 0) {
    slot->attempt = NULL;
    return;
  }
  call->result.attempts++;
  call->hedges_sent++;
  double after = c->hedge_after_ms >= 0 ? c->hedge_after_ms
                                        : recent_p95(call->client);
  if (1 + hedges_in_flight(call) < c->hedge_max && after >= 0)
    rsl_timer_start(call->env->loop, &call->hedge_timer,
                    (uint64_t)(after * 1e6));
}

/* A hedge answered.  The first good answer wins: the others are cancelled
 * and the call goes on with it as with any attempt.  A failure while
 * others are still out only tells of the dependency; the last failure of
 * the try is the one the policy decides on. */
static void on_hedge_done(void *ud, rsl_response *res) {
  struct hedge_slot *slot = ud;
  rsl_call *call = slot->call;
  slot->attempt = NULL;
  if (!is_success(res) && (call->attempt || hedges_in_flight(call))) {
    record_health(call, res, 0);
    rsl_response_free(res);
    return;
  }
  if (call->attempt) {
    cancel_through(call->env, call->attempt);
    call->attempt = NULL;
    if (call->breaker) rsl_breaker_release(call->breaker, call->probe);
    call->probe = 0;
  }
  on_attempt_done(call, res);
}

static int is_token(const char *s) {
  return *s && strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                         "0123456789!#$%&'*+-.^_`|~") == strlen(s);
}

static char *copy_or_null(const char *s, size_t n, int *failed) {
  if (!s) return NULL;
  char *out = malloc(n + 1);
  if (!out) {
    *failed = 1;
    return NULL;
  }
  memcpy(out, s, n);
  out[n] = '\0';
  return out;
}

/* NULL for a URL the transport can send to; else what is wrong with it,
 * the URL shown with its secrets masked, in a buffer valid until the next
 * call.  Remembers the last answer. */
static const char *url_problem(const char *url) {
  static url_memo memo;
  static char msg[URL_MEMO_MAX];
  if (memo_hit(&memo, url, 0)) return memo.rc ? NULL : memo.out;
  char why[128];
  int ok = rsl_transport_check_url(url, why, sizeof why) == 0;
  if (!ok) {
    char *shown = rsl_redact_url(url);
    snprintf(msg, sizeof msg, "bad URL '%.200s%s': %s", shown ? shown : "",
             shown && strlen(shown) > 200 ? "..." : "", why);
    free(shown);
  }
  memo_keep(&memo, url, 0, ok, ok ? NULL : msg);
  return ok ? NULL : msg;
}

#define ARRAY_LEN(a) (sizeof(a) / sizeof *(a))

/* What a gRPC call sends on every attempt, after the caller's metadata. */
static const char *const GRPC_HEADERS[] = {
    "content-type: application/grpc",
    "te: trailers",
    "user-agent: grpc-c-resilua/" RSL_VERSION,
    "Accept:", /* no Accept header (curl sends one by default) */
};
/* Headers the caller may not set on a gRPC call: ours would clash. */
static const char *const GRPC_RESERVED[] = {
    "content-type", "te", "grpc-timeout", "grpc-previous-rpc-attempts",
    "grpc-encoding", "grpc-accept-encoding",
};

/* A unary gRPC call's wire form: POST to base URL + "/pkg.Service/Method"
 * over HTTP/2, the message framed, gRPC's headers after the caller's
 * (call->headers has room for them).  0, or -1 when out of memory. */
static int grpc_setup(rsl_call *call, const rsl_call_request *req) {
  call->grpc = 1;
  call->http2 = 1;
  if (!(call->method = strdup("POST")) ||
      !(call->url = rsl_grpc_url(req->url, req->grpc)) ||
      rsl_grpc_frame(req->body ? req->body : "", req->body ? req->body_len : 0,
                     &call->body, &call->body_len) < 0)
    return -1;
  for (size_t i = 0; i < ARRAY_LEN(GRPC_HEADERS); i++) {
    if (!(call->headers[call->header_count] = strdup(GRPC_HEADERS[i])))
      return -1;
    call->header_count++;
  }
  return 0;
}

int rsl_call_start(rsl_call_env *env, rsl_client *client, rsl_policy *policy,
                   rsl_policy *shadow, const rsl_call_request *req,
                   rsl_call_done cb, void *ud, const char **err) {
  if (!is_token(req->method) || strlen(req->method) > 32) {
    *err = "bad method: not an HTTP token";
    return -1;
  }
  const char *bad_url = url_problem(req->url);
  if (bad_url) {
    *err = bad_url;
    return -1;
  }
  for (size_t i = 0; i < req->header_count; i++) {
    const char *line = req->headers[i];
    size_t len = strlen(line);
    /* "Name;" is curl's way to send a header with an empty value. */
    if (strpbrk(line, "\r\n") ||
        (!strchr(line, ':') && !(len > 1 && line[len - 1] == ';'))) {
      *err = "bad header: expected 'Name: value' on one line";
      return -1;
    }
  }
  if (req->grpc && !rsl_grpc_method_ok(req->grpc)) {
    *err = "bad gRPC method: expected pkg.Service/Method";
    return -1;
  }
  if (req->grpc && req->stream) {
    *err = "a gRPC call is unary: its answer is not streamed";
    return -1;
  }
  for (size_t i = 0; req->grpc && i < ARRAY_LEN(GRPC_RESERVED); i++) {
    if (has_header(req, GRPC_RESERVED[i])) {
      *err = "a gRPC call sets content-type, te and grpc-* itself";
      return -1;
    }
  }

  rsl_call *call = calloc(1, sizeof *call);
  if (!call) goto oom;
  call->env = env;
  call->client = client;
  client->refs++;
  call->policy = policy;
  rsl_policy_ref(policy);
  call->shadow = shadow;
  if (shadow) rsl_policy_ref(shadow);
  call->conf = rsl_policy_conf_of(policy);
  call->cb = cb;
  call->ud = ud;
  call->next = env->calls;
  if (call->next) call->next->prev = call;
  env->calls = call;
  rsl_timer_init(&call->timer, send_attempt, call);
  rsl_timer_init(&call->watchdog, on_watchdog, call);
  rsl_timer_init(&call->hedge_timer, hedge_fire, call);

  int failed = 0;
  if ((req->deadline_ms > 0 && req->deadline_ms < call->conf->deadline_ms) ||
      (req->max_attempts > 0 && req->max_attempts < call->conf->max_attempts)) {
    if (!(call->own_conf = malloc(sizeof *call->own_conf))) failed = 1;
    else {
      *call->own_conf = *call->conf; /* borrows the policy's pointers */
      if (req->deadline_ms > 0 && req->deadline_ms < call->conf->deadline_ms)
        call->own_conf->deadline_ms = req->deadline_ms;
      if (req->max_attempts > 0 && req->max_attempts < call->conf->max_attempts)
        call->own_conf->max_attempts = req->max_attempts;
      call->conf = call->own_conf;
    }
  }
  if (req->route) call->route = copy_or_null(req->route, strlen(req->route),
                                             &failed);
  if (req->request_id)
    call->request_id =
        copy_or_null(req->request_id, strlen(req->request_id), &failed);
  if (req->stream) {
    call->stream = *req->stream;
    call->has_stream = 1;
  }
  call->raw = req->raw;
  call->max_active = req->max_active;
  call->http2 = req->http2;
  /* Room for the caller's headers, a gRPC call's own, and the per-attempt
   * lines (the idempotency key, grpc-timeout, grpc-previous-rpc-attempts). */
  call->headers = calloc(req->header_count + ARRAY_LEN(GRPC_HEADERS) + 3,
                         sizeof *call->headers);
  if (!call->headers) failed = 1;
  for (size_t i = 0; !failed && i < req->header_count; i++) {
    call->headers[i] =
        copy_or_null(req->headers[i], strlen(req->headers[i]), &failed);
    call->header_count = i + 1;
  }
  if (req->grpc) {
    if (!failed) failed = grpc_setup(call, req) < 0;
  } else {
    call->method = copy_or_null(req->method, strlen(req->method), &failed);
    call->url = copy_or_null(req->url, strlen(req->url), &failed);
    /* Methods that carry a body send an empty one rather than none. */
    const char *body = req->body;
    if (!body && (strcmp(req->method, "POST") == 0 ||
                  strcmp(req->method, "PUT") == 0 ||
                  strcmp(req->method, "PATCH") == 0))
      body = "";
    call->body = copy_or_null(body, req->body_len, &failed);
    call->body_len = body ? req->body_len : 0;
  }
  if (failed) {
    call_free(call);
    goto oom;
  }
  random_hex(call->result.call_id, 8);
  if (wants_idempotency_key(call->conf, req)) uuid4(call->idempotency_key);
  call->has_key = call->idempotency_key[0] ||
                  (call->conf->idempotency_header &&
                   has_header(req, call->conf->idempotency_header));
  call->breaker = rsl_client_breaker(client, call->conf, call->url);
  call->prev_delay_ms = call->conf->base_ms;
  call->started_ns = rsl_loop_now_ns(env->loop);
  if (rsl_timer_start(env->loop, &call->timer, 0) < 0) {
    call_free(call);
    goto oom;
  }
  if (req->handle) *req->handle = call;
  return 0;
oom:
  *err = "out of memory";
  return -1;
}
