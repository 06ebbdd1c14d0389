-- when: load  expect: is not allowed in a policy
-- dev.stdin is a module name; it is looked up on the policy path only.
return require("dev.stdin")
