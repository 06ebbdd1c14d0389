-- when: load  expect: limit exceeded
-- 9e7 iterations at load: refused, not waited for.
local n = 0
for i = 1, 9e7 do n = n + i end
return { max_attempts = 2 }
