"""Drift statistics, the drift rule and its separation from data quality."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats

from driftloop.drift import (
    DriftThresholds,
    FeatureThresholds,
    ReferenceProfile,
    build_profile,
    compute_drift,
    ks_against_quantiles,
    profile_numeric,
    sliding_window_ks,
    summary_payload,
    wasserstein_against_quantiles,
)
from driftloop.errors import DataError, SchemaError
from driftloop.quality import check_quality
from driftloop.schema import (
    CATEGORIES,
    CHANNELS,
    COUNTRIES,
    NEW_CATEGORY,
    NUMERIC_FEATURES,
    PREDICTION_SCHEMA,
)
from driftloop.settings import Settings

AMOUNT_SHAPE, AMOUNT_SCALE = 2.0, 30.0
AMOUNT_STD = float(np.sqrt(AMOUNT_SHAPE) * AMOUNT_SCALE)


def prediction_frame(
    n: int,
    seed: int,
    *,
    amount_shift_sigma: float = 0.0,
    amount_factor: float = 1.0,
    new_category_share: float = 0.0,
    null_column: str | None = None,
) -> pl.DataFrame:
    """A frame of PREDICTION_SCHEMA (+ label) whose score depends on amount, as a model's would."""
    rng = np.random.default_rng(seed)
    amount = (rng.gamma(AMOUNT_SHAPE, AMOUNT_SCALE, n) + amount_shift_sigma * AMOUNT_STD) * (
        amount_factor
    )
    numeric = {
        "amount": amount,
        "hour_of_day": rng.integers(0, 24, n).astype(float),
        "card_txn_count_1h": rng.poisson(1.0, n).astype(float),
        "card_txn_count_24h": rng.poisson(6.0, n).astype(float),
        "card_amount_mean_1h": rng.gamma(2.0, 30.0, n),
        "card_amount_mean_24h": rng.gamma(3.0, 20.0, n),
        "secs_since_last_txn": rng.exponential(3600.0, n),
        "amount_to_card_mean": rng.lognormal(0.0, 0.5, n),
        "merchant_txn_count_24h": rng.poisson(50.0, n).astype(float),
        "merchant_amount_mean_24h": rng.gamma(5.0, 12.0, n),
        "merchant_fraud_rate_30d": rng.beta(1.0, 60.0, n),
    }
    assert set(numeric) == set(NUMERIC_FEATURES)
    category = rng.choice(np.array(CATEGORIES + (NEW_CATEGORY,)), n, p=[0.1] * 10 + [0.0])
    if new_category_share:
        category[rng.random(n) < new_category_share] = NEW_CATEGORY
    logit = -3.0 + (amount - 60.0) / AMOUNT_STD + rng.normal(0.0, 1.0, n)
    score = 1.0 / (1.0 + np.exp(-logit))
    ts = pl.Series(np.arange(n, dtype=np.int64) * 1_000_000 + 1_700_000_000_000_000)
    frame = pl.DataFrame(
        {
            "request_id": [f"r{seed}-{i}" for i in range(n)],
            "transaction_id": [f"t{seed}-{i}" for i in range(n)],
            "received_at": ts,
            "event_timestamp": ts,
            "model_name": ["fraud"] * n,
            "model_version": ["v1"] * n,
            "arm": ["champion"] * n,
            "card_id": rng.integers(0, 5000, n),
            "merchant_id": rng.integers(0, 500, n),
            "category": category,
            "channel": rng.choice(np.array(CHANNELS), n, p=[0.6, 0.3, 0.1]),
            "country": rng.choice(np.array(COUNTRIES), n),
            **numeric,
            "feature_age_seconds": rng.exponential(60.0, n),
            "score": score,
            "decision": (score >= 0.5).astype(np.int8),
            "latency_ms": rng.gamma(2.0, 1.0, n),
            "date": ["2024-01-01"] * n,
            "label": (rng.random(n) < score).astype(np.int8),
        }
    )
    frame = frame.with_columns(
        pl.col("received_at", "event_timestamp").cast(pl.Datetime("us", "UTC"))
    ).select([*PREDICTION_SCHEMA, "label"])
    if null_column is not None:
        frame = frame.with_columns(pl.lit(None, dtype=frame.schema[null_column]).alias(null_column))
    return frame


@pytest.fixture(scope="module")
def reference() -> pl.DataFrame:
    return prediction_frame(100_000, seed=0)


@pytest.fixture(scope="module")
def profile(reference: pl.DataFrame) -> ReferenceProfile:
    return build_profile(reference)


# ---------------------------------------------------------------------------------
# the scenario table
# ---------------------------------------------------------------------------------
SCENARIOS = [
    # name, frame kwargs, rows, quality passes, drifted features, dataset drifted
    ("identical", {}, 20_000, True, [], False),
    ("amount +1 sigma", {"amount_shift_sigma": 1.0}, 20_000, True, ["amount"], True),
    ("amount +0.02 sigma, 100k rows", {"amount_shift_sigma": 0.02}, 100_000, True, [], False),
    ("new category at 5 %", {"new_category_share": 0.05}, 20_000, True, ["category"], True),
    ("amount x100 (data break)", {"amount_factor": 100.0}, 20_000, False, [], False),
    ("merchant_fraud_rate_30d all null", {"null_column": "merchant_fraud_rate_30d"}, 20_000,
     False, [], False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "rows", "quality_passes", "drifted", "dataset_drifted"),
    [s[1:] for s in SCENARIOS],
    ids=[s[0] for s in SCENARIOS],
)
def test_scenarios(
    profile: ReferenceProfile,
    kwargs: dict,
    rows: int,
    quality_passes: bool,
    drifted: list[str],
    dataset_drifted: bool,
) -> None:
    current = prediction_frame(rows, seed=1, **kwargs)
    quality = check_quality(current, profile)
    summary = compute_drift(
        profile, current, DriftThresholds.from_settings(Settings()), exclude=quality.failed_columns
    )
    assert quality.passed is quality_passes, quality.reasons
    assert summary.drifted_columns == drifted, summary.reasons
    assert summary.dataset_drifted is dataset_drifted, summary.reasons
    assert set(quality.failed_columns) <= set(summary.skipped_columns)


def test_one_sigma_shift_drifts_amount_and_the_score(profile: ReferenceProfile) -> None:
    summary = compute_drift(profile, prediction_frame(20_000, 1, amount_shift_sigma=1.0))
    amount = summary.feature("amount")
    assert amount.p_value is not None and amount.p_value < 1e-10
    assert amount.psi is not None and amount.psi > 0.2
    assert amount.wasserstein_normed == pytest.approx(1.0, abs=0.05)  # a 1-sigma shift
    assert summary.prediction is not None and summary.prediction.drifted
    assert any("prediction drift" in r for r in summary.reasons)
    assert summary.drift_share == pytest.approx(1 / 14)


def test_tiny_shift_is_significant_but_too_small_to_matter(profile: ReferenceProfile) -> None:
    summary = compute_drift(profile, prediction_frame(100_000, 1, amount_shift_sigma=0.02))
    amount = summary.feature("amount")
    assert amount.p_value is not None and amount.p_value < 0.01  # the test alone would fire
    assert amount.psi is not None and amount.psi < 0.01
    assert amount.wasserstein_normed is not None and amount.wasserstein_normed < 0.05
    assert not amount.drifted


def test_new_category_counts_as_its_own_bin_and_drifts_the_dataset(
    profile: ReferenceProfile,
) -> None:
    summary = compute_drift(profile, prediction_frame(20_000, 1, new_category_share=0.05))
    category = summary.feature("category")
    assert category.unseen_values == [NEW_CATEGORY]
    assert category.unseen_share == pytest.approx(0.05, abs=0.01)
    assert summary.new_categories == {"category": category.unseen_share}
    assert any("unseen values in category" in r for r in summary.reasons)


def test_new_category_below_share_does_not_drift_the_dataset(profile: ReferenceProfile) -> None:
    summary = compute_drift(profile, prediction_frame(20_000, 1, new_category_share=0.003))
    assert summary.feature("category").unseen_share > 0
    assert summary.new_categories == {}
    assert not summary.dataset_drifted


def test_data_break_is_quality_not_drift(profile: ReferenceProfile) -> None:
    current = prediction_frame(20_000, 1, amount_factor=100.0)
    quality = check_quality(current, profile)
    assert "amount" in quality.failed_columns
    assert "unit_change" in {i.check for i in quality.errors if i.column == "amount"}
    # without the exclusion it would look like massive drift ...
    naive = compute_drift(profile, current)
    assert naive.feature("amount").drifted
    # ... with it, the broken columns are skipped and nothing counts as drift
    summary = compute_drift(profile, current, exclude=quality.failed_columns)
    assert summary.feature("amount").skipped
    assert summary.feature("amount").skip_reason == "failed data quality"
    assert "amount" not in summary.drifted_columns
    assert not summary.dataset_drifted


def test_score_drift_does_not_count_when_an_input_failed_quality(
    profile: ReferenceProfile,
) -> None:
    current = prediction_frame(20_000, 1, amount_shift_sigma=1.0)
    summary = compute_drift(profile, current, exclude=["amount"])
    assert summary.prediction is not None and summary.prediction.drifted
    assert not summary.dataset_drifted
    assert summary.prediction_confounded


def test_drift_share_rule(profile: ReferenceProfile) -> None:
    rng = np.random.default_rng(5)
    cols = ["hour_of_day", "card_amount_mean_1h", "secs_since_last_txn", "merchant_txn_count_24h"]
    current = prediction_frame(20_000, 1).with_columns(
        (pl.col(c) * 3.0 + float(rng.integers(1, 5))).alias(c) for c in cols
    )
    summary = compute_drift(profile, current, DriftThresholds(share=0.25))
    assert set(summary.drifted_columns) == set(cols)
    assert summary.drift_share == pytest.approx(4 / 14)
    assert summary.dataset_drifted
    assert not compute_drift(profile, current, DriftThresholds(share=0.5)).dataset_drifted


def test_per_feature_override(profile: ReferenceProfile) -> None:
    current = prediction_frame(20_000, 1, amount_shift_sigma=1.0)
    lenient = DriftThresholds(overrides={"amount": FeatureThresholds(psi=50.0, wasserstein=5.0)})
    assert not compute_drift(profile, current, lenient).feature("amount").drifted
    assert lenient.for_column("amount").pvalue == lenient.pvalue


def test_missing_and_all_null_columns_are_skipped(profile: ReferenceProfile) -> None:
    current = prediction_frame(5_000, 1, null_column="amount").drop("channel")
    summary = compute_drift(profile, current)
    assert summary.feature("amount").skipped
    assert summary.feature("channel").skip_reason == "missing from window"
    assert summary.n_tested == 12


def test_thresholds_from_settings() -> None:
    settings = Settings(drift_psi_threshold=0.3, drift_pvalue=0.05, drift_share_threshold=0.5)
    thr = DriftThresholds.from_settings(settings, new_category_share=0.02)
    assert (thr.psi, thr.pvalue, thr.share, thr.new_category_share) == (0.3, 0.05, 0.5, 0.02)
    assert thr.wasserstein == settings.drift_wasserstein_threshold


def test_profile_round_trips_through_json(profile: ReferenceProfile) -> None:
    again = ReferenceProfile.model_validate_json(profile.model_dump_json())
    assert again == profile
    assert set(again.numeric) == set(NUMERIC_FEATURES)
    assert again.prediction is not None and again.label_rate is not None
    assert len(profile.model_dump_json()) < 500_000


def test_profile_rejects_bad_reference(reference: pl.DataFrame) -> None:
    with pytest.raises(SchemaError):
        build_profile(reference.drop("amount"))
    with pytest.raises(DataError):
        build_profile(reference.head(0))
    with pytest.raises(DataError):
        build_profile(reference.with_columns(pl.lit(None, dtype=pl.Float64).alias("amount")))


def test_summary_is_json_safe(profile: ReferenceProfile) -> None:
    summary = compute_drift(profile, prediction_frame(2_000, 1, amount_shift_sigma=1.0))
    payload = summary_payload(summary)
    assert payload["drifted_columns"] == ["amount"]
    assert isinstance(summary.model_dump_json(), str)


# ---------------------------------------------------------------------------------
# the statistics against scipy
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ref", "cur"),
    [
        (("normal", 0.0), ("normal", 0.0)),
        (("normal", 0.0), ("normal", 0.1)),
        (("poisson", 2.0), ("poisson", 2.0)),
        (("poisson", 2.0), ("poisson", 2.3)),
    ],
    ids=["normal same", "normal shifted", "poisson same", "poisson shifted"],
)
def test_ks_and_wasserstein_match_scipy(ref: tuple, cur: tuple) -> None:
    rng = np.random.default_rng(3)

    def draw(spec: tuple, n: int) -> np.ndarray:
        kind, param = spec
        if kind == "normal":
            return rng.normal(param, 1.0, n)
        return rng.poisson(param, n).astype(float)

    r, c = draw(ref, 30_000), draw(cur, 100_000)
    p = profile_numeric(pl.Series("x", r))
    d, pvalue = ks_against_quantiles(np.asarray(p.quantiles), p.n, np.sort(c))
    exact = stats.ks_2samp(r, c)
    assert d == pytest.approx(exact.statistic, abs=1e-3)
    assert np.log10(max(pvalue, 1e-300)) == pytest.approx(
        np.log10(max(exact.pvalue, 1e-300)), abs=max(1.0, 0.1 * abs(np.log10(exact.pvalue)))
    )
    w = wasserstein_against_quantiles(np.asarray(p.quantiles), np.sort(c))
    assert w == pytest.approx(stats.wasserstein_distance(r, c), abs=0.01)


def test_sliding_window_ks_uses_the_last_window(profile: ReferenceProfile) -> None:
    ref_scores = prediction_frame(20_000, 0)["score"]
    normal = prediction_frame(5_000, 2)["score"].to_numpy()
    shifted = prediction_frame(1_000, 3, amount_shift_sigma=1.0)["score"].to_numpy()
    stream = np.concatenate([normal, shifted])
    hit = sliding_window_ks(stream, ref_scores, window=1000)
    assert hit.drifted and hit.n_current == 1000 and hit.n_reference == 20_000
    quiet = sliding_window_ks(normal, ref_scores, window=1000)
    assert not quiet.drifted
    assert profile.prediction is not None
    via_profile = sliding_window_ks(pl.Series(stream), profile.prediction, window=1000)
    assert via_profile.drifted
    assert via_profile.statistic == pytest.approx(hit.statistic, abs=0.02)
    with pytest.raises(DataError):
        sliding_window_ks(np.array([np.nan]), ref_scores)
