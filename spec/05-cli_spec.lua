-- The `resilua` command (contract 4): help, version, usage errors naming
-- the flag, exit codes, and `resilua run`.
local helpers = require "helpers"

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
    for _, f in ipairs({ "/opt/rsl/lib/lua/5.4/resilua/core.so", "/opt/rsl/share/lua/5.4/resilua/init.lua" }) do
      assert.truthy(helpers.read_file(dest .. f), f)
    end
  end)
end)
