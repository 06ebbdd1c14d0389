-- when: load  expect: limit exceeded
-- Grows by 1 MB a step toward gigabytes.
local keep, s = {}, string.rep("x", 1 << 20)
for i = 1, 6000 do keep[i] = s .. i end
return {}
