-- when: load  expect: hostile/load_error_object.lua:
-- An error object whose __tostring loops.
error(setmetatable({}, { __tostring = function() while true do end end }))
