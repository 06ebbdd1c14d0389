-- Prints an event log (JSON lines) as one line per attempt and call.
-- usage: resilua run tools/summarize.lua EVENTS.jsonl
local cjson = require "cjson"
local path = assert(arg[1], "usage: summarize.lua EVENTS.jsonl")
for line in io.lines(path) do
  local e = cjson.decode(line)
  if e.event == "attempt" then
    print(("attempt %d  %-12s %7.1f ms  -> %-5s %s%s"):format(e.attempt,
      e.status and ("HTTP %d"):format(e.status) or e.error, e.latency_ms, e.decision,
      e.reason, e.decision == "retry" and (", wait %.0f ms"):format(e.delay_ms) or ""))
  elseif e.event == "call" then
    print(("call %s: %s after %d attempts in %.0f ms"):format(e.call_id, e.outcome, e.attempts,
      e.elapsed_ms))
  end
end
