-- when: decide  expect: memory limit exceeded
-- At the cap, every refused allocation runs a full collection of the
-- state (Lua's emergency GC, in C, unseen by the hook): a pcall that
-- catches the refusal and asks again must not get another one.
local keep = {}
return { memory_mb = 1, decide = function(a)
  keep[1] = string.rep("x", 700 << 10)
  while true do pcall(function() while true do keep[#keep + 1] = {} end end) end
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
