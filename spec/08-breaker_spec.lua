-- Breakers beyond consecutive failures (issue 3, item 3), in process
-- against a real `resilua serve`: the failure-rate breaker over count and
-- time windows (minimum_calls, failure_rate, slow calls), its half-open
-- rule, growing open_ms, forcing from the Lua API and the on_change hook.
local resilua = require "resilua"
local helpers = require "helpers"
local policy_mod = require "resilua.policy"

local dir = helpers.tmpdir()
local log = dir .. "/events.jsonl"

local policy = helpers.policy_writer(dir)

-- One attempt per call, no budget: each call is one breaker sample.
local function rate_policy(name, breaker)
  return policy(name, ("return { max_attempts = 1, budget = false, breaker = %s }"):format(breaker))
end

local function breaker_moves(client_name)
  local moves = {}
  for _, e in ipairs(helpers.of_kind(helpers.events(log), "breaker")) do
    if e.client == client_name then moves[#moves + 1] = e.from .. ">" .. e.to end
  end
  return moves
end

describe("breakers", function()
  local server, ok, down, slow
  setup(function()
    resilua.log(log)
    server = helpers.start_server [[
      return function(req)
        if req.path == "/ok" then return { status = 200, body = "fine" } end
        if req.path == "/slow" then return { status = 200, body = "slow", delay_ms = 250 } end
        if req.path == "/slower" then return { status = 200, body = "slower", delay_ms = 900 } end
        return { status = 503, body = "down" }
      end]]
    ok, down, slow = server.url .. "/ok", server.url .. "/down", server.url .. "/slow"
  end)
  teardown(function()
    server:stop()
    resilua.log("-")
  end)

  local function play(client, urls)
    for _, url in ipairs(urls) do client:call{ url = url } end
  end

  describe("validation", function()
    local function check(t)
      local norm, err = policy_mod.validate(t, "p.lua", "")
      return norm and norm.breaker, err
    end

    it("fills a rate breaker's defaults (resilience4j's) and drops `failures`", function()
      local b = check{ breaker = { kind = "rate" } }
      assert.same({ kind = "rate", window = "count", window_size = 100, minimum_calls = 100,
                    failure_rate = 0.5, slow_call_rate = 1.0,
                    open_ms = 50, half_open = 1, key = "host" }, b)
      assert.equal(60000, check{ breaker = { kind = "rate", window = "time" } }.window_ms)
    end)

    it("rejects fields of another kind or window, and out-of-range values", function()
      local cases = {
        { { window_size = 5 }, 'breaker.window_size needs breaker.kind = "rate"' },
        { { kind = "rate", failures = 3 }, "breaker.failures is for the consecutive kind" },
        { { kind = "rate", window_ms = 1000 }, "window_ms does not apply to a count window" },
        { { kind = "rate", window = "time", window_size = 5 }, "window_size does not apply to a time window" },
        { { kind = "rate", failure_rate = 1.5 }, "failure_rate must be in %[0.01, 1%]" },
        { { kind = "rate", slow_call_rate = 0 }, "slow_call_rate must be in" },
        { { kind = "rate", minimum_calls = 0 }, "minimum_calls must be in" },
        { { kind = "rate", window_size = 100001 }, "window_size must be in" },
        { { kind = "rat" }, "breaker.kind must be one of consecutive, rate" },
        { { windw = "count" }, "did you mean 'window'" },
        { { open_ms = {} }, "open_ms must list 1 to 32 durations" },
        { { open_ms = { 100, "x" } }, "open_ms%[2%] must be a number" },
        { { open_ms = function() return -1 end }, "open_ms%(1%) must be in" },
        { { open_ms = function(n) if n > 3 then error("boom") end return 1 end }, "open_ms%(4%) failed: .*boom" },
        { { on_change = "x" }, "on_change must be a function" },
      }
      for _, c in ipairs(cases) do
        local b, err = check{ breaker = c[1] }
        assert.is_nil(b)
        assert.matches(c[2], err)
      end
    end)

    it("turns a function open_ms into durations for openings 1..32", function()
      local b = check{ breaker = { open_ms = function(n) return math.min(1000 * 2 ^ (n - 1), 60000) end } }
      assert.equal(32, #b.open_ms)
      assert.same({ 1000, 2000, 4000, 8000, 16000, 32000, 60000 }, { table.unpack(b.open_ms, 1, 7) })
      assert.equal(60000, b.open_ms[32])
      assert.same({ 5, 10 }, check{ breaker = { open_ms = { 5, 10 } } }.open_ms)
    end)
  end)

  describe("rate, count window", function()
    it("opens at the failure rate, and only once minimum_calls are in", function()
      local p = rate_policy("rate-min", [[{ kind = "rate", window_size = 10, minimum_calls = 4,
                                            failure_rate = 0.5, open_ms = 60000 }]])
      local client = resilua.client{ policy = p, name = "rate-min" }
      play(client, { down, down, down })
      assert.same({ "closed", 3, 3 }, { client:breaker(down) }) -- 100 %, but 3 < 4 calls
      play(client, { down })
      assert.equal("open", client:breaker(down))

      local c2 = resilua.client{ policy = p, name = "rate-threshold" }
      play(c2, { ok, ok, ok, down, down }) -- 2/5 = 0.4
      assert.same({ "closed", 2, 5 }, { c2:breaker(down) })
      play(c2, { down }) -- 3/6 = 0.5: at the threshold opens (>=, as resilience4j)
      assert.equal("open", c2:breaker(down))
      local _, err = c2:call{ url = ok }
      assert.equal("breaker_open", err.outcome)
      assert.same({ "closed>open" }, breaker_moves("rate-threshold"))
    end)

    it("slides: only the last window_size calls count", function()
      local p = rate_policy("rate-slide", [[{ kind = "rate", window_size = 4, minimum_calls = 4,
                                              failure_rate = 0.75 }]])
      local client = resilua.client{ policy = p, name = "rate-slide" }
      play(client, { down, down, ok, ok }) -- 2/4
      assert.same({ "closed", 2, 4 }, { client:breaker(down) })
      play(client, { ok, ok })              -- the two failures slid out
      assert.same({ "closed", 0, 4 }, { client:breaker(down) })
      play(client, { down, down })          -- 2/4 (4/8 = 0.5 if nothing slid)
      assert.equal("closed", client:breaker(down))
      play(client, { down })                -- 3/4 = 0.75
      assert.equal("open", client:breaker(down))
    end)

    it("counts slow calls against slow_call_rate, successful or not", function()
      -- /slower answers after 900 ms, over slow_call_ms whatever the load;
      -- an /ok call would need 800 ms on a loaded machine to count as slow
      local p = rate_policy("rate-slow", [[{ kind = "rate", window_size = 10, minimum_calls = 3,
                                             failure_rate = 1, slow_call_ms = 800, slow_call_rate = 0.5 }]])
      local client = resilua.client{ policy = p, name = "rate-slow" }
      local slower = server.url .. "/slower"
      play(client, { ok, ok, slower }) -- 1/3 slow, no failure
      assert.same({ "closed", 0, 3 }, { client:breaker(ok) })
      local res = client:call{ url = slower } -- 2/4 slow: opens, though it answered 200
      assert.equal(200, res.status)
      assert.equal("open", client:breaker(ok))
    end)
  end)

  describe("rate, time window", function()
    it("slides: calls older than window_ms drop out", function()
      -- A 1.5 s window: the calls of each step fall inside it even on a
      -- loaded machine; the sleep past it is a lower bound.
      local p = rate_policy("rate-time", [[{ kind = "rate", window = "time", window_ms = 1500,
                                             minimum_calls = 3, failure_rate = 0.5 }]])
      local client = resilua.client{ policy = p, name = "rate-time" }
      play(client, { down, down })
      assert.same({ "closed", 2, 2 }, { client:breaker(down) })
      resilua.sleep(1.6)
      assert.same({ "closed", 0, 0 }, { client:breaker(down) })
      play(client, { ok, ok, down }) -- 1/3 (3/5 had they stayed)
      assert.same({ "closed", 1, 3 }, { client:breaker(down) })
      play(client, { down })          -- 2/4
      assert.equal("open", client:breaker(down))
    end)
  end)

  describe("rate, half-open", function()
    local p = rate_policy("rate-half", [[{ kind = "rate", window_size = 2, minimum_calls = 2,
                                           failure_rate = 0.5, open_ms = 200, half_open = 2 }]])

    it("closes when all `half_open` probes answered under the rate", function()
      local client = resilua.client{ policy = p, name = "rate-half-close" }
      play(client, { down, down })
      assert.equal("open", client:breaker(ok))
      resilua.sleep(0.25)
      play(client, { ok })
      assert.equal("half_open", client:breaker(ok))
      play(client, { ok })
      assert.equal("closed", client:breaker(ok))
      assert.same({ "closed>open", "open>half_open", "half_open>closed" }, breaker_moves("rate-half-close"))
    end)

    it("reopens as soon as the probes' failures reach the rate", function()
      local client = resilua.client{ policy = p, name = "rate-half-open" }
      play(client, { down, down })
      resilua.sleep(0.25)
      play(client, { down }) -- 1 of 2 probes failed: 0.5 whatever the other says
      assert.equal("open", client:breaker(ok))
      local _, err = client:call{ url = ok }
      assert.equal("breaker_open", err.outcome)
    end)

    it("admits only `half_open` probes in all", function()
      local client = resilua.client{ policy = p, name = "rate-half-many" }
      play(client, { down, down })
      resilua.sleep(0.25)
      local outcomes = {}
      for i = 1, 4 do
        resilua.go(function()
          local res, err = client:call{ url = slow }
          outcomes[i] = res and "ok" or err.outcome
        end)
      end
      assert.is_true(resilua.wait())
      table.sort(outcomes)
      assert.same({ "breaker_open", "breaker_open", "ok", "ok" }, outcomes)
      assert.equal("closed", client:breaker(ok))
    end)
  end)

  describe("growing open_ms", function()
    it("takes the n-th duration for the n-th opening in a row, and starts over once closed", function()
      -- Openings of 0.3, 0.9 and 2.7 s.  "Admitted" is asserted after a
      -- sleep past the opening (a lower bound, safe under load); "still
      -- open" past the previous opening's length with 0.5 s and 1.5 s to
      -- spare before its own ends.
      local p = rate_policy("grow", [[{ failures = 1,
        open_ms = function(n) return math.min(300 * 3 ^ (n - 1), 60000) end }]])
      local client = resilua.client{ policy = p, name = "grow" }
      local function admitted()
        local _, err = client:call{ url = down }
        return err.outcome ~= "breaker_open"
      end
      play(client, { down })                  -- opening 1: 300 ms
      resilua.sleep(0.4)
      assert.is_true(admitted())              -- probe fails: opening 2, 900 ms
      resilua.sleep(0.4)
      assert.is_false(admitted())
      resilua.sleep(0.6)
      assert.is_true(admitted())              -- probe fails: opening 3, 2700 ms
      resilua.sleep(1.2)
      assert.is_false(admitted())
      resilua.sleep(1.6)
      assert.equal(200, client:call{ url = ok }.status) -- probe succeeds: closed
      play(client, { down })                  -- opening 1 again: 300 ms
      resilua.sleep(0.4)
      assert.is_true(admitted())
    end)

    it("takes a list of durations, the last repeating", function()
      -- (a "still open" check has 1.2 s to spare, as above)
      local p = rate_policy("grow-list", "{ failures = 1, open_ms = { 200, 1500 } }")
      local client = resilua.client{ policy = p, name = "grow-list" }
      play(client, { down })
      resilua.sleep(0.3)
      play(client, { down }) -- opening 2: 1500 ms
      resilua.sleep(0.3)
      assert.equal("breaker_open", select(2, client:call{ url = ok }).outcome)
      resilua.sleep(1.3)
      play(client, { down }) -- opening 3: 1500 ms again
      resilua.sleep(0.3)
      assert.equal("breaker_open", select(2, client:call{ url = ok }).outcome)
    end)
  end)

  describe("client:force_breaker", function()
    local p = rate_policy("force", "{ failures = 1, open_ms = 100 }")

    it("holds a breaker open, closes it and resets it", function()
      local client = resilua.client{ policy = p, name = "force" }
      assert.equal("open", client:force_breaker(ok, "open"))
      resilua.sleep(0.15) -- past open_ms: a forced breaker does not probe
      local _, err = client:call{ url = ok }
      assert.equal("breaker_open", err.outcome)
      assert.equal("closed", client:force_breaker(ok, "closed"))
      assert.equal(200, client:call{ url = ok }.status)
      play(client, { down })
      assert.equal("open", client:breaker(ok))
      assert.equal("closed", client:force_breaker(ok, "reset"))
      assert.same({ "closed", 0 }, { client:breaker(ok) })
      local forced = {}
      for _, e in ipairs(helpers.of_kind(helpers.events(log), "breaker")) do
        if e.client == "force" and e.forced then forced[#forced + 1] = e.forced .. ":" .. e.to end
      end
      assert.same({ "open:open", "closed:closed", "reset:closed" }, forced)
    end)

    it("works on a rate breaker, clearing its window", function()
      local rp = rate_policy("force-rate", [[{ kind = "rate", window_size = 10, minimum_calls = 5 }]])
      local client = resilua.client{ policy = rp, name = "force-rate" }
      play(client, { down, down, ok })
      assert.same({ "closed", 2, 3 }, { client:breaker(ok) })
      assert.equal("closed", client:force_breaker(ok, "reset"))
      assert.same({ "closed", 0, 0 }, { client:breaker(ok) })
    end)

    it("raises on misuse; nil without a breaker", function()
      local client = resilua.client{ policy = p, name = "force-misuse" }
      assert.error_matches(function() client:force_breaker(ok, "half_open") end,
                           'expected "open", "closed" or "reset"')
      assert.error_matches(function() client:force_breaker(nil, "open") end, "url must be a string")
      local none = resilua.client{ policy = policy("nobreaker", "return { breaker = false }") }
      assert.is_nil(none:force_breaker(ok, "open"))
    end)
  end)

  describe("open time", function()
    -- On the virtual clock (resilua.testing): exact times, no real waiting.
    local testing = require "resilua.testing"
    local p = policy("rest", [[return {
      max_attempts = 1, budget = false, retry_on = { status = {}, errors = {}, refused = false },
      breaker = { failures = 1, open_ms = 50, half_open = 1 } }]])

    it("is open_ms after a fast failure, and as long as a slow one took", function()
      local fast = testing.play_calls(p, { { { status = 503, latency_ms = 5 } },
                                           { { status = 200 } } }, { gap_ms = 100 })
      assert.equal("ok", fast.calls[2].outcome) -- 100 ms > open_ms: the probe went
      local slow = testing.play_calls(p, { { { status = 503, latency_ms = 900 } },
                                           { { status = 200 } }, { { status = 200 } } },
                                      { gap_ms = 100 })
      assert.equal("breaker_open", slow.calls[2].outcome) -- 100 ms < the 900 ms it took
      assert.equal(0, #slow.calls[2].attempts)
      local late = testing.play_calls(p, { { { status = 503, latency_ms = 900 } },
                                           { { status = 200 } } }, { gap_ms = 950 })
      assert.equal("ok", late.calls[2].outcome)
    end)
  end)

  describe("a try the breaker refused (retry_on.refused)", function()
    -- The backoff is 20 s, so a call that waited it out blindly would
    -- take 20 s: each case ends well before (an upper bound only, for a
    -- loaded machine).
    local WAIT_BOUND_MS = 10000
    local function refused_policy(name)
      return policy(name, [[return {
        max_attempts = 4, deadline_ms = 60000, budget = false,
        backoff = { base_ms = 20000, max_ms = 20000, jitter = "none" },
        retry_on = { status = {}, errors = {}, refused = true },
        breaker = { failures = 1, open_ms = 300, half_open = 1 } }]])
    end

    it("goes at once when the probe's verdict closes the breaker", function()
      local client = resilua.client{ policy = refused_policy("verdict"), name = "verdict" }
      local _, err = client:call{ url = down } -- opens it
      assert.equal("failed", err.outcome)
      resilua.sleep(0.35)                       -- past open_ms: the next try probes
      local probe, waiter
      resilua.go(function() probe = { client:call{ url = slow } } end) -- 200 after 250 ms
      resilua.go(function()
        resilua.sleep(0.05)                     -- refused: the probe is out
        waiter = { client:call{ url = ok } }
      end)
      assert.is_true(resilua.wait())
      assert.equal(200, probe[1].status)
      local res = assert(waiter[1], waiter[2] and waiter[2].message)
      assert.equal(200, res.status)
      assert.equal(1, res.attempts)
      assert.is_true(res.elapsed_ms < WAIT_BOUND_MS, ("waited %.0f ms"):format(res.elapsed_ms))
      local calls = helpers.of_kind(helpers.events(log), "call")
      assert.equal(1, calls[#calls].refused) -- the waiter's: one try refused, then sent
      assert.same({ "closed>open", "open>half_open", "half_open>closed" }, breaker_moves("verdict"))
    end)

    it("wakes when the next probe is due, and is that probe", function()
      local client = resilua.client{ policy = refused_policy("due"), name = "due" }
      client:call{ url = down }
      local res = assert(client:call{ url = ok }) -- refused at once, sent 300 ms later
      assert.equal(200, res.status)
      assert.is_true(res.elapsed_ms < WAIT_BOUND_MS, ("waited %.0f ms"):format(res.elapsed_ms))
      assert.same({ "closed>open", "open>half_open", "half_open>closed" }, breaker_moves("due"))
    end)
  end)

  describe("on_change hook", function()
    it("is called on every transition, with key, from and to", function()
      -- The hook keeps what it saw; decide reports it in the attempt's reason.
      local p = policy("hook", [[
        local seen = {}
        return { max_attempts = 2, budget = false,
                 breaker = { failures = 1, open_ms = 100,
                             on_change = function(key, from, to) seen[#seen + 1] = from .. ">" .. to end },
                 decide = function(a)
                   return { retry = false, reason = "seen " .. table.concat(seen, ",") }
                 end }]])
      -- Let the watch see the write first: a reload would start a fresh `seen`.
      resilua.sleep(0.1)
      local client = resilua.client{ policy = p, name = "hook" }
      play(client, { down })
      resilua.sleep(0.15)
      play(client, { down })
      local attempts = helpers.of_kind(helpers.events(log), "attempt")
      assert.equal("seen closed>open,open>half_open,half_open>open", attempts[#attempts].reason)
    end)

    it("is called on forced changes; a failing hook is logged, not fatal", function()
      local p = policy("hook-fails", [[
        return { max_attempts = 1, budget = false,
                 breaker = { failures = 1, on_change = function(key, from, to)
                   error(("hook saw %s %s>%s"):format(key, from, to)) end } }]])
      local client = resilua.client{ policy = p, name = "hook-fails" }
      local _, err = client:call{ url = down }
      assert.equal("gave_up", err.outcome)
      client:force_breaker(ok, "reset")
      local errs = {}
      for _, e in ipairs(helpers.of_kind(helpers.events(log), "breaker")) do
        if e.client == "hook-fails" then errs[#errs + 1] = e.hook_error end
      end
      assert.equal(2, #errs)
      assert.matches("hook saw " .. server.url:gsub("%p", "%%%0") .. " closed>open", errs[1])
      assert.matches("open>closed", errs[2])
    end)
  end)
end)
