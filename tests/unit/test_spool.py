"""The local spool: rotation, torn-line recovery, thread safety, record validation."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import polars as pl
import pytest

from driftloop import spool
from driftloop.errors import LogError, SchemaError
from driftloop.predlog import LabelLog, PredictionLog
from driftloop.schema import PREDICTION_SCHEMA
from driftloop.settings import Settings

SCHEMA = {"id": pl.String(), "n": pl.Int64(), "flag": pl.Int8(), "x": pl.Float64()}


def _lines(*ids: str) -> bytes:
    return b"".join(orjson.dumps({"id": i, "n": 1}) + b"\n" for i in ids)


def _ids(directory: Path) -> list[str]:
    out: list[str] = []
    for seg in spool.list_sealed(directory):
        frame, rejected = spool.read_segment(seg, SCHEMA)
        assert not rejected
        assert frame.height == seg.rows, "the row count in the name matches the file"
        out += frame["id"].to_list()
    return out


@pytest.mark.parametrize("fsync", [False, True])
def test_segments_rotate_by_size_and_are_named_in_order(tmp_path: Path, fsync: bool) -> None:
    writer = spool.SpoolWriter(tmp_path, max_rows=10, max_age_seconds=60, fsync=fsync)
    for batch in range(5):
        writer.write(_lines(*[f"{batch}-{i}" for i in range(5)]), 5)
    sealed = spool.list_sealed(tmp_path)
    assert [s.rows for s in sealed] == [10, 10]
    assert [s.name.seq for s in sealed] == [1, 2]
    assert {s.name.writer for s in sealed} == {writer.writer_id}
    assert writer.open_rows == 5
    assert len(list(tmp_path.glob("*.open"))) == 1

    writer.close()
    assert [s.rows for s in spool.list_sealed(tmp_path)] == [10, 10, 5]
    assert not list(tmp_path.glob("*.open"))
    assert _ids(tmp_path) == [f"{b}-{i}" for b in range(5) for i in range(5)]
    with pytest.raises(LogError):
        writer.write(_lines("late"), 1)


def test_segments_rotate_by_age(tmp_path: Path) -> None:
    writer = spool.SpoolWriter(tmp_path, max_rows=1000, max_age_seconds=0.05)
    writer.write(_lines("a"), 1)
    assert not writer.seal_if_older(), "younger than its age limit"
    time.sleep(0.06)
    writer.write(_lines("b"), 1)  # an old segment is sealed before the write
    assert [s.rows for s in spool.list_sealed(tmp_path)] == [1]
    time.sleep(0.06)
    assert writer.seal_if_older()  # the background thread's call, with no writes
    assert [s.rows for s in spool.list_sealed(tmp_path)] == [1, 1]
    assert not writer.seal_if_older(), "nothing open"
    assert _ids(tmp_path) == ["a", "b"]


def test_writers_in_one_directory_get_distinct_names(tmp_path: Path) -> None:
    a = spool.SpoolWriter(tmp_path, max_rows=1, max_age_seconds=60)
    b = spool.SpoolWriter(tmp_path, max_rows=1, max_age_seconds=60)
    a.write(_lines("a"), 1)
    b.write(_lines("b"), 1)
    assert a.writer_id != b.writer_id
    assert str(os.getpid()) in a.writer_id
    assert sorted(_ids(tmp_path)) == ["a", "b"]


def test_torn_last_line_of_a_dead_writer_is_skipped(tmp_path: Path) -> None:
    # what a process killed in the middle of a write leaves: complete lines + a torn one
    name = spool.SegmentName("0-1-dead", 7)
    (tmp_path / name.open_name()).write_bytes(_lines("a", "b") + b'{"id": "c", "n"')
    empty = spool.SegmentName("0-1-dead", 8)
    (tmp_path / empty.open_name()).write_bytes(b'{"id": "d"')  # only a torn line

    sealed = spool.seal_orphans(tmp_path)

    assert [(s.name.id, s.rows) for s in sealed] == [(name.id, 2)]
    assert not (tmp_path / empty.open_name()).exists(), "nothing complete: deleted"
    frame, rejected = spool.read_segment(sealed[0], SCHEMA)
    assert frame["id"].to_list() == ["a", "b"]
    assert rejected == []


def test_live_writer_segment_is_not_taken_by_recovery(tmp_path: Path) -> None:
    writer = spool.SpoolWriter(tmp_path, max_rows=100, max_age_seconds=60)
    writer.write(_lines("a"), 1)
    assert spool.seal_orphans(tmp_path) == []  # its flock is held (even by this process)
    assert len(list(tmp_path.glob("*.open"))) == 1
    writer.write(_lines("b"), 1)
    writer.close()
    assert _ids(tmp_path) == ["a", "b"]


def test_recovery_running_alongside_never_takes_a_live_segment(tmp_path: Path) -> None:
    # the shipper thread (or another process) recovers orphans while this writer
    # rotates segments quickly: a just-created segment must never look orphaned
    writer = spool.SpoolWriter(tmp_path, max_rows=2, max_age_seconds=60)
    done = threading.Event()
    taken: list[spool.Segment] = []

    def recover() -> None:
        while not done.is_set():
            taken.extend(spool.seal_orphans(tmp_path))

    thread = threading.Thread(target=recover)
    thread.start()
    try:
        for i in range(800):
            writer.write(_lines(f"r{i}"), 1)
    finally:
        done.set()
        thread.join()
    writer.close()
    assert taken == []
    assert sorted(_ids(tmp_path)) == sorted(f"r{i}" for i in range(800))


def test_lines_that_break_the_schema_are_rejected_not_fatal() -> None:
    data = _lines("a") + b'{"id": "b", "n": "x"}\n' + b'{"id": "c", "flag": 300}\n' + b"\0\0\n"
    data += _lines("d")
    frame, rejected = spool.parse_lines(data, SCHEMA)
    assert frame["id"].to_list() == ["a", "d"]
    assert frame.schema == pl.Schema(SCHEMA)
    assert len(rejected) == 3


def test_timestamps_in_any_rfc3339_spelling_parse_as_utc() -> None:
    schema = {"id": pl.String(), "at": pl.Datetime("us", "UTC")}
    spellings = [
        "2025-03-01T12:00:00+00:00",
        "2025-03-01T12:00:00.250000+00:00",
        "2025-03-01T12:00:00Z",
        "2025-03-01T14:00:00+02:00",
        "2025-03-01T12:00:00",  # naive: UTC
        "2025-03-01 12:00:00",
    ]
    data = b"".join(orjson.dumps({"id": str(i), "at": v}) + b"\n" for i, v in enumerate(spellings))
    data += b'{"id": "bad", "at": "yesterday"}\n{"id": "none", "at": null}\n'
    frame, rejected = spool.parse_lines(data, schema)
    assert rejected == [b'{"id": "bad", "at": "yesterday"}\n']
    noon = datetime(2025, 3, 1, 12, tzinfo=UTC)
    assert frame["at"].to_list() == [
        noon,
        noon + timedelta(milliseconds=250),
        noon,
        noon,
        noon,
        noon,
        None,
    ]


def test_many_threads_append_without_loss_or_interleaving(tmp_path: Path) -> None:
    writer = spool.SpoolWriter(tmp_path, max_rows=37, max_age_seconds=60)
    threads, per_thread = 16, 300
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            k = 1 + i % 3  # batches of 1..3 records
            writer.write(_lines(*[f"{t}-{i}-{j}" for j in range(k)]), k)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    writer.close()

    ids = _ids(tmp_path)  # every line parses: no interleaved writes
    expected = {
        f"{t}-{i}-{j}" for t in range(threads) for i in range(per_thread) for j in range(1 + i % 3)
    }
    assert len(ids) == len(expected) == len(set(ids))
    assert set(ids) == expected
    seqs = [s.name.seq for s in spool.list_sealed(tmp_path)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert all(s.rows <= 37 + 2 for s in spool.list_sealed(tmp_path))


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_root=str(tmp_path / "data"), state_dir=tmp_path / "state", **kw)  # type: ignore[arg-type]


def test_prediction_log_validates_and_completes_records(tmp_path: Path) -> None:
    log = PredictionLog(_settings(tmp_path), ship=False)
    with pytest.raises(SchemaError, match="unknown columns"):
        log.append([{"request_id": "r1", "not_a_column": 1}])
    with pytest.raises(SchemaError, match="request_id"):
        log.append([{"amount": 1.0}])
    with pytest.raises(SchemaError, match="encoded"):
        log.append([{"request_id": "r1", "amount": object()}])
    log.append([{"request_id": "r1", "amount": 2.5, "decision": 1}])
    log.append([])
    log.stop(flush=False)

    (seg,) = spool.list_sealed(log.directory)
    frame, rejected = spool.read_segment(seg, PREDICTION_SCHEMA)
    assert not rejected
    row = frame.row(0, named=True)
    assert (row["request_id"], row["amount"], row["decision"]) == ("r1", 2.5, 1)
    assert row["received_at"] is not None, "received_at defaults to the time of append"


def test_label_log_requires_a_key_and_a_label(tmp_path: Path) -> None:
    log = LabelLog(_settings(tmp_path), ship=False)
    with pytest.raises(SchemaError):
        log.append([{"label": 1}])
    with pytest.raises(SchemaError):
        log.append([{"transaction_id": "t1"}])
    log.append([{"transaction_id": "t1", "label": 1}])
    assert log.backlog_rows() == 1
    log.stop(flush=False)
    stats = log.stats()
    assert (stats.open_rows, stats.sealed_segments, stats.backlog_rows) == (0, 1, 1)
