"""Data-quality and schema checks against the reference profile."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl
import pytest

from driftloop.drift import ReferenceProfile, build_profile
from driftloop.quality import QualityThresholds, check_quality

SCHEMA: dict[str, pl.DataType] = {
    "amount": pl.Float64(),
    "hour_of_day": pl.Float64(),
    "merchant_fraud_rate_30d": pl.Float64(),
    "category": pl.String(),
    "score": pl.Float64(),
}
NUMERIC = ["amount", "hour_of_day", "merchant_fraud_rate_30d"]
CATEGORIES = np.array(["grocery", "gas", "travel", "retail"])


def frame(n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    amount = rng.gamma(2.0, 30.0, n)
    return pl.DataFrame(
        {
            "amount": amount,
            "hour_of_day": rng.integers(0, 24, n).astype(float),
            "merchant_fraud_rate_30d": rng.beta(1.0, 60.0, n),
            "category": rng.choice(CATEGORIES, n),
            "score": 1.0 / (1.0 + np.exp(3.0 - amount / 40.0 + rng.normal(0, 1, n))),
            "label": rng.integers(0, 2, n).astype(np.int8),
        }
    )


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    return build_profile(frame(20_000, 0), numeric=NUMERIC, categorical=["category"])


def _set(column: str, expr: pl.Expr) -> Callable[[pl.DataFrame], pl.DataFrame]:
    return lambda f: f.with_columns(expr.alias(column))


def _rows_where(
    share: float, column: str, value: float | str
) -> Callable[[pl.DataFrame], pl.DataFrame]:
    def change(f: pl.DataFrame) -> pl.DataFrame:
        hit = np.random.default_rng(7).random(f.height) < share
        return f.with_columns(
            pl.when(pl.Series(hit)).then(pl.lit(value)).otherwise(pl.col(column)).alias(column)
        )

    return change


BREAKS = [
    # name, change, expected failed (check, column) pairs
    ("amount x100", _set("amount", pl.col("amount") * 100), {("unit_change", "amount")}),
    ("amount / 100", _set("amount", pl.col("amount") / 100), {("unit_change", "amount")}),
    ("amount all null", _set("amount", pl.lit(None, dtype=pl.Float64)), {("null_rate", "amount")}),
    ("amount typed Null", _set("amount", pl.lit(None)), {("null_rate", "amount")}),
    ("amount 30 % NaN", _rows_where(0.3, "amount", float("nan")), {("null_rate", "amount")}),
    ("negative amounts", _rows_where(0.02, "amount", -5.0), {("negative", "amount")}),
    ("score above 1", _rows_where(0.05, "score", 7.0), {("out_of_bounds", "score")}),
    ("hour 24", _rows_where(0.01, "hour_of_day", 24.0), {("out_of_bounds", "hour_of_day")}),
    ("category vocabulary break", _set("category", pl.col("category").str.to_uppercase()),
     {("unknown_values", "category")}),
    ("category all null", _set("category", pl.lit(None, dtype=pl.String)),
     {("null_rate", "category")}),
    ("amount as string", _set("amount", pl.col("amount").cast(pl.String)), {("dtype", "amount")}),
    ("missing column", lambda f: f.drop("hour_of_day"), {("missing_column", "hour_of_day")}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"), [b[1:] for b in BREAKS], ids=[b[0] for b in BREAKS]
)
def test_breaks_fail_quality(
    profile: ReferenceProfile,
    change: Callable[[pl.DataFrame], pl.DataFrame],
    expected: set[tuple[str, str]],
) -> None:
    report = check_quality(change(frame(5_000, 1)), profile, SCHEMA)
    assert not report.passed
    assert {(i.check, i.column) for i in report.errors} == expected
    assert report.failed_columns == sorted({c for _, c in expected})
    assert report.reasons and report.failed_checks == sorted(f"{k}:{c}" for k, c in expected)


HEALTHY = [
    ("same distribution", lambda f: f),
    ("amount +1 sigma (drift, not a break)", _set("amount", pl.col("amount") + 42.4)),
    ("amount x3 (drift, not a break)", _set("amount", pl.col("amount") * 3)),
    ("2 % nulls", _rows_where(0.02, "amount", float("nan"))),
    ("5 % unseen category (drift, not a break)", _rows_where(0.05, "category", "electronics")),
]


@pytest.mark.parametrize("change", [h[1] for h in HEALTHY], ids=[h[0] for h in HEALTHY])
def test_healthy_windows_pass(
    profile: ReferenceProfile, change: Callable[[pl.DataFrame], pl.DataFrame]
) -> None:
    current = change(frame(5_000, 1))
    report = check_quality(current, profile, SCHEMA)
    assert report.passed, report.reasons
    assert report.failed_columns == []


def test_far_out_of_reference_range_is_a_warning(profile: ReferenceProfile) -> None:
    report = check_quality(frame(5_000, 1).with_columns(pl.col("amount") * 3), profile, SCHEMA)
    assert report.passed
    assert [(i.check, i.column, i.severity) for i in report.issues] == [
        ("out_of_range", "amount", "warning")
    ]


def test_custom_bounds(profile: ReferenceProfile) -> None:
    current = frame(5_000, 1)
    assert not check_quality(current, profile, SCHEMA, bounds={"amount": (None, 10.0)}).passed
    assert check_quality(current, profile, SCHEMA, bounds={}).passed


def test_extra_column_is_a_warning_and_label_is_expected(profile: ReferenceProfile) -> None:
    current = frame(1_000, 1).with_columns(pl.lit(1).alias("debug"))
    report = check_quality(current, profile, SCHEMA)
    assert report.passed
    assert report.extra_columns == ["debug"]
    assert [(i.check, i.severity) for i in report.issues] == [("extra_column", "warning")]


def test_empty_window_fails(profile: ReferenceProfile) -> None:
    report = check_quality(frame(10, 1).head(0), profile, SCHEMA)
    assert not report.passed
    assert report.failed_checks == ["empty"]


def test_few_rows_skip_value_checks(profile: ReferenceProfile) -> None:
    current = frame(10, 1).with_columns(pl.col("amount") * 100)
    assert check_quality(current, profile, SCHEMA).passed


def test_thresholds_are_configurable(profile: ReferenceProfile) -> None:
    current = _rows_where(0.3, "amount", float("nan"))(frame(5_000, 1))
    assert check_quality(current, profile, SCHEMA, QualityThresholds(null_rate_increase=0.5)).passed


def test_report_is_json_safe(profile: ReferenceProfile) -> None:
    current = frame(2_000, 1).with_columns(pl.col("amount") * 100)
    report = check_quality(current, profile, SCHEMA)
    text = report.model_dump_json()
    assert "unit_change" in text
