-- when: load  expect: attempt to index a boolean value
getmetatable(require("resilua.policy")).__index.DEFAULTS.max_attempts = 77
return {}
