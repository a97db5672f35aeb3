"""A fast online feature reader: Feast's own online store API, without the response protos.

:func:`driftloop.features.online_features` goes through
``FeatureStore.get_online_features``, which resolves the feature service, builds a
``GetOnlineFeaturesResponse`` proto (one ``ValueProto``, status and timestamp per
feature and row), and is then decoded into a polars frame. For one row that is ~2 ms
of CPU, ~10x the model; for 1,000 rows ~200 ms. Almost none of it is the SQLite read.

:class:`FastOnlineReader` asks the provider's online store directly
(``store._get_provider().online_read(config, view, entity_keys, features)``: for the
embedded default that is Feast's ``SqliteOnlineStore.online_read``, one indexed query
per view) with each distinct entity key once, and decodes the ``ValueProto`` values
itself. Same store, same keys, same rows, same semantics as ``online_features``:

* values of an entity the store has no row for are missing (``None``), never an error;
* a value stored as null is missing, and so is a requested feature the row lacks;
* the event time of the row served is returned per view (UTC, microseconds);
* the view ttl is not enforced unless ``as_of`` is given (then values of a row older
  than the ttl at ``as_of`` are nulled, timestamps kept), as in ``online_features``.

The feature service and its views are resolved from the registry once and refreshed
every minute, like :func:`driftloop.features._feature_service`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import polars as pl

from driftloop import features
from driftloop.errors import FeatureStoreError
from driftloop.schema import CARD_FEATURES, MERCHANT_FEATURES
from driftloop.settings import Settings

if TYPE_CHECKING:
    from feast import FeatureStore

_REFRESH_SECONDS = 60.0
#: the request entity each view is keyed by (position in ``read``'s arguments)
_VIEW_ENTITY = {features.CARD_VIEW: 0, features.MERCHANT_VIEW: 1}
_TS = pl.Datetime("us", "UTC")


@dataclass(frozen=True)
class _View:
    table: Any  # feast.FeatureView, as online_read wants it
    name: str
    join_key: str
    features: tuple[str, ...]
    ttl_seconds: float | None


class FastOnlineReader:
    """:class:`driftloop.serving.FeatureReader` over Feast's online store API.

    Thread-safe for reads (the SQLite connection is Feast's, shared as in
    :class:`~driftloop.serving.FeastOnlineReader`). Pass settings, or a long-lived
    ``FeatureStore`` from :func:`driftloop.features.get_store`.
    """

    def __init__(
        self,
        store_or_settings: FeatureStore | Settings,
        *,
        feature_service: str = features.FEATURE_SERVICE,
    ) -> None:
        self._store = (
            features.get_store(store_or_settings)
            if isinstance(store_or_settings, Settings)
            else store_or_settings
        )
        self._service_name = feature_service
        self._lock = threading.Lock()
        self._views: tuple[_View, ...] = ()
        self._resolved_at = float("-inf")
        try:
            self._provider = self._store._get_provider()
            self._config = self._store.config
        except Exception as exc:
            raise FeatureStoreError(f"no online store provider: {exc}") from exc
        self._resolve()

    # -- registry ----------------------------------------------------------------------
    def _resolve(self) -> tuple[_View, ...]:
        now = time.monotonic()
        if now - self._resolved_at <= _REFRESH_SECONDS:
            return self._views
        with self._lock:
            if now - self._resolved_at <= _REFRESH_SECONDS:
                return self._views
            try:
                service = self._store.get_feature_service(self._service_name, allow_cache=True)
                views = []
                for projection in service.feature_view_projections:
                    views.append(self._view(projection))
            except FeatureStoreError:
                raise
            except Exception as exc:
                raise FeatureStoreError(
                    f"cannot resolve feature service {self._service_name!r}: {exc}"
                ) from exc
            self._views = tuple(views)
            self._resolved_at = now
            return self._views

    def _view(self, projection: Any) -> _View:
        from feast.value_type import ValueType

        name = projection.name
        if name not in _VIEW_ENTITY:
            raise FeatureStoreError(f"feature view {name!r} is not keyed by a card or merchant")
        table = self._store.get_feature_view(name, allow_registry_cache=True)
        keys = [c for c in table.entity_columns]
        if len(keys) != 1 or keys[0].dtype.to_value_type() != ValueType.INT64:
            raise FeatureStoreError(
                f"feature view {name!r}: expected one Int64 join key, got {keys}"
            )
        wanted = tuple(f.name for f in projection.features)
        unknown = [f for f in wanted if f not in features._FEATURE_DTYPES]
        if unknown:
            raise FeatureStoreError(f"feature view {name!r} has unknown features {unknown}")
        ttl = table.ttl.total_seconds() if table.ttl and table.ttl.total_seconds() > 0 else None
        return _View(table, name, keys[0].name, wanted, ttl)

    # -- reads -------------------------------------------------------------------------
    def _read_view(
        self, view: _View, ids: Sequence[int | None]
    ) -> dict[int, tuple[datetime, dict[str, Any]]]:
        """The stored row of each distinct id: (event time, UTC; values)."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        distinct = list(dict.fromkeys(i for i in ids if i is not None))
        if not distinct:
            return {}
        keys = [
            EntityKey(join_keys=[view.join_key], entity_values=[Value(int64_val=i)])
            for i in distinct
        ]
        try:
            rows = self._provider.online_read(
                config=self._config,
                table=view.table,
                entity_keys=keys,
                requested_features=list(view.features),
            )
        except Exception as exc:
            raise FeatureStoreError(f"online read of {view.name} failed: {exc}") from exc
        found: dict[int, tuple[datetime, dict[str, Any]]] = {}
        for entity, (ts, values) in zip(distinct, rows, strict=True):
            if ts is None or values is None:
                continue
            decoded: dict[str, Any] = {}
            for name in view.features:
                value = values.get(name)
                kind = None if value is None else value.WhichOneof("val")
                decoded[name] = None if kind is None or kind == "null_val" else getattr(value, kind)
            found[entity] = (ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts, decoded)
        return found

    def _lookup(
        self, ids_by_entity: tuple[Sequence[int | None], Sequence[int | None]]
    ) -> list[tuple[_View, list[tuple[datetime, dict[str, Any]] | None]]]:
        out = []
        for view in self._resolve():
            ids = ids_by_entity[_VIEW_ENTITY[view.name]]
            found = self._read_view(view, ids)
            out.append((view, [None if i is None else found.get(i) for i in ids]))
        return out

    def read(
        self, card_ids: Sequence[int], merchant_ids: Sequence[int]
    ) -> tuple[list[dict[str, Any] | None], list[dict[str, Any] | None]]:
        """Per row: the card's and the merchant's feature dicts (None when unknown).

        Each dict carries the view's features and ``event_timestamp`` (epoch seconds):
        exactly what :class:`driftloop.serving.FeastOnlineReader` returns.
        """
        if len(card_ids) != len(merchant_ids):
            raise ValueError("card_ids and merchant_ids must have the same length")
        result: list[list[dict[str, Any] | None]] = [[None] * len(card_ids) for _ in range(2)]
        names = {features.CARD_VIEW: CARD_FEATURES, features.MERCHANT_VIEW: MERCHANT_FEATURES}
        for view, rows in self._lookup((card_ids, merchant_ids)):
            target = result[_VIEW_ENTITY[view.name]]
            for n, row in enumerate(rows):
                if row is None:
                    continue
                ts, values = row
                entity = {f: values.get(f) for f in names[view.name]}
                entity["event_timestamp"] = ts.timestamp()
                target[n] = entity
        return result[0], result[1]

    def frame(
        self,
        card_ids: Sequence[int | None],
        merchant_ids: Sequence[int | None],
        *,
        as_of: datetime | None = None,
    ) -> pl.DataFrame:
        """The frame :func:`driftloop.features.online_features` returns, column for column."""
        if len(card_ids) != len(merchant_ids):
            raise ValueError("card_ids and merchant_ids must have the same length")
        cards = [None if c is None else int(c) for c in card_ids]
        merchants = [None if m is None else int(m) for m in merchant_ids]
        data: dict[str, list[Any]] = {"card_id": cards, "merchant_id": merchants}
        schema: dict[str, pl.DataType] = {"card_id": pl.Int64(), "merchant_id": pl.Int64()}
        stamps: dict[str, list[int | None]] = {}
        for view, rows in self._lookup((cards, merchants)):
            for f in view.features:
                data[f] = [None if r is None else r[1].get(f) for r in rows]
                schema[f] = features._FEATURE_DTYPES[f]
            stamps[view.name] = [None if r is None else _micros(r[0]) for r in rows]
        order = ["card_id", "merchant_id", *[f for f in features._FEATURE_DTYPES if f in data]]
        for view_name in features._VIEW_FEATURES:
            if view_name in stamps:
                data[f"{view_name}__ts"] = stamps[view_name]
                schema[f"{view_name}__ts"] = pl.Int64()
                order.append(f"{view_name}__ts")
        frame = (
            pl.DataFrame(data, schema=schema).select(order).cast({f"{v}__ts": _TS for v in stamps})  # type: ignore[dict-item]
        )
        if as_of is not None:
            cutoff = features._utc(as_of) - features.VIEW_TTL
            frame = frame.with_columns(
                pl.when(pl.col(f"{v}__ts") >= cutoff).then(pl.col(f)).alias(f)
                for v in stamps
                for f in features._VIEW_FEATURES[v]
                if f in data
            )
        return frame


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(ts: datetime) -> int:
    return (ts - _EPOCH) // _MICROSECOND


__all__ = ["FastOnlineReader"]
