-- when: load  expect: limit exceeded
-- Many small tables: memory and time.
local keep = {}
for i = 1, 1e8 do keep[i] = { i, i, i } end
return {}
