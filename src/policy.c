/*
 * policy — policy versions and decisions.  See policy.h.
 *
 * Loading, sandboxing and validating a policy file with friendly messages
 * happens in lua/resilua/policy.lua; this file turns the normalized table
 * into C settings (checking every field again: it is untrusted input) and
 * runs `decide` through rsl_luacall with the policy instruction limit.
 */
#include "policy.h"

#include <lauxlib.h>
#include <lua.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "grpc/grpc.h"
#include "luacall.h"
#include "sandbox.h"

#define POLICY_MT "resilua.policy"
/* Nesting kept when the host copies a policy table out of its state. */
#define COPY_MAX_DEPTH 16
/* The nice value of the thread that loads a policy on reload. */
#define LOADER_NICE 10
/* Policy files listed per folder. */
#define POLICY_NAMES_MAX 512

struct rsl_policy {
  int refs;
  rsl_policy_conf conf;
  char *name, *version;
  rsl_sandbox *sb; /* the policy's own state; NULL: a script's policy */
  lua_State *L;   /* sb's state, or the script's main thread */
  int table_ref;  /* the normalized table, given to decide as a.policy */
  int decide_ref; /* LUA_NOREF without decide */
  int on_change_ref; /* breaker.on_change, LUA_NOREF without one */
  char decide_where[128]; /* "file:line" of decide, for error messages */
};

typedef struct policy_box {
  rsl_policy *p;
} policy_box;

void rsl_policy_ref(rsl_policy *p) { p->refs++; }

static void conf_free(rsl_policy_conf *c) {
  free(c->idempotency_header);
  for (size_t i = 0; i < c->idempotency_method_count; i++)
    free(c->idempotency_methods[i]);
  free(c->idempotency_methods);
}

void rsl_policy_unref(rsl_policy *p) {
  if (!p || --p->refs > 0) return;
  if (p->sb) {
    rsl_sandbox_free_aside(p->sb); /* the refs go with the state */
  } else if (p->L) {
    luaL_unref(p->L, LUA_REGISTRYINDEX, p->table_ref);
    luaL_unref(p->L, LUA_REGISTRYINDEX, p->decide_ref);
    luaL_unref(p->L, LUA_REGISTRYINDEX, p->on_change_ref);
  }
  conf_free(&p->conf);
  free(p->name);
  free(p->version);
  free(p);
}

const rsl_policy_conf *rsl_policy_conf_of(const rsl_policy *p) {
  return &p->conf;
}
const char *rsl_policy_name(const rsl_policy *p) { return p->name; }
const char *rsl_policy_version(const rsl_policy *p) { return p->version; }

/* --- building from the normalized table ---------------------------------- */

/* Pushes t[key] where t is at idx; raises unless its type is `type` (or
 * nil when optional). */
static int field(lua_State *L, int idx, const char *key, int type,
                 int optional) {
  int got = lua_getfield(L, idx, key);
  if (got == type || (optional && got == LUA_TNIL)) return got;
  return luaL_error(L, "policy field '%s': expected %s, got %s", key,
                    lua_typename(L, type), luaL_typename(L, -1));
}

static double num_field(lua_State *L, int idx, const char *key, double lo,
                        double hi) {
  field(L, idx, key, LUA_TNUMBER, 0);
  double v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  if (!(v >= lo && v <= hi))
    luaL_error(L, "policy field '%s': %f is out of range [%f, %f]", key, v, lo,
               hi);
  return v;
}

/* t[key], or dflt when it is nil. */
static double opt_num_field(lua_State *L, int idx, const char *key,
                            double dflt, double lo, double hi) {
  int got = lua_getfield(L, idx, key);
  lua_pop(L, 1);
  return got == LUA_TNIL ? dflt : num_field(L, idx, key, lo, hi);
}

static char *str_field(lua_State *L, int idx, const char *key) {
  field(L, idx, key, LUA_TSTRING, 0);
  char *s = strdup(lua_tostring(L, -1));
  lua_pop(L, 1);
  if (!s) luaL_error(L, "out of memory");
  return s;
}

/* Sub-table t[key] pushed, or 0 (nothing pushed) when it is false. */
static int section(lua_State *L, int idx, const char *key) {
  int got = lua_getfield(L, idx, key);
  if (got == LUA_TTABLE) return 1;
  if (got == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  return luaL_error(L, "policy field '%s': expected a table or false", key);
}

#define MAX_MS 86400000.0 /* a day: anything longer is a typo */

/* retry_on.grpc: status codes by name or number; a bit per code.
 * Absent: none. */
static unsigned grpc_codes_field(lua_State *L, int r) {
  unsigned codes = 0;
  if (lua_getfield(L, r, "grpc") == LUA_TTABLE) {
    for (lua_Integer i = 1; lua_rawgeti(L, -1, i) != LUA_TNIL; i++) {
      int ok = 0, named;
      lua_Integer code = lua_tointegerx(L, -1, &ok);
      if (!ok && lua_type(L, -1) == LUA_TSTRING &&
          rsl_grpc_code_parse(lua_tostring(L, -1), &named) == 0) {
        code = named;
        ok = 1;
      }
      if (!ok || code < 0 || code >= RSL_GRPC_CODE_COUNT)
        luaL_error(L, "retry_on.grpc: bad gRPC status code");
      codes |= 1u << code;
      lua_pop(L, 1);
    }
    lua_pop(L, 1); /* the nil */
  }
  lua_pop(L, 1); /* grpc */
  return codes;
}

/* open_ms: a number, or the list of durations by opening in a row that
 * policy.lua computes from a function (the core never calls Lua there). */
static void read_open_ms(lua_State *L, int s, rsl_breaker_conf *b) {
  if (lua_getfield(L, s, "open_ms") != LUA_TTABLE) {
    lua_pop(L, 1);
    b->open_ms[0] = num_field(L, s, "open_ms", 0, MAX_MS);
    b->open_ms_count = 1;
    return;
  }
  int list = lua_gettop(L);
  lua_Integer n = (lua_Integer)lua_rawlen(L, list);
  if (n < 1 || n > RSL_BREAKER_OPEN_STEPS)
    luaL_error(L, "policy field 'breaker.open_ms': 1 to %d durations",
               RSL_BREAKER_OPEN_STEPS);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, list, i);
    double v = lua_tonumber(L, -1);
    if (!lua_isnumber(L, -1) || !(v >= 0 && v <= MAX_MS))
      luaL_error(L, "policy field 'breaker.open_ms[%d]': expected ms in "
                 "[0, %f]", (int)i, MAX_MS);
    b->open_ms[i - 1] = v;
    lua_pop(L, 1);
  }
  b->open_ms_count = (int)n;
  lua_pop(L, 1);
}

static void read_breaker(lua_State *L, int s, rsl_breaker_conf *b) {
  read_open_ms(L, s, b);
  b->half_open = (int)num_field(L, s, "half_open", 1, 1e6);
  field(L, s, "kind", LUA_TSTRING, 1);
  const char *kind = lua_tostring(L, -1);
  if (kind && strcmp(kind, "rate") == 0) {
    b->kind = RSL_BREAKER_RATE;
  } else if (kind && strcmp(kind, "consecutive") != 0) {
    luaL_error(L, "policy field 'breaker.kind': unknown '%s'", kind);
  }
  lua_pop(L, 1);
  if (b->kind != RSL_BREAKER_RATE) {
    b->failures = (int)num_field(L, s, "failures", 1, 1e6);
    return;
  }
  field(L, s, "window", LUA_TSTRING, 0);
  b->time_window = strcmp(lua_tostring(L, -1), "time") == 0;
  if (!b->time_window && strcmp(lua_tostring(L, -1), "count") != 0)
    luaL_error(L, "policy field 'breaker.window': expected count or time");
  lua_pop(L, 1);
  if (b->time_window)
    b->window_ms = num_field(L, s, "window_ms", RSL_BREAKER_BUCKETS, MAX_MS);
  else
    b->window_size =
        (int)num_field(L, s, "window_size", 1, RSL_BREAKER_MAX_WINDOW);
  b->minimum_calls = (int)num_field(L, s, "minimum_calls", 1, 1e6);
  b->failure_rate = num_field(L, s, "failure_rate", 0.01, 1);
  b->slow_call_rate = num_field(L, s, "slow_call_rate", 0.01, 1);
  if (field(L, s, "slow_call_ms", LUA_TNUMBER, 1) == LUA_TNUMBER) {
    lua_pop(L, 1);
    b->slow_call_ms = num_field(L, s, "slow_call_ms", 1, MAX_MS);
  } else {
    lua_pop(L, 1);
  }
}

/* An optional duration: 0 when absent. */
static double opt_ms_field(lua_State *L, int t, const char *name) {
  int present = field(L, t, name, LUA_TNUMBER, 1) == LUA_TNUMBER;
  lua_pop(L, 1);
  return present ? num_field(L, t, name, 1, MAX_MS) : 0;
}

static void read_conf(lua_State *L, int t, rsl_policy_conf *c) {
  c->max_attempts = (int)num_field(L, t, "max_attempts", 1, 100);
  c->per_try_timeout_ms = num_field(L, t, "per_try_timeout_ms", 1, MAX_MS);
  c->connect_timeout_ms = num_field(L, t, "connect_timeout_ms", 1, MAX_MS);
  c->deadline_ms = num_field(L, t, "deadline_ms", 1, MAX_MS);
  c->max_response_bytes =
      (size_t)num_field(L, t, "max_response_bytes", 1, 1 << 30);
  c->first_byte_timeout_ms = opt_ms_field(L, t, "first_byte_timeout_ms");
  c->idle_timeout_ms = opt_ms_field(L, t, "idle_timeout_ms");
  c->stream_timeout_ms = opt_ms_field(L, t, "stream_timeout_ms");

  field(L, t, "backoff", LUA_TTABLE, 0);
  int b = lua_gettop(L);
  c->base_ms = num_field(L, b, "base_ms", 0, MAX_MS);
  c->max_ms = num_field(L, b, "max_ms", 0, MAX_MS);
  field(L, b, "jitter", LUA_TSTRING, 0);
  if (rsl_jitter_parse(lua_tostring(L, -1), &c->jitter) < 0)
    luaL_error(L, "policy field 'backoff.jitter': unknown '%s'",
               lua_tostring(L, -1));
  lua_pop(L, 2);

  field(L, t, "retry_on", LUA_TTABLE, 0);
  int r = lua_gettop(L);
  field(L, r, "status", LUA_TTABLE, 0);
  for (lua_Integer i = 1; lua_rawgeti(L, -1, i) != LUA_TNIL; i++) {
    lua_Integer s = lua_tointeger(L, -1);
    if (s < 100 || s > 599) luaL_error(L, "retry_on.status: bad status");
    c->retry_status[s] = 1;
    lua_pop(L, 1);
  }
  lua_pop(L, 2);
  field(L, r, "errors", LUA_TTABLE, 0);
  for (lua_Integer i = 1; lua_rawgeti(L, -1, i) != LUA_TNIL; i++) {
    rsl_error_class e;
    const char *name = lua_tostring(L, -1);
    if (!name || rsl_error_class_parse(name, &e) < 0)
      luaL_error(L, "retry_on.errors: unknown error class");
    c->retry_errors |= 1u << e;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  c->retry_grpc = grpc_codes_field(L, r);
  /* refused: an attempt the breaker or the throttle refused (nothing was
   * sent) is tried again after the backoff, while attempts and time last. */
  if (field(L, r, "refused", LUA_TBOOLEAN, 1) == LUA_TBOOLEAN)
    c->retry_refused = lua_toboolean(L, -1);
  lua_pop(L, 3); /* refused, errors, retry_on */

  if (section(L, t, "retry_after")) {
    field(L, -1, "respect", LUA_TBOOLEAN, 0);
    c->retry_after_respect = lua_toboolean(L, -1);
    lua_pop(L, 1);
    c->retry_after_max_ms = num_field(L, lua_gettop(L), "max_ms", 0, MAX_MS);
    lua_pop(L, 1);
  }

  if (section(L, t, "idempotency")) {
    int s = lua_gettop(L);
    c->idempotency_header = str_field(L, s, "header");
    field(L, s, "methods", LUA_TTABLE, 0);
    size_t n = lua_rawlen(L, -1);
    c->idempotency_methods = calloc(n + 1, sizeof *c->idempotency_methods);
    if (!c->idempotency_methods) luaL_error(L, "out of memory");
    for (size_t i = 0; i < n; i++) {
      lua_rawgeti(L, -1, (lua_Integer)i + 1);
      const char *m = lua_tostring(L, -1);
      if (!m || !(c->idempotency_methods[i] = strdup(m)))
        luaL_error(L, "idempotency.methods: expected strings");
      c->idempotency_method_count = i + 1;
      lua_pop(L, 1);
    }
    lua_pop(L, 2);
  }

  if (section(L, t, "breaker")) {
    int s = lua_gettop(L);
    c->breaker_enabled = 1;
    read_breaker(L, s, &c->breaker);
    field(L, s, "key", LUA_TSTRING, 0);
    const char *key = lua_tostring(L, -1);
    c->breaker_key = strcmp(key, "url") == 0      ? RSL_BREAKER_KEY_URL
                     : strcmp(key, "global") == 0 ? RSL_BREAKER_KEY_GLOBAL
                                                  : RSL_BREAKER_KEY_HOST;
    lua_pop(L, 2);
  }

  if (section(L, t, "budget")) {
    int s = lua_gettop(L);
    c->budget_enabled = 1;
    /* A ratio budget has neither; a quota has no token_ratio. */
    c->budget_max_tokens = opt_num_field(L, s, "max_tokens", 10, 1, 1e9);
    c->budget_token_ratio = opt_num_field(L, s, "token_ratio", 0.1, 0, 1e9);
    /* kind = "quota": the AWS retry quota; its costs default to the SDKs'
     * (5 a retry, 10 after a timeout, 1 back for a call without retries). */
    c->budget_kind = RSL_BUDGET_BUCKET;
    if (field(L, s, "kind", LUA_TSTRING, 1) == LUA_TSTRING) {
      const char *kind = lua_tostring(L, -1);
      if (strcmp(kind, "quota") == 0) c->budget_kind = RSL_BUDGET_QUOTA;
      else if (strcmp(kind, "ratio") == 0) c->budget_kind = RSL_BUDGET_RATIO;
      else if (strcmp(kind, "bucket") != 0)
        luaL_error(L, "policy field 'budget.kind': unknown '%s'", kind);
    }
    lua_pop(L, 1);
    c->budget_retry_cost = opt_num_field(L, s, "retry_cost", 5, 0, 1e9);
    c->budget_timeout_cost = opt_num_field(L, s, "timeout_cost", 10, 0, 1e9);
    c->budget_success_refund =
        opt_num_field(L, s, "success_refund", 1, 0, 1e9);
    /* kind = "ratio": Finagle's RetryBudget defaults (20 % over 10 s, 10
     * retries a second always allowed). */
    c->budget_ratio = opt_num_field(L, s, "ratio", 0.2, 0, 1000);
    c->budget_ttl_ms = opt_num_field(L, s, "ttl_ms", 10000, 1000, 60 * 60e3);
    c->budget_min_per_s = opt_num_field(L, s, "min_per_s", 10, 0, 1e6);
    lua_pop(L, 1);
  }

  if (section(L, t, "hedge")) {
    int s = lua_gettop(L);
    if (lua_getfield(L, s, "after_ms") == LUA_TSTRING &&
        strcmp(lua_tostring(L, -1), "p95") == 0) {
      c->hedge_after_ms = -1;
      lua_pop(L, 1);
    } else {
      lua_pop(L, 1);
      c->hedge_after_ms = num_field(L, s, "after_ms", 1, MAX_MS);
    }
    c->hedge_max = (int)num_field(L, s, "max", 2, RSL_HEDGE_MAX);
    c->hedge_enabled = 1;
    lua_pop(L, 1);
  }

  if (section(L, t, "throttle")) {
    int s = lua_gettop(L);
    field(L, s, "kind", LUA_TSTRING, 0);
    if (strcmp(lua_tostring(L, -1), "adaptive") != 0)
      luaL_error(L, "policy field 'throttle.kind': unknown '%s'",
                 lua_tostring(L, -1));
    lua_pop(L, 1);
    c->throttle_enabled = 1;
    c->throttle_k = num_field(L, s, "k", 1, 100);
    c->throttle_window_ms = num_field(L, s, "window_ms", 100, MAX_MS);
    lua_pop(L, 1);
  }
}

static int policy_gc(lua_State *L) {
  policy_box *box = luaL_checkudata(L, 1, POLICY_MT);
  rsl_policy_unref(box->p);
  box->p = NULL;
  return 0;
}

rsl_policy *rsl_policy_check(lua_State *L, int idx) {
  policy_box *box = luaL_checkudata(L, idx, POLICY_MT);
  if (!box->p) luaL_argerror(L, idx, "policy already released");
  return box->p;
}

/* Reads the normalized table at idx of L (the state that will run the
 * policy) into p: settings, and refs to the table, decide and on_change. */
static void fill_from_table(lua_State *L, rsl_policy *p, int idx) {
  idx = lua_absindex(L, idx);
  luaL_checktype(L, idx, LUA_TTABLE);
  p->name = str_field(L, idx, "name");
  p->version = str_field(L, idx, "version");
  read_conf(L, idx, &p->conf);
  int top = lua_gettop(L);
  if (lua_getfield(L, idx, "breaker") == LUA_TTABLE &&
      lua_getfield(L, -1, "on_change") == LUA_TFUNCTION)
    p->on_change_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* pops it */
  lua_settop(L, top);
  if (field(L, idx, "decide", LUA_TFUNCTION, 1) == LUA_TFUNCTION) {
    lua_Debug ar;
    lua_pushvalue(L, -1);
    lua_getinfo(L, ">S", &ar);
    snprintf(p->decide_where, sizeof p->decide_where, "%s:%d", ar.short_src,
             ar.linedefined);
    p->decide_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  } else {
    lua_pop(L, 1);
  }
  lua_pushvalue(L, idx);
  p->table_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* Pushes a box that owns p (NULL: filled in later).  The box exists
 * before anything else is done with p, so a raise later frees p through
 * __gc. */
static policy_box *push_box(lua_State *L, rsl_policy *p) {
  policy_box *box = lua_newuserdatauv(L, sizeof *box, 0);
  box->p = p;
  if (luaL_newmetatable(L, POLICY_MT)) {
    lua_pushcfunction(L, policy_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  return box;
}

int rsl_policy_push_new(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  luaL_checktype(L, idx, LUA_TTABLE);
  policy_box *box = push_box(L, NULL);
  rsl_policy *p = calloc(1, sizeof *p);
  if (!p) return luaL_error(L, "out of memory");
  p->refs = 1;
  p->table_ref = p->decide_ref = p->on_change_ref = LUA_NOREF;
  box->p = p;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  p->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  fill_from_table(L, p, idx);
  return 1;
}

/* --- policies in their own state ----------------------------------------- */

/* What the host asks the sandbox to load (pointers into the host's stack,
 * valid during the call). */
typedef struct load_request {
  rsl_policy *p;
  const char *path;
  const char *const *dirs; /* the policy path */
  size_t dir_count;
  lua_State *host; /* with overrides: the state that holds them (only read) */
  int overrides;   /* their index in host; 0: none */
} load_request;

static void copy_out(lua_State *S, int si, lua_State *H, int depth);

/* Runs in the sandbox, under the load limits: the policy module's loader
 * (its own copy of resilua.policy) builds the normalized table, then the
 * core reads it. */
static int build_in_sandbox(lua_State *L) {
  const load_request *req = lua_touserdata(L, 1);
  lua_settop(L, 0);
  luaL_checkstack(L, 3 * COPY_MAX_DEPTH + 16, "policy");
  lua_getglobal(L, "require");
  lua_pushliteral(L, "resilua.policy");
  lua_call(L, 1, 1);
  lua_getfield(L, 1, "build_sandboxed");
  lua_pushstring(L, req->path);
  lua_createtable(L, (int)req->dir_count, 0);
  for (size_t i = 0; i < req->dir_count; i++) {
    lua_pushstring(L, req->dirs[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  if (req->overrides) copy_out(req->host, req->overrides, L, 0);
  else lua_pushnil(L);
  lua_call(L, 3, 1);
  fill_from_table(L, req->p, -1);
  lua_Integer mb = RSL_SANDBOX_DEFAULT_MEMORY_MB;
  if (lua_getfield(L, -1, "memory_mb") == LUA_TNUMBER)
    mb = lua_tointeger(L, -1);
  if (mb < 1 || mb > RSL_SANDBOX_MAX_MEMORY_MB)
    luaL_error(L, "%s: memory_mb must be in [1, %d]", req->path,
               RSL_SANDBOX_MAX_MEMORY_MB);
  if (rsl_sandbox_set_cap(req->p->sb, (size_t)mb << 20) < 0)
    luaL_error(L, "%s: the policy already uses %d MB, over memory_mb = %d",
               req->path, (int)(rsl_sandbox_memory(req->p->sb) >> 20),
               (int)mb);
  lua_settop(L, 0);
  return 0;
}

/* Copies plain data from S (value at si) to H: tables, strings, numbers,
 * booleans; a function becomes the string "<function>".  Raw reads only,
 * nothing allocated in S, so no code of S runs (S needs two free stack
 * slots a level); pushes into H may raise, in H. */
static void copy_out(lua_State *S, int si, lua_State *H, int depth) {
  si = lua_absindex(S, si);
  switch (lua_type(S, si)) {
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(S, si, &len);
    lua_pushlstring(H, s, len);
    return;
  }
  case LUA_TNUMBER:
    if (lua_isinteger(S, si)) lua_pushinteger(H, lua_tointeger(S, si));
    else lua_pushnumber(H, lua_tonumber(S, si));
    return;
  case LUA_TBOOLEAN:
    lua_pushboolean(H, lua_toboolean(S, si));
    return;
  case LUA_TFUNCTION:
    lua_pushliteral(H, "<function>");
    return;
  case LUA_TTABLE:
    break;
  default:
    lua_pushfstring(H, "<%s>", luaL_typename(S, si));
    return;
  }
  if (depth >= COPY_MAX_DEPTH) {
    lua_pushliteral(H, "<too deep>");
    return;
  }
  luaL_checkstack(H, 4, "policy copy");
  lua_newtable(H);
  lua_pushnil(S);
  while (lua_next(S, si)) {
    int kt = lua_type(S, -2);
    if (kt == LUA_TSTRING || kt == LUA_TNUMBER || kt == LUA_TBOOLEAN) {
      copy_out(S, -2, H, depth + 1);
      copy_out(S, -1, H, depth + 1);
      lua_rawset(H, -3);
    }
    lua_pop(S, 1);
  }
}

/* Builds the policy at path in a new sandbox (plain C and the policy's own
 * state: safe on any thread).  The policy (one ref, owned by the caller),
 * or NULL with *err (malloc'd, NULL when out of memory). */
static rsl_policy *build_policy(const char *path, const char *const *dirs,
                                size_t dir_count, lua_State *host,
                                int overrides, char **err) {
  *err = NULL;
  rsl_policy *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->refs = 1;
  p->table_ref = p->decide_ref = p->on_change_ref = LUA_NOREF;
  p->sb = rsl_sandbox_new((size_t)RSL_SANDBOX_DEFAULT_MEMORY_MB << 20, NULL);
  if (!p->sb) goto fail;
  p->L = rsl_sandbox_state(p->sb);
  load_request req = {.p = p, .path = path, .dirs = dirs,
                      .dir_count = dir_count, .host = host,
                      .overrides = overrides};
  lua_pushcfunction(p->L, build_in_sandbox);
  lua_pushlightuserdata(p->L, &req);
  if (rsl_sandbox_call(p->sb, 1, 0, RSL_POLICY_LOAD_INSTRUCTION_LIMIT,
                       RSL_POLICY_LOAD_TIME_LIMIT_MS, err) == 0)
    return p;
fail:
  /* Give the memory back now, not when a box is collected, and here (a
   * load runs on the loop's thread only at start-up). */
  if (p->sb) rsl_sandbox_free(p->sb);
  p->sb = NULL;
  p->L = NULL;
  rsl_policy_unref(p);
  return NULL;
}

static int push_cstring(lua_State *L) {
  lua_pushstring(L, lua_touserdata(L, 1));
  return 1;
}

/* Pushes the results of a load for `p` (built or NULL with err) on L:
 * policy, table, bytes; or nil, message.  Takes p and err. */
static int push_result(lua_State *L, rsl_policy *p, char *err,
                       rsl_prng *prng) {
  /* The box first: a raise while pushing leaves p owned by it. */
  push_box(L, p);
  if (!p) {
    lua_pushnil(L);
    /* protected, so that err is freed even when the push raises */
    lua_pushcfunction(L, push_cstring);
    lua_pushlightuserdata(L, err ? err : "out of memory");
    int rc = lua_pcall(L, 1, 1, 0);
    free(err);
    if (rc != LUA_OK) return lua_error(L);
    lua_remove(L, -3); /* the empty box */
    return 2;
  }
  rsl_sandbox_set_prng(p->sb, prng);
  lua_rawgeti(p->L, LUA_REGISTRYINDEX, p->table_ref);
  copy_out(p->L, -1, L, 0);
  lua_pop(p->L, 1);
  lua_pushinteger(L, (lua_Integer)rsl_sandbox_memory(p->sb));
  return 3;
}

/* The policy path argument at idx as an array of strings (which stay on
 * L's stack). */
static size_t check_dirs(lua_State *L, int idx, const char *dirs[64]) {
  luaL_checktype(L, idx, LUA_TTABLE);
  size_t n = lua_rawlen(L, idx);
  luaL_argcheck(L, n <= 64, idx, "at most 64 folders");
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, idx, (lua_Integer)i + 1);
    dirs[i] = lua_tostring(L, -1);
    luaL_argcheck(L, dirs[i] != NULL, idx, "folders must be strings");
  }
  return n;
}

int rsl_policy_push_loaded(lua_State *L, rsl_prng *prng) {
  const char *path = luaL_checkstring(L, 1);
  int overrides = lua_istable(L, 3) ? 3 : 0;
  const char *dirs[64];
  size_t n = check_dirs(L, 2, dirs);
  /* the overrides are read from here by the sandbox: room to walk them */
  luaL_checkstack(L, 2 * COPY_MAX_DEPTH + 8, "policy overrides");
  char *err;
  rsl_policy *p = build_policy(path, dirs, n, L, overrides, &err);
  return push_result(L, p, err, prng);
}

/* --- building on a helper thread ----------------------------------------- */

struct rsl_policy_job {
  pthread_t thread;
  int started;  /* the thread exists and is not joined yet */
  int fds[2];   /* the thread writes a byte to fds[1] when it is done */
  char *path;
  char **dirs;
  size_t dir_count;
  rsl_policy *p; /* the result, or NULL with err */
  char *err;
};

static void *job_main(void *arg) {
  rsl_policy_job *j = arg;
  /* A load yields the CPU to the loop's thread (on Linux the nice value
   * is per thread): calls in flight go first on a busy machine. */
  setpriority(PRIO_PROCESS, (id_t)gettid(), LOADER_NICE);
  j->p = build_policy(j->path, (const char *const *)j->dirs, j->dir_count,
                      NULL, 0, &j->err);
  char byte = 1;
  while (write(j->fds[1], &byte, 1) < 0 && errno == EINTR) {
  }
  return NULL;
}

void rsl_policy_job_free(rsl_policy_job *j) {
  if (!j) return;
  if (j->started) pthread_join(j->thread, NULL);
  for (int i = 0; i < 2; i++)
    if (j->fds[i] >= 0) close(j->fds[i]);
  rsl_policy_unref(j->p);
  free(j->err);
  for (size_t i = 0; i < j->dir_count; i++) free(j->dirs[i]);
  free(j->dirs);
  free(j->path);
  free(j);
}

int rsl_policy_job_start(lua_State *L, rsl_policy_job **out) {
  const char *path = luaL_checkstring(L, 1);
  const char *dirs[64];
  size_t n = check_dirs(L, 2, dirs);
  int rc = -ENOMEM;
  rsl_policy_job *j = calloc(1, sizeof *j);
  if (!j) return rc;
  j->fds[0] = j->fds[1] = -1;
  if (!(j->path = strdup(path)) || !(j->dirs = calloc(n + 1, sizeof *j->dirs)))
    goto out;
  for (; j->dir_count < n; j->dir_count++)
    if (!(j->dirs[j->dir_count] = strdup(dirs[j->dir_count]))) goto out;
  if (pipe2(j->fds, O_CLOEXEC | O_NONBLOCK) < 0) {
    rc = -errno;
    goto out;
  }
  rc = -pthread_create(&j->thread, NULL, job_main, j);
  if (rc == 0) j->started = 1;
out:
  if (rc < 0) {
    rsl_policy_job_free(j);
    j = NULL;
  }
  *out = j;
  return rc;
}

int rsl_policy_job_fd(const rsl_policy_job *j) { return j->fds[0]; }

int rsl_policy_job_push_result(lua_State *L, rsl_policy_job *j,
                               rsl_prng *prng) {
  if (j->started) {
    pthread_join(j->thread, NULL);
    j->started = 0;
  }
  rsl_policy *p = j->p;
  char *err = j->err;
  j->p = NULL;
  j->err = NULL;
  return push_result(L, p, err, prng);
}

/* --- decisions ----------------------------------------------------------- */

void rsl_policy_decide_builtin(const rsl_policy_conf *c,
                               const rsl_attempt_info *a, rsl_decision *d) {
  const rsl_response *res = a->res;
  int retriable;
  if (res->grpc && res->status) {
    /* A gRPC answer: its status code decides (a response without
     * grpc-status was mapped from the HTTP status). */
    retriable = (c->retry_grpc >> res->grpc_status) & 1u;
    snprintf(d->reason, sizeof d->reason, "gRPC %s %s retry_on.grpc",
             rsl_grpc_code_name(res->grpc_status), retriable ? "in" : "not in");
  } else if (res->status) {
    retriable = res->status < 600 && c->retry_status[res->status];
    snprintf(d->reason, sizeof d->reason, "status %ld %s retry_on",
             res->status, retriable ? "in" : "not in");
  } else {
    retriable = (c->retry_errors >> res->error) & 1u;
    snprintf(d->reason, sizeof d->reason, "error %s %s retry_on",
             rsl_error_class_name(res->error), retriable ? "in" : "not in");
  }
  /* Server signals, in rising order of authority (README, "Server
   * signals"): a 409 to a keyed request means our first attempt is still
   * running there, so the same key may go again; x-should-retry is the
   * server's own verdict; a malformed or negative gRPC pushback means "do
   * not retry" (gRFC A6); and a 422 to a keyed request means the key was
   * used with another payload, which no retry can fix. */
  const rsl_hints *h = a->hints;
  if (res->status == 409 && a->has_idempotency_key) {
    retriable = 1;
    snprintf(d->reason, sizeof d->reason,
             "status 409 with idempotency key: first attempt still running");
  }
  if (h && h->should_retry == 0) {
    retriable = 0;
    snprintf(d->reason, sizeof d->reason, "x-should-retry: false");
  } else if (h && h->should_retry == 1 && !retriable) {
    retriable = 1;
    snprintf(d->reason, sizeof d->reason, "x-should-retry: true");
  }
  if (h && h->pushback_stop) {
    retriable = 0;
    snprintf(d->reason, sizeof d->reason,
             "grpc-retry-pushback-ms: server says do not retry");
  }
  if (res->status == 422 && a->has_idempotency_key) {
    retriable = 0;
    snprintf(d->reason, sizeof d->reason,
             "status 422 with idempotency key: key reused with another "
             "payload");
  }
  d->retry = retriable;
  d->exhausted = 0;
  d->delay_ms = retriable ? rsl_backoff_ms(a->prng, c->jitter, c->base_ms,
                                           c->max_ms, a->attempt,
                                           a->prev_delay_ms)
                          : 0;
  /* gRFC A6: a valid pushback replaces the backoff for this retry. */
  if (retriable && h && h->pushback_ms >= 0) {
    d->delay_ms = h->pushback_ms;
    snprintf(d->reason, sizeof d->reason, "grpc-retry-pushback-ms %.0f",
             h->pushback_ms);
  }
}

/* Sets t[key] = v (t on top) when v is present (>= 0). */
static void set_num(lua_State *L, const char *key, double v) {
  if (v < 0) return;
  lua_pushnumber(L, v);
  lua_setfield(L, -2, key);
}

/* a.server: the hints, normalised (hints.h); an empty table without any. */
static void push_server(lua_State *L, const rsl_hints *h) {
  lua_createtable(L, 0, 10);
  if (!h) return;
  set_num(L, "retry_after_ms", h->retry_after_ms);
  if (h->retry_after_from) {
    lua_pushstring(L, h->retry_after_from);
    lua_setfield(L, -2, "retry_after_from");
  }
  set_num(L, "reset_ms", h->reset_ms);
  set_num(L, "remaining", h->remaining);
  set_num(L, "quota", h->quota);
  set_num(L, "window_s", h->window_s);
  set_num(L, "pushback_ms", h->pushback_ms);
  if (h->pushback_stop) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "pushback_stop");
  }
  if (h->should_retry >= 0) {
    lua_pushboolean(L, h->should_retry);
    lua_setfield(L, -2, "should_retry");
  }
  set_num(L, "wait_ms", h->wait_ms);
}

void rsl_policy_push_headers(lua_State *L, const rsl_response *res) {
  lua_createtable(L, 0, (int)res->header_count);
  for (size_t i = 0; i < res->header_count; i++) {
    lua_pushstring(L, res->headers[i].value);
    lua_setfield(L, -2, res->headers[i].name);
  }
}

void rsl_policy_push_status(lua_State *L, long status, rsl_error_class error) {
  if (status) {
    lua_pushinteger(L, status);
    lua_setfield(L, -2, "status");
  } else {
    lua_pushstring(L, rsl_error_class_name(error));
    lua_setfield(L, -2, "error");
  }
}

void rsl_policy_push_grpc(lua_State *L, const rsl_response *res) {
  if (!res->grpc) return;
  lua_pushinteger(L, res->grpc_status);
  lua_setfield(L, -2, "grpc_status");
  if (res->grpc_message) {
    lua_pushstring(L, res->grpc_message);
    lua_setfield(L, -2, "grpc_message");
  }
}

static void push_attempt(lua_State *L, const rsl_policy *p,
                         const rsl_attempt_info *a) {
  const rsl_response *res = a->res;
  lua_createtable(L, 0, 16);
  lua_pushinteger(L, a->attempt);
  lua_setfield(L, -2, "attempt");
  lua_pushstring(L, a->method);
  lua_setfield(L, -2, "method");
  lua_pushstring(L, a->url);
  lua_setfield(L, -2, "url");
  rsl_policy_push_status(L, res->status, res->error);
  rsl_policy_push_grpc(L, res);
  if (res->retry_after_ms >= 0) {
    lua_pushnumber(L, res->retry_after_ms);
    lua_setfield(L, -2, "retry_after_ms");
  }
  rsl_policy_push_headers(L, res);
  lua_setfield(L, -2, "headers");
  push_server(L, a->hints);
  lua_setfield(L, -2, "server");
  lua_pushnumber(L, res->latency_ms);
  lua_setfield(L, -2, "latency_ms");
  lua_pushnumber(L, a->elapsed_ms);
  lua_setfield(L, -2, "elapsed_ms");
  lua_pushnumber(L, a->remaining_ms);
  lua_setfield(L, -2, "remaining_ms");
  lua_pushnumber(L, a->prev_delay_ms);
  lua_setfield(L, -2, "prev_delay_ms");
  lua_pushinteger(L, p->conf.max_attempts);
  lua_setfield(L, -2, "max_attempts");
  if (a->budget_tokens >= 0) {
    lua_pushnumber(L, a->budget_tokens);
    lua_setfield(L, -2, "budget");
  }
  if (a->breaker) {
    lua_pushstring(L, a->breaker);
    lua_setfield(L, -2, "breaker");
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, p->table_ref);
  lua_setfield(L, -2, "policy");
}

/* Runs a prepared call (function and nargs arguments on p->L's stack)
 * under the policy limits.  0, or -1 with *err (malloc'd first line, NULL
 * when out of memory). */
static int policy_call(rsl_policy *p, int nargs, char **err) {
  if (p->sb)
    return rsl_sandbox_call(p->sb, nargs, 0, RSL_POLICY_INSTRUCTION_LIMIT,
                            RSL_POLICY_TIME_LIMIT_MS, err);
  *err = NULL;
  if (rsl_luacall_timed(p->L, nargs, 0, RSL_POLICY_INSTRUCTION_LIMIT,
                        RSL_POLICY_TIME_LIMIT_MS) == LUA_OK)
    return 0;
  const char *msg = lua_tostring(p->L, -1);
  /* The event log wants the message; the traceback is noise there. */
  *err = strndup(msg, strcspn(msg, "\n"));
  lua_pop(p->L, 1);
  return -1;
}

/* Raw t[key] pushed; its type. */
static int raw_field(lua_State *L, int t, const char *key) {
  lua_pushstring(L, key);
  return lua_rawget(L, t);
}

/* Reads the decision at t with raw access (a metatable on it is never
 * consulted).  nil: no opinion, the built-in decision in *d stands; false:
 * stop.  Raises a message naming decide's position when it is malformed. */
static void read_decision(lua_State *L, const rsl_policy *p, int t,
                          rsl_decision *d) {
  if (lua_isnoneornil(L, t)) {
    static const char prefix[] = "decide: no opinion; ";
    size_t keep = sizeof d->reason - sizeof prefix;
    memmove(d->reason + sizeof prefix - 1, d->reason, keep);
    d->reason[sizeof d->reason - 1] = '\0';
    memcpy(d->reason, prefix, sizeof prefix - 1);
    return;
  }
  if (lua_type(L, t) == LUA_TBOOLEAN && !lua_toboolean(L, t)) {
    d->retry = 0;
    d->delay_ms = 0;
    snprintf(d->reason, sizeof d->reason, "decide: no retry");
    return;
  }
  if (!lua_istable(L, t))
    luaL_error(L, "%s: decide returned a %s; expected a table "
               "{retry=, delay_ms=, reason=}, false (stop) or nil (apply "
               "the rules)", p->decide_where, luaL_typename(L, t));
  lua_pushnil(L);
  while (lua_next(L, t)) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
    if (strcmp(k, "retry") && strcmp(k, "delay_ms") && strcmp(k, "reason"))
      luaL_error(L, "%s: decide returned an unknown field '%s' (expected "
                 "retry, delay_ms, reason)", p->decide_where, k);
    lua_pop(L, 1);
  }
  if (raw_field(L, t, "retry") != LUA_TBOOLEAN)
    luaL_error(L, "%s: decision.retry must be true or false, got %s",
               p->decide_where, luaL_typename(L, -1));
  d->retry = lua_toboolean(L, -1);
  if (!d->retry) d->delay_ms = 0;
  int type = raw_field(L, t, "delay_ms");
  if (type != LUA_TNIL) {
    double ms = lua_tonumber(L, -1);
    if (type != LUA_TNUMBER || !(ms >= 0 && ms <= MAX_MS))
      luaL_error(L, "%s: decision.delay_ms must be a number of ms in "
                 "[0, 86400000], got %s", p->decide_where,
                 type == LUA_TNUMBER ? "an out-of-range number"
                                     : luaL_typename(L, -1));
    d->delay_ms = ms;
  }
  type = raw_field(L, t, "reason");
  if (type == LUA_TSTRING)
    snprintf(d->reason, sizeof d->reason, "%s", lua_tostring(L, -1));
  else if (type != LUA_TNIL)
    luaL_error(L, "%s: decision.reason must be a string, got %s",
               p->decide_where, luaL_typename(L, -1));
  else
    snprintf(d->reason, sizeof d->reason, "decide");
}

/* Builds `a`, calls decide and reads its answer, all inside the limited
 * call: a metamethod on the answer, or out of memory while building, is
 * caught like any error of the policy. */
static int call_decide(lua_State *L) {
  rsl_policy *p = lua_touserdata(L, 1);
  const rsl_attempt_info *a = lua_touserdata(L, 2);
  rsl_decision *d = lua_touserdata(L, 3);
  lua_settop(L, 0);
  luaL_checkstack(L, 8, "decide");
  lua_rawgeti(L, LUA_REGISTRYINDEX, p->decide_ref);
  push_attempt(L, p, a);
  lua_call(L, 1, 1);
  read_decision(L, p, 1, d);
  return 0;
}

int rsl_policy_decide(rsl_policy *p, const rsl_attempt_info *a,
                      rsl_decision *d, char **err) {
  /* The built-in rules' decision stands when decide has no opinion, and
   * their backoff is the delay of a decide that says retry without saying
   * how long to wait. */
  rsl_policy_decide_builtin(&p->conf, a, d);
  *err = NULL;
  if (p->decide_ref == LUA_NOREF) return 0;
  lua_State *L = p->L;
  int top = lua_gettop(L);
  if (!lua_checkstack(L, 8)) return -1;
  rsl_decision out = *d;
  lua_pushcfunction(L, call_decide);
  lua_pushlightuserdata(L, p);
  lua_pushlightuserdata(L, (void *)a);
  lua_pushlightuserdata(L, &out);
  int rc = policy_call(p, 3, err);
  if (rc == 0) {
    *d = out;
    d->exhausted = 0;
  }
  lua_settop(L, top);
  return rc;
}

/* --- breaker hook -------------------------------------------------------- */

/* Pushes the hook and its arguments inside the limited call, so that even
 * an out-of-memory error while pushing is caught. */
static int call_on_change(lua_State *L) {
  const rsl_policy *p = lua_touserdata(L, 1);
  const char *key = lua_touserdata(L, 2), *from = lua_touserdata(L, 3),
             *to = lua_touserdata(L, 4);
  lua_settop(L, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, p->on_change_ref);
  lua_pushstring(L, key);
  lua_pushstring(L, from);
  lua_pushstring(L, to);
  lua_call(L, 3, 0);
  return 0;
}

int rsl_policy_breaker_changed(rsl_policy *p, const char *key,
                               const char *from, const char *to, char **err) {
  *err = NULL;
  if (p->on_change_ref == LUA_NOREF) return 0;
  lua_State *L = p->L;
  int top = lua_gettop(L);
  if (!lua_checkstack(L, 8)) return -1;
  lua_pushcfunction(L, call_on_change);
  lua_pushlightuserdata(L, p);
  lua_pushlightuserdata(L, (void *)key);
  lua_pushlightuserdata(L, (void *)from);
  lua_pushlightuserdata(L, (void *)to);
  int rc = policy_call(p, 4, err);
  lua_settop(L, top);
  return rc;
}

/* Sorts names for policy_names. */
static int name_cmp(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static int push_names(lua_State *L) {
  char **names = lua_touserdata(L, 2);
  lua_Integer n = lua_tointeger(L, 3);
  for (lua_Integer i = 0; i < n; i++) {
    lua_pushstring(L, names[i]);
    lua_rawseti(L, 1, i + 1);
  }
  return 0;
}

int rsl_policy_names_lua(lua_State *L) {
  const char *dir = luaL_checkstring(L, 1);
  lua_newtable(L);
  DIR *d = opendir(dir);
  if (!d) return 1;
  char *names[POLICY_NAMES_MAX] = {0};
  size_t n = 0;
  struct dirent *e;
  while (n < POLICY_NAMES_MAX && (e = readdir(d)) != NULL) {
    size_t len = strlen(e->d_name);
    if (len < 5 || strcmp(e->d_name + len - 4, ".lua") != 0) continue;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
    if (!rsl_sandbox_is_file(path)) continue;
    if (!(names[n] = strdup(e->d_name))) break;
    n++;
  }
  closedir(d);
  qsort(names, n, sizeof *names, name_cmp);
  /* The pushes may raise (out of memory): protected, so the names are
   * freed either way. */
  lua_pushcfunction(L, push_names);
  lua_pushvalue(L, -2);
  lua_pushlightuserdata(L, names);
  lua_pushinteger(L, (lua_Integer)n);
  int rc = lua_pcall(L, 3, 0, 0);
  for (size_t i = 0; i < n; i++) free(names[i]);
  return rc == LUA_OK ? 1 : lua_error(L);
}
