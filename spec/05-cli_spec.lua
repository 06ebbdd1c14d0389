-- The `resilua` command (contract 4): help, version, usage errors naming
-- the flag, exit codes, and `resilua run`.
local helpers = require "helpers"
local cjson = require "cjson"

local function resilua(args, stdin)
  local argv = { helpers.bin }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return helpers.run(argv, stdin)
end

describe("resilua", function()
  it("prints help for itself and for each command", function()
    local r = resilua({ "--help" })
    assert.equal(0, r.code)
    for _, cmd in ipairs({ "call", "run", "serve", "check" }) do
      assert.matches("\n  " .. cmd, r.stdout)
      local sub = resilua({ cmd, "--help" })
      assert.equal(0, sub.code)
      assert.matches("^usage: resilua " .. cmd, sub.stdout)
    end
    assert.matches("Exit codes", resilua({ "call", "-h" }).stdout)
  end)

  it("prints its version", function()
    local r = resilua({ "--version" })
    assert.equal(0, r.code)
    assert.matches("^resilua %d+%.%d+%.%d+\n$", r.stdout)
  end)

  local usage_errors = {
    { {}, "usage: resilua COMMAND", "stdout" },
    { { "frobnicate" }, "unknown command 'frobnicate'" },
    { { "call", "--frob", "http://127.0.0.1:1/" }, "unknown option '%-%-frob'" },
    { { "call" }, "missing URL" },
    { { "call", "http://a/", "http://b/" }, "expected one URL, got 2" },
    { { "call", "-X" }, "option '%-X' needs a value" },
    { { "call", "--quiet=yes", "http://127.0.0.1:1/" }, "option '%-%-quiet' takes no value" },
    { { "call", "--seed", "abc", "http://127.0.0.1:1/" }, "%-%-seed: expected an integer" },
    { { "call", "--policy", "nosuch", "http://127.0.0.1:1/" }, "%-%-policy: policy 'nosuch' not found" },
    { { "call", "-d", "@/nonexistent/file", "http://127.0.0.1:1/" }, "%-d: cannot read /nonexistent/file" },
    { { "call", "-H", "no colon", "http://127.0.0.1:1/" }, "%-H: expected 'Name: value'" },
    { { "call", "ftp://127.0.0.1/" }, "bad URL" },
    { { "call", "--log", "/nonexistent/dir/log", "http://127.0.0.1:1/" }, "%-%-log: /nonexistent/dir/log" },
    { { "run" }, "missing SCRIPT.lua" },
    { { "run", "/nonexistent.lua" }, "cannot open /nonexistent.lua" },
    { { "check" }, "no policy given" },
    { { "call", "--timeout", "0", "http://127.0.0.1:1/" }, "%-%-timeout: expected a duration" },
    { { "call", "--deadline", "2d", "http://127.0.0.1:1/" }, "%-%-deadline: expected a duration" },
    { { "call", "--attempts", "x", "http://127.0.0.1:1/" }, "%-%-attempts: expected an integer" },
    { { "batch", "--in", "/dev/null", "--out", "/tmp/x", "--attempts", "0", "http://127.0.0.1:1/" },
      "%-%-attempts: expected an integer" },
  }
  for _, case in ipairs(usage_errors) do
    it(("exits 2 on `%s`"):format(table.concat(case[1], " ")), function()
      local r = resilua(case[1])
      assert.equal(2, r.code)
      assert.matches(case[2], r[case[3] or "stderr"])
    end)
  end

  it("logs a policy event when a policy does not load", function()
    local log = os.tmpname()
    local r = resilua({ "call", "--log", log, "--policy", "nosuch", "http://127.0.0.1:1/" })
    assert.equal(2, r.code)
    local e = helpers.events(log)[1]
    os.remove(log)
    assert.same({ "policy", "nosuch", false }, { e.event, e.name, e.ok })
    assert.matches("not found", e.error)
  end)

  it("accepts --opt=value and options after the URL", function()
    local r = resilua({ "call", "http://127.0.0.1:1/", "--quiet", "--policy=no-such-policy" })
    assert.equal(2, r.code)
    assert.matches("no%-such%-policy", r.stderr)
  end)

  describe("call", function()
    local server
    setup(function()
      server = helpers.start_server([[
        return function(req)
          if req.path == "/down" then return { status = 503, body = "no newline" } end
          if req.path == "/slow" then return { status = 200, body = "late", delay_ms = 3000 } end
          if req.path == "/bin" then return { status = 200, body = "\0\255\254ab\n" } end
          return { status = 200, headers = { ["X-Thing"] = "7" }, body = "hello" }
        end]])
    end)
    teardown(function() server:stop() end)

    it("is quiet by default; -v or --log show the event log", function()
      local r = resilua({ "call", server.url .. "/ok" })
      assert.equal(0, r.code)
      assert.equal("hello", r.stdout)
      assert.equal("", r.stderr)
      r = resilua({ "call", "-v", server.url .. "/ok" })
      assert.equal("hello", r.stdout)
      assert.matches('"event":"attempt"', r.stderr)
      assert.matches('"event":"call"', r.stderr)
      r = resilua({ "call", "--log", "-", server.url .. "/ok" })
      assert.matches('"event":"call"', r.stderr)
    end)

    it("keeps a body without a final newline apart from the error line", function()
      local r = helpers.run(helpers.command({ helpers.bin, "call", "--policy", "no-retry",
                                              server.url .. "/down" }) .. " 2>&1")
      assert.equal(4, r.code)
      assert.equal(1, r.stdout:find("no newline\nresilua call: gave_up: ", 1, true), r.stdout)
      -- stdout alone carries the body's bytes and nothing else.
      r = resilua({ "call", "--policy", "no-retry", server.url .. "/down" })
      assert.equal("no newline", r.stdout)
    end)

    it("-o writes the body to a file, byte for byte; a bad path sends nothing", function()
      local dir = helpers.tmpdir()
      local r = resilua({ "call", "-o", dir .. "/body", server.url .. "/bin" })
      assert.equal(0, r.code, r.stderr)
      assert.equal("", r.stdout)
      assert.equal("\0\255\254ab\n", helpers.read_file(dir .. "/body"))
      local before = cjson.decode(helpers.curl(server.url .. "/_stats").body).requests
      for _, bad in ipairs({ dir, "/nonexistent/dir/body" }) do
        r = resilua({ "call", "-o", bad, server.url .. "/ok" })
        assert.equal(2, r.code)
        assert.matches("%-o: ", r.stderr)
      end
      assert.equal(before, cjson.decode(helpers.curl(server.url .. "/_stats").body).requests)
      r = resilua({ "call", "-o", "/dev/full", server.url .. "/ok" })
      assert.equal(2, r.code)
      assert.matches("cannot write", r.stderr)
    end)

    it("-i writes the status and headers before the body", function()
      local r = resilua({ "call", "-i", server.url .. "/ok" })
      assert.equal(0, r.code)
      assert.matches("^HTTP 200\r\n", r.stdout)
      assert.matches("\r\nx%-thing: 7\r\n", r.stdout)
      assert.matches("\r\n\r\nhello$", r.stdout)
    end)

    it("--json writes one result object, also for a failed call", function()
      local r = resilua({ "call", "--json", server.url .. "/ok" })
      assert.equal(0, r.code)
      local o = cjson.decode(r.stdout)
      assert.same({ "ok", 200, 1, "hello", "7", "default" },
                  { o.outcome, o.status, o.attempts, o.body, o.headers["x-thing"], o.policy })
      assert.matches('^{"outcome":"ok","status":200,"attempts":1,', r.stdout)
      r = resilua({ "call", "--json", "--attempts", "2", "--no-budget", "--no-breaker",
                    server.url .. "/down" })
      assert.equal(4, r.code)
      o = cjson.decode(r.stdout)
      assert.same({ "gave_up", 503, 2 }, { o.outcome, o.status, o.attempts })
      -- Bytes that are not UTF-8 come base64-encoded, exactly.
      o = cjson.decode(resilua({ "call", "--json", server.url .. "/bin" }).stdout)
      assert.is_nil(o.body)
      assert.equal("AP/+YWIK", o.body_base64)
    end)

    it("batch takes the same overrides", function()
      local dir = helpers.tmpdir()
      local input = helpers.write_file(dir .. "/in.jsonl", '{"id": 1}\n{"id": 2}\n')
      local r = resilua({ "batch", "--quiet", "--no-ledger", "--in", input, "--out", dir .. "/out.jsonl",
                          "--attempts", "3", "--no-budget", "--no-breaker", "--timeout", "1s",
                          server.url .. "/down" })
      assert.equal(6, r.code, r.stderr)
      for line in helpers.read_file(dir .. "/out.jsonl"):gmatch("[^\n]+") do
        local o = cjson.decode(line)
        assert.same({ "gave_up", 3 }, { o.outcome, o.attempts })
      end
    end)

    it("--timeout, --attempts and --deadline override the policy", function()
      local r = resilua({ "call", "--json", "--timeout", "200ms", "--attempts", "1",
                          server.url .. "/slow" })
      assert.equal(4, r.code)
      local o = cjson.decode(r.stdout)
      assert.same({ "timeout", 1 }, { o.error, o.attempts })
      assert.is_true(o.elapsed_ms < 2500, o.elapsed_ms)
      -- (aws-standard retries timeouts; the default does not)
      r = resilua({ "call", "--json", "--policy", "aws-standard", "--timeout", "200ms",
                    "--attempts", "10", "--deadline", "500ms", server.url .. "/slow" })
      o = cjson.decode(r.stdout)
      assert.equal("deadline", o.outcome)
      assert.is_true(o.attempts >= 1 and o.attempts <= 3, o.attempts)
      -- A timeout longer than the policy's deadline lifts the deadline.
      r = resilua({ "call", "--json", "--policy", "no-retry", "--timeout", "5s",
                    server.url .. "/slow" })
      assert.equal(0, r.code, r.stdout)
      assert.equal("late", cjson.decode(r.stdout).body)
    end)
  end)

  describe("run", function()
    local dir = helpers.tmpdir()

    it("runs a script with its arguments and exits with the integer it returns", function()
      local script = helpers.write_file(dir .. "/args.lua", [[
        local a, b = ...
        io.write(arg[0]:match("[^/]+$"), " ", a, " ", b, " ", #arg)
        return 7]])
      local r = resilua({ "run", script, "x", "y" })
      assert.equal(7, r.code)
      assert.equal("args.lua x y 2", r.stdout)
    end)

    it("exits 1 with the error and its position when the script raises", function()
      local script = helpers.write_file(dir .. "/boom.lua", "local x\nx.y = 1")
      local r = resilua({ "run", script })
      assert.equal(1, r.code)
      assert.truthy(r.stderr:find(script .. ":2: attempt to index", 1, true))
    end)

    it("waits for go'd functions before exiting", function()
      local script = helpers.write_file(dir .. "/go.lua", [[
        local resilua = require "resilua"
        resilua.go(function() resilua.sleep(0.1) io.write("late") end)
        io.write("early ")]])
      local r = resilua({ "run", script })
      assert.equal(0, r.code)
      assert.equal("early late", r.stdout)
    end)

    it("exits 2 on a syntax error, naming file and line", function()
      local script = helpers.write_file(dir .. "/syntax.lua", "local = 1")
      local r = resilua({ "run", script })
      assert.equal(2, r.code)
      assert.truthy(r.stderr:find(script .. ":1:", 1, true))
    end)
  end)
end)

describe("make install", function()
  it("installs a binary that finds its Lua and policies from anywhere", function()
    local dest = helpers.tmpdir()
    local r = helpers.run(("make -s install DESTDIR=%s PREFIX=/opt/rsl >/dev/null"):format(helpers.quote(dest)))
    assert.equal(0, r.code, r.stderr)
    local bin = dest .. "/opt/rsl/bin/resilua"
    local out = helpers.run(("cd / && %s check default"):format(helpers.quote(bin)))
    assert.equal(0, out.code, out.stderr)
    assert.truthy(out.stdout:find(dest .. "/opt/rsl/bin/../share/resilua/policies/default.lua", 1, true))
    for _, f in ipairs({ "/opt/rsl/lib/lua/5.4/resilua/core.so", "/opt/rsl/share/lua/5.4/resilua/init.lua",
                         "/opt/rsl/share/resilua/examples/flaky.lua",
                         "/opt/rsl/share/resilua/experiments/outage.lua",
                         "/opt/rsl/share/resilua/experiments/sla.lua" }) do
      assert.truthy(helpers.read_file(dest .. f), f)
    end
    -- An installed experiment runs from anywhere with the installed binary.
    local exp = helpers.run(("cd / && %s run %s --help"):format(helpers.quote(bin),
      helpers.quote(dest .. "/opt/rsl/share/resilua/experiments/outage.lua")))
    assert.equal(0, exp.code, exp.stderr)
    assert.matches("usage: resilua run EXPERIMENT.lua", exp.stdout)
  end)
end)
