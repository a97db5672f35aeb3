"""Labelled performance of a window, the degradation rule, and an ADWIN error detector.

Pure functions; no I/O. Input drift tests cannot see pure concept drift (the
label function changes while the inputs do not); only the labelled error
stream shows it, hence this module.

Degradation rule (:func:`is_degraded`): with at least ``min_labelled``
labelled rows and ``min_positives`` positive labels in the window, performance
is degraded when any compared metric (``recall``, ``precision``, ``roc_auc``,
``pr_auc`` by default) fell below the champion's holdout value by more than
``drop_threshold``, relative to that value (0.10 = a 10 % relative drop:
a recall of 0.80 degrades below 0.72). With fewer labels the answer is always
"not enough labels", never degraded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import average_precision_score, roc_auc_score

from driftloop.errors import SchemaError

#: fewest labelled rows / positive labels for a performance verdict
MIN_LABELLED = 200
MIN_POSITIVES = 20
#: metrics compared with the baseline by default
DEFAULT_METRICS: tuple[str, ...] = ("recall", "precision", "roc_auc", "pr_auc")


class PerformanceSummary(BaseModel):
    """Metrics of the labelled rows of one window. ``None`` where a metric is undefined."""

    model_config = ConfigDict(extra="forbid")

    threshold: float
    n_rows: int = Field(description="rows in the window, labelled or not")
    n_labelled: int
    n_positives: int
    enough_labels: bool
    min_labelled: int
    min_positives: int
    precision: float | None = Field(
        default=None, description="at threshold; None with no predicted 1"
    )
    recall: float | None = Field(
        default=None, description="at threshold; None with no positive label"
    )
    f1: float | None = None
    roc_auc: float | None = Field(default=None, description="None unless both classes are present")
    pr_auc: float | None = Field(default=None, description="average precision")
    positive_rate: float | None = None
    predicted_positive_rate: float | None = None

    def metrics(self) -> dict[str, float]:
        """The defined metrics and counts as plain floats (an event's ``performance``)."""
        names = ("precision", "recall", "f1", "roc_auc", "pr_auc", "n_labelled", "n_positives")
        values = {n: getattr(self, n) for n in names}
        return {n: float(v) for n, v in values.items() if v is not None}

    def metric(self, name: str) -> float | None:
        value = getattr(self, name, None)
        return value if isinstance(value, float) else None


class MetricDrop(BaseModel):
    """One metric that fell below its baseline by more than the allowed drop."""

    model_config = ConfigDict(extra="forbid")

    metric: str
    value: float
    baseline: float
    drop: float = Field(description="relative drop, (baseline - value) / baseline")


def compute_performance(
    frame: pl.DataFrame,
    threshold: float = 0.5,
    *,
    score: str = "score",
    label: str = "label",
    min_labelled: int = MIN_LABELLED,
    min_positives: int = MIN_POSITIVES,
) -> PerformanceSummary:
    """Precision, recall, F1 (score >= threshold), ROC AUC and PR AUC on labelled rows.

    Rows whose label or score is null (or non-finite) are left out.
    """
    missing = [c for c in (score, label) if c not in frame.columns]
    if missing:
        raise SchemaError(f"performance: missing columns {missing}")
    s = frame[score].cast(pl.Float64, strict=False)
    y_series = frame[label].cast(pl.Float64, strict=False)
    mask = (s.is_finite() & y_series.is_not_null()).fill_null(False)
    scores = s.filter(mask).to_numpy()
    y = y_series.filter(mask).to_numpy() > 0.5
    n = int(y.size)
    n_pos = int(y.sum())
    base: dict[str, Any] = {
        "threshold": threshold,
        "n_rows": frame.height,
        "n_labelled": n,
        "n_positives": n_pos,
        "enough_labels": n >= min_labelled and n_pos >= min_positives,
        "min_labelled": min_labelled,
        "min_positives": min_positives,
    }
    if n == 0:
        return PerformanceSummary(**base)
    pred = scores >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = None
    if precision is not None and recall is not None:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    both = 0 < n_pos < n
    return PerformanceSummary(
        **base,
        precision=precision,
        recall=recall,
        f1=f1,
        roc_auc=float(roc_auc_score(y, scores)) if both else None,
        pr_auc=float(average_precision_score(y, scores)) if both else None,
        positive_rate=n_pos / n,
        predicted_positive_rate=float(pred.mean()),
    )


def metric_drops(
    summary: PerformanceSummary,
    baseline: Mapping[str, float],
    drop_threshold: float,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> list[MetricDrop]:
    """Metrics that fell more than ``drop_threshold`` (relative) below ``baseline``."""
    drops = []
    for name in metrics:
        base = baseline.get(name)
        value = summary.metric(name)
        if base is None or value is None or not math.isfinite(base) or base <= 0:
            continue
        drop = (base - value) / base
        if drop > drop_threshold:
            drops.append(MetricDrop(metric=name, value=value, baseline=float(base), drop=drop))
    return drops


def is_degraded(
    summary: PerformanceSummary,
    baseline: Mapping[str, float],
    drop_threshold: float,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> tuple[bool, str]:
    """Apply the degradation rule (module docstring); returns ``(degraded, reason)``."""
    if not summary.enough_labels:
        return False, (
            f"not enough labels: {summary.n_labelled} labelled, {summary.n_positives} positive "
            f"(need {summary.min_labelled} and {summary.min_positives})"
        )
    compared = [m for m in metrics if baseline.get(m) is not None and summary.metric(m) is not None]
    if not compared:
        return False, "no metric comparable with the baseline"
    drops = metric_drops(summary, baseline, drop_threshold, metrics)
    if drops:
        return True, "; ".join(
            f"{d.metric} {d.value:.3f} < baseline {d.baseline:.3f} "
            f"(-{d.drop:.1%}, allowed -{drop_threshold:.0%})"
            for d in drops
        )
    return False, f"within {drop_threshold:.0%} of baseline on {', '.join(compared)}"


class AdaptiveWindow:
    """ADWIN-style change detector for a stream of values in [0, 1] (e.g. 0/1 errors).

    Keeps the most recent values (at most ``max_window``). Every ``clock``
    updates it tries every split of the window into an older and a newer part;
    when their means differ by more than the ADWIN bound (variance-aware form,
    confidence ``delta``) it drops the older part and reports a change. The
    check is vectorised over all split points with cumulative sums.

    >>> w = AdaptiveWindow()
    >>> changed = w.update_many([0] * 2000 + [1] * 200)
    """

    def __init__(
        self,
        delta: float = 0.002,
        *,
        max_window: int = 10_000,
        clock: int = 32,
        min_side: int = 16,
    ) -> None:
        if not 0 < delta < 1:
            raise ValueError("delta must be in (0, 1)")
        if max_window < 2 * min_side or clock < 1 or min_side < 1:
            raise ValueError("need clock >= 1, min_side >= 1 and max_window >= 2 * min_side")
        self.delta = delta
        self.max_window = max_window
        self.clock = clock
        self.min_side = min_side
        self._buf = np.empty(2 * max_window, dtype=float)
        self._start = 0
        self._end = 0
        self._seen = 0
        self.n_detections = 0
        #: +1 when the newer part has the higher mean (errors went up), -1 when lower
        self.last_direction = 0

    @property
    def width(self) -> int:
        return self._end - self._start

    @property
    def window(self) -> np.ndarray:
        return self._buf[self._start : self._end]

    @property
    def mean(self) -> float:
        return float(self.window.mean()) if self.width else 0.0

    def update(self, value: float) -> bool:
        """Add one value; True when a change was detected (the window then shrinks)."""
        if self._end == self._buf.size:  # compact the buffer
            w = self.window.copy()
            self._buf[: w.size] = w
            self._start, self._end = 0, w.size
        self._buf[self._end] = value
        self._end += 1
        if self.width > self.max_window:
            self._start += 1
        self._seen += 1
        if self._seen % self.clock:
            return False
        return self._check()

    def update_many(self, values: Iterable[float]) -> list[int]:
        """Add values in order; the positions (0-based, in ``values``) where a change fired."""
        return [i for i, v in enumerate(values) if self.update(float(v))]

    def _check(self) -> bool:
        w = self.window
        n = w.size
        if n < 2 * self.min_side:
            return False
        cut = np.arange(self.min_side, n - self.min_side + 1)
        csum = np.cumsum(w)
        n0 = cut.astype(float)
        n1 = n - n0
        mean0 = csum[cut - 1] / n0
        mean1 = (csum[-1] - csum[cut - 1]) / n1
        var = float(w.var())
        m = 1.0 / (1.0 / n0 + 1.0 / n1)
        log_term = math.log(2.0 * math.log(n) / self.delta) if n > 1 else 0.0
        eps = np.sqrt(2.0 / m * var * log_term) + 2.0 / (3.0 * m) * log_term
        hit = np.abs(mean0 - mean1) > eps
        if not hit.any():
            return False
        i = int(np.flatnonzero(hit)[-1])  # drop as much of the old window as the evidence allows
        self.last_direction = 1 if mean1[i] > mean0[i] else -1
        self._start += int(cut[i])
        self.n_detections += 1
        return True
