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
  return helpers.spawn_listening({ "python3", "spec/raw_server.py", path }, "raw_server.py")
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
               per_try_timeout_ms = 60000, deadline_ms = 120000,
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
    -- a date an hour ahead of when the spec was loaded: { at = that time }
    { { http_date("%a, %d %b %Y %H:%M:%S GMT", now + 3600) }, { at = now + 3600 } },
    { { http_date("%A, %d-%b-%y %H:%M:%S GMT", now + 3600) }, { at = now + 3600 } },
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
      if type(want) == "table" then -- seconds to `at`, read on either side of the call
        local lo, hi = (want.at - os.time() - 2) * 1000, (want.at - os.time() + 2) * 1000
        assert.is_true(got and got >= lo and got <= hi, tostring(got))
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

describe("a breaker with key = \"url\"", function()
  it("works for a URL of any length", function()
    local server = helpers.start_server [[return function() return { status = 503 } end]]
    local p = policy_file("url-key", [[
      return { max_attempts = 1, breaker = { failures = 2, open_ms = 60000, key = "url" }, budget = false }]])
    local client = resilua.client{ policy = p, name = "long-url" }
    local url = server.url .. "/" .. ("a"):rep(5000)
    local outcomes = {}
    for i = 1, 3 do
      local _, err = client:call{ url = url }
      outcomes[i] = err.outcome
    end
    local _, other = client:call{ url = server.url .. "/" .. ("a"):rep(4999) .. "b" }
    server:stop()
    assert.same({ "gave_up", "gave_up", "breaker_open" }, outcomes)
    assert.equal("open", client:breaker(url))
    assert.equal("gave_up", other.outcome) -- another path, another breaker
  end)
end)

describe("secrets and bytes in the event log", function()
  local server
  setup(function()
    server = helpers.start_server [[return function() return { status = 503, body = "no\255\254" } end]]
  end)
  teardown(function() server:stop() end)

  local function every_line_is_json(path)
    for line in (helpers.read_file(path) or ""):gmatch("[^\n]+") do
      assert.is_truthy(utf8.len(line), "not UTF-8: " .. line)
      cjson.decode(line)
    end
  end

  it("masks secret query parameters, user:password and --redact'ed names", function()
    local logf = helpers.tmpname(".jsonl")
    local url = server.url:gsub("^http://", "http://me:pw1@")
                .. "/x?api_key=S1&Token=S2&session=S3&keep=v&ACCESS_TOKEN=S4&sig=S5&pass%77ord=S6#secret=S7"
    local r = helpers.run({ helpers.bin, "call", "--policy", "no-retry", "--log", logf,
                            "--redact", "session", url })
    assert.equal(4, r.code)
    local raw = helpers.read_file(logf)
    for i = 1, 7 do assert.is_nil(raw:find("S" .. i, 1, true), "S" .. i .. " logged") end
    assert.is_nil(raw:find("pw1", 1, true))
    local attempt = helpers.of_kind(helpers.events(logf), "attempt")[1]
    assert.equal(server.url:gsub("^http://", "http://***@")
                 .. "/x?api_key=***&Token=***&session=***&keep=v&ACCESS_TOKEN=***&sig=***"
                 .. "&pass%77ord=***#secret=***", attempt.url)
  end)

  it("masks them in load's summary and in bad-URL messages", function()
    local r = helpers.run({ helpers.bin, "load", "--json", "--quiet", "--policy", "no-retry",
                            "--rate", "20", "--duration", "0.2", server.url .. "/x?token=S8" })
    assert.equal(0, r.code, r.stderr)
    assert.is_nil((r.stdout .. r.stderr):find("S8", 1, true))
    assert.equal(server.url .. "/x?token=***", cjson.decode(r.stdout).url)
    local bad = helpers.run({ helpers.bin, "call", "--quiet", "ftp://h/?password=S9" })
    assert.equal(2, bad.code)
    assert.matches("bad URL 'ftp://h/%?password=%*%*%*'", bad.stderr)
  end)

  it("takes more names from resilua.redact, and refuses a bad one", function()
    assert.equal("http://h/?Sessid=abc", resilua.redact_url("http://h/?Sessid=abc"))
    resilua.redact("sessid")
    assert.equal("http://h/?Sessid=***&x=1", resilua.redact_url("http://h/?Sessid=abc&x=1"))
    assert.has_error(function() resilua.redact("") end, "redact: expected a name of 1 to 64 bytes")
    local r = helpers.run({ helpers.bin, "call", "--redact", "", server.url })
    assert.equal(2, r.code)
    assert.matches("%-%-redact: expected a parameter name", r.stderr)
  end)

  it("writes invalid UTF-8 in reasons and URLs escaped, never raw", function()
    local logf = helpers.tmpname(".jsonl")
    local p = policy_file("latin1", [[
      return { decide = function(a) return { retry = false, reason = "caf\233 \255 ok \226\130\172" } end }]])
    local r = helpers.run({ helpers.bin, "call", "--policy", p, "--log", logf, server.url .. "/\255x" })
    assert.equal(3, r.code, r.stderr)
    every_line_is_json(logf)
    local attempt = helpers.of_kind(helpers.events(logf), "attempt")[1]
    assert.equal("caf\u{E9} \u{FF} ok \u{20AC}", attempt.reason)
    assert.equal(server.url .. "/\u{FF}x", attempt.url)
  end)
end)

describe("invalid UTF-8 in batch results", function()
  it("is written as U+00XX, and every line is JSON text", function()
    local server = helpers.start_server [[return function() return { status = 200, body = "no\255\254 caf\195\169" } end]]
    local items = helpers.write_file(helpers.tmpname(".jsonl"), '{"id": 1}\n{"id": 2}\n')
    local out = helpers.tmpname(".jsonl")
    local r = helpers.run({ helpers.bin, "batch", "--quiet", "--no-ledger", "--policy", "no-retry",
                            "--in", items, "--out", out, server.url .. "/b" })
    server:stop()
    assert.equal(0, r.code, r.stderr)
    local n = 0
    for line in helpers.read_file(out):gmatch("[^\n]+") do
      assert.is_truthy(utf8.len(line), "not UTF-8: " .. line)
      assert.equal("no\u{FF}\u{FE} caf\u{E9}", cjson.decode(line).response)
      n = n + 1
    end
    assert.equal(2, n)
  end)
end)

describe("unknown fields", function()
  local client = resilua.client{ policy = "no-retry", name = "fields" }
  local HERE = "19%-client_correctness_spec%.lua:%d+: "

  it("in client:call are an error at the caller, with a suggestion", function()
    local ok, err = pcall(function() client:call{ methd = "GET", url = "http://127.0.0.1:1/" } end)
    assert.is_false(ok)
    assert.matches(HERE .. "call: unknown field 'methd' %(did you mean 'method'%?%)$", err)
    ok, err = pcall(function() client:call{ url = "http://127.0.0.1:1/", headrs = {} } end)
    assert.matches(HERE .. "call: unknown field 'headrs' %(did you mean 'headers'%?%)$", err)
    ok, err = pcall(function() client:call{ "http://127.0.0.1:1/", url = "http://127.0.0.1:1/" } end)
    assert.matches(HERE .. "call: unknown field %[1%]", err)
  end)

  it("in resilua.client are an error at the caller, with a suggestion", function()
    local ok, err = pcall(function() resilua.client{ polcy = "no-retry" } end)
    assert.is_false(ok)
    assert.matches(HERE .. "resilua.client: unknown field 'polcy' %(did you mean 'policy'%?%)$", err)
    ok, err = pcall(function() resilua.client{ policy = "no-retry", nmae = "x" } end)
    assert.matches("unknown field 'nmae' %(did you mean 'name'%?%)$", err)
    ok, err = pcall(function() resilua.client{ policy = "no-retry", zzzzzzzz = 1 } end)
    assert.matches("unknown field 'zzzzzzzz'$", err)
  end)
end)

describe("a bad URL", function()
  -- URL, what the message says
  local CASES = {
    { "notaurl", "no scheme %(expected http:// or https://%)" },
    { "127.0.0.1:8080/x", "no scheme" },
    { "ftp://host/x", "unsupported scheme 'ftp' %(expected http or https%)" },
    { "http:///path", "no host" },
    { "http://", "no host" },
    { "http://host:99999/", "bad port %(expected a number from 1 to 65535%)" },
    { "http://host:0/", "bad port" },
    { "http://host:abc/", "bad port" },
    { "http://exa mple.com/", "bad host name" },
    { "http://[::1/", "bad IPv6 address" },
    { "", "empty" },
  }
  for _, case in ipairs(CASES) do
    it(("'%s': %s"):format(case[1], case[2]:gsub("%%", "")), function()
      local r = helpers.run({ helpers.bin, "call", "--quiet", case[1] })
      assert.equal(2, r.code)
      local shown = case[1]:gsub("%p", "%%%0")
      assert.matches("^resilua call: bad URL '" .. shown .. "': " .. case[2], r.stderr)
    end)
  end

  it("is echoed, with what is wrong, by client:call", function()
    local client = resilua.client{ policy = "no-retry", name = "bad-url" }
    local ok, err = pcall(function() client:call{ url = "localhost:8080" } end)
    assert.is_false(ok)
    assert.matches("call: bad URL 'localhost:8080': no scheme", err)
  end)
end)
