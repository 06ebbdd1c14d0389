--- resilua.batch — batch inference that retries only what is transient,
-- never does an item twice, and resumes after a crash.
--
-- Each input line (JSON with an id) becomes one call under the policy, with
-- an Idempotency-Key derived from the id, so a rerun is the same request to
-- a server that deduplicates.  Every finished item is appended to a ledger
-- and flushed (fsync'd once per chunk); a rerun skips what the ledger holds.
-- The results file is written once, at the end, to a temporary file that is
-- renamed into place: a crash never leaves a torn or duplicated line in it.
-- When the breaker is open or the retry budget refuses, the item waits and
-- goes again with the same key instead of failing.
local resilua = require "resilua"
local core = require "resilua.core"
local cjson = require("cjson").new()
local cjson_safe = require "cjson.safe"

local M = {}

M.EXIT_OK, M.EXIT_USAGE, M.EXIT_SOME_FAILED = 0, 2, 6

local PAUSE_MIN_S, PAUSE_MAX_S = 0.05, 1.0 -- waits while breaker/budget refuse

--- A deterministic Idempotency-Key for an id: FNV-1a of the id, shaped as a
-- UUID (version 8, "custom"), so the key is the same on every run.  The
-- fields are cut from the two hashes with shifts, not from a hex string:
-- it runs once per item.
function M.key_for(id)
  local s = tostring(id)
  local a, b = 0xcbf29ce484222325, 0x84222325cbf29ce4
  for i = 1, #s do
    local c = s:byte(i)
    a, b = (a ~ c) * 0x100000001b3, (b ~ c) * 0x100000001b3
  end
  -- a's 5th hex digit gives way to the version, b's 1st to the variant.
  return ("%08x-%04x-8%03x-%x%03x-%012x"):format(a >> 32, (a >> 16) & 0xffff, a & 0xfff,
    8 + ((b >> 60) & 3), (b >> 48) & 0xfff, b & 0xffffffffffff)
end

local function percentile(sorted, p)
  if #sorted == 0 then return nil end
  return sorted[math.max(1, math.ceil(p * #sorted))]
end

-- lua-cjson decodes every number as a float; ids and counts read better,
-- and format as users expect ("3", not "3.0"), as integers.
local function integers(v)
  if type(v) == "number" then return math.tointeger(v) or v end
  if type(v) == "table" then
    for k, x in pairs(v) do v[k] = integers(x) end
  end
  return v
end

-- Reads the ledger: id -> the result line.  A torn last line (killed while
-- writing) is ignored; its item runs again with the same key.
local function read_ledger(path)
  local done, torn = {}, false
  local f = io.open(path, "rb")
  if not f then return done, false end
  -- Read what the file holds, not "until EOF": a device such as /dev/full
  -- never ends, and it is no ledger anyway (the fsync that follows says so).
  local size = f:seek("end") or 0
  f:seek("set")
  local data = size > 0 and f:read(size) or ""
  f:close()
  for line in data:gmatch("[^\n]+") do
    local r = cjson_safe.decode(line)
    -- Keyed as read_input keys ids: 7, not the 7.0 that cjson decodes.
    if type(r) == "table" and r.id ~= nil then done[tostring(integers(r.id))] = line end
  end
  torn = #data > 0 and data:sub(-1) ~= "\n"
  return done, torn
end

-- Reads the input: items in order, and what is wrong with the rest.
local function read_input(path, id_field)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local items, invalid, duplicates, seen = {}, {}, {}, {}
  local n = 0
  for line in f:lines() do
    n = n + 1
    if line:match("%S") then
      local item, jerr = cjson_safe.decode(line)
      item = integers(item)
      local id = type(item) == "table" and item[id_field]
      if type(item) ~= "table" then
        invalid[#invalid + 1] = { line = n, error = "bad JSON: " .. tostring(jerr or "not an object") }
      elseif (type(id) ~= "string" and type(id) ~= "number") or id == "" then
        invalid[#invalid + 1] = { line = n, error = ("no '%s' (a string or a number)"):format(id_field) }
      else
        local key = tostring(id)
        if seen[key] then
          duplicates[#duplicates + 1] = { line = n, id = id, first_line = seen[key] }
        else
          seen[key] = n
          items[#items + 1] = { id = id, key = key, item = item, line = n }
        end
      end
    end
  end
  f:close()
  return { items = items, invalid = invalid, duplicates = duplicates, lines = n }
end

local function default_request(item, opts)
  return { method = opts.method or "POST", url = opts.url, body = cjson.encode(item),
           headers = { ["Content-Type"] = "application/json" } }
end

local function progress(done, total, failed, t0)
  local width = 30
  local filled = total > 0 and math.floor(width * done / total) or width
  local elapsed = (core.now_ms() - t0) / 1000
  io.stderr:write(("\r[%s%s] %d/%d  %d failed  %.0f items/s "):format(
    ("#"):rep(filled), ("."):rep(width - filled), done, total, failed,
    elapsed > 0 and done / elapsed or 0))
end

--- Runs a batch.  opts: input, output, url, policy (name/file, default
-- "default", or a policy object from resilua.policy), policy_path, concurrency (16), chunk (100), ledger
-- (output .. ".ledger"; false: none, and no resume), report (a JSON
-- file), id_field ("id"), method,
-- headers, build (function(item) -> request table), quiet.
-- Returns the report table, or nil and a message (nothing was sent).
function M.run(opts)
  assert(type(opts) == "table", "batch: expected a table of options")
  for _, k in ipairs({ "input", "output", "url" }) do
    if type(opts[k]) ~= "string" then return nil, ("batch: '%s' is required"):format(k) end
  end
  local concurrency = math.tointeger(opts.concurrency or 16)
  local chunk = math.tointeger(opts.chunk or 100)
  if not concurrency or concurrency < 1 then return nil, "batch: concurrency must be an integer >= 1" end
  if not chunk or chunk < 1 then return nil, "batch: chunk must be an integer >= 1" end
  local id_field = opts.id_field or "id"
  local ledger_path = opts.ledger
  if ledger_path == nil then ledger_path = opts.output .. ".ledger" end
  local build = opts.build or default_request

  local input, ierr = read_input(opts.input, id_field)
  if not input then return nil, "batch: --in: " .. ierr end
  -- Everything we will write must be writable before the first request.
  local tmp_path = opts.output .. ".tmp"
  local probe, perr = io.open(tmp_path, "wb")
  if not probe then return nil, "batch: --out: " .. perr end
  probe:close()
  if opts.report then
    local rf, rerr = io.open(opts.report, "ab")
    if not rf then return nil, "batch: --report: " .. rerr end
    rf:close()
  end
  local done, ledger = {}, nil
  if ledger_path then
    local torn
    done, torn = read_ledger(ledger_path)
    local lerr
    ledger, lerr = io.open(ledger_path, "ab")
    if not ledger then return nil, "batch: --ledger: " .. lerr end
    if torn then ledger:write("\n") end -- end the torn line; it is ignored on read
    local synced, serr = core.fsync(ledger)
    if not synced then
      ledger:close()
      return nil, ("batch: --ledger: %s: cannot sync: %s"):format(ledger_path, tostring(serr))
    end
  end

  local client_ok, client = pcall(resilua.client, { policy = opts.policy or "default",
                                                   policy_path = opts.policy_path })
  if not client_ok then
    if ledger then ledger:close() end
    return nil, "batch: " .. tostring(client)
  end

  local queue, skipped = {}, 0
  for _, it in ipairs(input.items) do
    if done[it.key] then
      skipped = skipped + 1
      it.skipped = true
    else
      queue[#queue + 1] = it
    end
  end
  local total = #queue
  local t0 = core.now_ms()
  local finished, failed, since_sync, write_error = 0, 0, 0, nil
  local show_progress = not opts.quiet and core.isatty(2)
  local extra_headers = {}
  for k, v in pairs(opts.headers or {}) do extra_headers[k] = v end
  local report = { total = #input.items + #input.invalid, succeeded = 0, failed = 0,
                   skipped = skipped, invalid = #input.invalid, duplicates = #input.duplicates,
                   outcomes = {}, attempts = {}, failed_status = {} }
  local latencies = {}

  -- Counts one finished item in the report.  Attempts and statuses are
  -- counted under numbers (no string made per item), keyed by strings at
  -- the end.
  local by_attempts, failed_by_status = {}, {}
  local function tally(ok, outcome, attempts, status, latency_ms)
    report.outcomes[outcome] = (report.outcomes[outcome] or 0) + 1
    attempts = math.tointeger(attempts) or attempts
    by_attempts[attempts] = (by_attempts[attempts] or 0) + 1
    if ok then
      report.succeeded = report.succeeded + 1
    else
      report.failed = report.failed + 1
      if status then
        status = math.tointeger(status)
        failed_by_status[status] = (failed_by_status[status] or 0) + 1
      end
    end
    latencies[#latencies + 1] = latency_ms
  end

  -- One table for every result line: each field is set (or cleared) per item.
  local line_fields = {}
  local function record(it, r, attempts, latency_ms)
    local ok = r.outcome == "ok"
    line_fields.id, line_fields.ok, line_fields.attempts = it.id, ok, attempts
    line_fields.latency_ms, line_fields.status, line_fields.outcome = latency_ms, r.status, r.outcome
    -- A body that is not JSON is kept as a string, as JSON text: UTF-8.
    local text = ok and r.body or not ok and (r.error or r.message)
    text = text and core.utf8_clean(text)
    line_fields.response = ok and (cjson_safe.decode(text or "") or text) or nil
    line_fields.error = not ok and text or nil
    local line = cjson.encode(line_fields)
    done[it.key] = line
    tally(ok, r.outcome, attempts, r.status, latency_ms)
    finished = finished + 1
    if not ok then failed = failed + 1 end
    if ledger then
      local okw, werr = ledger:write(line, "\n")
      if okw then okw, werr = ledger:flush() end
      since_sync = since_sync + 1
      if okw and since_sync >= chunk then
        okw, werr = core.fsync(ledger)
        since_sync = 0
      end
      if not okw then write_error = write_error or werr end
    end
    if show_progress then progress(finished, total, failed, t0) end
  end

  local function request_for(it)
    local req = build(it.item, opts)
    req.url = req.url or opts.url
    req.headers = req.headers or {}
    for k, v in pairs(extra_headers) do req.headers[k] = v end
    req.headers["Idempotency-Key"] = M.key_for(it.id)
    return req
  end

  -- The items run on core.call's callbacks, as `resilua load` does: a
  -- worker per slot of concurrency, made once, records the item whose call
  -- ended (or pauses and resends it) and starts the next.  Errors raised
  -- by a --request hook or by a bad request end their worker; the run
  -- then fails with the first of them.
  local next_item, active, run_error = 1, 0, nil
  local function new_worker()
    local it, req, attempts, pause, started, max_attempts
    local worker
    local function stop(err)
      run_error = run_error or tostring(err)
      active = active - 1
    end
    local function send()
      local sent, err = pcall(core.call, client.state, client:policy().core, req, worker)
      if not sent then stop("call: " .. tostring(err)) end
    end
    local function start_next()
      if next_item > total or write_error then
        active = active - 1
        return
      end
      it = queue[next_item]
      next_item = next_item + 1
      local built, built_req = pcall(request_for, it)
      if not built then return stop(built_req) end
      req, attempts, pause, started = built_req, 0, PAUSE_MIN_S, core.now_ms()
      max_attempts = client:policy().table.max_attempts
      send()
    end
    worker = function(r)
      attempts = attempts + r.attempts
      local outcome = r.outcome
      if (outcome == "breaker_open" or outcome == "budget")
          and not (attempts >= max_attempts and outcome == "budget") then
        -- The dependency needs a rest: wait, then the same request, same key.
        core.timer(pause, send)
        pause = math.min(pause * 2, PAUSE_MAX_S)
        return
      end
      local recorded, err = pcall(record, it, r, attempts, core.now_ms() - started)
      if not recorded then return stop(err) end
      start_next()
    end
    return start_next
  end
  for _ = 1, math.min(concurrency, total) do
    active = active + 1
    new_worker()()
  end
  while active > 0 do
    if core.step() == 0 and active > 0 then
      run_error = run_error or "the loop ran dry with items in flight"
      break
    end
  end
  if show_progress then io.stderr:write("\n") end
  if ledger then
    core.fsync(ledger)
    ledger:close()
  end
  if run_error then return nil, "batch: " .. run_error end
  if write_error then return nil, "batch: --ledger: " .. tostring(write_error) end

  -- The results, in input order, one line per id, then the invalid lines.
  -- Items done before this run are counted from their ledger lines.
  local out = assert(io.open(tmp_path, "wb"))
  for _, it in ipairs(input.items) do
    local line = done[it.key]
    out:write(line, "\n")
    if it.skipped then
      local r = cjson.decode(line)
      tally(r.ok, r.outcome, r.attempts, r.status, r.latency_ms)
    end
  end
  for n, count in pairs(by_attempts) do report.attempts[tostring(n)] = count end
  for status, count in pairs(failed_by_status) do report.failed_status[tostring(status)] = count end
  for _, bad in ipairs(input.invalid) do
    out:write(cjson.encode({ line = bad.line, ok = false, outcome = "invalid_input", error = bad.error }), "\n")
  end
  local okw, werr = out:write("")
  if okw then okw, werr = core.fsync(out) end
  out:close()
  if not okw then return nil, "batch: --out: " .. tostring(werr) end
  local renamed, rerr = os.rename(tmp_path, opts.output)
  if not renamed then return nil, "batch: --out: " .. tostring(rerr) end

  table.sort(latencies)
  local elapsed_s = (core.now_ms() - t0) / 1000
  report.invalid_lines = input.invalid
  report.duplicate_ids = input.duplicates
  report.outcomes.invalid_input = #input.invalid > 0 and #input.invalid or nil
  report.latency_ms = { p50 = percentile(latencies, 0.5), p90 = percentile(latencies, 0.9),
                        p99 = percentile(latencies, 0.99), max = latencies[#latencies] }
  report.elapsed_s = elapsed_s
  report.items_per_s = elapsed_s > 0 and total / elapsed_s or 0
  if opts.report then
    local rtmp = opts.report .. ".tmp"
    local rf = assert(io.open(rtmp, "wb"))
    rf:write(cjson.encode(report), "\n")
    rf:close()
    assert(os.rename(rtmp, opts.report))
  end
  return report
end

--- The report as a terminal table.
function M.format(report)
  local lines = {
    ("items         %d (%d done before, %d invalid, %d duplicate ids)"):format(
      report.total, report.skipped, report.invalid, report.duplicates),
    ("succeeded     %d"):format(report.succeeded),
    ("failed        %d"):format(report.failed + report.invalid),
  }
  local names = {}
  for k in pairs(report.outcomes) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do
    if k ~= "ok" then lines[#lines + 1] = ("  %-11s %d"):format(k, report.outcomes[k]) end
  end
  local statuses = {}
  for s, n in pairs(report.failed_status) do statuses[#statuses + 1] = ("%s×%d"):format(s, n) end
  table.sort(statuses)
  if #statuses > 0 then lines[#lines + 1] = "  by status   " .. table.concat(statuses, " ") end
  local attempts = {}
  for a, n in pairs(report.attempts) do attempts[#attempts + 1] = { tonumber(a), n } end
  table.sort(attempts, function(x, y) return x[1] < y[1] end)
  local parts = {}
  for _, a in ipairs(attempts) do parts[#parts + 1] = ("%d:%d"):format(a[1], a[2]) end
  lines[#lines + 1] = "attempts      " .. table.concat(parts, "  ")
  local l = report.latency_ms
  if l.p50 then
    lines[#lines + 1] = ("latency ms    p50 %.1f  p90 %.1f  p99 %.1f  max %.1f"):format(l.p50, l.p90, l.p99, l.max)
  end
  lines[#lines + 1] = ("throughput    %.1f items/s over %.2f s"):format(report.items_per_s, report.elapsed_s)
  return table.concat(lines, "\n") .. "\n"
end

return M
