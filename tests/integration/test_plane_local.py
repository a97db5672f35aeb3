"""LocalPlane against real ``bentoml serve`` processes (a tiny service, no model).

One test walks the whole life of an arm, because each start costs ~5 s of
BentoML import on this machine: deploy -> ready -> health; a crashing deploy
fails fast and leaves nothing behind; kill -9 -> reconcile restarts it; a new
plane reattaches to the live process; retire stops it by PID and frees the port.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from driftloop.errors import ServingError
from driftloop.plane.base import ArmStatus, load_desired_state
from driftloop.plane.local import LocalPlane, Proc, is_alive, port_is_free
from driftloop.rollout import Role
from driftloop.settings import Settings, get_settings

pytestmark = pytest.mark.integration

SERVICE = """
import os

import bentoml


@bentoml.service
class Svc:
    def __init__(self) -> None:
        if os.environ.get("SVC_CRASH") == "1":
            raise RuntimeError("crash requested by SVC_CRASH")

    @bentoml.api
    def predict(self, x: float = 0.0) -> dict:
        return {
            "arm": os.environ.get("DRIFTLOOP_ARM"),
            "echo": os.environ.get("SVC_ECHO"),
            "home": os.environ.get("BENTOML_HOME"),
            "value": 1.0,
        }
"""


def arm_processes(state_dir: Path, arm: str) -> list[int]:
    """PIDs of processes started for ``arm`` under this test's state dir (from their env)."""
    marks = (
        f"DRIFTLOOP_STATE_DIR={state_dir.resolve()}".encode(),
        f"DRIFTLOOP_ARM={arm}".encode(),
    )
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(m in env for m in marks):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Settings, Path]]:
    svc_dir = tmp_path / "svc"
    svc_dir.mkdir()
    (svc_dir / "service.py").write_text(SERVICE)
    settings = get_settings(state_dir=tmp_path / "state", bentoml_home=tmp_path / "bentoml")
    yield settings, svc_dir
    # safety net: stop whatever the test left running, by PID
    for arm in ("arm-a", "arm-bad"):
        for pid in arm_processes(settings.state_dir, arm):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def predict(endpoint: str) -> dict:
    r = httpx.post(f"{endpoint}/predict", json={"x": 1.0}, timeout=10)
    r.raise_for_status()
    return r.json()


def test_local_plane_lifecycle(local: tuple[Settings, Path]) -> None:
    settings, svc_dir = local
    started = time.monotonic()
    plane = LocalPlane(settings, "fraud", ready_timeout=45, stop_timeout=10)

    # deploy -> ready, env passed through
    info = plane.deploy(
        "arm-a",
        "service:Svc",
        env={"SVC_ECHO": "hello"},
        role=Role.CHAMPION,
        working_dir=svc_dir,
    )
    assert info.status is ArmStatus.READY and info.pid
    assert info.endpoint.startswith("http://127.0.0.1:")
    body = predict(info.endpoint)
    assert body["arm"] == "arm-a" and body["echo"] == "hello"
    # a home of its own (bentoml serve wipes its metrics dir) sharing the stores
    home = Path(body["home"])
    assert home == (settings.state_dir / "plane" / "homes" / "arm-a").resolve()
    shared = (svc_dir.parent / "bentoml").resolve()
    assert {(home / s).resolve() for s in ("bentos", "models")} == {
        shared / "bentos",
        shared / "models",
    }
    health = plane.health()["arm-a"]
    assert health.ready and health.alive and health.pid == info.pid
    desired = load_desired_state(plane.desired_path)
    assert desired.arms["arm-a"].endpoint == info.endpoint
    assert desired.arms["arm-a"].role is Role.CHAMPION
    assert (settings.state_dir / "plane" / "logs" / "fraud" / "arm-a.log").exists()
    deploy_s = time.monotonic() - started

    # a service that crashes on start fails the deploy quickly and leaves nothing behind
    t = time.monotonic()
    with pytest.raises(ServingError, match="crash requested by SVC_CRASH"):
        plane.deploy("arm-bad", "service:Svc", env={"SVC_CRASH": "1"}, working_dir=svc_dir)
    crash_s = time.monotonic() - t
    assert "arm-bad" not in plane.desired().arms
    assert "arm-bad" not in plane.actual().arms
    assert arm_processes(settings.state_dir, "arm-bad") == []

    # kill -9 the arm: its workers outlive it, reconcile cleans up and restarts it
    record = plane.actual().arms["arm-a"]
    old_workers = list(record.workers)
    assert old_workers, "bentoml serve runs its worker in a child process"
    os.kill(record.main.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while is_alive(record.main) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert plane.health()["arm-a"].status is ArmStatus.UNHEALTHY
    t = time.monotonic()
    restarted = plane.reconcile()["arm-a"]
    restart_s = time.monotonic() - t
    assert restarted.status is ArmStatus.READY and restarted.pid != record.main.pid
    assert not any(is_alive(w) for w in old_workers)
    assert predict(restarted.endpoint)["echo"] == "hello"  # per-arm env survives restarts
    assert plane.actual().arms["arm-a"].restarts == 1
    assert plane.desired().arms["arm-a"].endpoint == restarted.endpoint

    # a new plane on the same state dir reattaches to the live arm
    again = LocalPlane(settings, "fraud", ready_timeout=45, stop_timeout=10)
    assert again.health()["arm-a"].pid == restarted.pid
    assert again.reconcile()["arm-a"].pid == restarted.pid
    # and deploying the same target again is a no-op
    assert (
        again.deploy(
            "arm-a",
            "service:Svc",
            env={"SVC_ECHO": "hello"},
            role=Role.CHAMPION,
            working_dir=svc_dir,
        ).pid
        == restarted.pid
    )

    # retire refuses an arm with traffic, then stops it by PID and frees the port
    again.set_weights({"arm-a": 100})
    with pytest.raises(ServingError, match="weight"):
        again.retire("arm-a")
    again.set_weights({})
    record = again.actual().arms["arm-a"]
    t = time.monotonic()
    again.retire("arm-a")
    retire_s = time.monotonic() - t
    assert not is_alive(record.main)
    assert not any(is_alive(Proc(pid=w.pid, start_time=w.start_time)) for w in record.workers)
    assert port_is_free(record.host, record.port)
    assert arm_processes(settings.state_dir, "arm-a") == []
    assert again.desired().arms == {} and again.actual().arms == {}
    again.retire("arm-a")  # idempotent

    print(
        f"deploy {deploy_s:.1f}s, crash detected {crash_s:.1f}s, restart {restart_s:.1f}s, "
        f"retire {retire_s:.1f}s, total {time.monotonic() - started:.1f}s"
    )
