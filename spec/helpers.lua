--- Shared spec helpers: temporary files, shell commands, background
-- processes, HTTP through the `curl` tool, and a `resilua serve` upstream.
-- Specs run the real binary: RESILUA_BIN, or build/bin/resilua.
local system = require "system" -- luasystem, a busted dependency: sleep, monotime

local M = {}

M.bin = os.getenv("RESILUA_BIN") or "build/bin/resilua"

--- Quotes s for the shell.
function M.quote(s)
  return "'" .. tostring(s):gsub("'", [['\'']]) .. "'"
end

M.sleep = system.sleep
M.now = system.monotime

--- Polls fn every `interval_s` until it returns a true value (returned)
-- or `timeout_s` passes (nil).
function M.wait_until(fn, timeout_s, interval_s)
  local deadline = M.now() + (timeout_s or 10)
  repeat
    local v = fn()
    if v then return v end
    M.sleep(interval_s or 0.02)
  until M.now() > deadline
  return fn() or nil
end

-- Temporary directories are removed when the Lua state closes.
local tmpdirs = {}
M._tmp_sentinel = setmetatable({}, { __gc = function()
  for _, d in ipairs(tmpdirs) do os.execute("rm -rf " .. M.quote(d)) end
end })

--- A fresh temporary directory (removed at exit).
function M.tmpdir()
  local p = io.popen("mktemp -d /tmp/resilua-spec.XXXXXX")
  local dir = p:read("l")
  p:close()
  assert(dir and dir ~= "", "mktemp -d failed")
  tmpdirs[#tmpdirs + 1] = dir
  return dir
end

local scratch
local scratch_n = 0
--- A new path in a shared scratch directory; `suffix` e.g. ".lua".
function M.tmpname(suffix)
  scratch = scratch or M.tmpdir()
  scratch_n = scratch_n + 1
  return ("%s/%d%s"):format(scratch, scratch_n, suffix or "")
end

--- Writes content to path (a new temporary file if path is nil); returns path.
function M.write_file(path, content)
  path = path or M.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(content)
  f:close()
  return path
end

--- A function(name, src) that writes DIR/name.lua and returns its path:
-- how specs make policy files.
function M.policy_writer(dir)
  return function(name, src) return M.write_file(("%s/%s.lua"):format(dir, name), src) end
end

--- The file's content, or nil if it cannot be read.
function M.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

--- A shell command line from an argv list (each word quoted), or cmd as is.
function M.command(cmd)
  if type(cmd) == "string" then return cmd end
  local words = {}
  for i, w in ipairs(cmd) do words[i] = M.quote(w) end
  return table.concat(words, " ")
end

--- Runs cmd (a shell command line, or an argv list) with `stdin` (a string,
-- default empty) as its input; returns { code = exit status (128+N after
-- signal N), stdout = ..., stderr = ... }.
function M.run(cmd, stdin)
  local input, out, err = M.write_file(nil, stdin or ""), M.tmpname(), M.tmpname()
  local _, how, n = os.execute(("(%s) >%s 2>%s <%s"):format(M.command(cmd), out, err, input))
  local r = { code = how == "exit" and n or 128 + n,
              stdout = M.read_file(out) or "", stderr = M.read_file(err) or "" }
  os.remove(input)
  os.remove(out)
  os.remove(err)
  return r
end

--- A background process -------------------------------------------------------

local Proc = {}
Proc.__index = Proc

--- Starts cmd (an argv list, or a shell command line: begin it with `exec`
-- for .pid to be the command's) in the background, its stdout and stderr
-- in temporary files.  A watcher shell waits for it and records its exit
-- status, since the spec process is not its parent.
function M.spawn(cmd)
  if type(cmd) == "table" then cmd = "exec " .. M.command(cmd) end
  local base = M.tmpname()
  local self = setmetatable({ stdout_path = base .. ".out", stderr_path = base .. ".err",
                              pid_path = base .. ".pid", status_path = base .. ".status" },
                            Proc)
  local q = M.quote
  os.execute(("( (%s) >%s 2>%s </dev/null & echo $! >%s.tmp; mv %s.tmp %s; wait $!; "
              .. "echo $? >%s.tmp; mv %s.tmp %s ) >/dev/null 2>&1 &")
    :format(cmd, q(self.stdout_path), q(self.stderr_path), q(self.pid_path),
            q(self.pid_path), q(self.pid_path), q(self.status_path), q(self.status_path),
            q(self.status_path)))
  self.pid = assert(M.wait_until(function()
    return tonumber(M.read_file(self.pid_path) or "")
  end, 10), "spawn: no pid for " .. cmd)
  return self
end

function Proc:stdout() return M.read_file(self.stdout_path) or "" end
function Proc:stderr() return M.read_file(self.stderr_path) or "" end

--- The exit status (128+N after signal N), or nil while it runs.
function Proc:status()
  return tonumber(M.read_file(self.status_path) or "")
end

--- Waits until stdout matches the Lua pattern; returns its captures, or
-- nil if the process exits or timeout_s passes first.
function Proc:wait_line(pattern, timeout_s)
  local caps
  M.wait_until(function()
    caps = table.pack(self:stdout():match(pattern))
    return caps[1] ~= nil or self:status() ~= nil
  end, timeout_s)
  if caps[1] == nil then caps = table.pack(self:stdout():match(pattern)) end
  return table.unpack(caps, 1, caps.n)
end

function Proc:signal(sig)
  os.execute(("kill -%s %d 2>/dev/null"):format(sig or "TERM", self.pid))
end

--- Waits for the exit; returns the status, or nil after timeout_s.
function Proc:wait(timeout_s)
  return M.wait_until(function() return self:status() end, timeout_s)
end

--- Sends `sig` (TERM) and waits for the exit status; a process that does
-- not exit within timeout_s is killed and nil, "timeout" returned.
function Proc:stop(sig, timeout_s)
  if self:status() then return self:status() end
  self:signal(sig or "TERM")
  local st = self:wait(timeout_s or 20)
  if st then return st end
  self:signal("KILL")
  self:wait(5)
  return nil, "timeout"
end

--- HTTP with the curl tool ----------------------------------------------------

--- Runs `curl <args>` (args already quoted); returns { code = curl's exit
-- status, status = HTTP status (0 if none), headers = { lower-case name =
-- value }, body = ..., stderr = ... }.
function M.curl(args)
  local head, body = M.tmpname(), M.tmpname()
  local r = M.run(("curl -sS -D %s -o %s -w '%%{http_code}' %s")
                    :format(M.quote(head), M.quote(body), args))
  local res = { code = r.code, status = tonumber(r.stdout) or 0, headers = {},
                body = M.read_file(body) or "", stderr = r.stderr }
  -- The last header block (after any 100 Continue).
  for line in (M.read_file(head) or ""):gmatch("[^\r\n]+") do
    if line:match("^HTTP/") then res.headers = {} end
    local name, value = line:match("^([^:]+):%s*(.-)%s*$")
    if name then res.headers[name:lower()] = value end
  end
  os.remove(head)
  os.remove(body)
  return res
end

--- Sends raw bytes to host:port with bash's /dev/tcp and returns what came
-- back until the server closed or timeout_s passed.
function M.raw_http(host, port, bytes, timeout_s)
  local file = M.write_file(nil, bytes)
  local r = M.run(("bash -c %s"):format(M.quote(
    ("exec 3<>/dev/tcp/%s/%d && cat %s >&3 && timeout %g cat <&3")
      :format(host, port, M.quote(file), timeout_s or 5))))
  os.remove(file)
  return r.stdout
end

--- The event log -------------------------------------------------------------

--- The events of a JSON-lines log file, decoded, in order.
function M.events(path)
  local cjson = require "cjson"
  local out = {}
  for line in (M.read_file(path) or ""):gmatch("[^\n]+") do out[#out + 1] = cjson.decode(line) end
  return out
end

--- The events of one kind ("attempt", "call", "breaker", "policy").
function M.of_kind(events, kind)
  local out = {}
  for _, e in ipairs(events) do
    if e.event == kind then out[#out + 1] = e end
  end
  return out
end

--- A `resilua serve` upstream -------------------------------------------------

--- Starts cmd (as M.spawn) and waits for its "listening on 127.0.0.1:PORT"
-- line.  Returns the process (stop it with :stop()), with .port and .url
-- ("http://127.0.0.1:PORT"); kills it and raises "<what> did not start"
-- at the caller's caller if the line does not come.
function M.spawn_listening(cmd, what)
  local p = M.spawn(cmd)
  local port = p:wait_line("listening on 127%.0%.0%.1:(%d+)\n", 30)
  if not port then
    p:stop("KILL")
    error(what .. " did not start: " .. p:stderr(), 3)
  end
  p.port = tonumber(port)
  p.url = "http://127.0.0.1:" .. port
  return p
end

--- Starts `resilua serve` on 127.0.0.1, an ephemeral port, with the handler
-- script `src` (nil: the model stub) and the extra flags `flags` (a list,
-- optional); as M.spawn_listening.
function M.start_server(src, flags)
  local argv = { M.bin, "serve", "--listen", "127.0.0.1:0", table.unpack(flags or {}) }
  if src then argv[#argv + 1] = M.write_file(M.tmpname(".lua"), src) end
  return M.spawn_listening(argv, "resilua serve")
end

return M
