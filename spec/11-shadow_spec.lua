-- Shadow rollout: a client runs a candidate policy beside the live one
-- (`shadow = ...`); the live policy decides, the candidate is asked too,
-- and each disagreement is a `shadow` event.  `resilua check --shadow`
-- summarises a log of them.
local helpers = require "helpers"

-- The path picks the answer: /503, /429 (Retry-After: 0), /404, /ok.
local UPSTREAM = [[
return function(req)
  if req.path == "/503" then return { status = 503 } end
  if req.path == "/429" then return { status = 429, headers = { ["Retry-After"] = "0" } } end
  if req.path == "/404" then return { status = 404 } end
  return { status = 200, body = "ok" }
end]]

-- Both policies retry at once (no jitter to wait for) and differ only in
-- what they retry.
local function policy_src(name, statuses)
  return ("return { name = %q, max_attempts = 2, breaker = false, budget = false,\n"
          .. "  backoff = { base_ms = 1, max_ms = 1, jitter = 'none' },\n"
          .. "  retry_on = { status = { %s }, errors = {} } }\n"):format(name, statuses)
end

-- Calls each path once under live.lua with arg[3] in shadow (none when
-- absent), prints "path outcome attempts" lines; then, when arg[4] is
-- given, rewrites the candidate with it, waits for the reload, and calls
-- /503 again.
local SCRIPT = [[
local resilua = require "resilua"
local url, log, shadow, rewrite = arg[1], arg[2], arg[3], arg[4]
resilua.log(log)
local client = resilua.client{ policy = arg[0]:match("^(.*)/") .. "/live.lua", shadow = shadow }
local function call(path)
  local res, err = client:call{ url = url .. path }
  print(path, res and "ok" or err.outcome, (res or err).attempts)
end
for _, p in ipairs{ "/503", "/429", "/404", "/ok" } do call(p) end
if rewrite then
  local v1 = client:shadow_policy().version
  local f = assert(io.open(shadow .. ".tmp", "w"))
  f:write(rewrite)
  f:close()
  assert(os.rename(shadow .. ".tmp", shadow))
  for _ = 1, 500 do -- up to 10 s: liveness on a loaded machine
    if client:shadow_policy().version ~= v1 then break end
    resilua.sleep(0.02)
  end
  assert(client:shadow_policy().version ~= v1, "the shadow policy did not reload")
  call("/503")
end
]]

local function setup(candidate)
  local dir = helpers.tmpdir()
  helpers.write_file(dir .. "/live.lua", policy_src("live", "503, 429"))
  local cand = candidate and helpers.write_file(dir .. "/candidate.lua", candidate)
  return dir, helpers.write_file(dir .. "/run.lua", SCRIPT), cand
end

local function run(server, dir, script, shadow, rewrite, log_name)
  local log = dir .. "/" .. (log_name or "events.jsonl")
  local r = helpers.run({ helpers.bin, "run", script, server.url, log, shadow, rewrite })
  assert.equal(0, r.code, r.stderr)
  return r.stdout, helpers.events(log), log
end

describe("shadow rollout", function()
  local server
  before_each(function() server = helpers.start_server(UPSTREAM) end)
  after_each(function() server:stop() end)

  it("logs each disagreement with both policies' decisions, and nothing on agreement", function()
    local dir, script, cand = setup(policy_src("candidate", "429"))
    local out, events = run(server, dir, script, cand)
    assert.equal("/503\tgave_up\t2\n/429\tgave_up\t2\n/404\tfailed\t1\n/ok\tok\t1\n", out)

    local shadows = helpers.of_kind(events, "shadow")
    -- /503 attempt 1 is the only disagreement: live retries, the candidate
    -- would stop.  /503 attempt 2 (both stop at max_attempts), /429 (both
    -- retry at once, then stop) and /404 (both stop) agree.
    assert.equal(1, #shadows)
    local s = shadows[1]
    local live_v = helpers.of_kind(events, "policy")[1].version
    local first = helpers.of_kind(events, "attempt")[1]
    assert.equal(first.call_id, s.call_id)
    assert.equal(1, s.attempt)
    assert.equal(503, s.status)
    assert.equal("GET", s.method)
    assert.equal(server.url .. "/503", s.url)
    assert.same({ "live", live_v, "retry", "status 503 in retry_on" },
                { s.policy, s.policy_version, s.decision, s.reason })
    assert.same({ "candidate", "stop", 0, "status 503 not in retry_on" },
                { s.shadow_policy, s.shadow_decision, s.shadow_delay_ms, s.shadow_reason })
    assert.equal(1, s.delay_ms)
    assert.matches("^%x+$", s.shadow_version)
    assert.not_equal(live_v, s.shadow_version)
  end)

  it("logs a delay that differs beyond jitter, under the reloaded candidate", function()
    local dir, script, cand = setup(policy_src("candidate", "503, 429"))
    local slower = policy_src("candidate", "503, 429"):gsub("max_ms = 1", "max_ms = 5")
                                                      :gsub("base_ms = 1", "base_ms = 5")
    local out, events = run(server, dir, script, cand, slower)
    assert.matches("/503\tgave_up\t2\n$", out)
    local shadows = helpers.of_kind(events, "shadow")
    assert.equal(1, #shadows) -- identical until the edit; the same retry, 4 ms later, after
    local s = shadows[1]
    assert.same({ "retry", 1, "retry", 5 }, { s.decision, s.delay_ms, s.shadow_decision, s.shadow_delay_ms })
    local loads = helpers.of_kind(events, "policy")
    assert.equal(loads[#loads].version, s.shadow_version)
    assert.is_true(loads[#loads].ok)
  end)

  it("a failing candidate changes no outcome and is logged as an error", function()
    local dir, script = setup()
    local base_out, base_events = run(server, dir, script, nil, nil, "base.jsonl")
    local cand = helpers.write_file(dir .. "/candidate.lua", [[
      return { name = "broken", decide = function(a)
        if a.status == 429 then while true do end end -- past the instruction limit
        error("boom")
      end }]])
    local out, events = run(server, dir, script, cand)
    assert.equal(base_out, out)
    local outcomes = function(evs)
      local t = {}
      for _, e in ipairs(helpers.of_kind(evs, "call")) do t[#t + 1] = e.outcome .. "/" .. e.attempts end
      return t
    end
    assert.same(outcomes(base_events), outcomes(events))
    local shadows = helpers.of_kind(events, "shadow")
    assert.equal(5, #shadows) -- every decided attempt: 503 ×2, 429 ×2, 404
    for _, s in ipairs(shadows) do
      assert.equal("error", s.shadow_decision)
      assert.matches("^policy error: ", s.shadow_reason)
    end
    assert.truthy(shadows[1].shadow_reason:find("candidate.lua:3: boom", 1, true))
  end)

  it("`resilua check --shadow` summarises a log", function()
    local dir, script, cand = setup(policy_src("candidate", "429"))
    local _, _, log = run(server, dir, script, cand)
    local r = helpers.run({ helpers.bin, "check", "--shadow", log })
    assert.equal(0, r.code, r.stderr)
    assert.matches("shadow: 1 disagreement in 5 decided attempts %(20%.0%%%); 6 attempts in all", r.stdout)
    assert.matches("by decision %(live %-> candidate%):\n  retry %-> stop +1  100%.0%%", r.stdout)
    assert.matches("by status/error:\n  HTTP 503 +1  100%.0%%", r.stdout)
    assert.matches("live %x+ vs candidate %x+ +1", r.stdout)

    local missing = helpers.run({ helpers.bin, "check", "--shadow", dir .. "/nope.jsonl" })
    assert.equal(2, missing.code)
    assert.matches("resilua check: %-%-shadow: ", missing.stderr)
  end)
end)
