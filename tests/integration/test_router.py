"""The router (bentos/router.py) in front of two real model arms run by the LocalPlane.

Arms and router are real ``bentoml serve`` processes on 127.0.0.1 (each costs
5-30 s to start on a loaded 2-core machine), so the module starts them once and
the tests walk through: weighted sticky routing at concurrency 16 (single and
batch), live weight changes, a router restart, shadow mirroring, and a dead arm
falling back to the champion until the plane restarts it.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import polars as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from driftloop import predlog
from driftloop.canary import read_counters
from driftloop.plane.local import LocalPlane, is_alive, port_accepts
from driftloop.rollout import Role
from driftloop.routing import WARMUP_REQUESTS, ArmCounters, RouteTable, router_home, window
from driftloop.settings import Settings
from tests.fixtures.world import REPO, Server, World, beside, start_bentoml
from tests.integration._traffic import send, transactions

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAMP, CANARY = "champ-a", "canary-b"
ARM_ENV = {
    "DRIFTLOOP_SHIPPER_INTERVAL_SECONDS": "0.5",
    "DRIFTLOOP_SPOOL_SEGMENT_SECONDS": "0.5",
}


class RouterProc:
    """The router under test; restartable, stopped by PID."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.server, self.starts = env, logs, None, 0

    def start(self) -> Server:
        self.starts += 1
        self.server = start_bentoml(
            "bentos.router:Router", self.env, self.logs / f"router-{self.starts}.log"
        )
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url


@pytest.fixture(scope="module")
def setup(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, LocalPlane, RouterProc]]:
    root = tmp_path_factory.mktemp("router")
    settings = world.settings().model_copy(update={"state_dir": root / "state"})
    plane = LocalPlane(
        settings,
        env={"DRIFTLOOP_MODEL_TAG": world.model_tag, **ARM_ENV},
        working_dir=REPO,
        ready_timeout=240,
    )
    router_env = {
        **world.env,
        "DRIFTLOOP_STATE_DIR": str(settings.state_dir),
        "BENTOML_HOME": str(router_home(settings.state_dir, "fraud")),
    }
    router = RouterProc(router_env, root)
    try:
        # the router reads its routes per request: it starts while the arms do
        with beside(router.start) as router_started:
            plane.deploy(CHAMP, "bentos.service:FraudModel", role=Role.CHAMPION)
            plane.deploy(CANARY, "bentos.service:FraudModel", role=Role.CANARY)
            plane.set_weights({CHAMP: 80, CANARY: 20})
        router_started.result()
        yield settings, plane, router
    finally:
        router.stop()
        plane.stop_all()


@pytest.fixture(scope="module")
def templates(world: World) -> list[dict]:
    return transactions(world.transactions, 400)


def table_of(plane: LocalPlane) -> RouteTable:
    return RouteTable.from_desired(plane.desired())


def metric(url: str, name: str) -> dict[tuple, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def counters_now(settings: Settings, wait: float = 1.5) -> dict[str, ArmCounters]:
    time.sleep(wait)  # the router flushes its counters every 0.5 s
    return window(read_counters(settings.state_dir, settings.model_name), {})


def test_weighted_sticky_routing_under_concurrency(setup, templates) -> None:
    settings, plane, router = setup
    table = table_of(plane)
    before = counters_now(settings, 0)
    results = send(router.url, templates, 800, concurrency=16, prefix="w")

    assert Counter(r.status for r in results) == {200: 800}
    for r in results:  # every answer came from the arm its card is routed to
        assert r.arm == table.choose(r.card_id), r
    arms_of_card: dict[int, set[str]] = {}
    for r in results:
        arms_of_card.setdefault(r.card_id, set()).add(r.arm)
    assert all(len(a) == 1 for a in arms_of_card.values())  # sticky
    share = sum(r.arm == CANARY for r in results) / len(results)
    assert 0.1 < share < 0.3

    # a batch is split by card and reassembled in order
    rows = [{**t, "transaction_id": f"b-{i}"} for i, t in enumerate(templates[:60])]
    answer = httpx.post(f"{router.url}/predict_batch", json={"transactions": rows}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [a["transaction_id"] for a in body] == [r["transaction_id"] for r in rows]
    assert [a["arm"] for a in body] == [table.choose(r["card_id"]) for r in rows]

    # the router's counters (the rollout's evidence) and its Prometheus series agree
    after = counters_now(settings)
    served = Counter(r.arm for r in results) + Counter(a["arm"] for a in body)
    for arm in (CHAMP, CANARY):
        got = after[arm].requests - (before[arm].requests if arm in before else 0)
        assert got == served[arm]
        assert after[arm].errors == after[arm].fallbacks == 0
        assert after[arm].latency_quantile_ms(0.99) > 0
    requests = metric(router.url, "driftloop_router_requests_total")
    assert any(dict(k)["arm"] == CANARY and dict(k)["outcome"] == "ok" for k in requests)
    weights = {dict(k)["arm"]: v for k, v in metric(router.url, "driftloop_rollout_weight").items()}
    assert weights == {CHAMP: 80.0, CANARY: 20.0}


def test_weights_change_live_and_survive_a_router_restart(setup, templates) -> None:
    settings, plane, router = setup
    at_20 = table_of(plane)
    on_canary_at_20 = {t["card_id"] for t in templates if at_20.choose(t["card_id"]) == CANARY}
    plane.set_weights({CHAMP: 50, CANARY: 50})  # no restart
    table = table_of(plane)
    results = send(router.url, templates, 400, concurrency=8, prefix="l")
    assert all(r.status == 200 and r.arm == table.choose(r.card_id) for r in results)
    on_canary = {r.card_id for r in results if r.arm == CANARY}
    assert on_canary_at_20 <= on_canary  # growing the canary kept its cards

    router.stop()
    router.start()
    again = send(router.url, templates, 400, concurrency=8, prefix="r")
    assert {(r.card_id, r.arm) for r in again} == {(r.card_id, r.arm) for r in results}
    weights = {dict(k)["arm"]: v for k, v in metric(router.url, "driftloop_rollout_weight").items()}
    assert weights == {CHAMP: 50.0, CANARY: 50.0}


def test_shadow_gets_a_mirrored_copy_logged_by_itself_never_returned(
    setup, templates, world: World
) -> None:
    settings, plane, router = setup
    plane.set_weights({CHAMP: 100, CANARY: 0}, shadow=[CANARY])
    before = counters_now(settings, 0)
    start = datetime.now(UTC) - timedelta(seconds=1)
    results = send(router.url, templates, 300, concurrency=8, prefix="s")
    assert {(r.status, r.arm) for r in results} == {(200, CHAMP)}

    after = counters_now(settings)
    mirrored = after[CANARY].mirrored - before[CANARY].mirrored
    paired = after[CANARY].paired - before[CANARY].paired
    agreements = after[CANARY].agreements - before[CANARY].agreements
    assert mirrored == 300 and paired == 300
    assert agreements == paired  # same model on both arms: same decisions

    # the shadow arm logged its own answers, under its arm name and the same request ids
    ids = {r.request_id for r in results}
    deadline = time.monotonic() + 60
    logged = pl.DataFrame()
    while time.monotonic() < deadline:
        frame = predlog.read_predictions(
            world.settings(), start, datetime.now(UTC) + timedelta(minutes=1)
        )
        logged = frame.filter(pl.col("request_id").is_in(list(ids)))
        if logged.filter(pl.col("arm") == CANARY).height >= 300:
            break
        time.sleep(1)
    assert logged.filter(pl.col("arm") == CANARY).height == 300
    assert logged.filter(pl.col("arm") == CHAMP).height == 300
    plane.set_weights({CHAMP: 80, CANARY: 20}, shadow=[])


def test_dead_arm_falls_back_to_the_champion_until_the_plane_restarts_it(
    setup, templates
) -> None:
    settings, plane, router = setup
    plane.set_weights({CHAMP: 50, CANARY: 50}, shadow=[])
    table = table_of(plane)
    record = plane.actual().arms[CANARY]
    for proc in [record.main, *record.workers]:  # the arbiter and its workers
        if is_alive(proc):
            os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while port_accepts(record.host, record.port, 0.2) and time.monotonic() < deadline:
        time.sleep(0.1)

    results = send(router.url, templates, 300, concurrency=8, prefix="d")
    assert Counter(r.status for r in results) == {200: 300}  # every request still succeeds
    canary_cards = [r for r in results if table.choose(r.card_id) == CANARY]
    assert canary_cards and all(r.arm == CHAMP for r in canary_cards)
    outcomes = {
        dict(k)["outcome"]: v
        for k, v in metric(router.url, "driftloop_router_requests_total").items()
        if dict(k)["arm"] == CANARY
    }
    assert outcomes.get("fallback", 0) >= len(canary_cards)

    assert not plane.health()[CANARY].ready
    restarted = plane.reconcile()[CANARY]
    assert restarted.pid != record.main.pid
    # an arm starting (it empties its BENTOML_HOME's metrics dir) leaves the router's alone
    still = metric(router.url, "driftloop_router_requests_total")
    assert any(dict(k)["outcome"] == "fallback" and v > 0 for k, v in still.items())
    time.sleep(1.5)  # past the router's dead-arm window
    healed = send(router.url, templates, 200, concurrency=8, prefix="h")
    table = table_of(plane)
    assert all(r.status == 200 and r.arm == table.choose(r.card_id) for r in healed)
    assert any(r.arm == CANARY for r in healed)


def test_a_canary_without_weight_is_warmed_with_mirrored_requests(setup, templates) -> None:
    settings, plane, router = setup
    plane.set_weights({CHAMP: 100, CANARY: 0}, shadow=[])  # CANARY keeps its canary role
    before = counters_now(settings, 0).get(CANARY, ArmCounters())
    results = send(router.url, templates, 150, concurrency=8, prefix="warm")
    assert {(r.status, r.arm) for r in results} == {(200, CHAMP)}
    after = counters_now(settings)[CANARY]
    warmed = after.mirrored - before.mirrored
    assert WARMUP_REQUESTS <= warmed <= WARMUP_REQUESTS + 8  # + requests in flight
    assert after.errors == before.errors
