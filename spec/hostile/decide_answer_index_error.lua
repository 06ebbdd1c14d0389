-- when: decide  expect: decision.retry must be true or false
return { decide = function(a)
  return setmetatable({}, { __index = function() error("boom") end })
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
