-- when: load  expect: limit exceeded
-- pcall inside a coroutine inside a loop cannot swallow the stop.
local co = coroutine.wrap(function()
  while true do pcall(function() while true do end end) end
end)
co()
return {}
