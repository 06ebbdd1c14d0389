--- Client correctness against hostile upstreams (issue 14): no request
-- leaves without being an attempt (curl's hidden resends), Retry-After as
-- RFC 9110 has it, breakers keyed by long URLs, malformed chunked bodies,
-- secrets and invalid UTF-8 in the event log, unknown request and client
-- fields, bad URLs.  Raw bytes come from spec/raw_server.py.
local resilua = require "resilua"
local cjson = require "cjson"
local helpers = require "helpers"

local dir = helpers.tmpdir()
local log = dir .. "/events.jsonl"
local policy_file = helpers.policy_writer(dir)
setup(function() resilua.log(log) end)
teardown(function() resilua.log("-") end)

-- Starts spec/raw_server.py with routes (path -> {raw=, close_nth=}).
local function raw_server(routes)
  local path = helpers.write_file(helpers.tmpname(".json"), cjson.encode(routes))
  local p = helpers.spawn({ "python3", "spec/raw_server.py", path })
  local port = p:wait_line("listening on 127%.0%.0%.1:(%d+)\n", 30)
  if not port then
    p:stop("KILL")
    error("raw_server.py did not start: " .. p:stderr(), 2)
  end
  p.url = "http://127.0.0.1:" .. port
  return p
end

local function http_get(url)
  local r = helpers.curl(helpers.quote(url))
  assert(r.status == 200, "GET " .. url .. ": " .. r.stderr)
  return r.body
end

-- The attempts a result (or error) reports.
local function attempts_of(res, err) return (res or err).attempts end

local function events_since(mark)
  local all = helpers.events(log)
  local out = {}
  for i = mark + 1, #all do out[#out + 1] = all[i] end
  return out
end

describe("hidden resends", function()
  it("a POST whose reused connection dies is one attempt, a reset, not resent", function()
    local server = raw_server({ ["/post"] = { close_nth = 2 } })
    local client = resilua.client{ policy = "no-retry", name = "resend-post" }
    local attempts, errors = 0, {}
    for i = 1, 3 do
      local res, err = client:call{ method = "POST", url = server.url .. "/post", body = "x" }
      attempts = attempts + attempts_of(res, err)
      errors[i] = err and err.error or "ok"
    end
    local seen = tonumber(http_get(server.url .. "/_count"))
    server:stop()
    assert.same({ "ok", "reset", "ok" }, errors)
    assert.equal(3, attempts)
    assert.equal(attempts, seen)
  end)

  it("under a soak of closes, the server counts exactly the attempts logged", function()
    local server = helpers.start_server [[
      return function(req)
        if req.n % 3 == 0 then return { action = "close" } end
        return { status = 200, body = "ok" }
      end]]
    local p = policy_file("soak", [[
      return { max_attempts = 4, backoff = { base_ms = 1, max_ms = 5, jitter = "none" },
               breaker = false, budget = false, retry_on = { errors = { "reset" } } }]])
    local client = resilua.client{ policy = p, name = "resend-soak" }
    local mark = #helpers.events(log)
    local attempts = 0
    for _ = 1, 10 do
      resilua.go(function()
        for _ = 1, 30 do
          local res, err = client:call{ method = "POST", url = server.url .. "/soak", body = "x" }
          attempts = attempts + attempts_of(res, err)
        end
      end)
    end
    assert(resilua.wait())
    local stats = cjson.decode(http_get(server.url .. "/_stats"))
    server:stop()
    local logged = #helpers.of_kind(events_since(mark), "attempt")
    assert.is_true(stats.action_close > 0)
    assert.equal(attempts, logged)
    assert.equal(attempts, stats.requests)
  end)
end)

describe("Retry-After", function()
  -- Retry-After field values (one field each), the wait the core reads
  -- (a.retry_after_ms; nil: none valid).
  local now = os.time()
  local function http_date(fmt, t) return os.date("!" .. fmt, t) end
  local CASES = {
    { { "3" }, 3000 },
    { { "0" }, 0 },
    { { " 7 " }, 7000 },
    { { "1e309" }, nil },
    { { "5abc" }, nil },
    { { "1.5" }, nil },
    { { "-5" }, nil },
    { { "+5" }, nil },
    { { "0x10" }, nil },
    { { "" }, nil },
    { { "99999999999999999999999" }, 2147483648000 },
    { { ("9"):rep(400) }, 2147483648000 },
    { { "5", "abc" }, 5000 },
    { { "abc", "5" }, 5000 },
    { { "2", "8" }, 8000 },
    { { "5, 8" }, nil },
    { { "Sun, 06 Nov 1994 08:49:37 GMT" }, 0 },
    { { "Sunday, 06-Nov-94 08:49:37 GMT" }, 0 },
    { { "Sun Nov  6 08:49:37 1994" }, 0 },
    { { "Sun, 06 Nov 1994 08:49:37 UTC" }, nil },
    { { "sun, 06 nov 1994 08:49:37 GMT" }, nil },
    { { "Mon, 30 Feb 2026 00:00:00 GMT" }, nil },
    { { "Sun, 06 Nov 1994 25:49:37 GMT" }, nil },
    { { "06 Nov 1994 08:49:37 GMT" }, nil },
    { { "Sun, 06 Nov 1994 08:49:37 GMT trailing" }, nil },
    { { http_date("%a, %d %b %Y %H:%M:%S GMT", now + 3600) }, { 3590000, 3600000 } },
    { { http_date("%A, %d-%b-%y %H:%M:%S GMT", now + 3600) }, { 3590000, 3600000 } },
  }

  local routes = {}
  for i, case in ipairs(CASES) do
    local lines = {}
    for _, v in ipairs(case[1]) do lines[#lines + 1] = "Retry-After: " .. v .. "\r\n" end
    routes["/" .. i] = { raw = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                               .. table.concat(lines) .. "\r\n" }
  end
  local server
  setup(function() server = raw_server(routes) end)
  teardown(function() server:stop() end)

  local p = policy_file("ra-echo", [[
    return { breaker = false, budget = false, decide = function(a)
      return { retry = false, reason = "ra=" .. tostring(a.retry_after_ms) }
    end }]])

  for i, case in ipairs(CASES) do
    local shown = {}
    for j, v in ipairs(case[1]) do shown[j] = ("%q"):format(v:sub(1, 40)) end
    it(("case %d: %s"):format(i, table.concat(shown, " + ")), function()
      local client = resilua.client{ policy = p, name = "ra" }
      local _, err = client:call{ url = server.url .. "/" .. i }
      assert.equal(503, err.status)
      local got = tonumber(err.message:match("ra=(%S+)$"))
      local want = case[2]
      if type(want) == "table" then
        assert.is_true(got and got >= want[1] and got <= want[2], tostring(got))
      else
        assert.equal(want, got)
      end
    end)
  end

  it("a saturated Retry-After is over any cap: the call gives up, it does not retry at once", function()
    local client = resilua.client{ policy = "default", name = "ra-saturated" }
    local _, err = client:call{ url = server.url .. "/11" }
    assert.equal("gave_up", err.outcome)
    assert.equal(1, err.attempts)
    assert.matches("over the cap", err.message)
  end)
end)

describe("malformed chunked encoding", function()
  local CHUNKED = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
  local server
  setup(function()
    server = raw_server({
      ["/bad-hex"] = { raw = CHUNKED .. "zz\r\nhello\r\n0\r\n\r\n" },
      ["/no-crlf"] = { raw = CHUNKED .. "5\r\nhelloXX0\r\n\r\n" },
      ["/too-long"] = { raw = CHUNKED .. ("f"):rep(40) .. "\r\nx" },
      ["/truncated"] = { raw = CHUNKED .. "10\r\nhello" },
    })
  end)
  teardown(function() server:stop() end)

  for _, case in ipairs({ { "/bad-hex", "protocol" }, { "/no-crlf", "protocol" },
                          { "/too-long", "protocol" }, { "/truncated", "reset" } }) do
    it(("%s is %s"):format(case[1], case[2]), function()
      local client = resilua.client{ policy = "no-retry", name = "chunked" }
      local res, err = client:call{ url = server.url .. case[1] }
      assert.is_nil(res)
      assert.equal(case[2], err.error)
    end)
  end
end)
