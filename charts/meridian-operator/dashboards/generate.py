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


def http_panels(svc):
    sel = f'service="{svc}",namespace=~"$namespace"'
    return [
        panel("Requests/s by route", [f"sum by (namespace, route) (rate(http_requests_total{{{sel}}}[5m]))"], "reqps",
              legend="{{namespace}} {{route}}"),
        panel("5xx ratio", [f'sum by (namespace) (rate(http_requests_total{{{sel},status=~"5.."}}[5m])) / '
                            f"sum by (namespace) (rate(http_requests_total{{{sel}}}[5m]))"], "percentunit",
              legend="{{namespace}}"),
        panel("Latency p50 / p99", [
            f"histogram_quantile(0.5, sum by (le, namespace) (rate(http_request_duration_seconds_bucket{{{sel}}}[5m])))",
            f"histogram_quantile(0.99, sum by (le, namespace) (rate(http_request_duration_seconds_bucket{{{sel}}}[5m])))",
        ], "s", legend="{{namespace}}"),
        panel("Dependencies up", [f"min by (namespace, dependency) (dependency_up{{{sel}}})"], "bool",
              legend="{{namespace}} {{dependency}}"),
    ]


def rate(metric, svc, by, unit="ops"):
    sel = f'service="{svc}",namespace=~"$namespace"'
    return f"sum by (namespace, {by}) (rate({metric}{{{sel}}}[5m]))"


COMPONENTS = {
    "api-gateway": ("Meridian / API gateway", lambda s: [
        panel("Rate-limit decisions/s", [rate("gateway_rate_limit_decisions_total", s, "decision")], "ops",
              legend="{{namespace}} {{decision}}"),
        panel("JWT failures/s by reason", [rate("jwt_failures_total", s, "reason")], "ops",
              legend="{{namespace}} {{reason}}"),
        panel("Upstream latency p99", [
            f'histogram_quantile(0.99, sum by (le, namespace, route) (rate(gateway_upstream_duration_seconds_bucket{{service="{s}"}}[5m])))'],
              "s", legend="{{namespace}} {{route}}"),
        panel("Read model lookups/s by result", [rate("gateway_read_model_lookups_total", s, "result")], "ops",
              legend="{{namespace}} {{result}}"),
    ]),
    "command-service": ("Meridian / Command service", lambda s: [
        panel("Commands accepted/s by type", [rate("commands_accepted_total", s, "type")], "ops",
              legend="{{namespace}} {{type}}"),
        panel("Commands rejected/s by reason", [rate("commands_rejected_total", s, "reason")], "ops",
              legend="{{namespace}} {{reason}}"),
        panel("Idempotent replays/s", [rate("idempotency_replays_total", s, "service")], "ops"),
        panel("Outbox backlog", [f'max by (namespace, table) (outbox_backlog{{service="{s}"}})'], "short",
              legend="{{namespace}} {{table}}"),
        panel("Relayed/s", [rate("outbox_relayed_total", s, "table")], "ops", legend="{{namespace}} {{table}}"),
    ]),
    "processor": ("Meridian / Processor", lambda s: [
        panel("Commands processed/s by outcome", [rate("commands_processed_total", s, "outcome")], "ops",
              legend="{{namespace}} {{outcome}}"),
        panel("Handler duration p99 by type", [
            f'histogram_quantile(0.99, sum by (le, namespace, type) (rate(command_handler_duration_seconds_bucket{{service="{s}"}}[5m])))'],
              "s", legend="{{namespace}} {{type}}"),
        panel("Retries/s by cause", [rate("command_retries_total", s, "cause")], "ops",
              legend="{{namespace}} {{cause}}"),
        panel("Dead letters/s by reason", [rate("commands_dead_lettered_total", s, "reason")], "ops",
              legend="{{namespace}} {{reason}}"),
        panel("Consumer lag", [f'sum by (namespace, topic) (kafka_consumer_lag{{service="{s}"}})'], "short",
              legend="{{namespace}} {{topic}}"),
        panel("Events outbox backlog", [f'max by (namespace, table) (outbox_backlog{{service="{s}"}})'], "short",
              legend="{{namespace}} {{table}}"),
    ]),
    "cache-updater": ("Meridian / Cache updater", lambda s: [
        panel("Events applied / stale / malformed per s", [
            rate("cache_events_applied_total", s, "service"),
            rate("cache_events_stale_total", s, "service"),
            rate("cache_events_malformed_total", s, "service"),
        ], "ops"),
        panel("Apply duration p99", [
            f'histogram_quantile(0.99, sum by (le, namespace) (rate(cache_apply_duration_seconds_bucket{{service="{s}"}}[5m])))'],
              "s", legend="{{namespace}}"),
        panel("Consumer lag", [f'sum by (namespace, topic) (kafka_consumer_lag{{service="{s}"}})'], "short",
              legend="{{namespace}} {{topic}}"),
    ]),
    "ws-hub": ("Meridian / WebSocket hub", lambda s: [
        panel("Connections", [f'sum by (namespace) (hub_connections{{service="{s}"}})'], "short", legend="{{namespace}}"),
        panel("Rooms", [f'sum by (namespace) (hub_rooms{{service="{s}"}})'], "short", legend="{{namespace}}"),
        panel("Deliveries/s", [rate("hub_deliveries_total", s, "service")], "ops"),
        panel("Disconnects/s by reason", [rate("hub_disconnects_total", s, "reason")], "ops",
              legend="{{namespace}} {{reason}}"),
        panel("Publish → deliver p99", [
            f'histogram_quantile(0.99, sum by (le, namespace) (rate(hub_publish_deliver_seconds_bucket{{service="{s}"}}[5m])))'],
              "s", legend="{{namespace}}"),
    ]),
}


def operator_panels():
    return [
        panel("Reconciles/s", ["sum by (result) (rate(operator_reconciles_total[5m]))"], "ops", legend="{{result}}"),
        panel("Reconcile errors/s by reason", ["sum by (reason) (rate(operator_reconcile_errors_total[5m]))"], "ops",
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
        out[svc] = dashboard(f"meridian-{svc}", title, http_panels(svc) + extra(svc))
    for name, d in out.items():
        (HERE / f"{name}.json").write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
