--- resilua.policy — loads policy modules: finds them on the policy path,
-- runs them in a sandbox under the instruction limit, validates every field
-- (errors name file:line), fills in the defaults (contract 1) and hands the
-- normalized table to the C core.
local core = require "resilua.core"

local M = {}

--- The defaults: the seed recipe hardened with a breaker and a retry budget.
-- policies/default.lua spells out the same values (a spec keeps them equal).
M.DEFAULTS = {
  max_attempts = 4,
  per_try_timeout_ms = 2000,
  connect_timeout_ms = 1000,
  deadline_ms = 10000,
  max_response_bytes = 16 * 1024 * 1024,
  backoff = { base_ms = 200, max_ms = 5000, jitter = "full" },
  retry_on = { status = { 429, 500, 502, 503, 504 },
               errors = { "timeout", "connect", "reset", "dns" } },
  retry_after = { respect = true, max_ms = 30000 },
  idempotency = { header = "Idempotency-Key", methods = { "POST", "PATCH" } },
  breaker = { failures = 5, open_ms = 30000, half_open = 1, key = "host" },
  budget = { max_tokens = 10, token_ratio = 0.1 },
}

local DAY_MS = 86400000
local ERROR_CLASSES = { timeout = true, connect = true, dns = true, tls = true,
                        reset = true, protocol = true, too_large = true }

-- A field's rule: kind, then a range or choices.
local function ms(lo) return { "number", lo or 0, DAY_MS } end
local RULES = {
  name = { "string" }, max_attempts = { "integer", 1, 100 },
  per_try_timeout_ms = ms(1), connect_timeout_ms = ms(1), deadline_ms = ms(1),
  max_response_bytes = { "integer", 1, 1 << 30 },
  decide = { "function" }, tests = { "table" },
  backoff = { "section", fields = {
    base_ms = ms(), max_ms = ms(),
    jitter = { "choice", full = true, equal = true, decorrelated = true, none = true } } },
  retry_on = { "section", fields = {
    status = { "list", "integer", 100, 599 },
    errors = { "list", "choice", choices = ERROR_CLASSES } } },
  retry_after = { "section", optional = true, fields = {
    respect = { "boolean" }, max_ms = ms() } },
  idempotency = { "section", optional = true, fields = {
    header = { "token" }, methods = { "list", "token" } } },
  breaker = { "section", optional = true, fields = {
    failures = { "integer", 1, 1000000 }, open_ms = ms(),
    half_open = { "integer", 1, 1000000 },
    key = { "choice", host = true, url = true, global = true } } },
  budget = { "section", optional = true, fields = {
    max_tokens = { "number", 1, 1e9 }, token_ratio = { "number", 0, 1e9 } } },
}

--- Edit distance, for "did you mean".
local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

local function suggest(word, fields)
  local best, best_d = nil, 3
  for name in pairs(fields) do
    local d = distance(word, name)
    if d < best_d then best, best_d = name, d end
  end
  return best and (" (did you mean '" .. best .. "'?)") or ""
end

-- The line where `key =` first appears in the source, for error positions.
local function line_of(src, key)
  local n = 1
  for line in (src .. "\n"):gmatch("([^\n]*)\n") do
    if line:find("%f[%w_]" .. key .. "%s*=") then return n end
    n = n + 1
  end
  return nil
end

local function check_value(rule, v, what)
  local kind = rule[1]
  if kind == "integer" or kind == "number" then
    if type(v) ~= "number" or v ~= v or (kind == "integer" and math.type(v) ~= "integer"
        and v ~= math.floor(v)) then
      return ("%s must be %s, got %s"):format(what, kind == "integer" and "an integer" or "a number",
                                              type(v) == "number" and tostring(v) or type(v))
    end
    if v < rule[2] or v > rule[3] then
      return ("%s must be in [%s, %s], got %s"):format(what, rule[2], rule[3], v)
    end
  elseif kind == "choice" then
    local choices = rule.choices or rule
    if type(v) ~= "string" or not choices[v] or v == "choice" then
      local names = {}
      for k in pairs(choices) do if type(k) == "string" and k ~= "choices" then names[#names + 1] = k end end
      table.sort(names)
      return ("%s must be one of %s, got %s"):format(what, table.concat(names, ", "), tostring(v))
    end
  elseif kind == "token" then
    if type(v) ~= "string" or not v:match("^[%w!#$%%&'*+.^_`|~-]+$") then
      return ("%s must be an HTTP token (a header name or method), got %s"):format(what, tostring(v))
    end
  elseif type(v) ~= kind then
    return ("%s must be a %s, got %s"):format(what, kind, type(v))
  end
end

local function check_list(rule, v, what)
  if type(v) ~= "table" then return ("%s must be a list, got %s"):format(what, type(v)) end
  local item = { rule[2], rule[3], rule[4], choices = rule.choices }
  for i = 1, #v do
    local err = check_value(item, v[i], ("%s[%d]"):format(what, i))
    if err then return err end
  end
  for k in pairs(v) do
    if math.type(k) ~= "integer" or k < 1 or k > #v then return what .. " must be a list (no keys)" end
  end
end

-- Checks t against rules; returns nil or the message and the offending key.
local function check_fields(t, rules, prefix)
  for k, v in pairs(t) do
    local rule = type(k) == "string" and rules[k]
    local what = prefix .. tostring(k)
    if not rule then
      return ("unknown field '%s'%s"):format(what, type(k) == "string" and suggest(k, rules) or ""), k
    end
    local err
    if rule[1] == "section" then
      if v == false and rule.optional then
        err = nil
      elseif type(v) ~= "table" then
        err = ("%s must be a table%s, got %s"):format(what, rule.optional and " or false" or "", type(v))
      else
        local e2, key = check_fields(v, rule.fields, what .. ".")
        if e2 then return e2, key end
      end
    elseif rule[1] == "list" then
      err = check_list(rule, v, what)
    else
      err = check_value(rule, v, what)
    end
    if err then return err, k end
  end
end

local function copy(t)
  if type(t) ~= "table" then return t end
  local out = {}
  for k, v in pairs(t) do out[k] = copy(v) end
  return out
end

-- Missing fields take the defaults; sections merge one level deep.
local function normalize(t)
  local out = copy(t)
  for k, default in pairs(M.DEFAULTS) do
    if out[k] == nil then
      out[k] = copy(default)
    elseif type(default) == "table" and type(out[k]) == "table" then
      for sk, sv in pairs(default) do
        if out[k][sk] == nil then out[k][sk] = copy(sv) end
      end
    end
  end
  if out.retry_after == false then out.retry_after = { respect = false, max_ms = 0 } end
  return out
end

--- Short hash of a policy's source: its version in every event.
local function version_of(src)
  local h = 0xcbf29ce484222325
  for i = 1, #src do
    h = (h ~ src:byte(i)) * 0x100000001b3
  end
  return ("%012x"):format(h & 0xffffffffffff)
end
M.version_of = version_of

-- Modules a policy may require: pure helpers, no I/O, no core access.
local SANDBOX_MODULES = { ["resilua.backoff"] = true, ["resilua.policy"] = true }

local SAFE_GLOBALS = { "assert", "error", "ipairs", "next", "pairs", "pcall", "select",
  "tonumber", "tostring", "type", "xpcall", "rawequal", "rawget", "rawlen", "rawset",
  "setmetatable", "getmetatable", "_VERSION" }

local function frozen_copy(lib)
  local t = {}
  for k, v in pairs(lib) do t[k] = v end
  return t
end

--- A fresh environment for one policy: safe libraries only, `require`
-- limited to resilua helpers and the policy path, globals declared only.
local function sandbox(policy_path)
  local env = {}
  for _, name in ipairs(SAFE_GLOBALS) do env[name] = _G[name] end
  env.string, env.table, env.math, env.utf8 =
    frozen_copy(string), frozen_copy(table), frozen_copy(math), frozen_copy(utf8)
  env.os = { time = os.time, clock = os.clock, date = os.date, difftime = os.difftime }
  local loaded = {}
  env.require = function(name)
    if type(name) ~= "string" then error("require: expected a module name", 2) end
    if SANDBOX_MODULES[name] then return require(name) end
    if loaded[name] ~= nil then return loaded[name] end
    local path = M.find(name, policy_path)
    if not path then
      error(("module '%s' is not allowed in a policy (only resilua.backoff, "
             .. "resilua.policy and modules on the policy path)"):format(name), 2)
    end
    local f = io.open(path, "rb")
    local src = f:read("a")
    f:close()
    local chunk, err = load(src, "@" .. path, "t", env)
    if not chunk then error(err, 0) end
    loaded[name] = chunk(name) or true
    return loaded[name]
  end
  env._G = env
  return setmetatable(env, {
    __newindex = function(_, k)
      error(("assignment to undeclared global '%s' (use local)"):format(tostring(k)), 2)
    end,
    __index = function(_, k)
      error(("undeclared global '%s'"):format(tostring(k)), 2)
    end,
  })
end

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

--- The installed and build-tree policy folders (where the binary or
-- core.so lives decides which exist).
function M.shipped_dirs()
  local self = core.self_path()
  if not self then return {} end
  local dir = self:match("^(.*)/[^/]*$") or "."
  local out = {}
  for _, rel in ipairs({ "/../share/resilua/policies", "/../../policies",
                         "/../../../policies", "/../../../../share/resilua/policies" }) do
    if file_exists(dir .. rel .. "/default.lua") then out[#out + 1] = dir .. rel end
  end
  return out
end

--- The policy path: what the user gave, else ./policies, then the shipped.
function M.path(user)
  local out = {}
  for _, d in ipairs(user or { "policies" }) do out[#out + 1] = d end
  for _, d in ipairs(M.shipped_dirs()) do out[#out + 1] = d end
  return out
end

--- NAME on the path, or FILE.lua as given.
function M.find(name, policy_path)
  if name:find("/") or name:match("%.lua$") then
    return file_exists(name) and name or nil
  end
  for _, dir in ipairs(policy_path or M.path()) do
    local path = dir .. "/" .. name:gsub("%.", "/") .. ".lua"
    if file_exists(path) then return path end
  end
end

--- Validates a policy table; returns the normalized table or nil, message
-- with path:line.
function M.validate(t, path, src)
  if type(t) ~= "table" then
    return nil, ("%s: a policy must return a table, got %s"):format(path, type(t))
  end
  local err, key = check_fields(t, RULES, "")
  if err then
    return nil, ("%s:%d: %s"):format(path, line_of(src or "", tostring(key)) or 1, err)
  end
  return normalize(t)
end

--- Loads a policy by name or file.  Returns a policy object
-- { name, path, version, table, core } or nil, message.  Either way a
-- `policy` event says what happened.
local function load_policy(name, policy_path)
  policy_path = policy_path or M.path()
  local path = M.find(name, policy_path)
  if not path then
    return nil, ("policy '%s' not found (looked in %s)"):format(
      name, name:find("/") and name or table.concat(policy_path, ", "))
  end
  local f, open_err = io.open(path, "rb")
  if not f then return nil, open_err end
  local src = f:read("a")
  f:close()
  local chunk, syntax_err = load(src, "@" .. path, "t", sandbox(policy_path))
  if not chunk then return nil, syntax_err end
  local ok, t = core.pcall(100 * 1000000, chunk)
  if not ok then return nil, t end
  local norm, err = M.validate(t, path, src)
  if not norm then return nil, err end
  norm.name = norm.name or path:match("([^/]+)%.lua$")
  norm.version = version_of(src)
  local built, cerr = pcall(core.policy, norm)
  if not built then return nil, ("%s: %s"):format(path, cerr) end
  return { name = norm.name, path = path, version = norm.version, table = norm, core = cerr }
end

function M.load(name, policy_path)
  local p, err = load_policy(name, policy_path)
  core.log_event("policy", p and { name = p.name, path = p.path, version = p.version, ok = true }
                             or { name = name, ok = false, error = (tostring(err):gsub("\n.*", "")) })
  return p, err
end

-- Hot reload.  A slot holds the version in force for one policy file;
-- clients read slot.current when a call starts, so a call in flight keeps
-- the version it started with (the core holds a ref on it).
local slots = {}  -- policy file -> slot
local watch       -- one inotify watch over every folder that holds a slot

--- Loads the slot's file again; swaps it in only when it loads and
-- validates (a broken edit keeps the old version; both are logged).
function M.reload(slot)
  local p, err = M.load(slot.path, slot.policy_path)
  if p then slot.current = p end
  return p ~= nil, err
end

local function reload_changed(dir, name)
  for _, slot in pairs(slots) do
    if slot.dir == dir and slot.file == name then M.reload(slot) end
  end
end

--- The slot of a policy (by name or file), loaded and watched on first
-- use: edits to its file (also saves by rename) and SIGHUP reload it.
-- Returns the slot { path, current } or nil, message.
function M.slot(name, policy_path)
  policy_path = policy_path or M.path()
  local path = M.find(name, policy_path)
  if path and slots[path] then return slots[path] end
  local p, err = M.load(name, policy_path)
  if not p then return nil, err end
  local slot = { path = p.path, dir = p.path:match("^(.*)/[^/]*$") or ".",
                 file = p.path:match("[^/]*$"), policy_path = policy_path, current = p }
  if not watch then
    watch = core.watch(reload_changed)
    core.on_hangup(function()
      for _, s in pairs(slots) do M.reload(s) end
    end)
  end
  local ok, werr = watch:add(slot.dir)
  if not ok then io.stderr:write("resilua: cannot watch ", werr, ": no hot reload\n") end
  slots[p.path] = slot
  return slot
end

return M
