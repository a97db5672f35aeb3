"""The monitor's pure parts: verdicts, the N-window rule, incidents, performance, gauges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from driftloop import events as ev
from driftloop.drift import ReferenceProfile, build_profile
from driftloop.monitoring import (
    LABEL_COLUMNS,
    Baseline,
    EffectiveCounts,
    MonitorParams,
    MonitorResult,
    MonitorState,
    WindowInfo,
    advance_state,
    artifact_key,
    check_performance,
    effective_counts,
    incident_id_for,
    judge,
    load_state,
    metrics_textfile,
    publish_metrics,
    report_path_for,
    save_state,
    state_path,
)
from driftloop.performance import compute_performance
from driftloop.schema import CATEGORIES, CHANNELS, COUNTRIES, PREDICTION_SCHEMA
from driftloop.settings import Settings

T0 = datetime(2026, 2, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
MODEL = "fraud"


def frame(
    n: int,
    seed: int,
    *,
    start: datetime = T0,
    shift: float = 0.0,
    amount_scale: float = 1.0,
    new_category_share: float = 0.0,
    informative: bool = True,
    labelled: bool = True,
) -> pl.DataFrame:
    """A window of prediction records (PREDICTION_SCHEMA) with a joined ``label``."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.1).astype(np.int8)
    score = 1 / (1 + np.exp(-(rng.normal(-2.5, 1.0, n) + 3.0 * label)))
    if not informative:  # the same scores, no longer related to the labels (concept drift)
        score = rng.permutation(score)
    amount = np.exp(rng.normal(3.5 + shift, 0.7, n)) * amount_scale
    category = rng.choice(np.array(CATEGORIES), n).astype(object)
    category[rng.random(n) < new_category_share] = "electronics"
    received = [start + timedelta(seconds=float(s)) for s in np.sort(rng.random(n) * 3600)]
    cols = {
        "request_id": [f"r{seed}-{i}" for i in range(n)],
        "transaction_id": [f"t{seed}-{i}" for i in range(n)],
        "received_at": received,
        "event_timestamp": received,
        "model_name": [MODEL] * n,
        "model_version": ["v1"] * n,
        "arm": ["champion"] * n,
        "card_id": rng.integers(0, 1000, n),
        "merchant_id": rng.integers(0, 200, n),
        "amount": amount,
        "category": category.astype(str),
        "channel": rng.choice(np.array(CHANNELS), n),
        "country": rng.choice(np.array(COUNTRIES), n),
        "hour_of_day": rng.integers(0, 24, n).astype(float),
        "card_txn_count_1h": rng.poisson(1.0 + shift, n).astype(float),
        "card_txn_count_24h": rng.poisson(5.0 + 3 * shift, n).astype(float),
        "card_amount_mean_1h": np.exp(rng.normal(3.5 + shift, 0.5, n)) * amount_scale,
        "card_amount_mean_24h": np.exp(rng.normal(3.5 + shift, 0.4, n)) * amount_scale,
        "secs_since_last_txn": rng.exponential(3600 / (1 + shift), n),
        "amount_to_card_mean": rng.lognormal(0.0 + shift, 0.5, n),
        "merchant_txn_count_24h": rng.poisson(30, n).astype(float),
        "merchant_amount_mean_24h": np.exp(rng.normal(3.6 + shift, 0.3, n)) * amount_scale,
        "merchant_fraud_rate_30d": rng.beta(2, 60, n),
        "feature_age_seconds": rng.exponential(60, n),
        "score": score,
        "decision": (score >= 0.5).astype(np.int8),
        "latency_ms": rng.gamma(2.0, 0.5, n),
        "date": [r.strftime("%Y-%m-%d") for r in received],
    }
    out = pl.DataFrame(cols).cast(PREDICTION_SCHEMA)  # type: ignore[arg-type]
    if labelled:
        out = out.with_columns(pl.Series("label", label, dtype=pl.Int8))
    else:
        out = out.with_columns(pl.lit(None, dtype=pl.Int8).alias("label"))
    return out


@pytest.fixture(scope="module")
def reference() -> pl.DataFrame:
    return frame(20_000, 0)


@pytest.fixture(scope="module")
def profile(reference: pl.DataFrame) -> ReferenceProfile:
    return build_profile(reference)


@pytest.fixture(scope="module")
def baseline(reference: pl.DataFrame) -> Baseline:
    perf = compute_performance(reference, 0.5)
    metrics = {m: v for m, v in perf.metrics().items() if m not in ("n_labelled", "n_positives")}
    return Baseline(metrics=metrics, n_labelled=perf.n_labelled, n_positives=perf.n_positives)


def params(**kw: object) -> MonitorParams:
    return MonitorParams(model_name=MODEL, **kw).resolve(Settings())  # type: ignore[arg-type]


def info(start: datetime, rows: int) -> WindowInfo:
    return WindowInfo(start=start, end=start + HOUR, rows=rows, predictions_version=3)


def run(
    profile: ReferenceProfile,
    baseline: Baseline,
    window: pl.DataFrame,
    state: MonitorState,
    *,
    start: datetime = T0,
    p: MonitorParams | None = None,
    run_id: str = "run-1",
) -> MonitorResult:
    return judge(
        profile,
        baseline,
        0.5,
        window,
        p or params(),
        state,
        window=info(start, window.height),
        model_tag=f"{MODEL}:v1",
        run_id=run_id,
        now=start + HOUR,
    )


def names(result: MonitorResult) -> list[str]:
    return [str(e.name) for e in result.events()]


def fresh() -> MonitorState:
    return MonitorState(model_name=MODEL)


# -- verdicts ------------------------------------------------------------------------
def test_stable_window_is_ok_and_only_completes(profile, baseline) -> None:
    result = run(profile, baseline, frame(5_000, 1), fresh())
    assert result.verdict == "ok", result.reasons
    assert result.quality.passed
    assert result.drift is not None and not result.drift.dataset_drifted
    assert result.performance_check is not None and not result.performance_check.degraded
    assert result.incident_id is None
    assert names(result) == [ev.EventName.MONITOR_COMPLETED]
    payload = result.events()[0].payload
    assert isinstance(payload, ev.MonitorCompleted)
    assert payload.verdict == "ok" and payload.rows == 5_000 and payload.predictions_version == 3
    assert payload.performance is not None and payload.performance["n_labelled"] > 0
    assert result.sliding_ks is not None and result.sliding_ks.n_current == 1000


def test_covariate_shift_fires_drift_with_an_incident(profile, baseline) -> None:
    result = run(profile, baseline, frame(5_000, 2, shift=0.8), fresh())
    assert result.verdict == "drift"
    assert result.drift_fired and result.incident_id is not None
    assert "amount" in result.drift.drifted_columns  # type: ignore[union-attr]
    assert names(result)[:2] == [ev.EventName.MONITOR_COMPLETED, ev.EventName.DRIFT_DETECTED]
    drift_payload = result.events()[1].payload
    assert isinstance(drift_payload, ev.DriftDetected)
    assert drift_payload.incident_id == result.incident_id
    assert drift_payload.drifted_columns == result.drift.drifted_columns  # type: ignore[union-attr]
    # payloads survive the wire format and parse back as their model
    body = ev.build_event(ev.EventName.DRIFT_DETECTED, drift_payload)
    parsed = ev.parse_payload({**body, "id": body["id"]})
    assert isinstance(parsed, ev.DriftDetected) and parsed.incident_id == result.incident_id


def test_new_category_drifts(profile, baseline) -> None:
    result = run(profile, baseline, frame(5_000, 3, new_category_share=0.15), fresh())
    assert result.verdict == "drift"
    assert "category" in result.drift.new_categories  # type: ignore[union-attr]
    assert result.quality.passed


def test_unit_change_is_a_quality_failure_never_drift(profile, baseline) -> None:
    state = MonitorState(model_name=MODEL, consecutive_drifted=1, incident_id="inc-open")
    result = run(profile, baseline, frame(5_000, 4, amount_scale=100.0), state)
    assert result.verdict == "quality_failed"
    assert "amount" in result.quality.failed_columns
    assert "amount" in result.drift.skipped_columns  # type: ignore[union-attr]
    assert not result.drift_fired
    assert names(result) == [ev.EventName.MONITOR_COMPLETED, ev.EventName.DATA_QUALITY_FAILED]
    dq = result.events()[1].payload
    assert isinstance(dq, ev.DataQualityFailed)
    assert any(c.startswith("unit_change:amount") for c in dq.failed_checks)
    # the window says nothing about drift: streak and incident are kept as they were
    assert result.state.consecutive_drifted == 1
    assert result.state.incident_id == "inc-open"
    assert result.incident_id is None


def test_missing_column_is_a_quality_failure(profile, baseline) -> None:
    result = run(profile, baseline, frame(2_000, 5).drop("channel"), fresh())
    assert result.verdict == "quality_failed"
    assert "missing_column:channel" in result.quality.failed_checks


def test_small_window_is_insufficient(profile, baseline) -> None:
    result = run(profile, baseline, frame(50, 6), fresh())
    assert result.verdict == "insufficient"
    assert result.drift is None and result.performance is None
    assert names(result) == [ev.EventName.MONITOR_COMPLETED]
    assert result.state.consecutive_drifted == 0 and result.state.last_verdict == "insufficient"


def test_concept_drift_degrades_performance_not_drift(profile, baseline) -> None:
    result = run(profile, baseline, frame(5_000, 7, informative=False), fresh())
    assert result.verdict == "degraded", result.reasons
    assert result.incident_id is not None
    assert names(result) == [
        ev.EventName.MONITOR_COMPLETED,
        ev.EventName.PERFORMANCE_DEGRADED,
    ]
    payload = result.events()[1].payload
    assert isinstance(payload, ev.PerformanceDegraded)
    assert payload.value < payload.baseline and payload.incident_id == result.incident_id
    assert payload.window.start == T0


def test_no_performance_verdict_before_labels_arrive(profile, baseline) -> None:
    result = run(profile, baseline, frame(5_000, 7, informative=False, labelled=False), fresh())
    assert result.verdict == "ok"
    assert result.performance_check is not None and not result.performance_check.enough_labels
    assert result.events()[0].payload.performance is None  # type: ignore[attr-defined]


# -- performance rule ----------------------------------------------------------------
def test_small_noisy_drop_is_not_degraded(baseline) -> None:
    """A >10 % drop measured on 30 positives is noise, not degradation."""
    summary = compute_performance(frame(300, 8), 0.5, min_labelled=100, min_positives=10)
    worse = summary.model_copy(update={"recall": baseline.metrics["recall"] * 0.85})
    check = check_performance(worse, baseline, drop_threshold=0.10, alpha=0.01)
    recall = next(c for c in check.checks if c.metric == "recall")
    assert recall.beyond_threshold and not recall.significant
    assert not check.degraded
    assert "not significant" in check.reason


def test_effective_counts_count_each_card_once() -> None:
    w = pl.DataFrame(
        {
            "card_id": [1, 1, 1, 2, 3, 3, 4],
            "label": [1, 1, 1, 1, 0, 0, None],
            "score": [0.9, 0.8, 0.2, 0.7, 0.1, 0.6, 0.9],
        },
        schema_overrides={"label": pl.Int8},
    )
    eff = effective_counts(w, 0.5, "card_id")
    assert eff is not None
    assert (eff.positives, eff.negatives, eff.predicted_positives) == (2, 1, 3)
    assert eff.positive_ratio == pytest.approx(2 / 4) and eff.negative_ratio == pytest.approx(1 / 2)
    assert effective_counts(w, 0.5, "merchant_id") is None


def test_bursts_widen_the_test() -> None:
    """The same drop is significant over independent labels, not over four bursts of 25."""
    base = Baseline(metrics={"recall": 0.5}, n_labelled=100_000, n_positives=1_000)
    summary = compute_performance(
        pl.DataFrame({"label": [1] * 100 + [0] * 900, "score": [0.9] * 35 + [0.1] * 965}),
        0.5,
    )
    plain = check_performance(summary, base, drop_threshold=0.1, metrics=["recall"])
    bursts = EffectiveCounts(
        positives=4, negatives=900, predicted_positives=2, positive_ratio=0.04, negative_ratio=1.0
    )
    clustered = check_performance(
        summary, base, drop_threshold=0.1, metrics=["recall"], effective=bursts
    )
    assert plain.degraded and not clustered.degraded


def test_large_significant_drop_is_degraded(baseline) -> None:
    summary = compute_performance(frame(20_000, 9, informative=False), 0.5)
    check = check_performance(summary, baseline, drop_threshold=0.10, alpha=0.01)
    assert check.degraded
    assert check.drops[0].p_value is not None and check.drops[0].p_value < 0.01
    assert check.alpha == pytest.approx(0.01 / len(check.checks))


# -- N consecutive windows and incidents ---------------------------------------------
def test_n_consecutive_windows_rule(profile, baseline) -> None:
    p = params(consecutive_windows=2)
    first = run(profile, baseline, frame(3_000, 10, shift=0.8), fresh(), p=p)
    assert first.verdict == "ok" and first.drift_pending and not first.drift_fired
    assert ev.EventName.DRIFT_DETECTED not in names(first)
    assert first.incident_id is None and first.state.consecutive_drifted == 1
    second = run(profile, baseline, frame(3_000, 11, shift=0.8), first.state, start=T0 + HOUR, p=p)
    assert second.verdict == "drift" and second.drift_fired
    assert second.consecutive_drifted == 2 and second.incident_id is not None


def test_incident_id_is_kept_while_drift_lasts_and_renewed_after_a_clean_window(
    profile, baseline
) -> None:
    windows = [
        frame(3_000, 20, shift=0.8, start=T0),
        frame(3_000, 21, shift=0.8, start=T0 + HOUR),
        frame(3_000, 22, start=T0 + 2 * HOUR),
        frame(3_000, 23, shift=0.8, start=T0 + 3 * HOUR),
    ]
    state = fresh()
    results = []
    for i, w in enumerate(windows):
        r = run(profile, baseline, w, state, start=T0 + i * HOUR, run_id=f"run-{i}")
        results.append(r)
        state = r.state
    a, b, clean, c = results
    assert [r.verdict for r in results] == ["drift", "drift", "ok", "drift"]
    assert a.incident_id is not None and a.incident_id == b.incident_id
    assert clean.incident_id is None and clean.state.incident_id is None
    assert c.incident_id is not None and c.incident_id != a.incident_id
    assert a.incident_id == incident_id_for(MODEL, T0, T0 + HOUR)
    assert b.state.incident_opened_at == T0 + HOUR
    # the events carry it, and a related incident resource
    body = ev.build_event(ev.EventName.DRIFT_DETECTED, b.events()[1].payload)
    assert body["related"][0]["prefect.resource.id"] == f"driftloop.incident.{a.incident_id}"


def test_rejudging_the_last_window_does_not_count_it_twice(profile, baseline) -> None:
    w = frame(3_000, 30, shift=0.8)
    first = run(profile, baseline, w, fresh())
    again = run(profile, baseline, w, first.state)
    assert again.consecutive_drifted == first.consecutive_drifted == 1
    assert again.incident_id == first.incident_id
    assert [e.event_id for e in again.events()] == [e.event_id for e in first.events()]
    other_run = run(profile, baseline, w, first.state, run_id="run-2")
    assert other_run.events()[0].event_id != first.events()[0].event_id


def test_degradation_continues_a_drift_incident() -> None:
    state = fresh()
    s1, fired = advance_state(
        state,
        window_start=T0,
        window_end=T0 + HOUR,
        judged=True,
        drifted=True,
        degraded=False,
        required_windows=1,
        verdict="drift",
    )
    assert fired and s1.incident_id
    s2, fired2 = advance_state(
        s1,
        window_start=T0 + HOUR,
        window_end=T0 + 2 * HOUR,
        judged=True,
        drifted=False,
        degraded=True,
        required_windows=1,
        verdict="degraded",
    )
    assert not fired2 and s2.incident_id == s1.incident_id and s2.consecutive_drifted == 0


# -- parameters, state file, paths, gauges -------------------------------------------
def test_params_take_defaults_from_settings_and_render_a_form() -> None:
    settings = Settings(drift_consecutive_windows=3, drift_psi_threshold=0.3, model_name="acme")
    p = MonitorParams(thresholds={"jsd": 0.2}).resolve(settings)  # type: ignore[arg-type]
    assert p.model_name == "acme" and p.required_windows == 3
    assert p.window_minutes == settings.monitor_window_minutes
    thr = p.drift_thresholds()
    assert thr.psi == 0.3 and thr.jsd == 0.2 and thr.share == settings.drift_share_threshold
    assert p.drop_threshold == settings.performance_drop_threshold
    schema = MonitorParams.model_json_schema()
    assert all("description" in f for f in schema["properties"].values())
    with pytest.raises(ValueError):
        MonitorParams(model_tag="fraud:latest")
    with pytest.raises(ValueError):
        MonitorParams(window_minutes=0)


def test_state_round_trip(tmp_path: Path) -> None:
    assert load_state(tmp_path, MODEL) == fresh()
    state = MonitorState(
        model_name=MODEL, consecutive_drifted=2, incident_id="inc-x", last_window_end=T0
    )
    path = save_state(tmp_path, state)
    assert path == state_path(tmp_path, MODEL) == tmp_path / "monitor" / "fraud.json"
    assert load_state(tmp_path, MODEL) == state
    assert [p.name for p in path.parent.iterdir()] == ["fraud.json"]  # no temp file left


def test_report_path_and_artifact_key() -> None:
    p = report_path_for(Path("/r"), "fraud", info(T0, 10))
    assert p == Path("/r/fraud/fraud_20260201T000000Z_20260201T010000Z.html")
    assert artifact_key("Fraud_v2", "report") == "monitor-fraud-v2-report"


def test_gauges_are_written_as_a_textfile(profile, baseline, tmp_path: Path) -> None:
    result = run(profile, baseline, frame(3_000, 40, shift=0.8), fresh())
    path = publish_metrics(result, tmp_path, now=1_700_000_000.0)
    assert path == metrics_textfile(tmp_path, MODEL)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(path.read_text())
        for s in fam.samples
    }
    assert samples[("driftloop_drift_detected", (("model", MODEL),))] == 1.0
    assert samples[("driftloop_data_quality_failed", (("model", MODEL),))] == 0.0
    assert samples[("driftloop_drift_share", (("model", MODEL),))] == pytest.approx(
        result.drift.drift_share  # type: ignore[union-attr]
    )
    assert samples[("driftloop_monitor_last_run_timestamp_seconds", (("model", MODEL),))] == (
        1_700_000_000.0
    )
    amount = samples[("driftloop_drift_score", (("feature", "amount"), ("model", MODEL)))]
    assert amount == pytest.approx(result.drift.feature("amount").effect_size)  # type: ignore[union-attr]
    assert ("driftloop_drift_score", (("feature", "score"), ("model", MODEL))) in samples
    assert ("driftloop_performance", (("metric", "roc_auc"), ("model", MODEL))) in samples


def test_markdown_and_table_describe_the_verdict(profile, baseline) -> None:
    result = run(profile, baseline, frame(3_000, 50, shift=0.8), fresh())
    md = result.markdown()
    assert "**DRIFT**" in md and result.incident_id in md  # type: ignore[operator]
    table = result.feature_table()
    assert {r["column"] for r in table} >= {"amount", "category", "score"}
    assert next(r for r in table if r["column"] == "amount")["drifted"] is True


# -- label join and background report ------------------------------------------------
def _labels(predictions: pl.DataFrame, rows: list[int], *, minutes: int = 5) -> pl.DataFrame:
    from driftloop.schema import LABEL_SCHEMA

    picked = predictions[rows]
    at = [T0 + timedelta(minutes=minutes + i) for i in range(picked.height)]
    return pl.DataFrame(
        {
            "label_id": [f"l{minutes}-{i}" for i in range(picked.height)],
            "request_id": picked["request_id"],
            "transaction_id": picked["transaction_id"],
            "label": [i % 2 for i in range(picked.height)],
            "observed_at": at,
            "received_at": at,
            "date": [a.strftime("%Y-%m-%d") for a in at],
        }
    ).cast(LABEL_SCHEMA)  # type: ignore[arg-type]


def _label_cases() -> dict[str, tuple[pl.DataFrame, pl.DataFrame]]:
    preds = frame(200, 7).drop("label")
    other = frame(50, 8).drop("label")  # labels of requests outside the window
    some = _labels(preds, list(range(0, 200, 3)))
    foreign = _labels(other, list(range(50)), minutes=9)
    relabelled = pl.concat([some, _labels(preds, [0, 3, 6], minutes=30)])
    by_transaction = pl.concat(
        [some, _labels(preds, [1, 2], minutes=40).with_columns(pl.lit(None).alias("request_id"))]
    )
    return {
        "unique": (preds, pl.concat([some, foreign])),
        "none": (preds, some.head(0)),
        "relabelled": (preds, relabelled),
        "by_transaction": (preds, by_transaction),
        "duplicate predictions": (pl.concat([preds, preds.head(10)]), some),
    }


@pytest.mark.parametrize("case", list(_label_cases()))
def test_fast_label_join_is_the_general_one(case: str) -> None:
    from driftloop import predlog
    from driftloop.monitoring import _attach_labels

    preds, labels = _label_cases()[case]
    fast = _attach_labels(preds, labels)
    assert fast.equals(predlog.attach_labels(preds, labels))
    assert fast.columns == [*preds.columns, "label_id", "label", *LABEL_COLUMNS[2:]]


def test_report_runs_in_the_background_and_surfaces_errors(
    profile, reference, tmp_path: Path
) -> None:
    from driftloop.monitoring import start_report

    window = frame(3_000, 60, shift=0.8)
    args = (MODEL, info(T0, window.height), profile, reference, window)
    done = start_report(*args, tmp_path, sample_rows=1_000).result(timeout=120)
    assert done.html_path and Path(done.html_path).stat().st_size > 0
    assert done.n_current == 1_000 and "amount" in done.columns
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        start_report(*args, tmp_path / "file", sample_rows=1_000).result(timeout=120)


def test_pushgateway_url_comes_from_settings_unless_given() -> None:
    s = Settings(pushgateway_url="http://127.0.0.1:9091")
    assert MonitorParams(model_name=MODEL).resolve(s).pushgateway_url == "http://127.0.0.1:9091"
    given = MonitorParams(model_name=MODEL, pushgateway_url="http://127.0.0.1:9999")
    assert given.resolve(s).pushgateway_url == "http://127.0.0.1:9999"
    assert MonitorParams(model_name=MODEL).resolve(Settings()).pushgateway_url is None
