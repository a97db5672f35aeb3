"""The model's feature vector and scoring, shared by training, serving and the gate.

Pure code (numpy, polars, xgboost); nothing here touches a store. Unseen
categories map to a fallback bucket and missing values stay NaN, which XGBoost
routes natively, so no input can raise at scoring time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict

from driftloop.schema import CATEGORICAL_VOCAB, MODEL_FEATURES, OTHER

if TYPE_CHECKING:  # xgboost (and the scikit-learn it imports) loads where a model does
    import xgboost as xgb

#: code of the fallback bucket for a category never seen in training
OTHER_CODE = -1.0


class FeatureEncoder(BaseModel):
    """Turns raw fields plus Feast features into the model's float matrix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: tuple[str, ...] = MODEL_FEATURES
    vocab: dict[str, tuple[str, ...]] = {k: v for k, v in CATEGORICAL_VOCAB.items()}

    def _codes(self) -> dict[str, dict[str, float]]:
        cache = self.__dict__.get("_code_cache")
        if cache is None:
            cache = {
                col: {v: float(i) for i, v in enumerate(vals)} for col, vals in self.vocab.items()
            }
            self.__dict__["_code_cache"] = cache
        return cache

    def code(self, column: str, value: str | None) -> float:
        """Integer code of a categorical value; NaN when missing, the fallback when unseen."""
        if value is None:
            return math.nan
        return self._codes()[column].get(value, OTHER_CODE)

    def is_unseen(self, column: str, value: str | None) -> bool:
        return value is not None and value not in self._codes()[column]

    def encode_frame(self, frame: pl.DataFrame) -> np.ndarray:
        """Encode a frame holding every feature column (categoricals as strings)."""
        cols = []
        for name in self.features:
            if name in self.vocab:
                mapping = self._codes()[name]
                col = (
                    frame[name]
                    .cast(pl.String)
                    .replace_strict(mapping, default=OTHER_CODE, return_dtype=pl.Float64)
                )
                col = pl.select(
                    pl.when(frame[name].is_null()).then(None).otherwise(col)
                ).to_series()
                cols.append(col.fill_null(math.nan).to_numpy())
            else:
                cols.append(frame[name].cast(pl.Float64).fill_null(math.nan).to_numpy())
        return np.column_stack(cols).astype(np.float32)

    def encode_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Encode dict rows (the serving fast path: no frame construction)."""
        out = np.empty((len(rows), len(self.features)), dtype=np.float32)
        codes = self._codes()
        for i, row in enumerate(rows):
            for j, name in enumerate(self.features):
                v = row.get(name)
                if name in codes:
                    out[i, j] = math.nan if v is None else codes[name].get(v, OTHER_CODE)
                else:
                    out[i, j] = math.nan if v is None else float(v)
        return out


def derive_row(
    amount: float,
    event_timestamp: datetime,
    card: Mapping[str, Any],
) -> dict[str, float | None]:
    """Request-time features for one row from the raw fields and the card's aggregates
    (the hour of day in UTC, as :func:`derive_frame`; a naive time is UTC)."""
    last = card.get("card_last_txn_ts")
    mean24 = card.get("card_amount_mean_24h")
    if event_timestamp.tzinfo is None:
        event_timestamp = event_timestamp.replace(tzinfo=UTC)
    ts = event_timestamp.timestamp()
    return {
        "hour_of_day": float(event_timestamp.astimezone(UTC).hour),
        "secs_since_last_txn": None if last is None else max(0.0, ts - float(last)),
        "amount_to_card_mean": None if not mean24 else amount / float(mean24),
    }


def derive_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """The same request-time features as :func:`derive_row`, for a whole frame."""
    ts = pl.col("event_timestamp")
    return frame.with_columns(
        ts.dt.hour().cast(pl.Float64).alias("hour_of_day"),
        (ts.dt.epoch("us").cast(pl.Float64) / 1e6 - pl.col("card_last_txn_ts"))
        .clip(lower_bound=0.0)
        .alias("secs_since_last_txn"),
        pl.when(pl.col("card_amount_mean_24h") > 0)
        .then(pl.col("amount") / pl.col("card_amount_mean_24h"))
        .otherwise(None)
        .alias("amount_to_card_mean"),
    )


def make_booster_single_threaded(booster: xgb.Booster) -> xgb.Booster:
    """Single-row scoring is fastest, with the smallest tails, on one thread."""
    booster.set_param({"nthread": 1})
    return booster


def predict(booster: xgb.Booster, X: np.ndarray) -> np.ndarray:
    """Fraud probability for each row of ``X``."""
    return np.asarray(booster.inplace_predict(X), dtype=np.float64)


def unseen_category_examples() -> dict[str, str]:
    """A value per categorical column that no model has seen (for tests and docs)."""
    return {col: f"{OTHER}-never-seen" for col in CATEGORICAL_VOCAB}
