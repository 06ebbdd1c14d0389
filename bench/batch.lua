--- bench/batch.lua — `make bench`, part 4: items/s of `resilua batch` against
-- `resilua load`'s stand-in (bench/load.lua: 64 coroutines, closed loop) at
-- the same concurrency on the same upstream (the model stub), and the cost
-- of the ledger (with vs --no-ledger).  Then scale: peak RSS and items/s of
-- BENCH_BATCH_ITEMS (default 1,000,000) tiny items sent, and peak RSS of a
-- rerun that finds as many string ids done in its ledger (the dedup set
-- at its largest; the target is < 200 MB).  Prints figures; never fails on
-- slowness.  Runs inside the binary: `build/bin/resilua run bench/batch.lua`.
local core = require "resilua.core"
local cjson = require "cjson"

local ITEMS, CONC, LOAD_SECONDS = 20000, 64, 3
local SCALE_ITEMS = math.tointeger(tonumber(os.getenv("BENCH_BATCH_ITEMS") or "")) or 1000000
local here = (arg and arg[0] or "bench/batch.lua"):match("^(.*)/[^/]*$") or "."
local bin = core.self_path() or "build/bin/resilua"
local proc = dofile(here .. "/proc.lua")
local session = proc.session("resilua-bench", 900)
local tmp = session.dir

local function sh(cmd)
  local p = io.popen(cmd)
  local out = p:read("a")
  p:close()
  return out
end

local ok, err = pcall(function()
  local addr = proc.listening(session:spawn("serve", { bin, "serve", "--listen", "127.0.0.1:0" }))
  assert(addr, "the upstream did not start")
  local url = "http://" .. addr .. "/predict"

  local items = assert(io.open(tmp .. "/items.jsonl", "wb"))
  for i = 1, ITEMS do items:write(('{"id": %d, "text": "item %d"}\n'):format(i, i)) end
  items:close()

  local function batch(extra, tag)
    local report = ("%s/report-%s.json"):format(tmp, tag)
    sh(("%s batch --quiet --in %s/items.jsonl --out %s/out-%s.jsonl --report %s --concurrency %d "
        .. "--policy %s/policies/load.lua %s %s 2>&1"):format(bin, tmp, tmp, tag, report, CONC, here, extra, url))
    local f = assert(io.open(report))
    local r = cjson.decode(f:read("a"))
    f:close()
    return r.items_per_s, r.succeeded
  end
  -- Each run sends new ids (a fresh output, a fresh ledger); the upstream
  -- replays keys it has seen, so each run gets its own id range.
  local without, ok1 = batch("--no-ledger", "noledger")
  os.execute(("sed -i 's/\"id\": /\"id\": 1000000/' %s/items.jsonl"):format(tmp))
  local with, ok2 = batch("--ledger " .. tmp .. "/ledger.jsonl", "ledger")
  local load = cjson.decode(sh(("%s run %s/load.lua %s %d %d %s/policies/load.lua"):format(
    bin, here, url, LOAD_SECONDS, CONC, here)):match("{.*}"))

  print(("4. batch: %d items (POST JSON, Idempotency-Key per id), concurrency %d, model stub"):format(ITEMS, CONC))
  print(("  resilua batch --no-ledger            %9.0f items/s   %d ok"):format(without, ok1))
  print(("  resilua batch (ledger, fsync/100)    %9.0f items/s   %d ok"):format(with, ok2))
  print(("  ledger cost (with / without)         %9.2f x"):format(with / without))
  print(("  closed-loop load, same concurrency   %9.0f calls/s  (bench/load.lua, GET)"):format(load.calls_per_s))
  print(("  batch / load                         %9.2f x"):format(with / load.calls_per_s))

  -- Scale.  Peak RSS from /usr/bin/time (%M, KiB) when it is there.
  local has_time = os.execute("test -x /usr/bin/time")
  local function measured(cmd)
    local out = sh(("%s%s 2>&1"):format(has_time and "/usr/bin/time -f 'peak_kib %M' " or "", cmd))
    return tonumber(out:match("peak_kib (%d+)"))
  end
  local function mib(kib) return kib and ("%9.1f MB"):format(kib / 1024) or "        ? MB" end
  items = assert(io.open(tmp .. "/scale.jsonl", "wb"))
  for i = 1, SCALE_ITEMS do items:write(('{"id":%d}\n'):format(50000000 + i)) end
  items:close()
  local report = tmp .. "/report-scale.json"
  local peak = measured(("%s batch --quiet --in %s/scale.jsonl --out %s/out-scale.jsonl --report %s "
    .. "--concurrency %d --policy %s/policies/load.lua %s"):format(bin, tmp, tmp, report, CONC, here, url))
  local f = assert(io.open(report))
  local r = cjson.decode(f:read("a"))
  f:close()
  -- The rerun: every string id already in the ledger, nothing sent.
  local sitems = assert(io.open(tmp .. "/scale-s.jsonl", "wb"))
  local ledger = assert(io.open(tmp .. "/scale-s.ledger", "wb"))
  for i = 1, SCALE_ITEMS do
    sitems:write(('{"id":"req-%010d","x":[1,2,3]}\n'):format(i))
    ledger:write(('{"id":"req-%010d","ok":true,"status":200,"outcome":"ok","attempts":1,'
      .. '"latency_ms":1.0,"response":{"prediction":0.5}}\n'):format(i))
  end
  sitems:close()
  ledger:close()
  local t0 = core.now_ms()
  local rpeak = measured(("%s batch --quiet --in %s/scale-s.jsonl --out %s/out-scale-s.jsonl "
    .. "--ledger %s/scale-s.ledger %s"):format(bin, tmp, tmp, tmp, url))
  local rerun_s = (core.now_ms() - t0) / 1000
  print(("5. batch at scale: %d tiny items, concurrency %d, model stub"):format(SCALE_ITEMS, CONC))
  print(("  sent (integer ids)                   %9.0f items/s   %d ok   peak RSS %s"):format(
    r.items_per_s, r.succeeded, mib(peak)))
  print(("  rerun, all done (string ids)         %9.0f items/s   %.1f s       peak RSS %s"):format(
    SCALE_ITEMS / rerun_s, rerun_s, mib(rpeak)))
end)
session:close()
if not ok then
  io.stderr:write("bench/batch.lua: ", tostring(err), "\n")
  return 1
end
