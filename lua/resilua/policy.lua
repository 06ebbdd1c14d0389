--- resilua.policy — loads policy modules: finds them on the policy path,
-- runs them in a sandbox under the instruction limit, validates every field
-- (errors name file:line), fills in the defaults (contract 1) and hands the
-- normalized table to the C core.
local core = require "resilua.core"
local grpc = require "resilua.grpc"
local names = require "resilua.names"

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
               errors = { "connect", "reset", "dns", "refused_stream" }, refused = true,
               grpc = { "UNAVAILABLE", "RESOURCE_EXHAUSTED" } },
  retry_after = { respect = true, max_ms = 30000 },
  idempotency = { header = "Idempotency-Key", methods = { "POST", "PATCH" } },
  breaker = { kind = "rate", window = "time", window_ms = 2000, minimum_calls = 20,
              failure_rate = 0.5, slow_call_rate = 1.0, open_ms = 50, half_open = 1,
              key = "host" },
  budget = { kind = "ratio", ratio = 0.2, ttl_ms = 10000, min_per_s = 10 },
  throttle = false,
  hedge = false,
}

local DAY_MS = 86400000
local ERROR_CLASSES = { timeout = true, connect = true, dns = true, tls = true,
                        reset = true, protocol = true, too_large = true,
                        refused_stream = true }

-- A field's rule: kind, then a range or choices.
local function ms(lo) return { "number", lo or 0, DAY_MS } end
local RULES = {
  name = { "string" }, max_attempts = { "integer", 1, 100 },
  memory_mb = { "integer", 1, 4096 },  -- the policy's own Lua state (docs/policies.md, The sandbox)
  per_try_timeout_ms = ms(1), connect_timeout_ms = ms(1), deadline_ms = ms(1),
  max_response_bytes = { "integer", 1, 1 << 30 },
  -- streaming (contract 7): time to the first body byte, longest gap
  -- between chunks, and the whole stream once committed; off when absent
  first_byte_timeout_ms = ms(1), idle_timeout_ms = ms(1), stream_timeout_ms = ms(1),
  decide = { "function" }, tests = { "table" },
  backoff = { "section", fields = {
    base_ms = ms(), max_ms = ms(),
    jitter = { "choice", full = true, equal = true, decorrelated = true, none = true } } },
  retry_on = { "section", fields = {
    status = { "list", "integer", 100, 599 },
    errors = { "list", "choice", choices = ERROR_CLASSES },
    grpc = { "list", "grpc_code" },  -- gRPC status codes, by name or number
    refused = { "boolean" } } },  -- retry a try the breaker or throttle refused
  retry_after = { "section", optional = true, fields = {
    respect = { "boolean" }, max_ms = ms() } },
  idempotency = { "section", optional = true, fields = {
    header = { "token" }, methods = { "list", "token" } } },
  breaker = { "section", optional = true, fields = {
    kind = { "choice", consecutive = true, rate = true },  -- rate: resilience4j / Polly
    failures = { "integer", 1, 1000000 },
    open_ms = { "duration" },  -- ms, a list of ms, or function(n) -> ms for the n-th opening
    half_open = { "integer", 1, 1000000 },
    key = { "choice", host = true, url = true, global = true },
    window = { "choice", count = true, time = true },
    window_size = { "integer", 1, 100000 }, window_ms = ms(10),
    minimum_calls = { "integer", 1, 1000000 },
    failure_rate = { "number", 0.01, 1 },
    slow_call_ms = ms(1), slow_call_rate = { "number", 0.01, 1 },
    on_change = { "function" } } },  -- on_change(key, from, to) on every transition
  budget = { "section", optional = true, fields = {
    -- quota: the AWS SDKs' retry quota; ratio: Finagle/Linkerd retry ratio
    kind = { "choice", bucket = true, quota = true, ratio = true },
    max_tokens = { "number", 1, 1e9 }, token_ratio = { "number", 0, 1e9 },
    retry_cost = { "number", 0, 1e9 }, timeout_cost = { "number", 0, 1e9 },
    success_refund = { "number", 0, 1e9 },
    ratio = { "number", 0, 1000 }, ttl_ms = { "number", 1000, 3600000 },
    min_per_s = { "number", 0, 1e6 } } },
  -- Google SRE adaptive throttling: refuse locally with probability
  -- max(0, (requests - k * accepts) / (requests + 1)) over window_ms
  -- hedging (Envoy's hedge_policy, gRPC's hedgingPolicy): after after_ms
  -- ("p95": the client's recent p95) another attempt of the same try
  -- goes out, up to max in flight; the first good answer wins
  hedge = { "section", optional = true, fields = {
    after_ms = { "after" }, max = { "integer", 2, 4 } } },
  throttle = { "section", optional = true, fields = {
    kind = { "choice", adaptive = true }, k = { "number", 1, 100 },
    window_ms = ms(100) } },
}
local THROTTLE_DEFAULTS = { kind = "adaptive", k = 2, window_ms = 2000 }
local HEDGE_DEFAULTS = { after_ms = "p95", max = 2 }

--- The line where `key =` first appears in the source, for error positions.
local function line_of(src, key)
  local n = 1
  for line in (src .. "\n"):gmatch("([^\n]*)\n") do
    if line:find("%f[%w_]" .. key .. "%s*=") then return n end
    n = n + 1
  end
  return nil
end

M.line_of = line_of

local OPEN_STEPS = 32  -- RSL_BREAKER_OPEN_STEPS: durations the core keeps

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
  elseif kind == "duration" then
    -- A break duration: ms, a list of ms by opening in a row (the last
    -- repeats), or function(n) -> ms, resolved at load (see open_steps).
    if type(v) == "table" then
      if #v < 1 or #v > OPEN_STEPS then
        return ("%s must list 1 to %d durations"):format(what, OPEN_STEPS)
      end
      for i, d in ipairs(v) do
        local err = check_value(ms(), d, ("%s[%d]"):format(what, i))
        if err then return err end
      end
    elseif type(v) ~= "function" then
      return check_value(ms(), v, what)
    end
  elseif kind == "grpc_code" then
    if not grpc.code(v) then
      if type(v) == "string" then
        return ("%s: unknown gRPC status code '%s'%s"):format(what, v, names.suggest(v:upper(), grpc.codes))
      end
      return ("%s must be a gRPC status code (a name, or 0 to 16), got %s"):format(what, tostring(v))
    end
  elseif kind == "after" then
    if v ~= "p95" then
      local err = check_value(ms(1), v, what)
      if err then return err .. ' (or "p95")' end
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

-- Checks t against rules; appends every problem to errs as { message,
-- offending key }.
local function check_fields(t, rules, prefix, errs)
  for k, v in pairs(t) do
    local rule = type(k) == "string" and rules[k]
    local what = prefix .. tostring(k)
    local err
    if not rule then
      err = ("unknown field '%s'%s"):format(what, type(k) == "string" and names.suggest(k, rules) or "")
    elseif rule[1] == "section" then
      if v == false and rule.optional then
        err = nil
      elseif type(v) ~= "table" then
        err = ("%s must be a table%s, got %s"):format(what, rule.optional and " or false" or "", type(v))
      else
        check_fields(v, rule.fields, what .. ".", errs)
      end
    elseif rule[1] == "list" then
      err = check_list(rule, v, what)
    else
      err = check_value(rule, v, what)
    end
    if err then errs[#errs + 1] = { err, k } end
  end
  return errs
end

local function copy(t)
  if type(t) ~= "table" then return t end
  local out = {}
  for k, v in pairs(t) do out[k] = copy(v) end
  return out
end

-- Sections that come in kinds: which kind a section is (given, or told by
-- a field only that kind has), the fields every kind shares, and what
-- each kind needs when the defaults are of another kind.
local KINDS = {
  breaker = { default = "consecutive", shared = { key = true, half_open = true, open_ms = true,
                                                  on_change = true },
              by_field = { failures = "consecutive", window = "rate", window_size = "rate",
                           window_ms = "rate", minimum_calls = "rate", failure_rate = "rate",
                           slow_call_ms = "rate", slow_call_rate = "rate" },
              needs = { consecutive = { failures = 5 } } },
  budget = { default = "bucket", shared = {},
             -- max_tokens: a bucket's or a quota's (a bucket unless the base is a quota)
             by_field = { max_tokens = { "bucket", "quota" }, token_ratio = "bucket", retry_cost = "quota",
                          timeout_cost = "quota", success_refund = "quota", ratio = "ratio",
                          ttl_ms = "ratio", min_per_s = "ratio" },
             needs = { bucket = { max_tokens = 10, token_ratio = 0.1 },
                       ratio = { ratio = 0.2, ttl_ms = 10000, min_per_s = 10 } } },
}

local function kind_of(name, v, base_kind)
  local k = KINDS[name]
  if not k or type(v) ~= "table" then return nil end
  if v.kind then return v.kind end
  local found
  for field, kind in pairs(k.by_field) do
    if v[field] ~= nil then
      if type(kind) ~= "table" then return kind end
      if kind[1] ~= base_kind and kind[2] ~= base_kind then found = kind[1] end
    end
  end
  return found
end

-- A section `over` laid on `base`: field by field when over is of the
-- same kind without naming it (or of no kind); else, when it names its
-- kind or has fields of another, only the fields every kind shares are
-- kept from base and the kind's own defaults fill the rest: a consecutive
-- breaker never inherits a rate breaker's window, nor a token bucket a
-- ratio's, and `kind = "rate"` means resilience4j's defaults.
local function merge_section(name, base, over, merge)
  local kb = kind_of(name, base) or KINDS[name].default
  local ko = kind_of(name, over, kb)
  if ko == nil or (ko == kb and over.kind == nil) then return merge(base, over) end
  local kept = {}
  for f in pairs(KINDS[name].shared) do kept[f] = base[f] end
  local out = merge(kept, over)
  out.kind = ko
  for f, v in pairs(KINDS[name].needs[ko] or {}) do
    if out[f] == nil then out[f] = v end
  end
  return out
end

-- Missing fields take the defaults; sections merge one level deep.
local function normalize(t)
  local out = copy(t)
  local function fill(base, over)
    local r = copy(over)
    for sk, sv in pairs(base) do
      if r[sk] == nil then r[sk] = copy(sv) end
    end
    return r
  end
  for k, default in pairs(M.DEFAULTS) do
    if out[k] == nil then
      out[k] = copy(default)
    elseif type(default) == "table" and type(out[k]) == "table" then
      out[k] = KINDS[k] and merge_section(k, default, out[k], fill) or fill(default, out[k])
    end
  end
  if out.retry_after == false then out.retry_after = { respect = false, max_ms = 0 } end
  for name, defaults in pairs({ throttle = THROTTLE_DEFAULTS, hedge = HEDGE_DEFAULTS }) do
    if type(out[name]) == "table" then
      for k, v in pairs(defaults) do
        if out[name][k] == nil then out[name][k] = v end
      end
    end
  end
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

-- Modules a policy may require besides its own: pure helpers, no I/O.
local SANDBOX_MODULES = { ["resilua.backoff"] = true, ["resilua.policy"] = true,
                          ["resilua.grpc"] = true }

local SAFE_GLOBALS = { "assert", "error", "ipairs", "next", "pairs", "pcall", "select",
  "tonumber", "tostring", "type", "xpcall", "rawequal", "rawget", "rawlen", "rawset",
  "setmetatable", "getmetatable", "_VERSION" }

local function frozen_copy(lib)
  local t = {}
  for k, v in pairs(lib) do t[k] = v end
  return t
end

-- A module name as `require` and `extend` accept it: dotted words, never
-- a path.
local function is_module_name(name)
  if type(name) ~= "string" or #name > 200 then return false end
  for part in (name .. "."):gmatch("([^.]*)%.") do
    if not part:match("^[%a_][%w_%-]*$") then return false end
  end
  return true
end
M.is_module_name = is_module_name

local function file_exists(path)
  if core.is_file then return core.is_file(path) end
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- A module name on the policy path only: what `require` and `extend`
-- accept (M.find also takes a file as given, for the command line, and
-- "x.lua" is a module name too: it named ./x.lua in the working folder).
local function find_module(name, policy_path)
  for _, dir in ipairs(policy_path or M.path()) do
    local path = dir .. "/" .. name:gsub("%.", "/") .. ".lua"
    if file_exists(path) then return path end
  end
end

-- A file's text: in a policy's own state through the core (regular files
-- only, size-capped), in a script's state through io.
local function read_source(path)
  if core.read_file then return core.read_file(path) end
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local src, rerr = f:read("a")
  f:close()
  if not src then return nil, ("%s: %s"):format(path, tostring(rerr)) end
  return src
end

--- A fresh environment for one policy: safe libraries only, `require`
-- limited to resilua helpers and module names on the policy path, globals
-- declared only.
-- The first line of src where `word` appears (plain), or 1: where a
-- message points when the call's own frame is gone (a tail call).
local function line_with(src, word)
  local n = 1
  for line in ((src or "") .. "\n"):gmatch("([^\n]*)\n") do
    if line:find(word, 1, true) then return n end
    n = n + 1
  end
  return 1
end

local function sandbox(policy_path, chain, file, src)
  local env = {}
  for _, name in ipairs(SAFE_GLOBALS) do env[name] = _G[name] end
  env.string, env.table, env.math, env.utf8, env.coroutine =
    frozen_copy(string), frozen_copy(table), frozen_copy(math), frozen_copy(utf8),
    frozen_copy(coroutine)
  env.os = { time = os.time, clock = os.clock, date = os.date, difftime = os.difftime }
  local loaded = {}
  -- resilua.policy as a policy sees it: extend() bound to this policy path.
  local policy_view = setmetatable({
    extend = function(base, overrides)
      local where = ("%s:%d"):format(file, line_with(src, "extend"))
      return M.extend(base, overrides, policy_path, chain, where)
    end,
  }, { __index = M, __metatable = false })
  -- `return require(x)` is a tail call: its caller's frame is gone, so
  -- messages point at the line that names the module.
  local function fail(name, msg)
    error(("%s:%d: %s"):format(file, line_with(src, tostring(name)), msg), 0)
  end
  env.require = function(name)
    if not is_module_name(name) then
      fail(name, ("require: '%s' is not a module name (a policy requires modules by name, "
                  .. "never by path)"):format(tostring(name)))
    end
    if name == "resilua.policy" then return policy_view end
    if SANDBOX_MODULES[name] then return require(name) end
    if loaded[name] ~= nil then return loaded[name] end
    local path = find_module(name, policy_path)
    if not path then
      fail(name, ("module '%s' is not allowed in a policy (only resilua.backoff, resilua.grpc, "
                  .. "resilua.policy and modules on the policy path)"):format(name))
    end
    local msrc, rerr = read_source(path)
    if not msrc then fail(name, rerr) end
    local chunk, err = load(msrc, "@" .. path, "t", env)
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
    __metatable = false,
  })
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
  return find_module(name, policy_path)
end

-- A kind's own fields mean nothing to the others (a quota's costs to a
-- token bucket, a ratio's window to a quota): say so rather than ignore them.
local KIND_ONLY = { retry_cost = "quota", timeout_cost = "quota", success_refund = "quota",
                    ratio = "ratio", ttl_ms = "ratio", min_per_s = "ratio" }
local function check_budget_kind(b)
  if type(b) ~= "table" then return end
  for _, k in ipairs({ "retry_cost", "timeout_cost", "success_refund", "ratio", "ttl_ms",
                       "min_per_s" }) do
    if b[k] ~= nil and b.kind ~= KIND_ONLY[k] then
      return ("budget.%s needs budget.kind = \"%s\""):format(k, KIND_ONLY[k]), k
    end
  end
end

-- A rate breaker's fields, and the defaults it takes (resilience4j's,
-- with a 60 s time window); the consecutive kind keeps M.DEFAULTS.breaker.
local RATE_ONLY = { "window", "window_size", "window_ms", "minimum_calls", "failure_rate",
                    "slow_call_ms", "slow_call_rate" }
local RATE_DEFAULTS = { window = "count", minimum_calls = 100, failure_rate = 0.5,
                        slow_call_rate = 1.0 }
local WINDOW_DEFAULTS = { count = { window_size = 100 }, time = { window_ms = 60000 } }

-- Fields that belong to another breaker kind or window: message, key.
local function check_breaker_kind(b)
  if type(b) ~= "table" then return end
  if b.kind ~= "rate" then
    for _, k in ipairs(RATE_ONLY) do
      if b[k] ~= nil then return ("breaker.%s needs breaker.kind = \"rate\""):format(k), k end
    end
    return
  end
  if b.failures ~= nil then
    return "breaker.failures is for the consecutive kind; a rate breaker uses failure_rate", "failures"
  end
  local window = b.window or "count"
  local other = window == "count" and "window_ms" or "window_size"
  if b[other] ~= nil then
    return ("breaker.%s does not apply to a %s window"):format(other, window), other
  end
end

-- Fills a rate breaker's defaults and turns a function open_ms into the
-- list of durations for openings 1..OPEN_STEPS (the core keeps the last
-- for later ones): the C breaker never calls Lua.  Returns nil or a message.
local function finish_breaker(b)
  if type(b) ~= "table" then return end
  if b.kind == "rate" then
    b.failures = nil  -- merged from M.DEFAULTS; says nothing to this kind
    for k, v in pairs(RATE_DEFAULTS) do if b[k] == nil then b[k] = v end end
    for k, v in pairs(WINDOW_DEFAULTS[b.window]) do if b[k] == nil then b[k] = v end end
  end
  if type(b.open_ms) ~= "function" then return end
  local f, steps = b.open_ms, {}
  for n = 1, OPEN_STEPS do
    local ok, d = core.pcall(1000000, f, n)
    if not ok then return ("breaker.open_ms(%d) failed: %s"):format(n, (tostring(d):gsub("\n.*", ""))) end
    local err = check_value(ms(), d, ("breaker.open_ms(%d)"):format(n))
    if err then return err end
    steps[n] = d
  end
  b.open_ms = steps
end

--- Validates a policy table; returns the normalized table or nil, message
-- with path:line.
function M.validate(t, path, src)
  if type(t) ~= "table" then
    local n, last = 0, 1  -- the file's last `return` at a line's start
    for line in ((src or "") .. "\n"):gmatch("([^\n]*)\n") do
      n = n + 1
      if line:match("^%s*return") then last = n end
    end
    return nil, ("%s:%d: a policy must return a table, got %s"):format(path, last, type(t))
  end
  local errs = check_fields(t, RULES, "", {})
  for _, extra in ipairs({ { check_budget_kind(t.budget) }, { check_breaker_kind(t.breaker) } }) do
    if extra[1] then errs[#errs + 1] = extra end
  end
  if #errs > 0 then
    -- every problem, one a line, in the file's order
    local lines = {}
    for i, e in ipairs(errs) do
      local line = line_of(src or "", tostring(e[2])) or 1
      lines[i] = { line, ("%s:%d: %s"):format(path, line, e[1]) }
    end
    table.sort(lines, function(a, b)
      if a[1] ~= b[1] then return a[1] < b[1] end
      return a[2] < b[2]
    end)
    for i, l in ipairs(lines) do lines[i] = l[2] end
    return nil, table.concat(lines, "\n")
  end
  local norm = normalize(t)
  err = finish_breaker(norm.breaker)
  if err then
    return nil, ("%s:%d: %s"):format(path, line_of(src or "", "open_ms") or 1, err)
  end
  return norm
end

-- A list (or an empty table) replaces; a section (string keys) merges.
local function is_section(v)
  return type(v) == "table" and next(v) ~= nil and v[1] == nil
end

local function deep_merge(base, overrides)
  local out = copy(base)
  for k, v in pairs(overrides) do
    if is_section(v) and is_section(out[k]) then
      out[k] = KINDS[k] and merge_section(k, out[k], v, deep_merge) or deep_merge(out[k], v)
    else
      out[k] = copy(v)
    end
  end
  return out
end

--- A policy built on another: `return require("resilua.policy").extend(
-- "default", { max_attempts = 3 })` in a policy file.  Loads BASE_NAME
-- from the policy path (in a sandbox of its own), checks it, and returns
-- it deep-merged with overrides: sections merge field by field, lists and
-- plain values replace, `false` turns a section off.  The base's `name`
-- and `tests` describe the base, so they are not inherited.  The loader
-- validates the result as usual.  Internal arguments: `chain` holds the
-- base files being loaded above this one (against cycles), `file` the
-- policy file that calls extend (for messages: a policy's `return
-- extend(...)` is a tail call, so error levels cannot find it).
function M.extend(base_name, overrides, policy_path, chain, file)
  local function fail(msg) error(("%s: extend: %s"):format(file or "?", msg), 0) end
  -- (file: "path:line" of the extend call, from a policy's sandbox)
  if not is_module_name(base_name) then
    fail(("the base must be a policy name (on the policy path), got %s"):format(
      type(base_name) == "string" and ("'" .. base_name .. "'") or type(base_name)))
  end
  if overrides ~= nil and type(overrides) ~= "table" then fail("overrides must be a table") end
  policy_path = policy_path or M.path()
  local path = find_module(base_name, policy_path)
  if not path then
    fail(("base policy '%s' not found (looked in %s)"):format(base_name, table.concat(policy_path, ", ")))
  end
  if chain and chain[path] then fail(("%s is already being extended (a cycle)"):format(path)) end
  local sub = copy(chain or {})
  sub[path] = true
  local src, rerr = read_source(path)
  if not src then fail(rerr) end
  local chunk, err = load(src, "@" .. path, "t", sandbox(policy_path, sub, path, src))
  if not chunk then error(err, 0) end
  local base = chunk()
  local _, verr = M.validate(base, path, src)
  if verr then fail(verr) end
  local out = deep_merge(base, overrides or {})
  if overrides == nil or overrides.name == nil then out.name = nil end
  if overrides == nil or overrides.tests == nil then out.tests = nil end
  return out
end

-- Validates t (from `path`, source `src`), fills in the defaults and
-- builds the core policy: the policy object, or nil, message.
local function build(t, path, src, default_name, version)
  local norm, err = M.validate(t, path, src)
  if not norm then return nil, err end
  norm.name = norm.name or default_name
  norm.version = version
  local built, cerr = pcall(core.policy, norm)
  if not built then return nil, ("%s: %s"):format(path, cerr) end
  return { name = norm.name, path = path, version = norm.version, table = norm, core = cerr }
end

--- Runs inside a policy's own state (see src/sandbox.c), under the load
-- limits: reads, runs and validates the policy file at `path` and returns
-- the normalized table with its name and version, or raises a message
-- naming file:line.
function M.build_sandboxed(path, policy_path, overrides)
  local src, rerr = read_source(path)
  if not src then error(rerr, 0) end
  local chunk, syntax_err = load(src, "@" .. path, "t", sandbox(policy_path, nil, path, src))
  if not chunk then error(syntax_err, 0) end
  local t = chunk()
  if overrides and type(t) == "table" then
    for k, v in pairs(overrides) do t[k] = v end
  end
  local norm, err = M.validate(t, path, src)
  if not norm then error(err, 0) end
  -- The fields the file set itself (check warns about what they imply).
  norm.declared = {}
  for k in pairs(t) do norm.declared[#norm.declared + 1] = k end
  table.sort(norm.declared)
  norm.name = norm.name or path:match("([^/]+)%.lua$") or path
  norm.version = version_of(overrides and (src .. M.canonical(overrides)) or src)
  return norm
end

--- A path with "." and ".." folded away (for messages).
function M.normalize_path(path)
  local abs, parts = path:sub(1, 1) == "/", {}
  for part in path:gmatch("[^/]+") do
    if part == ".." and #parts > 0 and parts[#parts] ~= ".." then
      parts[#parts] = nil
    elseif part ~= "." and not (part == ".." and abs) then
      parts[#parts + 1] = part
    end
  end
  local out = (abs and "/" or "") .. table.concat(parts, "/")
  return out ~= "" and out or "."
end

--- The policy names found on the policy path: { name = path }, the first
-- folder winning, as M.find does.
function M.available(policy_path)
  local out = {}
  for _, dir in ipairs(policy_path or M.path()) do
    for _, file in ipairs(core.policy_names and core.policy_names(dir) or {}) do
      local name = file:match("^(.*)%.lua$")
      if name and not out[name] then out[name] = dir .. "/" .. file end
    end
  end
  return out
end

-- The policy object for a core.policy_load result.
local function policy_object(path, box, t, bytes)
  if not box then return nil, t end
  return { name = t.name, path = path, version = t.version, table = t, core = box,
           memory = bytes }
end

-- The policy file for name, or nil and a message (with a did-you-mean).
local function locate(name, policy_path)
  local path = M.find(name, policy_path)
  if path then return path end
  local looked = {}
  for i, d in ipairs(policy_path) do looked[i] = M.normalize_path(d) end
  local hint = ""
  if not name:find("/") and not name:match("%.lua$") then
    hint = names.suggest(name, M.available(policy_path))
  end
  return nil, ("policy '%s' not found%s (looked in %s)"):format(
    name, hint, name:find("/") and M.normalize_path(name) or table.concat(looked, ", "))
end

-- Loads a policy by name or file in a state of its own.  Returns a policy
-- object { name, path, version, table, core, memory } or nil, message.
local function load_policy(name, policy_path, overrides)
  policy_path = policy_path or M.path()
  local path, err = locate(name, policy_path)
  if not path then return nil, err end
  return policy_object(path, core.policy_load(path, policy_path, overrides))
end

-- A table as text with sorted keys: the same table, the same version.
local function canonical(v)
  if type(v) ~= "table" then return type(v) == "string" and ("%q"):format(v) or tostring(v) end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for i, k in ipairs(keys) do keys[i] = ("[%s]=%s"):format(canonical(k), canonical(v[k])) end
  return "{" .. table.concat(keys, ",") .. "}"
end
M.canonical = canonical

--- A policy object from a table that code built (an experiment's inline
-- policy, say), checked and filled in like a file's.  `path` and its
-- source `src` (optional) are where errors point; `name` is used when the
-- table has none.  Its version is a hash of the table's contents.
function M.define(t, name, path, src)
  if type(t) ~= "table" then
    return nil, ("%s: a policy must be a table, got %s"):format(path, type(t))
  end
  return build(t, path, src, name, version_of(canonical(t)))
end

local function log_load(name, p, err)
  core.log_event("policy", p and { name = p.name, path = p.path, version = p.version, ok = true }
                             or { name = name, ok = false, error = (tostring(err):gsub("\n.*", "")) })
end

--- Loads a policy by name or file: a policy object or nil, message; a
-- `policy` event either way.  `overrides` (plain data, optional) replace
-- fields of the file's table before validation.
function M.load(name, policy_path, overrides)
  local p, err = load_policy(name, policy_path, overrides)
  log_load(name, p, err)
  return p, err
end

-- Hot reload.  A slot holds the version in force for one policy file;
-- clients read slot.current when a call starts, so a call in flight keeps
-- the version it started with (the core holds a ref on it).
local slots = {}  -- policy file -> slot
local watch       -- one inotify watch over every folder that holds a slot

--- Loads the slot's file again, on a helper thread: calls in flight go on
-- meanwhile.  Swaps the new version in only when it loads and validates (a
-- broken edit keeps the old version; both are logged).  The latest edit
-- wins: one load of a slot runs at a time, and when a reload was asked
-- for meanwhile, its result is dropped and the file loaded again (a SIGHUP
-- or save storm would otherwise start a thread and a state of up to the
-- memory cap per request: 60 took 4 GB).  Then M.reloaded(slot, ok, err)
-- runs (a hook for tests and benches).
function M.reload(slot)
  if slot.loading then
    slot.again = true
    return
  end
  local function finish(p, err)
    log_load(slot.path, p, err)
    -- The same source is the same version: keep the one in force (and the
    -- state its functions hold).
    if p and p.version ~= slot.current.version then slot.current = p end
    M.reloaded(slot, p ~= nil, err)
  end
  local path, err = locate(slot.path, slot.policy_path)
  if not path then return finish(nil, err) end
  core.policy_load_async(path, slot.policy_path, function(box, t, bytes)
    slot.loading = false
    if slot.again then -- this version is already stale
      slot.again = false
      return M.reload(slot)
    end
    finish(policy_object(path, box, t, bytes))
  end)
  slot.loading = true
end

--- Called after each reload of a slot ends: ok, or false and the message.
function M.reloaded(slot, ok, err) end -- luacheck: ignore

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
