-- when: decide  expect: decide returned a function
-- a.policy is the policy's own table: changing it changes nothing else.
return { decide = function(a)
  a.policy.max_attempts = 99
  return function() end
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
