-- when: load  expect: limit exceeded
-- Comparing two equal 1 MB strings is one VM instruction: at most about
-- 300 of them (a 1 MB memcmp each) between two hook checks.
local s, t = string.rep("x", 1 << 20), string.rep("x", 1 << 20)
local n = 0
while true do if s == t and s <= t then n = n + 1 end end
