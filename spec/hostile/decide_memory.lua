-- when: decide  expect: limit exceeded
-- Keeps what it allocates: 1 MB a step.
local keep = {}
return { decide = function(a)
  local s = string.rep("x", 1 << 20)
  for i = 1, 6000 do keep[#keep + 1] = s .. i end
  return false
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
