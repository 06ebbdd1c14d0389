-- bench: `resilua serve` handler that answers every request after 2 s, so
-- that the calls made to it stay in flight (bench/inflight.lua).
return function(req)
  return { status = 200, body = "ok\n", delay_ms = 2000 }
end
