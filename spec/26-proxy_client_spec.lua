-- The proxy's own HTTP/1.1 client (src/http/client.c), which carries its
-- attempts to http:// upstreams given by a numeric address: the upstream
-- sees the request libcurl sent (the same route through "localhost",
-- which stays on libcurl, is the reference), connections are pooled and
-- reused only when the answer allows it, interim and bodiless answers are
-- read right, and a pooled connection that dies under a request is one
-- attempt, a reset, never sent again.
local H = require "spec.helpers"

local q = H.quote

-- A raw upstream.  Every answer names the connection it came on (X-Conn,
-- numbered in accept order); GET /_count answers the requests counted
-- so far (not itself), GET /_extra whether /extra-late has sent its
-- second answer; /echo answers with the request's bytes (head and body);
-- the other paths send the bytes fixed below; /die closes the
-- connection, unanswered, when it is not the connection's first request.
-- Hostile ones: /early413 answers 413 and closes before reading the body;
-- /never-read neither reads nor answers; /extra and /extra-late send a
-- second answer nobody asked for (in the same write, or after);
-- /split/K sends its answer in two writes cut at byte K; /slow sends its
-- head a byte at a time, 0.2 s apart; /rst resets the connection
-- mid-head; /stall sends half a body and stalls; HEAD /head-body
-- answers with a body.
local UPSTREAM = [[
import socket, sys, threading, time
lock = threading.Lock()
state = {"conns": 0, "requests": 0, "extra": 0}
SPLIT = (b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"3;e=\"x;y\"\r\nabc\r\n2\r\nde\r\n0\r\nX-T: t\r\n\r\n")
def hostile(c, path, method, conn):
    """Answers a hostile path before its body is read; True: done."""
    if path == "/early413":
        c.sendall(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbig")
        c.close(); return True
    if path == "/never-read":
        time.sleep(15); c.close(); return True
    if path == "/extra":
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                  b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"); return True
    if path == "/extra-late":
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        time.sleep(0.05)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
        with lock: state["extra"] = 1
        return True
    if path.startswith("/split/"):
        k = int(path[7:])
        c.sendall(SPLIT[:k]); time.sleep(0.005); c.sendall(SPLIT[k:]); return True
    if path == "/slow":
        for b in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
            c.sendall(bytes([b])); time.sleep(0.2)
        return True
    if path == "/rst":
        c.sendall(b"HTTP/1.1 200 OK\r\nX-A:")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        c.close(); return True
    if path == "/stall":
        c.sendall(b"HTTP/1.1 200 OK\r\nX-Conn: %d\r\nContent-Length: 10\r\n\r\nhalf." % conn)
        time.sleep(15); c.close(); return True
    if path == "/head-body" and method == b"HEAD":
        c.sendall(b"HTTP/1.1 200 OK\r\nX-Conn: %d\r\nContent-Length: 5\r\n\r\nhello" % conn); return True
    return False
def fixed(path, conn):
    h = b"X-Conn: %d\r\n" % conn
    return {
      "/continue": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n" + h + b"Content-Length: 2\r\n\r\nok",
      "/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n" + h + b"Content-Length: 7\r\n\r\nclosing",
      "/http10": b"HTTP/1.0 200 OK\r\n" + h + b"Content-Length: 4\r\n\r\nold!",
      "/until-eof": b"HTTP/1.1 200 OK\r\n" + h + b"\r\nuntil-close",
      "/no-content": b"HTTP/1.1 204 No Content\r\n" + h + b"\r\n",
      "/chunked": b"HTTP/1.1 200 OK\r\n" + h + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n",
    }.get(path, b"HTTP/1.1 200 OK\r\n" + h + b"Content-Length: 5\r\n\r\nhello")
def serve(c, conn):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf, nth = b"", 0
    while True:
        while b"\r\n\r\n" not in buf:
            d = c.recv(65536)
            if not d: c.close(); return
            buf += d
        head, _, rest = buf.partition(b"\r\n\r\n")
        hpath = head.split(b" ")[1].split(b"?")[0].decode()
        if hpath == "/_extra":
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % state["extra"]); buf = rest; continue
        if hostile(c, hpath, head.split(b" ")[0], conn):
            with lock: state["requests"] += 1
            if hpath in ("/early413", "/never-read", "/rst", "/stall"): return
            buf = b""; continue
        n = 0
        for l in head.split(b"\r\n")[1:]:
            k, _, v = l.partition(b":")
            if k.strip().lower() == b"content-length": n = int(v)
        while len(rest) < n:
            d = c.recv(65536)
            if not d: c.close(); return
            rest += d
        body, buf = rest[:n], rest[n:]
        method, path = head.split(b" ")[0], head.split(b" ")[1].split(b"?")[0].decode()
        if path == "/_count":
            out = str(state["requests"]).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out)); continue
        nth += 1
        with lock: state["requests"] += 1
        if path == "/die" and nth > 1:
            c.shutdown(socket.SHUT_RDWR); c.close(); return
        if path.startswith("/echo"):
            out = head + b"\r\n\r\n" + body
            c.sendall(b"HTTP/1.1 200 OK\r\nX-Conn: %d\r\nContent-Length: %d\r\n\r\n%s" % (conn, len(out), out)); continue
        r = fixed(path, conn)
        if method == b"HEAD": r = b"HTTP/1.1 200 OK\r\nX-Conn: %d\r\nContent-Length: 5\r\n\r\n" % conn
        c.sendall(r)
        if path in ("/close", "/until-eof"): c.close(); return
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(1024)
print("listening on 127.0.0.1:%d" % s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    with lock:
        state["conns"] += 1; conn = state["conns"]
    threading.Thread(target=serve, args=(c, conn), daemon=True).start()
]]

local POLICY = [[return { max_attempts = 1, per_try_timeout_ms = 5000,
  breaker = false, budget = false }]]

local function start_proxy(upstream, policy)
  local log = H.tmpname(".jsonl")
  local p = H.spawn_listening({ H.bin, "proxy", "--log", log, "--listen", "127.0.0.1:0",
                                "--upstream", upstream, "--policy", policy }, "resilua proxy")
  p.log = log
  return p
end

describe("the proxy's HTTP/1.1 client", function()
  local up, px, policy
  setup(function()
    local script = H.write_file(H.tmpname(".py"), UPSTREAM)
    up = H.spawn_listening({ "python3", script }, "raw upstream")
    policy = H.write_file(H.tmpname(".lua"), POLICY)
    px = start_proxy(up.url, policy)
  end)
  teardown(function()
    px:stop()
    up:stop()
  end)

  local function get(path, args)
    return H.curl(("%s %s"):format(args or "", q(px.url .. path)))
  end
  local function count() return tonumber(H.curl(q(up.url .. "/_count")).body) end

  it("sends the upstream the request libcurl sent, byte for byte", function()
    local curl_px = start_proxy("http://localhost:" .. up.port, policy)
    local args = table.concat({
      "-H 'User-Agent: t'", "-H 'X-Request-Id: rid-1'", "-H 'Idempotency-Key: k-1'",
      "-H 'X-Empty;'", "-H 'Content-Type: text/plain'", "-H 'X-Tab: a\tb'",
      "-H 'X-Resilua-Max-Attempts: 1'", "-H 'Connection: keep-alive, X-Hop'", "-H 'X-Hop: h'",
    }, " ")
    local cases = {
      { "GET", "/echo/a/b?x=1&y=%20", "" },
      { "POST", "/echo/p", "--data-binary 'hello body'" },
      { "POST", "/echo/empty", "--data-binary ''" },
      { "DELETE", "/echo/d", "" },
      { "PUT", "/echo/u?q", "--data-binary 'x' -H 'Expect: 100-continue'" },
      { "GET", "/echo/h", "-H 'Host: example.test' -H 'Accept: text/html'" },
    }
    for _, c in ipairs(cases) do
      local extra = ("-X %s %s %s"):format(c[1], args, c[3])
      local native = H.curl(("%s %s"):format(extra, q(px.url .. c[2])))
      local reference = H.curl(("%s %s"):format(extra, q(curl_px.url .. c[2])))
      assert.equal(200, native.status, c[2])
      assert.equal(200, reference.status, c[2])
      assert.truthy(native.body:find("^" .. c[1] .. " /"), native.body)
      local want = reference.body:gsub("Host: localhost:", "Host: 127.0.0.1:")
      assert.equal(want, native.body, c[1] .. " " .. c[2])
    end
    curl_px:stop()
  end)

  it("keeps a connection for the next request only when the answer allows it", function()
    local function conn(path, args) return tonumber(get(path, args).headers["x-conn"]) end
    local first = conn("/a")
    assert.equal(first, conn("/b"))
    assert.equal(first, conn("/c", "-X POST --data-binary x"))
    -- HEAD and 204 have no body, whatever their head says: the connection stays in step
    local head = get("/h", "-I")
    assert.equal(200, head.status)
    assert.equal(first, tonumber(head.headers["x-conn"]))
    assert.equal(204, get("/no-content").status)
    assert.equal(first, conn("/d"))
    -- interim answers are skipped; the final one comes through
    local cont = get("/continue")
    assert.equal(200, cont.status)
    assert.equal("ok", cont.body)
    assert.is_nil(cont.headers["link"])
    assert.equal(first, conn("/e"))
    -- a chunked body, its framing removed by the client's side as usual
    local ch = get("/chunked")
    assert.equal("abcde", ch.body)
    assert.equal(first, conn("/f"))
    -- Connection: close, HTTP/1.0, a body delimited by the close: not reused
    local closing = get("/close")
    assert.equal("closing", closing.body)
    local after_close = conn("/g")
    assert.is_true(after_close > first)
    assert.equal("old!", get("/http10").body)
    local after_http10 = conn("/i")
    assert.is_true(after_http10 > after_close)
    assert.equal("until-close", get("/until-eof").body)
    assert.is_true(conn("/j") > after_http10)
  end)

  it("a pooled connection that dies under a POST is one attempt, a reset, not resent", function()
    local retrying = H.write_file(H.tmpname(".lua"), [[return { max_attempts = 3,
      per_try_timeout_ms = 5000, backoff = { base_ms = 1, max_ms = 1 },
      retry_on = { errors = { "reset" } }, breaker = false, budget = false }]])
    local rpx = start_proxy(up.url, retrying)
    local before = tonumber(H.curl(q(up.url .. "/_count")).body)
    assert.equal(200, H.curl(("-X POST --data-binary x %s"):format(q(rpx.url .. "/die"))).status)
    -- the pooled connection dies; the policy, not the client, sends again
    local r = H.curl(("-X POST --data-binary x %s"):format(q(rpx.url .. "/die")))
    assert.equal(200, r.status)
    assert.equal("2", r.headers["x-resilua-attempts"])
    local seen = tonumber(H.curl(q(up.url .. "/_count")).body) - before
    rpx:stop()
    local attempts = H.of_kind(H.events(rpx.log), "attempt")
    assert.equal(3, #attempts)
    assert.equal(#attempts, seen)
    assert.equal("reset", attempts[2].error)
    assert.equal("retry", attempts[2].decision)
  end)

  it("out of file descriptors: a local failure, which moves no breaker", function()
    -- an upstream that answers each request after 3 s, so each holds two
    -- fds (and closes it: a pooled connection it closed would be a reset)
    local hold = H.write_file(H.tmpname(".py"), [[
import socket, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(512)
print("listening on 127.0.0.1:%d" % s.getsockname()[1], flush=True)
def h(c):
    c.recv(65536); time.sleep(3)
    c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"); c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=h, args=(c,), daemon=True).start()
]])
    local slow = H.spawn_listening({ "python3", hold }, "holding upstream")
    local breaking = H.write_file(H.tmpname(".lua"), [[return { max_attempts = 1,
      per_try_timeout_ms = 10000, breaker = { failures = 1, open_ms = 60000 }, budget = false }]])
    local refused, answered, breakers = 0, 0, 0
    -- Two limits: whether the last free descriptor goes to an accept (which
    -- then waits) or to an upstream socket depends on the parity of the
    -- descriptors the process starts with.
    for _, limit in ipairs({ 40, 41 }) do
      local log = H.tmpname(".jsonl")
      local fdpx = H.spawn_listening({ "bash", "-c", ("ulimit -n %d && exec %s proxy --log %s " ..
        "--listen 127.0.0.1:0 --upstream %s --policy %s"):format(limit, q(H.bin), q(log),
        q(slow.url), q(breaking)) }, "resilua proxy")
      local out = H.tmpdir()
      H.run(("for i in $(seq 40); do curl -s -m 30 -o %s/$i %s & done; wait")
        :format(q(out), q(fdpx.url .. "/x")))
      fdpx:stop()
      for i = 1, 40 do
        local body = H.read_file(out .. "/" .. i) or ""
        if body:find("out of file descriptors", 1, true) then refused = refused + 1 end
        if body == "ok" then answered = answered + 1 end
      end
      breakers = breakers + #H.of_kind(H.events(log), "breaker")
    end
    slow:stop()
    assert.is_true(refused > 0, "no request ran out of descriptors")
    assert.is_true(answered > 0)
    assert.equal(0, breakers) -- our shortage says nothing of the upstream
  end)

  it("classifies a refused connection as connect", function()
    local refused = start_proxy("http://127.0.0.1:1", policy)
    local r = H.curl(q(refused.url .. "/x"))
    refused:stop()
    assert.equal(502, r.status)
    assert.equal("connect", H.of_kind(H.events(refused.log), "attempt")[1].error)
  end)

  it("an upstream that answers (413) and closes before reading the body: its answer, once", function()
    local retrying = H.write_file(H.tmpname(".lua"), [[return { max_attempts = 3,
      per_try_timeout_ms = 10000, backoff = { base_ms = 1, max_ms = 1 },
      retry_on = { errors = { "reset", "protocol" } }, breaker = false, budget = false }]])
    local rpx = start_proxy(up.url, retrying)
    -- more than the sockets hold: the close comes while the body goes out
    local body = H.write_file(nil, string.rep("x", 12 * 1024 * 1024))
    local before = count()
    local r = H.curl(("-X POST --data-binary @%s %s"):format(q(body), q(rpx.url .. "/early413")))
    rpx:stop()
    assert.equal(413, r.status)
    assert.equal("big", r.body)
    assert.equal("1", r.headers["x-resilua-attempts"])
    assert.equal(1, count() - before)
  end)

  it("never takes an answer nobody asked for as the next request's", function()
    -- in the same write as the answer: that connection is not kept
    assert.equal("ok", get("/extra").body)
    for _ = 1, 3 do assert.equal("hello", get("/x").body) end
    -- after it, on the idle pooled connection: dropped, never reused
    assert.equal("ok", get("/extra-late").body)
    assert.truthy(H.wait_until(function()
      return H.curl(q(up.url .. "/_extra")).body == "1"
    end, 20))
    for _ = 1, 3 do assert.equal("hello", get("/x").body) end
  end)

  it("reads an answer cut at any byte the same way", function()
    local SPLIT_BYTES = 95 -- #SPLIT in the upstream
    for k = 1, SPLIT_BYTES - 1 do
      local r = get("/split/" .. k)
      assert.equal(200, r.status, k)
      assert.equal("abcde", r.body, k)
      assert.truthy((r.headers["x-a"] or ""):find("^a +b$"), k) -- obs-fold joined
      assert.is_nil(r.headers["x-t"], k) -- the trailer is dropped
    end
  end)

  it("a HEAD answered with a body: none passed on, and the connection is not kept", function()
    local first = tonumber(get("/a").headers["x-conn"])
    local head = get("/head-body", "-I")
    assert.equal(200, head.status)
    assert.is_nil(head.body:find("hello", 1, true)) -- (-I: the head only)
    assert.equal(first, tonumber(head.headers["x-conn"]))
    local after = get("/b")
    assert.equal("hello", after.body)
    assert.is_true(tonumber(after.headers["x-conn"]) > first)
  end)

  it("a client gone mid-answer: the attempt's connection is closed, not pooled", function()
    local first = tonumber(get("/a").headers["x-conn"])
    local stalled = H.curl(("-m 2 %s"):format(q(px.url .. "/stall")))
    assert.are_not.equal(0, stalled.code) -- curl gave up: the client is gone
    assert.equal(first, tonumber(stalled.headers["x-conn"]))
    assert.are_not.equal(first, tonumber(get("/b").headers["x-conn"]))
  end)

  it("slowloris, silent and reset upstreams end as timeout or reset, promptly", function()
    local short = H.write_file(H.tmpname(".lua"), [[return { max_attempts = 1,
      per_try_timeout_ms = 1000, breaker = false, budget = false }]])
    local spx = start_proxy(up.url, short)
    local started = H.now()
    assert.equal(504, H.curl(q(spx.url .. "/slow")).status) -- a byte per 0.2 s
    local big = H.write_file(nil, string.rep("y", 8 * 1024 * 1024))
    assert.equal(504, H.curl(("-X POST --data-binary @%s %s")
      :format(q(big), q(spx.url .. "/never-read"))).status)
    assert.equal(502, H.curl(q(spx.url .. "/rst")).status)
    assert.is_true(H.now() - started < 20) -- liveness only
    spx:stop()
    local attempts = H.of_kind(H.events(spx.log), "attempt")
    assert.equal(3, #attempts)
    assert.equal("timeout", attempts[1].error)
    assert.equal("timeout", attempts[2].error)
    assert.equal("reset", attempts[3].error)
  end)

  it("1,000 concurrent requests to one origin: all answered, at most 256 connections kept", function()
    local cpx = start_proxy(up.url, policy)
    local r = H.run(("hey -n 2000 -c 1000 -t 60 %s"):format(q(cpx.url .. "/x")))
    assert.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:find("%[200%]%s+2000 responses"), r.stdout)
    -- once the clients are gone: the idle pool (256) and a few of its own
    local fds
    assert.truthy(H.wait_until(function()
      fds = tonumber(H.run(("ls /proc/%d/fd | wc -l"):format(cpx.pid)).stdout)
      return fds <= 256 + 16
    end, 20), fds)
    assert.equal(200, H.curl(q(cpx.url .. "/x")).status)
    assert.equal(0, cpx:stop())
  end)
end)
