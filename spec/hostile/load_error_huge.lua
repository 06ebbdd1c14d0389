-- when: load  expect: bytes more)
-- An error object whose __tostring is 256 KB: no position from Lua, and a
-- message too big for an event line.
error(setmetatable({}, { __tostring = function() return string.rep("x", 1 << 18) end }))
