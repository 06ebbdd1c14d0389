--- gauntlet.lua — every kind of trouble in one run, and every shipped
-- policy against "no retry" through it (issue 11).
--
-- An inference upstream (30 workers, lognormal service times around 40 ms:
-- about 750 requests/s; a queue of 300) takes 150 calls/s (Poisson) and
-- goes through, one after another:
--   partial     a share of requests answered 503, the upstream otherwise healthy;
--   resets      a share of connections reset with no answer;
--   blip        half a second of 503 for everything;
--   slowdown    service times x4 (about 190 requests/s for 150 offered: a
--               long queue, and the slowest tries time out);
--   outage      a long full outage (503 for everything);
--   recovery    healthy again, to the end.
-- Healthy stretches separate the faults.  Each policy waits at most 1 s
-- per try (the only field the experiment sets); everything else is the
-- policy as shipped.  The standard the default must meet (docs/policies.md,
-- "Choosing a policy"): success >= no retry's (within 0.5 points) in every
-- phase and overall, >= 5 points better in partial failures, >= 99 % under
-- resets, amplification <= 1.1 in the outage, and after recovery a success
-- and a p95 at least as good as no retry's.
--
--   resilua run experiments/gauntlet.lua [--timing a|b] [--scale X]
--                                        [experiment options: --seed, --only, --out, ...]
-- --timing b runs another schedule (other durations, shares and order);
-- --scale X multiplies every time in it but the recovery's, which lasts
-- at least RECOVERY_MIN_S (0.5: a run about half as long);
-- --lanes mechanisms runs, instead of the shipped policies, the default
-- with one mechanism changed at a time (what each costs and buys).
local experiment = require "resilua.experiment"
local extend = require("resilua.policy").extend

local PER_TRY_MS = 1000
-- The recovery is judged on p95 too: it needs calls enough that the
-- second the breaker takes to re-admit is not 5 % of them.
local RECOVERY_MIN_S = 10

-- Two schedules, in seconds: { name, from, to, faults | latency }.
local TIMINGS = {
  a = { duration = 60, partial = 0.2, reset = 0.05, slow = 4, phases = {
    { "partial", 4, 12 }, { "resets", 15, 23 }, { "blip", 26, 26.5 },
    { "slowdown", 29, 33 }, { "outage", 37, 47 }, { "recovery", 47 } } },
  b = { duration = 50, partial = 0.3, reset = 0.1, slow = 3.5, phases = {
    { "blip", 3, 3.4 }, { "slowdown", 6, 9 }, { "partial", 12, 18 },
    { "resets", 21, 26 }, { "outage", 29, 35 }, { "recovery", 35 } } },
}

-- Our own options, taken out of arg before the experiment reads the rest.
local timing, scale, lanes = "a", 1, "shipped"
do
  local rest, i = {}, 1
  while arg and i <= #arg do
    local a = arg[i]
    if a == "--timing" then
      timing, i = arg[i + 1], i + 1
      if not TIMINGS[timing] then
        io.stderr:write("gauntlet: --timing: expected a or b\n")
        return 2
      end
    elseif a == "--lanes" then
      lanes, i = arg[i + 1], i + 1
      if lanes ~= "shipped" and lanes ~= "mechanisms" then
        io.stderr:write("gauntlet: --lanes: expected shipped or mechanisms\n")
        return 2
      end
    elseif a == "--scale" then
      scale, i = tonumber(arg[i + 1]), i + 1
      if not scale or scale <= 0 or scale > 10 then
        io.stderr:write("gauntlet: --scale: expected a factor in (0, 10]\n")
        return 2
      end
    else
      rest[#rest + 1] = a
    end
    i = i + 1
  end
  for k = #arg, 1, -1 do arg[k] = nil end
  for k, v in ipairs(rest) do arg[k] = v end
end

local T = TIMINGS[timing]
local duration = T.duration * scale
local phases = {}
for _, p in ipairs(T.phases) do
  local name, from, to = p[1], p[2] * scale, p[3] and p[3] * scale
  local ph = { name = name, from = from, to = to }
  if name == "partial" then
    ph.name = ("partial: %g %% 503"):format(100 * T.partial)
    ph.faults = { { p = T.partial, status = 503 } }
  elseif name == "resets" then
    ph.name = ("resets: %g %%"):format(100 * T.reset)
    ph.faults = { { p = T.reset, action = "reset" } }
  elseif name == "blip" then
    ph.name = ("blip: %g s of 503"):format(to - from)
    ph.faults = { { p = 1, status = 503 } }
  elseif name == "slowdown" then
    ph.name = ("slowdown: service x%g"):format(T.slow)
    ph.latency = T.slow
  elseif name == "outage" then
    ph.name = ("outage: %g s of 503"):format(to - from)
    ph.faults = { { p = 1, status = 503 } }
  elseif name == "recovery" then
    duration = math.max(duration, from + RECOVERY_MIN_S)
  end
  phases[#phases + 1] = ph
end

local function shipped(name, overrides)
  overrides = overrides or {}
  overrides.per_try_timeout_ms = PER_TRY_MS
  return extend(name, overrides)
end

local NO_RETRY = { name = "no retry", policy = extend("no-retry", {
  per_try_timeout_ms = PER_TRY_MS, deadline_ms = PER_TRY_MS }) }
local RETRY_ON = { status = { 429, 500, 502, 503, 504 }, errors = { "connect", "reset", "dns" } }

local LANES = {
  shipped = {
    NO_RETRY,
    { name = "default", policy = shipped("default") },
    { name = "grpc", policy = shipped("grpc") },
    { name = "envoy", policy = shipped("envoy") },
    { name = "aws-standard", policy = shipped("aws-standard") },
  },
  -- The default, one mechanism changed at a time.
  mechanisms = {
    NO_RETRY,
    { name = "default", policy = shipped("default") },
    { name = "+ timeouts retried", policy = shipped("default", {
        retry_on = { errors = { "timeout", "connect", "reset", "dns" } } }) },
    { name = "refused: fail fast", policy = shipped("default", {
        retry_on = { status = RETRY_ON.status, errors = RETRY_ON.errors, refused = false } }) },
    { name = "+ adaptive throttle", policy = shipped("default", {
        throttle = { kind = "adaptive", k = 2, window_ms = 2000 } }) },
    { name = "throttle, no breaker", policy = shipped("default", {
        breaker = false, throttle = { kind = "adaptive", k = 2, window_ms = 2000 } }) },
    { name = "old breaker+bucket", policy = shipped("default", {
        breaker = { failures = 5, open_ms = { 1000, 2000, 5000, 10000, 30000 } },
        budget = { max_tokens = 10, token_ratio = 0.1 } }) },
  },
}

return experiment.run{
  name = "gauntlet",
  description = "every shipped policy against no retry through partial 503s, resets, "
    .. "a blip, a slowdown, a long outage and the recovery",
  duration = duration,
  seed = 1,
  upstream = {
    workers = 30,
    service_ms = { dist = "lognormal", median = 40, sigma = 0.3 },
    queue = 300,
    phases = phases,
  },
  load = { rate = 150, poisson = true },
  policies = LANES[lanes],
}
