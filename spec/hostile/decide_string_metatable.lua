-- when: decide  expect: attempt to index a boolean value
return { decide = function(a)
  getmetatable("").__index.format = function() return "constant" end
  return false
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
