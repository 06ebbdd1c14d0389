-- `resilua batch` against a real `resilua serve`: transient failures
-- retried, permanent ones not, every id once, invalid lines reported, a
-- kill -9 resumed without doing a completed item twice, clear I/O errors.
local helpers = require "helpers"
local cjson = require "cjson"

-- 30% of first attempts fail with 503; ids divisible by 33 always get 400.
-- GET /twice answers how many ids the handler answered 200 more than once.
local UPSTREAM = [[
local cjson = require "cjson"
math.randomseed(7)
local first, answered = {}, {}
return function(req)
  if req.path == "/twice" then
    local n = 0
    for _, count in pairs(answered) do if count > 1 then n = n + 1 end end
    return { status = 200, body = tostring(n) }
  end
  local item = cjson.decode(req.body)
  if item.id % 33 == 0 then return { status = 400, body = '{"error":"bad item"}' } end
  local key = req.headers["idempotency-key"]
  if not first[key] then
    first[key] = true
    if math.random() < 0.3 then return { status = 503 } end
  end
  answered[item.id] = (answered[item.id] or 0) + 1
  return { status = 200, body = cjson.encode({ prediction = item.id * 2 }), delay_ms = DELAY }
end]]

local function items_file(dir, n, extra)
  local lines = {}
  for i = 1, n do lines[i] = ('{"id": %d, "text": "item %d"}'):format(i, i) end
  for _, l in ipairs(extra or {}) do lines[#lines + 1] = l end
  return helpers.write_file(dir .. "/items.jsonl", table.concat(lines, "\n") .. "\n")
end

local function results(path)
  local by_id, invalid, n = {}, {}, 0
  for line in (helpers.read_file(path) or ""):gmatch("[^\n]+") do
    local r = cjson.decode(line)
    n = n + 1
    if r.id then
      assert.is_nil(by_id[r.id], "id " .. tostring(r.id) .. " twice in the results")
      by_id[r.id] = r
    else
      invalid[#invalid + 1] = r
    end
  end
  return by_id, invalid, n
end

local function batch(args)
  local argv = { helpers.bin, "batch", "--quiet" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return helpers.run(argv)
end

describe("resilua batch", function()
  it("retries transient failures, fails permanent ones once, reports the rest", function()
    local server = helpers.start_server((UPSTREAM:gsub("DELAY", "0")))
    local dir = helpers.tmpdir()
    local input = items_file(dir, 2000, { "not json", '{"noid": 1}', '{"id": 5, "again": true}' })
    local out, report = dir .. "/results.jsonl", dir .. "/report.json"
    local r = batch({ "--in", input, "--out", out, "--report", report, "--concurrency", "32",
                      server.url .. "/predict" })
    server:stop()
    assert.equal(6, r.code, r.stderr)
    local by_id, invalid, lines = results(out)
    assert.equal(2002, lines) -- one per id, one per invalid line
    for id = 1, 2000 do
      local res = by_id[id]
      if id % 33 == 0 then
        assert.same({ false, "failed", 400, 1 }, { res.ok, res.outcome, res.status, res.attempts })
      else
        assert.is_true(res.ok, "id " .. id)
        assert.equal(id * 2, res.response.prediction)
      end
    end
    assert.same({ 2001, 2002 }, { invalid[1].line, invalid[2].line })
    assert.matches("bad JSON", invalid[1].error)
    assert.matches("no 'id'", invalid[2].error)
    local rep = cjson.decode(helpers.read_file(report))
    assert.same({ 2002, 1940, 60, 2, 1 }, { rep.total, rep.succeeded, rep.failed, rep.invalid, rep.duplicates })
    assert.equal(2003, rep.duplicate_ids[1].line)
    assert.equal(60, rep.failed_status["400"])
    assert.is_true(rep.attempts["2"] > 400) -- ~30% of items needed a retry
    assert.is_number(rep.latency_ms.p99)
  end)

  it("resumes after kill -9 without doing a completed item twice", function()
    local server = helpers.start_server((UPSTREAM:gsub("DELAY", "20")))
    local dir = helpers.tmpdir()
    local input = items_file(dir, 2000)
    local out, ledger = dir .. "/results.jsonl", dir .. "/ledger.jsonl"
    local args = { "--in", input, "--out", out, "--ledger", ledger, "--concurrency", "16",
                   "--chunk", "50", server.url .. "/predict" }
    local first = helpers.spawn({ helpers.bin, "batch", "--quiet", table.unpack(args) })
    assert.truthy(helpers.wait_until(function()
      local l = helpers.read_file(ledger)
      return l and select(2, l:gsub("\n", "")) > 300
    end, 30))
    first:signal("KILL")
    first:wait(10)
    assert.is_nil(helpers.read_file(out)) -- no half-written results
    local done_before = select(2, helpers.read_file(ledger):gsub("\n", ""))
    assert.is_true(done_before < 2000)

    local report = dir .. "/report.json"
    local r = batch({ "--report", report, table.unpack(args) })
    assert.equal(6, r.code, r.stderr)
    -- Every item the ledger holds is skipped, not sent again (the server's
    -- dedup would hide a resend: this counts it).
    assert.equal(done_before, cjson.decode(helpers.read_file(report)).skipped)
    local by_id, _, lines = results(out)
    assert.equal(2000, lines)
    for id = 1, 2000 do assert.is_not_nil(by_id[id], "id " .. id) end
    local twice = helpers.curl(helpers.quote(server.url .. "/twice"))
    -- A third run finds everything done and sends nothing.
    local stats = function()
      return cjson.decode(helpers.curl(helpers.quote(server.url .. "/_stats")).body).requests
    end
    local before = stats()
    assert.equal(6, batch({ "--report", report, table.unpack(args) }).code)
    assert.equal(2000, cjson.decode(helpers.read_file(report)).skipped)
    assert.equal(before, stats()) -- /_stats itself is not counted
    server:stop()
    assert.equal("0", twice.body) -- the handler answered each id at most once
  end)

  it("pauses items while the breaker is open instead of failing them", function()
    local server = helpers.start_server([[
      return function(req)
        if req.n <= 12 then return { status = 503 } end -- a brief outage
        return { status = 200, body = "{}" }
      end]])
    local dir = helpers.tmpdir()
    local input = items_file(dir, 100)
    local policy = helpers.write_file(dir .. "/p.lua", [[
      -- refused = false: a refused try ends the call, and batch pauses the item
      return { max_attempts = 10, backoff = { base_ms = 10, max_ms = 50 },
               retry_on = { refused = false },
               breaker = { failures = 5, open_ms = 200 } }]])
    local out, log = dir .. "/o.jsonl", dir .. "/events.jsonl"
    local r = batch({ "--in", input, "--out", out, "--policy", policy, "--log", log,
                      "--concurrency", "8", server.url .. "/p" })
    server:stop()
    assert.equal(0, r.code, r.stderr)
    local by_id = results(out)
    for id = 1, 100 do assert.is_true(by_id[id].ok) end
    local paused = 0
    for _, e in ipairs(helpers.of_kind(helpers.events(log), "call")) do
      if e.outcome == "breaker_open" then paused = paused + 1 end
    end
    assert.is_true(paused > 0)
  end)

  it("refuses unwritable output and a missing input before sending anything", function()
    local server = helpers.start_server((UPSTREAM:gsub("DELAY", "0")))
    local dir = helpers.tmpdir()
    local input = items_file(dir, 10)
    local r = batch({ "--in", input, "--out", "/nonexistent/dir/out.jsonl", server.url .. "/p" })
    assert.equal(2, r.code)
    assert.matches("%-%-out: /nonexistent/dir/out.jsonl.tmp: No such file or directory", r.stderr)
    r = batch({ "--in", dir .. "/missing.jsonl", "--out", dir .. "/o.jsonl", server.url .. "/p" })
    assert.equal(2, r.code)
    assert.matches("%-%-in: .*missing.jsonl", r.stderr)
    r = batch({ "--in", input, "--out", dir .. "/o.jsonl", "--ledger", "/dev/full", server.url .. "/p" })
    assert.equal(2, r.code)
    assert.matches("%-%-ledger: ", r.stderr)
    r = batch({ "--in", input, "--out", dir .. "/o.jsonl", "--concurrency", "0", server.url .. "/p" })
    assert.equal(2, r.code)
    assert.matches("%-%-concurrency: expected an integer >= 1", r.stderr)
    local stats = helpers.curl(helpers.quote(server.url .. "/_stats"))
    server:stop()
    assert.equal(0, cjson.decode(stats.body).requests)
  end)

  it("builds requests with a --request hook and exits 0 when all succeed", function()
    local server = helpers.start_server([[
      return function(req) return { status = 200, body = req.method .. " " .. req.path } end]])
    local dir = helpers.tmpdir()
    local input = items_file(dir, 5)
    local hook = helpers.write_file(dir .. "/hook.lua",
      "return function(item) return { method = 'PUT', url = URL .. '/items/' .. item.id, body = item.text } end")
    helpers.write_file(hook, (helpers.read_file(hook):gsub("URL", ("%q"):format(server.url))))
    local out = dir .. "/o.jsonl"
    local r = batch({ "--in", input, "--out", out, "--request", hook, server.url })
    server:stop()
    assert.equal(0, r.code, r.stderr)
    local by_id = results(out)
    assert.equal("PUT /items/3", by_id[3].response)
  end)
end)
