--- bench/grpc.lua — `make bench`: unary gRPC calls over HTTP/2 (issue 10).
-- Figures, not a test: it never fails on slowness.
--
--   1. Calls/s for D seconds against one `resilua serve` (the model stub;
--      it answers gRPC over h2c and HTTP/1.1 on the same port), in turn,
--      REPEATS times (so that a noisy neighbour hits all three):
--        resilua load --grpc, 64 streams on one HTTP/2 connection;
--        resilua load, HTTP/1.1 POSTs on 64 connections;
--        a Python grpcio asyncio client loop, 64 calls at a time on one
--        channel (bench/grpc_client.py; its transport is grpc-core, in C).
--      Medians and the ratios gRPC/HTTP/1.1 and resilua/grpcio.
--   2. RSS per 1,000 gRPC calls in flight (bench/grpc_inflight.lua: N calls
--      against an upstream that answers after 2 s).
--
--   build/bin/resilua run bench/grpc.lua [--quick]
local core = require "resilua.core"
local cjson = require "cjson"

local CONC, DURATION_S, REPEATS, INFLIGHT = 64, 5, 3, { 1000, 4000 }
if arg and arg[1] == "--quick" then DURATION_S, REPEATS, INFLIGHT = 1, 1, { 1000 } end
local SAFETY_S = 120

local bin = core.self_path() or "build/bin/resilua"
local here = (arg and arg[0] or "bench/grpc.lua"):match("^(.*)/[^/]*$") or "."
local proc = dofile(here .. "/proc.lua")
local report = dofile(here .. "/report.lua")
local row, fmt = report.row_printer(44, 22), report.fmt
local session = proc.session("resilua-grpc", SAFETY_S)
local policy = here .. "/policies/load.lua"

local function python()
  for _, py in ipairs({ "/usr/bin/python3", "python3" }) do
    if proc.sh_ok(py .. " -c 'import grpc.aio' >/dev/null 2>&1") then return py end
  end
end

local function serve(name, script)
  local p = session:spawn(name, { bin, "serve", "--listen", "127.0.0.1:0", script }, 600)
  local hostport = proc.listening(p)
  if not hostport then error("resilua serve did not start: " .. (proc.read_file(p.err) or "")) end
  return p, hostport
end

local function median(t)
  table.sort(t)
  return #t > 0 and t[(#t + 1) // 2] or nil
end

local function load_rate(name, extra, url)
  local argv = { bin, "load", "--concurrency", tostring(CONC), "--duration", DURATION_S .. "s",
                 "--policy", policy, "--json", "--quiet", "-d", "\n\5hello" }
  for _, a in ipairs(extra) do argv[#argv + 1] = a end
  argv[#argv + 1] = url
  local out, ok, err = session:run(name, argv, DURATION_S + 60)
  local r = ok and cjson.decode(out)
  if not r then error(name .. " failed: " .. err) end
  return r.outcomes.ok / r.elapsed_s, r
end

local function throughput()
  local p, hostport = serve("serve", nil)
  local url = "http://" .. hostport
  local py = python()
  local rates = { grpc = {}, h1 = {}, py = {} }
  for i = 1, REPEATS do
    rates.grpc[i] = load_rate("grpc" .. i, { "--grpc", "bench.Model/Predict" }, url)
    rates.h1[i] = load_rate("h1-" .. i, {}, url .. "/v1/predict")
    if py then
      local out, ok, err = session:run("py" .. i, { py, here .. "/grpc_client.py", hostport,
                                                    "/bench.Model/Predict", tostring(CONC),
                                                    tostring(DURATION_S) }, DURATION_S + 60)
      local r = ok and cjson.decode(out)
      if not r then error("grpc_client.py failed: " .. err) end
      rates.py[i] = r.calls_per_s
    end
  end
  proc.stop(p)
  local g, h, y = median(rates.grpc), median(rates.h1), median(rates.py)
  print(("gRPC and HTTP/2: calls/s, %d in flight, %d s, median of %d (resilua serve, model stub)")
    :format(CONC, DURATION_S, REPEATS))
  row("resilua load --grpc (64 streams, 1 conn)", fmt(g) .. " calls/s")
  row("resilua load, HTTP/1.1 (64 connections)", fmt(h) .. " calls/s")
  if y then row("grpcio asyncio client (64, 1 channel)", fmt(y) .. " calls/s")
  else row("grpcio asyncio client", "not installed", "Debian package python3-grpcio") end
  row("ratio gRPC / HTTP/1.1", fmt(g / h, 2))
  if y then row("ratio resilua gRPC / grpcio", fmt(g / y, 2)) end
end

local function memory()
  local p, hostport = serve("delay", here .. "/upstream_delay.lua")
  print("gRPC calls in flight on HTTP/2: client RSS")
  for _, n in ipairs(INFLIGHT) do
    local out, ok, err = session:run("inflight" .. n, { bin, "run", here .. "/grpc_inflight.lua",
                                                       "http://" .. hostport, tostring(n), policy }, 60)
    local r = ok and cjson.decode(out)
    if not r then error("grpc_inflight.lua failed: " .. err) end
    row(("%d calls in flight (%d ok)"):format(n, r.ok),
        fmt(r.kib_per_1000) .. " KiB per 1,000",
        ("RSS %s -> %s KiB"):format(fmt(r.rss_before_kib), fmt(r.rss_during_kib)))
  end
  proc.stop(p)
end

return session:run_main(function() return proc.run_parts({ throughput, memory }) end)
