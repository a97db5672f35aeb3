"""The data contract of the running example: transactions, features, records.

Pure definitions, no I/O. A team bringing its own model replaces these lists
through configuration of the feature service; the library code reads them from
the model's metadata, not from here, once a model exists.
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

from driftloop.errors import SchemaError

CATEGORIES: tuple[str, ...] = (
    "grocery",
    "gas",
    "restaurant",
    "retail",
    "travel",
    "entertainment",
    "health",
    "jewelry",
    "digital_goods",
    "utilities",
)
#: a category first seen after training (the `new_category` scenario)
NEW_CATEGORY = "electronics"
CHANNELS: tuple[str, ...] = ("pos", "online", "atm")
COUNTRIES: tuple[str, ...] = ("US", "CA", "GB", "DE", "FR", "MX", "BR", "NG", "IN", "CN")
HOME_COUNTRY = "US"
#: fallback bucket for values never seen in training
OTHER = "__other__"

#: raw transaction columns produced by the simulator (plus the hidden label)
TRANSACTION_SCHEMA: dict[str, pl.DataType] = {
    "transaction_id": pl.String(),
    "card_id": pl.Int64(),
    "merchant_id": pl.Int64(),
    "amount": pl.Float64(),
    "category": pl.String(),
    "channel": pl.String(),
    "country": pl.String(),
    "event_timestamp": pl.Datetime("us", "UTC"),
    "is_fraud": pl.Int8(),
    "label_available_at": pl.Datetime("us", "UTC"),
}

#: card aggregates, the state after each transaction (Feast view `card_velocity`)
CARD_FEATURES: tuple[str, ...] = (
    "card_txn_count_1h",
    "card_txn_count_24h",
    "card_amount_mean_1h",
    "card_amount_mean_24h",
    "card_last_txn_ts",
)
#: merchant aggregates, computed daily from labels that had arrived (Feast view `merchant_risk`)
MERCHANT_FEATURES: tuple[str, ...] = (
    "merchant_txn_count_24h",
    "merchant_amount_mean_24h",
    "merchant_fraud_rate_30d",
)
#: categorical request fields and their vocabularies
CATEGORICAL_VOCAB: dict[str, tuple[str, ...]] = {
    "category": CATEGORIES,
    "channel": CHANNELS,
    "country": COUNTRIES,
}
#: the model's feature vector, in order
MODEL_FEATURES: tuple[str, ...] = (
    "amount",
    "hour_of_day",
    "category",
    "channel",
    "country",
    "card_txn_count_1h",
    "card_txn_count_24h",
    "card_amount_mean_1h",
    "card_amount_mean_24h",
    "secs_since_last_txn",
    "amount_to_card_mean",
    "merchant_txn_count_24h",
    "merchant_amount_mean_24h",
    "merchant_fraud_rate_30d",
)
NUMERIC_FEATURES: tuple[str, ...] = tuple(f for f in MODEL_FEATURES if f not in CATEGORICAL_VOCAB)


def validate_frame(
    frame: pl.DataFrame | pl.LazyFrame,
    schema: Mapping[str, pl.DataType],
    *,
    allow_extra: bool = True,
    name: str = "frame",
) -> None:
    """Raise :class:`SchemaError` when ``frame`` lacks, mistypes (or adds) columns."""
    actual = frame.collect_schema() if isinstance(frame, pl.LazyFrame) else frame.schema
    missing = [c for c in schema if c not in actual]
    if missing:
        raise SchemaError(f"{name}: missing columns {missing}")
    wrong = [
        f"{c} is {actual[c]}, expected {t}"
        for c, t in schema.items()
        if actual[c] != t and not (actual[c] == pl.Null())
    ]
    if wrong:
        raise SchemaError(f"{name}: mistyped columns: {'; '.join(wrong)}")
    if not allow_extra:
        extra = [c for c in actual if c not in schema]
        if extra:
            raise SchemaError(f"{name}: unexpected columns {extra}")


#: one logged prediction (Delta table `predictions`, partitioned by `date`)
PREDICTION_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.String(),
    "transaction_id": pl.String(),
    "received_at": pl.Datetime("us", "UTC"),
    "event_timestamp": pl.Datetime("us", "UTC"),
    "model_name": pl.String(),
    "model_version": pl.String(),
    "arm": pl.String(),
    "card_id": pl.Int64(),
    "merchant_id": pl.Int64(),
    "amount": pl.Float64(),
    "category": pl.String(),
    "channel": pl.String(),
    "country": pl.String(),
    **{f: pl.Float64() for f in NUMERIC_FEATURES if f != "amount"},
    "feature_age_seconds": pl.Float64(),
    "score": pl.Float64(),
    "decision": pl.Int8(),
    "latency_ms": pl.Float64(),
    "date": pl.String(),
}

#: one label (Delta table `labels`, partitioned by `date`); joined on request_id or transaction_id
LABEL_SCHEMA: dict[str, pl.DataType] = {
    "label_id": pl.String(),
    "request_id": pl.String(),
    "transaction_id": pl.String(),
    "label": pl.Int8(),
    "observed_at": pl.Datetime("us", "UTC"),
    "received_at": pl.Datetime("us", "UTC"),
    "date": pl.String(),
}
