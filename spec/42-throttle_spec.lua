-- Adaptive throttling (Google SRE, "Handling Overload") and retries of
-- tries refused locally, through the real call state machine on the
-- virtual clock (resilua.testing): what the core counts and refuses.
local helpers = require "helpers"
local testing = require "resilua.testing"

local dir = helpers.tmpdir()
local write = helpers.policy_writer(dir)

local function calls_of(n, outcome_at)
  local calls = {}
  for i = 1, n do calls[i] = { outcome_at(i) } end
  return calls
end

local function count(list, pred)
  local n = 0
  for _, x in ipairs(list) do if pred(x) then n = n + 1 end end
  return n
end

describe("adaptive throttling", function()
  local one_try = write("one_try", [[return {
    max_attempts = 1, breaker = false, budget = false,
    throttle = { kind = "adaptive", k = 2, window_ms = 60000 } }]])

  it("refuses locally, nothing sent, once fewer than 1/k of the attempts are accepted", function()
    local r = testing.play_calls(one_try, calls_of(200, function() return { status = 503 } end),
                                 { seed = 1, gap_ms = 1 })
    local throttled = count(r.calls, function(c) return c.outcome == "throttled" end)
    local sent = count(r.calls, function(c) return #c.attempts > 0 end)
    assert.are.equal(200, throttled + sent)
    -- With no accepts, p = requests / (requests + 1): about ln(200) sends.
    assert.is_true(sent >= 1 and sent <= 20, "sent " .. sent)
    assert.are.same({}, r.calls[200].attempts)
    -- The call event says why.
    local reasons = 0
    for _, e in ipairs(r.events) do
      if e.event == "call" and e.outcome == "throttled" then
        assert.matches("adaptive throttle refused %(p 0%.%d+: %d+ requests, 0 accepted", e.reason)
        reasons = reasons + 1
      end
    end
    assert.are.equal(throttled, reasons)
  end)

  it("refuses nothing while more than 1/k of the attempts are accepted", function()
    -- 40 % failures: accepts 60 % > 1/2 of requests.
    local r = testing.play_calls(one_try, calls_of(300, function(i)
      return { status = (i % 5 < 2) and 503 or 200 } end), { seed = 1, gap_ms = 1 })
    assert.are.equal(0, count(r.calls, function(c) return c.outcome == "throttled" end))
    -- Every attempt event carries the probability of refusing: 0 once
    -- the window holds more than a few requests.
    local attempts = helpers.of_kind(r.events, "attempt")
    assert.are.equal(300, #attempts)
    for i, e in ipairs(attempts) do
      assert.is_true(e.throttle >= 0 and e.throttle < 1)
      if i > 20 then assert.are.equal(0, e.throttle) end
    end
  end)

  it("forgets failures older than its window", function()
    local short = write("short_window", [[return {
      max_attempts = 1, breaker = false, budget = false,
      throttle = { kind = "adaptive", window_ms = 1000 } }]])
    local failing = calls_of(30, function() return { status = 503 } end)
    -- 1.1 s apart: each call finds the last failure out of a 1 s window...
    local r = testing.play_calls(short, failing, { seed = 1, gap_ms = 1100 })
    assert.are.equal(0, count(r.calls, function(c) return c.outcome == "throttled" end))
    -- ...and in a 60 s one.
    r = testing.play_calls(one_try, failing, { seed = 1, gap_ms = 1100 })
    assert.is_true(count(r.calls, function(c) return c.outcome == "throttled" end) >= 20)
  end)

  it("is checked like any policy field", function()
    local policy = require "resilua.policy"
    local _, err = policy.load(write("bad_k", [[return { throttle = { kind = "adaptive", k = 0.5 } }]]))
    assert.matches("throttle.k must be in %[1, 100%]", err)
    _, err = policy.load(write("bad_kind", [[return { throttle = { kind = "static" } }]]))
    assert.matches("throttle.kind must be one of adaptive", err)
    local p = assert(policy.load(write("throttle_defaults", [[return { throttle = {} }]])))
    assert.are.same({ kind = "adaptive", k = 2, window_ms = 2000 }, p.table.throttle)
  end)
end)

describe("retry_on.refused", function()
  it("tries again after the backoff when the breaker refused, and counts the refusals", function()
    local p = write("refused", [[return {
      max_attempts = 4, deadline_ms = 10000,
      backoff = { base_ms = 100, max_ms = 100, jitter = "none" },
      retry_on = { status = { 503 }, errors = {}, refused = true },
      breaker = { failures = 1, open_ms = 150, half_open = 1, key = "host" },
      budget = false }]])
    local r = testing.play(p, { { status = 503 }, { status = 200 } }, { seed = 1 })
    -- 503 opens the breaker; the retry 100 ms later is refused (nothing
    -- sent); it wakes when the probe is due (open_ms 150 after the 503, before
    -- its next backoff ends) and is that probe, which gets 200.
    assert.are.equal("ok", r.outcome)
    assert.are.equal(2, #r.attempts)
    assert.are.equal(150, r.attempts[2].t_ms - r.attempts[1].t_ms - r.attempts[1].latency_ms)
    local call = helpers.of_kind(testing.play_calls(p, { { { status = 503 }, { status = 200 } } },
                                                    { seed = 1 }).events, "call")[1]
    assert.are.equal(1, call.refused)
  end)

  it("set to false, a refused try ends the call at once (breaker_open)", function()
    local p = write("not_refused", [[return {
      max_attempts = 4, backoff = { base_ms = 100, max_ms = 100, jitter = "none" },
      retry_on = { status = { 503 }, errors = {}, refused = false },
      breaker = { failures = 1, open_ms = 150, half_open = 1, key = "host" },
      budget = false }]])
    local r = testing.play(p, { { status = 503 }, { status = 200 } }, { seed = 1 })
    assert.are.equal("breaker_open", r.outcome)
    assert.are.equal(1, #r.attempts)
  end)
end)
