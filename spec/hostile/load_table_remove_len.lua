-- when: load  expect: table.remove: a table with __len
-- #t is what __len says: table.remove shifts 2^40 slots in C.
local t = setmetatable({}, { __len = function() return 1 << 40 end })
table.remove(t, 1)
return {}
