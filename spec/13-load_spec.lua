-- `resilua load` against a real `resilua serve`, and the latency histogram
-- (core.hist) through its binding.  Bounds are generous: these check what
-- is counted and from when, not how fast the machine is.
local helpers = require "helpers"
local cjson = require "cjson"
local core = require "resilua.core"

local function load(args)
  local argv = { helpers.bin, "load" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return helpers.run(argv)
end

local function load_json(args)
  table.insert(args, 1, "--json")
  local r = load(args)
  assert.are.equal(0, r.code, r.stderr)
  return cjson.decode(r.stdout)
end

describe("core.hist", function()
  -- The exact p-th percentile of sorted values, ranked as the histogram does.
  local function exact(sorted, p)
    return sorted[math.max(1, math.ceil(#sorted * p / 100))]
  end

  it("gives percentiles within 0.1 % of the exact ones", function()
    local h, vals = core.hist(), {}
    -- Spread over 4 decades, from 0.5 ms to 5 s, in a fixed shuffled order.
    for i = 1, 20000 do
      local v = 0.5 * 10 ^ (4 * ((i * 7919) % 20000) / 20000)
      vals[i] = v
      h:record(v)
    end
    table.sort(vals)
    for _, p in ipairs({ 1, 10, 50, 90, 95, 99, 99.9, 100 }) do
      local want, got = exact(vals, p), h:percentile(p)
      assert.is_true(math.abs(got - want) <= 0.001 * want,
                     ("p%s: %s vs exact %s"):format(p, got, want))
    end
    assert.are.equal(20000, h:count())
    assert.are.equal(vals[1], h:min())
    assert.are.equal(vals[#vals], h:max())
  end)

  it("merges: two halves give the same figures as the whole", function()
    local a, b, whole = core.hist(), core.hist(), core.hist()
    for i = 1, 5000 do
      local v = (i % 997) * 1.7 + 0.3
      whole:record(v)
      if i % 2 == 0 then a:record(v) else b:record(v) end
    end
    a:merge(b)
    assert.are.equal(whole:count(), a:count())
    assert.are.equal(whole:max(), a:max())
    assert.are.equal(whole:min(), a:min())
    assert.is_true(math.abs(whole:mean() - a:mean()) < 1e-9)
    for _, p in ipairs({ 50, 90, 99, 99.9 }) do
      assert.are.equal(whole:percentile(p), a:percentile(p))
    end
    a:reset()
    assert.are.equal(0, a:count())
    assert.are.equal(0, a:percentile(50))
  end)

  it("has a constant size, and keeps values up to an hour", function()
    local h = core.hist()
    local size = h:size()
    for i = 1, 100000 do h:record(i * 36) end -- up to 3.6e6 ms: 1 h
    assert.are.equal(size, h:size())
    assert.is_true(size < 256 * 1024, "size " .. size)
    assert.is_true(math.abs(h:max() - 3.6e6) < 1)
    assert.is_true(math.abs(h:percentile(50) - 1.8e6) <= 0.001 * 1.8e6)
    assert.has_error(function() h:percentile(101) end)
  end)
end)

describe("resilua load", function()
  local stub
  setup(function() stub = helpers.start_server() end)
  teardown(function() stub:stop() end)

  it("open loop: starts calls on schedule", function()
    local r = load_json({ "--rate", "200", "--duration", "2s", stub.url .. "/v1/predict" })
    assert.are.equal("open", r.mode)
    assert.are.equal(400, r.calls)
    -- Starts are on timers, which never fire early: 400 calls cannot take
    -- less than 2 s, so the rate cannot pass 200/s (a burst would).  The
    -- lower bound is liveness only: a loaded machine stretches the run.
    assert.is_true(r.achieved_rate > 40 and r.achieved_rate < 205, "rate " .. r.achieved_rate)
    assert.are.equal(1, r.success_rate)
    assert.are.equal(400, r.outcomes.ok)
    assert.are.equal(1, r.amplification)
    for _, k in ipairs({ "p50", "p90", "p95", "p99", "p999", "max" }) do
      assert.is_number(r.latency_ms[k], k)
    end
    assert.is_true(r.latency_ms.p50 <= r.latency_ms.p99 and r.latency_ms.p99 <= r.latency_ms.max)
    assert.are.equal(400, r.attempt_latency_ms.count)
    assert.are.equal(400, r.schedule_lag_ms.count)
    assert.are.equal(0, r.drops)
  end)

  it("closed loop: keeps C calls in flight for the duration", function()
    local r = load_json({ "--concurrency", "4", "--duration", "500ms", stub.url })
    assert.are.equal("closed", r.mode)
    assert.is_true(r.calls >= 4, "calls " .. r.calls)
    assert.are.equal(r.calls, r.outcomes.ok)
    assert.are.equal(r.calls, r.latency_ms.count)
    assert.is_nil(r.schedule_lag_ms)
  end)

  it("prints a summary for people", function()
    local r = load({ "--rate", "50", "--duration", "0.2", stub.url })
    assert.are.equal(0, r.code, r.stderr)
    for _, what in ipairs({ "calls", "outcomes", "success", "amplification", "status",
                            "p99%.9", "attempts", "start lag" }) do
      assert.matches(what, r.stdout)
    end
  end)

  it("shows live progress on a terminal for runs over 2 s, and not with --quiet", function()
    -- script(1) gives the run a pseudo-terminal.
    local function on_tty(extra)
      local cmd = ("%s load --rate 50 --duration 2.5 %s %s"):format(
        helpers.quote(helpers.bin), extra, stub.url)
      return helpers.run({ "script", "-qec", cmd, "/dev/null" }).stdout
    end
    local shown = on_tty("")
    assert.matches("%d+ s +%d+ calls +%d+ calls/s +%d+ in flight +[%d.]+ %% ok +p99 +[%d.]+ ms",
                   shown)
    local quiet = on_tty("--quiet")
    assert.matches("calls", quiet) -- the summary
    assert.is_nil(quiet:find("in flight", 1, true))
  end)

  describe("against an upstream that fails 30 % of first attempts", function()
    local flaky
    setup(function()
      flaky = helpers.start_server([[
        math.randomseed(7)
        local first = {}
        return function(req)
          local key = req.headers["idempotency-key"]
          if not first[key] then
            first[key] = true
            if math.random() < 0.3 then return { status = 503 } end
          end
          return { status = 200, body = "{}" }
        end]])
    end)
    teardown(function() flaky:stop() end)

    it("a policy without a budget: every call succeeds, with more attempts than calls", function()
      local dir = helpers.tmpdir()
      helpers.policy_writer(dir)("retry", [[
        return { max_attempts = 6, backoff = { base_ms = 5, max_ms = 20 },
                 budget = false, breaker = false }]])
      local r = load_json({ "--rate", "100", "--duration", "1s", "-X", "POST", "-d", "{}",
                            "--policy", "retry", "--policy-path", dir, flaky.url })
      assert.are.equal(100, r.calls)
      assert.are.equal(1, r.success_rate)
      assert.is_true(r.amplification > 1.1, "amplification " .. r.amplification)
      assert.are.equal(r.attempts, r.attempt_latency_ms.count)
      assert.is_true(r.statuses["200"] == 100)
    end)

    it("the default policy retries until its budget refuses, and counts both", function()
      -- gRPC throttling: each failure costs a token, each success earns 0.1,
      -- so at 30 % failures the bucket drains and retries stop.
      local r = load_json({ "--rate", "100", "--duration", "2s", "-X", "POST", "-d", "{}",
                            "--policy", "default", flaky.url })
      assert.are.equal("default", r.policy)
      assert.are.equal(200, r.calls)
      assert.is_true(r.amplification > 1, "amplification " .. r.amplification)
      assert.is_true(r.outcomes.ok > 100)
      local not_ok = r.calls - r.outcomes.ok
      assert.are.equal(not_ok, (r.latency_failed_ms or { count = 0 }).count)
      assert.are.equal(r.calls, r.latency_ms.count)
    end)
  end)

  it("open loop above capacity: latency grows from the intended start", function()
    -- One worker, 10 ms a request: 100/s of capacity, offered 200/s.
    local slow = helpers.start_server([[
      local core = require "resilua.core"
      local busy_until = 0
      return function(req)
        local now = core.now_ms()
        busy_until = math.max(now, busy_until) + 10
        return { status = 200, body = "{}", delay_ms = busy_until - now }
      end]])
    local open = load_json({ "--rate", "200", "--duration", "1s", "--policy", "no-retry",
                             slow.url })
    local closed = load_json({ "--concurrency", "1", "--duration", "500ms",
                               "--policy", "no-retry", slow.url })
    slow:stop()
    assert.are.equal(200, open.calls)
    assert.are.equal(200, open.latency_ms.count)
    -- The queue grows by ~100 requests a second: the last calls wait ~1 s.
    assert.is_true(open.latency_ms.p99 > 300, "open p99 " .. open.latency_ms.p99)
    assert.is_true(open.latency_ms.p50 > 50, "open p50 " .. open.latency_ms.p50)
    -- A closed loop paces itself to the upstream and sees only the service time.
    assert.is_true(closed.latency_ms.p50 < open.latency_ms.p50 / 2,
                   ("closed p50 %s vs open p50 %s"):format(closed.latency_ms.p50, open.latency_ms.p50))
  end)

  it("--connections caps the attempts on the wire; the others wait their turn", function()
    local slow = helpers.start_server([[
      return function() return { status = 200, body = "ok", delay_ms = 50 } end
    ]])
    -- (--timeout 30s: the last calls wait 2 s for the wire, more on a loaded
    -- machine, and a waiting attempt times out on its per-try timeout; with
    -- the default 2 s, 2 of 40 failed under load)
    local r = load_json({ "--rate", "40", "--duration", "1", "--connections", "1",
                          "--timeout", "30s", slow.url })
    local stats = cjson.decode(helpers.curl(slow.url .. "/_stats").body)
    slow:stop()
    assert.are.equal(40, r.calls)
    assert.are.equal(1, r.success_rate)
    -- One at a time: 40 x 50 ms, so the last calls waited about a second.
    assert.is_true(r.latency_ms.max > 500, r.latency_ms.max)
    assert.is_true(stats.connections <= 2, stats.connections)
  end)

  describe("against an upstream that always fails", function()
    local down
    setup(function()
      down = helpers.start_server("return function() return { status = 503 } end")
    end)
    teardown(function() down:stop() end)

    it("sends every call by default (no-retry), and says which policy ran", function()
      -- The default policy's breaker would fail almost every call fast.
      local r = load_json({ "--rate", "100", "--duration", "1", down.url })
      assert.are.equal("no-retry", r.policy)
      assert.are.equal(100, r.calls)
      assert.are.equal(100, r.statuses["503"])
      assert.are.equal(100, r.attempts)
      local text = load({ "--rate", "20", "--duration", "0.5", down.url })
      assert.matches("\npolicy +no%-retry\n", text.stdout)
      -- The default policy opens its breaker: most calls send nothing.
      local d = load_json({ "--rate", "100", "--duration", "1", "--policy", "default", down.url })
      assert.is_true(d.outcomes.breaker_open > 50, d.outcomes.breaker_open)
    end)

    it("--attempts, --no-breaker and --no-budget override the policy for the run", function()
      local r = load_json({ "--rate", "20", "--duration", "1", "--policy", "default",
                            "--attempts", "2", "--no-breaker", "--no-budget", down.url })
      assert.same({ "--attempts 2", "--no-breaker", "--no-budget" }, r.policy_overrides)
      -- Every call made its 2 attempts: no breaker failed one fast, no
      -- budget refused a retry.
      assert.are.equal(20, r.calls)
      assert.same({ ["2"] = 20 }, r.attempts_per_call)
      assert.same({ gave_up = 20 }, r.outcomes)
      local text = load({ "--rate", "20", "--duration", "0.5", "--attempts", "2", down.url })
      assert.matches("policy +no%-retry %(%-%-attempts 2%)", text.stdout)
    end)
  end)

  it("--timeout and --deadline cut a slow upstream's calls", function()
    local slow = helpers.start_server([[
      return function() return { status = 200, body = "late", delay_ms = 5000 } end]])
    local r = load_json({ "--concurrency", "2", "--duration", "0.2", "--timeout", "100ms",
                          slow.url })
    assert.is_true(r.calls >= 2, r.calls)
    assert.are.equal(r.calls, r.errors.timeout)
    -- (aws-standard retries timeouts; the default does not)
    local d = load_json({ "--concurrency", "2", "--duration", "0.2", "--policy", "aws-standard",
                          "--no-breaker", "--no-budget", "--timeout", "100ms",
                          "--deadline", "250ms", slow.url })
    slow:stop()
    -- Tries of 100 ms inside 250 ms: the deadline ends each call.
    assert.are.equal(d.calls, (d.outcomes.deadline or 0) + (d.outcomes.gave_up or 0))
    assert.is_true(d.latency_ms.max < 4000, d.latency_ms.max)
  end)

  it("on a signal: the summary of what ran, its rate over the time it ran, exit 1", function()
    local function requests()
      return cjson.decode(helpers.curl(stub.url .. "/_stats").body).requests or 0
    end
    for _, sig in ipairs({ "INT", "HUP", "TERM" }) do
      local before = requests()
      local p = helpers.spawn({ helpers.bin, "load", "--json", "--rate", "100", "--duration", "60s",
                                stub.url })
      -- Once its calls reach the upstream, however slowly the process started.
      assert.truthy(helpers.wait_until(function() return requests() > before end, 30))
      p:signal(sig)
      assert.are.equal(1, p:wait(30), p:stderr())
      local r = cjson.decode(p:stdout())
      assert.are.equal("SIG" .. sig, r.interrupted)
      assert.is_true(r.calls > 0 and r.calls < 6000, r.calls)
      -- The rate is the calls over the time it ran, not over the 60 s asked.
      assert.is_true(r.elapsed_s < 50, r.elapsed_s)
      assert.is_true(math.abs(r.achieved_rate - r.calls / r.elapsed_s) < 0.25 * r.achieved_rate,
                     ("achieved %s, %d calls in %s s"):format(r.achieved_rate, r.calls, r.elapsed_s))
    end
  end)

  it("--json: keys in a stable order, numbers rounded", function()
    local r = load({ "--json", "--rate", "50", "--duration", "0.2", stub.url })
    assert.are.equal(0, r.code, r.stderr)
    local keys = {}
    for k in r.stdout:gmatch('"([%w_]+)":') do keys[#keys + 1] = k end
    local pos = {}
    for i, k in ipairs(keys) do pos[k] = pos[k] or i end
    for _, pair in ipairs({ { "url", "policy" }, { "policy", "mode" }, { "mode", "calls" },
                            { "calls", "achieved_rate" }, { "latency_ms", "latency_ok_ms" },
                            { "p50", "p90" }, { "p99", "p999" }, { "p999", "max" } }) do
      assert.is_true(pos[pair[1]] < pos[pair[2]], pair[1] .. " before " .. pair[2])
    end
    assert.are.equal(1, r.stdout:find('{"url":', 1, true))
    -- Numbers >= 1 to 3 decimals at most; below 1, 4 significant digits.
    assert.is_nil(r.stdout:find("[:,%[][1-9]%d*%.%d%d%d%d"), r.stdout)
    assert.is_nil(r.stdout:find("[:,%[]0%.0*[1-9]%d%d%d%d"), r.stdout)
    assert.are.equal(10, cjson.decode(r.stdout).calls)
  end)

  describe("usage errors exit 2 and name the flag", function()
    for _, case in ipairs({
      { { "--rate", "0", "http://x" }, "%-%-rate" },
      { { "--rate", "abc", "http://x" }, "%-%-rate" },
      { { "--concurrency", "0", "http://x" }, "%-%-concurrency" },
      { { "--rate", "10", "--concurrency", "2", "http://x" }, "%-%-rate" },
      { { "--rate", "10", "--duration", "soon", "http://x" }, "%-%-duration" },
      { { "--rate", "10", "--seed", "x", "http://x" }, "%-%-seed" },
      { { "--rate", "10", "--bogus", "http://x" }, "%-%-bogus" },
      { { "--rate", "10", "--max-in-flight", "0", "http://x" }, "%-%-max%-in%-flight" },
      { { "--rate", "10", "--connections", "x", "http://x" }, "%-%-connections" },
      { { "--rate", "10", "-H", "nocolon", "http://x" }, "%-H" },
      { { "--rate", "10", "--policy", "no-such-policy", "http://x" }, "%-%-policy" },
      { { "--rate", "10" }, "URL" },
      { { "--rate", "10", "--timeout", "soon", "http://x" }, "%-%-timeout" },
      { { "--rate", "10", "--deadline", "-1", "http://x" }, "%-%-deadline" },
      { { "--rate", "10", "--attempts", "0", "http://x" }, "%-%-attempts" },
      { { "--rate", "10", "--attempts", "101", "http://x" }, "%-%-attempts" },
      { { "--rate", "10", "--no-budget=1", "http://x" }, "%-%-no%-budget" },
    }) do
      it(table.concat(case[1], " "), function()
        local r = load(case[1])
        assert.are.equal(2, r.code)
        assert.matches(case[2], r.stderr)
      end)
    end
  end)

  it("--help exits 0", function()
    local r = load({ "--help" })
    assert.are.equal(0, r.code)
    assert.matches("%-%-rate", r.stdout)
  end)
end)
