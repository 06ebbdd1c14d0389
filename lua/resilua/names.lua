-- Names a user may mistype: "did you mean" for fields, policies and codes,
-- and the one message every option table gives for a field it lacks.
local M = {}

--- Edit distance (Levenshtein).
local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

--- " (did you mean 'x'?)" for the name in `set` (its keys) closest to
-- word, within two edits, or "".  Ties go to the first in sorted order, so
-- the hint does not depend on table iteration order.
function M.suggest(word, set)
  local best, best_d = nil, 3
  for name in pairs(set) do
    if type(name) == "string" then
      local d = distance(word, name)
      if d < best_d or (d == best_d and name < best) then best, best_d = name, d end
    end
  end
  return best and (" (did you mean '" .. best .. "'?)") or ""
end

--- The first key of t, in sorted order, that `set` lacks, and the message
-- for it; nil when every key is known.
function M.unknown_field(t, set)
  local bad
  for k in pairs(t) do
    if type(k) ~= "string" or not set[k] then
      if bad == nil or tostring(k) < tostring(bad) then bad = k end
    end
  end
  if bad == nil then return nil end
  if type(bad) ~= "string" then
    return bad, ("unknown field [%s] (fields have names)"):format(tostring(bad))
  end
  return bad, ("unknown field '%s'%s"):format(bad, M.suggest(bad, set))
end

return M
