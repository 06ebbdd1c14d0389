-- when: decide  expect: time limit exceeded
-- The gsub copies 1 M elements; once the time is out its buffer's growth
-- is refused, and pcall catches that: the decision must fail all the same.
return { memory_mb = 64, decide = function(a)
  local s = "x"
  for _ = 1, 20 do s = s .. s end
  pcall(string.gsub, s, "x", "%0")
  return nil
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
