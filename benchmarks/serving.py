"""Serving: our model service (Feast + prediction log on) against a bare BentoML service.

In one run, on a small world built in a temporary directory (history, Feast repo
applied and materialised, a champion): start ``bentos.service:FraudModel`` (ours) and
``bentos.bare:BareModel`` (same model, no Feast, no log) with real ``bentoml serve`` on
127.0.0.1 (and ours again with ``DRIFTLOOP_ONLINE_CACHE=false``, "ours_uncached", reported
beside: its every batch reads all its entities from SQLite), then

* ``/predict`` at concurrency 1 and 16, a fixed number of requests each, in alternating
  rounds (bare, ours, ours, bare, ...; medians over rounds): requests/s, p50, p99, and
  the server's CPU milliseconds per request (robust when the cores are shared); the
  throughput ratio is the median of the rounds' own ratios (see :func:`paired_ratio`);
* ``/predict_columns`` (the columnar batch endpoint) with batches of ``--column-rows``
  rows, and ``/predict_batch`` (a JSON list of objects) with batches of ``--batch-rows``
  rows, both at concurrency 1: rows/s and the server's CPU microseconds per row;
* Delta files of the ``predictions`` table: the same duration of load at a rate of R
  and of 2R requests/s (N and 2N requests); files must not grow with request count;
* in-process costs of the request path's parts (Feast read through
  ``features.online_features`` and through ``online_fast.FastOnlineReader``, scoring,
  spool append), to say where the time goes;
* with ``--profile``: py-spy samples of our worker under load (py-spy must be on PATH
  or given with ``--py-spy``; it is not a project dependency).

Prints a table and writes ``benchmarks/results/serving.json`` with the floors and their
pass/fail: ours >= 70 % of bare throughput, p99 <= 2x bare (both at each concurrency),
>= 50,000 rows/s on the columnar batch endpoint, files not growing with request count.

    python benchmarks/serving.py [--rounds 9] [--requests-c1 120] [--requests-c16 600]
                                 [--column-rows 5000] [--column-batches 30]
                                 [--batch-rows 1000] [--batches 15] [--profile]
                                 [--variant fast=mymodule:MyService]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import psutil
from _common import (
    LoadResult,
    Server,
    World,
    build_world,
    machine,
    print_table,
    run_load,
    start_bentoml,
    write_result,
)

OURS = "bentos.service:FraudModel"
#: ours with ``DRIFTLOOP_ONLINE_CACHE=false`` (informative: not held to the floors)
UNCACHED = "ours_uncached"
BARE = "bentos.bare:BareModel"
FLOORS = {
    "throughput_ratio_min": 0.70,
    "p99_ratio_max": 2.0,
    "batch_rows_per_second_min": 50_000.0,
    "files_ratio_2n_over_n_max": 1.5,
}


# -- servers -----------------------------------------------------------------------------
def server_cpu_seconds(server: Server) -> float:
    """CPU seconds (user + system) of the server's supervisor and all its workers."""
    total = 0.0
    try:
        root = psutil.Process(server.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def worker_pids(server: Server) -> list[int]:
    return [p.pid for p in psutil.Process(server.pid).children(recursive=True)]


# -- bodies ------------------------------------------------------------------------------
class Bodies:
    """Request bodies built once from the newest transactions (no client work per row)."""

    def __init__(self, world: World, n: int = 2_000) -> None:
        self.rows = [world.request(i) for i in range(n)]

    def single(self, phase: str) -> Callable[[int], dict[str, Any]]:
        rows = self.rows

        def body(i: int) -> dict[str, Any]:
            rid = f"{phase}-{i}"
            return {
                "transaction": {**rows[i % len(rows)], "transaction_id": rid, "request_id": rid}
            }

        return body

    def batch(self, phase: str, size: int) -> Callable[[int], dict[str, Any]]:
        rows = self.rows

        def body(i: int) -> dict[str, Any]:
            out = []
            for j in range(size):
                rid = f"{phase}-{i}-{j}"
                out.append(
                    {**rows[(i * size + j) % len(rows)], "transaction_id": rid, "request_id": rid}
                )
            return {"transactions": out}

        return body

    def columns(self, phase: str, size: int) -> Callable[[int], dict[str, Any]]:
        """``/predict_columns`` bodies: the same rows as :meth:`batch`, column-wise."""
        names = ("card_id", "merchant_id", "amount", "category", "channel", "country", "timestamp")
        table = {c: [r[c] for r in self.rows] for c in names}
        total = len(self.rows)

        def body(i: int) -> dict[str, Any]:
            rows = [(i * size + j) % total for j in range(size)]
            ids = [f"{phase}-{i}-{j}" for j in range(size)]
            columns = {c: [values[k] for k in rows] for c, values in table.items()}
            return {"columns": {"transaction_id": ids, "request_id": ids, **columns}}

        return body


# -- Delta files -------------------------------------------------------------------------
def delta_files(location: str) -> int:
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(location):
        return 0
    return len(DeltaTable(location).file_uris())


def wait_shipped(location: str, prefix: str, expected: int, timeout: float = 90.0) -> float:
    """Wait until ``expected`` rows whose request_id starts with ``prefix`` are in Delta."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            n = (
                pl.scan_delta(location)
                .filter(pl.col("request_id").str.starts_with(prefix))
                .select(pl.len())
                .collect()
                .item()
            )
            if n >= expected:
                return time.perf_counter() - started
        except Exception:  # the table does not exist yet
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{expected} rows of {prefix} never reached {location}")


# -- phases ------------------------------------------------------------------------------
def phase(
    server: Server,
    path: str,
    body: Callable[[int], Any],
    *,
    requests: int,
    concurrency: int,
    rate: float | None = None,
) -> tuple[LoadResult, float]:
    """A load run plus the server's CPU milliseconds per successful request."""
    cpu0 = server_cpu_seconds(server)
    result = run_load(
        server.url + path, body, requests=requests, concurrency=concurrency, rate=rate
    )
    cpu = server_cpu_seconds(server) - cpu0
    return result, cpu * 1000 / max(result.ok, 1)


def throughput(servers: dict[str, Server], bodies: Bodies, args: argparse.Namespace) -> dict:
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {n: {1: [], 16: []} for n in servers}
    order = list(servers)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            for conc, n in ((1, args.requests_c1), (16, args.requests_c16)):
                res, cpu_ms = phase(
                    servers[name],
                    "/predict",
                    bodies.single(f"tp{r}c{conc}{name}"),
                    requests=n,
                    concurrency=conc,
                )
                summary = {**res.summary(), "server_cpu_ms_per_request": cpu_ms}
                runs[name][conc].append(summary)
                print(
                    f"  round {r} {name:4s} c={conc:2d}: {res.rps:7.1f} req/s  "
                    f"p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:7.2f} ms  "
                    f"server cpu {cpu_ms:5.2f} ms/req  {res.statuses}"
                )
    out: dict[str, Any] = {}
    for name, by_conc in runs.items():
        out[name] = {}
        for conc, items in by_conc.items():
            out[name][f"c{conc}"] = {
                "requests_per_second": statistics.median(i["requests_per_second"] for i in items),
                "p50_ms": statistics.median(i["p50_ms"] for i in items),
                "p99_ms": statistics.median(i["p99_ms"] for i in items),
                "server_cpu_ms_per_request": statistics.median(
                    i["server_cpu_ms_per_request"] for i in items
                ),
                "errors": sum(i["errors"] for i in items),
                "rounds": items,
            }
    return out


def batch(
    servers: dict[str, Server],
    path: str,
    make_body: Callable[[str], Callable[[int], Any]],
    *,
    rows: int,
    batches: int,
    rounds: int,
) -> dict:
    """Sequential batches of ``rows`` rows (concurrency 1) to ``path`` in alternating
    rounds; medians over rounds. ``make_body(phase)`` gives the bodies of one round.

    rows/s = rows / time spent in requests (the client's building of the next batch is
    left out; its JSON encoding is in).
    """
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in servers}
    order = list(servers)
    per_round = max(1, batches // rounds)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            res, cpu_ms = phase(
                servers[name],
                path,
                make_body(f"{path.strip('/')}{r}{name}"),
                requests=per_round,
                concurrency=1,
            )
            busy = sum(res.latencies_ms) / 1000
            runs[name].append(
                {
                    **res.summary(),
                    "rows_per_second": res.ok * rows / busy if busy else 0.0,
                    "server_cpu_us_per_row": cpu_ms * 1000 / rows,
                }
            )
    out = {}
    for name, items in runs.items():
        out[name] = {
            "rows_per_batch": rows,
            "batches": sum(i["ok"] for i in items),
            "errors": sum(i["errors"] for i in items),
            "rows_per_second": statistics.median(i["rows_per_second"] for i in items),
            "p50_ms": statistics.median(i["p50_ms"] for i in items),
            "server_cpu_us_per_row": statistics.median(i["server_cpu_us_per_row"] for i in items),
            "rounds": items,
        }
        print(
            f"  {path} {name:4s}: {out[name]['rows_per_second']:9.0f} rows/s  "
            f"p50 {out[name]['p50_ms']:7.1f} ms/batch  server cpu "
            f"{out[name]['server_cpu_us_per_row']:6.1f} us/row  errors {out[name]['errors']}"
        )
    return out


def files(server: Server, location: str, bodies: Bodies, args: argparse.Namespace) -> dict:
    """The same duration of load with N and with 2N requests: Delta files added."""
    out: dict[str, Any] = {}
    seconds = args.files_seconds
    for label, factor in (("n", 1), ("2n", 2)):
        requests = args.files_rate * factor * seconds
        prefix = f"files{label}-"
        before = delta_files(location)
        started = time.perf_counter()
        res, _ = phase(
            server,
            "/predict",
            bodies.single(prefix.rstrip("-")),
            requests=requests,
            concurrency=8,
            rate=args.files_rate * factor,
        )
        wait_shipped(location, prefix, res.ok)
        window = time.perf_counter() - started
        added = delta_files(location) - before
        out[label] = {
            "requests": requests,
            "ok": res.ok,
            "load_seconds": res.seconds,
            "seconds_until_shipped": window,
            "files_added": added,
            "files_per_minute": added / window * 60,
            "files_per_1000_requests": added / max(res.ok, 1) * 1000,
        }
        print(
            f"  files {label:2s}: {res.ok} requests in {res.seconds:.1f} s -> {added} files "
            f"({out[label]['files_per_minute']:.1f}/min until shipped)"
        )
    out["ratio_2n_over_n"] = out["2n"]["files_added"] / max(out["n"]["files_added"], 1)
    return out


# -- in-process costs ----------------------------------------------------------------------
def in_process(world: World, root: Path) -> dict[str, float]:
    """CPU milliseconds per call of the parts of the request path, in this process."""
    from driftloop import features, predlog, registry
    from driftloop.serving import (
        FeastOnlineReader,
        Scorer,
        TransactionColumns,
        TransactionRequest,
    )

    settings = world.settings(state_dir=root / "state-inprocess")
    model = registry.load_model(world.model_tag)
    requests = [TransactionRequest(**world.request(i)) for i in range(1000)]
    cards = [r.card_id for r in requests]
    merchants = [r.merchant_id for r in requests]
    feast_reader = FeastOnlineReader(settings)

    class NoFeatures:
        def read(self, c: Any, m: Any) -> tuple[list[None], list[None]]:
            return [None] * len(c), [None] * len(c)

    def cpu_ms(fn: Callable[[], Any], n: int) -> float:
        fn()
        t0 = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t0) / n * 1000

    log = predlog.PredictionLog(settings, ship=False)
    out: dict[str, float] = {}
    bare = Scorer(model, NoFeatures(), None, model_name="fraud")
    full = Scorer(model, feast_reader, log, model_name="fraud")
    out["feast_online_features_1_row_ms"] = cpu_ms(
        lambda: features.online_features(feast_reader._store, cards[:1], merchants[:1]), 200
    )
    out["feast_online_features_1000_rows_ms"] = cpu_ms(
        lambda: features.online_features(feast_reader._store, cards, merchants), 5
    )
    try:
        from driftloop.online_fast import FastOnlineReader
    except ImportError:
        FastOnlineReader = None  # noqa: N806
    if FastOnlineReader is not None:
        fast_reader = FastOnlineReader(feast_reader._store)
        out["fast_reader_1_row_ms"] = cpu_ms(
            lambda: fast_reader.read(cards[:1], merchants[:1]), 200
        )
        out["fast_reader_1000_rows_ms"] = cpu_ms(lambda: fast_reader.read(cards, merchants), 5)
        fast = Scorer(model, fast_reader, log, model_name="fraud")
        out["scorer_fast_reader_and_log_1_row_ms"] = cpu_ms(lambda: fast.score(requests[:1]), 200)
        out["scorer_fast_reader_and_log_1000_rows_ms"] = cpu_ms(lambda: fast.score(requests), 5)
        columns = TransactionColumns.from_requests(requests)
        out["fast_reader_columns_1000_rows_ms"] = cpu_ms(
            lambda: fast_reader.columns(cards, merchants), 5
        )
        out["score_columns_fast_reader_and_log_1000_rows_ms"] = cpu_ms(
            lambda: fast.score_columns(columns), 5
        )
        out["score_columns_no_features_no_log_1000_rows_ms"] = cpu_ms(
            lambda: bare.score_columns(columns), 5
        )
    out["scorer_feast_and_log_1_row_ms"] = cpu_ms(lambda: full.score(requests[:1]), 200)
    out["scorer_feast_and_log_1000_rows_ms"] = cpu_ms(lambda: full.score(requests), 5)
    out["scorer_no_features_no_log_1_row_ms"] = cpu_ms(lambda: bare.score(requests[:1]), 200)
    out["scorer_no_features_no_log_1000_rows_ms"] = cpu_ms(lambda: bare.score(requests), 5)
    raw = [world.request(i) for i in range(1000)]
    out["parse_1000_requests_ms"] = cpu_ms(lambda: [TransactionRequest(**b) for b in raw], 5)
    log.stop(flush=False)
    return out


# -- profile -------------------------------------------------------------------------------
#: inclusive shares reported from py-spy stacks: label -> substring of a frame
PROFILE_FRAMES = {
    "Scorer.score": "score (driftloop/serving.py",
    "Scorer.score_columns": "score_columns (driftloop/serving.py",
    "FastOnlineReader.columns": "columns (driftloop/online_fast.py",
    "PredictionLog.append_columns (spool)": "append_columns (driftloop/predlog.py",
    "FeastOnlineReader.read": "read (driftloop/serving.py",
    "features.online_features": "online_features (driftloop/features.py",
    "features._online_frame (proto -> polars)": "_online_frame (driftloop/features.py",
    "feast get_online_features": "get_online_features (feast/feature_store.py",
    "feast online_read (SQLite)": "online_read (feast/infra/online_stores/sqlite.py",
    "xgboost predict": "inplace_predict (xgboost/core.py",
    "PredictionLog.append (spool)": "append (driftloop/predlog.py",
    "prometheus labels()": "labels (prometheus_client/metrics.py",
    "Delta shipper thread": "_run (driftloop/predlog.py",
    "BentoML event loop (parse, serialise, middleware)": "_bentoml_impl/server/app.py",
}


def profile(server: Server, py_spy: str, out_dir: Path, label: str, run: Callable[[], Any]) -> dict:
    """Sample the GIL holder of the server's workers with py-spy while ``run`` loads it.

    Returns the inclusive share of samples of each frame in :data:`PROFILE_FRAMES`;
    the raw stacks stay in ``out_dir/pyspy-<label>-<pid>.txt``.
    """
    samples: dict[str, int] = {}
    total = 0
    procs = []
    for pid in worker_pids(server):
        out = out_dir / f"pyspy-{label}-{pid}.txt"
        procs.append(
            (
                subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--format",
                        "raw",
                        "--rate",
                        "250",
                        "--nonblocking",
                        "--gil",
                        "--output",
                        str(out),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
                out,
            )
        )
    time.sleep(1.0)
    run()
    for proc, _ in procs:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    for _, out in procs:
        if not out.exists():
            continue
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            if "(" not in stack:  # idle threads with no Python frames
                continue
            total += n
            for label, needle in PROFILE_FRAMES.items():
                if needle in stack:
                    samples[label] = samples.get(label, 0) + n
    return {
        "samples": total,
        "inclusive_share": {k: samples.get(k, 0) / total for k in PROFILE_FRAMES} if total else {},
    }


def profiles(server: Server, bodies: Bodies, root: Path, args: argparse.Namespace) -> dict:
    if not args.py_spy:
        print("py-spy not found: --profile skipped")
        return {}
    print("profiling our worker with py-spy ...")
    return {
        "predict_c16": profile(
            server,
            args.py_spy,
            root,
            "predict_c16",
            lambda: run_load(
                server.url + "/predict",
                bodies.single("prof"),
                requests=2 * args.requests_c16,
                concurrency=16,
            ),
        ),
        "predict_batch": profile(
            server,
            args.py_spy,
            root,
            "predict_batch",
            lambda: run_load(
                server.url + "/predict_batch",
                bodies.batch("profb", args.batch_rows),
                requests=args.batches,
                concurrency=1,
            ),
        ),
        "predict_columns": profile(
            server,
            args.py_spy,
            root,
            "predict_columns",
            lambda: run_load(
                server.url + "/predict_columns",
                bodies.columns("profc", args.column_rows),
                requests=args.column_batches,
                concurrency=1,
            ),
        ),
    }


# -- main ----------------------------------------------------------------------------------
def paired_ratio(ours: list[dict], bare: list[dict], key: str) -> float:
    """The median over rounds of ``ours[r][key] / bare[r][key]``.

    The two runs of one round are adjacent in time (ABBA order), so a change of the
    machine's speed between rounds (seen here: 2x within a minute, from other guests)
    cancels out of each round's ratio, where a ratio of medians over all rounds keeps it.
    """
    ratios = [o[key] / b[key] for o, b in zip(ours, bare, strict=True) if b[key]]
    return statistics.median(ratios) if ratios else 0.0


def evaluate(tp: dict, bt: dict, cols: dict, fl: dict | None, name: str = "ours") -> dict[str, Any]:
    """The floors for service ``name`` against bare (the Delta files check when ``fl``).

    The batch floor is checked on the columnar endpoint (``cols``); the JSON-list
    endpoint (``bt``) is reported alongside."""
    checks: dict[str, Any] = {}
    for conc in ("c1", "c16"):
        ours, bare = tp[name][conc], tp["bare"][conc]
        ratio = paired_ratio(ours["rounds"], bare["rounds"], "requests_per_second")
        p99 = ours["p99_ms"] / bare["p99_ms"]
        checks[f"throughput_ratio_{conc}"] = {
            "value": ratio,
            "floor": FLOORS["throughput_ratio_min"],
            "pass": ratio >= FLOORS["throughput_ratio_min"],
            "ratio_of_medians": ours["requests_per_second"] / bare["requests_per_second"],
            "note": "median over rounds of ours / bare in the same round (adjacent runs)",
        }
        checks[f"p99_ratio_{conc}"] = {
            "value": p99,
            "ceiling": FLOORS["p99_ratio_max"],
            "pass": p99 <= FLOORS["p99_ratio_max"],
        }
        cpu = ours["server_cpu_ms_per_request"] / bare["server_cpu_ms_per_request"]
        checks[f"server_cpu_ratio_{conc}"] = {
            "value": cpu,
            "note": "server CPU per request, ours / bare; 1/value is the throughput ratio "
            "when both servers are CPU-bound (robust on shared cores; informative)",
        }
    rows = cols[name]["rows_per_second"] if cols[name]["errors"] == 0 else 0.0
    checks["batch_rows_per_second"] = {
        "value": rows,
        "floor": FLOORS["batch_rows_per_second_min"],
        "pass": rows >= FLOORS["batch_rows_per_second_min"],
        "endpoint": "/predict_columns",
    }
    checks["batch_rows_per_second_of_bare"] = {
        "value": rows / cols["bare"]["rows_per_second"] if cols["bare"]["rows_per_second"] else 0,
        "note": "columnar rows/s, ours / bare (informative)",
    }
    checks["list_batch_rows_per_second"] = {
        "value": bt[name]["rows_per_second"],
        "note": "/predict_batch (JSON list of objects) rows/s (informative)",
    }
    if fl is not None:
        checks["delta_files_2n_over_n"] = {
            "value": fl["ratio_2n_over_n"],
            "ceiling": FLOORS["files_ratio_2n_over_n_max"],
            "pass": fl["ratio_2n_over_n"] <= FLOORS["files_ratio_2n_over_n_max"],
        }
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds; medians")
    parser.add_argument("--requests-c1", type=int, default=120, help="per round and service")
    parser.add_argument("--requests-c16", type=int, default=600, help="per round and service")
    parser.add_argument("--column-rows", type=int, default=5000, help="rows per columnar batch")
    parser.add_argument(
        "--column-batches", type=int, default=30, help="columnar batches per service, all rounds"
    )
    parser.add_argument("--batch-rows", type=int, default=1000, help="rows per JSON-list batch")
    parser.add_argument(
        "--batches", type=int, default=15, help="JSON-list batches per service, all rounds"
    )
    parser.add_argument("--files-seconds", type=int, default=20)
    parser.add_argument("--files-rate", type=int, default=10, help="R: requests/s of the N phase")
    parser.add_argument("--events", type=int, default=40_000, help="simulated history size")
    parser.add_argument("--profile", action="store_true", help="py-spy our worker under load")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"))
    parser.add_argument("--keep", type=Path, help="build the world here and keep it")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=MODULE:CLASS",
        help="also measure another service (e.g. a candidate change of ours), served like ours",
    )
    parser.add_argument("--name", default="serving", help="results/<name>.json")
    args = parser.parse_args(argv)
    variants = dict(v.split("=", 1) for v in args.variant)

    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine(),
        "parameters": vars(args) | {"keep": None, "py_spy": None},
        "floors": FLOORS,
    }
    with tempfile.TemporaryDirectory(prefix="driftloop-bench-serving-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"building the world in {root} ...")
        world = build_world(root / "world", n_events=args.events)
        bodies = Bodies(world)
        env = {**world.env, "DRIFTLOOP_MODEL_TAG": world.model_tag}
        # ours keeps the production defaults of the shipper (interval 5 s, segments 2 s)
        ours_env = {**env, "DRIFTLOOP_STATE_DIR": str(root / "state-ours")}
        servers: dict[str, Server] = {}
        try:
            print(
                f"starting bentoml serve (bare, ours, {UNCACHED}"
                f"{''.join(', ' + v for v in variants)}) ..."
            )
            t0 = time.perf_counter()
            servers["bare"] = start_bentoml(BARE, env, root / "bare.log")
            result["startup_seconds_bare"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            servers["ours"] = start_bentoml(OURS, ours_env, root / "ours.log")
            result["startup_seconds_ours"] = time.perf_counter() - t0
            # ours with the online cache off: every batch reads all its entities from
            # SQLite, as when the store changes between any two requests
            servers[UNCACHED] = start_bentoml(
                OURS,
                {**ours_env, "DRIFTLOOP_STATE_DIR": str(root / f"state-{UNCACHED}"),
                 "DRIFTLOOP_ONLINE_CACHE": "false"},
                root / f"{UNCACHED}.log",
            )  # fmt: skip
            for name, target in variants.items():
                state = {"DRIFTLOOP_STATE_DIR": str(root / f"state-{name}")}
                servers[name] = start_bentoml(target, {**ours_env, **state}, root / f"{name}.log")
            for name, server in servers.items():  # warm-up: first requests load lazily
                run_load(
                    server.url + "/predict",
                    bodies.single(f"warm{name}"),
                    requests=100,
                    concurrency=4,
                )
            location = world.settings().table("predictions")
            print("/predict throughput (alternating rounds):")
            result["predict"] = throughput(servers, bodies, args)
            print("/predict_columns (columnar batches, concurrency 1):")
            result["predict_columns"] = batch(
                servers,
                "/predict_columns",
                lambda phase: bodies.columns(phase, args.column_rows),
                rows=args.column_rows,
                batches=args.column_batches,
                rounds=args.rounds,
            )
            print("/predict_batch (JSON list of objects, concurrency 1):")
            result["predict_batch"] = batch(
                servers,
                "/predict_batch",
                lambda phase: bodies.batch(phase, args.batch_rows),
                rows=args.batch_rows,
                batches=args.batches,
                rounds=args.rounds,
            )
            print("Delta files, same duration, N and 2N requests:")
            result["delta_files"] = files(servers["ours"], location, bodies, args)
            result["delta_files"]["total_files"] = delta_files(location)
            if args.profile:
                result["profile"] = profiles(servers["ours"], bodies, root, args)
        finally:
            for server in servers.values():
                server.stop(signal.SIGTERM, timeout=30)  # the whole worker tree, by PID
        print("in-process costs (CPU ms per call) ...")
        result["in_process_cpu_ms"] = in_process(world, root)
    result["checks"] = evaluate(
        result["predict"], result["predict_batch"], result["predict_columns"], result["delta_files"]
    )
    result["pass"] = all(c["pass"] for c in result["checks"].values() if "pass" in c)
    result["variant_checks"] = {
        name: evaluate(
            result["predict"], result["predict_batch"], result["predict_columns"], None, name
        )
        for name in (UNCACHED, *variants)
    }
    result["seconds"] = time.perf_counter() - started
    path = write_result(args.name, result)
    report(result)
    print(f"\nwritten {path}")
    return 0


def report(result: dict[str, Any]) -> None:
    rows = []
    for name in result["predict"]:
        for conc in ("c1", "c16"):
            r = result["predict"][name][conc]
            rows.append(
                [
                    f"{name} /predict {conc}",
                    r["requests_per_second"],
                    r["p50_ms"],
                    r["p99_ms"],
                    r["server_cpu_ms_per_request"],
                ]
            )
    print()
    print_table(rows, ["run", "req/s", "p50 ms", "p99 ms", "server cpu ms/req"])
    print()
    print_table(
        [
            [
                f"{n} {path} ({b['rows_per_batch']} rows)",
                b["rows_per_second"],
                b["p50_ms"],
                b["server_cpu_us_per_row"],
                b["errors"],
            ]
            for path in ("/predict_columns", "/predict_batch")
            for n, b in result[path.strip("/")].items()
        ],
        ["run", "rows/s", "p50 ms/batch", "server cpu us/row", "errors"],
    )
    print()
    print_table(
        [
            [
                k,
                v.get("value"),
                v.get("floor", v.get("ceiling", "")),
                {True: "pass", False: "FAIL"}.get(v.get("pass"), "-"),
            ]
            for k, v in result["checks"].items()
        ],
        ["check (ours vs bare)", "value", "floor", "result"],
    )
    for name, checks in result.get("variant_checks", {}).items():
        print()
        print_table(
            [
                [k, v.get("value"), {True: "pass", False: "FAIL"}.get(v.get("pass"), "-")]
                for k, v in checks.items()
            ],
            [f"check ({name} vs bare)", "value", "result"],
        )
    print()
    print_table([[k, v] for k, v in result["in_process_cpu_ms"].items()], ["in-process", "cpu ms"])
    if "profile" in result:
        for label, prof in result["profile"].items():
            print()
            print_table(
                [[k, f"{v:.1%}"] for k, v in prof["inclusive_share"].items()],
                [f"py-spy {label} ({prof['samples']} samples)", "inclusive"],
            )


if __name__ == "__main__":
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    raise SystemExit(main())
