-- when: load  expect: table.concat: over
-- A C __index makes every read free: table.concat loops in C over 2^40 elements.
local t = setmetatable({}, { __index = table.concat })
return { table.concat(t, "", 1, 1 << 40) }
