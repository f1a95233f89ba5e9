#!/usr/bin/env bash
# The demo: starts the five services (already built by `just build`) against the local
# dependencies, waits until every /ready answers 200, and prints where they are.
#
#   e2e/demo.sh up     start (idempotent) and wait for readiness
#   e2e/demo.sh down   stop the services
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# name:port, in start-up order (the core first, the edge last).
SERVICES=(command-service:8082 processor:8083 cache-updater:8084 ws-hub:8085 api-gateway:8080)
TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meridian/target}/debug"

up() {
  command -v curl >/dev/null || apt_install curl
  eval "$(bash "$E2E_DIR/deps.sh" env)"
  step "starting the services"
  local entry name port
  for entry in "${SERVICES[@]}"; do
    name=${entry%%:*} port=${entry##*:}
    [ -x "$TARGET_DIR/$name" ] || die "$TARGET_DIR/$name is missing: run \`just build\` first"
    if is_running "svc-$name"; then ok "$name already running"; continue; fi
    port_open "$port" && die "port $port (for $name) is taken by another process"
    PORT=$port BIND_ADDRESS=127.0.0.1 start_bg "svc-$name" "$TARGET_DIR/$name"
    ok "$name started (pid $(cat "$(pidfile "svc-$name")"), log $MERIDIAN_LOG_DIR/svc-$name.log)"
  done

  step "waiting until every /ready answers 200"
  for entry in "${SERVICES[@]}"; do
    name=${entry%%:*} port=${entry##*:}
    if ! wait_for "svc-$name" 90 curl -fsS "http://127.0.0.1:$port/ready"; then
      curl -sS "http://127.0.0.1:$port/ready" >&2 || true
      die "$name did not become ready"
    fi
    ok "$name ready"
  done

  echo
  printf '%-16s %-28s %s\n' SERVICE URL READY
  for entry in "${SERVICES[@]}"; do
    name=${entry%%:*} port=${entry##*:}
    printf '%-16s %-28s %s\n' "$name" "http://127.0.0.1:$port" \
      "$(curl -fsS "http://127.0.0.1:$port/ready" | tr -d '\n' | cut -c1-120)"
  done
  echo
  echo "Send a command (202 + Location; repeat it with the same key to see the replay):"
  echo "  curl -si -X POST http://127.0.0.1:8082/v1/commands -H 'Content-Type: application/json' \\"
  echo "    -H 'X-Client-Id: demo' -H 'Idempotency-Key: demo-1' \\"
  echo "    -d '{\"type\":\"create\",\"collection\":\"books\",\"id\":\"b1\",\"payload\":{\"title\":\"Dune\"}}'"
  echo "Try:  curl -s http://127.0.0.1:8082/ready | python3 -m json.tool"
  echo "      curl -s http://127.0.0.1:8080/metrics | grep http_requests_total"
  echo "Logs: $MERIDIAN_LOG_DIR/svc-*.log    Stop: just demo-down (and just deps-down)"
}

down() {
  local entry
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    entry=${SERVICES[i]}
    stop_bg "svc-${entry%%:*}" 30
    ok "${entry%%:*} stopped"
  done
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) die "usage: e2e/demo.sh up|down" ;;
esac
