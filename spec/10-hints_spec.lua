--- Server signals, normalised (a.server): table-driven hint parsing and the
-- built-in rules' use of them through core.decide; 409/422 against a real
-- `resilua serve` with idempotency keys; and the retry-ratio budget (budget
-- kind "ratio") end to end.
local resilua = require "resilua"
local core = require "resilua.core"
local helpers = require "helpers"
local policy = resilua.policy

local dir = helpers.tmpdir()
local log = dir .. "/events.jsonl"
setup(function() resilua.log(log) end)
teardown(function() resilua.log("-") end)

local policy_file = helpers.policy_writer(dir)

local function load(name) return assert(policy.load(name, { dir, "policies" })) end

describe("a.server", function()
  -- decide hands a.server back through reason, as "k=v k=v" sorted.
  policy_file("echo", [[
    return { decide = function(a)
      local keys, out = {}, {}
      for k in pairs(a.server) do keys[#keys + 1] = k end
      table.sort(keys)
      for _, k in ipairs(keys) do out[#out + 1] = k .. "=" .. tostring(a.server[k]) end
      return { retry = false, reason = table.concat(out, " ") }
    end }]])

  local function server_of(a)
    local reason = core.decide(load("echo").core, a).reason
    local t = {}
    for k, v in reason:gmatch("(%S+)=(%S+)") do
      t[k] = v == "true" or (v ~= "false" and (tonumber(v) or v))
    end
    return t
  end

  local now = os.time()
  -- response (status 503 unless given), expected a.server (a number or {lo, hi})
  local CASES = {
    { { ["retry-after"] = "3" }, { retry_after_ms = 3000, retry_after_from = "retry-after", wait_ms = 3000 } },
    { { ["Retry-After-Ms"] = "1500" },
      { retry_after_ms = 1500, retry_after_from = "retry-after-ms", wait_ms = 1500 } },
    { { ["x-amz-retry-after"] = "250" },
      { retry_after_ms = 250, retry_after_from = "x-amz-retry-after", wait_ms = 250 } },
    { { ["retry-after"] = "2", ["retry-after-ms"] = "10", ["x-amz-retry-after"] = "20" },
      { retry_after_ms = 2000, retry_after_from = "retry-after", wait_ms = 2000 } },
    { { ["retry-after-ms"] = "abc" }, {} },
    { { ["retry-after-ms"] = "1e3" }, {} },
    { { ["retry-after-ms"] = "-5" }, {} },
    { { ["retry-after-ms"] = "0x10" }, {} },
    { { ["retry-after-ms"] = "999999999999" }, {} },
    { { ["retry-after-ms"] = ("9"):rep(300) }, {} },
    -- X-RateLimit-Reset: delta seconds, or epoch seconds against the clock
    { { ["x-ratelimit-reset"] = "30", ["x-ratelimit-remaining"] = "0" },
      { reset_ms = 30000, remaining = 0, wait_ms = 30000 } },
    { { ["x-ratelimit-reset"] = tostring(now + 20), ["x-ratelimit-remaining"] = "0" },
      { reset_ms = { 18000, 21000 }, remaining = 0, wait_ms = { 18000, 21000 } } },
    { { ["x-ratelimit-reset"] = tostring(now - 100) }, { reset_ms = 0 } },
    -- a reset with requests left is information, not a wait ...
    { { ["x-ratelimit-reset"] = "30", ["x-ratelimit-remaining"] = "5" }, { reset_ms = 30000, remaining = 5 } },
    -- ... unless the answer is a 429
    { { ["x-ratelimit-reset"] = "30" }, { reset_ms = 30000, wait_ms = 30000 }, 429 },
    -- IETF RateLimit / RateLimit-Policy (structured fields, and the older drafts)
    { { ratelimit = '"default";r=0;t=12' }, { remaining = 0, reset_ms = 12000, wait_ms = 12000 } },
    { { ratelimit = '"burst";r=5;t=1, "day";r=0;t=3600' },
      { remaining = 0, reset_ms = 3600000, wait_ms = 3600000 } },
    { { ratelimit = "limit=100, remaining=0, reset=7" }, { remaining = 0, reset_ms = 7000, wait_ms = 7000 } },
    { { ["ratelimit-policy"] = '"burst";q=100;w=60, "day";q=1000;w=86400' }, { quota = 100, window_s = 60 } },
    { { ["ratelimit-policy"] = "10;w=1" }, { quota = 10, window_s = 1 } },
    { { ratelimit = '"x";r=abc;t=' }, {} },
    -- gRPC pushback: a wait, or (negative, malformed) do not retry
    { { ["grpc-retry-pushback-ms"] = "200" }, { pushback_ms = 200, wait_ms = 200 } },
    { { ["grpc-retry-pushback-ms"] = "-1" }, { pushback_stop = true } },
    { { ["grpc-retry-pushback-ms"] = "soon" }, { pushback_stop = true } },
    { { ["x-should-retry"] = "true" }, { should_retry = true } },
    { { ["X-Should-Retry"] = "FALSE" }, { should_retry = false } },
    { { ["x-should-retry"] = "maybe" }, {} },
    { {}, {} },
  }

  for i, case in ipairs(CASES) do
    local headers, want, status = case[1], case[2], case[3] or 503
    local names = {}
    for k, v in pairs(headers) do names[#names + 1] = k .. ": " .. v:sub(1, 40) end
    table.sort(names)
    it(("case %d: %s"):format(i, table.concat(names, ", ")), function()
      local got = server_of({ status = status, headers = headers })
      for k, v in pairs(want) do
        if type(v) == "table" then
          assert.is_true(type(got[k]) == "number" and got[k] >= v[1] and got[k] <= v[2],
                         ("%s = %s, want in [%s, %s]"):format(k, tostring(got[k]), v[1], v[2]))
          got[k] = nil
        end
      end
      for k, v in pairs(want) do if type(v) == "table" then want[k] = nil end end
      assert.same(want, got)
    end)
  end

  it("is an empty table for an error without a response", function()
    assert.same({}, server_of({ error = "reset" }))
  end)
end)

describe("the built-in rules with server signals", function()
  policy_file("plain", [[
    return { backoff = { base_ms = 10, max_ms = 10, jitter = "none" }, breaker = false, budget = false }]])
  policy_file("plain422", [[
    return { backoff = { base_ms = 10, max_ms = 10, jitter = "none" }, breaker = false, budget = false,
             retry_on = { status = { 422, 503 } } }]])

  -- policy, attempt, expected decision
  local CASES = {
    { "plain", { status = 404, headers = { ["x-should-retry"] = "true" } },
      { retry = true, delay_ms = 10, reason = "x-should-retry: true" } },
    { "plain", { status = 503, headers = { ["x-should-retry"] = "true" } },
      { retry = true, delay_ms = 10, reason = "status 503 in retry_on" } },
    { "plain", { status = 503, headers = { ["x-should-retry"] = "false" } },
      { retry = false, reason = "x-should-retry: false" } },
    { "plain", { status = 503, headers = { ["grpc-retry-pushback-ms"] = "300" } },
      { retry = true, delay_ms = 300, reason = "grpc-retry-pushback-ms 300" } },
    { "plain", { status = 503, headers = { ["grpc-retry-pushback-ms"] = "-1" } },
      { retry = false } },
    { "plain", { status = 404, headers = { ["grpc-retry-pushback-ms"] = "300" } }, { retry = false } },
    { "plain", { status = 409, idempotency_key = "k1" },
      { retry = true, delay_ms = 10, reason = "status 409 with idempotency key: first attempt still running" } },
    { "plain", { status = 409 }, { retry = false } },
    { "plain", { status = 409, idempotency_key = "k1", headers = { ["x-should-retry"] = "false" } },
      { retry = false } },
    { "plain422", { status = 422 }, { retry = true } },
    { "plain422", { status = 422, idempotency_key = true, headers = { ["x-should-retry"] = "true" } },
      { retry = false, reason = "status 422 with idempotency key: key reused with another payload" } },
  }
  for i, case in ipairs(CASES) do
    it(("case %d: %s %s"):format(i, case[1], case[2].status), function()
      local d = core.decide(load(case[1]).core, case[2])
      for k, v in pairs(case[3]) do assert.equal(v, d[k], k) end
    end)
  end
end)

describe("idempotency-aware statuses against resilua serve", function()
  local server
  setup(function()
    server = helpers.start_server [[
      local seen = {}
      return function(req)
        if req.path == "/slow" then return { status = 200, body = "done", delay_ms = 1500 } end
        if req.path:match("^/wait/") then
          seen[req.path] = (seen[req.path] or 0) + 1
          if seen[req.path] == 1 then return { status = 503, headers = { ["Retry-After-Ms"] = "300" } } end
        end
        if req.path == "/no" then return { status = 503, headers = { ["X-Should-Retry"] = "false" } } end
        return { status = 200, body = "ok" }
      end]]
  end)
  teardown(function() server:stop() end)

  it("retries a 409 with the same key until the first attempt's answer is stored", function()
    local client = resilua.client{ name = "hints-409", policy = policy_file("keyed", [[
      -- /slow answers after 1.5 s: the first try (0.5 s) times out, the next
      -- ones meet the key in flight; each answer has 0.5 s on a loaded machine
      return { max_attempts = 8, per_try_timeout_ms = 500, deadline_ms = 6000,
               backoff = { base_ms = 300, max_ms = 300, jitter = "none" },
               retry_on = { status = { 503 }, errors = { "timeout" } },
               breaker = false, budget = false }]]) }
    local res = assert(client:call{ method = "POST", url = server.url .. "/slow", body = "x" })
    assert.equal(200, res.status)
    assert.equal("done", res.body)
    local attempts = {}
    for _, e in ipairs(helpers.of_kind(helpers.events(log), "attempt")) do
      if e.call_id == res.call_id then attempts[#attempts + 1] = e end
    end
    assert.equal("timeout", attempts[1].error)
    local saw409 = false
    for _, e in ipairs(attempts) do
      assert.equal(attempts[1].idempotency_key, e.idempotency_key)
      if e.status == 409 then
        saw409 = true
        assert.equal("retry", e.decision)
        assert.matches("^status 409 with idempotency key", e.reason)
      end
    end
    assert.is_true(saw409)
    -- the handler ran once: every retry met the same key
    local r = helpers.curl(helpers.quote(server.url .. "/_stats"))
    local stats = require("cjson").decode(r.body)
    assert.equal(1, stats.handler_runs)
    assert.is_true(stats.conflicts >= 1)
  end)

  it("waits what retry-after-ms asks, and stops on x-should-retry: false, over the wire", function()
    local client = resilua.client{ name = "hints-wire", policy = policy_file("wire", [[
      return { backoff = { base_ms = 1, max_ms = 1, jitter = "none" }, breaker = false, budget = false }]]) }
    local res = assert(client:call{ url = server.url .. "/wait/a" })
    assert.equal(2, res.attempts)
    assert.is_true(res.elapsed_ms >= 300, tostring(res.elapsed_ms))
    local _, err = client:call{ url = server.url .. "/no" }
    assert.equal("failed", err.outcome)
    assert.equal(1, err.attempts)
  end)

  it("never retries a 422 (the key reused with another payload)", function()
    local client = resilua.client{ name = "hints-422", policy = policy_file("keyed422", [[
      return { max_attempts = 4, backoff = { base_ms = 1, max_ms = 1, jitter = "none" },
               retry_on = { status = { 422, 503 } }, breaker = false, budget = false }]]) }
    local headers = { ["Idempotency-Key"] = "spec-10-reused" }
    assert(client:call{ method = "POST", url = server.url .. "/p", headers = headers, body = "one" })
    local _, err = client:call{ method = "POST", url = server.url .. "/p", headers = headers, body = "two" }
    assert.equal("failed", err.outcome)
    assert.equal(422, err.status)
    assert.equal(1, err.attempts)
  end)
end)

describe("the retry-ratio budget (budget kind 'ratio')", function()
  local server
  setup(function()
    server = helpers.start_server [[
      return function(req)
        if req.path == "/ok" then return { status = 200 } end
        return { status = 503 }
      end]]
  end)
  teardown(function() server:stop() end)

  it("allows ratio x requests plus min_per_s x ttl retries over the window", function()
    local client = resilua.client{ name = "ratio-math", policy = policy_file("ratio", [[
      return { max_attempts = 5, backoff = { base_ms = 0, max_ms = 0, jitter = "none" },
               breaker = false,
               budget = { kind = "ratio", ratio = 0.5, ttl_ms = 10000, min_per_s = 0.1 } }]]) }
    local url = server.url
    -- the reserve: 0.1/s x 10 s = 1 retry
    assert.same({ 1, 1 }, { client:budget() })
    -- request 1: 1 + 0.5 -> one retry (0.5 left), then refused
    local _, err = client:call{ url = url .. "/down" }
    assert.equal("budget", err.outcome)
    assert.equal(2, err.attempts)
    assert.same({ 0.5, 1.5 }, { client:budget() })
    -- a success is a request too: +0.5
    assert(client:call{ url = url .. "/ok" })
    assert.same({ 1, 2 }, { client:budget() })
    -- 1 + 0.5 = 1.5: one retry
    _, err = client:call{ url = url .. "/down" }
    assert.equal(2, err.attempts)
    assert.same({ 0.5, 2.5 }, { client:budget() })
    -- 0.5 + 0.5 = 1: one retry, none left
    _, err = client:call{ url = url .. "/down" }
    assert.equal(2, err.attempts)
    assert.same({ 0, 3 }, { client:budget() })
    -- 0.5: no retry at all
    _, err = client:call{ url = url .. "/down" }
    assert.equal("budget", err.outcome)
    assert.equal(1, err.attempts)
    local logged = helpers.of_kind(helpers.events(log), "attempt")
    assert.matches("^budget 0%.5/", logged[#logged].reason)
  end)

  it("forgets requests and retries older than ttl_ms", function()
    local client = resilua.client{ name = "ratio-ttl", policy = policy_file("ratio_ttl", [[
      return { max_attempts = 5, backoff = { base_ms = 0, max_ms = 0, jitter = "none" },
               breaker = false, budget = { kind = "ratio", ratio = 0, ttl_ms = 4000, min_per_s = 0.5 } }]]) }
    -- A 4 s window (the second call must come inside it, even on a loaded
    -- machine); the sleep past it is a lower bound, which load cannot break.
    local _, err = client:call{ url = server.url .. "/down" }
    assert.equal(3, err.attempts) -- 0.5 retries a second, 4 s window: 2
    _, err = client:call{ url = server.url .. "/down" }
    assert.equal(1, err.attempts)
    helpers.sleep(4.15)
    _, err = client:call{ url = server.url .. "/down" }
    assert.equal(3, err.attempts)
  end)

  it("is validated", function()
    local _, err = policy.load(policy_file("ratio_bad1", [[
      return { budget = { ratio = 0.2 } }]]), { dir })
    assert.matches('budget%.ratio needs budget%.kind = "ratio"', err)
    _, err = policy.load(policy_file("ratio_bad2", [[
      return { budget = { kind = "ratio", ttl_ms = 10 } }]]), { dir })
    assert.matches("ttl_ms", err)
    _, err = policy.load(policy_file("ratio_bad3", [[
      return { budget = { kind = "quota", min_per_s = 1 } }]]), { dir })
    assert.matches('budget%.min_per_s needs budget%.kind = "ratio"', err)
    assert(policy.load(policy_file("ratio_ok", [[
      return { budget = { kind = "ratio", ratio = 0.2, ttl_ms = 10000, min_per_s = 10 } }]]), { dir }))
  end)
end)
