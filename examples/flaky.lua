-- A flaky model server for `resilua serve`: each prediction request fails
-- twice in the ways production fails (a reset connection, then a 503 with
-- Retry-After) before it is answered.  Requests are told apart by their
-- Idempotency-Key, so every call sees the same story.
--
--   resilua serve --listen 127.0.0.1:8080 examples/flaky.lua
local seen = {}

return function(req)
  local key = req.headers["idempotency-key"] or req.path
  seen[key] = (seen[key] or 0) + 1
  local n = seen[key]
  if n == 1 then
    return { action = "reset" }
  elseif n == 2 then
    return { status = 503, headers = { ["Retry-After"] = "1" }, body = "overloaded\n" }
  end
  seen[key] = nil
  return { status = 200, headers = { ["Content-Type"] = "application/json" },
           body = ('{"prediction": "positive", "score": 0.93, "input_bytes": %d}\n'):format(#req.body),
           delay_ms = 40 }
end
