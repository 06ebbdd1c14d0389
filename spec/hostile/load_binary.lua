-- when: load  expect: undeclared global 'load'
-- load() is not available; a binary chunk cannot be built.
return load
