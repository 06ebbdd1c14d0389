/*
 * lua_server — the Lua face of the scriptable upstream: `core.serve{...}`
 * returns a "resilua.server" userdata (address, stats, close), and each
 * request goes to the Lua handler through one protected, instruction-limited
 * call on the runtime's main thread.
 *
 * Provides: rsl_lua_server_open (declared in lua_core.h).
 * Uses: server (HTTP, keys, stats), luacall (the protected call), lua_core
 * (the runtime: main thread and loop).
 */
#include <errno.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grpc/grpc.h"
#include "lua_core.h"
#include "luacall.h"
#include "server.h"

#define SERVER_MT "resilua.server"
#define DEFAULT_LISTEN "127.0.0.1:0"

/* Lives inline in the userdata.  While open it holds a ref to its own
 * userdata (an active server is not collected, as luv does for handles),
 * released by close; __gc only runs early if the state itself closes. */
typedef struct lserver {
  rsl_server *srv; /* NULL once closed */
  rsl_runtime *rt;
  int handler_ref; /* LUA_NOREF: the model stub */
  int self_ref;
} lserver;

/* What call_handler needs; lives on the C stack of lua_handler. */
typedef struct handler_call {
  int handler_ref;
  const rsl_server_request *req;
} handler_call;

static const char *const SERVE_OPTIONS[] = {"listen", "handler", "dedup",
                                            "idle_timeout_ms", NULL};
static const char *const RESPONSE_FIELDS[] = {
    "status", "headers", "body", "delay_ms", "action", "grpc_status",
    "grpc_message", NULL};
static const char *const ACTIONS[] = {"hang", "reset", "close", NULL};
static const rsl_server_action ACTION_CODES[] = {
  RSL_SERVER_HANG, RSL_SERVER_RESET, RSL_SERVER_CLOSE};

static int find_name(const char *const names[], const char *s) {
  for (int i = 0; names[i]; i++)
    if (strcmp(names[i], s) == 0) return i;
  return -1;
}

/* Raises on a key of table `idx` that is not in `known`: a typo
 * ("stauts") would otherwise be ignored without a word.  Raw access only,
 * here and below: reading a result runs no user code. */
static void check_fields(lua_State *L, int idx, const char *const known[],
                         const char *what) {
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_type(L, -2) != LUA_TSTRING)
      luaL_error(L, "%s: unexpected %s key", what, luaL_typename(L, -2));
    if (find_name(known, lua_tostring(L, -2)) < 0)
      luaL_error(L, "%s: unknown field '%s'", what, lua_tostring(L, -2));
    lua_pop(L, 1); /* value */
  }
}

/* --- the handler bridge ------------------------------------------------- */

static void push_request(lua_State *L, const rsl_server_request *req) {
  lua_createtable(L, 0, 6);
  lua_pushstring(L, req->method);
  lua_setfield(L, -2, "method");
  lua_pushlstring(L, req->path, req->path_len);
  lua_setfield(L, -2, "path");
  lua_pushlstring(L, req->query, req->query_len);
  lua_setfield(L, -2, "query");
  lua_pushlstring(L, req->body, req->body_len);
  lua_setfield(L, -2, "body");
  lua_pushinteger(L, (lua_Integer)req->n);
  lua_setfield(L, -2, "n");
  if (req->grpc) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "grpc");
  }
  lua_createtable(L, 0, (int)req->nheaders);
  for (size_t i = 0; i < req->nheaders; i++) {
    const rsl_server_header *h = &req->headers[i];
    lua_pushlstring(L, h->name, h->name_len);
    lua_pushvalue(L, -1);
    if (lua_rawget(L, -3) == LUA_TNIL) { /* headers, name, nil */
      lua_pop(L, 1);
      lua_pushlstring(L, h->value, h->value_len);
    } else { /* repeated: join the values, as HTTP allows */
      lua_pushliteral(L, ", ");
      lua_pushlstring(L, h->value, h->value_len);
      lua_concat(L, 3);
    }
    lua_rawset(L, -3);
  }
  lua_setfield(L, -2, "headers");
}

static int bad_field(lua_State *L, const char *field, const char *expected) {
  const char *got = lua_type(L, -1) == LUA_TNUMBER ? luaL_tolstring(L, -1, NULL)
                                                   : luaL_typename(L, -1);
  return luaL_error(L, "handler returned bad '%s' (%s expected, got %s)", field,
                    expected, got);
}

static void read_headers(lua_State *L, int idx, rsl_server_response *res) {
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int t = lua_type(L, -1);
    if (lua_type(L, -2) != LUA_TSTRING ||
        (t != LUA_TSTRING && t != LUA_TNUMBER))
      bad_field(L, "headers", "string keys and string values");
    size_t nlen, vlen;
    const char *name = lua_tolstring(L, -2, &nlen);
    lua_pushvalue(L, -1); /* tolstring on a copy: lua_next needs the key */
    const char *value = lua_tolstring(L, -1, &vlen);
    int rc = rsl_server_response_header(res, name, nlen, value, vlen);
    if (rc == -EINVAL)
      luaL_error(L, "handler returned bad header '%s' (name must be a token, "
                    "value without CR, LF or NUL)", name);
    if (rc < 0) luaL_error(L, "handler returned headers too large");
    lua_pop(L, 2); /* copy, value */
  }
}

static int rawfield(lua_State *L, int idx, const char *name) {
  lua_pushstring(L, name);
  return lua_rawget(L, idx);
}

/* grpc_status (a number or a name such as "UNAVAILABLE") and
 * grpc_message: a gRPC call's answer (ignored over HTTP/1.1). */
static void read_grpc(lua_State *L, int idx, rsl_server_response *res) {
  int code = -1, isint = 0;
  int t = rawfield(L, idx, "grpc_status");
  if (t == LUA_TNUMBER) {
    lua_Integer n = lua_tointegerx(L, -1, &isint);
    code = isint && n >= 0 && n < RSL_GRPC_CODE_COUNT ? (int)n : -1;
  } else if (t == LUA_TSTRING && rsl_grpc_code_parse(lua_tostring(L, -1), &code) < 0) {
    code = -1;
  }
  if (t != LUA_TNIL && code < 0)
    bad_field(L, "grpc_status", "a gRPC status code: 0..16 or a name");
  t = rawfield(L, idx, "grpc_message");
  if (t != LUA_TNIL && t != LUA_TSTRING) bad_field(L, "grpc_message", "string");
  size_t len = 0;
  const char *msg = t == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
  if ((code >= 0 || msg) &&
      rsl_server_response_grpc(res, code >= 0 ? code : 0, msg, len) < 0)
    luaL_error(L, "handler returned a grpc_message over 4096 bytes");
  lua_pop(L, 2);
}

/* Fills the response (light userdata 2) from the handler's result (1),
 * raising on anything off.  Called with lua_pcall: it is our code, and its
 * errors need no traceback. */
static int read_response(lua_State *L) {
  const int idx = 1;
  rsl_server_response *res = lua_touserdata(L, 2);
  if (!lua_istable(L, idx))
    luaL_error(L, "handler must return a table, got %s", luaL_typename(L, idx));
  check_fields(L, idx, RESPONSE_FIELDS, "handler result");

  if (rawfield(L, idx, "status") != LUA_TNIL) {
    int isint = 0;
    lua_Integer st = lua_type(L, -1) == LUA_TNUMBER
                         ? lua_tointegerx(L, -1, &isint) : 0;
    if (!isint || st < 100 || st > 599)
      return bad_field(L, "status", "integer 100..599");
    rsl_server_response_status(res, (int)st);
  }
  lua_pop(L, 1);

  int t = rawfield(L, idx, "headers");
  if (t == LUA_TTABLE) read_headers(L, lua_gettop(L), res);
  else if (t != LUA_TNIL) return bad_field(L, "headers", "table");
  lua_pop(L, 1);

  t = rawfield(L, idx, "body");
  if (t == LUA_TSTRING) {
    size_t len;
    const char *body = lua_tolstring(L, -1, &len);
    if (rsl_server_response_body(res, body, len) < 0)
      luaL_error(L, "handler returned a body over %d bytes",
                 RSL_SERVER_MAX_RESPONSE_BYTES);
  } else if (t != LUA_TNIL) {
    return bad_field(L, "body", "string");
  }
  lua_pop(L, 1);

  if (rawfield(L, idx, "delay_ms") != LUA_TNIL) {
    lua_Number d = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : -1;
    if (!(d >= 0 && d <= (lua_Number)RSL_SERVER_MAX_DELAY_MS)) /* NaN too */
      return bad_field(L, "delay_ms", "number 0..86400000");
    uint64_t ms = (uint64_t)d;
    rsl_server_response_delay(res, ms + ((lua_Number)ms < d)); /* round up */
  }
  lua_pop(L, 1);

  read_grpc(L, idx, res);

  if (rawfield(L, idx, "action") != LUA_TNIL) {
    int i = lua_type(L, -1) == LUA_TSTRING
                ? find_name(ACTIONS, lua_tostring(L, -1)) : -1;
    if (i < 0)
      return bad_field(L, "action", "\"hang\", \"reset\" or \"close\"");
    rsl_server_response_action(res, ACTION_CODES[i]);
  }
  lua_pop(L, 1);
  return 0;
}

/* Runs inside rsl_luacall, so that building the request (which may raise
 * out of memory) is protected too, and the instruction limit and the
 * traceback cover the user's handler called from here. */
static int call_handler(lua_State *L) {
  handler_call *call = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, call->handler_ref);
  push_request(L, call->req);
  lua_call(L, 1, 1);
  return 1;
}

/* The server's handler: always on the main thread, never on a coroutine
 * that may be suspended. */
static int lua_handler(void *ud, const rsl_server_request *req,
                       rsl_server_response *res, char **err) {
  lserver *ls = ud;
  lua_State *L = ls->rt->L;
  handler_call call = {ls->handler_ref, req};
  if (!lua_checkstack(L, 3)) {
    *err = strdup("handler: Lua stack overflow");
    return -1;
  }
  lua_pushcfunction(L, call_handler);
  lua_pushlightuserdata(L, &call);
  int rc = rsl_luacall(L, 1, 1, RSL_HANDLER_INSTRUCTION_LIMIT);
  if (rc == LUA_OK) {
    lua_pushcfunction(L, read_response);
    lua_insert(L, -2); /* read_response, result */
    lua_pushlightuserdata(L, res);
    rc = lua_pcall(L, 2, 0, 0);
  }
  if (rc == LUA_OK) return 0;
  *err = strdup(lua_tostring(L, -1));
  lua_pop(L, 1); /* message */
  return -1;
}

/* --- the server object -------------------------------------------------- */

static lserver *check_open(lua_State *L) {
  lserver *ls = luaL_checkudata(L, 1, SERVER_MT);
  luaL_argcheck(L, ls->srv != NULL, 1, "server is closed");
  return ls;
}

/* core.serve{ listen = "HOST:PORT", handler = function(req) ... end,
 *             dedup = true (Idempotency-Key dedup; false turns it off),
 *             idle_timeout_ms = 60000 (an idle connection is closed) }
 * -> server, or nil, message when it cannot listen. */
static int l_serve(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  check_fields(L, 1, SERVE_OPTIONS, "serve");
  int t = lua_getfield(L, 1, "listen");
  luaL_argcheck(L, t == LUA_TNIL || t == LUA_TSTRING, 1,
                "'listen' must be a string \"HOST:PORT\"");
  const char *listen = t == LUA_TNIL ? DEFAULT_LISTEN : lua_tostring(L, -1);
  t = lua_getfield(L, 1, "handler");
  luaL_argcheck(L, t == LUA_TNIL || t == LUA_TFUNCTION, 1,
                "'handler' must be a function");

  int dt = lua_getfield(L, 1, "dedup");
  luaL_argcheck(L, dt == LUA_TNIL || dt == LUA_TBOOLEAN, 1,
                "'dedup' must be a boolean");
  int dedup = dt == LUA_TNIL || lua_toboolean(L, -1);
  lua_pop(L, 1);

  uint64_t idle_timeout_ms = RSL_SERVER_IDLE_TIMEOUT_MS;
  if (lua_getfield(L, 1, "idle_timeout_ms") != LUA_TNIL) {
    int isint = 0;
    lua_Integer ms = lua_tointegerx(L, -1, &isint);
    luaL_argcheck(L, isint && ms >= 1 &&
                         (uint64_t)ms <= RSL_SERVER_MAX_IDLE_TIMEOUT_MS, 1,
                  "'idle_timeout_ms' must be an integer 1..86400000");
    idle_timeout_ms = (uint64_t)ms;
  }
  lua_pop(L, 1);

  /* Created closed, so __gc copes with any failure below. */
  lserver *ls = lua_newuserdatauv(L, sizeof *ls, 0);
  *ls = (lserver){NULL, rsl_core_runtime(L), LUA_NOREF, LUA_NOREF};
  luaL_setmetatable(L, SERVER_MT);
  if (t == LUA_TFUNCTION) {
    lua_pushvalue(L, -2);
    ls->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  char *err = NULL;
  int rc = rsl_server_new(&ls->srv, ls->rt->loop, listen, idle_timeout_ms,
                          ls->handler_ref == LUA_NOREF ? NULL : lua_handler,
                          ls, &err);
  if (rc < 0) {
    char msg[512]; /* err is freed before anything that may raise */
    snprintf(msg, sizeof msg, "%s", err ? err : strerror(-rc));
    free(err);
    lua_pushnil(L);
    lua_pushstring(L, msg);
    return 2;
  }
  rsl_server_set_dedup(ls->srv, dedup);
  lua_pushvalue(L, -1);
  ls->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

/* close, __close and __gc: idempotent.  From inside the handler, the
 * server finishes freeing itself once the handler returns. */
static int l_close(lua_State *L) {
  lserver *ls = luaL_checkudata(L, 1, SERVER_MT);
  rsl_server_free(ls->srv);
  ls->srv = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, ls->handler_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ls->self_ref);
  ls->handler_ref = ls->self_ref = LUA_NOREF;
  return 0;
}

static int l_address(lua_State *L) {
  lua_pushstring(L, rsl_server_address(check_open(L)->srv));
  return 1;
}

/* { requests = N, ..., status = { [200] = N, ... } } */
static int l_stats(lua_State *L) {
  const rsl_server_stats *st = rsl_server_stats_get(check_open(L)->srv);
  lua_createtable(L, 0, RSL_SERVER_NCOUNTERS + 1);
  for (int i = 0; i < RSL_SERVER_NCOUNTERS; i++) {
    lua_pushinteger(L, (lua_Integer)st->counter[i]);
    lua_setfield(L, -2, rsl_server_counter_name((rsl_server_counter)i));
  }
  lua_newtable(L);
  for (int code = 100; code < 600; code++) {
    if (!st->status[code]) continue;
    lua_pushinteger(L, (lua_Integer)st->status[code]);
    lua_rawseti(L, -2, code);
  }
  lua_setfield(L, -2, "status");
  return 1;
}

static int l_tostring(lua_State *L) {
  lserver *ls = luaL_checkudata(L, 1, SERVER_MT);
  lua_pushfstring(L, "resilua.server (%s)",
                  ls->srv ? rsl_server_address(ls->srv) : "closed");
  return 1;
}

static const luaL_Reg server_methods[] = {
  {"address", l_address},
  {"stats", l_stats},
  {"close", l_close},
  {NULL, NULL},
};

static const luaL_Reg server_meta[] = {
  {"__gc", l_close},
  {"__close", l_close},
  {"__tostring", l_tostring},
  {NULL, NULL},
};

void rsl_lua_server_open(lua_State *L) {
  if (luaL_newmetatable(L, SERVER_MT)) {
    luaL_setfuncs(L, server_meta, 0);
    luaL_newlib(L, server_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1); /* metatable */
  lua_pushcfunction(L, l_serve);
  lua_setfield(L, -2, "serve");
}
