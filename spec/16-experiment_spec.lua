-- resilua.experiment: `resilua run EXPERIMENT.lua` runs every policy on the
-- same arrivals and fault schedule against the in-process upstream model,
-- prints the summary table and writes the report.  The experiments here
-- are a few seconds long; bounds are generous: they check what is counted,
-- not how fast the machine is.
local helpers = require "helpers"
local cjson = require "cjson"

local dir = helpers.tmpdir()
local n = 0

--- Writes an experiment script whose body is `src` (a Lua table
-- constructor for experiment.run) and runs it; returns the run's result
-- and the decoded report.json (nil when there is none).
local function experiment(src, args)
  n = n + 1
  local script = helpers.write_file(("%s/exp%d.lua"):format(dir, n),
    'local experiment = require "resilua.experiment"\nreturn experiment.run' .. src .. "\n")
  local out = ("%s/out%d"):format(dir, n)
  local argv = { helpers.bin, "run", script, "--quiet", "--out", out }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local r = helpers.run(argv)
  local json = helpers.read_file(out .. "/report.json")
  return r, json and cjson.decode(json), out, script
end

local function policy_named(rep, name)
  for _, p in ipairs(rep.policies) do
    if p.name == name then return p end
  end
  error("no policy " .. name)
end

-- The windows of the run's duration: lanes drain for different times, so
-- the windows after it (no call starts there) may number differently.
local function within(list, duration_s)
  local out = {}
  for i = 1, math.ceil(duration_s) do out[i] = list[i] end
  return out
end

local function sum(list, from, to)
  local s = 0
  for i = from or 1, to or #list do s = s + list[i] end
  return s
end

-- A policy that never retries and waits as long as it takes: on a machine
-- starved of CPU (ASan, other work) the default 2 s per-try timeout cut
-- calls before they reached the upstream, so the counts of what arrived
-- differed between runs of the same seed.
local PATIENT_ONCE = "{ max_attempts = 1, per_try_timeout_ms = 30000, deadline_ms = 60000, "
  .. "connect_timeout_ms = 20000, breaker = false, budget = false }"

local OUTAGE = [[{
  name = "mini", duration = 3, seed = 7,
  upstream = { workers = 20, service_ms = 5,
               phases = { { name = "outage", from = 1, to = 2, faults = { { p = 1, status = 503 } } } } },
  load = { rate = 100, poisson = true },
  policies = {
    { name = "none", policy = ]] .. PATIENT_ONCE .. [[ },
    { name = "naive", policy = { max_attempts = 3, per_try_timeout_ms = 1000,
        backoff = { base_ms = 0, max_ms = 0, jitter = "none" }, breaker = false, budget = false } },
  },
}]]

describe("resilua.experiment", function()
  it("runs every policy on the same arrivals and writes the table and the report", function()
    local r, rep, out = experiment(OUTAGE)
    assert.are.equal(0, r.code, r.stderr)
    -- The terminal table: both policies, overall and inside the phase.
    assert.matches("overall", r.stdout)
    assert.matches("outage %(1%-2 s%)", r.stdout)
    assert.matches("none", r.stdout)
    assert.matches("naive", r.stdout)
    assert.matches("report: " .. out:gsub("%p", "%%%0") .. "/report.html", r.stdout)
    assert.truthy(helpers.read_file(out .. "/report.html"):find("<svg", 1, true))

    local none, naive = policy_named(rep, "none"), policy_named(rep, "naive")
    assert.are.equal(2, #rep.policies)
    -- The same seed gives both lanes the same schedule.
    assert.are.equal(none.summary.calls, naive.summary.calls)
    assert.same(within(none.windows.offered, 3), within(naive.windows.offered, 3))
    assert.is_true(none.summary.calls > 200 and none.summary.calls < 400, none.summary.calls)
    -- The outage: no retry fails about a third of the calls, once each;
    -- naive retry sends three attempts for each call that met it.  A phase
    -- counts calls by their scheduled start, the upstream judges by when a
    -- request arrives: a call at the phase's edge may fall on either side
    -- on a loaded machine, so the edges are not asserted, only what every
    -- call must show whatever its timing.
    local o1, o2 = none.phases[1], naive.phases[1]
    assert.are.equal("outage", o1.name)
    assert.is_true(o1.calls > 50, o1.calls)
    -- (most, not all: a call scheduled in the phase's last 100 ms that a
    -- loaded loop sends after 2 s succeeds; without the outage all would)
    assert.is_true(o1.success_rate < 0.5, o1.success_rate)
    assert.are.equal(1, o1.amplification)
    assert.is_true(o2.amplification > 2.5, o2.amplification)
    assert.are.equal(1, none.summary.amplification)
    assert.are.equal(none.summary.statuses["503"], none.summary.outcomes.gave_up)
    assert.are.equal(none.summary.calls - none.summary.outcomes.gave_up, none.summary.outcomes.ok)
    -- The storm reached the upstream: its arrivals in the outage window.
    assert.is_true(naive.windows.upstream_arrivals[2] > 2 * none.windows.upstream_arrivals[2])
    assert.are.equal(naive.summary.attempts, sum(naive.windows.upstream_arrivals))
    assert.are.equal("closed", none.windows.breaker[1])
    -- The latency distribution of the run: percentiles, never decreasing.
    local d = naive.summary.distribution
    assert.are.equal(#d.p, #d.ms)
    assert.are.equal(100, d.p[#d.p])
    for i = 2, #d.ms do assert.is_true(d.ms[i] >= d.ms[i - 1], cjson.encode(d)) end
  end)

  it("gives the same arrivals and faults for the same seed, others for another", function()
    local src = [[{
      name = "seeded", duration = 1.5,
      upstream = { workers = 50, service_ms = { dist = "uniform", min = 1, max = 5 },
                   faults = { { p = 0.3, status = 500 } } },
      load = { rate = 200, poisson = true },
      policies = { { name = "none", policy = ]] .. PATIENT_ONCE .. [[ } },
    }]]
    local function run(seed)
      local r, rep = experiment(src, { "--seed", seed })
      assert(rep, ("seed %s: exit %s, no report.json\n%s"):format(seed, r.code, r.stderr))
      return rep
    end
    local a, b, c = run("11"), run("11"), run("12")
    local pa, pb, pc = a.policies[1], b.policies[1], c.policies[1]
    assert.are.equal(11, a.seed)
    assert.same(within(pa.windows.offered, 1.5), within(pb.windows.offered, 1.5))
    assert.same(pa.summary.statuses, pb.summary.statuses)
    assert.are_not.same(within(pa.windows.offered, 1.5), within(pc.windows.offered, 1.5))
    assert.is_true(pa.summary.statuses["500"] > 0)
  end)

  it("follows ramp and step rates, and runs a closed loop", function()
    local r, rep = experiment([[{
      name = "shapes", duration = 3,
      upstream = { service_ms = 2 },
      load = { rate = experiment.steps{ { 0, 20 }, { 2, 150 } } },
      policies = { { name = "p", policy = "default" } },
    }]])
    assert.are.equal(0, r.code, r.stderr)
    local w = rep.policies[1].windows.offered
    assert.is_true(w[1] >= 15 and w[1] <= 25, w[1])
    assert.is_true(w[3] >= 120 and w[3] <= 170, w[3])
    assert.are.equal("steps", rep.load.arrivals)

    r, rep = experiment([[{
      name = "ramp", duration = 3,
      upstream = { service_ms = 2 },
      load = { rate = experiment.ramp(10, 200) },
      policies = { { name = "p", policy = "default" } },
    }]])
    assert.are.equal(0, r.code, r.stderr)
    w = rep.policies[1].windows.offered
    assert.is_true(w[1] < w[2] and w[2] < w[3], cjson.encode(w))

    r, rep = experiment([[{
      name = "closed", duration = 1,
      upstream = { workers = 4, service_ms = 20 },
      load = { concurrency = 4 },
      policies = { { name = "p", policy = "default" } },
    }]])
    assert.are.equal(0, r.code, r.stderr)
    -- 4 workers of 20 ms each: about 200 calls in a second, never more.
    local calls = rep.policies[1].summary.calls
    assert.is_true(calls >= 4 and calls <= 220, calls)
    assert.are.equal("closed", rep.load.mode)
  end)

  it("builds requests with the request hook and judges answers with on_response", function()
    local r, rep = experiment([[{
      name = "hooks", duration = 1,
      upstream = { service_ms = 1, respond = function(req)
        return { status = 200, body = req.method .. " " .. req.path .. " " .. req.body }
      end },
      load = { rate = 50 },
      request = function(i) return { method = "PUT", path = "/item/" .. i, body = "x" } end,
      on_response = function(res, ctx)
        return res.body == ("PUT /item/%d x"):format(ctx.i) and ctx.i % 5 ~= 0
      end,
      policies = { { name = "p", policy = "no-retry" } },
    }]])
    assert.are.equal(0, r.code, r.stderr)
    local s = rep.policies[1].summary
    assert.are.equal(50, s.calls)
    assert.are.equal(10, s.outcomes.invalid)
    assert.are.equal(40, s.outcomes.ok)

    -- A hook that raises stops the run (exit 1) and says which and where.
    r = experiment([[{
      name = "boom", duration = 1, upstream = { service_ms = 1 }, load = { rate = 20 },
      on_response = function() error("boom") end,
      policies = { { name = "p", policy = "no-retry" } },
    }]])
    assert.are.equal(1, r.code)
    assert.matches("on_response: .*exp%d+%.lua:4: boom", r.stderr)
  end)

  it("says which policies meet the SLO, and exits 6 when none does", function()
    local base = [[{
      name = "slo", duration = 2,
      upstream = { workers = 50, service_ms = 2, faults = { { p = 0.5, status = 503 } } },
      load = { rate = 100 },
      slo = %s,
      policies = { { name = "once", policy = "no-retry" },
                   { name = "retried", policy = { max_attempts = 10, per_try_timeout_ms = 1000,
                       backoff = { base_ms = 1, max_ms = 1, jitter = "none" },
                       breaker = false, budget = false } } },
    }]]
    local r, rep = experiment(base:format("{ success = 0.95, p95_ms = 1000 }"))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("met by retried;", r.stdout)
    assert.is_true(policy_named(rep, "retried").summary.slo.met)
    assert.is_false(policy_named(rep, "once").summary.slo.met)
    assert.is_true(policy_named(rep, "once").summary.slo.windows_failed > 0)
    assert.are.equal("p95 < 1000 ms and success >= 95 %", rep.slo.description)

    r = experiment(base:format("{ p95_ms = 0.01 }"))
    assert.are.equal(6, r.code, r.stderr)
    assert.matches("no policy met the SLO", r.stdout)
  end)

  it("rejects a bad experiment, policy or option with exit 2 and says where", function()
    local r, _, _, script = experiment([[{
      name = "bad", duration = 1, upstream = {}, load = { rate = 10 }, polices = {},
    }]])
    assert.are.equal(2, r.code)
    assert.matches(script:gsub("%p", "%%%0") .. ":3: unknown field 'polices'", r.stderr)

    r = experiment([[{
      name = "bad", duration = 1, upstream = {}, load = { rate = 10 },
      policies = { { name = "p", policy = { max_attempts = 0 } } },
    }]])
    assert.are.equal(2, r.code)
    assert.matches("policy 'p'.*max_attempts", r.stderr)

    r = experiment([[{
      name = "bad", duration = 1, upstream = { service_ms = { dist = "gauss" } },
      load = { rate = 10 }, policies = { { name = "p", policy = "default" } },
    }]])
    assert.are.equal(2, r.code)
    assert.matches("service_ms", r.stderr)

    r = experiment([[{
      name = "bad", duration = 1, upstream = {}, load = { rate = 10 },
      slo = { success = 1.5 }, policies = { { name = "p", policy = "default" } },
    }]])
    assert.are.equal(2, r.code)
    assert.matches(":4: slo.success: expected a number in %[0, 1%], got 1.5", r.stderr)

    r = experiment([[{
      name = "bad", duration = 1, upstream = {}, policies = { { name = "p", policy = "default" } },
      load = { rate = experiment.steps{ { at = 0, rate = 10 } } },
    }]])
    assert.are.equal(2, r.code)
    assert.matches(":4: load.rate: step 1: expected { at_s, calls/s }", r.stderr)

    local unwritable = helpers.write_file(dir .. "/a-file", "")
    r = experiment(OUTAGE, { "--out", unwritable .. "/sub" })
    assert.are.equal(2, r.code)
    assert.matches("%-%-out: cannot write to .*a%-file/sub", r.stderr)
    assert.is_nil(r.stdout:find("overall", 1, true)) -- nothing ran

    r = experiment(OUTAGE, { "--sede", "1" })
    assert.are.equal(2, r.code)
    assert.matches("unknown option '%-%-sede'", r.stderr)
  end)

  it("loads a running server given by url, one policy after another with --sequential", function()
    local stub = helpers.start_server()
    local r, rep = experiment(([[{
      name = "external", duration = 1, url = %q, load = { rate = 40 },
      policies = { { name = "a", policy = "no-retry" }, { name = "b", policy = "default" } },
    }]]):format(stub.url), { "--sequential" })
    stub:stop()
    assert.are.equal(0, r.code, r.stderr)
    for _, p in ipairs(rep.policies) do
      assert.are.equal(40, p.summary.calls)
      assert.are.equal(1, p.summary.success_rate)
      assert.is_nil(p.windows.upstream_arrivals)
    end
    assert.are.equal(stub.url, rep.upstream.description)
  end)

  it("on SIGINT stops starting calls, lets those in flight end and reports what ran", function()
    -- The first request leaves a mark: the signal comes once calls run,
    -- however slowly the machine started the process.
    local mark = dir .. "/started"
    local script = helpers.write_file(dir .. "/long.lua", 'return require("resilua.experiment").run'
      .. OUTAGE:gsub("duration = 3,", ([[duration = 60,
        request = function(i)
          if i == 20 then io.open(%q, "w"):close() end
          return { path = "/v1/predict" }
        end,]]):format(mark)) .. "\n")
    local out = dir .. "/interrupted"
    for _, mode in ipairs({ "--quiet", "--sequential" }) do
      os.remove(mark)
      local p = helpers.spawn({ helpers.bin, "run", script, "--quiet", mode, "--out", out })
      assert.truthy(helpers.wait_until(function() return helpers.read_file(mark) end, 30))
      p:signal("INT")
      assert.are.equal(1, p:wait(30))
      assert.matches("interrupted: the figures cover what ran", p:stdout())
      local rep = cjson.decode(helpers.read_file(out .. "/report.json"))
      assert.is_true(rep.interrupted)
      -- Side by side both lanes ran; one after another only the first did.
      assert.are.equal(mode == "--sequential" and 1 or 2, #rep.policies)
      for _, pol in ipairs(rep.policies) do
        assert.is_true(pol.summary.calls > 0 and pol.summary.calls < 6000, pol.summary.calls)
      end
    end
  end)

  it("runs one policy with --only, and prints --help", function()
    local r, rep = experiment(OUTAGE, { "--only", "naive", "--duration", "1" })
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(1, #rep.policies)
    assert.are.equal("naive", rep.policies[1].name)
    assert.are.equal(1, rep.duration_s)

    -- A name may hold a comma; a list of names works as before; an unknown
    -- name is an error that lists the names there are.
    local commas = OUTAGE:gsub('name = "naive"', 'name = "naive, 3 tries"')
    r, rep = experiment(commas, { "--only", "naive, 3 tries", "--duration", "0.5" })
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("naive, 3 tries", rep.policies[1].name)
    assert.are.equal(1, #rep.policies)
    r, rep = experiment(OUTAGE, { "--only", "none,naive", "--duration", "0.5" })
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(2, #rep.policies)
    r = experiment(OUTAGE, { "--only", "nave" })
    assert.are.equal(2, r.code)
    assert.matches("no policy named 'nave' %(the policies: 'none', 'naive'%)", r.stderr)

    r = experiment(OUTAGE, { "--help" })
    assert.are.equal(0, r.code)
    assert.matches("usage: resilua run EXPERIMENT.lua", r.stdout)
  end)

  it("shows live progress on a terminal, and not with --quiet", function()
    -- script(1) gives the run a pseudo-terminal for stderr.
    local script = helpers.write_file(dir .. "/tty.lua", 'return require("resilua.experiment").run'
      .. OUTAGE:gsub("duration = 3", "duration = 3.5") .. "\n")
    local function on_tty(extra)
      local cmd = ("%s run %s --out %s/tty %s"):format(helpers.quote(helpers.bin),
                                                       helpers.quote(script), dir, extra)
      return helpers.run({ "script", "-qec", cmd, "/dev/null" }).stdout
    end
    local shown = on_tty("")
    assert.matches("calls/s", shown)
    assert.matches("in flight", shown)
    assert.matches("p99", shown)
    assert.is_nil(on_tty("--quiet"):find("in flight", 1, true))
  end)
end)

describe("shipped experiments", function()
  for _, name in ipairs({ "outage", "before-after", "sla" }) do
    it(name .. ".lua runs and writes its report", function()
      local out = ("%s/shipped-%s"):format(dir, name)
      local r = helpers.run({ helpers.bin, "run", "experiments/" .. name .. ".lua", "--quiet",
                              "--duration", "1.5", "--out", out })
      -- sla.lua exits 6 when no plan meets its SLO in so short a run.
      assert.is_true(r.code == 0 or (name == "sla" and r.code == 6), r.stdout .. r.stderr)
      local rep = cjson.decode(helpers.read_file(out .. "/report.json"))
      assert.are.equal(name, rep.title)
      assert.is_true(#rep.policies >= 2)
      for _, p in ipairs(rep.policies) do assert.is_true(p.summary.calls > 0) end
    end)
  end
end)
