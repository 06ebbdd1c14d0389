-- when: load  expect: over the policy's memory limit
return { name = string.rep("x", 1 << 40) }
