-- Keep-alive connections above 1,024 attempts in flight (issue 4): curl
-- counts every connection, busy or idle, against CURLMOPT_MAXCONNECTS and
-- closed the one just handed back whenever more were open, so past 1,024
-- attempts in flight each call opened a new connection.  The upstream
-- counts the connections it accepted (/_stats): no timing is asserted.
local helpers = require "helpers"
local cjson = require "cjson"

local CONC = 1100 -- attempts in flight, above the old limit of 1,024

local function stats(url)
  local r = helpers.curl(helpers.quote(url .. "/_stats"))
  assert.are.equal(200, r.status, r.stderr)
  return cjson.decode(r.body)
end

-- Each side needs CONC descriptors and more; resilua raises its soft limit
-- to the hard one.
local hard = tonumber(helpers.run("ulimit -Hn").stdout) or 0

describe("the transport above 1,024 attempts in flight", function()
  if hard ~= 0 and hard < 2 * CONC then
    pending(("needs a hard fd limit of %d (ulimit -Hn is %d)"):format(2 * CONC, hard))
    return
  end

  it("reuses its connections: one per attempt in flight, not one per call", function()
    local slow = helpers.start_server([[
      return function() return { status = 200, body = "ok", delay_ms = 100 } end]])
    local before = stats(slow.url).connections
    local r = helpers.run({ helpers.bin, "load", "--json", "--concurrency", tostring(CONC),
                            "--duration", "2s", "--policy", "no-retry", slow.url .. "/" })
    local opened = stats(slow.url).connections - before - 1 -- less our /_stats
    slow:stop()
    assert.are.equal(0, r.code, r.stderr)
    local report = cjson.decode(r.stdout)
    -- Several rounds of CONC calls, so that reuse (or its absence) shows.
    assert.is_true(report.calls >= 2 * CONC, "calls " .. report.calls)
    assert.are.equal(report.calls, report.outcomes.ok)
    assert.is_true(opened >= CONC and opened <= CONC + 50,
                   ("%d connections for %d calls, %d in flight"):format(opened, report.calls, CONC))
  end)
end)

describe("attempts waiting for a turn on the wire (max_active)", function()
  local core = require "resilua.core"
  local resilua = require "resilua"

  it("time out on their own per-try timeout while they wait, and are never sent", function()
    resilua.log(false) -- the events would only clutter the spec's output
    local runs = 0
    local srv = assert(core.serve{ handler = function()
      runs = runs + 1
      return { status = 200, body = "ok", delay_ms = 3000 }
    end })
    local url = "http://" .. srv:address() .. "/"
    local dir = helpers.tmpdir()
    local quick = helpers.write_file(dir .. "/quick.lua", [[
      return { max_attempts = 1, per_try_timeout_ms = 100, deadline_ms = 150,
               breaker = false, budget = false }]])
    local patient = helpers.write_file(dir .. "/patient.lua", [[
      return { max_attempts = 1, per_try_timeout_ms = 10000, deadline_ms = 10000,
               breaker = false, budget = false }]])
    local slow = resilua.client{ policy = patient, name = "max_active slow" }
    local fast = resilua.client{ policy = quick, name = "max_active fast" }
    local slow_res, fast_err, fast_ms
    resilua.go(function() slow_res = slow:call{ url = url, max_active = 1 } end)
    resilua.go(function()
      local t = core.now_ms()
      local _, err = fast:call{ url = url, max_active = 1 }
      fast_err, fast_ms = err, core.now_ms() - t
    end)
    assert.is_true(resilua.wait())
    srv:close()
    assert.are.equal(200, slow_res.status)
    assert.are.equal("timeout", fast_err.error)
    -- not after the slow call's 3 s (it gave up at its 150 ms deadline; the
    -- rest is slack for a loaded machine)
    assert.is_true(fast_ms < 2500, fast_ms)
    assert.are.equal(1, runs)
  end)
end)
