--- bench/proxy.lua — `make bench`, the proxy (issue 9): figures, not a test.
--
--   1. Overhead: `resilua load --rate 1000` (open loop) against the upstream
--      directly and through `resilua proxy`, ROUNDS times in turn; the p50
--      and p99 the proxy adds (goals: p50 <= 100 us, p99 <= 1 ms).
--   2. Throughput: `wrk -t1 -c64` through resilua proxy, through nginx
--      proxy_pass (upstream keepalive) and through HAProxy (retry-on), the
--      same upstream (nginx `return 200`), in turn; medians and ratios
--      (goal: resilua >= 0.7 x nginx).
--   3. Memory: the proxy's RSS idle, with 5,000 idle client connections,
--      and with 1,000 streamed responses in flight (a Python asyncio
--      upstream that sends one chunk and holds the stream open).
--
--   build/bin/resilua run bench/proxy.lua [--quick]
local resilua = require "resilua"
local core = require "resilua.core"
local cjson = require "cjson"

local RATE, OPEN_S, ROUNDS = 1000, 5, 3
local CONC, CLOSED_S = 64, 5
local IDLE_CONNS, STREAMS = 5000, 1000
local SAFETY_S = 120

if arg and arg[1] == "--quick" then
  OPEN_S, ROUNDS, CLOSED_S, IDLE_CONNS, STREAMS = 1, 1, 1, 500, 100
end

local bin = core.self_path() or "build/bin/resilua"
local here = (arg and arg[0] or "bench/proxy.lua"):match("^(.*)/[^/]*$") or "."
local proc = dofile(here .. "/proc.lua")
local report = dofile(here .. "/report.lua")
local row, fmt = report.row_printer(48, 22), report.fmt
local session = proc.session("resilua-proxy-bench", SAFETY_S)

local median = report.median

local function free_port()
  return 20000 + (os.time() * 13 + math.random(0, 29999)) % 40000
end

--- Waits until url answers 200 (5 s).
local probe
local function wait_ok(url)
  probe = probe or resilua.client{ policy = here .. "/policies/load.lua" }
  local deadline = core.now_ms() + 5000
  repeat
    local res = probe:call{ url = url }
    if res and res.status == 200 then return true end
    resilua.sleep(0.05)
  until core.now_ms() > deadline
  return false
end

local function rss_kb(pid)
  local s = proc.read_file(("/proc/%d/status"):format(pid)) or ""
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

--- Processes ------------------------------------------------------------------

local NGINX = [[
worker_processes 1;
daemon off;
pid %s/nginx-%d.pid;
error_log %s/nginx-%d-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %s/body; proxy_temp_path %s/proxy;
  fastcgi_temp_path %s/fastcgi; uwsgi_temp_path %s/uwsgi; scgi_temp_path %s/scgi;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:%d; keepalive 128; }
  server {
    listen 127.0.0.1:%d backlog=4096;
    location / { %s }
  }
}
]]

local function nginx_bin()
  for _, p in ipairs({ "nginx", "/usr/sbin/nginx" }) do if proc.have(p) then return p end end
end

--- nginx answering `body` (an nginx location body) on a free port.
local function start_nginx(name, body, upstream_port)
  local nginx = nginx_bin()
  if not nginx then return nil, "nginx not installed" end
  local d = session.dir
  for attempt = 1, 5 do
    local port = free_port() + attempt
    local conf = session:tmp(name .. ".conf")
    proc.write_file(conf, NGINX:format(d, port, d, port, d, d, d, d, d, upstream_port or port, port, body))
    local p = session:spawn(name .. attempt, { nginx, "-p", d, "-c", conf, "-e",
                                               session:tmp(name .. "-error.log") }, SAFETY_S)
    local url = ("http://127.0.0.1:%d/"):format(port)
    if wait_ok(url) then
      p.url, p.port = url, port
      return p
    end
    proc.stop(p)
  end
  return nil, name .. " did not start"
end

local HAPROXY = [[
global
  maxconn 8192
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  retries 3
  retry-on conn-failure empty-response response-timeout 503
  option http-keep-alive
frontend fe
  bind 127.0.0.1:%d
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:%d
]]

local function start_haproxy(upstream_port)
  if not proc.have("haproxy") then return nil, "haproxy not installed" end
  for attempt = 1, 5 do
    local port = free_port() + 100 + attempt
    local conf = session:tmp("haproxy.cfg")
    proc.write_file(conf, HAPROXY:format(port, upstream_port))
    local p = session:spawn("haproxy" .. attempt, { "haproxy", "-db", "-f", conf }, SAFETY_S)
    local url = ("http://127.0.0.1:%d/"):format(port)
    if wait_ok(url) then
      p.url = url
      return p
    end
    proc.stop(p)
  end
  return nil, "haproxy did not start"
end

local function start_proxy(name, upstream, extra_limits)
  local cfg = session:tmp(name .. ".lua")
  proc.write_file(cfg, ([[return { listen = "127.0.0.1:0",
    limits = { max_connections = 20000, max_in_flight = 5000 %s },
    routes = { { upstream = %q, policy = %q } } }]])
    :format(extra_limits or "", upstream, here .. "/policies/load.lua"))
  local p = session:spawn(name, { bin, "proxy", "--quiet", "--config", cfg }, SAFETY_S)
  local hostport = proc.listening(p)
  if not hostport then error("resilua proxy did not start: " .. (proc.read_file(p.err) or "")) end
  p.url = "http://" .. hostport .. "/"
  p.port = tonumber(hostport:match(":(%d+)$"))
  return p
end

--- Part 1: overhead -------------------------------------------------------------

local function load_open(url)
  local out, ok = session:run("load", { bin, "load", "--rate", RATE, "--duration", OPEN_S .. "s",
                                        "--policy", here .. "/policies/load.lua", "--quiet",
                                        "--json", url }, OPEN_S + 30)
  local r = ok and select(2, pcall(cjson.decode, out))
  if type(r) ~= "table" then return nil end
  return r.latency_ms.p50, r.latency_ms.p99, r.success_rate
end

local function part_overhead(up, px)
  io.stdout:write(("\n1. Overhead: resilua load --rate %d for %d s, direct and through "
                   .. "resilua proxy, %d rounds in turn\n   upstream: %s\n")
                  :format(RATE, OPEN_S, ROUNDS, up.label))
  local d50, d99, p50, p99 = {}, {}, {}, {}
  for _ = 1, ROUNDS do
    local a, b = load_open(up.url)
    if a then d50[#d50 + 1], d99[#d99 + 1] = a, b end
    a, b = load_open(px.url)
    if a then p50[#p50 + 1], p99[#p99 + 1] = a, b end
  end
  if #d50 == 0 or #p50 == 0 then row("overhead", "no result") return end
  local add50 = (median(p50) - median(d50)) * 1000
  local add99 = (median(p99) - median(d99)) * 1000
  row("direct p50 / p99", ("%.3f / %.3f ms"):format(median(d50), median(d99)))
  row("through resilua proxy p50 / p99", ("%.3f / %.3f ms"):format(median(p50), median(p99)))
  row("added by the proxy: p50", ("%.0f us"):format(add50), add50 <= 100 and "meets the goal (<= 100 us)"
                                                              or "ABOVE the goal (100 us)")
  row("added by the proxy: p99", ("%.0f us"):format(add99), add99 <= 1000 and "meets the goal (<= 1 ms)"
                                                              or "ABOVE the goal (1 ms)")
end

--- Part 2: throughput -----------------------------------------------------------

local function wrk(url)
  local out = session:run("wrk", { "wrk", "-t1", "-c" .. CONC, "-d" .. CLOSED_S .. "s", url },
                          CLOSED_S + 30)
  return tonumber(out:match("Requests/sec:%s*([%d%.]+)")), out:match("Non%-2xx or 3xx responses:%s*(%d+)")
end

local function part_throughput(up, px)
  io.stdout:write(("\n2. Throughput: wrk -t1 -c%d for %d s through each proxy, %d rounds in turn\n")
                  :format(CONC, CLOSED_S, ROUNDS))
  if not proc.have("wrk") then row("wrk", "not installed") return end
  local peers = { { name = "resilua proxy", url = px.url } }
  local ng, why = start_nginx("nginx-proxy", "proxy_pass http://up; proxy_http_version 1.1; "
                              .. "proxy_set_header Connection \"\";", up.port)
  peers[#peers + 1] = { name = "nginx proxy_pass (keepalive)", url = ng and ng.url, why = why }
  local ha
  ha, why = start_haproxy(up.port)
  peers[#peers + 1] = { name = "haproxy (retry-on)", url = ha and ha.url, why = why }
  for _, p in ipairs(peers) do p.rps = {} end
  for _ = 1, ROUNDS do
    for _, p in ipairs(peers) do
      if p.url then
        local rps, non2xx = wrk(p.url)
        if rps then p.rps[#p.rps + 1] = rps end
        if non2xx then p.note = "non-2xx " .. non2xx end
      end
    end
  end
  for _, p in ipairs(peers) do
    if not p.url then row(p.name, "not run", p.why)
    else row(p.name, fmt(median(p.rps) or 0) .. " req/s", p.note) end
  end
  local mine = median(peers[1].rps)
  for i = 2, #peers do
    local theirs = median(peers[i].rps)
    if mine and theirs then
      local ratio = mine / theirs
      row("resilua / " .. peers[i].name, ("%.2f x"):format(ratio),
          i == 2 and (ratio >= 0.7 and "meets the goal (>= 0.7)" or "BELOW the goal (0.7)") or nil)
    end
  end
end

--- Part 3: memory ---------------------------------------------------------------

-- Opens N connections to HOST:PORT and holds them; with a path, sends a GET
-- on each and reads its first chunk.  Prints "ready" when all are there.
local HOLDER = [[
import asyncio, sys
host, port, n, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
async def one(sem):
    async with sem:
        r, w = await asyncio.open_connection(host, port)
        if path != "-":
            w.write(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path).encode())
            await w.drain()
            await r.readuntil(b"data: 0")
    return r, w
async def main():
    sem = asyncio.Semaphore(200)
    held = await asyncio.gather(*[one(sem) for _ in range(n)])
    print("ready", len(held), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
]]

-- Sends a head and one SSE chunk, then holds the stream.
local STREAMER = [[
import asyncio
async def handle(r, w):
    await r.readuntil(b"\r\n\r\n")
    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: 0\n\n\r\n")
    await w.drain()
    await asyncio.sleep(3600)
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    print("listening on 127.0.0.1:%d" % s.sockets[0].getsockname()[1], flush=True)
    await s.serve_forever()
asyncio.run(main())
]]

local function hold(name, port, n, path)
  local script = session:tmp(name .. ".py")
  proc.write_file(script, HOLDER)
  local p = session:spawn(name, { "python3", script, "127.0.0.1", port, n, path }, SAFETY_S)
  local deadline = core.now_ms() + 60000
  repeat
    if (proc.read_file(p.out) or ""):find("ready") then return p end
    resilua.sleep(0.1)
  until proc.exit_status(p) or core.now_ms() > deadline
  return nil, (proc.read_file(p.err) or ""):sub(-200)
end

local function part_memory(up)
  io.stdout:write("\n3. Memory: the proxy's RSS\n")
  local script = session:tmp("streamer.py")
  proc.write_file(script, STREAMER)
  local st = session:spawn("streamer", { "python3", script }, SAFETY_S)
  local hostport = proc.listening(st)
  if not hostport then row("streaming upstream", "did not start") return end
  local px = start_proxy("proxy-mem", "http://" .. hostport)
  local base = rss_kb(proc.worker_pid(px))
  row("idle", fmt(base) .. " kB")
  local h, why = hold("idle-conns", px.port, IDLE_CONNS, "-")
  if h then
    local kb = rss_kb(proc.worker_pid(px))
    row(("%d idle client connections"):format(IDLE_CONNS), fmt(kb) .. " kB",
        ("%.1f kB per connection"):format((kb - base) / IDLE_CONNS))
    proc.stop(h)
  else
    row("idle client connections", "not measured", why)
  end
  resilua.sleep(0.5)
  local before = rss_kb(proc.worker_pid(px))
  h, why = hold("streams", px.port, STREAMS, "/stream")
  if h then
    local kb = rss_kb(proc.worker_pid(px))
    row(("%d streamed responses in flight"):format(STREAMS), fmt(kb) .. " kB",
        ("%.1f kB per stream"):format((kb - before) / STREAMS))
    proc.stop(h)
  else
    row("streams in flight", "not measured", why)
  end
  proc.stop(px)
  proc.stop(st)
end

session:run_main(function()
  core.log(false) -- the readiness probes' events
  io.stdout:write("resilua proxy bench\n")
  local up, why = start_nginx("nginx-up", "return 200 \"ok\";")
  if not up then error("the upstream (nginx) did not start: " .. tostring(why)) end
  up.label = "nginx return 200 at " .. up.url
  local px = start_proxy("proxy", up.url)
  proc.run_parts({ part_overhead, part_throughput }, up, px)
  proc.stop(px)
  proc.run_parts({ part_memory }, up)
end)
