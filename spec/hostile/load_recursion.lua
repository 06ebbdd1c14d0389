-- when: load  expect: hostile/load_recursion.lua:
local function f(n) return 1 + f(n + 1) end
return { max_attempts = f(1) }
