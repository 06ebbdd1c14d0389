-- when: load  expect: table.move: over
-- The whole integer range: its size overflows a signed subtraction.
table.move({}, math.mininteger, math.maxinteger, 1)
return {}
