#!/bin/sh
# make demo-call: a flaky upstream, one call that succeeds after retries, and the
# attempt log that shows how.
set -eu
BIN=${1:-build/bin/resilua}
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT INT TERM

"$BIN" serve --listen 127.0.0.1:0 examples/flaky.lua >"$work/serve.out" 2>"$work/serve.err" &
server=$!
i=0
until grep -q '^listening on' "$work/serve.out" 2>/dev/null; do
  i=$((i + 1))
  if [ "$i" -gt 200 ]; then cat "$work/serve.err" >&2; exit 1; fi
  sleep 0.05
done
addr=$(sed -n 's/^listening on //p' "$work/serve.out")

echo "== upstream: resilua serve examples/flaky.lua on $addr (a reset, then 503 + Retry-After: 1, then 200)"
echo "== resilua call -X POST -d '{\"text\": \"great movie\"}' http://$addr/v1/predict"
echo
"$BIN" call --log "$work/events.jsonl" -X POST -H 'Content-Type: application/json' \
  -d '{"text": "great movie"}' "http://$addr/v1/predict" && code=0 || code=$?
echo
echo "== exit code $code; the event log (JSON lines, one per attempt, then the call):"
cat "$work/events.jsonl"
echo
echo "== the same, in brief:"
"$BIN" run tools/summarize.lua "$work/events.jsonl"
