--- resilua.serve — the `resilua serve` command (contract 6): the scriptable
-- upstream.  Loads the handler script, listens, prints `listening on
-- HOST:PORT` once it accepts, and runs the loop until SIGINT or SIGTERM.
-- Its arguments are parsed by resilua.cli.
-- The HTTP side, Idempotency-Key dedup and /_stats are in src/server.c.
local core = require "resilua.core"

local USAGE = [[
usage: resilua serve [--listen HOST:PORT] [--idle-timeout D] [SCRIPT.lua]

A scriptable HTTP upstream for experiments.  SCRIPT.lua returns the handler:

  return function(req)  -- req: method, path, query, headers (lower-case), body, n
    return { status = 503, headers = { ["Retry-After"] = "1" }, body = "...",
             delay_ms = 0, action = nil }  -- action: "hang" | "reset" | "close"
  end

Without a script it is a model stub answering 200 {"prediction": ...}.
Requests with an Idempotency-Key are deduplicated (a completed key is
replayed, one still in flight gets 409, a different request 422).
GET /_stats answers JSON counters.  SIGINT or SIGTERM stop it (exit 0).

For an upstream that fails by running out of capacity, return the handler
of a capacity model (resilua.upstream): N workers, a bounded FIFO queue
(full: 503 at once), service times from a distribution, seeded faults, and
timed phases (outages, slowdowns, capacity drops):

  return require("resilua.upstream").new{
    seed = 1, workers = 16, queue = 200,
    service_ms = { dist = "lognormal", median = 20, sigma = 0.5 },
    faults = { { p = 0.01, status = 503 } },
    phases = { { name = "brownout", from = 10, to = 20, workers = 4 } },
  }:handler()

A request whose client gave up keeps its worker until its service ends, so
retries can keep it overloaded after the phase is over.

Options:
  --listen HOST:PORT   address to listen on (default 127.0.0.1:8080; port 0 picks one)
  --idle-timeout D     close a connection idle this long (HTTP/1.1; h2c says
                       GOAWAY first): 60s (the default), 500ms, 2m, up to a day
  -h, --help           this text

Exit codes: 0 stopped by a signal, 2 usage, script or listen error.
]]

local EXIT_OK, EXIT_USAGE = 0, 2
local DEFAULT_LISTEN = "127.0.0.1:8080"
local STEP_MAX_WAIT_S = 1 -- the signalfd wakes the loop sooner

local function fail(msg)
  io.stderr:write("resilua serve: ", msg, "\n")
  return EXIT_USAGE
end

--- Loads SCRIPT (text only) and runs it for the handler it returns.
local function load_handler(path)
  local chunk, err = loadfile(path, "t")
  if not chunk then return nil, err end
  local ok, handler = core.pcall(0, chunk)
  if not ok then return nil, (tostring(handler):gsub("\nstack traceback:.*", "")) end
  if type(handler) ~= "function" then
    return nil, ("%s: must return the handler function, got %s"):format(path, type(handler))
  end
  return handler
end

--- Serves until SIGINT or SIGTERM.  opts: listen (HOST:PORT), script
-- (a handler file, or nil for the model stub), idle_timeout_ms (nil: the
-- server's default).  Returns the exit code.
local function run(opts)
  local listen, script = opts.listen or DEFAULT_LISTEN, opts.script
  local handler
  if script then
    local err
    handler, err = load_handler(script)
    if not handler then return fail(err) end
  end

  core.catch_signals()
  local server, err = core.serve{ listen = listen, handler = handler,
                                  idle_timeout_ms = opts.idle_timeout_ms }
  if not server then return fail(err) end
  io.stdout:write("listening on ", server:address(), "\n")
  io.stdout:flush()
  while core.stop_signal() == 0 do core.step(STEP_MAX_WAIT_S) end
  server:close()
  return EXIT_OK
end

return { run = run, USAGE = USAGE }
