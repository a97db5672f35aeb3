"""Monitor vs Evidently alone: wall time, peak memory and per-feature verdict agreement.

For each window size (default 100k and 1M rows x 17 columns: 13 numeric, 3
categorical and the score) this script simulates a card stream (covariate shift
on the last 30 % of the window), scores it with a small XGBoost model, writes the
window to real Delta tables (predictions + labels) and the reference (100k rows)
next to them, then runs two measurements, each in a fresh process (so peak RSS
is its own):

* **ours**, end to end: read the window from Delta (partition pruning, labels
  joined), judge it (quality, drift against the precomputed reference profile,
  sliding-window KS on the score, labelled performance, the N-window rule) while
  the Evidently HTML report on a bounded sample (5k rows a side) is built in a
  background thread (``monitoring.start_report``: it needs no verdict), then the
  Prometheus textfile and the event payloads (built, not sent);
* **Evidently alone**: ``DataDriftPreset`` (current API, Evidently's default tests)
  on the full window against the same reference, frames already in memory. When
  it cannot finish within ``--evidently-timeout`` seconds it is run on a random
  subsample of the window and its time extrapolated linearly in rows (said so in
  the JSON).

Fair means used by ours: reference statistics precomputed once at training time
(quantiles, bins, counts), vectorised numpy/polars tests against them, and a
bounded sample for the HTML report. Prints a summary and writes
benchmarks/results/monitoring.json.

    python benchmarks/monitoring.py [--sizes 100000 1000000] [--evidently-timeout 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "monitoring.json"
REPO = Path(__file__).resolve().parents[1]
MODEL = "bench"
VERSION = "v1"
EVENTS_PER_DAY = 40_000
LEAD_IN_DAYS = 12  # reference = days [8, 12), the window starts on day 12
REPORT_SAMPLE_ROWS = 5_000
START = datetime(2026, 1, 1, tzinfo=UTC)
NUMERIC = (
    "amount",
    "hour_of_day",
    "card_txn_count_1h",
    "card_txn_count_24h",
    "card_amount_mean_1h",
    "card_amount_mean_24h",
    "secs_since_last_txn",
    "amount_to_card_mean",
    "merchant_txn_count_24h",
    "merchant_amount_mean_24h",
    "merchant_fraud_rate_30d",
    "feature_age_seconds",
    "latency_ms",
)
CATEGORICAL = ("category", "channel", "country")
COLUMNS = (*NUMERIC, *CATEGORICAL, "score")


# -- data --------------------------------------------------------------------------
def _train_model(workdir: Path) -> Path:
    """A small fraud model on a stable simulated history (cached)."""
    path = workdir / "model.ubj"
    if path.exists():
        return path
    from driftloop.features import compute_card_features, compute_merchant_features
    from driftloop.simulate import SimulationConfig, simulate
    from driftloop.training import TrainConfig, join_features_in_memory, train_model

    tx = simulate(SimulationConfig(n_events=60_000, seed=3, days=10.0))
    frame = join_features_in_memory(tx, compute_card_features(tx), compute_merchant_features(tx))
    result = train_model(frame, TrainConfig(n_estimators=60, nthread=2))
    result.booster.save_model(str(path))
    (workdir / "threshold.txt").write_text(str(result.threshold))
    return path


def prepare(workdir: Path, rows: int, reference_rows: int) -> dict[str, Any]:
    """Simulate, score and write one window of ``rows`` predictions to Delta (not timed)."""
    import numpy as np
    import polars as pl
    import xgboost as xgb
    from deltalake import write_deltalake

    from driftloop.drift import build_profile
    from driftloop.features import compute_card_features, compute_merchant_features
    from driftloop.modeling import FeatureEncoder, predict
    from driftloop.schema import LABEL_SCHEMA, PREDICTION_SCHEMA
    from driftloop.settings import Settings
    from driftloop.simulate import SimulationConfig, simulate
    from driftloop.training import join_features_in_memory

    model_path = _train_model(workdir)
    threshold = float((workdir / "threshold.txt").read_text())
    booster = xgb.Booster()
    booster.load_model(str(model_path))
    booster.set_param({"nthread": 2})

    base = workdir / f"w{rows}"
    meta_path = base / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    span_days = rows / EVENTS_PER_DAY
    days = LEAD_IN_DAYS + span_days * 1.1
    began = time.perf_counter()
    tx = simulate(
        SimulationConfig(
            n_events=int(EVENTS_PER_DAY * days),
            seed=5,
            days=days,
            scenario="covariate_shift",
            start=START,
            drift_start=START + timedelta(days=LEAD_IN_DAYS + 0.7 * span_days),
        )
    )
    frame = join_features_in_memory(tx, compute_card_features(tx), compute_merchant_features(tx))
    frame = frame.with_columns(
        pl.Series("score", predict(booster, FeatureEncoder().encode_frame(frame)))
    )
    ts = pl.col("event_timestamp")
    rng = np.random.default_rng(0)
    frame = frame.with_columns(
        (ts.dt.epoch("us") / 1e6 - pl.col("card_last_txn_ts")).alias("feature_age_seconds"),
        pl.Series("latency_ms", rng.gamma(2.0, 0.6, frame.height)),
    )
    ref_start, window_start = START + timedelta(days=8), START + timedelta(days=LEAD_IN_DAYS)
    reference = (
        frame.filter(ts >= ref_start, ts < window_start)
        .sample(reference_rows, seed=0)
        .select(*COLUMNS, pl.col("is_fraud").cast(pl.Int8).alias("label"))
    )
    window = frame.filter(ts >= window_start).head(rows)
    window_end = window["event_timestamp"].max() + timedelta(microseconds=1)

    predictions = (
        window.select(
            pl.concat_str(pl.lit("req-"), "transaction_id").alias("request_id"),
            "transaction_id",
            ts.alias("received_at"),
            ts,
            pl.lit(MODEL).alias("model_name"),
            pl.lit(VERSION).alias("model_version"),
            pl.lit("champion").alias("arm"),
            "card_id",
            "merchant_id",
            *[pl.col(c).cast(pl.Float64).fill_nan(None) for c in NUMERIC],
            *CATEGORICAL,
            "score",
            (pl.col("score") >= threshold).cast(pl.Int8).alias("decision"),
            ts.dt.strftime("%Y-%m-%d").alias("date"),
        )
        .select(list(PREDICTION_SCHEMA))
        .cast(PREDICTION_SCHEMA)
    )  # type: ignore[arg-type]
    labels = window.select(
        pl.concat_str(pl.lit("lab-"), "transaction_id").alias("label_id"),
        pl.concat_str(pl.lit("req-"), "transaction_id").alias("request_id"),
        "transaction_id",
        pl.col("is_fraud").alias("label"),
        pl.col("label_available_at").alias("observed_at"),
        pl.col("label_available_at").alias("received_at"),
        pl.col("label_available_at").dt.strftime("%Y-%m-%d").alias("date"),
    ).cast(LABEL_SCHEMA)  # type: ignore[arg-type]
    settings = Settings(data_root=str(base / "data"), state_dir=base / "state")
    for name, table in (("predictions", predictions), ("labels", labels)):
        for chunk in table.iter_slices(250_000):
            write_deltalake(
                settings.table(name), chunk.to_arrow(), mode="append", partition_by=["date"]
            )
    reference.write_parquet(base / "reference.parquet")
    t = time.perf_counter()
    profile = build_profile(reference, numeric=NUMERIC, categorical=CATEGORICAL)
    profile_seconds = time.perf_counter() - t
    (base / "profile.json").write_text(profile.model_dump_json())
    perf = _holdout_metrics(reference, threshold)
    meta = {
        "rows": window.height,
        "reference_rows": reference.height,
        "window_start": window_start.isoformat(),
        "window_end": window_end.isoformat(),
        "drift_start": (START + timedelta(days=LEAD_IN_DAYS + 0.7 * span_days)).isoformat(),
        "threshold": threshold,
        "baseline": perf,
        "profile_build_seconds": profile_seconds,
        "prepare_seconds": time.perf_counter() - began,
        "data_root": settings.data_root,
        "state_dir": str(settings.state_dir),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def _holdout_metrics(reference: Any, threshold: float) -> dict[str, Any]:
    from driftloop.performance import compute_performance

    p = compute_performance(reference, threshold)
    metrics = {k: v for k, v in p.metrics().items() if k not in ("n_labelled", "n_positives")}
    return {"metrics": metrics, "n_labelled": p.n_labelled, "n_positives": p.n_positives}


# -- measured workers (each in its own process) ---------------------------------------
def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss would carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker_ours(base: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    import polars as pl

    from driftloop import monitoring
    from driftloop.drift import ReferenceProfile
    from driftloop.evidently_report import import_evidently
    from driftloop.monitoring import Baseline, MonitorParams, MonitorState
    from driftloop.settings import Settings

    import_evidently()  # run_evidently imports it lazily: ~5 s, counted with the imports
    import_s = time.perf_counter() - t0
    rss_imported = _rss_mb()
    meta = json.loads((base / "meta.json").read_text())
    settings = Settings(data_root=meta["data_root"], state_dir=Path(meta["state_dir"]))
    start = datetime.fromisoformat(meta["window_start"])
    end = datetime.fromisoformat(meta["window_end"])
    minutes = int((end - start).total_seconds() // 60) + 1
    params = MonitorParams(
        model_name=MODEL,
        window_end=end,
        window_minutes=minutes,
        labels_as_of=end + timedelta(days=30),
        report_sample_rows=REPORT_SAMPLE_ROWS,
    ).resolve(settings)

    t, cpu = time.perf_counter(), _cpu()
    # the champion's stored reference: profile (precomputed) + the sample for the report
    profile = ReferenceProfile.model_validate_json((base / "profile.json").read_text())
    reference = pl.read_parquet(base / "reference.parquet")
    baseline = Baseline(**meta["baseline"])
    t_ref = time.perf_counter()
    window = monitoring.load_window(settings, params, model_version=VERSION)
    t_read = time.perf_counter()

    # the report needs no verdict: built in a background thread while the window is judged
    report_done: list[float] = []  # when the report thread finished (its done-callback)
    called_back = threading.Event()
    pending = monitoring.start_report(
        MODEL,
        window.info,
        profile,
        reference,
        window.frame,
        settings.reports_dir,
        sample_rows=REPORT_SAMPLE_ROWS,
    )
    pending.add_done_callback(
        lambda _: (report_done.append(time.perf_counter()), called_back.set())
    )
    result = monitoring.judge(
        profile,
        baseline,
        meta["threshold"],
        window.frame,
        params,
        MonitorState(model_name=MODEL),
        window=window.info,
        model_tag=f"{MODEL}:{VERSION}",
    )
    t_judge = time.perf_counter()
    evidently = pending.result()  # raises what the report raised
    called_back.wait()
    result = result.with_report(evidently)
    t_report = time.perf_counter()
    monitoring.publish_metrics(result, settings.state_dir)
    payloads = [p.payload.model_dump(mode="json") for p in result.events()]
    t_end = time.perf_counter()
    cpu_seconds = _cpu() - cpu
    assert result.drift is not None
    verdicts = {f.column: f.drifted for f in result.drift.features if not f.skipped}
    if result.drift.prediction is not None:
        verdicts["score"] = result.drift.prediction.drifted
    return {
        "rows": window.info.rows,
        "import_seconds": import_s,
        "seconds": {
            "load_reference": t_ref - t,
            "read_delta": t_read - t_ref,
            "judge": t_judge - t_read,
            "report_sample": t_report - t_judge,  # waited for after judging
            "report_thread": report_done[0] - t_read,  # its own wall time, overlapping judge
            "metrics_and_payloads": t_end - t_report,
            "total": t_end - t,
        },
        "cpu_seconds": cpu_seconds,
        "loadavg_1m": os.getloadavg()[0],
        "rss_after_imports_mb": rss_imported,
        "peak_rss_mb": _peak_mb(),
        "verdict": result.verdict,
        "reasons": result.reasons,
        "events": [p["verdict"] if "verdict" in p else "" for p in payloads],
        "drifted_columns": sorted(c for c, d in verdicts.items() if d),
        "verdicts": verdicts,
        "details": {
            f.column: {
                "method": f.method,
                "p_value": f.p_value,
                "effect": f.effect_metric,
                "effect_size": f.effect_size,
            }
            for f in [*result.drift.features, result.drift.prediction]
            if f is not None and not f.skipped
        },
        "report_path": evidently.html_path,
        "report_bytes": Path(evidently.html_path or "").stat().st_size
        if evidently.html_path
        else None,
    }


def worker_evidently(base: Path, subsample: int | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    import polars as pl

    from driftloop.evidently_report import import_evidently, run_evidently

    import_evidently()  # as for ours: imports are not timed
    import_s = time.perf_counter() - t0
    rss_imported = _rss_mb()
    meta = json.loads((base / "meta.json").read_text())
    start = datetime.fromisoformat(meta["window_start"])
    end = datetime.fromisoformat(meta["window_end"])
    t = time.perf_counter()
    current = (
        pl.scan_delta(str(Path(meta["data_root"]) / "predictions"))
        .filter(pl.col("received_at") >= start, pl.col("received_at") < end)
        .select(COLUMNS)
        .collect()
    )
    reference = pl.read_parquet(base / "reference.parquet").select(COLUMNS)
    read_s = time.perf_counter() - t
    if subsample is not None and subsample < current.height:
        current = current.sample(subsample, seed=1)
    t, cpu = time.perf_counter(), _cpu()
    result = run_evidently(
        reference,
        current,
        COLUMNS,
        None,
        max_rows=10**9,  # no sampling: the full window
        categorical=CATEGORICAL,
        drift_share=0.25,
    )
    seconds, cpu_seconds = time.perf_counter() - t, _cpu() - cpu
    return {
        "rows": current.height,
        "cpu_seconds": cpu_seconds,
        "loadavg_1m": os.getloadavg()[0],
        "import_seconds": import_s,
        "read_seconds": read_s,
        "seconds": seconds,
        "rss_after_imports_mb": rss_imported,
        "peak_rss_mb": _peak_mb(),
        "dataset_drifted": result.dataset_drifted,
        "drifted_columns": sorted(result.drifted_columns),
        "verdicts": {c: r.drifted for c, r in result.columns.items()},
        "details": {
            c: {"method": r.method, "score": r.score, "threshold": r.threshold}
            for c, r in result.columns.items()
        },
    }


def _run_worker(args: list[str], timeout: float | None) -> dict[str, Any] | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- driver ----------------------------------------------------------------------------
def _extrapolate(sub: dict[str, Any], rows: int, full_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Evidently's time on ``rows`` from a subsample run: a line through a smaller full run
    and the subsample (fixed costs such as plotting are not scaled), else proportional."""
    smaller = [r for r in full_runs if r["rows"] < sub["rows"]]
    out: dict[str, Any] = {}
    for key in ("seconds", "cpu_seconds"):
        if smaller:
            ref = max(smaller, key=lambda r: r["rows"])
            slope = (sub[key] - ref[key]) / (sub["rows"] - ref["rows"])
            if slope > 0:
                out[f"extrapolated_{key}"] = sub[key] + slope * (rows - sub["rows"])
                out["extrapolation"] = (
                    f"linear through the full {ref['rows']:,}-row run and the subsample"
                )
                continue
        out[f"extrapolated_{key}"] = sub[key] * rows / sub["rows"]
        out.setdefault("extrapolation", "proportional to rows")
    return out


def _agreement(ours: dict[str, bool], theirs: dict[str, bool]) -> dict[str, Any]:
    cols = sorted(set(ours) & set(theirs))
    same = [c for c in cols if ours[c] == theirs[c]]
    return {
        "columns": len(cols),
        "agree": len(same),
        "share": len(same) / len(cols) if cols else None,
        "disagreements": [
            {"column": c, "ours": ours[c], "evidently": theirs[c]} for c in cols if c not in same
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--reference-rows", type=int, default=100_000)
    parser.add_argument(
        "--evidently-timeout",
        type=float,
        default=200.0,
        help="seconds before Evidently alone falls back to a subsample",
    )
    parser.add_argument("--evidently-subsample", type=int, default=250_000)
    parser.add_argument("--repeat", type=int, default=2, help="runs of ours (the fastest kept)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, base, *rest = args.worker
        if kind == "ours":
            print(json.dumps(worker_ours(Path(base))))
        else:
            print(json.dumps(worker_evidently(Path(base), int(rest[0]) if rest else None)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="driftloop-bench-monitor-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(),
        },
        "columns": {
            "numeric": list(NUMERIC),
            "categorical": list(CATEGORICAL),
            "prediction": "score",
        },
        "reference_rows": args.reference_rows,
        "report_sample_rows": REPORT_SAMPLE_ROWS,
        "means": [
            "reference statistics precomputed once (driftloop.drift.build_profile, stored with "
            "the model): quantiles, PSI bins, category counts",
            "vectorised numpy/polars tests against the stored quantiles (KS, PSI, normed "
            "Wasserstein, chi-square, Jensen-Shannon)",
            "polars scan of Delta with date-partition pruning",
            f"Evidently HTML report on a bounded sample ({REPORT_SAMPLE_ROWS} rows a side), "
            "built in a background thread while the window is judged (it needs no verdict)",
            "labels joined by a hash join on request_id (checked, general path otherwise)",
        ],
        "timing": "wall seconds after imports (Evidently's included: imported up front by both, "
        "~5 s) (ours: fastest of --repeat runs) and CPU seconds "
        "(user + sys, all threads) of the timed part; each measurement in its own process; "
        "peak memory is the process's peak RSS (VmHWM), imports included. The machine is "
        "shared: see loadavg_1m of each measurement",
        "evidently_alone": "DataDriftPreset, Evidently's default per-column tests, frames in "
        "memory (Delta read not counted), no HTML",
        "sizes": {},
    }
    full_runs: list[dict[str, Any]] = []  # Evidently alone on full windows, for extrapolation
    for rows in args.sizes:
        print(f"== {rows:,} rows: preparing data (not timed) ...", flush=True)
        meta = prepare(workdir, rows, args.reference_rows)
        base = workdir / f"w{rows}"
        runs = [_run_worker(["ours", str(base)], None) for _ in range(args.repeat)]
        ours = min(runs, key=lambda r: r["seconds"]["total"])  # type: ignore[index]
        assert ours is not None
        ours["all_totals"] = [r["seconds"]["total"] for r in runs]  # type: ignore[index]
        print(
            f"   ours: {ours['seconds']['total']:.2f} s end to end "
            f"(read {ours['seconds']['read_delta']:.2f}, judge {ours['seconds']['judge']:.2f}, "
            f"report {ours['seconds']['report_sample']:.2f} more "
            f"({ours['seconds']['report_thread']:.2f} alongside judge); "
            f"{ours['cpu_seconds']:.1f} CPU s), "
            f"peak {ours['peak_rss_mb']:.0f} MB, verdict {ours['verdict']}",
            flush=True,
        )
        evid = _run_worker(["evidently", str(base)], args.evidently_timeout)
        subsampled = evid is None
        if evid is None:
            print(
                f"   Evidently alone did not finish in {args.evidently_timeout:.0f} s; "
                f"running it on {args.evidently_subsample:,} rows and extrapolating",
                flush=True,
            )
            evid = _run_worker(["evidently", str(base), str(args.evidently_subsample)], None)
            assert evid is not None
            evid.update(_extrapolate(evid, rows, full_runs))
            evid["note"] = (
                f"did not finish within {args.evidently_timeout:.0f} s on the full window; "
                f"run on a random subsample of {evid['rows']:,} rows and extrapolated to "
                f"{rows:,} rows ({evid['extrapolation']}); verdicts are the subsample's"
            )
        else:
            full_runs.append(evid)
        full_seconds = evid.get("extrapolated_seconds", evid["seconds"])
        full_cpu = evid.get("extrapolated_cpu_seconds", evid["cpu_seconds"])
        speedup = full_seconds / ours["seconds"]["total"]
        cpu_speedup = full_cpu / ours["cpu_seconds"]
        agreement = _agreement(ours["verdicts"], evid["verdicts"])
        print(
            f"   Evidently alone: {evid['seconds']:.2f} s on {evid['rows']:,} rows"
            + (f" (extrapolated {full_seconds:.1f} s)" if subsampled else "")
            + f", {evid['cpu_seconds']:.1f} CPU s, peak {evid['peak_rss_mb']:.0f} MB; "
            f"speed-up x{speedup:.1f} (CPU x{cpu_speedup:.1f}); "
            f"verdicts agree on {agreement['agree']}/{agreement['columns']}",
            flush=True,
        )
        out["sizes"][str(rows)] = {
            "data": meta,
            "ours": ours,
            "evidently_alone": evid,
            "evidently_alone_subsampled": subsampled,
            "speedup": speedup,
            "speedup_cpu": cpu_speedup,
            "agreement": agreement,
        }
    big = out["sizes"].get("1000000")
    if big is not None:
        out["floors"] = {
            "1m_end_to_end_seconds": big["ours"]["seconds"]["total"],
            "1m_end_to_end_le_20s": big["ours"]["seconds"]["total"] <= 20.0,
            "1m_end_to_end_cpu_seconds": big["ours"]["cpu_seconds"],
            "speedup_vs_evidently_alone": big["speedup"],
            "speedup_cpu_vs_evidently_alone": big["speedup_cpu"],
            "speedup_ge_5x": big["speedup"] >= 5.0,
        }
    out["machine"]["loadavg_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {RESULTS}")
    if "floors" in out:
        print(json.dumps(out["floors"], indent=2))


if __name__ == "__main__":
    main()
