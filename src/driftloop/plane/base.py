"""The serving plane: what runs the model arms, and the desired state it keeps.

The *desired state* of one model (its arms, their roles, the traffic weights and
the rollout phase) is one JSON file, ``<state_dir>/plane/<model>.json``, replaced
atomically (temporary file + fsync + rename). The router reads its weights and
arm endpoints from it with :func:`load_desired_state`, which is cached on the
file's identity (inode, mtime, size) so it can be called on every request and
still sees a change on the next call, without a restart.

A plane (local processes, Kubernetes) makes the arms that the desired state
names exist: :meth:`ServingPlane.deploy`, :meth:`~ServingPlane.set_weights`,
:meth:`~ServingPlane.retire`, :meth:`~ServingPlane.health`,
:meth:`~ServingPlane.reconcile`. :meth:`ServingPlane.apply` carries out the
arm actions produced by :mod:`driftloop.rollout`.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from driftloop.errors import ServingError
from driftloop.rollout import Action, DeployArm, Emit, RetireArm, Role, SetRoles, SetWeights

ARM_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


def arm_name_for(bento_tag: str, prefix: str = "") -> str:
    """A stable DNS-1123 arm name for a Bento tag: ``fraud_svc:Ab12`` -> ``fraud-svc-ab12``."""
    raw = f"{prefix}-{bento_tag}" if prefix else bento_tag
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)[:63].strip("-")
    if not name:
        raise ServingError(f"cannot derive an arm name from {bento_tag!r}")
    return name


class ArmSpec(BaseModel):
    """One arm as it should be."""

    model_config = ConfigDict(extra="forbid")

    bento_tag: str = Field(
        min_length=1, description="A Bento tag, or for local dev a module target (service:Svc)."
    )
    role: Role = Role.CANARY
    endpoint: str | None = Field(default=None, description="Base URL the router sends traffic to.")
    working_dir: str | None = Field(
        default=None, description="Local plane: cwd for module targets."
    )


class DesiredState(BaseModel):
    """Everything the router and the plane need to know about one model's arms."""

    model_config = ConfigDict(extra="forbid")

    model_name: str
    arms: dict[str, ArmSpec] = Field(default_factory=dict)
    weights: dict[str, int] = Field(default_factory=dict, description="arm -> percent, sum 100")
    shadow: list[str] = Field(default_factory=list, description="Arms receiving mirrored traffic.")
    phase: str = "steady"
    incident_id: str | None = None
    version: int = Field(default=0, ge=0, description="Incremented on every save.")
    updated_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))

    @model_validator(mode="after")
    def _consistent(self) -> DesiredState:
        for name in self.arms:
            if not re.match(ARM_NAME_PATTERN, name):
                raise ValueError(f"arm name {name!r} is not a DNS-1123 label")
        unknown = (set(self.weights) | set(self.shadow)) - set(self.arms)
        if unknown:
            raise ValueError(f"weights/shadow name unknown arms: {sorted(unknown)}")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("weights must be non-negative")
        if self.weights and sum(self.weights.values()) != 100:
            raise ValueError(f"weights must sum to 100, got {self.weights}")
        return self

    def champion(self) -> str | None:
        return next((n for n, a in self.arms.items() if a.role is Role.CHAMPION), None)


class ArmStatus(StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    STOPPED = "stopped"
    RENDERED = "rendered"  # Kubernetes plane without a cluster: manifests written only


class ArmInfo(BaseModel):
    """What a plane knows about a running arm."""

    name: str
    bento_tag: str
    endpoint: str | None = None
    pid: int | None = None
    status: ArmStatus


class ArmHealth(BaseModel):
    name: str
    status: ArmStatus
    alive: bool
    ready: bool
    endpoint: str | None = None
    pid: int | None = None
    detail: str = ""


# --------------------------------------------------------------------------------------
# persistence
# --------------------------------------------------------------------------------------


def plane_dir(state_dir: Path) -> Path:
    return Path(state_dir).resolve() / "plane"


def desired_state_path(state_dir: Path, model_name: str) -> Path:
    """Where the desired state of ``model_name`` lives under ``state_dir``."""
    return plane_dir(state_dir) / f"{model_name}.json"


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_desired_state(path: Path, state: DesiredState) -> DesiredState:
    """Persist ``state`` atomically with a bumped version; returns what was written."""
    saved = state.model_copy(update={"version": state.version + 1, "updated_at": datetime.now(UTC)})
    DesiredState.model_validate(saved.model_dump())  # never write an invalid state
    write_atomic(path, saved.model_dump_json(indent=2))
    return saved


_cache: dict[Path, tuple[tuple[int, int, int], DesiredState]] = {}
_cache_lock = threading.Lock()
_RACY_NS = 1_000_000_000


def load_desired_state(path: Path | str) -> DesiredState | None:
    """The desired state at ``path`` (``None`` if absent), cached until the file changes.

    One ``stat`` per call when nothing changed (a few microseconds): cheap enough for
    a router to call per request. Files are replaced by rename, so a changed inode,
    mtime or size means new content; a file changed less than a second ago is
    re-read every time (its timestamp may not have ticked yet).
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        with _cache_lock:
            _cache.pop(p, None)
        return None
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    with _cache_lock:
        hit = _cache.get(p)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        state = DesiredState.model_validate_json(p.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ServingError(f"desired state {p} is invalid: {exc}") from exc
    # "racy" files: a rewrite within the timestamp granularity (a few ms) can keep inode
    # (reused), mtime and size, so only trust the cache for files older than a second.
    if time.time_ns() - st.st_mtime_ns > _RACY_NS:
        with _cache_lock:
            _cache[p] = (key, state)
    return state


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) on ``path``, across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------


class ServingPlane(ABC):
    """Runs the arms of one model and keeps its desired state on disk.

    Subclasses implement the arm lifecycle; the desired-state bookkeeping
    (roles, weights, phase) is shared here and always goes through a
    read-modify-write under a file lock, so several processes can drive it.
    """

    model_name: str
    desired_path: Path

    def __init__(self, state_dir: Path, model_name: str) -> None:
        self.model_name = model_name
        self.desired_path = desired_state_path(state_dir, model_name)
        self._lock_path = self.desired_path.with_suffix(".lock")

    # -- the desired state -----------------------------------------------------------
    def desired(self) -> DesiredState:
        """The current desired state (an empty one if none was saved yet)."""
        return load_desired_state(self.desired_path) or DesiredState(model_name=self.model_name)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with file_lock(self._lock_path):
            yield

    def _update(self, **changes: Any) -> DesiredState:
        """Read, change and save the desired state; the caller holds the lock."""
        current = self.desired()
        new = DesiredState.model_validate({**current.model_dump(), **changes})
        return save_desired_state(self.desired_path, new)

    def set_weights(self, weights: dict[str, int], shadow: Sequence[str] | None = None) -> None:
        """Set the traffic split (sum 100 over deployed arms) and, optionally, mirrored arms.

        A weight of 0 for an arm that is not deployed (e.g. a canary whose deploy
        failed, in a rollback's routing table) is dropped rather than refused.
        """
        with self._locked():
            current = self.desired()
            weights = {n: w for n, w in weights.items() if n in current.arms or w != 0}
            unknown = (set(weights) | set(shadow or ())) - set(current.arms)
            if unknown:
                raise ServingError(f"cannot route to arms that are not deployed: {sorted(unknown)}")
            try:
                self._update(
                    weights=dict(weights),
                    shadow=list(shadow) if shadow is not None else current.shadow,
                )
            except ValueError as exc:
                raise ServingError(f"invalid weights {weights}: {exc}") from exc
        self._weights_changed()

    def set_roles(self, roles: dict[str, Role]) -> None:
        with self._locked():
            current = self.desired()
            arms = {n: a.model_dump() for n, a in current.arms.items()}
            for name, role in roles.items():
                if name not in arms:
                    raise ServingError(f"cannot set the role of unknown arm {name!r}")
                arms[name]["role"] = Role(role)
            self._update(arms=arms)

    def set_phase(self, phase: str, incident_id: str | None = None) -> None:
        with self._locked():
            self._update(phase=phase, incident_id=incident_id)

    def apply(self, actions: Sequence[Action], env: dict[str, str] | None = None) -> list[Action]:
        """Carry out the plane's share of rollout actions, in order.

        Returns the actions it does not handle (``Emit``), for the caller to send;
        their ``phase`` and ``incident_id`` are recorded in the desired state.
        """
        rest: list[Action] = []
        for action in actions:
            if isinstance(action, Emit):
                if "phase" in action.payload:
                    self.set_phase(action.payload["phase"], action.payload.get("incident_id"))
                rest.append(action)
            elif isinstance(action, DeployArm):
                self.deploy(action.arm, action.bento_tag, env=env, role=action.role)
            elif isinstance(action, SetWeights):
                self.set_weights(action.weights, shadow=action.shadow)
            elif isinstance(action, SetRoles):
                self.set_roles(action.roles)
            elif isinstance(action, RetireArm):
                self.retire(action.arm)
            else:
                rest.append(action)
        return rest

    def _weights_changed(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Hook: a plane that must push weights somewhere (Kubernetes) overrides it."""

    # -- the arm lifecycle -----------------------------------------------------------
    @abstractmethod
    def deploy(
        self,
        arm_name: str,
        bento_tag: str,
        env: dict[str, str] | None = None,
        *,
        role: Role = Role.CANARY,
    ) -> ArmInfo:
        """Make the arm run ``bento_tag`` and return once it is ready (weight unchanged,
        0 for a new arm)."""

    @abstractmethod
    def retire(self, arm_name: str) -> None:
        """Stop the arm and forget it. Refuses an arm that still has traffic weight.
        Retiring an unknown arm is a no-op."""

    @abstractmethod
    def health(self) -> dict[str, ArmHealth]:
        """The health of every desired arm."""

    @abstractmethod
    def reconcile(self) -> dict[str, ArmInfo]:
        """Make the actual arms match the desired state (start, restart, stop orphans)."""
