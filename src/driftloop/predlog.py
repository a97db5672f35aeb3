"""The durable prediction log and label log: a local spool shipped into Delta.

Request path: :meth:`SpooledLog.append` encodes the records as JSON lines and hands
them to the kernel (:mod:`driftloop.spool`) before it returns; it never waits on
Delta. :meth:`SpooledLog.append_columns` (a batch given column-wise) writes a large
batch as one Arrow record into Arrow segments instead (its own spool writer), which the
shipper passes to Delta without parsing text. A background thread seals segments by
age and ships sealed segments of both kinds into the Delta table in large batches
(many segments per commit).

Exactly once: each commit carries one Delta *application transaction* per spool
writer, ``(app_id=<writer id>, version=<highest segment number shipped>)``, in the
same atomic commit as the rows (plus the segment ids in the commit metadata, for
people reading the history). Before shipping, a segment whose number is at or below
its writer's transaction version is already in the table and is only deleted
locally. That covers a crash between the commit and the local delete, and a commit
reported as failed that landed anyway (delta-rs#2609): every retry re-reads the
table first. Two shippers racing on the same writer conflict inside Delta
("concurrent transaction"), and the loser re-checks. One shipper per spool
directory runs at a time (an flock), so several processes may share a directory.

Reads for monitoring (:func:`read_predictions`) scan Delta lazily with filters on
the ``date`` partition column, so only the partitions of the window are read.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import numpy as np
import orjson
import polars as pl
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError
from pydantic import BaseModel

from driftloop import spool
from driftloop.errors import DataError, LogError, SchemaError
from driftloop.schema import LABEL_SCHEMA, PREDICTION_SCHEMA, validate_frame
from driftloop.settings import Settings

logger = logging.getLogger(__name__)

PARTITION_COLUMN = "date"
#: table properties set when driftloop creates a log table. Expired-log cleanup is
#: off so that no writer deletes the log of a Delta version a model still points to;
#: :func:`driftloop.maintenance.checkpoint` cleans the log up to the oldest protected
#: version instead.
TABLE_CONFIGURATION: dict[str, str | None] = {"delta.enableExpiredLogCleanup": "false"}
#: commits that fail (conflict) are retried this many times, with jittered backoff
MAX_COMMIT_ATTEMPTS = 8
_BACKOFF_BASE_SECONDS = 0.05
_BACKOFF_CAP_SECONDS = 2.0
#: labels are read from this long before a prediction window (a label rarely precedes
#: its prediction, but clocks of different hosts may disagree)
LABEL_LOOKBACK = timedelta(days=1)
#: commit-info key listing the spool segments a commit shipped
SEGMENTS_KEY = "driftloop.segments"

_JSON_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NAIVE_UTC | orjson.OPT_SERIALIZE_NUMPY
#: a columnar append of fewer rows is encoded record by record as JSON lines (orjson,
#: cheaper for a handful of rows); from this many rows on, as one Arrow record
COLUMNAR_MIN_ROWS = 64


@dataclass(frozen=True)
class TableSpec:
    """A log table: its name under the data root and its record schema."""

    name: str
    schema: Mapping[str, pl.DataType]
    partition_by: tuple[str, ...] = (PARTITION_COLUMN,)
    columns: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", frozenset(self.schema))

    def empty(self) -> pl.DataFrame:
        return pl.DataFrame(schema=dict(self.schema))


PREDICTIONS = TableSpec("predictions", PREDICTION_SCHEMA)
LABELS = TableSpec("labels", LABEL_SCHEMA)
TABLES: dict[str, TableSpec] = {PREDICTIONS.name: PREDICTIONS, LABELS.name: LABELS}


class ShipResult(BaseModel):
    """What one shipping pass did."""

    table: str
    commits: int = 0
    segments: int = 0
    rows: int = 0
    already_shipped_segments: int = 0
    rejected_rows: int = 0
    commit_retries: int = 0
    orphans_sealed: int = 0
    lock_busy: bool = False
    seconds: float = 0.0


class SpoolStats(BaseModel):
    """The state of one log's spool, for gauges and health checks."""

    table: str
    open_rows: int
    sealed_segments: int
    sealed_rows: int
    oldest_sealed_seconds: float
    shipped_rows: int
    ship_errors: int
    last_error: str | None = None

    @property
    def backlog_rows(self) -> int:
        return self.open_rows + self.sealed_rows


# -- tables ------------------------------------------------------------------------
def ensure_table(settings: Settings, spec: TableSpec) -> DeltaTable:
    """Open the table, creating it (empty, partitioned, configured) when missing."""
    uri = settings.table(spec.name)
    if not DeltaTable.is_deltatable(uri):
        try:
            DeltaTable.create(
                uri,
                spec.empty().to_arrow().schema,
                mode="ignore",
                partition_by=list(spec.partition_by),
                configuration=TABLE_CONFIGURATION,
                name=spec.name,
            )
        except DeltaError:
            # another process created it at the same moment
            if not DeltaTable.is_deltatable(uri):
                raise
    return DeltaTable(uri)


def _backoff(attempt: int) -> float:
    return random.uniform(0, min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2**attempt))


# -- shipping ----------------------------------------------------------------------
class Shipper:
    """Moves the sealed segments of one spool directory into one Delta table."""

    def __init__(self, settings: Settings, spec: TableSpec, directory: Path | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.directory = directory or settings.spool_dir / spec.name
        self.batch_segments = settings.shipper_batch_segments
        self._mutex = threading.Lock()
        self._table: DeltaTable | None = None
        self.shipped_rows = 0  # by this shipper, since it was created

    def ship(self, *, wait: bool = True, stop: threading.Event | None = None) -> ShipResult:
        """Ship every sealed segment (and dead writers' open ones) of the directory.

        With ``wait=False`` it returns at once (``lock_busy``) when another process is
        shipping this directory. ``stop`` ends the pass between two commits.
        """
        result = ShipResult(table=self.spec.name)
        started = time.perf_counter()
        with self._mutex, spool.ship_lock(self.directory, wait=wait) as held:
            if not held:
                result.lock_busy = True
                return result
            result.orphans_sealed = len(spool.seal_orphans(self.directory))
            try:
                while segments := spool.list_sealed(self.directory):
                    # sorted by (writer, seq): any prefix holds, per writer, a prefix of
                    # its segments, so a writer's transaction version only moves forward
                    self._ship_batch(segments[: self.batch_segments], result)
                    if stop is not None and stop.is_set():
                        break
            finally:
                self.shipped_rows += result.rows
        result.seconds = time.perf_counter() - started
        return result

    def _open_table(self) -> DeltaTable:
        try:
            if self._table is None:
                self._table = ensure_table(self.settings, self.spec)
            else:
                self._table.update_incremental()
        except (DeltaError, OSError) as exc:
            raise LogError(f"cannot open table {self.spec.name}: {exc}") from exc
        return self._table

    def _ship_batch(self, batch: list[spool.Segment], result: ShipResult) -> None:
        frames: dict[str, pl.DataFrame] = {}
        attempt = 0
        while True:
            table = self._open_table()
            pending = []
            for seg in batch:
                if seg.name.seq <= (table.transaction_version(seg.name.writer) or 0):
                    seg.path.unlink(missing_ok=True)  # committed before; local delete was lost
                    result.already_shipped_segments += 1
                else:
                    pending.append(seg)
            batch = pending
            if not batch:
                return
            for seg in batch:
                if seg.name.id not in frames:
                    frames[seg.name.id] = self._read(seg, result)
            data = pl.concat([frames[s.name.id] for s in batch], how="vertical")
            if data.height == 0:  # only empty or rejected lines: nothing to commit
                for seg in batch:
                    seg.path.unlink(missing_ok=True)
                return
            try:
                self._commit(table, data, batch)
            except CommitFailedError as exc:
                attempt += 1
                result.commit_retries += 1
                if attempt >= MAX_COMMIT_ATTEMPTS:
                    raise LogError(
                        f"shipping {len(batch)} segments into {self.spec.name} failed "
                        f"after {attempt} attempts: {exc}"
                    ) from exc
                logger.info(
                    "commit to %s failed (%s); re-checking and retrying", self.spec.name, exc
                )
                time.sleep(_backoff(attempt))
                continue  # the commit may have landed anyway: the loop re-checks first
            except (DeltaError, OSError) as exc:
                raise LogError(f"shipping into {self.spec.name} failed: {exc}") from exc
            result.commits += 1
            result.segments += len(batch)
            result.rows += data.height
            for seg in batch:
                seg.path.unlink(missing_ok=True)
            return

    def _read(self, seg: spool.Segment, result: ShipResult) -> pl.DataFrame:
        frame, rejected = spool.read_segment(seg, self.spec.schema)
        if rejected:
            suffix = spool.REJECTED_SUFFIXES[seg.kind]
            target = self.directory / spool.REJECTED_DIR / f"{seg.name.id}{suffix}"
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(b"".join(rejected))
            result.rejected_rows += len(rejected)
            logger.error(
                "%d records of spool segment %s do not fit the %s schema; kept in %s",
                len(rejected),
                seg.name.id,
                self.spec.name,
                target,
            )
        # the partition is the day the record was received, whatever the caller sent
        return frame.with_columns(
            pl.coalesce(
                pl.col("received_at").dt.date().cast(pl.String), pl.col(PARTITION_COLUMN)
            ).alias(PARTITION_COLUMN)
        )

    def _commit(self, table: DeltaTable, data: pl.DataFrame, batch: list[spool.Segment]) -> None:
        versions: dict[str, int] = {}
        for seg in batch:
            versions[seg.name.writer] = max(versions.get(seg.name.writer, 0), seg.name.seq)
        now_ms = time.time_ns() // 1_000_000
        write_deltalake(
            table,
            data.to_arrow(),
            mode="append",
            partition_by=list(self.spec.partition_by),
            commit_properties=CommitProperties(
                custom_metadata={SEGMENTS_KEY: [s.name.id for s in batch]},
                app_transactions=[Transaction(w, v, now_ms) for w, v in versions.items()],
            ),
        )


def ship_all(settings: Settings, tables: Sequence[str] = tuple(TABLES)) -> list[ShipResult]:
    """One-shot recovery: seal dead writers' segments and ship everything spooled.

    Safe to run while services are running (it waits for their shipper's lock) and
    any number of times: nothing is written twice.
    """
    return [Shipper(settings, TABLES[name]).ship(wait=True) for name in tables]


# -- the log used by services --------------------------------------------------------
class SpooledLog:
    """Append records to a crash-safe spool; a background thread ships them to Delta.

    Create one per process (per worker, after any fork), then ``start()`` it, or use
    it as a context manager. ``ship=False`` only spools (another process ships).
    """

    spec: ClassVar[TableSpec]

    def __init__(
        self,
        settings: Settings,
        *,
        ship: bool = True,
        fsync: bool | None = None,
        directory: Path | None = None,
    ) -> None:
        self.settings = settings
        self.directory = directory or settings.spool_dir / self.spec.name
        self.fsync = settings.spool_fsync if fsync is None else fsync
        # one writer per segment kind: rows as JSON lines, column-wise batches as Arrow
        self._writer, self._arrow_writer = (
            spool.SpoolWriter(
                self.directory,
                max_rows=settings.spool_segment_rows,
                max_age_seconds=settings.spool_segment_seconds,
                fsync=self.fsync,
                kind=kind,
            )
            for kind in (spool.JSON, spool.ARROW)
        )
        self._writers = (self._writer, self._arrow_writer)
        self._shipper = Shipper(settings, self.spec, self.directory) if ship else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ship_errors = 0
        self._last_error: str | None = None

    @property
    def writer_id(self) -> str:
        """The id of the writer of JSON-lines segments (:meth:`append`)."""
        return self._writer.writer_id

    @property
    def arrow_writer_id(self) -> str:
        """The id of the writer of Arrow segments (large :meth:`append_columns`)."""
        return self._arrow_writer.writer_id

    # request path ------------------------------------------------------------------
    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Durably spool ``records`` (dicts keyed by the table's columns).

        When this returns the records are with the kernel: a crash of the process
        loses none of them. Raises :class:`SchemaError` on unknown columns or values
        that cannot be encoded, :class:`LogError` when the spool cannot be written.
        """
        if not records:
            return
        columns = self.spec.columns
        dumps = orjson.dumps
        parts = []
        for record in records:
            if not columns.issuperset(record):
                unknown = sorted(set(record) - columns)
                raise SchemaError(f"{self.spec.name} record has unknown columns {unknown}")
            try:
                parts.append(dumps(self._complete(record), option=_JSON_OPTIONS))
            except TypeError as exc:  # orjson.JSONEncodeError
                raise SchemaError(f"{self.spec.name} record cannot be encoded: {exc}") from exc
        self._writer.write(b"".join(parts), len(parts))

    def append_columns(self, columns: Mapping[str, Any], rows: int) -> None:
        """Durably spool ``rows`` records given column-wise, in one write.

        Each value of ``columns`` is a column of ``rows`` values (numpy array or list;
        NaN and NaT are missing) or one value for every row. The records are those
        :meth:`append` would write for :func:`records_from_columns` (same columns, same
        checks, same guarantee when this returns). A large batch goes to the Arrow
        segments as one record (one Arrow IPC stream of all the table's columns, framed
        and checksummed, in one write) instead of one JSON line per row.
        """
        if rows <= 0:
            return
        if not self.spec.columns.issuperset(columns):
            unknown = sorted(set(columns) - self.spec.columns)
            raise SchemaError(f"{self.spec.name} record has unknown columns {unknown}")
        if rows < COLUMNAR_MIN_ROWS:
            self.append(records_from_columns(columns, rows))
            return
        frame = self._complete_frame(_frame(columns, rows, self.spec))
        schema = self.spec.schema
        try:
            frame = frame.select(
                pl.col(c) if c in frame.columns else pl.lit(None, dtype=t).alias(c)
                for c, t in schema.items()
            ).cast(dict(schema), strict=True)  # type: ignore[arg-type]
            buffer = io.BytesIO()
            frame.write_ipc_stream(buffer, compression="uncompressed")
        except pl.exceptions.PolarsError as exc:
            raise SchemaError(f"{self.spec.name} records cannot be encoded: {exc}") from exc
        self._arrow_writer.write(spool.frame_arrow(buffer.getbuffer(), rows), rows)

    def _complete(self, record: Mapping[str, Any]) -> Mapping[str, Any]:
        """Fill defaults and check required fields; must stay cheap."""
        return record

    def _complete_frame(self, frame: pl.DataFrame) -> pl.DataFrame:
        """:meth:`_complete` for a frame of records (override with a vectorised one)."""
        records = [self._complete(r) for r in frame.iter_rows(named=True)]
        names = dict.fromkeys(k for r in records for k in r)
        return pl.from_dicts(records, schema={k: self.spec.schema[k] for k in names})

    # lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread (sealing by age, and shipping unless ship=False).

        Its first pass recovers: segments left by dead processes are sealed and shipped.
        """
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"driftloop-{self.spec.name}-shipper", daemon=True
        )
        self._thread.start()

    def stop(self, *, flush: bool = True) -> ShipResult | None:
        """Stop the thread and seal the open segments; with ``flush`` ship everything."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for writer in self._writers:
            writer.close()
        if flush and self._shipper is not None:
            return self._ship(wait=True)
        return None

    def flush(self) -> ShipResult | None:
        """Seal the open segments and ship now (blocking); None when ship=False."""
        for writer in self._writers:
            writer.seal()
        return self._ship(wait=True) if self._shipper is not None else None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(flush=True)

    def stats(self) -> SpoolStats:
        segments, rows, oldest = spool.sealed_backlog(self.directory)
        return SpoolStats(
            table=self.spec.name,
            open_rows=self._open_rows(),
            sealed_segments=segments,
            sealed_rows=rows,
            oldest_sealed_seconds=oldest,
            shipped_rows=0 if self._shipper is None else self._shipper.shipped_rows,
            ship_errors=self._ship_errors,
            last_error=self._last_error,
        )

    def backlog_rows(self) -> int:
        """Records spooled and not yet in Delta: this writer's open segment plus every
        sealed segment of the directory (shared by all processes using it: aggregate
        such gauges with max, not sum). Cheap enough for ``Gauge.set_function``."""
        return self._open_rows() + sum(s.rows for s in spool.list_sealed(self.directory))

    # internals -----------------------------------------------------------------------
    def _open_rows(self) -> int:
        return sum(writer.open_rows for writer in self._writers)

    def _ship(self, *, wait: bool) -> ShipResult:
        assert self._shipper is not None
        return self._shipper.ship(wait=wait, stop=None if wait else self._stop)

    def _run(self) -> None:
        interval = self.settings.shipper_interval_seconds
        tick = min(max(min(self.settings.spool_segment_seconds, interval) / 2, 0.05), 1.0)
        next_ship = 0.0  # first pass at once: recovery
        while not self._stop.is_set():
            try:
                for writer in self._writers:
                    writer.seal_if_older()
                if self._shipper is not None and time.monotonic() >= next_ship:
                    self._ship(wait=False)
                    next_ship = time.monotonic() + interval
            except Exception as exc:  # the thread must survive; the data stays spooled
                self._ship_errors += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("shipping %s failed; will retry", self.spec.name)
                next_ship = time.monotonic() + interval
            self._stop.wait(tick)


class PredictionLog(SpooledLog):
    """The log of predictions (Delta table ``predictions``)."""

    spec = PREDICTIONS

    def _complete(self, record: Mapping[str, Any]) -> Mapping[str, Any]:
        if record.get("request_id") is None:
            raise SchemaError("a prediction record needs a request_id")
        if record.get("received_at") is None:
            return {**record, "received_at": datetime.now(UTC)}
        return record

    def _complete_frame(self, frame: pl.DataFrame) -> pl.DataFrame:
        if "request_id" not in frame.columns or frame["request_id"].null_count():
            raise SchemaError("a prediction record needs a request_id")
        if "received_at" not in frame.columns or frame["received_at"].null_count():
            now = pl.lit(datetime.now(UTC), dtype=self.spec.schema["received_at"])
            received = pl.col("received_at") if "received_at" in frame.columns else None
            return frame.with_columns(
                now.alias("received_at") if received is None else received.fill_null(now)
            )
        return frame


class LabelLog(SpooledLog):
    """The log of labels (Delta table ``labels``); duplicates are resolved at read time."""

    spec = LABELS

    def _complete(self, record: Mapping[str, Any]) -> Mapping[str, Any]:
        if record.get("request_id") is None and record.get("transaction_id") is None:
            raise SchemaError("a label needs a request_id or a transaction_id")
        if record.get("label") is None:
            raise SchemaError("a label record needs a label")
        if record.get("label_id") is None or record.get("received_at") is None:
            record = {
                **record,
                "label_id": record.get("label_id") or uuid.uuid4().hex,
                "received_at": record.get("received_at") or datetime.now(UTC),
            }
        return record


# -- columnar records ------------------------------------------------------------------
_COLUMN_TYPES = (np.ndarray, list, tuple, pl.Series)


def _is_column(values: Any) -> bool:
    return isinstance(values, _COLUMN_TYPES)


def _column_values(name: str, values: Any, rows: int) -> Sequence[Any]:
    """One column as ``rows`` Python values: NaN and NaT as None, a scalar repeated."""
    kind = type(values)
    if kind is np.ndarray and values.ndim == 1 and len(values) == rows:  # the usual cases
        code = values.dtype.kind
        if code == "f":
            return [None if v != v else v for v in values.tolist()]
        if code in "iub":
            return values.tolist()  # type: ignore[no-any-return]
    elif kind is list and len(values) == rows:
        return values  # type: ignore[no-any-return]
    if not _is_column(values):
        return [values] * rows
    if len(values) != rows:
        raise SchemaError(f"column {name} has {len(values)} values, expected {rows}")
    if isinstance(values, pl.Series):
        values = values.to_numpy() if values.dtype.is_float() else values.to_list()
    if isinstance(values, np.ndarray):
        if values.dtype.kind == "f":
            return [None if v != v else v for v in values.tolist()]
        if values.dtype.kind == "M":
            return values.astype("datetime64[us]").tolist()  # naive UTC; NaT -> None
        return values.tolist()
    return list(values)


def records_from_columns(columns: Mapping[str, Any], rows: int) -> list[dict[str, Any]]:
    """Records (dicts) from columns as :meth:`SpooledLog.append_columns` takes them.

    numpy datetimes come out as naive datetimes, which the log reads as UTC.
    """
    names = list(columns)
    values = [_column_values(n, v, rows) for n, v in columns.items()]
    return [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]


def _frame(columns: Mapping[str, Any], rows: int, spec: TableSpec) -> pl.DataFrame:
    """A frame of ``spec``'s types from columns as :meth:`SpooledLog.append_columns`
    takes them; raises :class:`SchemaError` on a value that does not fit its column."""
    series = []
    for name, values in columns.items():
        dtype = spec.schema[name]
        try:
            if not _is_column(values):
                s = pl.Series(name, [values], dtype=dtype, strict=True).new_from_index(0, rows)
            elif len(values) != rows:
                raise SchemaError(f"column {name} has {len(values)} values, expected {rows}")
            elif isinstance(values, np.ndarray) and values.dtype.kind == "M":
                s = pl.Series(name, values.astype("datetime64[us]")).dt.replace_time_zone("UTC")
            elif isinstance(values, np.ndarray) and values.dtype.kind == "f":
                s = pl.Series(name, values, nan_to_null=True)
            elif isinstance(values, np.ndarray | pl.Series):
                s = pl.Series(name, values)
            else:
                s = pl.Series(name, values, dtype=dtype, strict=True)
            series.append(s.cast(dtype, strict=True))
        except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError) as exc:
            raise SchemaError(f"{spec.name} column {name} does not fit {dtype}: {exc}") from exc
    return pl.DataFrame(series)


# -- reads ---------------------------------------------------------------------------
def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _day(value: datetime) -> str:
    return value.date().isoformat()


def scan_table(
    settings: Settings, spec: TableSpec, *, version: int | None = None
) -> pl.LazyFrame | None:
    """A lazy scan of a log table, or None when the table does not exist yet."""
    uri = settings.table(spec.name)
    if not DeltaTable.is_deltatable(uri):
        return None
    return pl.scan_delta(uri, version=version)


def _collect(lf: pl.LazyFrame | None, spec: TableSpec, *filters: pl.Expr) -> pl.DataFrame:
    frame = spec.empty() if lf is None else lf.filter(*filters).collect()
    validate_frame(frame, spec.schema, name=spec.name)
    return frame


def read_predictions(
    settings: Settings,
    start: datetime,
    end: datetime,
    *,
    model_name: str | None = None,
    with_labels: bool = False,
    labels_as_of: datetime | None = None,
    version: int | None = None,
) -> pl.DataFrame:
    """Predictions received in ``[start, end)`` (UTC; naive datetimes are taken as UTC).

    Only the ``date`` partitions of the window are read. With ``with_labels`` each row
    gets ``label``, ``label_id``, ``label_observed_at`` and ``label_received_at`` from
    the last label (by received_at, then label_id) received at or before
    ``labels_as_of`` (default: now), matched on request_id, or on transaction_id for
    labels that carry no request_id. ``version`` reads an older Delta version.
    A missing or empty table gives an empty frame with the schema.
    """
    start, end = _utc(start), _utc(end)
    if end <= start:
        raise DataError(f"empty window: end {end} is not after start {start}")
    filters = [
        pl.col(PARTITION_COLUMN) >= _day(start),
        pl.col(PARTITION_COLUMN) <= _day(end),
        pl.col("received_at") >= start,
        pl.col("received_at") < end,
    ]
    if model_name is not None:
        filters.append(pl.col("model_name") == model_name)
    frame = _collect(scan_table(settings, PREDICTIONS, version=version), PREDICTIONS, *filters)
    frame = frame.sort("received_at", maintain_order=True)
    if not with_labels:
        return frame
    labels = read_labels(settings, received_from=start - LABEL_LOOKBACK, as_of=labels_as_of)
    return attach_labels(frame, labels)


def read_labels(
    settings: Settings,
    *,
    received_from: datetime | None = None,
    as_of: datetime | None = None,
    version: int | None = None,
) -> pl.DataFrame:
    """Every label row received in ``[received_from, as_of]`` (duplicates included)."""
    filters = []
    if received_from is not None:
        received_from = _utc(received_from)
        filters += [
            pl.col(PARTITION_COLUMN) >= _day(received_from),
            pl.col("received_at") >= received_from,
        ]
    if as_of is not None:
        as_of = _utc(as_of)
        filters += [pl.col(PARTITION_COLUMN) <= _day(as_of), pl.col("received_at") <= as_of]
    return _collect(scan_table(settings, LABELS, version=version), LABELS, *filters)


_LABEL_OUT = {
    "label_id": "label_id",
    "label": "label",
    "observed_at": "label_observed_at",
    "received_at": "label_received_at",
}


def latest_labels(labels: pl.DataFrame) -> pl.DataFrame:
    """One label per request (or per transaction, for labels without request_id):
    the last by received_at, then label_id. Deterministic whatever the row order."""
    key = pl.coalesce(
        pl.lit("r:") + pl.col("request_id"), pl.lit("t:") + pl.col("transaction_id")
    ).alias("_key")
    return (
        labels.with_columns(key)
        .sort(["received_at", "label_id"], nulls_last=False)
        .unique(subset="_key", keep="last", maintain_order=True)
        .drop("_key")
    )


def attach_labels(predictions: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """Left-join the winning label of each prediction (see :func:`read_predictions`)."""
    keys = predictions.select("request_id", "transaction_id").unique()
    value_cols = list(_LABEL_OUT)
    by_request = keys.select("request_id").join(
        labels.filter(pl.col("request_id").is_not_null()).select("request_id", *value_cols),
        on="request_id",
    )
    by_transaction = keys.join(
        labels.filter(
            pl.col("request_id").is_null() & pl.col("transaction_id").is_not_null()
        ).select("transaction_id", *value_cols),
        on="transaction_id",
    ).drop("transaction_id")
    winners = (
        pl.concat([by_request, by_transaction], how="vertical")
        .sort(["received_at", "label_id"], nulls_last=False)
        .unique(subset="request_id", keep="last", maintain_order=True)
        .rename(_LABEL_OUT)
    )
    return predictions.join(winners, on="request_id", how="left")


__all__ = [
    "LABELS",
    "PREDICTIONS",
    "LabelLog",
    "PredictionLog",
    "ShipResult",
    "Shipper",
    "SpoolStats",
    "SpooledLog",
    "TableSpec",
    "attach_labels",
    "ensure_table",
    "latest_labels",
    "read_labels",
    "read_predictions",
    "records_from_columns",
    "ship_all",
]
