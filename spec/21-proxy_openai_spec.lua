-- The official OpenAI Node SDK (its own retries off, then on) calls a
-- chat-completions-shaped upstream through `resilua proxy`, streaming and
-- not, through an outage the proxy's policy rides out; and, when it cannot,
-- the SDK obeys x-should-retry: false, so retries do not multiply.
-- tools/node-deps.sh installs the SDK (npm) into .cache/node.
local H = require "spec.helpers"
local cjson = require "cjson"

-- Down for its first `outage` requests (503), then a chat completion; SSE
-- chunks when the request asks for a stream.  /outage sets the count.
local UPSTREAM = [[
local cjson = require "cjson"
local outage, seen = 0, 0
return function(req)
  if req.path == "/outage" then outage, seen = tonumber(req.body), 0 return { body = "ok" } end
  if req.path ~= "/v1/chat/completions" then return { status = 404 } end
  seen = seen + 1
  if seen <= outage then
    return { status = 503, headers = { ["Content-Type"] = "application/json" },
             body = '{"error":{"message":"overloaded","type":"server_error"}}' }
  end
  local q = cjson.decode(req.body)
  local text = "echo: " .. q.messages[#q.messages].content
  if not q.stream then
    return { headers = { ["Content-Type"] = "application/json" }, body = cjson.encode{
      id = "c1", object = "chat.completion", created = 1, model = q.model,
      choices = { { index = 0, finish_reason = "stop",
                    message = { role = "assistant", content = text } } },
      usage = { prompt_tokens = 1, completion_tokens = 2, total_tokens = 3 } } }
  end
  local events = {}
  for word in text:gmatch("%S+%s*") do
    events[#events + 1] = "data: " .. cjson.encode{ id = "c1", object = "chat.completion.chunk",
      created = 1, model = q.model,
      choices = { { index = 0, delta = { content = word }, finish_reason = cjson.null } } } .. "\n\n"
  end
  events[#events + 1] = "data: [DONE]\n\n"
  return { headers = { ["Content-Type"] = "text/event-stream" }, body = table.concat(events) }
end
]]

local CLIENT = [[
const OpenAI = require("openai");
const [base, mode, retries] = process.argv.slice(2);
const client = new OpenAI({ baseURL: base + "/v1", apiKey: "sk-test", maxRetries: Number(retries) });
(async () => {
  const req = { model: "m", messages: [{ role: "user", content: "hello there" }] };
  try {
    if (mode === "stream") {
      const { data, response } = await client.chat.completions.create({ ...req, stream: true }).withResponse();
      let text = "";
      for await (const chunk of data) text += chunk.choices[0].delta.content || "";
      console.log(JSON.stringify({ text, attempts: response.headers.get("x-resilua-attempts") }));
    } else {
      const { data, response } = await client.chat.completions.create(req).withResponse();
      console.log(JSON.stringify({ text: data.choices[0].message.content,
                                   attempts: response.headers.get("x-resilua-attempts") }));
    }
  } catch (e) {
    console.log(JSON.stringify({ error: e.status || String(e) }));
  }
})();
]]

describe("resilua proxy with the OpenAI Node SDK", function()
  local modules, up, px, client
  setup(function()
    local r = H.run("tools/node-deps.sh")
    assert(r.code == 0, "tools/node-deps.sh failed: " .. r.stderr)
    modules = r.stdout:match("[^\n]+")
    up = H.start_server(UPSTREAM)
    local dir = H.tmpdir()
    local pol = H.write_file(dir .. "/llm.lua", [[return { max_attempts = 4,
      backoff = { base_ms = 5, max_ms = 20 }, breaker = false, budget = false }]])
    local log = dir .. "/events.jsonl"
    px = H.spawn({ H.bin, "proxy", "--listen", "127.0.0.1:0", "--upstream", up.url,
                   "--policy", pol, "--log", log })
    px.port = assert(px:wait_line("listening on 127%.0%.0%.1:(%d+)\n", 30), px:stderr())
    client = H.write_file(dir .. "/client.js", CLIENT)
  end)
  teardown(function()
    if px then px:stop() end
    if up then up:stop() end
  end)

  local function call(mode, retries, outage)
    H.curl(("-d %d %s"):format(outage, H.quote(up.url .. "/outage")))
    local r = H.run(("NODE_PATH=%s node %s %s %s %d"):format(H.quote(modules), H.quote(client),
                    H.quote("http://127.0.0.1:" .. px.port), mode, retries))
    assert.equal(0, r.code, r.stderr)
    return cjson.decode(r.stdout)
  end

  it("rides out an outage for a plain completion", function()
    local out = call("plain", 0, 2)
    assert.equal("echo: hello there", out.text)
    assert.equal("3", out.attempts)
  end)

  it("rides out an outage for a streamed completion", function()
    local out = call("stream", 0, 3)
    assert.equal("echo: hello there", out.text)
    assert.equal("4", out.attempts)
  end)

  it("keeps retries at one layer: the SDK's own retries obey x-should-retry", function()
    local before = cjson.decode(H.curl(H.quote(up.url .. "/_stats")).body).requests
    local out = call("plain", 2, 100)
    assert.equal(503, out.error)
    local after = cjson.decode(H.curl(H.quote(up.url .. "/_stats")).body).requests
    -- /outage itself, then the proxy's 4 attempts; not 3 x 4
    assert.equal(5, after - before)
  end)
end)
