#!/usr/bin/env bash
# Checks of the Helm chart against the local control plane (`just deps-up kube`):
#   1. the chart's CRD copy equals crds/ (generated from the Rust types);
#   2. `helm lint --strict` with the default values and with every optional part on;
#   3. `helm template | kubectl apply --dry-run=server` — cluster-wide and namespaced RBAC,
#      ServiceMonitor and PrometheusRule included (validated against the real
#      prometheus-operator CRDs, fetched from the Go module proxy and installed first);
#   4. a real `helm install --wait` (the operator Deployment becomes Available on the kwok
#      node), `helm upgrade --wait`, `helm uninstall`, with the CRD kept afterwards;
#   5. the kind e2e's manifests (e2e/kind/*.yaml) by server-side dry run, against that CRD.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../dev/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHART=$ROOT/charts/meridian-operator
: "${MERIDIAN_PROMETHEUS_OPERATOR_VERSION:=v0.90.1}"
eval "$(bash "$ROOT/dev/deps.sh" env)"
NS=meridian-chart-check
RELEASE=meridian-operator

all_on=(--set metrics.serviceMonitor.enabled=true --set prometheusRules.enabled=true
  --set 'networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring'
  --set 'extraEnv[0].name=RECONCILE_CONCURRENCY' --set-string 'extraEnv[0].value=8')

monitoring_crds() {
  # The module zip holds example/prometheus-operator-crd/*.yaml (the CRDs the operator ships).
  local dir
  dir=$(GOFLAGS=-mod=mod GOMODCACHE="$MERIDIAN_CACHE_DIR/gomod" \
    go mod download -json "github.com/prometheus-operator/prometheus-operator@$MERIDIAN_PROMETHEUS_OPERATOR_VERSION" |
    sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [ -d "$dir/example/prometheus-operator-crd" ] || die "prometheus-operator CRDs not found in $dir"
  local crd
  for crd in servicemonitors podmonitors prometheusrules; do
    kubectl apply --server-side --force-conflicts \
      -f "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$crd.yaml" >/dev/null
  done
  kubectl wait --for=condition=Established --timeout=60s \
    crd/servicemonitors.monitoring.coreos.com crd/podmonitors.monitoring.coreos.com \
    crd/prometheusrules.monitoring.coreos.com >/dev/null
  ok "prometheus-operator $MERIDIAN_PROMETHEUS_OPERATOR_VERSION CRDs installed (ServiceMonitor, PodMonitor, PrometheusRule)"
}

step "chart CRD matches crds/"
diff -u "$ROOT/crds/middlewarestack.yaml" "$CHART/files/crds/middlewarestack.yaml" ||
  die "charts/meridian-operator/files/crds/middlewarestack.yaml is stale: run \`just crds\`"
ok "same CRD"

step "helm lint"
helm lint --strict "$CHART" >/dev/null
helm lint --strict "$CHART" "${all_on[@]}" --set watchNamespace=team-a >/dev/null
if helm lint --strict "$CHART" --set replicaCount=-1 >/dev/null 2>&1; then
  die "values.schema.json accepted replicaCount=-1"
fi
if helm lint --strict "$CHART" --set 'extraEnv[0].name=X' --set 'extraEnv[0].value=8' >/dev/null 2>&1; then
  die "values.schema.json accepted an unquoted number in extraEnv"
fi
helm lint --strict "$CHART" --set webhook.certificates=cert-manager >/dev/null
rendered=$(helm template "$RELEASE" "$CHART" --namespace "$NS" --api-versions cert-manager.io/v1)
grep -q "cert-manager.io/inject-ca-from: $NS/$RELEASE-webhook" <<<"$rendered" ||
  die "with cert-manager present, the CRD is not annotated for CA injection"
rendered=$(helm template "$RELEASE" "$CHART" --namespace "$NS")
if grep -q "kind: Certificate" <<<"$rendered"; then
  die "without cert-manager, the chart renders cert-manager Certificates"
fi
ok "lint clean (defaults; everything on, namespaced; cert-manager); invalid values refused by values.schema.json"

step "helm template | kubectl apply --dry-run=server"
# A webhook URL set by an operator outside the cluster (the tests, the demo) would sit next to
# the chart's Service: drop where conversions went, the chart says it again.
kubectl patch crd middlewarestacks.meridian.dev --type=json \
  -p '[{"op":"remove","path":"/spec/conversion"}]' >/dev/null 2>&1 || true
monitoring_crds
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl create namespace team-a --dry-run=client -o yaml | kubectl apply -f - >/dev/null
helm template "$RELEASE" "$CHART" --namespace "$NS" "${all_on[@]}" |
  kubectl apply --server-side --force-conflicts --field-manager=chart-check --dry-run=server -f - >/dev/null
helm template "$RELEASE" "$CHART" --namespace "$NS" "${all_on[@]}" --set watchNamespace=team-a \
  --set crds.install=false |
  kubectl apply --server-side --force-conflicts --field-manager=chart-check --dry-run=server -f - >/dev/null
ok "server accepted every object (cluster-wide and namespaced)"

step "helm install / upgrade / uninstall"
helm uninstall "$RELEASE" --namespace "$NS" --wait >/dev/null 2>&1 || true
# The operator's tests apply the CRD without Helm; adopt it the documented way (Helm takes over
# an object carrying its ownership label and annotations), as a user moving to the chart would.
if kubectl get crd middlewarestacks.meridian.dev >/dev/null 2>&1; then
  kubectl label --overwrite crd middlewarestacks.meridian.dev app.kubernetes.io/managed-by=Helm >/dev/null
  kubectl annotate --overwrite crd middlewarestacks.meridian.dev \
    meta.helm.sh/release-name="$RELEASE" meta.helm.sh/release-namespace="$NS" >/dev/null
fi
helm install "$RELEASE" "$CHART" --namespace "$NS" "${all_on[@]}" --wait --timeout 120s >/dev/null
kubectl -n "$NS" wait --for=condition=Available --timeout=60s "deployment/$RELEASE" >/dev/null
ok "installed; deployment/$RELEASE Available"
# Kubernetes' edit role now covers stacks (aggregation by the controller-manager), view reads.
kubectl -n "$NS" create rolebinding chart-check-edit --clusterrole=edit \
  --serviceaccount="$NS:chart-check-editor" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$NS" create rolebinding chart-check-view --clusterrole=view \
  --serviceaccount="$NS:chart-check-viewer" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
can() { kubectl auth can-i "$1" middlewarestacks.meridian.dev -n "$NS" --as="system:serviceaccount:$NS:$2" 2>/dev/null; }
for _ in $(seq 1 30); do [ "$(can create chart-check-editor)" = yes ] && break; sleep 1; done
[ "$(can create chart-check-editor)" = yes ] || die "the edit role does not let its holder create stacks"
[ "$(can list chart-check-viewer)" = yes ] || die "the view role does not let its holder list stacks"
[ "$(can create chart-check-viewer)" = no ] || die "the view role lets its holder create stacks"
ok "edit creates stacks, view only reads them (aggregated ClusterRoles)"
helm upgrade "$RELEASE" "$CHART" --namespace "$NS" "${all_on[@]}" --set replicaCount=3 \
  --wait --timeout 120s >/dev/null
[ "$(kubectl -n "$NS" get "deployment/$RELEASE" -o jsonpath='{.status.readyReplicas}')" = 3 ] ||
  die "upgrade to 3 replicas did not roll out"
ok "upgraded; 3 replicas ready"
helm uninstall "$RELEASE" --namespace "$NS" --wait >/dev/null
kubectl get crd middlewarestacks.meridian.dev >/dev/null ||
  die "the CRD was removed on uninstall (helm.sh/resource-policy: keep)"
! kubectl -n "$NS" get "deployment/$RELEASE" >/dev/null 2>&1 || die "uninstall left the Deployment"
ok "uninstalled; CRD kept"

# The kind e2e's manifests, validated against the local control plane before the kind e2e
# applies them to its cluster. Last, because the stack needs the MiddlewareStack CRD in the API server: on a new control
# plane only the install above created it (a dry run of the chart creates nothing).
step "kind e2e manifests: kubectl apply --dry-run=server"
kubectl wait --for=condition=Established --timeout=60s crd/middlewarestacks.meridian.dev >/dev/null
kubectl create namespace meridian-deps --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply --server-side --field-manager=chart-check --dry-run=server -f "$ROOT/e2e/kind/deps.yaml" >/dev/null
kubectl apply --server-side --field-manager=chart-check --dry-run=server -n "$NS" \
  -f "$ROOT/e2e/kind/stack.yaml" -f "$ROOT/e2e/kind/nodeports.yaml" >/dev/null
ok "accepted (dependencies, stack, NodePorts)"
