"""The local serving plane: one ``bentoml serve`` process per arm on 127.0.0.1.

Each arm is started detached (its own session, reparented away from the
caller, so it outlives the flow that deployed it) with its output appended to
``<state_dir>/plane/logs/<model>/<arm>.log``. What actually runs (pid and start
time, the worker pids, port, env) is recorded atomically in
``<state_dir>/plane/<model>.actual.json``; a new :class:`LocalPlane` on the same
state dir reattaches to live arms after checking the pid is the same process
(``/proc`` start time) and that its ``/readyz`` answers, and restarts the others.

``bentoml serve`` runs an arbiter that starts its workers in sessions of their
own, and a worker survives a SIGKILL of the arbiter, still holding the port. So
the plane records the worker pids too, and stopping an arm means SIGTERM to the
arbiter's group (a graceful stop), then SIGKILL to the arbiter and every worker
still alive after ``stop_timeout``. Processes are only ever signalled by the
pids recorded here, after checking their start time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
from pydantic import AwareDatetime, BaseModel, Field

from driftloop.errors import ServingError
from driftloop.plane.base import (
    ARM_NAME_PATTERN,
    ArmHealth,
    ArmInfo,
    ArmSpec,
    ArmStatus,
    ServingPlane,
    plane_dir,
    write_atomic,
)
from driftloop.rollout import Role
from driftloop.settings import Settings, is_uri

# Runs the arm in a new session and exits at once, so the arm is not our child:
# no zombie while we live, nothing tied to our lifetime.
_LAUNCHER = """
import json, os, subprocess, sys
cfg = json.loads(sys.argv[1])
log = open(cfg["log"], "ab")
proc = subprocess.Popen(cfg["cmd"], cwd=cfg["cwd"], stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
sys.stdout.write(str(proc.pid))
sys.stdout.flush()
os._exit(0)
"""


class Proc(BaseModel):
    """A process we started, identified by pid *and* start time (pids get reused)."""

    pid: int
    start_time: int | None = None


class ArmRecord(BaseModel):
    """One running arm, as recorded by the plane."""

    name: str
    bento_tag: str
    host: str
    port: int
    main: Proc
    workers: list[Proc] = Field(default_factory=list)
    working_dir: str | None = None
    env: dict[str, str] = Field(default_factory=dict, description="Per-arm extra environment.")
    log: str
    started_at: AwareDatetime
    restarts: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"


class ActualState(BaseModel):
    model_name: str
    arms: dict[str, ArmRecord] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------
# process helpers (Linux /proc; a plain kill(pid, 0) where /proc is missing)
# --------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def is_alive(proc: Proc) -> bool:
    """The process exists, is not a zombie and is the one we started."""
    if not Path("/proc").is_dir():
        try:
            os.kill(proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = _stat(proc.pid)
    if fields is None or fields[0] in ("Z", "X", "x"):
        return False
    return proc.start_time is None or int(fields[19]) == proc.start_time


def descendants(pid: int) -> list[Proc]:
    """Every live descendant of ``pid`` (children of children...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None or fields[0] in ("Z", "X", "x"):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[Proc] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        out.append(Proc(pid=child, start_time=process_start_time(child)))
        stack.extend(children.get(child, []))
    return out


def _signal(proc: Proc, sig: int, *, group: bool) -> None:
    if not is_alive(proc):
        return
    try:
        if group and os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, offset: int = 0, max_chars: int = 2000) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return text[-max_chars:]


# --------------------------------------------------------------------------------------
# the plane
# --------------------------------------------------------------------------------------


class LocalPlane(ServingPlane):
    """Runs each arm as a local ``bentoml serve`` process (the embedded default).

    ``bento_tag`` is a Bento tag from the store under ``BENTOML_HOME`` or, for
    development, a module target such as ``service:Svc`` served from
    ``working_dir``.
    """

    def __init__(
        self,
        settings: Settings,
        model_name: str | None = None,
        *,
        env: dict[str, str] | None = None,
        ready_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        poll_interval: float = 0.2,
        command: list[str] | None = None,
        working_dir: str | Path | None = None,
    ) -> None:
        self.settings = settings
        super().__init__(settings.state_dir, model_name or settings.model_name)
        self.host = settings.host
        self.env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.poll_interval = poll_interval
        self.command = command or [sys.executable, "-m", "bentoml", "serve"]
        self.working_dir = working_dir  # default for deploy() (module targets in development)
        self.actual_path = plane_dir(settings.state_dir) / f"{self.model_name}.actual.json"
        self.log_dir = plane_dir(settings.state_dir) / "logs" / self.model_name

    # -- persistence -----------------------------------------------------------------
    def actual(self) -> ActualState:
        try:
            return ActualState.model_validate_json(self.actual_path.read_bytes())
        except FileNotFoundError:
            return ActualState(model_name=self.model_name)

    def _save_actual(self, actual: ActualState) -> None:
        # 0600: per-arm env may carry tokens
        write_atomic(self.actual_path, actual.model_dump_json(indent=2), mode=0o600)

    @contextmanager
    def _session(self) -> Iterator[ActualState]:
        """Lock, hand out the actual state, save it back afterwards (even on error)."""
        with self._locked():
            actual = self.actual()
            try:
                yield actual
            finally:
                self._save_actual(actual)

    # -- environment -----------------------------------------------------------------
    def arm_env(self, arm_name: str, bento_tag: str, extra: dict[str, str]) -> dict[str, str]:
        """The environment of an arm: ours, plus absolute driftloop locations, plus extras."""
        s = self.settings
        env = dict(os.environ)
        env["BENTOML_DO_NOT_TRACK"] = "True"
        shared = (
            s.bentoml_home
            if s.bentoml_home is not None
            else Path(env.get("BENTOML_HOME") or Path.home() / "bentoml")
        )
        env["BENTOML_HOME"] = str(self.arm_home(arm_name, shared))
        env["DRIFTLOOP_STATE_DIR"] = str(s.state_dir.resolve())
        env["DRIFTLOOP_MODEL_NAME"] = self.model_name
        env["DRIFTLOOP_FEAST_REPO"] = str(s.feast_repo.resolve())
        env["DRIFTLOOP_DATA_ROOT"] = (
            s.data_root if is_uri(s.data_root) else str(Path(s.data_root).resolve())
        )
        env["DRIFTLOOP_ARM"] = arm_name
        env["DRIFTLOOP_BENTO_TAG"] = bento_tag
        env.update(self.env)
        env.update(extra)
        return env

    def arm_home(self, arm_name: str, shared: Path) -> Path:
        """A ``BENTOML_HOME`` of the arm's own whose stores link to the shared home.

        Every ``bentoml serve`` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when it
        starts: arms sharing one home would wipe each other's metrics.
        """
        shared = Path(shared).expanduser().resolve()
        home = plane_dir(self.settings.state_dir).resolve() / "homes" / arm_name
        home.mkdir(parents=True, exist_ok=True)
        for store in ("bentos", "models", "envs", "tmp"):
            (shared / store).mkdir(parents=True, exist_ok=True)
            link = home / store
            if link.is_symlink() and link.resolve() == shared / store:
                continue
            if link.is_symlink() or link.is_file():
                link.unlink()
            elif link.is_dir():
                shutil.rmtree(link)
            link.symlink_to(shared / store, target_is_directory=True)
        return home

    # -- process control -------------------------------------------------------------
    def _ready(self, host: str, port: int, timeout: float = 1.0) -> bool:
        try:
            return httpx.get(f"http://{host}:{port}/readyz", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def _launch(
        self, name: str, bento_tag: str, port: int, working_dir: str | None, env: dict[str, str]
    ) -> Proc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        cmd = [*self.command, bento_tag, "--host", self.host, "--port", str(port)]
        if working_dir:
            cmd += ["--working-dir", working_dir]
        with log.open("ab") as fh:
            stamp = datetime.now(UTC).isoformat()
            fh.write(f"\n=== {stamp} driftloop start: {' '.join(cmd)}\n".encode())
        cfg = json.dumps({"cmd": cmd, "cwd": working_dir, "log": str(log)})
        launched = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, cfg],
            env=self.arm_env(name, bento_tag, env),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if launched.returncode != 0 or not launched.stdout.strip().isdigit():
            raise ServingError(f"could not launch arm {name}: {launched.stderr.strip()[-500:]}")
        pid = int(launched.stdout.strip())
        return Proc(pid=pid, start_time=process_start_time(pid))

    def _start(
        self,
        name: str,
        bento_tag: str,
        working_dir: str | None,
        env: dict[str, str],
        preferred_port: int | None = None,
        restarts: int = 0,
    ) -> ArmRecord:
        """Start an arm and wait for /readyz; retries another port if the port was taken."""
        log = self.log_dir / f"{name}.log"
        last_error = ""
        for _attempt in range(3):
            if preferred_port and port_is_free(self.host, preferred_port):
                port = preferred_port
            else:
                port = free_port(self.host)
            preferred_port = None
            offset = log.stat().st_size if log.exists() else 0
            main = self._launch(name, bento_tag, port, working_dir, env)
            record = ArmRecord(
                name=name,
                bento_tag=bento_tag,
                host=self.host,
                port=port,
                main=main,
                working_dir=working_dir,
                env=env,
                log=str(log),
                started_at=datetime.now(UTC),
                restarts=restarts,
            )
            outcome = self._wait_ready(record)
            if outcome == "ready":
                record.workers = descendants(main.pid)
                return record
            self._stop(record)
            last_error = f"{outcome}; log:\n{_tail(log, offset)}"
            if "address already in use" not in last_error.lower():
                break
        raise ServingError(f"arm {name} ({bento_tag}) did not become ready: {last_error}")

    def _wait_ready(self, record: ArmRecord) -> str:
        deadline = time.monotonic() + self.ready_timeout
        seen: dict[int, Proc] = {}
        while time.monotonic() < deadline:
            if not is_alive(record.main):
                return "the process exited"
            if self._ready(record.host, record.port):
                return "ready"
            for proc in descendants(record.main.pid):
                seen.setdefault(proc.pid, proc)
            record.workers = list(seen.values())
            if any(not is_alive(p) for p in seen.values()):
                return "a worker exited during startup (crash loop)"
            time.sleep(self.poll_interval)
        return f"not ready after {self.ready_timeout:g} s"

    def _stop(self, record: ArmRecord) -> None:
        """SIGTERM the arbiter's group, then SIGKILL whatever we started that is left."""
        procs = [record.main, *record.workers]
        if is_alive(record.main):
            known = {p.pid for p in procs}
            procs += [p for p in descendants(record.main.pid) if p.pid not in known]
            # the arbiter stops its workers gracefully on SIGTERM
            _signal(record.main, signal.SIGTERM, group=True)
            deadline = time.monotonic() + self.stop_timeout
            while time.monotonic() < deadline and any(is_alive(p) for p in procs):
                time.sleep(0.1)
        # orphaned workers (arbiter gone) have nobody to stop them gracefully: kill them
        for proc in procs:
            _signal(proc, signal.SIGKILL, group=True)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and (
            any(is_alive(p) for p in procs) or port_accepts(record.host, record.port, 0.2)
        ):
            time.sleep(0.05)

    def _record_health(self, record: ArmRecord) -> ArmHealth:
        alive = is_alive(record.main)
        ready = alive and self._ready(record.host, record.port)
        if ready:
            status, detail = ArmStatus.READY, ""
        elif alive:
            status, detail = ArmStatus.UNHEALTHY, "alive but /readyz does not answer 200"
        else:
            status, detail = ArmStatus.UNHEALTHY, "process is gone"
        return ArmHealth(
            name=record.name,
            status=status,
            alive=alive,
            ready=ready,
            endpoint=record.endpoint,
            pid=record.main.pid,
            detail=detail,
        )

    @staticmethod
    def _info(record: ArmRecord, status: ArmStatus = ArmStatus.READY) -> ArmInfo:
        return ArmInfo(
            name=record.name,
            bento_tag=record.bento_tag,
            endpoint=record.endpoint,
            pid=record.main.pid,
            status=status,
        )

    # -- the ServingPlane interface ----------------------------------------------------
    def deploy(
        self,
        arm_name: str,
        bento_tag: str,
        env: dict[str, str] | None = None,
        *,
        role: Role = Role.CANARY,
        working_dir: str | Path | None = None,
    ) -> ArmInfo:
        if not re.match(ARM_NAME_PATTERN, arm_name):
            raise ServingError(f"arm name {arm_name!r} is not a DNS-1123 label")
        working_dir = working_dir if working_dir is not None else self.working_dir
        wd = str(Path(working_dir).resolve()) if working_dir is not None else None
        extra = dict(env or {})
        with self._session() as actual:
            desired = self.desired()
            existed = arm_name in desired.arms
            record = actual.arms.get(arm_name)
            if (
                record is not None
                and record.bento_tag == bento_tag
                and record.working_dir == wd
                and record.env == extra
                and self._record_health(record).status is ArmStatus.READY
            ):
                self._put_arm(arm_name, bento_tag, role, record.endpoint, wd)
                return self._info(record)
            if record is not None:
                self._stop(record)
                del actual.arms[arm_name]
            try:
                record = self._start(arm_name, bento_tag, wd, extra)
            except ServingError:
                if not existed:
                    self._drop_arm(arm_name)
                raise
            actual.arms[arm_name] = record
            self._put_arm(arm_name, bento_tag, role, record.endpoint, wd)
            return self._info(record)

    def _put_arm(
        self, name: str, bento_tag: str, role: Role, endpoint: str | None, wd: str | None
    ) -> None:
        desired = self.desired()
        arms = {n: a.model_dump() for n, a in desired.arms.items()}
        arms[name] = ArmSpec(
            bento_tag=bento_tag, role=role, endpoint=endpoint, working_dir=wd
        ).model_dump()
        self._update(arms=arms)

    def _drop_arm(self, name: str) -> None:
        desired = self.desired()
        if name not in desired.arms:
            return
        arms = {n: a.model_dump() for n, a in desired.arms.items() if n != name}
        self._update(
            arms=arms,
            weights={n: w for n, w in desired.weights.items() if n != name},
            shadow=[n for n in desired.shadow if n != name],
        )

    def retire(self, arm_name: str) -> None:
        with self._session() as actual:
            desired = self.desired()
            if desired.weights.get(arm_name, 0) > 0:
                raise ServingError(
                    f"arm {arm_name} still has weight {desired.weights[arm_name]}; "
                    "set its weight to 0 before retiring it"
                )
            record = actual.arms.pop(arm_name, None)
            if record is not None:
                self._stop(record)
            self._drop_arm(arm_name)

    def health(self) -> dict[str, ArmHealth]:
        actual = self.actual()
        out: dict[str, ArmHealth] = {}
        for name, spec in self.desired().arms.items():
            record = actual.arms.get(name)
            if record is None or record.bento_tag != spec.bento_tag:
                out[name] = ArmHealth(
                    name=name,
                    status=ArmStatus.STOPPED,
                    alive=False,
                    ready=False,
                    detail="not running" if record is None else "running another bento",
                )
            else:
                out[name] = self._record_health(record)
        return out

    def reconcile(self) -> dict[str, ArmInfo]:
        """Reattach to healthy arms, restart dead or stuck ones, start missing ones and
        stop arms that are no longer desired."""
        out: dict[str, ArmInfo] = {}
        with self._session() as actual:
            desired = self.desired()
            for name in [n for n in actual.arms if n not in desired.arms]:
                self._stop(actual.arms.pop(name))
            for name, spec in desired.arms.items():
                record = actual.arms.get(name)
                if record is not None and record.bento_tag == spec.bento_tag:
                    if self._healthy_or_becoming(record):
                        record.workers = descendants(record.main.pid) or record.workers
                        out[name] = self._info(record)
                        if spec.endpoint != record.endpoint:
                            self._put_arm(
                                name, spec.bento_tag, spec.role, record.endpoint, spec.working_dir
                            )
                        continue
                restarts = 0
                port = None
                env: dict[str, str] = {}
                if record is not None:
                    self._stop(record)
                    del actual.arms[name]
                    restarts, port, env = record.restarts + 1, record.port, record.env
                record = self._start(
                    name,
                    spec.bento_tag,
                    spec.working_dir,
                    env,
                    preferred_port=port,
                    restarts=restarts,
                )
                actual.arms[name] = record
                self._put_arm(name, spec.bento_tag, spec.role, record.endpoint, spec.working_dir)
                out[name] = self._info(record)
        return out

    def _healthy_or_becoming(self, record: ArmRecord) -> bool:
        """Ready now, or alive and ready within the ready timeout of its start."""
        if not is_alive(record.main):
            return False
        if self._ready(record.host, record.port):
            return True
        deadline = record.started_at.timestamp() + self.ready_timeout
        while time.time() < deadline and is_alive(record.main):
            if self._ready(record.host, record.port):
                return True
            time.sleep(self.poll_interval)
        return False

    def stop_all(self) -> None:
        """Stop every recorded arm (desired state kept): for shutdown and tests."""
        with self._session() as actual:
            for name in list(actual.arms):
                self._stop(actual.arms.pop(name))
