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

:meth:`FastOnlineReader.columns` answers a whole batch column-wise (numpy arrays, see
:class:`driftloop.serving.OnlineColumns`): one lookup per view for the batch's distinct
entities. On the embedded SQLite store it reads the rows ``SqliteOnlineStore.online_read``
reads, on Feast's own connection, with the matching of rows to entities and features done
in SQL, and without building a ``ValueProto`` dict per entity and a ``datetime`` per row
(several times faster for thousands of entities); on any other online store it
goes through ``online_read`` as above.

On the SQLite store, what was read is kept in memory until the store changes
(:class:`_Generation`): each call first asks SQLite whether a write was committed since
the last one (``PRAGMA data_version``, ~10 us, and the connection's own
``total_changes``); if none was, entities read before are answered from memory, others
are read and kept. Any write, by any process, drops everything kept, so a pushed value
is served by the next read after its commit. ``DRIFTLOOP_ONLINE_CACHE=false`` (or
``cache=False``) reads every entity every time.

The feature service and its views are resolved from the registry once and refreshed
every minute, like :func:`driftloop.features._feature_service`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import operator
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import polars as pl

from driftloop import features
from driftloop.errors import FeatureStoreError
from driftloop.schema import CARD_FEATURES, MERCHANT_FEATURES
from driftloop.serving import OnlineColumns
from driftloop.settings import Settings

if TYPE_CHECKING:
    from feast import FeatureStore

_REFRESH_SECONDS = 60.0
#: the request entity each view is keyed by (position in ``read``'s arguments)
_VIEW_ENTITY = {features.CARD_VIEW: 0, features.MERCHANT_VIEW: 1}
_TS = pl.Datetime("us", "UTC")
_VIEW_NAMES = {features.CARD_VIEW: CARD_FEATURES, features.MERCHANT_VIEW: MERCHANT_FEATURES}
#: entity keys per SQLite query (well below SQLite's limit of bound parameters)
_SQLITE_CHUNK = 5_000
#: fewer distinct entities than this are read through ``online_read`` (cheaper for a few)
_SQLITE_MIN_IDS = 16
_INT64 = struct.Struct("<q")
_FIRST = operator.itemgetter(0)
logger = logging.getLogger(__name__)
T = TypeVar("T")


def _guarded(view: _View, read: Callable[[_View, Any], T], ids: Any) -> T:
    """``read(view, ids)``; any failure but a :class:`FeatureStoreError` is reported as one."""
    try:
        return read(view, ids)
    except FeatureStoreError:
        raise
    except Exception as exc:
        raise FeatureStoreError(f"online read of {view.name} failed: {exc}") from exc


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
    ``FeatureStore`` from :func:`driftloop.features.get_store`. ``cache=False`` reads
    every entity from the store on every call (see :class:`_Generation`).
    """

    def __init__(
        self,
        store_or_settings: FeatureStore | Settings,
        *,
        feature_service: str = features.FEATURE_SERVICE,
        cache: bool = True,
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
        self._sqlite = _SqliteRows.create(self._provider, self._config, cache=cache)

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
    def _generation(self) -> _Generation | None:
        """The SQLite reads' cache of the store's present content, checked once per call
        (None without the direct SQLite reads or with caching off)."""
        if self._sqlite is None:
            return None
        try:
            return self._sqlite.current()
        except Exception as exc:
            raise FeatureStoreError(f"online store check failed: {exc}") from exc

    def _read_view(
        self,
        view: _View,
        ids: Sequence[int | None],
        generation: _Generation | None = None,
    ) -> dict[int, tuple[datetime, dict[str, Any]]]:
        """The stored row of each distinct id: (event time, UTC; values); those read
        since the store last changed from ``generation`` (None: all from the store)."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        distinct = list(dict.fromkeys(i for i in ids if i is not None))
        if not distinct:
            return {}
        if self._sqlite is not None and len(distinct) <= _SQLITE_CHUNK:
            direct_rows = functools.partial(self._sqlite.rows, generation=generation)
            direct = _guarded(view, direct_rows, distinct)
            if direct is not None:
                return direct
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
        views = self._resolve()
        generation = self._generation()
        for view in views:
            ids = ids_by_entity[_VIEW_ENTITY[view.name]]
            found = self._read_view(view, ids, generation)
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
        for view, rows in self._lookup((card_ids, merchant_ids)):
            target = result[_VIEW_ENTITY[view.name]]
            for n, row in enumerate(rows):
                if row is None:
                    continue
                ts, values = row
                entity = {f: values.get(f) for f in _VIEW_NAMES[view.name]}
                entity["event_timestamp"] = ts.timestamp()
                target[n] = entity
        return result[0], result[1]

    def columns(
        self, card_ids: Sequence[int] | np.ndarray, merchant_ids: Sequence[int] | np.ndarray
    ) -> OnlineColumns:
        """:meth:`read`'s answer column-wise, for a whole batch (see :class:`OnlineColumns`).

        Values are floats (NaN where :meth:`read` has None); each view is read once for
        the batch's distinct entity ids.
        """
        cards = np.asarray(card_ids, dtype=np.int64)
        merchants = np.asarray(merchant_ids, dtype=np.int64)
        if cards.shape != merchants.shape or cards.ndim != 1:
            raise ValueError("card_ids and merchant_ids must have the same length")
        n = len(cards)
        nan = np.full(n, np.nan)
        values: dict[str, np.ndarray] = {f: nan for f in (*CARD_FEATURES, *MERCHANT_FEATURES)}
        stamps = [nan, nan]
        views = self._resolve()
        generation = self._generation()
        for view in views:
            position = _VIEW_ENTITY[view.name]
            distinct, inverse = np.unique((cards, merchants)[position], return_inverse=True)
            ts, matrix = self._view_columns(view, distinct, generation)
            stamps[position] = ts[inverse]
            for j, f in enumerate(view.features):
                if f in _VIEW_NAMES[view.name]:
                    values[f] = matrix[inverse, j]
        return OnlineColumns(values, stamps[0], stamps[1])

    def _view_columns(
        self, view: _View, ids: np.ndarray, generation: _Generation | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """For distinct ``ids``: the event time of each one's row (epoch seconds, NaN when
        unknown) and its values (rows x ``view.features``, NaN when missing)."""
        if self._sqlite is not None and len(ids) >= _SQLITE_MIN_IDS:
            read = functools.partial(self._sqlite.read, generation=generation)
            found = _guarded(view, read, ids)
            if found is not None:
                return found
        ts = np.full(len(ids), np.nan)
        matrix = np.full((len(ids), len(view.features)), np.nan)
        rows = self._read_view(view, ids.tolist(), generation)
        for i, entity in enumerate(ids.tolist()):
            row = rows.get(entity)
            if row is None:
                continue
            ts[i] = row[0].timestamp()
            matrix[i] = [_number(row[1].get(f)) for f in view.features]
        return ts, matrix

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


def _number(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise FeatureStoreError(f"online feature value {value!r} is not a number") from exc


class _SqliteRows:
    """Batch reads of Feast's embedded SQLite online store (``SqliteOnlineStore``).

    The rows ``SqliteOnlineStore.online_read`` reads (same table, same serialised entity
    keys, an entity's rows in the same order, on the store's own connection), decoded in
    bulk:

    * an entity with no row is unknown; its event time is that of its last row returned,
      as ``online_read`` takes it (``datetime.fromtimestamp`` of the stored epoch seconds,
      read as UTC);
    * values are decoded from the stored ``ValueProto`` bytes; a null value is missing.

    :meth:`create` returns None when the store is not Feast's SQLite store or its internals
    are not what this was written against (then the reader uses ``online_read``).
    """

    def __init__(self, online_store: Any, config: Any, *, cache: bool = True) -> None:
        from feast.infra.online_stores.sqlite import _quote_id, _table_id
        from feast.protos.feast.types.Value_pb2 import Value

        self._online_store = online_store
        self._config = config
        self._quote_id = _quote_id
        self._table_id = _table_id
        self._parse = Value.FromString
        self._prefixes: dict[str, bytes | None] = {}
        self._tables: dict[str, tuple[Any, str]] = {}
        self._cache = cache
        self._generation: _Generation | None = None
        self._generation_lock = threading.Lock()

    @classmethod
    def create(cls, provider: Any, config: Any, *, cache: bool = True) -> _SqliteRows | None:
        try:
            from feast.infra.online_stores.sqlite import SqliteOnlineStore

            online_store = provider.online_store
            if not isinstance(online_store, SqliteOnlineStore):
                return None
            return cls(online_store, config, cache=cache)
        except Exception as exc:  # any surprise: the generic path still works
            logger.warning("no batch reads of the SQLite online store: %s", exc)
            return None

    def _prefix(self, join_key: str) -> bytes | None:
        """The serialised entity key of ``join_key`` minus the 8 bytes of the int64 id,
        checked against Feast's own ``serialize_entity_key`` (None if it differs)."""
        if join_key in self._prefixes:
            return self._prefixes[join_key]
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        def feast_key(i: int) -> bytes:
            return serialize_entity_key(
                EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=i)]),
                entity_key_serialization_version=self._config.entity_key_serialization_version,
            )

        prefix: bytes | None = feast_key(0)[:-8]
        for probe in (0, 1, 2**40 + 7, 2**62):
            if feast_key(probe) != (prefix or b"") + struct.pack("<q", probe):
                logger.warning(
                    "unexpected Feast entity key encoding for %s: no batch reads", join_key
                )
                prefix = None
                break
        self._prefixes[join_key] = prefix
        return prefix

    def _table(self, view: Any) -> str:
        """The quoted name of ``view``'s table (kept per feature view object)."""
        cached = self._tables.get(view.name)
        if cached is not None and cached[0] is view.table:
            return cached[1]
        name = str(
            self._quote_id(
                self._table_id(
                    self._config.project,
                    view.table,
                    self._config.registry.enable_online_feature_view_versioning,
                )
            )
        )
        self._tables[view.name] = (view.table, name)
        return name

    # -- what was read since the store last changed ---------------------------------
    def current(self) -> _Generation | None:
        """The cache of the store's present content (None when caching is off): a new,
        empty one whenever a write was committed since the last call, by any connection."""
        if not self._cache:
            return None
        conn = self._online_store._get_conn(self._config)
        # data_version moves on commits of other connections (other processes included),
        # total_changes on this connection's own writes (a push in this process)
        marker = (id(conn), conn.execute("PRAGMA data_version").fetchone()[0], conn.total_changes)
        generation = self._generation
        if generation is None or generation.marker != marker:
            with self._generation_lock:
                generation = self._generation
                if generation is None or generation.marker != marker:
                    generation = self._generation = _Generation(marker)
        return generation

    def rows(
        self, view: Any, ids: Sequence[int], *, generation: _Generation | None = None
    ) -> dict[int, tuple[datetime, dict[str, Any]]] | None:
        """What ``_read_view`` makes of ``online_read``'s answer for distinct ``ids``
        (at most :data:`_SQLITE_CHUNK`); None to use ``online_read``. Entities read
        since the store last changed are answered from ``generation`` (what
        :meth:`current` returned for this call; None: all read from the store)."""
        if generation is None:
            return self._rows(view, ids)
        cache = generation.rows_of(view)
        found: dict[int, tuple[datetime, dict[str, Any]]] = {}
        missing: list[int] = []
        for i in ids:
            row = cache.get(i, _MISS)
            if row is _MISS:
                missing.append(i)
            elif row is not None:
                found[i] = row
        if missing:
            read = self._rows(view, missing)
            if read is None:
                return None
            found.update(read)
            if len(cache) < _CACHE_MAX_ENTITIES:
                cache.update((i, read.get(i)) for i in missing)
        return found

    def _rows(
        self, view: Any, ids: Sequence[int]
    ) -> dict[int, tuple[datetime, dict[str, Any]]] | None:
        """:meth:`rows` from the store.

        The very query ``online_read`` runs (same SQL text, so the same plan and the same
        order of an entity's rows), with the keys built from the checked prefix instead
        of protos; the event time converted by the connection as ``online_read`` gets it
        (the last row of an entity wins), each value parsed with ``Value.FromString``.
        """
        prefix = self._prefix(view.join_key)
        if prefix is None:
            return None
        pack = _INT64.pack
        keys = [prefix + pack(i) for i in ids]
        conn = self._online_store._get_conn(self._config)
        rows = conn.execute(
            "SELECT entity_key, feature_name, value, event_ts "
            f"FROM {self._table(view)} "
            f"WHERE entity_key IN ({','.join('?' * len(keys))}) "
            "ORDER BY entity_key",
            keys,
        ).fetchall()
        if not rows:
            return {}
        entity_of = dict(zip(keys, ids, strict=True))
        wanted = view.features
        parse = self._parse
        found: dict[int, tuple[datetime, dict[str, Any]]] = {}
        for key, group in itertools.groupby(rows, key=_FIRST):
            # as online_read: every row of the entity parsed, the event time of the last
            stored: dict[str, Any] = {}
            for row in group:
                stored[row[1]] = parse(row[2])
            ts: datetime = row[3]
            decoded: dict[str, Any] = {}
            for name in wanted:
                value = stored.get(name)
                kind = None if value is None else value.WhichOneof("val")
                decoded[name] = None if kind is None or kind == "null_val" else getattr(value, kind)
            found[entity_of[key]] = (
                ts.astimezone(UTC) if ts.tzinfo is not None else ts.replace(tzinfo=UTC),
                decoded,
            )
        return found

    def read(
        self, view: Any, ids: np.ndarray, *, generation: _Generation | None = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(event times, values) of distinct ``ids``; None to use the generic path.
        Entities read since the store last changed are answered from ``generation``
        (as :meth:`rows`)."""
        if generation is None:
            return self._read(view, ids)
        mirror = generation.columns_of(view)
        ids_list = ids.tolist()
        positions = mirror.positions(ids_list)
        missing = positions < 0
        if not missing.any():
            return mirror.ts[positions], mirror.matrix[positions]
        read = self._read(view, ids[missing])
        if read is None:
            return None
        ts = np.empty(len(ids_list))
        matrix = np.empty((len(ids_list), len(view.features)))
        hit = ~missing
        if hit.any():
            ts[hit] = mirror.ts[positions[hit]]
            matrix[hit] = mirror.matrix[positions[hit]]
        ts[missing], matrix[missing] = read
        mirror.add(ids[missing].tolist(), *read)
        return ts, matrix

    def _read(self, view: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`read` from the store.

        SQLite does the matching: the keys go in as a ``VALUES`` list of (position, key)
        joined to the table, and each row comes back as (position of its entity, position
        of its feature or NULL, value, event seconds): no Python object per key or name.
        An entity's rows come in rowid order, the order in which ``online_read``'s ``IN``
        query meets them through the table's ``entity_key`` index.
        """
        prefix = self._prefix(view.join_key)
        if prefix is None:
            return None
        pack = struct.Struct("<q").pack
        keys = [prefix + pack(i) for i in ids.tolist()]
        conn = self._online_store._get_conn(self._config)
        table = self._table(view)
        # (entity position, feature column) as one number: position * width + column,
        # where column ``width - 1`` stands for a feature of the row not asked for
        width = len(view.features) + 1
        cell = (
            f"k.i * {width} + CASE t.feature_name "
            + " ".join(f"WHEN {_sql_text(f)} THEN {j}" for j, f in enumerate(view.features))
            + f" ELSE {width - 1} END"
        )
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(keys), _SQLITE_CHUNK):
            chunk = keys[start : start + _SQLITE_CHUNK]
            # a few statement sizes only, so that SQLite's compiled statements are reused
            # (compiling one with thousands of VALUES rows costs as much as running it):
            # padded with empty keys, which no entity has
            size = _padded_size(len(chunk))
            chunk += [b""] * (size - len(chunk))
            # ifnull() hides the column's declared type: no datetime per row from the
            # connection's converter, the stored epoch seconds come back as they are
            cursor = conn.execute(
                f"WITH k(i, key) AS (VALUES {_values_rows(start, size)}) "
                f"SELECT {cell}, t.value, ifnull(t.event_ts, NULL) "
                f"FROM k JOIN {table} AS t ON t.entity_key = k.key ORDER BY k.i, t.rowid",
                chunk,
            )
            rows.extend(cursor.fetchall())
        ts = np.full(len(keys), np.nan)
        matrix = np.full((len(keys), len(view.features)), np.nan)
        if not rows:
            return ts, matrix
        cells, blobs, stamps_col = zip(*rows, strict=True)
        stamps = np.array(stamps_col)
        if stamps.dtype.kind != "i":
            return None  # not all epoch seconds: let online_read decide
        entity, column = np.divmod(np.array(cells, dtype=np.intp), width)
        # the event time of an entity is that of its last row, as online_read takes it
        last = np.append(entity[1:] != entity[:-1], True)
        ts[entity[last]] = _feast_epoch_seconds(stamps[last])
        wanted = np.flatnonzero(column != width - 1)
        matrix[entity[wanted], column[wanted]] = decode_values(
            [blobs[k] for k in wanted.tolist()], self._parse
        )
        return ts, matrix


#: a cache keeps at most this many entities per view (then reads the rest from the store)
_CACHE_MAX_ENTITIES = 1_000_000
_MISS = object()


class _Generation:
    """What was read from the online store while its content stayed the same.

    The store's SQLite file changes only by committed writes (a push, a
    materialisation, ``feast apply``); ``PRAGMA data_version`` and the connection's
    ``total_changes`` tell whether one happened since the last read. Until then an
    entity read once reads the same again, so it is answered from here: the very
    values the query returned, unknown entities included. After a write the whole
    generation is dropped (readers that still hold it only add to it): a pushed value
    is served by the next read after the push's commit, as without the cache.
    """

    def __init__(self, marker: tuple[int, ...]) -> None:
        self.marker = marker
        self._rows: dict[tuple[str, tuple[str, ...]], dict[int, Any]] = {}
        self._columns: dict[tuple[str, tuple[str, ...]], _Mirror] = {}

    def rows_of(self, view: Any) -> dict[int, Any]:
        """id -> ``rows``' answer for it (None: the store has no row for it)."""
        return self._rows.setdefault((view.name, view.features), {})

    def columns_of(self, view: Any) -> _Mirror:
        key = (view.name, view.features)
        mirror = self._columns.get(key)
        if mirror is None:
            mirror = self._columns.setdefault(key, _Mirror(len(view.features)))
        return mirror


class _Mirror:
    """``read``'s answers per entity id, column-wise: event times and value rows."""

    def __init__(self, width: int) -> None:
        self.index: dict[int, int] = {}
        self.ts = np.empty(0)
        self.matrix = np.empty((0, width))
        self._size = 0
        self._lock = threading.Lock()

    def positions(self, ids: list[int]) -> np.ndarray:
        """The row of each id (-1 when not read yet)."""
        return np.fromiter(
            map(self.index.get, ids, itertools.repeat(-1, len(ids))), np.intp, len(ids)
        )

    def add(self, ids: list[int], ts: np.ndarray, matrix: np.ndarray) -> None:
        with self._lock:
            start, end = self._size, self._size + len(ids)
            if end > _CACHE_MAX_ENTITIES:
                return
            if end > len(self.ts):  # grow: the new arrays hold the old rows before use
                capacity = max(end, 2 * len(self.ts), 1024)
                grown_ts = np.empty(capacity)
                grown = np.empty((capacity, self.matrix.shape[1]))
                grown_ts[:start] = self.ts[:start]
                grown[:start] = self.matrix[:start]
                self.ts, self.matrix = grown_ts, grown
            self.ts[start:end] = ts
            self.matrix[start:end] = matrix
            self._size = end
            self.index.update(zip(ids, range(start, end), strict=True))  # published last


def _padded_size(n: int) -> int:
    """``n`` rounded up to one of a few sizes: 16, then 8 steps per doubling (at most
    1/8 of padding), never above :data:`_SQLITE_CHUNK`."""
    if n <= 16:
        return 16
    step = 1 << (n.bit_length() - 4)
    return min(-(-n // step) * step, max(n, _SQLITE_CHUNK))


@functools.lru_cache(maxsize=64)
def _values_rows(start: int, count: int) -> str:
    """``(start, ?), (start + 1, ?), ...``: ``count`` rows of a ``VALUES`` list."""
    return ",".join(f"({start + n},?)" for n in range(count))


def _sql_text(value: str) -> str:
    """A string literal of SQLite."""
    return "'" + value.replace("'", "''") + "'"


# wire-format tags of the scalar fields of feast.types.Value (field number << 3 | wire type)
_TAG_DOUBLE = 5 << 3 | 1  # double_val, fixed64
_TAG_FLOAT = 6 << 3 | 5  # float_val, fixed32
_VARINT_TAGS = (
    3 << 3,  # int32_val
    4 << 3,  # int64_val
    7 << 3,  # bool_val
    8 << 3,  # unix_timestamp_val
)
_NULL = bytes([19 << 3 | 0x80, 0x01, 0x00])  # null_val = NULL (tag 152 as a 2-byte varint)


def decode_values(blobs: Sequence[bytes], parse: Any = None) -> np.ndarray:
    """Serialised ``feast.types.Value`` messages as floats (NaN for null or unset).

    The scalar numeric encodings (double, float, int32, int64, bool, unix timestamp, null)
    are decoded in bulk with numpy: one message holding exactly one such field, as protobuf
    writes it. Anything else is parsed with protobuf (``parse``, ``Value.FromString``) and
    must be a number. Same values as ``float(getattr(value, value.WhichOneof("val")))``.
    """
    n = len(blobs)
    out = np.full(n, np.nan)
    if not n:
        return out
    lengths = np.fromiter(map(len, blobs), np.int64, n)
    buf = np.frombuffer(b"".join(blobs) + b"\0" * 11, dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    tag = np.where(lengths > 0, buf[starts], 0)
    done = lengths == 0  # no field set: missing
    for size, code, dtype in ((9, _TAG_DOUBLE, "<f8"), (5, _TAG_FLOAT, "<f4")):
        hit = (lengths == size) & (tag == code)
        if hit.any():
            raw = buf[starts[hit, None] + np.arange(1, size)]
            out[hit] = raw.copy().view(dtype).ravel()
            done |= hit
    varint = np.isin(tag, _VARINT_TAGS)
    for size in range(2, 12):  # a tag byte and a varint of 1 to 10 bytes
        hit = varint & (lengths == size)
        if not hit.any():
            continue
        raw = buf[starts[hit, None] + np.arange(1, size)].astype(np.uint64)
        more = (raw & 0x80) != 0
        valid = more[:, :-1].all(axis=1) & ~more[:, -1]
        value = np.zeros(len(raw), dtype=np.uint64)
        for k in range(size - 1):
            value |= (raw[:, k] & np.uint64(0x7F)) << np.uint64(7 * k)
        rows = np.flatnonzero(hit)[valid]
        out[rows] = value[valid].view(np.int64)
        done[rows] = True
    rest = np.flatnonzero(~done)
    if len(rest):
        if parse is None:
            from feast.protos.feast.types.Value_pb2 import Value

            parse = Value.FromString
        for k in rest.tolist():
            blob = blobs[k]
            if blob == _NULL:
                continue
            message = parse(blob)
            kind = message.WhichOneof("val")
            if kind is None or kind == "null_val":
                continue
            out[k] = _number(getattr(message, kind))
    return out


def _feast_epoch_seconds(stored: np.ndarray) -> np.ndarray:
    """The event times ``SqliteOnlineStore.online_read`` returns, as epoch seconds: it
    reads the stored integer with ``datetime.fromtimestamp`` (local time) and labels the
    naive result UTC. The same as the integer itself when local time is UTC."""
    if time.timezone == 0 and time.altzone == 0:
        return stored.astype(np.float64)
    distinct, inverse = np.unique(stored, return_inverse=True)
    converted = np.array(
        [datetime.fromtimestamp(int(v)).replace(tzinfo=UTC).timestamp() for v in distinct]
    )
    return converted[inverse]


__all__ = ["FastOnlineReader"]
