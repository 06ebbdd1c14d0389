-- bench: the default recipe as a Lua `decide` (retry 429/5xx and the
-- transient error classes, with the policy's own backoff).  Everything
-- else takes the defaults, so it differs from builtin.lua only in who
-- decides.
local backoff = require "resilua.backoff"

local RETRY_STATUS = { [429] = true, [500] = true, [502] = true, [503] = true, [504] = true }
local RETRY_ERROR = { timeout = true, connect = true, reset = true, dns = true }

return {
  name = "bench-lua-decide",
  decide = function(a)
    if RETRY_STATUS[a.status] or RETRY_ERROR[a.error] then
      return { retry = true, delay_ms = backoff.delay(a), reason = "transient" }
    end
    return false
  end,
}
