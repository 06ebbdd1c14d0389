-- The experiment report (resilua.report): report.json round-trips, the
-- page is self-contained, headless Chromium renders its charts, and the
-- terminal table.  The report under test is synthetic but shaped like a
-- real outage experiment: three policies, 150 calls/s for 30 s, a full
-- outage from 10 to 15 s and a capacity drop from 20 s to the end.
-- Chromium is Debian's `chromium` (tools/deps.sh installs it); it reads
-- the page from a file: URL, with a throwaway profile and HOME.
local helpers = require "helpers"
local cjson = require "cjson"
local report = require "resilua.report"

local null = cjson.null
local OUTAGE = { from = 10, to = 15 }
local DROP_FROM = 20

-- Three decimals: figures that survive JSON's 14 significant digits exactly.
local function r3(v) return math.floor(v * 1000 + 0.5) / 1000 end

-- What each policy does in the window starting at t (offered calls/s):
-- attempts, upstream arrivals, queue, success rate, p50/p95/p99, breaker
-- state, budget refusals.  nil success and latencies: no call ended.
local BEHAVIOUR = {
  ["no-retry"] = function(t, offered)
    if t >= OUTAGE.from and t < OUTAGE.to then
      return offered, offered, 0, 0, 1.8, 3.1, 4.6, "closed", 0
    elseif t >= DROP_FROM then
      return offered, offered, 120, 0.97, 210, 640, 910, "closed", 0
    end
    return offered, offered, 2, 1, 48, 95, 140, "closed", 0
  end,
  ["naive-retry"] = function(t, offered)
    if t >= OUTAGE.from and t < OUTAGE.to then
      if t == 12 then return 3 * offered, 3 * offered, 0, nil, nil, nil, nil, "closed", 0 end
      return 3 * offered, 3 * offered, 0, 0, 620, 1400, 2100, "closed", 0
    elseif t >= DROP_FROM then
      return 2.4 * offered, 2.4 * offered, 200, 0.81, 900, 2600, 4100, "closed", 0
    end
    return offered, offered, 2, 1, 49, 97, 150, "closed", 0
  end,
  ["budget+breaker"] = function(t, offered)
    if t == OUTAGE.from then
      return 1.2 * offered, 1.2 * offered, 0, 0, 2.2, 4.0, 5.1, "open", 35
    elseif t > OUTAGE.from and t < OUTAGE.to then
      return 0, 0, 0, 0, 0.05, 0.08, 0.2, "open", 0
    elseif t == OUTAGE.to then
      return offered, offered, 2, 0.9, 52, 110, 160, "half_open", 0
    elseif t == 21 then
      return 0.5 * offered, 0.5 * offered, 60, 0.5, 300, 700, 800, "open", 4
    elseif t >= DROP_FROM then
      return 1.05 * offered, 1.05 * offered, 110, 0.96, 220, 690, 950, "closed", 2
    end
    return offered, offered, 2, 1, 48, 96, 141, "closed", 0
  end,
}

-- Calls, success, amplification and the worst p95/p99 over the windows
-- starting in [from, to).
local function aggregate(w, from, to)
  local calls, ok, attempts, p95, p99 = 0, 0, 0, 0, 0
  for i, t in ipairs(w.t) do
    if t >= from and t < to then
      calls = calls + w.offered[i]
      attempts = attempts + w.attempts[i]
      if w.success_rate[i] ~= null then ok = ok + w.offered[i] * w.success_rate[i] end
      if w.p95[i] ~= null then p95, p99 = math.max(p95, w.p95[i]), math.max(p99, w.p99[i]) end
    end
  end
  return { calls = calls, ok = math.floor(ok + 0.5), success_rate = r3(ok / calls),
           amplification = r3(attempts / calls), attempts = r3(attempts), p95 = p95, p99 = p99 }
end

local function policy(name, description, windows_n)
  local w = { t = {}, offered = {}, attempts = {}, upstream_arrivals = {}, upstream_queue = {},
              success_rate = {}, p50 = {}, p95 = {}, p99 = {}, breaker = {},
              budget_exhausted = {}, slo_ok = {} }
  for i = 1, windows_n do
    local t = i - 1
    local offered = 150 + (i * 37) % 11 - 5 -- Poisson-like wobble around 150/s
    local attempts, upstream, queue, success, p50, p95, p99, breaker, refused =
      BEHAVIOUR[name](t, offered)
    w.t[i], w.offered[i] = t, offered
    w.attempts[i], w.upstream_arrivals[i] = r3(attempts), r3(upstream)
    w.upstream_queue[i] = queue
    w.success_rate[i] = success or null
    w.p50[i], w.p95[i], w.p99[i] = p50 or null, p95 or null, p99 or null
    w.breaker[i], w.budget_exhausted[i] = breaker, refused
    if success then w.slo_ok[i] = success >= 0.99 and p95 < 800 else w.slo_ok[i] = null end
  end
  local all = aggregate(w, 0, windows_n)
  local failed = 0
  for _, ok in ipairs(w.slo_ok) do if ok == false then failed = failed + 1 end end
  local outage, drop = aggregate(w, OUTAGE.from, OUTAGE.to), aggregate(w, DROP_FROM, windows_n)
  return {
    name = name, description = description,
    summary = { calls = all.calls, ok = all.ok, success_rate = all.success_rate,
                attempts = all.attempts, amplification = all.amplification,
                latency_ms = { p50 = 60, p90 = 400, p95 = all.p95 * 0.8, p99 = all.p99 * 0.9,
                               p999 = all.p99, max = all.p99 * 1.2 },
                outcomes = { ok = all.ok, failed = all.calls - all.ok, gave_up = 0,
                             breaker_open = 0 },
                slo = { met = failed == 0, windows_failed = failed, windows = windows_n },
                distribution = { p = { 0, 50, 90, 99, 99.9, 100 },
                                 ms = { 0.2, 60, 400, all.p99 * 0.9, all.p99, all.p99 * 1.2 } } },
    phases = {
      { name = "outage", calls = outage.calls, success_rate = outage.success_rate,
        amplification = outage.amplification, p95 = outage.p95, p99 = outage.p99 },
      { name = "capacity drop", calls = drop.calls, success_rate = drop.success_rate,
        amplification = drop.amplification, p95 = drop.p95, p99 = drop.p99 },
    },
    windows = w,
  }
end

local function outage_report()
  return {
    title = "outage",
    description = "no retry vs naive retry vs budget+breaker through a full outage and a "
      .. "capacity drop",
    seed = 1, window_s = 1, duration_s = 30, created = "2026-11-30T07:00:00Z",
    load = { mode = "open", arrivals = "poisson", rate = 150,
             description = "150 calls/s, Poisson" },
    upstream = { description = "10 workers, lognormal 50 ms, queue 200" },
    phases = {
      { name = "outage", from_s = OUTAGE.from, to_s = OUTAGE.to, description = "100% 503" },
      { name = "capacity drop", from_s = DROP_FROM, to_s = null, description = "workers 10 -> 3" },
    },
    slo = { description = "p95 < 800 ms and success >= 99%" },
    policies = {
      policy("no-retry", "one attempt per call", 30),
      policy("naive-retry", "3 attempts, 50 ms backoff, no budget, no breaker", 30),
      policy("budget+breaker", "3 attempts, a 10 % retry budget & a breaker (5 failures)", 30),
    },
  }
end

-- One policy, no phases, no SLO, a single window in which no call ended
-- and no calls at all; its name and description need escaping.
local function empty_report()
  return {
    title = "smoke <test>", seed = 2, window_s = 1, duration_s = 1,
    created = "2026-11-30T07:00:00Z",
    load = { mode = "closed", concurrency = 4 },
    phases = {},
    policies = {
      { name = [[a<b>&"c"]], description = [[</script><img src=x onerror=alert(1)>]],
        summary = { calls = 0, ok = 0, success_rate = null, attempts = 0, amplification = null,
                    latency_ms = { p50 = null, p95 = null, p99 = null }, outcomes = {} },
        phases = {},
        windows = { t = { 0 }, offered = { 0 }, attempts = { 0 }, success_rate = { null },
                    p50 = { null }, p95 = { null }, p99 = { null }, breaker = { "closed" },
                    budget_exhausted = { 0 } } },
    },
  }
end

--- Chromium ------------------------------------------------------------------

local CHROMIUM = "chromium"

-- Runs headless Chromium on file `page` with extra flags; returns stdout
-- (its stderr is noise).  A profile and HOME inside `dir` keep it out of
-- the real home.
local function chromium(dir, page, flags)
  local q = helpers.quote
  local r = helpers.run(("HOME=%s timeout 60 %s --headless --no-sandbox --disable-gpu "
                         .. "--no-first-run --disable-extensions --user-data-dir=%s %s %s")
                          :format(q(dir), CHROMIUM, q(dir .. "/chromium-profile"), flags,
                                  q("file://" .. page)))
  assert(r.code == 0, ("chromium exited %d: %s"):format(r.code, r.stderr:sub(-2000)))
  return r.stdout
end

local function dump_dom(dir, page)
  local dom = chromium(dir, page, "--dump-dom")
  assert.matches("</html>", dom)
  return dom
end

-- Takes a screenshot of the page; returns the PNG's size in bytes and its
-- width and height from the IHDR chunk.
local function screenshot(dir, page)
  local png = dir .. "/screenshot.png"
  chromium(dir, page, ("--hide-scrollbars --window-size=1280,2400 --screenshot=%s")
                        :format(helpers.quote(png)))
  local data = assert(helpers.read_file(png), "no screenshot written")
  assert.are.equal("\137PNG\r\n\26\n", data:sub(1, 8))
  return #data, (">I4"):unpack(data, 17), (">I4"):unpack(data, 21)
end

-- The element that starts with `open` (a literal start tag prefix) up to
-- its matching `</tag>`, nested elements of that tag included: the text,
-- or nil.
local function element(html, open, tag)
  local start = html:find(open, 1, true)
  if not start then return nil end
  local depth, pos = 0, start
  repeat
    local s, e, closing = html:find("<(/?)" .. tag .. "[%s>]", pos)
    if not s then return nil end
    depth = depth + (closing == "/" and -1 or 1)
    pos = e + 1
  until depth == 0
  return html:sub(start, pos - 1)
end

local function count(s, pattern)
  local n = 0
  for _ in s:gmatch(pattern) do n = n + 1 end
  return n
end

local function attr(name, value) return (' %s="%s"'):format(name, value) end

describe("resilua.report", function()
  local have_chromium = os.execute("command -v " .. CHROMIUM .. " >/dev/null 2>&1")

  it("writes report.json and report.html, and the JSON decodes to the same figures", function()
    local dir, r = helpers.tmpdir(), outage_report()
    local html_path, json_path = report.write(r, dir)
    assert.are.equal(dir .. "/report.html", html_path)
    assert.are.equal(dir .. "/report.json", json_path)
    assert.are.same(r, cjson.decode(helpers.read_file(json_path)))
    assert.are.equal(report.html(r), helpers.read_file(html_path))
    -- The temporary names were renamed away.
    local ls = helpers.run({ "ls", "-A", dir })
    assert.are.equal("report.html\nreport.json\n", ls.stdout)
    -- A second write replaces both.
    r.title = "outage, again"
    assert.is_truthy(report.write(r, dir))
    assert.are.equal("outage, again", cjson.decode(helpers.read_file(json_path)).title)
    assert.are.equal("report.html\nreport.json\n", helpers.run({ "ls", "-A", dir }).stdout)
  end)

  it("returns nil, err for a directory it cannot write, and raises on misuse", function()
    local html, err = report.write(outage_report(), "/nonexistent/resilua-report")
    assert.is_nil(html)
    assert.matches("nonexistent", err)
    assert.has_error(function() report.write(nil, "/tmp") end)
    assert.has_error(function() report.html("outage") end)
  end)

  it("is self-contained and escapes the report's text", function()
    local pages = { report.html(outage_report()), report.html(empty_report()) }
    for _, html in ipairs(pages) do
      for _, ref in ipairs({ "src%s*=%s*[\"']?([^\"'%s>]*)", "href%s*=%s*[\"']?([^\"'%s>]*)",
                             "url%(%s*[\"']?([^\"')]*)", "@import%s*[\"']?([^\"';%s]*)" }) do
        for target in html:gmatch(ref) do
          assert.is_falsy(target:match("^%a[%w+.-]*:") or target:match("^//"),
                          "external reference " .. target)
        end
      end
      assert.is_nil(html:find("<script", 1, true))
      assert.is_nil(html:find("<link", 1, true))
      -- A NaN or infinity printed as a figure.
      assert.is_nil(html:find("[%s>\"]%-?nan[^%a]") or html:find("[%s>\"]%-?inf[^%a]"))
    end
    local empty = pages[2]
    assert.matches("a&lt;b&gt;&amp;&quot;c&quot;", empty, 1, true)
    assert.matches("&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;", empty, 1, true)
    assert.is_nil(empty:find("<img", 1, true))
    assert.matches("smoke &lt;test&gt;", empty, 1, true)
  end)

  it("renders in headless Chromium: every chart, series, phase and breaker band", function()
    assert(have_chromium, "chromium is missing: run tools/deps.sh")
    local dir, r = helpers.tmpdir(), outage_report()
    local page = assert(report.write(r, dir))
    local dom = dump_dom(dir, page)
    local names = { "no-retry", "naive-retry", "budget+breaker" }

    for _, id in ipairs({ "offered", "upstream", "queue", "success", "latency-p50",
                          "latency-p95", "latency-p99", "budget" }) do
      local fig = assert(element(dom, '<figure class="chart" id="chart-' .. id .. '"', "figure"),
                         "no chart " .. id)
      assert.matches("<svg", fig, 1, true)
      assert.are.equal(2, count(fig, 'class="phase%-band"'), id)
      -- The offered load is the same schedule for all: one line.
      for _, name in ipairs(id == "offered" and { "all policies" } or names) do
        local series = assert(element(fig, '<g class="series"' .. attr("data-policy", name), "g"),
                              ("%s: no series for %s"):format(id, name))
        local points = tonumber(series:match('data%-points="(%d+)"'))
        -- naive-retry has one window (12 s) in which no call ended: a gap.
        assert.is_true(points and points >= 29, ("%s/%s: %s points"):format(id, name, points))
        local d = series:match(' d="([^"]+)"')
        assert.is_true(count(d, "L") >= 25, ("%s/%s: path %s"):format(id, name, d))
      end
    end
    -- The distribution: a line per policy through its percentiles below p100.
    local dist = assert(element(dom, '<figure class="chart" id="chart-distribution"', "figure"))
    for _, name in ipairs(names) do
      local series = element(dist, '<g class="series"' .. attr("data-policy", name), "g")
      assert.are.equal("5", series:match('data%-points="(%d+)"'), name)
    end
    assert.matches(">p99.9<", dist, 1, true)

    local p95 = element(dom, '<figure class="chart" id="chart-latency-p95"', "figure")
    local gap = element(p95, '<g class="series"' .. attr("data-policy", "naive-retry"), "g")
    assert.are.equal(2, count(gap:match(' d="([^"]+)"'), "M"))

    local breaker = assert(element(dom, '<figure class="chart" id="chart-breaker"', "figure"))
    local strip = function(name)
      return assert(element(breaker, '<g class="breaker"' .. attr("data-policy", name), "g"))
    end
    -- Open 10-15 s and 21-22 s, half-open 15-16 s.
    assert.are.equal(2, count(strip("budget+breaker"), 'class="band%-open"'))
    assert.are.equal(1, count(strip("budget+breaker"), 'class="band%-half_open"'))
    assert.are.equal(0, count(strip("no-retry"), 'class="band%-'))
    assert.matches("closed throughout", strip("no-retry"), 1, true)
    assert.are.equal(2, count(strip("naive-retry"), 'class="phase%-band"'))
    assert.is_true(count(strip("naive-retry"), 'class="slo%-missed"') >= 1)

    -- The summary: overall, then each phase, a row per policy, the same
    -- cells as report.table.
    local tbl = assert(element(dom, '<table class="summary"', "table"))
    for _, scope in ipairs({ "overall", "outage", "capacity drop" }) do
      local block = assert(element(tbl, "<tbody" .. attr("data-scope", scope), "tbody"), scope)
      assert.are.equal(3, count(block, '<tr class="policy"'), scope)
    end
    local text = report.table(r)
    for _, name in ipairs(names) do
      local row = element(tbl, '<tr class="policy"' .. attr("data-policy", name), "tr")
      local cells = {}
      for cell in row:gmatch("<td[^>]*>([^<]*)</td>") do cells[#cells + 1] = cell end
      assert.are.equal(6, #cells) -- after the name: calls, success, p95, p99, amp, SLO
      local line = text:match("\n  " .. name:gsub("%p", "%%%0") .. " +([^\n]+)")
      local words = {}
      for w in line:gmatch("%S+") do words[#words + 1] = w end
      assert.are.equal(table.concat(cells, " "), table.concat(words, " "), name)
    end

    local size, w, h = screenshot(dir, page)
    assert.are.equal(1280, w)
    assert.are.equal(2400, h)
    -- A blank page of this size is about 14 kB; this one is mostly charts.
    assert.is_true(size > 150000, "screenshot of " .. size .. " bytes")
  end)

  it("labels every phase, marks the drain, draws the SLO line and a shared line once", function()
    assert(have_chromium, "chromium is missing: run tools/deps.sh")
    local dir, r = helpers.tmpdir(), outage_report()
    -- A phase too narrow for its name across, and an SLO on p95.
    table.insert(r.phases, 1, { name = "blip", from_s = 3, to_s = 3.4, description = "resets" })
    r.slo.p95_ms = 800
    -- Two windows after the 30 s run: the calls in flight ending.
    for _, p in ipairs(r.policies) do
      local counts = { offered = true, attempts = true, upstream_arrivals = true,
                       upstream_queue = true, budget_exhausted = true }
      for k, a in pairs(p.windows) do
        for _ = 1, 2 do
          a[#a + 1] = (k == "t" and #a) or (k == "breaker" and "closed") or (counts[k] and 0)
                      or null
        end
      end
    end
    -- One policy's offered load differs: two lines, one of them shared.
    r.policies[3].windows.offered[5] = 151
    local dom = dump_dom(dir, assert(report.write(r, dir)))
    for _, id in ipairs({ "offered", "success", "latency-p95" }) do
      local fig = assert(element(dom, '<figure class="chart" id="chart-' .. id .. '"', "figure"))
      for _, name in ipairs({ "blip", "outage", "capacity drop" }) do
        local band = assert(element(fig, '<g class="phase"' .. attr("data-phase", name), "g"), name)
        assert.matches('<text class="phase%-label"[^>]*>' .. name .. "</text>", band)
      end
      local drain = assert(element(fig, '<g class="drain"', "g"), id .. ": no drain")
      assert.matches(">drain</text>", drain)
      assert.are.equal(id == "latency-p95" and 1 or 0, count(fig, 'class="slo%-line"'), id)
    end
    local offered = element(dom, '<figure class="chart" id="chart-offered"', "figure")
    assert.are.equal(2, count(offered, '<g class="series"'))
    assert.truthy(element(offered, '<g class="series"' .. attr("data-policy", "no-retry, naive-retry"), "g"))
    assert.truthy(element(offered, '<g class="series"' .. attr("data-policy", "budget+breaker"), "g"))
    assert.matches("SLO p95 &lt; 800 ms", dom, 1, true)
    local breaker = element(dom, '<figure class="chart" id="chart-breaker"', "figure")
    assert.are.equal(3, count(breaker, 'class="drain%-band"'))
  end)

  it("renders a report with one policy, no phases and no calls", function()
    assert(have_chromium, "chromium is missing: run tools/deps.sh")
    local dir = helpers.tmpdir()
    local page = assert(report.write(empty_report(), dir))
    local dom = dump_dom(dir, page)
    assert.is_nil(dom:find("<img", 1, true))
    assert.are.equal(0, count(dom, 'class="phase%-band"'))
    assert.matches("none: steady conditions throughout", dom, 1, true)
    -- Offered load: one window, drawn as a dot; the latency charts say so.
    local offered = element(dom, '<figure class="chart" id="chart-offered"', "figure")
    assert.matches('data-points="1"', offered, 1, true)
    assert.matches('<circle class="dot"', offered, 1, true)
    local p99 = element(dom, '<figure class="chart" id="chart-latency-p99"', "figure")
    assert.matches(">no data<", p99, 1, true)
    assert.matches("closed throughout", dom, 1, true)
    local tbl = element(dom, '<table class="summary"', "table")
    assert.are.equal(1, count(tbl, '<tr class="policy"'))
    local size = screenshot(dir, page)
    assert.is_true(size > 60000, "screenshot of " .. size .. " bytes") -- blank: about 14 kB

    local none = report.html({ title = "nothing ran", policies = {} })
    assert.matches("</html>", none, 1, true)
  end)

  it("prints the summary table for a terminal", function()
    local text = report.table(outage_report())
    local lines = {}
    for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
    for _, line in ipairs(lines) do
      assert.is_true(#line <= 100, "too wide: " .. line)
    end
    assert.matches("^  policy +calls +success %% +p95 ms +p99 ms +amplification +SLO$", lines[1])
    assert.are.equal("overall (0-30 s)", lines[2])
    assert.are.equal("outage (10-15 s): 100% 503", lines[6])
    assert.are.equal("capacity drop (from 20 s): workers 10 -> 3", lines[10])
    assert.are.equal(13, #lines)
    -- Counts whole, success cut to two decimals, latency in ms, amplification
    -- to two decimals, the SLO verdict with the windows that broke it.
    assert.are.equal("  no-retry         4505      82.50   512.0   819.0           1.00"
                     .. "  missed 15/30", lines[3])
    assert.are.equal("  naive-retry      4505      77.20    2080    3690           1.80"
                     .. "  missed 14/30", lines[4])
    assert.are.equal("  naive-retry       743       0.00    1400    2100           3.00"
                     .. "  missed 4/4", lines[8])
    -- Columns line up: each figure ends where its heading ends.
    local heading_end = lines[1]:find("p99 ms", 1, true) + #"p99 ms" - 1
    for _, i in ipairs({ 3, 4, 5, 7, 8, 9, 11, 12, 13 }) do
      local _, stop = lines[i]:find("^  %S+ +%S+ +%S+ +%S+ +%S+")
      assert.are.equal(heading_end, stop, lines[i])
    end

    local empty = report.table(empty_report())
    assert.are.equal('  policy    calls  success %  p95 ms  p99 ms  amplification\n'
                     .. 'overall (0-1 s)\n'
                     .. '  a<b>&"c"      0          -       -       -              -\n', empty)
  end)
end)
