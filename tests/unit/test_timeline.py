"""The incident timeline, built from events shaped as the Prefect server returns them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from rich.console import Console

from driftloop import timeline as tl
from driftloop.events import ReceivedEvent

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # drift injected
INC = "fraud-20260301T120030Z"
OTHER = "fraud-20260301T110000Z"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def event(name: str, seconds: float, **payload: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "event": name,
        "occurred": at(seconds),
        "resource": {"prefect.resource.id": "driftloop.model.fraud"},
        "payload": {"model_name": "fraud", **payload},
    }


def monitor(seconds: float, verdict: str, incident: str | None = None) -> dict[str, Any]:
    return event(
        "driftloop.monitor.completed",
        seconds,
        verdict=verdict,
        rows=2000,
        drift_share=0.1,
        window_start=at(seconds - 25).isoformat(),
        window_end=at(seconds).isoformat(),
        performance={"recall": 0.2 if verdict != "ok" else 0.6},
        incident_id=incident,
    )


def rollout(name: str, seconds: float, step: int, pct: int, verdict: str) -> dict[str, Any]:
    return event(
        f"driftloop.rollout.{name}",
        seconds,
        incident_id=INC,
        champion_tag="driftloop-fraud:v1",
        canary_tag="driftloop-fraud:v2",
        weights={"driftloop-fraud:v1": 100 - pct, "driftloop-fraud:v2": pct},
        step=step,
        canary_percent=pct,
        verdict=verdict,
        analysis={
            "verdict": verdict,
            "champion_requests": 400,
            "canary_requests": 150,
            "checks": {"error_rate": 0.0, "p99_ratio": 1.1},
        },
    )


def incident_events(end: str = "promoted") -> list[dict[str, Any]]:
    evs = [
        # an earlier incident, and a false alarm before the injection: not ours
        event("driftloop.drift.detected", -600, incident_id=OTHER, drift_share=0.3, rows=10),
        monitor(-10, "ok"),
        monitor(20, "ok"),
        monitor(45, "degraded", INC),
        event(
            "driftloop.performance.degraded",
            46,
            incident_id=INC,
            metric="recall",
            value=0.21,
            baseline=0.55,
        ),
        event(
            "driftloop.performance.degraded",
            70,
            incident_id=INC,
            metric="recall",
            value=0.2,
            baseline=0.55,
        ),
        event("driftloop.retrain.skipped", 72, incident_id=INC, reason="already has a retrain"),
        event(
            "driftloop.model.registered",
            95,
            incident_id=INC,
            model_tag="fraud:v2",
            bento_tag="driftloop-fraud:v2",
            gate={
                "passed": True,
                "primary_metric": "pr_auc",
                "challenger": 0.41,
                "champion": 0.22,
                "margin": 0.005,
                "window_rows": 1800,
                "window_positives": 70,
            },
        ),
        rollout("started", 105, 0, 25, "pass"),
        rollout("stepped", 118, 1, 50, "pass"),
    ]
    if end == "promoted":
        evs.append(rollout("promoted", 131, 2, 100, "pass"))
    elif end == "rolled_back":
        evs.append(rollout("rolled_back", 125, 1, 0, "fail"))
    return evs


RUNS = [
    tl.FlowRunInfo(id="r1", name="brave-otter", flow="retrain", state_type="COMPLETED",
                   start_time=at(50), incident_id=INC),
    tl.FlowRunInfo(id="r2", name="lazy-cat", flow="retrain", state_type="CANCELLED",
                   start_time=at(71), incident_id=INC),
    tl.FlowRunInfo(id="r3", name="old-run", flow="retrain", state_type="COMPLETED",
                   start_time=at(-590), incident_id=OTHER),
]  # fmt: skip


def build(evs: list[dict[str, Any]], **kwargs: Any) -> tl.Timeline:
    return tl.build_timeline(
        evs, model_name="fraud", injected_at=T0, scenario="concept_drift", flow_runs=RUNS, **kwargs
    )


def test_a_promoted_incident_in_order_with_its_durations() -> None:
    t = build(incident_events())
    assert t.incident_id == INC
    assert t.outcome == "promoted"
    kinds = [e.kind for e in t.entries]
    assert kinds == [
        "injected",
        "first_drifted_window",
        "alarm",
        "retrain_started",
        "gate",
        "started",
        "stepped",
        "promoted",
    ]
    assert [e.at for e in t.entries] == sorted(e.at for e in t.entries)
    d = t.durations
    assert (d.detect, d.retrain, d.promote, d.mitigate) == (46.0, 49.0, 36.0, 131.0)
    gate = next(e for e in t.entries if e.kind == "gate")
    assert "pr_auc challenger 0.410 vs champion 0.220" in gate.detail
    step = next(e for e in t.entries if e.kind == "stepped")
    assert step.title == "canary step 1 (50%)"
    assert "p99_ratio 1.100" in step.detail
    assert t.monitor_runs == 2  # the windows judged after the injection
    assert t.retrain_requests == 2
    assert any("further alarms" in n for n in t.notes)
    assert any("skipped" in n for n in t.notes)
    # nothing of the other incident
    assert all(e.at >= T0 for e in t.entries)


def test_a_rollback_ends_the_incident_too() -> None:
    t = build(incident_events("rolled_back"))
    assert t.outcome == "rolled_back"
    assert t.entries[-1].kind == "rolled_back"
    assert t.durations.mitigate == 125.0


def test_an_incident_without_an_end_is_open() -> None:
    t = build(incident_events("none"))
    assert t.outcome == "open"
    assert t.durations.mitigate is None and t.durations.retrain == 49.0


def test_a_rejected_challenger() -> None:
    evs = incident_events("none")[:6] + [
        event("driftloop.model.rejected", 90, incident_id=INC, model_tag="fraud:v2",
              reason="pr_auc does not beat the champion", gate={"challenger": 0.2}),
    ]  # fmt: skip
    t = build(evs)
    assert t.outcome == "rejected"
    assert t.entries[-1].title == "gate failed, model rejected"
    assert "does not beat" in t.entries[-1].detail


def test_the_incident_is_the_first_alarm_after_the_injection() -> None:
    evs = incident_events()
    assert tl.find_incident(evs, T0) == INC
    assert tl.find_incident(evs) == OTHER
    received = [ReceivedEvent.model_validate(e) for e in evs]
    assert build(received).incident_id == INC  # models work as well as dicts


def test_markdown_and_rich_renderings() -> None:
    t = build(incident_events())
    md = tl.to_markdown(t, chart="chart.png")
    assert f"# Incident {INC}" in md
    assert "| 46 s | 49 s | 36 s | **131 s** |" in md
    assert "| 12:02:11 | +131 s | promoted |" in md
    assert "![labelled accuracy and recall over time](chart.png)" in md
    console = Console(record=True, width=200)
    console.print(tl.rich_table(t))
    text = console.export_text()
    assert "promoted" in text and "time to mitigate 131 s" in text


def test_save_load_and_find(tmp_path: Path) -> None:
    t = build(incident_events())
    js, md = tl.save(t, tmp_path / "run" / "reports")
    assert md.read_text().startswith("# Incident")
    assert tl.load(js) == t
    assert tl.find_saved(tmp_path, INC) == js
    assert tl.find_saved(tmp_path, "latest") == js
    assert tl.find_saved(tmp_path, "nope") is None


def test_flow_run_info_reads_the_incident_from_its_parameters() -> None:
    run = {
        "id": "x",
        "name": "n",
        "state_type": "RUNNING",
        "start_time": "2026-03-01T12:00:50Z",
        "parameters": {"params": {"incident_id": INC, "reason": "driftloop.drift.detected"}},
    }
    assert tl.FlowRunInfo.from_api(run, "retrain").incident_id == INC
    rollout_run = {"id": "y", "name": "m", "parameters": {"incident_id": INC, "model_tag": "a:b"}}
    assert tl.FlowRunInfo.from_api(rollout_run, "rollout").incident_id == INC


def predictions() -> pl.DataFrame:
    # 20 s of predictions, one per second; labels on the first 15; recall falls after 10 s
    rows = []
    for i in range(20):
        label = 1 if i % 2 == 0 else 0
        decision = label if i < 10 else 0
        rows.append(
            {
                "received_at": at(i),
                "decision": decision,
                "label": label if i < 15 else None,
            }
        )
    return pl.DataFrame(rows, schema={"received_at": pl.Datetime("us", "UTC"),
                                      "decision": pl.Int8, "label": pl.Int8})  # fmt: skip


def test_metric_series_per_bucket() -> None:
    s = tl.metric_series(predictions(), bucket_seconds=10)
    assert s["rows"].to_list() == [10, 10]
    assert s["labelled"].to_list() == [10, 5]
    assert s["accuracy"].to_list() == [1.0, pytest.approx(2 / 5)]
    assert s["recall"].to_list() == [1.0, 0.0]
    with pytest.raises(ValueError):
        tl.metric_series(predictions(), bucket_seconds=0)


def test_the_chart_files(tmp_path: Path) -> None:
    t = build(incident_events())
    png, html = tl.write_chart(
        tl.metric_series(predictions(), 5), t, tmp_path / "c.png", tmp_path / "c.html"
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = html.read_text()
    assert "<html>" in text and "plotly" in text.lower() and "promoted" in text


def test_metric_series_smoothing_pools_trailing_buckets() -> None:
    s = tl.metric_series(predictions(), bucket_seconds=5, smooth=2, min_positives=4)
    # buckets of 5 s, each pooled with the one before: 5, 10, 10 and 10 rows
    assert s["rows"].to_list() == [5, 10, 10, 10]
    assert s["labelled"].to_list() == [5, 10, 10, 5]
    # 3 frauds in the first bucket (< 4: no recall); then 5/5 caught, 2/5, and 3 frauds
    assert s["recall"].to_list() == [None, 1.0, pytest.approx(2 / 5), None]
    with pytest.raises(ValueError):
        tl.metric_series(predictions(), smooth=0)
