"""The local spool: rotation, torn-line recovery, thread safety, record validation."""

from __future__ import annotations

import io
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


# -- Arrow segments ------------------------------------------------------------------
def _arrow(*ids: str) -> bytes:
    """One framed Arrow record of ``ids`` (n = 1, x = the index)."""
    frame = pl.DataFrame(
        {
            "id": list(ids),
            "n": [1] * len(ids),
            "flag": [0] * len(ids),
            "x": [float(i) for i in range(len(ids))],
        },
        schema=SCHEMA,
    )
    buffer = io.BytesIO()
    frame.write_ipc_stream(buffer)
    return spool.frame_arrow(buffer.getvalue(), len(ids))


def test_arrow_segments_are_their_own_kind_and_read_back_typed(tmp_path: Path) -> None:
    writer = spool.SpoolWriter(tmp_path, max_rows=5, max_age_seconds=60, kind=spool.ARROW)
    writer.write(_arrow("a", "b", "c"), 3)
    assert len(list(tmp_path.glob("*.aopen"))) == 1 and not list(tmp_path.glob("*.open"))
    writer.write(_arrow("d", "e"), 2)  # 5 rows: sealed
    writer.write(_arrow("f"), 1)
    writer.close()

    sealed = spool.list_sealed(tmp_path)
    assert [(s.kind, s.rows, s.path.suffix) for s in sealed] == [
        ("arrow", 5, ".aseg"),
        ("arrow", 1, ".aseg"),
    ]
    assert spool.SegmentName.parse(sealed[0].path.name) == sealed[0].name
    frame, rejected = spool.read_segment(sealed[0], SCHEMA)
    assert rejected == []
    assert frame.schema == pl.Schema(SCHEMA)
    assert frame["id"].to_list() == ["a", "b", "c", "d", "e"]
    assert _ids(tmp_path) == ["a", "b", "c", "d", "e", "f"]


@pytest.mark.parametrize(
    "tear",
    [
        pytest.param(lambda r: r[: len(r) // 2], id="cut-in-the-payload"),
        pytest.param(lambda r: r[:10], id="cut-in-the-header"),
        pytest.param(lambda r: r[:-1], id="trailer-incomplete"),
        pytest.param(lambda r: r[:40] + bytes([r[40] ^ 0xFF]) + r[41:], id="checksum-mismatch"),
    ],
)
def test_torn_last_arrow_record_of_a_dead_writer_is_skipped(tmp_path: Path, tear) -> None:
    # what a process killed in the middle of a write leaves: complete records + a torn one
    name = spool.SegmentName("0-1-dead", 3, None, spool.ARROW)
    (tmp_path / name.open_name()).write_bytes(
        _arrow("a", "b") + _arrow("c") + tear(_arrow("d", "e", "f"))
    )
    empty = spool.SegmentName("0-1-dead", 4, None, spool.ARROW)
    (tmp_path / empty.open_name()).write_bytes(tear(_arrow("g")))  # only a torn record

    sealed = spool.seal_orphans(tmp_path)

    assert [(s.name.id, s.kind, s.rows) for s in sealed] == [(name.id, "arrow", 3)]
    assert not (tmp_path / empty.open_name()).exists(), "nothing complete: deleted"
    frame, rejected = spool.read_segment(sealed[0], SCHEMA)
    assert frame["id"].to_list() == ["a", "b", "c"]
    assert rejected == []


def test_live_arrow_writer_segment_is_not_taken_by_recovery(tmp_path: Path) -> None:
    writer = spool.SpoolWriter(tmp_path, max_rows=100, max_age_seconds=60, kind=spool.ARROW)
    writer.write(_arrow("a"), 1)
    assert spool.seal_orphans(tmp_path) == []  # its flock is held (even by this process)
    writer.write(_arrow("b"), 1)
    writer.close()
    assert _ids(tmp_path) == ["a", "b"]


def test_arrow_records_that_break_the_schema_are_rejected_not_fatal() -> None:
    other = pl.DataFrame({"id": ["x"], "unknown": [1]})
    buffer = io.BytesIO()
    other.write_ipc_stream(buffer)
    bad_columns = spool.frame_arrow(buffer.getvalue(), 1)
    not_arrow = spool.frame_arrow(b"not an arrow stream", 2)
    wrong_count = spool.frame_arrow(_arrow("y", "z")[16:-8], 5)  # the payload of 2 rows
    data = _arrow("a") + bad_columns + not_arrow + wrong_count + _arrow("b", "c")

    frame, rejected = spool.parse_arrow(data, SCHEMA)

    assert frame["id"].to_list() == ["a", "b", "c"]
    assert rejected == [bad_columns, not_arrow, wrong_count], "kept framed, as written"


def test_mixed_kinds_in_one_directory_list_and_read_together(tmp_path: Path) -> None:
    rows = spool.SpoolWriter(tmp_path, max_rows=2, max_age_seconds=60)
    columns = spool.SpoolWriter(tmp_path, max_rows=2, max_age_seconds=60, kind=spool.ARROW)
    rows.write(_lines("j1", "j2"), 2)
    columns.write(_arrow("a1", "a2"), 2)
    rows.write(_lines("j3"), 1)
    columns.write(_arrow("a3"), 1)
    rows.close()
    columns.close()
    assert sorted(s.kind for s in spool.list_sealed(tmp_path)) == ["arrow", "arrow", "json", "json"]
    assert sorted(_ids(tmp_path)) == ["a1", "a2", "a3", "j1", "j2", "j3"]


def test_spool_fsync_setting_reaches_both_writers(tmp_path: Path, monkeypatch) -> None:
    assert Settings().spool_fsync is False, "off by default"
    monkeypatch.setenv("DRIFTLOOP_SPOOL_FSYNC", "true")
    settings = Settings(data_root=str(tmp_path / "data"), state_dir=tmp_path / "state")
    assert settings.spool_fsync is True
    log = PredictionLog(settings, ship=False)
    assert log.fsync and log._writer.fsync and log._arrow_writer.fsync
    assert PredictionLog(settings, ship=False, fsync=False).fsync is False, "an argument wins"
    # and writing with it works for both kinds (one fsync per write)
    log.append([{"request_id": "r1", "amount": 1.0}])
    log.append_columns({"request_id": [f"c{i}" for i in range(100)], "amount": 2.0}, 100)
    log.stop(flush=False)
    got = {
        s.kind: spool.read_segment(s, PREDICTION_SCHEMA)[0].height
        for s in spool.list_sealed(log.directory)
    }
    assert got == {"json": 1, "arrow": 100}


def test_columnar_append_writes_one_arrow_record_with_the_row_appends_records(
    tmp_path: Path,
) -> None:
    log = PredictionLog(_settings(tmp_path), ship=False)
    n = 200
    at = datetime(2025, 3, 1, 12, tzinfo=UTC)
    columns = {
        "request_id": [f"r{i}" for i in range(n)],
        "received_at": at,
        "amount": [float(i) + 0.5 for i in range(n)],
        "category": ["retail" if i % 3 else None for i in range(n)],
        "decision": [i % 2 for i in range(n)],
        "model_name": "fraud",
    }
    log.append_columns(columns, n)
    log.append_columns({k: v[:3] if isinstance(v, list) else v for k, v in columns.items()}, 3)
    log.stop(flush=False)
    by_kind = {s.kind: s for s in spool.list_sealed(log.directory)}
    assert by_kind["arrow"].rows == n and by_kind["json"].rows == 3, "small batches stay JSON"
    arrow, _ = spool.read_segment(by_kind["arrow"], PREDICTION_SCHEMA)
    lines, _ = spool.read_segment(by_kind["json"], PREDICTION_SCHEMA)
    assert arrow.schema == lines.schema == pl.Schema(PREDICTION_SCHEMA)
    assert arrow.head(3).equals(lines), "the same records whichever kind holds them"
    assert arrow["received_at"].to_list() == [at] * n
    assert arrow["category"].null_count() == len(range(0, n, 3))
