-- when: decide  expect: limit exceeded
return { decide = function(a)
  local x <close> = setmetatable({}, { __close = function() while true do end end })
  return { retry = true }
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
