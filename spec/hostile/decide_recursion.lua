-- when: decide  expect: hostile/decide_recursion.lua:
local function f(n) return 1 + f(n + 1) end
return { decide = function(a) return { retry = f(1) > 0 } end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
