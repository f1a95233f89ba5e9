#!/usr/bin/env bash
# The gateway's CPU cost per proxied request, counted in instructions by callgrind: repeatable
# for the same binary whatever else the machine is doing (the throughput benchmark is not).
# It starts a minimal keep-alive upstream (Python), the release gateway under callgrind as the
# operator deploys it (RUST_LOG=info, JSON logs) with one `auth: none` route, sends 200
# requests to warm up, then counts REQUESTS requests on one connection (curl) and prints the
# instructions per request and the functions that cost the most (inclusive).
#
#   dev/profile-gateway.sh [binary] [requests]   (default: the release build, 2000 requests)
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

binary=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/meridian/target}/release/api-gateway}
requests=${2:-2000}
[ -x "$binary" ] || die "$binary is missing: cargo build --release -p api-gateway --bin api-gateway"
command -v valgrind >/dev/null || apt_install valgrind
command -v curl >/dev/null || apt_install curl

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
upstream_port=$(free_port)
gateway_port=$(free_port)

python3 - "$upstream_port" <<'PY' &
import http.server, sys
class Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
PY
pids+=($!)

PORT=$gateway_port BIND_ADDRESS=127.0.0.1 RUST_LOG=info LOG_FORMAT=json \
  GATEWAY_ROUTES='[{"name":"profile","path":"/profile","upstream":"http://127.0.0.1:'"$upstream_port"'","auth":"none"}]' \
  valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" "$binary" >"$work/gateway.log" 2>&1 &
gateway=$!
pids+=("$gateway")
for _ in $(seq 1 240); do curl -fs -o /dev/null "http://127.0.0.1:$gateway_port/health" && break; sleep 0.5; done
curl -fs -o /dev/null "http://127.0.0.1:$gateway_port/profile/x" ||
  { cat "$work/gateway.log" >&2; die "the gateway under callgrind does not proxy"; }
curl -s -o /dev/null "http://127.0.0.1:$gateway_port/profile/[1-200]"
callgrind_control -z "$gateway" >/dev/null 2>&1
curl -s -o /dev/null "http://127.0.0.1:$gateway_port/profile/[1-$requests]"
callgrind_control -d "$gateway" >/dev/null 2>&1
dump="$work/callgrind.out.1"
for _ in $(seq 1 20); do [ -s "$dump" ] && break; sleep 0.5; done
total=$(callgrind_annotate "$dump" 2>/dev/null | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)
[ -n "$total" ] || die "callgrind wrote no totals"
echo "gateway: $binary"
echo "instructions per proxied request (user space): $((total / requests)) ($requests requests)"
echo "most expensive (inclusive, per request):"
callgrind_annotate --inclusive=yes "$dump" 2>/dev/null |
  awk -v n="$requests" '/\?\?\?:|\.S:|\.c:/ { gsub(",", "", $1); printf "  %8d  %s\n", $1 / n, substr($0, index($0, ":") + 1) }' |
  grep -vE 'tokio::runtime|__rust_begin|thread_start|start_thread|clone\.S|call_once' | cut -c1-150 | head -25
