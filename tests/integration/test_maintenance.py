"""Maintenance of the log tables on real Delta tables: compact, checkpoint, vacuum, the flow."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from driftloop import maintenance
from driftloop.predlog import PREDICTIONS, PredictionLog, ensure_table, read_predictions
from driftloop.registry import Lineage
from driftloop.settings import Settings

T0 = datetime(2025, 3, 1, 12, tzinfo=UTC)


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_root=str(tmp_path / "data"), state_dir=tmp_path / "state")


def _commits(settings: Settings, commits: int, per_commit: int = 10, start: int = 0) -> None:
    """``commits`` shipping commits of ``per_commit`` predictions over two days."""
    log = PredictionLog(settings)
    for c in range(start, start + commits):
        log.append(
            [
                {
                    "request_id": f"r{c}-{i}",
                    "received_at": T0 + timedelta(hours=c % 2 * 24, minutes=i),
                }
                for i in range(per_commit)
            ]
        )
        log.flush()
    log.stop(flush=False)


def _snapshot(settings: Settings, version: int) -> list[str]:
    return sorted(pl.read_delta(settings.table("predictions"), version=version)["request_id"])


@pytest.mark.parametrize(
    ("retention", "age_hours", "expected"),
    [
        (168, None, 168),  # nothing protected
        (168, 2.0, 168),  # protected version younger than the retention: unchanged
        (168, 167.5, 168),
        (168, 168.0, 169),  # as old as the retention: lengthened past its age
        (168, 1000.2, 1002),  # older: ceil(age) + 1 hour of clock margin
        (0, 0.01, 2),
        (0, None, 0),
    ],
)
def test_effective_retention_covers_the_oldest_protected_version(
    retention: int, age_hours: float | None, expected: int
) -> None:
    now = datetime(2025, 6, 1, tzinfo=UTC)
    protected = [] if age_hours is None else [now - timedelta(hours=age_hours)]
    got = maintenance.effective_retention_hours(retention, protected, now)
    assert got == expected
    if age_hours is not None:
        assert got >= age_hours


def test_protected_versions_come_from_model_lineage() -> None:
    lineages = [
        Lineage(predictions_version=7, labels_version=3),
        Lineage(predictions_version=2),
        Lineage(predictions_version=7),
        Lineage(),
    ]
    assert maintenance.protected_versions_from_lineage(lineages) == {
        "predictions": [2, 7],
        "labels": [3],
    }


@pytest.mark.integration
def test_compact_merges_small_files_and_keeps_every_row(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _commits(settings, 8)
    table = DeltaTable(settings.table("predictions"))
    before = Counter(
        read_predictions(settings, T0 - timedelta(days=1), T0 + timedelta(days=3))["request_id"]
    )
    assert len(table.file_uris()) == 8

    result = maintenance.compact(settings, "predictions")

    assert (result.files_removed, result.files_added, result.partitions) == (8, 2, 2)
    assert len(DeltaTable(settings.table("predictions")).file_uris()) == 2  # one per day
    after = Counter(
        read_predictions(settings, T0 - timedelta(days=1), T0 + timedelta(days=3))["request_id"]
    )
    assert after == before and sum(after.values()) == 80
    assert maintenance.compact(settings, "predictions").files_removed == 0, "idempotent"
    since = maintenance.compact(settings, "predictions", since=(T0 + timedelta(days=1)).date())
    assert since.files_removed == 0


@pytest.mark.integration
def test_vacuum_keeps_protected_versions_readable(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _commits(settings, 4)
    protected = DeltaTable(settings.table("predictions")).version()
    expected = _snapshot(settings, protected)
    maintenance.compact(settings, "predictions")  # removes the files `protected` reads
    _commits(settings, 4, start=4)
    maintenance.compact(settings, "predictions")
    latest = _snapshot(settings, DeltaTable(settings.table("predictions")).version())

    kept = maintenance.vacuum(
        settings, "predictions", retention_hours=0, protected_versions=[protected]
    )

    assert kept.effective_retention_hours >= 1 and kept.protected_versions == [protected]
    assert _snapshot(settings, protected) == expected, "the protected version still reads"
    assert _snapshot(settings, DeltaTable(settings.table("predictions")).version()) == latest
    week = maintenance.vacuum(
        settings, "predictions", retention_hours=168, protected_versions=[protected]
    )
    assert week.effective_retention_hours == 168, "a young protected version shortens nothing"

    # control: without protection the same vacuum deletes what that version needs
    dropped = maintenance.vacuum(settings, "predictions", retention_hours=0)
    assert dropped.files_deleted > 0
    with pytest.raises(Exception):  # noqa: B017 - its files are gone
        _snapshot(settings, protected)
    assert _snapshot(settings, DeltaTable(settings.table("predictions")).version()) == latest


@pytest.mark.integration
def test_checkpoint_trims_the_log_but_not_before_a_protected_version(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    uri = settings.table("predictions")
    # expire log entries at once, so the trim is visible in a test
    ensure_table(settings, PREDICTIONS).alter.set_table_properties(
        {"delta.logRetentionDuration": "interval 0 seconds"}
    )
    _commits(settings, 6)
    protected = 3
    expected = _snapshot(settings, protected)

    result = maintenance.checkpoint(settings, "predictions", protected_versions=[protected])

    assert result.log_trimmed_before == protected and result.version == 7
    assert _snapshot(settings, protected) == expected
    assert len(_snapshot(settings, result.version)) == 60
    with pytest.raises(Exception):  # noqa: B017 - versions before it were trimmed
        DeltaTable(uri, version=protected - 1)
    _commits(settings, 1, start=6)  # the table keeps working
    assert len(_snapshot(settings, DeltaTable(uri).version())) == 70


@pytest.mark.integration
def test_missing_tables_are_a_no_op(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert maintenance.compact(settings, "labels").version is None
    assert maintenance.checkpoint(settings, "labels").version is None
    assert maintenance.vacuum(settings, "labels", retention_hours=0).files_deleted == 0


@pytest.mark.integration
def test_maintain_logs_flow(
    tmp_path: Path, prefect_api_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.maintain_logs import MaintainLogsParams, maintain_logs

    settings = _settings(tmp_path)
    monkeypatch.setenv("DRIFTLOOP_DATA_ROOT", settings.data_root)
    monkeypatch.setenv("DRIFTLOOP_STATE_DIR", str(settings.state_dir))
    _commits(settings, 4)
    protected = DeltaTable(settings.table("predictions")).version()
    expected = _snapshot(settings, protected)
    spooled = PredictionLog(settings, ship=False)  # left in the spool: the flow ships it
    spooled.append([{"request_id": "spooled", "received_at": T0}])
    spooled.stop(flush=False)

    results = maintain_logs(
        MaintainLogsParams(
            compact_days=None,
            retention_hours=0,
            protected_versions={"predictions": [protected]},
            protect_model_versions=False,
        )
    )

    assert [r.table for r in results] == ["predictions", "labels"]
    assert results[0].protected_versions == [protected]
    assert _snapshot(settings, protected) == expected
    table = DeltaTable(settings.table("predictions"))
    assert len(table.file_uris()) == 2, "compacted to one file per day"
    assert "spooled" in _snapshot(settings, table.version())
