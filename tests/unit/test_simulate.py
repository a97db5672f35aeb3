"""The simulator: determinism, speed-independent shape, and each scenario's measured effect."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from driftloop.features import compute_card_features, compute_merchant_features
from driftloop.modeling import predict
from driftloop.schema import CATEGORIES, NEW_CATEGORY, TRANSACTION_SCHEMA, validate_frame
from driftloop.simulate import SCENARIOS, SimulationConfig, simulate
from driftloop.training import evaluate, join_features_in_memory, train_model

N = 120_000


@pytest.fixture(scope="module")
def frames() -> dict[str, tuple[SimulationConfig, pl.DataFrame]]:
    out = {}
    for sc in SCENARIOS:
        cfg = SimulationConfig(n_events=N, seed=7, scenario=sc)
        out[sc] = (cfg, simulate(cfg))
    return out


def _split(cfg: SimulationConfig, df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    before = df.filter(pl.col("event_timestamp") < cfg.drift_at)
    after = df.filter(pl.col("event_timestamp") >= cfg.drift_at)
    return before, after


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    a = simulate(n_events=5_000, seed=3, scenario="concept_drift")
    b = simulate(n_events=5_000, seed=3, scenario="concept_drift")
    c = simulate(n_events=5_000, seed=4, scenario="concept_drift")
    assert a.equals(b)
    assert not a.equals(c)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_shape_schema_and_fraud_rate(frames, scenario: str) -> None:
    cfg, df = frames[scenario]
    validate_frame(df, TRANSACTION_SCHEMA, allow_extra=False)
    assert df.height == N
    assert df["transaction_id"].n_unique() == N
    assert df["event_timestamp"].is_sorted()
    assert df["event_timestamp"].min() >= cfg.start
    assert df["event_timestamp"].max() < cfg.end
    rate = df["is_fraud"].mean()
    assert 0.01 <= rate <= 0.03, rate


def test_labels_arrive_late_with_configured_median() -> None:
    df = simulate(n_events=20_000, seed=1, label_delay_median_hours=12.0)
    delay_h = (
        (df["label_available_at"] - df["event_timestamp"]).dt.total_seconds() / 3600
    ).to_numpy()
    assert (delay_h > 0).all()
    assert 10.0 < np.median(delay_h) < 14.0


def test_stable_does_not_move(frames) -> None:
    cfg, df = frames["stable"]
    before, after = _split(cfg, df)
    assert abs(np.log(after["amount"]).mean() - np.log(before["amount"]).mean()) < 0.05
    assert set(after["category"].unique()) <= set(CATEGORIES)


def test_covariate_shift_moves_amounts_and_hours(frames) -> None:
    cfg, df = frames["covariate_shift"]
    before, after = _split(cfg, df)
    assert np.log(after["amount"]).mean() - np.log(before["amount"]).mean() > 0.5
    night = lambda f: (f["event_timestamp"].dt.hour() <= 4).mean()  # noqa: E731
    assert night(after) > 2 * night(before)


def test_new_category_appears_only_after_drift(frames) -> None:
    cfg, df = frames["new_category"]
    before, after = _split(cfg, df)
    assert (before["category"] == NEW_CATEGORY).sum() == 0
    share = (after["category"] == NEW_CATEGORY).mean()
    assert 0.10 < share < 0.20


def test_data_break_multiplies_amount_by_100(frames) -> None:
    cfg, df = frames["data_break"]
    before, after = _split(cfg, df)
    ratio = after["amount"].median() / before["amount"].median()
    assert 80 < ratio < 125
    nulls = simulate(n_events=10_000, seed=1, scenario="data_break", break_kind="null")
    _, after_null = _split(cfg, nulls)
    assert after_null["channel"].null_count() == after_null.height


def test_concept_drift_costs_a_static_model_15_points_of_recall() -> None:
    """Train before the drift; recall at the same threshold falls by at least 15 points after."""
    cfg = SimulationConfig(n_events=200_000, seed=7, scenario="concept_drift")
    df = simulate(cfg)
    feats = join_features_in_memory(df, compute_card_features(df), compute_merchant_features(df))
    before, after = _split(cfg, feats)
    result = train_model(before)
    assert result.metrics.roc_auc >= 0.85
    post = evaluate(
        after["is_fraud"].to_numpy(),
        predict(result.booster, result.encoder.encode_frame(after)),
        result.threshold,
    )
    assert result.metrics.recall - post.recall >= 0.15, (result.metrics.recall, post.recall)
    # the inputs barely move: amounts keep their distribution
    b, a = _split(cfg, df)
    assert abs(np.log(a["amount"]).mean() - np.log(b["amount"]).mean()) < 0.1


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        SimulationConfig(n_events=0)
    with pytest.raises(ValueError):
        SimulationConfig(scenario="nope")  # type: ignore[arg-type]
