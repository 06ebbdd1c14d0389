--- resilua.cli — the `resilua` command (contract 4).
--
-- Exit codes: 0 ok; 1 a script raised an error; 2 usage or configuration
-- error (bad flag, a policy that does not load or fails at decision time);
-- 3 failed (not retriable); 4 gave up (attempts, deadline or budget);
-- 5 breaker open.
local core = require "resilua.core"
local parse = require "resilua.getopt"

local M = {}

local EXIT = { ok = 0, script_error = 1, usage = 2, failed = 3, gave_up = 4, deadline = 4,
               budget = 4, breaker_open = 5, throttled = 5, policy_error = 2, some_failed = 6 }
M.EXIT = EXIT

local USAGE = [[
usage: resilua COMMAND [options]

Commands:
  call [options] URL          one call under a policy; body to stdout
  run SCRIPT.lua [args]       run a Lua script with the runtime loaded
  serve [--listen HOST:PORT] [--idle-timeout D] [SCRIPT.lua]
                              the scriptable upstream
  check POLICY...             load and validate policies; run their self-tests
  check --show POLICY         a policy's effective settings
  check --shadow LOG.jsonl    summarise the shadow events of a log
  policies                    list the policies on the policy path
  batch --in FILE --out FILE URL
                              batch inference: resumable, each item done once
  load (--rate R | --concurrency C) [options] URL
                              open- or closed-loop load; latency and retry summary
  proxy --listen HOST:PORT --upstream URL [--policy P] | --config FILE
                              a reverse proxy (sidecar): every request one call
  plan --slo "p95<800ms" --profile FILE
                              ranked retry plans for an SLO, simulated; --write, --verify

Options:
  -h, --help                  this text; `resilua COMMAND --help` for one command
  --version                   print the version

Exit codes: 0 ok, 1 script error, 2 usage or configuration error,
3 failed (not retriable), 4 gave up (attempts, deadline or budget), 5 breaker open,
6 a batch finished with some items failed.
]]

-- The override flags' help, shared by call, load and batch.
local POLICY_OVERRIDES_USAGE = [[
  --timeout D              per-try timeout (per_try_timeout_ms): 2s, 500ms
                           or seconds; lifts a shorter deadline to D
  --attempts N             attempts in all, the first included (max_attempts)
  --deadline D             the whole call, attempts and waits (deadline_ms)
  --no-breaker             no circuit breaker
  --no-budget              no retry budget
]]

local CALL_USAGE = [[
usage: resilua call [options] URL

Makes one HTTP call under a retry policy and writes the last response's
body to stdout.  Quiet by default: -v or --log show every attempt as a
JSON line (the event log).

Options:
  -X, --request METHOD     HTTP method (default GET, or POST with -d)
  -H, --header 'Name: v'   add a request header (repeatable)
  -d, --data DATA          request body; @FILE reads a file, @- reads stdin
  -o, --output FILE        write the body to FILE instead of stdout
  -i, --include            write the status and response headers first
  --json                   write the result as one JSON object: outcome,
                           status or error, attempts, elapsed_ms, headers,
                           body (body_base64 when it is not UTF-8)
  --http2                  HTTP/2: h2c with prior knowledge on http://, ALPN
                           on https://
  --grpc pkg.Service/Method
                           a unary gRPC call to URL's origin: -d is the
                           serialized request message, -H adds metadata, the
                           response message is the body (docs/grpc.md)
  --policy NAME|FILE.lua   retry policy (default: default)
  --policy-path DIR        where to look for policies by name (repeatable;
                           default ./policies, then the shipped ones)
]] .. POLICY_OVERRIDES_USAGE .. [[
  -v, --verbose            the event log on stderr
  --log FILE|-             the event log to FILE (- is stderr)
  --redact NAME            also mask the values of query parameters
                           called NAME in the log (repeatable; api_key,
                           token, sig, password... always are)
  --seed N                 seed the jitter PRNG (reproducible delays)
  -h, --help               this text

Exit codes: 0 ok, 2 usage or policy error (or -o cannot be written),
3 failed (not retriable; with --grpc, a gRPC status the policy does not
retry), 4 gave up (attempts, deadline or budget), 5 breaker open.
]]

local POLICIES_USAGE = [[
usage: resilua policies [--policy-path DIR]

Lists the policies on the policy path (default ./policies, then the
shipped ones): name and file; a name found in an earlier folder hides the
later ones (marked).
]]

local RUN_USAGE = [[
usage: resilua run SCRIPT.lua [args]

Runs a Lua script with resilua loaded (`require "resilua"`); the script
sees its arguments in `arg` and `...`.  After it returns, functions started
with resilua.go are waited for.  The exit code is the integer the script
returns (default 0), 1 when it raises an error.

Load experiments are such scripts (resilua.experiment): try
`resilua run experiments/outage.lua`, and `--help` after one for its options.
]]

local CHECK_USAGE = [[
usage: resilua check [--policy-path DIR] POLICY...
       resilua check [--policy-path DIR] --show POLICY
       resilua check --shadow LOG.jsonl

Loads and validates each policy (by name on the policy path, or FILE.lua)
and runs its self-tests (a `tests` list in the policy).  Prints one line
per policy, then every problem (not only the first) and warnings: a
deadline shorter than the per-try timeout, a decide without tests, a
retry_on that decide never lets apply.  Exit code 0 when all load and
pass (warnings included), 2 otherwise.

With --show, prints the policy's effective settings (after extend and the
defaults) as a policy file would spell them.

With --shadow, summarises the `shadow` events of an event log (a client
with a candidate policy in shadow): disagreements by (live decision,
candidate decision), by status or error class, and their share of the
attempts that were decided.  Exit code 0, 2 when the log cannot be read.
]]

local BATCH_USAGE = [[
usage: resilua batch --in ITEMS.jsonl --out RESULTS.jsonl [options] URL

Sends one call per input item (JSON Lines, each with an id) under a retry
policy, CONCURRENCY at a time.  The body sent is the item's line as it is
(byte for byte); the response stored is the upstream's bytes.  Transient
failures are retried; while the breaker is open, items wait instead of
failing.  Each item's Idempotency-Key is derived from its id's JSON text,
so a rerun is the same request.  Finished items go to an append-only
ledger; a rerun with the same ledger skips them, and sends again those
that failed transiently.  RESULTS.jsonl is written at the end, atomically:
one line per id, then one per invalid input line.  See docs/batch.md.

Options:
  --in FILE               input items, JSON Lines (required; a regular file)
  --out FILE              results, JSON Lines (required)
  --ledger FILE           progress ledger (default: OUT.ledger)
  --no-ledger             keep no ledger (no resume; for measuring its cost)
  --report FILE           also write the report as JSON
  --id-field NAME         the id's field (default: id)
  --concurrency N         calls in flight (default 16)
  --chunk N               fsync the ledger every N items (default 100)
  --request FILE.lua      builds each request: return function(item) return
                          { method=, url=, headers=, body= } end (a table
                          body is sent as canonical JSON; default: POST the
                          item's line as it is)
  --stall SECONDS         stop when no item completed for this long with
                          no call in flight, only items waiting on the
                          breaker (default 60); exit 4, a rerun resumes
  --no-retry-failed       a rerun skips items that failed transiently too
  --follow-redirects      follow 3xx (at most 5 hops); without it a 3xx fails
  -X METHOD  -H 'Name: value'  --policy NAME|FILE  --policy-path DIR
]] .. POLICY_OVERRIDES_USAGE .. [[
  --http2                 HTTP/2 (h2c on http://, ALPN on https://)
  --log FILE              event log (default: none; batches are long)
  --redact NAME           mask NAME's values too (repeatable; see call --help)
  --seed N                reproducible jitter
  --quiet                 no progress (bar or status lines); the summary stays
  -h, --help              this text

Exit codes: 0 every item ok, 2 usage or an input/output error (nothing
lost), 4 stopped: no progress for --stall seconds (pending items are
resumed by a rerun), 6 some items failed (see the report).
]]

local LOAD_USAGE = [[
usage: resilua load (--rate R | --concurrency C) [options] URL

Puts load on URL under a retry policy and prints what happened: calls,
outcomes, success rate, attempts and retry amplification (attempts per
call), latency percentiles for calls and for attempts, status and error
counts, the achieved rate and, open loop, how late the starts were.

Open loop (--rate): calls start on schedule whatever happens to earlier
ones, and a call's latency counts from its intended start, so an upstream
(or a client) that falls behind shows in the figures instead of slowing
the load down.  Closed loop (--concurrency): C calls in flight, each
starting when the previous one ends.  Failed and timed-out calls are
counted and kept in the latency figures (and in their own row).

Options:
  --rate R                 open loop: R calls/s
  --concurrency C          closed loop: C calls in flight (default 10 when
                           --rate is not given)
  --duration D             how long to start calls: 10s, 500ms, 2m or
                           seconds (default 10s); calls in flight at the
                           end are waited for
  --max-in-flight N        open loop: a due call is dropped (and counted)
                           when N are in flight (default 10000)
  --connections N          open loop: at most N attempts on the wire; the
                           others wait, and the wait counts in their latency
                           (default 1024)
  -X, --request METHOD     HTTP method (default GET, or POST with -d)
  -H, --header 'Name: v'   add a request header (repeatable)
  -d, --data DATA          request body; @FILE reads a file
  --http2                  HTTP/2 (h2c on http://, ALPN on https://); calls
                           share connections, multiplexed
  --grpc pkg.Service/Method
                           unary gRPC calls (-d: the request message)
  --policy NAME|FILE.lua   retry policy (default: no-retry, so that the
                           load goes out as with hey or vegeta)
  --policy-path DIR        where to look for policies by name (repeatable)
]] .. POLICY_OVERRIDES_USAGE .. [[
  --seed N                 seed the jitter PRNG
  --log FILE|-             event log (default: none)
  --redact NAME            mask NAME's values too (repeatable; see call --help)
  --json                   print the summary as one JSON object
  --quiet                  no progress lines on stderr
  -h, --help               this text

SIGINT, SIGTERM and SIGHUP stop starting calls, wait for those in flight
and print the summary of what ran, its rate over the time it ran.

Exit codes: 0 the run completed (whatever the calls' outcomes), 1 a
signal stopped it, 2 usage or configuration error.
]]

local function fail(cmd, msg)
  io.stderr:write(("resilua%s: %s\n"):format(cmd and (" " .. cmd) or "", msg))
  return EXIT.usage
end

local function read_data(arg)
  if arg:sub(1, 1) ~= "@" then return arg end
  local path = arg:sub(2)
  local f, err
  if path == "-" then f = io.stdin else f, err = io.open(path, "rb") end
  if not f then return nil, ("-d: cannot read %s"):format(err) end
  local data = f:read("a")
  if f ~= io.stdin then f:close() end
  return data
end

local function setup_log(cmd, opts)
  for _, name in ipairs(opts["--redact"] or {}) do
    if not pcall(core.redact, name) then
      return fail(cmd, ("--redact: expected a parameter name of 1 to 64 bytes, got '%s'"):format(name))
    end
  end
  if opts["--log"] then
    local ok, err = core.log(opts["--log"])
    if not ok then return fail(cmd, "--log: " .. err) end
  elseif opts["--quiet"] then
    core.log(false)
  end
  if opts["--seed"] then
    local n = math.tointeger(tonumber(opts["--seed"]))
    if not n then return fail(cmd, "--seed: expected an integer, got " .. opts["--seed"]) end
    core.seed(n)
  end
end

-- Flags that override the policy for one run (call, load, batch): what
-- curl and hey users reach for.  Each maps to one policy field.
local OVERRIDE_FLAGS = { ["--timeout"] = "value", ["--attempts"] = "value",
                         ["--deadline"] = "value", ["--no-breaker"] = "flag",
                         ["--no-budget"] = "flag" }

--- spec with the override flags added (a new table).
local function with_overrides(spec)
  local out = {}
  for k, v in pairs(spec) do out[k] = v end
  for k, v in pairs(OVERRIDE_FLAGS) do out[k] = v end
  return out
end

--- The policy fields the override flags set, in flag order, or nil, message.
-- A --timeout longer than the policy's deadline (with no --deadline) lifts
-- the deadline to it: one try may then run for as long as asked.
local function override_fields(opts, p)
  local set, shown = {}, {}
  local function duration(flag, field)
    if not opts[flag] then return true end
    local s = require("resilua.load").parse_duration(opts[flag])
    if not s or s * 1000 > 86400000 then
      return nil, ("%s: expected a duration such as 2s, 500ms or 1.5, up to a day, got %s")
        :format(flag, opts[flag])
    end
    set[field] = s * 1000
    shown[#shown + 1] = ("%s %s"):format(flag, opts[flag])
    return true
  end
  local ok, err = duration("--timeout", "per_try_timeout_ms")
  if ok then ok, err = duration("--deadline", "deadline_ms") end
  if not ok then return nil, err end
  if opts["--attempts"] then
    local n = math.tointeger(tonumber(opts["--attempts"]))
    if not n or n < 1 or n > 100 then
      return nil, "--attempts: expected an integer from 1 to 100, got " .. opts["--attempts"]
    end
    set.max_attempts = n
    shown[#shown + 1] = "--attempts " .. n
  end
  if opts["--no-breaker"] then set.breaker, shown[#shown + 1] = false, "--no-breaker" end
  if opts["--no-budget"] then set.budget, shown[#shown + 1] = false, "--no-budget" end
  if set.per_try_timeout_ms and not set.deadline_ms
     and set.per_try_timeout_ms > p.table.deadline_ms then
    set.deadline_ms = set.per_try_timeout_ms
  end
  return set, shown
end

--- The policy `opts` ask for (--policy, default `default_name`) with the
-- override flags applied: a policy object, or the name alone when no flag
-- overrides it (so a client given the name hot-reloads it); and the
-- overrides as text (a list).  nil, message on error.
local function policy_for(opts, default_name)
  local policy = require "resilua.policy"
  local p, err = policy.load(opts["--policy"] or default_name, policy.path(opts["--policy-path"]))
  if not p then return nil, "--policy: " .. err end
  local set, shown = override_fields(opts, p)
  if not set then return nil, shown end
  if #shown == 0 then return p, shown end
  -- loaded again with the fields replaced, in its own state (its decide
  -- and hooks live there)
  local q, qerr = policy.load(p.path, policy.path(opts["--policy-path"]), set)
  if not q then return nil, table.concat(shown, " ") .. ": " .. qerr end
  q.overrides = shown
  return q, shown
end

--- What call and load share: the body (-d), the headers' form (-H) and
-- the policy's client.  Returns body (or false), client; or nil and the
-- exit code after the error is printed.
local function request_setup(cmd, opts, default_policy)
  local body = false
  if opts["--data"] then
    local err
    body, err = read_data(opts["--data"])
    if not body then return nil, fail(cmd, err) end
  end
  for _, h in ipairs(opts["--header"] or {}) do
    if not h:match("^[^:%s]+:") then
      return nil, fail(cmd, ("-H: expected 'Name: value', got '%s'"):format(h))
    end
  end
  local p, perr = policy_for(opts, default_policy or "default")
  if not p then return nil, fail(cmd, perr) end
  return body, require("resilua").client{ policy = p }
end

local CALL_JSON_ORDER = { [""] = { "outcome", "status", "error", "grpc_status", "grpc_message",
                                   "attempts", "elapsed_ms",
                                   "call_id", "message", "policy", "headers", "body",
                                   "body_base64" } }

--- call --json: the result as one object.  A body that is not UTF-8
-- goes as body_base64, so its bytes survive.
local function call_json(final, outcome, p)
  local json = require "resilua.json"
  local o = { outcome = outcome, status = final.status, error = final.error,
              grpc_status = final.grpc_status, grpc_message = final.grpc_message,
              attempts = final.attempts, elapsed_ms = final.elapsed_ms,
              call_id = final.call_id, message = final.message,
              policy = p.name, headers = final.headers }
  if final.body then
    if utf8.len(final.body) then o.body = final.body else o.body_base64 = json.base64(final.body) end
  end
  return json.encode(o, CALL_JSON_ORDER) .. "\n"
end

--- call -i: the status and the headers (lower-case names, sorted), a
-- blank line, then the body.
local function head_of(final)
  local names, lines = {}, { ("HTTP %d"):format(final.status) }
  for k in pairs(final.headers or {}) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do lines[#lines + 1] = ("%s: %s"):format(k, final.headers[k]) end
  return table.concat(lines, "\r\n") .. "\r\n\r\n"
end

function M.call(args)
  local opts, pos = parse(args, 2, with_overrides{
    ["--request"] = "value", ["--header"] = "list", ["--data"] = "value",
    ["--policy"] = "value", ["--policy-path"] = "list", ["--log"] = "value", ["--redact"] = "list",
    ["--verbose"] = "flag", ["--output"] = "value", ["--include"] = "flag", ["--json"] = "flag",
    ["--quiet"] = "flag", ["--seed"] = "value", ["--help"] = "flag",
    ["--grpc"] = "value", ["--http2"] = "flag",
  }, { ["-X"] = "--request", ["-H"] = "--header", ["-d"] = "--data", ["-h"] = "--help",
       ["-v"] = "--verbose", ["-o"] = "--output", ["-i"] = "--include" })
  if not opts then return fail("call", pos .. " (see resilua call --help)") end
  if opts["--grpc"] and opts["--request"] then return fail("call", "--grpc: a gRPC call is a POST; no -X") end
  if opts["--help"] then io.stdout:write(CALL_USAGE) return EXIT.ok end
  if #pos ~= 1 then
    return fail("call", (#pos == 0 and "missing URL" or "expected one URL, got " .. #pos)
                .. " (see resilua call --help)")
  end
  -- Quiet by default: the event log only with -v (stderr) or --log.
  if not opts["--log"] and (opts["--quiet"] or not opts["--verbose"]) then core.log(false) end
  local code = setup_log("call", opts)
  if code then return code end
  local body, client = request_setup("call", opts)
  if body == nil then return client end
  body = body or nil
  -- -o: opened before anything is sent, so a bad path costs no request.
  local out = io.stdout
  if opts["--output"] and opts["--output"] ~= "-" then
    local ferr
    out, ferr = io.open(opts["--output"], "wb")
    if not out then return fail("call", "-o: " .. ferr) end
  end
  local ok, res, err = pcall(client.call, client, {
    method = opts["--request"], url = pos[1], headers = opts["--header"], body = body,
    grpc = opts["--grpc"], http2 = opts["--http2"],
  })
  if not ok then
    if out ~= io.stdout then out:close() end
    return fail("call", tostring(res):gsub("^call: ", ""))
  end
  local final = res or err
  local text
  if opts["--json"] then
    text = call_json(final, res and "ok" or err.outcome, client:policy())
  elseif final.body or (opts["--include"] and final.status) then
    text = (opts["--include"] and final.status and head_of(final) or "") .. (final.body or "")
  end
  local written, werr = true, nil
  if text then written, werr = out:write(text) end
  if written then written, werr = out:flush() end
  if out ~= io.stdout then
    local closed, cerr = out:close()
    if written and not closed then written, werr = false, cerr end
  end
  if not written then return fail("call", "cannot write the body: " .. tostring(werr)) end
  if res then return EXIT.ok end
  -- A body without a final newline must not run into the error line when
  -- both reach one terminal (or one file, with 2>&1).
  local sep = (out == io.stdout and text and text ~= "" and text:sub(-1) ~= "\n") and "\n" or ""
  -- the outcome already says "policy_error": not "policy error:" again
  local message = (err.message or ""):gsub("^policy error: ", "")
  io.stderr:write(("%sresilua call: %s: %s\n"):format(sep, err.outcome, message))
  return EXIT[err.outcome] or EXIT.failed
end

function M.run(args)
  local script = args[2]
  if script == "--help" or script == "-h" then io.stdout:write(RUN_USAGE) return EXIT.ok end
  if not script then return fail("run", "missing SCRIPT.lua (see resilua run --help)") end
  local chunk, err = loadfile(script, "t")
  if not chunk then return fail("run", err) end
  local script_args = { [0] = script }
  for i = 3, #args do script_args[#script_args + 1] = args[i] end
  _G.arg = script_args
  local resilua = require "resilua"
  local results = table.pack(core.pcall(0, chunk, table.unpack(script_args)))
  if not results[1] then
    io.stderr:write("resilua run: ", tostring(results[2]), "\n")
    return EXIT.script_error
  end
  local ok, errs = resilua.wait()
  if not ok then
    io.stderr:write(("resilua run: %d go'd function(s) raised an error\n"):format(#errs))
    return EXIT.script_error
  end
  return math.tointeger(results[2]) or EXIT.ok
end

--- Lines "  key  n" sorted by count (then key), for the shadow summary.
local function print_counts(title, counts, total)
  local keys = {}
  for k in pairs(counts) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    if counts[a] ~= counts[b] then return counts[a] > counts[b] end
    return a < b
  end)
  print(title)
  for _, k in ipairs(keys) do
    print(("  %-28s %6d  %5.1f%%"):format(k, counts[k], 100 * counts[k] / total))
  end
end

--- `check --shadow LOG`: a summary of a log's shadow events.
local function shadow_summary(path)
  local f, err = io.open(path, "rb")
  if not f then return fail("check", "--shadow: " .. err) end
  local cjson = require "cjson.safe"
  local decided, attempts, bad = 0, 0, 0
  local shadows, by_pair, by_what, pairs_seen = 0, {}, {}, {}
  for line in f:lines() do
    local e = cjson.decode(line)
    if type(e) ~= "table" then
      bad = bad + (line:match("%S") and 1 or 0)
    elseif e.event == "attempt" then
      attempts = attempts + 1
      if e.decision ~= "ok" then decided = decided + 1 end
    elseif e.event == "shadow" then
      shadows = shadows + 1
      local pair = ("%s -> %s"):format(tostring(e.decision), tostring(e.shadow_decision))
      if e.decision == "retry" and e.shadow_decision == "retry" then pair = pair .. " (delay)" end
      by_pair[pair] = (by_pair[pair] or 0) + 1
      local what = e.status and ("HTTP %d"):format(e.status) or tostring(e.error)
      by_what[what] = (by_what[what] or 0) + 1
      local versions = ("%s %s vs %s %s"):format(tostring(e.policy), tostring(e.policy_version),
                                                  tostring(e.shadow_policy), tostring(e.shadow_version))
      pairs_seen[versions] = (pairs_seen[versions] or 0) + 1
    end
  end
  f:close()
  print(("shadow: %d disagreement%s in %d decided attempt%s (%.1f%%); %d attempts in all")
    :format(shadows, shadows == 1 and "" or "s", decided, decided == 1 and "" or "s",
            decided > 0 and 100 * shadows / decided or 0, attempts))
  if bad > 0 then print(("  (%d line%s not JSON, skipped)"):format(bad, bad == 1 and "" or "s")) end
  if shadows > 0 then
    print_counts("by decision (live -> candidate):", by_pair, shadows)
    print_counts("by status/error:", by_what, shadows)
    print_counts("by policies (live version vs candidate version):", pairs_seen, shadows)
  end
  return EXIT.ok
end

function M.check(args)
  local opts, pos = parse(args, 2, { ["--policy-path"] = "list", ["--help"] = "flag",
                                     ["--shadow"] = "value", ["--show"] = "value" },
                          { ["-h"] = "--help" })
  if not opts then return fail("check", pos) end
  if opts["--help"] then io.stdout:write(CHECK_USAGE) return EXIT.ok end
  if opts["--shadow"] then
    if #pos > 0 then return fail("check", "--shadow takes a log, not policies") end
    return shadow_summary(opts["--shadow"])
  end
  local policy = require "resilua.policy"
  local check = require "resilua.check"
  local path = policy.path(opts["--policy-path"])
  core.log(false) -- check speaks in lines for humans, not in events
  if opts["--show"] then
    if #pos > 0 then return fail("check", "--show takes one policy, not a list") end
    local ok, err = check.show(opts["--show"], path)
    if not ok then return fail("check", err) end
    return EXIT.ok
  end
  if #pos == 0 then return fail("check", "no policy given (see resilua check --help)") end
  return check.run(pos, path) and EXIT.ok or EXIT.usage
end

function M.policies(args)
  local opts, pos = parse(args, 2, { ["--policy-path"] = "list", ["--help"] = "flag" },
                          { ["-h"] = "--help" })
  if not opts then return fail("policies", pos) end
  if opts["--help"] then io.stdout:write(POLICIES_USAGE) return EXIT.ok end
  if #pos > 0 then return fail("policies", "takes no arguments (see resilua policies --help)") end
  require("resilua.check").list(require("resilua.policy").path(opts["--policy-path"]))
  return EXIT.ok
end

--- The given flags' values as integers >= 1, by flag (absent flags are
-- left out), or nil and a message naming the first bad one.
local function positive_integers(opts, flags)
  local out = {}
  for _, flag in ipairs(flags) do
    if opts[flag] then
      out[flag] = math.tointeger(tonumber(opts[flag]))
      if not out[flag] or out[flag] < 1 then
        return nil, ("%s: expected an integer >= 1, got %s"):format(flag, opts[flag])
      end
    end
  end
  return out
end

function M.batch(args)
  local opts, pos = parse(args, 2, with_overrides{
    ["--in"] = "value", ["--out"] = "value", ["--ledger"] = "value", ["--no-ledger"] = "flag",
    ["--report"] = "value",
    ["--id-field"] = "value", ["--concurrency"] = "value", ["--chunk"] = "value",
    ["--request"] = "value", ["--header"] = "list", ["--method"] = "value",
    ["--policy"] = "value", ["--policy-path"] = "list", ["--log"] = "value", ["--redact"] = "list",
    ["--quiet"] = "flag", ["--seed"] = "value", ["--help"] = "flag", ["--http2"] = "flag",
    ["--stall"] = "value", ["--no-retry-failed"] = "flag", ["--follow-redirects"] = "flag",
  }, { ["-X"] = "--method", ["-H"] = "--header", ["-h"] = "--help" })
  if not opts then return fail("batch", pos .. " (see resilua batch --help)") end
  local stall_s = tonumber(opts["--stall"] or "60")
  if not stall_s or stall_s <= 0 or stall_s ~= stall_s or stall_s == math.huge then
    return fail("batch", ("--stall: expected a number of seconds > 0, got %s"):format(opts["--stall"]))
  end
  if opts["--help"] then io.stdout:write(BATCH_USAGE) return EXIT.ok end
  for _, flag in ipairs({ "--in", "--out" }) do
    if not opts[flag] then return fail("batch", ("missing %s (see resilua batch --help)"):format(flag)) end
  end
  if #pos ~= 1 then return fail("batch", "expected one URL (see resilua batch --help)") end
  if not opts["--log"] then core.log(false) end
  local code = setup_log("batch", opts)
  if code then return code end
  local numbers, bad = positive_integers(opts, { "--concurrency", "--chunk" })
  if not numbers then return fail("batch", bad) end
  local headers = {}
  for _, h in ipairs(opts["--header"] or {}) do
    local name, value = h:match("^([^:%s]+):%s*(.*)$")
    if not name then return fail("batch", ("-H: expected 'Name: value', got '%s'"):format(h)) end
    headers[name] = value
  end
  local build
  if opts["--request"] then
    local chunk, err = loadfile(opts["--request"], "t")
    if not chunk then return fail("batch", "--request: " .. err) end
    local ok, fn = core.pcall(0, chunk)
    if not ok or type(fn) ~= "function" then
      return fail("batch", "--request: " .. (ok and "must return a function(item)" or fn))
    end
    build = function(item)
      local req = fn(item)
      if type(req) ~= "table" then error("--request: the function must return a request table", 0) end
      return req
    end
  end
  -- With an override flag, batch gets the policy object (no hot reload);
  -- without, the name, which it loads and watches itself.
  local policy = opts["--policy"]
  for flag in pairs(OVERRIDE_FLAGS) do
    if opts[flag] then
      local perr
      policy, perr = policy_for(opts, "default")
      if not policy then return fail("batch", perr) end
      break
    end
  end
  local batch = require "resilua.batch"
  local report, err = batch.run{
    input = opts["--in"], output = opts["--out"], url = pos[1],
    ledger = not opts["--no-ledger"] and opts["--ledger"],
    report = opts["--report"], id_field = opts["--id-field"], method = opts["--method"],
    concurrency = numbers["--concurrency"], chunk = numbers["--chunk"], headers = headers,
    build = build, quiet = opts["--quiet"], policy = policy,
    policy_path = opts["--policy-path"], stall_s = stall_s, http2 = opts["--http2"],
    retry_failed = not opts["--no-retry-failed"], follow_redirects = opts["--follow-redirects"],
  }
  if not report then return fail(nil, err) end
  io.stderr:write(batch.format(report)) -- --quiet hides progress, never the summary
  if report.stalled then
    io.stderr:write("resilua batch: stopped: ", report.stalled, "\n")
    return batch.EXIT_STALLED
  end
  return (report.failed + report.invalid) > 0 and EXIT.some_failed or EXIT.ok
end

function M.load(args)
  local opts, pos = parse(args, 2, with_overrides{
    ["--rate"] = "value", ["--concurrency"] = "value", ["--duration"] = "value",
    ["--max-in-flight"] = "value", ["--connections"] = "value",
    ["--request"] = "value", ["--header"] = "list", ["--data"] = "value",
    ["--policy"] = "value", ["--policy-path"] = "list", ["--log"] = "value", ["--redact"] = "list",
    ["--json"] = "flag", ["--quiet"] = "flag", ["--seed"] = "value", ["--help"] = "flag",
    ["--grpc"] = "value", ["--http2"] = "flag",
  }, { ["-X"] = "--request", ["-H"] = "--header", ["-d"] = "--data", ["-h"] = "--help" })
  if not opts then return fail("load", pos .. " (see resilua load --help)") end
  if opts["--grpc"] and opts["--request"] then return fail("load", "--grpc: a gRPC call is a POST; no -X") end
  if opts["--help"] then io.stdout:write(LOAD_USAGE) return EXIT.ok end
  if #pos ~= 1 then
    return fail("load", (#pos == 0 and "missing URL" or "expected one URL, got " .. #pos)
                .. " (see resilua load --help)")
  end
  local load = require "resilua.load"
  if opts["--rate"] and opts["--concurrency"] then
    return fail("load", "--rate and --concurrency: give one (open or closed loop)")
  end
  local rate, conc
  if opts["--rate"] then
    rate = tonumber(opts["--rate"])
    if not rate or rate <= 0 or rate > 1e6 then
      return fail("load", "--rate: expected calls/s > 0, got " .. opts["--rate"])
    end
  else
    conc = math.tointeger(tonumber(opts["--concurrency"] or "10"))
    if not conc or conc < 1 or conc > 100000 then
      return fail("load", "--concurrency: expected an integer >= 1, got " .. opts["--concurrency"])
    end
  end
  local caps, bad = positive_integers(opts, { "--max-in-flight", "--connections" })
  if not caps then return fail("load", bad) end
  local duration_s = load.parse_duration(opts["--duration"] or "10s")
  if not duration_s then
    return fail("load", "--duration: expected e.g. 10s, 500ms, 2m or seconds, got "
                .. opts["--duration"])
  end
  if rate and rate * duration_s > 1e9 then return fail("load", "--rate: too many calls") end
  -- Load runs are long: no event log unless asked for.
  if not opts["--log"] then core.log(false) end
  local code = setup_log("load", opts)
  if code then return code end
  -- no-retry by default: the load goes out whatever the target answers.
  local body, client = request_setup("load", opts, "no-retry")
  if body == nil then return client end
  body = body or nil
  local progress
  if not opts["--quiet"] and duration_s > 2 and core.isatty(2) then
    progress = function(line) io.stderr:write(line, "\n") end
  end
  local report, err = load.run{
    url = pos[1], method = opts["--request"] or ((body or opts["--grpc"]) and "POST" or "GET"),
    headers = opts["--header"], body = body, client = client, policy_name = client:policy().name,
    grpc = opts["--grpc"], http2 = opts["--http2"],
    policy_overrides = client:policy().overrides,
    rate = rate, concurrency = conc, duration_s = duration_s,
    max_in_flight = caps["--max-in-flight"], connections = caps["--connections"],
    progress = progress,
  }
  if not report then return fail("load", (tostring(err):gsub("^call: ", ""))) end
  io.stdout:write(opts["--json"] and load.json(report) or load.format(report))
  return report.interrupted and EXIT.script_error or EXIT.ok
end

function M.serve(args)
  local serve = require "resilua.serve"
  local opts, pos = parse(args, 2, { ["--listen"] = "value", ["--idle-timeout"] = "value",
                                    ["--help"] = "flag" }, { ["-h"] = "--help" })
  if not opts then return fail("serve", pos .. " (see resilua serve --help)") end
  if opts["--help"] then io.stdout:write(serve.USAGE) return EXIT.ok end
  if #pos > 1 then return fail("serve", "one SCRIPT.lua at most (see resilua serve --help)") end
  local idle_ms
  if opts["--idle-timeout"] then
    local s = require("resilua.load").parse_duration(opts["--idle-timeout"])
    idle_ms = s and math.floor(s * 1000 + 0.5)
    if not idle_ms or idle_ms < 1 or idle_ms > 86400000 then
      return fail("serve", "--idle-timeout: expected a duration such as 60s, 500ms or 2m, "
                  .. "from 1ms up to a day, got " .. opts["--idle-timeout"])
    end
  end
  return serve.run{ listen = opts["--listen"], script = pos[1], idle_timeout_ms = idle_ms }
end

function M.proxy(args) return require("resilua.proxy").main(args) end

function M.main(args)
  local cmd = args[1]
  if cmd == nil or cmd == "-h" or cmd == "--help" or cmd == "help" then
    io.stdout:write(USAGE)
    return cmd == nil and EXIT.usage or EXIT.ok
  end
  if cmd == "--version" or cmd == "version" then
    print("resilua " .. core.version)
    return EXIT.ok
  end
  local handler = ({ call = M.call, run = M.run, serve = M.serve, check = M.check,
                     policies = M.policies,
                     batch = M.batch, load = M.load, proxy = M.proxy,
                     plan = function(a) return require("resilua.plan").main(a) end })[cmd]
  if not handler then return fail(nil, ("unknown command '%s' (see resilua --help)"):format(cmd)) end
  return handler(args)
end

return M
