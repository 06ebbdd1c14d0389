-- when: decide  expect: too costly for a policy
return { decide = function(a)
  return { retry = ("a"):rep(2000):find(".-.-.-.-.-x") ~= nil }
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
