-- The policy sandbox against hostile policies (spec/hostile/*.lua: each
-- file's first line says when it fails, `load` or `decide`, and what the
-- message says).  Each case goes through `resilua check`, `resilua call`
-- and a live reload under load; each must end as a policy error naming
-- file:line, with the process alive and the other policies unaffected.
local helpers = require "helpers"

local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec"
local CORPUS = HERE .. "/hostile"

-- { name, file, when = "load" | "decide" | "tests", expect = "..." }, sorted.
local function corpus()
  local out = {}
  local ls = assert(io.popen("ls " .. helpers.quote(CORPUS)))
  for file in ls:lines() do
    if file:match("%.lua$") then
      local first = helpers.read_file(CORPUS .. "/" .. file):match("^[^\n]*")
      local when, expect = first:match("^%-%- when: (%a+)%s+expect: (.-)%s*$")
      assert(when, file .. ": the first line must say `-- when: ... expect: ...`")
      out[#out + 1] = { name = file:gsub("%.lua$", ""), file = CORPUS .. "/" .. file,
                        when = when, expect = expect }
    end
  end
  ls:close()
  return out
end

local CASES = corpus()

-- Every first request of a key fails with 503, so every call is decided.
local UPSTREAM = [[
local seen = {}
return function(req)
  local key = req.headers["idempotency-key"] or req.body
  if not seen[key] then seen[key] = true return { status = 503 } end
  return { status = 200, body = "ok" }
end]]

describe("sandbox: the hostile corpus", function()
  it("has every kind of case", function()
    local kinds = {}
    for _, c in ipairs(CASES) do kinds[c.when] = (kinds[c.when] or 0) + 1 end
    assert.is_true((kinds.load or 0) >= 20, "load cases")
    assert.is_true((kinds.decide or 0) >= 10, "decide cases")
    assert.is_true((kinds.tests or 0) >= 1, "self-test shape cases")
  end)

  it("through `resilua check`: every case fails with file:line, the others still pass", function()
    local args = { helpers.bin, "check" }
    for _, c in ipairs(CASES) do args[#args + 1] = c.file end
    args[#args + 1] = "default"
    local started = helpers.now()
    local r = helpers.run(args)
    assert.is_true(helpers.now() - started < 120, "check took too long")
    assert.equal(2, r.code, r.stderr)
    assert.equal("", r.stderr)
    -- one block per policy, in order: a FAIL or ok line, its indented
    -- problems, its warnings
    local blocks = {}
    for line in r.stdout:gmatch("[^\n]+") do
      if line:match("^ok    ") or line:match("^FAIL  ") then
        blocks[#blocks + 1] = line
      elseif line:match("^      ") or line:match("^warn  ") then
        blocks[#blocks] = blocks[#blocks] .. "\n" .. line
      end
    end
    assert.equal(#CASES + 1, #blocks, r.stdout)
    for i, c in ipairs(CASES) do
      local b = blocks[i]
      assert.truthy(b:match("^FAIL  "), c.name .. ": " .. b)
      assert.truthy(b:find(c.expect, 1, true), c.name .. ": expected '" .. c.expect .. "' in " .. b)
      if c.when ~= "tests" then
        assert.truthy(b:match("hostile/" .. c.name .. "%.lua:%d+:"), c.name .. ": no file:line in " .. b)
      else
        assert.truthy(b:match("test 1"), c.name .. ": the message names the test: " .. b)
      end
      assert.falsy(b:find("stack traceback", 1, true), c.name)
    end
    assert.truthy(blocks[#blocks]:match("^ok    default  "), blocks[#blocks])
  end)

  it("through `resilua call`: a policy error with file:line, exit 2", function()
    local server = helpers.start_server(UPSTREAM)
    finally(function() server:stop() end)
    for i, c in ipairs(CASES) do
      local started = helpers.now()
      local r = helpers.run({ helpers.bin, "call", "--quiet", "-X", "POST", "-d", "body" .. i,
                              "--policy", c.file, server.url .. "/predict" })
      assert.is_true(helpers.now() - started < 60, c.name .. ": call took too long")
      if c.when == "tests" then
        assert.equal(0, r.code, c.name .. ": " .. r.stderr) -- self-tests are check's
      else
        assert.equal(2, r.code, c.name .. ": " .. r.stderr)
        assert.truthy(r.stderr:find(c.expect, 1, true), c.name .. ": " .. r.stderr)
        assert.truthy(r.stderr:match("hostile/" .. c.name .. "%.lua:%d+:"), c.name .. ": " .. r.stderr)
        if c.when == "decide" then
          assert.truthy(r.stderr:match("^resilua call: policy_error: [^\n]*hostile/"), r.stderr)
          assert.falsy(r.stderr:find("policy error:", 1, true), "no doubling: " .. r.stderr)
        else
          assert.truthy(r.stderr:match("^resilua call: %-%-policy: [^\n]*hostile/"), r.stderr)
        end
      end
    end
  end)
end)

-- A script that keeps two clients busy (live.lua, reloaded, and other.lua,
-- untouched) while it saves each case over live.lua and back, and reports
-- what it saw as one JSON object.
local RELOAD_SCRIPT = [==[
local resilua = require "resilua"
local policy = require "resilua.policy"
local core = require "resilua.core"
local cjson = require "cjson"
local url, live, other, corpus = arg[1], arg[2], arg[3], arg[4]
local GOOD = [[return { name = "live", breaker = false, budget = false,
  decide = function(a) return { retry = true, delay_ms = 1, reason = "good" } end }]]

local function save(path, src)
  local f = assert(io.open(path .. ".tmp", "wb"))
  f:write(src)
  f:close()
  assert(os.rename(path .. ".tmp", path))
end
local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

save(live, GOOD)
local a, b = resilua.client{ policy = live }, resilua.client{ policy = other }

-- Each reload, as inotify triggers it: its result.
local reloads = {}
policy.reloaded = function(slot, ok, err)
  reloads[#reloads + 1] = { ok = ok, err = err }
end
local function wait_reload(n)
  local deadline = core.now_ms() + 10000
  while #reloads < n and core.now_ms() < deadline do resilua.sleep(0.01) end
  return reloads[n]
end

local n = 0
local function call(c)
  n = n + 1
  local t0 = core.now_ms()
  local res, err = c:call{ method = "POST", url = url, body = "r" .. n }
  return res and "ok" or err.outcome, core.now_ms() - t0, err and err.message
end

-- the other policy's load, all along
local stop, b_outcomes, b_max_ms = false, {}, 0
resilua.go(function()
  while not stop do
    local o, ms = call(b)
    b_outcomes[o] = (b_outcomes[o] or 0) + 1
    b_max_ms = math.max(b_max_ms, ms)
    resilua.sleep(0.002)
  end
end)

local results = {}
for i = 5, #arg do
  local name = arg[i]
  save(live, read(corpus .. "/" .. name .. ".lua"))
  local r = wait_reload(#reloads + 1) or { ok = "none" }
  -- a client of its own: a case's failures must not open another's breaker
  a = resilua.client{ policy = live, name = "live-" .. name }
  local outcome, _, message = call(a)
  save(live, GOOD)
  local back = wait_reload(#reloads + 1) or { ok = "none" }
  local restored = call(a)
  results[#results + 1] = { name = name, reload_ok = r.ok, reload_err = r.err,
                            outcome = outcome, message = message, restored = restored,
                            restore_ok = back.ok }
end
stop = true
assert(resilua.wait())
local statm = read("/proc/self/statm")
local rss_pages = tonumber(statm:match("^%d+%s+(%d+)"))
print(cjson.encode({ results = results, b = b_outcomes, b_max_ms = b_max_ms,
                     rss_mb = rss_pages * 4096 / 1048576 }))
]==]

describe("sandbox: live reload of each hostile case under load", function()
  it("keeps the old version (load) or fails the decision (decide); the other policy is untouched", function()
    local server = helpers.start_server(UPSTREAM)
    finally(function() server:stop() end)
    local dir = helpers.tmpdir()
    local live, other = dir .. "/live.lua", dir .. "/other.lua"
    helpers.write_file(other, [[return { name = "other", breaker = false, budget = false,
      decide = function(a) return { retry = true, delay_ms = 1, reason = "other" } end }]])
    local script = helpers.write_file(dir .. "/reload.lua", RELOAD_SCRIPT)
    local args = { helpers.bin, "run", script, server.url .. "/predict", live, other, CORPUS }
    for _, c in ipairs(CASES) do args[#args + 1] = c.name end
    local r = helpers.run(args)
    assert.equal(0, r.code, r.stderr)
    local report = require("cjson").decode(r.stdout:match("([^\n]+)\n?$") or "null")
    assert.equal(#CASES, #report.results)
    for i, c in ipairs(CASES) do
      local got = report.results[i]
      assert.equal(c.name, got.name)
      if c.when == "load" then
        assert.is_false(got.reload_ok, c.name)
        assert.truthy(got.reload_err:match("live%.lua:%d+:"), c.name .. ": " .. got.reload_err)
        local expect = c.expect:gsub("^hostile/[%w_]+%.lua:", "live.lua:") -- the file saved over
        assert.truthy(got.reload_err:find(expect, 1, true), c.name .. ": " .. got.reload_err)
        assert.equal("ok", got.outcome, c.name .. ": the old version stays") -- good decide: retry
      elseif c.when == "decide" then
        assert.is_true(got.reload_ok, c.name)
        assert.equal("policy_error", got.outcome, c.name)
        assert.truthy(got.message:match("live%.lua:%d+:"), c.name .. ": " .. got.message)
      else
        assert.is_true(got.reload_ok, c.name)
      end
      assert.is_true(got.restore_ok, c.name .. ": the good version loads again")
      assert.equal("ok", got.restored, c.name .. ": and decides again")
    end
    -- the other policy: every call ended ok, none stalled for long
    for outcome in pairs(report.b) do assert.equal("ok", outcome) end
    assert.is_true(report.b_max_ms < 5000, "a call of the other policy took " .. report.b_max_ms .. " ms")
    -- every policy state that failed was freed: the process holds about
    -- one cap's worth, not one per hostile case
    assert.is_true(report.rss_mb < 300, "RSS " .. report.rss_mb .. " MB")
  end)
end)

-- For scripts: the process's thread count.
local THREADS = [[local function threads()
        for l in io.lines("/proc/self/status") do
          local n = l:match("^Threads:%s*(%d+)")
          if n then return tonumber(n) end
        end
      end]]

describe("sandbox: odd files and hooks", function()
  it("a policy file replaced by a directory: a policy event, the old version kept", function()
    local dir = helpers.tmpdir()
    local live, log = dir .. "/live.lua", dir .. "/events.jsonl"
    helpers.write_file(live, "return { max_attempts = 2 }")
    local script = helpers.write_file(dir .. "/dir.lua", ([[
      local resilua = require "resilua"
      local policy = require "resilua.policy"
      resilua.log(%q)
      local slot = assert(policy.slot(%q))
      local done
      policy.reloaded = function(_, ok, err) done = { ok, err } end
      assert(os.remove(%q))
      assert(os.execute("mkdir " .. %q))
      policy.reload(slot)
      while not done do resilua.sleep(0.01) end
      print(done[1], slot.current.table.max_attempts)]]):format(log, live, live, live))
    local r = helpers.run({ helpers.bin, "run", script })
    assert.equal(0, r.code, r.stderr)
    assert.equal("false\t2\n", r.stdout)
    local loads = helpers.of_kind(helpers.events(log), "policy")
    assert.equal(2, #loads)
    assert.is_false(loads[2].ok)
    assert.truthy(loads[2].error:find("is a directory", 1, true), loads[2].error)
  end)

  it("versions whose state grew past 1 MB are closed on one helper thread, not the caller's", function()
    local dir = helpers.tmpdir()
    local big = helpers.write_file(dir .. "/big.lua", [[local keep = {}
      return { decide = function(a)
        local t = {}
        for i = 1, 1000 do t[i] = { i } end
        keep[#keep + 1] = t
        return false
      end }]])
    local script = helpers.write_file(dir .. "/drop.lua", ([[
      local policy = require "resilua.policy"
      local testing = require "resilua.testing"
      %s
      local before = threads()
      for _ = 1, 3 do -- the thread is started once, then reused
        local p = assert(policy.load(%q))
        for _ = 1, 30 do testing.decide(p, { status = 503 }) end
        p = nil -- luacheck: ignore
        collectgarbage("collect")
        collectgarbage("collect")
      end
      local small = assert(policy.load("default"))
      small = nil -- luacheck: ignore
      collectgarbage("collect")
      print(before, threads())]]):format(THREADS, big))
    local r = helpers.run({ helpers.bin, "run", script })
    assert.equal(0, r.code, r.stderr)
    assert.equal("1\t2\n", r.stdout)
  end)

  it("a storm of reloads runs one load of a slot at a time, and the last edit wins", function()
    -- Each load of this version holds up to 60 MB until its limits stop
    -- it: 60 concurrent loads (one thread each) took the process to 4 GB.
    local dir = helpers.tmpdir()
    local live = dir .. "/live.lua"
    helpers.write_file(live, "return { max_attempts = 2 }")
    local script = helpers.write_file(dir .. "/storm.lua", ([[
      local resilua = require "resilua"
      local policy = require "resilua.policy"
      local live = %q
      local function save(src)
        local f = assert(io.open(live .. ".tmp", "wb")) f:write(src) f:close()
        assert(os.rename(live .. ".tmp", live))
      end
      %s
      local slot = assert(policy.slot(live))
      local results = {}
      policy.reloaded = function(_, ok, err) results[#results + 1] = ok end
      save('local t = {} for i = 1, 60 do t[i] = string.rep(string.char(64 + i), 1 << 20) end '
           .. 'while true do local _ = t[1]:sub(1, 9) end')
      local peak = threads()
      for _ = 1, 60 do
        policy.reload(slot)
        peak = math.max(peak, threads())
      end
      save("return { max_attempts = 3 }")
      policy.reload(slot)
      local deadline = os.time() + 60
      while slot.current.table.max_attempts ~= 3 and os.time() < deadline do
        peak = math.max(peak, threads())
        resilua.sleep(0.005)
      end
      resilua.sleep(0.2) -- any load still running would end by now
      print(peak, slot.current.table.max_attempts, results[#results])]]):format(live, THREADS))
    local r = helpers.run({ helpers.bin, "run", script })
    assert.equal(0, r.code, r.stderr)
    local peak, attempts, last = r.stdout:match("^(%d+)\t(%d+)\t(%a+)\n$")
    assert.truthy(peak, r.stdout)
    -- the loop's thread and one loader (inotify's own reloads included)
    assert.is_true(tonumber(peak) <= 2, "threads at the peak: " .. peak)
    assert.equal("3", attempts)
    assert.equal("true", last)
  end)

  it("require and extend of a name ending in .lua search the policy path only, never the working folder", function()
    local dir = helpers.tmpdir()
    helpers.write_file(dir .. "/stolen.lua", "return { max_attempts = 9 }")
    helpers.write_file(dir .. "/req.lua", [[local m = require("stolen.lua")
      return { max_attempts = 2 }]])
    helpers.write_file(dir .. "/ext.lua", [[return require("resilua.policy").extend("stolen.lua", {})]])
    local r = helpers.run(("cd %s && %s check req.lua ext.lua"):format(helpers.quote(dir),
                                                                       helpers.quote(helpers.bin)))
    assert.equal(2, r.code, r.stdout .. r.stderr)
    assert.truthy(r.stdout:match("FAIL  req%.lua  [^\n]*module 'stolen%.lua' is not allowed"), r.stdout)
    assert.truthy(r.stdout:match("FAIL  ext%.lua  [^\n]*base policy 'stolen%.lua' not found"), r.stdout)
  end)

  it("a breaker.on_change that loops is stopped; the breaker event says where", function()
    local server = helpers.start_server("return function() return { status = 503 } end")
    finally(function() server:stop() end)
    local dir = helpers.tmpdir()
    local file, log = dir .. "/hooked.lua", dir .. "/events.jsonl"
    helpers.write_file(file, [[return { max_attempts = 1, budget = false,
      breaker = { failures = 1, open_ms = 60000,
                  on_change = function(key, from, to) while true do end end } }]])
    local r = helpers.run({ helpers.bin, "call", "--policy", file, "--log", log, server.url })
    assert.equal(4, r.code, r.stderr) -- gave up: one attempt, 503
    local b = helpers.of_kind(helpers.events(log), "breaker")
    assert.equal(1, #b)
    assert.truthy(tostring(b[1].hook_error):match("hooked%.lua:%d+: instruction limit exceeded"),
                  tostring(b[1].hook_error))
  end)
end)

describe("sandbox: overrides from the command line", function()
  it("keep the policy's decide (it lives in the policy's own state)", function()
    local server = helpers.start_server("return function() return { status = 503 } end")
    finally(function() server:stop() end)
    local dir = helpers.tmpdir()
    local file, log = dir .. "/mine.lua", dir .. "/events.jsonl"
    helpers.write_file(file, [[return { breaker = false, budget = false,
      decide = function(a) return { retry = true, delay_ms = 1, reason = "mine" } end }]])
    local r = helpers.run({ helpers.bin, "call", "--policy", file, "--attempts", "2", "--log", log,
                            server.url })
    assert.equal(4, r.code, r.stderr)
    local attempts = helpers.of_kind(helpers.events(log), "attempt")
    assert.equal(2, #attempts)
    assert.equal("mine", attempts[1].reason)
  end)
end)

describe("sandbox: isolation", function()
  local dir, write
  setup(function()
    dir = helpers.tmpdir()
    write = helpers.policy_writer(dir)
  end)

  it("a policy that changes its resilua.policy defaults changes only itself", function()
    write("tamper", [[local P = require("resilua.policy")
      P.DEFAULTS.max_attempts = 77
      string.format = function() return "constant" end
      return {}]])
    local r = helpers.run(("%s run %s"):format(helpers.quote(helpers.bin), helpers.quote(
      helpers.write_file(dir .. "/iso.lua", ([[
        local policy = require "resilua.policy"
        local t = assert(policy.load(%q))
        local d = assert(policy.load("default"))
        print(t.table.max_attempts, d.table.max_attempts, policy.DEFAULTS.max_attempts,
              ("%%d"):format(5))
      ]]):format(dir .. "/tamper.lua")))))
    assert.equal(0, r.code, r.stderr)
    assert.equal("77\t4\t4\t5\n", r.stdout)
  end)

  it("nil from decide applies retry_on and backoff; false stops", function()
    write("defer", [[return {
      retry_on = { status = { 503 } },
      backoff = { base_ms = 10, max_ms = 10, jitter = "none" },
      decide = function(a)
        if a.status == 418 then return false end
        if a.status == 429 then return { retry = true, delay_ms = 5, reason = "own" } end
        return nil
      end,
      tests = {
        { attempt = { status = 503 }, expect = { retry = true, delay_ms = 10 } },
        { attempt = { status = 500 }, expect = { retry = false } },
        { attempt = { status = 418 }, expect = { retry = false, reason = "decide: no retry" } },
        { attempt = { status = 429 }, expect = { retry = true, delay_ms = 5, reason = "own" } },
      } }]])
    local r = helpers.run({ helpers.bin, "check", dir .. "/defer.lua" })
    assert.equal(0, r.code, r.stdout)
    assert.truthy(r.stdout:match("^ok    defer  .-4 self%-tests passed"), r.stdout)
    local testing = helpers.run(("%s run %s"):format(helpers.quote(helpers.bin), helpers.quote(
      helpers.write_file(dir .. "/t.lua", ([[
        local d = require("resilua.testing").decide(%q, { status = 503 })
        print(d.reason)]]):format(dir .. "/defer.lua")))))
    assert.equal("decide: no opinion; status 503 in retry_on\n", testing.stdout)
  end)

  it("memory_mb caps a policy's state; over it the decision is a policy error", function()
    write("small", [[local keep = {}
      return { memory_mb = 2, decide = function(a)
        keep[#keep + 1] = string.rep("x", 1 << 20)
        return false
      end }]])
    local r = helpers.run(("%s run %s"):format(helpers.quote(helpers.bin), helpers.quote(
      helpers.write_file(dir .. "/m.lua", ([[
        local testing = require "resilua.testing"
        local p = assert(require("resilua.policy").load(%q))
        for i = 1, 10 do
          local ok, err = pcall(testing.decide, p, { status = 503 })
          if not ok then print(i, err) return end
        end
        print("never")]]):format(dir .. "/small.lua")))))
    assert.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:match("small%.lua:%d+: memory limit exceeded %(2 MB"), r.stdout)
  end)
end)

describe("check", function()
  local dir, write
  setup(function()
    dir = helpers.tmpdir()
    write = helpers.policy_writer(dir)
  end)

  it("warns: deadline under the per-try timeout, decide without tests, retry_on never applied", function()
    write("warned", [[return {
      deadline_ms = 500, per_try_timeout_ms = 2000,
      retry_on = { status = { 503 } },
      decide = function(a) return false end }]])
    local r = helpers.run({ helpers.bin, "check", dir .. "/warned.lua" })
    assert.equal(0, r.code, r.stdout)
    local w = "warn  " .. dir .. "/warned.lua  "
    assert.truthy(r.stdout:find(w .. "deadline_ms (500) < per_try_timeout_ms (2000)", 1, true), r.stdout)
    assert.truthy(r.stdout:find(w .. "decide has no tests", 1, true), r.stdout)
    assert.truthy(r.stdout:find(w .. "retry_on is never applied", 1, true), r.stdout)
  end)

  it("reports every problem of a policy, in the file's order", function()
    write("multi", "return {\n max_attemps = 3,\n backoff = { jitter = 'fulll' },\n deadline_ms = -1,\n}\n")
    local r = helpers.run({ helpers.bin, "check", dir .. "/multi.lua" })
    assert.equal(2, r.code)
    local lines = {}
    for line in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.equal(3, #lines, r.stdout)
    assert.truthy(lines[1]:match("multi%.lua:2: unknown field 'max_attemps' %(did you mean 'max_attempts'%?%)"))
    assert.truthy(lines[2]:match("^      .*multi%.lua:3: backoff%.jitter"))
    assert.truthy(lines[3]:match("^      .*multi%.lua:4: deadline_ms"))
  end)

  it("--show prints the effective settings after extend and the defaults", function()
    write("ext", [[return require("resilua.policy").extend("default", { max_attempts = 2 })]])
    local r = helpers.run({ helpers.bin, "check", "--policy-path", dir, "--show", "ext" })
    assert.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:find("  max_attempts = 2,", 1, true), r.stdout)
    assert.truthy(r.stdout:find("  deadline_ms = 10000,", 1, true), r.stdout)
    assert.truthy(r.stdout:find("  memory_mb = 64,", 1, true), r.stdout)
    local chunk = assert(load(r.stdout, "show", "t", {}))
    assert.equal(2, chunk().max_attempts)
  end)

  it("`resilua policies` lists the shipped and the found policies", function()
    write("team", "return {}")
    local r = helpers.run({ helpers.bin, "policies", "--policy-path", dir })
    assert.equal(0, r.code, r.stderr)
    assert.truthy(("\n" .. r.stdout):match("\nteam%s+[^\n]*/team%.lua"), r.stdout)
    assert.truthy(r.stdout:match("default%s+[^\n]*policies/default%.lua"), r.stdout)
    assert.falsy(r.stdout:find("/../", 1, true), "paths are normalised: " .. r.stdout)
  end)

  it("--policy with a typo gets a did-you-mean and normalised paths", function()
    local r = helpers.run({ helpers.bin, "call", "--quiet", "--policy", "defualt", "http://127.0.0.1:9/" })
    assert.equal(2, r.code)
    assert.truthy(r.stderr:find("policy 'defualt' not found (did you mean 'default'?)", 1, true), r.stderr)
    assert.falsy(r.stderr:find("/../", 1, true), r.stderr)
  end)
end)
