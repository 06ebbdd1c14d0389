-- when: load  expect: too costly for a policy
local _ = ("a"):rep(2000):find(".-.-.-.-.-x")
return {}
