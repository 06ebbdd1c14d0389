--- resilua.testing — unit-test a policy without network or real time.
--
--   local testing = require "resilua.testing"
--   testing.decide("grpc", { attempt = 1, status = 503 })  --> { retry, delay_ms, reason }
--   local r = testing.play("default", { { status = 503 }, { status = 503 }, { status = 200 } })
--   -- r.outcome == "ok", r.attempts[2].delay_ms, r.elapsed_ms ...
--
-- `play` runs the core's real call state machine (breaker, budget, deadline,
-- per-try timeout, Retry-After and the other server hints) against canned
-- outcomes on a virtual clock: a 20 s Retry-After takes no real time.  The
-- play has its own loop, client (breakers and budget) and event log: the
-- runtime's are not touched, and nothing is written to the user's log.
-- Only the jitter PRNG is the runtime's, so resilua.seed(n) (or opts.seed)
-- makes delays exact.
local core = require "resilua.core"
local policy = require "resilua.policy"
local cjson = require("cjson").new()

local M = {}

local cache = {} -- name or file -> loaded policy, so a spec loads each once

--- A policy given as a name, a FILE.lua or a loaded policy (policy.load).
local function resolve(p, policy_path, level)
  if type(p) == "table" and p.core then return p end
  if type(p) ~= "string" then
    error("resilua.testing: expected a policy name, file or loaded policy", level + 1)
  end
  local key = p .. "\0" .. table.concat(policy_path or {}, "\0")
  if not cache[key] then
    local loaded, err = policy.load(p, policy_path and policy.path(policy_path))
    if not loaded then error("resilua.testing: " .. err, level + 1) end
    cache[key] = loaded
  end
  return cache[key]
end

--- The policy's decision for one attempt described by a table (contract 1's
-- `a`: attempt, status or error, headers, retry_after_ms, elapsed_ms, ...).
-- Returns { retry, delay_ms, reason, exhausted }.  opts.policy_path: folders.
function M.decide(p, attempt, opts)
  if type(attempt) ~= "table" then
    error("resilua.testing.decide: expected an attempt table", 2)
  end
  return core.decide(resolve(p, opts and opts.policy_path, 2).core, attempt)
end

local function events_of(text)
  local out = {}
  for line in text:gmatch("[^\n]+") do out[#out + 1] = cjson.decode(line) end
  return out
end

local function nonnull(v) if v ~= cjson.null then return v end end

-- One call's timeline: the scripted sender's view of each attempt (when
-- it went out, its latency) joined with the machine's `attempt` events
-- (its decision), in order.
local function timeline(call, attempt_events, breaker_events)
  local attempts, exhausted = {}, false
  for i, sent in ipairs(call.sent) do
    local e = attempt_events[i] or {}
    attempts[i] = {
      attempt = i, t_ms = sent.t_ms, status = sent.status, error = sent.error,
      latency_ms = sent.latency_ms, timeout_ms = sent.timeout_ms,
      decision = e.decision, delay_ms = e.delay_ms, reason = e.reason,
      breaker = nonnull(e.breaker), repeated = sent.repeated or nil,
    }
    exhausted = exhausted or sent.repeated
  end
  return {
    outcome = call.outcome, status = call.status, error = call.error,
    message = call.message, attempts = attempts, elapsed_ms = call.elapsed_ms,
    started_ms = call.started_ms, breaker = breaker_events,
    -- the outcomes ran out and the last one was repeated
    outcomes_exhausted = exhausted or nil,
  }
end

local function check_opts(opts, level)
  opts = opts or {}
  if type(opts) ~= "table" then error("resilua.testing: opts must be a table", level + 1) end
  return opts
end

--- Plays several calls, one after the other, on one client (shared
-- breakers and budget) and one virtual clock.  calls: a list of outcome
-- lists.  opts: gap_ms (virtual time between a call's end and the next
-- start; default 0), url, method, seed, policy_path.
-- Returns { calls = { timeline, ... }, elapsed_ms, events } where each
-- timeline is what `play` returns and events are the machine's events.
function M.play_calls(p, calls, opts)
  opts = check_opts(opts, 2)
  local loaded = resolve(p, opts.policy_path, 2)
  if type(calls) ~= "table" then error("resilua.testing.play_calls: expected a list of outcome lists", 2) end
  if opts.seed then core.seed(opts.seed) end
  local ok, r = pcall(core.play, loaded.core, calls,
                      { gap_ms = opts.gap_ms, url = opts.url, method = opts.method })
  if not ok then error("resilua.testing: " .. tostring(r), 2) end
  local events = events_of(r.events)
  local out, i, attempts, breakers = {}, 1, {}, {}
  for _, e in ipairs(events) do
    if e.event == "attempt" then
      attempts[#attempts + 1] = e
    elseif e.event == "breaker" then
      breakers[#breakers + 1] = { from = e.from, to = e.to, key = e.key }
    elseif e.event == "call" then
      out[i] = timeline(r.calls[i], attempts, breakers)
      i, attempts, breakers = i + 1, {}, {}
    end
  end
  local last = out[#out]
  return { calls = out, elapsed_ms = last.started_ms + last.elapsed_ms, events = events }
end

--- Plays one call: outcomes is a list like
--   { { status = 503, headers = { ["retry-after"] = "2" } },
--     { error = "timeout" }, { status = 200, latency_ms = 30 } }
-- (latency_ms defaults to 10; a timeout, or an answer slower than the
-- attempt's timeout, takes the per-try timeout or the time left; when the
-- list runs out its last entry repeats and the result says
-- outcomes_exhausted).  Returns { outcome, status | error, message,
-- elapsed_ms, attempts = { { attempt, t_ms, status | error, latency_ms,
-- timeout_ms, decision, delay_ms, reason, breaker }, ... }, breaker =
-- { transitions } }.
function M.play(p, outcomes, opts)
  opts = check_opts(opts, 2)
  if type(outcomes) ~= "table" then error("resilua.testing.play: expected a list of outcomes", 2) end
  local ok, r = pcall(M.play_calls, p, { outcomes }, opts)
  if not ok then error(r, 2) end
  return r.calls[1]
end

return M
