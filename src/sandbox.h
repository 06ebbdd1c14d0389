/*
 * sandbox — a policy version's own Lua state.  Nothing in it is shared with
 * the host or with another policy: its own string metatable, its own copies
 * of resilua.policy and resilua.backoff, its own allocator with a memory
 * cap and size limits on one string or block.  It holds only the safe
 * libraries; the C functions that can run long without executing a Lua
 * instruction are bounded (string.rep by size, the pattern functions by a
 * worst-case estimate, those given a long string by a clock check first,
 * all of them by the size of one block), and every instruction runs under
 * rsl_luacall_timed's limits: outside a call a hook stops any code (a
 * finalizer) at once.  Big states are closed on a helper thread.
 * Uses: luacall, jitter (a.backoff through the runtime's PRNG), embedded
 * (the Lua modules).  Used by policy.c only.
 */
#ifndef RSL_SANDBOX_H
#define RSL_SANDBOX_H

#include <lua.h>
#include <stddef.h>

#include "jitter.h"

#define RSL_SANDBOX_DEFAULT_MEMORY_MB 64
#define RSL_SANDBOX_MAX_MEMORY_MB 4096
/* One string's bytes, and any other block (a table's parts, the stack):
 * a C operation on one block (a copy, a scan, a comparison) takes time in
 * proportion to its size, and no limit check runs inside it. */
#define RSL_SANDBOX_MAX_STRING_BYTES (1 << 20)
#define RSL_SANDBOX_MAX_BLOCK_BYTES (4 << 20)
/* Policy files and the modules they require: a policy is not a data set. */
#define RSL_SANDBOX_MAX_FILE_BYTES (1 << 20)

typedef struct rsl_sandbox rsl_sandbox;

/* A new sandbox whose allocations stop at mem_bytes; `prng` (the
 * runtime's, it must outlive the sandbox; NULL: one of its own, fixed seed)
 * feeds resilua.backoff.  NULL when out of memory.  The caller owns it
 * (rsl_sandbox_free).  A sandbox is used by one thread at a time. */
rsl_sandbox *rsl_sandbox_new(size_t mem_bytes, rsl_prng *prng);
/* Hands the sandbox the runtime's PRNG (once loaded, on the main thread). */
void rsl_sandbox_set_prng(rsl_sandbox *sb, rsl_prng *prng);

/* Frees the state; its finalizers run under the forbidding hook, so a
 * looping __gc stops at its first instruction. */
void rsl_sandbox_free(rsl_sandbox *sb);
/* Frees it too, on a helper thread when its state is big (a close is
 * O(its objects)): for the loop's thread.  A state still queued at exit
 * is reachable (not a leak); a forked child starts its own thread. */
void rsl_sandbox_free_aside(rsl_sandbox *sb);

lua_State *rsl_sandbox_state(const rsl_sandbox *sb);
size_t rsl_sandbox_memory(const rsl_sandbox *sb);
/* Sets the cap; -1 when the state already uses more. */
int rsl_sandbox_set_cap(rsl_sandbox *sb, size_t mem_bytes);

/* Calls the function below nargs arguments on the sandbox's stack under
 * the limits, like rsl_luacall_timed.  0, or -1 with *err: a malloc'd
 * one-line message naming file:line (NULL when out of memory), owned by
 * the caller; the stack is then back to where it was below the function. */
int rsl_sandbox_call(rsl_sandbox *sb, int nargs, int nresults,
                     long instr_limit, double time_ms, char **err);

/* core.backoff(jitter, base_ms, max_ms, attempt[, prev_ms]) -> ms on prng:
 * the body of the host's and the sandbox's binding alike. */
int rsl_sandbox_backoff(lua_State *L, rsl_prng *prng);

/* For the host too: reads a regular file of at most
 * RSL_SANDBOX_MAX_FILE_BYTES (never blocks on a FIFO or device).  Returns
 * a malloc'd buffer and its length, or NULL with *why set to a static
 * message. */
char *rsl_sandbox_read_file(const char *path, size_t *len, const char **why);
int rsl_sandbox_is_file(const char *path);

#endif
