-- when: decide  expect: limit exceeded
return { decide = function(a)
  local co = coroutine.wrap(function()
    while true do pcall(function() while true do end end) end
  end)
  co()
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
