"""Warm flow-run starts: a Prefect process worker whose flow runs fork from a warm engine.

Prefect's process worker starts every flow run as fresh interpreters: a workspace
supervisor (``import prefect``, the pull steps) that then ``exec``\\ s
``python -m prefect.engine`` (``import prefect`` again, then the flow's module with
polars, XGBoost, Feast, Evidently). On two cores that is 5-7 s idle and 20-30 s
under load before the flow run is RUNNING, and as much CPU for every monitor run.

``python -m driftloop.warm_engine --pool driftloop`` (what ``driftloop up``, the demo
and the tests start) is the same process worker with one change: the command of each
flow run is :mod:`driftloop._warm_client`, a standard-library script that hands the
run to a **warm engine** over a Unix socket. The warm engine is a process forked from
the worker at start-up, before any import, that imported Prefect's engine and the
modules of every flow in ``prefect.yaml`` once; for each run it forks a child, which
takes the client's standard streams, environment and working directory and runs
``prefect.engine`` exactly as ``python -m prefect.engine`` would. The client forwards
the worker's signals to that child (cancellation works as in Prefect) and exits with
its code; if the warm engine is down, the client becomes ``python -m prefect.engine``
itself, so nothing depends on it. The pool stays an ordinary ``process`` pool: other
workers (``prefect worker start --pool driftloop``) serve it unchanged.

Fork safety: the warm engine never runs flow code itself and starts no thread of its
own; what the preloaded libraries start at import (jemalloc's background thread,
OpenBLAS's pool) is fork-aware, and polars' thread pool is created on first use, so in
the child. Native libraries read some environment once, when they load (OpenMP's
``OMP_WAIT_POLICY``: spinning made XGBoost ~15x slower here): the engine adopts the
``env`` that every deployment of ``prefect.yaml`` gives its runs before it imports
anything, and a run whose such variables differ is started cold.

``DRIFTLOOP_WARM_WORKER=0`` (or ``--cold``) runs the stock worker instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "client_command",
    "entrypoints_of",
    "load_time_mismatch",
    "main",
    "run_env_of",
    "start_engine",
]

#: the flow-run command's script (standard library only)
CLIENT = Path(__file__).with_name("_warm_client.py")
#: Prefect modules a flow run needs, imported once by the warm engine
PREFECT_MODULES = (
    "prefect",
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.deployments.steps",
    "prefect.flows",
    "prefect.events",
    "prefect.artifacts",
)
_MAX_HEADER = 8 << 20


def client_command(socket_path: Path) -> list[str]:
    """The process-worker command that hands a flow run to the warm engine at ``socket_path``."""
    return [sys.executable, "-I", "-S", str(CLIENT), str(socket_path)]


def _deployments(prefect_yaml: Path) -> list[dict[str, Any]]:
    import yaml

    try:
        spec = yaml.safe_load(prefect_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    return [d for d in spec.get("deployments") or [] if isinstance(d, dict)]


def entrypoints_of(prefect_yaml: Path) -> list[str]:
    """The flow files named by the deployments of ``prefect_yaml`` (``path.py:flow``)."""
    files: list[str] = []
    for deployment in _deployments(prefect_yaml):
        path = str(deployment.get("entrypoint") or "").rpartition(":")[0]
        if path and path not in files:
            files.append(path)
    return files


def run_env_of(prefect_yaml: Path) -> dict[str, str]:
    """The environment every deployment of ``prefect_yaml`` gives its flow runs (the
    ``env`` job variables they all share), which the warm engine adopts before it
    imports anything: native libraries read some of it once, at load time."""
    shared: dict[str, str] | None = None
    for deployment in _deployments(prefect_yaml):
        pool = deployment.get("work_pool") or {}
        env = ((pool.get("job_variables") or {}).get("env") or {}) if isinstance(pool, dict) else {}
        pairs = {str(k): str(v) for k, v in env.items() if v is not None}
        shared = pairs if shared is None else {k: v for k, v in shared.items() if pairs.get(k) == v}
    return shared or {}


#: environment read by native libraries when they load (OpenMP, BLAS, allocators,
#: thread pools): a forked run inherits what the warm engine loaded them with, so a run
#: that asks for other values gets a fresh interpreter instead
LOAD_TIME_ENV = ("OMP_", "GOMP_", "KMP_", "OPENBLAS_", "MKL_", "POLARS_", "RAYON_", "MALLOC_")


def load_time_mismatch(run_env: dict[str, str], engine_env: dict[str, str]) -> list[str]:
    """Names of load-time variables whose value differs between a run and the engine."""
    keys = {k for k in (*run_env, *engine_env) if k.startswith(LOAD_TIME_ENV)}
    return sorted(k for k in keys if run_env.get(k) != engine_env.get(k))


# --------------------------------------------------------------------------- engine


def _preload(root: Path, flow_files: list[str], log: Any) -> None:
    import importlib
    import runpy

    began = time.monotonic()
    for module in PREFECT_MODULES:
        importlib.import_module(module)
    for rel in flow_files:
        path = root / rel
        try:
            # what Prefect does to load an entrypoint: run the file as a module; here it
            # only warms the imports (the child loads the flow again, cheaply)
            runpy.run_path(str(path), run_name=f"__driftloop_warm_{path.stem}__")
        except BaseException as exc:  # a broken flow file must not stop the others
            print(f"warm engine: could not preload {rel}: {exc!r}", file=log, flush=True)
    print(
        f"warm engine: preloaded Prefect and {len(flow_files)} flow file(s) in "
        f"{time.monotonic() - began:.1f} s",
        file=log,
        flush=True,
    )


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The client's header and its three descriptors."""
    conn.settimeout(10.0)
    fds: list[int] = []
    data, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(3 * 4))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
    try:
        while len(data) < 4:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError("client closed before its header")
            data += chunk
        (size,) = struct.unpack(">I", data[:4])
        if size > _MAX_HEADER:
            raise ValueError(f"header of {size} bytes")
        while len(data) < 4 + size:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError("client closed inside its header")
            data += chunk
        header = json.loads(data[4 : 4 + size])
        if len(fds) != 3 or not isinstance(header.get("env"), dict):
            raise ValueError("a request needs three descriptors and an env")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    conn.settimeout(None)
    return header, fds


def _run_child(header: dict[str, Any], fds: list[int], keep_closed: list[int]) -> NoReturn:
    """In the forked child: become ``python -m prefect.engine`` for this flow run."""
    code: Any = 1
    try:
        for fd in keep_closed:
            with contextlib.suppress(OSError):
                os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        env = {str(k): str(v) for k, v in header["env"].items()}
        os.environ.clear()
        os.environ.update(env)
        cwd = str(header.get("cwd") or os.getcwd())
        os.chdir(cwd)
        # the sys.path of `python -m prefect.engine` started in cwd with this env
        extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:0] = [cwd, *extra]
        import prefect.context
        import prefect.logging.configuration as logging_configuration

        prefect.context.refresh_global_settings_context()
        logging_configuration.setup_logging(incremental=False)
        import runpy

        sys.argv = ["prefect.engine"]
        # `python -m prefect.engine` in a process that has imported it already: runpy
        # warns that the module is in sys.modules; here that is the point
        warnings.filterwarnings("ignore", "'prefect.engine' found in sys.modules", RuntimeWarning)
        try:
            runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            import atexit
            import logging

            atexit._run_exitfuncs()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        if code is None:
            code = 0
        elif not isinstance(code, int):
            code = 1
        os._exit(code & 0xFF)


class _Engine:
    """The warm engine's loop: accept a request, fork, report the pid and the exit."""

    def __init__(self, listener: socket.socket, parent: int, log: Any) -> None:
        self.listener = listener
        self.parent = parent
        self.log = log
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, socket.socket] = {}  # child pid -> client connection
        self.stopping = False

    def serve(self) -> None:
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", 0))
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        while not self.stopping:
            for key, _ in self.sel.select(timeout=1.0):
                kind, pid = key.data
                if kind == "accept":
                    self._accept()
                elif kind == "child":
                    self._reap(pid, key.fileobj)  # type: ignore[arg-type]
                elif kind == "conn":
                    self._client_event(pid)
            if os.getppid() != self.parent:
                break  # the worker is gone
        for pid in list(self.conns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _stop(self, _signum: int, _frame: Any) -> None:
        self.stopping = True

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            header, fds = _recv_request(conn)
        except (OSError, ValueError) as exc:
            print(f"warm engine: bad request: {exc!r}", file=self.log, flush=True)
            conn.close()  # the client falls back to `python -m prefect.engine`
            return
        differ = load_time_mismatch(header["env"], dict(os.environ))
        if differ:
            run = header["env"].get("PREFECT__FLOW_RUN_ID")
            print(
                f"warm engine: flow run {run} starts cold: its {', '.join(differ)} differ "
                "from what the engine's libraries loaded with",
                file=self.log,
                flush=True,
            )
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        self.log.flush()
        # what the child must not keep: the listener, every connection and pidfd
        keep_closed = [conn.fileno(), self.sel.fileno()]
        keep_closed += [key.fd for key in self.sel.get_map().values()]
        pid = os.fork()
        if pid == 0:
            _run_child(header, fds, keep_closed)
        for fd in fds:
            os.close(fd)
        self.conns[pid] = conn
        try:
            conn.sendall(f"pid {pid}\n".encode())
        except OSError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        pidfd = os.pidfd_open(pid)
        self.sel.register(pidfd, selectors.EVENT_READ, ("child", pid))
        self.sel.register(conn, selectors.EVENT_READ, ("conn", pid))

    def _reap(self, pid: int, pidfd: int) -> None:
        self.sel.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            code = 128 - code  # killed by a signal, as a shell reports it
        conn = self.conns.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn)
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {code}\n".encode())
            conn.close()

    def _client_event(self, pid: int) -> None:
        conn = self.conns.get(pid)
        if conn is None:
            return
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            # the client (the worker's handle on this run) died: the run must not
            # outlive it unnoticed
            self.sel.unregister(conn)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def start_engine(
    socket_path: Path, root: Path, flow_files: list[str], run_env: dict[str, str] | None = None
) -> int:
    """Fork the warm engine; call before importing Prefect (no threads yet). Its pid.

    ``run_env`` is set in the engine before it imports anything (:func:`run_env_of`)."""
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    listener.listen(64)
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        listener.close()
        return pid
    code = 0
    try:
        os.environ.update(run_env or {})
        _preload(root, flow_files, sys.stderr)  # the worker's log
        _Engine(listener, parent, sys.stderr).serve()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(OSError):
            socket_path.unlink()
        os._exit(code)


# --------------------------------------------------------------------------- worker


def _run_worker(args: argparse.Namespace, command: list[str] | None) -> None:
    import asyncio

    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS
    from prefect.utilities.processutils import command_to_string
    from prefect.workers.process import ProcessWorker

    warm = command_to_string(command) if command else None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # same dispatch key as ProcessWorker, on purpose

        class WarmProcessWorker(ProcessWorker):
            """The process worker; flow runs without an explicit command start warm."""

            async def run(self, flow_run: Any, configuration: Any, task_status: Any = None) -> Any:
                if warm is not None and not configuration._command_configured:
                    configuration.command = warm
                    configuration._command_configured = True
                return await super().run(flow_run, configuration, task_status)

    async def serve() -> None:
        worker = WarmProcessWorker(
            work_pool_name=args.pool,
            name=args.name,
            limit=args.limit,
            heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
            create_pool_if_not_found=True,
        )
        await worker.start(printer=print)

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(serve())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m driftloop.warm_engine",
        description="A Prefect process worker whose flow runs start from a warm engine.",
    )
    p.add_argument("--pool", required=True, help="the process work pool to serve")
    p.add_argument("--name", default=None, help="the worker's name")
    p.add_argument("--limit", type=int, default=None, help="most flow runs at once")
    p.add_argument(
        "--root", type=Path, default=Path.cwd(), help="project root (prefect.yaml, flows/)"
    )
    p.add_argument(
        "--socket", type=Path, default=None, help="the warm engine's socket (default: PREFECT_HOME)"
    )
    p.add_argument(
        "--cold", action="store_true", help="no warm engine: Prefect's own flow-run command"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from driftloop.settings import Settings

    cold = args.cold or not Settings().warm_worker
    command: list[str] | None = None
    if not cold:
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
        home.mkdir(parents=True, exist_ok=True)
        sock = args.socket or home / f"warm-{os.getpid()}.sock"
        if len(str(sock)) > 100:  # AF_UNIX paths are short
            sock = Path(f"/tmp/driftloop-warm-{os.getpid()}.sock")
        root = args.root.resolve()
        spec = root / "prefect.yaml"
        start_engine(sock, root, entrypoints_of(spec), run_env_of(spec))
        command = client_command(sock)
    _run_worker(args, command)


if __name__ == "__main__":
    main()
