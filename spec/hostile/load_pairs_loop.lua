-- when: load  expect: instruction limit exceeded
-- The policy table's __pairs loops: validation iterates it.
return setmetatable({}, { __pairs = function() while true do end end })
