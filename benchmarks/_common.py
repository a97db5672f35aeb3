"""Helpers shared by the benchmark scripts: a small world, `bentoml serve`, load, stats, JSON.

Benchmarks are scripts (``python benchmarks/<name>.py``), never timed assertions in
tests. Each one prints a table and writes ``benchmarks/results/<name>.json`` with
:func:`write_result`.

- :func:`build_world`: simulated history (Delta), the Feast repo applied and
  materialised (SQLite), a champion registered in a BentoML store, all under one
  directory (the same steps as ``tests/fixtures/world.py``).
- :func:`start_bentoml` / :class:`Server`: ``bentoml serve`` on a free 127.0.0.1 port
  in its own process group, stopped by PID.
- :func:`run_load`: an asyncio httpx load generator at a fixed concurrency for a fixed
  number of requests; :class:`LoadResult` holds requests/s and latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from driftloop.servers import BentoServer
from driftloop.servers import start_bentoml as _start_bentoml

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- numbers ---------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (load average included: the cores are shared)."""
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (floats rounded, keys in insertion order)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(_rounded(payload), indent=2) + "\n")
    return path


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[str(h) for h in header], *[[_fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, r in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


# -- a small world ---------------------------------------------------------------------
@dataclass
class World:
    """Where a benchmark's state lives, and what a `bentoml serve` of its champion needs."""

    root: Path
    env: dict[str, str]
    model_tag: str
    transactions: pl.DataFrame

    def settings(self, **overrides: Any):  # -> driftloop.settings.Settings
        from driftloop.settings import Settings

        values: dict[str, Any] = {
            "data_root": self.env["DRIFTLOOP_DATA_ROOT"],
            "state_dir": Path(self.env["DRIFTLOOP_STATE_DIR"]),
            "bentoml_home": Path(self.env["BENTOML_HOME"]),
            "feast_repo": Path(self.env["DRIFTLOOP_FEAST_REPO"]),
        }
        values.update(overrides)
        return Settings(**values)

    def request(self, i: int, *, request_id: str | None = None) -> dict[str, Any]:
        """The body of the ``i``-th transaction of the history (newest first) as a request."""
        row = self.transactions.row(-1 - (i % self.transactions.height), named=True)
        body: dict[str, Any] = {
            "transaction_id": f"bench-{i}",
            "card_id": row["card_id"],
            "merchant_id": row["merchant_id"],
            "amount": row["amount"],
            "category": row["category"],
            "channel": row["channel"],
            "country": row["country"],
            "timestamp": row["event_timestamp"].isoformat(),
        }
        if request_id is not None:
            body["request_id"] = request_id
        return body


def build_world(
    root: Path, *, n_events: int = 40_000, seed: int = 11, n_estimators: int = 80
) -> World:
    """History, features (applied + materialised) and a registered champion under ``root``.

    Exports ``BENTOML_HOME`` and ``DRIFTLOOP_DATA_ROOT`` into this process (the BentoML
    store is process-global); the same values are in ``World.env`` for subprocesses.
    """
    from driftloop import jobs
    from driftloop.simulate import SimulationConfig
    from driftloop.training import TrainConfig

    env = {
        "DRIFTLOOP_DATA_ROOT": str(root / "data"),
        "DRIFTLOOP_STATE_DIR": str(root / "state"),
        "DRIFTLOOP_BENTOML_HOME": str(root / "bentoml"),
        "DRIFTLOOP_FEAST_REPO": str(REPO / "feature_repo"),
        "BENTOML_HOME": str(root / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    os.environ.update(env)
    world = World(root=root, env=env, model_tag="", transactions=pl.DataFrame())
    settings = world.settings()
    settings.apply_environment()
    jobs.generate_history(settings, SimulationConfig(n_events=n_events, seed=seed, days=7.0))
    tx = jobs.load_history(settings)
    jobs.prepare_features(settings, tx)
    tag, _ = jobs.train_and_register(
        settings, tx, TrainConfig(n_estimators=n_estimators), stage="champion"
    )
    world.model_tag = tag
    world.transactions = tx
    return world


# -- bentoml serve ---------------------------------------------------------------------
#: a running ``bentoml serve`` (stopped by PID, whole process tree)
Server = BentoServer


def free_port() -> int:
    from driftloop.prefect_local import free_port as _free_port

    return _free_port()


def start_bentoml(
    target: str, env: dict[str, str], log: Path, *, port: int | None = None, timeout: float = 120.0
) -> Server:
    """Run ``bentoml serve target`` from the checkout on 127.0.0.1 and wait for /readyz."""
    return _start_bentoml(target, env, log, cwd=REPO, port=port, timeout=timeout)


# -- load ------------------------------------------------------------------------------
@dataclass
class LoadResult:
    """One load run: ``requests`` sent at ``concurrency``; latencies in milliseconds."""

    concurrency: int
    requests: int
    ok: int
    errors: int
    seconds: float
    latencies_ms: list[float] = field(repr=False, default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 99)

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "statuses": self.statuses,
            "seconds": self.seconds,
            "requests_per_second": self.rps,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
        }


async def _load(
    url: str,
    bodies: Callable[[int], Any],
    requests: int,
    concurrency: int,
    timeout: float,
    rate: float | None,
) -> LoadResult:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < requests:
                i = next_index
                next_index += 1
                if rate is not None:  # open-loop pacing: request i is due at i / rate
                    delay = started_all + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                body = bodies(i)
                started = time.perf_counter()
                try:
                    r = await client.post(url, json=body)
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                elapsed = (time.perf_counter() - started) * 1000
                statuses[key] = statuses.get(key, 0) + 1
                if key == "200":
                    latencies.append(elapsed)

        started_all = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started_all
    ok = statuses.get("200", 0)
    return LoadResult(
        concurrency=concurrency,
        requests=requests,
        ok=ok,
        errors=requests - ok,
        seconds=seconds,
        latencies_ms=latencies,
        statuses=dict(sorted(statuses.items())),
    )


def run_load(
    url: str,
    bodies: Callable[[int], Any],
    *,
    requests: int,
    concurrency: int,
    timeout: float = 30.0,
    rate: float | None = None,
) -> LoadResult:
    """POST ``bodies(i)`` for i in range(requests) to ``url`` from ``concurrency`` clients.

    Bounded by the request count; a request counts as ok on HTTP 200 only. With
    ``rate`` (requests/s) request ``i`` is not sent before ``i / rate`` seconds.
    """
    return asyncio.run(_load(url, bodies, requests, concurrency, timeout, rate))
