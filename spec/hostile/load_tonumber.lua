-- when: load  expect: limit exceeded
-- tonumber reads a 1 MB numeral in C (strtod) without allocating.
local s = string.rep("1", 1 << 20)
while true do local _ = tonumber(s) end
