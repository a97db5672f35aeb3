"""infra/grafana/dashboard.json: valid JSON, the expected panels, and only known series."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "infra" / "grafana" / "dashboard.json"
RULES = REPO / "infra" / "prometheus" / "rules" / "driftloop.rules.yml"

#: the metric contract (infra/README.md#metrics); histograms expand to _bucket/_sum/_count
CONTRACT = {
    "driftloop_predict_latency_seconds": "histogram",
    "driftloop_predictions_total": "counter",
    "driftloop_prediction_errors_total": "counter",
    "driftloop_score": "histogram",
    "driftloop_feature_age_seconds": "histogram",
    "driftloop_unknown_entity_total": "counter",
    "driftloop_unseen_category_total": "counter",
    "driftloop_predlog_backlog_records": "gauge",
    "driftloop_router_requests_total": "counter",
    "driftloop_router_latency_seconds": "histogram",
    "driftloop_rollout_weight": "gauge",
    "driftloop_rollout_breaches_total": "counter",
    "driftloop_drift_score": "gauge",
    "driftloop_drift_share": "gauge",
    "driftloop_drift_detected": "gauge",
    "driftloop_monitor_last_run_timestamp_seconds": "gauge",
    "driftloop_performance": "gauge",
    "driftloop_data_quality_failed": "gauge",
}

EXPECTED_PANELS = {
    "Traffic by arm": "driftloop_router_requests_total",
    "Rollout weights": "driftloop_rollout_weight",
    "Canary breaches": "driftloop_rollout_breaches_total",
    "Predict latency p50 / p99": "driftloop_predict_latency_seconds",
    "Router latency p50 / p99 by arm": "driftloop_router_latency_seconds",
    "Error ratio": "error_ratio",
    "Decisions": "driftloop_predictions_total",
    "Score distribution": "driftloop_score_bucket",
    "Mean score by version": "driftloop_score",
    "Drift share": "driftloop_drift_share",
    "Per-feature drift": "driftloop_drift_score",
    "Labelled performance": "driftloop_performance",
    "Monitor last run": "driftloop_monitor_last_run_timestamp_seconds",
    "Drift detected": "driftloop_drift_detected",
    "Data quality failed": "driftloop_data_quality_failed",
    "Feature age p50 / p90": "driftloop_feature_age_seconds",
    "Unknown entities and unseen categories": "driftloop_unknown_entity_total",
    "Prediction log backlog": "driftloop_predlog_backlog_records",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def known_series() -> set[str]:
    names: set[str] = set()
    for name, kind in CONTRACT.items():
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        names |= {r["record"] for r in group["rules"] if "record" in r}
    return names


def exprs(dashboard: dict[str, Any]) -> list[str]:
    out = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    out += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return out


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "driftloop-overview"
    assert dashboard["title"] == "driftloop"
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"model", "version"} <= set(variables)


def test_expected_panels_query_their_metric(dashboard: dict[str, Any]) -> None:
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    missing = set(EXPECTED_PANELS) - set(panels)
    assert not missing, f"missing panels: {sorted(missing)}"
    for title, metric in EXPECTED_PANELS.items():
        queries = " ".join(t["expr"] for t in panels[title]["targets"])
        assert metric in queries, f"panel {title!r} does not query {metric}"
    assert panels["Score distribution"]["type"] == "heatmap"
    assert panels["Score distribution"]["targets"][0]["format"] == "heatmap"


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & area, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p.get("description"), f"panel {p['title']!r} needs a description"
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_queries_use_only_contract_metrics_and_recording_rules(dashboard: dict[str, Any]) -> None:
    known = known_series()
    used: set[str] = set()
    for expr in exprs(dashboard):
        used |= set(re.findall(r"\b(?:[a-z_]+:)?driftloop_[a-z0-9_]+(?::[a-z0-9_]+)?", expr))
    unknown = used - known
    assert not unknown, f"dashboard queries unknown series: {sorted(unknown)}"
    # every contract metric appears on the dashboard, directly or through a recording rule
    shown = " ".join(exprs(dashboard)) + " " + RULES.read_text()
    assert all(name in shown for name in CONTRACT)


def test_queries_use_only_defined_variables(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    builtin = {"__rate_interval", "__interval", "__range"}
    for expr in exprs(dashboard):
        for var in re.findall(r"\$\{?(\w+)", expr):
            assert var in defined | builtin, f"undefined variable ${var} in {expr}"
