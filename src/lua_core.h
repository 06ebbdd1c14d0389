/*
 * lua_core — the `resilua.core` Lua module: bindings only, no logic.
 *
 * One rsl_runtime exists per Lua state; it owns the loop, the transport,
 * the event log and the jitter PRNG, lives in a userdata kept in the
 * registry, and is torn down by that userdata's __gc when the state closes.
 */
#ifndef RSL_LUA_CORE_H
#define RSL_LUA_CORE_H

#include <lua.h>

#include "call.h"
#include "jitter.h"
#include "log.h"
#include "loop.h"
#include "transport.h"

typedef struct rsl_waiter rsl_waiter;

typedef struct rsl_runtime {
  lua_State *L; /* the main thread: every callback into Lua goes through it */
  rsl_loop *loop;
  rsl_transport *transport;
  rsl_prng prng;
  rsl_call_env calls; /* borrows the above; owns the event log */
  rsl_waiter *waiters; /* Lua callbacks still to run (calls, timers) */
  sigset_t caught;     /* signals the loop receives instead of their default */
  int stop_signal;     /* set by SIGINT/SIGTERM after core.catch_signals() */
  int hangup_ref;      /* core.on_hangup's function, or LUA_NOREF */
} rsl_runtime;

/* The state's runtime (created by luaopen_resilua_core). */
rsl_runtime *rsl_core_runtime(lua_State *L);

int luaopen_resilua_core(lua_State *L);

/* Adds the server bindings (lua_server.c) to the table on top of the stack. */
void rsl_lua_server_open(lua_State *L);
/* Adds core.play (lua_testing.c), the engine of resilua.testing. */
void rsl_lua_testing_open(lua_State *L);
void rsl_lua_hist_open(lua_State *L);
/* Adds core.proxy (proxy/lua_proxy.c). */
void rsl_lua_proxy_open(lua_State *L);
/* The client state of a "resilua.client" userdata (raises otherwise). */
rsl_client *rsl_core_check_client(lua_State *L, int idx);
/* Adds core.json and core.files (lua_batch.c), what batch needs. */
void rsl_lua_batch_open(lua_State *L);

#endif
