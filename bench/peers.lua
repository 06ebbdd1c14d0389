--- bench/peers.lua — `make bench`, parts 5 and 6: `resilua load` against its peers
-- (issue 4, item 9).  Figures, not a test: it never fails on slowness.
--
--   1. Closed loop: `resilua load --concurrency C --policy default`, `wrk -t1
--      -cC` and `hey -c C`, each for D seconds against the same upstream,
--      REPEATS times in turn (so that a noisy neighbour hits all three);
--      medians, ranges and the ratios resilua/wrk (target >= 0.8) and
--      resilua/hey (target >= 1.5).
--   2. Open loop: `resilua load --rate R` for R in RATES: the achieved rate's
--      error (target within 1 %) and the schedule lag's p99 (target < 1 ms).
--
-- The upstream is nginx on 127.0.0.1 (its `return 200 "ok"`, a config of
-- its own in a temporary directory, not daemonised) when nginx is
-- installed, else `resilua serve` (the model stub).  Everything it starts
-- runs under timeout(1) and is stopped on the way out, errors included.
--
--   build/bin/resilua run bench/peers.lua [--quick]
local resilua = require "resilua"
local core = require "resilua.core"
local cjson = require "cjson"

local CONC = 64
local DURATION_S = 5
local REPEATS = 3
local RATES = { 1000, 5000, 10000, 20000 }
local OPEN_S = 5
local TARGET_WRK, TARGET_HEY = 0.8, 1.5
local TARGET_RATE_ERR_PCT, TARGET_LAG_P99_MS = 1, 1
local SAFETY_S = 60 -- no child lives longer than this

if arg and arg[1] == "--quick" then -- a smoke run of the script itself
  DURATION_S, REPEATS, OPEN_S, RATES = 1, 1, 1, { 1000 }
end

local bin = core.self_path() or "build/bin/resilua"
local here = (arg and arg[0] or "bench/peers.lua"):match("^(.*)/[^/]*$") or "."
local proc = dofile(here .. "/proc.lua")
local session = proc.session("resilua-peers", SAFETY_S)

--- Upstream -----------------------------------------------------------------------

local probe -- a client with one attempt (bench/policies/load.lua)

local function answers(url)
  probe = probe or resilua.client{ policy = here .. "/policies/load.lua" }
  local res = probe:call{ url = url }
  return res ~= nil and res.status == 200
end

local NGINX_CONF = [[
worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
pid %s/nginx.pid;
error_log %s/nginx-error.log;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path %s/body;
  proxy_temp_path %s/proxy;
  fastcgi_temp_path %s/fastcgi;
  uwsgi_temp_path %s/uwsgi;
  scgi_temp_path %s/scgi;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:%d backlog=4096;
    location / { return 200 "ok"; }
  }
}
]]

local function nginx_bin()
  for _, path in ipairs({ "nginx", "/usr/sbin/nginx" }) do
    if proc.have(path) then return path end
  end
end

--- nginx on a free loopback port, or nil, why.
local function start_nginx()
  local nginx = nginx_bin()
  if not nginx then return nil, "nginx not installed" end
  local why
  for attempt = 1, 5 do
    local port = 20000 + (os.time() * 7 + attempt * 7919 + math.random(0, 9999)) % 40000
    local d = session.dir
    proc.write_file(session:tmp("nginx.conf"), NGINX_CONF:format(d, d, d, d, d, d, d, port))
    local p = session:spawn("nginx" .. attempt, { nginx, "-p", d, "-c", session:tmp("nginx.conf"),
                                                  "-e", session:tmp("nginx-error.log") }, 600)
    local url = ("http://127.0.0.1:%d/"):format(port)
    local deadline = core.now_ms() + 5000
    repeat
      if answers(url) then
        p.url = url
        local v = (select(3, session:run("nginx-v", { nginx, "-v" }, 10)) or ""):match("nginx/(%S+)")
        p.label = "nginx " .. (v or "?") .. " (return 200 \"ok\")"
        return p
      end
      resilua.sleep(0.05)
    until proc.exit_status(p) or core.now_ms() > deadline
    why = (proc.read_file(session:tmp("nginx-error.log")) or ""):match("[^\n]*$") or "did not answer"
    proc.stop(p)
  end
  return nil, "nginx did not start: " .. why
end

local function start_serve()
  local p = session:spawn("serve", { bin, "serve", "--listen", "127.0.0.1:0" }, 600)
  local hostport = proc.listening(p)
  if not hostport then error("resilua serve did not start: " .. (proc.read_file(p.err) or "")) end
  p.url = "http://" .. hostport .. "/"
  p.label = "resilua serve (model stub)"
  return p
end

--- Output --------------------------------------------------------------------------

local report = dofile(here .. "/report.lua")
local row, fmt = report.row_printer(44, 22), report.fmt

local median = report.median

local function range(t)
  if #t == 0 then return "n/a" end
  local lo, hi = math.huge, -math.huge
  for _, v in ipairs(t) do lo, hi = math.min(lo, v), math.max(hi, v) end
  return ("%.0f-%.0f"):format(lo, hi)
end

local function verdict(ok) return ok and "meets the target" or "BELOW the target" end

--- Part 1: closed loop -----------------------------------------------------------------

local PEERS = {
  { name = "resilua", label = ("resilua load --concurrency %d --policy default"):format(CONC),
    available = function() return true end,
    run = function(url)
      local out, ok, err = session:run("resilua-closed", { bin, "load", "--concurrency", CONC,
                                                   "--duration", DURATION_S .. "s",
                                                   "--policy", "default", "--quiet", "--json", url },
                               DURATION_S + 30)
      local r = ok and select(2, pcall(cjson.decode, out))
      if type(r) ~= "table" then return nil, (err ~= "" and err or out):sub(1, 120) end
      local note
      if r.success_rate < 1 then note = ("success %.2f %%"):format(100 * r.success_rate) end
      return r.achieved_rate * r.success_rate, note
    end },
  { name = "wrk", label = ("wrk -t1 -c%d"):format(CONC), package = "wrk",
    available = function() return proc.have("wrk") end,
    run = function(url)
      local out = session:run("wrk", { "wrk", "-t1", "-c" .. CONC, "-d" .. DURATION_S .. "s", url },
                      DURATION_S + 30)
      local rps = tonumber(out:match("Requests/sec:%s*([%d%.]+)"))
      local non2xx = out:match("Non%-2xx or 3xx responses:%s*(%d+)")
      return rps, non2xx and ("non-2xx " .. non2xx) or nil
    end },
  { name = "hey", label = ("hey -c %d"):format(CONC), package = "hey",
    available = function() return proc.have("hey") end,
    run = function(url)
      local out = session:run("hey", { "hey", "-c", CONC, "-z", DURATION_S .. "s", url }, DURATION_S + 30)
      return tonumber(out:match("Requests/sec:%s*([%d%.]+)"))
    end },
}

local function part_closed(up)
  io.stdout:write(("\n5. resilua load vs wrk and hey: closed loop, %d connections, %d s each, "
                   .. "%d rounds in turn\n   upstream: %s at %s\n")
                  :format(CONC, DURATION_S, REPEATS, up.label, up.url))
  local got = {}
  for _, peer in ipairs(PEERS) do got[peer.name] = { rps = {}, notes = {} } end
  for _ = 1, REPEATS do
    for _, peer in ipairs(PEERS) do
      if peer.available() then
        local rps, note = peer.run(up.url)
        local g = got[peer.name]
        if rps then g.rps[#g.rps + 1] = rps end
        if note then g.notes[#g.notes + 1] = note end
      end
    end
  end
  for _, peer in ipairs(PEERS) do
    local g = got[peer.name]
    if not peer.available() then
      row(peer.label, "not installed", "Debian package " .. peer.package)
    elseif #g.rps == 0 then
      row(peer.label, "no result", g.notes[1])
    else
      row(peer.label, fmt(median(g.rps)) .. " req/s",
          ("median; runs %s%s"):format(range(g.rps), g.notes[1] and ("; " .. g.notes[1]) or ""))
    end
  end
  local mine = median(got.resilua.rps)
  for _, t in ipairs({ { "wrk", TARGET_WRK }, { "hey", TARGET_HEY } }) do
    local theirs = median(got[t[1]].rps)
    if mine and theirs then
      local ratio = mine / theirs
      row(("resilua / %s"):format(t[1]), fmt(ratio, 2) .. " x",
          ("target >= %.1f x: %s"):format(t[2], verdict(ratio >= t[2])))
    end
  end
end

--- Part 2: open loop -------------------------------------------------------------------

local function part_open(up)
  io.stdout:write(("\n6. resilua load open loop (--rate R --duration %ds --policy default): "
                   .. "achieved rate and schedule lag\n   upstream: %s\n")
                  :format(OPEN_S, up.label))
  io.stdout:write(("  %10s %12s %9s %9s %9s %8s %8s   %s\n"):format("target/s", "achieved/s",
    "error %", "lag p50", "lag p99", "drops", "ok %", "targets: |error| <= 1 %, lag p99 < 1 ms"))
  for _, rate in ipairs(RATES) do
    local out, ok, err = session:run("resilua-open", { bin, "load", "--rate", rate, "--duration",
                                               OPEN_S .. "s", "--policy", "default", "--quiet",
                                               "--json", up.url }, OPEN_S + 60)
    local r = ok and select(2, pcall(cjson.decode, out))
    if type(r) ~= "table" then
      io.stdout:write(("  %10d %s\n"):format(rate, "no result: " .. (err ~= "" and err or out):sub(1, 100)))
    else
      local err_pct = 100 * (r.achieved_rate - rate) / rate
      local lag = r.schedule_lag_ms or {}
      local met = math.abs(err_pct) <= TARGET_RATE_ERR_PCT and (lag.p99 or math.huge) < TARGET_LAG_P99_MS
      io.stdout:write(("  %10d %12.1f %+9.2f %9.3f %9.3f %8d %8.2f   %s\n"):format(rate, r.achieved_rate,
        err_pct, lag.p50 or -1, lag.p99 or -1, r.drops, 100 * r.success_rate,
        met and "meets both" or "BELOW a target"))
    end
    io.stdout:flush()
  end
end

--- Main -----------------------------------------------------------------------------------

local function main()
  resilua.log(false)
  math.randomseed(os.time())
  local up, why = start_nginx()
  if not up then
    io.stdout:write(("\n(%s: the upstream is resilua serve instead)\n"):format(why))
    up = start_serve()
  end
  local load = (proc.read_file("/proc/loadavg") or ""):match("^(%S+ %S+ %S+)") or "?"
  io.stdout:write(("\nload average before parts 5 and 6: %s (figures are noisy on a busy machine)\n"):format(load))
  local failed = proc.run_parts({ part_closed, part_open }, up)
  proc.stop(up)
  return failed
end

return session:run_main(main)
