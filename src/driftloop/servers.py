"""Start a ``bentoml serve`` process on 127.0.0.1 and stop its whole process tree by PID.

Used by the test fixtures, the benchmarks and the command line. BentoML starts each
worker in a session of its own, so signalling the supervisor's process group does not
reach the workers: :func:`stop_tree` collects the tree first and stops every process
in it, by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from driftloop.errors import ServingError
from driftloop.prefect_local import free_port

__all__ = ["BentoServer", "start_bentoml", "stop_tree"]


def stop_tree(pid: int, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Signal ``pid`` and every descendant; SIGKILL what outlives ``timeout``."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    _gone, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


@dataclass
class BentoServer:
    """A running ``bentoml serve``: its process, URL and log file."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Stop the server and its workers by PID (see the module doc)."""
        if self.proc.poll() is not None:
            return
        stop_tree(self.proc.pid, sig, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def start_bentoml(
    target: str,
    env: dict[str, str],
    log: Path,
    *,
    cwd: Path,
    port: int | None = None,
    timeout: float = 120.0,
) -> BentoServer:
    """Run ``bentoml serve target`` on 127.0.0.1 in its own session; wait for /readyz."""
    port = port or free_port()
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [bentoml, "serve", target, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = BentoServer(proc=proc, url=f"http://127.0.0.1:{port}", log=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServingError(f"bentoml serve exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop(signal.SIGKILL)
    raise ServingError(f"bentoml serve not ready in {timeout:g} s:\n{log.read_text()[-3000:]}")
