--- resilua.load — `resilua load URL`: open- or closed-loop load under a
-- policy, and a summary of what the policy did (issue 4, item 1).
--
-- Open loop (rate): call i is due at t0 + i/rate whatever happened to the
-- calls before it.  One timer is armed for the next due start; when it
-- fires it starts every call that is due, so a slow loop catches up
-- instead of skipping.  A call's latency runs from its *intended* start,
-- so when the client or the upstream falls behind the wait shows in the
-- figures (no coordinated omission); how late the starts were is the
-- schedule lag.  Closed loop (concurrency): C workers, each starting its
-- next call when the previous one ends; latency from the actual start.
--
-- Latencies go into 1 s window histograms (core.hist) that are merged
-- into the run's totals at the end of each window: memory is constant
-- however long the run.  Attempt latencies come from each call's result
-- (attempt_ms), not from the event log, which stays off by default.
local core = require "resilua.core"

local M = {}

local WINDOW_S = 1
local PERCENTILES = { { "p50", 50 }, { "p90", 90 }, { "p95", 95 }, { "p99", 99 },
                      { "p999", 99.9 } }
M.DEFAULT_MAX_IN_FLIGHT = 10000
-- Open loop: attempts on the wire at most (o.connections); the others wait
-- their turn in the transport, and the wait counts in their latency.
-- Without a bound, a run that fell behind opened a connection per late
-- call, and curl's cost per transfer grows with the connections: the rate
-- collapsed instead of recovering.
M.DEFAULT_CONNECTIONS = 1024

--- A latency series: a window histogram recorded into, merged into the
-- total at each window's end.
local function series()
  return { win = core.hist(), total = core.hist() }
end

local function flush(s)
  s.total:merge(s.win)
  s.win:reset()
end

--- A histogram's figures: count, min, mean, max and p50/p90/p95/p99/p999
-- (ms), or nil when it is empty.
function M.figures(h)
  if h:count() == 0 then return nil end
  local t = { count = h:count(), min = h:min(), mean = h:mean(), max = h:max() }
  for _, p in ipairs(PERCENTILES) do t[p[1]] = h:percentile(p[2]) end
  return t
end

local function bump(t, k) t[k] = (t[k] or 0) + 1 end

local SIGNAL_NAMES = { [1] = "SIGHUP", [2] = "SIGINT", [15] = "SIGTERM" }

--- Parses a duration: "10s", "500ms", "2m", "1h" or plain seconds.
-- Returns seconds or nil.
function M.parse_duration(s)
  local n, unit = tostring(s):match("^(%d+%.?%d*)(%a*)$")
  n = tonumber(n)
  local scale = ({ [""] = 1, s = 1, ms = 0.001, m = 60, h = 3600 })[unit]
  if not n or not scale or n * scale <= 0 then return nil end
  return n * scale
end

--- Runs the load.  o: url, method, headers, body, client (a resilua
-- client), rate (open loop) or concurrency (closed loop), duration_s,
-- max_in_flight (open loop: a due call is dropped, and counted, when this
-- many are in flight), connections (open loop: attempts on the wire at
-- most, default M.DEFAULT_CONNECTIONS), progress (a function(line) called
-- once a window).
-- Returns the report (see M.format), or nil, message when the request can
-- never be sent (a bad URL, say).
function M.run(o)
  local now = core.now_ms
  local client = o.client
  -- summary_only: results without headers and body, which are not counted.
  local req = { method = o.method, url = o.url, headers = o.headers, body = o.body,
                grpc = o.grpc, http2 = o.http2, summary_only = true,
                max_active = o.rate and (o.connections or M.DEFAULT_CONNECTIONS) or nil }
  local duration_ms = o.duration_s * 1000
  local max_in_flight = o.max_in_flight or M.DEFAULT_MAX_IN_FLIGHT
  local call_lat, ok_lat, failed_lat = series(), series(), series()
  local attempt_lat, lag = series(), series()
  local all = { call_lat, ok_lat, failed_lat, attempt_lat, lag }
  local calls, done, in_flight, attempts, drops, ok = 0, 0, 0, 0, 0, 0
  local outcomes, statuses, errors, per_call, grpc_codes = {}, {}, {}, {}, {}
  local sending, start_error = true, nil
  local windows, win_calls, win_ok = 0, 0, 0
  local last_start

  local function record(r, latency_ms)
    done = done + 1
    in_flight = in_flight - 1
    call_lat.win:record(latency_ms)
    bump(outcomes, r.outcome)
    if r.outcome == "ok" then
      ok, win_ok = ok + 1, win_ok + 1
      ok_lat.win:record(latency_ms)
    else
      failed_lat.win:record(latency_ms)
    end
    -- statuses and per_call are counted under numbers (no string made
    -- per call) and keyed by strings in the report.
    if r.status then bump(statuses, r.status) end
    if r.grpc_status then bump(grpc_codes, r.grpc_status) end
    if r.error then bump(errors, r.error) end
    local n = r.attempts
    attempts = attempts + n
    bump(per_call, n)
    local ms = r.attempt_ms
    for i = 1, #ms do attempt_lat.win:record(ms[i]) end
  end

  -- Starts one call; `done(r)` is called with its result.
  local function start(done)
    calls, win_calls = calls + 1, win_calls + 1
    in_flight = in_flight + 1
    local ok_start, err = pcall(core.call, client.state, client:policy().core, req, done)
    if not ok_start then
      calls, in_flight = calls - 1, in_flight - 1
      start_error = start_error or tostring(err)
      sending = false
    end
  end

  local t0 = now() + 1 -- a little ahead, so the first start is on time
  local t_end = t0 + duration_ms
  local scheduled = 0
  if o.rate then
    local interval_ms = 1000 / o.rate
    local due = math.max(1, math.floor(o.rate * o.duration_s + 0.5))
    local n = 0
    local function tick()
      if not sending then return end
      local t = now()
      while n < due do
        local intended = t0 + n * interval_ms
        if intended > t then break end
        n = n + 1
        lag.win:record(t - intended)
        if in_flight >= max_in_flight then
          drops = drops + 1
        else
          last_start = t
          start(function(r) record(r, now() - intended) end)
          if not sending then return end
        end
        t = now()
      end
      if n < due then
        core.timer(math.max(0, t0 + n * interval_ms - now()) / 1000, tick)
      else
        sending = false
      end
    end
    scheduled = due
    core.timer(math.max(0, t0 - now()) / 1000, tick)
  else
    local workers = o.concurrency
    -- A worker is one callback, made once: it records the call that ended
    -- and starts the next.
    local function new_worker()
      local from
      local function worker(r)
        if r then record(r, now() - from) end
        local t = now()
        if not sending or t >= t_end then
          workers = workers - 1
          if workers == 0 then sending = false end
          return
        end
        last_start, from = t, t
        start(worker)
      end
      return worker
    end
    core.timer(math.max(0, t0 - now()) / 1000, function()
      for _ = 1, o.concurrency do
        if sending then new_worker()() end
      end
    end)
  end

  local function close_window()
    windows = windows + 1
    if o.progress then
      -- Over the window: calls started, and of the calls that ended, the
      -- share ok and their p99.
      local ended = call_lat.win:count()
      o.progress(("%5.0f s  %8d calls  %7.0f calls/s  %6d in flight  %6.2f %% ok  p99 %8.1f ms")
        :format((now() - t0) / 1000, calls, win_calls / WINDOW_S, in_flight,
                ended > 0 and 100 * win_ok / ended or 100, call_lat.win:percentile(99)))
    end
    for _, s in ipairs(all) do flush(s) end
    win_calls, win_ok = 0, 0
  end
  local next_window = t0 + WINDOW_S * 1000
  -- SIGINT, SIGTERM and SIGHUP (a closed terminal) stop the sending; the
  -- calls in flight end and the summary covers what ran.
  local stopped_by, t_stop
  core.catch_signals()
  core.on_hangup(function() stopped_by = stopped_by or "SIGHUP" end)
  while sending or in_flight > 0 do
    core.step(math.max(0, math.min(0.25, (next_window - now()) / 1000)))
    if now() >= next_window then
      close_window()
      next_window = next_window + WINDOW_S * 1000
    end
    local signo = core.stop_signal()
    if signo ~= 0 and not stopped_by then stopped_by = SIGNAL_NAMES[signo] or ("signal " .. signo) end
    if stopped_by and not t_stop then
      t_stop = now()
      sending = false
    end
  end
  local t_done = now()
  close_window()
  if calls == 0 and start_error then return nil, start_error end

  local function keyed(t)
    local out = {}
    for k, n in pairs(t) do out[tostring(k)] = n end
    return out
  end
  statuses, per_call = keyed(statuses), keyed(per_call)
  local grpc_by_name -- gRPC calls: their statuses by name
  for code, n in pairs(grpc_codes) do
    grpc_by_name = grpc_by_name or {}
    grpc_by_name[require("resilua.grpc").names[code] or tostring(code)] = n
  end

  -- The rate achieved over the sending phase: on schedule, calls over the
  -- duration; behind schedule, over the time it really took to start them;
  -- stopped by a signal, over the time it ran.
  local span_ms = duration_ms
  if o.rate and last_start then
    span_ms = math.max(duration_ms, last_start - t0 + 1000 / o.rate)
  end
  if t_stop and t_stop - t0 < span_ms then span_ms = math.max(1, t_stop - t0) end
  return {
    url = core.utf8_clean(core.redact_url(o.url)), policy = o.policy_name, policy_overrides = o.policy_overrides,
    mode = o.rate and "open" or "closed", rate = o.rate, concurrency = o.concurrency,
    duration_s = o.duration_s, elapsed_s = (t_done - t0) / 1000,
    calls = calls, scheduled = o.rate and scheduled or nil, drops = drops,
    achieved_rate = calls / (span_ms / 1000),
    success_rate = calls > 0 and ok / calls or 0,
    attempts = attempts, amplification = calls > 0 and attempts / calls or 0,
    attempts_per_call = per_call,
    outcomes = outcomes, statuses = statuses, grpc_statuses = grpc_by_name, errors = errors,
    latency_ms = M.figures(call_lat.total) or {},
    latency_ok_ms = M.figures(ok_lat.total), latency_failed_ms = M.figures(failed_lat.total),
    attempt_latency_ms = M.figures(attempt_lat.total),
    schedule_lag_ms = o.rate and M.figures(lag.total) or nil,
    windows = windows, interrupted = stopped_by,
    start_error = start_error,
  }
end

local function counts_line(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    if t[a] ~= t[b] then return t[a] > t[b] end
    return a < b
  end)
  if #keys == 0 then return "-" end
  local parts = {}
  for i, k in ipairs(keys) do parts[i] = ("%s %d"):format(k, t[k]) end
  return table.concat(parts, "  ")
end

-- The JSON summary's keys: what the run was, then what happened, the
-- latency figures in percentile order.
local FIGURES = { "count", "min", "mean", "p50", "p90", "p95", "p99", "p999", "max" }
local JSON_ORDER = {
  [""] = { "url", "policy", "policy_overrides", "mode", "rate", "concurrency", "duration_s",
           "elapsed_s", "interrupted", "calls", "scheduled", "drops", "achieved_rate",
           "success_rate", "outcomes", "attempts", "amplification", "attempts_per_call",
           "statuses", "grpc_statuses", "errors", "latency_ms", "latency_ok_ms", "latency_failed_ms",
           "attempt_latency_ms", "schedule_lag_ms", "windows", "start_error" },
}
for _, k in ipairs({ "latency_ms", "latency_ok_ms", "latency_failed_ms", "attempt_latency_ms",
                     "schedule_lag_ms" }) do
  JSON_ORDER[k] = FIGURES
end

--- The report as one line of JSON: keys in a stable order, numbers
-- rounded (ms to the µs, rates to 3 decimals).
function M.json(r)
  return require("resilua.json").encode(r, JSON_ORDER) .. "\n"
end

--- The report as text for a terminal.
function M.format(r)
  local out = {}
  local function say(fmt, ...) out[#out + 1] = fmt:format(...) end
  local policy = (r.policy or "?") .. (r.policy_overrides and #r.policy_overrides > 0
                  and (" (%s)"):format(table.concat(r.policy_overrides, " ")) or "")
  if r.mode == "open" then
    say("resilua load %s: open loop, %g calls/s for %g s", r.url, r.rate, r.duration_s)
  else
    say("resilua load %s: closed loop, %d in flight for %g s", r.url, r.concurrency,
        r.duration_s)
  end
  say("policy       %s", policy)
  say("calls        %d  (achieved %.1f/s%s)%s", r.calls, r.achieved_rate,
      r.rate and (", target %g/s"):format(r.rate) or "",
      r.drops > 0 and ("  drops %d (in-flight cap)"):format(r.drops) or "")
  say("outcomes     %s", counts_line(r.outcomes))
  say("success      %.2f %%", 100 * r.success_rate)
  local per = {}
  for k, n in pairs(r.attempts_per_call) do per[#per + 1] = { tonumber(k), n } end
  table.sort(per, function(a, b) return a[1] < b[1] end)
  for i, p in ipairs(per) do per[i] = ("%d: %d"):format(p[1], p[2]) end
  say("attempts     %d  amplification %.3f  (calls by attempts  %s)", r.attempts,
      r.amplification, #per > 0 and table.concat(per, "  ") or "-")
  say("status       %s", counts_line(r.statuses))
  if r.grpc_statuses then say("grpc status  %s", counts_line(r.grpc_statuses)) end
  say("errors       %s", counts_line(r.errors))
  say("latency ms   %9s %9s %9s %9s %9s %9s %9s", "count", "p50", "p90", "p95", "p99",
      "p99.9", "max")
  local function row(name, f)
    if not f or not f.count then return end
    say("  %-10s %9d %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f", name, f.count, f.p50, f.p90,
        f.p95, f.p99, f.p999, f.max)
  end
  row("calls", r.latency_ms)
  row("ok", r.latency_ok_ms)
  row("not ok", r.latency_failed_ms)
  row("attempts", r.attempt_latency_ms)
  row("start lag", r.schedule_lag_ms)
  if r.mode == "open" then
    say("(call latency counts from each call's intended start; start lag is how late it began)")
  end
  if r.interrupted then
    say("interrupted by %s after %.1f s: the figures cover what ran", r.interrupted, r.elapsed_s)
  end
  return table.concat(out, "\n") .. "\n"
end

return M
