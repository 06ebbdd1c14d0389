--- gRPC and HTTP/2 (contract 8) against a real peer we did not write: a
-- Python grpcio server with a generic handler on raw bytes
-- (spec/peers/grpc_server.py).  Unary calls through the Lua API and the
-- command line; retries by gRPC status, pushback, deadlines on the wire
-- (grpc-timeout, seen by the server as its time remaining), metadata, and
-- 100 concurrent calls multiplexed on one HTTP/2 connection.
local resilua = require "resilua"
local cjson = require "cjson"
local helpers = require "helpers"

local dir = helpers.tmpdir()
local log = dir .. "/events.jsonl"
local policy_file = helpers.policy_writer(dir)

-- A python3 that has grpcio (Debian's python3-grpcio is for /usr/bin/python3).
local function python()
  for _, py in ipairs({ "/usr/bin/python3", "python3" }) do
    if helpers.run({ py, "-c", "import grpc" }).code == 0 then return py end
  end
  error("no python3 with grpcio (Debian: python3-grpcio)")
end

local server, url

setup(function()
  resilua.log(log)
  server = helpers.spawn_listening({ python(), "spec/peers/grpc_server.py" }, "grpc server")
  url = server.url
end)

teardown(function()
  resilua.log("-")
  if server then server:stop() end
end)

local function client(src)
  local name = ("p%d"):format(math.random(1e9))
  policy_file(name, src)
  return resilua.client{ policy = name, policy_path = { dir, "policies" } }
end

-- What the server saw: its calls (method, metadata, time_remaining, peer).
local function stats()
  local res, err = resilua.client{ policy = "no-retry" }:call{ url = url, grpc = "test.Echo/Stats" }
  assert(res, err and err.message)
  return cjson.decode(res.body)
end

local function calls_with(key)
  local out = {}
  for _, c in ipairs(stats().calls) do
    if c.metadata["x-key"] == key then out[#out + 1] = c end
  end
  return out
end

-- The delays the attempt events of call_id logged before their retries.
local function retry_delays(call_id)
  local delays = {}
  for _, e in ipairs(helpers.of_kind(helpers.events(log), "attempt")) do
    if e.call_id == call_id and e.decision == "retry" then delays[#delays + 1] = e.delay_ms end
  end
  return delays
end

local RETRY_UNAVAILABLE = [[
  return { max_attempts = 5, backoff = { base_ms = 5, max_ms = 20, jitter = "full" },
           retry_on = { grpc = { "UNAVAILABLE" } }, breaker = false, budget = false }
]]

describe("a unary gRPC call", function()
  it("echoes bytes exactly: the message is framed and unframed", function()
    local msg = "\0\1\255binary\0" .. ("x"):rep(70000)
    local res, err = client(RETRY_UNAVAILABLE):call{ url = url, grpc = "test.Echo/Echo", body = msg }
    assert.is_nil(err and err.message)
    assert.equal(msg, res.body)
    assert.equal(0, res.grpc_status)
    assert.equal(200, res.status)
  end)

  it("is retried on UNAVAILABLE: twice UNAVAILABLE, then OK is 3 attempts and a success", function()
    local res, err = client(RETRY_UNAVAILABLE):call{
      url = url, grpc = "test.Echo/Flaky", body = "payload", metadata = { ["x-key"] = "flaky-1" } }
    assert.is_nil(err and err.message)
    assert.equal(3, res.attempts)
    assert.equal(0, res.grpc_status)
    assert.equal("payload", res.body)
    -- the server saw three attempts, the retries numbered
    local seen = calls_with("flaky-1")
    assert.equal(3, #seen)
    assert.is_nil(seen[1].metadata["grpc-previous-rpc-attempts"])
    assert.equal("1", seen[2].metadata["grpc-previous-rpc-attempts"])
    assert.equal("2", seen[3].metadata["grpc-previous-rpc-attempts"])
    -- and every attempt event carries its gRPC status
    local statuses = {}
    for _, e in ipairs(helpers.of_kind(helpers.events(log), "attempt")) do
      if e.url == url .. "/test.Echo/Flaky" then statuses[#statuses + 1] = e.grpc_status end
    end
    assert.same({ 14, 14, 0 }, statuses)
  end)

  it("is not retried on INVALID_ARGUMENT: 1 attempt, failed, the message percent-decoded", function()
    local res, err = client(RETRY_UNAVAILABLE):call{ url = url, grpc = "test.Echo/Invalid", body = "x" }
    assert.is_nil(res)
    assert.equal("failed", err.outcome)
    assert.equal(1, err.attempts)
    assert.equal(3, err.grpc_status)
    assert.equal("bad input: 100% wrong", err.grpc_message)
  end)

  it("gives decide a.grpc_status and a.grpc_message", function()
    local c = client([[
      return { max_attempts = 3, breaker = false, budget = false,
               decide = function(a)
                 return { retry = a.grpc_status == 14 and a.grpc_message == "flaky 1",
                          delay_ms = 1, reason = "seen " .. tostring(a.grpc_status) }
               end }
    ]])
    local res = c:call{ url = url, grpc = "test.Echo/Flaky", body = "x",
                        metadata = { ["x-key"] = "decide-1" } }
    -- retried after "flaky 1", stopped after "flaky 2"
    assert.is_nil(res)
    assert.equal(2, #calls_with("decide-1"))
  end)

  it("honours grpc-retry-pushback-ms: the delay it says, and no retry when negative", function()
    local c = client(RETRY_UNAVAILABLE)
    local _, err = c:call{ url = url, grpc = "test.Echo/Pushback", body = "x",
                           metadata = { ["x-key"] = "push-neg", ["x-pushback"] = "-1" } }
    assert.equal(1, err.attempts)
    assert.equal(14, err.grpc_status)
    _, err = c:call{ url = url, grpc = "test.Echo/Pushback", body = "x",
                     metadata = { ["x-key"] = "push-30", ["x-pushback"] = "30" } }
    assert.equal(5, err.attempts)
    assert.equal("gave_up", err.outcome)
    assert.same({ 30, 30, 30, 30 }, retry_delays(err.call_id))
  end)

  it("sends metadata, binary (-bin) values base64-encoded, and refuses reserved keys", function()
    local c = client(RETRY_UNAVAILABLE)
    assert(c:call{ url = url, grpc = "test.Echo/Echo", body = "x",
                   metadata = { ["x-key"] = "md-1", ["trace-bin"] = "\0\255\1", plain = "v 1" } })
    local seen = calls_with("md-1")[1]
    assert.equal("00ff01", seen.metadata["trace-bin"]) -- the server decoded our base64
    assert.equal("v 1", seen.metadata.plain)
    assert.error_matches(function()
      c:call{ url = url, grpc = "test.Echo/Echo", metadata = { ["grpc-foo"] = "x" } }
    end, "reserved")
    assert.error_matches(function()
      c:call{ url = url, grpc = "test.Echo/Echo", metadata = { Upper = "x" } }
    end, "lower%-case")
    assert.error_matches(function() c:call{ url = url, grpc = "no-slash" } end, "pkg.Service/Method")
  end)
end)

describe("deadlines on the wire", function()
  it("grpc-timeout is min(per-try, time left): the server's time remaining, and the call ends at the deadline", function()
    -- per-try 5 s but a 1.2 s deadline: the attempt may take 1.2 s at most
    local c = client([[
      return { max_attempts = 3, per_try_timeout_ms = 5000, deadline_ms = 1200,
               retry_on = { grpc = { "UNAVAILABLE", "DEADLINE_EXCEEDED" } },
               backoff = { base_ms = 1, max_ms = 1 }, breaker = false, budget = false }
    ]])
    local t0 = helpers.now()
    local res, err = c:call{ url = url, grpc = "test.Echo/Sleep", body = "x",
                             metadata = { ["x-key"] = "sleep-1", ["x-sleep-ms"] = "4000" } }
    assert.is_nil(res)
    assert.equal("deadline", err.outcome)
    assert.equal(4, err.grpc_status) -- DEADLINE_EXCEEDED
    assert.is_true(helpers.now() - t0 < 3.9, "the call waited for the handler")
    local seen = calls_with("sleep-1")
    assert.is_true(#seen >= 1)
    for _, s in ipairs(seen) do
      -- the server knows our deadline: at most 1.2 s, not the 5 s per-try
      assert.is_true(s.time_remaining > 0 and s.time_remaining <= 1.2, tostring(s.time_remaining))
    end
  end)

  it("grpc-timeout is the per-try timeout when that is shorter", function()
    local c = client([[
      return { max_attempts = 2, per_try_timeout_ms = 300, deadline_ms = 20000,
               retry_on = { grpc = { "DEADLINE_EXCEEDED" }, errors = { "timeout" } },
               backoff = { base_ms = 1, max_ms = 1 },
               breaker = false, budget = false }
    ]])
    local _, err = c:call{ url = url, grpc = "test.Echo/Sleep", body = "x",
                           metadata = { ["x-key"] = "sleep-2", ["x-sleep-ms"] = "1500" } }
    assert.equal("gave_up", err.outcome)
    assert.equal(2, err.attempts)
    assert.equal(4, err.grpc_status)
    local seen = calls_with("sleep-2")
    assert.is_true(#seen >= 1)
    for _, s in ipairs(seen) do assert.is_true(s.time_remaining <= 0.3, tostring(s.time_remaining)) end
  end)
end)

describe("HTTP/2", function()
  it("multiplexes 100 concurrent calls on one connection", function()
    local c = client(RETRY_UNAVAILABLE)
    local ok = 0
    for i = 1, 100 do
      resilua.go(function()
        local res = c:call{ url = url, grpc = "test.Echo/Sleep", body = tostring(i),
                            metadata = { ["x-key"] = "many", ["x-sleep-ms"] = "500" } }
        if res and res.body == tostring(i) then ok = ok + 1 end
      end)
    end
    resilua.wait()
    assert.equal(100, ok)
    local st = stats()
    local peers, n = {}, 0
    for _, s in ipairs(st.calls) do
      if s.metadata["x-key"] == "many" then
        n = n + 1
        peers[s.peer] = true
      end
    end
    assert.equal(100, n)
    local distinct = 0
    for _ in pairs(peers) do distinct = distinct + 1 end
    assert.equal(1, distinct) -- one client port: one connection
    assert.is_true(st.max_in_flight >= 50, "calls were not concurrent: " .. st.max_in_flight)
  end)

  it("carries plain HTTP calls too (http2 = true): h2c with prior knowledge", function()
    -- grpcio speaks only HTTP/2; a non-gRPC request gets HTTP 200 and a
    -- grpc-status saying what is wrong with it
    local res = assert(resilua.client{ policy = "no-retry" }:call{ url = url .. "/x", http2 = true })
    assert.equal(200, res.status)
    assert.is_nil(res.grpc_status)
    assert.truthy(res.headers["grpc-status"])
    -- on the command line: --http2, and without it HTTP/1.1, which an
    -- HTTP/2-only server does not speak
    local r = helpers.run({ helpers.bin, "call", "--http2", "--policy", "no-retry", "--quiet", url .. "/x" })
    assert.equal(0, r.code, r.stderr)
    r = helpers.run({ helpers.bin, "call", "--policy", "no-retry", "--quiet", url .. "/x" })
    assert.matches("protocol", r.stderr)
    assert.is_true(r.code ~= 0)
  end)
end)

describe("resilua call --grpc", function()
  local msg = dir .. "/msg.bin"

  it("sends -d @FILE as the message, -H as metadata; the answer to stdout, exit 0", function()
    helpers.write_file(msg, "\0\1message\255")
    local r = helpers.run({ helpers.bin, "call", "--grpc", "test.Echo/Echo", "-d", "@" .. msg,
                            "-H", "x-key: cli-1", "--log", dir .. "/cli.jsonl", url })
    assert.equal(0, r.code, r.stderr)
    assert.equal("\0\1message\255", r.stdout)
    assert.equal(1, #calls_with("cli-1"))
    local call = helpers.of_kind(helpers.events(dir .. "/cli.jsonl"), "call")[1]
    assert.equal(0, call.grpc_status)
  end)

  it("exits 3 on a non-retriable status, 4 when retries ran out", function()
    local r = helpers.run({ helpers.bin, "call", "--grpc", "test.Echo/Invalid", "-d", "x", "--quiet", url })
    assert.equal(3, r.code)
    assert.matches("INVALID_ARGUMENT: bad input: 100%% wrong", r.stderr)
    policy_file("cli-retry", RETRY_UNAVAILABLE)
    r = helpers.run({ helpers.bin, "call", "--grpc", "test.Echo/Flaky", "-H", "x-key: cli-2",
                      "-H", "x-fail: 9", "--policy", dir .. "/cli-retry.lua", "--quiet", url })
    assert.equal(4, r.code)
    assert.equal(5, #calls_with("cli-2"))
  end)

  it("refuses a bad method, -X, and reserved headers (exit 2)", function()
    assert.equal(2, helpers.run({ helpers.bin, "call", "--grpc", "/nope", "--quiet", url }).code)
    assert.equal(2, helpers.run({ helpers.bin, "call", "--grpc", "a.B/C", "-X", "GET", url }).code)
    assert.equal(2, helpers.run({ helpers.bin, "call", "--grpc", "a.B/C", "-H", "te: x",
                                  "--quiet", url }).code)
  end)

  it("resilua batch --http2 sends its items over one HTTP/2 connection", function()
    local fresh = helpers.start_server("return function() return { body = '{}', delay_ms = 50 } end")
    local lines = {}
    for i = 1, 40 do lines[i] = ('{"id": %d, "x": %d}'):format(i, i) end
    local input = helpers.write_file(dir .. "/items.jsonl", table.concat(lines, "\n") .. "\n")
    local r = helpers.run({ helpers.bin, "batch", "--in", input, "--out", dir .. "/results.jsonl",
                            "--no-ledger", "--concurrency", "8", "--http2", "--quiet", fresh.url })
    local stats = cjson.decode(helpers.curl(fresh.url .. "/_stats").body)
    fresh:stop()
    assert.equal(0, r.code, r.stderr)
    assert.equal(40, stats.requests)
    assert.equal(2, stats.connections) -- the batch's one, and curl's for /_stats
  end)

  it("resilua load --grpc runs gRPC calls", function()
    local r = helpers.run({ helpers.bin, "load", "--grpc", "test.Echo/Echo", "-d", "x", "-H", "x-key: load",
                            "--concurrency", "4", "--duration", "500ms", "--json", "--quiet", url })
    assert.equal(0, r.code, r.stderr)
    local report = cjson.decode(r.stdout)
    assert.is_true(report.calls > 0)
    assert.equal(report.calls, report.outcomes.ok)
    assert.same({ OK = report.calls }, report.grpc_statuses)
  end)
end)

describe("retry_on.grpc", function()
  it("takes names and numbers; an unknown name is a check error with did-you-mean", function()
    policy_file("codes-ok", [[return { retry_on = { grpc = { "UNAVAILABLE", 4 } },
      tests = { { attempt = { grpc_status = 4 }, expect = { retry = true } },
                { attempt = { grpc_status = 14 }, expect = { retry = true } },
                { attempt = { grpc_status = 13 }, expect = { retry = false } } } }]])
    policy_file("codes-bad", [[return { retry_on = { grpc = { "UNAVAILBLE" } } }]])
    policy_file("codes-num", [[return { retry_on = { grpc = { 17 } } }]])
    local r = helpers.run({ helpers.bin, "check", dir .. "/codes-ok.lua" })
    assert.equal(0, r.code, r.stdout)
    r = helpers.run({ helpers.bin, "check", dir .. "/codes-bad.lua" })
    assert.equal(2, r.code)
    assert.matches("codes%-bad.lua:1: retry_on.grpc%[1%]: unknown gRPC status code 'UNAVAILBLE' "
                   .. "%(did you mean 'UNAVAILABLE'%?%)", r.stdout)
    r = helpers.run({ helpers.bin, "check", dir .. "/codes-num.lua" })
    assert.equal(2, r.code)
    assert.matches("0 to 16", r.stdout)
  end)
end)

describe("resilua serve answers HTTP/2 and gRPC over h2c", function()
  local up
  setup(function()
    up = helpers.start_server([[
      local seen = 0
      return function(req)
        seen = seen + 1
        if req.path == "/t.S/Fail" then
          return { grpc_status = "UNAVAILABLE", grpc_message = "down 100% \u{e9}",
                   headers = { ["grpc-retry-pushback-ms"] = "7" } }
        elseif req.path == "/t.S/Slow" then
          return { delay_ms = 60000, body = "late" }
        elseif req.path == "/t.S/Http503" then
          return { status = 503, body = "not gRPC" }
        end
        return { body = (req.grpc and "grpc:" or "plain:") .. req.body,
                 headers = { ["X-Seen"] = tostring(seen) } }
      end
    ]])
  end)
  teardown(function() up:stop() end)

  it("talks to resilua call --grpc: the message, and the status from the trailers", function()
    local msg = helpers.write_file(dir .. "/serve-msg.bin", "\0bytes\255")
    local r = helpers.run({ helpers.bin, "call", "--grpc", "t.S/Echo", "-d", "@" .. msg, "--quiet", up.url })
    assert.equal(0, r.code, r.stderr)
    assert.equal("grpc:\0bytes\255", r.stdout)
    local c = client(RETRY_UNAVAILABLE)
    local _, err = c:call{ url = up.url, grpc = "t.S/Fail", body = "x" }
    assert.equal(5, err.attempts)
    assert.equal(14, err.grpc_status)
    assert.equal("down 100% \u{e9}", err.grpc_message) -- percent-encoded on the wire, decoded
    -- the pushback came in the Trailers-Only response
    assert.same({ 7, 7, 7, 7 }, retry_delays(err.call_id))
  end)

  it("maps a plain HTTP status (no grpc-status) as gRPC says: 503 is UNAVAILABLE", function()
    local _, err = client(RETRY_UNAVAILABLE):call{ url = up.url, grpc = "t.S/Http503", body = "x" }
    assert.equal(503, err.status)
    assert.equal(14, err.grpc_status)
    assert.equal(5, err.attempts)
  end)

  it("ends a call at its grpc-timeout with DEADLINE_EXCEEDED, as a gRPC server does", function()
    local msg = helpers.write_file(dir .. "/slow.bin", "\0\0\0\0\1x")
    local r = helpers.run(("nghttp -v -H 'content-type: application/grpc' -H 'te: trailers' "
      .. "-H 'grpc-timeout: 100m' -d %s %s/t.S/Slow"):format(helpers.quote(msg), up.url))
    assert.equal(0, r.code, r.stderr)
    assert.matches("grpc%-status: 4", r.stdout)
    assert.matches("grpc%-message: deadline exceeded", r.stdout)
  end)

  it("answers a message over its 1 MiB limit RESOURCE_EXHAUSTED, and bad framing INTERNAL, without the handler", function()
    local before = cjson.decode(helpers.curl(up.url .. "/_stats").body).handler_runs
    local _, err = client(RETRY_UNAVAILABLE):call{ url = up.url, grpc = "t.S/Echo",
                                                   body = ("x"):rep(1024 * 1024 + 1) }
    assert.equal(8, err.grpc_status)
    assert.equal("request too large", err.grpc_message)
    assert.equal(1, err.attempts)
    local unframed = helpers.write_file(dir .. "/unframed.bin", "not a gRPC message")
    local r = helpers.run(("nghttp -v -H 'content-type: application/grpc' -d %s %s/t.S/Echo")
      :format(helpers.quote(unframed), up.url))
    assert.matches("grpc%-status: 13", r.stdout)
    local after = cjson.decode(helpers.curl(up.url .. "/_stats").body).handler_runs
    assert.equal(before, after)
  end)

  it("interoperates with nghttp: a framed gRPC answer, then trailers", function()
    local body = dir .. "/nghttp.bin"
    helpers.write_file(body, "\0\0\0\0\3abc")
    local out = dir .. "/nghttp.out"
    local r = helpers.run(("nghttp -v -H 'content-type: application/grpc' -H 'te: trailers' -d %s %s/t.S/Echo"
      .. " > %s"):format(helpers.quote(body), up.url, helpers.quote(out)))
    assert.equal(0, r.code, r.stderr)
    local text = helpers.read_file(out)
    assert.matches("recv %(stream_id=%d+%) :status: 200", text)
    assert.matches("content%-type: application/grpc", text)
    assert.matches("recv HEADERS frame <length=%d+, flags=0x05", text) -- trailers end the stream
    assert.matches("grpc%-status: 0", text)
    -- and the DATA: 5-byte prefix + "grpc:abc"
    local r2 = helpers.run(("nghttp -H 'content-type: application/grpc' -d %s %s/t.S/Echo | od -An -c")
      :format(helpers.quote(body), up.url))
    assert.matches("\\0%s+\\0%s+\\0%s+\\0%s+\\b%s+g%s+r%s+p%s+c%s+:%s+a%s+b%s+c", r2.stdout)
  end)

  it("serves plain HTTP/2 to curl --http2-prior-knowledge, and HTTP/1.1 on the same port", function()
    local h2 = helpers.curl("--http2-prior-knowledge -d hi " .. up.url .. "/p")
    assert.equal(200, h2.status)
    assert.equal("plain:hi", h2.body)
    assert.truthy(h2.headers["x-seen"])
    local h1 = helpers.curl("-d hey " .. up.url .. "/p")
    assert.equal("plain:hey", h1.body)
    local stats = cjson.decode(helpers.curl(up.url .. "/_stats").body)
    assert.is_true(stats.requests >= 2)
  end)

  it("takes the preface and frame headers split across reads (the HTTP/1.1 side waits for the whole preface)", function()
    -- the preface a byte at a time, then a SETTINGS frame's 9-byte header
    -- in two sends: serve must answer with its SETTINGS and ack ours
    local script = dir .. "/split.py"
    helpers.write_file(script, [=[
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for b in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n":
    s.sendall(bytes([b])); time.sleep(0.005)
frame = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"
s.sendall(frame[:5]); time.sleep(0.05); s.sendall(frame[5:])
s.settimeout(10)
got, acked, seen = b"", False, []
while not acked:
    d = s.recv(65536)
    if not d: break
    got += d
    while len(got) >= 9 and len(got) >= 9 + int.from_bytes(got[:3], "big"):
        n = int.from_bytes(got[:3], "big")
        seen.append((got[3], got[4]))
        if got[3] == 4 and got[4] & 1: acked = True
        got = got[9 + n:]
print(" ".join("%d/%d" % t for t in seen))
]=])
    local r = helpers.run({ "python3", script, (up.url:gsub("^http://", "")) })
    assert.equal(0, r.code, r.stderr)
    assert.matches("^4/0", r.stdout) -- the server's SETTINGS first
    assert.matches("4/1", r.stdout)  -- then the ack of ours
  end)

  it("keeps one connection for 2,000 calls from 64 at a time (libcurl's resets of finished streams are not a rapid-reset attack)", function()
    local fresh = helpers.start_server()
    local c = client(RETRY_UNAVAILABLE)
    local ok = 0
    for _ = 1, 64 do
      resilua.go(function()
        for _ = 1, 32 do
          local res = c:call{ url = fresh.url, grpc = "t.S/Predict", body = "x" }
          if res then ok = ok + 1 end
        end
      end)
    end
    resilua.wait()
    local stats = cjson.decode(helpers.curl(fresh.url .. "/_stats").body)
    fresh:stop()
    assert.equal(64 * 32, ok)
    assert.equal(64 * 32, stats.requests)
    assert.equal(2, stats.connections) -- ours, and curl's for /_stats
  end)

  it("carries 1,500 calls in flight at once on one connection", function()
    local fresh = helpers.start_server("return function() return { body = 'ok', delay_ms = 500 } end")
    -- one attempt, and time enough on a loaded machine
    local c = client([[return { max_attempts = 1, per_try_timeout_ms = 60000, deadline_ms = 60000 }]])
    -- One call first: libcurl then knows the server's stream limit (before
    -- its SETTINGS, libcurl 7.88 assumes 100; docs/grpc.md).
    assert(c:call{ url = fresh.url, grpc = "t.S/Predict", body = "x" })
    local ok, why = 0, {}
    for _ = 1, 1500 do
      resilua.go(function()
        local res, err = c:call{ url = fresh.url, grpc = "t.S/Predict", body = "x" }
        if res and res.body == "ok" then ok = ok + 1
        else why[#why + 1] = err and err.message or "?" end
      end)
    end
    resilua.wait()
    local stats = cjson.decode(helpers.curl(fresh.url .. "/_stats").body)
    fresh:stop()
    assert.equal(1500, ok, why[1])
    assert.equal(1501, stats.requests)
    assert.equal(2, stats.connections) -- ours, and curl's for /_stats
  end)

  it("multiplexes: 200 concurrent gRPC calls from resilua, all answered", function()
    local c = client(RETRY_UNAVAILABLE)
    local ok = 0
    for i = 1, 200 do
      resilua.go(function()
        local res = c:call{ url = up.url, grpc = "t.S/Echo", body = tostring(i) }
        if res and res.body == "grpc:" .. i then ok = ok + 1 end
      end)
    end
    resilua.wait()
    assert.equal(200, ok)
  end)
end)

-- Transparent retries (gRFC A6; docs/grpc.md): a stream the server
-- refused unprocessed, by RST_STREAM(REFUSED_STREAM) or as a stream above
-- a GOAWAY's last-stream-id, never reached its application, so the call
-- sends it again whatever the policy says, as a logged attempt
-- (`refused_stream`) that counts neither against max_attempts nor as a
-- failure, at most 3 times a call.  The peer, spec/peers/h2_refuse.py,
-- is a raw h2c server that prints what it read, answered and refused.
describe("a stream the server refused unprocessed", function()
  -- One attempt, no retry_on: only a transparent retry may send it again.
  local ONE_ATTEMPT = [[
    return { max_attempts = 1, retry_on = { status = {}, errors = {}, grpc = {} },
             breaker = false, budget = false }
  ]]

  -- The peer's counts: requests read, answered (processed) and refused.
  local function peer_counts(peer)
    local out = peer:stdout()
    return { requests = select(2, out:gsub("request %d+\n", "")),
             processed = select(2, out:gsub("processed %d+\n", "")),
             refused = select(2, out:gsub("refused %d+\n", "")) }
  end

  -- `resilua call --http2 -v` against a fresh peer started with args;
  -- returns the run, its attempt events, its call event and the peer's counts.
  local function call_peer(args, policy)
    local name = ("refuse%d"):format(math.random(1e9))
    policy_file(name, policy)
    local argv = { "python3", "spec/peers/h2_refuse.py" }
    table.move(args, 1, #args, #argv + 1, argv)
    local peer = helpers.spawn_listening(argv, "h2_refuse.py")
    local r = helpers.run({ helpers.bin, "call", "-v", "--http2", "-X", "POST", "-d", "x",
                            "--policy", name, "--policy-path", dir, peer.url .. "/x" })
    peer:stop()
    local attempts, call = {}, nil
    for line in r.stderr:gmatch("[^\n]+") do
      local ok, ev = pcall(cjson.decode, line)
      if ok and ev.event == "attempt" then attempts[#attempts + 1] = ev end
      if ok and ev.event == "call" then call = ev end
    end
    return r, attempts, call, peer_counts(peer)
  end

  for _, case in ipairs({ { how = "RST_STREAM(REFUSED_STREAM)", args = {} },
                          { how = "a GOAWAY below its stream id", args = { "--goaway" } } }) do
    it("by " .. case.how .. ": sent again under a one-attempt policy, and logged", function()
      local r, attempts, call, peer = call_peer(case.args, ONE_ATTEMPT)
      assert.equal(0, r.code, r.stderr)
      assert.same({ requests = 2, processed = 1, refused = 1 }, peer)
      assert.equal(peer.requests, #attempts, r.stderr) -- every request read is a logged attempt
      assert.equal("refused_stream", attempts[1].error)
      assert.equal("retry", attempts[1].decision)
      assert.equal(0, attempts[1].delay_ms)
      assert.matches("transparent retry 1 of 3", attempts[1].reason)
      assert.equal(200, attempts[2].status)
      assert.equal("ok", call.outcome)
      assert.equal(2, call.attempts)
      assert.equal(1, call.transparent_retries)
    end)
  end

  it("is bounded: 3 transparent retries, then the policy counts its own attempts", function()
    -- A peer that refuses everything: 1 + 3 transparent, then the policy's
    -- 2 attempts (it retries refused_stream); nothing ever ran.
    local r, attempts, call, peer = call_peer({ "--refuse", "-1" }, [[
      return { max_attempts = 2, backoff = { base_ms = 1, max_ms = 2 },
               retry_on = { status = {}, errors = { "refused_stream" } },
               breaker = false, budget = false }
    ]])
    assert.equal(4, r.code, r.stderr) -- gave up
    assert.same({ requests = 5, processed = 0, refused = 5 }, peer)
    assert.equal(5, #attempts)
    for i, a in ipairs(attempts) do
      assert.equal("refused_stream", a.error)
      if i <= 3 then assert.matches("transparent retry " .. i .. " of 3", a.reason) end
    end
    assert.equal("error refused_stream in retry_on", attempts[4].reason)
    assert.equal("max_attempts 2 reached", attempts[5].reason)
    assert.equal("gave_up", call.outcome)
    assert.equal(3, call.transparent_retries)
    -- Under a one-attempt policy, the call ends after the 3: its one
    -- attempt is spent.
    r, attempts, call, peer = call_peer({ "--refuse", "-1" }, ONE_ATTEMPT)
    assert.equal(4, r.code, r.stderr)
    assert.same({ requests = 4, processed = 0, refused = 4 }, peer)
    assert.equal(4, #attempts)
    assert.equal("error refused_stream not in retry_on", attempts[4].reason)
    assert.equal("gave_up", call.outcome)
    assert.matches("refused_stream %(HTTP/2 stream refused by the server", r.stderr)
  end)

  it("not after the answer began: REFUSED_STREAM after the response headers is a reset", function()
    -- The server broke RFC 9113 (it had begun to answer): not provably
    -- unprocessed, so the policy judges it, and this one does not retry.
    local r, attempts, call, peer = call_peer({ "--late" }, ONE_ATTEMPT)
    assert.equal(4, r.code, r.stderr)
    assert.same({ requests = 1, processed = 0, refused = 1 }, peer)
    assert.equal(1, #attempts)
    assert.equal("reset", attempts[1].error)
    assert.is_nil(call.transparent_retries)
  end)

  it("on a shared connection: a GOAWAY refuses every stream on it, each is sent again and runs once", function()
    -- The peer refuses the first 10 requests it reads: the first by a
    -- GOAWAY(last-stream-id 0), and so every later stream of that
    -- connection; 10 calls multiplexed on it all go again, on fresh
    -- connections, and each runs exactly once.
    local argv = { "python3", "spec/peers/h2_refuse.py", "--goaway", "--refuse", "10" }
    local peer = helpers.spawn_listening(argv, "h2_refuse.py")
    local c = client(ONE_ATTEMPT)
    local ok, ids = 0, {}
    for i = 1, 10 do
      resilua.go(function()
        local res, err = c:call{ method = "POST", url = peer.url .. "/x", body = tostring(i),
                                 http2 = true }
        if res and res.status == 200 then ok = ok + 1 end
        ids[(res or err).call_id] = true
      end)
    end
    resilua.wait()
    peer:stop()
    local counts = peer_counts(peer)
    local logged, refused = 0, 0
    for _, e in ipairs(helpers.of_kind(helpers.events(log), "attempt")) do
      if ids[e.call_id] then
        logged = logged + 1
        if e.error then
          assert.equal("refused_stream", e.error)
          refused = refused + 1
        end
      end
    end
    assert.equal(10, ok)
    assert.same({ requests = 20, processed = 10, refused = 10 }, counts) -- each call ran once
    assert.equal(10 + refused, logged) -- every attempt is ok or refused_stream
    -- Every refusal the peer made is a logged attempt; so is a stream that
    -- libcurl could no longer start on the connection going away (it never
    -- reached the peer).
    assert.is_true(refused >= 10)
  end)

  it("resilua.upstream's faults take grpc_status: a gRPC call sees the code, its message and pushback", function()
    local up = helpers.start_server([[
      return require("resilua.upstream").new{
        faults = { { p = 1, grpc_status = "UNAVAILABLE", grpc_message = "shed",
                     headers = { ["grpc-retry-pushback-ms"] = "3" } } } }:handler()
    ]])
    local _, err = client(RETRY_UNAVAILABLE):call{ url = up.url, grpc = "t.S/M", body = "x" }
    up:stop()
    assert.equal(14, err.grpc_status)
    assert.equal("shed", err.grpc_message)
    assert.equal(200, err.status) -- a gRPC answer (Trailers-Only), not an HTTP 503
    assert.equal(5, err.attempts)
    assert.same({ 3, 3, 3, 3 }, retry_delays(err.call_id))
  end)

  it("a gRPC call: resilua serve's `close` (GOAWAY, then REFUSED_STREAM) is UNAVAILABLE, retried transparently", function()
    local up = helpers.start_server([[
      local refused = {}
      return function(req)
        local key = req.headers["x-key"]
        if not refused[key] then
          refused[key] = true
          return { action = "close" }
        end
        return { body = "ran:" .. req.body .. ":" .. (req.headers["grpc-previous-rpc-attempts"] or "-") }
      end
    ]])
    local res, err = client(ONE_ATTEMPT):call{ url = up.url, grpc = "t.S/Once", body = "m",
                                                metadata = { ["x-key"] = "once" } }
    up:stop()
    assert.is_nil(err and err.message)
    assert.equal("ran:m:1", res.body)
    assert.equal(2, res.attempts)
    local attempts = {}
    for _, e in ipairs(helpers.of_kind(helpers.events(log), "attempt")) do
      if e.call_id == res.call_id then attempts[#attempts + 1] = e end
    end
    assert.equal("refused_stream", attempts[1].error)
    assert.equal(14, attempts[1].grpc_status) -- UNAVAILABLE, as gRPC reports it
    assert.equal(0, attempts[2].grpc_status)
  end)
end)
