-- when: load  expect: is not a module name
-- A path is never a module name: no file's existence or content leaks.
return require("/etc/passwd")
