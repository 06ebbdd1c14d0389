--- bench/inflight.lua — memory with N calls in flight: starts N go'd calls
-- against URL (an upstream that delays every answer, bench/upstream_delay.lua),
-- samples VmRSS SAMPLE_S seconds later while they wait, then waits for all
-- of them.  Prints one JSON line.
--
--   resilua run bench/inflight.lua URL N POLICY.lua [SAMPLE_S]
--
-- Run by bench/run.lua (`make bench`); usable alone.
local resilua = require "resilua"
local core = require "resilua.core"
local cjson = require "cjson"

local url, n, policy_file = arg[1], math.tointeger(tonumber(arg[2])), arg[3]
local sample_s = tonumber(arg[4] or "") or 1
if not (url and n and policy_file) then
  io.stderr:write("usage: resilua run bench/inflight.lua URL N POLICY.lua [SAMPLE_S]\n")
  return 2
end

local here = (arg[0] or "bench/inflight.lua"):match("^(.*)/[^/]*$") or "."
local read = dofile(here .. "/proc.lua").read_file

-- VmRSS and VmHWM in KiB.
local function mem()
  local s = read("/proc/self/status") or ""
  return tonumber(s:match("VmRSS:%s*(%d+)")), tonumber(s:match("VmHWM:%s*(%d+)"))
end

local pid = (read("/proc/self/stat") or ""):match("^(%d+)")
local function open_fds()
  local p = io.popen(("ls /proc/%s/fd 2>/dev/null | wc -l"):format(pid))
  if not p then return nil end -- out of descriptors
  local count = tonumber(p:read("l") or "")
  p:close()
  return count
end

-- The fd limit in force (the binary raised the soft limit to the hard one).
local soft, hard = (read("/proc/self/limits") or ""):match("Max open files%s+(%S+)%s+(%S+)")

resilua.log(false)
local client = resilua.client{ policy = policy_file }
collectgarbage("collect")
collectgarbage("collect")
local rss_before = mem()
local lua_kib_before = collectgarbage("count")
local fds_before = open_fds()

local done, ok, failures = 0, 0, {}
local sample = {}
local started = core.now_ms()
for i = 1, n do
  resilua.go(function()
    local res, err = client:call{ method = "GET", url = url .. "/item/" .. i }
    done = done + 1
    if res and res.status == 200 then
      ok = ok + 1
    else
      local why = err and (err.outcome .. ":" .. tostring(err.status or err.error)) or "?"
      failures[why] = (failures[why] or 0) + 1
    end
  end)
end
local start_ms = core.now_ms() - started
resilua.go(function()
  resilua.sleep(sample_s)
  sample.rss, sample.hwm = mem()
  sample.done = done
  sample.fds = open_fds()
  sample.lua_kib = collectgarbage("count")
end)

local wok, errs = resilua.wait()
if not wok then
  io.stderr:write(table.concat(errs, "\n"), "\n")
  return 1
end
local _, hwm_end = mem()
io.stdout:write(cjson.encode{
  n = n, ok = ok, failures = failures, elapsed_s = (core.now_ms() - started) / 1000,
  start_ms = start_ms,
  rss_before_kib = rss_before, rss_inflight_kib = sample.rss, hwm_kib = hwm_end,
  lua_before_kib = lua_kib_before, lua_inflight_kib = sample.lua_kib,
  done_at_sample = sample.done, fds_before = fds_before, fds_inflight = sample.fds,
  nofile_soft = soft, nofile_hard = hard, sample_s = sample_s,
}, "\n")
return 0
