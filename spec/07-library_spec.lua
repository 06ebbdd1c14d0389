--- The shipped policy library (policies/): every policy passes `resilua
-- check`; their decisions, table-driven through core.decide; the AWS retry
-- quota (budget kind "quota") end to end against a real `resilua serve`;
-- and resilua.policy.extend.
local resilua = require "resilua"
local core = require "resilua.core"
local helpers = require "helpers"
local policy = resilua.policy

local SHIPPED = { "default", "no-retry", "grpc", "envoy", "aws-standard" }

local dir = helpers.tmpdir()
local log = dir .. "/events.jsonl"
setup(function() resilua.log(log) end)
teardown(function() resilua.log("-") end)

local policy_file = helpers.policy_writer(dir)

local function load(name) return assert(policy.load(name, { dir, "policies" })) end

describe("the shipped policies", function()
  it("all pass `resilua check`, self-tests included", function()
    local cmd = { helpers.bin, "check" }
    for _, name in ipairs(SHIPPED) do cmd[#cmd + 1] = name end
    local r = helpers.run(cmd)
    assert.equal(0, r.code, r.stdout .. r.stderr)
    for _, name in ipairs(SHIPPED) do
      local n = r.stdout:match("ok +" .. name:gsub("%-", "%%-") .. " +%S+ +version %x+, (%d+) self%-test")
      assert.truthy(n, name .. ": " .. r.stdout)
      assert.is_true(tonumber(n) >= 4, name .. " has too few self-tests")
    end
  end)

  it("each says at its top where its semantics come from", function()
    for _, name in ipairs(SHIPPED) do
      local src = helpers.read_file("policies/" .. name .. ".lua")
      assert.matches("^%-%- " .. name:gsub("%-", "%%-") .. " — ", src)
    end
  end)

  -- policy, attempt, expected decision (delay_ms: an exact value or {lo, hi}).
  local CASES = {
    { "no-retry", { attempt = 1, status = 503 }, { retry = false } },
    { "no-retry", { attempt = 1, error = "timeout" }, { retry = false } },
    { "no-retry", { attempt = 1, error = "reset" }, { retry = false } },

    { "grpc", { attempt = 1, status = 503 }, { retry = true, delay_ms = { 0, 100 } } },
    { "grpc", { attempt = 2, status = 503 }, { retry = true, delay_ms = { 0, 200 } } },
    { "grpc", { attempt = 4, status = 429 }, { retry = true, delay_ms = { 0, 800 } } },
    { "grpc", { attempt = 9, status = 503 }, { retry = true, delay_ms = { 0, 1000 } } },
    { "grpc", { attempt = 1, error = "reset" }, { retry = true } },
    { "grpc", { attempt = 1, error = "timeout" }, { retry = false } },
    { "grpc", { attempt = 1, status = 500 }, { retry = false } },
    { "grpc", { attempt = 1, status = 404 }, { retry = false } },
    { "grpc", { attempt = 3, status = 503, headers = { ["grpc-retry-pushback-ms"] = "1500" } },
      { retry = true, delay_ms = 1500 } },
    { "grpc", { attempt = 1, status = 503, headers = { ["grpc-retry-pushback-ms"] = "0" } },
      { retry = true, delay_ms = 0 } },
    { "grpc", { attempt = 1, status = 503, headers = { ["grpc-retry-pushback-ms"] = "-5" } },
      { retry = false } },
    { "grpc", { attempt = 1, status = 503, headers = { ["grpc-retry-pushback-ms"] = "1.5" } },
      { retry = false } },
    { "grpc", { attempt = 1, status = 503, headers = { ["grpc-retry-pushback-ms"] = "" } },
      { retry = false } },

    { "envoy", { attempt = 1, status = 500 }, { retry = true, delay_ms = { 0, 25 } } },
    { "envoy", { attempt = 2, status = 504 }, { retry = true, delay_ms = { 0, 75 } } },
    { "envoy", { attempt = 3, status = 503 }, { retry = true, delay_ms = { 0, 175 } } },
    { "envoy", { attempt = 8, status = 503 }, { retry = true, delay_ms = { 0, 250 } } },
    { "envoy", { attempt = 1, status = 409 }, { retry = true } },
    { "envoy", { attempt = 1, status = 429 }, { retry = true } },
    { "envoy", { attempt = 1, status = 408 }, { retry = false } },
    { "envoy", { attempt = 1, error = "connect" }, { retry = true } },
    { "envoy", { attempt = 1, error = "timeout" }, { retry = true } },
    { "envoy", { attempt = 1, error = "tls" }, { retry = false } },
    { "envoy", { attempt = 1, status = 429, retry_after_ms = 1000 }, { retry = true, delay_ms = 1000 } },
    { "envoy", { attempt = 1, status = 429, headers = { ["x-ratelimit-reset"] = "2" } },
      { retry = true, delay_ms = 2000 } },
    { "envoy", { attempt = 1, status = 429, retry_after_ms = 400000,
                 headers = { ["x-ratelimit-reset"] = "2" } }, { retry = true, delay_ms = 2000 } },
    { "envoy", { attempt = 1, status = 404, retry_after_ms = 1000 }, { retry = false } },

    { "aws-standard", { attempt = 1, status = 503 }, { retry = true, delay_ms = { 0, 1000 } } },
    { "aws-standard", { attempt = 3, status = 500 }, { retry = true, delay_ms = { 0, 4000 } } },
    { "aws-standard", { attempt = 12, status = 502 }, { retry = true, delay_ms = { 0, 20000 } } },
    { "aws-standard", { attempt = 1, status = 429 }, { retry = true } },
    { "aws-standard", { attempt = 1, error = "timeout" }, { retry = true } },
    { "aws-standard", { attempt = 1, status = 403 }, { retry = false } },
  }

  for _, case in ipairs(CASES) do
    local name, a, want = case[1], case[2], case[3]
    local what = ("%s: %s"):format(name, a.status and ("status " .. a.status) or a.error)
    it(("%s (attempt %d) -> %s"):format(what, a.attempt, want.retry and "retry" or "stop"), function()
      local p = load(name)
      for _ = 1, 20 do -- jitter: many draws must all land in range
        local d = core.decide(p.core, a)
        assert.equal(want.retry, d.retry, d.reason)
        if type(want.delay_ms) == "table" then
          assert.is_true(d.delay_ms >= want.delay_ms[1] and d.delay_ms <= want.delay_ms[2],
                         ("delay %s not in [%s, %s]"):format(d.delay_ms, want.delay_ms[1], want.delay_ms[2]))
        elseif want.delay_ms then
          assert.equal(want.delay_ms, d.delay_ms)
        end
      end
    end)
  end

  -- The same policy, whole calls played through the core's call machine on
  -- a virtual clock (resilua.testing): what a team's own spec can do.
  describe("grpc, played with resilua.testing", function()
    local testing = require "resilua.testing"

    it("waits exactly the pushback, then retries", function()
      local r = testing.play("grpc", {
        { status = 503, headers = { ["grpc-retry-pushback-ms"] = "1500" } }, { status = 200 } })
      assert.equal("ok", r.outcome)
      assert.equal(1500, r.attempts[1].delay_ms)
      assert.equal(1510, r.attempts[2].t_ms)
    end)

    it("stops at a negative pushback, and on DEADLINE_EXCEEDED", function()
      local r = testing.play("grpc", { { status = 503, headers = { ["grpc-retry-pushback-ms"] = "-1" } } })
      assert.equal("failed", r.outcome)
      assert.equal(1, #r.attempts)
      assert.matches("pushback", r.attempts[1].reason)
      -- grpc's per-try timeout is its deadline: the timeout is the
      -- deadline's, so the call ends with outcome deadline, not retried
      r = testing.play("grpc", { { error = "timeout" } })
      assert.same({ "deadline", 1, "stop" }, { r.outcome, #r.attempts, r.attempts[1].decision })
    end)

    it("backs off exponentially up to maxAttempts, then throttles the next call", function()
      local r = testing.play_calls("grpc", { { { status = 503 } }, { { status = 503 } } })
      local first = r.calls[1]
      assert.equal("gave_up", first.outcome)
      assert.equal(4, #first.attempts)
      for i, cap in ipairs({ 100, 200, 400 }) do
        local d = first.attempts[i].delay_ms
        assert.is_true(d >= 0 and d <= cap, ("retry %d: %s not in [0, %d]"):format(i, d, cap))
      end
      -- A6 throttling: 4 failures leave 6 of 10 tokens; one more leaves 5,
      -- and a retry needs more than half.
      assert.equal("budget", r.calls[2].outcome)
    end)
  end)

  it("have the shapes their sources give", function()
    local t = load("no-retry").table
    assert.equal(1, t.max_attempts)
    assert.is_false(t.breaker)
    assert.is_false(t.budget)
    t = load("grpc").table
    assert.is_true(t.max_attempts <= 5)
    assert.same({ kind = "bucket", max_tokens = 10, token_ratio = 0.1 }, t.budget)
    t = load("envoy").table
    assert.equal(2, t.max_attempts) -- num_retries 1
    t = load("aws-standard").table
    assert.equal(3, t.max_attempts)
    assert.same({ base_ms = 1000, max_ms = 20000, jitter = "full" }, t.backoff)
    assert.same({ kind = "quota", max_tokens = 500, retry_cost = 5, timeout_cost = 10,
                  success_refund = 1 }, t.budget)
  end)
end)

describe("the retry quota (budget kind 'quota')", function()
  local server
  setup(function()
    server = helpers.start_server [[
      local seen = {}
      return function(req)
        if req.path == "/ok" then return { status = 200, body = "fine" } end
        local first = not seen[req.path]
        seen[req.path] = true
        if req.path:match("^/flaky/") then return { status = first and 503 or 200 } end
        if req.path:match("^/hang/") then return { status = 200, delay_ms = first and 2500 or 0 } end
        return { status = 503, body = "down" }
      end]]
  end)
  teardown(function() server:stop() end)

  local p = policy_file("quota", [[
    return require("resilua.policy").extend("aws-standard", {
      -- 1 s per try: an /ok or /down attempt that a loaded machine slowed
      -- past it would be a timeout and cost 10, not 5; /hang's first is 2.5 s
      max_attempts = 10, per_try_timeout_ms = 1000,
      backoff = { base_ms = 1, max_ms = 1, jitter = "none" },
      budget = { max_tokens = 20 } })]])

  it("takes 5 a retry, 10 after a timeout, refunds on success, refuses what it cannot pay", function()
    local client = resilua.client{ policy = p, name = "quota-math" }
    local url = server.url
    assert.same({ 20, 20 }, { client:budget() })
    -- 20 -> 15 -> 10 -> 5 -> 0, then the quota cannot pay the 5th retry.
    local _, err = client:call{ url = url .. "/down" }
    assert.equal("budget", err.outcome)
    assert.equal(5, err.attempts)
    assert.equal(0, (client:budget()))
    -- A success without a retry gives back 1.
    for _ = 1, 4 do assert(client:call{ url = url .. "/ok" }) end
    assert.equal(4, (client:budget()))
    -- 4 cannot pay a retry: the failure is final, and costs nothing.
    _, err = client:call{ url = url .. "/down" }
    assert.equal("budget", err.outcome)
    assert.equal(1, err.attempts)
    assert.equal(4, (client:budget()))
    local logged = helpers.of_kind(helpers.events(log), "attempt")
    assert.matches("^budget 4%.0/20 tokens", logged[#logged].reason)
    assert(client:call{ url = url .. "/ok" })
    assert.equal(5, (client:budget()))
    -- A retry that succeeds: 5 taken, the same 5 given back.
    local res = assert(client:call{ url = url .. "/flaky/a" })
    assert.equal(2, res.attempts)
    assert.equal(5, (client:budget()))
    -- After a timeout a retry costs 10: 5 cannot pay.
    _, err = client:call{ url = url .. "/hang/a" }
    assert.equal("budget", err.outcome)
    assert.equal("timeout", err.error)
    assert.equal(5, (client:budget()))
    -- Refill (capped at max_tokens), then a timeout retry: -10, +10.
    for _ = 1, 30 do assert(client:call{ url = url .. "/ok" }) end
    assert.equal(20, (client:budget()))
    res = assert(client:call{ url = url .. "/hang/b" })
    assert.equal(2, res.attempts)
    assert.equal(20, (client:budget()))
    -- A call that gives up refunds nothing: 2 attempts, one retry paid.
    local two = resilua.client{ policy = policy_file("quota2", [[
      return require("resilua.policy").extend("aws-standard", {
        max_attempts = 2, backoff = { base_ms = 1, max_ms = 1, jitter = "none" },
        budget = { max_tokens = 20 } })]]), name = "quota-gave-up" }
    _, err = two:call{ url = url .. "/down" }
    assert.equal("gave_up", err.outcome)
    assert.equal(15, (two:budget()))
  end)

  it("uses the AWS costs when the policy names only the kind", function()
    local client = resilua.client{ policy = policy_file("quota-defaults", [[
      return { max_attempts = 2, breaker = false, backoff = { base_ms = 1, jitter = "none" },
               budget = { kind = "quota", max_tokens = 50 } }]]), name = "quota-defaults" }
    client:call{ url = server.url .. "/down" }
    assert.equal(45, (client:budget()))
  end)

  it("is refused with a message when its costs are given to a token bucket", function()
    local p2, err = policy.load(policy_file("bucket-cost", [[
      return {
        budget = { max_tokens = 5, retry_cost = 2 },
      }]]))
    assert.is_nil(p2)
    assert.matches("bucket%-cost%.lua:2: budget%.retry_cost needs budget%.kind = \"quota\"", err)
    p2, err = policy.load(policy_file("bad-kind", "return { budget = { kind = 'bukket' } }"))
    assert.is_nil(p2)
    assert.matches("budget%.kind must be one of bucket, quota", err)
  end)
end)

describe("resilua.policy.extend", function()
  it("deep-merges overrides into a base from the policy path", function()
    local p = load(policy_file("derived", [[
      return require("resilua.policy").extend("default", {
        max_attempts = 3,
        backoff = { base_ms = 50 },
        retry_on = { status = { 503 } },
        breaker = false,
      })]]))
    local t = p.table
    assert.equal("derived", p.name) -- the base's name is not inherited
    assert.equal(3, t.max_attempts)
    assert.same({ base_ms = 50, max_ms = 5000, jitter = "full" }, t.backoff)
    assert.same({ 503 }, t.retry_on.status) -- a list replaces
    assert.same({ "connect", "reset", "dns", "refused_stream" }, t.retry_on.errors) -- a section merges
    assert.is_false(t.breaker)
    assert.is_nil(t.tests) -- the base's self-tests describe the base
    assert.is_false(core.decide(p.core, { attempt = 1, status = 429 }).retry)
    assert.is_true(core.decide(p.core, { attempt = 1, status = 503 }).retry)
  end)

  it("keeps the base's decide, which runs in the base's own sandbox", function()
    local p = load(policy_file("grpc-fast", [[
      return require("resilua.policy").extend("grpc", { max_attempts = 2, name = "grpc-fast" })]]))
    assert.equal("grpc-fast", p.name)
    assert.equal(2, p.table.max_attempts)
    local d = core.decide(p.core, { attempt = 1, status = 503,
                                    headers = { ["grpc-retry-pushback-ms"] = "-1" } })
    assert.is_false(d.retry)
    assert.matches("pushback", d.reason)
  end)

  it("extends a policy that itself extends another", function()
    policy_file("mid", [[return require("resilua.policy").extend("aws-standard", { max_attempts = 5 })]])
    local p = load(policy_file("top", [[return require("resilua.policy").extend("mid", { deadline_ms = 900 })]]))
    assert.equal(5, p.table.max_attempts)
    assert.equal(900, p.table.deadline_ms)
    assert.equal("quota", p.table.budget.kind)
  end)

  it("validates the result as usual, naming file:line", function()
    local path = policy_file("typo", [[
      return require("resilua.policy").extend("default", {
        max_atempts = 3,
      })]])
    local p, err = policy.load(path, { dir, "policies" })
    assert.is_nil(p)
    assert.matches("typo%.lua:2: unknown field 'max_atempts' %(did you mean 'max_attempts'%?%)", err)
  end)

  it("reports a missing base and a cycle instead of looping", function()
    local p, err = policy.load(policy_file("orphan",
      [[return require("resilua.policy").extend("no-such-policy", {})]]), { dir, "policies" })
    assert.is_nil(p)
    assert.matches("orphan%.lua:1: extend: base policy 'no%-such%-policy' not found", err)
    policy_file("ping", [[return require("resilua.policy").extend("pong", {})]])
    p, err = policy.load(policy_file("pong", [[return require("resilua.policy").extend("ping", {})]]),
                         { dir, "policies" })
    assert.is_nil(p)
    assert.matches("a cycle", err)
  end)
end)
