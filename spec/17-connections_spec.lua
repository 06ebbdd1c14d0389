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
