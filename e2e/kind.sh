#!/usr/bin/env bash
# The container-based e2e, for machines with a Docker engine (GitHub Actions): a kind cluster
# (kind-config.yaml), the six images built and loaded, dev Kafka/Redis/PostgreSQL from
# e2e/kind/deps.yaml, the operator installed with the Helm chart, the demo stack applied and
# awaited, then the smoke client against localhost:8080 (gateway) and :8085 (hub), which
# kind-config.yaml maps to the node's NodePorts. On failure it dumps logs and `kubectl
# describe`; the cluster is deleted at the end unless KEEP_CLUSTER=1.
# Usage: e2e/kind.sh [run|down]
set -euo pipefail
# shellcheck source=SCRIPTDIR/../dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../dev/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLUSTER=meridian
TAG=e2e
REGISTRY=meridian.local
SERVICES=(api-gateway command-service processor cache-updater ws-hub)
JWT_SECRET="kind-e2e-only-not-a-real-secret"

kind_bin() {
  if command -v kind >/dev/null; then command -v kind; else
    bash "$ROOT/dev/tools.sh" install kind >&2
    bash "$ROOT/dev/tools.sh" path kind
  fi
}

need() { command -v "$1" >/dev/null || die "$1 not found: $2"; }

dump() {
  warn "e2e failed; state of the cluster follows"
  kubectl get all,middlewarestacks -A -o wide || true
  kubectl describe middlewarestack demo || true
  kubectl -n meridian-system logs deployment/meridian-operator --all-containers --tail=300 || true
  for s in "${SERVICES[@]}"; do
    kubectl logs "deployment/demo-$s" --all-containers --tail=100 || true
  done
  kubectl get events -A --sort-by=.lastTimestamp | tail -80 || true
}

down() {
  "$(kind_bin)" delete cluster --name "$CLUSTER"
}

run() {
  need docker "the kind e2e needs a Docker engine (use the container-free e2e in just test otherwise)"
  need kubectl "install kubectl"
  need helm "install helm 3"
  local kind
  kind=$(kind_bin)

  step "kind cluster $CLUSTER"
  if ! "$kind" get clusters | grep -qx "$CLUSTER"; then
    "$kind" create cluster --config "$ROOT/kind-config.yaml" --wait 120s
  fi
  kubectl config use-context "kind-$CLUSTER" >/dev/null
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then trap down EXIT; fi
  trap 'dump' ERR

  step "images (one per binary) built and loaded into kind"
  local image
  for s in operator "${SERVICES[@]}"; do
    image="$REGISTRY/$s:$TAG"
    if [ "$s" = operator ]; then
      docker build --quiet --build-arg PACKAGE=operator --build-arg BINARY=meridian-operator -t "$image" "$ROOT"
    else
      docker build --quiet --build-arg "PACKAGE=$s" -t "$image" "$ROOT"
    fi
    "$kind" load docker-image --name "$CLUSTER" "$image"
  done

  step "dev dependencies (Kafka KRaft, Redis, PostgreSQL)"
  kubectl apply -f "$ROOT/e2e/kind/deps.yaml"
  kubectl -n meridian-deps rollout status statefulset/kafka --timeout=300s
  kubectl -n meridian-deps rollout status deployment/redis --timeout=180s
  kubectl -n meridian-deps rollout status deployment/postgres --timeout=180s

  step "operator (Helm chart)"
  helm upgrade --install meridian-operator "$ROOT/charts/meridian-operator" \
    --namespace meridian-system --create-namespace \
    --set image.repository="$REGISTRY/operator" --set image.tag="$TAG" \
    --set image.pullPolicy=Never --wait --timeout 5m

  step "demo stack"
  kubectl apply -f "$ROOT/e2e/kind/stack.yaml" -f "$ROOT/e2e/kind/nodeports.yaml"
  kubectl wait --for=condition=Ready middlewarestack/demo --timeout=10m
  kubectl describe middlewarestack demo

  step "smoke flow through localhost:8080 (gateway) and :8085 (hub)"
  cargo run --release --locked -p tools --bin meridian-smoke -- \
    --gateway http://127.0.0.1:8080 --hub ws://127.0.0.1:8085 \
    --jwt-secret "$JWT_SECRET" --issuer https://auth.example.invalid/ --audience meridian
  ok "kind e2e passed"
}

case "${1:-run}" in
  run) run ;;
  down) down ;;
  *) die "usage: $0 [run|down]" ;;
esac
