-- when: load  expect: undeclared global 'io'
return { x = io.open("/etc/passwd") }
