-- when: decide  expect: limit exceeded
-- Each step copies 1 MB in C (the largest string a policy may hold): the
-- deadline is checked at big allocations.
return { decide = function(a)
  local s = string.rep("x", 512 << 10)
  while true do local _ = s .. s end
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
