-- when: load  expect: limit exceeded
-- __gc added after setmetatable does not mark the object; the loop runs
-- where it is called, under the limit.
local mt = {}
local t = setmetatable({}, mt)
mt.__gc = function() while true do end end
mt.__gc()
return { t = t }
