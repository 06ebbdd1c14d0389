-- when: decide  expect: table.sort: a table with __len
-- __len says 2^31 - 2; C __index/__newindex make reads free and drop writes.
local t = setmetatable({}, { __len = function() return (1 << 31) - 2 end,
                             __index = rawlen, __newindex = rawequal })
return { decide = function(a)
  table.sort(t)
  return false
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
