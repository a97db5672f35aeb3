"""Scoring a request: the library side of the model service (``bentos/service.py``).

The request and response models here are the HTTP contract shared by the model
service and the router: one transaction (:class:`TransactionRequest` ->
:class:`PredictionResponse`) or a batch given column-wise (:class:`TransactionColumns`
-> :class:`PredictionColumns`). :class:`Scorer` reads online features for the whole
batch at once, builds the feature matrix with numpy, scores it with one
``inplace_predict``, records metrics and appends all prediction records to the durable
log in one write before the caller returns. The row path is a thin wrapper over the
columnar one, so both score, log and count exactly alike.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Protocol, Self, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import TzInfo

from driftloop import metrics
from driftloop.errors import DataError
from driftloop.modeling import OTHER_CODE, predict
from driftloop.registry import LoadedModel
from driftloop.schema import CARD_FEATURES, CATEGORICAL_VOCAB, MERCHANT_FEATURES, NUMERIC_FEATURES

_ID = r"^[A-Za-z0-9_.:@/-]+$"
_TZINFO_OF = operator.attrgetter("tzinfo")
MAX_AMOUNT = 1_000_000.0
#: hard upper bound of a columnar batch (the service applies ``max_batch_rows`` below it)
MAX_COLUMN_ROWS = 100_000
_MIN_TIMESTAMP = datetime(2000, 1, 1, tzinfo=UTC)
_MAX_TIMESTAMP = datetime(2100, 1, 1, tzinfo=UTC)

# one definition of each field's rules, shared by the row and the columnar contract
TransactionId = Annotated[str, Field(min_length=1, max_length=128, pattern=_ID)]
EntityId = Annotated[int, Field(ge=0, le=2**62, strict=True)]
Amount = Annotated[float, Field(gt=0, le=MAX_AMOUNT, allow_inf_nan=False, strict=True)]
Category = Annotated[str, Field(min_length=1, max_length=64)]
Channel = Annotated[str, Field(min_length=1, max_length=32)]
Country = Annotated[str, Field(min_length=2, max_length=8)]
RequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=_ID)]


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

    transaction_id: TransactionId
    card_id: EntityId = Field(description="card entity id")
    merchant_id: EntityId = Field(description="merchant entity id")
    amount: float = Field(
        gt=0, le=MAX_AMOUNT, allow_inf_nan=False, description="amount in currency units, > 0"
    )
    category: Category | None = None
    channel: Channel | None = None
    country: Country | None = None
    timestamp: datetime | None = Field(None, description="event time (default: when received)")
    request_id: RequestId | None = Field(None, description="idempotency id (optional)")

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
        if not _MIN_TIMESTAMP <= v <= _MAX_TIMESTAMP:
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


class TransactionColumns(BaseModel):
    """A batch of transactions given column-wise: one array per field, all of one length.

    The fields and their rules are those of :class:`TransactionRequest`; the optional
    columns may be left out (all missing) or hold nulls. Strict: a wrong type, a null in a
    required column, an unknown column or columns of different lengths are rejected,
    with the column (and the row index) named.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "transaction_id": ["tx-0001", "tx-0002"],
                "card_id": [42, 43],
                "merchant_id": [7, 7],
                "amount": [129.99, 12.5],
                "category": ["retail", None],
                "channel": ["online", "pos"],
                "country": ["US", "US"],
                "timestamp": ["2026-01-10T12:00:00Z", "2026-01-10T12:00:03Z"],
            }
        },
    )

    transaction_id: list[TransactionId] = Field(min_length=1, max_length=MAX_COLUMN_ROWS)
    card_id: list[EntityId] = Field(max_length=MAX_COLUMN_ROWS, description="card entity ids")
    merchant_id: list[EntityId] = Field(
        max_length=MAX_COLUMN_ROWS, description="merchant entity ids"
    )
    amount: list[Amount] = Field(
        max_length=MAX_COLUMN_ROWS, description="amounts in currency units, > 0 (numbers)"
    )
    category: list[Category | None] | None = Field(None, max_length=MAX_COLUMN_ROWS)
    channel: list[Channel | None] | None = Field(None, max_length=MAX_COLUMN_ROWS)
    country: list[Country | None] | None = Field(None, max_length=MAX_COLUMN_ROWS)
    timestamp: list[datetime | None] | None = Field(
        None, max_length=MAX_COLUMN_ROWS, description="event times (default: when received)"
    )
    request_id: list[RequestId | None] | None = Field(
        None, max_length=MAX_COLUMN_ROWS, description="idempotency ids (optional)"
    )

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, values: list[datetime | None] | None) -> list[datetime | None] | None:
        """As :meth:`TransactionRequest._aware`, for a whole column.

        The common case (every value given, with a zone, within bounds) is checked with
        C-level passes (zone lookup, min, max); anything else goes value by value, which
        also names the first offending row.
        """
        if values is None:
            return None
        if values and None not in values:
            given = cast(list[datetime], values)
            if (
                None not in map(_TZINFO_OF, given)
                and _MIN_TIMESTAMP <= min(given)
                and max(given) <= _MAX_TIMESTAMP
            ):
                return values
        out: list[datetime | None] = []
        for i, v in enumerate(values):
            if v is not None:
                v = v if v.tzinfo else v.replace(tzinfo=UTC)
                if not _MIN_TIMESTAMP <= v <= _MAX_TIMESTAMP:
                    raise ValueError(f"timestamp[{i}]: must be between 2000 and 2100, got {v}")
            out.append(v)
        return out

    @model_validator(mode="after")
    def _equal_lengths(self) -> Self:
        rows = len(self.transaction_id)
        uneven = [
            f"{name} has {len(values)}"
            for name, values in self._columns().items()
            if values is not None and len(values) != rows
        ]
        if uneven:
            raise ValueError(
                f"columns must have equal lengths: transaction_id has {rows} rows, "
                + ", ".join(uneven)
            )
        return self

    def _columns(self) -> dict[str, Sequence[Any] | None]:
        return {name: getattr(self, name) for name in type(self).model_fields}

    @property
    def rows(self) -> int:
        return len(self.transaction_id)

    @classmethod
    def from_requests(cls, requests: Sequence[TransactionRequest]) -> TransactionColumns:
        """The columns of already validated requests (no second validation)."""

        def column(name: str) -> list[Any] | None:
            values = [getattr(r, name) for r in requests]
            return None if all(v is None for v in values) else values

        return cls.model_construct(
            transaction_id=[r.transaction_id for r in requests],
            card_id=[r.card_id for r in requests],
            merchant_id=[r.merchant_id for r in requests],
            amount=[r.amount for r in requests],
            category=column("category"),
            channel=column("channel"),
            country=column("country"),
            timestamp=column("timestamp"),
            request_id=column("request_id"),
        )


class PredictionColumns(BaseModel):
    """The answers for a columnar batch, column-wise and in the request's row order.

    The same information as one :class:`PredictionResponse` per row; the values that are
    the same for every row of a batch (threshold, model, version, arm) are given once.
    """

    rows: int
    request_id: list[str]
    transaction_id: list[str]
    score: list[float]
    decision: list[bool] = Field(description="True when the score reaches the threshold (fraud)")
    threshold: float
    model: str
    model_version: str
    arm: str
    feature_age_seconds: list[float | None] = Field(description="age of the card features used")
    unknown_entities: dict[str, list[bool]] = Field(
        description="per entity (card, merchant): True where the online store has no row for it"
    )
    unseen_categories: dict[str, list[bool]] = Field(
        description="per categorical column: True where its value is one the model never saw"
    )

    def responses(self) -> list[PredictionResponse]:
        """One :class:`PredictionResponse` per row (the row endpoints' answer)."""
        unknown = _names_per_row(self.unknown_entities, self.rows)
        unseen = _names_per_row(self.unseen_categories, self.rows)
        return [
            PredictionResponse(
                request_id=rid,
                transaction_id=tid,
                score=score,
                decision=decision,
                threshold=self.threshold,
                model=self.model,
                model_version=self.model_version,
                arm=self.arm,
                feature_age_seconds=age,
                unknown_entities=unknown,
                unseen_categories=unseen,
            )
            for rid, tid, score, decision, age, unknown, unseen in zip(
                self.request_id,
                self.transaction_id,
                self.score,
                self.decision,
                self.feature_age_seconds,
                unknown,
                unseen,
                strict=True,
            )
        ]


@dataclass(frozen=True)
class OnlineColumns:
    """Online features of a batch, column-wise, in the batch's row order.

    ``values``: one float64 array per feature of :data:`CARD_FEATURES` and
    :data:`MERCHANT_FEATURES`, NaN where missing (unknown entity, null value or a feature
    the store does not serve). ``card_ts`` / ``merchant_ts``: the event time (epoch
    seconds) of the entity's row served, NaN when the store has no row for the entity.
    """

    values: Mapping[str, np.ndarray]
    card_ts: np.ndarray
    merchant_ts: np.ndarray

    @classmethod
    def missing(cls, rows: int) -> OnlineColumns:
        nan = np.full(rows, np.nan)
        return cls({f: nan for f in (*CARD_FEATURES, *MERCHANT_FEATURES)}, nan, nan)

    @classmethod
    def from_entities(
        cls,
        cards: Sequence[Mapping[str, Any] | None],
        merchants: Sequence[Mapping[str, Any] | None],
    ) -> OnlineColumns:
        """From :meth:`FeatureReader.read`'s per-row dicts."""
        # one (features + event time) x rows table per entity, its rows as the columns
        values: dict[str, np.ndarray] = {}
        stamps = []
        for names, entities in ((CARD_FEATURES, cards), (MERCHANT_FEATURES, merchants)):
            fields = (*names, "event_timestamp")
            table = _floats(
                [None if e is None else e.get(f) for f in fields for e in entities]
            ).reshape(len(fields), len(entities))
            values.update(zip(names, table, strict=False))
            stamps.append(table[-1])
        return cls(values, stamps[0], stamps[1])


def _floats(values: Sequence[Any]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


class FeatureReader(Protocol):
    """Reads online features for entity ids: values plus the feature rows' event time."""

    def read(
        self, card_ids: Sequence[int], merchant_ids: Sequence[int]
    ) -> tuple[list[dict[str, Any] | None], list[dict[str, Any] | None]]:
        """Per row: the card's and the merchant's feature dicts (None when unknown).

        Each dict carries the feature values and ``event_timestamp`` (epoch seconds).
        A reader may also offer ``columns(card_ids, merchant_ids) -> OnlineColumns`` (the
        same answer column-wise, for whole batches); :class:`Scorer` prefers it.
        """
        ...


class PredictionSink(Protocol):
    """Where prediction records go. A sink may also offer
    ``append_columns(columns, rows)`` (the same records column-wise, one write);
    :class:`Scorer` prefers it."""

    def append(self, records: list[dict[str, Any]]) -> None: ...


class MissingFeatures:
    """A :class:`FeatureReader` that knows no entity (the bare baseline and tests)."""

    def read(
        self, card_ids: Sequence[int], merchant_ids: Sequence[int]
    ) -> tuple[list[dict[str, Any] | None], list[dict[str, Any] | None]]:
        return [None] * len(card_ids), [None] * len(merchant_ids)

    def columns(self, card_ids: np.ndarray, merchant_ids: np.ndarray) -> OnlineColumns:
        return OnlineColumns.missing(len(card_ids))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MICROSECOND_OF = operator.attrgetter("microsecond")
_HOUR_OF = operator.attrgetter("hour")
_MINUTE_OF = operator.attrgetter("minute")
_SECOND_OF = operator.attrgetter("second")
_EPOCH_ORDINAL = _EPOCH.toordinal()
#: zone types whose offset does not depend on the date (pydantic's parsed offsets, and
#: datetime.timezone)
_FIXED_OFFSET_ZONES = (timezone, TzInfo)
_US_PER_HOUR = 3_600_000_000
#: batches smaller than this read features per row (``read``), cheaper for a few rows
_COLUMNAR_READ_MIN_ROWS = 16


class Scorer:
    """Scores batches (column-wise) and single requests for one model version on one arm.

    One batch: one online read per feature view for all its entities, one feature matrix,
    one ``inplace_predict``, one append of every record to the prediction log. With
    ``record_metrics=False`` no driftloop metric is touched (the bare baseline).
    """

    def __init__(
        self,
        model: LoadedModel,
        reader: FeatureReader,
        sink: PredictionSink | None,
        *,
        model_name: str,
        arm: str = "champion",
        record_metrics: bool = True,
    ) -> None:
        self.model = model
        self.reader = reader
        self.sink = sink
        self.model_name = model_name
        self.arm = arm
        self.version = model.version
        self.record_metrics = record_metrics
        self._labels = (model_name, self.version)
        # labelled metric children, made on first use (as ``.labels()`` would) and kept
        self._children: dict[tuple[Any, ...], Any] = {}
        # category -> code, exactly the encoder's mapping (FeatureEncoder.code); None -> NaN
        self._codes = {col: _code_table(vals) for col, vals in model.encoder.vocab.items()}

    # -- the row path ----------------------------------------------------------------
    def score(
        self, requests: Sequence[TransactionRequest], *, endpoint: str = "predict"
    ) -> list[PredictionResponse]:
        """Score requests one per row: a thin wrapper over :meth:`score_columns`."""
        if not requests:
            return []
        return self.score_columns(
            TransactionColumns.from_requests(requests), endpoint=endpoint
        ).responses()

    # -- the columnar path -----------------------------------------------------------
    def score_columns(
        self, batch: TransactionColumns, *, endpoint: str = "predict_columns"
    ) -> PredictionColumns:
        """Score a validated columnar batch; every row is logged before this returns."""
        started = time.perf_counter()
        received = datetime.now(UTC)
        n = batch.rows
        cards = np.asarray(batch.card_id, dtype=np.int64)
        merchants = np.asarray(batch.merchant_id, dtype=np.int64)
        amount = np.asarray(batch.amount, dtype=np.float64)
        ts_us = _epoch_micros(batch.timestamp, n, default=received)
        ts_s = ts_us / 1e6
        online = self._online(cards, merchants)
        card_ts, merchant_ts = online.card_ts, online.merchant_ts
        categorical = {c: _optional(getattr(batch, c), n) for c in CATEGORICAL_VOCAB}
        codes = {c: self._category_codes(c, values) for c, values in categorical.items()}
        with np.errstate(invalid="ignore", divide="ignore"):
            # the request-time features of modeling.derive_row / derive_frame (UTC hour)
            mean24 = online.values["card_amount_mean_24h"]
            numeric: dict[str, np.ndarray] = {
                "amount": amount,
                "hour_of_day": ((ts_us // _US_PER_HOUR) % 24).astype(np.float64),
                "secs_since_last_txn": np.maximum(0.0, ts_s - online.values["card_last_txn_ts"]),
                "amount_to_card_mean": np.where(mean24 != 0, amount / mean24, np.nan),
                **online.values,
            }
            age = np.maximum(0.0, ts_s - card_ts)
        X = self._matrix(numeric, codes, n)
        scores = predict(self.model.booster, X)
        threshold = self.model.threshold
        decisions = scores >= threshold
        elapsed_ms = (time.perf_counter() - started) * 1000

        unknown = {"card": np.isnan(card_ts), "merchant": np.isnan(merchant_ts)}
        unseen = {c: code == OTHER_CODE for c, code in codes.items()}
        missing = {c: np.isnan(code) for c, code in codes.items()}
        request_ids = _request_ids(batch.request_id, n)
        name, version = self._labels
        if self.sink is not None:
            columns: dict[str, Any] = {
                "request_id": request_ids,
                "transaction_id": batch.transaction_id,
                "received_at": received,
                "event_timestamp": ts_us.astype("datetime64[us]"),
                "model_name": name,
                "model_version": version,
                "arm": self.arm,
                "card_id": cards,
                "merchant_id": merchants,
                "amount": amount,
                **categorical,
                **{f: numeric[f] for f in NUMERIC_FEATURES if f != "amount"},
                "feature_age_seconds": age,
                "score": scores,
                "decision": decisions.astype(np.int8),
                "latency_ms": elapsed_ms,
                "date": received.date().isoformat(),  # strftime("%Y-%m-%d"), cheaper
            }
            append_columns = getattr(self.sink, "append_columns", None)
            if append_columns is not None:
                append_columns(columns, n)
            else:
                from driftloop.predlog import records_from_columns

                self.sink.append(records_from_columns(columns, n))
        if self.record_metrics:
            self._count(scores, decisions, age, unknown, unseen, missing)
            self._child(metrics.PREDICT_LATENCY, endpoint).observe(time.perf_counter() - started)
        return PredictionColumns.model_construct(
            rows=n,
            request_id=request_ids,
            transaction_id=list(batch.transaction_id),
            score=scores.tolist(),
            decision=decisions.tolist(),
            threshold=threshold,
            model=name,
            model_version=version,
            arm=self.arm,
            feature_age_seconds=[None if a != a else a for a in age.tolist()],
            unknown_entities={k: v.tolist() for k, v in unknown.items()},
            unseen_categories={k: v.tolist() for k, v in unseen.items()},
        )

    def _online(self, cards: np.ndarray, merchants: np.ndarray) -> OnlineColumns:
        columns = getattr(self.reader, "columns", None)
        if columns is not None and len(cards) >= _COLUMNAR_READ_MIN_ROWS:
            online: OnlineColumns = columns(cards, merchants)
            return online
        found_cards, found_merchants = self.reader.read(cards.tolist(), merchants.tolist())
        return OnlineColumns.from_entities(found_cards, found_merchants)

    def _category_codes(self, column: str, values: Sequence[str | None]) -> np.ndarray:
        """``FeatureEncoder.code`` of each value: NaN when missing, the fallback code
        (:data:`OTHER_CODE`, never a real code) when the model never saw the value."""
        codes = self._codes[column]
        return np.fromiter(
            map(codes.get, values, itertools.repeat(OTHER_CODE, len(values))),
            np.float64,
            len(values),
        )

    def _matrix(
        self, numeric: Mapping[str, np.ndarray], codes: Mapping[str, np.ndarray], n: int
    ) -> np.ndarray:
        """The model's float32 matrix, exactly as ``FeatureEncoder.encode_rows`` builds it:
        categories by code, numbers as given (NaN when missing), features the batch does
        not have as NaN."""
        features = self.model.encoder.features
        X = np.empty((n, len(features)), dtype=np.float32)
        for j, name in enumerate(features):
            X[:, j] = (
                codes.get(name, math.nan) if name in self._codes else numeric.get(name, math.nan)
            )
        return X

    def _count(
        self,
        scores: np.ndarray,
        decisions: np.ndarray,
        age: np.ndarray,
        unknown: Mapping[str, np.ndarray],
        unseen: Mapping[str, np.ndarray],
        missing: Mapping[str, np.ndarray],
    ) -> None:
        child = self._child
        _observe_many(child(metrics.SCORE), scores)
        fraud = int(np.count_nonzero(decisions))
        for decision, count in (("fraud", fraud), ("legit", len(decisions) - fraud)):
            if count:
                child(metrics.PREDICTIONS, decision).inc(count)
        _observe_many(child(metrics.FEATURE_AGE), age[~np.isnan(age)])
        for entity, mask in unknown.items():
            if count := int(np.count_nonzero(mask)):
                child(metrics.UNKNOWN_ENTITY, entity).inc(count)
        for column, mask in unseen.items():
            if count := int(np.count_nonzero(mask)):
                child(metrics.UNSEEN_CATEGORY, column).inc(count)
        for column, mask in missing.items():
            if count := int(np.count_nonzero(mask)):
                child(metrics.MISSING_VALUE, column).inc(count)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(model name, version, *labels)``, looked up once per labels."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*self._labels, *labels)
        return child


def _code_table(vocabulary: Sequence[str]) -> dict[str | None, float]:
    table: dict[str | None, float] = {v: float(i) for i, v in enumerate(vocabulary)}
    table[None] = math.nan
    return table


def _optional(values: Sequence[Any] | None, n: int) -> Sequence[Any]:
    return [None] * n if values is None else values


def _epoch_micros(
    values: Sequence[datetime | None] | None, n: int, *, default: datetime
) -> np.ndarray:
    """Microseconds since the epoch of aware datetimes (``default`` where missing), exact.

    When every value has the same fixed-offset zone (what JSON parsing gives: pydantic
    shares one zone object per offset), from the wall-clock fields minus the offset:
    C-level passes over the column, no zone call per row. Otherwise whole seconds come
    from ``datetime.timestamp`` (a float within a microsecond of the truth, so rounding
    it after taking the microseconds off is exact) and microseconds from the datetime.
    """
    if values is None:
        return np.full(n, (default - _EPOCH) // _MICROSECOND, dtype=np.int64)
    if None in values:
        values = [default if v is None else v for v in values]
    if n == 1 and (one := values[0]) is not None and one.utcoffset() is not None:
        # one aware value: the exact difference (what the passes below compute)
        return np.array([(one - _EPOCH) // _MICROSECOND], dtype=np.int64)
    micros = np.fromiter(map(_MICROSECOND_OF, values), np.int64, n)
    zones = set(map(_TZINFO_OF, values))
    zone = zones.pop() if len(zones) == 1 else None
    if type(zone) in _FIXED_OFFSET_ZONES:
        offset = zone.utcoffset(None)  # type: ignore[union-attr]
        assert offset is not None  # a fixed-offset zone always has one
        days = np.fromiter(map(datetime.toordinal, values), np.int64, n) - _EPOCH_ORDINAL  # type: ignore[arg-type]
        seconds = (
            days * 86_400
            + np.fromiter(map(_HOUR_OF, values), np.int64, n) * 3_600
            + np.fromiter(map(_MINUTE_OF, values), np.int64, n) * 60
            + np.fromiter(map(_SECOND_OF, values), np.int64, n)
        )
        return (seconds * 1_000_000 + micros) - offset // _MICROSECOND
    seconds_f = np.fromiter(map(datetime.timestamp, values), np.float64, n)  # type: ignore[arg-type]
    return np.round(seconds_f - micros / 1e6).astype(np.int64) * 1_000_000 + micros


def _request_ids(given: Sequence[str | None] | None, n: int) -> list[str]:
    """The request ids of a batch: the given ones, new random ids (uuid4 hex) elsewhere."""
    if given is not None and None not in given:
        return [v for v in given if v is not None]  # all of them (typed as str)
    fresh = _uuid4_hex(n if given is None else sum(v is None for v in given))
    if given is None:
        return fresh
    it = iter(fresh)
    return [next(it) if v is None else v for v in given]


def _uuid4_hex(n: int) -> list[str]:
    """``n`` random version-4 UUIDs as 32 hex digits (``uuid.uuid4().hex``), in one go."""
    if n == 1:  # the same bytes and bits without numpy
        one = bytearray(os.urandom(16))
        one[6] = (one[6] & 0x0F) | 0x40
        one[8] = (one[8] & 0x3F) | 0x80
        return [one.hex()]
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    digits = raw.tobytes().hex()
    return [digits[i : i + 32] for i in range(0, 32 * n, 32)]


def _names_per_row(flags: Mapping[str, Sequence[bool]], n: int) -> list[list[str]]:
    """Per row, the names whose flag is set (in the mapping's order)."""
    names = [name for name, hits in flags.items() if any(hits)]
    if not names:
        return [[] for _ in range(n)]
    return [
        [name for name, hit in zip(names, hits, strict=True) if hit]
        for hits in zip(*(flags[name] for name in names), strict=True)
    ]


def _observe_many(histogram: Any, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, in one pass (bucket counts by numpy).

    Same result as observing one by one; falls back to that when the prometheus-client
    child does not have the attributes this relies on.
    """
    if not len(values):
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values.tolist():
            histogram.observe(v)
        return
    if len(values) == 1:  # one value: no numpy passes (same bucket, same sum)
        value = float(values[0])
        total.inc(value)
        if value == value:  # NaN falls in no bucket, as with searchsorted
            buckets[bisect.bisect_left(bounds, value)].inc(1)
        return
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds) + 1)
    total.inc(float(values.sum()))
    for i, count in enumerate(counts[: len(bounds)].tolist()):
        if count:
            buckets[i].inc(count)


#: the media type of an Arrow IPC stream (the columnar batch body and answer)
ARROW_STREAM = "application/vnd.apache.arrow.stream"


def columns_from_arrow(body: bytes) -> TransactionColumns:
    """A columnar batch from an Arrow IPC stream or a Parquet file, validated like JSON.

    One column per :class:`TransactionRequest` field; integer columns for the ids,
    numeric for the amount, strings, and timestamps (or RFC 3339 strings) for the event
    time. Raises :class:`DataError` when the body is neither, ``ValidationError`` when a
    column breaks the contract.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if body[:4] == b"PAR1":
            table = pq.read_table(pa.BufferReader(body))
        else:
            with pa.ipc.open_stream(pa.BufferReader(body)) as reader:
                table = reader.read_all()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"body: not an Arrow IPC stream or a Parquet file ({exc})") from exc
    return TransactionColumns.model_validate(table.to_pydict())


def predictions_to_arrow(predictions: PredictionColumns) -> bytes:
    """The answer of a columnar batch as an Arrow IPC stream: one row per transaction;
    ``unknown_<entity>`` and ``unseen_<column>`` flags; the batch-wide values (threshold,
    model, model_version, arm) repeated on every row."""
    import pyarrow as pa

    n = predictions.rows
    columns: dict[str, Any] = {
        "request_id": pa.array(predictions.request_id, pa.string()),
        "transaction_id": pa.array(predictions.transaction_id, pa.string()),
        "score": pa.array(predictions.score, pa.float64()),
        "decision": pa.array(predictions.decision, pa.bool_()),
        "threshold": pa.repeat(pa.scalar(predictions.threshold, pa.float64()), n),
        "model": pa.repeat(pa.scalar(predictions.model, pa.string()), n),
        "model_version": pa.repeat(pa.scalar(predictions.model_version, pa.string()), n),
        "arm": pa.repeat(pa.scalar(predictions.arm, pa.string()), n),
        "feature_age_seconds": pa.array(predictions.feature_age_seconds, pa.float64()),
        **{
            f"unknown_{k}": pa.array(v, pa.bool_()) for k, v in predictions.unknown_entities.items()
        },
        **{
            f"unseen_{k}": pa.array(v, pa.bool_()) for k, v in predictions.unseen_categories.items()
        },
    }
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


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
