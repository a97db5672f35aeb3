"""A crash-safe local spool: append-only segment files of JSON lines or Arrow records.

The request path of a service writes records here and returns; a shipper
(:mod:`driftloop.predlog`) later moves sealed segments into Delta in large batches.

Layout of one spool directory (one per table)::

    <writer>.<seq>.new           a segment being created (locked, then renamed to .open)
    <writer>.<seq>.open          the JSON-lines segment a live writer is appending to
                                 (flock held)
    <writer>.<seq>.<rows>.seg    a sealed JSON-lines segment: immutable, waiting to be shipped
    <writer>.<seq>.aopen         an Arrow segment being appended to (flock held)
    <writer>.<seq>.<rows>.aseg   a sealed Arrow segment
    rejected/<writer>.<seq>.jsonl  lines of a segment that could not be parsed
    rejected/<writer>.<seq>.arecords  framed Arrow records that could not be decoded
    .ship.lock                   flock taken by whichever process ships this directory

Two kinds of segment (:data:`JSON` and :data:`ARROW`), one kind per writer:

* JSON lines, one record per line: what the row endpoints and old spools hold.
* Arrow records, for column-wise appends: each ``write`` is one framed record holding a
  whole batch as an Arrow IPC stream (:func:`frame_arrow`)::

      b"DLA1" | rows (u32 LE) | payload length (u64 LE) | payload | crc32 (u32 LE) | b"DLA\n"

  The crc32 covers the row count, the length and the payload. The shipper hands the
  decoded batches to Delta as they are: no text to parse.

``<writer>`` is ``<start ms, hex>-<pid>-<random>``: unique per writer, so several
processes can share one directory. ``<seq>`` counts the writer's segments from 1; a
writer seals them in order, which is what lets the shipper record "writer W is
shipped up to segment N" as one Delta application transaction.

Durability: :meth:`SpoolWriter.write` hands the bytes to the kernel with one
``write(2)`` before it returns, so a SIGKILL of the process loses nothing that was
acknowledged. Surviving a machine (or kernel) crash also needs ``fsync=True``: one
fsync per write, plus one of the directory per segment created or sealed. Services
turn it on with the setting ``spool_fsync`` (``DRIFTLOOP_SPOOL_FSYNC=true``); it is off
by default (:data:`SPOOL_FSYNC_DEFAULT`), since a disk flush per request costs far more
than the rest of the request path.

Liveness: a writer holds an exclusive ``flock`` on its open segment. The kernel
drops it when the process dies, so :func:`seal_orphans` can tell a dead writer's
segment (lock obtainable) from a live one (lock busy) without pids or heartbeats.
This needs a local file system (flock is not reliable on every network mount).

A crash mid-write leaves a torn last record: for JSON lines, a last line with no
newline, which readers cut off (the partial record is skipped, never parsed); for
Arrow, a record whose frame is incomplete or whose checksum does not match, which
readers (and orphan sealing, when it counts rows) stop before. Everything before it
is recovered. A failed write seals its segment, so a torn record is always the last
one of its segment.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from driftloop.errors import LogError

logger = logging.getLogger(__name__)

#: fsync each write (survives a machine crash, costs a disk flush per call): the default
#: of a writer that is not told; services follow the setting ``spool_fsync``.
SPOOL_FSYNC_DEFAULT = False

SegmentKind = Literal["json", "arrow"]
JSON: SegmentKind = "json"
ARROW: SegmentKind = "arrow"
OPEN_SUFFIX = ".open"
TEMP_SUFFIX = ".new"
SEALED_SUFFIX = ".seg"
ARROW_OPEN_SUFFIX = ".aopen"
ARROW_SEALED_SUFFIX = ".aseg"
_SUFFIXES: dict[SegmentKind, tuple[str, str]] = {
    JSON: (OPEN_SUFFIX, SEALED_SUFFIX),
    ARROW: (ARROW_OPEN_SUFFIX, ARROW_SEALED_SUFFIX),
}
#: the file a rejected part of a segment is kept in, under ``rejected/``, by kind
REJECTED_SUFFIXES: dict[SegmentKind, str] = {JSON: ".jsonl", ARROW: ".arecords"}
REJECTED_DIR = "rejected"

# the frame of one Arrow record (see the module doc)
_ARROW_MAGIC = b"DLA1"
_ARROW_END = b"DLA\n"
_ARROW_HEADER = struct.Struct("<4sIQ")  # magic, rows, payload length
_ARROW_TRAILER = struct.Struct("<I4s")  # crc32, end marker
#: no single record is larger than this (a guard against a garbage length)
_ARROW_MAX_PAYLOAD = 1 << 34
_STALE_TEMP_SECONDS = 60.0
SHIP_LOCK = ".ship.lock"

# polars' ndjson reader cannot decode small integer types directly (it panics on Int8 in
# polars 2.1): read them as Int64 and cast strictly afterwards.
_WIDEN: dict[pl.DataType, pl.DataType] = {
    pl.Int8(): pl.Int64(),
    pl.Int16(): pl.Int64(),
    pl.Int32(): pl.Int64(),
}


@dataclass(frozen=True)
class SegmentName:
    """The parsed file name of a segment."""

    writer: str
    seq: int
    rows: int | None = None  # None while the segment is open
    kind: SegmentKind = JSON

    @property
    def id(self) -> str:
        return f"{self.writer}.{self.seq:08d}"

    def open_name(self) -> str:
        return f"{self.id}{_SUFFIXES[self.kind][0]}"

    def sealed_name(self, rows: int) -> str:
        return f"{self.id}.{rows}{_SUFFIXES[self.kind][1]}"

    def sealed(self, rows: int) -> SegmentName:
        return SegmentName(self.writer, self.seq, rows, self.kind)

    @classmethod
    def parse(cls, filename: str) -> SegmentName | None:
        """The name of a segment file (of either kind), or None for any other file."""
        for kind, (open_suffix, sealed_suffix) in _SUFFIXES.items():
            if filename.endswith(open_suffix):
                parts = filename[: -len(open_suffix)].split(".")
                if len(parts) == 2 and parts[1].isdigit():
                    return cls(parts[0], int(parts[1]), None, kind)
            elif filename.endswith(sealed_suffix):
                parts = filename[: -len(sealed_suffix)].split(".")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    return cls(parts[0], int(parts[1]), int(parts[2]), kind)
        return None


@dataclass(frozen=True)
class Segment:
    """A sealed segment on disk."""

    path: Path
    name: SegmentName

    @property
    def rows(self) -> int:
        return self.name.rows or 0

    @property
    def kind(self) -> SegmentKind:
        return self.name.kind


def new_writer_id() -> str:
    return f"{time.time_ns() // 1_000_000:x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolWriter:
    """Appends encoded records to the current segment; seals it by size or age.

    ``kind`` is what every write holds: complete JSON lines (:data:`JSON`) or framed
    Arrow records (:data:`ARROW`, see :func:`frame_arrow`). Thread-safe: one lock guards
    the file descriptor, the row count and rotation.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_rows: int,
        max_age_seconds: float,
        fsync: bool = SPOOL_FSYNC_DEFAULT,
        kind: SegmentKind = JSON,
    ) -> None:
        if max_rows < 1 or max_age_seconds <= 0:
            raise LogError("a spool segment needs max_rows >= 1 and max_age_seconds > 0")
        if kind not in _SUFFIXES:
            raise LogError(f"unknown spool segment kind {kind!r}")
        self.kind = kind
        self.directory = directory
        self.max_rows = max_rows
        self.max_age_seconds = max_age_seconds
        self.fsync = fsync
        self.writer_id = new_writer_id()
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._current: SegmentName | None = None
        self._seq = 0
        self._rows = 0
        self._opened_at = 0.0
        self._closed = False

    @property
    def open_rows(self) -> int:
        """Rows in the current (unsealed) segment."""
        return self._rows

    def write(self, payload: bytes, rows: int) -> None:
        """Append ``payload`` and hand it to the kernel in one ``write(2)`` (then fsync it
        when the writer was made with ``fsync=True``).

        ``payload`` holds ``rows`` records: complete JSON lines, or for an Arrow writer
        one or more records framed by :func:`frame_arrow`.
        """
        with self._lock:
            if self._closed:
                raise LogError("the spool writer is closed")
            if self._fd is not None and time.monotonic() - self._opened_at >= self.max_age_seconds:
                self._seal_locked()
            if self._fd is None:
                self._open_locked()
            assert self._fd is not None
            try:
                _write_all(self._fd, payload)
                if self.fsync:
                    os.fsync(self._fd)
            except OSError as exc:
                # part of the payload may be in the file: seal it, so that a torn line
                # can only ever be the last one of a segment
                with contextlib.suppress(LogError):
                    self._seal_locked()
                raise LogError(f"could not write to the spool {self.directory}: {exc}") from exc
            self._rows += rows
            if self._rows >= self.max_rows:
                self._seal_locked()

    def seal_if_older(self, max_age_seconds: float | None = None) -> bool:
        """Seal the current segment if it is older than ``max_age_seconds``; True if sealed."""
        limit = self.max_age_seconds if max_age_seconds is None else max_age_seconds
        with self._lock:
            if self._fd is not None and time.monotonic() - self._opened_at >= limit:
                self._seal_locked()
                return True
        return False

    def seal(self) -> None:
        """Seal the current segment now (no-op when nothing is open)."""
        with self._lock:
            self._seal_locked()

    def close(self) -> None:
        """Seal the current segment and refuse further writes."""
        with self._lock:
            self._seal_locked()
            self._closed = True

    # -- internals (lock held) ---------------------------------------------------
    def _open_locked(self) -> None:
        self._seq += 1
        name = SegmentName(self.writer_id, self._seq, None, self.kind)
        temp = self.directory / f"{name.id}{TEMP_SUFFIX}"
        try:
            # lock under a temporary name, then rename: a segment never appears under
            # its .open name unlocked, where recovery would take it for an orphan
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(temp, self.directory / name.open_name())
            if self.fsync:
                _fsync_dir(self.directory)
        except OSError as exc:
            raise LogError(f"could not open a spool segment in {self.directory}: {exc}") from exc
        self._fd, self._current, self._rows = fd, name, 0
        self._opened_at = time.monotonic()

    def _seal_locked(self) -> None:
        if self._fd is None or self._current is None:
            return
        fd, name, rows = self._fd, self._current, self._rows
        self._fd, self._current, self._rows = None, None, 0
        try:
            if self.fsync:
                os.fsync(fd)
            # rename while the flock is held, so recovery never sees a half-sealed segment
            os.rename(self.directory / name.open_name(), self.directory / name.sealed_name(rows))
            if self.fsync:
                _fsync_dir(self.directory)
        except OSError as exc:
            raise LogError(f"could not seal spool segment {name.id}: {exc}") from exc
        finally:
            os.close(fd)


def seal_orphans(directory: Path) -> list[Segment]:
    """Seal the open segments of dead writers (their flock is free); return them.

    Segments of live writers (in this process or another) are left alone. An orphan
    that holds no complete line is deleted.
    """
    sealed: list[Segment] = []
    if not directory.is_dir():
        return sealed
    for path in directory.glob(f"*{TEMP_SUFFIX}"):
        # a writer died between creating and naming an (empty) segment
        with contextlib.suppress(FileNotFoundError):
            if time.time() - path.stat().st_mtime > _STALE_TEMP_SECONDS:
                path.unlink()
    for path in sorted(directory.iterdir()):
        name = SegmentName.parse(path.name)
        if name is None or name.rows is not None:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # sealed by its writer meanwhile
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # the writer is alive
            rows = _count_complete_lines(fd) if name.kind == JSON else _count_arrow_rows(fd)
            try:
                if rows == 0:
                    path.unlink()
                    continue
                target = directory / name.sealed_name(rows)
                os.rename(path, target)
            except FileNotFoundError:  # sealed by its writer between our open and flock
                continue
            logger.info("sealed orphan spool segment %s (%d rows)", name.id, rows)
            sealed.append(Segment(target, name.sealed(rows)))
        finally:
            os.close(fd)
    return sealed


def _count_complete_lines(fd: int) -> int:
    count = 0
    with os.fdopen(os.dup(fd), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            count += chunk.count(b"\n")
    return count


def _count_arrow_rows(fd: int) -> int:
    with os.fdopen(os.dup(fd), "rb") as f:
        f.seek(0)
        data = f.read()
    return sum(rows for rows, _ in iter_arrow_records(data)[0])


def frame_arrow(payload: bytes | memoryview, rows: int) -> bytes:
    """One Arrow spool record: ``payload`` (an Arrow IPC stream of ``rows`` rows) framed
    with its length, row count and checksum (see the module doc)."""
    if not 0 <= rows < 2**32:
        raise LogError(f"an Arrow spool record holds 0 to 2**32 - 1 rows, not {rows}")
    header = _ARROW_HEADER.pack(_ARROW_MAGIC, rows, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(header[4:]))
    return b"".join((header, payload, _ARROW_TRAILER.pack(crc, _ARROW_END)))


def iter_arrow_records(data: bytes) -> tuple[list[tuple[int, memoryview]], int]:
    """The complete records of an Arrow segment: ([(rows, payload), ...], bytes dropped).

    Reading stops at the first record that is incomplete (a torn last write) or whose
    frame or checksum is wrong; the bytes from there on are dropped (and counted).
    """
    view = memoryview(data)
    records: list[tuple[int, memoryview]] = []
    offset, end = 0, len(data)
    head, tail = _ARROW_HEADER.size, _ARROW_TRAILER.size
    while offset < end:
        if end - offset < head + tail:
            break
        magic, rows, length = _ARROW_HEADER.unpack_from(view, offset)
        stop = offset + head + length
        if magic != _ARROW_MAGIC or length > _ARROW_MAX_PAYLOAD or stop + tail > end:
            break
        crc, marker = _ARROW_TRAILER.unpack_from(view, stop)
        payload = view[offset + head : stop]
        if marker != _ARROW_END or crc != zlib.crc32(
            payload, zlib.crc32(view[offset + 4 : offset + head])
        ):
            break
        records.append((rows, payload))
        offset = stop + tail
    return records, end - offset


def list_sealed(directory: Path) -> list[Segment]:
    """Sealed segments in ``directory``, sorted by writer then sequence number."""
    if not directory.is_dir():
        return []
    found = []
    for entry in os.scandir(directory):
        name = SegmentName.parse(entry.name)
        if name is not None and name.rows is not None:
            found.append(Segment(Path(entry.path), name))
    return sorted(found, key=lambda s: (s.name.writer, s.name.seq))


def sealed_backlog(directory: Path) -> tuple[int, int, float]:
    """(segments, rows, age in seconds of the oldest) of the sealed segments in ``directory``."""
    segments = list_sealed(directory)
    oldest = 0.0
    now = time.time()
    for seg in segments:
        with contextlib.suppress(FileNotFoundError):
            oldest = max(oldest, now - seg.path.stat().st_mtime)
    return len(segments), sum(s.rows for s in segments), oldest


@contextlib.contextmanager
def ship_lock(directory: Path, *, wait: bool) -> Iterator[bool]:
    """Hold the directory's ship lock; yields False when ``wait`` is False and it is busy."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / SHIP_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _wire_schema(schema: Mapping[str, pl.DataType]) -> dict[str, pl.DataType]:
    return {
        c: pl.String() if isinstance(t, pl.Datetime) else _WIDEN.get(t, t)
        for c, t in schema.items()
    }


#: timestamp spellings accepted in a spool (RFC 3339 with offset or Z, optional
#: fraction; naive ones are UTC). polars parses them ~10x faster as strings with an
#: explicit format than through the ndjson reader's own datetime inference.
_TIMESTAMP_FORMATS = (
    "%+",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f",
)


def _parse_timestamps(raw: pl.Series, dtype: pl.Datetime) -> pl.Series:
    """Parse a string column; rows that match no accepted spelling become null."""
    unit, zone = dtype.time_unit, dtype.time_zone or "UTC"
    parsed = raw.str.to_datetime(
        _TIMESTAMP_FORMATS[0], strict=False, time_unit=unit, time_zone=zone
    )
    if (parsed.is_null() & raw.is_not_null()).any():  # rare: try the other spellings
        parsed = pl.select(
            pl.coalesce(
                parsed,
                *(
                    raw.str.to_datetime(fmt, strict=False, time_unit=unit, time_zone=zone)
                    for fmt in _TIMESTAMP_FORMATS[1:]
                ),
            )
        ).to_series()
    return parsed.alias(raw.name)


def parse_lines(data: bytes, schema: Mapping[str, pl.DataType]) -> tuple[pl.DataFrame, list[bytes]]:
    """Decode JSON lines into a frame of ``schema``; returns (frame, rejected lines).

    Anything after the last newline is a torn write and is dropped. Lines that do not
    parse or do not fit the schema are returned as rejected instead of failing the
    whole segment.
    """
    end = data.rfind(b"\n")
    body = data[: end + 1]
    if end + 1 < len(data):
        logger.warning("dropped a torn last line of %d bytes", len(data) - end - 1)
    lines = [line for line in body.splitlines(keepends=True) if line.strip()]
    if not lines:
        return pl.DataFrame(schema=dict(schema)), []
    try:
        frame, bad = _decode(body, schema)
        if frame.height == len(lines):
            return frame.filter(~bad), [line for line, b in zip(lines, bad, strict=True) if b]
    except pl.exceptions.PolarsError:
        pass
    # slow path, line by line: a line that breaks the schema fails the bulk decode
    good: list[pl.DataFrame] = []
    rejected: list[bytes] = []
    for line in lines:
        try:
            row, row_bad = _decode(line, schema)
        except pl.exceptions.PolarsError:
            rejected.append(line)
            continue
        if row.height != 1 or row_bad.any():
            rejected.append(line)
        else:
            good.append(row)
    frame = pl.concat(good, how="vertical") if good else pl.DataFrame(schema=dict(schema))
    return frame, rejected


def _decode(body: bytes, schema: Mapping[str, pl.DataType]) -> tuple[pl.DataFrame, pl.Series]:
    """(frame, mask of rows whose timestamps do not parse); raises PolarsError."""
    raw = pl.read_ndjson(io.BytesIO(body), schema=_wire_schema(schema))
    stamps = {
        c: _parse_timestamps(raw[c], t) for c, t in schema.items() if isinstance(t, pl.Datetime)
    }
    bad = pl.repeat(False, raw.height, dtype=pl.Boolean(), eager=True)
    for c, parsed in stamps.items():
        bad = bad | (raw[c].is_not_null() & parsed.is_null())
    frame = raw.with_columns(stamps.values()).cast(dict(schema), strict=True)  # type: ignore[arg-type]
    return frame, bad


def parse_arrow(data: bytes, schema: Mapping[str, pl.DataType]) -> tuple[pl.DataFrame, list[bytes]]:
    """Decode framed Arrow records into a frame of ``schema``: (frame, rejected records).

    A torn or corrupt tail is dropped (see :func:`iter_arrow_records`). A record that
    does not decode, lacks a column of ``schema``, has one it does not know, or whose
    values do not cast to it exactly is returned (framed again) as rejected.
    """
    records, dropped = iter_arrow_records(data)
    if dropped:
        logger.warning("dropped a torn or corrupt last Arrow record of %d bytes", dropped)
    frames: list[pl.DataFrame] = []
    rejected: list[bytes] = []
    names = list(schema)
    wanted = pl.Schema(schema)
    for rows, payload in records:
        try:
            frame = pl.read_ipc_stream(io.BytesIO(payload))
            if set(frame.columns) != set(names) or frame.height != rows:
                raise LogError(
                    f"columns {sorted(frame.columns)} and {frame.height} rows, expected "
                    f"{sorted(names)} and {rows} rows"
                )
            frame = frame.select(names)
            if frame.schema != wanted:  # what our writers write needs no cast
                frame = frame.cast(dict(schema), strict=True)  # type: ignore[arg-type]
            frames.append(frame)
        except (pl.exceptions.PolarsError, OSError, LogError) as exc:
            logger.warning(
                "an Arrow spool record of %d rows does not fit the schema: %s", rows, exc
            )
            rejected.append(frame_arrow(bytes(payload), rows))
    if not frames:
        return pl.DataFrame(schema=dict(schema)), rejected
    return (frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")), rejected


def read_segment(
    segment: Segment, schema: Mapping[str, pl.DataType]
) -> tuple[pl.DataFrame, list[bytes]]:
    """Read a sealed segment of either kind: (frame, rejected lines or records)."""
    data = segment.path.read_bytes()
    if segment.kind == ARROW:
        return parse_arrow(data, schema)
    return parse_lines(data, schema)
