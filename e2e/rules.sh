#!/usr/bin/env bash
# The chart's alert rules, rendered as users get them (default thresholds), checked by
# Prometheus' own tools: `promtool check rules` (syntax, PromQL, templates) and
# `promtool test rules` with e2e/rules/alerts.test.yaml, where every alert fires on the series
# that should trigger it and stays silent on the others. promtool is built from the Prometheus
# Go module and cached by version (dev/tools.sh).
set -euo pipefail
# shellcheck source=SCRIPTDIR/../dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../dev/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
eval "$(bash "$ROOT/dev/deps.sh" env)"
bash "$ROOT/dev/tools.sh" install promtool
promtool=$(bash "$ROOT/dev/tools.sh" path promtool)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step "alert rules: promtool check rules"
# The PrometheusRule's spec is a Prometheus rule file: its `groups`, one level in.
helm template meridian-operator "$ROOT/charts/meridian-operator" \
  --set prometheusRules.enabled=true --show-only templates/prometheusrule.yaml |
  awk '/^spec:/ { inside = 1; next } inside { print substr($0, 3) }' >"$work/rules.yaml"
[ -s "$work/rules.yaml" ] || die "the chart rendered no alert rules"
"$promtool" check rules "$work/rules.yaml" >"$work/check.log" 2>&1 || { cat "$work/check.log"; die "promtool check rules failed"; }
ok "$(grep -o 'SUCCESS: [0-9]* rules found' "$work/check.log")"

step "alert rules: promtool test rules"
cp "$ROOT/e2e/rules/alerts.test.yaml" "$work/"
"$promtool" test rules "$work/alerts.test.yaml" >"$work/test.log" 2>&1 || { cat "$work/test.log"; die "promtool test rules failed"; }
# Every alert the chart defines has a test.
sed -n 's/^ *- alert: *//p' "$work/rules.yaml" | while read -r alert; do
  grep -q "alertname: $alert\$" "$work/alerts.test.yaml" || die "alert $alert has no test in e2e/rules/alerts.test.yaml"
done
ok "every alert tested: $(sed -n 's/^ *- alert: *//p' "$work/rules.yaml" | wc -l) alerts, $(grep -c '^  - name:' "$work/alerts.test.yaml") cases"
