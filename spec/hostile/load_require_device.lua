-- when: load  expect: is not a module name
return require("/dev/zero")
