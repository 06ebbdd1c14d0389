-- Policy modules (contract 1): loading, validation with file:line, the
-- sandbox, the instruction limit, and the built-in decisions.
local resilua = require "resilua"
local core = require "resilua.core"
local helpers = require "helpers"
local policy = resilua.policy

local dir = helpers.tmpdir()
local log = dir .. "/events.jsonl"
setup(function() resilua.log(log) end)
teardown(function() resilua.log("-") end)

local policy_file = helpers.policy_writer(dir)

local function decide(p, a) return core.decide(p.core, a) end

describe("policy loading", function()
  it("fills every missing field with the defaults of contract 1", function()
    local p = assert(policy.load(policy_file("empty", "return {}")))
    local t = p.table
    assert.equal("empty", p.name)
    assert.equal(4, t.max_attempts)
    assert.equal(2000, t.per_try_timeout_ms)
    assert.equal(1000, t.connect_timeout_ms)
    assert.equal(10000, t.deadline_ms)
    assert.same({ base_ms = 200, max_ms = 5000, jitter = "full" }, t.backoff)
    assert.same({ 429, 500, 502, 503, 504 }, t.retry_on.status)
    assert.same({ "connect", "reset", "dns", "refused_stream" }, t.retry_on.errors)
    assert.is_true(t.retry_on.refused)
    assert.same({ respect = true, max_ms = 30000 }, t.retry_after)
    assert.same({ header = "Idempotency-Key", methods = { "POST", "PATCH" } }, t.idempotency)
    assert.same({ kind = "rate", window = "time", window_ms = 2000, minimum_calls = 20,
                  failure_rate = 0.5, slow_call_rate = 1.0, open_ms = 50, half_open = 1,
                  key = "host" }, t.breaker)
    assert.same({ kind = "ratio", ratio = 0.2, ttl_ms = 10000, min_per_s = 10 }, t.budget)
    assert.is_false(t.throttle)
  end)

  it("ships policies/default.lua with exactly the defaults", function()
    local p = assert(policy.load("default", { "policies" }))
    for k, v in pairs(policy.DEFAULTS) do assert.same(v, p.table[k], k) end
  end)

  it("merges a section with the defaults and keeps what the policy set", function()
    local p = assert(policy.load(policy_file("partial",
      "return { max_attempts = 2, backoff = { base_ms = 50 }, breaker = false }")))
    assert.equal(2, p.table.max_attempts)
    assert.same({ base_ms = 50, max_ms = 5000, jitter = "full" }, p.table.backoff)
    assert.is_false(p.table.breaker)
  end)

  it("names the policy version with a short hash of its source", function()
    local a = assert(policy.load(policy_file("v1", "return { max_attempts = 2 }")))
    local b = assert(policy.load(policy_file("v2", "return { max_attempts = 3 }")))
    assert.matches("^%x%x%x%x%x%x%x%x%x%x%x%x$", a.version)
    assert.not_equal(a.version, b.version)
  end)

  it("logs a policy event for every load, good or bad", function()
    local good = assert(policy.load(policy_file("logged", "return {}")))
    local bad_path = policy_file("notlogged", "return {\n  max_attempts = 'x' }")
    assert.is_nil(policy.load(bad_path))
    local events = helpers.of_kind(helpers.events(log), "policy")
    local ok_event, bad_event = events[#events - 1], events[#events]
    assert.same({ name = "logged", path = good.path, version = good.version, ok = true },
      { name = ok_event.name, path = ok_event.path, version = ok_event.version, ok = ok_event.ok })
    assert.is_false(bad_event.ok)
    assert.truthy(bad_event.error:find(bad_path .. ":2: max_attempts must be an integer", 1, true))
  end)

  it("finds a policy by name on the policy path", function()
    policy_file("onpath", "return { max_attempts = 1 }")
    local p = assert(policy.load("onpath", { dir }))
    assert.equal(1, p.table.max_attempts)
    local none, err = policy.load("nosuch", { dir })
    assert.is_nil(none)
    assert.matches("policy 'nosuch' not found", err)
  end)
end)

describe("bad policies", function()
  local cases = {
    { "syntax error", "return {\n  max_attempts = = 3 }", ":2:" },
    { "runtime error while loading", "local x = nil\nreturn x.y", ":2: attempt to index" },
    { "not a table", "return 42", "must return a table" },
    { "wrong type", "return {\n  deadline_ms = 'soon' }", ":2: deadline_ms must be a number" },
    { "out of range", "return {\n\n  max_attempts = 0 }", ":3: max_attempts must be in %[1, 100%]" },
    { "unknown jitter", "return { backoff = {\n jitter = 'wild' } }", ":2: backoff.jitter must be one of" },
    { "unknown field", "return {\n  max_atempts = 3 }", ":2: unknown field 'max_atempts' %(did you mean 'max_attempts'%?%)" },
    { "unknown error class", "return { retry_on = { errors = { 'oops' } } }", "retry_on.errors%[1%]" },
    { "bad status", "return { retry_on = { status = { 700 } } }", "retry_on.status%[1%] must be in" },
    { "endless loop at load", "while true do end", "instruction limit exceeded" },
    { "global assignment", "x = 1\nreturn {}", ":1: assignment to undeclared global 'x'" },
    { "io is not there", "return { n = io.open('/etc/passwd') }", "undeclared global 'io'" },
    { "os.execute is not there", "os.execute('true') return {}", "attempt to call a nil value %(field 'execute'%)" },
    { "load is not there", "return load('return 1')()", "undeclared global 'load'" },
    { "debug is not there", "return debug.getinfo(1)", "undeclared global 'debug'" },
    { "require of a system module", "local os = require 'os' return {}", "module 'os' is not allowed" },
  }
  for i, case in ipairs(cases) do
    it("reports " .. case[1] .. " with file and line", function()
      local path = policy_file("bad" .. i, case[2])
      local p, err = policy.load(path)
      assert.is_nil(p)
      assert.matches(path, err, 1, true)
      assert.matches(case[3], err)
    end)
  end

  it("lets a policy require resilua.backoff", function()
    local p = assert(policy.load(policy_file("usesbackoff", [[
      local backoff = require "resilua.backoff"
      return { decide = function(a)
        return { retry = true, delay_ms = backoff.none(100, a.attempt, 1000), reason = "mine" }
      end }]])))
    local d = decide(p, { attempt = 3, status = 503 })
    assert.same({ retry = true, delay_ms = 400, reason = "mine", exhausted = false }, d)
  end)
end)

describe("decide", function()
  it("stops a runaway decide with an error naming file:line, quickly", function()
    local path = policy_file("spin", "return { decide = function(a)\n  while true do end\nend }")
    local p = assert(policy.load(path))
    local t0 = core.now_ms()
    local ok, err = pcall(decide, p, { status = 503 })
    assert.is_false(ok)
    assert.matches(path .. ":2: instruction limit exceeded", err, 1, true)
    assert.is_true(core.now_ms() - t0 < 1000) -- generous: the limit is ~1e6 instructions
  end)

  it("cannot swallow the instruction limit with pcall", function()
    local p = assert(policy.load(policy_file("swallow", [[
      return { decide = function(a)
        for _ = 1, 100 do pcall(function() while true do end end) end
        return { retry = true }
      end }]])))
    local ok, err = pcall(decide, p, { status = 503 })
    assert.is_false(ok)
    assert.matches("instruction limit exceeded", err)
  end)

  local bad_returns = {
    { "a string", "return 'yes'", "decide returned a string" },
    { "retry not boolean", "return { retry = 1 }", "decision.retry must be true or false" },
    { "negative delay", "return { retry = true, delay_ms = -5 }", "decision.delay_ms must be" },
    { "unknown field", "return { retry = true, dealy_ms = 5 }", "unknown field 'dealy_ms'" },
    { "reason not string", "return { retry = false, reason = {} }", "decision.reason must be a string" },
  }
  for i, case in ipairs(bad_returns) do
    it("rejects a decision that is " .. case[1] .. ", naming where decide is", function()
      local path = policy_file("ret" .. i, "return {\n decide = function(a) " .. case[2] .. " end }")
      local p = assert(policy.load(path))
      local ok, err = pcall(decide, p, { status = 503 })
      assert.is_false(ok)
      assert.matches(path .. ":2: ", err, 1, true)
      assert.matches(case[3], err, 1, true)
    end)
  end

  it("gets every field of contract 1 in a", function()
    local p = assert(policy.load(policy_file("seer", [[
      return { decide = function(a)
        local keys = {}
        for k in pairs(a) do keys[#keys + 1] = k end
        table.sort(keys)
        return { retry = false, reason = table.concat(keys, ",") .. "|" .. a.headers["x-test"]
                 .. "|" .. a.policy.name .. "|" .. a.breaker .. "|" .. ("%g"):format(a.budget) }
      end }]])))
    local seen = decide(p, { attempt = 2, method = "POST", url = "http://x/", status = 503,
                             retry_after_ms = 1000, headers = { ["x-test"] = "yes" },
                             latency_ms = 5, elapsed_ms = 10, remaining_ms = 90,
                             budget = 7, breaker = "closed" }).reason
    assert.equal("attempt,breaker,budget,elapsed_ms,headers,latency_ms,max_attempts,method,"
                 .. "policy,prev_delay_ms,remaining_ms,retry_after_ms,server,status,url|yes|seer|closed|7", seen)
  end)
end)

describe("built-in decisions", function()
  local p = assert(policy.load(policy_file("none", [[
    return { backoff = { base_ms = 100, max_ms = 1000, jitter = "none" } }]])))
  local full = assert(policy.load("default", { "policies" }))

  local cases = {
    { { status = 503 }, true }, { { status = 500 }, true }, { { status = 502 }, true },
    { { status = 504 }, true }, { { status = 429 }, true },
    { { status = 400 }, false }, { { status = 401 }, false }, { { status = 404 }, false },
    { { status = 409 }, false }, { { status = 501 }, false },
    { { error = "timeout" }, false }, { { error = "connect" }, true }, { { error = "reset" }, true },
    { { error = "dns" }, true }, { { error = "tls" }, false }, { { error = "protocol" }, false },
    { { error = "too_large" }, false },
  }
  for _, case in ipairs(cases) do
    local a, retry = case[1], case[2]
    it(("%s %s"):format(retry and "retries" or "does not retry", a.status or a.error), function()
      local d = decide(full, a)
      assert.equal(retry, d.retry)
      assert.matches(retry and " in retry_on" or "not in retry_on", d.reason)
    end)
  end

  it("doubles the backoff per attempt up to max_ms (jitter none)", function()
    local delays = {}
    for n = 1, 6 do delays[n] = decide(p, { attempt = n, status = 503 }).delay_ms end
    assert.same({ 100, 200, 400, 800, 1000, 1000 }, delays)
  end)

  it("jitters: full jitter stays in [0, base * 2^(n-1)] and varies", function()
    local seen = {}
    for n = 1, 4 do
      local cap = 200 * 2 ^ (n - 1)
      for _ = 1, 50 do
        local d = decide(full, { attempt = n, status = 503 }).delay_ms
        assert.is_true(d >= 0 and d <= cap, ("%f outside [0, %f]"):format(d, cap))
        seen[d] = true
      end
    end
    local distinct = 0
    for _ in pairs(seen) do distinct = distinct + 1 end
    assert.is_true(distinct > 150)
  end)

  it("repeats the same delays for the same seed", function()
    local function run(seed)
      core.seed(seed)
      local out = {}
      for n = 1, 5 do out[n] = decide(full, { attempt = n, status = 503 }).delay_ms end
      return out
    end
    assert.same(run(42), run(42))
    assert.not_same(run(42), run(43))
  end)

  it("computes equal and decorrelated jitter within their bounds", function()
    local backoff = require "resilua.backoff"
    for _ = 1, 100 do
      local e = backoff.equal(100, 3, 10000)
      assert.is_true(e >= 200 and e <= 400)
      local d = backoff.decorrelated(100, 300, 10000)
      assert.is_true(d >= 100 and d <= 900)
      assert.is_true(backoff.decorrelated(100, 5000, 1000) <= 1000)
    end
  end)
end)

describe("resilua check", function()
  it("passes the shipped default policy with its self-tests", function()
    local r = helpers.run({ helpers.bin, "check", "default" })
    assert.equal(0, r.code)
    assert.matches("^ok +default +policies/default.lua +version %x+, 5 self%-tests passed", r.stdout)
  end)

  it("fails a policy whose self-test fails, and a policy that does not load", function()
    local failing = policy_file("selftest", [[
      return { tests = { { attempt = { status = 404 }, expect = { retry = true } } } }]])
    local broken = policy_file("broken", "return {")
    local r = helpers.run({ helpers.bin, "check", failing, broken })
    assert.equal(2, r.code)
    assert.truthy(r.stdout:find("FAIL  " .. failing .. "  test 1: retry = false, expected true", 1, true))
    assert.truthy(r.stdout:find("FAIL  " .. broken .. "  " .. broken .. ":1:", 1, true))
  end)
end)
