--- resilua.check — what `resilua check` and `resilua policies` print: every
-- problem of a policy (not only the first), its self-tests whatever their
-- shape, warnings about settings that cannot do what they say, a policy's
-- effective settings (--show), and the policies on the policy path.
local core = require "resilua.core"
local policy = require "resilua.policy"

local M = {}

-- What a test's expect may name, and how to compare it.
local EXPECT_FIELDS = { retry = "boolean", delay_ms = "number or {min, max}", reason = "string",
                        exhausted = "boolean" }

local function test_label(i, t)
  local name = type(t) == "table" and type(t.name) == "string" and (" (" .. t.name .. ")") or ""
  return ("test %d%s"):format(i, name)
end

-- A problem with one expectation, or nil.
local function check_expect(k, want, got)
  if EXPECT_FIELDS[k] == nil then
    local names = {}
    for name in pairs(EXPECT_FIELDS) do names[#names + 1] = name end
    table.sort(names)
    return ("expect.%s: unknown field (expected %s)"):format(tostring(k), table.concat(names, ", "))
  end
  if k == "delay_ms" and type(want) == "table" then
    local lo, hi = want[1], want[2]
    if type(lo) ~= "number" or type(hi) ~= "number" or lo > hi then
      return "expect.delay_ms: a range must be {min, max} with min <= max"
    end
    if not (got >= lo and got <= hi) then
      return ("delay_ms %.1f not in [%s, %s]"):format(got, lo, hi)
    end
    return nil
  end
  local kind = EXPECT_FIELDS[k]
  if type(want) ~= kind:match("^%a+") then
    return ("expect.%s: expected %s, got %s"):format(k, kind, type(want))
  end
  if got ~= want then
    return ("%s = %s, expected %s"):format(k, tostring(got), tostring(want))
  end
end

--- Runs a loaded policy's self-tests; returns the number run and a list
-- of problems (each naming its test).  Never raises, whatever `tests` is.
function M.self_tests(p)
  local tests, problems = p.table.tests, {}
  if tests == nil then return 0, problems end
  if type(tests) ~= "table" then
    return 0, { "tests: expected a list of { attempt = {...}, expect = {...} }" }
  end
  for i, t in ipairs(tests) do
    local label = test_label(i, t)
    if type(t) ~= "table" or type(t.attempt) ~= "table" or type(t.expect) ~= "table" then
      problems[#problems + 1] = label .. ": expected { attempt = {...}, expect = {...} }"
    else
      local ok, d = pcall(core.decide, p.core, t.attempt)
      if not ok then
        local msg = tostring(d):gsub("\n.*", ""):gsub("^bad argument #2 to '[^']*' %((.*)%)$", "attempt: %1")
        problems[#problems + 1] = ("%s: %s"):format(label, msg)
      else
        local keys = {}
        for k in pairs(t.expect) do keys[#keys + 1] = tostring(k) end
        table.sort(keys)
        for _, k in ipairs(keys) do
          local err = check_expect(k, t.expect[k], d[k])
          if err then problems[#problems + 1] = ("%s: %s"):format(label, err) end
        end
      end
    end
  end
  return #tests, problems
end

local function declared(p, field)
  for _, k in ipairs(p.table.declared or {}) do
    if k == field then return true end
  end
  return false
end

-- Attempts that probe whether decide ever defers to retry_on.
local function probes(t)
  local out = {}
  for _, status in ipairs(t.retry_on and t.retry_on.status or {}) do
    out[#out + 1] = { attempt = 1, status = status }
  end
  for _, e in ipairs(t.retry_on and t.retry_on.errors or {}) do
    out[#out + 1] = { attempt = 1, error = e }
  end
  out[#out + 1] = { attempt = 1, status = 500 }
  out[#out + 1] = { attempt = 1, error = "timeout" }
  return out
end

--- Settings that cannot do what they say: a list of messages.
function M.warnings(p)
  local t, out = p.table, {}
  if type(t.deadline_ms) == "number" and type(t.per_try_timeout_ms) == "number"
      and t.deadline_ms < t.per_try_timeout_ms then
    out[#out + 1] = ("deadline_ms (%s) < per_try_timeout_ms (%s): the deadline cuts every "
                     .. "attempt short, and no retry fits"):format(t.deadline_ms, t.per_try_timeout_ms)
  end
  if t.decide ~= nil then
    if t.tests == nil or (type(t.tests) == "table" and #t.tests == 0) then
      out[#out + 1] = "decide has no tests: add a `tests` list (see docs/policies.md, Testing a policy)"
    end
    -- nil from decide applies the rules; a decide that answers every
    -- probe itself makes a retry_on the file sets dead code.
    if declared(p, "retry_on") then
      local defers = false
      for _, a in ipairs(probes(t)) do
        local ok, d = pcall(core.decide, p.core, a)
        if ok and d.reason:find("^decide: no opinion") then defers = true break end
      end
      if not defers then
        out[#out + 1] = "retry_on is never applied: decide answered every probe itself "
                        .. "(return nil from decide to apply retry_on and backoff)"
      end
    end
  end
  return out
end

--- Checks each policy; prints one line per policy, then its problems and
-- warnings indented.  Returns true when all loaded and passed.
function M.run(names, policy_path)
  local all_ok = true
  for _, name in ipairs(names) do
    local p, err = policy.load(name, policy_path)
    local problems, n = {}, 0
    if p then
      n, problems = M.self_tests(p)
    else
      for line in tostring(err):gmatch("[^\n]+") do problems[#problems + 1] = line end
    end
    if #problems == 0 then
      print(("ok    %s  %s  version %s, %d self-test%s passed"):format(
        p.name, p.path, p.version, n, n == 1 and "" or "s"))
    else
      all_ok = false
      print(("FAIL  %s  %s"):format(name, problems[1]))
      for i = 2, #problems do print("      " .. problems[i]) end
    end
    for _, w in ipairs(p and M.warnings(p) or {}) do
      print(("warn  %s  %s"):format(name, w))
    end
  end
  return all_ok
end

-- A value as Lua source, keys sorted, on one line.
local function show_value(v)
  if type(v) == "string" then return ("%q"):format(v) end
  if type(v) ~= "table" then return tostring(v) end
  local parts, n = {}, #v
  for i = 1, n do parts[i] = show_value(v[i]) end
  local keys = {}
  for k in pairs(v) do
    if not (math.type(k) == "integer" and k >= 1 and k <= n) then keys[#keys + 1] = k end
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for _, k in ipairs(keys) do
    local key = type(k) == "string" and k:match("^[%a_][%w_]*$") and k or ("[" .. show_value(k) .. "]")
    parts[#parts + 1] = key .. " = " .. show_value(v[k])
  end
  return "{ " .. table.concat(parts, ", ") .. " }"
end

--- `check --show NAME`: the effective settings, after extend and the
-- defaults, as a policy file would spell them.
function M.show(name, policy_path)
  local p, err = policy.load(name, policy_path)
  if not p then return nil, err end
  local t = {}
  for k, v in pairs(p.table) do t[k] = v end
  t.declared, t.version, t.name = nil, nil, nil
  if t.tests then t.tests = ("<%d self-tests>"):format(#t.tests) end
  t.memory_mb = t.memory_mb or 64
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  print(("-- %s  %s  version %s (defaults filled in)"):format(p.name, p.path, p.version))
  print("return {")
  print(("  name = %q,"):format(p.name))
  for _, k in ipairs(keys) do print(("  %s = %s,"):format(k, show_value(t[k]))) end
  print("}")
  return true
end

--- `resilua policies`: every policy on the policy path, the folder that
-- wins first; a name found again later is marked shadowed.
function M.list(policy_path)
  local seen, rows, dirs_seen = {}, {}, {}
  local cwd = os.getenv("PWD") or "."
  for _, dir in ipairs(policy_path) do
    -- ./policies is often the shipped folder itself: list a folder once
    local abs = policy.normalize_path(dir:sub(1, 1) == "/" and dir or (cwd .. "/" .. dir))
    local files = dirs_seen[abs] and {} or core.policy_names(dir)
    dirs_seen[abs] = true
    for _, file in ipairs(files) do
      local name = file:match("^(.*)%.lua$")
      local path = policy.normalize_path(dir .. "/" .. file)
      rows[#rows + 1] = { name, path, seen[name] and ("(hidden by " .. seen[name] .. ")") or "" }
      seen[name] = seen[name] or path
    end
  end
  if #rows == 0 then
    print("no policies found (looked in " .. table.concat(policy_path, ", ") .. ")")
    return
  end
  local width = 4
  for _, r in ipairs(rows) do width = math.max(width, #r[1]) end
  for _, r in ipairs(rows) do
    print((("%-" .. width .. "s  %s  %s"):format(r[1], r[2], r[3]):gsub("%s+$", "")))
  end
end

return M
