--- resilua.plan — `resilua plan`: the seed's mini challenge as a tool.
-- "Your SLA is p95 < 800 ms: propose a per-try timeout, a number of
-- attempts and a backoff."  From an SLO and an upstream profile (a latency
-- distribution and a failure mix), it searches plans (per-try timeout,
-- attempts, backoff, deadline), plays each one through the real call state
-- machine on the virtual clock (core.play, as resilua.testing does) against
-- calls drawn from the profile, and ranks them: those that meet the SLO
-- first, then by predicted success, then by p95.  `--write` writes the
-- best as a policy file; `--verify` runs the top two as a real experiment
-- against resilua.upstream built from the same profile and prints
-- predicted against measured.
-- Uses: resilua.core (play, hist), resilua.policy, resilua.upstream,
-- resilua.experiment (for --verify), cjson.
local core = require "resilua.core"
local cjson = require("cjson").new()
local parse = require "resilua.getopt"
local policy = require "resilua.policy"
local upstream = require "resilua.upstream"

local M = {}

local EXIT_OK, EXIT_USAGE, EXIT_SLO = 0, 2, 6
local MAX_CALLS = 10000 -- core.play's limit
local MAX_PROFILE_BYTES = 16 * 1024 * 1024
local MAX_LOG_LINES = 1000000 -- an event log is read up to here (documented in --help)
local MAX_LOG_LINE_BYTES = 64 * 1024 -- a longer line is skipped as malformed
local MIN_LATENCY_MS = 0.01 -- a lognormal needs p50 > 0; a local log can say 0
local FAULT_LATENCY_MS = 1 -- a fault is answered at once (as resilua.upstream does)

M.USAGE = [[
usage: resilua plan --slo "p95<800ms" --profile FILE [options]

Searches retry plans (per-try timeout, attempts, backoff, deadline) for an
SLO, simulating each on the real call state machine with a virtual clock
against calls drawn from an upstream profile, and prints them ranked.

  --slo "pNN<Xms"     the latency objective (p50, p90, p95, p99; ms or s)
  --success F         also a success floor, 0..1 (e.g. 0.99)
  --profile FILE      the upstream: a Lua file returning
                        { service_ms = { dist = "lognormal", median = 185, sigma = 0.8 },
                          faults = { { p = 0.06, status = 503 }, { p = 0.02, action = "hang" } } }
                      (dists and faults as resilua.upstream), or the JSON
                      of `resilua load --json` (a lognormal fitted to its
                      p50 and p95, its statuses and errors as faults),
                      or an event log (`--log FILE` of call, load, batch
                      or proxy): the same fit over its attempt events
                      (first 1,000,000 lines; malformed lines skipped)
  --calls N           simulated calls per plan (default 10000)
  --top K             plans printed (default 10)
  --seed N            draws (default 1)
  --write FILE.lua    write the best plan as a policy file
  --verify            run the top two as a real experiment against
                      resilua.upstream built from the profile; print
                      predicted vs measured
  --duration S        --verify's seconds (default 20), --rate R its calls/s (default 50)

Exit codes: 0 done and the best plan meets the SLO, 2 usage, 6 no plan meets it.
]]

--- Arguments --------------------------------------------------------------

local function parse_slo(s)
  local p, v, unit = tostring(s):match("^%s*p(%d+)%s*<%s*([%d.]+)%s*(m?s)%s*$")
  p, v = tonumber(p), tonumber(v)
  if not p or not v or p < 1 or p > 99 or v <= 0 or v ~= v or v == math.huge then
    return nil, ("--slo: expected e.g. \"p95<800ms\", got %q"):format(tostring(s))
  end
  return { p = p, ms = unit == "s" and v * 1000 or v }
end

-- Raises the usage message.
local function parse_args(args)
  local opts, pos = parse(args, 2, {
    ["--help"] = "flag", ["--slo"] = "value", ["--success"] = "value", ["--profile"] = "value",
    ["--calls"] = "value", ["--top"] = "value", ["--seed"] = "value", ["--write"] = "value",
    ["--verify"] = "flag", ["--duration"] = "value", ["--rate"] = "value",
  }, { ["-h"] = "--help" })
  if not opts then error(pos .. " (see resilua plan --help)", 0) end
  if #pos > 0 then error(("unknown option '%s' (see resilua plan --help)"):format(pos[1]), 0) end
  local function number(name, lo, hi, integer, default)
    local given = opts[name]
    if given == nil then return default end
    local v = tonumber(given)
    if not v or v < lo or v > hi or (integer and v ~= math.floor(v)) then
      error(("%s: expected a number in [%g, %g], got %s"):format(name, lo, hi, given), 0)
    end
    return integer and math.tointeger(v) or v
  end
  return {
    help = opts["--help"], verify = opts["--verify"],
    slo = opts["--slo"] and assert(parse_slo(opts["--slo"])),
    profile = opts["--profile"], write = opts["--write"],
    success = number("--success", 0, 1),
    calls = number("--calls", 1, MAX_CALLS, true, 10000),
    top = number("--top", 1, 1000, true, 10),
    seed = number("--seed", 0, 2 ^ 53, true, 1),
    duration = number("--duration", 1, 3600, false, 20),
    rate = number("--rate", 1, 10000, false, 50),
  }
end

--- The profile ------------------------------------------------------------

local Z95 = 1.6449 -- the standard normal's 95th percentile

-- `resilua load --json` -> a profile: a lognormal through its p50 and p95,
-- and what failed as faults (statuses as answers, timeouts as hangs).
local function from_load(j)
  local lat = type(j.latency_ok_ms) == "table" and j.latency_ok_ms
              or type(j.latency_ms) == "table" and j.latency_ms or {}
  local p50, p95 = tonumber(lat.p50), tonumber(lat.p95)
  local calls = tonumber(j.calls)
  if not p50 or not p95 or p50 <= 0 or p95 < p50 or not calls or calls < 1 then
    return nil, "a load --json needs calls and latency_ms.p50 <= p95"
  end
  local faults = {}
  for status, n in pairs(type(j.statuses) == "table" and j.statuses or {}) do
    local s = math.tointeger(tonumber(status))
    if s and s >= 400 and s <= 599 and tonumber(n) then
      faults[#faults + 1] = { p = tonumber(n) / calls, status = s }
    end
  end
  local errors = type(j.errors) == "table" and j.errors or {}
  if tonumber(errors.timeout) then faults[#faults + 1] = { p = errors.timeout / calls, action = "hang" } end
  if tonumber(errors.reset) then faults[#faults + 1] = { p = errors.reset / calls, action = "reset" } end
  table.sort(faults, function(a, b) return (a.status or 0) < (b.status or 0) end)
  return { service_ms = { dist = "lognormal", median = p50, sigma = math.log(p95 / p50) / Z95 },
           faults = faults }
end

-- The lines of f (starting with the bytes in head), each at most
-- MAX_LOG_LINE_BYTES: a longer one comes as false, without being held.
local function log_lines(f, head)
  local buf, pos, skipping = head, 1, false
  return function()
    while true do
      local nl = buf:find("\n", pos, true)
      if nl then
        local line = buf:sub(pos, nl - 1)
        pos = nl + 1
        if skipping then skipping = false; return false end
        return line
      end
      local rest = buf:sub(pos)
      if #rest > MAX_LOG_LINE_BYTES then skipping, rest = true, "" end
      local chunk = f:read(65536)
      if not chunk then
        buf, pos = "", 1
        if skipping then skipping = false; return false end
        return rest ~= "" and rest or nil
      end
      buf, pos = rest .. chunk, 1
    end
  end
end

local function quantile(sorted, q)
  return math.max(sorted[math.max(1, math.ceil(q * #sorted))], MIN_LATENCY_MS)
end

-- An event log (contract 3) -> the summary from_load reads: every attempt
-- event's status or error class, and its latency (that of the answered
-- ones under 400 for the service time, when there are any).
local function from_event_log(f, head, path)
  local statuses, errors, ok_ms, all_ms = {}, {}, {}, {}
  local attempts, lines, malformed, capped = 0, 0, 0, false
  for line in log_lines(f, head) do
    if lines == MAX_LOG_LINES then capped = true; break end
    lines = lines + 1
    local okd, ev = false, nil
    if line then okd, ev = pcall(cjson.decode, line) end
    if not line or not okd or type(ev) ~= "table" then
      if not line or line:find("%S") then malformed = malformed + 1 end
    elseif ev.event == "attempt" then
      local ms = tonumber(ev.latency_ms)
      local status = math.tointeger(tonumber(ev.status))
      local class = type(ev.error) == "string" and ev.error or nil
      if not ms or ms ~= ms or ms < 0 or ms == math.huge or not (status or class) then
        malformed = malformed + 1
      else
        attempts = attempts + 1
        all_ms[#all_ms + 1] = ms
        if status then
          statuses[status] = (statuses[status] or 0) + 1
          if status < 400 then ok_ms[#ok_ms + 1] = ms end
        else
          errors[class] = (errors[class] or 0) + 1
        end
      end
    end
  end
  if attempts == 0 then
    return nil, ("%s: no usable attempt event in %d lines (%d malformed)"):format(path, lines, malformed)
  end
  table.sort(ok_ms)
  table.sort(all_ms)
  local summary = { calls = attempts, statuses = statuses, errors = errors,
                    latency_ms = { p50 = quantile(all_ms, 0.5), p95 = quantile(all_ms, 0.95) } }
  if #ok_ms > 0 then
    summary.latency_ok_ms = { p50 = quantile(ok_ms, 0.5), p95 = quantile(ok_ms, 0.95) }
  end
  local prof, err = from_load(summary)
  if not prof then return nil, path .. ": " .. err end
  prof.source = ("%d attempt events from %s (%d lines, %d malformed skipped%s)"):format(attempts,
    path, lines, malformed, capped and "; stopped at the line cap" or "")
  return prof
end

-- An event log when its first non-empty line is an object with "event".
local function is_event_log(head)
  local first = head:match("^%s*([^\r\n]+)")
  local ok, j = pcall(cjson.decode, first or "")
  return ok and type(j) == "table" and j.event ~= nil
end

-- A Lua table file or `resilua load --json`.
local function from_source(src, path)
  if src:match("^%s*{") then
    local ok, j = pcall(cjson.decode, src)
    if not ok or type(j) ~= "table" then return nil, path .. ": not JSON" end
    local prof, err = from_load(j)
    if not prof then return nil, path .. ": " .. err end
    return prof
  end
  -- A Lua profile is data: no globals, under the instruction limit.
  local chunk, cerr = load(src, "@" .. path, "t", {})
  if not chunk then return nil, cerr end
  local ok, t = core.pcall(1000000, chunk)
  if not ok or type(t) ~= "table" then
    return nil, path .. ": " .. (ok and "expected a table" or tostring(t))
  end
  return { service_ms = t.service_ms, faults = t.faults or {} }
end

local function load_profile(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, "--profile: " .. tostring(err) end
  local head = f:read(MAX_LOG_LINE_BYTES)
  local prof
  if not head then
    err = path .. ": cannot read (a directory? empty?)"
  elseif is_event_log(head) then
    prof, err = from_event_log(f, head, path)
  else
    local src = head .. (f:read(MAX_PROFILE_BYTES + 1 - #head) or "")
    if #src > MAX_PROFILE_BYTES then err = path .. ": over 16 MiB"
    else prof, err = from_source(src, path) end
  end
  f:close()
  if not prof then return nil, "--profile: " .. err end
  -- resilua.upstream checks both (and says what is wrong).
  local ok, uerr = pcall(upstream.new, { service_ms = prof.service_ms, faults = prof.faults })
  if not ok then return nil, "--profile: " .. tostring(uerr) end
  return prof
end

--- Simulation ---------------------------------------------------------------

-- The outcome of one attempt, drawn from the profile: a fault (answered at
-- once; a hang takes the per-try timeout) or the service time.
local function drawer(prof, seed)
  local u = upstream.sampler({ dist = "uniform", min = 0, max = 1 }, seed)
  local service = upstream.sampler(prof.service_ms, seed + 1)
  return function()
    local x, acc = u(), 0
    local ms = service() -- one draw each, whatever the fault: streams stay aligned
    for _, f in ipairs(prof.faults) do
      acc = acc + f.p
      if x < acc then
        if f.action == "hang" then return { error = "timeout" } end
        if f.action then return { error = "reset", latency_ms = FAULT_LATENCY_MS } end
        return { status = f.status or 503, latency_ms = FAULT_LATENCY_MS }
      end
    end
    return { status = 200, latency_ms = ms }
  end
end

-- The calls every plan plays: n calls of `attempts` outcomes each (a plan
-- with fewer attempts uses the first ones), so plans differ only in what
-- they do with the same luck.
local function draw_calls(prof, n, attempts, seed)
  local draw = drawer(prof, seed)
  local calls = {}
  for i = 1, n do
    local c = {}
    for k = 1, attempts do c[k] = draw() end
    calls[i] = c
  end
  return calls
end

local function plan_policy(p)
  return { max_attempts = p.attempts, per_try_timeout_ms = p.per_try_ms, deadline_ms = p.deadline_ms,
           backoff = { base_ms = p.base_ms, max_ms = math.max(p.base_ms * 8, 1),
                       jitter = p.base_ms > 0 and "full" or "none" },
           retry_on = { status = { 429, 500, 502, 503, 504 },
                        errors = { "timeout", "connect", "reset", "dns" } },
           hedge = p.hedge_ms and { after_ms = p.hedge_ms, max = 2 } or false,
           breaker = false, budget = false }
end

-- Plays the plan over the calls; its predicted figures.
local function simulate(p, calls)
  local pol = assert(policy.define(plan_policy(p), "plan", "plan"))
  local r = core.play(pol.core, calls, { events = false })
  local h, ok, attempts = core.hist(), 0, 0
  for _, c in ipairs(r.calls) do
    h:record(c.elapsed_ms)
    if c.outcome == "ok" then ok = ok + 1 end
    attempts = attempts + #c.sent
  end
  return { success = ok / #calls, p50 = h:percentile(50), p95 = h:percentile(95),
           p99 = h:percentile(99), amplification = attempts / #calls }
end

-- The candidates: per-try timeouts at quantiles of the service time (and
-- the SLO's bound), 1 to 4 attempts, three backoffs or a hedge at the
-- service time's p90 (GET: idempotent), three deadlines.
local function candidates(prof, slo)
  local s = upstream.sampler(prof.service_ms, 7)
  local sample = {}
  for i = 1, 2000 do sample[i] = s() end
  table.sort(sample)
  local per_try = {}
  local seen = {}
  -- Rounded up: a timeout a hair under the quantile would cut a tight
  -- distribution's calls by the thousand.
  for _, q in ipairs({ 0.75, 0.9, 0.95, 0.99 }) do
    local v = math.max(1, math.ceil(sample[math.floor(q * #sample)]))
    v = math.min(v, slo.ms)
    if not seen[v] then per_try[#per_try + 1], seen[v] = v, true end
  end
  local p90 = math.max(1, math.ceil(sample[math.floor(0.9 * #sample)]))
  local list = {}
  for _, t in ipairs(per_try) do
    for attempts = 1, 4 do
      local waits = attempts == 1 and { { 0 } } or { { 0 }, { 25 }, { 100 } }
      if p90 < t then waits[#waits + 1] = { 0, p90 } end
      for _, w in ipairs(waits) do
        for _, deadline in ipairs({ slo.ms, 1.5 * slo.ms, 2 * slo.ms }) do
          if deadline >= t then
            list[#list + 1] = { per_try_ms = t, attempts = attempts, base_ms = w[1],
                                hedge_ms = w[2], deadline_ms = deadline }
          end
        end
      end
    end
  end
  return list
end

local function meets(f, o)
  local v = f["p" .. o.slo.p] or f.p95
  return v < o.slo.ms and (not o.success or f.success >= o.success)
end

local function describe(p)
  return ("%d x %g ms, %s, deadline %g ms"):format(p.attempts, p.per_try_ms,
    p.hedge_ms and ("hedge at %g ms"):format(p.hedge_ms) or ("backoff %g ms"):format(p.base_ms),
    p.deadline_ms)
end

--- Output -----------------------------------------------------------------------

-- What the plans were searched against: the fit, and the faults in %.
local function describe_profile(prof)
  local d = prof.service_ms
  local faults = {}
  for _, f in ipairs(prof.faults) do
    faults[#faults + 1] = ("%s %.2f %%"):format(f.status or f.action, 100 * f.p)
  end
  return ("profile: %s%s; faults: %s\n"):format(
    d.dist == "lognormal" and ("lognormal median %.2f ms sigma %.3f"):format(d.median, d.sigma)
      or tostring(d.dist),
    prof.source and ("; fitted to " .. prof.source) or "",
    #faults > 0 and table.concat(faults, ", ") or "none")
end

local function write_policy(path, p, f, slo)
  local src = ([[-- Written by `resilua plan` for p%d < %g ms: predicted success %.2f %%,
-- p95 %.0f ms, p99 %.0f ms, %.2f attempts a call (no breaker or budget were
-- simulated; add them for an outage).
return {
  max_attempts = %d,
  per_try_timeout_ms = %g,
  deadline_ms = %g,
  backoff = { base_ms = %g, max_ms = %g, jitter = %q },
  retry_on = { status = { 429, 500, 502, 503, 504 }, errors = { "timeout", "connect", "reset", "dns" } },
  hedge = %s,
  breaker = false,
  budget = false,
}
]]):format(slo.p, slo.ms, 100 * f.success, f.p95, f.p99, f.amplification, p.attempts, p.per_try_ms,
           p.deadline_ms, p.base_ms, math.max(p.base_ms * 8, 1), p.base_ms > 0 and "full" or "none",
           p.hedge_ms and ("{ after_ms = %g, max = 2 }"):format(p.hedge_ms) or "false")
  local out, err = io.open(path, "wb")
  if not out then return nil, err end
  local ok, werr = out:write(src)
  out:close()
  if not ok then return nil, werr end
  return true
end

-- Runs the top two as a real experiment; returns their measured figures.
local function verify(prof, ranked, o)
  local experiment = require "resilua.experiment"
  local dir = os.tmpname()
  os.remove(dir)
  local saved = _G.arg
  _G.arg = { [0] = "resilua plan", "--quiet", "--out", dir }
  local policies = {}
  for i = 1, math.min(2, #ranked) do
    policies[i] = { name = ("plan %d"):format(i), policy = plan_policy(ranked[i].plan) }
  end
  local ok, code = pcall(experiment.run, {
    name = "plan-verify", duration = o.duration, seed = o.seed,
    upstream = { service_ms = prof.service_ms, faults = prof.faults },
    load = { rate = o.rate, poisson = true }, policies = policies,
    request = function() return { method = "GET", path = "/v1/predict" } end })
  _G.arg = saved
  if not ok or code ~= 0 then return nil, "--verify: the experiment failed: " .. tostring(code) end
  local f = io.open(dir .. "/report.json", "rb")
  if not f then return nil, "--verify: no report" end
  local rep = cjson.decode(f:read("a"))
  f:close()
  local measured = {}
  for i, p in ipairs(rep.policies) do
    local s = p.summary
    measured[i] = { success = s.success_rate, p95 = s.latency_ms.p95, p99 = s.latency_ms.p99,
                    amplification = s.amplification }
  end
  return measured
end

function M.main(args)
  local okp, o = pcall(parse_args, args)
  if not okp then
    io.stderr:write("resilua plan: ", tostring(o), "\n")
    return EXIT_USAGE
  end
  if o.help then
    io.stdout:write(M.USAGE)
    return EXIT_OK
  end
  if not o.slo or not o.profile then
    io.stderr:write("resilua plan: --slo and --profile are required (see resilua plan --help)\n")
    return EXIT_USAGE
  end
  local prof, perr = load_profile(o.profile)
  if not prof then
    io.stderr:write("resilua plan: ", perr, "\n")
    return EXIT_USAGE
  end
  io.stdout:write(describe_profile(prof))
  local calls = draw_calls(prof, o.calls, 4, o.seed)
  local ranked = {}
  for _, p in ipairs(candidates(prof, o.slo)) do
    local f = simulate(p, calls)
    ranked[#ranked + 1] = { plan = p, f = f, meets = meets(f, o) }
  end
  table.sort(ranked, function(a, b)
    if a.meets ~= b.meets then return a.meets end
    if a.f.success ~= b.f.success then return a.f.success > b.f.success end
    return a.f.p95 < b.f.p95
  end)
  local out = { ("%d plans x %d simulated calls; SLO p%d < %g ms%s\n"):format(#ranked, o.calls,
    o.slo.p, o.slo.ms, o.success and (" and success >= %g %%"):format(100 * o.success) or ""),
    ("  %-4s %-50s %9s %8s %8s %6s  %s\n"):format("rank", "plan", "success %", "p95 ms",
                                                  "p99 ms", "ampl.", "SLO") }
  for i = 1, math.min(o.top, #ranked) do
    local r = ranked[i]
    out[#out + 1] = ("  %-4d %-50s %9.2f %8.1f %8.1f %6.2f  %s\n"):format(i, describe(r.plan),
      100 * r.f.success, r.f.p95, r.f.p99, r.f.amplification, r.meets and "met" or "missed")
  end
  io.stdout:write(table.concat(out))
  if o.write then
    local okw, werr = write_policy(o.write, ranked[1].plan, ranked[1].f, o.slo)
    if not okw then
      io.stderr:write("resilua plan: --write: ", tostring(werr), "\n")
      return EXIT_USAGE
    end
    io.stdout:write("wrote ", o.write, "\n")
  end
  if o.verify then
    local measured, verr = verify(prof, ranked, o)
    if not measured then
      io.stderr:write("resilua plan: ", verr, "\n")
      return 1
    end
    io.stdout:write(("\npredicted vs measured (%g s at %g calls/s against resilua.upstream):\n")
      :format(o.duration, o.rate))
    io.stdout:write(("  %-6s %21s %21s %21s\n"):format("plan", "success %", "p95 ms", "p99 ms"))
    io.stdout:write(("  %-6s" .. (" %10s %10s"):rep(3) .. "\n"):format("", "predicted", "measured",
      "predicted", "measured", "predicted", "measured"))
    for i, m in ipairs(measured) do
      local f = ranked[i].f
      io.stdout:write(("  %-6d %10.2f %10.2f %10.1f %10.1f %10.1f %10.1f\n"):format(i,
        100 * f.success, 100 * m.success, f.p95, m.p95, f.p99, m.p99))
    end
  end
  return ranked[1].meets and EXIT_OK or EXIT_SLO
end

return M
