-- Hot reload under load: a `resilua run` script makes 200 calls/s for 10 s
-- against `resilua serve` while the policy file is edited (saved by
-- rename, like editors do), broken, and fixed again.
local helpers = require "helpers"

local LOAD_SCRIPT = [[
local resilua = require "resilua"
local url, policy_file, log = arg[1], arg[2], arg[3]
resilua.log(log)
local client = resilua.client{ policy = policy_file }
local RATE, SECONDS = 200, 10
for i = 1, RATE * SECONDS do
  resilua.go(function() client:call{ method = "POST", url = url, body = tostring(i) } end)
  resilua.sleep(1 / RATE)
end
assert(resilua.wait())
]]

-- Every first request of a key fails with 503, so every call is decided.
local UPSTREAM = [[
local seen = {}
return function(req)
  local key = req.headers["idempotency-key"]
  if not seen[key] then seen[key] = true return { status = 503 } end
  return { status = 200, body = "ok" }
end]]

local function version_src(tag)
  return ("return { name = 'live', breaker = false, budget = false,\n"
          .. "  decide = function(a) return { retry = true, delay_ms = 1, reason = %q } end }\n"):format(tag)
end

-- Milliseconds since the epoch of an RFC 3339 UTC timestamp.
local function epoch_ms(ts)
  local y, mo, d, h, mi, s, ms = ts:match("^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)%.(%d+)Z$")
  y, mo = tonumber(y), tonumber(mo)
  if mo <= 2 then y, mo = y - 1, mo + 12 end -- days from civil (Howard Hinnant)
  local days = 365 * y + y // 4 - y // 100 + y // 400 + (153 * (mo - 3) + 2) // 5 + tonumber(d) - 719469
  return ((days * 24 + tonumber(h)) * 60 + tonumber(mi)) * 60000 + tonumber(s) * 1000 + tonumber(ms)
end

local function now_ms()
  return tonumber(helpers.run("date +%s%3N").stdout)
end

-- Saves src into path the way editors do: write a temporary file, rename.
-- Returns the time just before the save.
local function save(path, src)
  local t = now_ms()
  helpers.write_file(path .. ".tmp", src)
  assert(os.rename(path .. ".tmp", path))
  return t
end

describe("hot reload", function()
  it("swaps policies under load without failing or re-deciding a call", function()
    local server = helpers.start_server(UPSTREAM)
    local dir = helpers.tmpdir()
    local policy_file, log = dir .. "/live.lua", dir .. "/events.jsonl"
    helpers.write_file(policy_file, version_src("v1"))
    local script = helpers.write_file(dir .. "/load.lua", LOAD_SCRIPT)
    local run = helpers.spawn({ helpers.bin, "run", script, server.url .. "/predict", policy_file, log })

    helpers.sleep(3)
    local broken_at = save(policy_file, "return {\n  max_attempts = 'many' }")
    helpers.sleep(2)
    local v2_at = save(policy_file, version_src("v2"))
    assert.equal(0, run:wait(60), run:stderr())
    server:stop()

    local events = helpers.events(log)
    local loads = helpers.of_kind(events, "policy")
    assert.equal(3, #loads) -- the first load, the broken edit, v2
    assert.is_false(loads[2].ok)
    assert.truthy(loads[2].error:find(policy_file .. ":2: max_attempts must be an integer", 1, true))
    assert.is_true(loads[3].ok)
    local v1, v2 = loads[1].version, loads[3].version
    assert.not_equal(v1, v2)

    local calls, decided, first_v2 = {}, {}, nil
    for _, e in ipairs(events) do
      if e.event == "call" then
        assert.is_nil(calls[e.call_id], "a call ended twice")
        calls[e.call_id] = e
        assert.equal("ok", e.outcome)
        assert.equal(2, e.attempts)
      elseif e.event == "attempt" then
        local key = ("%s#%d"):format(e.call_id, e.attempt)
        assert.is_nil(decided[key], "an attempt was decided twice")
        decided[key] = e.policy_version
        if e.attempt == 2 then
          assert.equal(decided[e.call_id .. "#1"], e.policy_version, "a call changed version mid-flight")
        elseif e.policy_version == v2 then
          assert.equal("v2", e.reason)
          first_v2 = first_v2 or epoch_ms(e.ts)
        else
          assert.equal("v1", e.reason) -- the broken edit kept v1 in force
          -- inotify reloads at once; 4 s is liveness slack for a loaded
          -- machine (the run has 5 s left): a reload that never comes, or
          -- comes only with a later event, still fails it
          if epoch_ms(e.ts) > v2_at + 4000 then error("v1 still deciding 4 s after the edit") end
        end
      end
    end
    local n = 0
    for _ in pairs(calls) do n = n + 1 end
    assert.equal(2000, n)
    assert.is_true(broken_at < v2_at)
    assert.is_not_nil(first_v2)
    assert.is_true(first_v2 - v2_at < 4000, ("first v2 decision %d ms after the edit"):format(first_v2 - v2_at))
  end)

  it("reloads on SIGHUP", function()
    local dir = helpers.tmpdir()
    local policy_file, log = dir .. "/hup.lua", dir .. "/hup.jsonl"
    helpers.write_file(policy_file, "return { max_attempts = 2 }")
    local script = helpers.write_file(dir .. "/hup_run.lua", [[
      local resilua = require "resilua"
      resilua.log(arg[2])
      local client = resilua.client{ policy = arg[1] }
      io.write("loaded\n") io.flush()
      resilua.sleep(1.5)]])
    local run = helpers.spawn({ helpers.bin, "run", script, policy_file, log })
    assert.truthy(run:wait_line("loaded\n", 10))
    run:signal("HUP") -- the file did not change: only the signal can reload it
    assert.equal(0, run:wait(10))
    local loads = helpers.of_kind(helpers.events(log), "policy")
    assert.equal(2, #loads)
    assert.same({ true, true }, { loads[1].ok, loads[2].ok })
    assert.equal(loads[1].version, loads[2].version)
  end)
end)
