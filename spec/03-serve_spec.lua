-- The scriptable upstream (contract 6): `resilua serve` as a real process,
-- driven over HTTP with curl and raw bytes with bash's /dev/tcp.
local cjson = require "cjson"
local helpers = require "helpers"

local q = helpers.quote

local function get(url, extra)
  return helpers.curl((extra or "") .. " " .. q(url))
end

local function stats(srv)
  local r = get(srv.url .. "/_stats")
  assert.equal(200, r.status)
  return cjson.decode(r.body)
end

-- Stops the server and checks it exits 0 (under ASan: without leaks).
local function stop(srv)
  assert.equal(0, srv:stop("TERM"), srv:stderr())
end

describe("resilua serve", function()
  describe("a handler", function()
    local srv
    lazy_setup(function()
      srv = helpers.start_server([[
        return function(req)
          local names = {}
          for k in pairs(req.headers) do names[#names + 1] = k end
          table.sort(names)
          local lines = { "method=" .. req.method, "path=" .. req.path,
                          "query=" .. req.query, "body=" .. req.body,
                          "n=" .. math.tointeger(req.n), "x-test=" .. tostring(req.headers["x-test"]),
                          "x-multi=" .. tostring(req.headers["x-multi"]),
                          "names=" .. table.concat(names, ",") }
          return { status = 201, headers = { ["X-Reply"] = "yes", ["Retry-After"] = 7 },
                   body = table.concat(lines, "\n") }
        end]])
    end)
    lazy_teardown(function() stop(srv) end)

    it("gets method, path, query, lower-case headers, body and n", function()
      local r = helpers.curl("-X PUT -H 'X-Test: hello' -H 'X-Multi: a' -H 'X-Multi: b' "
                             .. "--data-binary 'some body' " .. q(srv.url .. "/a/b?x=1&y=2"))
      assert.equal(0, r.code, r.stderr)
      assert.equal(201, r.status)
      assert.equal("yes", r.headers["x-reply"])
      assert.equal("7", r.headers["retry-after"])
      assert.matches("method=PUT\n", r.body, 1, true)
      assert.matches("path=/a/b\n", r.body, 1, true)
      assert.matches("query=x=1&y=2\n", r.body, 1, true)
      assert.matches("body=some body\n", r.body, 1, true)
      assert.matches("x-test=hello\n", r.body, 1, true)
      assert.matches("x-multi=a, b\n", r.body, 1, true)
      assert.matches("names=accept,content-length,content-type,host,user-agent,x-multi,x-test",
                     r.body, 1, true)
    end)

    it("numbers requests from 1, /_stats not counted", function()
      local first = tonumber(get(srv.url .. "/").body:match("n=(%d+)"))
      get(srv.url .. "/_stats")
      local second = tonumber(get(srv.url .. "/").body:match("n=(%d+)"))
      assert.is_true(first >= 1)
      assert.equal(first + 1, second)
    end)

    it("keeps connections alive and answers pipelined requests in order", function()
      local before = stats(srv).connections
      local r = helpers.run(("curl -s -w '%%{http_code} ' -o /dev/null %s -o /dev/null %s -o /dev/null %s")
        :format(q(srv.url .. "/1"), q(srv.url .. "/2"), q(srv.url .. "/3")))
      assert.equal("201 201 201 ", r.stdout)
      assert.equal(before + 2, stats(srv).connections) -- curl's three requests, then ours

      local out = helpers.raw_http("127.0.0.1", srv.port,
        "GET /p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      local p1, p2 = out:find("path=/p1", 1, true), out:find("path=/p2", 1, true)
      assert.truthy(p1 and p2 and p1 < p2, out)
      local _, responses = out:gsub("HTTP/1%.1 201", "")
      assert.equal(2, responses)
    end)
  end)

  describe("without a script", function()
    local srv
    lazy_setup(function() srv = helpers.start_server(nil) end)
    lazy_teardown(function() stop(srv) end)

    it("is a model stub answering a deterministic prediction", function()
      local a = helpers.curl("-d '{\"x\":[1,2]}' " .. q(srv.url .. "/v1/predict"))
      local b = helpers.curl("-d '{\"x\":[1,2]}' " .. q(srv.url .. "/v1/predict"))
      local c = helpers.curl("-d '{\"x\":[3]}' " .. q(srv.url .. "/v1/predict"))
      assert.equal(200, a.status)
      assert.equal("application/json", a.headers["content-type"])
      local p = cjson.decode(a.body).prediction
      assert.is_number(p)
      assert.is_true(p >= 0 and p < 1)
      assert.equal(a.body, b.body)
      assert.not_equal(a.body, c.body)
    end)
  end)

  describe("delay_ms", function()
    local srv
    lazy_setup(function()
      srv = helpers.start_server([[
        return function(req)
          return { body = "late " .. req.query, delay_ms = tonumber(req.query:match("ms=(%d+)")) }
        end]])
    end)
    lazy_teardown(function() stop(srv) end)

    it("answers later", function()
      local t0 = helpers.now()
      local r = get(srv.url .. "/?ms=300")
      assert.equal(200, r.status)
      assert.equal("late ms=300", r.body)
      assert.is_true(helpers.now() - t0 >= 0.29)
    end)

    it("serves many delayed requests concurrently", function()
      local t0 = helpers.now()
      local r = helpers.run(("curl -s -Z --parallel-max 200 -o /dev/null -w '%%{http_code}\\n' %s")
        :format(q(srv.url .. "/?ms=300&i=[1-200]")))
      local elapsed = helpers.now() - t0
      local _, ok = r.stdout:gsub("200\n", "")
      assert.equal(200, ok)
      assert.is_true(elapsed < 20, ("200 x 300 ms took %.1f s"):format(elapsed)) -- 60 s in series
      assert.is_true(stats(srv).delayed >= 200)
    end)
  end)

  describe("actions", function()
    local srv
    lazy_setup(function()
      srv = helpers.start_server([[
        return function(req)
          if req.query == "ok" then return { body = "ok" } end
          return { action = req.query, delay_ms = req.path == "/later" and 100 or 0 }
        end]])
    end)
    lazy_teardown(function() stop(srv) end)

    it("hang never answers, and the server serves others meanwhile", function()
      local r = helpers.curl("--max-time 1 " .. q(srv.url .. "/?hang"))
      assert.equal(28, r.code) -- operation timed out
      assert.equal("ok", get(srv.url .. "/?ok").body)
    end)

    it("reset closes with a RST", function()
      for _, path in ipairs { "/", "/later" } do
        local r = helpers.curl(q(srv.url .. path .. "?reset"))
        assert.equal(56, r.code, r.stderr) -- failure receiving data
        assert.matches("reset", r.stderr)
      end
    end)

    it("close closes without an answer", function()
      for _, path in ipairs { "/", "/later" } do
        local r = helpers.curl(q(srv.url .. path .. "?close"))
        assert.equal(52, r.code, r.stderr) -- empty reply from server
      end
    end)

    it("are counted in /_stats", function()
      local s = stats(srv)
      assert.equal(1, s.action_hang)
      assert.equal(2, s.action_reset)
      assert.equal(2, s.action_close)
      assert.equal(1, s.status["200"])
    end)
  end)

  describe("Idempotency-Key", function()
    local srv
    lazy_setup(function()
      srv = helpers.start_server([[
        local runs, flaky = 0, 0
        return function(req)
          runs = runs + 1
          if req.path == "/flaky" then
            flaky = flaky + 1
            if flaky == 1 then return { status = 503, body = "busy" } end
          end
          return { status = 201, headers = { ["X-Run"] = tostring(runs) },
                   body = "run " .. runs .. " " .. req.body,
                   delay_ms = tonumber(req.query:match("ms=(%d+)")),
                   action = req.headers["x-action"] }
        end]])
    end)
    lazy_teardown(function() stop(srv) end)

    local function post(key, body, path, extra)
      return helpers.curl(("-H %s -d %s %s %s"):format(q("Idempotency-Key: " .. key), q(body),
                                                       extra or "", q(srv.url .. (path or "/orders"))))
    end

    it("replays a completed request without running the handler again", function()
      local before = stats(srv)
      local a = post("k-replay", "x")
      local b = post("k-replay", "x")
      assert.equal(201, a.status)
      assert.same({ a.status, a.headers["x-run"], a.body }, { b.status, b.headers["x-run"], b.body })
      local after = stats(srv)
      assert.equal(before.handler_runs + 1, after.handler_runs)
      assert.equal(before.duplicates + 1, after.duplicates)
      assert.equal(before.requests + 2, after.requests)
    end)

    it("answers 422 to the same key with a different body", function()
      assert.equal(201, post("k-body", "one").status)
      local r = post("k-body", "two")
      assert.equal(422, r.status)
      assert.equal(1, stats(srv).mismatches)
    end)

    it("answers 409 while the first request is in flight, then replays it", function()
      -- (the first is in flight 4 s: the second comes well inside that
      -- even on a loaded machine)
      local first = helpers.spawn(("exec curl -s -H 'Idempotency-Key: k-flight' -d x %s")
                                    :format(q(srv.url .. "/orders?ms=4000")))
      assert.truthy(helpers.wait_until(function() return stats(srv).delayed >= 1 end, 10))
      local second = post("k-flight", "x", "/orders?ms=4000")
      assert.equal(409, second.status)
      assert.equal(0, first:wait(20))
      local third = post("k-flight", "x", "/orders?ms=4000")
      assert.equal(201, third.status)
      assert.equal(first:stdout(), third.body)
      assert.equal(1, stats(srv).conflicts)
    end)

    it("completes a delayed answer even if the client gave up waiting", function()
      local runs = stats(srv).handler_runs
      -- in flight 3 s: the next post comes inside that even on a loaded machine
      local r = post("k-gone", "x", "/orders?ms=3000", "--max-time 0.2")
      assert.equal(28, r.code)
      assert.equal(409, post("k-gone", "x", "/orders?ms=3000").status)
      assert.truthy(helpers.wait_until(function() return stats(srv).abandoned >= 1 end, 10))
      local later = helpers.wait_until(function()
        local res = post("k-gone", "x", "/orders?ms=3000")
        return res.status ~= 409 and res
      end, 10)
      assert.equal(201, later.status)
      assert.equal(runs + 1, stats(srv).handler_runs) -- the work was done once
    end)

    it("does not store 5xx: a retry runs the handler", function()
      assert.equal(503, post("k-flaky", "x", "/flaky").status)
      local r = post("k-flaky", "x", "/flaky")
      assert.equal(201, r.status)
      assert.equal(r.body, post("k-flaky", "x", "/flaky").body)
    end)

    it("frees the key of a request that hung, reset or closed", function()
      for _, action in ipairs { "hang", "reset", "close" } do
        local key = "k-" .. action
        local r = post(key, "x", "/orders", "--max-time 1 -H 'X-Action: " .. action .. "'")
        assert.not_equal(0, r.code)
        assert.equal(201, post(key, "x").status, action)
      end
    end)

    it("rejects an overlong key", function()
      assert.equal(400, post(("k"):rep(300), "x").status)
    end)
  end)

  describe("/_stats", function()
    local srv
    lazy_setup(function()
      srv = helpers.start_server([[
        return function(req) return { status = tonumber(req.path:sub(2)) } end]])
    end)
    lazy_teardown(function() stop(srv) end)

    it("counts requests by status, handler runs, and not itself", function()
      for _, code in ipairs { 200, 503, 503, 429 } do get(srv.url .. "/" .. code) end
      local r = get(srv.url .. "/_stats")
      assert.equal("application/json", r.headers["content-type"])
      local s = cjson.decode(r.body)
      assert.equal(4, s.requests)
      assert.equal(4, s.handler_runs)
      assert.same({ ["200"] = 1, ["503"] = 2, ["429"] = 1 }, s.status)
      for _, k in ipairs { "duplicates", "conflicts", "mismatches", "handler_errors", "delayed",
                           "action_hang", "action_reset", "action_close", "rejected" } do
        assert.equal(0, s[k], k)
      end
      assert.equal(4, stats(srv).requests)
    end)
  end)

  describe("bad requests", function()
    local srv
    lazy_setup(function()
      srv = helpers.start_server([[return function(req) return { body = "fine" } end]])
    end)
    lazy_teardown(function() stop(srv) end)

    it("answers a malformed request 400, closes it, and serves others", function()
      local out = helpers.raw_http("127.0.0.1", srv.port, "NONSENSE\r\n\r\n\0\1\2")
      assert.matches("^HTTP/1%.1 400 ", out)
      assert.matches("Connection: close\r\n", out, 1, true)
      assert.equal("fine", get(srv.url .. "/").body)
    end)

    it("survives 300 mutated requests (a seeded fuzz) and serves on", function()
      local seed_request = "POST /v1/predict?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        .. "Idempotency-Key: k1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
      local rng = { state = 12345 }
      local function rand(n) -- an LCG: the same cases on every run
        rng.state = (rng.state * 1103515245 + 12345) % 2147483648
        return rng.state % n + 1
      end
      local dir = helpers.tmpdir()
      local lines = {}
      for i = 1, 300 do
        local bytes = seed_request
        for _ = 1, rand(8) do
          local pos, op = rand(#bytes), rand(4)
          if op == 1 then -- flip a byte
            bytes = bytes:sub(1, pos - 1) .. string.char(rand(256) - 1) .. bytes:sub(pos + 1)
          elseif op == 2 then -- insert junk
            bytes = bytes:sub(1, pos) .. string.rep(string.char(rand(256) - 1), rand(40)) .. bytes:sub(pos + 1)
          elseif op == 3 then -- cut
            bytes = bytes:sub(1, pos)
          else -- repeat a slice
            bytes = bytes:sub(1, pos) .. bytes:sub(pos, pos + rand(30)) .. bytes:sub(pos + 1)
          end
        end
        local file = ("%s/case%d"):format(dir, i)
        helpers.write_file(file, bytes)
        lines[#lines + 1] = ("(exec 3<>/dev/tcp/127.0.0.1/%d && cat %s >&3 && timeout 0.5 cat <&3 >/dev/null) 2>/dev/null &")
          :format(srv.port, file)
      end
      lines[#lines + 1] = "wait"
      helpers.write_file(dir .. "/fuzz.sh", table.concat(lines, "\n"))
      helpers.run({ "bash", dir .. "/fuzz.sh" })
      assert.equal("fine", get(srv.url .. "/").body)
      assert.is_nil(srv:status()) -- still running
    end)

    it("answers 431 to headers over 16 KiB or 100 fields", function()
      local r = helpers.curl("-H " .. q("X-Big: " .. ("a"):rep(20000)) .. " " .. q(srv.url .. "/"))
      assert.equal(431, r.status)
      local many = {}
      for i = 1, 101 do many[i] = "-H 'X-H" .. i .. ": v'" end
      assert.equal(431, helpers.curl(table.concat(many, " ") .. " " .. q(srv.url .. "/")).status)
      assert.equal("fine", get(srv.url .. "/").body)
    end)

    it("answers 413 to a body over 1 MiB, with and without Expect", function()
      local rejected = stats(srv).rejected
      local big = helpers.write_file(nil, ("b"):rep(2 * 1024 * 1024))
      for _, expect in ipairs { "", "-H 'Expect:'" } do
        local r = helpers.curl(("%s --data-binary @%s %s"):format(expect, q(big), q(srv.url .. "/")))
        assert.equal(413, r.status, r.stderr)
      end
      local chunked = helpers.curl(("-H 'Transfer-Encoding: chunked' --data-binary @%s %s")
                                     :format(q(big), q(srv.url .. "/")))
      assert.equal(413, chunked.status, chunked.stderr)
      assert.equal("fine", get(srv.url .. "/").body)
      assert.equal(rejected + 3, stats(srv).rejected)
    end)
  end)

  describe("a handler that fails", function()
    local srv
    local cases = {
      { "raise", "boom" },
      { "not_table", "handler must return a table, got number" },
      { "status_string", "bad 'status' (integer 100..599 expected, got string)" },
      { "status_range", "bad 'status' (integer 100..599 expected, got 99)" },
      { "headers_type", "bad 'headers' (table expected, got string)" },
      { "header_value", "bad 'headers' (string keys and string values expected, got table)" },
      { "header_crlf", "bad header 'X-Evil'" },
      { "body_type", "bad 'body' (string expected, got 5)" },
      { "delay_negative", "bad 'delay_ms' (number 0..86400000 expected, got -1)" },
      { "action_unknown", "bad 'action' (\"hang\", \"reset\" or \"close\" expected, got string)" },
      { "typo", "unknown field 'stauts'" },
      { "runaway", "instruction limit exceeded" },
    }
    lazy_setup(function()
      srv = helpers.start_server([[
        local bad = {
          raise = function() error("boom") end,
          not_table = function() return 42 end,
          status_string = function() return { status = "200" } end,
          status_range = function() return { status = 99 } end,
          headers_type = function() return { headers = "x" } end,
          header_value = function() return { headers = { ["X-A"] = {} } } end,
          header_crlf = function() return { headers = { ["X-Evil"] = "a\r\nSet-Cookie: x=1" } } end,
          body_type = function() return { body = 5 } end,
          delay_negative = function() return { delay_ms = -1 } end,
          action_unknown = function() return { action = "explode" } end,
          typo = function() return { stauts = 200 } end,
          runaway = function() while true do end end,
        }
        return function(req)
          local f = bad[req.query]
          if f then return f() end
          return { body = "fine" }
        end]])
    end)
    lazy_teardown(function() stop(srv) end)

    it("answers 500 with the error, logs it once, and keeps serving", function()
      for _, case in ipairs(cases) do
        local name, msg = case[1], case[2]
        local r = get(srv.url .. "/?" .. name)
        assert.equal(500, r.status, name)
        assert.matches(msg, r.body, 1, true)
        assert.is_nil(r.headers["x-evil"])
        local _, logged = srv:stderr():gsub(msg:gsub("%p", "%%%0"), "")
        assert.equal(1, logged, name)
      end
      assert.equal("fine", get(srv.url .. "/").body)
      assert.equal(#cases, stats(srv).handler_errors)
    end)
  end)

  describe("the command", function()
    local function serve_cmd(args)
      return helpers.run(("%s serve %s"):format(q(helpers.bin), args))
    end

    it("reports a script that does not load with file:line and exits 2", function()
      local syntax = helpers.write_file(helpers.tmpname(".lua"), "return function(req)\n  return {\nend\n")
      local r = serve_cmd("--listen 127.0.0.1:0 " .. q(syntax))
      assert.equal(2, r.code)
      assert.matches("^resilua serve: " .. syntax:gsub("%p", "%%%0") .. ":%d+: ", r.stderr)

      local raises = helpers.write_file(helpers.tmpname(".lua"), "local x = 1\nerror('no handler here')\n")
      r = serve_cmd(q(raises))
      assert.equal(2, r.code)
      assert.matches(raises:gsub("%p", "%%%0") .. ":2: no handler here", r.stderr)

      local wrong = helpers.write_file(helpers.tmpname(".lua"), "return 42\n")
      r = serve_cmd(q(wrong))
      assert.equal(2, r.code)
      assert.matches("must return the handler function, got number", r.stderr, 1, true)
    end)

    it("refuses bad usage and an address it cannot listen on", function()
      assert.equal(2, serve_cmd("--bogus").code)
      assert.equal(2, serve_cmd("a.lua b.lua").code)
      assert.equal(2, serve_cmd("--listen").code)
      assert.matches("expected HOST:PORT", serve_cmd("--listen nowhere").stderr, 1, true)
      local srv = helpers.start_server(nil)
      local r = serve_cmd("--listen 127.0.0.1:" .. srv.port)
      assert.equal(2, r.code)
      assert.matches("cannot listen on 127.0.0.1:" .. srv.port, r.stderr, 1, true)
      stop(srv)
    end)

    it("prints its usage with --help", function()
      local r = serve_cmd("--help")
      assert.equal(0, r.code)
      assert.matches("usage: resilua serve", r.stdout, 1, true)
    end)

    it("exits 0 on SIGTERM and SIGINT, even with requests pending", function()
      for _, sig in ipairs { "TERM", "INT" } do
        local srv = helpers.start_server([[return function() return { delay_ms = 60000 } end]])
        local pending = helpers.spawn("exec curl -s " .. q(srv.url .. "/"))
        assert.truthy(helpers.wait_until(function() return stats(srv).delayed == 1 end, 10))
        assert.equal(0, srv:stop(sig), srv:stderr())
        pending:wait(10)
      end
    end)
  end)
end)

describe("core.serve in-process", function()
  local core = require "resilua.core"
  local resilua = require "resilua"

  -- Two POSTs with the same Idempotency-Key; returns the handler's runs.
  local function runs_for(opts)
    resilua.log(false) -- the events would only clutter the spec's output
    local runs = 0
    opts.handler = function()
      runs = runs + 1
      return { status = 200, body = "run " .. runs }
    end
    local srv = assert(core.serve(opts))
    local client = resilua.client{ policy = "no-retry" }
    for _ = 1, 2 do
      local res = assert(client:call{ method = "POST", url = "http://" .. srv:address() .. "/",
                                      headers = { ["Idempotency-Key"] = "same" }, body = "x" })
      assert.are.equal(200, res.status)
    end
    srv:close()
    return runs
  end

  it("dedups by Idempotency-Key by default, and not with dedup = false", function()
    assert.are.equal(1, runs_for{})
    assert.are.equal(2, runs_for{ dedup = false })
    assert.has_error(function() core.serve{ dedup = "no" } end)
  end)
end)
