-- when: decide  expect: __gc is not allowed
return { decide = function(a)
  setmetatable({}, { __gc = function() while true do end end })
  return false
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
