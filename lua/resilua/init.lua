--- resilua — the Lua API (contract 5).
--
--   local resilua = require "resilua"
--   local client = resilua.client{ policy = "default" }
--   local res, err = client:call{ method = "POST", url = URL, body = "{}" }
--   resilua.go(function() ... end); resilua.wait()
--
-- Calls run on the core's event loop.  Outside a `go`, a call runs the loop
-- until it is done; inside one it yields, so thousands run on one thread.
local core = require "resilua.core"
local policy = require "resilua.policy"
local names = require "resilua.names"

local M = { version = core.version, policy = policy }

local shared = {}                        -- client name -> core client state
local gos = setmetatable({}, { __mode = "k" }) -- coroutines started by go
local live = 0                           -- go'd functions not yet ended
local failed = {}                        -- their errors, for wait()

local function resume(co, ...)
  local ok, err = coroutine.resume(co, ...)
  if not ok then
    local msg = debug.traceback(co, err)
    failed[#failed + 1] = msg
    io.stderr:write("resilua: error in a go'd function: ", msg, "\n")
  end
  if coroutine.status(co) == "dead" then
    gos[co] = nil
    live = live - 1
  end
end

local function in_go()
  local co, main = coroutine.running()
  return not main and gos[co] and co or nil
end

local Client = {}
Client.__index = Client

--- A client: a policy (by name or file) and the breakers and budget that
-- every client with the same `name` shares.
-- opts: policy (a name, a FILE.lua or a policy loaded with
-- resilua.policy.load; default "default"), policy_path (list of folders),
-- name (default: the policy's name), shadow (a candidate policy, given
-- like `policy`: asked beside it after every failed attempt, it never
-- changes a call; each disagreement is a `shadow` event).
-- A policy given by name or file is hot-reloaded (resilua.policy.slot);
-- a policy object is used as it is.
-- The fields resilua.client{...} and client:call{...} take: any other is a
-- mistake (methd=, headrs=) and an error, as in policies.  Other modules
-- may add theirs.  on_chunk, grpc, metadata and http2: contracts 7 and 8.
M.CLIENT_FIELDS = { policy = true, policy_path = true, name = true, shadow = true }
M.CALL_FIELDS = { method = true, url = true, headers = true, body = true, max_active = true,
                  on_chunk = true, grpc = true, metadata = true, http2 = true }

-- Raises, at the caller's caller, on the first field of t not in fields.
local function check_fields(t, fields, prefix)
  local bad, msg = names.unknown_field(t, fields)
  if bad ~= nil then error(prefix .. msg, 3) end
end

local function slot_of(spec, opts)
  if type(spec) == "table" then return { current = spec } end
  return policy.slot(spec, opts.policy_path and policy.path(opts.policy_path))
end

function M.client(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("resilua.client: expected a table of options", 2) end
  check_fields(opts, M.CLIENT_FIELDS, "resilua.client: ")
  local slot, err = slot_of(opts.policy or "default", opts)
  if not slot then error("resilua.client: " .. err, 2) end
  local shadow
  if opts.shadow ~= nil then
    shadow, err = slot_of(opts.shadow, opts)
    if not shadow then error("resilua.client: shadow: " .. err, 2) end
  end
  local name = opts.name or slot.current.name
  shared[name] = shared[name] or core.client(name)
  return setmetatable({ name = name, slot = slot, shadow = shadow, state = shared[name] }, Client)
end

--- The policy version in force (it changes when its file is reloaded).
function Client:policy() return self.slot.current end

--- The shadow policy's version in force, or nil without one.
function Client:shadow_policy() return self.shadow and self.shadow.current end

local function split(r)
  if r.outcome == "ok" then
    return { status = r.status, headers = r.headers, body = r.body, attempts = r.attempts,
             elapsed_ms = r.elapsed_ms, call_id = r.call_id,
             grpc_status = r.grpc_status, grpc_message = r.grpc_message }
  end
  return nil, r
end

--- Makes one call under the client's policy.
-- req: { method, url, headers = {Name = value} or {"Name: value"}, body }.
-- Returns res or nil, err (err.outcome, err.status, err.error, err.message...).
function Client:call(req)
  if type(req) ~= "table" then error("call: expected a request table", 2) end
  check_fields(req, M.CALL_FIELDS, "call: ")
  if type(req.url) ~= "string" then error("call: request.url must be a string", 2) end
  local shadow = self.shadow and self.shadow.current.core
  local co = in_go()
  if co then
    local ok, err = pcall(core.call, self.state, self.slot.current.core, req,
                          function(r) resume(co, r) end, shadow)
    if not ok then error("call: " .. err, 2) end
    return split(coroutine.yield())
  end
  local result
  local ok, err = pcall(core.call, self.state, self.slot.current.core, req,
                        function(r) result = r end, shadow)
  if not ok then error("call: " .. err, 2) end
  while not result do core.step() end
  return split(result)
end

--- Breaker state for a URL under this client's policy: state, consecutive
-- failures; a rate breaker: state, failures and calls in its window.
-- nil without a breaker.
function Client:breaker(url) return self.state:breaker(self.slot.current.core, url) end

--- Forces the URL's breaker: "open" holds it open (no probes) until forced
-- again, "closed" closes it with an empty window, "reset" also forgets how
-- often it opened (the growing open_ms starts over).  Returns the new
-- state, or nil without a breaker.
function Client:force_breaker(url, to)
  if type(url) ~= "string" then error("force_breaker: url must be a string", 2) end
  if to ~= "open" and to ~= "closed" and to ~= "reset" then
    error("force_breaker: expected \"open\", \"closed\" or \"reset\", got " .. tostring(to), 2)
  end
  return self.state:force_breaker(self.slot.current.core, url, to)
end

--- Retry budget: tokens left, max_tokens (nil without a budget).
function Client:budget() return self.state:budget(self.slot.current.core) end

--- Runs f(...) concurrently on the loop.
function M.go(f, ...)
  if type(f) ~= "function" then error("go: expected a function", 2) end
  local co = coroutine.create(f)
  gos[co] = true
  live = live + 1
  resume(co, ...)
  return co
end

--- Runs the loop until every go'd function ended.  Returns true, or false
-- and the list of their errors.
function M.wait()
  while live > 0 do
    if core.step() == 0 and live > 0 then
      error(("wait: %d go'd function(s) wait for something that is not on the loop"):format(live), 2)
    end
  end
  if #failed > 0 then
    local errs = failed
    failed = {}
    return false, errs
  end
  return true
end

--- Inside a go: yields for `seconds`.  Outside: runs the loop that long.
function M.sleep(seconds)
  if type(seconds) ~= "number" or seconds < 0 then error("sleep: expected seconds >= 0", 2) end
  local co = in_go()
  if co then
    core.timer(seconds, function() resume(co) end)
    coroutine.yield()
    return
  end
  local deadline = core.now_ms() + seconds * 1000
  while true do
    local left = deadline - core.now_ms()
    if left <= 0 then break end
    core.step(left / 1000)
  end
end

--- Where events go: a file (appended), "-" for stderr, false for nowhere.
function M.log(target) return core.log(target) end

--- Masks the values of query parameters called `name` (any case) in every
-- event, result and report from now on (api_key, key, token, access_token,
-- sig, signature, password, secret... always are).
function M.redact(name)
  if type(name) ~= "string" or #name < 1 or #name > 64 then
    error("redact: expected a name of 1 to 64 bytes", 2)
  end
  core.redact(name)
end

--- url with user:password and secret parameters masked, as the log writes it.
function M.redact_url(url) return core.redact_url(url) end

--- Seeds the jitter PRNG: the same seed, the same delays.
function M.seed(n) core.seed(n) end

--- Batch inference (see resilua.batch): returns the report, or nil, message.
function M.batch(opts) return require("resilua.batch").run(opts) end

return M
