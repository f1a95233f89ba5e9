#!/usr/bin/env python3
"""Writes the Grafana dashboards of the chart (one JSON file per component) from the metric
names the platform declares (services/common/src/metrics.rs; its `drift` test fails when a
query here or in the alert rules names a metric that is not declared there).

Run after changing a metric: `python3 charts/meridian-operator/dashboards/generate.py`.
The chart ships the JSON files as ConfigMaps labelled for the Grafana sidecar.
"""
import json
import pathlib

HERE = pathlib.Path(__file__).parent
DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(title, exprs, unit="short", kind="timeseries", legend="{{namespace}} {{service}}"):
    return {
        "type": kind,
        "title": title,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": legend}
            for i, e in enumerate(exprs)
        ],
    }


def sel(svc):
    return f'service="{svc}",namespace=~"$namespace"'


def none_when_empty(expr, svc, label):
    """`expr`, or one series `{label}="none"` at 0 for each namespace where `svc` runs but the
    counter has no series yet (nothing happened): the panel shows 0, not "No data"."""
    return (f"{expr} or on (namespace) label_replace(sum by (namespace) (meridian_build_info{{{sel(svc)}}}) * 0, "
            f'"{label}", "none", "", "")')


def dependency_panel(svc):
    return panel("Dependencies up", [f"min by (namespace, dependency) (dependency_up{{{sel(svc)}}})"], "bool",
                 legend="{{namespace}} {{dependency}}")


def http_panels(svc):
    """For the services with an API (the processor and the cache updater serve only probes and
    scrapes, on the ops port, which is not counted)."""
    requests = f"http_requests_total{{{sel(svc)}}}"
    errors = f'http_requests_total{{{sel(svc)},status=~"5.."}}'
    return [
        panel("Requests/s by route", [f"sum by (namespace, route) (rate({requests}[5m]))"], "reqps",
              legend="{{namespace}} {{route}}"),
        # The numerator falls back to the other statuses at 0, so no 5xx reads 0, not "No data".
        panel("5xx ratio", [f"sum by (namespace) (rate({errors}[5m]) or rate({requests}[5m]) * 0) / "
                            f"sum by (namespace) (rate({requests}[5m]))"], "percentunit",
              legend="{{namespace}}"),
        panel("Latency p50 / p99", [
            f"histogram_quantile(0.5, sum by (le, namespace) (rate(http_request_duration_seconds_bucket{{{sel(svc)}}}[5m])))",
            f"histogram_quantile(0.99, sum by (le, namespace) (rate(http_request_duration_seconds_bucket{{{sel(svc)}}}[5m])))",
        ], "s", legend="{{namespace}}"),
        dependency_panel(svc),
    ]


def rate(metric, svc, by, unit="ops"):
    return f"sum by (namespace, {by}) (rate({metric}{{{sel(svc)}}}[5m]))"


def failures(metric, svc, by):
    """The rate of a counter of failures by `by`, "none" at 0 while there were none."""
    return none_when_empty(rate(metric, svc, by), svc, by)


def p99(metric, svc, by="namespace"):
    return f"histogram_quantile(0.99, sum by (le, {by}) (rate({metric}_bucket{{{sel(svc)}}}[5m])))"


def gauge(agg, metric, svc, by="namespace"):
    return f"{agg} by ({by}) ({metric}{{{sel(svc)}}})"


# The services that serve an API on their HTTP port.
WITH_API = {"api-gateway", "command-service", "ws-hub"}

COMPONENTS = {
    "api-gateway": ("Meridian / API gateway", lambda s: [
        panel("Rate-limit decisions/s", [rate("gateway_rate_limit_decisions_total", s, "decision")], "ops",
              legend="{{namespace}} {{decision}}"),
        panel("JWT failures/s by reason", [failures("jwt_failures_total", s, "reason")], "ops",
              legend="{{namespace}} {{reason}}"),
        panel("Upstream latency p99", [
            p99("gateway_upstream_duration_seconds", s, "namespace, route")],
              "s", legend="{{namespace}} {{route}}"),
        panel("Read model lookups/s by result", [rate("gateway_read_model_lookups_total", s, "result")], "ops",
              legend="{{namespace}} {{result}}"),
    ]),
    "command-service": ("Meridian / Command service", lambda s: [
        panel("Commands accepted/s by type", [rate("commands_accepted_total", s, "type")], "ops",
              legend="{{namespace}} {{type}}"),
        panel("Commands rejected/s by reason", [failures("commands_rejected_total", s, "reason")], "ops",
              legend="{{namespace}} {{reason}}"),
        panel("Idempotent replays/s", [rate("idempotency_replays_total", s, "service")], "ops"),
        panel("Outbox backlog", [gauge("max", "outbox_backlog", s, "namespace, table")], "short",
              legend="{{namespace}} {{table}}"),
        panel("Relayed/s", [rate("outbox_relayed_total", s, "table")], "ops", legend="{{namespace}} {{table}}"),
    ]),
    "processor": ("Meridian / Processor", lambda s: [
        panel("Commands processed/s by outcome", [rate("commands_processed_total", s, "outcome")], "ops",
              legend="{{namespace}} {{outcome}}"),
        panel("Handler duration p99 by type", [
            p99("command_handler_duration_seconds", s, "namespace, type")],
              "s", legend="{{namespace}} {{type}}"),
        panel("Retries/s by cause", [failures("command_retries_total", s, "cause")], "ops",
              legend="{{namespace}} {{cause}}"),
        panel("Dead letters/s by reason", [failures("commands_dead_lettered_total", s, "reason")], "ops",
              legend="{{namespace}} {{reason}}"),
        panel("Consumer lag", [gauge("sum", "kafka_consumer_lag", s, "namespace, topic")], "short",
              legend="{{namespace}} {{topic}}"),
        panel("Events outbox backlog", [gauge("max", "outbox_backlog", s, "namespace, table")], "short",
              legend="{{namespace}} {{table}}"),
    ]),
    "cache-updater": ("Meridian / Cache updater", lambda s: [
        panel("Events applied / stale / malformed per s", [
            rate("cache_events_applied_total", s, "service"),
            rate("cache_events_stale_total", s, "service"),
            rate("cache_events_malformed_total", s, "service"),
        ], "ops"),
        panel("Apply duration p99", [
            p99("cache_apply_duration_seconds", s)],
              "s", legend="{{namespace}}"),
        panel("Consumer lag", [gauge("sum", "kafka_consumer_lag", s, "namespace, topic")], "short",
              legend="{{namespace}} {{topic}}"),
    ]),
    "ws-hub": ("Meridian / WebSocket hub", lambda s: [
        panel("Connections", [gauge("sum", "hub_connections", s)], "short", legend="{{namespace}}"),
        panel("Rooms", [gauge("sum", "hub_rooms", s)], "short", legend="{{namespace}}"),
        panel("Deliveries/s", [rate("hub_deliveries_total", s, "service")], "ops"),
        panel("Disconnects/s by reason", [failures("hub_disconnects_total", s, "reason")], "ops",
              legend="{{namespace}} {{reason}}"),
        panel("Publish → deliver p99", [
            p99("hub_publish_deliver_seconds", s)],
              "s", legend="{{namespace}}"),
    ]),
}


def operator_panels():
    return [
        panel("Reconciles/s", ["sum by (result) (rate(operator_reconciles_total[5m]))"], "ops", legend="{{result}}"),
        panel("Reconcile errors/s by reason", [
            "sum by (reason) (rate(operator_reconcile_errors_total[5m]))"
            ' or on () label_replace(max(operator_leader) * 0, "reason", "none", "", "")'], "ops",
              legend="{{reason}}"),
        panel("Reconcile duration p99", [
            "histogram_quantile(0.99, sum by (le) (rate(operator_reconcile_duration_seconds_bucket[5m])))"], "s",
              legend="p99"),
        panel("Reconciles in flight", ["max by (pod) (operator_reconciles_in_flight)"], "short",
              legend="{{pod}}"),
        panel("Stacks per stage and status", ["sum by (stage, status) (operator_stacks)"], "short",
              legend="{{stage}} {{status}}"),
        panel("Leader", ["max by (pod) (operator_leader)"], "bool", legend="{{pod}}"),
        panel("API requests/s by verb", ["sum by (verb) (rate(operator_api_requests_total[5m]))"], "ops",
              legend="{{verb}}"),
    ]


def layout(panels):
    for i, p in enumerate(panels):
        p["id"] = i + 1
        p["gridPos"] = {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8}
    return panels


def dashboard(uid, title, panels, namespaced=True):
    templating = [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"}]
    if namespaced:
        templating.append({
            "name": "namespace", "type": "query", "datasource": DS, "label": "Namespace",
            "query": "label_values(meridian_build_info, namespace)", "includeAll": True, "multi": True,
            "allValue": ".*", "refresh": 2,
        })
    return {
        "uid": uid, "title": title, "tags": ["meridian"], "timezone": "browser", "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "templating": {"list": templating}, "panels": layout(panels), "editable": True,
    }


def main():
    out = {"operator": dashboard("meridian-operator", "Meridian / Operator", operator_panels(), namespaced=False)}
    for svc, (title, extra) in COMPONENTS.items():
        base = http_panels(svc) if svc in WITH_API else [dependency_panel(svc)]
        out[svc] = dashboard(f"meridian-{svc}", title, base + extra(svc))
    for name, d in out.items():
        (HERE / f"{name}.json").write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
