-- `resilua serve` as a long-running upstream (issue 14, item 7): its
-- Idempotency-Key store is capped by bytes, not only by count, so distinct
-- large requests do not grow it without bound.
local H = require "spec.helpers"

describe("resilua serve, long-running", function()
  it("caps the dedup store by bytes", function()
    -- the handler answers with the request's 1 MB body: each stored key holds it
    local up = H.start_server("return function(req) return { body = req.body } end")
    local body = H.write_file(nil, string.rep("b", 1024 * 1024))
    local urls = {}
    for i = 1, 160 do
      urls[#urls + 1] = ("-H 'Idempotency-Key: k%d' --data-binary @%s %s"):format(i, H.quote(body),
                                                                                   H.quote(up.url .. "/"))
    end
    -- 160 MB of distinct keyed requests, 8 curl processes at a time
    local cmd = {}
    for i = 1, #urls, 20 do
      cmd[#cmd + 1] = "curl -s -o /dev/null " .. table.concat(urls, " --next ", i, math.min(i + 19, #urls))
    end
    local r = H.run("(" .. table.concat(cmd, " & ") .. " & wait)")
    assert.equal(0, r.code, r.stderr)
    local stats = require("cjson").decode(H.curl(H.quote(up.url .. "/_stats")).body)
    assert.equal(160, stats.handler_runs)
    -- which keys are kept: the newest are replayed (handler not run), the
    -- oldest were evicted past 64 MB (run again); a count cap alone kept all
    local function send(key)
      local res = H.curl(("-H 'Idempotency-Key: %s' --data-binary @%s %s")
                           :format(key, H.quote(body), H.quote(up.url .. "/")))
      assert.equal(200, res.status)
      return require("cjson").decode(H.curl(H.quote(up.url .. "/_stats")).body)
    end
    local kept = send("k160")
    assert.equal(1, kept.duplicates)
    assert.equal(160, kept.handler_runs)
    local evicted = send("k1")
    assert.equal(1, evicted.duplicates)
    assert.equal(161, evicted.handler_runs)
    up:stop()
  end)
end)

describe("resilua serve, idle connections", function()
  -- --idle-timeout (default 60 s) lets these wait 1 s instead of a minute.
  -- The bounds are liveness bounds, far from both figures: the close must
  -- come from the configured timeout, not the 60 s default (or never).
  local IDLE = { "--idle-timeout", "1s" }

  it("ends an idle h2c connection with GOAWAY, then closes it", function()
    local up = H.start_server("return function(req) return { body = 'ok' } end", IDLE)
    local started = H.now()
    local r = H.run({ "python3", "spec/peers/h2_idle.py", (up.url:gsub("^http://", "")) })
    local took = H.now() - started
    up:stop()
    assert.equal(0, r.code, r.stderr)
    assert.equal("answered\ngoaway 0\nclosed\n", r.stdout)
    assert.is_true(took < 40, "took " .. took .. " s, the 60 s default?")
  end)

  it("closes an idle HTTP/1.1 connection after its keep-alive answer", function()
    local up = H.start_server(nil, IDLE)
    local started = H.now()
    -- the answer comes at once; then the server closes the silent connection
    -- (raw_http returns when it does, or after 50 s)
    local got = H.raw_http("127.0.0.1", up.port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 50)
    local took = H.now() - started
    up:stop()
    assert.matches("^HTTP/1.1 200 ", got)
    assert.is_true(took < 40, "took " .. took .. " s, the 60 s default?")
  end)

  it("refuses a bad --idle-timeout with exit 2", function()
    for _, v in ipairs({ "0", "-1s", "2d", "soon", "1e9" }) do
      local r = H.run({ H.bin, "serve", "--listen", "127.0.0.1:0", "--idle-timeout", v })
      assert.equal(2, r.code, v)
      assert.matches("%-%-idle%-timeout: expected a duration", r.stderr, 1, false, v)
    end
    local core = require "resilua.core"
    for _, v in ipairs({ 0, -1, 1.5, 0 / 0, 1e300, "1s" }) do
      assert.error_matches(function() core.serve{ listen = "127.0.0.1:0", idle_timeout_ms = v } end,
                           "'idle_timeout_ms' must be an integer 1..86400000")
    end
  end)
end)
