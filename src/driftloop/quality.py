"""Data-quality and schema checks on a monitored window.

A quality failure is a verdict of its own, distinct from drift: it means the
data is broken (a column missing or all null, a unit change, impossible
values), not that the world changed. Retraining on broken data would be wrong,
so the monitor emits ``driftloop.data_quality.failed`` (which starts no
retrain) and tests drift only on the columns that passed::

    quality = check_quality(current, profile)
    drift = compute_drift(profile, current, thresholds, exclude=quality.failed_columns)
    if not quality.passed:   -> data_quality.failed (quality.reasons)
    if drift.dataset_drifted -> drift.detected      (drift.reasons)

Checks (all against the reference profile, no hand-written ranges needed):

============== ======== ===========================================================
check          severity fails when
============== ======== ===========================================================
empty          error    the window has no rows
missing_column error    a column of the expected schema or the profile is absent
dtype          error    a column has another type than the expected schema (an
                        all-null column typed Null is left to the null check)
extra_column   warning  a column is not in the expected schema
null_rate      error    null (or NaN/inf) rate rose by more than ``null_rate_increase``
                        over the reference (a column gone all null fails here)
unit_change    error    the spread (p95 - p5) changed by a factor >= ``unit_change_factor``
                        either way (``amount`` x 100 fails here)
negative       error    a column never negative in the reference has more than
                        ``invalid_share`` negative values (negative amounts)
out_of_bounds  error    more than ``invalid_share`` of values break the column's
                        domain bounds (``bounds``, default :data:`DEFAULT_BOUNDS`:
                        score and rates in [0, 1], hour in [0, 23])
out_of_range   warning  more than ``out_of_range_share`` of values fall outside the
                        reference [min, max] widened by ``range_margin`` x (max - min);
                        a warning only, since open-ended columns (amounts) can
                        genuinely drift there
unknown_values error    more than ``unknown_share`` of a categorical column's values
                        were never seen in the reference (a vocabulary break; a few
                        new values are drift, see driftloop.drift)
============== ======== ===========================================================

Checks on values are run only when the column has at least ``min_values``
non-null values, so one stray row cannot fail a window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from driftloop.drift import CategoricalProfile, NumericProfile, ReferenceProfile
from driftloop.schema import PREDICTION_SCHEMA

CheckName = Literal[
    "empty",
    "missing_column",
    "dtype",
    "extra_column",
    "null_rate",
    "unit_change",
    "negative",
    "out_of_bounds",
    "out_of_range",
    "unknown_values",
]


#: domain bounds of the running example's columns (a team passes its own)
DEFAULT_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "score": (0.0, 1.0),
    "merchant_fraud_rate_30d": (0.0, 1.0),
    "hour_of_day": (0.0, 23.0),
}


class QualityThresholds(BaseModel):
    """Tolerances of the quality checks (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    null_rate_increase: Annotated[float, Field(gt=0, le=1)] = 0.10
    unit_change_factor: Annotated[float, Field(gt=1)] = 10.0
    invalid_share: Annotated[float, Field(ge=0, lt=1)] = 0.001
    out_of_range_share: Annotated[float, Field(ge=0, lt=1)] = 0.01
    range_margin: Annotated[float, Field(ge=0)] = 0.10
    unknown_share: Annotated[float, Field(gt=0, le=1)] = 0.50
    min_values: Annotated[int, Field(ge=1)] = 20


class QualityIssue(BaseModel):
    """One failed check."""

    model_config = ConfigDict(extra="forbid")

    check: CheckName
    column: str | None = None
    severity: Literal["error", "warning"] = "error"
    value: float | None = Field(default=None, description="the measured value")
    threshold: float | None = Field(default=None, description="the limit it broke")
    message: str


class QualityReport(BaseModel):
    """The quality verdict of one window. ``passed`` is False when any error was found."""

    model_config = ConfigDict(extra="forbid")

    n_rows: int
    passed: bool
    issues: list[QualityIssue]
    failed_columns: list[str] = Field(
        description="columns with an error; pass them as compute_drift(exclude=...)"
    )
    missing_columns: list[str] = Field(default_factory=list)
    extra_columns: list[str] = Field(default_factory=list)

    @property
    def errors(self) -> list[QualityIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def reasons(self) -> list[str]:
        return [i.message for i in self.errors]

    @property
    def failed_checks(self) -> list[str]:
        """The failed checks as ``check:column`` (or ``check``), for an event payload."""
        return sorted({f"{i.check}:{i.column}" if i.column else i.check for i in self.errors})


def _null_rate(series: pl.Series) -> float:
    if series.len() == 0:
        return 0.0
    if series.dtype.is_float():
        invalid = (~series.is_finite().fill_null(False)).sum()
        return int(invalid) / series.len()
    return series.null_count() / series.len()


def _null_rate_issues(
    column: str, s: pl.Series, ref_null_rate: float, t: QualityThresholds
) -> list[QualityIssue]:
    """A ``null_rate`` issue when the column's null rate rose beyond the threshold."""
    rate = _null_rate(s)
    if rate - ref_null_rate <= t.null_rate_increase:
        return []
    return [
        QualityIssue(
            check="null_rate",
            column=column,
            value=rate,
            threshold=ref_null_rate + t.null_rate_increase,
            message=f"{column}: null rate {rate:.1%} vs {ref_null_rate:.1%} in reference",
        )
    ]


def _check_numeric(
    column: str,
    s: pl.Series,
    ref: NumericProfile,
    t: QualityThresholds,
    bounds: tuple[float | None, float | None] | None,
) -> list[QualityIssue]:
    issues = _null_rate_issues(column, s, ref.null_rate, t)
    if s.dtype == pl.Null:
        return issues
    f = s.cast(pl.Float64, strict=False)
    values = f.filter(f.is_finite()).to_numpy()
    if values.size < t.min_values:
        return issues

    lo, hi = np.quantile(values, [0.05, 0.95])
    ref_spread = ref.quantile(0.95) - ref.quantile(0.05)
    spread = float(hi - lo)
    if ref_spread > 0:
        ratio = spread / ref_spread
        if ratio >= t.unit_change_factor or ratio <= 1 / t.unit_change_factor:
            issues.append(
                QualityIssue(
                    check="unit_change",
                    column=column,
                    value=ratio,
                    threshold=t.unit_change_factor,
                    message=(
                        f"{column}: spread (p95-p5) changed x{ratio:.3g} "
                        f"(median {float(np.median(values)):.4g} vs {ref.quantile(0.5):.4g}); "
                        "a unit or scale change?"
                    ),
                )
            )
    if ref.min >= 0:
        neg = float(np.mean(values < 0))
        if neg > t.invalid_share:
            issues.append(
                QualityIssue(
                    check="negative",
                    column=column,
                    value=neg,
                    threshold=t.invalid_share,
                    message=f"{column}: {neg:.2%} negative values, never negative in reference",
                )
            )
    if bounds is not None:
        low = -np.inf if bounds[0] is None else bounds[0]
        high = np.inf if bounds[1] is None else bounds[1]
        invalid = float(np.mean((values < low) | (values > high)))
        if invalid > t.invalid_share:
            issues.append(
                QualityIssue(
                    check="out_of_bounds",
                    column=column,
                    value=invalid,
                    threshold=t.invalid_share,
                    message=f"{column}: {invalid:.2%} of values outside [{low}, {high}]",
                )
            )
    margin = t.range_margin * (ref.max - ref.min)
    outside = float(np.mean((values < ref.min - margin) | (values > ref.max + margin)))
    if outside > t.out_of_range_share:
        issues.append(
            QualityIssue(
                check="out_of_range",
                column=column,
                severity="warning",
                value=outside,
                threshold=t.out_of_range_share,
                message=(
                    f"{column}: {outside:.2%} of values outside reference range "
                    f"[{ref.min:.4g}, {ref.max:.4g}] (+/- {t.range_margin:.0%})"
                ),
            )
        )
    return issues


def _check_categorical(
    column: str, s: pl.Series, ref: CategoricalProfile, t: QualityThresholds
) -> list[QualityIssue]:
    issues = _null_rate_issues(column, s, ref.null_rate, t)
    values = s.drop_nulls().cast(pl.String)
    if values.len() >= t.min_values:
        unknown = int((~values.is_in(list(ref.counts))).sum()) / values.len()
        if unknown > t.unknown_share:
            issues.append(
                QualityIssue(
                    check="unknown_values",
                    column=column,
                    value=unknown,
                    threshold=t.unknown_share,
                    message=f"{column}: {unknown:.1%} of values never seen in reference",
                )
            )
    return issues


def check_quality(
    current: pl.DataFrame,
    profile: ReferenceProfile,
    expected_schema: Mapping[str, pl.DataType] | None = None,
    thresholds: QualityThresholds | None = None,
    *,
    score: str = "score",
    optional_columns: Sequence[str] = ("label",),
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> QualityReport:
    """Run the schema and quality checks of the module docstring on ``current``.

    ``expected_schema`` defaults to :data:`driftloop.schema.PREDICTION_SCHEMA`;
    the profile's columns (and ``score``, when profiled) are always required;
    ``optional_columns`` (the joined ``label``) are neither required nor "extra".
    ``bounds`` maps a column to its (low, high) domain, ``None`` for open;
    it defaults to :data:`DEFAULT_BOUNDS`.
    """
    t = thresholds or QualityThresholds()
    domain = DEFAULT_BOUNDS if bounds is None else bounds
    schema = dict(PREDICTION_SCHEMA if expected_schema is None else expected_schema)
    issues: list[QualityIssue] = []
    if current.height == 0:
        issues.append(QualityIssue(check="empty", message="the window has no rows"))

    profiled: dict[str, NumericProfile | CategoricalProfile] = {
        **profile.numeric,
        **profile.categorical,
    }
    if profile.prediction is not None:
        profiled[score] = profile.prediction
    required = list(dict.fromkeys([*schema, *profiled]))
    missing = [c for c in required if c not in current.columns]
    for c in missing:
        issues.append(
            QualityIssue(check="missing_column", column=c, message=f"{c}: missing column")
        )
    extra = [
        c
        for c in current.columns
        if c not in schema and c not in profiled and c not in optional_columns
    ]
    for c in extra:
        issues.append(
            QualityIssue(
                check="extra_column", column=c, severity="warning", message=f"{c}: extra column"
            )
        )
    mistyped: set[str] = set()
    for c, dtype in schema.items():
        if c in current.columns and current.schema[c] not in (dtype, pl.Null()):
            mistyped.add(c)
            issues.append(
                QualityIssue(
                    check="dtype",
                    column=c,
                    message=f"{c}: type {current.schema[c]}, expected {dtype}",
                )
            )

    if current.height > 0:
        for c, ref in profiled.items():
            if c not in current.columns or c in mistyped:
                continue
            s = current[c]
            if isinstance(ref, NumericProfile):
                if not (s.dtype.is_numeric() or s.dtype == pl.Null):
                    issues.append(
                        QualityIssue(check="dtype", column=c, message=f"{c}: not numeric")
                    )
                    continue
                issues.extend(_check_numeric(c, s, ref, t, domain.get(c)))
            else:
                issues.extend(_check_categorical(c, s, ref, t))

    failed = sorted({i.column for i in issues if i.severity == "error" and i.column})
    return QualityReport(
        n_rows=current.height,
        passed=not any(i.severity == "error" for i in issues),
        issues=issues,
        failed_columns=failed,
        missing_columns=missing,
        extra_columns=extra,
    )
