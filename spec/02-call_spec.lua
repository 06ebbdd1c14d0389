-- `resilua call` against a real `resilua serve` on 127.0.0.1: retries,
-- timeouts, deadline, Retry-After, idempotency keys, the event log, exit
-- codes (contracts 2, 3 and 4; the seed's checklist).
local helpers = require "helpers"

local dir = helpers.tmpdir()
local n_policy = 0

-- A policy file from source; returns its path.
local function policy(src)
  n_policy = n_policy + 1
  local path = ("%s/p%d.lua"):format(dir, n_policy)
  helpers.write_file(path, src)
  return path
end

-- Runs `resilua call` with the log in a file; returns result and events.
local function call(args, stdin)
  local log = os.tmpname()
  local argv = { helpers.bin, "call", "--log", log }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local r = helpers.run(argv, stdin)
  r.raw = helpers.read_file(log)
  r.events = helpers.events(log)
  r.attempts = helpers.of_kind(r.events, "attempt")
  r.call = helpers.of_kind(r.events, "call")[1]
  os.remove(log)
  return r
end

local FAST = policy [[return { backoff = { base_ms = 10, max_ms = 50, jitter = "none" }, breaker = false }]]

describe("resilua call", function()
  local server
  setup(function()
    server = helpers.start_server [[
      local seen = {}
      return function(req)
        local path = req.path
        seen[path] = (seen[path] or 0) + 1
        local n = seen[path]
        local code = tonumber(path:match("^/status/(%d+)$"))
        if code then return { status = code, body = "status " .. code } end
        local fails = tonumber(path:match("^/flaky/(%d+)"))
        if fails then
          if n <= fails then return { status = 503, body = "busy" } end
          return { status = 200, body = "ok after " .. n }
        end
        if path == "/slow" then return { status = 200, body = "late", delay_ms = 3000 } end
        if path == "/slower" then return { status = 200, body = "late", delay_ms = 10000 } end
        if path == "/retry-after" then
          if n == 1 then return { status = 503, headers = { ["Retry-After"] = "1" } } end
          return { status = 200, body = "waited" }
        end
        if path == "/retry-after-date" then
          if n == 1 then
            return { status = 503, headers = { ["Retry-After"] = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + 3) } }
          end
          return { status = 200, body = "waited" }
        end
        if path == "/retry-after-long" then return { status = 503, headers = { ["Retry-After"] = "20" } } end
        if path == "/reset" then
          if n == 1 then return { action = "reset" } end
          return { status = 200, body = "after reset" }
        end
        if path == "/close" then
          if n == 1 then return { action = "close" } end
          return { status = 200, body = "after close" }
        end
        if path == "/big" then return { status = 200, body = string.rep("x", 100000) } end
        if path:match("^/keys") then
          return { status = n < 3 and 503 or 200, body = req.headers["idempotency-key"] or "none" }
        end
        if path == "/echo" then return { status = 200, body = req.method .. " " .. req.body } end
        return { status = 404 }
      end]]
  end)
  teardown(function() server:stop() end)

  it("succeeds after transient failures, logging every attempt", function()
    local r = call({ "--policy", FAST, server.url .. "/flaky/2" })
    assert.equal(0, r.code)
    assert.equal("ok after 3", r.stdout)
    assert.equal(3, #r.attempts)
    for i, a in ipairs(r.attempts) do
      assert.equal(i, a.attempt)
      assert.equal(i < 3 and 503 or 200, a.status)
      assert.equal(i < 3 and "retry" or "ok", a.decision)
      assert.is_number(a.latency_ms)
      assert.equal(r.call.call_id, a.call_id)
      assert.equal("GET", a.method)
      assert.equal(server.url .. "/flaky/2", a.url)
      assert.is_string(a.policy_version)
      assert.equal("p1", a.policy)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", a.ts)
    end
    assert.equal("status 503 in retry_on", r.attempts[1].reason)
    local loaded = helpers.of_kind(r.events, "policy")[1]
    assert.same({ name = "p1", path = FAST, version = r.attempts[1].policy_version, ok = true },
      { name = loaded.name, path = loaded.path, version = loaded.version, ok = loaded.ok })
    assert.same({ event = "call", outcome = "ok", attempts = 3, status = 200 },
      { event = r.call.event, outcome = r.call.outcome, attempts = r.call.attempts, status = r.call.status })
  end)

  for _, code in ipairs({ 400, 401, 403, 404, 409, 422 }) do
    it(("does not retry %d and exits 3"):format(code), function()
      local r = call({ "--policy", FAST, server.url .. "/status/" .. code })
      assert.equal(3, r.code)
      assert.equal(1, #r.attempts)
      assert.equal("stop", r.attempts[1].decision)
      assert.equal("failed", r.call.outcome)
      assert.equal("status " .. code, r.stdout)
      assert.matches("failed: HTTP " .. code, r.stderr)
    end)
  end

  for _, code in ipairs({ 429, 500, 502, 503, 504 }) do
    it(("retries %d until max_attempts, then exits 4 (gave up)"):format(code), function()
      local r = call({ "--policy", FAST, server.url .. "/status/" .. code })
      assert.equal(4, r.code)
      assert.equal(4, #r.attempts)
      assert.equal("gave_up", r.call.outcome)
      assert.equal("max_attempts 4 reached", r.attempts[4].reason)
    end)
  end

  it("doubles the backoff per attempt (jitter none) and jitters it by default", function()
    local p = policy [[return { max_attempts = 4, backoff = { base_ms = 20, max_ms = 1000, jitter = "none" } }]]
    local r = call({ "--policy", p, server.url .. "/status/500" })
    assert.same({ 20, 40, 80, 0 }, { r.attempts[1].delay_ms, r.attempts[2].delay_ms,
                                     r.attempts[3].delay_ms, r.attempts[4].delay_ms })
    local j = policy [[return { backoff = { base_ms = 20, max_ms = 1000 } }]]
    local delays = {}
    for _ = 1, 3 do
      local rr = call({ "--policy", j, server.url .. "/status/500" })
      for i = 1, 3 do
        local d = rr.attempts[i].delay_ms
        assert.is_true(d >= 0 and d <= 20 * 2 ^ (i - 1))
        delays[#delays + 1] = d
      end
    end
    table.sort(delays)
    assert.is_true(delays[1] ~= delays[#delays])
  end)

  it("makes the jitter reproducible with --seed", function()
    local function delays(seed)
      local r = call({ "--seed", seed, server.url .. "/status/502", "--policy",
                       policy [[return { backoff = { base_ms = 5, max_ms = 100 } }]] })
      return { r.attempts[1].delay_ms, r.attempts[2].delay_ms, r.attempts[3].delay_ms }
    end
    assert.same(delays("7"), delays("7"))
  end)

  it("enforces the per-try timeout and retries timeouts", function()
    local p = policy [[return { per_try_timeout_ms = 200, max_attempts = 2,
                               retry_on = { errors = { "timeout" } },
                               backoff = { base_ms = 10, jitter = "none" } }]]
    local r = call({ "--policy", p, server.url .. "/slow" })
    assert.equal(4, r.code)
    assert.equal(2, #r.attempts)
    for _, a in ipairs(r.attempts) do
      assert.equal("timeout", a.error)
      assert.is_nil(a.status)
      -- a timer never fires early; the upper bound is the server's 3 s answer
      -- (loose: the "timeout" error above is what shows the timeout fired)
      assert.is_true(a.latency_ms >= 190 and a.latency_ms < 3000, a.latency_ms)
    end
    assert.equal("error timeout in retry_on", r.attempts[1].reason)
  end)

  it("ends the call at the deadline, attempts and waits together", function()
    local p = policy [[return { deadline_ms = 500, max_attempts = 10,
                               backoff = { base_ms = 150, max_ms = 150, jitter = "none" } }]]
    local r = call({ "--policy", p, server.url .. "/status/503" })
    assert.equal(4, r.code)
    assert.equal("deadline", r.call.outcome)
    -- waits of 150 ms never end early, so a 500 ms deadline allows 4 attempts
    -- at most (10 without it); fewer if a loaded machine makes attempts slow
    assert.is_true(#r.attempts >= 1 and #r.attempts <= 4, #r.attempts)
    assert.is_true(r.call.elapsed_ms < 10000) -- liveness only
    assert.matches("^deadline", r.attempts[#r.attempts].reason)
  end)

  it("clips the last attempt's timeout to the deadline", function()
    local p = policy [[return { deadline_ms = 300, per_try_timeout_ms = 8000,
                               retry_on = { errors = { "timeout" } } }]]
    local r = call({ "--policy", p, server.url .. "/slower" })
    assert.equal(4, r.code)
    assert.equal("deadline", r.call.outcome)
    -- unclipped, the attempt would time out after 8 s (a timer never fires
    -- early); clipped, after 0.3 s: 7 s of slack for a loaded machine
    assert.is_true(r.call.elapsed_ms < 7000, r.call.elapsed_ms)
  end)

  it("ends with outcome deadline when the clipped attempt times out, retried or not", function()
    -- The default retry_on has no timeouts: the policy says "stop", but the
    -- attempt's timeout was the deadline's, so the call is not "failed"
    -- (exit 3, not retriable): it ran out of time (exit 4).  Seen under
    -- load, where the last attempt of a deadline-bound call started late.
    local p = policy [[return { deadline_ms = 300, per_try_timeout_ms = 8000, breaker = false }]]
    local r = call({ "--policy", p, server.url .. "/slower" })
    assert.equal(4, r.code)
    assert.equal("deadline", r.call.outcome)
    assert.equal(1, #r.attempts)
    assert.equal("timeout", r.attempts[1].error)
    assert.equal("deadline of 300 ms reached", r.attempts[1].reason)
  end)

  it("honours Retry-After in delta-seconds", function()
    local r = call({ "--policy", FAST, server.url .. "/retry-after" })
    assert.equal(0, r.code)
    assert.equal(1000, r.attempts[1].delay_ms)
    assert.equal("retry-after 1000 ms", r.attempts[1].reason)
    assert.is_true(r.call.elapsed_ms >= 1000)
  end)

  it("honours Retry-After as an HTTP-date", function()
    local r = call({ "--policy", FAST, server.url .. "/retry-after-date" })
    assert.equal(0, r.code)
    -- the date is 3 s ahead in whole seconds: 2000..3000 ms from the client's
    -- whole second, 1000 after a second's lag; the backoff alone is <= 50 ms
    assert.is_true(r.attempts[1].delay_ms >= 1000 and r.attempts[1].delay_ms <= 3000,
                   r.attempts[1].delay_ms)
    assert.matches("^retry%-after", r.attempts[1].reason)
  end)

  it("ends at once with outcome deadline when Retry-After passes the deadline", function()
    local p = policy [[return { deadline_ms = 5000, breaker = false }]]
    local r = call({ "--policy", p, server.url .. "/retry-after-long" })
    assert.equal(4, r.code)
    assert.equal("deadline", r.call.outcome)
    assert.equal(1, #r.attempts)
    -- at once: not after the 20 s Retry-After (nor the 5 s deadline)
    assert.is_true(r.call.elapsed_ms < 4000, r.call.elapsed_ms)
  end)

  it("gives up when Retry-After is over the policy's cap", function()
    local p = policy [[return { retry_after = { max_ms = 5000 }, deadline_ms = 60000 }]]
    local r = call({ "--policy", p, server.url .. "/retry-after-long" })
    assert.equal(4, r.code)
    assert.equal("gave_up", r.call.outcome)
    assert.equal("retry-after 20000 ms over the cap of 5000 ms", r.attempts[1].reason)
  end)

  it("classifies a reset and a closed connection as reset, and retries them", function()
    for _, path in ipairs({ "/reset", "/close" }) do
      local r = call({ "--policy", FAST, server.url .. path })
      assert.equal(0, r.code)
      assert.equal("reset", r.attempts[1].error)
      assert.equal("retry", r.attempts[1].decision)
    end
  end)

  it("classifies a refused connection as connect", function()
    local r = call({ "--policy", FAST, "http://127.0.0.1:1/" })
    assert.equal(4, r.code)
    assert.equal("connect", r.attempts[1].error)
    assert.matches("gave_up: connect", r.stderr)
  end)

  it("fails a response over the size limit as too_large without retrying", function()
    local p = policy [[return { max_response_bytes = 1000 }]]
    local r = call({ "--policy", p, server.url .. "/big" })
    assert.equal(3, r.code)
    assert.equal(1, #r.attempts)
    assert.equal("too_large", r.attempts[1].error)
  end)

  it("sends one Idempotency-Key per call, the same on every attempt of a POST", function()
    local r = call({ "--policy", FAST, "-X", "POST", "-d", "{}", server.url .. "/keys/a" })
    assert.equal(0, r.code)
    local key = r.attempts[1].idempotency_key
    assert.matches("^%x+%-%x+%-4%x+%-[89ab]%x+%-%x+$", key)
    assert.equal(36, #key)
    for _, a in ipairs(r.attempts) do assert.equal(key, a.idempotency_key) end
    assert.equal(key, r.stdout) -- what the server received
    local other = call({ "--policy", FAST, "-X", "POST", "-d", "{}", server.url .. "/keys/b" })
    assert.not_equal(key, other.stdout)
  end)

  it("sends no Idempotency-Key on GET, and keeps a key the caller set", function()
    local r = call({ "--policy", FAST, server.url .. "/keys/c" })
    assert.equal("none", r.stdout)
    assert.equal(require("cjson").null, r.attempts[1].idempotency_key)
    local mine = call({ "--policy", FAST, "-X", "POST", "-H", "Idempotency-Key: mine-1", server.url .. "/keys/d" })
    assert.equal("mine-1", mine.stdout)
  end)

  it("sends the body from -d, -d @file and -d @-", function()
    local file = dir .. "/body.json"
    helpers.write_file(file, '{"from":"file"}')
    assert.equal('POST {"from":"file"}', call({ "-d", "@" .. file, server.url .. "/echo" }).stdout)
    assert.equal("POST inline", call({ "-d", "inline", server.url .. "/echo" }).stdout)
    assert.equal("PUT from stdin", call({ "-X", "PUT", "-d", "@-", server.url .. "/echo" }, "from stdin").stdout)
  end)

  it("never logs credentials", function()
    local url = server.url:gsub("http://", "http://user:hunter2@") .. "/status/200"
    local r = call({ "-H", "Authorization: Bearer s3cr3t", "-H", "Cookie: id=s3cr3t", url })
    assert.equal(0, r.code)
    local raw = r.raw
    assert.is_nil(raw:find("hunter2", 1, true))
    assert.is_nil(raw:find("s3cr3t", 1, true))
    assert.truthy(raw:find("***@127.0.0.1", 1, true))
  end)

  it("ends with policy_error (exit 2) when decide raises, and logs where", function()
    local p = policy "return { decide = function(a)\n  error('boom')\nend }"
    local r = call({ "--policy", p, server.url .. "/status/503" })
    assert.equal(2, r.code)
    assert.equal("policy_error", r.call.outcome)
    assert.equal(1, #r.attempts)
    assert.truthy(r.attempts[1].reason:find(p .. ":2: boom", 1, true))
  end)

  it("ends with policy_error when decide loops forever, and keeps serving", function()
    local p = policy "return { decide = function(a) while true do end end }"
    local r = call({ "--policy", p, server.url .. "/status/503" })
    assert.equal(2, r.code)
    assert.matches("instruction limit exceeded", r.attempts[1].reason)
    assert.equal(0, call({ server.url .. "/status/200" }).code)
  end)

  it("uses a decide's decision and reason", function()
    local p = policy [[return { max_attempts = 3, decide = function(a)
      return { retry = a.status == 404, delay_ms = 5, reason = "404 means not yet" } end }]]
    local r = call({ "--policy", p, server.url .. "/status/404" })
    assert.equal(4, r.code)
    assert.equal(3, #r.attempts)
    assert.equal("404 means not yet", r.attempts[1].reason)
    assert.equal(5, r.attempts[1].delay_ms)
  end)
end)
