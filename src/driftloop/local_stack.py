"""The embedded orchestration stack: Prefect server, deployments of ``prefect.yaml``, worker.

``driftloop up`` calls :func:`up`; ``driftloop up --stop`` calls :func:`down`. The
processes are started in their own sessions (they outlive the command) and their
PIDs are written to ``<state_dir>/stack.json``; :func:`down` stops them by PID, the
worker before the server. Tests and benchmarks use :func:`deploy`,
:func:`deployment_id`, :func:`flow_runs` and :func:`remove_deployment`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from driftloop.prefect_local import (
    LocalPrefectServer,
    LocalWorker,
    PrefectProcessError,
    ensure_process_pool,
    prefect_env,
)

__all__ = [
    "POOL",
    "StackInfo",
    "deploy",
    "start_worker_and_deploy",
    "deployment_id",
    "down",
    "flow_runs",
    "project_root",
    "remove_deployment",
    "up",
]

#: the process work pool of the embedded default (``prefect.yaml``)
POOL = "driftloop"
#: environment variable naming the checkout that flow runs start in (``prefect.yaml`` pull step)
HOME_VAR = "DRIFTLOOP_HOME"
STACK_FILE = "stack.json"


def project_root() -> Path:
    """The checkout holding ``prefect.yaml`` (this file is at src/driftloop/local_stack.py)."""
    return Path(__file__).resolve().parents[2]


def deploy(
    api_url: str,
    home: Path,
    env: Mapping[str, str] | None = None,
    *,
    names: Sequence[str] | None = None,
    pool: str | None = None,
    root: Path | None = None,
    prefect_file: Path | None = None,
    timeout: float = 600.0,
) -> str:
    """``prefect --no-prompt deploy --all`` (or ``--name`` each of ``names``) from ``root``.

    ``pool`` overrides the work pool of a single deployment (Prefect ignores it for
    several); ``prefect_file`` deploys another copy of ``prefect.yaml`` (entrypoints
    stay relative to ``root``). The pool must exist. Returns the command's output;
    raises :class:`PrefectProcessError` when it fails.
    """
    root = (root or project_root()).resolve()
    full_env = prefect_env(api_url, home)
    full_env.setdefault(HOME_VAR, str(root))
    full_env.update(env or {})
    args = [sys.executable, "-m", "prefect", "--no-prompt", "deploy"]
    if names:
        for name in names:
            args += ["--name", name]
    else:
        args.append("--all")
    if pool:
        args += ["--pool", pool]
    if prefect_file is not None:
        args += ["--prefect-file", str(prefect_file)]
    try:
        done = subprocess.run(
            args, cwd=root, env=full_env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise PrefectProcessError(f"prefect deploy did not finish in {timeout} s") from exc
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise PrefectProcessError(f"prefect deploy failed ({done.returncode}):\n{out[-4000:]}")
    return out


def start_worker_and_deploy(
    api_url: str, pool: str, home: Path, env: Mapping[str, str], *, root: Path
) -> LocalWorker:
    """The process pool, then a worker's start-up and ``prefect deploy --all`` side by
    side (both are mostly interpreter start-up); returns the registered worker. On any
    failure the worker is stopped."""
    ensure_process_pool(api_url, pool)
    worker = LocalWorker(api_url, pool, home, env, cwd=root).spawn()
    try:
        deploy(api_url, home, env, root=root)
        return worker.wait_started()
    except BaseException:
        worker.stop()
        raise


def deployment_id(api_url: str, flow_name: str, name: str) -> str:
    """The id of deployment ``flow_name/name``; raises PrefectProcessError when missing."""
    r = httpx.get(f"{api_url.rstrip('/')}/deployments/name/{flow_name}/{name}", timeout=10)
    if not r.is_success:
        raise PrefectProcessError(f"no deployment {flow_name}/{name}: HTTP {r.status_code}")
    return str(r.json()["id"])


def flow_runs(api_url: str, deployment: str) -> list[dict[str, Any]]:
    """Every flow run of a deployment (id), newest first, as the API returns them."""
    body = {"deployments": {"id": {"any_": [deployment]}}, "sort": "EXPECTED_START_TIME_DESC"}
    r = httpx.post(f"{api_url.rstrip('/')}/flow_runs/filter", json=body, timeout=10)
    r.raise_for_status()
    return list(r.json())


def remove_deployment(api_url: str, deployment: str) -> None:
    """Delete a deployment and the automations it owns (deleting it alone leaves them firing)."""
    base = api_url.rstrip("/")
    with httpx.Client(timeout=10) as client:
        client.delete(f"{base}/automations/owned-by/prefect.deployment.{deployment}")
        client.delete(f"{base}/deployments/{deployment}")


# -- driftloop up ---------------------------------------------------------------------


class StackInfo(BaseModel):
    """What ``driftloop up`` started (``<state_dir>/stack.json``)."""

    server_pid: int
    worker_pid: int
    port: int
    api_url: str
    ui_url: str
    prefect_home: str
    pool: str
    root: str


def _stack_file(state_dir: Path) -> Path:
    return Path(state_dir).resolve() / STACK_FILE


def up(
    state_dir: Path,
    env: Mapping[str, str],
    *,
    port: int | None = None,
    pool: str = POOL,
    root: Path | None = None,
) -> StackInfo:
    """Start a Prefect server and a process worker, deploy ``prefect.yaml``; record PIDs.

    ``env`` is the environment of the worker and so of every flow run (the
    ``DRIFTLOOP_*`` settings, ``BENTOML_HOME``); ``DRIFTLOOP_HOME`` defaults to ``root``.
    """
    state_dir = Path(state_dir).resolve()
    path = _stack_file(state_dir)
    if path.exists():
        info = StackInfo.model_validate_json(path.read_text())
        if _alive(info.server_pid):
            raise PrefectProcessError(
                f"a stack is already running (server pid {info.server_pid}, {info.ui_url}); "
                "stop it with `driftloop up --stop`"
            )
        path.unlink()
    root = (root or project_root()).resolve()
    home = state_dir / "prefect"
    run_env = {HOME_VAR: str(root), **env}
    server = LocalPrefectServer(home, port).start()
    try:
        worker = start_worker_and_deploy(server.api_url, pool, home, run_env, root=root)
    except BaseException:
        server.stop()
        raise
    assert server.pid is not None and worker.pid is not None and server.port is not None
    info = StackInfo(
        server_pid=server.pid,
        worker_pid=worker.pid,
        port=server.port,
        api_url=server.api_url,
        ui_url=server.url,
        prefect_home=str(home),
        pool=pool,
        root=str(root),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(info.model_dump_json(indent=2))
    return info


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def down(state_dir: Path, *, timeout: float = 20.0) -> StackInfo | None:
    """Stop what :func:`up` started, by PID: the worker first, then the server."""
    path = _stack_file(state_dir)
    if not path.exists():
        return None
    info = StackInfo.model_validate_json(path.read_text())
    _stop_group(info.worker_pid, timeout)
    _stop_group(info.server_pid, timeout)
    path.unlink()
    return info
