--- bench/load.lua — closed-loop load: CONC coroutines, each making one
-- client:call after another against URL for WARMUP_S + SECONDS; only the
-- calls that end inside the measured window count.  Prints one JSON line.
--
--   resilua run bench/load.lua URL SECONDS CONC POLICY.lua [UPSTREAM_PID] [WARMUP_S]
--
-- Run by bench/run.lua (`make bench`); usable alone.
local resilua = require "resilua"
local core = require "resilua.core"
local cjson = require "cjson"

local url, seconds, conc, policy_file = arg[1], tonumber(arg[2]), math.tointeger(tonumber(arg[3])), arg[4]
local upstream_pid = tonumber(arg[5] or "")
local warmup_s = tonumber(arg[6] or "") or 0.5
if not (url and seconds and conc and policy_file) then
  io.stderr:write("usage: resilua run bench/load.lua URL SECONDS CONC POLICY.lua [UPSTREAM_PID] [WARMUP_S]\n")
  return 2
end

resilua.log(false)
local client = resilua.client{ policy = policy_file }

-- CPU seconds of a process (utime + stime) from /proc/PID/stat.
local CLK_TCK = 100
do
  local p = io.popen("getconf CLK_TCK 2>/dev/null")
  CLK_TCK = tonumber(p:read("l") or "") or 100
  p:close()
end
local function proc_cpu_s(pid)
  local f = io.open(("/proc/%s/stat"):format(pid), "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  -- Fields after the ")" of the command name: state is field 3, utime 14, stime 15.
  local rest = s:match("%)%s+(.*)$")
  if not rest then return nil end
  local fields = {}
  for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
  return (tonumber(fields[12]) + tonumber(fields[13])) / CLK_TCK
end

local now = core.now_ms
local start = now()
local t0 = start + warmup_s * 1000   -- window start
local t1 = t0 + seconds * 1000       -- window end: no new call after it
local lat = {}                       -- latencies (ms) of the calls counted
local counted, errors, outcomes = 0, 0, {}
local total = 0                      -- every call made, warm-up included
local cpu0, up_cpu0, cpu1, up_cpu1, w0, w1

-- Samples the CPU clocks when the window opens and closes.
resilua.go(function()
  resilua.sleep(math.max(0, (t0 - now()) / 1000))
  w0, cpu0, up_cpu0 = now(), os.clock(), upstream_pid and proc_cpu_s(upstream_pid)
  resilua.sleep(math.max(0, (t1 - now()) / 1000))
  w1, cpu1, up_cpu1 = now(), os.clock(), upstream_pid and proc_cpu_s(upstream_pid)
end)

local req = { method = "GET", url = url }
for _ = 1, conc do
  resilua.go(function()
    while true do
      local began = now()
      if began >= t1 then break end
      local res, err = client:call(req)
      local ended = now()
      total = total + 1
      if ended >= t0 and ended < t1 then
        if res and res.status == 200 then
          counted = counted + 1
          lat[counted] = ended - began
        else
          errors = errors + 1
          local why = err and (err.outcome .. ":" .. tostring(err.status or err.error)) or
                      ("status " .. tostring(res.status))
          outcomes[why] = (outcomes[why] or 0) + 1
        end
      end
    end
  end)
end

local ok, errs = resilua.wait()
if not ok then
  io.stderr:write(table.concat(errs, "\n"), "\n")
  return 1
end

table.sort(lat)
local function pct(p)
  if #lat == 0 then return nil end
  return lat[math.max(1, math.ceil(#lat * p))]
end
local window_s = (w1 - w0) / 1000
io.stdout:write(cjson.encode{
  ok_calls = counted, errors = errors, outcomes = outcomes, calls_total = total,
  window_s = window_s, calls_per_s = counted / window_s,
  p50_ms = pct(0.50), p99_ms = pct(0.99), max_ms = lat[#lat],
  client_cpu = (cpu1 - cpu0) / window_s,
  upstream_cpu = up_cpu0 and up_cpu1 and (up_cpu1 - up_cpu0) / window_s or nil,
}, "\n")
return 0
