-- when: decide  expect: decision.retry must be true or false
-- The answer's __index loops: the answer is read raw, never through it.
return { decide = function(a)
  return setmetatable({}, { __index = function() while true do end end })
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
