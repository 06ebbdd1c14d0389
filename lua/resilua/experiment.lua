--- resilua.experiment — load experiments (issue 4): several retry policies
-- against the same upstream model, the same arrivals and the same fault
-- schedule, side by side; a summary table on the terminal and a report
-- (report.json, report.html) with the charts.
--
--   local experiment = require "resilua.experiment"
--   return experiment.run{
--     name = "outage", duration = 30, seed = 1,
--     upstream = { workers = 10, service_ms = 50, queue = 200,
--                  phases = { { name = "outage", from = 5, to = 10,
--                               faults = { { p = 1, status = 503 } } } } },
--     load = { rate = 150, poisson = true },
--     policies = { { name = "no retry", policy = "no-retry" },
--                  { name = "default", policy = "default" } },
--     slo = { p95_ms = 800, success = 0.99 },
--   }
--
-- Each policy gets a lane: its own in-process upstream (resilua.upstream,
-- reset to the same seed), its own client (so breakers and budgets start
-- fresh) and the same arrival schedule.  Lanes run side by side on one
-- loop by default, so a 30 s experiment takes about 30 s whatever the
-- number of policies; --sequential runs them one after another.
--
-- Open loop: call i starts at its scheduled time whatever happened before
-- (latency counts from then: no coordinated omission).  Windows of
-- `window` seconds collect what the report plots: calls started, attempts
-- that reached the upstream (the retry storm), success rate and latency
-- percentiles of the calls that ended, breaker state, budget refusals.
local core = require "resilua.core"
local cjson = require "cjson"
local parse = require "resilua.getopt"
local load = require "resilua.load"
local resilua = require "resilua"
local policy = require "resilua.policy"
local report = require "resilua.report"
local upstream = require "resilua.upstream"

local M = {}

local EXIT_OK, EXIT_SCRIPT, EXIT_USAGE, EXIT_SLO = 0, 1, 2, 6
local PROGRESS_AFTER_S = 2 -- runs shorter than this print no progress

local USAGE = [[
usage: resilua run EXPERIMENT.lua [options]

Runs every policy of the experiment on the same load and fault schedule,
prints the summary table and writes report.json and report.html.

Options:
  --out DIR         where the report goes (default reports/NAME)
  --seed N          arrivals, faults and service times (default: the script's, or 1)
  --duration S      seconds of load per policy (default: the script's)
  --only NAME,...   run only these policies (repeatable; a name may hold
                    commas: --only "a, b" picks the policy "a, b" if there is one)
  --sequential      one policy after another (default: side by side)
  --quiet           no live progress on stderr
  -h, --help        this text

Exit codes: 0 done (and the SLO met, when the experiment has one),
1 the script raised (or a hook did), or SIGINT/SIGTERM stopped it (the
report then covers what ran), 2 a bad experiment or option (an
unwritable --out included, before anything runs), 6 the SLO was not met.
]]

--- Rate shapes for load.rate ---------------------------------------------

--- A rate that goes linearly from `from` to `to` calls/s over the run.
function M.ramp(from, to) return { shape = "ramp", from = from, to = to } end

--- A rate in steps: { {at_s, rate}, ... }, each holding until the next.
function M.steps(list) return { shape = "steps", steps = list } end

local function rate_at(rate, t_s, duration_s)
  if type(rate) == "number" then return rate end
  if rate.shape == "ramp" then
    return rate.from + (rate.to - rate.from) * math.min(1, t_s / duration_s)
  end
  local r = 0
  for _, s in ipairs(rate.steps) do
    if t_s >= s[1] then r = s[2] end
  end
  return r
end

local function describe_rate(rate)
  if type(rate) == "number" then return ("%g calls/s"):format(rate) end
  if rate.shape == "ramp" then return ("%g to %g calls/s"):format(rate.from, rate.to) end
  local parts = {}
  for i, s in ipairs(rate.steps) do parts[i] = ("%g/s from %g s"):format(s[2], s[1]) end
  return table.concat(parts, ", ")
end

--- The arrival schedule: a function returning the next call's start in
-- ms from the lane's t0, or nil past the duration.  Evenly spaced at the
-- current rate, or Poisson (exponential gaps).  Every lane draws the same
-- sequence from the same seed.
local function arrivals(load, duration_s, seed)
  local draw = upstream.sampler({ dist = "uniform", min = 0, max = 1 }, seed) -- in [0, 1)
  local t_s = 0
  local MIN_RATE = 1e-3 -- a zero rate waits for the next step
  return function()
    while t_s < duration_s do
      local r = rate_at(load.rate, t_s, duration_s)
      if r > MIN_RATE then
        local at = t_s
        local gap = load.poisson and -math.log(1 - draw()) / r or 1 / r
        t_s = t_s + gap
        return at * 1000
      end
      t_s = t_s + 0.01
    end
    return nil
  end
end

--- Checking the experiment ----------------------------------------------

local SPEC_FIELDS = { name = true, description = true, duration = true, window = true,
                      seed = true, upstream = true, url = true, load = true, request = true,
                      on_response = true, policies = true, slo = true, policy_path = true,
                      parallel = true }

local SLO_FIELDS = { p50_ms = { 0, math.huge }, p95_ms = { 0, math.huge }, p99_ms = { 0, math.huge },
                     success = { 0, 1 }, from_s = { 0, math.huge }, to_s = { 0, math.huge },
                     windows_ok = { 0, 1 } }

-- Raises "script:line: message" on the first thing wrong, the line being
-- where the offending field is written.
local function check(x, script, src)
  local function bad(key, fmt, ...)
    local line = policy.line_of(src, key) or 1
    error(("%s:%d: " .. fmt):format(script, line, ...), 0)
  end
  if type(x) ~= "table" then bad("run", "experiment.run: expected a table") end
  for k in pairs(x) do
    if not SPEC_FIELDS[k] then bad(tostring(k), "unknown field '%s'", tostring(k)) end
  end
  if type(x.name) ~= "string" or not x.name:match("^[%w_.-]+$") then
    bad("name", "name: expected a word (letters, digits, _ . -), got %s", tostring(x.name))
  end
  if type(x.duration) ~= "number" or x.duration <= 0 then
    bad("duration", "duration: expected seconds > 0, got %s", tostring(x.duration))
  end
  if x.window ~= nil and (type(x.window) ~= "number" or x.window < 0.1) then
    bad("window", "window: expected seconds >= 0.1, got %s", tostring(x.window))
  end
  if (x.upstream == nil) == (x.url == nil) then
    bad("upstream", "give either upstream (a model, see resilua.upstream) or url (a running server)")
  end
  local load = x.load
  if type(load) ~= "table" then bad("load", "load: expected a table { rate = ... } or { concurrency = ... }") end
  if (load.rate == nil) == (load.concurrency == nil) then
    bad("load", "load: give either rate (open loop) or concurrency (closed loop)")
  end
  if load.rate ~= nil then
    local r = load.rate
    local ok = (type(r) == "number" and r > 0)
      or (type(r) == "table" and r.shape == "ramp" and type(r.from) == "number"
          and type(r.to) == "number" and r.from >= 0 and r.to >= 0)
      or (type(r) == "table" and r.shape == "steps" and type(r.steps) == "table" and #r.steps > 0)
    if not ok then
      bad("rate", "load.rate: expected calls/s > 0, experiment.ramp(from, to) or experiment.steps{...}")
    end
    for i, step in ipairs(type(r) == "table" and r.steps or {}) do
      if type(step) ~= "table" or type(step[1]) ~= "number" or type(step[2]) ~= "number"
         or step[1] < 0 or step[2] < 0 then
        bad("rate", "load.rate: step %d: expected { at_s, calls/s }, both >= 0", i)
      end
    end
  elseif math.type(load.concurrency) ~= "integer" or load.concurrency < 1 then
    bad("concurrency", "load.concurrency: expected an integer >= 1, got %s", tostring(load.concurrency))
  end
  for _, hook in ipairs({ "request", "on_response" }) do
    if x[hook] ~= nil and type(x[hook]) ~= "function" then bad(hook, "%s: expected a function", hook) end
  end
  if type(x.policies) ~= "table" or #x.policies == 0 then
    bad("policies", "policies: expected a list of { name = ..., policy = NAME | FILE.lua | table }")
  end
  local seen = {}
  for i, p in ipairs(x.policies) do
    if type(p) ~= "table" or type(p.name) ~= "string" or p.name == "" then
      bad("policies", "policies[%d]: expected { name = \"...\", policy = ... }", i)
    end
    if seen[p.name] then bad("policies", "policies[%d]: the name '%s' is used twice", i, p.name) end
    seen[p.name] = true
    if type(p.policy) ~= "string" and type(p.policy) ~= "table" then
      bad("policies", "policies[%d].policy: expected a policy name, a FILE.lua or a table", i)
    end
  end
  if x.slo ~= nil then
    if type(x.slo) ~= "table" then bad("slo", "slo: expected { p95_ms = ..., success = ... }") end
    for k, v in pairs(x.slo) do
      local range = SLO_FIELDS[k]
      if not range then bad(tostring(k), "slo: unknown field '%s'", tostring(k)) end
      if type(v) ~= "number" or v < range[1] or v > range[2] then
        bad(k, "slo.%s: expected a number in [%g, %g], got %s", k, range[1], range[2], tostring(v))
      end
    end
  end
end

--- The SLO: a predicate over a window's (or the whole run's) figures.
local function slo_of(slo)
  if not slo then return nil end
  local parts = {}
  for _, k in ipairs({ "p50", "p95", "p99" }) do
    if slo[k .. "_ms"] then parts[#parts + 1] = ("%s < %g ms"):format(k, slo[k .. "_ms"]) end
  end
  if slo.success then parts[#parts + 1] = ("success >= %g %%"):format(100 * slo.success) end
  local function met(f)
    if f.calls == 0 then return nil end
    for _, k in ipairs({ "p50", "p95", "p99" }) do
      local limit = slo[k .. "_ms"]
      if limit and not (f[k] < limit) then return false end
    end
    return not slo.success or f.success_rate >= slo.success
  end
  return { description = table.concat(parts, " and "), met = met,
           p50_ms = slo.p50_ms, p95_ms = slo.p95_ms, p99_ms = slo.p99_ms, success = slo.success,
           from_s = slo.from_s or 0, to_s = slo.to_s or math.huge,
           windows_ok = slo.windows_ok or 1 }
end

--- A lane: one policy's run ------------------------------------------------

local null = cjson.null
local lanes_made = 0 -- client names must be new so breakers and budgets start fresh

local function new_window()
  return { started = 0, ended = 0, ok = 0, attempts = 0, budget = 0, throttled = 0,
           breaker_open = false }
end

local function percentile_or_null(h, p)
  if h:count() == 0 then return null end
  return h:percentile(p)
end

--- Runs one policy's lane; calls done(lane) when its last call ended.
local function start_lane(x, lane, done)
  local now = core.now_ms
  local up, server, base_url
  if x.upstream then
    up = upstream.new(x.upstream)
    server = assert(core.serve{ listen = "127.0.0.1:0", handler = up:handler(),
                                dedup = x.dedup })
    base_url = "http://" .. server:address()
  else
    base_url = x.url:gsub("/$", "")
  end
  lanes_made = lanes_made + 1
  local client = resilua.client{ policy = lane.policy,
                                 name = ("experiment %s #%d"):format(lane.name, lanes_made) }
  local window_ms = x.window * 1000
  local duration_ms = x.duration * 1000
  local W = { t = {}, offered = {}, attempts = {}, success_rate = {}, p50 = {}, p95 = {},
              p99 = {}, breaker = {}, budget_exhausted = {},
              throttled = lane.policy.table.throttle and {} or nil,
              slo_ok = x.slo and {} or nil,
              upstream_arrivals = up and {} or nil, upstream_queue = up and {} or nil }
  lane.windows = W
  local win, win_hist, total_hist = new_window(), core.hist(), core.hist()
  local totals = { calls = 0, ok = 0, attempts = 0, outcomes = {}, statuses = {} }
  local phases = {}
  for i, ph in ipairs(x.phases) do
    phases[i] = { from_ms = ph.from_s * 1000, to_ms = (ph.to_s == null and math.huge or ph.to_s * 1000),
                  calls = 0, ok = 0, attempts = 0, hist = core.hist() }
  end
  local in_flight, sending, n = 0, true, 0
  local planned, stopped -- open loop: calls due per window; stopped by lane.stop
  local t0 = now() + 5 -- a little ahead, so the first start is on time

  local function request(i)
    local r = { method = "POST", path = "/v1/predict",
                headers = { ["Content-Type"] = "application/json" },
                body = ('{"id": %d, "inputs": "ok"}'):format(i) }
    if x.request then
      local ok, built = pcall(x.request, i)
      if not ok or type(built) ~= "table" then
        x.fail("request: " .. (ok and ("expected a table, got " .. type(built)) or tostring(built)))
      else
        r = built
      end
    end
    return { method = r.method or "GET", url = base_url .. (r.path or "/"), headers = r.headers,
             body = r.body, grpc = r.grpc, metadata = r.metadata, http2 = r.http2 }
  end

  local finish -- below: runs once the last call of the lane ended

  local function ended(r, i, from_ms, start_offset_ms)
    in_flight = in_flight - 1
    local latency = now() - from_ms
    local outcome = r.outcome
    if outcome == "ok" and x.on_response then
      local hook_ok, accepted = pcall(x.on_response, r,
                                      { policy = lane.name, i = i, t = start_offset_ms / 1000 })
      if not hook_ok then x.fail("on_response: " .. tostring(accepted)) end
      if accepted == false or not hook_ok then outcome = "invalid" end
    end
    local ok = outcome == "ok"
    win.ended, win.attempts = win.ended + 1, win.attempts + r.attempts
    if ok then win.ok = win.ok + 1 end
    if outcome == "budget" then win.budget = win.budget + 1 end
    if outcome == "throttled" then win.throttled = win.throttled + 1 end
    if outcome == "breaker_open" then win.breaker_open = true end
    win_hist:record(latency)
    totals.calls, totals.attempts = totals.calls + 1, totals.attempts + r.attempts
    if ok then totals.ok = totals.ok + 1 end
    totals.outcomes[outcome] = (totals.outcomes[outcome] or 0) + 1
    if r.status then
      local k = tostring(math.tointeger(r.status))
      totals.statuses[k] = (totals.statuses[k] or 0) + 1
    end
    for _, ph in ipairs(phases) do
      if start_offset_ms >= ph.from_ms and start_offset_ms < ph.to_ms then
        ph.calls, ph.attempts = ph.calls + 1, ph.attempts + r.attempts
        if ok then ph.ok = ph.ok + 1 end
        ph.hist:record(latency)
      end
    end
    finish()
  end

  -- Starts the next call; its latency counts from from_ms.
  local function start(from_ms, after)
    n = n + 1
    local i, offset = n, from_ms - t0
    in_flight = in_flight + 1
    win.started = win.started + 1
    core.call(client.state, client:policy().core, request(i), function(r)
      ended(r, i, from_ms, offset)
      if after then after() end
    end)
  end

  local finished = false
  local function close_window()
    local k = #W.t + 1
    W.t[k] = (k - 1) * x.window
    -- Open loop, the offered load is the schedule's (the same in every lane
    -- and run, whatever the machine's load); closed loop, the starts.
    local offered = (planned and not stopped) and (planned[k] or 0) or win.started
    W.offered[k] = offered / x.window
    W.attempts[k] = win.attempts / x.window
    W.success_rate[k] = win.ended > 0 and win.ok / win.ended or null
    W.p50[k] = percentile_or_null(win_hist, 50)
    W.p95[k] = percentile_or_null(win_hist, 95)
    W.p99[k] = percentile_or_null(win_hist, 99)
    local state = client:breaker(base_url .. "/") or "closed"
    if state == "closed" and win.breaker_open then state = "open" end
    W.breaker[k] = state
    W.budget_exhausted[k] = win.budget
    if W.throttled then W.throttled[k] = win.throttled end
    if up then
      local u = up:window()
      W.upstream_arrivals[k] = u.arrivals / x.window
      W.upstream_queue[k] = u.queue
    end
    if x.slo then
      local t = W.t[k]
      local ok = nil
      if t >= x.slo.from_s and t < x.slo.to_s then
        ok = x.slo.met{ calls = win.ended, success_rate = win.ended > 0 and win.ok / win.ended,
                        p50 = W.p50[k], p95 = W.p95[k], p99 = W.p99[k] }
      end
      if ok == nil then W.slo_ok[k] = null else W.slo_ok[k] = ok end
    end
    lane.progress = { calls_per_s = win.started / x.window, in_flight = in_flight,
                      success = win.ended > 0 and win.ok / win.ended or nil,
                      p99 = win_hist:count() > 0 and win_hist:percentile(99) or nil,
                      elapsed_s = (now() - t0) / 1000 }
    total_hist:merge(win_hist)
    win_hist:reset()
    win = new_window()
  end

  function finish()
    if finished or sending or in_flight > 0 then return end
    finished = true
    close_window()
    if server then server:close() end
    lane.totals, lane.total_hist, lane.phase_figures = totals, total_hist, phases
    done(lane)
  end

  local function window_tick()
    if finished then return end
    close_window()
    core.timer(math.max(0, t0 + #W.t * window_ms + window_ms - now()) / 1000, window_tick)
  end

  if x.load.rate then
    planned = {}
    local gen = arrivals(x.load, x.duration, x.seed)
    for at in gen do
      local k = math.floor(at / window_ms) + 1
      planned[k] = (planned[k] or 0) + 1
    end
    local next_at = arrivals(x.load, x.duration, x.seed)
    local due = next_at()
    local function tick()
      if not sending then return end -- stopped
      local t = now()
      while due and t0 + due <= t do
        start(t0 + due)
        due = next_at()
      end
      if due then
        core.timer(math.max(0, t0 + due - now()) / 1000, tick)
      else
        sending = false
        finish()
      end
    end
    core.timer(math.max(0, t0 - now()) / 1000, function()
      if up then up:reset(t0) end -- late or not, phases count from t0
      tick()
    end)
  else
    local workers = x.load.concurrency
    local function worker()
      local t = now()
      if not sending or t >= t0 + duration_ms then
        workers = workers - 1
        if workers == 0 then sending = false end
        return finish()
      end
      start(t, worker)
    end
    core.timer(math.max(0, t0 - now()) / 1000, function()
      if up then up:reset(t0) end -- late or not, phases count from t0
      for _ = 1, workers do worker() end
    end)
  end
  core.timer(math.max(0, t0 + window_ms - now()) / 1000, window_tick)

  --- Starts no more calls; the lane ends once those in flight have.
  function lane.stop()
    sending, stopped = false, true
    finish()
  end
end

--- The report ------------------------------------------------------------

-- The latency distribution the report plots: percentiles of the whole run.
local DISTRIBUTION = { 0, 10, 25, 50, 75, 90, 95, 98, 99, 99.5, 99.8, 99.9, 99.95, 99.99, 100 }

local function lane_report(x, lane)
  local t, h = lane.totals, lane.total_hist
  local latency = load.figures(h) or {}
  local summary = { calls = t.calls, ok = t.ok, success_rate = t.calls > 0 and t.ok / t.calls or 0,
                    attempts = t.attempts, amplification = t.calls > 0 and t.attempts / t.calls or 0,
                    latency_ms = latency, outcomes = t.outcomes, statuses = t.statuses }
  if h:count() > 0 then
    summary.distribution = { p = DISTRIBUTION, ms = {} }
    for i, p in ipairs(DISTRIBUTION) do summary.distribution.ms[i] = h:percentile(p) end
  end
  if x.slo then
    local failed, judged = 0, 0
    for _, ok in ipairs(lane.windows.slo_ok) do
      if ok ~= null then
        judged = judged + 1
        if not ok then failed = failed + 1 end
      end
    end
    local overall = x.slo.met{ calls = t.calls, success_rate = summary.success_rate,
                               p50 = latency.p50, p95 = latency.p95, p99 = latency.p99 }
    summary.slo = { met = overall ~= false
                          and judged - failed >= x.slo.windows_ok * judged - 1e-9,
                    windows_failed = failed, windows = judged }
  end
  local phases = {}
  for i, ph in ipairs(lane.phase_figures) do
    local has = ph.calls > 0
    phases[i] = { name = x.phases[i].name, calls = ph.calls,
                  success_rate = has and ph.ok / ph.calls or null,
                  amplification = has and ph.attempts / ph.calls or null,
                  p95 = has and ph.hist:percentile(95) or null,
                  p99 = has and ph.hist:percentile(99) or null }
  end
  return { name = lane.name, description = lane.description, summary = summary,
           phases = phases, windows = lane.windows }
end

--- What a phase does, in words.
local function describe_phase(ph)
  local parts = {}
  for _, f in ipairs(ph.faults or {}) do
    parts[#parts + 1] = ("%g %% %s"):format(100 * (f.p or 1), f.status or f.action or "fault")
  end
  if ph.latency then parts[#parts + 1] = ("latency x%g"):format(ph.latency) end
  if ph.workers then parts[#parts + 1] = ("%d workers"):format(ph.workers) end
  return #parts > 0 and table.concat(parts, ", ") or "no fault"
end

-- A distribution's parameters, in the order people say them; "" = unitless.
local DIST_PARAMS = { uniform = { "min", "max" }, normal = { "mean", "sd" },
                      lognormal = { "median", "sigma=" }, pareto = { "scale", "shape=" } }

local function describe_upstream(u)
  local s = u.service_ms or 20
  local service
  if type(s) == "number" or s.dist == "fixed" then
    service = ("%g ms"):format(type(s) == "number" and s or s.ms)
  else
    local parts = {}
    for _, k in ipairs(DIST_PARAMS[s.dist] or {}) do
      local name, unitless = k:match("^(%a+)(=?)$")
      parts[#parts + 1] = ("%s %g%s"):format(name, s[name], unitless == "" and " ms" or "")
    end
    service = ("%s (%s)"):format(s.dist, table.concat(parts, ", "))
  end
  local faults = {}
  for _, f in ipairs(u.faults or {}) do
    faults[#faults + 1] = ("%g %% %s"):format(100 * f.p, f.status or f.action)
  end
  return ("%s workers, service time %s, queue %s%s"):format(
    u.workers or "unlimited", service, u.queue or "unbounded",
    #faults > 0 and (", faults: " .. table.concat(faults, ", ")) or "")
end

--- A policy in a line: what the lane is, for the report.
local function describe_policy(t)
  local parts = { ("%d attempt%s, %g ms per try"):format(t.max_attempts,
                  t.max_attempts == 1 and "" or "s", t.per_try_timeout_ms) }
  if t.max_attempts > 1 then
    local b = t.backoff
    parts[#parts + 1] = b.base_ms > 0 and ("backoff %g ms (%s jitter)"):format(b.base_ms, b.jitter)
                        or "no backoff"
  end
  if t.max_attempts > 1 then parts[#parts + 1] = t.budget and "retry budget" or "no budget" end
  parts[#parts + 1] = t.breaker and "breaker" or "no breaker"
  return table.concat(parts, ", ")
end

--- Command line ------------------------------------------------------------

local function parse_args(args)
  local opts, pos = parse(args, 1, {
    ["--help"] = "flag", ["--quiet"] = "flag", ["--sequential"] = "flag", ["--out"] = "value",
    ["--seed"] = "value", ["--duration"] = "value", ["--only"] = "list",
  }, { ["-h"] = "--help" })
  if not opts then error(pos .. " (see --help)", 0) end
  if #pos > 0 then error(("unknown option '%s' (see --help)"):format(pos[1]), 0) end
  local o = { help = opts["--help"], quiet = opts["--quiet"], sequential = opts["--sequential"],
              out = opts["--out"], only = opts["--only"] }
  if opts["--seed"] then
    o.seed = math.tointeger(tonumber(opts["--seed"]))
    if not o.seed then error("--seed: expected an integer, got " .. opts["--seed"], 0) end
  end
  if opts["--duration"] then
    o.duration = tonumber(opts["--duration"])
    if not o.duration or o.duration <= 0 then
      error("--duration: expected seconds > 0, got " .. opts["--duration"], 0)
    end
  end
  return o
end

--- The policy names --only selects: each value is a name as it is (names
-- may hold commas), or a comma-separated list of names.  Returns a set, or
-- nil and a message that lists the names there are.
local function only_names(values, policies)
  local known, names = {}, {}
  for _, p in ipairs(policies) do
    known[p.name] = true
    names[#names + 1] = ("'%s'"):format(p.name)
  end
  local set = {}
  for _, v in ipairs(values or {}) do
    if known[v] then
      set[v] = true
    else
      for name in v:gmatch("[^,]+") do
        name = name:match("^%s*(.-)%s*$")
        if not known[name] then
          return nil, ("no policy named '%s' (the policies: %s)"):format(name,
                                                                     table.concat(names, ", "))
        end
        set[name] = true
      end
    end
  end
  return set
end

--- Live progress: one line per running lane, redrawn in place.
local function progress_printer(lanes)
  local drawn = 0
  return function()
    local out = {}
    if drawn > 0 then out[1] = ("\27[%dA"):format(drawn) end
    drawn = 0
    for _, lane in ipairs(lanes) do
      local p = lane.progress
      if p then
        out[#out + 1] = ("\27[2K  %-22s %6.1f s  %7.1f calls/s  %6d in flight  %6s ok  p99 %s\n")
          :format(lane.name:sub(1, 22), p.elapsed_s, p.calls_per_s, p.in_flight,
                  p.success and ("%.1f%%"):format(100 * p.success) or "-",
                  p.p99 and ("%.0f ms"):format(p.p99) or "-")
        drawn = drawn + 1
      end
    end
    io.stderr:write(table.concat(out))
  end
end

--- Runs the experiment; returns the exit code (so that a script can
-- `return experiment.run{...}`).
function M.run(x)
  local script = _G.arg and _G.arg[0] or "?"
  local ok, o = pcall(parse_args, _G.arg or {})
  if not ok then
    io.stderr:write("resilua experiment: ", o, "\n")
    return EXIT_USAGE
  end
  if o.help then
    io.stdout:write(USAGE)
    return EXIT_OK
  end
  local f = io.open(script, "rb")
  local src = f and f:read("a") or ""
  if f then f:close() end
  local okc, err = pcall(check, x, script, src)
  if not okc then
    io.stderr:write("resilua experiment: ", err, "\n")
    return EXIT_USAGE
  end

  -- A normalized copy: the options override the script.
  local run = {}
  for k, v in pairs(x) do run[k] = v end
  run.seed = o.seed or x.seed or 1
  run.duration = o.duration or x.duration
  run.window = x.window or 1
  run.slo = slo_of(x.slo)
  if x.upstream then
    run.upstream = {}
    for k, v in pairs(x.upstream) do run.upstream[k] = v end
    run.upstream.seed = run.seed
    -- Like most model servers, the model does not dedup by Idempotency-Key
    -- unless asked: a retry is work again.
    run.dedup = x.upstream.dedup == true
    run.upstream.dedup = nil
    local okm, merr = pcall(upstream.new, run.upstream)
    if not okm then
      io.stderr:write(("resilua experiment: %s:%d: upstream: %s\n"):format(
        script, policy.line_of(src, "upstream") or 1, tostring(merr)))
      return EXIT_USAGE
    end
  end
  run.phases = {}
  for i, ph in ipairs(x.upstream and x.upstream.phases or {}) do
    local what = describe_phase(ph)
    run.phases[i] = { name = ph.name or ("phase %d"):format(i), from_s = ph.from or 0,
                      to_s = ph.to or null, description = what, fault = what ~= "no fault" }
  end

  -- Where the report goes must be writable before anything runs.
  local out_dir = o.out or ("reports/" .. x.name)
  os.execute(("mkdir -p '%s' 2>/dev/null"):format((out_dir:gsub("'", [['\'']]))))
  local probe = io.open(out_dir .. "/.resilua-write-test", "w")
  if not probe then
    io.stderr:write("resilua experiment: --out: cannot write to ", out_dir, "\n")
    return EXIT_USAGE
  end
  probe:close()
  os.remove(out_dir .. "/.resilua-write-test")

  core.log(false) -- the report has the figures: no event per attempt or policy load
  local only, only_err = only_names(o.only, x.policies)
  if not only then
    io.stderr:write("resilua experiment: --only: ", only_err, "\n")
    return EXIT_USAGE
  end
  local lanes = {}
  for _, p in ipairs(x.policies) do
    if not o.only or only[p.name] then
      local pol, perr
      if type(p.policy) == "table" then
        pol, perr = policy.define(p.policy, p.name, script, src)
      else
        pol, perr = policy.load(p.policy, x.policy_path and policy.path(x.policy_path))
      end
      if not pol then
        io.stderr:write("resilua experiment: policy '", p.name, "': ", tostring(perr), "\n")
        return EXIT_USAGE
      end
      lanes[#lanes + 1] = { name = p.name, description = p.description or describe_policy(pol.table),
                              policy = pol }
    end
  end

  resilua.seed(run.seed)
  -- A hook that raises stops the experiment: its figures would be wrong.
  local hook_error
  function run.fail(msg) hook_error = hook_error or msg end
  local running, next_lane, interrupted = 0, 1, false
  local sequential = o.sequential or x.parallel == false
  local function start_next()
    local lane = lanes[next_lane]
    next_lane = next_lane + 1
    running = running + 1
    start_lane(run, lane, function()
      running = running - 1
      if sequential and next_lane <= #lanes and not interrupted then start_next() end
    end)
  end
  if sequential then start_next() else
    while next_lane <= #lanes do start_next() end
  end
  local show = not o.quiet and core.isatty(2)
    and run.duration * (sequential and #lanes or 1) > PROGRESS_AFTER_S
  local print_progress = show and progress_printer(lanes)
  core.catch_signals()
  local last_print = core.now_ms()
  while running > 0 do
    core.step(0.25)
    if hook_error then
      io.stderr:write("resilua experiment: ", hook_error, "\n")
      return EXIT_SCRIPT
    end
    if core.stop_signal() ~= 0 and not interrupted then
      -- Keep what ran: stop starting calls, let those in flight end (each
      -- within its policy's deadline), then report.
      interrupted = true
      io.stderr:write("resilua experiment: interrupted: finishing the calls in flight\n")
      for _, lane in ipairs(lanes) do
        if lane.stop then lane.stop() end
      end
    end
    if print_progress and core.now_ms() - last_print >= 1000 then
      last_print = core.now_ms()
      print_progress()
    end
  end

  local r = {
    title = x.name, description = x.description, seed = run.seed, window_s = run.window,
    duration_s = run.duration, created = os.date("!%Y-%m-%dT%H:%M:%SZ"),
    load = { mode = x.load.rate and "open" or "closed",
             arrivals = x.load.rate and (x.load.poisson and "poisson"
                        or (type(x.load.rate) == "number" and "constant" or x.load.rate.shape)) or nil,
             rate = type(x.load.rate) == "number" and x.load.rate or nil,
             concurrency = x.load.concurrency,
             description = x.load.rate and (describe_rate(x.load.rate)
                           .. (x.load.poisson and ", Poisson arrivals" or ""))
                           or ("%d in flight (closed loop)"):format(x.load.concurrency) },
    upstream = { description = x.upstream and describe_upstream(x.upstream) or core.utf8_clean(core.redact_url(x.url)) },
    phases = run.phases,
    slo = run.slo and { description = run.slo.description, p50_ms = run.slo.p50_ms,
                        p95_ms = run.slo.p95_ms, p99_ms = run.slo.p99_ms,
                        success = run.slo.success } or nil,
    policies = {},
  }
  for _, lane in ipairs(lanes) do
    if lane.totals then r.policies[#r.policies + 1] = lane_report(run, lane) end
  end
  r.interrupted = interrupted or nil
  local html, werr = report.write(r, out_dir)
  io.stdout:write(report.table(r))
  if not html then
    io.stderr:write("resilua experiment: cannot write the report: ", tostring(werr), "\n")
    return EXIT_SCRIPT
  end
  io.stdout:write("\nreport: ", html, "\n")
  if interrupted then
    io.stdout:write("interrupted: the figures cover what ran\n")
    return EXIT_SCRIPT
  end
  if not run.slo then return EXIT_OK end
  -- Which policies met the SLO, and the best of them: the mini challenge's answer.
  local met, best = {}, nil
  for _, p in ipairs(r.policies) do
    if p.summary.slo.met then
      met[#met + 1] = p.name
      if not best or p.summary.success_rate > best.summary.success_rate then best = p end
    end
  end
  if not best then
    io.stdout:write("no policy met the SLO (", run.slo.description, ")\n")
    return EXIT_SLO
  end
  io.stdout:write(("SLO %s: met by %s; the highest success rate among them: %s (%s %%)\n")
    :format(run.slo.description, table.concat(met, ", "), best.name,
            report.percent(best.summary.success_rate))) -- as the table shows it
  return EXIT_OK
end

M.USAGE = USAGE
return M
