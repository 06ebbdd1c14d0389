-- when: load  expect: size limit exceeded
-- 300,000 values on the stack at once: a block of 4.8 MB (the stack, like
-- a table's parts, is one block: 4 MB at most).
local s = string.rep("x", 300000)
local t = { s:byte(1, -1) }
return { max_attempts = #t }
