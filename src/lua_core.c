/*
 * lua_core — the `resilua.core` module: bindings only.  The Lua face is
 * lua/resilua/init.lua; the logic lives in loop, transport, call, policy.
 *
 * Callbacks into Lua (a call ended, a timer fired) are registry refs held
 * by a waiter; they run on the main thread through rsl_luacall, never on
 * the coroutine that registered them.
 */
#include "lua_core.h"

#include <dlfcn.h>
#include <errno.h>
#include <lauxlib.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <limits.h>
#include <time.h>

#include "grpc/grpc.h"
#include "luacall.h"
#include "redact.h"
#include "sandbox.h"
#include "watch.h"

#define RUNTIME_MT "resilua.runtime"
#define WATCH_MT "resilua.watch"
#define CLIENT_MT "resilua.client"
#define MAX_REQUEST_HEADERS 256

static char runtime_key; /* registry key: the runtime userdata */

/* A Lua callback to run later; owned by the runtime's list. */
struct rsl_waiter {
  rsl_runtime *rt;
  rsl_waiter *prev, *next;
  int cb_ref;
  rsl_timer timer; /* for core.timer */
  int chunk_ref;   /* core.call's on_chunk, or LUA_NOREF */
  rsl_call_stream stream;
};

rsl_runtime *rsl_core_runtime(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &runtime_key);
  rsl_runtime *rt = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (!rt) luaL_error(L, "resilua.core is not loaded in this state");
  return rt;
}

static rsl_waiter *waiter_new(lua_State *L, rsl_runtime *rt, int cb_idx) {
  rsl_waiter *w = calloc(1, sizeof *w);
  if (!w) luaL_error(L, "out of memory");
  lua_pushvalue(L, cb_idx);
  w->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  w->chunk_ref = LUA_NOREF;
  w->rt = rt;
  rsl_timer_init(&w->timer, NULL, w);
  w->next = rt->waiters;
  if (w->next) w->next->prev = w;
  rt->waiters = w;
  return w;
}

static void waiter_free(rsl_waiter *w) {
  rsl_runtime *rt = w->rt;
  if (w->prev) w->prev->next = w->next;
  else rt->waiters = w->next;
  if (w->next) w->next->prev = w->prev;
  rsl_timer_stop(rt->loop, &w->timer);
  luaL_unref(rt->L, LUA_REGISTRYINDEX, w->cb_ref);
  luaL_unref(rt->L, LUA_REGISTRYINDEX, w->chunk_ref);
  free(w);
}

/* Runs the waiter's callback with whatever `push` puts on the stack (as
 * its argument), protected, then frees the waiter. */
typedef void (*push_fn)(lua_State *L, void *arg);

static int run_callback(lua_State *L) {
  push_fn push = (push_fn)(uintptr_t)lua_touserdata(L, 2);
  void *arg = lua_touserdata(L, 3);
  lua_settop(L, 1); /* the callback */
  push(L, arg);
  lua_call(L, 1, 0);
  return 0;
}

static void fire(rsl_waiter *w, push_fn push, void *arg) {
  lua_State *L = w->rt->L;
  int top = lua_gettop(L);
  lua_pushcfunction(L, run_callback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->cb_ref);
  lua_pushlightuserdata(L, (void *)(uintptr_t)push);
  lua_pushlightuserdata(L, arg);
  waiter_free(w);
  if (rsl_luacall(L, 3, 0, 0) != LUA_OK)
    fprintf(stderr, "resilua: error in a callback: %s\n", lua_tostring(L, -1));
  lua_settop(L, top);
}

/* Runs the function in registry slot `ref` with the strings a and b (b may
 * be NULL), protected; reports an error and goes on. */
static void call_ref(rsl_runtime *rt, int ref, const char *a, const char *b) {
  lua_State *L = rt->L;
  int top = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  lua_pushstring(L, a);
  lua_pushstring(L, b);
  if (rsl_luacall(L, 2, 0, 0) != LUA_OK)
    fprintf(stderr, "resilua: error in a callback: %s\n", lua_tostring(L, -1));
  lua_settop(L, top);
}

/* --- runtime ------------------------------------------------------------- */

static int runtime_gc(lua_State *L) {
  rsl_runtime *rt = lua_touserdata(L, 1);
  if (!rt->loop) return 0;
  rsl_call_cancel_all(&rt->calls);
  while (rt->waiters) waiter_free(rt->waiters);
  luaL_unref(L, LUA_REGISTRYINDEX, rt->hangup_ref);
  rsl_transport_free(rt->transport);
  rsl_log_free(rt->calls.log);
  rsl_loop_free(rt->loop);
  rt->loop = NULL;
  return 0;
}

static rsl_runtime *runtime_new(lua_State *L) {
  rsl_runtime *rt = lua_newuserdatauv(L, sizeof *rt, 0);
  memset(rt, 0, sizeof *rt);
  luaL_newmetatable(L, RUNTIME_MT);
  lua_pushcfunction(L, runtime_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  rt->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  int rc = rsl_loop_new(&rt->loop);
  if (rc < 0) luaL_error(L, "cannot create the event loop: %s", strerror(-rc));
  if (rsl_transport_new(&rt->transport, rt->loop) < 0 ||
      rsl_log_open(&rt->calls.log, "-") < 0) {
    runtime_gc(L);
    luaL_error(L, "cannot initialise libcurl or the log");
  }
  rsl_prng_seed_random(&rt->prng);
  sigemptyset(&rt->caught);
  rt->hangup_ref = LUA_NOREF;
  rt->calls.loop = rt->loop;
  rt->calls.transport = rt->transport;
  rt->calls.prng = &rt->prng;
  lua_rawsetp(L, LUA_REGISTRYINDEX, &runtime_key);
  return rt;
}

/* core.step([max_wait_s]) -> handles still alive.  One loop iteration. */
static int core_step(lua_State *L) {
  rsl_runtime *rt = rsl_core_runtime(L);
  double wait_s = luaL_optnumber(L, 1, -1);
  uint64_t wait_ns = wait_s < 0 ? UINT64_MAX : (uint64_t)(wait_s * 1e9);
  int rc = rsl_loop_step(rt->loop, wait_ns);
  if (rc == -EDEADLK)
    return luaL_error(L, "cannot run the loop from inside one of its "
                         "callbacks (a handler or a call's callback)");
  if (rc < 0) return luaL_error(L, "event loop: %s", strerror(-rc));
  lua_pushinteger(L, rc);
  return 1;
}

static int core_alive(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)rsl_loop_alive(rsl_core_runtime(L)->loop));
  return 1;
}

static int core_now_ms(lua_State *L) {
  lua_pushnumber(L, rsl_now_ms());
  return 1;
}

/* core.thread_cpu_ms(): the calling thread's CPU clock (benches: the
 * loop's own work, apart from the machine's other load). */
static int core_thread_cpu_ms(lua_State *L) {
  lua_pushnumber(L, rsl_luacall_cpu_ms());
  return 1;
}

static int core_seed(lua_State *L) {
  rsl_prng_seed(&rsl_core_runtime(L)->prng, (uint64_t)luaL_checkinteger(L, 1));
  return 0;
}

/* core.log(path | "-" | false): where events go from now on. */
static int core_log(lua_State *L) {
  rsl_runtime *rt = rsl_core_runtime(L);
  const char *path = lua_toboolean(L, 1) ? luaL_checkstring(L, 1) : NULL;
  rsl_log *log;
  int rc = rsl_log_open(&log, path);
  if (rc < 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", path, strerror(-rc));
    return 2;
  }
  rsl_log_free(rt->calls.log);
  rt->calls.log = log;
  lua_pushboolean(L, 1);
  return 1;
}

/* core.log_event(name, {key = string|number|boolean, ...}) */
static int core_log_event(lua_State *L) {
  rsl_runtime *rt = rsl_core_runtime(L);
  const char *name = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  rsl_event e;
  rsl_event_begin(&e, name);
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    if (lua_type(L, -2) == LUA_TSTRING) {
      const char *k = lua_tostring(L, -2);
      switch (lua_type(L, -1)) {
      case LUA_TNUMBER:
        if (lua_isinteger(L, -1))
          rsl_event_int(&e, k, (long long)lua_tointeger(L, -1));
        else
          rsl_event_num(&e, k, lua_tonumber(L, -1));
        break;
      case LUA_TBOOLEAN:
        rsl_event_bool(&e, k, lua_toboolean(L, -1));
        break;
      case LUA_TSTRING:
        rsl_event_str(&e, k, lua_tostring(L, -1));
        break;
      default:
        break;
      }
    }
    lua_pop(L, 1);
  }
  rsl_event_emit(&e, rt->calls.log);
  return 0;
}

/* core.pcall(instruction_limit, f, ...) -> true, ... | false, message */
static int core_pcall(lua_State *L) {
  lua_Integer limit = luaL_checkinteger(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  int nargs = lua_gettop(L) - 2;
  if (rsl_luacall(L, nargs, LUA_MULTRET, (long)limit) != LUA_OK) {
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;
  }
  lua_pushboolean(L, 1);
  lua_insert(L, 2);
  return lua_gettop(L) - 1;
}

/* core.backoff(jitter, base_ms, max_ms, attempt[, prev_ms]) -> ms */
static int core_backoff(lua_State *L) {
  return rsl_sandbox_backoff(L, &rsl_core_runtime(L)->prng);
}

static void push_nothing(lua_State *L, void *arg) {
  (void)arg;
  lua_pushnil(L);
}

static void on_timer(void *ud) { fire(ud, push_nothing, NULL); }

/* core.timer(seconds, callback): calls callback() once, later. */
static int core_timer(lua_State *L) {
  rsl_runtime *rt = rsl_core_runtime(L);
  double s = luaL_checknumber(L, 1);
  luaL_argcheck(L, s >= 0 && s < 1e9, 1, "expected seconds >= 0");
  luaL_checktype(L, 2, LUA_TFUNCTION);
  rsl_waiter *w = waiter_new(L, rt, 2);
  w->timer.cb = on_timer;
  if (rsl_timer_start(rt->loop, &w->timer, (uint64_t)(s * 1e9)) < 0) {
    waiter_free(w);
    return luaL_error(L, "out of memory");
  }
  return 0;
}

static void on_signal(void *ud, int signo) {
  rsl_runtime *rt = ud;
  if (signo == SIGHUP) call_ref(rt, rt->hangup_ref, "SIGHUP", NULL);
  else rt->stop_signal = signo;
}

static void catch_signal(lua_State *L, rsl_runtime *rt, int signo) {
  sigaddset(&rt->caught, signo);
  int rc = rsl_loop_signals(rt->loop, &rt->caught, on_signal, rt);
  if (rc < 0) luaL_error(L, "signals: %s", strerror(-rc));
}

/* core.catch_signals(): SIGINT and SIGTERM set core.stop_signal(). */
static int core_catch_signals(lua_State *L) {
  rsl_runtime *rt = rsl_core_runtime(L);
  catch_signal(L, rt, SIGINT);
  catch_signal(L, rt, SIGTERM);
  return 0;
}

/* core.on_hangup(fn): SIGHUP calls fn() (on the loop) instead of ending
 * the process. */
static int core_on_hangup(lua_State *L) {
  rsl_runtime *rt = rsl_core_runtime(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  luaL_unref(L, LUA_REGISTRYINDEX, rt->hangup_ref);
  lua_pushvalue(L, 1);
  rt->hangup_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  catch_signal(L, rt, SIGHUP);
  return 0;
}

/* --- watching folders ---------------------------------------------------- */

typedef struct watch_box {
  rsl_watch *w;
  rsl_runtime *rt;
  int cb_ref;
} watch_box;

static void on_file_changed(void *ud, const char *dir, const char *name) {
  watch_box *box = ud;
  call_ref(box->rt, box->cb_ref, dir, name);
}

static int watch_close(lua_State *L) {
  watch_box *box = luaL_checkudata(L, 1, WATCH_MT);
  rsl_watch_free(box->w);
  box->w = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, box->cb_ref);
  box->cb_ref = LUA_NOREF;
  return 0;
}

/* core.watch(fn) -> a watch; fn(dir, name) runs when a file in one of its
 * folders was written or renamed into place. */
static int core_watch(lua_State *L) {
  rsl_runtime *rt = rsl_core_runtime(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  watch_box *box = lua_newuserdatauv(L, sizeof *box, 0);
  box->w = NULL;
  box->rt = rt;
  box->cb_ref = LUA_NOREF;
  luaL_setmetatable(L, WATCH_MT);
  int rc = rsl_watch_new(&box->w, rt->loop, on_file_changed, box);
  if (rc < 0) return luaL_error(L, "inotify: %s", strerror(-rc));
  lua_pushvalue(L, 1);
  box->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

/* watch:add(dir) -> true | nil, message */
static int watch_add(lua_State *L) {
  watch_box *box = luaL_checkudata(L, 1, WATCH_MT);
  const char *dir = luaL_checkstring(L, 2);
  luaL_argcheck(L, box->w != NULL, 1, "watch is closed");
  int rc = rsl_watch_add(box->w, dir);
  if (rc < 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", dir, strerror(-rc));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int core_stop_signal(lua_State *L) {
  lua_pushinteger(L, rsl_core_runtime(L)->stop_signal);
  return 1;
}

/* core.self_path() -> the file this code was loaded from: the resilua
 * executable, or core.so under plain Lua.  Lets the Lua side find the
 * shipped policies both in the build tree and when installed. */
static int core_self_path(lua_State *L) {
  Dl_info info;
  char path[PATH_MAX];
  size_t n = 0;
  if (dladdr((void *)(uintptr_t)core_self_path, &info) && info.dli_fname &&
      (n = strlen(info.dli_fname)) > 3 &&
      strcmp(info.dli_fname + n - 3, ".so") == 0) {
    if (!realpath(info.dli_fname, path)) return 0;
  } else { /* linked into the executable: dladdr knows only argv[0] */
    ssize_t len = readlink("/proc/self/exe", path, sizeof path - 1);
    if (len <= 0) return 0;
    path[len] = '\0';
  }
  lua_pushstring(L, path);
  return 1;
}

/* core.fsync(file) -> true | nil, message: the file's data reaches the
 * disk (io has no fsync; the batch ledger needs one). */
static int core_fsync(lua_State *L) {
  luaL_Stream *stream = luaL_checkudata(L, 1, LUA_FILEHANDLE);
  if (!stream->closef) return luaL_argerror(L, 1, "file is closed");
  if (fflush(stream->f) != 0 || fsync(fileno(stream->f)) != 0)
    return luaL_fileresult(L, 0, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

/* core.isatty(fd) -> whether the descriptor is a terminal (progress bars). */
static int core_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

/* --- policies and clients ------------------------------------------------ */

static int core_policy(lua_State *L) { return rsl_policy_push_new(L, 1); }

static int core_policy_load(lua_State *L) {
  return rsl_policy_push_loaded(L, &rsl_core_runtime(L)->prng);
}

/* A load on a helper thread: a userdata that owns the job while it runs
 * (registry-referenced until it ends; its __gc waits for the thread). */
typedef struct load_box {
  rsl_policy_job *job;
  rsl_runtime *rt;
  rsl_io io;
  int cb_ref, self_ref;
} load_box;

static int load_box_gc(lua_State *L) {
  load_box *b = lua_touserdata(L, 1);
  if (b->io.events) rsl_io_set(b->rt->loop, &b->io, 0);
  rsl_policy_job_free(b->job);
  b->job = NULL;
  return 0;
}

/* Runs protected: the results pushed, then the callback called. */
static int finish_load(lua_State *L) {
  load_box *b = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, b->cb_ref);
  lua_rawgeti(L, LUA_REGISTRYINDEX, b->self_ref); /* keeps b alive */
  lua_insert(L, 1);
  /* The references go first: a push that raises (out of memory) must not
   * leave them until the state closes.  The stack keeps both alive, and
   * the box's __gc frees the job if the push fails. */
  luaL_unref(L, LUA_REGISTRYINDEX, b->self_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, b->cb_ref);
  b->self_ref = b->cb_ref = LUA_NOREF;
  int n = rsl_policy_job_push_result(L, b->job, &b->rt->prng);
  rsl_policy_job_free(b->job);
  b->job = NULL;
  lua_call(L, n, 0);
  return 0;
}

static void on_loaded(void *ud, int fd, unsigned events) {
  (void)fd;
  (void)events;
  load_box *b = ud;
  rsl_io_set(b->rt->loop, &b->io, 0);
  lua_State *L = b->rt->L;
  int top = lua_gettop(L);
  lua_pushcfunction(L, finish_load);
  lua_pushlightuserdata(L, b);
  if (rsl_luacall(L, 1, 0, 0) != LUA_OK)
    fprintf(stderr, "resilua: error in a callback: %s\n", lua_tostring(L, -1));
  lua_settop(L, top);
}

/* core.policy_load_async(path, policy_path, fn): loads as core.policy_load
 * does, on a helper thread, and calls fn with its results on the loop. */
static int core_policy_load_async(lua_State *L) {
  rsl_runtime *rt = rsl_core_runtime(L);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  load_box *b = lua_newuserdatauv(L, sizeof *b, 0);
  memset(b, 0, sizeof *b);
  b->rt = rt;
  b->cb_ref = b->self_ref = LUA_NOREF;
  if (luaL_newmetatable(L, "resilua.policy_load")) {
    lua_pushcfunction(L, load_box_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  int box = lua_gettop(L);
  int rc = rsl_policy_job_start(L, &b->job);
  if (rc < 0) return luaL_error(L, "policy load: %s", strerror(-rc));
  lua_pushvalue(L, 3);
  b->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, box);
  b->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  rsl_io_init(&b->io, rsl_policy_job_fd(b->job), on_loaded, b);
  rc = rsl_io_set(rt->loop, &b->io, RSL_IO_READ);
  if (rc < 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, b->self_ref); /* __gc frees the job */
    b->self_ref = LUA_NOREF;
    return luaL_error(L, "policy load: %s", strerror(-rc));
  }
  return 0;
}

typedef struct client_box {
  rsl_client *c;
} client_box;

static int client_gc(lua_State *L) {
  client_box *box = luaL_checkudata(L, 1, CLIENT_MT);
  rsl_client_unref(box->c);
  box->c = NULL;
  return 0;
}

static rsl_client *check_client(lua_State *L, int idx) {
  client_box *box = luaL_checkudata(L, idx, CLIENT_MT);
  if (!box->c) luaL_argerror(L, idx, "client already released");
  return box->c;
}

rsl_client *rsl_core_check_client(lua_State *L, int idx) {
  return check_client(L, idx);
}

/* core.client(name) -> the shared state of clients called name. */
static int core_client(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  client_box *box = lua_newuserdatauv(L, sizeof *box, 0);
  box->c = NULL;
  luaL_setmetatable(L, CLIENT_MT);
  if (!(box->c = rsl_client_new(name))) return luaL_error(L, "out of memory");
  return 1;
}

/* client:breaker(policy, url) -> state, consecutive failures | nil; a rate
 * breaker: state, failures in the window, calls in the window. */
static int client_breaker(lua_State *L) {
  rsl_client *c = check_client(L, 1);
  rsl_policy *p = rsl_policy_check(L, 2);
  rsl_breaker *b =
      rsl_client_breaker(c, rsl_policy_conf_of(p), luaL_checkstring(L, 3));
  if (!b) return 0;
  int failures, calls;
  rsl_breaker_counts(b, rsl_now_ms(), &failures, &calls);
  lua_pushstring(L, rsl_breaker_state_name(b->state));
  lua_pushinteger(L, failures);
  if (b->conf.kind != RSL_BREAKER_RATE) return 2;
  lua_pushinteger(L, calls);
  return 3;
}

/* client:force_breaker(policy, url, "open" | "closed" | "reset") -> state
 * | nil (no breaker for url).  A change is logged like any other. */
static int client_force_breaker(lua_State *L) {
  static const char *const TARGETS[] = {"open", "closed", "reset", NULL};
  rsl_client *c = check_client(L, 1);
  rsl_policy *p = rsl_policy_check(L, 2);
  const char *url = luaL_checkstring(L, 3);
  const char *to = TARGETS[luaL_checkoption(L, 4, NULL, TARGETS)];
  rsl_breaker *b = rsl_client_breaker(c, rsl_policy_conf_of(p), url);
  if (!b) return 0;
  rsl_breaker_change ch;
  rsl_breaker_force(b, to, rsl_now_ms(), &ch);
  if (ch.from != ch.to) {
    char *hook_err = NULL;
    int hook_rc = rsl_policy_breaker_changed(
        p, b->key, rsl_breaker_state_name(ch.from),
        rsl_breaker_state_name(ch.to), &hook_err);
    rsl_event e;
    rsl_event_begin(&e, "breaker");
    rsl_event_str(&e, "key", b->key);
    rsl_event_str(&e, "from", rsl_breaker_state_name(ch.from));
    rsl_event_str(&e, "to", rsl_breaker_state_name(ch.to));
    rsl_event_str(&e, "client", c->name);
    rsl_event_str(&e, "forced", to);
    rsl_event_str(&e, "policy_version", rsl_policy_version(p));
    if (hook_rc < 0)
      rsl_event_str(&e, "hook_error", hook_err ? hook_err : "out of memory");
    rsl_event_emit(&e, rsl_core_runtime(L)->calls.log);
    free(hook_err);
  }
  lua_pushstring(L, rsl_breaker_state_name(b->state));
  return 1;
}

/* client:budget(policy) -> tokens, max_tokens | nil */
static int client_budget(lua_State *L) {
  rsl_client *c = check_client(L, 1);
  rsl_budget *b = rsl_client_budget(c, rsl_policy_conf_of(rsl_policy_check(L, 2)));
  if (!b) return 0;
  rsl_budget_tick(b, rsl_now_ms()); /* a ratio's window slides with time */
  lua_pushnumber(L, b->tokens);
  lua_pushnumber(L, b->max_tokens);
  return 2;
}

#define DECIDE_MAX_HEADERS 64
#define DECIDE_HEADER_NAME_MAX 128 /* longer names are left out */

/* core.decide(policy, a) -> { retry, delay_ms, reason, exhausted }: the
 * policy's decision for an attempt described by a table (fields of
 * contract 1's `a`), without any network.  For self-tests and test kits.
 * a.headers (any case) yield a.server as a real response's would;
 * a.idempotency_key (a string or true) says the request carried one. */
static int core_decide(lua_State *L) {
  rsl_policy *p = rsl_policy_check(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_checkstack(L, 26, "core.decide"); /* the fields read below stay */
  rsl_response res = {.retry_after_ms = -1};
  rsl_header headers[DECIDE_MAX_HEADERS];
  char names[DECIDE_MAX_HEADERS][DECIDE_HEADER_NAME_MAX];
  rsl_hints hints;
  rsl_attempt_info a = {.res = &res, .budget_tokens = -1, .hints = &hints,
                        .prng = &rsl_core_runtime(L)->prng};
  lua_getfield(L, 2, "attempt");
  a.attempt = (int)luaL_optinteger(L, -1, 1);
  lua_getfield(L, 2, "method");
  a.method = luaL_optstring(L, -1, "GET");
  lua_getfield(L, 2, "url");
  a.url = luaL_optstring(L, -1, "http://127.0.0.1/");
  lua_getfield(L, 2, "status");
  res.status = (long)luaL_optinteger(L, -1, 0);
  luaL_argcheck(L, res.status == 0 || (res.status >= 100 && res.status < 600),
                2, "status must be in [100, 599]");
  lua_getfield(L, 2, "error");
  if (!lua_isnil(L, -1) &&
      rsl_error_class_parse(luaL_checkstring(L, -1), &res.error) < 0)
    return luaL_argerror(L, 2, "unknown error class");
  if (lua_getfield(L, 2, "grpc_status") != LUA_TNIL) {
    /* A gRPC answer (HTTP 200 unless a status is given). */
    lua_Integer code = luaL_checkinteger(L, -1);
    luaL_argcheck(L, code >= 0 && code < RSL_GRPC_CODE_COUNT, 2,
                  "grpc_status must be in [0, 16]");
    luaL_argcheck(L, res.error == RSL_ERR_NONE, 2,
                  "give grpc_status or error, not both");
    res.grpc = 1;
    res.grpc_status = (int)code;
    if (!res.status) res.status = 200;
  }
  luaL_argcheck(L, (res.status != 0) != (res.error != RSL_ERR_NONE), 2,
                "give exactly one of status and error");
  lua_getfield(L, 2, "retry_after_ms");
  res.retry_after_ms = luaL_optnumber(L, -1, -1);
  lua_getfield(L, 2, "latency_ms");
  res.latency_ms = luaL_optnumber(L, -1, 0);
  lua_getfield(L, 2, "elapsed_ms");
  a.elapsed_ms = luaL_optnumber(L, -1, 0);
  lua_getfield(L, 2, "remaining_ms");
  a.remaining_ms = luaL_optnumber(L, -1, rsl_policy_conf_of(p)->deadline_ms);
  lua_getfield(L, 2, "budget");
  a.budget_tokens = luaL_optnumber(L, -1, -1);
  lua_getfield(L, 2, "breaker");
  a.breaker = luaL_optstring(L, -1, NULL);
  lua_getfield(L, 2, "prev_delay_ms");
  a.prev_delay_ms = luaL_optnumber(L, -1, rsl_policy_conf_of(p)->base_ms);
  if (lua_getfield(L, 2, "headers") == LUA_TTABLE) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      size_t len = 0;
      const char *name = lua_type(L, -2) == LUA_TSTRING
                             ? lua_tolstring(L, -2, &len) : NULL;
      if (name && len < DECIDE_HEADER_NAME_MAX &&
          lua_type(L, -1) == LUA_TSTRING &&
          res.header_count < DECIDE_MAX_HEADERS) {
        /* lower-case, as the transport stores names */
        char *lower = names[res.header_count];
        for (size_t i = 0; i <= len; i++)
          lower[i] = (char)(name[i] >= 'A' && name[i] <= 'Z' ? name[i] + 32
                                                             : name[i]);
        headers[res.header_count].name = lower;
        headers[res.header_count].value = (char *)lua_tostring(L, -1);
        res.header_count++;
      }
      lua_pop(L, 1);
    }
  }
  res.headers = headers;
  double now_s = (double)time(NULL);
  if (res.retry_after_ms < 0)
    res.retry_after_ms = rsl_hints_retry_after_ms(&res, now_s);
  rsl_hints_parse(&hints, &res, now_s);
  int key_type = lua_getfield(L, 2, "idempotency_key");
  a.has_idempotency_key =
      key_type == LUA_TSTRING || (key_type == LUA_TBOOLEAN && lua_toboolean(L, -1));
  rsl_decision d = {0};
  char *err = NULL;
  if (rsl_policy_decide(p, &a, &d, &err) < 0) {
    lua_pushstring(L, err ? err : "out of memory");
    free(err);
    return lua_error(L);
  }
  lua_createtable(L, 0, 4);
  lua_pushboolean(L, d.retry);
  lua_setfield(L, -2, "retry");
  lua_pushnumber(L, d.delay_ms);
  lua_setfield(L, -2, "delay_ms");
  lua_pushstring(L, d.reason);
  lua_setfield(L, -2, "reason");
  lua_pushboolean(L, d.exhausted);
  lua_setfield(L, -2, "exhausted");
  return 1;
}

/* --- calls --------------------------------------------------------------- */

/* The result table; without the response's headers and body when
 * `full` is 0 (a caller that only counts, such as `resilua load`). */
static void push_result_table(lua_State *L, const rsl_call_result *r,
                              int full) {
  lua_createtable(L, 0, 10);
  lua_pushstring(L, rsl_outcome_name(r->outcome));
  lua_setfield(L, -2, "outcome");
  if (r->attempts > 0) {
    rsl_policy_push_status(L, r->last.status, r->last.error);
    rsl_policy_push_grpc(L, &r->last);
  }
  if (full) {
    rsl_policy_push_headers(L, &r->last);
    lua_setfield(L, -2, "headers");
  }
  if (full && r->last.status) {
    lua_pushlstring(L, r->last.body ? r->last.body : "", r->last.body_len);
    lua_setfield(L, -2, "body");
  }
  lua_pushinteger(L, r->attempts);
  lua_setfield(L, -2, "attempts");
  lua_pushnumber(L, r->elapsed_ms);
  lua_setfield(L, -2, "elapsed_ms");
  lua_pushstring(L, r->call_id);
  lua_setfield(L, -2, "call_id");
  /* Each attempt's latency, so a load run gets attempt percentiles
   * without the event log. */
  int n =
      r->attempts < RSL_CALL_MAX_ATTEMPTS ? r->attempts : RSL_CALL_MAX_ATTEMPTS;
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lua_pushnumber(L, r->attempt_ms[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "attempt_ms");
  if (r->message[0]) {
    lua_pushstring(L, r->message);
    lua_setfield(L, -2, "message");
  }
}

static void push_result(lua_State *L, void *arg) {
  push_result_table(L, arg, 1);
}

static void push_result_summary(lua_State *L, void *arg) {
  push_result_table(L, arg, 0);
}

static void on_call_done(void *ud, rsl_call_result *r) {
  fire(ud, push_result, r);
  rsl_response_free(&r->last);
}

static void on_call_done_summary(void *ud, rsl_call_result *r) {
  fire(ud, push_result_summary, r);
  rsl_response_free(&r->last);
}

/* on_chunk(chunk), protected; an error aborts the call (it fails). */
static int stream_commit(void *ud, const rsl_response *head) {
  (void)ud;
  (void)head;
  return 0;
}

static int stream_chunk(void *ud, const char *data, size_t len) {
  rsl_waiter *w = ud;
  lua_State *L = w->rt->L;
  int top = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->chunk_ref);
  lua_pushlstring(L, data, len);
  int rc = rsl_luacall(L, 1, 0, 0);
  if (rc != LUA_OK)
    fprintf(stderr, "resilua: error in on_chunk: %s\n", lua_tostring(L, -1));
  lua_settop(L, top);
  return rc == LUA_OK ? RSL_CHUNK_TAKEN : RSL_CHUNK_ABORT;
}

/* Header lines from an array {"Name: value"} or a map {Name = "value"}.
 * Leaves a table of the lines on the stack: it keeps lines[] alive. */
static size_t read_headers(lua_State *L, int t, const char **lines) {
  lua_newtable(L);
  int out = lua_gettop(L);
  if (lua_getfield(L, t, "headers") == LUA_TNIL) {
    lua_pop(L, 1);
    return 0;
  }
  int h = lua_gettop(L);
  luaL_argcheck(L, lua_istable(L, h), 1, "headers must be a table");
  lua_Integer n = 0;
  lua_pushnil(L);
  while (lua_next(L, h)) {
    luaL_argcheck(L, n < MAX_REQUEST_HEADERS, 1, "too many headers");
    luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 1,
                  "header values must be strings");
    if (lua_type(L, -2) == LUA_TSTRING)
      lua_pushfstring(L, "%s: %s", lua_tostring(L, -2), lua_tostring(L, -1));
    else
      lua_pushvalue(L, -1);
    lua_rawseti(L, out, ++n);
    lua_pop(L, 1); /* the value; the key stays for lua_next */
  }
  lua_pop(L, 1); /* headers */
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, out, i);
    lines[i - 1] = lua_tostring(L, -1);
    lua_pop(L, 1); /* still referenced by `out` */
  }
  return (size_t)n;
}

/* gRPC metadata {key = value} as header lines after lines[0..n), up to
 * MAX_REQUEST_HEADERS in all; returns the new count.  Leaves a table on
 * the stack that keeps the lines alive. */
static size_t read_metadata(lua_State *L, int t, const char **lines,
                            size_t n) {
  lua_newtable(L);
  int keep = lua_gettop(L);
  if (lua_getfield(L, t, "metadata") == LUA_TNIL) {
    lua_pop(L, 1);
    return n;
  }
  int m = lua_gettop(L);
  luaL_argcheck(L, lua_istable(L, m), 3, "metadata must be a table");
  lua_pushnil(L);
  while (lua_next(L, m)) {
    luaL_argcheck(L, n < MAX_REQUEST_HEADERS, 3, "too much metadata");
    luaL_argcheck(L, lua_type(L, -2) == LUA_TSTRING &&
                         lua_type(L, -1) == LUA_TSTRING,
                  3, "metadata must map string keys to string values");
    size_t len;
    const char *value = lua_tolstring(L, -1, &len), *err = NULL;
    char *line = rsl_grpc_metadata_line(lua_tostring(L, -2), value, len, &err);
    if (!line) return (size_t)luaL_error(L, "metadata '%s': %s",
                                         lua_tostring(L, -2), err);
    lua_pushstring(L, line);
    free(line);
    lines[n++] = lua_tostring(L, -1);
    lua_rawseti(L, keep, (lua_Integer)n); /* still referenced by `keep` */
    lua_pop(L, 1); /* the value; the key stays for lua_next */
  }
  lua_pop(L, 1); /* metadata */
  return n;
}

/* core.call(client, policy, {method, url, headers, body, summary_only,
 *           max_active, http2, grpc, metadata}, callback [, shadow]):
 * grpc = "pkg.Service/Method" makes a unary gRPC call (body: the
 * serialized message; metadata: {key = value}, "-bin" keys binary);
 * http2 = true sends a plain HTTP call over HTTP/2. shadow is a candidate
 * policy asked in shadow; with summary_only the result carries no headers
 * and no body (what a load run needs, for less work per call); with
 * max_active N each attempt waits its turn while N attempts are on the
 * wire (rsl_request.max_active). */
static int core_call(lua_State *L) {
  rsl_runtime *rt = rsl_core_runtime(L);
  rsl_client *client = check_client(L, 1);
  rsl_policy *policy = rsl_policy_check(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  luaL_checktype(L, 4, LUA_TFUNCTION);
  rsl_policy *shadow = lua_isnoneornil(L, 5) ? NULL : rsl_policy_check(L, 5);
  luaL_checkstack(L, 24, "core.call"); /* the fields read below stay */
  const char *lines[MAX_REQUEST_HEADERS];
  rsl_call_request req = {0};
  lua_getfield(L, 3, "url");
  req.url = lua_tostring(L, -1);
  luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 3, "url must be a string");
  lua_getfield(L, 3, "body");
  luaL_argcheck(L, lua_isnoneornil(L, -1) || lua_type(L, -1) == LUA_TSTRING, 3,
                "body must be a string");
  req.body = lua_tolstring(L, -1, &req.body_len);
  lua_getfield(L, 3, "method");
  luaL_argcheck(L, lua_isnoneornil(L, -1) || lua_type(L, -1) == LUA_TSTRING, 3,
                "method must be a string");
  req.method = lua_isnil(L, -1) ? (req.body ? "POST" : "GET")
                                : lua_tostring(L, -1);
  req.header_count = read_headers(L, 3, lines);
  req.headers = lines;
  lua_getfield(L, 3, "grpc");
  luaL_argcheck(L, lua_isnil(L, -1) || lua_type(L, -1) == LUA_TSTRING, 3,
                "grpc must be a string: \"pkg.Service/Method\"");
  req.grpc = lua_tostring(L, -1);
  if (req.grpc) req.method = "POST";
  lua_getfield(L, 3, "http2");
  req.http2 = lua_toboolean(L, -1);
  luaL_argcheck(L, req.grpc || lua_getfield(L, 3, "metadata") == LUA_TNIL, 3,
                "metadata needs grpc");
  req.header_count = read_metadata(L, 3, lines, req.header_count);
  lua_getfield(L, 3, "max_active");
  luaL_argcheck(L, lua_isnil(L, -1) || (lua_isinteger(L, -1) &&
                                        lua_tointeger(L, -1) >= 0),
                3, "max_active must be an integer >= 0");
  req.max_active = (size_t)lua_tointeger(L, -1);
  lua_getfield(L, 3, "summary_only");
  rsl_call_done done = lua_toboolean(L, -1) ? on_call_done_summary
                                            : on_call_done;
  int chunk_type = lua_getfield(L, 3, "on_chunk");
  luaL_argcheck(L, chunk_type == LUA_TNIL || chunk_type == LUA_TFUNCTION, 3,
                "on_chunk must be a function");
  rsl_waiter *w = waiter_new(L, rt, 4);
  if (chunk_type == LUA_TFUNCTION) {
    lua_pushvalue(L, -1);
    w->chunk_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    w->stream = (rsl_call_stream){.on_commit = stream_commit,
                                  .on_chunk = stream_chunk, .ud = w};
    req.stream = &w->stream;
  }
  const char *err = NULL;
  if (rsl_call_start(&rt->calls, client, policy, shadow, &req, done, w,
                     &err) < 0) {
    waiter_free(w);
    return luaL_error(L, "%s", err);
  }
  return 0;
}

/* core.redact(name): masks the values of query parameters called `name`
 * from now on, in every event, result and report. */
static int core_redact(lua_State *L) {
  int rc = rsl_redact_add(luaL_checkstring(L, 1));
  if (rc == -2) return luaL_error(L, "out of memory");
  luaL_argcheck(L, rc == 0, 1, "expected a name of 1 to 64 bytes");
  return 0;
}

static int push_c_string(lua_State *L) {
  lua_pushstring(L, lua_touserdata(L, 1));
  return 1;
}

/* core.redact_url(url) -> url with its secrets masked (redact.h).  The
 * string is pushed in a protected call: a push that raises (out of memory)
 * must not lose `masked`. */
static int core_redact_url(lua_State *L) {
  char *masked = rsl_redact_url(luaL_checkstring(L, 1));
  if (!masked) return luaL_error(L, "out of memory");
  lua_pushcfunction(L, push_c_string);
  lua_pushlightuserdata(L, masked);
  int status = lua_pcall(L, 1, 1, 0);
  free(masked);
  if (status != LUA_OK) return lua_error(L);
  return 1;
}

/* core.utf8_clean(s) -> s, or a copy in which each byte that is not part
 * of well-formed UTF-8 stands for the code point of its value (U+0080 to
 * U+00FF, Latin-1): what JSON written with cjson (results, reports) needs,
 * and what the event log and resilua.json write as \u00XX. */
static int core_utf8_clean(lua_State *L) {
  size_t len, i = 0;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
  size_t seq;
  while (i < len && (seq = rsl_utf8_sequence(s + i, len - i))) i += seq;
  if (i == len) {
    lua_settop(L, 1);
    return 1;
  }
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addlstring(&b, (const char *)s, i);
  while (i < len) {
    seq = rsl_utf8_sequence(s + i, len - i);
    if (seq) {
      luaL_addlstring(&b, (const char *)s + i, seq);
      i += seq;
    } else {
      luaL_addchar(&b, (char)(0xc0 | (s[i] >> 6))); /* U+00XX in UTF-8 */
      luaL_addchar(&b, (char)(0x80 | (s[i] & 0x3f)));
      i++;
    }
  }
  luaL_pushresult(&b);
  return 1;
}

/* --- module -------------------------------------------------------------- */

static const luaL_Reg CORE_FUNCS[] = {
    {"step", core_step},
    {"alive", core_alive},
    {"now_ms", core_now_ms},
    {"thread_cpu_ms", core_thread_cpu_ms},
    {"seed", core_seed},
    {"log", core_log},
    {"log_event", core_log_event},
    {"pcall", core_pcall},
    {"backoff", core_backoff},
    {"timer", core_timer},
    {"catch_signals", core_catch_signals},
    {"stop_signal", core_stop_signal},
    {"on_hangup", core_on_hangup},
    {"watch", core_watch},
    {"self_path", core_self_path},
    {"fsync", core_fsync},
    {"isatty", core_isatty},
    {"policy", core_policy},
    {"policy_load", core_policy_load},
    {"policy_load_async", core_policy_load_async},
    {"policy_names", rsl_policy_names_lua},
    {"client", core_client},
    {"call", core_call},
    {"decide", core_decide},
    {"redact", core_redact},
    {"redact_url", core_redact_url},
    {"utf8_clean", core_utf8_clean},
    {NULL, NULL},
};

static const luaL_Reg WATCH_METHODS[] = {
    {"add", watch_add},
    {"close", watch_close},
    {NULL, NULL},
};

static const luaL_Reg CLIENT_METHODS[] = {
    {"breaker", client_breaker},
    {"force_breaker", client_force_breaker},
    {"budget", client_budget},
    {NULL, NULL},
};

int luaopen_resilua_core(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &runtime_key);
  int loaded = !lua_isnil(L, -1);
  lua_pop(L, 1);
  if (!loaded) runtime_new(L);
  if (luaL_newmetatable(L, CLIENT_MT)) {
    luaL_newlib(L, CLIENT_METHODS);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, client_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, WATCH_MT)) {
    luaL_newlib(L, WATCH_METHODS);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, watch_close);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  luaL_newlib(L, CORE_FUNCS);
  lua_pushstring(L, RSL_VERSION);
  lua_setfield(L, -2, "version");
  rsl_lua_server_open(L);
  rsl_lua_testing_open(L);
  rsl_lua_hist_open(L);
  rsl_lua_proxy_open(L);
  rsl_lua_batch_open(L);
  return 1;
}
