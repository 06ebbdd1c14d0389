-- `resilua batch` is byte-exact and honest (issue 12): bodies and stored
-- responses are the bytes given, ids are compared by their JSON text,
-- resends after kills are byte-identical (no 422 from a deduplicating
-- server), invalid is per item, outputs are checked (devices, symlinks, a
-- full disk), hand-edited ledgers are survived, a dead upstream stops the
-- run with exit 4, reruns retry what was transient, 3xx is not success.
local helpers = require "helpers"
local cjson = require "cjson"

local ECHO = [[
return function(req)
  if req.body:find('"nan"', 1, true) then return { status = 200, body = '{"score": NaN}' } end
  if req.body:find('"bin"', 1, true) then return { status = 200, body = "\255\0ab" } end
  if req.body:find('"redirect"', 1, true) then
    return { status = 302, headers = { Location = "/moved" }, body = "" }
  end
  return { status = 200, body = req.body }
end]]

local function batch(args)
  local argv = { helpers.bin, "batch", "--quiet" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return helpers.run(argv)
end

local function lines_of(text)
  local out = {}
  for l in (text or ""):gmatch("[^\n]+") do out[#out + 1] = l end
  return out
end

local function stats(server)
  return cjson.decode(helpers.curl(helpers.quote(server.url .. "/_stats")).body)
end

local function is_root()
  return helpers.run("id -u").stdout:match("^0") ~= nil
end

describe("resilua batch integrity", function()
  it("sends each line's own bytes and stores the upstream's bytes; ids by JSON text", function()
    local server = helpers.start_server(ECHO)
    local dir = helpers.tmpdir()
    local good = {
      '{"id":1,"features":[0.12345678901234567,123456789012345678],"user":9007199254740993}',
      '{"id":"1","text":"h\\u00e9llo ☃ 𝄞 é","x":-0.0}',
      '{"id":9007199254740993,"x":1}',
      '{"id":9007199254740992,"x":2}',
      '{"id":1234567890123456789,  "x":[1e300, 5e-324]}',
      '{"id":7,"kind":"nan"}',
      '{"id":"7","kind":"redirect"}',
      '{"id":70,"kind":"bin"}',
    }
    local bad = { '{"id":8,"x":NaN}', '{"id":9,"x":1e999}', '{"id":10,"x":"\255"}',
                  '{"id":11,"x":Infinity}', "[1,2]", '{"id":12,', '{"x":1}' }
    local input = helpers.write_file(dir .. "/in.jsonl",
      table.concat(good, "\n") .. "\n" .. table.concat(bad, "\n") .. "\n" .. good[1] .. "\n")
    local out, report = dir .. "/out.jsonl", dir .. "/report.json"
    local r = batch({ "--in", input, "--out", out, "--report", report, server.url .. "/echo" })
    assert.equal(6, r.code, r.stderr) -- the 302 and the invalid lines failed
    local res = lines_of(helpers.read_file(out))
    assert.equal(#good + #bad, #res)
    for i = 1, 5 do -- the echo of the line, byte for byte, and the id's text
      local id = good[i]:match('^{"id":([^,]+),')
      assert.equal('{"id":' .. id .. ',"ok":true,', res[i]:sub(1, #id + 17))
      assert.equal(',"response":' .. good[i] .. "}", res[i]:sub(-(#good[i] + 13)), res[i])
    end
    -- Not strict JSON from the upstream: kept as a string, nothing lost.
    assert.equal('{"score": NaN}', cjson.decode(res[6]).response)
    local redirect = cjson.decode(res[7])
    assert.same({ false, "failed", 302, "7" }, { redirect.ok, redirect.outcome, redirect.status, redirect.id })
    assert.matches("redirect to /moved", redirect.error)
    -- Not UTF-8: a string for reading, and the exact bytes in base64.
    local bin = cjson.decode(res[8])
    assert.same({ "\u{FF}\0ab", "/wBhYg==" }, { bin.response, bin.response_base64 })
    for i = #good + 1, #res do
      local inv = cjson.decode(res[i])
      assert.equal("invalid_input", inv.outcome)
      assert.equal(#good + i - #good, inv.line)
    end
    assert.matches("NaN and Infinity", cjson.decode(res[#good + 1]).error)
    assert.matches("number out of range", cjson.decode(res[#good + 2]).error)
    assert.matches("invalid UTF%-8", cjson.decode(res[#good + 3]).error)
    local rep = cjson.decode(helpers.read_file(report))
    assert.same({ 7, 1, 7, 1 }, { rep.succeeded, rep.failed, rep.invalid, rep.duplicates })
    -- A rerun finds every id in the ledger by its text and sends nothing
    -- but the 302, which failed for good.
    local before = stats(server).requests
    r = batch({ "--in", input, "--out", out, "--report", report, server.url .. "/echo" })
    assert.equal(6, r.code, r.stderr)
    assert.equal(8, cjson.decode(helpers.read_file(report)).skipped)
    assert.equal(before, stats(server).requests)
    -- --follow-redirects: the 302 is followed (same key, GET /moved).
    os.remove(out .. ".ledger")
    r = batch({ "--in", input, "--out", out, "--follow-redirects", server.url .. "/echo" })
    assert.equal(6, r.code, r.stderr) -- only the invalid lines fail now
    assert.is_true(cjson.decode(lines_of(helpers.read_file(out))[7]).ok)
    server:stop()
  end)

  it("never gets a 422 from its own resends: killed at five random points", function()
    local server = helpers.start_server([[
      return function(req) return { status = 200, body = req.body, delay_ms = 2 } end]])
    local dir = helpers.tmpdir()
    local n = 1500
    local items = {}
    for i = 1, n do
      -- Floats and big integers that cjson would re-round, key orders that
      -- a re-encoding would shuffle.
      items[i] = ('{"z":%d.125e-3,"id":%d,"big":%d,"a":"x"}'):format(i, i, 9007199254740993 + i)
    end
    local input = helpers.write_file(dir .. "/in.jsonl", table.concat(items, "\n") .. "\n")
    local out, ledger = dir .. "/out.jsonl", dir .. "/ledger.jsonl"
    local args = { helpers.bin, "batch", "--quiet", "--in", input, "--out", out, "--ledger", ledger,
                   "--concurrency", "16", "--chunk", "20", server.url .. "/p" }
    -- A fixed seed (RESILUA_KILL_SEED=N explores others); the kill points
    -- still move with the machine's speed, and every one must be safe.
    local seed = tonumber(os.getenv("RESILUA_KILL_SEED") or "") or 1
    print(("\n25-batch kill seed: %d (RESILUA_KILL_SEED=%d to replay)"):format(seed, seed))
    math.randomseed(seed)
    local function done() return select(2, (helpers.read_file(ledger) or ""):gsub("\n", "")) end
    for _ = 1, 5 do
      local target = done() + math.random(20, 200)
      local p = helpers.spawn(args)
      helpers.wait_until(function() return done() >= target or p:status() end, 60, 0.005)
      p:signal("KILL")
      p:wait(10)
    end
    local r = helpers.run(args)
    assert.equal(0, r.code, r.stderr)
    local res = lines_of(helpers.read_file(out))
    assert.equal(n, #res)
    for i = 1, n do
      assert.equal('{"id":' .. i .. ',"ok":true,', res[i]:sub(1, #tostring(i) + 17))
      assert.equal(',"response":' .. items[i] .. "}", res[i]:sub(-(#items[i] + 13)))
    end
    local st = stats(server)
    server:stop()
    assert.equal(n, st.handler_runs) -- each item ran exactly once
    assert.is_nil(st.status["422"])
    assert.equal(0, st.mismatches)
  end)

  it("refuses a device, a directory or a dangling symlink before any request", function()
    local server = helpers.start_server(ECHO)
    local dir = helpers.tmpdir()
    local input = helpers.write_file(dir .. "/in.jsonl", '{"id":1}\n')
    os.execute("mkdir " .. dir .. "/adir && ln -s " .. dir .. "/nowhere " .. dir .. "/dangling")
    -- As root, /dev/full's own node (char 1,7) made in the test directory:
    -- a binary with the old bug would replace that one, not the system's.
    local full = "/dev/full"
    if is_root() and helpers.run(("mknod -m 666 %s/full c 1 7"):format(dir)).code == 0 then
      full = dir .. "/full"
    end
    local qfull = full:gsub("%p", "%%%0")
    local cases = {
      { { "--in", input, "--out", full }, "%-%-out: " .. qfull .. " is a device, not a regular file" },
      { { "--in", input, "--out", dir .. "/o", "--ledger", full }, "%-%-ledger: " .. qfull .. " is a device" },
      { { "--in", input, "--out", dir .. "/o", "--report", full }, "%-%-report: " .. qfull .. " is a device" },
      { { "--in", input, "--out", dir .. "/adir" }, "%-%-out: .*adir is a directory" },
      { { "--in", input, "--out", dir .. "/o", "--ledger", dir .. "/adir" }, "%-%-ledger: .*adir is a directory" },
      { { "--in", dir .. "/adir", "--out", dir .. "/o" }, "%-%-in: .*adir is a directory" },
      { { "--in", input, "--out", dir .. "/dangling" }, "%-%-out: .*dangling is a symlink to nothing" },
    }
    for _, c in ipairs(cases) do
      local args = c[1]
      args[#args + 1] = server.url
      local r = batch(args)
      assert.equal(2, r.code, r.stderr)
      assert.matches(c[2], r.stderr)
    end
    assert.equal(0, stats(server).requests)
    server:stop()
    assert.equal(0, helpers.run("test -c " .. full).code) -- still the device
  end)

  it("writes a symlinked --out through the link, keeping the link", function()
    local server = helpers.start_server(ECHO)
    local dir = helpers.tmpdir()
    local input = helpers.write_file(dir .. "/in.jsonl", '{"id":1}\n{"id":2}\n')
    helpers.write_file(dir .. "/target.jsonl", "old\n")
    os.execute(("ln -s %s/target.jsonl %s/link.jsonl"):format(dir, dir))
    local r = batch({ "--in", input, "--out", dir .. "/link.jsonl", "--ledger", dir .. "/l", server.url })
    server:stop()
    assert.equal(0, r.code, r.stderr)
    assert.equal(0, helpers.run("test -L " .. dir .. "/link.jsonl").code)
    assert.equal(2, #lines_of(helpers.read_file(dir .. "/target.jsonl")))
  end)

  it("on a full disk exits 2 naming the file, leaves the old --out and no temporary file", function()
    if not is_root() then
      pending("needs root to mount a small tmpfs")
      return
    end
    local server = helpers.start_server([[
      return function(req) return { status = 200, body = '"' .. ("x"):rep(600) .. '"' } end]])
    local dir = helpers.tmpdir()
    local full = dir .. "/full"
    os.execute("mkdir " .. full)
    assert.equal(0, helpers.run(("mount -t tmpfs -o size=64k tmpfs %s"):format(full)).code)
    finally(function() os.execute("umount " .. full) end)
    local items = {}
    for i = 1, 300 do items[i] = ('{"id":%d}'):format(i) end
    local input = helpers.write_file(dir .. "/in.jsonl", table.concat(items, "\n") .. "\n")
    local out = full .. "/out.jsonl"
    helpers.write_file(out, "previous results\n")
    -- The results do not fit (300 x 600 bytes on 64 KiB); the ledger does not sit there.
    local r = batch({ "--in", input, "--out", out, "--ledger", dir .. "/ledger", server.url })
    assert.equal(2, r.code, r.stderr)
    assert.matches("%-%-out: cannot write " .. full:gsub("%p", "%%%0") .. "/out.jsonl: .*No space left on device", r.stderr)
    assert.equal("previous results\n", helpers.read_file(out))
    assert.is_nil(helpers.read_file(out .. ".tmp"))
    -- The ledger on the full disk: the run stops with exit 2 naming it.
    os.execute("rm -f " .. out .. " && head -c 60000 /dev/zero > " .. full .. "/filler 2>/dev/null")
    r = batch({ "--in", input, "--out", dir .. "/o2", "--ledger", full .. "/ledger", server.url })
    assert.equal(2, r.code, r.stderr)
    assert.matches("%-%-ledger: .*No space left on device", r.stderr)
    server:stop()
  end)

  it("ignores and counts ledger lines it cannot use, and never crashes on them", function()
    local server = helpers.start_server(ECHO)
    local dir = helpers.tmpdir()
    local input = helpers.write_file(dir .. "/in.jsonl", '{"id":1}\n{"id":2}\n{"id":3}\n{"id":4}\n')
    local ledger = helpers.write_file(dir .. "/ledger", table.concat({
      '{"id":1,"ok":true,"outcome":"ok","attempts":1,"status":200}',
      '{"ok":true,"outcome":"ok","attempts":1}',           -- no id
      '{"id":2,"ok":true,"outcome":"ok","attempts":"many"}',
      '{"id":3,"ok":"yes","outcome":"ok","attempts":1}',
      '{"id":null,"ok":true,"outcome":"ok","attempts":1}',
      '{"id":4,"ok":true,"outcome":"exploded","attempts":1}',
      "garbage",
      '{"id":4,"ok":true,"outcome":"ok","attempts":1,"status":200,"x":NaN}',
      '{"id":4,"ok":tr',                                   -- torn
    }, "\n"))
    local report = dir .. "/r.json"
    local r = batch({ "--in", input, "--out", dir .. "/o", "--ledger", ledger, "--report", report, server.url })
    assert.equal(0, r.code, r.stderr)
    local rep = cjson.decode(helpers.read_file(report))
    assert.same({ 1, 8, 4 }, { rep.skipped, rep.ledger_ignored, rep.succeeded })
    assert.equal(3, stats(server).requests)
    -- A directory as the ledger is a usage error, not a crash.
    r = batch({ "--in", input, "--out", dir .. "/o", "--ledger", dir, server.url })
    assert.equal(2, r.code, r.stderr)
    server:stop()
  end)

  it("stops a run against a dead upstream with exit 4, then a rerun resumes it", function()
    local dead = helpers.start_server(ECHO)
    local port = dead.port
    dead:stop()
    local dir = helpers.tmpdir()
    local items = {}
    for i = 1, 30 do items[i] = ('{"id":%d}'):format(i) end
    local input = helpers.write_file(dir .. "/in.jsonl", table.concat(items, "\n") .. "\n")
    local out, report = dir .. "/out.jsonl", dir .. "/report.json"
    local policy = helpers.write_file(dir .. "/p.lua", [[
      return { max_attempts = 2, backoff = { base_ms = 10, max_ms = 20 }, budget = false,
               breaker = { failures = 3, open_ms = 60000 } }]])
    local t0 = helpers.now()
    -- Not --quiet: stderr is a file here, so status lines go there.
    local r = helpers.run({ helpers.bin, "batch", "--in", input, "--out", out, "--report", report,
                            "--policy", policy, "--stall", "1", "--concurrency", "1",
                            "http://127.0.0.1:" .. port .. "/p" })
    assert.is_true(helpers.now() - t0 < 30)
    assert.equal(4, r.code, r.stderr)
    assert.matches("upstream unreachable: connect refused to 127%.0%.0%.1:" .. port
                   .. " for 1 s; %d+ items pending; rerun to resume", r.stderr)
    assert.matches("succeeded     0", r.stderr) -- the summary is printed
    local rep = cjson.decode(helpers.read_file(report))
    -- Item 1 gave up (two connect errors); then the breaker opened and
    -- the rest waited.
    assert.same({ 29, 1, 1 }, { rep.pending, rep.failed, rep.outcomes.gave_up })
    for _, l in ipairs(lines_of(helpers.read_file(out))) do
      local o = cjson.decode(l).outcome
      assert.is_true(o == "pending" or o == "gave_up" or o == "budget", o)
    end
    -- The upstream is back: the rerun sends the pending and the transient
    -- failures again by default; --no-retry-failed sends only the pending.
    local server = helpers.start_server(ECHO)
    local url = server.url .. "/p"
    r = batch({ "--in", input, "--out", out, "--report", report, "--no-retry-failed", url })
    assert.equal(6, r.code, r.stderr)
    assert.equal(rep.pending, stats(server).requests)
    r = batch({ "--in", input, "--out", out, "--report", report, url })
    assert.equal(0, r.code, r.stderr)
    assert.equal(30, stats(server).handler_runs)
    server:stop()
  end)

  it("does not take a slow upstream for a stalled one", function()
    local server = helpers.start_server([[
      return function(req) return { status = 200, body = "{}", delay_ms = 2500 } end]])
    local dir = helpers.tmpdir()
    local input = helpers.write_file(dir .. "/in.jsonl", '{"id":1}\n{"id":2}\n')
    local policy = helpers.write_file(dir .. "/p.lua", "return { per_try_timeout_ms = 10000 }")
    local r = batch({ "--in", input, "--out", dir .. "/o", "--policy", policy, "--stall", "1",
                      "--concurrency", "2", server.url })
    server:stop()
    assert.equal(0, r.code, r.stderr)
  end)

  it("tells the truth about a budget refusal: the message and attempts agree", function()
    local server = helpers.start_server([[return function(req) return { status = 503 } end]])
    local dir = helpers.tmpdir()
    local input = helpers.write_file(dir .. "/in.jsonl", '{"id":1}\n{"id":2}\n{"id":3}\n')
    local policy = helpers.write_file(dir .. "/p.lua", [[
      return { max_attempts = 4, backoff = { base_ms = 5, max_ms = 10 }, breaker = false,
               budget = { max_tokens = 1, token_ratio = 0.01 } }]])
    local out = dir .. "/o.jsonl"
    local r = batch({ "--in", input, "--out", out, "--policy", policy, "--concurrency", "1", server.url })
    server:stop()
    assert.equal(6, r.code, r.stderr)
    local budget = 0
    for _, l in ipairs(lines_of(helpers.read_file(out))) do
      local res = cjson.decode(l)
      assert.is_true(res.outcome == "budget" or res.outcome == "gave_up", res.outcome)
      if res.outcome == "budget" then budget = budget + 1 end
      assert.equal(4, res.attempts)
      local said = tonumber(res.error:match("after (%d+) attempts?"))
      assert.equal(res.attempts, said, res.error)
    end
    assert.is_true(budget > 0)
  end)

  it("prints a status line every 10 s when stderr is not a terminal", function()
    local server = helpers.start_server([[
      return function(req) return { status = 200, body = "{}", delay_ms = 1500 } end]])
    local dir = helpers.tmpdir()
    local function input_of(from)
      local items = {}
      for i = from, from + 7 do items[#items + 1] = ('{"id":%d}'):format(i) end
      return helpers.write_file(("%s/in%d.jsonl"):format(dir, from), table.concat(items, "\n") .. "\n")
    end
    local quiet = helpers.spawn({ helpers.bin, "batch", "--quiet", "--in", input_of(101),
                                  "--out", dir .. "/o2", "--concurrency", "1", server.url })
    local r = helpers.run({ helpers.bin, "batch", "--in", input_of(1), "--out", dir .. "/o",
                            "--concurrency", "1", server.url })
    assert.equal(0, quiet:wait(30))
    server:stop()
    assert.equal(0, r.code, r.stderr)
    assert.matches("batch: %d+ done, %d+ pending, [%d.]+%% ok, [%d.]+ items/s, breaker closed\n", r.stderr)
    assert.not_matches("done, .* pending", quiet:stderr())
    assert.matches("items         8", quiet:stderr()) -- --quiet keeps the summary
  end)
end)
