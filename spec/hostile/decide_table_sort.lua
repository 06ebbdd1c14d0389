-- when: decide  expect: table.sort: over
-- Sorting plain values runs in C without instructions: the size is capped.
local big = { utf8.codepoint(string.rep("a", 70000), 1, -1) }  -- cheap to build
return { decide = function(a)
  table.sort(big)
  return false
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
