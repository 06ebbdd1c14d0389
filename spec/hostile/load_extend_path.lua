-- when: load  expect: the base must be a policy name
return require("resilua.policy").extend("/etc/passwd", {})
