-- Hostile input on both sides of `resilua proxy`: the corpus under
-- spec/fuzz/proxy/ (client/: raw requests, upstream/: raw responses a
-- Python socket server sends as they are).  The proxy must answer each
-- with a well-formed response or a close, never crash, hang or leak (the
-- ASan pass of `make test` runs this too, and a leak fails the exit code),
-- and pass bytes it accepts on byte for byte.
local H = require "spec.helpers"

local q = H.quote

local ECHO = [[
return function(req)
  if req.path == "/down" then return { status = 503, body = "down" } end
  return { body = req.method .. " " .. req.path .. " " .. #req.body }
end
]]

-- Reads a request head, answers with the bytes of the corpus file named
-- by the path (/NAME), then closes.
local RAW_UPSTREAM = [[
import os, socket, sys, threading
corpus = sys.argv[1]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(128)
print("listening on 127.0.0.1:%d" % s.getsockname()[1], flush=True)
def serve(c):
    try:
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            more = c.recv(4096)
            if not more: return
            data += more
        name = data.split(b" ")[1].decode().lstrip("/").split("?")[0]
        with open(os.path.join(corpus, os.path.basename(name) + ".http"), "rb") as f:
            c.sendall(f.read())
    except Exception:
        pass
    finally:
        try: c.shutdown(socket.SHUT_RDWR)
        except Exception: pass
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
]]

local function list(dir)
  local names = {}
  local p = io.popen("ls " .. q(dir))
  for f in p:lines() do
    local n = f:match("^(.*)%.http$")
    if n then names[#names + 1] = n end
  end
  p:close()
  table.sort(names)
  return names
end

-- Idle client connections close after 300 ms, so raw_http returns soon.
local function start_proxy(upstream, policy)
  local cfg = H.write_file(H.tmpname(".lua"), ([[return { listen = "127.0.0.1:0",
    limits = { idle_timeout_ms = 300 }, routes = { { upstream = %q, policy = %q } } }]])
    :format(upstream, policy))
  return H.spawn_listening({ H.bin, "proxy", "--quiet", "--config", cfg }, "resilua proxy")
end

local function alive(px)
  return px:status() == nil and H.curl(q(px.url .. "/_resilua/health")).status == 200
end

describe("resilua proxy under hostile input", function()
  local dir, policy
  setup(function()
    dir = H.tmpdir()
    policy = H.write_file(dir .. "/p.lua", [[return { max_attempts = 2, per_try_timeout_ms = 2000,
      backoff = { base_ms = 1, max_ms = 1 }, breaker = false, budget = false }]])
  end)

  it("from clients: every request of the corpus gets an answer or a close", function()
    local up = H.start_server(ECHO)
    local px = start_proxy(up.url, policy)
    local expect = {
      ["two-content-lengths"] = "^HTTP/1%.1 400", ["chunk-size-overflow"] = "^HTTP/1%.1 4",
      ["negative-length"] = "^HTTP/1%.1 400", ["huge-length"] = "^HTTP/1%.1 4",
      ["no-colon"] = "^HTTP/1%.1 400", ["many-headers"] = "^HTTP/1%.1 431",
      ["long-url"] = "^HTTP/1%.1 431", ["connect"] = "^HTTP/1%.1 400",
      ["override-zero"] = "^HTTP/1%.1 400", ["override-negative"] = "^HTTP/1%.1 400",
      ["override-huge"] = "^HTTP/1%.1 400", ["override-nan"] = "^HTTP/1%.1 400",
      ["h2-preface"] = "^HTTP/1%.1 400", ["garbage"] = "^HTTP/1%.1 400",
      ["request-id-huge"] = "^HTTP/1%.1 200", ["empty-header-value"] = "^HTTP/1%.1 200",
      ["http10-keepalive"] = "^HTTP/1%.1 200", ["upgrade-websocket"] = "^HTTP/1%.1 200",
      ["chunked-trailers-ext"] = "^HTTP/1%.1 200.-POST /echo 3$",
      ["absolute-form"] = "^HTTP/1%.1 200.-GET /echo 0$",
    }
    for _, name in ipairs(list("spec/fuzz/proxy/client")) do
      local bytes = H.read_file("spec/fuzz/proxy/client/" .. name .. ".http")
      local out = H.raw_http("127.0.0.1", px.port, bytes, 3)
      assert.truthy(out == "" or out:find("^HTTP/1%.1 %d%d%d "), name .. ": " .. out:sub(1, 80))
      if expect[name] then assert.truthy(out:find(expect[name]), name .. ": " .. out:sub(1, 200)) end
      if name == "pipelined" then
        local _, n = out:gsub("HTTP/1%.1 200 OK", "")
        assert.equal(50, n)
      end
      if name == "request-id-huge" then
        assert.falsy(out:find(string.rep("r", 200), 1, true), "a huge X-Request-Id is replaced")
      end
      assert.is_true(alive(px), "the proxy died on " .. name)
    end
    assert.equal(0, px:stop())
    up:stop()
  end)

  -- Both engines: the HTTP/1.1 client (a numeric upstream) and libcurl
  -- (the same upstream through "localhost"), with the same answers.
  for _, engine in ipairs({ { "the HTTP/1.1 client", "127.0.0.1" }, { "libcurl", "localhost" } }) do
  it("from the upstream, through " .. engine[1] .. ": every response of the corpus becomes an answer, an error or a reset", function()
    local script = H.write_file(H.tmpname(".py"), RAW_UPSTREAM)
    local raw = H.spawn({ "python3", script, "spec/fuzz/proxy/upstream" })
    local port = assert(raw:wait_line("listening on 127%.0%.0%.1:(%d+)\n", 30), raw:stderr())
    local px = start_proxy(("http://%s:%s"):format(engine[2], port), policy)
    for _, name in ipairs(list("spec/fuzz/proxy/upstream")) do
      local r = H.curl(("-m 20 %s"):format(q(px.url .. "/" .. name)))
      assert.truthy(r.code ~= 0 or (r.status >= 200 and r.status <= 599), name)
      assert.is_true(alive(px), "the proxy died on " .. name)
    end
    -- what it accepts, it passes on byte for byte (no decoding either)
    local bin = H.curl(q(px.url .. "/binary-body"))
    local bytes = {}
    for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
    assert.equal(table.concat(bytes), bin.body)
    local gz = H.curl(q(px.url .. "/gzip-lie"))
    assert.equal("not-gzip!!", gz.body)
    assert.equal("gzip", gz.headers["content-encoding"])
    -- malformed responses: 502 (protocol errors are not retried by default)
    assert.equal(502, H.curl(q(px.url .. "/status-999")).status)
    local nos = H.curl(q(px.url .. "/no-status-line"))
    assert.equal(502, nos.status)
    assert.equal("failed", nos.headers["x-resilua-outcome"])
    -- cut after the commit point: an error for the client, not a short success
    assert.are_not.equal(0, H.curl(q(px.url .. "/short-body")).code)
    assert.are_not.equal(0, H.curl(q(px.url .. "/chunk-cut")).code)
    -- What neither engine passes on (RFC 9112, RFC 9110 section 5.5): a bad
    -- status line, a field name that is not a token, CR, LF or NUL in a
    -- value (whatever the status: 200, 204, 503), a bad or second
    -- Content-Length, a coding other than chunked, a bad chunk size, a
    -- protocol switch (at once, not at the timeout), a head cut short by
    -- the close (a reset: libcurl took it for a whole answer), a head over the cap:
    -- the proxy's JSON 502, nothing of the head passed on.
    for _, name in ipairs({ "bad-status-code", "cl-and-chunked", "two-equal-lengths",
                            "two-lengths", "split-bare-cr", "header-injection", "bare-cr-204",
                            "bare-cr-503", "nul-header", "name-with-space", "name-with-quote",
                            "empty-name", "no-colon-line", "fold-first", "negative-length",
                            "length-plus", "length-list", "length-overflow", "negative-chunk",
                            "chunk-overflow", "te-gzip-chunked", "te-chunked-gzip",
                            "te-unknown-with-length", "te-identity", "te-two-chunked",
                            "switching-protocols", "switching-protocols-h2c", "switching-protocols-cut",
                            "head-cut-after-100", "many-headers" }) do
      local r = H.curl(q(px.url .. "/" .. name))
      assert.equal(502, r.status, name)
      assert.equal("application/json", r.headers["content-type"], name)
      assert.is_nil(r.headers["set-cookie"], name)
      assert.is_nil(r.headers["x-b"], name)
      assert.is_nil(r.headers["x-a"], name)
    end
    -- refused heads are attempts like any protocol error: a policy that
    -- retries those sends again (a 101 too, at once rather than at the timeout)
    local retrying = H.write_file(H.tmpname(".lua"), [[return { max_attempts = 2,
      per_try_timeout_ms = 10000, backoff = { base_ms = 1, max_ms = 1 },
      retry_on = { errors = { "protocol" } }, breaker = false, budget = false }]])
    local rpx = start_proxy(("http://%s:%s"):format(engine[2], port), retrying)
    for _, name in ipairs({ "split-bare-cr", "name-with-space", "switching-protocols" }) do
      local r = H.curl(q(rpx.url .. "/" .. name))
      assert.equal(502, r.status, name)
      assert.equal("2", r.headers["x-resilua-attempts"], name)
      assert.truthy(r.body:find('"error":"protocol', 1, true), name .. ": " .. r.body)
    end
    assert.equal(0, rpx:stop())
    -- a folded line is joined with blanks, a blank before the colon removed
    local fold = H.curl(q(px.url .. "/obs-fold"))
    assert.is_nil(fold.headers["set-cookie"])
    assert.truthy(fold.headers["x-a"]:find("^a +Set%-Cookie: evil=1$"), fold.headers["x-a"])
    assert.equal("b", H.curl(q(px.url .. "/space-before-colon")).headers["x-a"])
    -- a chunked trailer is dropped, never passed on as a header field
    local trailer = H.curl(q(px.url .. "/trailer-set-cookie"))
    assert.equal(200, trailer.status)
    assert.is_nil(trailer.headers["set-cookie"])
    local trailer503 = H.curl(q(px.url .. "/trailer-503"))
    assert.equal(503, trailer503.status)
    assert.equal("no", trailer503.body)
    assert.is_nil(trailer503.headers["set-cookie"])
    -- chunk extensions, quoted or not, are read past
    assert.equal("ok", H.curl(q(px.url .. "/chunk-ext-quoted")).body)
    -- 304 has no body whatever its length says; interim answers are skipped
    local nm = H.curl(q(px.url .. "/304-with-length"))
    assert.equal(304, nm.status)
    assert.equal("", nm.body)
    local cont = H.curl(q(px.url .. "/continue-then-200"))
    assert.equal(200, cont.status)
    assert.equal("ok", cont.body)
    assert.equal("ab\0", H.curl(q(px.url .. "/nul-body")).body)
    assert.equal(0, px:stop())
    raw:stop("KILL")
  end)
  end
end)
