-- `resilua plan`: an SLO and an upstream profile in, ranked retry plans
-- out, each simulated on the real call state machine (virtual clock);
-- --write, --verify, and the profile from `resilua load --json` or an
-- event log.
local helpers = require "helpers"

local dir = helpers.tmpdir()
local PROFILE = helpers.write_file(dir .. "/profile.lua", [[
  return { service_ms = { dist = "lognormal", median = 185, sigma = 0.8 },
           faults = { { p = 0.06, status = 503 }, { p = 0.02, action = "hang" } } }]])

local function plan(args)
  local argv = { helpers.bin, "plan" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return helpers.run(argv)
end

local function ranked(stdout)
  local rows = {}
  for rank, success, p95, verdict in stdout:gmatch(
      "\n  (%d+) +[^\n]-ms +([%d.]+) +([%d.]+) +[%d.]+ +[%d.]+  (%a+)") do
    rows[#rows + 1] = { rank = tonumber(rank), success = tonumber(success), p95 = tonumber(p95),
                        met = verdict == "met" }
  end
  return rows
end

describe("resilua plan", function()
  it("ranks the plans that meet the SLO first, and writes the best as a policy", function()
    local best = dir .. "/best.lua"
    local r = plan({ "--slo", "p95<800ms", "--profile", PROFILE, "--calls", "2000",
                     "--write", best })
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("plans x 2000 simulated calls; SLO p95 < 800 ms", r.stdout)
    local rows = ranked(r.stdout)
    assert.are.equal(10, #rows)
    assert.is_true(rows[1].met and rows[1].p95 < 800)
    for i = 2, #rows do -- met before missed, then by success
      assert.is_true(rows[i - 1].met or not rows[i].met)
      if rows[i - 1].met == rows[i].met then assert.is_true(rows[i - 1].success >= rows[i].success) end
    end
    -- The written plan is a policy that loads, with what the table says.
    local check = helpers.run({ helpers.bin, "check", best })
    assert.are.equal(0, check.code, check.stderr)
    local src = helpers.read_file(best)
    assert.matches(("predicted success %.2f %%"):format(rows[1].success), src, 1, true)
  end)

  it("exits 6 when no plan can meet the SLO", function()
    local r = plan({ "--slo", "p95<5ms", "--profile", PROFILE, "--calls", "500" })
    assert.are.equal(6, r.code, r.stderr)
    assert.is_false(ranked(r.stdout)[1].met)
  end)

  it("reads the profile of a `resilua load --json` run", function()
    local json = helpers.write_file(dir .. "/load.json", [[
      { "calls": 1000, "statuses": { "200": 900, "503": 100 }, "errors": {},
        "latency_ms": { "p50": 40, "p95": 120, "p99": 300 } }]])
    local r = plan({ "--slo", "p99<400ms", "--profile", json, "--calls", "1000", "--top", "3" })
    assert.are.equal(0, r.code, r.stderr)
    local rows = ranked(r.stdout)
    assert.are.equal(3, #rows)
    -- 10 % of 503s and retries to spare: the best plan retries them away.
    assert.is_true(rows[1].success > 99, r.stdout)
  end)

  it("reads the profile from the event log of a real `resilua load` run", function()
    -- Every 5th request is a 503, the others a 200 after 20 ms.
    local server = helpers.start_server([[
      local n = 0
      return function()
        n = n + 1
        if n % 5 == 0 then return { status = 503 } end
        return { status = 200, body = "ok", delay_ms = 20 }
      end]])
    local log = dir .. "/events.log"
    local load = helpers.run({ helpers.bin, "load", "--rate", "50", "--duration", "1",
                               "--policy", "no-retry", "--log", log, server.url .. "/" })
    server:stop()
    assert.are.equal(0, load.code, load.stderr)
    -- What a real log can hold too: a torn line, junk, a line over 64 KiB.
    local f = assert(io.open(log, "ab"))
    f:write('{"event":"attempt","status":200,"lat\n', "not json\n", ("x"):rep(70000), "\n")
    f:close()
    local r = plan({ "--slo", "p95<800ms", "--profile", log, "--calls", "1000", "--top", "3" })
    assert.are.equal(0, r.code, r.stderr)
    -- 50 attempts, no retries: 10 answered 503, exactly what the upstream did.
    local median = r.stdout:match("^profile: lognormal median ([%d.]+) ms")
    assert.is_true(tonumber(median) >= 19, r.stdout)
    assert.matches("fitted to 50 attempt events from " .. log:gsub("%p", "%%%0")
                   .. " %(%d+ lines, 3 malformed skipped%); faults: 503 20%.00 %%\n", r.stdout)
    local rows = ranked(r.stdout)
    assert.are.equal(3, #rows)
    assert.is_true(rows[1].met and rows[1].success > 99, r.stdout) -- retries take the 503s away
  end)

  it("keeps every per-try timeout at or above its quantile when the service time is tight", function()
    -- A fitted profile this narrow puts p75..p99 within a millisecond; a
    -- timeout rounded down would cut a third of the calls.
    local tight = helpers.write_file(dir .. "/tight.lua", [[
      return { service_ms = { dist = "lognormal", median = 20.84, sigma = 0.013 },
               faults = { { p = 0.2, status = 503 } } }]])
    local r = plan({ "--slo", "p95<800ms", "--profile", tight, "--calls", "1000", "--top", "3" })
    assert.are.equal(0, r.code, r.stderr)
    local rows = ranked(r.stdout)
    assert.is_true(rows[1].met and rows[1].success > 99, r.stdout)
  end)

  it("refuses an event log without a usable attempt event, naming the file", function()
    local log = helpers.write_file(dir .. "/no-attempts.log",
      '{"ts":"2026-01-01T00:00:00.000Z","event":"policy","name":"default","ok":true}\n'
      .. '{"event":"attempt","status":200}\n' .. "junk\n")
    local r = plan({ "--slo", "p95<800ms", "--profile", log })
    assert.are.equal(2, r.code)
    assert.matches("%-%-profile: " .. log:gsub("%p", "%%%0")
                   .. ": no usable attempt event in 3 lines %(2 malformed%)", r.stderr)
  end)

  it("verifies the top two against resilua.upstream built from the profile", function()
    local r = plan({ "--slo", "p95<800ms", "--profile", PROFILE, "--calls", "1000", "--top", "2",
                     "--verify", "--duration", "3", "--rate", "40" })
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("predicted vs measured %(3 s at 40 calls/s", r.stdout)
    local lines = 0
    for pred, meas in r.stdout:gmatch("\n  [12] +([%d.]+) +([%d.]+) +[%d.]+ +[%d.]+ +[%d.]+ +[%d.]+") do
      lines = lines + 1
      assert.is_true(tonumber(meas) > 80 and tonumber(pred) > 80)
    end
    assert.are.equal(2, lines)
  end)

  it("refuses bad input with exit 2 and a message", function()
    local not_table = helpers.write_file(dir .. "/nt.lua", "return 42")
    local bad_dist = helpers.write_file(dir .. "/bd.lua", [[return { service_ms = { dist = "zipf" } }]])
    for _, case in ipairs({
      { { "--profile", PROFILE }, "%-%-slo and %-%-profile are required" },
      { { "--slo", "p95<800ms" }, "%-%-slo and %-%-profile are required" },
      { { "--slo", "fast please", "--profile", PROFILE }, "%-%-slo: expected" },
      { { "--slo", "p95<800ms", "--profile", dir .. "/nope.lua" }, "%-%-profile:" },
      { { "--slo", "p95<800ms", "--profile", dir }, "%-%-profile:" },
      { { "--slo", "p95<800ms", "--profile", not_table }, "expected a table" },
      { { "--slo", "p95<800ms", "--profile", bad_dist }, "service_ms.dist" },
      { { "--slo", "p95<800ms", "--profile", PROFILE, "--calls", "0" }, "%-%-calls: expected" },
      { { "--slo", "p95<800ms", "--profile", PROFILE, "--frob" }, "unknown option" },
    }) do
      local r = plan(case[1])
      assert.are.equal(2, r.code, table.concat(case[1], " "))
      assert.matches(case[2], r.stderr)
    end
  end)
end)
