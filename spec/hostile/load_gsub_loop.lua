-- when: load  expect: limit exceeded
-- Patterns that pass the estimate, many times: the time limit stops it.
local s = ("a"):rep(1000)
while true do local _ = s:gsub("a-b", "") end
