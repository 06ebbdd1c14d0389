/*
 * luacall — protected calls into user Lua with a traceback, an instruction
 * limit and a CPU-time limit.  See luacall.h.
 */
#include "luacall.h"

#include <lauxlib.h>
#include <stdio.h>
#include <time.h>

#define HOOK_EVERY_INSTRUCTIONS 1000

/* The running call's limits.  The registry holds a pointer to the
 * innermost one under the address of limit_key, so nested calls (a handler
 * that makes a call that runs a policy) each keep their own and restore the
 * outer one.  No pointer: code runs outside any limited call. */
typedef struct call_limit {
  lua_Integer left;   /* instructions; <= 0: tripped */
  double time_ms;     /* CPU time allowed; 0: none */
  double deadline_ms; /* on rsl_luacall_cpu_ms(), set at the first check */
  int limited;        /* 0: an unlimited call (scripts) */
  char *seen;         /* the code's position at the last check, or NULL */
  size_t seen_size;
  int first_seen;     /* the hook's next firing is the first instruction */
  const int *stop;    /* set by the caller's allocator: stop now */
} call_limit;

static char limit_key;

double rsl_luacall_cpu_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static call_limit *current_limit(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &limit_key);
  call_limit *lim = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return lim;
}

/* Raises the limit error at the running Lua code's position. */
static int limit_error(lua_State *L, const char *what) {
  /* From now on fire on every instruction: a pcall in user code that
   * catches this error gets another one at its next instruction. */
  lua_sethook(L, lua_gethook(L), LUA_MASKCOUNT, 1);
  lua_Debug ar;
  for (int level = 0; lua_getstack(L, level, &ar); level++) {
    lua_getinfo(L, "Sl", &ar);
    if (ar.currentline > 0) {
      lua_pushfstring(L, "%s:%d: %s", ar.short_src, ar.currentline, what);
      return lua_error(L);
    }
  }
  lua_pushstring(L, what);
  return lua_error(L);
}

/* Notes where the running Lua code is, for a caller that cannot look
 * itself (an allocator: see rsl_luacall_tracked).  Called at safe points
 * only: the hook and the bounded C functions. */
static void note_seen(lua_State *L, call_limit *lim) {
  if (!lim->seen) return;
  lua_Debug ar;
  for (int level = 0; lua_getstack(L, level, &ar); level++) {
    if (lua_getinfo(L, "Sl", &ar) && ar.currentline > 0) {
      snprintf(lim->seen, lim->seen_size, "%s:%d", ar.short_src,
               ar.currentline);
      return;
    }
  }
}

/* The clock is read at the first check, not at the call's start: most
 * calls end before their first hook and never pay for it.  Until then at
 * most HOOK_EVERY_INSTRUCTIONS instructions (or one bounded C call) ran. */
static const char *over(call_limit *lim) {
  if (lim->left <= 0) return "instruction limit exceeded (a runaway loop?)";
  if (lim->stop && *lim->stop) return "limit exceeded";
  if (lim->time_ms <= 0) return NULL;
  double now = rsl_luacall_cpu_ms();
  if (lim->deadline_ms == 0) lim->deadline_ms = now + lim->time_ms;
  if (now > lim->deadline_ms)
    return "time limit exceeded (a runaway loop or a costly library call?)";
  return NULL;
}

static void count_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  call_limit *lim = current_limit(L);
  if (!lim) {
    limit_error(L, "code ran outside a limited call");
    return;
  }
  if (!lim->limited) return;
  if (lim->first_seen) { /* only notes where the call's Lua code starts */
    lim->first_seen = 0;
    lim->left -= 1;
    note_seen(L, lim);
    lua_sethook(L, count_hook, LUA_MASKCOUNT, HOOK_EVERY_INSTRUCTIONS);
    return;
  }
  lim->left -= lua_gethookcount(L) == 1 ? 1 : HOOK_EVERY_INSTRUCTIONS;
  note_seen(L, lim);
  const char *why = over(lim);
  if (why) limit_error(L, why);
}

void rsl_luacall_check(lua_State *L) {
  call_limit *lim = current_limit(L);
  if (!lim || !lim->limited) return;
  note_seen(L, lim);
  const char *why = over(lim);
  if (why) limit_error(L, why);
}

void rsl_luacall_note(lua_State *L) {
  call_limit *lim = current_limit(L);
  if (lim) note_seen(L, lim);
}

void rsl_luacall_forbid(lua_State *L) {
  lua_sethook(L, count_hook, LUA_MASKCOUNT, 1);
}

/* Lua adds file:line to a string raised by error(), never to another
 * object: its message gets the position of the code that raised it. */
static const char *where_raised(lua_State *L, const char *msg) {
  lua_Debug ar;
  for (int level = 1; lua_getstack(L, level, &ar); level++) {
    lua_getinfo(L, "Sl", &ar);
    if (ar.currentline > 0)
      return lua_pushfstring(L, "%s:%d: %s", ar.short_src, ar.currentline,
                             msg);
  }
  return msg;
}

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      msg = lua_tostring(L, -1);
    else
      msg = lua_pushfstring(L, "(error object is a %s value)",
                            luaL_typename(L, 1));
    msg = where_raised(L, msg);
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

int rsl_luacall_tracked(lua_State *L, int nargs, int nresults,
                        long instr_limit, double time_ms, char *seen,
                        size_t seen_size, const int *stop) {
  int base = lua_gettop(L) - nargs; /* the function's slot */
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);

  call_limit lim = {.left = instr_limit,
                    .limited = instr_limit > 0,
                    .seen = seen_size ? seen : NULL,
                    .seen_size = seen_size,
                    .stop = stop};
  if (time_ms > 0) {
    lim.time_ms = time_ms;
    lim.limited = 1;
    if (lim.left <= 0) lim.left = LUA_MAXINTEGER;
  }
  lua_Hook old_hook = lua_gethook(L);
  int old_mask = lua_gethookmask(L), old_count = lua_gethookcount(L);
  call_limit *outer = current_limit(L);
  lua_pushlightuserdata(L, &lim);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &limit_key);
  /* A tracked call's hook fires at its first instruction too: a refusal
   * before the first regular check still has a line. */
  lim.first_seen = lim.limited && lim.seen;
  if (lim.limited)
    lua_sethook(L, count_hook, LUA_MASKCOUNT,
                lim.first_seen ? 1 : HOOK_EVERY_INSTRUCTIONS);

  int status = lua_pcall(L, nargs, nresults, base);

  if (outer) lua_pushlightuserdata(L, outer);
  else lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &limit_key);
  lua_sethook(L, old_hook, old_mask, old_count);
  lua_remove(L, base); /* the traceback handler */
  if (status != LUA_OK && !lua_isstring(L, -1)) {
    lua_pop(L, 1);
    lua_pushliteral(L, "(error object is not a string)");
  }
  return status;
}

int rsl_luacall_timed(lua_State *L, int nargs, int nresults, long instr_limit,
                      double time_ms) {
  return rsl_luacall_tracked(L, nargs, nresults, instr_limit, time_ms, NULL, 0,
                             NULL);
}

int rsl_luacall(lua_State *L, int nargs, int nresults, long instr_limit) {
  return rsl_luacall_timed(L, nargs, nresults, instr_limit, 0);
}
