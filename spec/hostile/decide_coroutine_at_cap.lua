-- when: decide  expect: memory limit exceeded
-- The refusal loop of decide_gc_at_cap inside a coroutine: the stop
-- reaches a coroutine only at its next hook (up to 1,000 instructions
-- later), and until then its allocations must not be refused (each
-- refusal is a full collection, in C).
local keep = {}
return { memory_mb = 1, decide = function(a)
  keep[1] = string.rep("x", 700 << 10)
  local chunk = string.rep("y", 100 << 10)
  local co = coroutine.wrap(function()
    while true do pcall(function() keep[#keep + 1] = chunk .. #keep end) end
  end)
  co()
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
