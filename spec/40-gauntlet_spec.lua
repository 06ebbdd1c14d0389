-- The shipped default against "no retry" through experiments/gauntlet.lua
-- (issue 11): partial 503s, resets, a blip, a slowdown, a long outage and
-- the recovery.  Two schedules (timing a with seed 1, timing b with seed
-- 2; their time compressed by --scale) so that the default is not tuned
-- to one script.  Both lanes of a run face the same arrivals and fault
-- schedule side by side, so the comparison holds on a loaded machine: it
-- is between two policies of the same run, never against a fixed figure
-- of time.
local helpers = require "helpers"
local cjson = require "cjson"
local policy = require "resilua.policy"

local SCALE = "0.5"
-- What "at least as good" allows for noise: success within half a point
-- (the issue's own tolerance).
local SUCCESS_SLACK = 0.005
-- The recovery's p95 guards the breaker's re-admission: the calls that
-- start while it is still open wait for its probe's verdict, and that wait
-- is all the default adds to no retry's latency there.  "At least as good"
-- is taken within one percentile point: the default's p95 at most no
-- retry's p96 (interpolated between its p95 and p99), which is one lane's
-- sampling noise on 1,500 calls and grows with the tail on a loaded
-- machine.  A breaker learns of the recovery from a probe's answer, so
-- the calls of the first open_ms / 2 + one service time (about 10) still
-- wait: the default passed it in all of 17 runs (seeds 1-4, both timings,
-- some under heavy load); refused tries waiting a blind backoff and a
-- probe every 250 ms (about 30 calls waiting) failed it in 5 of 6.
local RECOVERY_RANK_POINTS = 1

-- Under ASan+UBSan (`make test-asan` sets ASAN_OPTIONS) the binary runs
-- several times slower, and a loaded 2-core machine cannot keep the run's
-- 2 x 150 calls/s in real time: in one such pass no retry's p95 in the
-- partial phase was 1.8 s (about 70 ms in the plain pass) and tries timed
-- out in every phase, so the lanes measured the machine, not the policies.
-- There the run is a memory-safety check of every path it takes: it must
-- finish and report every phase; the standard is judged in the plain pass.
local SANITIZED = os.getenv("ASAN_OPTIONS") ~= nil

local dir = helpers.tmpdir()

local function gauntlet(timing, seed)
  local out = ("%s/%s-%d"):format(dir, timing, seed)
  local r = helpers.run({ helpers.bin, "run", "experiments/gauntlet.lua", "--quiet",
                          "--timing", timing, "--scale", SCALE, "--seed", tostring(seed),
                          "--only", "no retry,default", "--out", out })
  assert.are.equal(0, r.code, r.stderr)
  local rep = cjson.decode((assert(helpers.read_file(out .. "/report.json"))))
  local lanes = {}
  for _, p in ipairs(rep.policies) do lanes[p.name] = p end
  return lanes["no retry"], lanes["default"], r.stdout
end

local function pct(x) return ("%.2f %%"):format(100 * x) end

-- Every line of the standard; returns the list of what failed.
local function standard(base, cand)
  local failed = {}
  local function need(ok, what) if not ok then failed[#failed + 1] = what end end
  local s0, s1 = base.summary.success_rate, cand.summary.success_rate
  need(s1 >= s0 - SUCCESS_SLACK, ("overall: default %s < no retry %s"):format(pct(s1), pct(s0)))
  for i, ph in ipairs(cand.phases) do
    local b = base.phases[i]
    assert.are.equal(b.name, ph.name)
    local name = ph.name
    need(ph.success_rate >= b.success_rate - SUCCESS_SLACK,
         ("%s: default %s < no retry %s"):format(name, pct(ph.success_rate), pct(b.success_rate)))
    if name:match("^partial") then
      need(ph.success_rate >= b.success_rate + 0.05,
           ("%s: default %s not 5 points over no retry %s"):format(name, pct(ph.success_rate),
                                                                  pct(b.success_rate)))
    elseif name:match("^resets") then
      need(ph.success_rate >= 0.99, ("%s: default %s < 99 %%"):format(name, pct(ph.success_rate)))
    elseif name:match("^outage") then
      need(ph.amplification <= 1.1,
           ("%s: amplification %.2f > 1.1"):format(name, ph.amplification))
    elseif name:match("^recovery") then
      local limit = b.p95 + (b.p99 - b.p95) * RECOVERY_RANK_POINTS / 4
      need(ph.p95 <= limit, ("%s: default p95 %.1f ms > no retry's p96 %.1f ms (p95 %.1f)")
                              :format(name, ph.p95, limit, b.p95))
    end
  end
  return failed
end

describe("the default policy", function()
  it("is spelled out in policies/default.lua exactly as the built-in defaults", function()
    -- The file as written (not normalized: that would fill in what it lacks).
    local src = assert(helpers.read_file("policies/default.lua"))
    local t = assert(load(src, "=default.lua", "t", { require = require }))()
    for k, v in pairs(policy.DEFAULTS) do assert.same(v, t[k], k) end
    for k, v in pairs(t) do
      if k ~= "name" and k ~= "tests" then assert.same(policy.DEFAULTS[k], v, k) end
    end
  end)

  for _, case in ipairs({ { "a", 1 }, { "b", 2 } }) do
    local timing, seed = case[1], case[2]
    it(("meets the standard against no retry on the gauntlet (timing %s, seed %d)")
       :format(timing, seed), function()
      local base, cand, table_text = gauntlet(timing, seed)
      assert.truthy(base and cand, "both lanes reported")
      -- Every kind of trouble is in the run.
      local kinds = {}
      for _, ph in ipairs(cand.phases) do kinds[ph.name:match("^%a+")] = true end
      for _, k in ipairs({ "partial", "resets", "blip", "slowdown", "outage", "recovery" }) do
        assert.truthy(kinds[k], "phase " .. k)
      end
      if not SANITIZED then
        local failed = standard(base, cand)
        assert.are.same({}, failed, table_text)
      end
    end)
  end
end)
