"""Labelled performance, the degradation rule and the ADWIN detector."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from driftloop.errors import SchemaError
from driftloop.performance import (
    AdaptiveWindow,
    PerformanceSummary,
    compute_performance,
    is_degraded,
    metric_drops,
)

# 8 labelled rows + 2 unlabelled; at threshold 0.5: TP 3 (0.9, 0.8, 0.6), FP 1 (0.7),
# FN 1 (0.3), TN 3. ROC AUC: positive/negative pairs ranked right = 4 + 4 + 3 + 2 = 13 of 16.
# Average precision: positives at ranks 1, 2, 4, 6 -> (1 + 1 + 3/4 + 4/6) / 4.
HAND = pl.DataFrame(
    {
        "score": [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1, 0.95, 0.05],
        "label": [1, 1, 0, 1, 0, 1, 0, 0, None, None],
    },
    schema={"score": pl.Float64, "label": pl.Int8},
)


def test_metrics_match_hand_computed_values() -> None:
    s = compute_performance(HAND, 0.5, min_labelled=8, min_positives=4)
    assert (s.n_rows, s.n_labelled, s.n_positives) == (10, 8, 4)
    assert s.enough_labels
    assert s.precision == pytest.approx(0.75)
    assert s.recall == pytest.approx(0.75)
    assert s.f1 == pytest.approx(0.75)
    assert s.roc_auc == pytest.approx(13 / 16)
    assert s.pr_auc == pytest.approx((1 + 1 + 3 / 4 + 4 / 6) / 4)
    assert s.positive_rate == pytest.approx(0.5)
    assert s.predicted_positive_rate == pytest.approx(0.5)
    assert s.metrics() == pytest.approx(
        {"precision": 0.75, "recall": 0.75, "f1": 0.75, "roc_auc": 13 / 16,
         "pr_auc": (1 + 1 + 3 / 4 + 4 / 6) / 4, "n_labelled": 8.0, "n_positives": 4.0}
    )  # fmt: skip


@pytest.mark.parametrize(
    ("threshold", "precision", "recall", "f1"),
    [
        (0.85, 1.0, 0.25, 0.4),  # only 0.9 predicted positive
        (0.25, 4 / 6, 1.0, 0.8),  # six predicted positive, all four positives among them
        (0.99, None, 0.0, None),  # nothing predicted positive: precision undefined
    ],
)
def test_metrics_at_other_thresholds(
    threshold: float, precision: float | None, recall: float, f1: float | None
) -> None:
    s = compute_performance(HAND, threshold, min_labelled=1, min_positives=1)
    assert s.precision == (None if precision is None else pytest.approx(precision))
    assert s.recall == pytest.approx(recall)
    assert s.f1 == (None if f1 is None else pytest.approx(f1))
    assert s.roc_auc == pytest.approx(13 / 16)  # threshold-free


def test_single_class_has_no_auc() -> None:
    frame = pl.DataFrame({"score": [0.2, 0.7, 0.9], "label": [0, 0, 0]})
    s = compute_performance(frame, 0.5, min_labelled=1, min_positives=0)
    assert s.roc_auc is None and s.pr_auc is None and s.recall is None
    assert s.precision == 0.0


def test_no_labels_at_all() -> None:
    frame = pl.DataFrame({"score": [0.2, 0.7]}).with_columns(
        pl.lit(None, dtype=pl.Int8).alias("label")
    )
    s = compute_performance(frame)
    assert s.n_labelled == 0 and not s.enough_labels and s.precision is None
    degraded, reason = is_degraded(s, {"recall": 0.8}, 0.1)
    assert not degraded and reason.startswith("not enough labels")


def test_missing_columns_raise() -> None:
    with pytest.raises(SchemaError):
        compute_performance(pl.DataFrame({"score": [0.1]}))


def _summary(**metrics: float) -> PerformanceSummary:
    return PerformanceSummary(
        threshold=0.5,
        n_rows=1000,
        n_labelled=1000,
        n_positives=100,
        enough_labels=True,
        min_labelled=200,
        min_positives=20,
        **metrics,
    )


BASELINE = {"recall": 0.80, "precision": 0.60, "roc_auc": 0.95, "pr_auc": 0.70}
AS_BASELINE = dict(BASELINE)

DEGRADATION = [
    # name, window metrics, degraded, metrics named in the reason
    ("as good as baseline", AS_BASELINE, False, []),
    ("9 % relative drop is tolerated", {**AS_BASELINE, "recall": 0.73}, False, []),
    ("recall -25 %", {**AS_BASELINE, "recall": 0.60}, True, ["recall"]),
    ("pr_auc and precision fall", {**AS_BASELINE, "precision": 0.40, "roc_auc": 0.94,
                                   "pr_auc": 0.50}, True, ["precision", "pr_auc"]),
    ("better than baseline", dict(recall=0.95, precision=0.90, roc_auc=0.99, pr_auc=0.90), False,
     []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("metrics", "degraded", "named"), [d[1:] for d in DEGRADATION], ids=[d[0] for d in DEGRADATION]
)
def test_degradation_rule(metrics: dict, degraded: bool, named: list[str]) -> None:
    result, reason = is_degraded(_summary(**metrics), BASELINE, 0.10)
    assert result is degraded, reason
    assert [d.metric for d in metric_drops(_summary(**metrics), BASELINE, 0.10)] == named
    for m in named:
        assert m in reason


def test_not_enough_labels_is_never_degraded() -> None:
    rng = np.random.default_rng(0)
    n = 150
    frame = pl.DataFrame({"score": rng.random(n), "label": (rng.random(n) < 0.5).astype(np.int8)})
    s = compute_performance(frame)  # 150 < 200 labelled rows
    assert not s.enough_labels
    degraded, reason = is_degraded(s, {k: 0.99 for k in BASELINE}, 0.01)
    assert not degraded and "not enough labels" in reason
    few_positives = frame.with_columns(pl.lit(0, dtype=pl.Int8).alias("label"))
    s2 = compute_performance(few_positives, min_labelled=100)
    assert not s2.enough_labels and not is_degraded(s2, BASELINE, 0.01)[0]


def test_baseline_without_comparable_metrics() -> None:
    degraded, reason = is_degraded(_summary(recall=0.1), {"accuracy": 0.9}, 0.1)
    assert not degraded and "no metric comparable" in reason


def test_adwin_catches_an_error_rate_rise_without_false_alarms() -> None:
    rng = np.random.default_rng(1)
    w = AdaptiveWindow(delta=0.002)
    assert w.update_many((rng.random(5_000) < 0.10).astype(float)) == []
    detections = w.update_many((rng.random(2_000) < 0.20).astype(float))
    assert detections and detections[0] < 1_000
    assert w.last_direction == 1
    assert 0.15 < w.mean < 0.25  # the window now holds mostly the new regime


def test_adwin_bounds_its_window() -> None:
    w = AdaptiveWindow(max_window=500, clock=10)
    w.update_many(np.zeros(3_000))
    assert w.width == 500 and w.n_detections == 0
    with pytest.raises(ValueError):
        AdaptiveWindow(delta=1.5)
