"""Durability of the prediction log under SIGKILL, against a real `bentoml serve`.

Eight concurrent clients score transactions, each with its own request id: six one
at a time (``/predict``, JSON-lines spool segments), two in column-wise batches
(``/predict_columns``, one Arrow spool record per batch). At random
moments under load the whole server (the supervisor's process group and its workers,
which BentoML runs in sessions of their own) is SIGKILLed and restarted on the same
spool and data directories. After the last round the server is stopped gracefully
and predlog's recovery runs. Every request the clients got a 200 for must be in the
Delta table ``predictions`` exactly once; no request id may appear twice; requests
that were in flight at a kill may or may not be there, but only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import polars as pl
import psutil
import pytest

from tests.fixtures.world import Server, World, start_bentoml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 8
#: of which this many send column-wise batches of COLUMN_ROWS rows
COLUMN_CLIENTS = 2
#: rows per columnar batch (at least predlog.COLUMNAR_MIN_ROWS: an Arrow record each)
COLUMN_ROWS = 80
KILLS = 5
#: the load is bounded by count as well as by time
MAX_REQUESTS = 50_000
#: acknowledged requests wanted after each (re)start before the next kill may happen
MIN_ACKS_PER_ROUND = 20
ROUND_TIMEOUT_SECONDS = 60.0
#: a cold start imports BentoML, XGBoost and Feast twice (supervisor, worker): ~25 s on
#: 2 busy cores, over 80 s when they are shared with other work
START_TIMEOUT_SECONDS = 240.0
TARGET = "bentos.service:FraudModel"


@dataclass
class Load:
    """What the clients sent and what the server acknowledged."""

    prefix: str
    url: str
    sent: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    mismatched: list[str] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    stop: bool = False
    counter: int = 0
    acked_columns: int = 0  # of acked, rows acknowledged by /predict_columns

    def next_id(self) -> str:
        self.counter += 1
        return f"{self.prefix}-{self.counter:06d}"


def transaction(world: World, i: int, request_id: str) -> dict:
    return world.request(i, f"dur-{i}", request_id, among=2_000)


async def client(world: World, load: Load, http: httpx.AsyncClient) -> None:
    while not load.stop and load.counter < MAX_REQUESTS:
        rid = load.next_id()
        body = {"transaction": transaction(world, load.counter, rid)}
        load.sent.add(rid)
        try:
            r = await http.post(f"{load.url}/predict", json=body)
        except httpx.HTTPError as exc:  # the server is down or was killed mid-request
            kind = type(exc).__name__
            load.failures[kind] = load.failures.get(kind, 0) + 1
            # while the server restarts, do not steal its CPU with a connect storm
            await asyncio.sleep(0.5 if isinstance(exc, httpx.ConnectError) else 0.05)
            continue
        if r.status_code == 200:
            if r.json()["request_id"] != rid:
                load.mismatched.append(rid)
            load.acked.add(rid)
        else:
            key = str(r.status_code)
            load.failures[key] = load.failures.get(key, 0) + 1
            await asyncio.sleep(0.05)


async def column_client(world: World, load: Load, http: httpx.AsyncClient) -> None:
    """Like :func:`client`, with batches of COLUMN_ROWS rows sent column-wise."""
    while not load.stop and load.counter < MAX_REQUESTS:
        rows = []
        for _ in range(COLUMN_ROWS):
            rid = load.next_id()
            rows.append(transaction(world, load.counter, rid))
        ids = [r["request_id"] for r in rows]
        columns = {name: [r[name] for r in rows] for name in rows[0]}
        load.sent.update(ids)
        try:
            r = await http.post(f"{load.url}/predict_columns", json={"columns": columns})
        except httpx.HTTPError as exc:
            kind = type(exc).__name__
            load.failures[kind] = load.failures.get(kind, 0) + 1
            await asyncio.sleep(0.5 if isinstance(exc, httpx.ConnectError) else 0.05)
            continue
        if r.status_code == 200:
            if r.json()["request_id"] != ids:
                load.mismatched.extend(ids)
            load.acked.update(ids)
            load.acked_columns += len(ids)
        else:
            key = str(r.status_code)
            load.failures[key] = load.failures.get(key, 0) + 1
            await asyncio.sleep(0.05)


async def wait_for_acks(load: Load, at_least: int) -> None:
    deadline = time.monotonic() + ROUND_TIMEOUT_SECONDS
    while len(load.acked) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress: {len(load.acked)} acks, failures {load.failures}")
        await asyncio.sleep(0.05)


def kill_all(server: Server) -> None:
    """SIGKILL the supervisor's process group and every worker of it.

    BentoML's supervisor (circus) starts each worker with ``setsid()``: workers are in
    process groups of their own, and a SIGKILL of the supervisor's group alone leaves
    them running, still serving on the inherited socket. The supervisor is frozen
    first (SIGSTOP) so it cannot respawn a worker in between.
    """
    os.killpg(server.proc.pid, signal.SIGSTOP)
    workers = psutil.Process(server.proc.pid).children(recursive=True)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=20)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers survived SIGKILL: {alive}"


def stop_gracefully(server: Server) -> None:
    """SIGTERM (the service flushes its log on shutdown); after 60 s, SIGKILL whatever
    is left, workers included (recovery then ships what the flush did not)."""
    if server.proc.poll() is not None:
        return
    workers = psutil.Process(server.proc.pid).children(recursive=True)
    server.stop(signal.SIGTERM, timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=10)
    for worker in alive:
        worker.kill()


def reap_strays(state: Path) -> None:
    """SIGKILL any worker still serving our state dir (e.g. one orphaned when a start
    timed out and only the supervisor's group was killed)."""
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("DRIFTLOOP_STATE_DIR") == str(state):
                proc.kill()


async def chaos(
    load: Load,
    env: dict[str, str],
    logs: Path,
    port: int,
    rng: random.Random,
    servers: list[Server],
) -> None:
    """Kill the server group at random moments under load and restart it, KILLS times."""
    for round_ in range(1, KILLS + 1):
        await wait_for_acks(load, len(load.acked) + MIN_ACKS_PER_ROUND)
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        await asyncio.to_thread(kill_all, servers[-1])
        log = logs / f"serve-{round_}.log"
        servers.append(
            await asyncio.to_thread(
                start_bentoml, TARGET, env, log, port=port, timeout=START_TIMEOUT_SECONDS
            )
        )
    await wait_for_acks(load, len(load.acked) + MIN_ACKS_PER_ROUND)


async def run(
    world: World,
    load: Load,
    env: dict[str, str],
    logs: Path,
    port: int,
    seed: int,
    servers: list[Server],
) -> None:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    timeout = httpx.Timeout(10.0, connect=1.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        clients = [
            asyncio.create_task(
                (column_client if i < COLUMN_CLIENTS else client)(world, load, http)
            )
            for i in range(CLIENTS)
        ]
        try:
            await chaos(load, env, logs, port, random.Random(seed), servers)
        finally:
            load.stop = True
            await asyncio.gather(*clients, return_exceptions=True)


def test_every_acknowledged_prediction_lands_in_delta_exactly_once_despite_sigkills(
    world: World, tmp_path: Path
) -> None:
    from driftloop import predlog
    from driftloop.prefect_local import free_port

    seed = int.from_bytes(os.urandom(4), "big")
    state = tmp_path / "state"
    env = {
        **world.env,
        "DRIFTLOOP_STATE_DIR": str(state),
        "DRIFTLOOP_MODEL_TAG": world.model_tag,
        "DRIFTLOOP_SHIPPER_INTERVAL_SECONDS": "0.5",
        "DRIFTLOOP_SPOOL_SEGMENT_SECONDS": "0.5",
    }
    started = time.monotonic()
    port = free_port()
    load = Load(prefix=f"dur{uuid.uuid4().hex[:8]}", url=f"http://127.0.0.1:{port}")
    servers: list[Server] = []
    try:
        log = tmp_path / "serve-0.log"
        servers.append(start_bentoml(TARGET, env, log, port=port, timeout=START_TIMEOUT_SECONDS))
        asyncio.run(run(world, load, env, tmp_path, port, seed, servers))
    finally:
        for server in servers:  # the killed ones are already gone; the last stops gracefully
            stop_gracefully(server)
        reap_strays(state)
    assert not load.mismatched, f"responses for other request ids: {load.mismatched[:5]}"
    settings = world.settings().model_copy(update={"state_dir": state})
    predlog.ship_all(settings, tables=["predictions"])

    table = pl.read_delta(settings.table("predictions"))
    counts = table.group_by("request_id").len()
    # only this test's ids: other tests of the session share the table and send some ids
    # to several endpoints on purpose
    ours = counts.filter(pl.col("request_id").str.starts_with(load.prefix))
    duplicated = ours.filter(pl.col("len") > 1)
    stored = set(ours["request_id"].to_list())
    in_flight = load.sent - load.acked
    context = (
        f"seed={seed} sent={len(load.sent)} acked={len(load.acked)} "
        f"in_flight_stored={len(stored & in_flight)}/{len(in_flight)} failures={load.failures} "
        f"acked_by_columns={load.acked_columns} "
        f"elapsed={time.monotonic() - started:.1f}s"
    )
    assert duplicated.height == 0, f"duplicated request ids: {duplicated.head(5)} ({context})"
    lost = load.acked - stored
    assert not lost, (
        f"{len(lost)} acknowledged predictions missing, e.g. {sorted(lost)[:5]} ({context})"
    )
    assert stored <= load.sent, f"unknown request ids stored ({context})"
    assert len(load.acked) >= (KILLS + 1) * MIN_ACKS_PER_ROUND, context
    assert load.acked_columns >= COLUMN_ROWS, f"no columnar batch was acknowledged ({context})"
    # the kills happened under load: some requests were cut off mid-flight
    assert load.failures, f"no request ever failed: the kills missed the load ({context})"
    # recovery left nothing behind in the spool
    left = [
        p.name
        for p in (state / "spool" / "predictions").glob("*")
        if p.suffix in (".seg", ".open", ".aseg", ".aopen")
    ]
    assert not left, f"segments left in the spool after recovery: {left} ({context})"
    print(context)
