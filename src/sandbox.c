/*
 * sandbox — a policy version's own Lua state.  See sandbox.h.
 *
 * Why a state per policy rather than an _ENV over read-only views in the
 * host's state: isolation comes for free (the string metatable, the module
 * tables, the defaults are all the policy's own copies), a memory cap is
 * exact (lua_setallocf accounting is per state), and the host's state never
 * runs a policy's metamethods or finalizers.  The cost is measured by
 * bench/sandbox.lua (memory per policy, decide ns).
 */
#include "sandbox.h"

#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <lualib.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "embedded.h"
#include "luacall.h"

/* Allocations at least this big check the call's deadline: copying large
 * strings (string.format, table.concat, `..`) is where C time hides.  So
 * do library calls given a string at least this long. */
#define TIMED_ALLOC_BYTES (64 * 1024)
/* Memory a stopped call may still take over the cap (see sandbox_alloc). */
#define STOPPED_SLACK_BYTES (16 << 20)
/* A string's block: its bytes, its header and terminator. */
#define STRING_BLOCK_MAX_BYTES (RSL_SANDBOX_MAX_STRING_BYTES + 64)
/* A policy's error message: bytes kept (a load lists every problem). */
#define MESSAGE_MAX_BYTES (16 * 1024)
/* The table functions: elements handled by one call. */
#define TABLE_MAX_ELEMENTS ((lua_Integer)1 << 16)
/* Patterns whose worst case passes 10^this steps on their subject are
 * refused (about 5 ms of backtracking). */
#define PATTERN_MAX_LOG10_STEPS 7.0
/* Patterns that may take over 10^this steps check the deadline first. */
#define PATTERN_TIMED_LOG10_STEPS 5.0

struct rsl_sandbox {
  lua_State *L;
  size_t used, cap;
  rsl_prng *prng;    /* the runtime's, or own_prng until it is given */
  rsl_prng own_prng; /* while loading, maybe on a helper thread */
  double time_ms;     /* of the running call; 0 outside one */
  double deadline_ms; /* set at its first big allocation */
  int over_cap, over_block, over_time; /* an allocation was refused: why */
  size_t block_bytes;       /* the block over the size limit */
  int refusals;             /* in the running call */
  int stop;                 /* the call must end (luacall's stop flag) */
  rsl_sandbox *next_closing; /* in the closer's queue */
  char where[160];          /* the code's position at the first refusal */
  char seen[160];           /* at the last limit check (luacall.h) */
};

static char sandbox_key; /* registry: the rsl_sandbox, for the wrappers */

/* --- memory -------------------------------------------------------------- */

/* The position of the first refusal: the allocator must not look at the
 * stack (Lua 5.4.6+ calls it to grow the stack while the frames hold
 * offsets, not pointers), so it copies the one the limit checks last
 * noted (rsl_luacall_tracked). */
static void note_refusal(rsl_sandbox *sb) {
  if (!sb->where[0]) memcpy(sb->where, sb->seen, sizeof sb->where);
}

/* Ends the running call at its next instruction (on the state's main
 * thread; a coroutine at its next limit check), so that a pcall cannot
 * catch a refusal and try again: each refusal costs a full collection
 * (Lua's emergency GC), in C, unbounded by the hook. */
static void stop_call(rsl_sandbox *sb) {
  sb->stop = 1;
  lua_sethook(sb->L, lua_gethook(sb->L), LUA_MASKCOUNT, 1);
}

/* A refusal of growth: Lua answers it with a full collection, then asks
 * again.  A call's second refusal ends it (a collection that frees a
 * little each time must not be run again and again), and so does any
 * refusal once the call is out of time (the clock is read here too: a
 * collection is C work the hook does not see).  The message names the
 * first refusal's limit. */
static void *refuse(rsl_sandbox *sb, int *why) {
  *why = 1;
  note_refusal(sb);
  int again = sb->refusals++ > 0;
  int late = 0;
  if (sb->time_ms > 0) {
    double now = rsl_luacall_cpu_ms();
    if (sb->deadline_ms == 0) sb->deadline_ms = now + sb->time_ms;
    late = now > sb->deadline_ms;
  }
  if ((again || late) && sb->time_ms > 0) stop_call(sb);
  return NULL;
}

/* Counts every byte; refuses growth over the cap, a block over the size
 * limits (the C work on one block, a copy or a scan, is bounded by its
 * size), and big growth after the deadline.  Shrinking never fails (Lua
 * relies on it).  A new block's osize is its Lua type. */
static void *sandbox_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  rsl_sandbox *sb = ud;
  size_t block_max = !ptr && osize == LUA_TSTRING ? STRING_BLOCK_MAX_BYTES
                                                  : RSL_SANDBOX_MAX_BLOCK_BYTES;
  if (!ptr) osize = 0;
  if (nsize == 0) {
    free(ptr);
    sb->used -= osize;
    return NULL;
  }
  if (nsize > osize) {
    size_t grow = nsize - osize;
    /* Stopped, the call's last instructions (the error's own message; a
     * coroutine's, up to its next hook) get their memory from a slack
     * over the cap: a refusal now would only run another collection. */
    size_t cap = sb->stop ? sb->cap + STOPPED_SLACK_BYTES : sb->cap;
    if (grow > cap - sb->used || sb->used > cap)
      return refuse(sb, &sb->over_cap);
    if (nsize > block_max) {
      sb->block_bytes = nsize;
      return refuse(sb, &sb->over_block);
    }
    if (grow >= TIMED_ALLOC_BYTES && sb->time_ms > 0 && !sb->stop) {
      double now = rsl_luacall_cpu_ms();
      if (sb->deadline_ms == 0) sb->deadline_ms = now + sb->time_ms;
      if (now > sb->deadline_ms) return refuse(sb, &sb->over_time);
    }
  }
  void *p = realloc(ptr, nsize);
  if (!p) return nsize > osize ? NULL : ptr;
  sb->used = sb->used - osize + nsize;
  if (sb->refusals && !sb->stop && (sb->over_cap || sb->over_block)) {
    /* after a refusal: the collection made room, the call goes on */
    sb->over_cap = sb->over_block = 0;
    sb->where[0] = '\0';
  }
  return p;
}

/* --- files --------------------------------------------------------------- */

int rsl_sandbox_is_file(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

char *rsl_sandbox_read_file(const char *path, size_t *len, const char **why) {
  char *buf = NULL;
  /* O_NONBLOCK: opening a FIFO must not wait for a writer. */
  int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  struct stat st;
  *why = NULL;
  if (fd < 0) {
    *why = strerror(errno);
    goto out;
  }
  if (fstat(fd, &st) < 0) {
    *why = strerror(errno);
    goto out;
  }
  if (S_ISDIR(st.st_mode)) {
    *why = "is a directory, not a policy file";
    goto out;
  }
  if (!S_ISREG(st.st_mode)) {
    *why = "is not a regular file";
    goto out;
  }
  if (st.st_size > RSL_SANDBOX_MAX_FILE_BYTES) {
    *why = "is over 1 MB: not a policy";
    goto out;
  }
  buf = malloc((size_t)st.st_size + 1);
  if (!buf) {
    *why = "out of memory";
    goto out;
  }
  size_t got = 0;
  while (got <= (size_t)st.st_size) { /* one byte more: it may have grown */
    ssize_t n = read(fd, buf + got, (size_t)st.st_size + 1 - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      *why = strerror(errno);
      break;
    }
    if (n == 0) break;
    got += (size_t)n;
  }
  if (!*why && got > (size_t)st.st_size) *why = "changed while being read";
  if (*why) {
    free(buf);
    buf = NULL;
    goto out;
  }
  buf[got] = '\0';
  *len = got;
out:
  if (fd >= 0) close(fd);
  return buf;
}

static int push_text(lua_State *L) {
  lua_pushlstring(L, lua_touserdata(L, 1), (size_t)lua_tointeger(L, 2));
  return 1;
}

/* core.read_file(path) -> text | nil, message */
static int sb_read_file(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  size_t len = 0;
  const char *why;
  char *buf = rsl_sandbox_read_file(path, &len, &why);
  if (!buf) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", path, why);
    return 2;
  }
  /* The buffer is C's: push it in protected mode so a memory error does
   * not leak it. */
  lua_pushcfunction(L, push_text);
  lua_pushlightuserdata(L, buf);
  lua_pushinteger(L, (lua_Integer)len);
  int rc = lua_pcall(L, 2, 1, 0);
  free(buf);
  return rc == LUA_OK ? 1 : lua_error(L);
}

/* core.is_file(path) -> boolean */
static int sb_is_file(lua_State *L) {
  lua_pushboolean(L, rsl_sandbox_is_file(luaL_checkstring(L, 1)));
  return 1;
}

/* --- bounded library functions ------------------------------------------ */

static rsl_sandbox *sandbox_of(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &sandbox_key);
  rsl_sandbox *sb = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return sb;
}

/* Calls the original library function (upvalue 1) with our arguments. */
static int call_original(lua_State *L) {
  rsl_luacall_note(L); /* where a refusal inside would be (see seen) */
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

/* A library function (upvalue 1) that works through its string
 * arguments in C without allocating (utf8.len, string.byte, a plain find)
 * or byte by byte (string.upper): given a long one, it checks the clock
 * first, so that a loop of such calls stops within one of them. */
static int long_string_arg(lua_State *L) {
  for (int i = lua_gettop(L); i >= 1; i--)
    if (lua_type(L, i) == LUA_TSTRING && lua_rawlen(L, i) >= TIMED_ALLOC_BYTES)
      return 1;
  return 0;
}

static int sb_timed(lua_State *L) {
  if (long_string_arg(L)) rsl_luacall_check(L);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

/* The library functions that scan or copy a string argument in C: each
 * is wrapped in sb_timed (rep and the pattern functions have their own). */
static const char *const STRING_TIMED[] = {
    "byte", "format", "lower", "upper", "reverse", "sub", "unpack", NULL};
static const char *const UTF8_TIMED[] = {"len", "offset", "codepoint",
                                         "codes", NULL};

/* Wraps each named function of the table at the top of the stack. */
static void wrap_timed(lua_State *L, const char *const *names) {
  for (; *names; names++) {
    lua_getfield(L, -1, *names);
    lua_pushcclosure(L, sb_timed, 1);
    lua_setfield(L, -2, *names);
  }
}

/* string.rep, ours: the result's size is checked against the cap before
 * any work, an empty result returns at once (the original loops n times
 * even then), and the copy doubles what is already written, so the time is
 * that of copying the result once (the original copies piece by piece). */
static int sb_rep(lua_State *L) {
  size_t len, seplen;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_Integer n = luaL_checkinteger(L, 2);
  const char *sep = luaL_optlstring(L, 3, "", &seplen);
  if (n <= 0 || (len == 0 && seplen == 0)) {
    lua_pushliteral(L, "");
    return 1;
  }
  double total = (double)n * (double)len + (double)(n - 1) * (double)seplen;
  if (total > (double)sandbox_of(L)->cap)
    return luaL_error(L, "string.rep: a result of %d MB is over the "
                      "policy's memory limit", (int)fmin(total / 1048576, 1e9));
  if (total > RSL_SANDBOX_MAX_STRING_BYTES)
    return luaL_error(L, "string.rep: size limit exceeded (a result of "
                      "%d KB; a policy's strings hold at most %d MB)",
                      (int)(total / 1024), RSL_SANDBOX_MAX_STRING_BYTES >> 20);
  rsl_luacall_check(L);
  size_t unit = len + seplen, size = (size_t)n * unit; /* sep after each */
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, size);
  memcpy(out, s, len);
  memcpy(out + len, sep, seplen);
  for (size_t done = unit; done < size;) {
    size_t chunk = done < size - done ? done : size - done;
    memcpy(out + done, out, chunk);
    done += chunk;
  }
  luaL_pushresultsize(&b, size - seplen); /* no sep after the last */
  return 1;
}

/* The end of the set that starts at p[i] == '[' (Lua's own rule: the first
 * character after '[' or '[^' is a member even when it is ']'). */
static size_t set_end(const char *p, size_t plen, size_t i) {
  i++;
  if (i < plen && p[i] == '^') i++;
  do {
    if (i >= plen) return plen;
    if (p[i++] == '%') i++;
  } while (i < plen && p[i] != ']');
  return i + 1;
}

/* An upper bound, as log10, of the steps Lua's backtracking matcher may
 * take for pattern p on an n-byte subject: each `*`, `+` or `-` may try
 * every length, each `?` two, an unanchored search every start, and %b or
 * a back-reference scans the subject. */
static double pattern_log_steps(const char *p, size_t plen, size_t n,
                                int anchor_ok) {
  size_t i = 0;
  int anchored = 0, reps = 0, opts = 0, linear = 0;
  if (anchor_ok && plen > 0 && p[0] == '^') anchored = 1, i = 1;
  while (i < plen) {
    size_t end;
    if (p[i] == '(' || p[i] == ')') {
      i++;
      continue;
    }
    if (p[i] == '%' && i + 1 < plen && p[i + 1] == 'b') {
      linear = 1;
      i += 4;
      continue;
    }
    if (p[i] == '%' && i + 1 < plen && p[i + 1] == 'f') {
      i = i + 2 < plen ? set_end(p, plen, i + 2) : plen;
      continue;
    }
    if (p[i] == '%' && i + 1 < plen && p[i + 1] >= '0' && p[i + 1] <= '9') {
      linear = 1;
      i += 2;
      continue;
    }
    if (p[i] == '%') end = i + 2;
    else if (p[i] == '[') end = set_end(p, plen, i);
    else end = i + 1;
    if (end < plen && (p[end] == '*' || p[end] == '+' || p[end] == '-')) {
      reps++;
      end++;
    } else if (end < plen && p[end] == '?') {
      opts++;
      end++;
    }
    i = end;
  }
  return (reps + !anchored + linear) * log10((double)n + 1) +
         opts * log10(2.0) + log10((double)plen + 1);
}

/* string.find/match/gmatch/gsub: refuses a pattern whose worst case on
 * this subject is too long to run inside a decision, and checks the
 * deadline before one that may take a while.  Upvalue 2: 1 when a leading
 * '^' anchors (all but gmatch). */
static int sb_pattern(lua_State *L) {
  size_t n, plen;
  luaL_checklstring(L, 1, &n);
  const char *p = luaL_checklstring(L, 2, &plen);
  int is_find = lua_toboolean(L, lua_upvalueindex(3));
  if (is_find && lua_toboolean(L, 4)) { /* plain: a scan */
    if (n >= TIMED_ALLOC_BYTES) rsl_luacall_check(L);
    return call_original(L);
  }
  double steps = pattern_log_steps(p, plen, n,
                                   lua_toboolean(L, lua_upvalueindex(2)));
  if (steps > PATTERN_MAX_LOG10_STEPS)
    return luaL_error(L, "pattern '%s' on a %d-byte subject may backtrack "
                      "about 10^%d steps: too costly for a policy (see "
                      "docs/policies.md, The sandbox)",
                      plen > 40 ? "(long)" : p, (int)fmin((double)n, 2e9),
                      (int)fmin(steps, 999));
  if (steps > PATTERN_TIMED_LOG10_STEPS) rsl_luacall_check(L);
  return call_original(L);
}

static void wrap_pattern(lua_State *L, const char *name, int anchor_ok,
                         int is_find) {
  lua_getfield(L, -1, name);
  lua_pushboolean(L, anchor_ok);
  lua_pushboolean(L, is_find);
  lua_pushcclosure(L, sb_pattern, 3);
  lua_setfield(L, -2, name);
}

/* The table functions loop in C, with no instruction to count, over a
 * range: #t for sort and for insert or remove at a position, i..j (#t by
 * default) for concat and unpack, f..e for move.  Each element may call a
 * C __index or __newindex (`__index = table.concat` makes every read
 * free), and #t is whatever a __len returns (a Lua __len may return 10 when
 * asked here and 2^40 when the library asks again).  So a table with __len
 * is refused, the range is taken from the raw length and capped, and the
 * clock is checked before the original runs. */
static int table_call(lua_State *L, const char *name, lua_Unsigned count) {
  if (count > (lua_Unsigned)TABLE_MAX_ELEMENTS)
    return luaL_error(L, "table.%s: over %d elements in a policy", name,
                      (int)TABLE_MAX_ELEMENTS);
  rsl_luacall_check(L);
  return call_original(L);
}

/* The raw length of the table at 1, which must have no __len. */
static lua_Unsigned table_len(lua_State *L, const char *name) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (luaL_getmetafield(L, 1, "__len") != LUA_TNIL)
    luaL_error(L, "table.%s: a table with __len is not allowed in a policy "
               "(its length would set how long C code loops)", name);
  return lua_rawlen(L, 1);
}

/* The count of i..j, from arguments at idx and idx + 1 (j: #t unless
 * `j_required`), without overflow. */
static lua_Unsigned range_count(lua_State *L, int idx, lua_Unsigned len,
                                int j_required) {
  lua_Integer i = luaL_optinteger(L, idx, 1);
  lua_Integer j = j_required ? luaL_checkinteger(L, idx + 1)
                             : luaL_optinteger(L, idx + 1, (lua_Integer)len);
  if (i > j) return 0;
  lua_Unsigned span = (lua_Unsigned)j - (lua_Unsigned)i; /* 2^64 - 1 at most */
  return span == ~(lua_Unsigned)0 ? span : span + 1;
}

static int sb_sort(lua_State *L) {
  return table_call(L, "sort", table_len(L, "sort"));
}

static int sb_insert(lua_State *L) { /* insert(t, v) appends: no loop */
  lua_Unsigned len = table_len(L, "insert");
  return table_call(L, "insert", lua_gettop(L) >= 3 ? len : 0);
}

static int sb_remove(lua_State *L) { /* remove(t) takes the last: no loop */
  lua_Unsigned len = table_len(L, "remove");
  return table_call(L, "remove", lua_gettop(L) >= 2 ? len : 0);
}

static int sb_concat(lua_State *L) {
  lua_Unsigned len = table_len(L, "concat");
  return table_call(L, "concat", range_count(L, 3, len, 0));
}

static int sb_unpack(lua_State *L) {
  lua_Unsigned len = table_len(L, "unpack");
  return table_call(L, "unpack", range_count(L, 2, len, 0));
}

static int sb_move(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  return table_call(L, "move", range_count(L, 2, 0, 1));
}

static const luaL_Reg TABLE_BOUNDED[] = {
    {"sort", sb_sort},     {"insert", sb_insert}, {"remove", sb_remove},
    {"concat", sb_concat}, {"unpack", sb_unpack}, {"move", sb_move},
    {NULL, NULL},
};

/* setmetatable: no __gc.  Lua runs finalizers with hooks off, so no limit
 * could stop one; and an object is marked for finalization only when its
 * metatable has __gc at this call (a later mt.__gc = f does nothing). */
static int sb_setmetatable(lua_State *L) {
  if (lua_istable(L, 2)) {
    lua_pushliteral(L, "__gc");
    if (lua_rawget(L, 2) != LUA_TNIL)
      return luaL_error(L, "setmetatable: __gc is not allowed in a policy "
                        "(finalizers run outside the time limit)");
    lua_pop(L, 1);
  }
  return call_original(L);
}

/* --- the sandbox's resilua.core ------------------------------------------ */

/* core.pcall(limit, f, ...): the whole sandbox call is already limited, and
 * once the limit trips every instruction raises, so a plain pcall. */
static int sb_pcall(lua_State *L) {
  luaL_checktype(L, 2, LUA_TFUNCTION);
  int status = lua_pcall(L, lua_gettop(L) - 2, LUA_MULTRET, 0);
  lua_pushboolean(L, status == LUA_OK);
  lua_replace(L, 1);
  return lua_gettop(L);
}

int rsl_sandbox_backoff(lua_State *L, rsl_prng *prng) {
  rsl_jitter j;
  if (rsl_jitter_parse(luaL_checkstring(L, 1), &j) < 0)
    return luaL_argerror(L, 1, "expected full, equal, decorrelated or none");
  double base = luaL_checknumber(L, 2), max = luaL_checknumber(L, 3);
  lua_Integer attempt = luaL_checkinteger(L, 4);
  double prev = luaL_optnumber(L, 5, base);
  luaL_argcheck(L, base >= 0 && max >= 0, 2, "must not be negative");
  luaL_argcheck(L, attempt >= 1 && attempt <= 1000000, 4, "must be >= 1");
  lua_pushnumber(L, rsl_backoff_ms(prng, j, base, max, (int)attempt, prev));
  return 1;
}

/* The policy's resilua.backoff: on the runtime's PRNG, so --seed makes a
 * decide's delays exact. */
static int sb_backoff(lua_State *L) {
  return rsl_sandbox_backoff(L, sandbox_of(L)->prng);
}

static int sb_self_path(lua_State *L) {
  lua_pushnil(L); /* the policy path comes from the host, complete */
  return 1;
}

static const luaL_Reg SANDBOX_CORE[] = {
    {"pcall", sb_pcall},         {"backoff", sb_backoff},
    {"read_file", sb_read_file}, {"is_file", sb_is_file},
    {"self_path", sb_self_path}, {NULL, NULL},
};

/* The embedded modules a policy may use: pure Lua, no I/O. */
static const char *const POLICY_MODULES[] = {
    "resilua.policy", "resilua.backoff", "resilua.grpc", "resilua.names", NULL};

/* The state's own `require` (for resilua.policy's code, not the policy's,
 * which gets its own from policy.lua): loaded modules, else the embedded
 * modules a policy may use. */
static int sb_require(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, name) != LUA_TNIL) return 1;
  lua_pop(L, 1);
  const char *const *allowed = POLICY_MODULES;
  while (*allowed && strcmp(*allowed, name) != 0) allowed++;
  if (!*allowed)
    return luaL_error(L, "module '%s' is not available in a policy", name);
  for (const rsl_embedded *m = rsl_embedded_modules; m->name; m++) {
    if (strcmp(m->name, name) != 0) continue;
    if (luaL_loadbufferx(L, m->source, m->len, m->chunkname, "t") != LUA_OK)
      return lua_error(L);
    lua_pushstring(L, name);
    lua_call(L, 1, 1);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, name);
    return 1;
  }
  return luaL_error(L, "module '%s' is not embedded", name);
}

/* --- the state ----------------------------------------------------------- */

static const char *const REMOVED_GLOBALS[] = {
    "dofile", "loadfile", "collectgarbage", "print", "warn", NULL};
static const char *const OS_KEPT[] = {"time", "clock", "date", "difftime",
                                      NULL};

static int setup(lua_State *L) {
  luaL_requiref(L, LUA_GNAME, luaopen_base, 1);
  luaL_requiref(L, LUA_STRLIBNAME, luaopen_string, 1);
  luaL_requiref(L, LUA_TABLIBNAME, luaopen_table, 1);
  luaL_requiref(L, LUA_MATHLIBNAME, luaopen_math, 1);
  luaL_requiref(L, LUA_UTF8LIBNAME, luaopen_utf8, 1);
  luaL_requiref(L, LUA_COLIBNAME, luaopen_coroutine, 1);
  luaL_requiref(L, LUA_OSLIBNAME, luaopen_os, 0);
  lua_settop(L, 0);

  lua_pushglobaltable(L);
  for (const char *const *g = REMOVED_GLOBALS; *g; g++) {
    lua_pushnil(L);
    lua_setfield(L, 1, *g);
  }
  lua_pushcfunction(L, sb_require);
  lua_setfield(L, 1, "require");
  lua_getfield(L, 1, "setmetatable");
  lua_pushcclosure(L, sb_setmetatable, 1);
  lua_setfield(L, 1, "setmetatable");
  /* os: the clock and dates only */
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_getfield(L, -1, LUA_OSLIBNAME);
  lua_createtable(L, 0, 4);
  for (const char *const *k = OS_KEPT; *k; k++) {
    lua_getfield(L, -2, *k);
    lua_setfield(L, -2, *k);
  }
  lua_setfield(L, 1, LUA_OSLIBNAME);
  lua_pop(L, 1); /* the full os table */
  lua_pushnil(L);
  lua_setfield(L, -2, LUA_OSLIBNAME); /* gone from package.loaded too */

  /* string: bounded functions; the metatable hidden from getmetatable */
  lua_getfield(L, 1, LUA_STRLIBNAME);
  lua_pushcfunction(L, sb_rep);
  lua_setfield(L, -2, "rep");
  wrap_pattern(L, "find", 1, 1);
  wrap_pattern(L, "match", 1, 0);
  wrap_pattern(L, "gmatch", 0, 0);
  wrap_pattern(L, "gsub", 1, 0);
  wrap_timed(L, STRING_TIMED);
  lua_getfield(L, 1, LUA_UTF8LIBNAME);
  wrap_timed(L, UTF8_TIMED);
  lua_pop(L, 1);
  lua_getfield(L, 1, "tonumber");
  lua_pushcclosure(L, sb_timed, 1); /* strtod over a long string */
  lua_setfield(L, 1, "tonumber");
  lua_getfield(L, 1, LUA_TABLIBNAME);
  for (const luaL_Reg *f = TABLE_BOUNDED; f->name; f++) {
    lua_getfield(L, -1, f->name);
    lua_pushcclosure(L, f->func, 1);
    lua_setfield(L, -2, f->name);
  }
  lua_pop(L, 1);
  lua_pushliteral(L, "");
  lua_getmetatable(L, -1);
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 3);

  luaL_newlib(L, SANDBOX_CORE);
  lua_setfield(L, -2, "resilua.core"); /* into package.loaded */
  lua_settop(L, 0);
  return 0;
}

rsl_sandbox *rsl_sandbox_new(size_t mem_bytes, rsl_prng *prng) {
  rsl_sandbox *sb = calloc(1, sizeof *sb);
  if (!sb) return NULL;
  sb->cap = mem_bytes;
  rsl_prng_seed(&sb->own_prng, 1);
  sb->prng = prng ? prng : &sb->own_prng;
  lua_State *L = lua_newstate(sandbox_alloc, sb);
  if (!L) {
    free(sb);
    return NULL;
  }
  lua_pushlightuserdata(L, sb);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &sandbox_key);
  lua_pushcfunction(L, setup);
  if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
    lua_close(L);
    free(sb);
    return NULL;
  }
  sb->L = L;
  rsl_luacall_forbid(L);
  return sb;
}

void rsl_sandbox_free(rsl_sandbox *sb) {
  if (!sb) return;
  lua_close(sb->L); /* finalizers stop at their first instruction */
  free(sb);
}

/* --- closing aside -------------------------------------------------------- */

/* States at least this big are closed on the closer thread: lua_close
 * frees every object, about 15 ms for a 64 MB state of small tables, and
 * the last ref of an old version usually drops on the loop's thread. */
#define CLOSE_ASIDE_BYTES (1 << 20)

static pthread_mutex_t closer_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t closer_wake = PTHREAD_COND_INITIALIZER;
static rsl_sandbox *closer_queue; /* the states to close, newest first */
static int closer_running, closer_atfork;

/* One thread for the process's lifetime, started at the first big close:
 * it closes the queued states one at a time. */
static void *closer_main(void *arg) {
  (void)arg;
  pthread_mutex_lock(&closer_lock);
  for (;;) {
    while (!closer_queue) pthread_cond_wait(&closer_wake, &closer_lock);
    rsl_sandbox *sb = closer_queue;
    closer_queue = sb->next_closing;
    pthread_mutex_unlock(&closer_lock);
    rsl_sandbox_free(sb);
    pthread_mutex_lock(&closer_lock);
  }
  return NULL;
}

/* A forked child has no closer thread (and the lock as it was at the
 * fork: held here around it). */
static void closer_prepare(void) { pthread_mutex_lock(&closer_lock); }
static void closer_parent(void) { pthread_mutex_unlock(&closer_lock); }
static void closer_child(void) {
  closer_running = 0;
  pthread_mutex_unlock(&closer_lock);
}

void rsl_sandbox_free_aside(rsl_sandbox *sb) {
  if (!sb) return;
  if (sb->used < CLOSE_ASIDE_BYTES) {
    rsl_sandbox_free(sb);
    return;
  }
  pthread_mutex_lock(&closer_lock);
  if (!closer_atfork)
    closer_atfork =
        pthread_atfork(closer_prepare, closer_parent, closer_child) == 0;
  if (!closer_running && closer_atfork) {
    pthread_attr_t attr;
    pthread_t thread;
    if (pthread_attr_init(&attr) == 0) {
      pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
      closer_running = pthread_create(&thread, &attr, closer_main, NULL) == 0;
      pthread_attr_destroy(&attr);
    }
  }
  if (closer_running) {
    sb->next_closing = closer_queue;
    closer_queue = sb;
    sb = NULL;
    pthread_cond_signal(&closer_wake);
  }
  pthread_mutex_unlock(&closer_lock);
  rsl_sandbox_free(sb); /* no thread: here */
}

lua_State *rsl_sandbox_state(const rsl_sandbox *sb) { return sb->L; }

void rsl_sandbox_set_prng(rsl_sandbox *sb, rsl_prng *prng) {
  sb->prng = prng ? prng : &sb->own_prng;
}
size_t rsl_sandbox_memory(const rsl_sandbox *sb) { return sb->used; }

int rsl_sandbox_set_cap(rsl_sandbox *sb, size_t mem_bytes) {
  if (sb->used > mem_bytes) return -1;
  sb->cap = mem_bytes;
  return 0;
}

int rsl_sandbox_call(rsl_sandbox *sb, int nargs, int nresults,
                     long instr_limit, double time_ms, char **err) {
  lua_State *L = sb->L;
  *err = NULL;
  sb->over_cap = sb->over_block = sb->over_time = sb->stop = 0;
  sb->refusals = 0;
  sb->where[0] = '\0';
  /* Until the first limit check notes a line: the function's first. */
  lua_Debug ar;
  sb->seen[0] = '\0';
  if (lua_isfunction(L, -1 - nargs) && !lua_iscfunction(L, -1 - nargs)) {
    lua_pushvalue(L, -1 - nargs);
    lua_getinfo(L, ">S", &ar); /* pops the copy */
    snprintf(sb->seen, sizeof sb->seen, "%s:%d", ar.short_src,
             ar.linedefined > 0 ? ar.linedefined : 1);
  }
  sb->time_ms = time_ms;
  sb->deadline_ms = 0;
  int base = lua_gettop(L) - nargs - 1;
  int status = rsl_luacall_tracked(L, nargs, nresults, instr_limit, time_ms,
                                   sb->seen, sizeof sb->seen, &sb->stop);
  int stopped = sb->stop;
  sb->time_ms = sb->deadline_ms = 0;
  sb->stop = 0;
  if (status == LUA_OK && !sb->over_time && !stopped) return 0;
  /* Out of time or memory for good, even when the code caught the refusal
   * (a pcall around a costly gsub): its results are dropped, like those of
   * a call the instruction limit stopped. */
  int has_msg = status != LUA_OK;
  if (!has_msg) lua_settop(L, base);
  const char *msg = has_msg ? lua_tostring(L, -1) : "";
  char buf[400];
  if (sb->over_cap || sb->over_block || sb->over_time ||
      status == LUA_ERRMEM) {
    /* A refused allocation says only "not enough memory": say which
     * limit, and where. */
    if (sb->over_time)
      snprintf(buf, sizeof buf, "%s: time limit exceeded (%.0f ms)",
               sb->where[0] ? sb->where : "?", time_ms);
    else if (sb->over_block && !sb->over_cap)
      snprintf(buf, sizeof buf,
               "%s: size limit exceeded (a block of %.1f MB: a policy's "
               "strings hold at most %d MB, its tables and stack %d MB)",
               sb->where[0] ? sb->where : "?",
               (double)sb->block_bytes / 1048576,
               RSL_SANDBOX_MAX_STRING_BYTES >> 20,
               RSL_SANDBOX_MAX_BLOCK_BYTES >> 20);
    else
      snprintf(buf, sizeof buf,
               "%s: memory limit exceeded (%zu MB; raise it with memory_mb)",
               sb->where[0] ? sb->where : "?", sb->cap >> 20);
    msg = buf;
  }
  /* The message without the traceback (it may have several lines: a
   * policy's load lists every problem), and within reason: it goes into
   * events and onto the terminal (error(string.rep("x", 1 << 25)) is a
   * policy's message too). */
  const char *tb = strstr(msg, "\nstack traceback:");
  size_t len = tb ? (size_t)(tb - msg) : strlen(msg);
  if (len > MESSAGE_MAX_BYTES) {
    *err = malloc(MESSAGE_MAX_BYTES + 64);
    if (*err)
      snprintf(*err, MESSAGE_MAX_BYTES + 64, "%.*s... (%zu bytes more)",
               MESSAGE_MAX_BYTES, msg, len - MESSAGE_MAX_BYTES);
  } else {
    *err = strndup(msg, len);
  }
  if (has_msg) lua_pop(L, 1);
  /* No collection here: the refusal already ran one (Lua's emergency GC),
   * and the next call's first refusal runs another, which frees this
   * call's garbage.  Each is O(the state), one per failed call at most. */
  return -1;
}
