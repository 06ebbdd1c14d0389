--- bench/proc.lua — process and file helpers shared by the benches: shell
-- quoting, reading and writing files, timeout(1) guards, and a session that
-- owns a temporary directory and the background processes started in it.
--
-- Uses resilua.sleep and core.now_ms, so it runs inside the binary.  Loaded
-- with `dofile(here .. "/proc.lua")`, `here` being the folder of the bench
-- script (from arg[0]), which works from any working directory.
local resilua = require "resilua"
local core = require "resilua.core"

local M = {}

--- s quoted for sh.
function M.q(s) return "'" .. tostring(s):gsub("'", [['\'']]) .. "'" end

--- A shell command line from an argv list, each word quoted.
function M.argv(list)
  local out = {}
  for i, w in ipairs(list) do out[i] = M.q(w) end
  return table.concat(out, " ")
end

--- The file's content, or nil if it cannot be read.
function M.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

function M.write_file(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

function M.sh_ok(cmd) return os.execute(cmd) == true end
function M.have(prog) return M.sh_ok("command -v " .. prog .. " >/dev/null 2>&1") end

M.HAVE_TIMEOUT = M.have("timeout")

--- The command line for argv, under `timeout -k 5 secs` when timeout(1) is
-- installed: no child outlives a bench killed halfway by more than that.
function M.guarded(list, secs)
  if M.HAVE_TIMEOUT then return ("timeout -k 5 %d %s"):format(secs, M.argv(list)) end
  return M.argv(list)
end

--- The exit status of a spawned process, or nil while it runs.
function M.exit_status(p) return tonumber(M.read_file(p.status) or "") end

--- The process that does the work: the child of timeout(1), or p itself.
function M.worker_pid(p)
  if not M.HAVE_TIMEOUT then return p.pid end
  local kids = M.read_file(("/proc/%d/task/%d/children"):format(p.pid, p.pid)) or ""
  return tonumber(kids:match("%d+")) or p.pid
end

--- SIGTERM (timeout(1) passes it on), then SIGKILL to both after timeout_s
-- (default 10).  Returns the exit status, or nil if none was recorded.
function M.stop(p, timeout_s)
  if p.stopped then return p.exit end
  p.stopped = true
  local worker = M.worker_pid(p)
  if not M.exit_status(p) then
    os.execute(("kill -TERM %d 2>/dev/null"):format(p.pid))
    local deadline = core.now_ms() + (timeout_s or 10) * 1000
    while not M.exit_status(p) and core.now_ms() < deadline do resilua.sleep(0.02) end
    if not M.exit_status(p) then
      os.execute(("kill -KILL %d %d 2>/dev/null"):format(p.pid, worker))
      for _ = 1, 100 do
        if M.exit_status(p) then break end
        resilua.sleep(0.02)
      end
    end
  end
  p.exit = M.exit_status(p)
  return p.exit
end

--- Waits for a spawned `resilua serve` to print its `listening on` line;
-- returns host:port, or nil if it exited or timeout_ms (default 20 s) passed.
function M.listening(p, timeout_ms)
  local deadline = core.now_ms() + (timeout_ms or 20000)
  repeat
    local hostport = (M.read_file(p.out) or ""):match("listening on (%S+:%d+)\n")
    if hostport then return hostport end
    if M.exit_status(p) then return nil end
    resilua.sleep(0.02)
  until core.now_ms() > deadline
  return nil
end

--- Calls each part with the arguments, on its own: one that breaks does not
-- hide the others.  Returns how many failed.
function M.run_parts(parts, ...)
  local failed = 0
  for _, part in ipairs(parts) do
    local ok, err = xpcall(part, debug.traceback, ...)
    if not ok then
      failed = failed + 1
      io.stdout:flush()
      io.stderr:write("\nbench: a part failed: ", tostring(err), "\n")
    end
  end
  return failed
end

--- Sessions ---------------------------------------------------------------------

local Session = {}
Session.__index = Session

--- A session with a fresh directory /tmp/<prefix>.XXXXXX; children it starts
-- live at most safety_s seconds unless told otherwise.  Close it on the way
-- out, errors included.
function M.session(prefix, safety_s)
  local p = io.popen(("mktemp -d /tmp/%s.XXXXXX"):format(prefix))
  local dir = p:read("l")
  p:close()
  assert(dir and dir ~= "", "mktemp -d failed")
  return setmetatable({ dir = dir, prefix = prefix, safety_s = safety_s, procs = {} }, Session)
end

function Session:tmp(name) return self.dir .. "/" .. name end

--- Starts argv in the background (stdin from /dev/null, stdout and stderr to
-- files) under timeout(1) for secs (default the session's); a watcher shell
-- records its exit status.  Returns { name, pid, out, err, status }.
function Session:spawn(name, list, secs)
  local p = { name = name, out = self:tmp(name .. ".out"), err = self:tmp(name .. ".err"),
              pidf = self:tmp(name .. ".pid"), status = self:tmp(name .. ".status") }
  local q = M.q
  -- Written to .tmp then renamed, so a reader never sees half a number.
  os.execute(("( (exec %s) >%s 2>%s </dev/null & echo $! >%s.tmp; mv %s.tmp %s; wait $!; "
              .. "echo $? >%s.tmp; mv %s.tmp %s ) >/dev/null 2>&1 &")
    :format(M.guarded(list, secs or self.safety_s), q(p.out), q(p.err), q(p.pidf), q(p.pidf),
            q(p.pidf), q(p.status), q(p.status), q(p.status)))
  for _ = 1, 500 do
    p.pid = tonumber(M.read_file(p.pidf) or "")
    if p.pid then break end
    resilua.sleep(0.01)
  end
  if not p.pid then error("could not start " .. name) end
  self.procs[#self.procs + 1] = p
  return p
end

--- Runs argv to completion under timeout(1) for secs (default the
-- session's); returns its stdout, whether it succeeded, and its stderr.
function Session:run(name, list, secs)
  local out, err = self:tmp(name .. ".out"), self:tmp(name .. ".err")
  local ok = os.execute(("%s >%s 2>%s </dev/null"):format(M.guarded(list, secs or self.safety_s),
                                                         M.q(out), M.q(err)))
  return M.read_file(out) or "", ok == true, M.read_file(err) or ""
end

--- Runs main() under a traceback handler, then closes the session whatever
-- happened.  main returns how many parts failed; returns the bench's exit
-- code: 0 when none did, else 1.
function Session:run_main(main)
  local ok, failed = xpcall(main, debug.traceback)
  self:close()
  if not ok then
    io.stderr:write("bench: ", tostring(failed), "\n")
    return 1
  end
  return failed == 0 and 0 or 1
end

--- Stops every process the session started and removes its directory.
function Session:close()
  for _, p in ipairs(self.procs) do pcall(M.stop, p) end
  -- Only what mktemp made: never rm -rf a path that went wrong.
  if self.dir:sub(1, #self.prefix + 6) == "/tmp/" .. self.prefix .. "." then
    os.execute("rm -rf " .. M.q(self.dir))
  end
end

return M
