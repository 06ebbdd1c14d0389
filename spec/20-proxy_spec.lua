-- resilua proxy (contract 7): forwarding per RFC 9110/9112, the policy per
-- request, overrides, error answers, streaming and its commit point,
-- limits, drain, metrics, config routes and hot reload.  Real clients:
-- curl and Python requests; upstreams: `resilua serve` and a Python
-- http.server that streams.
local H = require "spec.helpers"
local cjson = require "cjson"

local q = H.quote

-- A streaming upstream (Python's http.server, threads): /sse sends event 0,
-- then waits for the file named by ?release= before the rest; /cut breaks
-- off mid-body; /slowfirst sends its head at once and its body late the
-- first time; /big sends N bytes with a Content-Length; /hits counts.
local STREAM_UPSTREAM = [[
import http.server, json, os, socketserver, sys, time, urllib.parse
hits = {}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data)); self.wfile.flush()
    def do_GET(self):
        u = urllib.parse.urlparse(self.path); qs = urllib.parse.parse_qs(u.query)
        key = self.path if u.path == "/slowfirst" else u.path
        hits[key] = hits.get(key, 0) + 1
        if u.path == "/hits":
            body = json.dumps(hits).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body); return
        if u.path in ("/sse", "/cut"):
            self.send_response(200); self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked"); self.end_headers()
            self.chunk(b"data: 0\n\n")
            if u.path == "/cut":
                time.sleep(0.2); self.chunk(b"data: 1\n\n"); time.sleep(0.2)
                self.close_connection = True; self.connection.shutdown(2); return
            release = qs["release"][0]
            for _ in range(3000):
                if os.path.exists(release): break
                time.sleep(0.01)
            for i in range(1, 5): self.chunk(b"data: %d\n\n" % i)
            self.wfile.write(b"0\r\n\r\n"); self.wfile.flush(); return
        if u.path == "/hop":
            self.send_response(200); self.send_header("Connection", "X-Secret, keep-alive")
            self.send_header("X-Secret", "s"); self.send_header("Keep-Alive", "timeout=5")
            self.send_header("Upgrade", "h2c"); self.send_header("X-Kept", "k")
            self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok"); return
        if u.path == "/slowfirst":
            self.send_response(200); self.send_header("Content-Length", "5"); self.end_headers()
            self.wfile.flush()
            if hits[key] == 1: time.sleep(3)
            self.wfile.write(b"hello"); return
        if u.path == "/big":
            n = int(qs["n"][0]); block = b"x" * 65536
            self.send_response(200); self.send_header("Content-Length", str(n)); self.end_headers()
            while n > 0:
                k = min(n, len(block)); self.wfile.write(block[:k]); n -= k
            return
        self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers()
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
s = S(("127.0.0.1", 0), H)
print("listening on 127.0.0.1:%d" % s.server_address[1], flush=True)
s.serve_forever()
]]

-- A `resilua serve` upstream that echoes what it got, fails on demand,
-- and remembers the Idempotency-Key of every request (GET /keys).
local ECHO_UPSTREAM = [[
local keys, flaky = {}, 0
return function(req)
  if req.path == "/keys" then return { body = table.concat(keys, ",") } end
  keys[#keys + 1] = req.headers["idempotency-key"] or "-"
  if req.path == "/flaky" then
    flaky = flaky + 1
    if flaky % 3 ~= 0 then return { status = 503, body = "busy" } end
  end
  if req.path == "/down" then return { status = 503, headers = { ["Retry-After"] = "0" }, body = "down" } end
  if req.path == "/hang" then return { action = "hang" } end
  if req.path == "/slow" then return { delay_ms = 700, body = "slow" } end
  if req.path == "/slower" then return { delay_ms = 3000, body = "slower" } end
  local lines = {}
  for k, v in pairs(req.headers) do lines[#lines + 1] = k .. ": " .. v end
  table.sort(lines)
  return { status = 200, headers = { ["Content-Type"] = "text/plain", ["X-Up"] = "1" },
           body = req.method .. " " .. req.path .. "?" .. req.query .. "\n"
                  .. table.concat(lines, "\n") .. "\n\n" .. req.body }
end
]]

local FAST = [[return { max_attempts = 3, backoff = { base_ms = 1, max_ms = 5, jitter = "none" },
                       retry_on = { errors = { "timeout", "connect", "reset", "dns" } },
                       per_try_timeout_ms = 2000, breaker = false, budget = false }]]

local function start_python(src)
  local script = H.write_file(H.tmpname(".py"), src)
  return H.spawn_listening({ "python3", script }, "python upstream")
end

-- Starts `resilua proxy` with args; returns the process with .url, .host
-- and .port, and .log (the event log).
local function start_proxy(args)
  local log = H.tmpname(".jsonl")
  local argv = { H.bin, "proxy", "--log", log }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local p = H.spawn_listening(argv, "resilua proxy")
  p.log = log
  return p
end

local function json_of(res) return cjson.decode(res.body) end

describe("resilua proxy", function()
  local up, dir, fast
  setup(function()
    up = H.start_server(ECHO_UPSTREAM)
    dir = H.tmpdir()
    fast = H.write_file(dir .. "/fast.lua", FAST)
  end)
  teardown(function() up:stop() end)

  describe("one route", function()
    local px
    setup(function()
      px = start_proxy{ "--listen", "127.0.0.1:0", "--upstream", up.url, "--policy", fast }
    end)
    teardown(function() assert.equal(0, px:stop()) end)

    it("forwards method, path, query and body; drops hop-by-hop headers; adds XFF, XFP, Via", function()
      local r = H.curl(("-X PUT --data-binary 'a&b=c' %s -H 'Connection: X-Drop' -H 'X-Drop: 1' "
                        .. "-H 'Keep-Alive: 5' -H 'TE: trailers' -H 'Proxy-Authorization: x' "
                        .. "-H 'X-Forwarded-For: 10.0.0.1' -H 'Via: 1.0 edge' -H 'X-Keep: yes' "
                        .. "-H 'x-resilua-max-attempts: 2' -H 'x-resilua-whatever: 1'")
                       :format(q(px.url .. "/p/a%20th?x=1&y=%2F")))
      assert.equal(200, r.status)
      local head, body = r.body:match("^(.-)\n\n(.*)$")
      assert.equal("a&b=c", body)
      assert.truthy(head:find("^PUT /p/a%%20th%?x=1&y=%%2F\n"))
      assert.truthy(head:find("\nx%-keep: yes"))
      assert.truthy(head:find("\nx%-forwarded%-for: 10%.0%.0%.1, 127%.0%.0%.1"))
      assert.truthy(head:find("\nx%-forwarded%-proto: http"))
      assert.truthy(head:find("\nvia: 1%.0 edge, 1%.1 resilua"))
      assert.truthy(head:find("\nhost: 127%.0%.0%.1:" .. up.port))
      for _, h in ipairs{ "x%-drop", "keep%-alive", "\nte:", "proxy%-authorization", "x%-resilua" } do
        assert.falsy(head:find(h), h)
      end
      -- and on the way back
      assert.equal("1", r.headers["x-up"])
      assert.equal("1.1 resilua", r.headers["via"])
      assert.equal("1", r.headers["x-resilua-attempts"])
      assert.equal("ok", r.headers["x-resilua-outcome"])
    end)

    it("keeps a client's X-Request-Id, makes one otherwise, and names it in every event", function()
      local r = H.curl(("-H 'X-Request-Id: abc-123' %s"):format(q(px.url .. "/flaky")))
      assert.equal(200, r.status)
      assert.equal("abc-123", r.headers["x-request-id"])
      assert.equal("3", r.headers["x-resilua-attempts"])
      assert.equal("false", r.headers["x-should-retry"])
      local r2 = H.curl(q(px.url .. "/echo"))
      assert.truthy(r2.headers["x-request-id"]:match("^%x+$"))
      assert.truthy(r2.body:find("\nx-request-id: " .. r2.headers["x-request-id"], 1, true))
      local ev = H.wait_until(function()
        local mine = {}
        for _, e in ipairs(H.events(px.log)) do
          if e.request_id == "abc-123" then mine[#mine + 1] = e end
        end
        return #mine == 4 and mine
      end)
      assert.truthy(ev, "3 attempt events and a call event for abc-123")
      for _, e in ipairs(ev) do assert.equal("default", e.route) end
    end)

    it("gives a POST an Idempotency-Key, the same on every attempt, and keeps the client's", function()
      local before = H.curl(q(px.url .. "/keys")).body
      local r = H.curl(("-d x %s"):format(q(px.url .. "/flaky")))
      assert.equal(200, r.status)
      local after = H.curl(q(px.url .. "/keys")).body
      local new = {}
      for k in after:sub(#before + 2):gmatch("[^,]+") do new[#new + 1] = k end
      assert.equal(3, #new) -- the 3 attempts
      assert.truthy(new[1]:match("^%x+%-%x+%-4%x+%-%x+%-%x+$"))
      assert.equal(new[1], new[2])
      assert.equal(new[1], new[3])
      local r2 = H.curl(("-d x -H 'Idempotency-Key: mine-1' %s"):format(q(px.url .. "/echo")))
      assert.truthy(r2.body:find("\nidempotency%-key: mine%-1\n"))
    end)

    it("takes chunked request bodies and Expect: 100-continue", function()
      local body = string.rep("0123456789", 20000)
      local file = H.write_file(nil, body)
      local r = H.curl(("-H 'Transfer-Encoding: chunked' --data-binary @%s %s")
                         :format(q(file), q(px.url .. "/echo")))
      assert.equal(200, r.status)
      assert.equal(body, r.body:match("\n\n(.*)$"))
      local r2 = H.curl(("-H 'Expect: 100-continue' --data-binary @%s %s")
                          :format(q(file), q(px.url .. "/echo")))
      assert.equal(200, r2.status)
      assert.equal(body, r2.body:match("\n\n(.*)$"))
      assert.falsy(r2.body:find("\nexpect:"))
    end)

    it("keeps connections alive on both sides", function()
      local before = cjson.decode(H.curl(q(up.url .. "/_stats")).body).connections
      local urls = {}
      for i = 1, 5 do urls[i] = q(px.url .. "/echo") end
      local r = H.run("curl -sv -o /dev/null " .. table.concat(urls, " ") .. " 2>&1")
      local _, reused = r.stdout:gsub("Re%-using existing connection", "")
      assert.equal(4, reused)
      local after = cjson.decode(H.curl(q(up.url .. "/_stats")).body).connections
      assert.is_true(after - before <= 1, ("upstream connections %d -> %d"):format(before, after))
    end)

    it("lets x-resilua-max-attempts and x-resilua-deadline-ms only tighten the policy", function()
      local r = H.curl(("-H 'x-resilua-max-attempts: 1' %s"):format(q(px.url .. "/down")))
      assert.equal(503, r.status)
      assert.equal("1", r.headers["x-resilua-attempts"])
      assert.is_nil(r.headers["x-should-retry"])
      local r2 = H.curl(("-H 'x-resilua-max-attempts: 50' %s"):format(q(px.url .. "/down")))
      assert.equal("3", r2.headers["x-resilua-attempts"])
      assert.equal("gave_up", r2.headers["x-resilua-outcome"])
      local r3 = H.curl(("-H 'x-resilua-deadline-ms: 300' %s"):format(q(px.url .. "/hang")))
      assert.equal(504, r3.status)
      local j = json_of(r3)
      assert.equal("deadline", j.outcome)
      assert.equal(r3.headers["x-request-id"], j.request_id)
      local r4 = H.curl(("-H 'x-resilua-deadline-ms: soon' %s"):format(q(px.url .. "/echo")))
      assert.equal(400, r4.status)
      assert.equal("bad_request", json_of(r4).outcome)
    end)

    it("answers the admin paths and metrics that promtool accepts", function()
      local h = H.curl(q(px.url .. "/_resilua/health"))
      assert.equal(200, h.status)
      local m = H.curl(q(px.url .. "/_resilua/metrics"))
      assert.equal(200, m.status)
      assert.truthy(m.body:find('resilua_proxy_requests_total{route="default",outcome="ok"} %d+'))
      assert.truthy(m.body:find('resilua_proxy_attempts_total{route="default",result="503"} %d+'))
      assert.truthy(m.body:find('resilua_policy_info{route="default",policy="fast",version="%x+"} 1'))
      local file = H.write_file(nil, m.body)
      local r = H.run("promtool check metrics < " .. q(file))
      assert.equal(0, r.code, r.stdout .. r.stderr)
    end)

    it("answers Python requests through the same connection", function()
      local py = H.write_file(H.tmpname(".py"), ([[
import requests, json
s = requests.Session()
out = []
for i in range(3):
    r = s.post("%s/flaky", json={"i": i})
    out.append([r.status_code, r.headers["x-resilua-attempts"], r.headers.get("x-should-retry")])
print(json.dumps(out))
]]):format(px.url))
      local r = H.run({ "python3", py })
      assert.equal(0, r.code, r.stderr)
      local out = cjson.decode(r.stdout)
      for _, o in ipairs(out) do assert.equal(200, o[1]) end
    end)
  end)

  it("--keep-host forwards the client's Host", function()
    local px = start_proxy{ "--listen", "127.0.0.1:0", "--upstream", up.url, "--keep-host" }
    local r = H.curl(("-H 'Host: svc.example:8443' %s"):format(q(px.url .. "/echo")))
    assert.truthy(r.body:find("\nhost: svc.example:8443\n", 1, true))
    assert.equal(0, px:stop())
  end)

  describe("error answers", function()
    it("502 for a refused connection, 503 with Retry-After for an open breaker", function()
      local pol = H.write_file(dir .. "/brk.lua", [[return { max_attempts = 2,
        backoff = { base_ms = 1, max_ms = 2 }, breaker = { failures = 2, open_ms = 30000 }, budget = false }]])
      local px = start_proxy{ "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:1",
                              "--policy", pol }
      local r = H.curl(q(px.url .. "/x"))
      assert.equal(502, r.status)
      local j = json_of(r)
      assert.equal("gave_up", j.outcome)
      assert.equal(2, j.attempts)
      assert.truthy(j.error:find("connect"))
      assert.equal(r.headers["x-request-id"], j.request_id)
      assert.equal("false", r.headers["x-should-retry"])
      local r2 = H.curl(q(px.url .. "/x"))
      assert.equal(503, r2.status)
      assert.equal("breaker_open", json_of(r2).outcome)
      assert.equal("0", r2.headers["x-resilua-attempts"])
      local ra = tonumber(r2.headers["retry-after"])
      assert.truthy(ra and ra >= 1 and ra <= 30)
      assert.equal("false", r2.headers["x-should-retry"])
      assert.equal(0, px:stop())
    end)

    it("a refused retry budget: the upstream's answer, outcome budget, x-should-retry: false", function()
      local pol = H.write_file(dir .. "/budget.lua", [[return { max_attempts = 4,
        backoff = { base_ms = 1, max_ms = 1 }, breaker = false, budget = { max_tokens = 2, token_ratio = 0 } }]])
      local px = start_proxy{ "--listen", "127.0.0.1:0", "--upstream", up.url, "--policy", pol }
      local r = H.curl(q(px.url .. "/down"))
      assert.equal(503, r.status)
      assert.equal("down", r.body)
      assert.equal("budget", r.headers["x-resilua-outcome"])
      assert.equal("false", r.headers["x-should-retry"])
      assert.truthy(H.curl(q(px.url .. "/_resilua/metrics")).body
                      :find('resilua_proxy_budget_refusals_total{route="default"} [1-9]'))
      assert.equal(0, px:stop())
    end)

    it("504 for a per-try timeout", function()
      local pol = H.write_file(dir .. "/short.lua", [[return { max_attempts = 1, per_try_timeout_ms = 200,
        breaker = false, budget = false }]])
      local px = start_proxy{ "--listen", "127.0.0.1:0", "--upstream", up.url, "--policy", pol }
      local r = H.curl(q(px.url .. "/hang"))
      assert.equal(504, r.status)
      assert.equal("gave_up", json_of(r).outcome)
      assert.equal(0, px:stop())
    end)
  end)

  describe("streaming", function()
    local py, px
    setup(function()
      py = start_python(STREAM_UPSTREAM)
      local pol = H.write_file(dir .. "/stream.lua", [[return { max_attempts = 3,
        per_try_timeout_ms = 1000, first_byte_timeout_ms = 500, idle_timeout_ms = 20000,
        retry_on = { errors = { "timeout", "connect", "reset" } },
        backoff = { base_ms = 1, max_ms = 2 }, breaker = false, budget = false }]])
      px = start_proxy{ "--listen", "127.0.0.1:0", "--upstream", py.url, "--policy", pol }
    end)
    teardown(function()
      px:stop()
      py:stop("KILL")
    end)

    it("forwards an event stream as it arrives, past the per-try timeout", function()
      local release = H.tmpname(".release")
      local out = H.tmpname(".sse")
      local c = H.spawn(("exec curl -sN -D %s.h -o %s %s"):format(q(out), q(out),
                          q(px.url .. "/sse?release=" .. release)))
      -- The upstream holds the rest until event 0 came through the proxy.
      assert.truthy(H.wait_until(function() return (H.read_file(out) or ""):find("data: 0") end, 20))
      H.sleep(1.2) -- longer than per_try_timeout_ms: after the commit it no longer applies
      H.write_file(release, "")
      assert.equal(0, c:wait(20))
      assert.equal("data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n", H.read_file(out))
      local head = H.read_file(out .. ".h")
      assert.truthy(head:lower():find("content%-type: text/event%-stream"))
      assert.truthy(head:lower():find("transfer%-encoding: chunked"))
    end)

    it("drops hop-by-hop response headers, also those Connection names", function()
      local r = H.curl(q(px.url .. "/hop"))
      assert.equal(200, r.status)
      assert.equal("k", r.headers["x-kept"])
      for _, h in ipairs{ "x-secret", "keep-alive", "upgrade" } do assert.is_nil(r.headers[h], h) end
    end)

    it("retries a response whose first byte is late (first_byte_timeout_ms)", function()
      local r = H.curl(q(px.url .. "/slowfirst"))
      assert.equal(200, r.status)
      assert.equal("hello", r.body)
      assert.equal("2", r.headers["x-resilua-attempts"])
    end)

    it("after the commit point, an upstream failure aborts the client's response, without retry", function()
      local r = H.curl(q(px.url .. "/cut"))
      assert.are_not.equal(0, r.code) -- curl sees an error, not a short success
      local hits = cjson.decode(H.curl(q(py.url .. "/hits")).body)
      assert.equal(1, hits["/cut"])
      local calls = H.wait_until(function()
        for _, e in ipairs(H.of_kind(H.events(px.log), "call")) do
          if e.url == nil and e.outcome == "failed" and e.streamed then return e end
        end
      end)
      assert.truthy(calls, "the failure is logged")
    end)

    it("streams to client:call's on_chunk and enforces first_byte_timeout_ms there too", function()
      local script = H.write_file(H.tmpname(".lua"), ([[
        local resilua = require "resilua"
        local p = require("resilua.policy").define({ first_byte_timeout_ms = 1500, -- /slowfirst: 3 s
          retry_on = { errors = { "timeout" } },
          backoff = { base_ms = 1, max_ms = 1 }, breaker = false, budget = false }, "t", "t.lua", "")
        local client = resilua.client{ policy = p }
        local n, parts = 0, 0
        local res = assert(client:call{ url = %q, on_chunk = function(c) n = n + #c parts = parts + 1 end })
        local res2 = assert(client:call{ url = %q })
        print(n, parts > 1, #res.body, res2.body, res2.attempts)
      ]]):format(py.url .. "/big?n=300000", py.url .. "/slowfirst?c=lua"))
      local r = H.run({ H.bin, "run", script })
      assert.equal(0, r.code, r.stderr)
      assert.equal("300000\ttrue\t0\thello\t2\n", r.stdout)
    end)

    -- client:call of /sse (event 0, then nothing for 30 s) under these
    -- policy fields; what it prints: result, outcome, attempts, the stream.
    -- (per-try 1 s: a loaded machine may take 100 ms to the first byte)
    local function sse_call(fields)
      local script = H.write_file(H.tmpname(".lua"), ([[
        local resilua = require "resilua"
        local p = require("resilua.policy").define({ %s, per_try_timeout_ms = 1000,
          breaker = false, budget = false }, "t", "t.lua", "")
        local got = {}
        local res, err = resilua.client{ policy = p }:call{ url = %q,
          on_chunk = function(c) got[#got + 1] = c end }
        print(res, err.outcome, err.attempts, table.concat(got))
      ]]):format(fields, py.url .. "/sse?release=/nonexistent"))
      local r = H.run({ H.bin, "run", script })
      assert.equal(0, r.code, r.stderr)
      return r.stdout
    end

    it("ends a stream whose gap passes idle_timeout_ms (client:call, after the commit)", function()
      -- per_try_timeout_ms (1 s) did not cut it after the commit; the gap (2.5 s) did
      assert.equal("nil\tfailed\t1\tdata: 0\n\n\n", sse_call("idle_timeout_ms = 2500"))
    end)

    it("ends a stream that outlives stream_timeout_ms, though no gap passed idle_timeout_ms", function()
      -- Without the cap, the upstream's rest would come after its 30 s wait,
      -- inside the idle timeout, and the call would succeed.
      assert.equal("nil\tfailed\t1\tdata: 0\n\n\n",
                   sse_call("stream_timeout_ms = 2500, idle_timeout_ms = 60000"))
    end)

    it("streams a 100 MB body with flat memory", function()
      local function hwm_kb()
        local s = H.read_file(("/proc/%d/status"):format(px.pid)) or ""
        return tonumber(s:match("VmHWM:%s*(%d+)"))
      end
      H.curl(q(px.url .. "/big?n=1000000"))
      local before = hwm_kb()
      local r = H.run(("curl -sS -o /dev/null -w '%%{size_download}' %s"):format(q(px.url .. "/big?n=104857600")))
      assert.equal(0, r.code, r.stderr)
      assert.equal("104857600", r.stdout)
      local grown = hwm_kb() - before
      assert.is_true(grown < 32 * 1024, ("peak RSS grew by %d kB"):format(grown))
    end)
  end)

  describe("limits", function()
    local px, cfg
    setup(function()
      cfg = H.write_file(dir .. "/limits.lua", ([[return {
        listen = "127.0.0.1:0",
        limits = { max_in_flight = 1, max_header_bytes = 4096, max_body_bytes = 1000 },
        routes = { { upstream = %q, policy = %q } },
      }]]):format(up.url, fast))
      px = start_proxy{ "--config", cfg }
    end)
    teardown(function() px:stop() end)

    it("431, 413 and 400", function()
      assert.equal(431, H.curl(("-H %s %s"):format(q("X-Big: " .. string.rep("a", 5000)),
                                                   q(px.url .. "/echo"))).status)
      assert.equal(413, H.curl(("--data-binary %s %s"):format(q(string.rep("a", 1001)),
                                                              q(px.url .. "/echo"))).status)
      local raw = H.raw_http("127.0.0.1", px.port, "GET /x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", 3)
      assert.truthy(raw:find("^HTTP/1%.1 400"))
    end)

    it("answers 503 at once past max_in_flight", function()
      local hang = H.spawn(("exec curl -s -o /dev/null -m 20 %s"):format(q(px.url .. "/hang")))
      assert.truthy(H.wait_until(function()
        return H.curl(q(px.url .. "/_resilua/metrics")).body:find("resilua_proxy_in_flight 1")
      end, 20))
      local r = H.curl(q(px.url .. "/echo"))
      assert.equal(503, r.status)
      assert.equal("overloaded", json_of(r).outcome)
      hang:stop("KILL")
    end)

    it("closes idle client connections after idle_timeout_ms", function()
      local cfg3 = H.write_file(dir .. "/idle.lua", ([[return {
        listen = "127.0.0.1:0", limits = { idle_timeout_ms = 200 },
        routes = { { upstream = %q } } }]]):format(up.url))
      local px3 = start_proxy{ "--config", cfg3 }
      -- A silent connection: raw_http returns when the proxy closes it, or
      -- after 30 s.  (Polling the connections gauge could pass before the
      -- connection was even made.)  The bound is liveness, far from both.
      local t0 = H.now()
      assert.equal("", H.raw_http("127.0.0.1", px3.port, "", 30))
      assert.is_true(H.now() - t0 < 20, "not closed when idle")
      assert.equal(0, px3:stop())
    end)

    it("answers 503 at once past max_connections", function()
      local cfg2 = H.write_file(dir .. "/conns.lua", ([[return {
        listen = "127.0.0.1:0", limits = { max_connections = 3 },
        routes = { { upstream = %q } } }]]):format(up.url))
      local px2 = start_proxy{ "--config", cfg2 }
      local idle = {}
      for i = 1, 3 do
        idle[i] = H.spawn(("exec bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d; sleep 30'"):format(px2.port))
      end
      assert.truthy(H.wait_until(function()
        local r = H.curl(q(px2.url .. "/echo"))
        return r.status == 503 and r.body == "too many connections\n"
      end, 20))
      for _, p in ipairs(idle) do p:stop("KILL") end
      assert.truthy(H.wait_until(function() return H.curl(q(px2.url .. "/echo")).status == 200 end, 20))
      assert.truthy(H.curl(q(px2.url .. "/_resilua/metrics")).body
                      :find('resilua_proxy_rejected_total{reason="connections"} [1-9]'))
      assert.equal(0, px2:stop())
    end)
  end)

  describe("--config", function()
    it("routes by Host and path prefix, with file and inline policies, and reloads", function()
      local cfg_path = dir .. "/proxy.lua"
      local function write_cfg(extra)
        H.write_file(cfg_path .. ".tmp", ([[return {
          listen = "127.0.0.1:0",
          routes = {
            { name = "api", host = "api.test", prefix = "/", upstream = %q, policy = %q },
            { name = "down", prefix = "/down", upstream = %q, policy = { max_attempts = %d,
              backoff = { base_ms = 1, max_ms = 1 }, breaker = false, budget = false } },
            %s
          },
        }]]):format(up.url, fast, up.url, extra and 1 or 2, extra or ""))
        os.rename(cfg_path .. ".tmp", cfg_path)
      end
      write_cfg()
      local px = start_proxy{ "--config", cfg_path }
      local r = H.curl(("-H 'Host: api.test' %s"):format(q(px.url .. "/down")))
      assert.equal("3", r.headers["x-resilua-attempts"]) -- the api route
      r = H.curl(q(px.url .. "/down"))
      assert.equal("2", r.headers["x-resilua-attempts"]) -- the down route
      assert.equal(404, H.curl(q(px.url .. "/other")).status)
      -- an edit: a new route, and the inline policy changed
      write_cfg(('{ name = "other", prefix = "/", upstream = %q }'):format(up.url))
      assert.truthy(H.wait_until(function()
        return H.curl(q(px.url .. "/other")).status == 200
      end, 20))
      assert.equal("1", H.curl(q(px.url .. "/down")).headers["x-resilua-attempts"])
      -- a broken edit keeps the old config and says where
      H.write_file(cfg_path .. ".tmp", "return { routes = { { upstream = 'http://x',\n  kep_host = true } } }\n")
      os.rename(cfg_path .. ".tmp", cfg_path)
      assert.truthy(H.wait_until(function()
        return px:stderr():find("proxy%.lua:2: [^\n]*unknown field 'kep_host' %(did you mean 'keep_host'%?%)")
      end, 20), px:stderr())
      assert.equal(200, H.curl(q(px.url .. "/other")).status)
      local m = H.curl(q(px.url .. "/_resilua/metrics")).body
      assert.truthy(m:find('resilua_policy_reloads_total{route="down"} 1', 1, true))
      assert.equal(0, px:stop())
    end)

    it("moves the admin paths, or turns them off", function()
      for _, case in ipairs{ { admin = '"/ops"', health = "/ops/health" }, { admin = "false" } } do
        local cfg = H.write_file(dir .. "/admin.lua", ([[return { listen = "127.0.0.1:0", admin = %s,
          routes = { { upstream = %q } } }]]):format(case.admin, up.url))
        local px = start_proxy{ "--config", cfg }
        if case.health then assert.equal("ok\n", H.curl(q(px.url .. case.health)).body) end
        -- the default path is now forwarded like any other
        local r = H.curl(q(px.url .. "/_resilua/health"))
        assert.truthy(r.body:find("^GET /_resilua/health"), r.body)
        assert.equal(0, px:stop())
      end
    end)

    it("re-reads the config on SIGHUP, for a change its folder's watch cannot see", function()
      -- The config is a symlink into another folder (as a mounted ConfigMap
      -- is): editing the target makes no event where the link lives, so
      -- only SIGHUP can bring the new route in.
      local real_dir, link_dir = H.tmpdir(), H.tmpdir()
      local function routes(extra)
        return ([[return { listen = "127.0.0.1:0", routes = {
          { name = "a", prefix = "/a", upstream = %q, policy = %q }, %s } }]]):format(up.url, fast, extra)
      end
      local target = H.write_file(real_dir .. "/proxy.lua", routes(""))
      local link = link_dir .. "/proxy.lua"
      assert.equal(0, H.run({ "ln", "-s", target, link }).code)
      local px = start_proxy{ "--config", link }
      assert.equal(200, H.curl(q(px.url .. "/a")).status)
      assert.equal(404, H.curl(q(px.url .. "/b")).status)
      H.write_file(target, routes(('{ name = "b", prefix = "/b", upstream = %q, policy = %q }'):format(up.url, fast)))
      px:signal("HUP")
      assert.truthy(H.wait_until(function() return H.curl(q(px.url .. "/b")).status == 200 end, 20))
      local reloaded = false
      for line in H.read_file(px.log):gmatch("[^\n]+") do
        local e = cjson.decode(line)
        reloaded = reloaded or (e.event == "config" and e.ok == true and e.routes == 2)
      end
      assert.is_true(reloaded)
      assert.equal(0, px:stop())
    end)

    it("reloads a policy file on SIGHUP and on save", function()
      local pol = H.write_file(dir .. "/hup.lua", "return { max_attempts = 2, backoff = { base_ms = 1, max_ms = 1 }, breaker = false, budget = false }")
      local px = start_proxy{ "--listen", "127.0.0.1:0", "--upstream", up.url, "--policy", pol }
      assert.equal("2", H.curl(q(px.url .. "/down")).headers["x-resilua-attempts"])
      H.write_file(pol, "return { max_attempts = 4, backoff = { base_ms = 1, max_ms = 1 }, breaker = false, budget = false }")
      px:signal("HUP")
      assert.truthy(H.wait_until(function()
        return H.curl(q(px.url .. "/down")).headers["x-resilua-attempts"] == "4"
      end, 20))
      assert.equal(0, px:stop())
    end)
  end)

  it("drains on SIGTERM: the call in flight finishes, then exit 0", function()
    local px = start_proxy{ "--listen", "127.0.0.1:0", "--upstream", up.url, "--policy", fast,
                            "--grace", "20" }
    local out = H.tmpname()
    local function delayed() return cjson.decode(H.curl(q(up.url .. "/_stats")).body).delayed end
    local before = delayed()
    local c = H.spawn(("exec curl -s -o %s -w '%%{http_code}' %s"):format(q(out), q(px.url .. "/slow")))
    -- the request is at the upstream, waiting for its answer
    assert.truthy(H.wait_until(function() return delayed() > before end, 20))
    px:signal("TERM")
    assert.equal(0, px:wait(30))
    assert.equal(0, c:wait(20))
    assert.equal("200", c:stdout())
    assert.equal("slow", H.read_file(out))
  end)

  it("while draining, health answers 503 on an open connection, which then closes", function()
    local px = start_proxy{ "--listen", "127.0.0.1:0", "--upstream", up.url, "--policy", fast,
                            "--grace", "20" }
    local py = H.write_file(H.tmpname(".py"), ([[
import json, os, signal, socket, time, urllib.request
def delayed():
    return json.load(urllib.request.urlopen("%s/_stats"))["delayed"]
def ask(s):
    s.sendall(b"GET /_resilua/health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int([l for l in head.decode().lower().split("\r\n") if l.startswith("content-length:")][0].split(":")[1])
    while len(body) < length:
        body += s.recv(4096)
    return data.decode()
a = socket.create_connection(("127.0.0.1", %d))
b = socket.create_connection(("127.0.0.1", %d))
first = ask(a).split("\r\n")[0]
before = delayed()
b.sendall(b"GET /slower HTTP/1.1\r\nHost: x\r\n\r\n") # in flight for 3 s
while delayed() == before: time.sleep(0.01)                 # at the upstream
os.kill(%d, signal.SIGTERM)
time.sleep(0.2)
second = ask(a)
closed = a.recv(1) == b""
print(first, "|", second.split("\r\n")[0], "|", "connection: close" in second.lower(), "|", closed)
]]):format(up.url, px.port, px.port, px.pid))
    local r = H.run({ "python3", py })
    assert.equal(0, r.code, r.stderr)
    assert.equal("HTTP/1.1 200 OK | HTTP/1.1 503 Service Unavailable | True | True\n", r.stdout)
    assert.equal(0, px:wait(30))
  end)

  it("documents itself and refuses bad flags", function()
    local r = H.run({ H.bin, "proxy", "--help" })
    assert.equal(0, r.code)
    for _, w in ipairs{ "--listen", "--upstream", "--config", "--grace", "x-resilua-deadline-ms",
                        "x-should-retry", "/_resilua/metrics", "first body byte" } do
      assert.truthy(r.stdout:find(w, 1, true), w)
    end
    assert.equal(2, H.run({ H.bin, "proxy" }).code)
    assert.equal(2, H.run({ H.bin, "proxy", "--upstream", "ftp://x" }).code)
    assert.equal(2, H.run({ H.bin, "proxy", "--upstream", "http://x", "--grace", "nan" }).code)
    local bad = H.write_file(dir .. "/bad.lua", "return { routes = {}, lisen = 1 }\n")
    local r2 = H.run({ H.bin, "proxy", "--config", bad })
    assert.equal(2, r2.code)
    assert.truthy(r2.stderr:find("bad%.lua:1:"))
  end)
end)
