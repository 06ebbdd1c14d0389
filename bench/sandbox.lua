--- bench/sandbox.lua — `make bench`: what the policy sandbox costs, and how
-- fast it stops a hostile policy (issue 13).
--
--   (a decision in the policy's own state against the script's state is
--   in bench/run.lua, part 1)
--   1. memory: bytes of a policy's own state, and of the script's state
--      per loaded policy, over POLICIES loads of the default policy;
--   1b. dropping a version whose state holds DROP_TABLES small tables: the
--      calling thread's CPU (big states are closed on a helper thread);
--   2. the hostile corpus (spec/hostile): for each case, the wall and CPU
--      time from the start of the load (or of the decision) to its policy
--      error (a failed load's state freed); the slowest of each kind and
--      the distribution of the CPU times;
--   3. calls during reloads: a closed loop (LOAD_CONC coroutines, every
--      call decided) against `resilua serve`, without reloads and during
--      SLOW_RELOADS saves of a policy that loops at load until the load
--      limit stops it; p50, p99 and max call latency of both windows, and
--      the loop's own stalls: a ticker asks to wake every TICK_MS and
--      records how late it wakes (what any call in flight waits too) and
--      the loop thread's CPU time between two wakes (its longest stretch
--      of work without coming back to its timers, apart from the
--      machine's other load).
local resilua = require "resilua"
local core = require "resilua.core"
local policy = require "resilua.policy"
local testing = require "resilua.testing"

local POLICIES = 50
local LOAD_CONC = 16
local SLOW_RELOADS = 10
local WINDOW_S = 3
local SAFETY_S = 120
local TICK_MS = 1
local STALL_MS = 5
local DROP_TABLES = 400000

local bin = core.self_path() or "build/bin/resilua"
local here = (arg and arg[0] or "bench/sandbox.lua"):match("^(.*)/[^/]*$") or "."
local corpus = here .. "/../spec/hostile"
local proc = dofile(here .. "/proc.lua")
local report = dofile(here .. "/report.lua")
local session = proc.session("resilua-bench-sandbox", SAFETY_S)
local row, fmt = report.row_printer(52, 18), report.fmt

local function section(title)
  io.stdout:write("\n", title, "\n")
  io.stdout:flush()
end

local function cpu_ms() return os.clock() * 1000 end

local function part_memory()
  collectgarbage("collect")
  local host_before = collectgarbage("count") * 1024
  local loaded, own = {}, 0
  local t = core.now_ms()
  for i = 1, POLICIES do
    loaded[i] = assert(policy.load("default"))
    own = own + loaded[i].memory
  end
  local load_ms = (core.now_ms() - t) / POLICIES
  collectgarbage("collect")
  local host = collectgarbage("count") * 1024 - host_before
  section(("1. memory, %d loads of the default policy"):format(POLICIES))
  row("a policy's own state", fmt(own / POLICIES / 1024) .. " KiB")
  row("the script's state, per policy (its table copy)", fmt(host / POLICIES / 1024) .. " KiB")
  row("load + validate, wall", fmt(load_ms, 2) .. " ms/policy")
  loaded = nil -- luacheck: ignore
end

-- The calling thread's CPU to drop a policy whose state holds many small
-- tables (its decide keeps them): the last ref of an old version drops on
-- the loop's thread, and a big state is closed on the closer thread.
local function part_drop()
  local path = session:tmp("big.lua")
  proc.write_file(path, [[local keep = {}
return { memory_mb = 64, decide = function(a)
  local t = {}
  for i = 1, 1000 do t[i] = { i } end
  keep[#keep + 1] = t
  return false
end }]])
  local p = assert(policy.load(path))
  for _ = 1, DROP_TABLES // 1000 do testing.decide(p, { attempt = 1, status = 503 }) end
  collectgarbage("collect")
  local c = core.thread_cpu_ms()
  p = nil -- luacheck: ignore
  collectgarbage("collect")
  section("1b. dropping a policy's version")
  row(("a state of %d small tables: the loop's CPU"):format(DROP_TABLES),
      fmt(core.thread_cpu_ms() - c, 2) .. " ms")
end

local function percentile(sorted, p)
  if #sorted == 0 then return 0 end
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

local function part_hostile()
  local names = {}
  local ls = assert(io.popen("ls " .. proc.q(corpus)))
  for f in ls:lines() do if f:match("%.lua$") then names[#names + 1] = f end end
  ls:close()
  section(("2. the hostile corpus (%d cases in spec/hostile): start to policy error"):format(#names))
  local worst, cpus = {}, {}
  for _, f in ipairs(names) do
    local when = proc.read_file(corpus .. "/" .. f):match("^%-%- when: (%a+)")
    local path = corpus .. "/" .. f
    local t, c = core.now_ms(), cpu_ms()
    local p, err = policy.load(path)
    if p and when == "decide" then
      t, c = core.now_ms(), cpu_ms()
      local ok
      ok, err = pcall(testing.decide, p, { attempt = 1, status = 503 })
      if ok then err = nil end
    end
    local wall, cpu = core.now_ms() - t, cpu_ms() - c
    if when ~= "tests" then
      assert(err, f .. ": no policy error")
      local w = worst[when] or { wall = 0, cpu = 0 }
      if cpu > w.cpu then w.cpu, w.cpu_case = cpu, f end
      if wall > w.wall then w.wall, w.wall_case = wall, f end
      worst[when] = w
      cpus[#cpus + 1] = cpu
    end
  end
  table.sort(cpus)
  for _, when in ipairs({ "load", "decide" }) do
    local w = worst[when]
    row(("slowest %s case, CPU"):format(when), fmt(w.cpu, 1) .. " ms", w.cpu_case)
    row(("slowest %s case, wall"):format(when), fmt(w.wall, 1) .. " ms", w.wall_case)
  end
  row("CPU per case: p50 / p90 / max", ("%s / %s / %s ms"):format(fmt(percentile(cpus, 0.5), 1),
    fmt(percentile(cpus, 0.9), 1), fmt(cpus[#cpus], 1)), ("n=%d"):format(#cpus))
end

local function part_reload()
  proc.write_file(session:tmp("up.lua"), [[
local seen = {}
return function(req)
  local key = req.headers["idempotency-key"]
  if not seen[key] then seen[key] = true return { status = 503 } end
  seen[key] = nil
  return { status = 200, body = "ok" }
end]])
  local server = session:spawn("serve", { bin, "serve", "--listen", "127.0.0.1:0", session:tmp("up.lua") },
                               SAFETY_S)
  local url = "http://" .. assert(proc.listening(server, 30000), "serve did not start") .. "/predict"
  local live = session:tmp("live.lua")
  local good = "return { name = 'live', breaker = false, budget = false,\n"
               .. "  decide = function(a) return { retry = true, delay_ms = 0 } end }\n"
  local slow = "local n = 0\nfor i = 1, 9e7 do n = n + i end\nreturn {}\n"
  local function save(src)
    proc.write_file(live .. ".tmp", src)
    assert(os.rename(live .. ".tmp", live))
  end
  save(good)
  local client = resilua.client{ policy = live }
  -- the main thread's share of a reload (starting it, then swapping) and
  -- its whole time (the load runs on a helper thread)
  local reload_ms, main_ms, started, reload = {}, {}, {}, policy.reload
  policy.reload = function(slot)
    local t = core.now_ms()
    started[#started + 1] = t
    reload(slot)
    main_ms[#main_ms + 1] = core.now_ms() - t
  end
  policy.reloaded = function()
    reload_ms[#reload_ms + 1] = core.now_ms() - (started[#reload_ms + 1] or core.now_ms())
  end
  local function window(saves)
    local lat, lag, work, stop, n = {}, {}, {}, false, 0
    resilua.go(function()
      while not stop do
        local t, c = core.now_ms(), core.thread_cpu_ms()
        resilua.sleep(TICK_MS / 1000)
        lag[#lag + 1] = core.now_ms() - t - TICK_MS
        work[#work + 1] = core.thread_cpu_ms() - c
      end
    end)
    for _ = 1, LOAD_CONC do
      resilua.go(function()
        while not stop do
          n = n + 1
          local t = core.now_ms()
          local res = client:call{ method = "POST", url = url, body = tostring(n) }
          assert(res, "a call failed")
          lat[#lat + 1] = core.now_ms() - t
        end
      end)
    end
    local t_end = core.now_ms() + WINDOW_S * 1000
    for i = 1, saves do
      resilua.sleep(WINDOW_S / (saves + 1))
      save(i % 2 == 1 and slow or good .. ("-- %d\n"):format(i))
    end
    resilua.sleep(math.max(0, (t_end - core.now_ms()) / 1000))
    stop = true
    assert(resilua.wait())
    table.sort(lat)
    table.sort(lag)
    table.sort(work)
    return lat, lag, work
  end
  local quiet, quiet_lag, quiet_work = window(0)
  local busy, busy_lag, busy_work = window(SLOW_RELOADS * 2) -- a slow save, then a good one, each time
  policy.reload, policy.reloaded = reload, function() end
  proc.stop(server)
  table.sort(reload_ms)
  section(("3. calls (%d concurrent, every call decided) during %d slow reloads"):format(
    LOAD_CONC, SLOW_RELOADS))
  row("no reloads: p50 / p99 / max", ("%s / %s / %s ms"):format(fmt(percentile(quiet, 0.5), 2),
    fmt(percentile(quiet, 0.99), 2), fmt(quiet[#quiet], 1)), ("n=%d"):format(#quiet))
  row("slow reloads: p50 / p99 / max", ("%s / %s / %s ms"):format(fmt(percentile(busy, 0.5), 2),
    fmt(percentile(busy, 0.99), 2), fmt(busy[#busy], 1)), ("n=%d"):format(#busy))
  table.sort(main_ms)
  row("a reload, start to swap (helper thread): max", fmt(reload_ms[#reload_ms] or 0, 1) .. " ms",
      ("n=%d"):format(#reload_ms))
  row("  of which on the main thread (start): max", fmt(main_ms[#main_ms] or 0, 2) .. " ms")
  row("ratio of call p99, slow reloads / none", fmt(percentile(busy, 0.99) / percentile(quiet, 0.99), 2) .. " x")
  row(("loop stall (a %d ms tick's lateness), no reloads: p99 / max"):format(TICK_MS),
      ("%s / %s ms"):format(fmt(percentile(quiet_lag, 0.99), 2), fmt(quiet_lag[#quiet_lag], 1)),
      ("n=%d"):format(#quiet_lag))
  row("loop stall, slow reloads: p99 / max",
      ("%s / %s ms"):format(fmt(percentile(busy_lag, 0.99), 2), fmt(busy_lag[#busy_lag], 1)),
      ("n=%d"):format(#busy_lag))
  row("loop CPU between two ticks, no reloads: p99 / max",
      ("%s / %s ms"):format(fmt(percentile(quiet_work, 0.99), 2), fmt(quiet_work[#quiet_work], 2)))
  row("loop CPU between two ticks, slow reloads: p99 / max",
      ("%s / %s ms"):format(fmt(percentile(busy_work, 0.99), 2), fmt(busy_work[#busy_work], 2)))
  local function over(sorted, ms)
    local n = 0
    for _, v in ipairs(sorted) do if v > ms then n = n + 1 end end
    return n
  end
  row(("ticks with over %d ms of loop CPU, no reloads / slow reloads"):format(STALL_MS),
      ("%d / %d"):format(over(quiet_work, STALL_MS), over(busy_work, STALL_MS)),
      ("%d saves"):format(SLOW_RELOADS * 2))
end

local function main()
  resilua.log(false)
  local load = (proc.read_file("/proc/loadavg") or ""):match("^(%S+ %S+ %S+)") or "?"
  io.stdout:write(("resilua bench — the policy sandbox (%s run %s/sandbox.lua), load average %s\n")
                  :format(bin, here, load))
  return proc.run_parts({ part_memory, part_drop, part_hostile, part_reload })
end

return session:run_main(main)
