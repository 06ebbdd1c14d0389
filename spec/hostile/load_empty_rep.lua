-- when: load  expect: limit exceeded
-- string.rep("", 2^62) returns at once; the loop around it is stopped.
while true do local _ = string.rep("", 1 << 62) end
