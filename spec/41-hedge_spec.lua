-- Hedging (hedge = { after_ms = N | "p95", max = 2 }): when a try is slow
-- another attempt of it goes out; the first good answer wins and the other
-- is cancelled.  Against a real `resilua serve` whose first request for
-- each path is slow (1.5 s) and the rest fast.
local helpers = require "helpers"
local resilua = require "resilua"

local dir = helpers.tmpdir()
local write = helpers.policy_writer(dir)

local SLOW_FIRST = [[
  local seen = {}
  return function(req)
    if req.path == "/fast" then return { status = 200, body = "fast" } end
    local first = not seen[req.path]
    seen[req.path] = true
    -- /a's first answer is slower: its spec bounds the call's time well below it
    local slow_ms = req.path == "/a" and 8000 or 1500
    return { status = 200, body = first and "slow" or "hedge", delay_ms = first and slow_ms or 0 }
  end]]

local function policy(name, fields)
  return write(name, ([[return { max_attempts = 1, per_try_timeout_ms = 5000, deadline_ms = 5000,
    breaker = false, %s }]]):format(fields))
end

describe("hedging", function()
  local server
  setup(function() server = helpers.start_server(SLOW_FIRST) end)
  teardown(function() server:stop() end)

  local function stats()
    return require("cjson").decode(helpers.curl(helpers.quote(server.url .. "/_stats")).body)
  end

  it("sends a second attempt after after_ms; the first good answer wins", function()
    local client = resilua.client{ name = "hedge-fixed", policy = policy("fixed",
      [[budget = false, hedge = { after_ms = 100, max = 2 }]]) }
    local before = stats().requests
    local t0 = helpers.now()
    local res = assert(client:call{ url = server.url .. "/a" })
    assert.are.equal("hedge", res.body) -- not the slow first answer
    assert.are.equal(2, res.attempts)
    -- the call ends with the hedge's answer, not after the first's (8 s)
    assert.is_true(helpers.now() - t0 < 6, "well before the slow answer")
    assert.are.equal(before + 2, stats().requests)
  end)

  it("hedges a POST only when it carries an idempotency key", function()
    local keyless = resilua.client{ name = "hedge-keyless", policy = policy("keyless",
      [[budget = false, idempotency = false, hedge = { after_ms = 100, max = 2 }]]) }
    local res = assert(keyless:call{ method = "POST", url = server.url .. "/b", body = "x" })
    assert.are.same({ "slow", 1 }, { res.body, res.attempts })
    -- The default idempotency settings key every POST: then it may hedge.
    -- The server dedups by key, so the hedge (same key, first still
    -- running) gets 409 and the handler runs once: the slow answer wins.
    local keyed = resilua.client{ name = "hedge-keyed", policy = policy("keyed",
      [[budget = false, hedge = { after_ms = 100, max = 2 }]]) }
    local suppressed = stats()
    res = assert(keyed:call{ method = "POST", url = server.url .. "/c", body = "x" })
    assert.are.same({ "slow", 2 }, { res.body, res.attempts })
    local after = stats()
    assert.are.equal(suppressed.handler_runs + 1, after.handler_runs)
  end)

  it("counts hedges against the retry budget", function()
    -- A ratio budget with nothing to spend: no hedge.
    local client = resilua.client{ name = "hedge-budget", policy = policy("broke",
      [[budget = { kind = "ratio", ratio = 0, min_per_s = 0 }, hedge = { after_ms = 100, max = 2 }]]) }
    local res = assert(client:call{ url = server.url .. "/d" })
    assert.are.same({ "slow", 1 }, { res.body, res.attempts })
  end)

  it("after_ms = \"p95\" waits for the client's recent p95", function()
    local client = resilua.client{ name = "hedge-p95", policy = policy("p95",
      [[budget = false, hedge = { after_ms = "p95", max = 2 }]]) }
    -- Too few answers yet to know a p95: no hedge.
    local res = assert(client:call{ url = server.url .. "/e" })
    assert.are.same({ "slow", 1 }, { res.body, res.attempts })
    for _ = 1, 30 do assert(client:call{ url = server.url .. "/fast" }) end
    res = assert(client:call{ url = server.url .. "/f" })
    assert.are.same({ "hedge", 2 }, { res.body, res.attempts })
  end)

  it("is checked like any policy field", function()
    local p = require "resilua.policy"
    local _, err = p.load(write("bad_after", [[return { hedge = { after_ms = "p99" } }]]))
    assert.matches("hedge.after_ms must be a number", err)
    _, err = p.load(write("bad_max", [[return { hedge = { max = 9 } }]]))
    assert.matches("hedge.max must be in %[2, 4%]", err)
    local ok = assert(p.load(write("hedge_defaults", [[return { hedge = {} }]])))
    assert.are.same({ after_ms = "p95", max = 2 }, ok.table.hedge)
  end)
end)
