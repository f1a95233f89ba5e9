#!/usr/bin/env bash
# The shipped Grafana dashboards against a real Prometheus scraping a running stack: every
# query of every panel must return at least one series.
#
# The stack is the demo's (dev/demo.sh: the operator, the process runner, the example
# MiddlewareStack), started with its trace backend (MERIDIAN_DEMO_TRACES=1), so this also checks
# that the smoke flow's trace reaches Jaeger with spans from all five services. Prometheus,
# built from its Go module (dev/tools.sh), scrapes the ops port of every pod the runner started
# and the operator's metrics port, with the labels a PodMonitor gives them (`namespace`, `pod`,
# and `stack` as the operator's PodMonitor relabels it). The traffic is the demo's smoke flow,
# then what the failure panels count: requests with a bad token, a refused command, a replayed
# Idempotency-Key, a document that does not exist. Then each panel's query runs with
# `$namespace` set to the demo's namespace; the script prints every query's series count and
# fails naming each query that Prometheus refused or that returned nothing (an unknown metric,
# a label the code does not set, a panel that stays empty).
#
# The demo is stopped at the end unless it was running before.
#
#   e2e/dashboards.sh
set -euo pipefail
# shellcheck source=../dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../dev/lib.sh"

ROOT=$(cd "$DEV_DIR/.." && pwd)
NS=meridian-demo
STACK=demo
TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meridian/target}/debug"
ENDPOINTS=$MERIDIAN_STATE_DIR/runner/endpoints.json
PROMETHEUS_PORT=${MERIDIAN_PROMETHEUS_PORT:-9490}
# One scrape a second: the rates need two samples, and the check should not wait long for them.
SCRAPE_SECONDS=1

bash "$DEV_DIR/tools.sh" install prometheus
prometheus=$(bash "$DEV_DIR/tools.sh" path prometheus)
eval "$(bash "$DEV_DIR/deps.sh" env)"

work=$(mktemp -d)
demo_was_running=false
is_running demo-operator && demo_was_running=true
cleanup() {
  stop_bg dashboards-prometheus 10
  if ! $demo_was_running; then
    bash "$DEV_DIR/demo.sh" down >"$work/demo-down.log" 2>&1 || cat "$work/demo-down.log" >&2
  fi
  rm -rf "$work"
}
trap cleanup EXIT

step "dashboards: the demo stack"
# With its trace backend: the demo then also fails unless the smoke flow's trace reaches Jaeger
# with spans from all five services.
MERIDIAN_DEMO_TRACES=1 bash "$DEV_DIR/demo.sh" up >"$work/demo.log" 2>&1 ||
  { cat "$work/demo.log" >&2; die "the demo did not start"; }
ok "stack $NS/$STACK Ready; smoke flow passed; $(grep -E '^ +[0-9]+ spans from' "$work/demo.log" | sed 's/^ *//') in Jaeger"

# The kubelet probes every pod's /ready (which refreshes `dependency_up`); the process runner
# starts the pods but does not probe them, so this script does, once a round.
probe_pods() {
  local port
  for port in $(python3 -c '
import json, sys
print(" ".join(str(p["ops_port"]) for p in json.load(open(sys.argv[1]))["pods"]
               if p["namespace"] == sys.argv[2] and p.get("ops_port")))' "$ENDPOINTS" "$NS"); do
    curl -s -o /dev/null --max-time 5 "http://127.0.0.1:$port/ready" || true
  done
}

# The scrape targets, as the PodMonitor and the operator's ServiceMonitor would find them.
write_targets() {
  python3 - "$ENDPOINTS" "$NS" "$STACK" >"$work/targets.json.new" <<'PY'
import json, sys
endpoints, namespace, stack = sys.argv[1:]
groups = [{"targets": ["127.0.0.1:8090"],
           "labels": {"namespace": namespace, "pod": "demo-operator", "job": "meridian-operator"}}]
for pod in json.load(open(endpoints))["pods"]:
    if pod["namespace"] == namespace and pod.get("ops_port"):
        groups.append({"targets": [f"127.0.0.1:{pod['ops_port']}"],
                       "labels": {"namespace": namespace, "pod": pod["pod"], "stack": stack,
                                  "job": f"{namespace}/{stack}"}})
json.dump(groups, sys.stdout)
PY
  mv "$work/targets.json.new" "$work/targets.json"
}
write_targets
cat >"$work/prometheus.yml" <<YAML
global:
  scrape_interval: ${SCRAPE_SECONDS}s
  scrape_timeout: ${SCRAPE_SECONDS}s
scrape_configs:
  - job_name: meridian
    file_sd_configs:
      - files: ["$work/targets.json"]
        refresh_interval: ${SCRAPE_SECONDS}s
YAML

step "dashboards: Prometheus ($(basename "$(dirname "$prometheus")")) on 127.0.0.1:$PROMETHEUS_PORT"
port_open "$PROMETHEUS_PORT" && die "port $PROMETHEUS_PORT is in use; set MERIDIAN_PROMETHEUS_PORT to a free port"
start_bg dashboards-prometheus "$prometheus" --config.file="$work/prometheus.yml" \
  --storage.tsdb.path="$work/data" --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" --log.level=warn
api=http://127.0.0.1:$PROMETHEUS_PORT/api/v1
wait_for dashboards-prometheus 60 curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" ||
  die "Prometheus did not start"
targets_up() {
  curl -fsS "$api/targets?state=active" | python3 -c '
import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
up = [t for t in targets if t["health"] == "up"]
print(f"{len(up)}/{len(targets)}")
sys.exit(0 if targets and len(up) == len(targets) else 1)'
}
wait_for "every target up" 60 targets_up || { targets_up >&2 || true; die "Prometheus cannot scrape every target"; }
ok "scraping $(targets_up) targets every ${SCRAPE_SECONDS}s"

step "dashboards: traffic, including what the failure panels count"
service() { # service NAME PORT -> host:port of the runner's proxy for the stack's Service
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["services"][sys.argv[2]])' \
    "$ENDPOINTS" "$NS/$STACK-$1:$2"
}
gateway=$(service api-gateway 8080)
hub=$(service ws-hub 8085)
secret=$(kubectl -n "$NS" get secret meridian-jwt -o jsonpath='{.data.hmac-secret}' | base64 -d)
token=$(SMOKE_JWT_SECRET=$secret "$TARGET_DIR/meridian-smoke" --print-token --subject dashboards \
  --read 'books/*' --write 'books/*')
status_of() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
expect() { # expect STATUS what curl-args...
  local want=$1 what=$2 got
  shift 2
  got=$(status_of "$@")
  [ "$got" = "$want" ] || die "$what: expected $want, got $got"
}
run=$RANDOM$RANDOM
command='{"type":"create","collection":"books","id":"dash-'$run'","payload":{"title":"Panels"}}'
for round in 1 2 3; do
  expect 401 "a request with a malformed token" -H 'Authorization: Bearer not-a-jwt' "http://$gateway/v1/documents/books/b1"
  expect 400 "a command that is not JSON" -X POST -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' -H "Idempotency-Key: dash-bad-$run-$round" -d '{' "http://$gateway/v1/commands"
  expect 202 "a command" -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    -H "Idempotency-Key: dash-$run" -d "$command" "http://$gateway/v1/commands"
  expect 404 "a document that does not exist" -H "Authorization: Bearer $token" "http://$gateway/v1/documents/books/none"
  SMOKE_JWT_SECRET=$secret "$TARGET_DIR/meridian-smoke" --gateway "http://$gateway" --hub "ws://$hub" \
    >"$work/smoke-$round.log" 2>&1 ||
    { cat "$work/smoke-$round.log" >&2; die "the smoke flow failed"; }
  probe_pods
  write_targets
  sleep "$SCRAPE_SECONDS"
done
ok "3 rounds: smoke flow, bad token (401), refused command (400), replayed key (202), missing document (404)"
# Two more scrapes after the last request, so every rate has its samples.
sleep $((3 * SCRAPE_SECONDS))

step "dashboards: the namespace variable"
curl -fsS "$api/label/namespace/values" --data-urlencode 'match[]=meridian_build_info' -G |
  python3 -c 'import json, sys; sys.exit(sys.argv[1] not in json.load(sys.stdin)["data"])' "$NS" ||
  die "label_values(meridian_build_info, namespace) does not offer $NS"
ok "label_values(meridian_build_info, namespace) offers $NS"

step "dashboards: every panel's query"
python3 - "$api" "$NS" "$ROOT"/charts/meridian-operator/dashboards/*.json <<'PY'
import json, sys, urllib.parse, urllib.request

api, namespace, files = sys.argv[1], sys.argv[2], sys.argv[3:]
failures, total = [], 0
for path in files:
    dashboard = json.load(open(path))
    name = path.rsplit("/", 1)[-1]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr:
                continue
            total += 1
            query = expr.replace("$namespace", namespace).replace("$__rate_interval", "1m")
            url = f"{api}/query?" + urllib.parse.urlencode({"query": query})
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    body = json.load(response)
                series = len(body["data"]["result"])
                problem = None if series else "no series"
            except urllib.error.HTTPError as error:
                series, problem = 0, json.load(error).get("error", str(error))
            print(f"    {series:3d} series  {name:22s} {panel['title']}")
            if problem:
                failures.append(f"{name} / {panel['title']}: {problem}\n      {query}")
if failures:
    print(f"\n{len(failures)} of {total} dashboard queries returned nothing:", file=sys.stderr)
    for failure in failures:
        print(f"  - {failure}", file=sys.stderr)
    sys.exit(1)
print(f"    all {total} queries of {len(files)} dashboards returned data")
PY
ok "every dashboard panel has data"
