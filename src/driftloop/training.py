"""Training, evaluation and threshold choice for the fraud model.

The pure part (:func:`train_model`, :func:`evaluate`, :func:`choose_threshold`)
takes a frame that already holds every model feature; :func:`build_training_frame`
is the I/O part that gets point-in-time-correct features from Feast.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import xgboost as xgb
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import average_precision_score, roc_auc_score

from driftloop.errors import DataError
from driftloop.modeling import FeatureEncoder, derive_frame, predict
from driftloop.schema import CATEGORICAL_VOCAB, NUMERIC_FEATURES

Progress = Callable[[str, float], None]


class TrainConfig(BaseModel):
    """Hyper-parameters and splits. Flow and CLI parameters build this."""

    model_config = ConfigDict(extra="forbid")

    n_estimators: int = Field(400, ge=1, le=5000)
    max_depth: int = Field(6, ge=1, le=16)
    learning_rate: float = Field(0.08, gt=0, le=1)
    early_stopping_rounds: int = Field(30, ge=1)
    holdout_fraction: float = Field(0.2, gt=0, lt=0.5, description="most recent share, for test")
    validation_fraction: float = Field(0.15, gt=0, lt=0.5, description="share before the holdout")
    reference_rows: int = Field(20_000, ge=100, description="drift reference sample size")
    seed: int = Field(0, ge=0)
    nthread: int = Field(2, ge=1)
    warm_start_rounds: int = Field(
        100, ge=1, description="boosting rounds added when warm-starting from a parent booster"
    )


class Metrics(BaseModel):
    """Labelled performance at a decision threshold."""

    roc_auc: float
    pr_auc: float
    precision: float
    recall: float
    f1: float
    threshold: float
    n: int
    positives: int


class TrainResult(BaseModel):
    """Everything training produced, ready for the registry."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    booster: Any
    encoder: FeatureEncoder
    threshold: float
    metrics: Metrics
    validation: Metrics
    reference: Any  # pl.DataFrame: feature columns + score + label
    window_start: datetime
    window_end: datetime
    n_rows: int
    best_iteration: int
    seconds: float


def label_arrived(frame: pl.DataFrame, as_of: datetime) -> pl.DataFrame:
    """Rows whose label had arrived by ``as_of`` (training must respect label delay)."""
    return frame.filter(pl.col("label_available_at") <= as_of)


def split_by_time(
    frame: pl.DataFrame, holdout_fraction: float, validation_fraction: float
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Time-ordered train / validation / holdout split (no shuffling across time)."""
    f = frame.sort("event_timestamp")
    n = f.height
    n_test = int(n * holdout_fraction)
    n_val = int(n * validation_fraction)
    n_train = n - n_test - n_val
    if n_train <= 0 or n_val <= 0 or n_test <= 0:
        raise DataError(f"too few labelled rows to split: {n}")
    return f.slice(0, n_train), f.slice(n_train, n_val), f.slice(n_train + n_val, n_test)


def choose_threshold(y: np.ndarray, scores: np.ndarray) -> float:
    """The score cut-off maximising F1 on ``(y, scores)``."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    yy = y[order].astype(np.float64)
    tp = np.cumsum(yy)
    fp = np.cumsum(1 - yy)
    pos = yy.sum()
    if pos == 0:
        return 0.5
    precision = tp / (tp + fp)
    recall = tp / pos
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(s[best])


def evaluate(y: np.ndarray, scores: np.ndarray, threshold: float) -> Metrics:
    """ROC AUC, PR AUC and precision/recall/F1 at ``threshold``."""
    y = y.astype(np.int64)
    pred = scores >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    both = 0 < y.sum() < y.size
    return Metrics(
        roc_auc=float(roc_auc_score(y, scores)) if both else float("nan"),
        pr_auc=float(average_precision_score(y, scores)) if both else float("nan"),
        precision=precision,
        recall=recall,
        f1=f1,
        threshold=float(threshold),
        n=int(y.size),
        positives=int(y.sum()),
    )


def _dmatrix(encoder: FeatureEncoder, frame: pl.DataFrame, label: str = "is_fraud") -> xgb.DMatrix:
    return xgb.DMatrix(
        encoder.encode_frame(frame),
        label=frame[label].to_numpy(),
        feature_names=list(encoder.features),
        missing=np.nan,
    )


def train_model(
    frame: pl.DataFrame,
    config: TrainConfig | None = None,
    *,
    parent_booster: xgb.Booster | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train on a frame holding every model feature plus ``is_fraud`` and ``event_timestamp``.

    With ``parent_booster`` the model is warm-started: boosting continues from
    the parent's trees for ``warm_start_rounds`` more rounds (the incremental update).
    """
    cfg = config or TrainConfig()
    started = time.perf_counter()
    encoder = FeatureEncoder()
    missing = [
        c for c in (*encoder.features, "is_fraud", "event_timestamp") if c not in frame.columns
    ]
    if missing:
        raise DataError(f"training frame lacks columns {missing}")
    train, val, test = split_by_time(frame, cfg.holdout_fraction, cfg.validation_fraction)
    if train["is_fraud"].sum() == 0:
        raise DataError("no positive labels in the training window")
    pos = float(train["is_fraud"].sum())
    neg = float(train.height - pos)
    params = {
        "objective": "binary:logistic",
        "eval_metric": "aucpr",
        "max_depth": cfg.max_depth,
        "eta": cfg.learning_rate,
        "subsample": 0.9,
        "colsample_bytree": 0.9,
        "min_child_weight": 2.0,
        # class weighting, damped (sqrt) so probabilities stay usable for thresholds
        "scale_pos_weight": float(np.sqrt(neg / pos)),
        "tree_method": "hist",
        "nthread": cfg.nthread,
        "seed": cfg.seed,
    }
    dtrain = _dmatrix(encoder, train)
    dval = _dmatrix(encoder, val)
    rounds = cfg.warm_start_rounds if parent_booster is not None else cfg.n_estimators
    total = rounds

    class _Progress(xgb.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
            if progress is not None:
                progress("training", min(1.0, (epoch + 1) / total))
            return False

    booster = xgb.train(
        params,
        dtrain,
        num_boost_round=rounds,
        evals=[(dval, "validation")],
        early_stopping_rounds=cfg.early_stopping_rounds,
        verbose_eval=False,
        xgb_model=parent_booster,
        callbacks=[_Progress()],
    )
    best = int(getattr(booster, "best_iteration", booster.num_boosted_rounds() - 1))
    booster = booster[: best + 1]
    val_scores = predict(booster, encoder.encode_frame(val))
    threshold = choose_threshold(val["is_fraud"].to_numpy(), val_scores)
    test_scores = predict(booster, encoder.encode_frame(test))
    metrics = evaluate(test["is_fraud"].to_numpy(), test_scores, threshold)
    validation = evaluate(val["is_fraud"].to_numpy(), val_scores, threshold)
    reference = reference_sample(test.with_columns(pl.Series("score", test_scores)), cfg)
    return TrainResult(
        booster=booster,
        encoder=encoder,
        threshold=threshold,
        metrics=metrics,
        validation=validation,
        reference=reference,
        window_start=frame["event_timestamp"].min(),
        window_end=frame["event_timestamp"].max(),
        n_rows=frame.height,
        best_iteration=best,
        seconds=time.perf_counter() - started,
    )


def reference_sample(scored: pl.DataFrame, cfg: TrainConfig) -> pl.DataFrame:
    """The drift reference: the most recent labelled rows with their features and scores."""
    cols = [*NUMERIC_FEATURES, *CATEGORICAL_VOCAB, "score"]
    ref = scored.sort("event_timestamp").tail(cfg.reference_rows)
    return ref.select(
        "event_timestamp",
        *[pl.col(c) for c in cols if c in ref.columns],
        pl.col("is_fraud").cast(pl.Int8).alias("label"),
    )


def build_training_frame(
    settings: Any,
    transactions: pl.DataFrame,
    *,
    as_of: datetime | None = None,
) -> pl.DataFrame:
    """Labelled transactions (labels arrived by ``as_of``) joined point-in-time with features."""
    from driftloop import features

    labelled = label_arrived(transactions, as_of) if as_of is not None else transactions
    if labelled.is_empty():
        raise DataError("no labelled transactions in the training window")
    joined = features.historical_features(settings, labelled)
    return derive_frame(joined)


def join_features_in_memory(
    transactions: pl.DataFrame,
    card: pl.DataFrame,
    merchant: pl.DataFrame,
    *,
    offset: timedelta = timedelta(milliseconds=1),
    card_ttl: timedelta = timedelta(days=2),
    merchant_ttl: timedelta = timedelta(days=2),
) -> pl.DataFrame:
    """The in-memory equivalent of Feast's point-in-time join (same rule, same TTLs).

    Each transaction sees the latest card row at or before ``event_timestamp - offset``
    (so never its own update) and the latest merchant row at or before that time,
    within the views' TTLs. Used by tests and benchmarks; training goes through Feast
    (:func:`build_training_frame`), and an integration test checks both agree.
    """
    q = transactions.with_columns((pl.col("event_timestamp") - offset).alias("_as_of")).sort(
        "_as_of"
    )
    c = card.rename({"event_timestamp": "_card_ts"}).sort("_card_ts")
    m = merchant.rename({"event_timestamp": "_merchant_ts"}).sort("_merchant_ts")
    out = q.join_asof(
        c,
        left_on="_as_of",
        right_on="_card_ts",
        by="card_id",
        strategy="backward",
        tolerance=card_ttl,
        check_sortedness=False,
    ).join_asof(
        m,
        left_on="_as_of",
        right_on="_merchant_ts",
        by="merchant_id",
        strategy="backward",
        tolerance=merchant_ttl,
        check_sortedness=False,
    )
    return derive_frame(out.drop("_as_of", "_card_ts", "_merchant_ts").sort("event_timestamp"))
