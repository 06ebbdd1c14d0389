--- resilua.upstream — a capacity model for the scriptable upstream
-- (contract 6): an upstream that fails like a production one, by running
-- out of capacity, and not only by fixed answers.
--
--   local up = require("resilua.upstream").new{ seed = 1, workers = 16, queue = 200,
--     service_ms = { dist = "lognormal", median = 20, sigma = 0.5 },
--     faults = { { p = 0.01, status = 503 } },
--     phases = { { name = "brownout", from = 5, to = 8, workers = 4 } } }
--   return up:handler()        -- from a `resilua serve` script
--
-- The model is a multi-server FIFO queue, decided at arrival: the
-- handler computes when the request would start (the earliest free
-- worker) and end (start + a drawn service time), and answers with that
-- delay_ms; the server's loop timers deliver it.  Nothing runs when the
-- response goes out, so a request whose client gave up (a per-try timeout)
-- still holds its worker until its service would have ended, as on a real
-- server whose client left.  That wasted work is what makes a retry storm
-- outlive the fault that started it (a metastable failure).
--
-- Options (all optional): seed (integer, default 1); workers (absent:
-- unlimited, no queueing); queue (the most requests waiting; absent:
-- unbounded); service_ms (ms, or { dist = "fixed", ms } | "uniform", min,
-- max | "normal", mean, sd (clamped at 0) | "lognormal", median, sigma |
-- "pareto", scale (the minimum), shape; default 20); faults (a list of
-- { p, status (503), headers, body, delay_ms, action = hang|reset|close,
-- grpc_status, grpc_message (a gRPC call gets these instead of status and
-- body: grpc_status is a code or its name, "UNAVAILABLE") },
-- checked in order against one uniform draw per request); phases (a list
-- of { name, from, to (s since t0; no `to`: until the end), faults (replace
-- the baseline's), latency (multiplies service times), workers }, later
-- ones winning field by field); respond (function(req) -> the successful
-- answer, default 200 {"prediction": ...}; the model's delay is added to
-- its delay_ms); reject ({ status, headers, body, delay_ms } for a full
-- queue); clock (function() -> ms, default core.now_ms: for tests).
--
-- Choices:
-- - A fault (baseline or phase) is answered at arrival and uses no worker:
--   it models what a proxy or admission layer in front of the model
--   answers.  A fault may carry delay_ms (answered late, still no worker).
-- - A request that would wait while `queue` requests already wait is
--   rejected at once (`reject`, default 503 {"error":"overloaded"}).
-- - Workers are slots numbered 1..max (the most workers any phase or the
--   baseline has), each with the time it is free.  Slot i takes a new
--   request only while i <= the workers in force; a slot above the count
--   (a capacity drop) finishes the request it has, then sits idle until
--   the phase ends.  Phases are a schedule known in advance, so a request
--   queued during a drop starts when a worker is really free for it, the
--   extra workers coming back included: the queue stays FIFO.  Slots that
--   no phase takes away are a min-heap; only the others are scanned.
-- - Randomness comes from two xoshiro256** streams seeded from `seed`
--   (one for faults, one for service times), each drawn once per arrival,
--   so the same seed and the same request sequence give the same answers.
-- Uses: resilua.core (now_ms) for the clock, unless `clock` is given.
local names = require "resilua.names"
local grpc = require "resilua.grpc"

local M = {}

local DEFAULT_SEED = 1
local DEFAULT_SERVICE_MS = 20
local DEFAULT_FAULT_STATUS = 503
local DEFAULT_REJECT = { status = 503, headers = { ["Content-Type"] = "application/json" },
                         body = '{"error":"overloaded"}' }
local FAULT_BODY = '{"error":"injected fault"}'
local JSON_HEADERS = { ["Content-Type"] = "application/json" }
local P_SUM_SLACK = 1e-9 -- float sums of probabilities that add up to 1
local SERVER_MAX_DELAY_MS = 86400000 -- RSL_SERVER_MAX_DELAY_MS: the server refuses more

--- PRNG ----------------------------------------------------------------------

-- splitmix64, to spread a small seed over xoshiro's 256 bits of state.
local function splitmix(seed)
  local x = seed
  return function()
    x = x + 0x9e3779b97f4a7c15
    local z = x
    z = (z ~ (z >> 30)) * 0xbf58476d1ce4e5b9
    z = (z ~ (z >> 27)) * 0x94d049bb133111eb
    return z ~ (z >> 31)
  end
end

local function rotl(x, k) return (x << k) | (x >> (64 - k)) end

-- xoshiro256** on Lua 5.4 integers (they wrap, and >> is logical):
-- returns a function giving uniform floats in [0, 1).
local function xoshiro(next_seed)
  local s0, s1, s2, s3 = next_seed(), next_seed(), next_seed(), next_seed()
  return function()
    local result = rotl(s1 * 5, 7) * 9
    local t = s1 << 17
    s2 = s2 ~ s0
    s3 = s3 ~ s1
    s1 = s1 ~ s2
    s0 = s0 ~ s3
    s2 = s2 ~ t
    s3 = rotl(s3, 45)
    return (result >> 11) * 0x1p-53
  end
end

--- Validation ----------------------------------------------------------------

-- Checkers return the value or nil, message; `what` names the field.
local function is_number(v)
  return type(v) == "number" and v == v and v > -math.huge and v < math.huge
end

local function number_at_least(v, lo, what, strict)
  if not is_number(v) then
    return nil, ("%s: expected a number, got %s")
      :format(what, type(v) == "number" and tostring(v) or type(v))
  end
  if (strict and v <= lo) or v < lo then
    return nil, ("%s: expected a number %s %s, got %s"):format(what, strict and ">" or ">=", lo, v)
  end
  return v
end

local function integer_at_least(v, lo, what)
  if math.type(v) ~= "integer" and not (is_number(v) and v == math.floor(v)) then
    return nil, ("%s: expected an integer, got %s")
      :format(what, type(v) == "number" and tostring(v) or type(v))
  end
  if v < lo then return nil, ("%s: expected an integer >= %d, got %d"):format(what, lo, v) end
  return math.tointeger(v)
end

-- `what` is nil for the options table itself.
local function check_fields(t, known, what)
  local bad, msg = names.unknown_field(t, known)
  if bad == nil then return t end
  return nil, (what and what .. ": " or "") .. msg
end

local function check_table(v, what)
  if type(v) ~= "table" then return nil, ("%s: expected a table, got %s"):format(what, type(v)) end
  return v
end

-- dist -> its parameters, each with its lower bound and whether it is strict.
local DISTS = {
  fixed = { ms = { 0 } },
  uniform = { min = { 0 }, max = { 0 } },
  normal = { mean = { 0 }, sd = { 0 } },
  lognormal = { median = { 0, true }, sigma = { 0 } },
  pareto = { scale = { 0, true }, shape = { 0, true } },
}
local DIST_NAMES = "fixed|uniform|normal|lognormal|pareto"

-- A service time spec (ms, or a distribution table) -> the normalized table.
local function check_dist(spec, what)
  if type(spec) == "number" then
    local ms, err = number_at_least(spec, 0, what)
    if not ms then return nil, err end
    return { dist = "fixed", ms = ms }
  end
  local _, err = check_table(spec, what)
  if err then return nil, err end
  local params = DISTS[spec.dist]
  if not params then
    return nil, ("%s.dist: expected %s, got %s"):format(what, DIST_NAMES,
      type(spec.dist) == "string" and ("'" .. spec.dist .. "'") or type(spec.dist))
  end
  local out = { dist = spec.dist }
  for k in pairs(spec) do
    if k ~= "dist" and not params[k] then
      return nil, ("%s: unknown field '%s' for dist '%s'"):format(what, tostring(k), spec.dist)
    end
  end
  for name, bound in pairs(params) do
    out[name], err = number_at_least(spec[name], bound[1], what .. "." .. name, bound[2])
    if err then return nil, err end
  end
  if out.dist == "uniform" and out.max < out.min then
    return nil, ("%s: max (%s) must be >= min (%s)"):format(what, out.max, out.min)
  end
  return out
end

local RESPONSE_FIELDS = { status = true, headers = true, body = true, delay_ms = true }
local FAULT_FIELDS = { p = true, status = true, headers = true, body = true, delay_ms = true,
                       action = true, grpc_status = true, grpc_message = true }
local ACTIONS = { hang = true, reset = true, close = true }

-- The status, headers, body and delay_ms of a fault or of `reject`.
local function check_response(t, out, what)
  if t.status ~= nil then
    local status, err = integer_at_least(t.status, 100, what .. ".status")
    if not status then return nil, err end
    if status > 599 then
      return nil, ("%s.status: expected 100..599, got %d"):format(what, status)
    end
    out.status = status
  end
  if t.headers ~= nil then
    local _, err = check_table(t.headers, what .. ".headers")
    if err then return nil, err end
    out.headers = t.headers
  end
  if t.body ~= nil and type(t.body) ~= "string" then
    return nil, ("%s.body: expected a string, got %s"):format(what, type(t.body))
  end
  out.body = t.body
  if t.delay_ms ~= nil then
    local _, err = number_at_least(t.delay_ms, 0, what .. ".delay_ms")
    if err then return nil, err end
    out.delay_ms = t.delay_ms
  end
  return out
end

local function check_faults(list, what)
  local _, err = check_table(list, what)
  if err then return nil, err end
  local out, sum = {}, 0
  for i, f in ipairs(list) do
    local fwhat = ("%s[%d]"):format(what, i)
    _, err = check_table(f, fwhat)
    if not err then _, err = check_fields(f, FAULT_FIELDS, fwhat) end
    if err then return nil, err end
    local p
    p, err = number_at_least(f.p, 0, fwhat .. ".p")
    if err then return nil, err end
    if p > 1 then return nil, ("%s.p: expected a probability 0..1, got %s"):format(fwhat, p) end
    if f.action ~= nil and not ACTIONS[f.action] then
      return nil, ("%s.action: expected hang|reset|close, got %s"):format(fwhat, tostring(f.action))
    end
    local fault = { p = p, action = f.action }
    _, err = check_response(f, fault, fwhat)
    if err then return nil, err end
    -- gRPC calls get the code (Trailers-Only); HTTP requests the status.
    if f.grpc_status ~= nil then
      fault.grpc_status = grpc.code(f.grpc_status)
      if not fault.grpc_status then
        local hint = type(f.grpc_status) == "string"
                     and names.suggest(f.grpc_status:upper(), grpc.codes) or ""
        return nil, ("%s.grpc_status: expected a gRPC status code (0..16 or a name), got %s%s")
                    :format(fwhat, tostring(f.grpc_status), hint)
      end
    end
    if f.grpc_message ~= nil and type(f.grpc_message) ~= "string" then
      return nil, ("%s.grpc_message: expected a string, got %s"):format(fwhat, type(f.grpc_message))
    end
    fault.grpc_message, fault.grpc_headers = f.grpc_message, f.headers
    if not fault.action then
      fault.status = fault.status or DEFAULT_FAULT_STATUS
      fault.headers = fault.headers or (not fault.body and JSON_HEADERS) or nil
      fault.body = fault.body or FAULT_BODY
    end
    sum = sum + p
    out[i] = fault
  end
  if sum > 1 + P_SUM_SLACK then
    return nil, ("%s: probabilities add up to %s, more than 1"):format(what, sum)
  end
  return out
end

local PHASE_FIELDS = { name = true, from = true, to = true, faults = true, latency = true,
                       workers = true }

local function check_phase(p, i)
  local what = ("phases[%d]"):format(i)
  local _, err = check_table(p, what)
  if not err then _, err = check_fields(p, PHASE_FIELDS, what) end
  if err then return nil, err end
  if p.name ~= nil and type(p.name) ~= "string" then
    return nil, ("%s.name: expected a string, got %s"):format(what, type(p.name))
  end
  local out = { name = p.name or ("phase %d"):format(i) }
  out.from, err = number_at_least(p.from, 0, what .. ".from")
  if err then return nil, err end
  if p.to ~= nil then
    out.to, err = number_at_least(p.to, out.from, what .. ".to", true)
    if err then return nil, err end
  end
  if p.faults ~= nil then
    out.faults, err = check_faults(p.faults, what .. ".faults")
    if err then return nil, err end
  end
  if p.latency ~= nil then
    out.latency, err = number_at_least(p.latency, 0, what .. ".latency")
    if err then return nil, err end
  end
  if p.workers ~= nil then
    out.workers, err = integer_at_least(p.workers, 1, what .. ".workers")
    if err then return nil, err end
  end
  return out
end

local CONFIG_FIELDS = { seed = true, workers = true, queue = true, service_ms = true,
                        faults = true, phases = true, respond = true, reject = true,
                        clock = true }

-- The whole configuration -> the normalized one, or nil, message.
local function check_config(cfg)
  local _, err = check_table(cfg, "options")
  if not err then _, err = check_fields(cfg, CONFIG_FIELDS) end
  if err then return nil, err end
  local out = {}
  out.seed = DEFAULT_SEED
  if cfg.seed ~= nil then
    if math.type(cfg.seed) ~= "integer" then
      return nil, ("seed: expected an integer, got %s"):format(tostring(cfg.seed))
    end
    out.seed = cfg.seed
  end
  if cfg.workers ~= nil then
    out.workers, err = integer_at_least(cfg.workers, 1, "workers")
    if err then return nil, err end
  end
  if cfg.queue ~= nil then
    out.queue, err = integer_at_least(cfg.queue, 0, "queue")
    if err then return nil, err end
  end
  out.service_ms, err = check_dist(cfg.service_ms == nil and DEFAULT_SERVICE_MS or cfg.service_ms,
                                   "service_ms")
  if err then return nil, err end
  out.faults = {}
  if cfg.faults ~= nil then
    out.faults, err = check_faults(cfg.faults, "faults")
    if err then return nil, err end
  end
  out.phases = {}
  if cfg.phases ~= nil then
    _, err = check_table(cfg.phases, "phases")
    if err then return nil, err end
    for i, p in ipairs(cfg.phases) do
      out.phases[i], err = check_phase(p, i)
      if err then return nil, err end
      if out.phases[i].workers and not out.workers then
        return nil, ("phases[%d].workers: needs a baseline `workers` "
                     .. "(without, capacity is unlimited)"):format(i)
      end
    end
  end
  for name in pairs({ respond = true, clock = true }) do
    if cfg[name] ~= nil and type(cfg[name]) ~= "function" then
      return nil, ("%s: expected a function, got %s"):format(name, type(cfg[name]))
    end
    out[name] = cfg[name]
  end
  out.reject = DEFAULT_REJECT
  if cfg.reject ~= nil then
    _, err = check_table(cfg.reject, "reject")
    if not err then _, err = check_fields(cfg.reject, RESPONSE_FIELDS, "reject") end
    if err then return nil, err end
    out.reject, err = check_response(cfg.reject, { status = DEFAULT_REJECT.status }, "reject")
    if err then return nil, err end
    if not out.reject.body then
      out.reject.headers = out.reject.headers or DEFAULT_REJECT.headers
      out.reject.body = DEFAULT_REJECT.body
    end
  end
  return out
end

--- Validates an options table; returns it normalized (service_ms as a
-- table, faults with their default status and body, phases with names),
-- or raises naming the bad field.
function M.validate(cfg)
  local out, err = check_config(cfg)
  if not out then error("upstream.validate: " .. err, 2) end
  return out
end

--- Distributions ---------------------------------------------------------------

-- A normalized dist table and a uniform source -> a function giving draws (ms).
local function drawer(d, uniform)
  if d.dist == "fixed" then
    local ms = d.ms
    return function() return ms end
  elseif d.dist == "uniform" then
    local lo, span = d.min, d.max - d.min
    return function() return lo + span * uniform() end
  end
  -- Box-Muller; 1 - u is in (0, 1], so the log is finite.
  local function gaussian()
    local u1, u2 = 1 - uniform(), uniform()
    return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
  end
  if d.dist == "normal" then
    local mean, sd = d.mean, d.sd
    return function() return math.max(0, mean + sd * gaussian()) end
  elseif d.dist == "lognormal" then
    local median, sigma = d.median, d.sigma
    return function() return median * math.exp(sigma * gaussian()) end
  end
  local scale, inv_shape = d.scale, 1 / d.shape -- pareto, by inversion
  return function() return scale * (1 - uniform()) ^ -inv_shape end
end

--- A draw function for a service time spec (ms or a dist table) and an
-- integer seed: the same seed gives the same sequence.  Raises on a bad
-- spec, naming the field.
function M.sampler(spec, seed)
  local d, err = check_dist(spec, "service_ms")
  if not d then error("upstream.sampler: " .. err, 2) end
  if seed ~= nil and math.type(seed) ~= "integer" then
    error("upstream.sampler: seed: expected an integer, got " .. tostring(seed), 2)
  end
  return drawer(d, xoshiro(splitmix(seed or DEFAULT_SEED)))
end

--- A binary min-heap of numbers -----------------------------------------------

local Heap = {}
Heap.__index = Heap

local function heap() return setmetatable({ n = 0 }, Heap) end

function Heap:push(v)
  local n = self.n + 1
  self.n = n
  while n > 1 do
    local parent = n // 2
    if self[parent] <= v then break end
    self[n] = self[parent]
    n = parent
  end
  self[n] = v
end

function Heap:min() return self[1] end

function Heap:pop()
  local n = self.n
  local top, last = self[1], self[n]
  self[n] = nil
  n = n - 1
  self.n = n
  if n > 0 then
    local i = 1
    while true do
      local child = 2 * i
      if child > n then break end
      if child < n and self[child + 1] < self[child] then child = child + 1 end
      if last <= self[child] then break end
      self[i] = self[child]
      i = child
    end
    self[i] = last
  end
  return top
end

-- Pops every value <= t; returns how many.
function Heap:pop_until(t)
  local popped = 0
  while self.n > 0 and self[1] <= t do
    self:pop()
    popped = popped + 1
  end
  return popped
end

--- The model ---------------------------------------------------------------------

-- The faults, latency multiplier and workers in force at t_s: the baseline,
-- overridden field by field by the active phases, later ones winning.
local function in_force(phases, t_s, base)
  local faults, latency, workers = base.faults, 1, base.workers
  for _, p in ipairs(phases) do
    if t_s >= p.from and (not p.to or t_s < p.to) then
      faults = p.faults or faults
      latency = p.latency or latency
      workers = p.workers or workers
    end
  end
  return faults, latency, workers
end

-- The worker slots: base (the baseline count), steps (the workers in force
-- from each time (s) a phase changes them, in order), always (slots no
-- phase takes away) and max.  No slots (max 0) without `workers`.
local function slot_plan(conf)
  local base = conf.workers
  local plan = { base = base or 0, steps = {}, always = base or 0, max = base or 0 }
  local times, seen = {}, {}
  for _, p in ipairs(conf.phases) do
    if p.workers then
      for _, at in ipairs({ p.from, p.to }) do
        if not seen[at] then seen[at], times[#times + 1] = true, at end
      end
    end
  end
  table.sort(times)
  for k, at in ipairs(times) do
    local _, _, workers = in_force(conf.phases, at, conf)
    plan.steps[k] = { from = at, workers = workers }
    plan.always = math.min(plan.always, workers)
    plan.max = math.max(plan.max, workers)
  end
  return plan
end

local Upstream = {}
Upstream.__index = Upstream

local COUNTERS = { "arrivals", "admitted", "rejected", "faults", "completed" }

local function zero_counters()
  local c = {}
  for _, k in ipairs(COUNTERS) do c[k] = 0 end
  return c
end

local function core_clock() return require("resilua.core").now_ms() end

--- A model from an options table (see the file's head and `validate`);
-- raises naming the bad field.  Its clock starts now.
function M.new(cfg)
  local conf, err = check_config(cfg)
  if not conf then error("upstream.new: " .. err, 2) end
  local self = setmetatable({ conf = conf, phases = conf.phases, slots = slot_plan(conf),
                              clock = conf.clock or core_clock }, Upstream)
  self:reset()
  return self
end

--- Starts the model over: t0 = t0_ms (default now), no request waiting or
-- in service, the PRNG streams reseeded, counters zeroed.  So each arm of
-- an experiment meets the identical upstream, its phases on the arm's own
-- schedule even when the reset itself runs late.
function Upstream:reset(t0_ms)
  local next_seed = splitmix(self.conf.seed)
  self.fault_uniform = xoshiro(next_seed)
  self.draw_service = drawer(self.conf.service_ms, xoshiro(next_seed))
  self.t0 = t0_ms or self.clock()
  self.free_at = heap()  -- the always-usable slots' free-at times (ms)
  for _ = 1, self.slots.always do self.free_at:push(self.t0) end
  self.extra_free_at = {} -- slot always + j -> its free-at time (ms)
  for j = 1, self.slots.max - self.slots.always do self.extra_free_at[j] = self.t0 end
  self.waiting = heap()  -- start times of admitted requests not yet started
  self.ends = heap()     -- end times of admitted requests not yet counted completed
  self.total = zero_counters()
  self.win = zero_counters()
end

--- Seconds since t0.
function Upstream:now_s() return (self.clock() - self.t0) / 1000 end

-- The earliest time >= t (ms) at which slot i may take a request, or
-- math.huge if no phase ahead gives that many workers.
local function usable_from(self, i, t)
  local steps = self.slots.steps
  local k = #steps
  local rel_s = (t - self.t0) / 1000
  while k > 0 and steps[k].from > rel_s do k = k - 1 end
  while true do
    local workers = k == 0 and self.slots.base or steps[k].workers
    if i <= workers then return t end
    k = k + 1
    if k > #steps then return math.huge end
    t = self.t0 + steps[k].from * 1000
  end
end

local function bump(self, counter)
  self.total[counter] = self.total[counter] + 1
  self.win[counter] = self.win[counter] + 1
end

-- Counts the requests that ended by t (ms).
local function settle(self, t)
  local done = self.ends:pop_until(t)
  self.total.completed = self.total.completed + done
  self.win.completed = self.win.completed + done
  self.waiting:pop_until(t)
end

local function copy(t)
  local out = {}
  for k, v in pairs(t) do out[k] = v end
  return out
end

-- The default successful answer: a prediction derived from the body (FNV-1a),
-- so the same input gets the same answer.
local function predict(req)
  local h = 2166136261
  for i = 1, #req.body do h = ((h ~ req.body:byte(i)) * 16777619) & 0xffffffff end
  return { status = 200, headers = JSON_HEADERS,
           body = ('{"prediction": %.6f}'):format(h / 4294967296) }
end

-- The model's decision for a request arriving now: a fault, a reject, or
-- the answer delayed until its service ends.
local function arrive(self, req)
  local t = self.clock()
  local faults, latency = in_force(self.phases, (t - self.t0) / 1000, self.conf)
  -- Both streams move once per arrival, whatever happens to it.
  local u, service = self.fault_uniform(), self.draw_service() * latency
  bump(self, "arrivals")
  settle(self, t)

  local acc = 0
  for _, f in ipairs(faults) do
    acc = acc + f.p
    if u < acc then
      bump(self, "faults")
      if f.grpc_status and req.grpc and not f.action then
        return { grpc_status = f.grpc_status, grpc_message = f.grpc_message,
                 headers = f.grpc_headers, delay_ms = f.delay_ms }
      end
      return { status = f.status, headers = f.headers, body = f.body, delay_ms = f.delay_ms,
               action = f.action }
    end
  end

  local start, extra = t, nil -- extra: the index in extra_free_at, or nil for the heap
  if self.slots.max > 0 then
    start = math.max(t, self.free_at:min())
    for j, free in ipairs(self.extra_free_at) do
      local from = usable_from(self, self.slots.always + j, math.max(t, free))
      if from < start then start, extra = from, j end
    end
    if start > t and self.conf.queue and self.waiting.n >= self.conf.queue then
      bump(self, "rejected")
      local r = self.conf.reject
      return { status = r.status, headers = r.headers, body = r.body, delay_ms = r.delay_ms }
    end
    if extra then
      self.extra_free_at[extra] = start + service
    else
      self.free_at:pop()
      self.free_at:push(start + service)
    end
  end
  if start > t then self.waiting:push(start) end
  self.ends:push(start + service)
  bump(self, "admitted")

  local res
  if self.conf.respond then
    res = self.conf.respond(req)
    if type(res) ~= "table" then
      error("upstream: respond must return a table, got " .. type(res))
    end
  else
    res = predict(req)
  end
  res = copy(res)
  -- A heavy tail may draw more than the server takes: it waits a day.
  res.delay_ms = math.min(SERVER_MAX_DELAY_MS, (res.delay_ms or 0) + (start + service - t))
  return res
end

--- The handler for core.serve{handler=} or a `resilua serve` script.
function Upstream:handler()
  return function(req) return arrive(self, req) end
end

local function snapshot(self, counters)
  settle(self, self.clock())
  local out = copy(counters)
  out.queue = self.waiting.n
  out.busy = self.ends.n - self.waiting.n
  return out
end

--- The counters since the last window() (or reset), then starts a new
-- window: arrivals, admitted, rejected, faults, completed (service ended),
-- and now: busy (in service), queue (waiting).
function Upstream:window()
  local out = snapshot(self, self.win)
  self.win = zero_counters()
  return out
end

--- The same counters since reset().
function Upstream:totals() return snapshot(self, self.total) end

return M
