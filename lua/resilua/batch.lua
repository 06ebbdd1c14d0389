--- resilua.batch — batch inference that retries only what is transient,
-- never does an item twice, and resumes after a crash (docs/batch.md).
--
-- Byte-exact: an item's request body is its input line's own bytes (or
-- what a --request hook builds, encoded canonically: sorted keys, full
-- precision), the stored response is the upstream's bytes, and an id is
-- compared by its JSON text.  Nothing goes through a double: lines are
-- checked by the strict scanner in C (core.json), which also hands back
-- the raw text of the id.
--
-- The input is read as a stream, never whole: once to index it (the
-- dedup set, invalid lines and duplicates counted), once to send, once
-- (twice with invalid lines) to write the results in input order.  Every
-- finished item is appended to the ledger; the dedup set maps an id (an
-- integer key for a plain integer id, its JSON text otherwise) to where
-- its result line is in the ledger, and the results file is assembled
-- from the ledger into a temporary file renamed over --out.
local resilua = require "resilua"
local core = require "resilua.core"
local cjson = require("cjson").new()

local json, files = core.json, core.files
local base64 = require("resilua.json").base64

local M = {}

M.EXIT_OK, M.EXIT_USAGE, M.EXIT_STALLED, M.EXIT_SOME_FAILED = 0, 2, 4, 6

M.MAX_LINE_BYTES = 16 * 1024 * 1024 -- longer input lines are invalid
-- A ledger line holds a response (up to the policy's 1 GiB cap, 6 times
-- that once escaped as a JSON string): longer ones are not ours.
M.MAX_LEDGER_LINE_BYTES = 7 * 1024 * 1024 * 1024
M.MAX_ID_BYTES = 1024
M.MAX_DEPTH = 128                   -- JSON nesting, inputs and responses
M.DEFAULT_STALL_S = 60
M.STATUS_EVERY_S = 10               -- the status line, stderr not a TTY
M.MAX_REDIRECTS = 5
local READ_CHUNK = 1024 * 1024
local PAUSE_MIN_S, PAUSE_MAX_S = 0.05, 1.0 -- waits while the breaker refuses
local WATCH_EVERY_S = 0.5

--- A deterministic Idempotency-Key for an id's JSON text: FNV-1a, shaped
-- as a UUID (version 8, "custom"), the same on every run.
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

-- --- canonical JSON for what a --request hook builds ----------------------

local function is_array(t)
  if getmetatable(t) == json.array then return true end
  local n = #t
  if n == 0 then return false end
  local count = 0
  for _ in pairs(t) do count = count + 1 end
  return count == n
end

local function encode_into(v, out, depth)
  if depth > M.MAX_DEPTH then error("cannot encode: nested too deep (or a cycle)", 0) end
  local t = type(v)
  if t == "string" then
    local q, err = json.quote(v)
    if not q then error("cannot encode a string: " .. err, 0) end
    out[#out + 1] = q
  elseif t == "number" then
    if math.type(v) == "integer" then
      out[#out + 1] = ("%d"):format(v)
    elseif v ~= v or v == math.huge or v == -math.huge then
      error("cannot encode NaN or Infinity", 0)
    else -- the shortest form that reads back as the same double
      local s = ("%.15g"):format(v)
      if tonumber(s) ~= v then s = ("%.16g"):format(v) end
      if tonumber(s) ~= v then s = ("%.17g"):format(v) end
      -- A float stays a float when read back ("2.0", "-0.0"), so that
      -- encoding what was decoded gives the same text again.
      if not s:find("[.e]") then s = s .. ".0" end
      out[#out + 1] = s
    end
  elseif t == "boolean" then
    out[#out + 1] = v and "true" or "false"
  elseif v == nil or v == json.null then
    out[#out + 1] = "null"
  elseif t == "table" then
    if is_array(v) then
      out[#out + 1] = "["
      for i = 1, #v do
        if i > 1 then out[#out + 1] = "," end
        encode_into(v[i], out, depth + 1)
      end
      out[#out + 1] = "]"
    else
      local keys = {}
      for k in pairs(v) do
        local kt = type(k)
        if kt ~= "string" and math.type(k) ~= "integer" then
          error("cannot encode a table key of type " .. kt, 0)
        end
        keys[#keys + 1] = tostring(k)
      end
      table.sort(keys)
      out[#out + 1] = "{"
      for i, k in ipairs(keys) do
        if i > 1 then out[#out + 1] = "," end
        encode_into(k, out, depth + 1)
        out[#out + 1] = ":"
        local x = v[k]
        if x == nil then x = v[math.tointeger(tonumber(k))] end
        encode_into(x, out, depth + 1)
      end
      out[#out + 1] = "}"
    end
  else
    error("cannot encode a " .. t, 0)
  end
end

--- The canonical JSON text of a Lua value: object keys sorted, integers
-- as integers, floats in the shortest form that reads back exactly; the
-- same bytes in every process.  Raises on NaN, Infinity, functions.
function M.encode(v)
  local out = {}
  encode_into(v, out, 0)
  return table.concat(out)
end

-- --- reading ----------------------------------------------------------------

-- Lines of f as a stream: an iterator of (n, buf, i, j, start offset,
-- terminated): the line is buf:sub(i, j), left unmade unless needed.  A
-- line over max_bytes (default MAX_LINE_BYTES) comes as (n, false) and is
-- skipped.  The file is read in chunks, never whole.
local function lines_of(f, max_bytes)
  max_bytes = max_bytes or M.MAX_LINE_BYTES
  local buf, pos, base, n = "", 1, 0, 0 -- base: the file offset of buf
  return function()
    while true do
      local nl = buf:find("\n", pos, true)
      if nl and nl - pos <= max_bytes then
        local i = pos
        pos = nl + 1
        n = n + 1
        return n, buf, i, nl - 1, base + i - 1, true
      end
      if nl or #buf - pos + 1 > max_bytes then -- too long: skip to its end
        local start = base + pos - 1
        n = n + 1
        while not nl do
          base = base + #buf
          buf, pos = f:read(READ_CHUNK) or "", 1
          if buf == "" then return n, false, nil, nil, start, false end
          nl = buf:find("\n", 1, true)
        end
        pos = nl + 1
        return n, false, nil, nil, start, true
      end
      local chunk = f:read(READ_CHUNK)
      if not chunk then
        if pos > #buf then return nil end
        local last, i = buf, pos
        base, buf, pos = base + #buf, "", 1
        n = n + 1
        return n, last, i, #last, base - #last + i - 1, false
      end
      base = base + pos - 1
      buf, pos = buf:sub(pos) .. chunk, 1
    end
  end
end

-- Whether buf:sub(i, j) is blank (a line holds no "\n").
local function blank(buf, i, j)
  local p = buf:find("[^ \t\r]", i)
  return not p or p > j
end

local function valid_id(raw)
  if not raw then return false end
  local c = raw:byte(1)
  return (c == 34 and #raw > 2) or c == 45 or (c >= 48 and c <= 57) -- "x", -, digit
end

-- The dedup set's key for an id's JSON text: a plain integer id is an
-- integer (ids 1..n then sit in the table's array part, 16 bytes each);
-- anything else, a string id included ('"7"' with its quotes), its text.
local function key_of(raw)
  if #raw < 20 and raw:match("^%-?[1-9]%d*$") then return math.tointeger(tonumber(raw)) end
  return raw
end

-- Checks one input line, buf:sub(i, j): its id's JSON text, or nil and
-- why not.
local function check_line(buf, i, j, id_field)
  if buf == false then return nil, ("line longer than %d bytes"):format(M.MAX_LINE_BYTES) end
  local kind, id = json.scan_in(buf, i, j, M.MAX_DEPTH, id_field)
  if not kind then return nil, "bad JSON: " .. id end
  if kind ~= "object" then return nil, "bad JSON: not an object" end
  if not valid_id(id) then return nil, ("no '%s' (a non-empty string or a number)"):format(id_field) end
  if #id > M.MAX_ID_BYTES then return nil, ("'%s' longer than %d bytes"):format(id_field, M.MAX_ID_BYTES) end
  return id
end

local OUTCOMES = { ok = true, failed = true, gave_up = true, deadline = true, budget = true,
                   breaker_open = true, policy_error = true, timeout = true, invalid_input = true }
-- Outcomes that may go better on a rerun: sent again unless --no-retry-failed.
local TRANSIENT = { gave_up = true, timeout = true, deadline = true, breaker_open = true,
                    budget = true, policy_error = true, invalid_input = true }

local function is_final(outcome, status, retry_failed)
  if outcome == "ok" or not retry_failed then return true end
  if TRANSIENT[outcome] then return false end
  -- failed: final when the answer was a 3xx or a 4xx other than 408, 409
  -- (a deduplicating server's "the same key is in flight") and 429.
  return status ~= nil and status < 500 and status ~= 408 and status ~= 409 and status ~= 429
end

-- The fields of a ledger (or results) line, buf:sub(i, j), or nil when
-- it lacks one a finished item needs.
local function ledger_fields(buf, i, j)
  local kind, id, ok, outcome, attempts, status, latency = json.scan_in(buf, i, j,
    M.MAX_DEPTH + 1, "id", "ok", "outcome", "attempts", "status", "latency_ms")
  if kind ~= "object" or not valid_id(id) or #id > M.MAX_ID_BYTES then return nil end
  if ok ~= "true" and ok ~= "false" then return nil end
  outcome = outcome and outcome:match('^"([%w_]+)"$')
  if not OUTCOMES[outcome] or (ok == "true") ~= (outcome == "ok") then return nil end
  attempts = attempts and attempts:match("^%d+$") and math.tointeger(tonumber(attempts))
  if not attempts then return nil end
  if status == "null" then status = false end
  if status then
    status = status:match("^%d%d%d$") and math.tointeger(tonumber(status))
    if not status or status < 100 or status > 599 then return nil end
  end
  latency = latency and latency ~= "null" and tonumber(latency) or nil
  return id, ok == "true", outcome, attempts, status or nil, latency
end

-- --- files ------------------------------------------------------------------

-- Where an output file is written: the path itself, or a symlink's target
-- (written there, the link kept); nil and a message for anything but a
-- regular file or a new one.
local function output_path(flag, path)
  local kind, is_link, real = files.kind(path)
  if not kind then return nil, ("%s: %s"):format(flag, is_link) end
  if kind == "missing" then return path end
  if kind ~= "regular" then
    return nil, ("%s: %s is a %s, not a regular file"):format(flag, path,
      kind == "dangling" and "symlink to nothing" or kind)
  end
  return is_link and real or path
end

local function dirname(path) return path:match("^(.*)/[^/]*$") or "." end

-- Creates and removes path .. ".tmp": proof that the file can be written.
local function probe(flag, path)
  local tmp = path .. ".tmp"
  local f, err = io.open(tmp, "wb")
  if not f then return nil, ("%s: %s"):format(flag, err) end
  f:close()
  os.remove(tmp)
  return true
end

--- Writes a file through a temporary one: write(f) (returns true or nil,
-- err) fills it; every write, the flush and the fsync are checked; the
-- temporary file is renamed over path (a symlink's target), then the
-- directory is synced.  On any failure the old file is untouched and the
-- temporary one removed.
local function write_file(flag, path, write)
  local tmp = path .. ".tmp"
  local f, err = io.open(tmp, "wb")
  if not f then return nil, ("%s: %s"):format(flag, err) end
  local called, ok, werr = pcall(write, f)
  if not called then ok, werr = nil, ok end
  if ok then ok, werr = f:flush() end
  if ok then ok, werr = core.fsync(f) end
  local closed, cerr = f:close()
  if ok and not closed then ok, werr = nil, cerr end
  if ok then ok, werr = os.rename(tmp, path) end
  if not ok then
    os.remove(tmp)
    return nil, ("%s: cannot write %s: %s"):format(flag, path, tostring(werr))
  end
  files.sync_dir(dirname(path))
  return true
end

-- --- results ----------------------------------------------------------------

-- The response as stored: the upstream's JSON as it is (whitespace outside
-- strings dropped only when it spans lines), else a JSON string.  A body
-- that is not UTF-8 goes in as a string with each stray byte as U+00XX
-- (as every JSON we write), and its exact bytes in response_base64.
local function response_field(body)
  if json.scan(body, M.MAX_DEPTH) then
    return ',"response":' .. (body:find("[\r\n]") and json.minify(body) or body)
  end
  local q = json.quote(body)
  if q then return ',"response":' .. q end
  return ',"response":' .. json.quote(core.utf8_clean(body)) .. ',"response_base64":"' .. base64(body) .. '"'
end

local function result_line(id, ok, outcome, attempts, status, latency_ms, body, message)
  local parts = { '{"id":', id, ',"ok":', ok and "true" or "false" }
  if status then parts[#parts + 1] = ',"status":' .. status end
  parts[#parts + 1] = ',"outcome":"' .. outcome .. '","attempts":' .. attempts
  if latency_ms then parts[#parts + 1] = (',"latency_ms":%.1f'):format(latency_ms) end
  if message then
    parts[#parts + 1] = ',"error":'
    -- A stray byte in a message becomes \u00XX, as in every JSON we write.
    parts[#parts + 1] = json.quote(core.utf8_clean(message))
  end
  if body then parts[#parts + 1] = response_field(body) end
  parts[#parts + 1] = "}"
  return table.concat(parts)
end

-- "http://h:p/a/b" + Location -> the absolute URL.
local function resolve_location(base, loc)
  if loc:match("^%a[%w+.-]*://") then return loc end
  local origin, path = base:match("^(%a[%w+.-]*://[^/?#]*)([^?#]*)")
  if not origin then return loc end
  if loc:sub(1, 2) == "//" then return base:match("^(%a[%w+.-]*:)") .. loc end
  if loc:sub(1, 1) == "/" then return origin .. loc end
  return origin .. (path:match("^(.*/)") or "/") .. loc
end

local function host_of(url) return url:match("^%a[%w+.-]*://([^/?#]*)") or url end

-- --- the run ----------------------------------------------------------------

-- The run itself (M.run wraps it).
local function run(opts)
  for _, k in ipairs({ "input", "output", "url" }) do
    if type(opts[k]) ~= "string" then return nil, ("batch: '%s' is required"):format(k) end
  end
  local concurrency = math.tointeger(opts.concurrency or 16)
  local chunk = math.tointeger(opts.chunk or 100)
  local stall_s = tonumber(opts.stall_s or M.DEFAULT_STALL_S)
  if not concurrency or concurrency < 1 then return nil, "batch: concurrency must be an integer >= 1" end
  if not chunk or chunk < 1 then return nil, "batch: chunk must be an integer >= 1" end
  if not stall_s or stall_s <= 0 then return nil, "batch: stall must be a number of seconds > 0" end
  local id_field = opts.id_field or "id"
  local retry_failed = opts.retry_failed ~= false
  local build = opts.build

  -- Everything is checked before the first request: the input must be a
  -- regular file; what we write must be a regular file or a new one.
  local in_kind, in_err = files.kind(opts.input)
  if not in_kind then return nil, "batch: --in: " .. in_err end
  if in_kind ~= "regular" then
    return nil, ("batch: --in: %s is %s, not a regular file"):format(opts.input,
      in_kind == "missing" and "missing" or "a " .. in_kind)
  end
  local out_path, oerr = output_path("--out", opts.output)
  if not out_path then return nil, "batch: " .. oerr end
  local ok_probe, perr = probe("--out", out_path)
  if not ok_probe then return nil, "batch: " .. perr end
  local report_path
  if opts.report then
    report_path, oerr = output_path("--report", opts.report)
    if not report_path then return nil, "batch: " .. oerr end
    ok_probe, perr = probe("--report", report_path)
    if not ok_probe then return nil, "batch: " .. perr end
  end
  local ledger_path = opts.ledger
  if ledger_path == nil then ledger_path = opts.output .. ".ledger" end
  if ledger_path then
    local lp, lerr = output_path("--ledger", ledger_path)
    if not lp then return nil, "batch: " .. lerr end
  end

  -- The dedup set: an id's JSON text -> where it stands.
  --   n >= 1      done in the ledger at offset n - 1, not yet met in the input
  --   0           met in the input, to send
  --   -1          being sent
  --   n <= -2     met in the input, done: its line is at offset -n - 2
  local ids = {}
  local ledger_ignored, torn = 0, false
  local ledger, ledger_size
  if ledger_path then
    local rf = io.open(ledger_path, "rb")
    if rf then
      for _, buf, i, j, start, terminated in lines_of(rf, M.MAX_LEDGER_LINE_BYTES) do
        if not terminated then
          torn = true -- killed while writing: its item runs again, same key
          ledger_ignored = ledger_ignored + 1
        elseif buf == false then
          ledger_ignored = ledger_ignored + 1
        elseif not blank(buf, i, j) then
          local id, _, outcome, _, status = ledger_fields(buf, i, j)
          if not id then
            ledger_ignored = ledger_ignored + 1
          elseif is_final(outcome, status, retry_failed) then
            ids[key_of(id)] = start + 1
          else
            ids[key_of(id)] = nil -- sent again
          end
        end
      end
      rf:close()
    end
    local lerr
    ledger, lerr = io.open(ledger_path, "a+b")
    if not ledger then return nil, "batch: --ledger: " .. lerr end
    ledger_size = ledger:seek("end")
    if torn then
      ledger:write("\n") -- ends the torn line; it is ignored on read
      ledger_size = ledger_size + 1
    end
    local synced, serr = core.fsync(ledger)
    if not synced then
      ledger:close()
      return nil, ("batch: --ledger: %s: cannot write: %s"):format(ledger_path, tostring(serr))
    end
  else
    ledger, ledger_size = io.tmpfile(), 0 -- holds the result lines until the end
    if not ledger then return nil, "batch: cannot create a temporary file" end
  end

  -- Pass 1: index the input.
  local duplicates, invalid_shown = {}, {}
  local to_send, skipped, n_duplicates, n_invalid, n_items, lines_read = 0, 0, 0, 0, 0, 0
  do
    local f, ferr = io.open(opts.input, "rb")
    if not f then
      ledger:close()
      return nil, "batch: --in: " .. ferr
    end
    for n, buf, i, j in lines_of(f) do
      lines_read = n
      if buf == false or not blank(buf, i, j) then
        local id, why = check_line(buf, i, j, id_field)
        if not id then
          n_invalid = n_invalid + 1
          if #invalid_shown < 1000 then invalid_shown[#invalid_shown + 1] = { line = n, error = why } end
        else
          local key = key_of(id)
          local v = ids[key]
          if v == nil then
            ids[key] = 0
            to_send = to_send + 1
            n_items = n_items + 1
          elseif v > 0 then
            ids[key] = -(v + 1)
            skipped = skipped + 1
            n_items = n_items + 1
          else
            n_duplicates = n_duplicates + 1
            if #duplicates < 1000 then duplicates[#duplicates + 1] = { line = n, id = id } end
          end
        end
      end
    end
    f:close()
  end

  local client_ok, client = pcall(resilua.client, { policy = opts.policy or "default",
                                                   policy_path = opts.policy_path })
  if not client_ok then
    ledger:close()
    return nil, "batch: " .. tostring(client)
  end

  local t0 = core.now_ms()
  local finished, succeeded_now, since_sync, write_error = 0, 0, 0, nil
  local last_done_ms, last_failure, last_refusal = t0, nil, nil
  local is_tty = core.isatty(2)
  local show_bar = not opts.quiet and is_tty
  local show_status = not opts.quiet and not is_tty
  local extra_headers = {}
  for k, v in pairs(opts.headers or {}) do extra_headers[k] = v end

  local function progress()
    local width, total = 30, to_send
    local filled = total > 0 and math.floor(width * finished / total) or width
    local elapsed = (core.now_ms() - t0) / 1000
    io.stderr:write(("\r[%s%s] %d/%d  %d failed  %.0f items/s "):format(
      ("#"):rep(filled), ("."):rep(width - filled), finished, total, finished - succeeded_now,
      elapsed > 0 and finished / elapsed or 0))
  end

  -- Appends a finished item to the ledger (the dedup set points at it).
  local function record(id, ok, outcome, attempts, status, latency_ms, body, message)
    local line = result_line(id, ok, outcome, attempts, status, latency_ms, body, message)
    local okw, werr = ledger:write(line, "\n")
    if okw then okw, werr = ledger:flush() end
    since_sync = since_sync + 1
    if okw and since_sync >= chunk and ledger_path then
      okw, werr = core.fsync(ledger)
      since_sync = 0
    end
    if not okw then
      write_error = write_error or ("%s: %s"):format(ledger_path or "(temporary ledger)", tostring(werr))
      return
    end
    ids[key_of(id)] = -(ledger_size + 2)
    ledger_size = ledger_size + #line + 1
    finished = finished + 1
    if ok then succeeded_now = succeeded_now + 1 end
    last_done_ms = core.now_ms()
    if show_bar then progress() end
  end

  -- Pass 2: the items to send, read again as a stream.
  local send_file, sferr = io.open(opts.input, "rb")
  if not send_file then
    ledger:close()
    return nil, "batch: --in: " .. sferr
  end
  local send_lines = lines_of(send_file)
  local function next_to_send()
    for _, buf, i, j in send_lines do
      if buf then
        local kind, id = json.scan_in(buf, i, j, M.MAX_DEPTH, id_field)
        local key = kind == "object" and id and key_of(id)
        if key and ids[key] == 0 then
          ids[key] = -1
          return id, buf:sub(i, j)
        end
      end
    end
  end

  -- The request for an item, or nil and why the item is invalid.
  local function request_for(id, line)
    local req
    if build then
      local item = json.decode(line, M.MAX_DEPTH)
      local ok, r = pcall(build, item, opts)
      if not ok then return nil, "--request: " .. tostring(r) end
      if type(r) ~= "table" then return nil, "--request: the function must return a request table" end
      req = r
      if type(req.body) == "table" then
        local eok, body = pcall(M.encode, req.body)
        if not eok then return nil, "--request: body: " .. tostring(body) end
        req.body = body
      end
      if req.body ~= nil and type(req.body) ~= "string" then
        return nil, "--request: body must be a string or a table"
      end
    else
      req = { method = opts.method or "POST", body = line,
              headers = { ["Content-Type"] = "application/json" } }
    end
    req.url = req.url or opts.url
    req.headers = req.headers or {}
    for k, v in pairs(extra_headers) do req.headers[k] = v end
    req.headers["Idempotency-Key"] = M.key_for(id)
    if opts.http2 then req.http2 = true end
    return req
  end

  -- Workers run on core.call's callbacks: each records the item whose
  -- call ended (or pauses and resends it, same key) and starts the next.
  local active, in_flight, stopped = 0, 0, false
  local policy = client:policy()
  local max_attempts = policy.table.max_attempts
  local function new_worker()
    local id, req, attempts, hops, pause, started
    local worker
    local function send()
      if stopped then return end
      local sent, err = pcall(core.call, client.state, client:policy().core, req, worker)
      if sent then in_flight = in_flight + 1 end
      if not sent then
        record(id, false, "failed", attempts, nil, core.now_ms() - started, nil, "cannot send: " .. tostring(err))
        worker(nil)
      end
    end
    local function start_next()
      while not stopped and not write_error do
        local line
        id, line = next_to_send()
        if not id then break end
        local why
        req, why = request_for(id, line)
        started, attempts, hops, pause = core.now_ms(), 0, 0, PAUSE_MIN_S
        if req then return send() end
        record(id, false, "invalid_input", 0, nil, nil, nil, why)
      end
      active = active - 1
    end
    worker = function(r)
      if stopped then return end
      if r == nil then return start_next() end -- recorded already
      in_flight = in_flight - 1
      attempts = attempts + r.attempts
      local outcome, status = r.outcome, r.status
      if outcome == "breaker_open" or outcome == "throttled" then last_refusal = r end
      if r.error or (status and status >= 500) then last_failure = r end
      if outcome == "breaker_open" or outcome == "throttled"
          or (outcome == "budget" and attempts < max_attempts) then
        -- The dependency needs a rest: wait, then the same request, same key.
        core.timer(pause, send)
        pause = math.min(pause * 2, PAUSE_MAX_S)
        return
      end
      local message = r.message
      if message then -- the attempts of every send, not only the last one's
        message = message:gsub("after %d+ attempts?", ("after %d attempt%s"):format(
          attempts, attempts == 1 and "" or "s"))
      end
      if outcome == "ok" and status and status >= 300 and status < 400 then
        local location = r.headers and r.headers.location
        if opts.follow_redirects and location and hops < M.MAX_REDIRECTS then
          hops = hops + 1
          req.url = resolve_location(req.url, location)
          if status == 303 or ((status == 301 or status == 302) and req.method ~= "GET"
                                and req.method ~= "HEAD") then
            req.method, req.body = "GET", nil
          end
          -- Another request, so another key (the same on every run): a
          -- deduplicating server would answer 422 to the first one's.
          req.headers["Idempotency-Key"] = M.key_for(("%s %d %s"):format(id, hops, req.url))
          return send()
        end
        outcome = "failed"
        message = opts.follow_redirects and location
          and ("HTTP %d: more than %d redirects"):format(status, M.MAX_REDIRECTS)
          or ("HTTP %d: a redirect%s"):format(status, location and (" to " .. location) or "")
            .. (opts.follow_redirects and "" or " (not followed without --follow-redirects)")
      end
      local ok = outcome == "ok"
      record(id, ok, outcome, attempts, status, core.now_ms() - started,
             ok and (r.body or "") or nil, not ok and message or nil)
      start_next()
    end
    return start_next
  end

  -- The watchdog: a status line every STATUS_EVERY_S when stderr is not a
  -- terminal, and the stop when nothing completed for stall_s while no
  -- call is in flight (every item in progress waits on the breaker or the
  -- budget).  A slow upstream with calls in flight is no stall: the
  -- policy's deadline bounds those calls.
  local stalled, last_status_ms = nil, t0
  local function status_line()
    local elapsed = (core.now_ms() - t0) / 1000
    local bstate = client:breaker(opts.url) or "none"
    io.stderr:write(("batch: %d done, %d pending, %.1f%% ok, %.1f items/s, breaker %s\n"):format(
      finished, to_send - finished, finished > 0 and 100 * succeeded_now / finished or 100,
      elapsed > 0 and finished / elapsed or 0, bstate))
  end
  local function watch()
    if stopped then return end
    local now = core.now_ms()
    if show_status and now - last_status_ms >= M.STATUS_EVERY_S * 1000 then
      last_status_ms = now
      status_line()
    end
    if now - last_done_ms >= stall_s * 1000 and in_flight == 0 then
      local why
      local f = last_failure
      if f and f.error == "connect" then
        why = ("upstream unreachable: connect refused to %s"):format(host_of(opts.url))
      elseif last_refusal then
        why = ("circuit breaker open for %s%s"):format(host_of(opts.url),
          f and (" (last failure: %s)"):format(f.message or f.error or f.status) or "")
      elseif f then
        why = ("no item completed (last failure: %s)"):format(f.message or f.error or f.status)
      else
        why = "no item completed"
      end
      stalled = ("%s for %g s; %d items pending; rerun to resume"):format(
        why, stall_s, to_send - finished)
      stopped = true
      return
    end
    core.timer(WATCH_EVERY_S, watch)
  end

  if to_send > 0 then core.timer(WATCH_EVERY_S, watch) end
  for _ = 1, math.min(concurrency, to_send) do
    active = active + 1
    new_worker()()
  end
  local run_error
  while active > 0 and not stopped do
    if core.step() == 0 and active > 0 then
      run_error = "the loop ran dry with items in flight"
      break
    end
  end
  stopped = true
  send_file:close()
  if show_bar then io.stderr:write("\n") end
  if ledger_path then
    local synced, serr = core.fsync(ledger)
    if not synced then write_error = write_error or ("%s: %s"):format(ledger_path, tostring(serr)) end
  end
  if run_error or write_error then
    ledger:close()
    return nil, run_error and ("batch: " .. run_error) or ("batch: --ledger: cannot write " .. write_error)
  end

  -- The results, in input order, from the ledger; then the invalid lines.
  local report = { total = n_items + n_invalid, succeeded = 0, failed = 0, pending = 0,
                   skipped = skipped, invalid = n_invalid, duplicates = n_duplicates,
                   ledger_ignored = ledger_ignored, outcomes = {}, attempts = {},
                   failed_status = {} }
  local latencies, by_attempts, failed_by_status = core.hist(), {}, {}
  local function tally(ok, outcome, attempts, status, latency_ms)
    report.outcomes[outcome] = (report.outcomes[outcome] or 0) + 1
    if attempts then by_attempts[attempts] = (by_attempts[attempts] or 0) + 1 end
    if ok then
      report.succeeded = report.succeeded + 1
    elseif outcome == "pending" then
      report.pending = report.pending + 1
    else
      report.failed = report.failed + 1
      if status then failed_by_status[status] = (failed_by_status[status] or 0) + 1 end
    end
    if latency_ms then latencies:record(latency_ms) end
  end
  local pending_msg = stalled and ("not done: the run stopped (%s)"):format(stalled) or "not done"
  local function write_results(out)
    local f, ferr = io.open(opts.input, "rb")
    if not f then return nil, ferr end
    local read_invalid = false
    for _, buf, i, j in lines_of(f) do
      local id = check_line(buf, i, j, id_field)
      local key = id and key_of(id)
      local v = key and ids[key]
      if v then -- the first line with this id (the entry goes once written)
        ids[key] = nil
        local result
        if v <= -2 then
          ledger:seek("set", -v - 2)
          result = ledger:read("l")
        end
        local _, ok, outcome, attempts, status, latency = ledger_fields(result or "", 1, result and #result or 0)
        if not outcome then -- not done: sent on a rerun
          result, ok, outcome = result_line(id, false, "pending", 0, nil, nil, nil, pending_msg), false, "pending"
        end
        local wok, e = out:write(result, "\n")
        if not wok then f:close() return nil, e end
        tally(ok, outcome, attempts, status, latency)
      elseif not id and (buf == false or not blank(buf, i, j)) then
        read_invalid = true
      end
    end
    f:close()
    if not read_invalid then return true end
    f, ferr = io.open(opts.input, "rb")
    if not f then return nil, ferr end
    for n, buf, i, j in lines_of(f) do
      if buf == false or not blank(buf, i, j) then
        local id, why = check_line(buf, i, j, id_field)
        if not id then
          local wok, e = out:write(('{"line":%d,"ok":false,"outcome":"invalid_input","error":%s}\n'):format(
            n, json.quote(why) or '"invalid"'))
          if not wok then f:close() return nil, e end
        end
      end
    end
    f:close()
    return true
  end
  local written, werr = write_file("--out", out_path, write_results)
  ledger:close()
  if not written then return nil, "batch: " .. werr end

  for a, count in pairs(by_attempts) do report.attempts[tostring(a)] = count end
  for status, count in pairs(failed_by_status) do report.failed_status[tostring(status)] = count end
  local elapsed_s = (core.now_ms() - t0) / 1000
  report.invalid_lines = invalid_shown
  report.duplicate_ids = duplicates
  report.outcomes.invalid_input = (report.outcomes.invalid_input or 0) + n_invalid
  if report.outcomes.invalid_input == 0 then report.outcomes.invalid_input = nil end
  if latencies:count() > 0 then
    report.latency_ms = { p50 = latencies:percentile(50), p90 = latencies:percentile(90),
                          p99 = latencies:percentile(99), max = latencies:max() }
  else
    report.latency_ms = {}
  end
  report.elapsed_s = elapsed_s
  report.items_per_s = elapsed_s > 0 and finished / elapsed_s or 0
  report.lines = lines_read
  report.stalled = stalled
  if report_path then
    local rok, rerr = write_file("--report", report_path, function(f)
      return f:write(cjson.encode(report), "\n") and true
    end)
    if not rok then return nil, "batch: " .. rerr end
  end
  return report
end

--- Runs a batch.  opts: input, output, url, policy (name/file, default
-- "default", or a policy object from resilua.policy), policy_path,
-- concurrency (16), chunk (100), ledger
-- (output .. ".ledger"; false: none, and no resume), report (a JSON
-- file), id_field ("id"), method, headers, build (function(item) ->
-- request table; a table body is encoded canonically), quiet, stall_s
-- (60), retry_failed (true), follow_redirects (false).
-- Returns the report table (report.stalled holds the message when the
-- run stopped for want of progress), or nil and a message (an input,
-- output or configuration error; nothing is lost).
function M.run(opts)
  assert(type(opts) == "table", "batch: expected a table of options")
  -- Most of what a run allocates dies young (lines, result lines); the
  -- generational collector keeps the peak near the live dedup set.
  local gc_mode = collectgarbage("generational")
  local ok, report, err = pcall(run, opts)
  collectgarbage(gc_mode)
  if not ok then error(report, 0) end
  return report, err
end

--- The report as a terminal table.
function M.format(report)
  local lines = {
    ("items         %d (%d done before, %d invalid, %d duplicate ids)"):format(
      report.total, report.skipped, report.invalid, report.duplicates),
    ("succeeded     %d"):format(report.succeeded),
    ("failed        %d"):format(report.failed + report.invalid),
  }
  if report.pending > 0 then lines[#lines + 1] = ("pending       %d (rerun to resume)"):format(report.pending) end
  if report.ledger_ignored > 0 then
    lines[#lines + 1] = ("ledger        %d unusable line%s ignored (their items run again)"):format(
      report.ledger_ignored, report.ledger_ignored == 1 and "" or "s")
  end
  local names = {}
  for k in pairs(report.outcomes) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do
    if k ~= "ok" and k ~= "pending" then lines[#lines + 1] = ("  %-11s %d"):format(k, report.outcomes[k]) end
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
