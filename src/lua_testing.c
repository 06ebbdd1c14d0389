/*
 * lua_testing — core.play, the engine under `resilua.testing`: plays
 * canned attempt outcomes through the real call state machine (call.c,
 * with its breaker, budget, deadline and server hints) on a virtual loop,
 * so a policy's timeline is tested without network or real time.
 *
 * A play owns everything it runs on: a virtual loop, a scripted sender in
 * place of the transport, a fresh client (breakers, budget) shared by the
 * play's calls, and a memory event log.  The runtime's loop, transport,
 * clients and log are never touched; only its jitter PRNG is shared, so
 * resilua.seed makes a play exact (as it does core.decide).
 */
#include <lauxlib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "call.h"
#include "hints.h"
#include "lua_core.h"

#define PLAY_MAX_CALLS 10000
#define PLAY_MAX_OUTCOMES 10000
#define PLAY_DEFAULT_LATENCY_MS 10.0
/* The virtual clock starts away from 0 so that no window or bucket code
 * meets a zero time it might treat as "never". */
#define PLAY_EPOCH_NS (1000ull * 1000000000ull)

/* One canned outcome, copied out of Lua before the play runs (the machine
 * must not meet a Lua error half-way). */
typedef struct script_outcome {
  long status;
  rsl_error_class error;
  double latency_ms;
  rsl_header *headers;
  size_t header_count;
  char *body;
  size_t body_len;
} script_outcome;

/* What the sender saw of one attempt, for the timeline. */
typedef struct script_sent {
  int call;          /* 0-based index of the play's call */
  double t_ms;       /* sent at, from the call's start */
  double timeout_ms; /* the attempt's timeout (per-try, or time left) */
  double latency_ms;
  long status;
  rsl_error_class error;
  int repeated; /* the outcomes ran out: the last one again */
} script_sent;

typedef struct script script;

/* An attempt in flight: answers when its timer fires. */
typedef struct script_attempt {
  script *s;
  rsl_timer timer;
  rsl_attempt_done cb;
  void *ud;
  rsl_response res;
  struct script_attempt *prev, *next;
} script_attempt;

struct script {
  rsl_loop *loop;
  script_outcome **calls; /* per call: its outcomes */
  size_t *counts;
  size_t call_count;
  int current;       /* the call being played */
  size_t next;       /* its next outcome */
  uint64_t call_started_ns;
  script_sent *sent;
  size_t sent_len, sent_cap;
  script_attempt *inflight;
};

/* --- the scripted sender ------------------------------------------------- */

static void script_unlink(script_attempt *a) {
  if (a->prev) a->prev->next = a->next;
  else a->s->inflight = a->next;
  if (a->next) a->next->prev = a->prev;
}

static void script_answer(void *ud) {
  script_attempt *a = ud;
  script_unlink(a);
  rsl_response res = a->res;
  rsl_attempt_done cb = a->cb;
  void *cud = a->ud;
  free(a);
  cb(cud, &res);
}

/* Copies outcome o into a response; 0 or -1 on ENOMEM. */
static int build_response(const script_outcome *o, rsl_response *res) {
  memset(res, 0, sizeof *res);
  res->retry_after_ms = -1;
  res->status = o->status;
  res->error = o->error;
  if (!o->status) {
    snprintf(res->message, sizeof res->message, "scripted %s",
             rsl_error_class_name(o->error));
    return 0;
  }
  if (o->header_count) {
    res->headers = calloc(o->header_count, sizeof *res->headers);
    if (!res->headers) return -1;
    for (size_t i = 0; i < o->header_count; i++) {
      res->headers[i].name = strdup(o->headers[i].name);
      res->headers[i].value = strdup(o->headers[i].value);
      res->header_count = i + 1;
      if (!res->headers[i].name || !res->headers[i].value) return -1;
    }
  }
  res->body = malloc(o->body_len + 1);
  if (!res->body) return -1;
  memcpy(res->body, o->body ? o->body : "", o->body_len);
  res->body[o->body_len] = '\0';
  res->body_len = o->body_len;
  /* As the transport reads it, against the wall clock. */
  res->retry_after_ms = rsl_hints_retry_after_ms(res, (double)time(NULL));
  return 0;
}

static int script_send(void *impl, const rsl_request *req,
                       rsl_attempt_done cb, void *ud, rsl_attempt **out,
                       const char **err) {
  script *s = impl;
  size_t n = s->counts[s->current];
  int repeated = s->next >= n;
  const script_outcome *o = &s->calls[s->current][repeated ? n - 1 : s->next];
  s->next++;
  if (s->sent_len == s->sent_cap) {
    size_t cap = s->sent_cap ? s->sent_cap * 2 : 16;
    script_sent *sent = realloc(s->sent, cap * sizeof *sent);
    if (!sent) goto oom;
    s->sent = sent;
    s->sent_cap = cap;
  }
  script_attempt *a = calloc(1, sizeof *a);
  if (!a) goto oom;
  a->s = s;
  a->cb = cb;
  a->ud = ud;
  rsl_timer_init(&a->timer, script_answer, a);
  /* An attempt slower than its timeout is cut there, as curl would. */
  double timeout = (double)req->timeout_ms;
  double latency = o->latency_ms;
  script_outcome cut = {.error = RSL_ERR_TIMEOUT};
  if (o->error == RSL_ERR_TIMEOUT || latency > timeout) {
    latency = timeout;
    o = &cut;
  }
  if (build_response(o, &a->res) < 0 ||
      rsl_timer_start(s->loop, &a->timer, (uint64_t)(latency * 1e6)) < 0) {
    rsl_response_free(&a->res);
    free(a);
    goto oom;
  }
  a->res.latency_ms = latency;
  a->next = s->inflight;
  if (a->next) a->next->prev = a;
  s->inflight = a;
  s->sent[s->sent_len++] = (script_sent){
      .call = s->current,
      .t_ms = (double)(rsl_loop_now_ns(s->loop) - s->call_started_ns) / 1e6,
      .timeout_ms = timeout,
      .latency_ms = latency,
      .status = o->status,
      .error = o->error,
      .repeated = repeated,
  };
  *out = (rsl_attempt *)(void *)a; /* opaque to the call */
  return 0;
oom:
  *err = "out of memory";
  return -1;
}

static void script_cancel(void *impl, rsl_attempt *handle) {
  (void)impl;
  script_attempt *a = (script_attempt *)(void *)handle;
  rsl_timer_stop(a->s->loop, &a->timer);
  script_unlink(a);
  rsl_response_free(&a->res);
  free(a);
}

static const rsl_sender SCRIPT_SENDER = {script_send, script_cancel};

/* --- the play ------------------------------------------------------------ */

/* Everything a play allocates, freed by play_gc even when a Lua error
 * (a bad outcome, out of memory) leaves the binding half-way. */
typedef struct play {
  script s;
  rsl_client *client;
  rsl_log *log;
  rsl_call_env env;
  rsl_call_result *results;
  int *done;
} play;

#define PLAY_MT "resilua.play"

static void free_outcomes(script_outcome *os, size_t n) {
  for (size_t i = 0; os && i < n; i++) {
    for (size_t h = 0; h < os[i].header_count; h++) {
      free(os[i].headers[h].name);
      free(os[i].headers[h].value);
    }
    free(os[i].headers);
    free(os[i].body);
  }
  free(os);
}

static void play_free(play *p) {
  if (p->env.loop) {
    rsl_call_cancel_all(&p->env);
    while (p->s.inflight) script_cancel(&p->s, (rsl_attempt *)(void *)p->s.inflight);
  }
  for (size_t i = 0; i < p->s.call_count; i++) {
    free_outcomes(p->s.calls[i], p->s.counts[i]);
    if (p->results && p->done && p->done[i]) rsl_response_free(&p->results[i].last);
  }
  free(p->s.calls);
  free(p->s.counts);
  free(p->s.sent);
  free(p->results);
  free(p->done);
  rsl_client_unref(p->client);
  rsl_log_free(p->log);
  rsl_loop_free(p->env.loop);
  memset(p, 0, sizeof *p);
}

static int play_gc(lua_State *L) {
  play_free(lua_touserdata(L, 1));
  return 0;
}

static char *dup_lua_string(lua_State *L, int idx, size_t *len) {
  size_t n;
  const char *s = lua_tolstring(L, idx, &n);
  char *out = malloc(n + 1);
  if (!out) luaL_error(L, "out of memory");
  memcpy(out, s, n);
  out[n] = '\0';
  if (len) *len = n;
  return out;
}

/* Reads the outcome table at the top of the stack into *o (already
 * zeroed and owned by the play, so an error here leaks nothing). */
static void read_outcome(lua_State *L, script_outcome *o, int call, int i) {
  int t = lua_gettop(L);
  if (!lua_istable(L, t))
    luaL_error(L, "call %d, outcome %d: expected a table", call, i);
  o->latency_ms = PLAY_DEFAULT_LATENCY_MS;
  lua_getfield(L, t, "status");
  if (!lua_isnil(L, -1)) {
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 100 ||
        lua_tointeger(L, -1) > 599)
      luaL_error(L, "call %d, outcome %d: status must be in [100, 599]", call, i);
    o->status = (long)lua_tointeger(L, -1);
  }
  lua_getfield(L, t, "error");
  if (!lua_isnil(L, -1) &&
      (lua_type(L, -1) != LUA_TSTRING ||
       rsl_error_class_parse(lua_tostring(L, -1), &o->error) < 0))
    luaL_error(L, "call %d, outcome %d: unknown error class %s", call, i,
               luaL_tolstring(L, -1, NULL));
  if ((o->status != 0) == (o->error != RSL_ERR_NONE))
    luaL_error(L, "call %d, outcome %d: give exactly one of status and error",
               call, i);
  lua_getfield(L, t, "latency_ms");
  if (!lua_isnil(L, -1)) {
    if (!lua_isnumber(L, -1) || lua_tonumber(L, -1) < 0)
      luaL_error(L, "call %d, outcome %d: latency_ms must be a number >= 0",
                 call, i);
    o->latency_ms = lua_tonumber(L, -1);
  }
  lua_getfield(L, t, "body");
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TSTRING)
      luaL_error(L, "call %d, outcome %d: body must be a string", call, i);
    o->body = dup_lua_string(L, -1, &o->body_len);
  }
  if (lua_getfield(L, t, "headers") == LUA_TTABLE) {
    size_t n = 0;
    lua_pushnil(L);
    while (lua_next(L, -2)) n++, lua_pop(L, 1);
    o->headers = calloc(n ? n : 1, sizeof *o->headers);
    if (!o->headers) luaL_error(L, "out of memory");
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "call %d, outcome %d: headers must map names to strings",
                   call, i);
      rsl_header *h = &o->headers[o->header_count++];
      h->name = dup_lua_string(L, -2, NULL);
      h->value = dup_lua_string(L, -1, NULL);
      for (char *c = h->name; *c; c++)
        if (*c >= 'A' && *c <= 'Z') *c = (char)(*c + 32); /* as stored */
      lua_pop(L, 1);
    }
  } else if (!lua_isnil(L, -1)) {
    luaL_error(L, "call %d, outcome %d: headers must be a table", call, i);
  }
  lua_settop(L, t - 1);
}

static void on_play_done(void *ud, rsl_call_result *r) {
  play *p = ud;
  int i = p->s.current;
  p->results[i] = *r; /* owns r->last now */
  p->done[i] = 1;
}

static void on_gap(void *ud) { (void)ud; }

/* Runs the virtual loop until flag is set (or nothing is left to run). */
static void run_until(lua_State *L, play *p, const int *flag) {
  while (!*flag) {
    int rc = rsl_loop_step(p->env.loop, UINT64_MAX);
    if (rc < 0) luaL_error(L, "virtual loop: %s", strerror(-rc));
    if (rc == 0 && !*flag) luaL_error(L, "play: the call never ended");
  }
}

/* core.play(policy, { outcomes, ... }, { gap_ms, url, method, events })
 *   -> { calls = { { outcome, attempts, elapsed_ms, started_ms, status |
 *        error, message, sent = { { t_ms, timeout_ms, latency_ms, status |
 *        error, repeated }, ... } }, ... }, events = "JSON lines" (none
 *        with events = false) }
 * Plays each list of outcomes as one call, one call after the other
 * (gap_ms of virtual time between a call's end and the next one's start),
 * all on one client, so breaker and budget state carries from call to call.
 * When a call's outcomes run out, its last one repeats (marked repeated). */
static int core_play(lua_State *L) {
  rsl_runtime *rt = rsl_core_runtime(L);
  rsl_policy *policy = rsl_policy_check(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (lua_isnoneornil(L, 3)) {
    lua_settop(L, 2);
    lua_newtable(L);
  }
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_getfield(L, 3, "gap_ms");
  double gap_ms = luaL_optnumber(L, -1, 0);
  luaL_argcheck(L, gap_ms >= 0, 3, "gap_ms must be >= 0");
  lua_getfield(L, 3, "url");
  const char *url = luaL_optstring(L, -1, "http://upstream.test/");
  lua_getfield(L, 3, "method");
  const char *method = luaL_optstring(L, -1, "GET");
  lua_Integer ncalls = luaL_len(L, 2);
  luaL_argcheck(L, ncalls >= 1 && ncalls <= PLAY_MAX_CALLS, 2,
                "expected a non-empty list of calls");

  play *p = lua_newuserdatauv(L, sizeof *p, 0);
  memset(p, 0, sizeof *p);
  if (luaL_newmetatable(L, PLAY_MT)) {
    lua_pushcfunction(L, play_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  p->s.calls = calloc((size_t)ncalls, sizeof *p->s.calls);
  p->s.counts = calloc((size_t)ncalls, sizeof *p->s.counts);
  p->results = calloc((size_t)ncalls, sizeof *p->results);
  p->done = calloc((size_t)ncalls, sizeof *p->done);
  if (!p->s.calls || !p->s.counts || !p->results || !p->done)
    return luaL_error(L, "out of memory");
  p->s.call_count = (size_t)ncalls;
  for (lua_Integer c = 1; c <= ncalls; c++) {
    if (lua_rawgeti(L, 2, c) != LUA_TTABLE)
      return luaL_error(L, "call %d: expected a list of outcomes", (int)c);
    lua_Integer n = luaL_len(L, -1);
    if (n < 1 || n > PLAY_MAX_OUTCOMES)
      return luaL_error(L, "call %d: expected a non-empty list of outcomes",
                        (int)c);
    p->s.calls[c - 1] = calloc((size_t)n, sizeof **p->s.calls);
    if (!p->s.calls[c - 1]) return luaL_error(L, "out of memory");
    p->s.counts[c - 1] = (size_t)n;
    for (lua_Integer i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      read_outcome(L, &p->s.calls[c - 1][i - 1], (int)c, (int)i);
    }
    lua_pop(L, 1);
  }

  /* events = false: no event log (a planner playing many calls needs only
   * the outcomes, and building the lines was most of the cost) */
  lua_getfield(L, 3, "events");
  int events = lua_isnil(L, -1) || lua_toboolean(L, -1);
  lua_pop(L, 1);
  int rc = rsl_loop_new_virtual(&p->env.loop, PLAY_EPOCH_NS);
  if (rc < 0 || (events && rsl_log_open_memory(&p->log) < 0) ||
      !(p->client = rsl_client_new(rsl_policy_name(policy))))
    return luaL_error(L, "out of memory");
  p->s.loop = p->env.loop;
  p->env.sender = &SCRIPT_SENDER;
  p->env.sender_impl = &p->s;
  p->env.log = p->log;
  p->env.prng = &rt->prng;

  lua_createtable(L, 0, 2);
  lua_createtable(L, (int)ncalls, 0);
  size_t sent_from = 0; /* calls play one after the other: their sends too */
  for (int c = 0; c < (int)ncalls; c++) {
    p->s.current = c;
    p->s.next = 0;
    p->s.call_started_ns = rsl_loop_now_ns(p->env.loop);
    double started_ms =
        (double)(p->s.call_started_ns - PLAY_EPOCH_NS) / 1e6;
    rsl_call_request req = {.method = method, .url = url};
    const char *err = NULL;
    if (rsl_call_start(&p->env, p->client, policy, NULL, &req, on_play_done,
                       p, &err) < 0)
      return luaL_error(L, "%s", err);
    run_until(L, p, &p->done[c]);
    if (gap_ms > 0 && c + 1 < (int)ncalls) {
      rsl_timer gap;
      rsl_timer_init(&gap, on_gap, NULL);
      /* The gap's end: nothing else is scheduled between calls. */
      if (rsl_timer_start(p->env.loop, &gap, (uint64_t)(gap_ms * 1e6)) < 0)
        return luaL_error(L, "out of memory");
      while (rsl_timer_active(&gap)) rsl_loop_step(p->env.loop, UINT64_MAX);
    }

    const rsl_call_result *r = &p->results[c];
    lua_createtable(L, 0, 8);
    lua_pushstring(L, rsl_outcome_name(r->outcome));
    lua_setfield(L, -2, "outcome");
    lua_pushinteger(L, r->attempts);
    lua_setfield(L, -2, "attempts");
    lua_pushnumber(L, r->elapsed_ms);
    lua_setfield(L, -2, "elapsed_ms");
    lua_pushnumber(L, started_ms);
    lua_setfield(L, -2, "started_ms");
    if (r->attempts > 0)
      rsl_policy_push_status(L, r->last.status, r->last.error);
    if (r->message[0]) {
      lua_pushstring(L, r->message);
      lua_setfield(L, -2, "message");
    }
    lua_newtable(L);
    lua_Integer k = 0;
    for (size_t i = sent_from; i < p->s.sent_len; i++) {
      const script_sent *sn = &p->s.sent[i];
      if (sn->call != c) continue;
      lua_createtable(L, 0, 6);
      lua_pushnumber(L, sn->t_ms);
      lua_setfield(L, -2, "t_ms");
      lua_pushnumber(L, sn->timeout_ms);
      lua_setfield(L, -2, "timeout_ms");
      lua_pushnumber(L, sn->latency_ms);
      lua_setfield(L, -2, "latency_ms");
      rsl_policy_push_status(L, sn->status, sn->error);
      lua_pushboolean(L, sn->repeated);
      lua_setfield(L, -2, "repeated");
      lua_rawseti(L, -2, ++k);
    }
    lua_setfield(L, -2, "sent");
    lua_rawseti(L, -2, c + 1);
    sent_from = p->s.sent_len;
  }
  lua_setfield(L, -2, "calls");
  if (p->log) {
    size_t len;
    const char *lines = rsl_log_memory(p->log, &len);
    lua_pushlstring(L, lines, len);
    lua_setfield(L, -2, "events");
  }
  play_free(p); /* now, not at the next collection */
  return 1;
}

void rsl_lua_testing_open(lua_State *L) {
  lua_pushcfunction(L, core_play);
  lua_setfield(L, -2, "play");
}
