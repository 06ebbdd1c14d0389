-- when: load  expect: is not a module name
return require("..etc.passwd")
