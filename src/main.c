/*
 * main — the `resilua` executable: embeds Lua 5.4 with resilua.core and the
 * Lua half of resilua compiled in, and hands argv to resilua.cli.
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>

#include "embedded.h"
#include "lua_core.h"
#include "luacall.h"

/* package.searchers entry: modules compiled into the binary. */
static int search_embedded(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  for (const rsl_embedded *m = rsl_embedded_modules; m->name; m++) {
    if (strcmp(m->name, name) != 0) continue;
    if (luaL_loadbufferx(L, m->source, m->len, m->chunkname, "t") != LUA_OK)
      return lua_error(L);
    lua_pushstring(L, m->chunkname + 1);
    return 2;
  }
  lua_pushfstring(L, "\n\tno embedded module '%s'", name);
  return 1;
}

/* Our searcher goes right after preload, so the binary always runs the Lua
 * it was built with, whatever LUA_PATH says. */
static void install_searcher(lua_State *L) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "searchers");
  for (lua_Integer i = (lua_Integer)lua_rawlen(L, -1); i >= 2; i--) {
    lua_rawgeti(L, -1, i);
    lua_rawseti(L, -2, i + 1);
  }
  lua_pushcfunction(L, search_embedded);
  lua_rawseti(L, -2, 2);
  lua_getfield(L, -2, "preload");
  lua_pushcfunction(L, luaopen_resilua_core);
  lua_setfield(L, -2, "resilua.core");
  lua_pop(L, 3);
}

/* Thousands of calls in flight need thousands of sockets. */
static void raise_fd_limit(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

static int run_cli(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  lua_settop(L, 0);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "resilua.cli");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "main");
  lua_createtable(L, argc, 1);
  lua_pushstring(L, argv[0]);
  lua_rawseti(L, -2, 0);
  for (int i = 1; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_call(L, 1, 1);
  return 1;
}

int main(int argc, char **argv) {
  raise_fd_limit();
  /* A log reader or a client that goes away is an error to handle where it
   * happens (EPIPE), not a reason to die. */
  signal(SIGPIPE, SIG_IGN);
  lua_State *L = luaL_newstate();
  if (!L) {
    fputs("resilua: out of memory\n", stderr);
    return 1;
  }
  luaL_openlibs(L);
  install_searcher(L);
  lua_pushcfunction(L, run_cli);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  int code;
  if (rsl_luacall(L, 2, 1, 0) != LUA_OK) {
    fprintf(stderr, "resilua: internal error: %s\n", lua_tostring(L, -1));
    code = 1;
  } else {
    code = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 0;
  }
  lua_close(L);
  return code;
}
