-- The Lua API (contract 5) in process, against a real `resilua serve`:
-- results and errors, breakers, retry budgets, shared state by name, and
-- coroutines (go / wait / sleep) with 1,000 calls in flight.
local resilua = require "resilua"
local helpers = require "helpers"

local dir = helpers.tmpdir()
local log = dir .. "/events.jsonl"

local policy = helpers.policy_writer(dir)

describe("the Lua API", function()
  local server
  setup(function()
    resilua.log(log)
    server = helpers.start_server [[
      return function(req)
        if req.path == "/ok" then return { status = 200, body = "fine", headers = { ["X-Answer"] = "42" } } end
        if req.path == "/slow" then return { status = 200, body = "slow", delay_ms = 300 } end
        if req.path == "/bad" then return { status = 400, body = "no" } end
        return { status = 503, body = "down" }
      end]]
  end)
  teardown(function()
    server:stop()
    resilua.log("-")
  end)

  local function requests()
    return helpers.wait_until(function()
      local r = helpers.curl(helpers.quote(server.url .. "/_stats"))
      return r.status == 200 and require("cjson").decode(r.body).requests
    end, 5)
  end

  describe("client:call", function()
    local client = resilua.client{ policy = policy("quick", [[
      return { backoff = { base_ms = 1, max_ms = 5, jitter = "none" }, breaker = false, budget = false }]]) }

    it("returns the response on success", function()
      local res, err = client:call{ url = server.url .. "/ok" }
      assert.is_nil(err)
      assert.equal(200, res.status)
      assert.equal("fine", res.body)
      assert.equal("42", res.headers["x-answer"])
      assert.equal(1, res.attempts)
      assert.is_number(res.elapsed_ms)
      assert.matches("^%x+$", res.call_id)
    end)

    it("returns nil and an error describing the outcome", function()
      local res, err = client:call{ method = "POST", url = server.url .. "/bad", body = "{}",
                                    headers = { ["Content-Type"] = "application/json" } }
      assert.is_nil(res)
      assert.equal("failed", err.outcome)
      assert.equal(400, err.status)
      assert.equal(1, err.attempts)
      assert.matches("HTTP 400", err.message)
      local _, gave_up = client:call{ url = server.url .. "/down" }
      assert.equal("gave_up", gave_up.outcome)
      assert.equal(4, gave_up.attempts)
      local _, refused = client:call{ url = "http://127.0.0.1:1/" }
      assert.equal("connect", refused.error)
      assert.is_nil(refused.status)
    end)

    it("raises on misuse, naming the problem", function()
      assert.has_error(function() client:call("nope") end, "call: expected a request table")
      assert.has_error(function() client:call{ url = 5 } end, "call: request.url must be a string")
      assert.error_matches(function() client:call{ url = "ftp://x/" } end, "bad URL")
      assert.error_matches(function() client:call{ url = server.url, method = "BAD METHOD" } end, "bad method")
      assert.error_matches(function() resilua.client{ policy = "nosuch" } end, "policy 'nosuch' not found")
    end)
  end)

  describe("circuit breaker", function()
    local p = policy("breaker", [[
      return { max_attempts = 1, budget = false,
               breaker = { failures = 3, open_ms = 1000, half_open = 1 } }]])
    -- (1 s open: the checks made while it is open have that long even on a
    -- loaded machine; the sleeps past it are lower bounds)

    it("walks closed -> open -> half_open -> closed and -> open again", function()
      local client = resilua.client{ policy = p, name = "breaker-walk" }
      local url = server.url .. "/down"
      local before = requests()
      for _ = 1, 3 do
        local _, err = client:call{ url = url }
        assert.equal("gave_up", err.outcome)
      end
      assert.equal("open", client:breaker(url))
      -- Open: fails fast, sends nothing (the whole host: another path too).
      local _, err = client:call{ url = server.url .. "/ok" }
      assert.equal("breaker_open", err.outcome)
      assert.equal(0, err.attempts)
      assert.equal(before + 3, requests())
      -- After open_ms a probe goes out; its success closes the breaker.
      resilua.sleep(1.05)
      local res = client:call{ url = server.url .. "/ok" }
      assert.equal(200, res.status)
      assert.equal("closed", client:breaker(url))
      -- Open again; a failed probe reopens it.
      for _ = 1, 3 do client:call{ url = url } end
      assert.equal("open", client:breaker(url))
      resilua.sleep(1.05)
      client:call{ url = url }
      assert.equal("open", client:breaker(url))

      local moves = {}
      for _, e in ipairs(helpers.of_kind(helpers.events(log), "breaker")) do
        if e.client == "breaker-walk" then moves[#moves + 1] = e.from .. ">" .. e.to end
      end
      assert.same({ "closed>open", "open>half_open", "half_open>closed", "closed>open",
                    "open>half_open", "half_open>open" }, moves)
    end)

    it("admits only `half_open` probes at a time", function()
      local client = resilua.client{ policy = p, name = "breaker-probes" }
      for _ = 1, 3 do client:call{ url = server.url .. "/down" } end
      resilua.sleep(1.05)
      local outcomes = {}
      for i = 1, 3 do
        resilua.go(function()
          local res, err = client:call{ url = server.url .. "/slow" }
          outcomes[i] = res and "ok" or err.outcome
        end)
      end
      assert.is_true(resilua.wait())
      table.sort(outcomes)
      assert.same({ "breaker_open", "breaker_open", "ok" }, outcomes)
      assert.equal("closed", client:breaker(server.url))
    end)

    it("does not count 4xx answers as failures of the dependency", function()
      local client = resilua.client{ policy = p, name = "breaker-4xx" }
      for _ = 1, 5 do client:call{ url = server.url .. "/bad" } end
      assert.same({ "closed", 0 }, { client:breaker(server.url) })
    end)

    it("does not count running out of our own file descriptors against the host", function()
      local script = helpers.write_file(dir .. "/fds.lua", [[
        local resilua = require "resilua"
        resilua.log(false)
        local client = resilua.client{ policy = "default" }
        local ok = 0
        for _ = 1, 100 do
          resilua.go(function() if client:call{ url = arg[1] } then ok = ok + 1 end end)
        end
        resilua.wait()
        local tokens, max_tokens = client:budget()
        io.write(ok, " ", client:breaker(arg[1]), " ", max_tokens - tokens)]])
      local r = helpers.run(("ulimit -n 60 && ulimit -Hn 60 && exec %s run %s %s"):format(
        helpers.quote(helpers.bin), helpers.quote(script), helpers.quote(server.url .. "/slow")))
      local ok, state, spent = r.stdout:match("^(%d+) (%S+) (%S+)$")
      assert.is_true(tonumber(ok) > 50, r.stdout .. r.stderr) -- most got a descriptor in time
      assert.equal("closed", state)
      assert.equal(0, tonumber(spent)) -- no retry budget spent either
    end)

    it("stops a call's retries when its breaker opens (exit 5 from the CLI)", function()
      local cli = policy("opens", [[
        return { max_attempts = 3, backoff = { base_ms = 1, jitter = "none" },
                 breaker = { failures = 1, open_ms = 60000 } }]])
      local r = helpers.run({ helpers.bin, "call", "--quiet", "--policy", cli, server.url .. "/down" })
      assert.equal(5, r.code)
      assert.matches("breaker_open", r.stderr)
    end)
  end)

  describe("retry budget", function()
    local p = policy("budget", [[
      return { max_attempts = 10, breaker = false, backoff = { base_ms = 1, jitter = "none" },
               budget = { max_tokens = 4, token_ratio = 0.5 } }]])

    it("follows gRPC throttling: -1 per failure, +ratio per success, retry while > max/2", function()
      local client = resilua.client{ policy = p, name = "budget-math" }
      assert.same({ 4, 4 }, { client:budget() })
      local _, err = client:call{ url = server.url .. "/down" }
      -- 4 -> 3 (retry allowed: 3 > 2) -> 2 (refused: 2 is not > 2)
      assert.equal("budget", err.outcome)
      assert.equal(2, err.attempts)
      assert.equal(2, (client:budget()))
      client:call{ url = server.url .. "/ok" }
      assert.equal(2.5, (client:budget()))
      _, err = client:call{ url = server.url .. "/down" }
      assert.equal("budget", err.outcome)
      assert.equal(1, err.attempts) -- 2.5 -> 1.5: no retry
      for _ = 1, 10 do client:call{ url = server.url .. "/ok" } end
      assert.equal(4, (client:budget())) -- capped at max_tokens
      local logged = helpers.of_kind(helpers.events(log), "attempt")
      assert.matches("^budget %d", logged[#logged - 10].reason)
    end)

    it("is shared by clients with the same name, and only by them", function()
      local a = resilua.client{ policy = p, name = "team-a" }
      local a2 = resilua.client{ policy = p, name = "team-a" }
      local b = resilua.client{ policy = p, name = "team-b" }
      a:call{ url = server.url .. "/down" }
      assert.equal(2, (a2:budget()))
      assert.equal(4, (b:budget()))
    end)
  end)

  describe("coroutines", function()
    -- Patient tries: on a loaded machine (CI, ASan) 1,000 connections to one
    -- server can take seconds to be accepted (a SYN past a full backlog is
    -- resent after 1 s), which the default 1 s connect and 2 s per-try
    -- timeouts turned into failures (748 of 1,000 ok, seen under ASan).
    local client = resilua.client{ policy = policy("co", [[return { breaker = false,
      connect_timeout_ms = 20000, per_try_timeout_ms = 30000, deadline_ms = 60000 }]]) }

    it("holds 1,000 calls in flight on one thread", function()
      local ok_count, t0 = 0, helpers.now()
      for _ = 1, 1000 do
        resilua.go(function()
          local res = client:call{ url = server.url .. "/slow" }
          if res and res.status == 200 then ok_count = ok_count + 1 end
        end)
      end
      assert.is_true(resilua.wait())
      assert.equal(1000, ok_count)
      -- 1,000 calls of 300 ms one after another would take 300 s.
      assert.is_true(helpers.now() - t0 < 60)
    end)

    it("interleaves sleeps and calls in go'd functions", function()
      local order = {}
      resilua.go(function() resilua.sleep(0.2) order[#order + 1] = "slept" end)
      resilua.go(function()
        client:call{ url = server.url .. "/ok" }
        order[#order + 1] = "called"
      end)
      assert.is_true(resilua.wait())
      assert.same({ "called", "slept" }, order)
    end)

    it("reports errors of go'd functions from wait", function()
      resilua.go(function() error("oops") end)
      resilua.go(function() resilua.sleep(0.01) end)
      local ok, errs = resilua.wait()
      assert.is_false(ok)
      assert.equal(1, #errs)
      assert.matches("oops", errs[1])
    end)
  end)
end)
