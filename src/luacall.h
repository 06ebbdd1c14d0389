/*
 * luacall — the one way resilua calls user Lua (policies, upstream handlers,
 * scripts): lua_pcall with a traceback handler and an optional instruction
 * limit enforced by a count hook.  Once the limit trips, the hook fires on
 * every instruction so a `pcall` inside user code cannot swallow the stop.
 */
#ifndef RSL_LUACALL_H
#define RSL_LUACALL_H

#include <lua.h>

/* Instructions a policy decision may run (a few milliseconds of Lua). */
#define RSL_POLICY_INSTRUCTION_LIMIT 1000000L
/* Instructions an upstream handler may run per request. */
#define RSL_HANDLER_INSTRUCTION_LIMIT 10000000L

/* Calls the function below `nargs` arguments on L's stack, like lua_pcall.
 * instr_limit <= 0 means no limit.  On error returns non-LUA_OK and leaves
 * one string on the stack: the message, then a traceback. */
int rsl_luacall(lua_State *L, int nargs, int nresults, long instr_limit);

#endif
