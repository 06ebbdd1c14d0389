/*
 * luacall — the one way resilua calls user Lua (policies, upstream handlers,
 * scripts): lua_pcall with a traceback handler, an optional instruction
 * limit enforced by a count hook, and an optional CPU-time limit checked by
 * the same hook and by the sandbox's long-running C functions.  Once a limit
 * trips, the hook fires on every instruction so a `pcall` inside user code
 * cannot swallow the stop.
 */
#ifndef RSL_LUACALL_H
#define RSL_LUACALL_H

#include <lua.h>
#include <stddef.h>

/* Instructions a policy decision may run (a few milliseconds of Lua: a
 * real decision runs a few hundred; they trip before the CPU time, ASan
 * and a busy machine included, so a runaway loop says so). */
#define RSL_POLICY_INSTRUCTION_LIMIT 500000L
/* CPU time a policy decision (or breaker hook) may take, C calls included
 * (a real decision takes microseconds). */
#define RSL_POLICY_TIME_LIMIT_MS 10.0
/* Instructions and CPU time loading and validating a policy may take. */
#define RSL_POLICY_LOAD_INSTRUCTION_LIMIT 1000000L
#define RSL_POLICY_LOAD_TIME_LIMIT_MS 25.0
/* Instructions an upstream handler may run per request. */
#define RSL_HANDLER_INSTRUCTION_LIMIT 10000000L

/* Calls the function below `nargs` arguments on L's stack, like lua_pcall.
 * instr_limit <= 0 means no limit.  On error returns non-LUA_OK and leaves
 * one string on the stack: the message, then a traceback. */
int rsl_luacall(lua_State *L, int nargs, int nresults, long instr_limit);

/* rsl_luacall with a CPU-time limit too (time_ms <= 0: none), measured on
 * the calling thread's CPU clock so that a loaded machine does not trip it. */
int rsl_luacall_timed(lua_State *L, int nargs, int nresults, long instr_limit,
                      double time_ms);

/* rsl_luacall_timed that keeps in seen (seen_size bytes, as given until
 * the first check) the
 * running code's file:line at each limit check: at most some thousand
 * instructions, or one bounded C call, before any later point.  For code
 * that must not inspect the stack itself (an allocator may run while Lua
 * 5.4.6+ holds the stack as offsets).  When *stop (if stop is not NULL)
 * becomes non-zero the call stops at its next limit check, like one out of
 * time: the allocator's way to end a call it refused memory. */
int rsl_luacall_tracked(lua_State *L, int nargs, int nresults,
                        long instr_limit, double time_ms, char *seen,
                        size_t seen_size, const int *stop);

/* Raises the limit error when the running limited call is out of time or
 * instructions; a no-op outside one.  For C functions that may run long
 * without executing Lua instructions. */
void rsl_luacall_check(lua_State *L);

/* Notes the running code's position for rsl_luacall_tracked, without a
 * limit check: for C functions that may allocate much. */
void rsl_luacall_note(lua_State *L);

/* The calling thread's CPU clock, in ms. */
double rsl_luacall_cpu_ms(void);

/* A hook for states whose code must never run outside a limited call: it
 * raises at the first instruction (a finalizer run by a stray collection). */
void rsl_luacall_forbid(lua_State *L);

#endif
