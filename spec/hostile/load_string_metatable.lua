-- when: load  expect: attempt to index a boolean value
-- The string metatable is hidden (and the policy's own anyway).
getmetatable("").__index.format = function() return "constant" end
return {}
