--- bench/run.lua — `make bench`: prints figures, never fails on slowness.
--
--   1. ns per policy decision through core.decide: a Lua `decide` (the
--      C -> Lua -> C round trip) against the built-in rules, with baselines;
--   2. calls/s of 64 coroutines against `resilua serve` (the model stub) on
--      127.0.0.1, and wrk against the same upstream when it is installed;
--   3. RSS with 1,000 calls in flight against an upstream that delays them.
--
-- Runs inside the binary: `build/bin/resilua run bench/run.lua`.  Parts 2
-- and 3 run in child processes (bench/load.lua, bench/inflight.lua) so that
-- each starts from a fresh heap; upstreams are separate `resilua serve`
-- processes, stopped with SIGTERM, and wrapped in `timeout` so that none
-- outlives a bench killed halfway.  Everything it starts and every temporary
-- file is cleaned up on the way out, errors included.
local resilua = require "resilua"
local core = require "resilua.core"
local cjson = require "cjson"

local LOAD_SECONDS = 5        -- part 2: measured window (after a 0.5 s warm-up)
local LOAD_WARMUP_S = 0.5
local LOAD_CONC = 64
local INFLIGHT_N = 1000       -- part 3
local INFLIGHT_SAMPLE_S = 1   -- when RSS is read; the upstream answers after 2 s
local SAFETY_S = 150          -- no child lives longer than this (timeout(1))

local here = (arg and arg[0] or "bench/run.lua"):match("^(.*)/[^/]*$") or "."
local bin = core.self_path() or "build/bin/resilua"

local proc = dofile(here .. "/proc.lua")
local session = proc.session("resilua-bench", SAFETY_S)

--- Starts `resilua serve` on 127.0.0.1:0 (with `script` if given) and waits
-- for its `listening on` line.  Returns the process with .url.
local function start_upstream(name, script)
  local p = session:spawn(name, { bin, "serve", "--listen", "127.0.0.1:0", script })
  local hostport = proc.listening(p)
  if not hostport then
    error(("resilua serve did not start: %s"):format(proc.read_file(p.err) or ""))
  end
  p.url = "http://" .. hostport
  p.worker = proc.worker_pid(p)
  return p
end

--- Runs a bench child script with the binary; returns its decoded JSON line.
local function run_child(name, script, args, secs)
  local list = { bin, "run", here .. "/" .. script }
  for _, a in ipairs(args) do list[#list + 1] = tostring(a) end
  local out, ok, err = session:run(name, list, secs)
  local line = out:match("[^\n]+")
  local decoded = line and select(2, pcall(cjson.decode, line))
  if not ok or type(decoded) ~= "table" then
    error(("%s failed: %s%s"):format(script, err, out), 0)
  end
  return decoded
end

--- Output -----------------------------------------------------------------

local report = dofile(here .. "/report.lua")
local row, fmt = report.row_printer(48, 18), report.fmt
local function section(title)
  io.stdout:write("\n", title, "\n")
  io.stdout:flush()
end

--- Part 1: policy decisions ------------------------------------------------

-- ns per iteration of f(n) (which runs n iterations): calibrated to about
-- 0.2 s a repetition, median of 5 repetitions.
local function ns_per(f)
  local n = 1000
  while true do
    local t = core.now_ms()
    f(n)
    local ms = core.now_ms() - t
    if ms >= 50 then
      n = math.max(1000, math.floor(n * 200 / ms))
      break
    end
    n = n * 4
  end
  local samples = {}
  for i = 1, 5 do
    collectgarbage("collect")
    local t = core.now_ms()
    f(n)
    samples[i] = (core.now_ms() - t) * 1e6 / n
  end
  table.sort(samples)
  return samples[3], n, samples[1], samples[5]
end

local function part_decide()
  local policy = resilua.policy
  local lua_p = assert(policy.load(here .. "/policies/lua_decide.lua"))
  local builtin_p = assert(policy.load(here .. "/policies/builtin.lua"))
  local decide = core.decide
  local A = { attempt = 1, status = 503 }

  -- Both must agree before we time them.
  local d1, d2 = decide(lua_p.core, A), decide(builtin_p.core, A)
  assert(d1.retry == true and d2.retry == true, "both policies must retry a 503")
  assert(decide(lua_p.core, { attempt = 1, status = 404 }).retry == false)

  local empty = function() end
  local base_ns = ns_per(function(n)
    for _ = 1, n do empty(lua_p.core, A) end
  end)
  local builtin_ns, n_builtin = ns_per(function(n)
    local c = builtin_p.core
    for _ = 1, n do decide(c, A) end
  end)
  local lua_ns, n_lua, lua_min, lua_max = ns_per(function(n)
    local c = lua_p.core
    for _ = 1, n do decide(c, A) end
  end)
  -- The decide body alone, called from Lua with an `a` like the one the
  -- core builds (same fields): what the policy itself costs, no bridge.
  -- (The policy's own function lives in its own Lua state: time the same
  -- file's decide loaded in this one.)
  local fn = assert(loadfile(here .. "/policies/lua_decide.lua", "t"))().decide
  local a_full = { attempt = 1, method = "GET", url = "http://127.0.0.1/", status = 503,
                   headers = {}, latency_ms = 0, elapsed_ms = 0, remaining_ms = 10000,
                   prev_delay_ms = 200, max_attempts = 4, policy = lua_p.table }
  -- The same decide run in this (the script's) state, as policy.define
  -- builds it: what the sandbox's own state costs per decision.
  local host_p = assert(policy.define(assert(loadfile(here .. "/policies/lua_decide.lua", "t"))(),
                                      "host", here .. "/policies/lua_decide.lua"))
  -- Both in alternating rounds on the CPU clock: the two rows would
  -- otherwise be timed seconds apart, on a machine whose load moves.
  local ratios, host_ns = {}, {}
  for round = 1, 9 do
    local per = {}
    for i, c in ipairs({ lua_p.core, host_p.core }) do
      local t = os.clock()
      for _ = 1, 20000 do decide(c, A) end
      per[i] = (os.clock() - t) * 1e9 / 20000
    end
    ratios[round], host_ns[round] = per[1] / per[2], per[2]
  end
  table.sort(ratios)
  table.sort(host_ns)
  local sandbox_ratio = ratios[5]
  host_ns = host_ns[5]
  local body_ns = ns_per(function(n)
    for _ = 1, n do fn(a_full) end
  end)

  section(("1. policy decision: core.decide(policy.core, {attempt=1, status=503}), "
           .. "median of 5 runs of ~0.2 s"))
  row("empty Lua function call (loop baseline)", fmt(base_ns, 1) .. " ns/iter")
  row("built-in rules (policy without decide)", fmt(builtin_ns) .. " ns/decision",
      ("n=%d"):format(n_builtin))
  row("Lua decide (resilua.backoff)", fmt(lua_ns) .. " ns/decision",
      ("n=%d, runs %.0f-%.0f"):format(n_lua, lua_min, lua_max))
  row("ratio Lua decide / built-in", fmt(lua_ns / builtin_ns, 2) .. " x")
  row("same decide in the script's state (no sandbox)", fmt(host_ns) .. " ns/decision")
  row("ratio sandboxed / script's state (alternating, CPU)", fmt(sandbox_ratio, 2) .. " x")
  row("memory of the policy's own state", fmt((lua_p.memory or 0) / 1024) .. " KiB")
  row("C -> Lua -> C round trip (Lua - built-in)", fmt(lua_ns - builtin_ns) .. " ns/decision")
  row("  of which the decide body, called from Lua", fmt(body_ns) .. " ns/call")
  row("  so the bridge itself (build a, pcall, read)", fmt(lua_ns - builtin_ns - body_ns) .. " ns/decision")
  io.stdout:write("  note: both core.decide rows also pay the harness: reading the Lua table into\n"
               .. "  an attempt (~12 lookups) and returning a 4-field result table; the Lua row\n"
               .. "  minus the built-in row cancels it.  The bridge builds `a` (~14 fields plus\n"
               .. "  a headers table), sets the instruction-limit hook, pcalls, validates the\n"
               .. "  returned table.  Real calls pay it only after a failed attempt.\n")
end

--- Part 2: calls/s ---------------------------------------------------------

local function get_stats(url)
  local client = resilua.client{ policy = here .. "/policies/load.lua" }
  local res = client:call{ url = url .. "/_stats" }
  return res and select(2, pcall(cjson.decode, res.body)) or nil
end

local function parse_wrk(text)
  local r = { rps = tonumber(text:match("Requests/sec:%s*([%d%.]+)")),
              requests = tonumber(text:match("(%d+) requests in")),
              non2xx = tonumber(text:match("Non%-2xx or 3xx responses:%s*(%d+)")),
              socket_errors = text:match("Socket errors:%s*([^\n]+)") }
  local function ms(v, unit)
    v = tonumber(v)
    if not v then return nil end
    return unit == "us" and v / 1000 or unit == "s" and v * 1000 or v
  end
  r.p50_ms = ms(text:match("\n%s*50%%%s+([%d%.]+)(%a+)"))
  r.p99_ms = ms(text:match("\n%s*99%%%s+([%d%.]+)(%a+)"))
  return r
end

local function part_load()
  local up = start_upstream("stub", nil)
  section(("2. throughput: closed loop, %d concurrent GETs, resilua serve (model stub) on "
           .. "127.0.0.1, %g s (+%g s warm-up)"):format(LOAD_CONC, LOAD_SECONDS, LOAD_WARMUP_S))
  local before = get_stats(up.url)
  local ok, r = pcall(run_child, "load", "load.lua",
                      { up.url .. "/predict", LOAD_SECONDS, LOAD_CONC, here .. "/policies/load.lua",
                        up.worker, LOAD_WARMUP_S }, 60)
  if not ok then
    proc.stop(up)
    error(r, 0)
  end
  local after = get_stats(up.url)
  row(("resilua run, %d coroutines (client:call)"):format(LOAD_CONC),
      fmt(r.calls_per_s) .. " calls/s",
      ("%d ok, %d errors in %.2f s"):format(r.ok_calls, r.errors, r.window_s))
  if r.errors > 0 then
    for why, count in pairs(r.outcomes) do row("  errors: " .. why, tostring(count)) end
  end
  row("  latency p50 / p99 / max", ("%s / %s / %s ms"):format(fmt(r.p50_ms, 2), fmt(r.p99_ms, 2),
                                                             fmt(r.max_ms, 1)))
  row("  CPU: client / upstream", ("%s%% / %s%%"):format(fmt(r.client_cpu * 100),
                                                        fmt(r.upstream_cpu and r.upstream_cpu * 100)),
      "of one core each")
  row("  client CPU per call", r.ok_calls > 0 and fmt(r.client_cpu * r.window_s / r.ok_calls * 1e6, 1)
      .. " us" or "n/a")
  if before and after then
    row("  upstream saw (/_stats requests)", ("%d"):format(after.requests - before.requests),
        ("calls made, warm-up included: %d"):format(r.calls_total))
    -- A client that keeps its connections opens LOAD_CONC of them.
    local opened = after.connections - before.connections
    row("  connections opened by the client", ("%d"):format(opened),
        opened > 2 * LOAD_CONC and ("expected ~%d: connections are being churned"):format(LOAD_CONC)
        or ("expected ~%d"):format(LOAD_CONC))
  end

  if proc.have("wrk") then
    local secs = math.max(1, math.floor(LOAD_SECONDS + 0.5))
    local cmd = proc.guarded({ "wrk", "-t1", "-c" .. LOAD_CONC, "-d" .. secs .. "s", "--latency",
                               up.url .. "/predict" }, 60)
    local out = session:tmp("wrk.out")
    os.execute(("%s >%s 2>&1 </dev/null"):format(cmd, proc.q(out)))
    local text = proc.read_file(out) or ""
    local w = parse_wrk(text)
    if w.rps then
      row(("wrk -t1 -c%d -d%ds, same upstream"):format(LOAD_CONC, secs), fmt(w.rps) .. " req/s",
          ("%s requests%s%s"):format(tostring(w.requests or "?"),
            w.non2xx and (", " .. w.non2xx .. " non-2xx") or "",
            w.socket_errors and (", socket errors: " .. w.socket_errors) or ""))
      row("  latency p50 / p99", ("%s / %s ms"):format(fmt(w.p50_ms, 2), fmt(w.p99_ms, 2)))
      row("resilua / wrk", fmt(r.calls_per_s / w.rps, 2) .. " x")
    else
      row("wrk", "no result", (text:gsub("\n", " "):sub(1, 60)))
    end
  else
    row("wrk (peer, same upstream)", "not installed", "Debian package wrk")
  end

  local code = proc.stop(up)
  if code ~= 0 then row("  upstream exit status after SIGTERM", tostring(code), "expected 0") end
end

--- Part 3: RSS with calls in flight -------------------------------------------

local function part_inflight()
  local up = start_upstream("delay", here .. "/upstream_delay.lua")
  local ok, r = pcall(run_child, "inflight", "inflight.lua",
                      { up.url, INFLIGHT_N, here .. "/policies/load.lua", INFLIGHT_SAMPLE_S }, 60)
  local code = proc.stop(up)
  if not ok then error(r, 0) end
  local function mib(kib) return kib and fmt(kib / 1024, 1) .. " MiB" or "n/a" end
  section(("3. memory: %d go'd calls in flight (upstream delays every answer 2000 ms), "
           .. "VmRSS at t=%g s"):format(INFLIGHT_N, INFLIGHT_SAMPLE_S))
  local hard = tonumber(r.nofile_hard)
  row("fd limit (soft / hard)", ("%s / %s"):format(r.nofile_soft, r.nofile_hard),
      (hard and hard < INFLIGHT_N + 100) and "hard limit below ~1,100: calls may fail for lack of fds"
      or nil)
  row("RSS before the calls", mib(r.rss_before_kib),
      ("Lua heap %.1f MiB, %d fds"):format(r.lua_before_kib / 1024, r.fds_before or -1))
  row(("RSS with %d calls in flight"):format(INFLIGHT_N - r.done_at_sample), mib(r.rss_inflight_kib),
      ("Lua heap %.1f MiB, %d fds"):format(r.lua_inflight_kib / 1024, r.fds_inflight or -1))
  row("  per call in flight", fmt((r.rss_inflight_kib - r.rss_before_kib) / INFLIGHT_N, 1) .. " KiB")
  row("  peak RSS (VmHWM, whole run)", mib(r.hwm_kib))
  local fails = {}
  for why, count in pairs(r.failures) do fails[#fails + 1] = why .. " x" .. count end
  row("calls succeeded", ("%d / %d"):format(r.ok, r.n),
      ("in %.2f s%s"):format(r.elapsed_s, #fails > 0 and ("; failed: " .. table.concat(fails, ", ")) or ""))
  if r.done_at_sample > 0 then
    row("  WARNING: calls already ended at the sample", tostring(r.done_at_sample))
  end
  if code ~= 0 then row("  upstream exit status after SIGTERM", tostring(code), "expected 0") end
end

--- Main -----------------------------------------------------------------------

local function cpus()
  local p = io.popen("nproc 2>/dev/null")
  local n = p:read("l")
  p:close()
  return n or "?"
end

local function main()
  resilua.log(false)
  local load = (proc.read_file("/proc/loadavg") or ""):match("^(%S+ %S+ %S+)") or "?"
  io.stdout:write(("resilua bench — `make bench` (%s run %s/run.lua)\n"
                   .. "resilua %s, %s CPUs, load average %s at start (figures are noisy on a busy machine)\n")
                  :format(bin, here, core.version, cpus(), load))
  io.stdout:flush()
  local t = core.now_ms()
  local failed = proc.run_parts({ part_decide, part_load, part_inflight })
  io.stdout:write(("\ntotal %.1f s\n"):format((core.now_ms() - t) / 1000))
  return failed
end

return session:run_main(main)
