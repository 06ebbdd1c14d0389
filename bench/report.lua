--- bench/report.lua — how the benches print their figures: rows of label,
-- value and note in fixed columns, and numbers that may be missing.
--
-- Loaded with `dofile(here .. "/report.lua")`, like bench/proc.lua.
local M = {}

--- A function(label, value, note) that prints one row, label and value
-- padded to label_width and value_width, and flushes: a bench killed
-- halfway still shows the rows it got to.
function M.row_printer(label_width, value_width)
  local line = ("  %%-%ds %%%ds%%s\n"):format(label_width, value_width)
  return function(label, value, note)
    io.stdout:write(line:format(label, value, note and ("   " .. note) or ""))
    io.stdout:flush()
  end
end

--- x with `decimals` decimals (default 0), or "n/a" for nil.
function M.fmt(x, decimals)
  if x == nil then return "n/a" end
  return ("%." .. (decimals or 0) .. "f"):format(x)
end

--- The median of the numbers in t, or nil when t is empty.
function M.median(t)
  if #t == 0 then return nil end
  local s = {}
  for i, v in ipairs(t) do s[i] = v end
  table.sort(s)
  local m = (#s + 1) // 2
  return #s % 2 == 1 and s[m] or (s[m] + s[m + 1]) / 2
end

return M
