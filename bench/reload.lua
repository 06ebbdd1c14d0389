--- bench/reload.lua — `make bench`: what a hot reload costs (issue 3, "Measure").
--
--   1. reload latency: from the rename of an edited policy file (saved the
--      way editors do) to the end of the first call decided under the new
--      version, over RELOAD_EDITS edits; median and max;
--   2. throughput of a closed-loop load (LOAD_CONC coroutines, as fast as
--      they go) against `resilua serve`, without reloads and during RELOADS
--      reloads, printed as a ratio.  The two alternate in ROUNDS rounds of
--      WINDOW_S each (RELOADS / ROUNDS reloads per window), so that drift
--      in the machine's load falls on both sides alike.
--
-- Every call is decided: the upstream answers 503 to the first request of
-- each Idempotency-Key and 200 to the retry, and the policy's Lua `decide`
-- says retry at once.  One process does it all (`resilua run`), so the
-- reloads (inotify, compile, validate, swap) share the loop with the load.
local resilua = require "resilua"
local core = require "resilua.core"

local RELOAD_EDITS = 20
local LOAD_CONC = 32
local ROUNDS = 5
local WINDOW_S = 1
local RELOADS = 100
local SAFETY_S = 120 -- the upstream lives no longer than this (timeout(1))

local bin = core.self_path() or "build/bin/resilua"
local here = (arg and arg[0] or "bench/reload.lua"):match("^(.*)/[^/]*$") or "."
local proc = dofile(here .. "/proc.lua")
local session = proc.session("resilua-bench-reload", SAFETY_S)

proc.write_file(session:tmp("up.lua"), [[
local seen = {}
return function(req)
  local key = req.headers["idempotency-key"]
  if not seen[key] then seen[key] = true return { status = 503 } end
  seen[key] = nil
  return { status = 200, body = "ok" }
end]])

-- The upstream: `sh` prints its pid, then execs serve (under timeout(1)).
local server = io.popen("sh -c " .. proc.q("echo $$; exec " .. proc.guarded(
  { bin, "serve", "--listen", "127.0.0.1:0", session:tmp("up.lua") }, SAFETY_S)))
local server_pid = tonumber(server:read("l"))
local url = "http://127.0.0.1:" .. assert(server:read("l"):match(":(%d+)"), "serve did not start")
  .. "/predict"

local policy_file = session:tmp("live.lua")
local function version_src(n)
  return ("return { name = 'live', breaker = false, budget = false,\n"
          .. "  decide = function(a) return { retry = true, delay_ms = 0, reason = 'v%d' } end }\n"):format(n)
end
local edits = 0
local function save()
  edits = edits + 1
  proc.write_file(policy_file .. ".tmp", version_src(edits))
  assert(os.rename(policy_file .. ".tmp", policy_file))
end

save()
resilua.log(false)
local client = resilua.client{ policy = policy_file }
local function call()
  local res, err = client:call{ method = "POST", url = url, body = "{}" }
  if not res then error("call failed: " .. tostring(err.message)) end
end

-- 1. Reload latency, one call at a time.
local latencies = {}
for _ = 1, RELOAD_EDITS do
  local old = client:policy().version
  save()
  local t0 = core.now_ms()
  while true do
    local started_under = client:policy().version
    call()
    if started_under ~= old then break end
  end
  latencies[#latencies + 1] = core.now_ms() - t0
  resilua.sleep(0.02)
end
table.sort(latencies)
local median = (latencies[RELOAD_EDITS // 2] + latencies[RELOAD_EDITS // 2 + 1]) / 2

-- 2. Closed-loop throughput, without and with reloads.
local function load(reloads)
  local stop_at = core.now_ms() + WINDOW_S * 1000
  local n = 0
  for _ = 1, LOAD_CONC do
    resilua.go(function()
      while core.now_ms() < stop_at do
        call()
        n = n + 1
      end
    end)
  end
  if reloads > 0 then
    resilua.go(function()
      for _ = 1, reloads do
        save()
        resilua.sleep(WINDOW_S / reloads)
      end
    end)
  end
  assert(resilua.wait())
  return n
end
load(0) -- warm-up: connections, the server's tables
local before_edits = edits
local plain, with = 0, 0
for _ = 1, ROUNDS do
  plain = plain + load(0)
  with = with + load(RELOADS // ROUNDS)
end
plain, with = plain / (ROUNDS * WINDOW_S), with / (ROUNDS * WINDOW_S)
resilua.sleep(0.1) -- the last save's reload
local reloaded = edits - before_edits == RELOADS
  and client:policy().version == assert(resilua.policy.load(policy_file)).version

os.execute(("kill -TERM %d 2>/dev/null"):format(server_pid))
server:close()
session:close()

print(("reload latency (file rename -> first call decided under the new version, %d edits): "
       .. "median %.1f ms, max %.1f ms"):format(RELOAD_EDITS, median, latencies[RELOAD_EDITS]))
print(("closed-loop load, %d coroutines, %d s each way: %.0f calls/s without reloads, "
       .. "%.0f calls/s during %d reloads: ratio %.3f%s")
  :format(LOAD_CONC, ROUNDS * WINDOW_S, plain, with, RELOADS, with / plain,
          reloaded and "" or " (the reloads did not apply!)"))
