-- when: decide  expect: instruction limit exceeded
return { decide = function(a) while true do end end,
  tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
