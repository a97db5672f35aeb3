"""The prediction and label logs against real Delta tables under tmp_path.

Exactly once through crashes (simulated and SIGKILL), concurrent processes and a
compaction running alongside; windowed reads with partition pruning; label joins.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from driftloop import maintenance, spool
from driftloop.predlog import (
    LABELS,
    PREDICTIONS,
    SEGMENTS_KEY,
    LabelLog,
    PredictionLog,
    Shipper,
    ensure_table,
    latest_labels,
    read_labels,
    read_predictions,
    ship_all,
)
from driftloop.schema import LABEL_SCHEMA, PREDICTION_SCHEMA
from driftloop.settings import Settings

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, 12, tzinfo=UTC)
FAST = {
    "spool_segment_rows": 50,
    "spool_segment_seconds": 0.2,
    "shipper_interval_seconds": 0.1,
    "shipper_batch_segments": 8,
}


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_root=str(tmp_path / "data"), state_dir=tmp_path / "state", **kw)  # type: ignore[arg-type]


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DRIFTLOOP_DATA_ROOT=settings.data_root,
        DRIFTLOOP_STATE_DIR=str(settings.state_dir),
        DRIFTLOOP_SPOOL_SEGMENT_ROWS=str(settings.spool_segment_rows),
        DRIFTLOOP_SPOOL_SEGMENT_SECONDS=str(settings.spool_segment_seconds),
        DRIFTLOOP_SHIPPER_INTERVAL_SECONDS=str(settings.shipper_interval_seconds),
        DRIFTLOOP_SHIPPER_BATCH_SEGMENTS=str(settings.shipper_batch_segments),
    )
    return env


def _pred(request_id: str, at: datetime, **kw: object) -> dict[str, object]:
    return {
        "request_id": request_id,
        "transaction_id": kw.pop("transaction_id", f"tx-{request_id}"),
        "received_at": at,
        "model_name": "fraud",
        "model_version": "v1",
        "amount": 12.5,
        "score": 0.25,
        "decision": 0,
        **kw,
    }


def _all_ids(settings: Settings) -> list[str]:
    return pl.read_delta(settings.table("predictions"))["request_id"].to_list()


# -- exactly once ------------------------------------------------------------------
def test_ship_is_exactly_once_when_a_crash_loses_the_local_delete(tmp_path: Path) -> None:
    settings = _settings(tmp_path, spool_segment_rows=10)
    log = PredictionLog(settings, ship=False)
    for b in range(5):
        log.append([_pred(f"r{i}", T0 + timedelta(seconds=i)) for i in range(5 * b, 5 * b + 5)])
    log.stop(flush=False)
    segments = spool.list_sealed(log.directory)
    assert [s.rows for s in segments] == [10, 10, 5]
    saved = tmp_path / "saved"
    saved.mkdir()
    for seg in segments:
        shutil.copy2(seg.path, saved / seg.path.name)

    first = ship_all(settings, ["predictions"])[0]
    assert (first.commits, first.segments, first.rows) == (1, 3, 25)
    assert not spool.list_sealed(log.directory)
    history = DeltaTable(settings.table("predictions")).history(limit=1)[0]
    assert sorted(history[SEGMENTS_KEY]) == sorted(s.name.id for s in segments)

    # crash after the commit, before the local delete: the segments are back on disk
    for path in saved.iterdir():
        shutil.copy2(path, log.directory / path.name)
    again = ship_all(settings, ["predictions"])[0]

    assert (again.commits, again.rows, again.already_shipped_segments) == (0, 0, 3)
    assert not spool.list_sealed(log.directory)
    ids = _all_ids(settings)
    assert sorted(ids) == sorted(f"r{i}" for i in range(25))


def test_two_shippers_racing_on_the_same_segments_commit_once(tmp_path: Path) -> None:
    # as if the ship lock failed (two hosts on a network mount): both shippers see the
    # same segments; Delta's application transactions let only one commit them
    settings = _settings(tmp_path, spool_segment_rows=20)
    log = PredictionLog(settings, ship=False)
    for b in range(5):
        log.append([_pred(f"r{i}", T0) for i in range(20 * b, 20 * b + 20)])
    log.stop(flush=False)
    copy = tmp_path / "copy"
    shutil.copytree(log.directory, copy)
    shippers = [Shipper(settings, PREDICTIONS, log.directory), Shipper(settings, PREDICTIONS, copy)]
    barrier = threading.Barrier(2)
    results = []

    def run(shipper: Shipper) -> None:
        barrier.wait()
        results.append(shipper.ship())

    threads = [threading.Thread(target=run, args=(s,)) for s in shippers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sum(r.rows for r in results) == 100
    assert sum(r.commits for r in results) == 1
    assert sum(r.already_shipped_segments for r in results) == 5
    assert Counter(_all_ids(settings)) == Counter(f"r{i}" for i in range(100))


CHILD = r"""
import sys, time
import numpy as np
from driftloop.settings import get_settings
from driftloop.predlog import PredictionLog
tag, count, batch, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
mode = sys.argv[5]  # rows: JSON lines; columns: Arrow records; mixed: both, alternating
log = PredictionLog(get_settings())
log.start()
i = 0
while count < 0 or i < count:
    ids = [f"{tag}-{i}-{j}" for j in range(batch)]
    if mode == "columns" or (mode == "mixed" and i % 2):
        # >= COLUMNAR_MIN_ROWS rows per call: one Arrow record each
        columns = {"request_id": ids, "model_name": "fraud", "amount": np.ones(batch)}
        log.append_columns(columns, batch)
    else:
        log.append([{"request_id": r, "model_name": "fraud", "amount": 1.0} for r in ids])
    sys.stdout.write("\n".join(ids) + "\n")
    sys.stdout.flush()
    i += 1
    if pause:
        time.sleep(pause)
log.stop(flush=True)
print("DONE", flush=True)
"""


def _child(
    settings: Settings,
    tag: str,
    count: int,
    batch: int,
    pause: float,
    stderr: Path,
    mode: str = "rows",
) -> subprocess.Popen[str]:
    with stderr.open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, tag, str(count), str(batch), str(pause), mode],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=_env(settings),
        )


@pytest.mark.parametrize(
    ("shared_spool", "mode"),
    [(True, "rows"), (False, "rows"), (True, "mixed")],
    ids=["shared-spool", "own-spools", "shared-spool-json-and-arrow"],
)
def test_two_processes_ship_concurrently_with_compaction_running(
    tmp_path: Path, shared_spool: bool, mode: str
) -> None:
    # one spool directory for both (one host), or one each (two hosts, one table)
    settings = {
        tag: _settings(tmp_path, **FAST).model_copy(
            update={"state_dir": tmp_path / ("state" if shared_spool else f"state-{tag}")}
        )
        for tag in "ab"
    }
    batch = 5 if mode == "rows" else 70  # mixed: odd calls are Arrow records (>= 64 rows)
    count = 300 if mode == "rows" else 40
    procs = {
        tag: _child(settings[tag], tag, count, batch, 0.002, tmp_path / f"{tag}.err", mode)
        for tag in "ab"
    }
    compactions = []
    try:
        while any(p.poll() is None for p in procs.values()):
            compactions.append(maintenance.compact(settings["a"], "predictions"))
            time.sleep(0.2)
        outputs = {tag: p.communicate(timeout=60)[0] for tag, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for tag, p in procs.items():
        errors = (tmp_path / f"{tag}.err").read_text()
        assert p.returncode == 0, errors
        assert "Traceback" not in errors, errors
        assert outputs[tag].rstrip().endswith("DONE")
    compactions.append(maintenance.compact(settings["a"], "predictions"))

    expected = Counter(f"{tag}-{i}-{j}" for tag in "ab" for i in range(count) for j in range(batch))
    assert Counter(_all_ids(settings["a"])) == expected
    assert sum(c.files_removed for c in compactions) > 0, "compaction really ran alongside"
    for tag in "ab":
        assert not spool.list_sealed(settings[tag].spool_dir / "predictions")
    commits = DeltaTable(settings["a"].table("predictions")).history()
    assert sum(1 for c in commits if c["operation"] == "WRITE") > 4


@pytest.mark.parametrize("mode", ["rows", "columns", "mixed"])
def test_sigkill_loses_no_acknowledged_record_and_duplicates_none(
    tmp_path: Path, mode: str
) -> None:
    # Arrow segments hold many records (so a kill can tear one after complete ones)
    settings = _settings(tmp_path, **{**FAST, "spool_segment_rows": 50 if mode == "rows" else 2000})
    batch = 5 if mode == "rows" else 100
    rng = random.Random(int(os.environ.get("DRIFTLOOP_TEST_SEED", "20250301")))
    acknowledged: list[str] = []
    recovered_orphans = 0
    for round_ in range(3):
        proc = _child(settings, f"k{round_}", -1, batch, 0.0005, tmp_path / f"k{round_}.err", mode)
        acknowledged += _acknowledged_until_killed(proc, rng.randint(200, 3000), rng)
        result = ship_all(settings, ["predictions"])[0]
        recovered_orphans += result.orphans_sealed

    ids = Counter(_all_ids(settings))
    missing = [a for a in acknowledged if a not in ids]
    assert not missing, f"{len(missing)} acknowledged records lost, e.g. {missing[:3]}"
    duplicates = [i for i, n in ids.items() if n > 1]
    assert not duplicates, f"duplicated: {duplicates[:3]}"
    assert len(acknowledged) >= 3 * 200
    assert recovered_orphans >= 1, "the killed writers' open segments were recovered"
    assert not [
        p for p in (settings.spool_dir / "predictions").iterdir() if p.suffix in (".open", ".aopen")
    ]


def _acknowledged_until_killed(
    proc: subprocess.Popen[str], target: int, rng: random.Random
) -> list[str]:
    """Read acknowledged ids until ``target``, SIGKILL the child at a random moment
    after that, and return every id it acknowledged (a torn last line is not one)."""
    assert proc.stdout is not None
    lines: list[str] = []
    while len(lines) < target and (line := proc.stdout.readline()):
        lines.append(line)
    time.sleep(rng.uniform(0, 0.05))
    os.kill(proc.pid, signal.SIGKILL)
    lines += proc.stdout.read().splitlines(keepends=True)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return [line[:-1] for line in lines if line.endswith("\n")]


def test_background_shipper_ships_and_exposes_backlog(tmp_path: Path) -> None:
    settings = _settings(tmp_path, **FAST)
    with PredictionLog(settings) as log:
        log.append([_pred(f"r{i}", datetime.now(UTC)) for i in range(120)])
        assert 0 <= log.backlog_rows() <= 120  # exact counts: tests/unit/test_spool.py
        deadline = time.monotonic() + 20
        while log.stats().backlog_rows and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = log.stats()
        assert stats.backlog_rows == 0 and stats.shipped_rows == 120 and stats.ship_errors == 0
        log.append([_pred("last", datetime.now(UTC))])
    # stop(flush=True) on exit shipped the last record
    assert sorted(_all_ids(settings)) == sorted([*(f"r{i}" for i in range(120)), "last"])


def test_lines_that_break_the_schema_are_set_aside(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    directory = settings.spool_dir / "predictions"
    directory.mkdir(parents=True)
    bad = spool.SegmentName("0-0-broken", 1)
    (directory / bad.sealed_name(2)).write_bytes(
        b'{"request_id": "good", "amount": 1.0}\n{"request_id": "bad", "amount": "abc"}\n'
    )
    result = ship_all(settings, ["predictions"])[0]
    assert (result.rows, result.rejected_rows) == (1, 1)
    assert _all_ids(settings) == ["good"]
    assert (directory / spool.REJECTED_DIR / f"{bad.id}.jsonl").read_bytes().count(b"\n") == 1


def test_arrow_records_that_break_the_schema_are_set_aside(tmp_path: Path) -> None:
    import io

    settings = _settings(tmp_path)
    directory = settings.spool_dir / "predictions"
    directory.mkdir(parents=True)

    def record(frame: pl.DataFrame) -> bytes:
        buffer = io.BytesIO()
        frame.write_ipc_stream(buffer)
        return spool.frame_arrow(buffer.getvalue(), frame.height)

    good = pl.DataFrame([_pred("good", T0)]).with_columns(pl.lit("2025-03-01").alias("date"))
    good = good.select(
        pl.col(c) if c in good.columns else pl.lit(None, dtype=t).alias(c)
        for c, t in PREDICTION_SCHEMA.items()
    ).cast(PREDICTION_SCHEMA)  # type: ignore[arg-type]
    bad = record(pl.DataFrame({"request_id": ["bad"], "amount": ["abc"]}))
    name = spool.SegmentName("0-0-broken", 1, None, spool.ARROW)
    (directory / name.sealed_name(2)).write_bytes(record(good) + bad)

    result = ship_all(settings, ["predictions"])[0]

    assert (result.rows, result.rejected_rows) == (1, 1)
    assert _all_ids(settings) == ["good"]
    assert (directory / spool.REJECTED_DIR / f"{name.id}.arecords").read_bytes() == bad


def test_json_and_arrow_segments_of_one_log_ship_in_one_commit(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    log = PredictionLog(settings, ship=False)
    log.append([_pred(f"row{i}", T0) for i in range(3)])
    ids = [f"col{i}" for i in range(100)]
    log.append_columns({"request_id": ids, "received_at": T0, "amount": 1.0, "score": 0.5}, 100)
    log.append([_pred("row3", T0)])
    log.stop(flush=False)
    assert sorted(s.kind for s in spool.list_sealed(log.directory)) == ["arrow", "json"]

    result = ship_all(settings, ["predictions"])[0]

    assert (result.commits, result.segments, result.rows) == (1, 2, 104)
    table = DeltaTable(settings.table("predictions"))
    assert table.transaction_version(log.writer_id) == 1
    assert table.transaction_version(log.arrow_writer_id) == 1
    frame = pl.read_delta(settings.table("predictions"))
    assert Counter(frame["request_id"].to_list()) == Counter([*ids, *(f"row{i}" for i in range(4))])
    assert frame["date"].unique().to_list() == ["2025-03-01"], "partitioned by received_at"
    assert ship_all(settings, ["predictions"])[0].rows == 0


# -- reads ---------------------------------------------------------------------------
def test_read_window_prunes_partitions(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    log = PredictionLog(settings, ship=False)
    for day in range(5):
        log.append(
            [
                _pred(f"d{day}-{h}", T0 + timedelta(days=day, hours=h), model_name=m)
                for h in (-11, 0, 11)
                for m in ("fraud", "other")
                if not (m == "other" and h)
            ]
        )
    log.flush()
    ship_all(settings, ["predictions"])
    table = settings.table("predictions")
    # drop the data files of the days outside the window: a read that touched them fails
    for day in ("2025-03-01", "2025-03-05"):
        for f in Path(table, f"date={day}").glob("*.parquet"):
            f.unlink()

    start, end = T0 + timedelta(days=1), T0 + timedelta(days=3)  # 03-02 12:00 to 03-04 12:00
    frame = read_predictions(settings, start, end)
    assert frame.schema == pl.Schema(PREDICTION_SCHEMA)
    assert frame["received_at"].min() >= start and frame["received_at"].max() < end
    assert sorted(set(frame["request_id"])) == sorted(
        ["d1-0", "d1-11", "d2--11", "d2-0", "d2-11", "d3--11"]
    )
    assert frame.height == 8  # the "other" model's rows at hour 0 of days 1 and 2
    fraud = read_predictions(settings, start, end, model_name="fraud")
    assert fraud.height == 6 and set(fraud["model_name"]) == {"fraud"}

    with pytest.raises(Exception):  # noqa: B017 - the deleted partition is really read
        read_predictions(settings, T0, end)


@pytest.mark.parametrize("created", [False, True], ids=["missing", "empty"])
def test_missing_or_empty_table_reads_as_empty_frames(tmp_path: Path, created: bool) -> None:
    settings = _settings(tmp_path)
    if created:
        ensure_table(settings, PREDICTIONS)
        ensure_table(settings, LABELS)
    frame = read_predictions(settings, T0, T0 + timedelta(hours=1), with_labels=True)
    assert frame.height == 0
    assert {c: frame.schema[c] for c in PREDICTION_SCHEMA} == PREDICTION_SCHEMA
    assert frame.schema["label"] == pl.Int8()
    assert read_labels(settings).schema == pl.Schema(LABEL_SCHEMA)


def test_labels_join_respects_as_of_and_last_label_wins(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    preds = PredictionLog(settings)
    preds.append([_pred(f"r{i}", T0 + timedelta(minutes=i)) for i in range(1, 6)])
    preds.flush()
    labels = LabelLog(settings)  # flush() ships: one commit per flush
    h = timedelta(hours=1)

    def label(label_id: str, value: int, at: datetime, **keys: str) -> dict[str, object]:
        return {"label_id": label_id, "label": value, "received_at": at, "observed_at": at, **keys}

    # r1: corrected later; r2: two labels at the same instant, in separate commits and
    # in reverse order (label_id breaks the tie); r3: keyed by transaction only;
    # r4: a transaction label that arrives after its request label; r5: no label
    labels.append([label("b", 1, T0 + 3 * h, request_id="r1")])
    labels.flush()
    labels.append(
        [
            label("a", 0, T0 + h, request_id="r1"),
            label("y", 1, T0 + h, request_id="r2"),
            label("t3", 1, T0 + h, transaction_id="tx-r3"),
            label("r4-req", 0, T0 + h, request_id="r4", transaction_id="tx-r4"),
            label("r4-tx", 1, T0 + 2 * h, transaction_id="tx-r4"),
        ]
    )
    labels.flush()
    labels.append(
        [label("x", 0, T0 + h, request_id="r2"), label("late", 1, T0 + 30 * h, request_id="r5")]
    )
    labels.flush()
    assert len(DeltaTable(settings.table("labels")).history()) == 4  # create + 3 commits

    def joined(as_of: datetime) -> dict[str, tuple[int | None, str | None]]:
        frame = read_predictions(settings, T0, T0 + h, with_labels=True, labels_as_of=as_of)
        assert frame.height == 5
        return {r["request_id"]: (r["label"], r["label_id"]) for r in frame.iter_rows(named=True)}

    assert joined(T0 + 2 * h) == {
        "r1": (0, "a"),
        "r2": (1, "y"),
        "r3": (1, "t3"),
        "r4": (1, "r4-tx"),
        "r5": (None, None),
    }
    at_4h = joined(T0 + 4 * h)
    assert at_4h["r1"] == (1, "b") and at_4h["r5"] == (None, None)
    assert joined(T0 + 31 * h)["r5"] == (1, "late")
    assert joined(T0)["r1"] == (None, None), "no label had arrived yet"
    frame = read_predictions(settings, T0, T0 + h, with_labels=True, labels_as_of=T0 + 4 * h)
    assert frame.schema["label_received_at"] == pl.Datetime("us", "UTC")
    assert read_labels(settings, as_of=T0 + 2 * h).height == 6


def test_latest_labels_keeps_one_label_per_request_or_transaction() -> None:
    at = T0 + timedelta(hours=1)
    rows = [
        ("a", "r1", None, 0, at),
        ("b", "r1", None, 1, at + timedelta(minutes=5)),  # later: wins
        ("y", "r2", None, 1, at),
        ("x", "r2", None, 0, at),  # same instant: the larger label_id (y) wins
        ("t", None, "tx9", 1, at),  # keyed by transaction only
    ]
    columns = ("label_id", "request_id", "transaction_id", "label", "received_at")
    labels = pl.DataFrame(rows, schema={c: LABEL_SCHEMA[c] for c in columns}, orient="row")
    for frame in (labels, labels.reverse()):
        latest = latest_labels(frame).sort("label_id")
        assert latest["label_id"].to_list() == ["b", "t", "y"]
