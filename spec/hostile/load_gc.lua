-- when: load  expect: __gc is not allowed
-- A finalizer that loops would run with hooks off: refused outright.
setmetatable({}, { __gc = function() while true do end end })
return { max_attempts = 2 }
