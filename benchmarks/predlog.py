"""Prediction log: cost on the request path, ship throughput, files per 100k records.

Compares the spool + shipper with the naive baseline of one Delta append per request
batch of 10 records. Prints a table and writes benchmarks/results/predlog.json.

    python benchmarks/predlog.py [--records 100000] [--baseline-batches 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from deltalake import DeltaTable, write_deltalake

from driftloop.predlog import PREDICTIONS, PredictionLog, ensure_table, ship_all
from driftloop.schema import NUMERIC_FEATURES
from driftloop.settings import Settings

RESULTS = Path(__file__).parent / "results" / "predlog.json"


def record(i: int) -> dict[str, object]:
    """A full prediction record, as the model service logs it."""
    now = datetime.now(UTC)
    return {
        "request_id": f"req-{i:09d}",
        "transaction_id": f"tx-{i:09d}",
        "received_at": now,
        "event_timestamp": now,
        "model_name": "fraud",
        "model_version": "20250301T120000-abcd",
        "arm": "champion",
        "card_id": i % 5000,
        "merchant_id": i % 700,
        "amount": 12.5 + i % 100,
        "category": "grocery",
        "channel": "pos",
        "country": "US",
        **{f: float(i % 17) for f in NUMERIC_FEATURES if f != "amount"},
        "feature_age_seconds": 3.2,
        "score": 0.123,
        "decision": 0,
        "latency_ms": 1.4,
    }


def settings_under(root: Path, **kw: object) -> Settings:
    return Settings(data_root=str(root / "data"), state_dir=root / "state", **kw)  # type: ignore[arg-type]


def data_files(settings: Settings) -> int:
    return len(DeltaTable(settings.table("predictions")).file_uris())


def bench_append(root: Path, records: list[dict[str, object]], batch: int, threads: int) -> float:
    """Microseconds per record spent in append (wall time / records)."""
    log = PredictionLog(settings_under(root), ship=False)
    chunks = [records[i : i + batch] for i in range(0, len(records), batch)]
    per_thread = [chunks[t::threads] for t in range(threads)]

    def work(mine: list[list[dict[str, object]]]) -> None:
        for chunk in mine:
            log.append(chunk)

    started = time.perf_counter()
    pool = [threading.Thread(target=work, args=(mine,)) for mine in per_thread]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    log.stop(flush=False)
    return elapsed / len(records) * 1e6


def bench_bulk_ship(root: Path, records: list[dict[str, object]]) -> dict[str, float]:
    """Spool everything, then one ship_all: rows/s and files created."""
    settings = settings_under(root)
    ensure_table(settings, PREDICTIONS)
    log = PredictionLog(settings, ship=False)
    for i in range(0, len(records), 10):
        log.append(records[i : i + 10])
    log.stop(flush=False)
    started = time.perf_counter()
    result = ship_all(settings, ["predictions"])[0]
    elapsed = time.perf_counter() - started
    assert result.rows == len(records), result
    return {
        "rows_per_second": result.rows / elapsed,
        "seconds": elapsed,
        "commits": result.commits,
        "segments": result.segments,
        "files": data_files(settings),
    }


def bench_live(root: Path, records: list[dict[str, object]], seconds: float) -> dict[str, float]:
    """The background shipper under a steady request rate (timescale compressed 10x:
    0.5 s ship interval instead of 5 s, so N records over `seconds` stand for N
    records over 10x as long with the default settings)."""
    settings = settings_under(
        root, spool_segment_seconds=0.2, shipper_interval_seconds=0.5, spool_segment_rows=5000
    )
    ensure_table(settings, PREDICTIONS)
    rate = len(records) / seconds
    batches = [records[i : i + 10] for i in range(0, len(records), 10)]
    started = time.perf_counter()
    max_lag = 0.0
    with PredictionLog(settings) as log:
        for n, chunk in enumerate(batches):
            due = started + n * 10 / rate
            if (delay := due - time.perf_counter()) > 0:
                time.sleep(delay)
            log.append(chunk)
            if n % 500 == 0:
                max_lag = max(max_lag, log.stats().oldest_sealed_seconds)
        sent = time.perf_counter() - started
    total = time.perf_counter() - started
    table = DeltaTable(settings.table("predictions"))
    commits = sum(1 for c in table.history() if c["operation"] == "WRITE")
    assert table.count() == len(records)
    return {
        "records_per_second_offered": len(records) / sent,
        "seconds_to_drain_after_last_append": total - sent,
        "commits": commits,
        "files": data_files(settings),
        "max_sealed_backlog_age_seconds": max_lag,
    }


def bench_baseline(root: Path, records: list[dict[str, object]], batches: int) -> dict[str, float]:
    """One Delta append per request batch of 10 records, inline on the request path."""
    settings = settings_under(root)
    ensure_table(settings, PREDICTIONS)
    uri = settings.table("predictions")
    schema = dict(PREDICTIONS.schema)
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    per_batch = []
    for b in range(batches):
        chunk = [{**r, "date": today} for r in records[b * 10 : b * 10 + 10]]
        started = time.perf_counter()
        frame = pl.DataFrame(chunk, schema=schema)
        write_deltalake(uri, frame.to_arrow(), mode="append", partition_by=["date"])
        per_batch.append(time.perf_counter() - started)
    rows = batches * 10
    files = data_files(settings)
    first, last = per_batch[: batches // 10], per_batch[-(batches // 10) :]
    return {
        "append_us_per_record": sum(per_batch) / rows * 1e6,
        "rows_per_second": rows / sum(per_batch),
        "batches": batches,
        "files": files,
        "files_per_100k_records": files / rows * 100_000,
        "first_10pct_ms_per_batch": sum(first) / len(first) * 1e3,
        "last_10pct_ms_per_batch": sum(last) / len(last) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--baseline-batches", type=int, default=200)
    parser.add_argument("--live-seconds", type=float, default=10.0)
    args = parser.parse_args()
    records = [record(i) for i in range(args.records)]
    out: dict[str, object] = {
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "records": args.records,
    }
    with tempfile.TemporaryDirectory(prefix="driftloop-bench-") as tmp:
        root = Path(tmp)
        out["append_us_per_record"] = {
            "batch_1": bench_append(root / "a1", records, 1, 1),
            "batch_10": bench_append(root / "a10", records, 10, 1),
            "batch_1_4_threads": bench_append(root / "a1t4", records, 1, 4),
        }
        bulk = bench_bulk_ship(root / "bulk", records)
        bulk["files_per_100k_records"] = bulk["files"] / args.records * 100_000
        out["ship_bulk"] = bulk
        live = bench_live(root / "live", records, args.live_seconds)
        live["files_per_100k_records"] = live["files"] / args.records * 100_000
        out["ship_live"] = live
        out["baseline_delta_append_per_10"] = bench_baseline(
            root / "baseline", records, args.baseline_batches
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")

    a, b, lv, base = (
        out["append_us_per_record"],
        out["ship_bulk"],
        out["ship_live"],
        out["baseline_delta_append_per_10"],
    )
    print(f"records: {args.records:,}")
    print("request path, µs per record:")
    for k, v in a.items():  # type: ignore[attr-defined]
        print(f"  spool append {k:<18} {v:8.2f}")
    print(f"  baseline Delta append/10      {base['append_us_per_record']:8.1f}")  # type: ignore[index]
    print("throughput into Delta, rows/s:")
    print(f"  shipper (bulk, one pass)      {b['rows_per_second']:10,.0f}")  # type: ignore[index]
    print(f"  baseline Delta append/10      {base['rows_per_second']:10,.0f}")  # type: ignore[index]
    print("data files per 100k records:")
    print(f"  shipper, bulk                 {b['files_per_100k_records']:10,.0f}")  # type: ignore[index]
    print(f"  shipper, live                 {lv['files_per_100k_records']:10,.0f}")  # type: ignore[index]
    print(f"  baseline Delta append/10      {base['files_per_100k_records']:10,.0f}")  # type: ignore[index]
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
