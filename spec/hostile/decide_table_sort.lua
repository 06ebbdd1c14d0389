-- when: decide  expect: table.sort: over
local big = {}
for i = 1, 200000 do big[i] = -i end
return { decide = function(a)
  table.sort(big)
  return false
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
