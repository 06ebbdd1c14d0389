-- when: decide  expect: hostile/decide_error_object.lua:
return { decide = function(a)
  error(setmetatable({}, { __tostring = function() while true do end end }))
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
