"""The monitor flow against a real Prefect server and real Delta logs built from the simulator.

Each scenario is a 40-day stream with the world's rates (seed 11, 1,000 cards,
~5,700 transactions a day) whose drift starts on day 37. Features are computed in
memory, the world champion's booster scores every row, and the predictions (and,
with ``received_at = label_available_at``, the labels) of the monitored days go
through the prediction log into Delta. Each scenario registers its own champion
(the world's booster, under its own model name): its reference and holdout
baseline come from days 25–30 of the stream, when the 30-day merchant aggregates
are (nearly) settled, as a champion trained on recent data would have them.
Windows are whole days, so the daily activity cycle does not read as drift.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import polars as pl
import pytest

from driftloop import events as ev
from driftloop import monitoring, registry
from driftloop.drift import build_profile
from driftloop.features import compute_card_features, compute_merchant_features
from driftloop.modeling import predict
from driftloop.monitoring import MonitorParams, MonitorResult
from driftloop.predlog import LabelLog, PredictionLog
from driftloop.prefect_local import free_port
from driftloop.schema import CATEGORICAL_VOCAB, LABEL_SCHEMA, NUMERIC_FEATURES, PREDICTION_SCHEMA
from driftloop.settings import Settings
from driftloop.simulate import SimulationConfig, simulate
from driftloop.training import evaluate, join_features_in_memory

pytestmark = [
    pytest.mark.integration,
    # Evidently's and Prefect's own imports warn; not ours to fix
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

START = datetime(2026, 1, 1, tzinfo=UTC)
DAYS = 40
DRIFT_DAY = 37
REFERENCE_DAYS = (25, 30)
EVENTS_PER_DAY = 40_000 / 7  # the world's rate
ALERTS = (
    ev.EventName.DRIFT_DETECTED,
    ev.EventName.PERFORMANCE_DEGRADED,
    ev.EventName.DATA_QUALITY_FAILED,
)


def day(d: int) -> datetime:
    return START + timedelta(days=d)


@dataclass
class Logged:
    """A scenario's prediction log and its champion."""

    model_name: str
    champion_tag: str
    settings: Settings


def _predictions(scored: pl.DataFrame, model: str, version: str, threshold: float) -> pl.DataFrame:
    """Prediction records as the model service writes them (serving.Scorer's mapping)."""
    ts = pl.col("event_timestamp")
    return scored.select(
        pl.concat_str(pl.lit("req-"), "transaction_id").alias("request_id"),
        "transaction_id",
        ts.alias("received_at"),  # received when it happened: windows line up with event time
        ts,
        pl.lit(model).alias("model_name"),
        pl.lit(version).alias("model_version"),
        pl.lit("champion").alias("arm"),
        "card_id",
        "merchant_id",
        "amount",
        "category",
        "channel",
        "country",
        *[pl.col(f).cast(pl.Float64).fill_nan(None) for f in NUMERIC_FEATURES if f != "amount"],
        (ts.dt.epoch("us") / 1e6 - pl.col("card_last_txn_ts")).alias("feature_age_seconds"),
        "score",
        (pl.col("score") >= threshold).cast(pl.Int8).alias("decision"),
        pl.lit(1.5).alias("latency_ms"),
        ts.dt.strftime("%Y-%m-%d").alias("date"),
    ).cast(PREDICTION_SCHEMA)  # type: ignore[arg-type]


def _labels(scored: pl.DataFrame) -> pl.DataFrame:
    at = pl.col("label_available_at")
    return scored.select(
        pl.concat_str(pl.lit("lab-"), "transaction_id").alias("label_id"),
        pl.concat_str(pl.lit("req-"), "transaction_id").alias("request_id"),
        "transaction_id",
        pl.col("is_fraud").alias("label"),
        at.alias("observed_at"),
        at.alias("received_at"),
        at.dt.strftime("%Y-%m-%d").alias("date"),
    ).cast(LABEL_SCHEMA)  # type: ignore[arg-type]


def build_log(world, tmp_path: Path, scenario: str, days: list[int]) -> Logged:
    """Simulate ``scenario``, register its champion, log the predictions of ``days``."""
    champion = registry.load_model(world.model_tag)
    tx = simulate(
        SimulationConfig(
            n_events=int(EVENTS_PER_DAY * DAYS),
            seed=11,
            days=DAYS,
            n_cards=1000,
            scenario=scenario,  # type: ignore[arg-type]
            start=START,
            drift_start=day(DRIFT_DAY),
        )
    )
    joined = join_features_in_memory(tx, compute_card_features(tx), compute_merchant_features(tx))
    scores = predict(champion.booster, champion.encoder.encode_frame(joined))
    scored = joined.with_columns(pl.Series("score", scores))
    ts = pl.col("event_timestamp")

    # this scenario's champion: the world's booster, reference + baseline from days 25-30
    holdout = scored.filter(ts >= day(REFERENCE_DAYS[0]), ts < day(REFERENCE_DAYS[1]))
    reference = holdout.sample(10_000, seed=0).select(
        "event_timestamp",
        *NUMERIC_FEATURES,
        *CATEGORICAL_VOCAB,
        "score",
        pl.col("is_fraud").cast(pl.Int8).alias("label"),
    )
    metrics = evaluate(
        holdout["is_fraud"].to_numpy(), holdout["score"].to_numpy(), champion.threshold
    )
    model_name = f"mon-{scenario.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    tag = registry.save_model(
        model_name,
        booster=champion.booster,
        encoder=champion.encoder,
        threshold=champion.threshold,
        metrics=metrics.model_dump(exclude={"n", "positives", "threshold"}),
        reference=reference,
        lineage=registry.Lineage(parent=world.model_tag),
        profile=build_profile(reference).model_dump(mode="json"),
        extra_metadata={"holdout_rows": metrics.n, "holdout_positives": metrics.positives},
        stage="champion",
    )

    settings = Settings(data_root=str(tmp_path / "data"), state_dir=tmp_path / "state")
    logged = pl.concat([scored.filter(ts >= day(d), ts < day(d + 1)) for d in days])
    predictions = PredictionLog(settings, fsync=False)
    predictions.append(
        _predictions(logged, model_name, tag.split(":", 1)[1], champion.threshold).to_dicts()
    )
    predictions.stop(flush=True)
    labels = LabelLog(settings, fsync=False)
    labels.append(_labels(logged).to_dicts())
    labels.stop(flush=True)
    return Logged(model_name=model_name, champion_tag=tag, settings=settings)


@pytest.fixture(autouse=True)
def _flush_prefect_logs():
    """Send this test's flow-run logs while the session's server is still up."""
    yield
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


@pytest.fixture
def use_settings(monkeypatch: pytest.MonkeyPatch):
    """Point the flow (which reads settings from the environment) at a scenario's log."""

    def apply(logged: Logged) -> None:
        monkeypatch.setenv("DRIFTLOOP_DATA_ROOT", logged.settings.data_root)
        monkeypatch.setenv("DRIFTLOOP_STATE_DIR", str(logged.settings.state_dir))

    return apply


def run_monitor(
    logged: Logged, d: int, *, labels_after: timedelta | None = timedelta(days=10), **kw: object
) -> MonitorResult:
    from flows.monitor import monitor

    end = day(d + 1)
    params = MonitorParams(
        model_name=logged.model_name,
        window_minutes=24 * 60,
        window_end=end,
        labels_as_of=day(d) if labels_after is None else end + labels_after,
        report_sample_rows=2_000,
        **kw,  # type: ignore[arg-type]
    )
    return monitor(params)


def read_events(api_url: str, logged: Logged, since: datetime) -> list[ev.ReceivedEvent]:
    return ev.read_events(
        api_url,
        prefix="driftloop.",
        since=since,
        resource_id=ev.model_resource_id(logged.model_name),
    )


def of(events: list[ev.ReceivedEvent], name: ev.EventName) -> list[ev.ReceivedEvent]:
    return [e for e in events if e.event == name]


@pytest.mark.slow
def test_stable_stream_raises_no_alert_over_ten_windows(
    world, prefect_api_url: str, tmp_path: Path, use_settings
) -> None:
    days = list(range(30, 40))
    logged = build_log(world, tmp_path, "stable", days)
    use_settings(logged)
    since = datetime.now(UTC) - timedelta(seconds=5)
    results = [run_monitor(logged, d, report="on_alert") for d in days]

    assert [r.verdict for r in results] == ["ok"] * 10, [r.reasons for r in results]
    assert all(r.window.rows > 5_000 for r in results)
    assert all(r.performance and r.performance.enough_labels for r in results)
    found = read_events(prefect_api_url, logged, since)
    completed = of(found, ev.EventName.MONITOR_COMPLETED)
    assert len(completed) == 10
    assert [e for e in found if e.event in ALERTS] == []
    for e, r in zip(completed, results, strict=True):
        payload = ev.parse_payload(e)
        assert isinstance(payload, ev.MonitorCompleted)
        assert payload.verdict == "ok" and payload.rows == r.window.rows
        assert payload.window_start == r.window.start and payload.performance is not None
    state = monitoring.load_state(logged.settings.state_dir, logged.model_name)
    assert state.consecutive_drifted == 0 and state.incident_id is None


@pytest.mark.slow
def test_covariate_shift_drifts_and_incidents_follow_the_windows(
    world, prefect_api_url: str, tmp_path: Path, use_settings
) -> None:
    logged = build_log(world, tmp_path, "covariate_shift", [32, 37, 38, 39])
    use_settings(logged)
    since = datetime.now(UTC) - timedelta(seconds=5)
    first = run_monitor(logged, 37)  # the report is checked on this one
    second, clean, later = (run_monitor(logged, d, report="never") for d in (38, 32, 39))

    assert [r.verdict for r in (first, second, clean, later)] == ["drift", "drift", "ok", "drift"]
    assert first.incident_id and first.incident_id == second.incident_id
    assert clean.incident_id is None
    assert later.incident_id and later.incident_id != first.incident_id
    assert {"amount", "hour_of_day"} <= set(first.drift.drifted_columns)  # type: ignore[union-attr]

    found = read_events(prefect_api_url, logged, since)
    drifts = [ev.parse_payload(e) for e in of(found, ev.EventName.DRIFT_DETECTED)]
    assert [p.incident_id for p in drifts] == [  # type: ignore[attr-defined]
        first.incident_id,
        first.incident_id,
        later.incident_id,
    ]
    assert len(of(found, ev.EventName.MONITOR_COMPLETED)) == 4
    assert of(found, ev.EventName.DATA_QUALITY_FAILED) == []
    payload = drifts[0]
    assert isinstance(payload, ev.DriftDetected)
    assert payload.window_start == day(37) and payload.window_end == day(38)
    assert payload.drift_share >= 0.25 and "amount" in payload.drifted_columns
    assert payload.predictions_version == first.window.predictions_version
    # the incident's events are one filter away
    timeline = ev.read_events(prefect_api_url, since=since, incident_id=first.incident_id)
    assert {e.event for e in timeline} >= {ev.EventName.DRIFT_DETECTED}

    # what a person sees: the report, the artifacts, the gauges
    assert payload.report_path and Path(payload.report_path).is_file()
    assert Path(payload.report_path).name == (
        f"{logged.model_name}_20260207T000000Z_20260208T000000Z.html"
    )
    assert "<html" in Path(payload.report_path).read_text()[:2000].lower()
    _assert_artifacts(first)
    prom = monitoring.metrics_textfile(logged.settings.state_dir, logged.model_name).read_text()
    assert f'driftloop_drift_detected{{model="{logged.model_name}"}} 1.0' in prom
    assert f'driftloop_drift_score{{feature="amount",model="{logged.model_name}"}}' in prom


def _assert_artifacts(result: MonitorResult) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(result.run_id)])
            )
        )
    by_key = {a.key: a for a in artifacts}
    key = functools.partial(monitoring.artifact_key, result.model_name)
    assert set(by_key) == {key("report"), key("verdict"), key("features")}
    link = by_key[key("report")]  # Prefect stores a link artifact as markdown "[text](link)"
    assert result.report_path and f"(file://{result.report_path})" in str(link.data)
    assert "DRIFT" in str(by_key[key("verdict")].data)
    assert by_key[key("features")].type == "table"
    table = by_key[key("features")].data
    assert "amount" in str(table) and "effect_size" in str(table)


def test_new_category_drifts(world, prefect_api_url: str, tmp_path: Path, use_settings) -> None:
    # day 38: the newcomers' merchants have had a day to get their aggregates
    logged = build_log(world, tmp_path, "new_category", [38])
    use_settings(logged)
    since = datetime.now(UTC) - timedelta(seconds=5)
    result = run_monitor(logged, 38, report="never")
    assert result.verdict == "drift", result.reasons
    found = read_events(prefect_api_url, logged, since)
    (drift,) = [ev.parse_payload(e) for e in of(found, ev.EventName.DRIFT_DETECTED)]
    assert isinstance(drift, ev.DriftDetected) and drift.incident_id == result.incident_id
    assert drift.model_extra and drift.model_extra["new_categories"]["category"] > 0.1
    assert "category" in drift.drifted_columns


def test_concept_drift_degrades_performance_once_labels_arrive(
    world, prefect_api_url: str, tmp_path: Path, use_settings
) -> None:
    logged = build_log(world, tmp_path, "concept_drift", [38])
    use_settings(logged)
    since = datetime.now(UTC) - timedelta(seconds=5)
    before = run_monitor(logged, 38, labels_after=None, report="never")
    assert before.verdict != "degraded"
    assert before.performance is not None and before.performance.n_labelled == 0
    between = datetime.now(UTC)
    assert of(read_events(prefect_api_url, logged, since), ev.EventName.PERFORMANCE_DEGRADED) == []

    after = run_monitor(logged, 38, report="never")
    assert after.verdict in ("degraded", "drift") and after.incident_id
    found = read_events(prefect_api_url, logged, between - timedelta(seconds=1))
    (degraded,) = [ev.parse_payload(e) for e in of(found, ev.EventName.PERFORMANCE_DEGRADED)]
    assert isinstance(degraded, ev.PerformanceDegraded)
    assert degraded.value < degraded.baseline * 0.9
    assert degraded.incident_id == after.incident_id
    assert degraded.window.start == day(38) and degraded.window.end == day(39)
    assert degraded.metric in ("recall", "precision", "roc_auc", "pr_auc")


def test_data_break_is_a_quality_failure_and_never_drift(
    world, prefect_api_url: str, tmp_path: Path, use_settings
) -> None:
    logged = build_log(world, tmp_path, "data_break", [38])
    use_settings(logged)
    since = datetime.now(UTC) - timedelta(seconds=5)
    result = run_monitor(logged, 38, report="never")
    assert result.verdict == "quality_failed"
    found = read_events(prefect_api_url, logged, since)
    assert of(found, ev.EventName.DRIFT_DETECTED) == []
    assert of(found, ev.EventName.PERFORMANCE_DEGRADED) == []  # labels were in: it did degrade
    (failed,) = [ev.parse_payload(e) for e in of(found, ev.EventName.DATA_QUALITY_FAILED)]
    assert isinstance(failed, ev.DataQualityFailed)
    assert "unit_change:amount" in failed.failed_checks
    (completed,) = [ev.parse_payload(e) for e in of(found, ev.EventName.MONITOR_COMPLETED)]
    assert completed.verdict == "quality_failed"  # type: ignore[attr-defined]
    assert result.state.incident_id is None and result.state.consecutive_drifted == 0


@pytest.mark.skipif(
    shutil.which("prometheus-pushgateway") is None, reason="prometheus-pushgateway not installed"
)
def test_gauges_reach_a_real_pushgateway(tmp_path: Path) -> None:
    """publish_metrics pushes to a Pushgateway that Prometheus can scrape."""
    from tests.unit.test_monitoring import frame, fresh, run

    result = run(
        build_profile(frame(5_000, 0)),
        monitoring.Baseline(metrics={}),
        frame(3_000, 1, shift=0.8),
        fresh(),
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            "prometheus-pushgateway",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--persistence.file={tmp_path / 'pg.db'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "pushgateway did not start"
            time.sleep(0.2)
        monitoring.publish_metrics(result, tmp_path, pushgateway_url=url)
        text = httpx.get(f"{url}/metrics", timeout=5).text
        line = next(ln for ln in text.splitlines() if ln.startswith("driftloop_drift_detected{"))
        assert 'job="driftloop-monitor"' in line and 'model="fraud"' in line
        assert line.endswith(" 1")
        assert "driftloop_monitor_last_run_timestamp_seconds{" in text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
