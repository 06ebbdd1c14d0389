--- resilua.proxy — the `resilua proxy` command (contract 7): one route from
-- flags, or routes and limits from a config file; hot reload of the config
-- and its policies (inotify and SIGHUP: a broken edit keeps the old
-- version, logged with file:line); SIGTERM drains within --grace.
-- The HTTP side is C: src/proxy/ (requests, calls, answers, metrics).
local core = require "resilua.core"
local parse = require "resilua.getopt"
local policy = require "resilua.policy"
local names = require "resilua.names"

local M = {}

M.USAGE = [[
usage: resilua proxy --listen HOST:PORT --upstream URL [--policy NAME|FILE.lua]
       resilua proxy --config proxy.lua
         [--log FILE|-] [--quiet] [--grace SECONDS] [--policy-path DIR]

A reverse proxy (a sidecar): every request is one call to the upstream
under the route's policy, with its retries, backoff, timeouts, deadline,
Retry-After and other server hints, retry budget and circuit breaker.
A service adopts it by changing its base URL to the proxy's.

  --listen HOST:PORT     address to listen on (default 127.0.0.1:8080;
                         port 0 picks one).  Prints `listening on HOST:PORT`.
  --upstream URL         where requests go: URL + the request's path and query
  --policy NAME|FILE.lua the policy (default: default); hot-reloaded
  --policy-path DIR      where to find policies by name (repeatable)
  --config FILE.lua      routes and limits instead of the flags above
  --keep-host            forward the client's Host header (default: upstream's)
  --grace SECONDS        on SIGTERM/SIGINT: stop accepting, finish the calls
                         in flight within this long, then exit 0 (default 30)
  --log FILE|-           event log (default: stderr); --quiet: none
  -h, --help             this text

Per request:
  A POST or PATCH without an Idempotency-Key gets one, the same on every
  attempt.  X-Request-Id is kept or made, forwarded, returned, and named
  in every event of the call (with the route).
  x-resilua-deadline-ms: N   may only shorten the policy's deadline
  x-resilua-max-attempts: N  may only lower its attempts
  (every x-resilua-* request header is removed before forwarding)

Answers:
  The upstream's final response as it is (status, headers, body); or JSON
  {"error","outcome","attempts","request_id"} with 502 (connect, reset,
  protocol), 504 (timeout, deadline) or 503 (breaker open, budget; with
  Retry-After when the breaker's next probe is known).  Every answer has
  x-resilua-attempts and x-resilua-outcome, and x-should-retry: false when
  the proxy already retried or refused.
  Bodies stream through.  Once the first body byte has gone to the client
  there is no retry: an upstream failure then resets the client's
  connection (an error, never a short body that looks complete).

Limits: header fields over max_header_bytes 431, a body over max_body_bytes
413, malformed 400; over max_connections or max_in_flight: 503 at once.

Admin: GET /_resilua/metrics (Prometheus text), GET /_resilua/health
(200, or 503 while draining).  SIGHUP reloads the config and policies.

Config (--config proxy.lua) returns a table:
  return {
    listen = "127.0.0.1:8080",
    admin = "/_resilua",            -- or false: no admin paths
    limits = { max_connections = 10000, max_in_flight = 1000,
               max_header_bytes = 32768, max_body_bytes = 16777216,
               idle_timeout_ms = 60000 },
    policy_path = { "policies" },
    routes = {                      -- tried in order: the first match serves
      { name = "chat", prefix = "/v1/chat", host = "api.local",
        upstream = "http://127.0.0.1:9000", policy = "inference" },
      { name = "rest", prefix = "/", upstream = "http://127.0.0.1:9001",
        policy = { max_attempts = 2 }, keep_host = true },
    },
  }

Exit codes: 0 stopped by a signal (after draining), 2 usage, config,
policy or listen error.
]]

local EXIT_OK, EXIT_USAGE = 0, 2
local DEFAULT_LISTEN = "127.0.0.1:8080"
local DEFAULT_GRACE_S = 30
local STEP_MAX_WAIT_S = 1 -- the signalfd and inotify wake the loop sooner
local DRAIN_STEP_S = 0.05

local CONFIG_FIELDS = { listen = true, admin = true, limits = true, routes = true,
                        policy_path = true }
local LIMIT_FIELDS = { max_connections = true, max_in_flight = true,
                       max_header_bytes = true, max_body_bytes = true,
                       idle_timeout_ms = true }
local ROUTE_FIELDS = { name = true, prefix = true, host = true, upstream = true,
                       policy = true, keep_host = true }

local function fail(msg)
  io.stderr:write("resilua proxy: ", msg, "\n")
  return EXIT_USAGE
end

--- An error at the line where `key =` is in the config's source.
local function at(path, src, key, msg)
  local line = key and policy.line_of(src, key)
  return ("%s:%s%s"):format(path, line and (line .. ": ") or " ", msg)
end

local function check_fields(t, known, path, src, what)
  local bad, msg = names.unknown_field(t, known)
  if bad == nil then return true end
  return nil, at(path, src, tostring(bad), what .. ": " .. msg)
end

--- Runs the config file (text only; no io, os.execute or require) and
-- checks its shape.  Returns the table or nil, "file:line: message".
local function read_config(path)
  local f, ferr = io.open(path, "rb")
  if not f then return nil, ferr end
  local src = f:read("a") or ""
  f:close()
  local env = { string = string, table = table, math = math, pairs = pairs, ipairs = ipairs,
                tonumber = tonumber, tostring = tostring, type = type,
                os = { getenv = os.getenv } }
  local chunk, err = load(src, "@" .. path, "t", env)
  if not chunk then return nil, err end
  local ok, cfg = core.pcall(0, chunk)
  if not ok then return nil, (tostring(cfg):gsub("\nstack traceback:.*", "")) end
  if type(cfg) ~= "table" then return nil, path .. ": must return a table" end
  local good, cerr = check_fields(cfg, CONFIG_FIELDS, path, src, "config")
  if not good then return nil, cerr end
  if type(cfg.limits or {}) ~= "table" then return nil, at(path, src, "limits", "limits: expected a table") end
  good, cerr = check_fields(cfg.limits or {}, LIMIT_FIELDS, path, src, "limits")
  if not good then return nil, cerr end
  if type(cfg.routes) ~= "table" or #cfg.routes == 0 then
    return nil, at(path, src, "routes", "routes: expected a list of at least one route")
  end
  local names = {}
  for i, r in ipairs(cfg.routes) do
    local what = ("route %d"):format(i)
    if type(r) ~= "table" then return nil, at(path, src, "routes", what .. ": expected a table") end
    good, cerr = check_fields(r, ROUTE_FIELDS, path, src, what)
    if not good then return nil, cerr end
    r.name = r.name or ("route" .. i)
    if type(r.name) ~= "string" or names[r.name] then
      return nil, at(path, src, "name", what .. ": name must be a unique string")
    end
    names[r.name] = true
    if type(r.upstream) ~= "string" or not r.upstream:match("^https?://[^/]") then
      return nil, at(path, src, "upstream", what .. ": upstream must be an http(s):// URL")
    end
    for _, k in ipairs{ "prefix", "host" } do
      if r[k] ~= nil and type(r[k]) ~= "string" then
        return nil, at(path, src, k, ("%s: %s must be a string"):format(what, k))
      end
    end
    if r.prefix and r.prefix:sub(1, 1) ~= "/" then
      return nil, at(path, src, "prefix", what .. ": prefix must start with '/'")
    end
  end
  cfg.src = src
  return cfg
end

--- Resolves every route's policy: a name or file is a hot-reloaded slot,
-- an inline table a policy defined with the config.  Returns the routes
-- or nil, message.
local function resolve_routes(cfg, path, policy_path, clients)
  local routes = {}
  for i, r in ipairs(cfg.routes) do
    local spec, slot = r.policy or "default", nil
    if type(spec) == "table" then
      local p, err = policy.define(spec, r.name, path, cfg.src)
      if not p then return nil, err end
      slot = { current = p }
    elseif type(spec) == "string" then
      local err
      slot, err = policy.slot(spec, policy_path)
      if not slot then return nil, err end
    else
      return nil, at(path, cfg.src, "policy", ("route %d: policy must be a name, a file or a table"):format(i))
    end
    -- A route's breakers and budget outlive reloads (by route name).
    clients[r.name] = clients[r.name] or core.client("proxy:" .. r.name)
    routes[i] = { name = r.name, prefix = r.prefix or "/", host = r.host, upstream = r.upstream,
                  keep_host = r.keep_host and true or false, slot = slot,
                  client = clients[r.name] }
  end
  return routes
end

--- The routes as the C side takes them, with each slot's version now.
local function install(proxy, routes)
  local list = {}
  for i, r in ipairs(routes) do
    r.installed = r.slot.current
    list[i] = { name = r.name, prefix = r.prefix, host = r.host, upstream = r.upstream,
                keep_host = r.keep_host, client = r.client, policy = r.slot.current.core }
  end
  proxy:routes(list)
end

local function parse_grace(v)
  local n = tonumber(v)
  if not n or n ~= n or n < 0 or n > 86400 then return nil end
  return n
end

--- The command.  Returns the exit code.
function M.main(args)
  local opts, pos = parse(args, 2, {
    ["--listen"] = "value", ["--upstream"] = "value", ["--policy"] = "value",
    ["--policy-path"] = "list", ["--config"] = "value", ["--keep-host"] = "flag",
    ["--grace"] = "value", ["--log"] = "value", ["--quiet"] = "flag", ["--help"] = "flag",
  }, { ["-h"] = "--help" })
  if not opts then return fail(pos .. " (see resilua proxy --help)") end
  if opts["--help"] then io.stdout:write(M.USAGE) return EXIT_OK end
  if #pos > 0 then return fail("unexpected argument '" .. pos[1] .. "' (see resilua proxy --help)") end
  local grace = DEFAULT_GRACE_S
  if opts["--grace"] then
    grace = parse_grace(opts["--grace"])
    if not grace then return fail("--grace: expected seconds, 0 to 86400, got " .. opts["--grace"]) end
  end
  if opts["--log"] then
    local ok, err = core.log(opts["--log"])
    if not ok then return fail("--log: " .. err) end
  elseif opts["--quiet"] then
    core.log(false)
  end

  local config_path = opts["--config"]
  if config_path and (opts["--upstream"] or opts["--policy"] or opts["--listen"] or opts["--keep-host"]) then
    return fail("--config replaces --listen, --upstream, --policy and --keep-host")
  end
  if not config_path and not opts["--upstream"] then
    return fail("--upstream URL or --config FILE is required (see resilua proxy --help)")
  end
  local function load_cfg()
    if config_path then return read_config(config_path) end
    local up = opts["--upstream"]
    if not up:match("^https?://[^/]") then return nil, "--upstream: expected an http(s):// URL, got " .. up end
    return { listen = opts["--listen"], src = "",
             routes = { { name = "default", prefix = "/", upstream = up,
                          policy = opts["--policy"] or "default", keep_host = opts["--keep-host"] } } }
  end

  local cfg, err = load_cfg()
  if not cfg then return fail(err) end
  local function policy_path_of(c)
    local pp = opts["--policy-path"] or c.policy_path
    return pp and policy.path(pp) or nil
  end
  local clients = {}
  local routes
  routes, err = resolve_routes(cfg, config_path or "--policy", policy_path_of(cfg), clients)
  if not routes then return fail(err) end

  core.catch_signals()
  local limits = cfg.limits or {}
  local proxy
  local ok, perr = pcall(function()
    local e
    proxy, e = core.proxy{ listen = cfg.listen or DEFAULT_LISTEN, admin = cfg.admin,
                           max_connections = limits.max_connections,
                           max_in_flight = limits.max_in_flight,
                           max_header_bytes = limits.max_header_bytes,
                           max_body_bytes = limits.max_body_bytes,
                           idle_timeout_ms = limits.idle_timeout_ms }
    if not proxy then error(e, 0) end
  end)
  if not ok then return fail(tostring(perr)) end
  install(proxy, routes)

  -- Reload: the config (its file changed, or SIGHUP), then each policy.
  local on_hangup
  local function reload_config(why)
    if not config_path then return end
    local c, e = read_config(config_path)
    local r
    if c then r, e = resolve_routes(c, config_path, policy_path_of(c), clients) end
    if not r then
      io.stderr:write("resilua proxy: config not reloaded (", why, "): ", e, "\n")
      core.log_event("config", { path = config_path, ok = false, error = (tostring(e):gsub("\n.*", "")) })
      return
    end
    routes = r
    install(proxy, routes)
    core.log_event("config", { path = config_path, ok = true, routes = #routes })
    core.on_hangup(on_hangup) -- a new policy slot may have taken SIGHUP for itself
  end
  function on_hangup()
    reload_config("SIGHUP")
    for _, r in ipairs(routes) do
      if r.slot.path then policy.reload(r.slot) end
    end
  end
  local watch
  if config_path then
    local dir = config_path:match("^(.*)/[^/]*$") or "."
    local file = config_path:match("[^/]*$")
    watch = core.watch(function(d, name)
      if d == dir and name == file then reload_config("file changed") end
    end)
    local wok, werr = watch:add(dir)
    if not wok then io.stderr:write("resilua proxy: cannot watch ", werr, ": no hot reload\n") end
  end

  core.on_hangup(on_hangup) -- after the slots: policy.slot sets its own once
  io.stdout:write("listening on ", proxy:address(), "\n")
  io.stdout:flush()
  while core.stop_signal() == 0 do
    core.step(STEP_MAX_WAIT_S)
    -- A policy file reloaded (its slot holds a new version): new requests
    -- get it; calls in flight keep theirs.
    for _, r in ipairs(routes) do
      if r.slot.current ~= r.installed then install(proxy, routes) break end
    end
  end

  proxy:drain()
  local until_ms = core.now_ms() + grace * 1000
  while proxy:in_flight() > 0 and core.now_ms() < until_ms do core.step(DRAIN_STEP_S) end
  local left = proxy:in_flight()
  if left > 0 then io.stderr:write(("resilua proxy: grace over, %d call(s) cut\n"):format(left)) end
  proxy:close()
  if watch then watch:close() end
  return EXIT_OK
end

return M
