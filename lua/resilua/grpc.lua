--- resilua.grpc — gRPC status codes by name and number (grpc/grpc's
-- doc/statuscodes.md), for policies (`retry_on.grpc`, `a.grpc_status` in
-- decide) and scripts.  Available inside the policy sandbox.
local M = {}

--- name -> number
M.codes = {
  OK = 0, CANCELLED = 1, UNKNOWN = 2, INVALID_ARGUMENT = 3, DEADLINE_EXCEEDED = 4,
  NOT_FOUND = 5, ALREADY_EXISTS = 6, PERMISSION_DENIED = 7, RESOURCE_EXHAUSTED = 8,
  FAILED_PRECONDITION = 9, ABORTED = 10, OUT_OF_RANGE = 11, UNIMPLEMENTED = 12,
  INTERNAL = 13, UNAVAILABLE = 14, DATA_LOSS = 15, UNAUTHENTICATED = 16,
}

--- number -> name
M.names = {}
for name, n in pairs(M.codes) do M.names[n] = name end

--- The number of a code given by name or number, or nil.
function M.code(v)
  if math.type(v) == "integer" then return M.names[v] and v or nil end
  if type(v) == "number" and v == math.floor(v) then return M.code(math.tointeger(v)) end
  return type(v) == "string" and M.codes[v] or nil
end

return M
