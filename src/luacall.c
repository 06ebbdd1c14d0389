/*
 * luacall — protected calls into user Lua with a traceback and an
 * instruction limit.  See luacall.h.
 */
#include "luacall.h"

#include <lauxlib.h>

#define HOOK_EVERY_INSTRUCTIONS 1000

/* The running limit lives in the registry under the address of this
 * variable, so nested calls (a handler that makes a call that runs a
 * policy) each keep their own and restore the outer one. */
static char limit_key;

static void count_hook(lua_State *L, lua_Debug *ar) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &limit_key);
  lua_Integer left = lua_tointeger(L, -1) - HOOK_EVERY_INSTRUCTIONS;
  lua_pop(L, 1);
  lua_pushinteger(L, left);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &limit_key);
  if (left > 0) return;
  /* From now on fire on every instruction: a pcall in user code that
   * catches this error gets another one at its next instruction. */
  lua_sethook(L, count_hook, LUA_MASKCOUNT, 1);
  lua_getinfo(L, "Sl", ar); /* where the runaway code is */
  luaL_error(L, "%s:%d: instruction limit exceeded (a runaway loop?)",
             ar->short_src, ar->currentline);
}

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)",
                          luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

int rsl_luacall(lua_State *L, int nargs, int nresults, long instr_limit) {
  int base = lua_gettop(L) - nargs; /* the function's slot */
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);

  lua_Hook old_hook = lua_gethook(L);
  int old_mask = lua_gethookmask(L), old_count = lua_gethookcount(L);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &limit_key);
  lua_Integer old_left = lua_tointeger(L, -1);
  lua_pop(L, 1);
  if (instr_limit > 0) {
    lua_pushinteger(L, instr_limit);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &limit_key);
    lua_sethook(L, count_hook, LUA_MASKCOUNT, HOOK_EVERY_INSTRUCTIONS);
  }

  int status = lua_pcall(L, nargs, nresults, base);

  if (instr_limit > 0) {
    lua_pushinteger(L, old_left);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &limit_key);
    lua_sethook(L, old_hook, old_mask, old_count);
  }
  lua_remove(L, base); /* the traceback handler */
  if (status != LUA_OK && !lua_isstring(L, -1)) {
    lua_pop(L, 1);
    lua_pushliteral(L, "(error object is not a string)");
  }
  return status;
}
