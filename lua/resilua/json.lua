--- resilua.json — JSON for people and diffs: keys in a stable order and
-- numbers rounded to what they can mean (`load --json`, `call --json`).
--
-- cjson writes keys in hash order and floats with 14 digits; two runs of
-- the same command then differ in every line.  Here a table's keys come
-- in the order given for it (`order`, by key path), then sorted; a
-- non-integer is rounded to 3 decimals (at least 4 significant digits
-- below 1); NaN and infinities are null.  Strings are escaped as JSON
-- requires, and bytes that are not UTF-8 as \u00XX: the output is always
-- valid UTF-8 JSON.
local M = {}

-- core.json.quote (json.c) is the one JSON string writer; it takes only
-- valid UTF-8, so a string that is not is written run by run.
local quote = require("resilua.core").json.quote

--- A string as a JSON string literal.
function M.string(s)
  local q = quote(s)
  if q then return q end
  -- Walk the valid UTF-8 runs; each stray byte becomes \u00XX.
  local out, i = {}, 1
  while i <= #s do
    local ok_len = utf8.len(s, i)
    local stop = ok_len and #s or select(2, utf8.len(s, i)) - 1
    if stop >= i then out[#out + 1] = quote(s:sub(i, stop)):sub(2, -2) end
    if stop < #s then
      out[#out + 1] = ("\\u%04x"):format(s:byte(stop + 1))
    end
    i = stop + 2
  end
  return '"' .. table.concat(out) .. '"'
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
--- Bytes as base64 (RFC 4648, padded): how a body that is not UTF-8
-- keeps its bytes in JSON (`call --json`, batch results).
function M.base64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = (a << 16) | ((b or 0) << 8) | (c or 0)
    local chars = 2 + (b and 1 or 0) + (c and 1 or 0)
    for k = 1, 4 do
      local idx = (n >> (18 - 6 * (k - 1))) & 63
      out[#out + 1] = k <= chars and B64:sub(idx + 1, idx + 1) or "="
    end
  end
  return table.concat(out)
end

--- A number as JSON: integers as they are, others rounded.
function M.number(n)
  if n ~= n or n == math.huge or n == -math.huge then return "null" end
  if math.type(n) == "integer" then return tostring(n) end
  if n == math.floor(n) and math.abs(n) < 2 ^ 53 then return ("%d"):format(n) end
  local s = math.abs(n) >= 1 and ("%.3f"):format(n) or ("%.4g"):format(n)
  if s:find("e", 1, true) then return ("%.3e"):format(n) end -- tiny: keep the exponent
  s = s:gsub("(%.%d-)0+$", "%1"):gsub("%.$", "")
  return s == "-0" and "0" or s
end

local function is_array(t)
  local n = #t
  if n == 0 then return next(t) == nil end
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 or k > n then return false end
  end
  return true
end

local function encode(v, order, path, out)
  local kind = type(v)
  if kind == "string" then
    out[#out + 1] = M.string(v)
  elseif kind == "number" then
    out[#out + 1] = M.number(v)
  elseif kind == "boolean" then
    out[#out + 1] = tostring(v)
  elseif kind == "table" and is_array(v) and next(v) ~= nil then
    out[#out + 1] = "["
    for i, x in ipairs(v) do
      if i > 1 then out[#out + 1] = "," end
      encode(x, order, path, out)
    end
    out[#out + 1] = "]"
  elseif kind == "table" then
    local keys, seen = {}, {}
    for _, k in ipairs(order[path] or {}) do
      if v[k] ~= nil then keys[#keys + 1], seen[k] = k, true end
    end
    local rest = {}
    for k in pairs(v) do
      if not seen[k] then rest[#rest + 1] = tostring(k) end
    end
    table.sort(rest)
    for _, k in ipairs(rest) do keys[#keys + 1] = v[k] ~= nil and k or tonumber(k) end
    out[#out + 1] = "{"
    for i, k in ipairs(keys) do
      if i > 1 then out[#out + 1] = "," end
      out[#out + 1] = M.string(tostring(k)) .. ":"
      encode(v[k], order, path == "" and tostring(k) or path .. "." .. tostring(k), out)
    end
    out[#out + 1] = "}"
  else
    out[#out + 1] = "null" -- nil, functions, cjson.null (a lightuserdata)
  end
end

--- v as one line of JSON.  order (optional) maps a key path ("" for the
-- top, "a.b" below) to the keys that come first, in that order.
function M.encode(v, order)
  local out = {}
  encode(v, order or {}, "", out)
  return table.concat(out)
end

return M
