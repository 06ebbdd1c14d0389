/*
 * proxy/lua_proxy — the Lua face of the proxy: `core.proxy{...}` returns a
 * "resilua.proxy" userdata (routes, drain, in_flight, address, close).
 * The command, its config and hot reload are lua/resilua/proxy.lua.
 *
 * Provides: rsl_lua_proxy_open (declared in lua_core.h).
 * Uses: proxy, lua_core (the runtime, client states), policy (versions).
 */
#include <errno.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../lua_core.h"
#include "proxy.h"

#define PROXY_MT "resilua.proxy"
#define MAX_ROUTES 1000

/* Inline in the userdata; NULL once closed.  While open it holds a ref to
 * its own userdata, so an active proxy is not collected. */
typedef struct lproxy {
  rsl_proxy *p;
  int self_ref;
} lproxy;

static lproxy *check_open(lua_State *L) {
  lproxy *lp = luaL_checkudata(L, 1, PROXY_MT);
  if (!lp->p) luaL_error(L, "proxy is closed");
  return lp;
}

/* An integer option of table 1 in [lo, hi], or def when absent. */
static lua_Integer opt_int(lua_State *L, const char *name, lua_Integer def,
                           lua_Integer lo, lua_Integer hi) {
  int t = lua_getfield(L, 1, name);
  lua_Integer v = def;
  if (t != LUA_TNIL) {
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < lo ||
        lua_tointeger(L, -1) > hi)
      luaL_error(L, "proxy option '%s': expected an integer in %I..%I", name,
                 lo, hi);
    v = lua_tointeger(L, -1);
  }
  lua_pop(L, 1);
  return v;
}

/* core.proxy{listen, max_connections, max_in_flight, max_header_bytes,
 * max_body_bytes, idle_timeout_ms, admin = "/_resilua" | false}
 * -> proxy | nil, message (cannot listen). */
static int l_proxy(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  rsl_runtime *rt = rsl_core_runtime(L);
  rsl_proxy_conf conf = {0};
  lua_getfield(L, 1, "listen");
  conf.listen = luaL_optstring(L, -1, "127.0.0.1:8080");
  conf.max_connections = (size_t)opt_int(L, "max_connections", 10000, 1, 1000000);
  conf.max_in_flight = (size_t)opt_int(L, "max_in_flight", 1000, 1, 1000000);
  conf.max_header_bytes =
      (size_t)opt_int(L, "max_header_bytes", 32 * 1024, 1024, 1 << 20);
  conf.max_body_bytes =
      (size_t)opt_int(L, "max_body_bytes", 16 << 20, 0, (lua_Integer)1 << 30);
  conf.idle_timeout_ms =
      (uint64_t)opt_int(L, "idle_timeout_ms", 60000, 0, 86400000);
  int at = lua_getfield(L, 1, "admin");
  if (at == LUA_TNIL) conf.admin_prefix = "/_resilua";
  else if (at == LUA_TSTRING) conf.admin_prefix = lua_tostring(L, -1);
  else if (at != LUA_TBOOLEAN || lua_toboolean(L, -1))
    return luaL_error(L, "proxy option 'admin': expected a path or false");
  if (conf.admin_prefix && conf.admin_prefix[0] != '/')
    return luaL_error(L, "proxy option 'admin': expected a path starting "
                         "with '/'");
  lproxy *lp = lua_newuserdatauv(L, sizeof *lp, 0);
  *lp = (lproxy){NULL, LUA_NOREF};
  luaL_setmetatable(L, PROXY_MT);
  char *err = NULL;
  int rc = rsl_proxy_new(&lp->p, &rt->calls, &conf, &err);
  if (rc < 0) {
    char msg[512]; /* err is freed before anything that may raise */
    snprintf(msg, sizeof msg, "%s", err ? err : strerror(-rc));
    free(err);
    lua_pushnil(L);
    lua_pushstring(L, msg);
    return 2;
  }
  lua_pushvalue(L, -1);
  lp->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

/* A string field of the route at idx, or NULL when absent and optional.
 * The string stays alive in the route table, which the caller holds. */
static const char *route_str(lua_State *L, int idx, const char *name,
                             int optional) {
  int t = lua_getfield(L, idx, name);
  const char *v = t == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
  lua_pop(L, 1);
  if (!v && !(optional && t == LUA_TNIL))
    luaL_error(L, "route field '%s': expected a string", name);
  return v;
}

/* proxy:routes({ {name, prefix, host, upstream, keep_host, client, policy},
 * ... }): replaces the routes at once; requests in flight keep theirs. */
static int l_routes(lua_State *L) {
  lproxy *lp = check_open(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer n = luaL_len(L, 2);
  luaL_argcheck(L, n >= 0 && n <= MAX_ROUTES, 2, "too many routes");
  rsl_proxy_route *routes = lua_newuserdatauv(
      L, sizeof *routes * (size_t)(n ? n : 1), 0); /* freed by the GC */
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, 2, i);
    int r = lua_gettop(L);
    luaL_checktype(L, r, LUA_TTABLE);
    rsl_proxy_route *rc = &routes[i - 1];
    rc->name = route_str(L, r, "name", 0);
    rc->prefix = route_str(L, r, "prefix", 1);
    rc->host = route_str(L, r, "host", 1);
    rc->upstream = route_str(L, r, "upstream", 0);
    lua_getfield(L, r, "keep_host");
    rc->keep_host = lua_toboolean(L, -1);
    lua_getfield(L, r, "client");
    rc->client = rsl_core_check_client(L, -1);
    lua_getfield(L, r, "policy");
    rc->policy = rsl_policy_check(L, -1);
    lua_pop(L, 3); /* the route table keeps them alive */
    lua_pop(L, 1); /* route: still in the list */
  }
  if (rsl_proxy_set_routes(lp->p, routes, (size_t)n) < 0)
    return luaL_error(L, "out of memory");
  return 0;
}

static int l_drain(lua_State *L) {
  rsl_proxy_drain(check_open(L)->p);
  return 0;
}

static int l_in_flight(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)rsl_proxy_in_flight(check_open(L)->p));
  return 1;
}

static int l_address(lua_State *L) {
  lua_pushstring(L, rsl_proxy_address(check_open(L)->p));
  return 1;
}

/* close, __close and __gc: idempotent. */
static int l_close(lua_State *L) {
  lproxy *lp = luaL_checkudata(L, 1, PROXY_MT);
  rsl_proxy_free(lp->p);
  lp->p = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, lp->self_ref);
  lp->self_ref = LUA_NOREF;
  return 0;
}

static const luaL_Reg PROXY_METHODS[] = {
    {"routes", l_routes},   {"drain", l_drain},  {"in_flight", l_in_flight},
    {"address", l_address}, {"close", l_close},  {NULL, NULL},
};

void rsl_lua_proxy_open(lua_State *L) {
  if (luaL_newmetatable(L, PROXY_MT)) {
    luaL_newlib(L, PROXY_METHODS);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_close);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1); /* metatable */
  lua_pushcfunction(L, l_proxy);
  lua_setfield(L, -2, "proxy");
}
