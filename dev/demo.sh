#!/usr/bin/env bash
# The demo, the main job: the whole platform on the local host from nothing, the way a cluster
# runs it. The local Kubernetes control plane (with its kwok node) and the real dependencies
# are already up (`just demo` runs `just deps-up` first); this script then starts
#   - the operator (meridian-operator), watching namespace meridian-demo, restarted whenever
#     it exits (dev/supervise.sh, as the kubelet would restart its pod),
#   - the process runner (meridian-runner), which plays the kubelet for the kwok node: every
#     pod the operator's Deployments create runs as a local process of its service binary,
#     with the container's environment and the operator's provisioned credentials,
# applies the example MiddlewareStack (crds/example-stack.yaml), reports each condition as it
# turns True, proves the platform with the smoke flow, and prints the URLs, a JWT, a curl
# and a WebSocket example, and `kubectl describe middlewarestack demo`.
#
#   dev/demo.sh up     start (idempotent)
#   dev/demo.sh down   delete the stack (the operator cleans up), stop the operator and runner
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$DEV_DIR/.." && pwd)
NS=meridian-demo
STACK=demo
TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meridian/target}/debug"
RUNNER_STATE=$MERIDIAN_STATE_DIR/runner
ENDPOINTS=$RUNNER_STATE/endpoints.json

endpoint() { # endpoint SERVICE PORT → host:port of the runner's proxy for it
  python3 - "$ENDPOINTS" "$NS/$STACK-$1:$2" <<'PY'
import json, sys
try:
    print(json.load(open(sys.argv[1]))["services"][sys.argv[2]])
except (OSError, KeyError, ValueError):
    sys.exit(1)
PY
}

ops_endpoint() { # ops_endpoint SERVICE → 127.0.0.1:port of the service's first pod's ops port
  python3 - "$ENDPOINTS" "$NS" "$STACK-$1-" <<'PY'
import json, sys
try:
    pods = json.load(open(sys.argv[1]))["pods"]
    port = next(p["ops_port"] for p in pods
                if p["namespace"] == sys.argv[2] and p["pod"].startswith(sys.argv[3]) and p["ops_port"])
    print(f"127.0.0.1:{port}")
except (OSError, KeyError, ValueError, StopIteration):
    sys.exit(1)
PY
}

conditions() {
  kubectl -n "$NS" get middlewarestack "$STACK" \
    -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}{"\n"}{end}' 2>/dev/null
}

wait_ready() {
  local timeout=$1 start=$SECONDS seen="" line type
  while :; do
    while IFS= read -r line; do
      [ -n "$line" ] || continue
      type=${line%%=*}
      if [[ $line == *=True* ]] && [[ " $seen " != *" $type "* ]]; then
        ok "$type ($((SECONDS - start))s)"
        seen+=" $type"
      fi
    done < <(conditions)
    [[ " $seen " == *" Ready "* ]] && return 0
    if ((SECONDS - start >= timeout)); then
      warn "the stack is not Ready after ${timeout}s; its conditions:"
      conditions >&2 || true
      return 1
    fi
    sleep 1
  done
}

up() {
  command -v curl >/dev/null || apt_install curl
  eval "$(bash "$DEV_DIR/deps.sh" env)"
  local b
  for b in meridian-operator meridian-runner meridian-smoke api-gateway command-service processor cache-updater ws-hub; do
    [ -x "$TARGET_DIR/$b" ] || die "$TARGET_DIR/$b is missing: run \`just build\` first"
  done

  step "CRD and namespace"
  kubectl apply --server-side --force-conflicts -f "$ROOT/crds/middlewarestack.yaml" >/dev/null
  kubectl wait --for=condition=Established --timeout=60s crd/middlewarestacks.meridian.dev >/dev/null
  kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  ok "middlewarestacks.meridian.dev established; namespace $NS"

  step "operator and process runner"
  if is_running demo-operator; then ok "operator already running"; else
    # MALLOC_ARENA_MAX as the Helm chart sets it (see charts/meridian-operator/templates/deployment.yaml).
    PORT=8090 BIND_ADDRESS=127.0.0.1 WATCH_NAMESPACE=$NS LEASE_NAMESPACE=$NS POD_NAME=demo-operator MALLOC_ARENA_MAX=2 \
      LOG_FORMAT=text RUST_LOG=info start_bg demo-operator \
      bash "$DEV_DIR/supervise.sh" "$TARGET_DIR/meridian-operator"
    wait_for "operator /health" 30 curl -fsS http://127.0.0.1:8090/health || die "the operator did not start (log: $MERIDIAN_LOG_DIR/demo-operator.log)"
    ok "meridian-operator on :8090 (log $MERIDIAN_LOG_DIR/demo-operator.log)"
  fi
  if is_running demo-runner; then ok "runner already running"; else
    RUNNER_NAMESPACE=$NS RUNNER_STATE_DIR=$RUNNER_STATE RUNNER_BIN_DIR=$TARGET_DIR \
      RUNNER_PREFER_SERVICE_PORTS=true LOG_FORMAT=text RUST_LOG=info start_bg demo-runner "$TARGET_DIR/meridian-runner"
    ok "meridian-runner (processes' logs in $RUNNER_STATE/logs)"
  fi

  step "MiddlewareStack $NS/$STACK (crds/example-stack.yaml), stage by stage"
  kubectl -n "$NS" apply -f "$ROOT/crds/example-stack.yaml" >/dev/null
  wait_ready 300 || die "see: kubectl -n $NS describe middlewarestack $STACK; logs in $MERIDIAN_LOG_DIR and $RUNNER_STATE/logs"

  local gateway hub secret token
  wait_for "gateway proxy" 30 endpoint api-gateway 8080 || die "the runner has no proxy for the gateway"
  gateway=$(endpoint api-gateway 8080)
  wait_for "hub proxy" 30 endpoint ws-hub 8085 || die "the runner has no proxy for the hub"
  hub=$(endpoint ws-hub 8085)
  wait_for "gateway ops port" 30 ops_endpoint api-gateway || die "the runner has no gateway pod"
  wait_for "gateway ready" 60 curl -fsS "http://$(ops_endpoint api-gateway)/ready" || die "the gateway is not ready"
  secret=$(kubectl -n "$NS" get secret meridian-jwt -o jsonpath='{.data.hmac-secret}' | base64 -d)

  step "smoke flow (JWT → command through the gateway → succeeded → document → WebSocket event)"
  SMOKE_JWT_SECRET=$secret "$TARGET_DIR/meridian-smoke" --gateway "http://$gateway" --hub "ws://$hub" |
    sed 's/^/    /'
  token=$(SMOKE_JWT_SECRET=$secret "$TARGET_DIR/meridian-smoke" --print-token --subject demo-user \
    --read 'books/*' --write 'books/*')

  step "kubectl -n $NS describe middlewarestack $STACK"
  kubectl -n "$NS" describe middlewarestack "$STACK"

  cat <<EOT

Meridian is running (namespace $NS, stack $STACK).
  API gateway     http://$gateway
  WebSocket hub   ws://$hub/ws
  operator        http://127.0.0.1:8090/metrics

A JWT for user demo-user (valid 1 h; it may read and write books/*, nothing else):
  export TOKEN=$token

Send a command, then read its status and the document:
  curl -si -X POST http://$gateway/v1/commands -H "Authorization: Bearer \$TOKEN" \\
    -H 'Content-Type: application/json' -H 'Idempotency-Key: demo-1' \\
    -d '{"type":"create","collection":"books","id":"b1","payload":{"title":"Dune"}}'
  curl -s http://$gateway/v1/documents/books/b1 -H "Authorization: Bearer \$TOKEN"

Watch the document's room over WebSocket (then send a patch command in another terminal):
  npx --yes wscat -c "ws://$hub/ws?token=\$TOKEN" -x '{"type":"subscribe","room":"doc:books:b1"}' -w 600

Logs: $MERIDIAN_LOG_DIR/demo-*.log and $RUNNER_STATE/logs/
Stop: just demo-down
EOT
}

down() {
  eval "$(bash "$DEV_DIR/deps.sh" env)"
  if is_running demo-operator && kubectl get namespace "$NS" >/dev/null 2>&1; then
    step "deleting the stack (the operator cleans up per its deletionPolicy)"
    kubectl -n "$NS" delete middlewarestack "$STACK" --ignore-not-found --wait --timeout=120s >/dev/null ||
      warn "the stack was not deleted within 120s"
    kubectl delete namespace "$NS" --ignore-not-found --wait=false >/dev/null
    ok "stack $STACK deleted"
  fi
  stop_bg demo-runner 30
  ok "runner stopped (and the service processes with it)"
  stop_bg demo-operator 30
  ok "operator stopped"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) die "usage: dev/demo.sh up|down" ;;
esac
