/*
 * lua_hist — core.hist(): the latency histogram (hist.c) as a Lua
 * userdata "resilua.hist".  Bindings only: the rsl_hist lives inline in the
 * userdata, so Lua owns it and nothing needs freeing.
 *
 *   local h = core.hist()
 *   h:record(12.5)               -- ms
 *   h:merge(other)               -- h += other
 *   h:percentile(99)             -- ms, within 0.1 %
 *   h:count() h:min() h:max() h:mean() h:reset() h:size() (bytes, constant)
 */
#include <lauxlib.h>
#include <lua.h>

#include "hist.h"
#include "lua_core.h"

#define HIST_MT "resilua.hist"

static rsl_hist *check_hist(lua_State *L, int i) {
  return luaL_checkudata(L, i, HIST_MT);
}

/* core.hist() -> an empty histogram. */
static int core_hist(lua_State *L) {
  rsl_hist *h = lua_newuserdatauv(L, sizeof *h, 0);
  rsl_hist_reset(h);
  luaL_setmetatable(L, HIST_MT);
  return 1;
}

static int hist_record(lua_State *L) {
  rsl_hist_record(check_hist(L, 1), luaL_checknumber(L, 2));
  return 0;
}

static int hist_merge(lua_State *L) {
  rsl_hist *dst = check_hist(L, 1);
  rsl_hist_merge(dst, check_hist(L, 2));
  lua_settop(L, 1);
  return 1;
}

static int hist_percentile(lua_State *L) {
  rsl_hist *h = check_hist(L, 1);
  double p = luaL_checknumber(L, 2);
  luaL_argcheck(L, p >= 0 && p <= 100, 2, "expected a percentile in 0..100");
  lua_pushnumber(L, rsl_hist_percentile(h, p));
  return 1;
}

static int hist_count(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)check_hist(L, 1)->total);
  return 1;
}

static int hist_min(lua_State *L) {
  lua_pushnumber(L, check_hist(L, 1)->min_ms);
  return 1;
}

static int hist_max(lua_State *L) {
  lua_pushnumber(L, check_hist(L, 1)->max_ms);
  return 1;
}

static int hist_mean(lua_State *L) {
  lua_pushnumber(L, rsl_hist_mean(check_hist(L, 1)));
  return 1;
}

static int hist_reset(lua_State *L) {
  rsl_hist_reset(check_hist(L, 1));
  return 0;
}

/* Its memory in bytes: the same however much was recorded. */
static int hist_size(lua_State *L) {
  check_hist(L, 1);
  lua_pushinteger(L, (lua_Integer)sizeof(rsl_hist));
  return 1;
}

static const luaL_Reg HIST_METHODS[] = {
    {"record", hist_record},
    {"merge", hist_merge},
    {"percentile", hist_percentile},
    {"count", hist_count},
    {"min", hist_min},
    {"max", hist_max},
    {"mean", hist_mean},
    {"reset", hist_reset},
    {"size", hist_size},
    {NULL, NULL},
};

/* Adds core.hist to the module table on the top of the stack. */
void rsl_lua_hist_open(lua_State *L) {
  if (luaL_newmetatable(L, HIST_MT)) {
    luaL_newlib(L, HIST_METHODS);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1); /* metatable */
  lua_pushcfunction(L, core_hist);
  lua_setfield(L, -2, "hist");
}
