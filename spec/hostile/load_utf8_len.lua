-- when: load  expect: time limit exceeded
-- utf8.len scans 1 MB in C without allocating; 250 calls ran between two
-- instruction-hook checks: a call given a long string checks the clock.
local s = string.rep("x", 1 << 20)
local len = utf8.len
while true do local _ = len(s) end
