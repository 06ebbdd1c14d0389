--- bench/grpc_inflight.lua — memory with N unary gRPC calls in flight on
-- HTTP/2: starts N go'd calls against URL (`resilua serve` with
-- bench/upstream_delay.lua, which answers after 2 s), samples VmRSS while
-- they wait, then waits for all of them.  Prints one JSON line.
--
--   resilua run bench/grpc_inflight.lua URL N POLICY.lua
local resilua = require "resilua"
local cjson = require "cjson"

local url, n, policy_file = arg[1], math.tointeger(tonumber(arg[2])), arg[3]
if not (url and n and policy_file) then
  io.stderr:write("usage: resilua run bench/grpc_inflight.lua URL N POLICY.lua\n")
  return 2
end

local function rss_kib()
  local f = io.open("/proc/self/status")
  local s = f and f:read("a") or ""
  if f then f:close() end
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

resilua.log(false)
local client = resilua.client{ policy = policy_file }
assert(client:call{ url = url, grpc = "bench.Model/Warm", body = "x" }) -- the connection
collectgarbage("collect")
local before = rss_kib()
local ok, during = 0, nil
for i = 1, n do
  resilua.go(function()
    local res = client:call{ url = url, grpc = "bench.Model/Predict", body = "input " .. i }
    if res then ok = ok + 1 end
  end)
end
resilua.go(function()
  resilua.sleep(1)
  during = rss_kib()
end)
resilua.wait()
io.stdout:write(cjson.encode{ n = n, ok = ok, rss_before_kib = before, rss_during_kib = during,
                              kib_per_1000 = (during - before) * 1000 / n }, "\n")
