-- when: load  expect: table.move: over
-- table.move loops in C over any range, with no instruction to count.
table.move({}, 1, 1 << 40, 1)
return {}
