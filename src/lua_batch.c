/*
 * lua_batch — core.json and core.files: the strict JSON scanner (json.c)
 * and the file checks (files.c) that `resilua batch` needs.  Bindings only.
 *
 *   core.json.scan(s [, max_depth [, field, ...]])
 *       -> type, raw text of each field (false when absent) | nil, message
 *   core.json.scan_in(s, i, j [, max_depth [, field, ...]]): the same for
 *       s:sub(i, j), without making that string
 *   core.json.decode(s [, max_depth]) -> value | nil, message
 *       integers that fit stay integers; arrays carry core.json.array as
 *       metatable; null is core.json.null (the same light userdata as
 *       cjson.null)
 *   core.json.quote(s) -> "\"...\"" | nil, message (s not valid UTF-8)
 *   core.json.minify(s) -> s without whitespace outside strings
 *   core.files.kind(path) -> kind, is_link, real path | nil, message
 *   core.files.sync_dir(dir) -> true | nil, message
 */
#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <lua.h>
#include <stdlib.h>
#include <string.h>

#include "files.h"
#include "json.h"
#include "lua_core.h"

#define DEFAULT_MAX_DEPTH 128
#define MAX_DEPTH_LIMIT 1000
#define MAX_FIELDS 8
#define ERR_CAP 160

static const char *const TYPE_NAMES[] = {
    "null", "boolean", "boolean", "number", "string", "array", "object"};

static int check_depth(lua_State *L, int i) {
  lua_Integer d = luaL_optinteger(L, i, DEFAULT_MAX_DEPTH);
  luaL_argcheck(L, d >= 1 && d <= MAX_DEPTH_LIMIT, i, "depth out of range");
  return (int)d;
}

/* Scans s[i, j] (1-based, inclusive); the fields' names from index
 * `first` on. */
static int scan_range(lua_State *L, const char *s, size_t n, int max_depth,
                      int first) {
  int nfields = lua_gettop(L) - first + 1;
  if (nfields < 0) nfields = 0;
  luaL_argcheck(L, nfields <= MAX_FIELDS, first + MAX_FIELDS,
                "too many fields");
  rsl_json_field fields[MAX_FIELDS];
  for (int i = 0; i < nfields; i++)
    fields[i].name = luaL_checklstring(L, first + i, &fields[i].name_len);
  rsl_json_scan_args args = {
      .max_depth = max_depth, .fields = fields, .field_count = (size_t)nfields};
  rsl_json_type type;
  char err[ERR_CAP];
  if (rsl_json_scan(s, n, &args, &type, err, sizeof err) != RSL_JSON_OK) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  luaL_checkstack(L, nfields + 1, NULL);
  lua_pushstring(L, TYPE_NAMES[type]);
  for (int i = 0; i < nfields; i++) {
    if (fields[i].found)
      lua_pushlstring(L, s + fields[i].start, fields[i].len);
    else
      lua_pushboolean(L, 0);
  }
  return nfields + 1;
}

static int json_scan(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  return scan_range(L, s, n, check_depth(L, 2), 3);
}

/* scan_in(s, i, j, ...): scan(s:sub(i, j), ...) without making that
 * string (batch reads lines out of its read buffer). */
static int json_scan_in(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  lua_Integer i = luaL_checkinteger(L, 2), j = luaL_checkinteger(L, 3);
  luaL_argcheck(L, i >= 1 && (size_t)i <= n + 1, 2, "out of range");
  luaL_argcheck(L, j >= i - 1 && (size_t)j <= n, 3, "out of range");
  return scan_range(L, s + i - 1, (size_t)(j - i + 1), check_depth(L, 4), 5);
}

/* --- decode: the visitor builds the value on the Lua stack --------------- */

typedef struct decoder {
  lua_State *L;
  int depth;
  lua_Integer *next_index; /* per open container, max_depth + 1 of each */
  rsl_json_type *kind;
} decoder;

static int array_mt_key; /* registry key of core.json.array */

/* The value on top goes into the container below it (under the key above
 * that container, for an object). */
static void attach(decoder *d) {
  if (d->depth == 0) return; /* the top-level value: it stays */
  if (d->kind[d->depth] == RSL_JSON_ARRAY)
    lua_rawseti(d->L, -2, ++d->next_index[d->depth]);
  else
    lua_rawset(d->L, -3);
}

static int dec_open(void *ud, rsl_json_type container) {
  decoder *d = ud;
  luaL_checkstack(d->L, 4, "JSON nested too deep");
  lua_newtable(d->L);
  if (container == RSL_JSON_ARRAY) {
    lua_rawgetp(d->L, LUA_REGISTRYINDEX, &array_mt_key);
    lua_setmetatable(d->L, -2);
  }
  d->depth++;
  d->kind[d->depth] = container;
  d->next_index[d->depth] = 0;
  return 0;
}

static int dec_close(void *ud, rsl_json_type container) {
  decoder *d = ud;
  (void)container;
  d->depth--;
  attach(d);
  return 0;
}

static int dec_key(void *ud, const char *s, size_t n) {
  lua_pushlstring(((decoder *)ud)->L, s, n);
  return 0;
}

static int dec_scalar(void *ud, rsl_json_type type, const char *s, size_t n) {
  decoder *d = ud;
  lua_State *L = d->L;
  switch (type) {
  case RSL_JSON_NULL:
    lua_pushlightuserdata(L, NULL);
    break;
  case RSL_JSON_TRUE:
    lua_pushboolean(L, 1);
    break;
  case RSL_JSON_FALSE:
    lua_pushboolean(L, 0);
    break;
  case RSL_JSON_STRING:
    lua_pushlstring(L, s, n);
    break;
  default: {
    /* Lua reads an integer literal that fits as an integer, else a float:
     * 9007199254740993 stays exact. */
    lua_pushlstring(L, s, n);
    if (!lua_stringtonumber(L, lua_tostring(L, -1)))
      return luaL_error(L, "JSON number not readable: %s", lua_tostring(L, -1));
    lua_remove(L, -2);
  }
  }
  attach(d);
  return 0;
}

static int json_decode(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  int max_depth = check_depth(L, 2);
  lua_settop(L, 1);
  decoder *d = lua_newuserdatauv(L, sizeof *d, 0);
  size_t levels = (size_t)max_depth + 1;
  d->next_index = lua_newuserdatauv(L, levels * sizeof *d->next_index, 0);
  d->kind = lua_newuserdatauv(L, levels * sizeof *d->kind, 0);
  char *scratch = lua_newuserdatauv(L, n + 1, 0);
  d->L = L;
  d->depth = 0;
  rsl_json_visitor v = {.ud = d,
                        .open = dec_open,
                        .close = dec_close,
                        .key = dec_key,
                        .scalar = dec_scalar};
  rsl_json_scan_args args = {
      .max_depth = max_depth, .visitor = &v, .scratch = scratch};
  rsl_json_type type;
  char err[ERR_CAP];
  int base = lua_gettop(L);
  if (rsl_json_scan(s, n, &args, &type, err, sizeof err) != RSL_JSON_OK) {
    lua_settop(L, base);
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  return 1; /* the value, above the decoder's userdata */
}

static int json_quote(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  if (!rsl_json_utf8_valid(s, n)) {
    lua_pushnil(L);
    lua_pushliteral(L, "not valid UTF-8");
    return 2;
  }
  luaL_argcheck(L, n < ((size_t)-1 - 2) / 6, 1, "string too long");
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, rsl_json_string_max(n));
  luaL_pushresultsize(&b, rsl_json_string(s, n, out));
  return 1;
}

/* Assumes valid JSON (scan it first): only the whitespace goes. */
static int json_minify(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, n);
  luaL_pushresultsize(&b, rsl_json_minify(s, n, out));
  return 1;
}

static int files_kind(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  rsl_file_kind kind;
  int is_link;
  int rc = rsl_files_kind(path, &kind, &is_link);
  if (rc) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", path, strerror(rc));
    return 2;
  }
  lua_pushstring(L, rsl_files_kind_name(kind));
  lua_pushboolean(L, is_link);
  char *real = kind == RSL_FILE_MISSING || kind == RSL_FILE_DANGLING
                   ? NULL
                   : realpath(path, NULL);
  if (real)
    lua_pushstring(L, real);
  else
    lua_pushnil(L);
  free(real);
  return 3;
}

static int files_sync_dir(lua_State *L) {
  const char *dir = luaL_checkstring(L, 1);
  int rc = rsl_files_sync_dir(dir);
  if (rc) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", dir, strerror(rc));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static const luaL_Reg JSON_FUNCS[] = {
    {"scan", json_scan},   {"scan_in", json_scan_in}, {"decode", json_decode},
    {"quote", json_quote}, {"minify", json_minify},   {NULL, NULL},
};

static const luaL_Reg FILES_FUNCS[] = {
    {"kind", files_kind},
    {"sync_dir", files_sync_dir},
    {NULL, NULL},
};

void rsl_lua_batch_open(lua_State *L) {
  luaL_newlib(L, JSON_FUNCS);
  lua_pushlightuserdata(L, NULL);
  lua_setfield(L, -2, "null");
  lua_newtable(L); /* the array marker metatable */
  lua_pushliteral(L, "array");
  lua_setfield(L, -2, "__name");
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &array_mt_key);
  lua_setfield(L, -2, "array");
  lua_setfield(L, -2, "json");
  luaL_newlib(L, FILES_FUNCS);
  lua_setfield(L, -2, "files");
}
