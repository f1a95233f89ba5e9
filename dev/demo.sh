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
# With MERIDIAN_DEMO_TRACES=1 it also starts Jaeger v2 (built once from its Go module, in memory,
# OTLP on 127.0.0.1:4318, query on :16686), points the stack's spec.telemetry.otlpEndpoint at it,
# sends the smoke flow with a trace id of its own, and prints that trace: its URL and its spans
# as a tree (Jaeger's web UI is not part of its Go module, so the page is Jaeger's placeholder;
# the API and the tree are the trace).
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

TRACES=${MERIDIAN_DEMO_TRACES:-0}
JAEGER_API=http://127.0.0.1:16686/api

# start_jaeger: Jaeger v2 with its built-in all-in-one configuration (memory storage).
start_jaeger() {
  local jaeger port
  bash "$DEV_DIR/tools.sh" install jaeger
  jaeger=$(bash "$DEV_DIR/tools.sh" path jaeger)
  if is_running demo-jaeger; then ok "jaeger already running"; return 0; fi
  for port in 4318 16686; do
    port_open "$port" && die "port $port is in use; MERIDIAN_DEMO_TRACES needs it for Jaeger"
  done
  start_bg demo-jaeger "$jaeger"
  wait_for demo-jaeger 60 curl -fsS "$JAEGER_API/services" || die "Jaeger did not start"
  ok "Jaeger on http://127.0.0.1:16686 (OTLP/HTTP on 127.0.0.1:4318; log $MERIDIAN_LOG_DIR/demo-jaeger.log)"
}

# show_trace ID: waits until Jaeger holds the trace's spans from the five services, then
# prints them as a tree (service, operation, duration).
show_trace() {
  python3 - "$JAEGER_API/traces/$1" <<'PY'
import json, sys, time, urllib.error, urllib.request

url, wanted = sys.argv[1], {"api-gateway", "command-service", "processor", "cache-updater", "ws-hub"}
deadline = time.time() + 60
while True:
    try:
        trace = json.load(urllib.request.urlopen(url, timeout=5))["data"][0]
    except (urllib.error.URLError, KeyError, IndexError, ValueError):
        trace = None
    services = {p["serviceName"] for p in trace["processes"].values()} if trace else set()
    if wanted <= services:
        break
    if time.time() > deadline:
        sys.exit(f"the trace has spans from {sorted(services)} only, after 60 s")
    time.sleep(1)
spans = {s["spanID"]: s for s in trace["spans"]}
children = {}
for s in spans.values():
    parent = next((r["spanID"] for r in s.get("references", [])
                   if r.get("refType") == "CHILD_OF" and r["spanID"] in spans), None)
    children.setdefault(parent, []).append(s)
def show(span, depth):
    service = trace["processes"][span["processID"]]["serviceName"]
    print(f"    {'  ' * depth}{service:<16} {span['operationName']:<24} {span['duration'] / 1000:8.2f} ms")
    for child in sorted(children.get(span["spanID"], []), key=lambda c: c["startTime"]):
        show(child, depth + 1)
for root in sorted(children.get(None, []), key=lambda c: c["startTime"]):
    show(root, 0)
print(f"    {len(spans)} spans from {len(services)} services")
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
  # Conversions go to this operator's webhook at a URL (it runs outside the cluster); a Service
  # an installed chart set would sit next to it, so where they went is dropped first.
  kubectl patch crd middlewarestacks.meridian.dev --type=json \
    -p '[{"op":"remove","path":"/spec/conversion"}]' >/dev/null 2>&1 || true
  kubectl apply --server-side --force-conflicts -f "$ROOT/crds/middlewarestack.yaml" >/dev/null
  kubectl wait --for=condition=Established --timeout=60s crd/middlewarestacks.meridian.dev >/dev/null
  kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  ok "middlewarestacks.meridian.dev established; namespace $NS"

  step "operator and process runner"
  if is_running demo-operator; then ok "operator already running"; else
    # MALLOC_ARENA_MAX as the Helm chart sets it (see charts/meridian-operator/templates/deployment.yaml).
    PORT=8090 BIND_ADDRESS=127.0.0.1 WATCH_NAMESPACE=$NS LEASE_NAMESPACE=$NS POD_NAME=demo-operator MALLOC_ARENA_MAX=2 \
      POD_NAMESPACE=$NS WEBHOOK_PORT=9443 WEBHOOK_URL=https://127.0.0.1:9443/convert \
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

  if [ "$TRACES" = 1 ]; then
    step "trace backend (MERIDIAN_DEMO_TRACES=1)"
    start_jaeger
  fi

  step "MiddlewareStack $NS/$STACK (crds/example-stack.yaml), stage by stage"
  kubectl -n "$NS" apply -f "$ROOT/crds/example-stack.yaml" >/dev/null
  if [ "$TRACES" = 1 ]; then
    kubectl -n "$NS" patch middlewarestack "$STACK" --type merge \
      -p '{"spec":{"telemetry":{"otlpEndpoint":"http://127.0.0.1:4318"}}}' >/dev/null
    ok "spec.telemetry.otlpEndpoint: http://127.0.0.1:4318 (Jaeger)"
  fi
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
  local trace="" traced=()
  if [ "$TRACES" = 1 ]; then
    trace=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    traced=(--traceparent "00-$trace-$(python3 -c 'import secrets; print(secrets.token_hex(8))')-01")
  fi
  SMOKE_JWT_SECRET=$secret "$TARGET_DIR/meridian-smoke" --gateway "http://$gateway" --hub "ws://$hub" \
    "${traced[@]}" | sed 's/^/    /'
  if [ -n "$trace" ]; then
    step "the smoke flow's trace $trace"
    show_trace "$trace" || die "the smoke flow's trace did not reach Jaeger (log: $MERIDIAN_LOG_DIR/demo-jaeger.log)"
  fi
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
  if [ -n "$trace" ]; then
    cat <<EOT

The smoke flow's trace (Jaeger):
  $JAEGER_API/traces/$trace
  http://127.0.0.1:16686/trace/$trace
EOT
  fi
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
  if is_running demo-jaeger; then
    stop_bg demo-jaeger 10
    ok "Jaeger stopped"
  fi
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) die "usage: dev/demo.sh up|down" ;;
esac
