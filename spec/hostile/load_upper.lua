-- when: load  expect: limit exceeded
-- string.upper walks 1 MB byte by byte, as a method call.
local s = string.rep("x", 1 << 20)
while true do local _ = s:upper() end
