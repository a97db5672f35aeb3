"""The warm worker on a real Prefect server: flow runs fork from the warm engine.

A project of its own under ``tmp_path`` (a ``prefect.yaml`` with one deployment of a
probe flow), deployed with ``prefect deploy`` to a pool of its own, served by
:class:`LocalWorker` (``python -m driftloop.warm_engine``). The probe flow writes
what its process is: its command line (a fork of the warm engine keeps the worker's;
Prefect's own command is ``python -m prefect.engine``), its working directory and the
deployment's environment. A second deployment asks for another OpenBLAS setting than
the warm engine loaded with, so its runs must start cold.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from driftloop import local_stack
from driftloop.prefect_local import LocalPrefectServer, LocalWorker
from tests.fixtures.world import pid_alive

pytestmark = pytest.mark.integration

PROBE = """
import json, os, sys, time
from pathlib import Path
from prefect import flow

@flow
def probe(mode: str, out: str) -> str:
    cmdline = Path("/proc/self/cmdline").read_bytes().replace(b"\\0", b" ").decode()
    Path(out).write_text(json.dumps({
        "pid": os.getpid(), "cmdline": cmdline, "cwd": os.getcwd(),
        "mark": os.environ.get("PROBE_MARK"), "omp": os.environ.get("OMP_WAIT_POLICY"),
    }))
    if mode == "fail":
        raise RuntimeError("the probe was told to fail")
    if mode == "sleep":
        time.sleep(300)
    return mode
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "flows").mkdir(parents=True)
    (root / "flows" / "probe.py").write_text(PROBE)
    (root / "prefect.yaml").write_text(
        textwrap.dedent(
            f"""\
            name: warm-probe
            pull:
              - prefect.deployments.steps.set_working_directory:
                  directory: {root}
            deployments:
              - name: probe
                entrypoint: flows/probe.py:probe
                work_pool:
                  name: warm-probe
                  job_variables:
                    env:
                      PROBE_MARK: from-the-deployment
                      OMP_WAIT_POLICY: PASSIVE
              - name: probe-blas
                entrypoint: flows/probe.py:probe
                work_pool:
                  name: warm-probe
                  job_variables:
                    env:
                      OMP_WAIT_POLICY: PASSIVE
                      OPENBLAS_NUM_THREADS: "1"
            """
        )
    )
    return root


@pytest.fixture
def probe_deployment(
    prefect_server: LocalPrefectServer, project: Path
) -> Iterator[Callable[..., LocalWorker]]:
    """Start a worker (warm by default) on the probe's pool, then deploy the probe."""
    workers: list[LocalWorker] = []

    def start(**kwargs: Any) -> LocalWorker:
        worker = LocalWorker(
            prefect_server.api_url,
            "warm-probe",
            prefect_server.home,
            name=f"warm-probe-{uuid.uuid4().hex[:6]}",
            cwd=project,
            env={"OPENBLAS_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
            **kwargs,
        )
        workers.append(worker)
        worker.start()
        local_stack.deploy(prefect_server.api_url, prefect_server.home, root=project)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def _api(method: str, url: str, **kwargs: Any) -> Any:
    """One API call, repeated while the server answers 503 (its SQLite database busy)."""
    for attempt in range(10):
        r = httpx.request(method, url, timeout=10, **kwargs)
        if r.status_code != 503 or attempt == 9:
            r.raise_for_status()
            return r.json()
        time.sleep(0.5 * (attempt + 1))


def _run(api_url: str, mode: str, out: Path, deployment: str = "probe") -> str:
    dep = local_stack.deployment_id(api_url, "probe", deployment)
    body = {"parameters": {"mode": mode, "out": str(out)}}
    return str(_api("POST", f"{api_url}/deployments/{dep}/create_flow_run", json=body)["id"])


def _state(api_url: str, run_id: str) -> str:
    return str(_api("GET", f"{api_url}/flow_runs/{run_id}")["state_type"])


def _wait_state(api_url: str, run_id: str, wanted: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = _state(api_url, run_id)
        if state in wanted:
            return state
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} is {state}, not {wanted}, after {timeout} s")


def _wait_file(path: Path, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return dict(json.loads(path.read_text()))
        time.sleep(0.2)
    raise AssertionError(f"{path} was not written in {timeout} s")


def _engine_pids(worker: LocalWorker) -> list[int]:
    """The worker's children that run the warm engine (forked, so same command line)."""
    assert worker.pid is not None
    kids = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
    return [int(k) for k in kids if "warm_engine" in Path(f"/proc/{k}/cmdline").read_text()]


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(pid), f"process {pid} still runs after {timeout} s"


def test_a_flow_run_forks_from_the_warm_engine_with_the_runs_environment(
    prefect_server: LocalPrefectServer,
    probe_deployment: Callable[..., LocalWorker],
    project: Path,
    tmp_path: Path,
) -> None:
    api = prefect_server.api_url
    worker = probe_deployment()
    assert len(_engine_pids(worker)) == 1
    out = tmp_path / "ok.json"
    run = _run(api, "ok", out)
    assert _wait_state(api, run, {"COMPLETED", "FAILED", "CRASHED"}) == "COMPLETED"
    seen = _wait_file(out)
    assert "driftloop.warm_engine" in seen["cmdline"]  # forked: no new interpreter
    assert seen["mark"] == "from-the-deployment"  # the deployment's job variables
    assert Path(seen["cwd"]) == project  # the pull step's directory
    _wait_gone(seen["pid"])  # the run's process ends once it finished

    # warm although the worker has OMP_WAIT_POLICY=ACTIVE: the engine loaded its
    # libraries with the PASSIVE that every deployment gives its runs
    assert seen["omp"] == "PASSIVE"
    # a run asking for another load-time setting (OPENBLAS_NUM_THREADS) starts cold
    blas = tmp_path / "blas.json"
    run = _run(api, "ok", blas, deployment="probe-blas")
    assert _wait_state(api, run, {"COMPLETED", "FAILED", "CRASHED"}) == "COMPLETED"
    assert "prefect.engine" in _wait_file(blas)["cmdline"]

    # a failing flow is FAILED, as with Prefect's own command
    failing = _run(api, "fail", tmp_path / "fail.json")
    assert _wait_state(api, failing, {"COMPLETED", "FAILED", "CRASHED"}) == "FAILED"


def test_cancelling_a_warm_run_stops_its_process(
    prefect_server: LocalPrefectServer,
    probe_deployment: Callable[..., LocalWorker],
    tmp_path: Path,
) -> None:
    api = prefect_server.api_url
    probe_deployment()
    out = tmp_path / "sleep.json"
    run = _run(api, "sleep", out)
    _wait_state(api, run, {"RUNNING"})
    pid = _wait_file(out)["pid"]
    assert pid_alive(pid)
    cancelling = {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True}
    _api("POST", f"{api}/flow_runs/{run}/set_state", json=cancelling)
    assert _wait_state(api, run, {"CANCELLED", "CRASHED", "FAILED"}, timeout=90) == "CANCELLED"
    _wait_gone(pid)


def test_without_the_warm_engine_runs_start_the_ordinary_way_and_the_engine_stops_with_the_worker(
    prefect_server: LocalPrefectServer,
    probe_deployment: Callable[..., LocalWorker],
    tmp_path: Path,
) -> None:
    api = prefect_server.api_url
    worker = probe_deployment()
    (engine,) = _engine_pids(worker)
    os.kill(engine, signal.SIGKILL)
    out = tmp_path / "fallback.json"
    run = _run(api, "ok", out)
    assert _wait_state(api, run, {"COMPLETED", "FAILED", "CRASHED"}) == "COMPLETED"
    assert "prefect.engine" in _wait_file(out)["cmdline"]  # `python -m prefect.engine`

    # a fresh worker's engine goes away with its worker
    second = probe_deployment()
    (engine,) = _engine_pids(second)
    second.stop()
    _wait_gone(engine)
