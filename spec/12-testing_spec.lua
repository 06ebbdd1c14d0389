-- resilua.testing: a policy's decisions (testing.decide) and whole call
-- timelines (testing.play, testing.play_calls) through the core's real
-- call state machine on a virtual clock: no network, no real waiting.
local resilua = require "resilua"
local core = require "resilua.core"
local testing = require "resilua.testing"
local helpers = require "helpers"

local dir = helpers.tmpdir()
local log = dir .. "/events.jsonl"
setup(function() resilua.log(log) end)
teardown(function() resilua.log("-") end)

local function policy_file(name, src)
  local path = dir .. "/" .. name .. ".lua"
  helpers.write_file(path, src)
  return path
end

local function near(want, got, what)
  assert.is_true(math.abs(want - got) < 0.01, ("%s: want %s, got %s"):format(what, want, got))
end

describe("testing.decide", function()
  it("takes a name, a file or a loaded policy", function()
    local file = policy_file("stubborn", "return { retry_on = { status = { 404 } } }")
    assert.is_true(testing.decide("default", { attempt = 1, status = 503 }).retry)
    assert.is_true(testing.decide(file, { attempt = 1, status = 404 }).retry)
    local p = assert(resilua.policy.load("no-retry"))
    assert.is_false(testing.decide(p, { attempt = 1, status = 503 }).retry)
  end)

  it("says what is wrong with a bad argument", function()
    assert.has_error(function() testing.decide("no-such-policy", { attempt = 1, status = 503 }) end)
    assert.has_error(function() testing.decide("default", 1) end)
  end)
end)

describe("testing.play", function()
  it("gives the default policy's timeline over 503, 503, 200", function()
    local r = testing.play("default", { { status = 503 }, { status = 503 }, { status = 200, latency_ms = 30 } },
                           { seed = 7 })
    assert.equal("ok", r.outcome)
    assert.equal(200, r.status)
    assert.equal(3, #r.attempts)
    local a1, a2, a3 = r.attempts[1], r.attempts[2], r.attempts[3]
    assert.same({ 1, 0, 503, 10, "retry" }, { a1.attempt, a1.t_ms, a1.status, a1.latency_ms, a1.decision })
    assert.is_true(a1.delay_ms >= 0 and a1.delay_ms <= 200, "full jitter from 200 ms")
    assert.equal("retry", a2.decision)
    assert.is_true(a2.delay_ms >= 0 and a2.delay_ms <= 400, "then up to 400 ms")
    assert.equal("ok", a3.decision)
    assert.equal(30, a3.latency_ms)
    -- each attempt starts when the previous one ended and its wait ran out
    near(a1.latency_ms + a1.delay_ms, a2.t_ms, "attempt 2 starts")
    near(a2.t_ms + a2.latency_ms + a2.delay_ms, a3.t_ms, "attempt 3 starts")
    near(a3.t_ms + 30, r.elapsed_ms, "elapsed")
    assert.is_nil(r.outcomes_exhausted)

    -- the same seed, the same timeline
    local again = testing.play("default", { { status = 503 }, { status = 503 }, { status = 200, latency_ms = 30 } },
                               { seed = 7 })
    assert.same(r, again)
    resilua.seed(7)
    assert.same(r, testing.play("default", { { status = 503 }, { status = 503 }, { status = 200, latency_ms = 30 } }))
  end)

  it("honours Retry-After on virtual time: 20 s take no real time", function()
    local file = policy_file("patient", "return { deadline_ms = 60000 }")
    local t0 = helpers.now()
    local r = testing.play(file, { { status = 503, headers = { ["Retry-After"] = "20" } }, { status = 200 } })
    assert.is_true(helpers.now() - t0 < 2, "a play must not wait in real time")
    assert.equal("ok", r.outcome)
    assert.equal(20000, r.attempts[1].delay_ms)
    assert.matches("retry%-after", r.attempts[1].reason)
    near(20010, r.attempts[2].t_ms, "attempt 2 starts after the Retry-After")
    near(20020, r.elapsed_ms, "elapsed")
  end)

  it("stops at a Retry-After the deadline cannot hold, and at the cap", function()
    local r = testing.play("default", { { status = 503, headers = { ["retry-after"] = "20" } } })
    assert.equal("deadline", r.outcome)
    assert.equal(1, #r.attempts)
    assert.equal("stop", r.attempts[1].decision)
    r = testing.play("default", { { status = 429, headers = { ["retry-after"] = "60" } } })
    assert.equal("gave_up", r.outcome)
    assert.matches("over the cap", r.attempts[1].reason)
  end)

  it("lets the deadline cut a timeline: the last try gets only the time left", function()
    local file = policy_file("short", [[
      return { deadline_ms = 3000, per_try_timeout_ms = 2000, breaker = false, budget = false,
               retry_on = { errors = { "timeout" } },
               backoff = { base_ms = 100, max_ms = 100, jitter = "none" } }]])
    local r = testing.play(file, { { error = "timeout" } })
    assert.equal("deadline", r.outcome)
    assert.equal("timeout", r.error)
    assert.is_true(r.outcomes_exhausted)
    assert.equal(2, #r.attempts)
    assert.same({ 2000, 2000, 100 }, { r.attempts[1].latency_ms, r.attempts[1].timeout_ms, r.attempts[1].delay_ms })
    near(2100, r.attempts[2].t_ms, "attempt 2 starts")
    near(900, r.attempts[2].timeout_ms, "attempt 2 gets what is left")
    near(3000, r.elapsed_ms, "the call ends at its deadline")
    -- an answer slower than the per-try timeout is a timeout
    r = testing.play(file, { { status = 200, latency_ms = 2500 }, { status = 200 } })
    assert.equal("timeout", r.attempts[1].error)
    assert.equal("ok", r.outcome)
  end)

  it("says which outcomes are not retried", function()
    local r = testing.play("default", { { status = 404 } })
    assert.equal("failed", r.outcome)
    assert.equal(1, #r.attempts)
    r = testing.play("no-retry", { { error = "reset" } })
    assert.equal("gave_up", r.outcome) -- its one attempt is all it has
    assert.equal("reset", r.attempts[1].error)
  end)

  it("rejects bad outcomes with the call and outcome they are in", function()
    assert.has_error(function() testing.play("default", {}) end)
    local ok, err = pcall(testing.play, "default", { { status = 503 }, { error = "nope" } })
    assert.is_false(ok)
    assert.matches("outcome 2", err)
    ok, err = pcall(testing.play, "default", { { status = 200, error = "timeout" } })
    assert.is_false(ok)
    assert.matches("exactly one of status and error", err)
  end)

  it("leaves the runtime alone: no events in its log, its loop idle", function()
    local before = #helpers.of_kind(helpers.events(log), "attempt")
    local alive = core.alive()
    testing.play("default", { { status = 503 }, { status = 200 } })
    assert.equal(before, #helpers.of_kind(helpers.events(log), "attempt"))
    assert.equal(alive, core.alive())
  end)
end)

describe("testing.play_calls", function()
  local all503 = { { status = 503 } }

  it("runs the retry budget dry across calls", function()
    -- gRFC A6: 10 tokens, a retry only while tokens > 5; every failed
    -- attempt costs one.
    local r = testing.play_calls(policy_file("bucket", [[
      return { breaker = false, budget = { max_tokens = 10, token_ratio = 0.1 } }]]),
      { all503, all503 })
    assert.equal("gave_up", r.calls[1].outcome)
    assert.equal(4, #r.calls[1].attempts)
    assert.equal("budget", r.calls[2].outcome)
    assert.equal(1, #r.calls[2].attempts)
    assert.matches("budget", r.calls[2].attempts[1].reason)
  end)

  it("opens the breaker, fails fast, then probes after open_ms of virtual time", function()
    local file = policy_file("breaky", [[
      return { budget = false, breaker = { failures = 3, open_ms = 5000, half_open = 1 } }]])
    local r = testing.play_calls(file, { all503, all503, { { status = 200 } } }, { gap_ms = 100 })
    local c1, c2, c3 = r.calls[1], r.calls[2], r.calls[3]
    assert.equal("breaker_open", c1.outcome) -- the 4th attempt is refused
    assert.equal(3, #c1.attempts)
    assert.same({ { from = "closed", to = "open", key = "http://upstream.test:80" } }, c1.breaker)
    assert.equal("breaker_open", c2.outcome)
    assert.equal(0, #c2.attempts)
    assert.equal("breaker_open", c3.outcome)

    r = testing.play_calls(file, { all503, { { status = 200 } } }, { gap_ms = 6000 })
    assert.equal("ok", r.calls[2].outcome)
    assert.same({ "half_open", "closed" }, { r.calls[2].breaker[1].to, r.calls[2].breaker[2].to })
    near(r.calls[1].elapsed_ms + 6000, r.calls[2].started_ms, "call 2 starts after the gap")
    near(r.calls[2].started_ms + 10, r.elapsed_ms, "elapsed")
  end)
end)
