"""Scoring a request: the library side of the model service (``bentos/service.py``).

The request and response models here are the HTTP contract shared by the model
service and the router. :class:`Scorer` reads online features, builds the
feature vector, scores, records metrics and appends the prediction records to
the durable log before the caller returns.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from driftloop import metrics
from driftloop.modeling import derive_row, predict
from driftloop.registry import LoadedModel
from driftloop.schema import CARD_FEATURES, CATEGORICAL_VOCAB, MERCHANT_FEATURES, NUMERIC_FEATURES

_ID = r"^[A-Za-z0-9_.:@/-]+$"
MAX_AMOUNT = 1_000_000.0


class TransactionRequest(BaseModel):
    """One transaction to score."""

    model_config = ConfigDict(
        extra="forbid",
        # BentoML's OpenAPI Schema takes `example` (singular)
        json_schema_extra={
            "example": {
                "transaction_id": "tx-0001",
                "card_id": 42,
                "merchant_id": 7,
                "amount": 129.99,
                "category": "retail",
                "channel": "online",
                "country": "US",
                "timestamp": "2026-01-10T12:00:00Z",
            }
        },
    )

    transaction_id: str = Field(min_length=1, max_length=128, pattern=_ID)
    card_id: int = Field(ge=0, le=2**62, strict=True, description="card entity id")
    merchant_id: int = Field(ge=0, le=2**62, strict=True, description="merchant entity id")
    amount: float = Field(
        gt=0, le=MAX_AMOUNT, allow_inf_nan=False, description="amount in currency units, > 0"
    )
    category: str | None = Field(None, min_length=1, max_length=64)
    channel: str | None = Field(None, min_length=1, max_length=32)
    country: str | None = Field(None, min_length=2, max_length=8)
    timestamp: datetime | None = Field(None, description="event time (default: when received)")
    request_id: str | None = Field(
        None, min_length=1, max_length=128, pattern=_ID, description="idempotency id (optional)"
    )

    @field_validator("amount", mode="before")
    @classmethod
    def _amount_is_number(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError("amount must be a JSON number")
        return v

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is None:
            return v
        v = v if v.tzinfo else v.replace(tzinfo=UTC)
        if not datetime(2000, 1, 1, tzinfo=UTC) <= v <= datetime(2100, 1, 1, tzinfo=UTC):
            raise ValueError("timestamp must be between 2000 and 2100")
        return v


class PredictionResponse(BaseModel):
    """The answer for one transaction."""

    request_id: str
    transaction_id: str
    score: float = Field(ge=0, le=1)
    decision: bool = Field(description="True when the score reaches the model's threshold (fraud)")
    threshold: float
    model: str
    model_version: str
    arm: str
    feature_age_seconds: float | None = Field(description="age of the card features used")
    unknown_entities: list[str] = Field(default_factory=list)
    unseen_categories: list[str] = Field(default_factory=list)


class FeatureReader(Protocol):
    """Reads online features for entity ids: values plus the feature rows' event time."""

    def read(
        self, card_ids: Sequence[int], merchant_ids: Sequence[int]
    ) -> tuple[list[dict[str, Any] | None], list[dict[str, Any] | None]]:
        """Per row: the card's and the merchant's feature dicts (None when unknown).

        Each dict carries the feature values and ``event_timestamp`` (epoch seconds).
        """
        ...


class PredictionSink(Protocol):
    def append(self, records: list[dict[str, Any]]) -> None: ...


class Scorer:
    """Scores requests for one model version on one arm."""

    def __init__(
        self,
        model: LoadedModel,
        reader: FeatureReader,
        sink: PredictionSink | None,
        *,
        model_name: str,
        arm: str = "champion",
    ) -> None:
        self.model = model
        self.reader = reader
        self.sink = sink
        self.model_name = model_name
        self.arm = arm
        self.version = model.version
        self._labels = (model_name, self.version)

    def score(
        self, requests: Sequence[TransactionRequest], *, endpoint: str = "predict"
    ) -> list[PredictionResponse]:
        started = time.perf_counter()
        received = datetime.now(UTC)
        cards, merchants = self.reader.read(
            [r.card_id for r in requests], [r.merchant_id for r in requests]
        )
        rows: list[dict[str, Any]] = []
        notes: list[tuple[float | None, list[str], list[str]]] = []
        name, version = self._labels
        enc = self.model.encoder
        for req, card, merchant in zip(requests, cards, merchants, strict=True):
            ts = req.timestamp or received
            row: dict[str, Any] = {
                "amount": req.amount,
                "category": req.category,
                "channel": req.channel,
                "country": req.country,
            }
            unknown: list[str] = []
            card = card or {}
            merchant = merchant or {}
            if not card:
                unknown.append("card")
            if not merchant:
                unknown.append("merchant")
            for f in CARD_FEATURES:
                row[f] = card.get(f)
            for f in MERCHANT_FEATURES:
                row[f] = merchant.get(f)
            row.update(derive_row(req.amount, ts, card))
            unseen = [c for c in CATEGORICAL_VOCAB if enc.is_unseen(c, row[c])]
            age = card.get("event_timestamp")
            age_s = None if age is None else max(0.0, ts.timestamp() - float(age))
            rows.append(row)
            notes.append((age_s, unknown, unseen))
        scores = predict(self.model.booster, enc.encode_rows(rows))
        threshold = self.model.threshold
        elapsed_ms = (time.perf_counter() - started) * 1000
        responses: list[PredictionResponse] = []
        records: list[dict[str, Any]] = []
        date = received.strftime("%Y-%m-%d")
        for req, row, s, (age_s, unknown, unseen) in zip(
            requests, rows, scores, notes, strict=True
        ):
            score = float(s)
            decision = score >= threshold
            rid = req.request_id or uuid.uuid4().hex
            responses.append(
                PredictionResponse(
                    request_id=rid,
                    transaction_id=req.transaction_id,
                    score=score,
                    decision=decision,
                    threshold=threshold,
                    model=name,
                    model_version=version,
                    arm=self.arm,
                    feature_age_seconds=age_s,
                    unknown_entities=unknown,
                    unseen_categories=unseen,
                )
            )
            record = {
                "request_id": rid,
                "transaction_id": req.transaction_id,
                "received_at": received,
                "event_timestamp": req.timestamp or received,
                "model_name": name,
                "model_version": version,
                "arm": self.arm,
                "card_id": req.card_id,
                "merchant_id": req.merchant_id,
                "amount": req.amount,
                "category": req.category,
                "channel": req.channel,
                "country": req.country,
                "feature_age_seconds": age_s,
                "score": score,
                "decision": int(decision),
                "latency_ms": elapsed_ms,
                "date": date,
            }
            for f in NUMERIC_FEATURES:
                if f != "amount":
                    v = row.get(f)
                    record[f] = None if v is None or math.isnan(float(v)) else float(v)
            records.append(record)
            metrics.SCORE.labels(name, version).observe(score)
            metrics.PREDICTIONS.labels(name, version, "fraud" if decision else "legit").inc()
            if age_s is not None:
                metrics.FEATURE_AGE.labels(name, version).observe(age_s)
            for e in unknown:
                metrics.UNKNOWN_ENTITY.labels(name, version, e).inc()
            for c in unseen:
                metrics.UNSEEN_CATEGORY.labels(name, version, c).inc()
            for c in CATEGORICAL_VOCAB:
                if row[c] is None:
                    metrics.MISSING_VALUE.labels(name, version, c).inc()
        if self.sink is not None:
            self.sink.append(records)
        metrics.PREDICT_LATENCY.labels(name, version, endpoint).observe(
            time.perf_counter() - started
        )
        return responses


class FeedbackRequest(BaseModel):
    """A label for an earlier prediction, named by request id or transaction id."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "transaction_id": "tx-0001",
                "label": 1,
                "observed_at": "2026-01-11T09:00:00Z",
            }
        },
    )

    request_id: str | None = Field(None, min_length=1, max_length=128, pattern=_ID)
    transaction_id: str | None = Field(None, min_length=1, max_length=128, pattern=_ID)
    label: int = Field(ge=0, le=1, strict=True, description="1 = fraud, 0 = legitimate")
    observed_at: datetime | None = Field(None, description="when the outcome was known")

    @field_validator("observed_at")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        return v if v is None or v.tzinfo else v.replace(tzinfo=UTC)

    def model_post_init(self, _context: Any) -> None:
        if self.request_id is None and self.transaction_id is None:
            raise ValueError("request_id or transaction_id is required")


class FeedbackResponse(BaseModel):
    label_id: str
    accepted: bool = True


def label_record(fb: FeedbackRequest, received: datetime | None = None) -> dict[str, Any]:
    """The Delta `labels` record of one feedback request."""
    now = received or datetime.now(UTC)
    return {
        "label_id": uuid.uuid4().hex,
        "request_id": fb.request_id,
        "transaction_id": fb.transaction_id,
        "label": fb.label,
        "observed_at": fb.observed_at or now,
        "received_at": now,
        "date": now.strftime("%Y-%m-%d"),
    }


def token_ok(header: str | None, expected: str | None) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header."""
    import hmac

    if not expected or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].encode(), expected.encode())


class FeastOnlineReader:
    """:class:`FeatureReader` over the Feast online store (one long-lived FeatureStore)."""

    def __init__(self, settings: Any) -> None:
        from driftloop import features

        self._features = features
        self._store = features.get_store(settings)

    def read(
        self, card_ids: Sequence[int], merchant_ids: Sequence[int]
    ) -> tuple[list[dict[str, Any] | None], list[dict[str, Any] | None]]:
        frame = self._features.online_features(self._store, card_ids, merchant_ids)
        cards: list[dict[str, Any] | None] = []
        merchants: list[dict[str, Any] | None] = []
        for row in frame.iter_rows(named=True):
            cards.append(_entity(row, CARD_FEATURES, "card_velocity__ts"))
            merchants.append(_entity(row, MERCHANT_FEATURES, "merchant_risk__ts"))
        return cards, merchants


def _entity(row: dict[str, Any], names: Sequence[str], ts_col: str) -> dict[str, Any] | None:
    ts = row.get(ts_col)
    if ts is None:
        return None
    out = {n: row.get(n) for n in names}
    out["event_timestamp"] = ts.timestamp()
    return out
