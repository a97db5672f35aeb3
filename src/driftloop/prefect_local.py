"""A local Prefect server and process worker, run as subprocesses on 127.0.0.1.

Used by the tests, by ``driftloop up`` and by the demo. Each process runs in its own
session (process group) with its own ``PREFECT_HOME``; it is stopped by its PID:
SIGTERM to its process group, then SIGKILL after a grace period. Stop workers
before the server (stopping both at once can hang the worker).

    with LocalPrefectServer(tmp / "prefect") as server:
        with LocalWorker(server.api_url, "driftloop", tmp / "prefect"):
            ...
        assert not server.failed_actions()
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

from driftloop.errors import DriftloopError

__all__ = [
    "FAST_POLL_ENV",
    "LocalPrefectServer",
    "LocalWorker",
    "PrefectProcessError",
    "free_port",
    "port_is_free",
    "prefect_env",
]

LOCALHOST = "127.0.0.1"

#: settings that bring "event → flow run started" down to a few seconds
FAST_POLL_ENV: dict[str, str] = {
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    "PREFECT_RUNNER_POLL_FREQUENCY": "1",
}

#: server log line written when an automation's action fails (e.g. a bad template)
ACTION_FAILED = "Action failed"


class PrefectProcessError(DriftloopError):
    """A local Prefect server or worker did not start, or misbehaved."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port on ``host`` that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """True when nothing listens on ``host:port`` and a server could bind it.

    Like uvicorn, the bind uses SO_REUSEADDR: connections of a stopped server that
    linger in TIME_WAIT do not keep the port from being reused.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        if s.connect_ex((host, port)) == 0:
            return False  # something accepts connections there
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def prefect_env(
    api_url: str, home: Path, *, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for a subprocess that talks to the server at ``api_url``.

    Starts from ``base`` (default: this process's environment) without any inherited
    ``PREFECT_*`` variable, so a user's profile or database never leaks in.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items()}
    for key in [k for k in env if k.startswith("PREFECT_")]:
        del env[key]
    env.update(
        {
            "PREFECT_HOME": str(Path(home).resolve()),
            "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            # keep log lines whole (rich wraps at 80 columns without a terminal)
            "COLUMNS": "250",
        }
    )
    return env


class _Process:
    """A subprocess in its own process group, logging to a file, stopped by PID."""

    def __init__(self, what: str, log_path: Path, stop_timeout: float) -> None:
        self.what = what
        self.log_path = log_path
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, args: list[str], env: Mapping[str, str], cwd: Path) -> None:
        if self._proc is not None:
            raise PrefectProcessError(f"{self.what} already started (pid {self._proc.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            args,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so we can stop its children
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group, wait, then SIGKILL what is left. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the group id is the leader's pid
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.stop_timeout)
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _group_alive(pgid) or proc.poll() is None:
                _signal_group(pgid, signal.SIGKILL)
                proc.wait(timeout=10)
                _wait_group_gone(pgid, 5.0)
        if self._log is not None:
            self._log.close()
            self._log = None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


class LocalPrefectServer:
    """``prefect server start`` on 127.0.0.1 with its own ``PREFECT_HOME`` (SQLite there).

    ``start()`` returns once ``GET /api/health`` answers: a fresh database costs
    ~19 CPU-seconds of migrations and start-up (9-80 s of wall time on two busy
    cores), a warm one ~10 CPU-seconds. ``event_flush_interval`` is how often the
    server writes received events to its database (Prefect's default is 5 s); it
    bounds how soon an emitted event is readable. Automations see events at once either way.
    """

    def __init__(
        self,
        home: Path,
        port: int | None = None,
        *,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 180.0,
        stop_timeout: float = 15.0,
        event_flush_interval: float = 0.5,
        ui: bool = True,
    ) -> None:
        self.home = Path(home).resolve()
        self._requested_port = port
        self.port: int | None = port
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.event_flush_interval = event_flush_interval
        self.ui = ui
        self.startup_seconds: float | None = None
        self._log_start = 0
        self._process = _Process("prefect server", self.home / "server.log", stop_timeout)

    # -- addresses -------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise PrefectProcessError("the server has no port before start()")
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.running

    def env(self) -> dict[str, str]:
        """Environment for subprocesses that use this server (see :func:`prefect_env`)."""
        return prefect_env(self.api_url, self.home)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> Self:
        """Start the server and wait until it is healthy; raise PrefectProcessError if not."""
        self.home.mkdir(parents=True, exist_ok=True)
        # a port picked by us can be taken before the server binds it: pick again
        tries = 1 if self._requested_port is not None else 3
        for attempt in range(tries):
            self.port = self._requested_port or free_port()
            began = time.monotonic()
            self._spawn()
            try:
                self._wait_healthy()
            except PrefectProcessError:
                exited = not self._process.running
                tail = self.log_tail()
                self.stop()
                if exited and "already in use" in tail and attempt + 1 < tries:
                    continue
                raise
            self.startup_seconds = time.monotonic() - began
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self) -> None:
        env = prefect_env(self.api_url, self.home)
        env.update(
            {
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_UI_ENABLED": "true" if self.ui else "false",
                "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": str(
                    self.event_flush_interval
                ),
            }
        )
        env.update(self.extra_env)
        self._log_start = self.log_offset()
        args = [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            LOCALHOST,
            "--port",
            str(self.port),
            "--analytics-off",
        ]
        with self.log_path.open("ab") as log:
            log.write(f"--- driftloop: starting {' '.join(args[2:])}\n".encode())
        self._process._spawn(args, env, self.home)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if not self._process.running:
                    raise PrefectProcessError(
                        f"prefect server exited during start-up; log {self.log_path}:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.api_url}/health").is_success:
                        return
                if time.monotonic() >= deadline:
                    raise PrefectProcessError(
                        f"prefect server not healthy after {self.startup_timeout} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server by PID (process group). Stop workers first. Idempotent."""
        self._process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the log ---------------------------------------------------------------------
    def log_tail(self, lines: int = 40) -> str:
        return self._process.log_tail(lines)

    def log_offset(self) -> int:
        """Current size of the server log, to look only at what is written after it."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def failed_actions(self, since_offset: int | None = None) -> list[str]:
        """Lines of the server log that report a failed automation action.

        Only lines written after ``since_offset`` (see :meth:`log_offset`); by default,
        those of the server's latest start (the log is appended to across restarts).
        """
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_start if since_offset is None else since_offset)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if ACTION_FAILED in line]


def ensure_process_pool(api_url: str, pool: str) -> None:
    """Create work pool ``pool`` of type ``process`` with the process worker's default
    job template (what ``prefect work-pool create --type process`` does), unless a pool
    of that name exists. A worker would create it too, but only once it has started:
    creating it first lets ``prefect deploy`` run while the worker starts."""
    from prefect.workers.process import ProcessWorker

    body = {
        "name": pool,
        "type": "process",
        "base_job_template": ProcessWorker.get_default_base_job_template(),
    }
    try:
        response = httpx.post(f"{api_url.rstrip('/')}/work_pools/", json=body, timeout=30)
    except httpx.HTTPError as exc:
        raise PrefectProcessError(f"cannot create work pool {pool!r}: {exc}") from exc
    if response.status_code != 409 and not response.is_success:
        raise PrefectProcessError(
            f"cannot create work pool {pool!r}: HTTP {response.status_code} {response.text[:500]}"
        )


class LocalWorker:
    """``prefect worker start --pool <pool> --type process`` with fast polling.

    With ``warm`` (the default) it is :mod:`driftloop.warm_engine`'s process worker:
    the same worker, its flow runs forked from a warm engine instead of fresh
    interpreters (``DRIFTLOOP_WARM_WORKER=0`` in ``env`` turns that off).

    Creates the pool if it does not exist. ``start()`` returns once the worker has
    registered with the server (its first heartbeat); ``spawn()`` and ``wait_started()``
    are its two halves, to do something else while the worker starts.
    """

    def __init__(
        self,
        api_url: str,
        pool: str,
        home: Path,
        env: Mapping[str, str] | None = None,
        *,
        name: str | None = None,
        worker_type: str = "process",
        startup_timeout: float = 120.0,
        stop_timeout: float = 20.0,
        cwd: Path | None = None,
        warm: bool = True,
    ) -> None:
        self.api_url = api_url
        self.warm = warm
        self.pool = pool
        self.home = Path(home).resolve()
        self.extra_env = dict(env or {})
        self.name = name or f"driftloop-{pool}-{uuid.uuid4().hex[:8]}"
        self.worker_type = worker_type
        self.startup_timeout = startup_timeout
        self.cwd = Path(cwd).resolve() if cwd is not None else self.home
        self.startup_seconds: float | None = None
        self._began = time.monotonic()
        self._process = _Process(
            f"prefect worker {self.name}", self.home / f"worker-{self.name}.log", stop_timeout
        )

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.running

    def spawn(self) -> Self:
        """Start the worker process; do not wait for it (see :meth:`wait_started`)."""
        self.home.mkdir(parents=True, exist_ok=True)
        env = prefect_env(self.api_url, self.home)
        env.update(FAST_POLL_ENV)
        env.update(self.extra_env)
        if self.warm and self.worker_type == "process":
            # the same process worker, its flow runs forked from a warm engine
            args = [
                sys.executable, "-m", "driftloop.warm_engine",
                "--pool", self.pool, "--name", self.name, "--root", str(self.cwd),
            ]  # fmt: skip
        else:
            args = [
                sys.executable, "-m", "prefect", "--no-prompt", "worker", "start",
                "--pool", self.pool, "--type", self.worker_type, "--name", self.name,
                "--install-policy", "never",
            ]  # fmt: skip
        self._began = time.monotonic()
        self._process._spawn(args, env, self.cwd)
        return self

    def start(self) -> Self:
        """:meth:`spawn`, then :meth:`wait_started`."""
        return self.spawn().wait_started()

    def wait_started(self) -> Self:
        """Wait until the spawned worker has registered (stopping it if it never does)."""
        try:
            self._wait_registered()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - self._began
        return self

    def _wait_registered(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"{self.api_url.rstrip('/')}/work_pools/{self.pool}/workers/filter"
        body = {"limit": 200}
        with httpx.Client(timeout=2.0) as client:
            while True:
                if not self._process.running:
                    raise PrefectProcessError(
                        f"prefect worker exited during start-up; log {self.log_path}:\n"
                        f"{self._process.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    response = client.post(url, json=body)
                    if response.is_success and any(
                        w.get("name") == self.name for w in response.json()
                    ):
                        return
                if time.monotonic() >= deadline:
                    raise PrefectProcessError(
                        f"prefect worker {self.name} not registered after "
                        f"{self.startup_timeout} s; log {self.log_path}:\n"
                        f"{self._process.log_tail()}"
                    )
                time.sleep(0.25)

    def stop(self) -> None:
        """Stop the worker by PID (process group). Idempotent."""
        self._process.stop()

    def log_tail(self, lines: int = 40) -> str:
        return self._process.log_tail(lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
