-- when: decide  expect: limit exceeded
-- Each step copies 40 MB in C: the deadline is checked at big allocations.
return { decide = function(a)
  local s = string.rep("x", 20 << 20)
  while true do local _ = s .. s end
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
