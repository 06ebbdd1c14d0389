-- when: decide  expect: size limit exceeded
-- One copy of 40 MB took 45 ms of C on a VM, with no check inside it: a
-- string may hold 1 MB at most, whatever the memory cap.
return { memory_mb = 256, decide = function(a)
  local s = string.rep("x", 1 << 20)
  local t = s .. s
  return t ~= nil
end, tests = { { attempt = { status = 503 }, expect = { retry = true } } } }
