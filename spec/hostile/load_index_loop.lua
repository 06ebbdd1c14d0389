-- when: load  expect: limit exceeded
-- Every read of a field loops (validation reads t.budget, t.breaker).
return setmetatable({}, { __index = function() while true do end end })
