#!/bin/sh
# bench/proxy_cost.sh — the CPU cost of one proxied request, in instructions
# (callgrind counts them the same on a loaded machine, unlike wall time).
#
# An nginx upstream (`return 200`), resilua proxy under callgrind with
# bench/policies/load.lua, a warm-up of 300 GETs, then N GETs (hey -c 4)
# counted alone (callgrind_control --zero / --dump).  Prints the
# instructions per request and keeps the profile for callgrind_annotate.
#
#   bench/proxy_cost.sh [N]        (N defaults to 2000)
set -eu
N=${1:-2000}
BIN=${RESILUA_BIN:-$(pwd)/build/bin/resilua}
for tool in valgrind callgrind_control callgrind_annotate hey; do
  command -v "$tool" >/dev/null || { echo "proxy_cost: needs $tool" >&2; exit 2; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "proxy_cost: needs nginx" >&2; exit 2; }

DIR=$(mktemp -d /tmp/resilua-proxy-cost.XXXXXX)
NGINX_PID= PROXY_PID=
cleanup() {
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
  [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

UP_PORT=$((20000 + $$ % 30000))
cat > "$DIR/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $DIR/body; proxy_temp_path $DIR/proxy;
  fastcgi_temp_path $DIR/fastcgi; uwsgi_temp_path $DIR/uwsgi; scgi_temp_path $DIR/scgi;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP_PORT; location / { return 200 "hello world\n"; } }
}
EOF
"$NGINX" -c "$DIR/nginx.conf" -p "$DIR" 2>"$DIR/nginx.err" &
NGINX_PID=$!
cat > "$DIR/proxy.lua" <<EOF
return { listen = "127.0.0.1:0",
  limits = { max_connections = 20000, max_in_flight = 5000 },
  routes = { { upstream = "http://127.0.0.1:$UP_PORT/",
               policy = "$(pwd)/bench/policies/load.lua" } } }
EOF
valgrind --tool=callgrind --callgrind-out-file="$DIR/callgrind.out" \
  "$BIN" proxy --quiet --config "$DIR/proxy.lua" >"$DIR/proxy.out" 2>"$DIR/proxy.err" &
PROXY_PID=$!
ADDR=
for _ in $(seq 200); do
  ADDR=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$DIR/proxy.out" "$DIR/proxy.err" | head -1)
  [ -n "$ADDR" ] && break
  sleep 0.2
done
[ -n "$ADDR" ] || { echo "proxy_cost: the proxy did not start" >&2; exit 1; }
URL="http://$ADDR/"
hey -n 300 -c 4 "$URL" >/dev/null
callgrind_control --zero "$PROXY_PID" >/dev/null 2>&1
hey -n "$N" -c 4 "$URL" >"$DIR/hey.txt"
callgrind_control --dump "$PROXY_PID" >/dev/null 2>&1
grep -q "\[200\].*$N responses" "$DIR/hey.txt" ||
  { echo "proxy_cost: not all $N answers were 200 (see $DIR/hey.txt)" >&2; exit 1; }
TOTAL=$(callgrind_annotate "$DIR/callgrind.out.1" 2>/dev/null |
        awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
echo "instructions per proxied request: $((TOTAL / N)) ($N GETs; profile: $DIR/callgrind.out.1)"
