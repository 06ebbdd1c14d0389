-- core.json, the strict scanner batch relies on: the hostile corpus in
-- spec/hostile-json/ (valid-* must scan, invalid-* must not), seeded
-- mutations of it (no crash, scan and decode agree; under ASan in
-- `make test`), and the canonical encoder of resilua.batch.
local core = require "resilua.core"
local batch = require "resilua.batch"
local json = core.json

local CORPUS = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec") .. "/hostile-json"

local function corpus()
  local out = {}
  local p = io.popen("ls " .. CORPUS)
  for name in p:lines() do
    local f = assert(io.open(CORPUS .. "/" .. name, "rb"))
    out[#out + 1] = { name = name, text = f:read("a") }
    f:close()
  end
  p:close()
  table.sort(out, function(a, b) return a.name < b.name end)
  return out
end

describe("core.json", function()
  it("accepts the valid corpus and refuses every hostile document", function()
    local docs = corpus()
    assert.is_true(#docs >= 40)
    for _, d in ipairs(docs) do
      local kind, err = json.scan(d.text, 128, "id")
      local decoded, derr = json.decode(d.text, 128)
      if d.name:match("^valid") then
        assert.is_string(kind, d.name .. ": " .. tostring(err))
        assert.is_not_nil(decoded ~= nil or derr == nil, d.name)
      else
        assert.is_nil(kind, d.name .. " was accepted")
        assert.matches("^at byte %d+: ", err, nil, d.name)
        if d.name ~= "invalid-dup-id.json" then assert.is_nil(decoded, d.name) end
      end
    end
  end)

  it("hands back the raw text of top-level fields, never through a double", function()
    local line = '{"id":123456789012345678901,"nested":{"id":2},"user":9007199254740993,"s":"7"}'
    local kind, id, user, s, missing = json.scan(line, 128, "id", "user", "s", "nope")
    assert.same({ "object", "123456789012345678901", "9007199254740993", '"7"', false },
                { kind, id, user, s, missing })
    local v = json.decode(line)
    assert.equal("integer", math.type(v.user))
    assert.equal(9007199254740993, v.user)
    -- The same on a range of a larger buffer, without making the line.
    local buf = "xx\n" .. line .. "\n{bad"
    assert.same({ "object", "123456789012345678901" }, { json.scan_in(buf, 4, 3 + #line, 128, "id") })
    assert.is_nil(json.scan_in(buf, 4 + #line, #buf))
    assert.has_error(function() json.scan_in(buf, 0, 2) end)
    assert.has_error(function() json.scan_in(buf, 2, #buf + 1) end)
    assert.equal(json.null, json.decode("null"))
    assert.equal(json.array, getmetatable(json.decode("[]")))
  end)

  it("survives seeded mutations of the corpus, scan and decode agreeing", function()
    -- A fixed seed, so that a run is reproducible and CI does not go red at
    -- random; RESILUA_FUZZ_SEED=N explores others.
    local seed = tonumber(os.getenv("RESILUA_FUZZ_SEED") or "") or 1
    print(("\n24-json fuzz seed: %d (RESILUA_FUZZ_SEED=%d to replay)"):format(seed, seed))
    local rng = math.random
    math.randomseed(seed)
    local docs = corpus()
    local specials = { "\0", "\255", "\\", '"', "[", "{", "]", "}", ",", ":", "e", "-", ".",
                       "\\u", "\\ud800", "\237\160\128", "1e999", "NaN", "  " }
    for _ = 1, 4000 do
      local s = docs[rng(#docs)].text
      for _ = 1, rng(3) do
        local at = rng(#s + 1)
        local op = rng(3)
        if op == 1 then
          s = s:sub(1, at - 1) .. specials[rng(#specials)] .. s:sub(at)
        elseif op == 2 then
          s = s:sub(1, at - 1) .. s:sub(at + rng(4))
        else
          s = s:sub(1, at - 1) .. string.char(rng(0, 255)) .. s:sub(at + 1)
        end
      end
      local kind = json.scan(s, 128)
      local ok, v = pcall(json.decode, s, 128)
      assert.is_true(ok, v)
      assert.equal(kind ~= nil, v ~= nil or s:match("^[ \t\r\n]*null[ \t\r\n]*$") ~= nil, ("%q"):format(s))
      if kind then
        local once = batch.encode(v)
        assert.truthy(json.scan(once, 200), once)
        assert.equal(once, batch.encode(json.decode(once, 200)))
        assert.truthy(json.scan(json.minify(s), 128))
      end
    end
  end)

  it("encodes canonically: sorted keys, full precision, the same bytes every time", function()
    local v = json.decode('{"z":1,"a":[0.12345678901234567,123456789012345678,9007199254740993],'
                          .. '"m":{"b":"é","a":null},"f":2.5,"t":true}')
    -- 0.12345678901234566 is the shortest text of that double (it reads
    -- back to the very same bits); 17 digits, not cjson's 14.
    assert.equal(0.12345678901234567, tonumber("0.12345678901234566"))
    assert.equal('{"a":[0.12345678901234566,123456789012345678,9007199254740993],'
                 .. '"f":2.5,"m":{"a":null,"b":"é"},"t":true,"z":1}', batch.encode(v))
    assert.equal("[]", batch.encode(json.decode("[]")))
    assert.equal("{}", batch.encode({}))
    assert.equal("0.1", batch.encode(0.1))
    assert.same({ "2.0", "-0.0", "2", "1e+300" }, { batch.encode(2.0), batch.encode(-0.0), batch.encode(2),
                                                  batch.encode(1e300) })
    assert.has_error(function() batch.encode({ x = 0 / 0 }) end, "cannot encode NaN or Infinity")
    assert.has_error(function() batch.encode({ x = math.huge }) end, "cannot encode NaN or Infinity")
    assert.has_error(function() batch.encode("\255") end)
    local cyc = {}
    cyc.self = cyc
    assert.has_error(function() batch.encode(cyc) end)
  end)

  it("quotes text as a JSON string and refuses what is not UTF-8", function()
    assert.equal('"a\\"b\\\\c\\n\\u0001é"', json.quote('a"b\\c\n\1é'))
    assert.same({ nil, "not valid UTF-8" }, { json.quote("\192\175") })
  end)
end)
