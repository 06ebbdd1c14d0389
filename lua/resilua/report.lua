--- resilua.report — the report of a load experiment (resilua.experiment)
-- as report.json, a self-contained report.html, and a summary table for
-- the terminal.
--
-- The HTML draws its charts here, in Lua, as static inline SVG: no script
-- to fail in a browser, no network, and it prints as it shows.  Every time
-- chart shares one time axis, shades the fault phases and draws one line
-- per policy in that policy's colour, so the policies compare at a glance
-- and the charts read down the page; breaker states are small multiples,
-- one strip per policy.  The HTML summary table and M.table format their
-- figures through the same function, so the two never disagree.
--
-- Uses cjson (a private instance, so another module's settings do not
-- change what report.json holds).  Values the experiment could not measure
-- are cjson.null (or absent); they are drawn as gaps and shown as "-".
local cjson = require "cjson"

local json = cjson.new()
local null = cjson.null

local M = {}

-- Okabe–Ito colours (distinct for colour-blind readers, dark enough on
-- white); past the last one the colours repeat with a dash pattern.
local COLOURS = { "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
                  "#000000" }
local DASHES = { "", "7 4", "2 3" }
local BREAKER_FILL = { open = "#d62728", half_open = "#f2a93b" }
local PHASE_FILL = "#8c8c8c"
local SLO_MISSED_FILL = "#6a3d9a"
local DRAIN_FILL = "#e6e6e6"
local MERGED_COLOUR = "#444444" -- one line standing for several policies

-- Chart geometry in SVG user units (the SVG scales to the page width).
local CHART_W = 960
local PLOT_LEFT, PLOT_RIGHT = 68, 20
local PLOT_BOTTOM = 40                -- room for the time axis
local LEGEND_ROW_H = 18
local CHART_PLOT_H = 190
local CHAR_W = 6.8                    -- average glyph width at 12 px, for layout
local BREAKER_ROW_H = 46
local TERMINAL_WIDTH = 100

--- Values --------------------------------------------------------------------

-- A finite number, or nil (missing, cjson.null, NaN, infinite).
local function num(v)
  if type(v) == "number" and v == v and v > -math.huge and v < math.huge then return v end
  return nil
end

-- Text, or nil when missing or null.
local function text(v)
  if v == nil or v == null then return nil end
  return tostring(v)
end

local function tbl(v) return type(v) == "table" and v or nil end

local HTML_ESCAPES = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;",
                       ["'"] = "&#39;" }

-- Text for HTML and inline SVG, body or attribute.
local function esc(s)
  return (tostring(s):gsub("[&<>\"']", HTML_ESCAPES))
end

-- Display width of s (UTF-8 aware), and s cut to at most n characters.
local function width(s) return utf8.len(s) or #s end

local function cut(s, n)
  if width(s) <= n then return s end
  local ok, stop = pcall(utf8.offset, s, n)
  if not ok or not stop then return s:sub(1, n - 1) .. "~" end
  return s:sub(1, stop - 1) .. "~"
end

-- "%g" without exponents for the sizes a chart axis shows.
local function fmt_tick(v)
  local a = math.abs(v)
  if a >= 1e6 then return ("%gM"):format(v / 1e6) end
  if a >= 1e4 then return ("%gk"):format(v / 1e3) end
  return ("%g"):format(v)
end

-- "10–15 s", or "from 20 s" for a span that lasts until the end.
local function fmt_span(from, to, dash)
  if not to then return ("from %s s"):format(fmt_tick(from)) end
  return ("%s%s%s s"):format(fmt_tick(from), dash, fmt_tick(to))
end

--- The summary figures (shared by the HTML table and M.table) -----------------

local function fmt_count(v)
  v = num(v)
  return v and ("%d"):format(math.floor(v + 0.5)) or "-"
end

-- Success is cut, not rounded, to two decimals: 99.996 % shows as 99.99,
-- never as a perfect 100.00.  (The epsilon undoes binary fractions such as
-- 0.955 * 10000 = 9549.999...)
local function fmt_success(rate)
  rate = num(rate)
  if not rate then return "-" end
  return ("%.2f"):format(math.floor(rate * 10000 + 1e-6) / 100)
end

--- A success rate (0..1) as the tables show it: a percentage cut to two
-- decimals, "-" when there is none.
M.percent = fmt_success

local function fmt_ms(v)
  v = num(v)
  if not v then return "-" end
  return (v < 1000 and "%.1f" or "%.0f"):format(v)
end

local function fmt_amp(v)
  v = num(v)
  return v and ("%.2f"):format(v) or "-"
end

local function fmt_slo(met, failed, windows)
  if met == nil then return "-" end
  if met then return "met" end
  if failed and windows then return ("missed %d/%d"):format(failed, windows) end
  return "missed"
end

local COLUMNS = {
  { key = "calls", head = "calls" },
  { key = "success", head = "success %" },
  { key = "p95", head = "p95 ms" },
  { key = "p99", head = "p99 ms" },
  { key = "amplification", head = "amplification" },
  { key = "slo", head = "SLO" },
}

local function window_s(r)
  local w = num(r.window_s)
  return w and w > 0 and w or 1
end

-- The windows of a policy: the arrays, their count, and window i's start.
local function windows_of(p)
  local w = tbl(p.windows) or {}
  local n = 0
  for _, k in ipairs({ "t", "offered", "attempts", "upstream_arrivals", "success_rate",
                       "p50", "p95", "p99", "breaker", "budget_exhausted", "throttled", "slo_ok" }) do
    if tbl(w[k]) then n = math.max(n, #w[k]) end
  end
  return w, n
end

local function window_start(r, w, i)
  return num(tbl(w.t) and w.t[i]) or (i - 1) * window_s(r)
end

-- The SLO inside [from, to) from the per-window verdicts whose window
-- starts there: met, windows failed, windows judged; nil without verdicts.
local function phase_slo(r, p, from, to)
  local w, n = windows_of(p)
  if not tbl(w.slo_ok) then return nil end
  local failed, judged = 0, 0
  for i = 1, n do
    local t, ok = window_start(r, w, i), w.slo_ok[i]
    if t >= from and (not to or t < to) and (ok == true or ok == false) then
      judged = judged + 1
      if ok == false then failed = failed + 1 end
    end
  end
  if judged == 0 then return nil end
  return failed == 0, failed, judged
end

-- The policy's row for phase k of r.phases: the row at index k when its
-- name agrees, else the row of that name.
local function policy_phase(p, k, name)
  local rows = tbl(p.phases) or {}
  local at = tbl(rows[k])
  if at and (at.name == nil or at.name == name) then return at end
  for _, row in ipairs(rows) do
    if tbl(row) and row.name == name then return row end
  end
  return {}
end

local function phases_of(r)
  local out = {}
  for _, ph in ipairs(tbl(r.phases) or {}) do
    if tbl(ph) then
      out[#out + 1] = { name = text(ph.name) or ("phase " .. (#out + 1)),
                        from = num(ph.from_s) or 0, to = num(ph.to_s),
                        description = text(ph.description), fault = ph.fault ~= false }
    end
  end
  return out
end

local function policies_of(r)
  local out = {}
  for i, p in ipairs(tbl(r.policies) or {}) do
    local slot = (i - 1) % #COLOURS + 1
    local w, n = windows_of(p)
    out[i] = { name = text(p.name) or ("policy " .. i), description = text(p.description),
               colour = COLOURS[slot], dash = DASHES[(i - 1) // #COLOURS % #DASHES + 1],
               raw = p, windows = w, n = n }
  end
  return out
end

local function duration_of(r)
  return num(r.duration_s) or 0
end

-- The summary: scopes (overall, then each phase), each with one row per
-- policy holding the raw figures and their formatted cells.
local function summary(r)
  local has_slo = tbl(r.slo) ~= nil
  local scopes = {}
  local policies = policies_of(r)
  local overall = { name = "overall", from = 0, to = duration_of(r) > 0 and duration_of(r) or nil,
                    rows = {} }
  for i, p in ipairs(policies) do
    local s = tbl(p.raw.summary) or {}
    local lat = tbl(s.latency_ms) or {}
    local slo = tbl(s.slo)
    local met
    if slo and type(slo.met) == "boolean" then met = slo.met end
    overall.rows[i] = { policy = p, calls = num(s.calls), success = num(s.success_rate),
                        p95 = num(lat.p95), p99 = num(lat.p99),
                        amplification = num(s.amplification),
                        slo = fmt_slo(met, slo and num(slo.windows_failed),
                                      slo and num(slo.windows)) }
  end
  scopes[1] = overall
  for k, ph in ipairs(phases_of(r)) do
    local scope = { name = ph.name, from = ph.from, to = ph.to, description = ph.description,
                    rows = {} }
    for i, p in ipairs(policies) do
      local row = policy_phase(p.raw, k, ph.name)
      scope.rows[i] = { policy = p, calls = num(row.calls), success = num(row.success_rate),
                        p95 = num(row.p95), p99 = num(row.p99),
                        amplification = num(row.amplification),
                        slo = fmt_slo(phase_slo(r, p.raw, ph.from, ph.to)) }
    end
    scopes[#scopes + 1] = scope
  end
  for _, scope in ipairs(scopes) do
    for _, row in ipairs(scope.rows) do
      row.cells = { calls = fmt_count(row.calls), success = fmt_success(row.success),
                    p95 = fmt_ms(row.p95), p99 = fmt_ms(row.p99),
                    amplification = fmt_amp(row.amplification), slo = row.slo }
    end
  end
  local columns = {}
  for _, c in ipairs(COLUMNS) do
    if c.key ~= "slo" or has_slo then columns[#columns + 1] = c end
  end
  return { scopes = scopes, columns = columns }
end

--- The terminal table ---------------------------------------------------------

--- The summary as aligned text: a header, then one block per scope
-- (overall, then each fault phase) with a row per policy.  Fits 100
-- columns; long policy names are cut.
function M.table(r)
  if type(r) ~= "table" then error("report.table: the report must be a table", 2) end
  local s = summary(r)
  local widths, rest = {}, 0
  for i, c in ipairs(s.columns) do
    local w = width(c.head)
    for _, scope in ipairs(s.scopes) do
      for _, row in ipairs(scope.rows) do w = math.max(w, width(row.cells[c.key])) end
    end
    widths[i] = w
    rest = rest + 2 + w
  end
  local name_w = #"policy"
  for _, row in ipairs(s.scopes[1].rows) do name_w = math.max(name_w, width(row.policy.name)) end
  name_w = math.max(8, math.min(name_w, TERMINAL_WIDTH - 2 - rest))

  local out = {}
  local function line(first, cells)
    local parts = { "  " .. first .. (" "):rep(name_w - width(first)) }
    for i, c in ipairs(s.columns) do
      local pad = (" "):rep(widths[i] - width(cells[i]))
      -- Figures right-aligned; the SLO verdict, a word, left-aligned.
      parts[#parts + 1] = c.key == "slo" and cells[i] .. pad or pad .. cells[i]
    end
    out[#out + 1] = (table.concat(parts, "  "):gsub("%s+$", ""))
  end
  local heads = {}
  for i, c in ipairs(s.columns) do heads[i] = c.head end
  line("policy", heads)
  for _, scope in ipairs(s.scopes) do
    local head = ("%s (%s)"):format(scope.name, fmt_span(scope.from, scope.to, "-"))
    if scope.description then head = head .. ": " .. scope.description end
    out[#out + 1] = cut(head, TERMINAL_WIDTH)
    for _, row in ipairs(scope.rows) do
      local cells = {}
      for i, c in ipairs(s.columns) do cells[i] = row.cells[c.key] end
      line(cut(row.policy.name, name_w), cells)
    end
  end
  return table.concat(out, "\n") .. "\n"
end

--- Charts ---------------------------------------------------------------------

local function nice_step(range, count)
  local raw = range / count
  local mag = 10 ^ math.floor(math.log(raw, 10))
  local f = raw / mag
  return (f <= 1 and 1 or f <= 2 and 2 or f <= 5 and 5 or 10) * mag
end

-- A linear scale from 0 (or the given fixed top): top, ticks.
local function linear_scale(max, fixed_top)
  if fixed_top then
    local ticks = {}
    for i = 0, 4 do ticks[#ticks + 1] = fixed_top * i / 4 end
    return { lo = 0, hi = fixed_top, ticks = ticks }
  end
  if not max or max <= 0 then max = 1 end
  local step = nice_step(max, 5)
  local n = math.ceil(max / step - 1e-9)
  local ticks = {}
  for i = 0, n do ticks[#ticks + 1] = i * step end
  return { lo = 0, hi = n * step, ticks = ticks }
end

-- A log scale over whole decades covering [min, max] (both > 0); with
-- few decades the 2s and 5s are ticked too.
local function log_scale(min, max)
  if not min then min, max = 1, 1000 end
  local lo, hi = math.floor(math.log(min, 10)), math.ceil(math.log(max, 10))
  if hi <= lo then hi = lo + 1 end
  local ticks = {}
  for d = lo, hi do
    ticks[#ticks + 1] = 10 ^ d
    if hi - lo <= 3 and d < hi then
      ticks[#ticks + 1] = 2 * 10 ^ d
      ticks[#ticks + 1] = 5 * 10 ^ d
    end
  end
  return { log = true, lo = 10 ^ lo, hi = 10 ^ hi, ticks = ticks }
end

local function fmt_ms_tick(v)
  if v >= 1000 then return fmt_tick(v / 1000) .. " s" end
  return fmt_tick(v) .. " ms"
end

-- Text being written (a page or one SVG): `add` appends formatted text.
local function buffer()
  local parts = {}
  return parts, function(fmt, ...) parts[#parts + 1] = fmt:format(...) end
end

-- The legend rows (policies, wrapped to the chart width): items with x, y.
local function legend_layout(entries)
  local x, row, placed = PLOT_LEFT, 0, {}
  for i, e in ipairs(entries) do
    local w = 30 + width(e.name) * CHAR_W + 18
    if x + w > CHART_W - PLOT_RIGHT and x > PLOT_LEFT then
      x, row = PLOT_LEFT, row + 1
    end
    placed[i] = { entry = e, x = x, y = 14 + row * LEGEND_ROW_H }
    x = x + w
  end
  return placed, (row + 1) * LEGEND_ROW_H + 8
end

local function draw_legend(add, placed)
  for _, l in ipairs(placed) do
    local e = l.entry
    if e.fill then
      add('<rect x="%.1f" y="%.1f" width="22" height="10" fill="%s" fill-opacity="%s"/>',
          l.x, l.y - 9, e.fill, e.opacity or 1)
    else
      add('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="2.5"%s/>',
          l.x, l.y - 4, l.x + 22, l.y - 4, e.colour,
          e.dash ~= "" and (' stroke-dasharray="%s"'):format(e.dash) or "")
    end
    add('<text x="%.1f" y="%.1f" class="legend">%s</text>', l.x + 28, l.y, esc(e.name))
  end
end

local function policy_legend(policies)
  local entries = {}
  for i, p in ipairs(policies) do
    entries[i] = { name = p.name, colour = p.colour, dash = p.dash }
  end
  return entries
end

-- A band's name: across its top where it fits, else upright along its
-- left edge (a narrow band still says what it is).
local function label_band(add, name, x0, x1, top, bottom)
  if width(name) * 6.2 + 6 <= x1 - x0 then
    add('<text class="phase-label" x="%.1f" y="%.1f">%s</text>', x0 + 3, top + 12, esc(name))
  else
    local x, y = x0 + 11, top + 4
    add('<text class="phase-label" x="%.1f" y="%.1f" text-anchor="end" '
        .. 'transform="rotate(-90 %.1f %.1f)">%s</text>', x, y, x, y, esc(cut(name, math.floor(
        (bottom - top - 8) / 6.2))))
  end
end

-- The time frame every chart shares: its end, and x of a time.
local function time_frame(r, policies, phases)
  local t_end = duration_of(r)
  for _, p in ipairs(policies) do
    if p.n > 0 then t_end = math.max(t_end, window_start(r, p.windows, p.n) + window_s(r)) end
  end
  for _, ph in ipairs(phases) do t_end = math.max(t_end, ph.to or ph.from) end
  if t_end <= 0 then t_end = window_s(r) end -- nothing ran: one empty window
  local plot_w = CHART_W - PLOT_LEFT - PLOT_RIGHT
  local duration = duration_of(r)
  return { t_end = t_end, x = function(t) return PLOT_LEFT + t / t_end * plot_w end,
           drain_from = duration > 0 and t_end > duration + 1e-9 and duration or nil }
end

-- After the run's duration no call starts: the windows there only hold
-- calls that were in flight (the drain).  Greyed and labelled, so a
-- chart's tail is not read as load.
local function draw_drain(add, frame, top, bottom, labelled)
  if not frame.drain_from then return end
  local x0, x1 = frame.x(frame.drain_from), frame.x(frame.t_end)
  add('<g class="drain"><title>drain: no call starts after %ss; the calls in flight end</title>',
      fmt_tick(frame.drain_from))
  add('<rect class="drain-band" x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" '
      .. 'fill-opacity="0.5"/>', x0, top, math.max(x1 - x0, 1), bottom - top, DRAIN_FILL)
  add('<line class="drain-mark" x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#777" '
      .. 'stroke-dasharray="2 2"/>', x0, top, x0, bottom)
  if labelled then label_band(add, "drain", x0, x1, top, bottom) end
  add('</g>')
end

-- Shaded fault phases over [top, bottom], each named.  A
-- phase without a fault (`fault = false`: a stretch the summary looks at,
-- such as the recovery) is only a dashed line where it starts.
local function draw_phases(add, frame, phases, top, bottom, labelled)
  for _, ph in ipairs(phases) do
    local x0, x1 = frame.x(ph.from), frame.x(ph.to or frame.t_end)
    add('<g class="phase" data-phase="%s"><title>%s (%s)%s</title>', esc(ph.name), esc(ph.name),
        fmt_span(ph.from, ph.to, "–"), ph.description and esc(": " .. ph.description) or "")
    if ph.fault then
      add('<rect class="phase-band" x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" '
          .. 'fill-opacity="0.16"/>', x0, top, math.max(x1 - x0, 1), bottom - top, PHASE_FILL)
    else
      add('<line class="phase-mark" x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" '
          .. 'stroke-dasharray="4 3"/>', x0, top, x0, bottom, PHASE_FILL)
    end
    if labelled then label_band(add, ph.name, x0, x1, top, bottom) end
    add('</g>')
  end
end

local function draw_time_axis(add, frame, y)
  add('<line class="axis" x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>', PLOT_LEFT, y,
      CHART_W - PLOT_RIGHT, y)
  local step = nice_step(frame.t_end, 10)
  for i = 0, math.floor(frame.t_end / step + 1e-9) do
    local x = frame.x(i * step)
    add('<line class="axis" x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f"/>', x, y, x, y + 5)
    add('<text class="tick" x="%.1f" y="%.1f" text-anchor="middle">%s</text>', x, y + 18,
        fmt_tick(i * step))
  end
  add('<text class="axis-title" x="%d" y="%.1f" text-anchor="end">time since start (s)</text>',
      CHART_W - PLOT_RIGHT, y + 34)
end

-- y of value v on `scale` between top and bottom.
local function y_of(scale, top, bottom)
  return function(v)
    local f
    if scale.log then
      f = (math.log(v, 10) - math.log(scale.lo, 10)) / (math.log(scale.hi, 10)
          - math.log(scale.lo, 10))
    else
      f = (v - scale.lo) / (scale.hi - scale.lo)
    end
    return bottom - f * (bottom - top)
  end
end

-- The grid, its ticks and the y axis with its title.
local function draw_y_axis(add, c, scale, y, top, bottom)
  for _, v in ipairs(scale.ticks) do
    local ty = y(v)
    add('<line class="grid" x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>', PLOT_LEFT, ty,
        CHART_W - PLOT_RIGHT, ty)
    add('<text class="tick" x="%d" y="%.1f" text-anchor="end">%s</text>', PLOT_LEFT - 6, ty + 4,
        (c.tick or fmt_tick)(v))
  end
  add('<line class="axis" x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>', PLOT_LEFT, top, PLOT_LEFT,
      bottom)
  add('<text class="axis-title" transform="rotate(-90)" x="%.1f" y="14" text-anchor="middle">'
      .. '%s</text>', -(top + bottom) / 2, esc(c.unit))
end

-- The y scale over series of points { x, v } (v nil for a gap), for chart c.
local function scale_of(c, series)
  local min_pos, max
  for _, points in ipairs(series) do
    for _, pt in ipairs(points) do
      if pt.v then
        max = math.max(max or pt.v, pt.v)
        if pt.v > 0 then min_pos = math.min(min_pos or pt.v, pt.v) end
      end
    end
  end
  return c.scale == "log" and log_scale(c.log_min or min_pos, c.log_max or max)
         or linear_scale(max, c.fixed_top)
end

-- One line per policy through its points { x, v }: a gap (v nil) ends a
-- run, and a run of one point is drawn as a dot.  "no data" when nothing is.
local function draw_series(add, policies, series, x, y, top, bottom)
  local drawn = 0
  for k, p in ipairs(policies) do
    local d, dots, n = {}, {}, 0
    local run = {}
    local function flush()
      if #run == 1 then dots[#dots + 1] = run[1] end
      for j, pt in ipairs(run) do
        d[#d + 1] = ("%s%.1f %.1f"):format(j == 1 and "M" or "L", pt[1], pt[2])
      end
      run = {}
    end
    for _, pt in ipairs(series[k]) do
      if pt.v then
        run[#run + 1] = { x(pt.x), y(pt.v) }
        n = n + 1
      else
        flush()
      end
    end
    flush()
    add('<g class="series" data-policy="%s"><title>%s</title>', esc(p.name), esc(p.name))
    if n > 0 then
      add('<path class="line" data-points="%d" d="%s" stroke="%s"%s/>', n, table.concat(d),
          p.colour, p.dash ~= "" and (' stroke-dasharray="%s"'):format(p.dash) or "")
      drawn = drawn + 1
    end
    for _, pt in ipairs(dots) do
      add('<circle class="dot" cx="%.1f" cy="%.1f" r="3" fill="%s"/>', pt[1], pt[2], p.colour)
    end
    add('</g>')
  end
  if drawn == 0 then
    add('<text class="no-data" x="%.1f" y="%.1f" text-anchor="middle">no data</text>',
        (PLOT_LEFT + CHART_W - PLOT_RIGHT) / 2, (top + bottom) / 2)
  end
end

-- A chart's SVG around `draw_x_axis(add, bottom)` and the series: the
-- legend, the y axis, and `under(add, top, bottom)` (phases) below the lines.
local function line_chart(c, policies, series, x, draw_x_axis, under)
  local scale = scale_of(c, series)
  local placed, legend_h = legend_layout(policy_legend(policies))
  local top, bottom = legend_h, legend_h + CHART_PLOT_H
  local y = y_of(scale, top, bottom)
  local parts, add = buffer()
  add('<svg class="chart" viewBox="0 0 %d %d" role="img" aria-label="%s" '
      .. 'xmlns="http://www.w3.org/2000/svg">', CHART_W, bottom + PLOT_BOTTOM, esc(c.title))
  draw_legend(add, placed)
  if under then under(add, top, bottom) end
  draw_y_axis(add, c, scale, y, top, bottom)
  draw_x_axis(add, bottom)
  draw_series(add, policies, series, x, y, top, bottom)
  if c.slo_ms then
    local sy = y(c.slo_ms)
    add('<g class="slo-line"><title>SLO: %s</title>', esc(c.slo_text))
    add('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s" stroke-width="1.5" '
        .. 'stroke-dasharray="6 4"/>', PLOT_LEFT, sy, CHART_W - PLOT_RIGHT, sy, SLO_MISSED_FILL)
    add('<text class="phase-label" x="%d" y="%.1f" text-anchor="end" fill="%s">SLO %s</text>',
        CHART_W - PLOT_RIGHT - 4, sy - 4, SLO_MISSED_FILL, esc(c.slo_text))
    add('</g>')
  end
  add('</svg>')
  return table.concat(parts, "\n")
end

-- A time chart: one line per policy of the values `get(policy, i)` returns
-- (nil for a gap), over the shared time frame and the phases.
-- Policies whose series are the same point for point are drawn once,
-- as one line named after all of them ("all policies" when every one is):
-- lines drawn over each other show only the last colour.
local function merge_identical(policies, series)
  local keys, groups, order = {}, {}, {}
  for k, points in ipairs(series) do
    -- Lanes drain for different times: trailing empty windows do not count.
    local last = #points
    while last > 0 and (points[last].v or 0) == 0 do last = last - 1 end
    local parts = {}
    for i = 1, last do parts[i] = ("%s:%s"):format(points[i].x, points[i].v) end
    local key = table.concat(parts, " ")
    if not groups[key] then
      groups[key] = {}
      order[#order + 1] = key
      keys[key] = k
    end
    table.insert(groups[key], policies[k])
    if #points > #series[keys[key]] then keys[key] = k end -- the longest stands for all
  end
  if #order == #policies then return policies, series end
  local merged, merged_series = {}, {}
  for _, key in ipairs(order) do
    local members, first = groups[key], policies[keys[key]]
    local names = {}
    for i, p in ipairs(members) do names[i] = p.name end
    merged[#merged + 1] = { name = #members == #policies and "all policies"
                                   or table.concat(names, ", "),
                            colour = #members > 1 and MERGED_COLOUR or first.colour,
                            dash = #members > 1 and "" or first.dash, n = first.n }
    merged_series[#merged_series + 1] = series[keys[key]]
  end
  return merged, merged_series
end

local function time_chart(r, c, frame, phases, policies)
  local series = {}
  for k, p in ipairs(policies) do
    local points = {}
    for i = 1, p.n do
      local v = c.get(p, i)
      if v and c.scale == "log" and v <= 0 then v = nil end
      points[i] = { x = window_start(r, p.windows, i) + window_s(r) / 2, v = v }
    end
    series[k] = points
  end
  if c.merge_identical and #policies > 1 then policies, series = merge_identical(policies, series) end
  return line_chart(c, policies, series, frame.x,
                    function(add, bottom) draw_time_axis(add, frame, bottom) end,
                    function(add, top, bottom)
                      draw_phases(add, frame, phases, top, bottom, true)
                      draw_drain(add, frame, top, bottom, true)
                    end)
end

-- The latency distribution over the whole run: x is the percentile on a
-- "nines" scale (p90 at 1, p99 at 2, p99.9 at 3), as HdrHistogram plots
-- it, so the tail gets the room it deserves.
local MAX_NINES = 4
local function nines(p) return math.min(MAX_NINES, -math.log(1 - p / 100, 10)) end

local function distribution_chart(policies)
  local series, any = {}, false
  for k, p in ipairs(policies) do
    local d = tbl(tbl(p.raw.summary) and p.raw.summary.distribution)
    local ps, ms = d and tbl(d.p) or {}, d and tbl(d.ms) or {}
    local points = {}
    for i = 1, #ps do
      local pv, v = num(ps[i]), num(ms[i])
      if pv and pv < 100 and v and v > 0 then points[#points + 1] = { x = nines(pv), v = v } end
    end
    any = any or #points > 0
    series[k] = points
  end
  if not any then return nil end
  local plot_w = CHART_W - PLOT_LEFT - PLOT_RIGHT
  local function x(n) return PLOT_LEFT + n / MAX_NINES * plot_w end
  local function axis(add, y)
    add('<line class="axis" x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>', PLOT_LEFT, y,
        CHART_W - PLOT_RIGHT, y)
    for _, p in ipairs({ 0, 50, 90, 99, 99.9, 99.99 }) do
      local tx = x(nines(p))
      add('<line class="axis" x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f"/>', tx, y, tx, y + 5)
      add('<text class="tick" x="%.1f" y="%.1f" text-anchor="middle">p%s</text>', tx, y + 18,
          fmt_tick(p))
    end
    add('<text class="axis-title" x="%d" y="%.1f" text-anchor="end">percentile</text>',
        CHART_W - PLOT_RIGHT, y + 34)
  end
  return line_chart({ title = "Latency distribution", unit = "ms (log scale)", scale = "log",
                      tick = fmt_ms_tick }, policies, series, x, axis)
end

-- Merges consecutive windows with the same value: runs of { value, from, to }.
local function runs(r, p, values)
  local out = {}
  for i = 1, p.n do
    local v = values[i]
    local t0 = window_start(r, p.windows, i)
    local last = out[#out]
    if last and last.value == v and math.abs(last.to - t0) < 1e-9 then
      last.to = t0 + window_s(r)
    else
      out[#out + 1] = { value = v, from = t0, to = t0 + window_s(r) }
    end
  end
  return out
end

-- Small multiples: per policy, a strip shaded where the breaker was open
-- or half-open, and below it a thin strip marking windows that missed
-- the SLO (when the report judges windows).
local function breaker_chart(r, frame, phases, policies)
  local any_slo = false
  for _, p in ipairs(policies) do any_slo = any_slo or tbl(p.windows.slo_ok) ~= nil end
  local legend = { { name = "open", fill = BREAKER_FILL.open, opacity = 0.75 },
                   { name = "half-open", fill = BREAKER_FILL.half_open, opacity = 0.75 },
                   { name = "fault phase", fill = PHASE_FILL, opacity = 0.3 } }
  if any_slo then
    legend[#legend + 1] = { name = "window missed the SLO", fill = SLO_MISSED_FILL }
  end
  if frame.drain_from then
    legend[#legend + 1] = { name = "drain (no new calls)", fill = DRAIN_FILL, opacity = 0.5 }
  end
  local placed, legend_h = legend_layout(legend)
  local height = legend_h + #policies * BREAKER_ROW_H + PLOT_BOTTOM
  local parts, add = buffer()
  add('<svg class="chart" viewBox="0 0 %d %d" role="img" aria-label="breaker state per policy" '
      .. 'xmlns="http://www.w3.org/2000/svg">', CHART_W, height)
  draw_legend(add, placed)
  local x0, x1 = PLOT_LEFT, CHART_W - PLOT_RIGHT
  for k, p in ipairs(policies) do
    local row_top = legend_h + (k - 1) * BREAKER_ROW_H
    local top, bottom = row_top + 16, row_top + 34
    add('<g class="breaker" data-policy="%s">', esc(p.name))
    add('<text class="strip-label" x="%d" y="%.1f" fill="%s">%s</text>', x0, row_top + 12,
        p.colour, esc(p.name))
    add('<rect class="strip" x="%d" y="%.1f" width="%d" height="%.1f"/>', x0, top, x1 - x0,
        bottom - top)
    draw_phases(add, frame, phases, top, bottom, false)
    draw_drain(add, frame, top, bottom, false)
    local states = tbl(p.windows.breaker)
    local shaded = 0
    if states then
      for _, run in ipairs(runs(r, p, states)) do
        local fill = BREAKER_FILL[run.value]
        if fill then
          local bx0, bx1 = frame.x(run.from), frame.x(run.to)
          add('<rect class="band-%s" x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" '
              .. 'fill-opacity="0.75"><title>%s: breaker %s, %s</title></rect>', run.value, bx0,
              top, math.max(bx1 - bx0, 1), bottom - top, fill, esc(p.name),
              (run.value:gsub("_", "-")), fmt_span(run.from, run.to, "–"))
          shaded = shaded + 1
        end
      end
    end
    if shaded == 0 then
      add('<text class="strip-note" x="%d" y="%.1f">%s</text>', x0 + 6, bottom - 5,
          states and "closed throughout" or "no breaker data")
    end
    local slo_ok = tbl(p.windows.slo_ok)
    if slo_ok then
      for _, run in ipairs(runs(r, p, slo_ok)) do
        if run.value == false then
          local bx0, bx1 = frame.x(run.from), frame.x(run.to)
          add('<rect class="slo-missed" x="%.1f" y="%.1f" width="%.1f" height="5" fill="%s">'
              .. '<title>%s: SLO missed, %s</title></rect>', bx0, bottom + 2,
              math.max(bx1 - bx0, 1), SLO_MISSED_FILL, esc(p.name),
              fmt_span(run.from, run.to, "–"))
        end
      end
    end
    add('</g>')
  end
  draw_time_axis(add, frame, legend_h + #policies * BREAKER_ROW_H)
  add('</svg>')
  return table.concat(parts, "\n")
end

-- The time charts this report has data for, in reading order.
local function chart_list(r, policies)
  local function has(key)
    for _, p in ipairs(policies) do
      if tbl(p.windows[key]) then return true end
    end
    return false
  end
  local function field(key)
    return function(p, i)
      local a = tbl(p.windows[key])
      return a and num(a[i])
    end
  end
  local charts = {
    { id = "offered", title = "Offered load", unit = "calls/s", get = field("offered"),
      merge_identical = true,
      note = "Calls due per second on the schedule (open loop; the same for every policy, so"
        .. " drawn once), or started (closed loop)." },
  }
  if has("upstream_arrivals") then
    charts[#charts + 1] = {
      id = "upstream", title = "Requests reaching the upstream (the retry storm)",
      unit = "requests/s",
      note = "First attempts plus retries that arrived at the upstream, per second"
        .. " (the client's attempts/s for a policy without the upstream's count).",
      get = function(p, i)
        local a = tbl(p.windows.upstream_arrivals) or tbl(p.windows.attempts)
        return a and num(a[i])
      end }
  else
    charts[#charts + 1] = { id = "upstream", title = "Attempts sent (the retry storm)",
                            unit = "attempts/s", get = field("attempts"),
                            note = "First attempts plus retries the client sent, per second." }
  end
  if has("upstream_queue") then
    charts[#charts + 1] = { id = "queue", title = "Upstream queue depth", unit = "requests",
                            get = field("upstream_queue"),
                            note = "Requests waiting at the upstream at each window's end." }
  end
  charts[#charts + 1] = {
    id = "success", title = "Success rate", unit = "% of calls ended", fixed_top = 100,
    tick = function(v) return fmt_tick(v) .. "%" end,
    note = "Share of the calls that ended in each window that succeeded; a gap where none ended.",
    get = function(p, i)
      local v = field("success_rate")(p, i)
      return v and 100 * v
    end }
  -- The three percentiles share one log scale, so their charts compare.
  local lat_min, lat_max
  for _, p in ipairs(policies) do
    for _, key in ipairs({ "p50", "p95", "p99" }) do
      for i = 1, p.n do
        local v = field(key)(p, i)
        if v and v > 0 then
          lat_min, lat_max = math.min(lat_min or v, v), math.max(lat_max or v, v)
        end
      end
    end
  end
  -- An SLO on a percentile is a line on its chart, inside the scale.
  local slo = tbl(r.slo) or {}
  for _, key in ipairs({ "p50", "p95", "p99" }) do
    local limit = num(slo[key .. "_ms"])
    if limit and limit > 0 and lat_min then
      lat_min, lat_max = math.min(lat_min, limit), math.max(lat_max, limit)
    end
  end
  for _, key in ipairs({ "p50", "p95", "p99" }) do
    local limit = num(slo[key .. "_ms"])
    if not (limit and limit > 0) then limit = nil end
    charts[#charts + 1] = {
      id = "latency-" .. key, title = ("Call latency, %s"):format(key), unit = "ms (log scale)",
      scale = "log", log_min = lat_min, log_max = lat_max, tick = fmt_ms_tick, get = field(key),
      slo_ms = limit, slo_text = limit and ("%s < %s ms"):format(key, fmt_tick(limit)),
      note = ("The %s of the latencies of calls that ended in each window%s."):format(key,
        limit and (", and the SLO's %s < %s ms (dashed)"):format(key, fmt_tick(limit)) or "") }
  end
  -- Refusals per window, for the policies that have the mechanism.
  for _, c in ipairs({
    { "budget_exhausted", "budget", "Retry budget exhausted", "refused per window",
      "Calls or retries the retry budget refused in each window: the budget capping the storm." },
    { "throttled", "throttled", "Adaptive throttle", "calls refused per window",
      "Calls the adaptive throttle refused locally (nothing sent) in each window: the load it"
        .. " shed while fewer than 1/k of the attempts were accepted." },
  }) do
    if has(c[1]) then
      charts[#charts + 1] = { id = c[2], title = c[3], unit = c[4], get = field(c[1]), note = c[5] }
    end
  end
  return charts
end

--- The HTML -------------------------------------------------------------------

local STYLE = [[
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1040px; padding: 24px 28px 48px; color: #1d1d1f;
  background: #fff; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
  "DejaVu Sans", "Helvetica Neue", Arial, sans-serif;
  -webkit-print-color-adjust: exact; print-color-adjust: exact; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 0; }
p.lead { margin: 0 0 12px; color: #444; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.meta dt { color: #666; }
dl.meta dd { margin: 0; }
ul.plain { list-style: none; padding: 0; margin: 0; }
ul.plain li { margin: 3px 0; }
.swatch { display: inline-block; vertical-align: middle; margin-right: 6px; }
.muted { color: #666; }
table.summary { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
table.summary th, table.summary td { padding: 4px 10px; border-bottom: 1px solid #eee;
  text-align: right; white-space: nowrap; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
table.summary thead th { border-bottom: 2px solid #999; font-weight: 600; }
table.summary tr.scope th { text-align: left; background: #f4f4f6; font-weight: 600;
  padding-top: 8px; }
table.summary tr.scope th span { font-weight: normal; color: #555; margin-left: 8px; }
table.summary td.best { font-weight: 700; }
table.summary td.slo-missed { color: #a8201a; }
table.summary td.slo-met { color: #1b7a36; }
figure.chart { margin: 22px 0; break-inside: avoid; page-break-inside: avoid; }
figure.chart figcaption p { margin: 2px 0 4px; color: #555; font-size: 13px; }
svg.chart { display: block; width: 100%; height: auto; font-family: inherit; }
svg .legend, svg .strip-label { font-size: 12px; fill: #333; }
svg .strip-label { font-weight: 600; }
svg .tick { font-size: 11px; fill: #444; }
svg .axis-title { font-size: 11px; fill: #555; }
svg .axis { stroke: #555; stroke-width: 1; }
svg .grid { stroke: #e3e3e3; stroke-width: 1; }
svg .line { fill: none; stroke-width: 2; stroke-linejoin: round; stroke-linecap: round; }
svg .phase-label { font-size: 11px; fill: #555; paint-order: stroke; stroke: #fff;
  stroke-width: 3px; stroke-opacity: 0.8; }
svg .strip { fill: #fff; stroke: #bbb; }
svg .strip-note { font-size: 11px; fill: #777; }
svg .no-data { font-size: 14px; fill: #888; }
footer { margin-top: 36px; font-size: 12px; color: #777; }
@media print {
  body { max-width: none; padding: 0; font-size: 11pt; }
  h2 { break-after: avoid; page-break-after: avoid; }
  table.summary { break-inside: auto; }
}
]]

local function swatch(p)
  return ('<svg class="swatch" width="22" height="10" viewBox="0 0 22 10" aria-hidden="true">'
          .. '<line x1="0" y1="5" x2="22" y2="5" stroke="%s" stroke-width="3"%s/></svg>')
    :format(p.colour, p.dash ~= "" and (' stroke-dasharray="%s"'):format(p.dash) or "")
end

-- The best figure of a column among a scope's rows: highest success,
-- lowest latency and amplification; nil when fewer than two policies
-- have the figure or all have the same.
local BETTER = { success = function(a, b) return a > b end,
                 p95 = function(a, b) return a < b end, p99 = function(a, b) return a < b end,
                 amplification = function(a, b) return a < b end }

local function best_of(rows, key)
  local better, best, worst = BETTER[key], nil, nil
  if not better then return nil end
  for _, row in ipairs(rows) do
    local v = row[key]
    if v then
      if best == nil or better(v, best) then best = v end
      if worst == nil or better(worst, v) then worst = v end
    end
  end
  if best == worst then return nil end
  return best
end

local function summary_table(add, r)
  local s = summary(r)
  add('<table class="summary" id="summary"><thead><tr><th>policy</th>')
  for _, c in ipairs(s.columns) do add('<th>%s</th>', esc(c.head)) end
  add('</tr></thead>')
  for _, scope in ipairs(s.scopes) do
    add('<tbody data-scope="%s"><tr class="scope"><th colspan="%d">%s<span>%s%s</span></th></tr>',
        esc(scope.name), #s.columns + 1, esc(scope.name), fmt_span(scope.from, scope.to, "–"),
        scope.description and esc(" · " .. scope.description) or "")
    local best = {}
    for _, c in ipairs(s.columns) do best[c.key] = best_of(scope.rows, c.key) end
    for _, row in ipairs(scope.rows) do
      add('<tr class="policy" data-policy="%s"><td>%s%s</td>', esc(row.policy.name),
          swatch(row.policy), esc(row.policy.name))
      for _, c in ipairs(s.columns) do
        local class = ""
        if c.key == "slo" and row.slo ~= "-" then
          class = row.slo == "met" and ' class="slo-met"' or ' class="slo-missed"'
        elseif best[c.key] ~= nil and row[c.key] == best[c.key] then
          class = ' class="best"'
        end
        add('<td%s>%s</td>', class, esc(row.cells[c.key]))
      end
      add('</tr>')
    end
    add('</tbody>')
  end
  add('</table>')
  local notes = { "Success % is cut, not rounded, to two decimals; p95/p99 are call latencies"
                  .. " in ms; amplification is attempts per call. Bold: the best figure in each"
                  .. " block." }
  if tbl(r.slo) then
    notes[#notes + 1] = ' SLO "missed n/m": n of the m windows judged broke the SLO.'
  end
  add('<p class="muted">%s</p>', esc(table.concat(notes)))
end

-- The load as the experiment describes it, else as its settings say.
local function load_line(load)
  if not tbl(load) then return nil end
  if text(load.description) then return text(load.description) end
  if text(load.mode) == "closed" then
    return ("closed loop, %s calls in flight"):format(text(load.concurrency) or "?")
  elseif text(load.mode) then
    return ("open loop, %s arrivals at %s calls/s"):format(text(load.arrivals) or "constant",
                                                           text(load.rate) or "?")
  end
  return nil
end

--- The report as one self-contained HTML page (inline CSS and SVG).
function M.html(r)
  if type(r) ~= "table" then error("report.html: the report must be a table", 2) end
  local policies, phases = policies_of(r), phases_of(r)
  local frame = time_frame(r, policies, phases)
  local title = text(r.title) or "experiment"
  local parts, add = buffer()
  add('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">')
  add('<meta name="viewport" content="width=device-width, initial-scale=1">')
  add('<title>%s — resilua experiment</title>', esc(title))
  add('<style>%s</style></head><body>', STYLE)
  add('<header><h1>%s</h1>', esc(title))
  if text(r.description) then add('<p class="lead">%s</p>', esc(r.description)) end
  add('<dl class="meta">')
  local function meta(name, value)
    if value then add('<dt>%s</dt><dd>%s</dd>', esc(name), esc(value)) end
  end
  meta("load", load_line(r.load))
  meta("upstream", tbl(r.upstream) and text(r.upstream.description))
  meta("SLO", tbl(r.slo) and text(r.slo.description))
  meta("duration", num(r.duration_s) and ("%g s in %g s windows"):format(r.duration_s,
                                                                          window_s(r)))
  meta("seed", text(r.seed))
  meta("created", text(r.created))
  add('</dl></header>')

  add('<section id="policies"><h2>Policies</h2><ul class="plain">')
  for _, p in ipairs(policies) do
    add('<li>%s<strong>%s</strong>%s</li>', swatch(p), esc(p.name),
        p.description and esc(" — " .. p.description) or "")
  end
  if #policies == 0 then add('<li class="muted">none</li>') end
  add('</ul></section>')

  add('<section id="phases"><h2>Fault phases</h2><ul class="plain">')
  for _, ph in ipairs(phases) do
    add('<li><strong>%s</strong> <span class="muted">%s</span>%s</li>', esc(ph.name),
        fmt_span(ph.from, ph.to, "–"), ph.description and esc(" — " .. ph.description) or "")
  end
  if #phases == 0 then add('<li class="muted">none: steady conditions throughout</li>') end
  add('</ul></section>')

  add('<section id="summary-section"><h2>Summary</h2>')
  summary_table(add, r)
  local distribution = distribution_chart(policies)
  if distribution then
    add('<figure class="chart" id="chart-distribution"><figcaption><h3>Latency distribution'
        .. '</h3><p>Every call of the run, by percentile (p99: 1 call in 100 was slower);'
        .. ' failed and timed-out calls included.</p></figcaption>%s</figure>', distribution)
  end
  add('</section>')

  add('<section id="charts"><h2>Over time</h2>')
  for _, c in ipairs(chart_list(r, policies)) do
    add('<figure class="chart" id="chart-%s"><figcaption><h3>%s</h3><p>%s</p></figcaption>',
        c.id, esc(c.title), esc(c.note))
    add('%s</figure>', time_chart(r, c, frame, phases, policies))
  end
  add('<figure class="chart" id="chart-breaker"><figcaption><h3>Circuit breaker</h3>'
      .. '<p>Where each policy\'s breaker was open or half-open (the state at each window\'s'
      .. ' end)%s.</p></figcaption>', tbl(r.slo) and ", and the windows that missed the SLO" or "")
  add('%s</figure>', breaker_chart(r, frame, phases, policies))
  add('</section>')
  add('<footer>resilua experiment report. The figures are also in report.json.</footer>')
  add('</body></html>\n')
  return table.concat(parts, "\n")
end

--- Files ----------------------------------------------------------------------

-- Writes content to a fresh temporary name in dir; returns that name or
-- nil, err.  A table's address makes the name unique in this process.
local function write_temp(dir, name, content)
  local tmp = ("%s/.%s.%s.tmp"):format(dir, name, tostring({}):match("0x(%x+)") or os.time())
  local f, err = io.open(tmp, "wb")
  if not f then return nil, err end
  local ok, werr = f:write(content)
  local closed, cerr = f:close()
  if not ok or not closed then
    os.remove(tmp)
    return nil, ("%s: %s"):format(tmp, werr or cerr)
  end
  return tmp
end

--- Writes dir/report.json and dir/report.html, each to a temporary name in
-- dir first and renamed into place, so a reader never sees half a file.
-- dir must exist.  Returns html_path, json_path, or nil, err.
function M.write(r, dir)
  if type(r) ~= "table" then error("report.write: the report must be a table", 2) end
  if type(dir) ~= "string" then error("report.write: dir must be a string", 2) end
  local ok, encoded = pcall(json.encode, r)
  if not ok then return nil, "report.json: " .. tostring(encoded) end
  local html = M.html(r)
  local json_path, html_path = dir .. "/report.json", dir .. "/report.html"
  local json_tmp, err = write_temp(dir, "report.json", encoded .. "\n")
  if not json_tmp then return nil, err end
  local html_tmp, herr = write_temp(dir, "report.html", html)
  if not html_tmp then
    os.remove(json_tmp)
    return nil, herr
  end
  local moved, merr = os.rename(json_tmp, json_path)
  if moved then moved, merr = os.rename(html_tmp, html_path) end
  if not moved then
    os.remove(json_tmp)
    os.remove(html_tmp)
    return nil, merr
  end
  return html_path, json_path
end

return M
