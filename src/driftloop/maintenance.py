"""Maintenance of the log tables: compaction, checkpoints, vacuum.

The shipper writes one small file per partition per commit; :func:`compact` bins
them into large files, :func:`checkpoint` keeps the Delta log quick to load and
trims it, :func:`vacuum` deletes data files no version still needs.

*Protected versions* are Delta versions something still points to (a model's
reference data is "table ``predictions`` at version N"). Neither vacuum nor log
cleanup may make them unreadable:

- vacuum deletes a removed file when its removal is older than the retention. Every
  file version P needs was removed after P was committed, so a retention of at least
  the age of the oldest protected version keeps all of them (:func:`effective_retention_hours`);
  the protected versions are also passed to delta-rs as ``keep_versions``.
- the log before the oldest protected version is only trimmed after a checkpoint at
  that version, so it can still be loaded (driftloop creates its tables with expired
  log cleanup off, so commits never trim the log on their own).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError
from pydantic import BaseModel

from driftloop.errors import LogError
from driftloop.predlog import MAX_COMMIT_ATTEMPTS, PARTITION_COLUMN, TABLES
from driftloop.settings import Settings

if TYPE_CHECKING:
    from driftloop.registry import Lineage


class CompactResult(BaseModel):
    table: str
    version: int | None
    files_added: int
    files_removed: int
    partitions: int
    seconds: float


class CheckpointResult(BaseModel):
    table: str
    version: int | None
    log_trimmed_before: int | None
    seconds: float


class VacuumResult(BaseModel):
    table: str
    requested_retention_hours: int
    effective_retention_hours: int
    protected_versions: list[int]
    files_deleted: int
    seconds: float


def _open(settings: Settings, table: str) -> DeltaTable | None:
    if table not in TABLES:
        raise LogError(f"unknown log table {table!r}; expected one of {sorted(TABLES)}")
    uri = settings.table(table)
    return DeltaTable(uri) if DeltaTable.is_deltatable(uri) else None


def compact(
    settings: Settings,
    table: str,
    *,
    since: date | None = None,
    target_size: int | None = None,
) -> CompactResult:
    """Bin-pack small files (of partitions ``date >= since`` when given).

    Runs safely next to appending shippers (appends never conflict with it); a
    conflicting compaction or delete makes it retry from a fresh snapshot.
    """
    started = time.perf_counter()
    filters = None if since is None else [(PARTITION_COLUMN, ">=", since.isoformat())]
    attempt = 0
    while (dt := _open(settings, table)) is not None:
        try:
            metrics = dt.optimize.compact(partition_filters=filters, target_size=target_size)
        except CommitFailedError as exc:  # a concurrent compaction or delete
            attempt += 1
            if attempt == MAX_COMMIT_ATTEMPTS:
                raise LogError(f"compaction of {table} kept conflicting: {exc}") from exc
            time.sleep(0.1 * 2**attempt)
            continue
        except DeltaError as exc:
            raise LogError(f"compaction of {table} failed: {exc}") from exc
        return CompactResult(
            table=table,
            version=dt.version(),
            files_added=int(metrics.get("numFilesAdded", 0)),
            files_removed=int(metrics.get("numFilesRemoved", 0)),
            partitions=int(metrics.get("partitionsOptimized", 0)),
            seconds=time.perf_counter() - started,
        )
    return CompactResult(
        table=table, version=None, files_added=0, files_removed=0, partitions=0, seconds=0
    )


def _version_timestamp(settings: Settings, table: str, version: int) -> datetime:
    """Commit time of ``version``, read from that version's own commit info."""
    try:
        dt = DeltaTable(settings.table(table), version=version)
        commit = dt.history(limit=1)[0]
    except (DeltaError, IndexError) as exc:
        raise LogError(f"{table} version {version} cannot be loaded: {exc}") from exc
    if commit.get("version") != version:
        raise LogError(f"{table} version {version}: history returned {commit.get('version')}")
    return datetime.fromtimestamp(commit["timestamp"] / 1000, tz=UTC)


def effective_retention_hours(
    retention_hours: int, protected_commit_times: Iterable[datetime], now: datetime
) -> int:
    """The retention to vacuum with so that every protected version stays readable.

    The requested retention, lengthened to the age (rounded up to whole hours, plus
    one for clock skew) of the oldest protected version when that version is older.
    """
    times = list(protected_commit_times)
    if not times:
        return retention_hours
    age_hours = (now - min(times)).total_seconds() / 3600
    if age_hours < retention_hours:
        return retention_hours
    return max(retention_hours, math.ceil(age_hours) + 1)


def vacuum(
    settings: Settings,
    table: str,
    *,
    retention_hours: int,
    protected_versions: Sequence[int] = (),
    dry_run: bool = False,
) -> VacuumResult:
    """Delete data files older than the retention that no protected version needs."""
    started = time.perf_counter()
    protected = sorted(set(protected_versions))
    dt = _open(settings, table)
    if dt is None:
        return VacuumResult(
            table=table,
            requested_retention_hours=retention_hours,
            effective_retention_hours=retention_hours,
            protected_versions=protected,
            files_deleted=0,
            seconds=0,
        )
    times = [_version_timestamp(settings, table, v) for v in protected[:1]]  # the oldest decides
    effective = effective_retention_hours(retention_hours, times, datetime.now(UTC))
    try:
        deleted = dt.vacuum(
            retention_hours=effective,
            dry_run=dry_run,
            enforce_retention_duration=False,  # the caller chose the retention explicitly
            keep_versions=protected or None,
        )
    except DeltaError as exc:
        raise LogError(f"vacuum of {table} failed: {exc}") from exc
    return VacuumResult(
        table=table,
        requested_retention_hours=retention_hours,
        effective_retention_hours=effective,
        protected_versions=protected,
        files_deleted=len(deleted),
        seconds=time.perf_counter() - started,
    )


def checkpoint(
    settings: Settings,
    table: str,
    *,
    protected_versions: Sequence[int] = (),
    trim_log: bool = True,
) -> CheckpointResult:
    """Checkpoint the latest version; with ``trim_log`` delete expired log files
    (older than ``delta.logRetentionDuration``, 30 days by default) that come before
    both the latest version and the oldest protected one.

    The retention is the one configured at that oldest kept version (delta-rs reads
    it from the loaded snapshot)."""
    started = time.perf_counter()
    dt = _open(settings, table)
    if dt is None:
        return CheckpointResult(table=table, version=None, log_trimmed_before=None, seconds=0)
    try:
        dt.create_checkpoint()
        latest = dt.version()
        trimmed_before = None
        if trim_log:
            keep_from = min([latest, *protected_versions])
            if keep_from != latest:
                # a checkpoint at the oldest protected version keeps it loadable once
                # the log before it is gone
                dt.load_as_version(keep_from)
                dt.create_checkpoint()
            dt.cleanup_metadata()
            trimmed_before = keep_from
    except DeltaError as exc:
        raise LogError(f"checkpoint of {table} failed: {exc}") from exc
    return CheckpointResult(
        table=table,
        version=latest,
        log_trimmed_before=trimmed_before,
        seconds=time.perf_counter() - started,
    )


def protected_versions_from_lineage(lineages: Iterable[Lineage]) -> dict[str, list[int]]:
    """The ``predictions`` / ``labels`` versions that registered models point to."""
    out: dict[str, set[int]] = {"predictions": set(), "labels": set()}
    for lineage in lineages:
        if lineage.predictions_version is not None:
            out["predictions"].add(lineage.predictions_version)
        if lineage.labels_version is not None:
            out["labels"].add(lineage.labels_version)
    return {table: sorted(versions) for table, versions in out.items()}
