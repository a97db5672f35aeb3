"""Trigger hygiene: which retrain requests run, and why the others do not.

A drift incident produces many events (every monitor window while it lasts, plus
performance events once labels arrive); each one fires the retrain automation.
Hygiene turns that storm into exactly one retrain per incident:

* **dedupe**: one retrain per ``incident_id``, however many events carry it. An
  incident whose retrain *crashed* (status ``failed``) may be retried.
* **in progress**: while a retrain of the model runs, new requests are merged
  into it (skipped, naming the running incident). The deployment's concurrency
  limit (``prefect.yaml``: limit 1, ``CANCEL_NEW``) cancels most of them before
  they start (their Prefect state message says "Deployment concurrency limit
  reached"); this catches the rest, per model, across deployments and machines
  sharing the state directory.
* **cool-down**: no new retrain of the same model within
  ``settings.retrain_cooldown_minutes`` of the last one that finished.
* **data quality**: no retrain while the latest monitor verdict is a data-quality
  failure (training on broken data would learn the break). The verdict is the newer
  of the monitor's state file (``driftloop.monitoring``) and its last
  ``driftloop.monitor.completed`` / ``driftloop.data_quality.failed`` event.

Every skip is recorded with its reason in the state file; the flow also logs it,
publishes a markdown artifact and emits ``driftloop.retrain.skipped``.

State: ``<state_dir>/retrain/<model>.json``, read-decide-written under an exclusive
``fcntl`` lock on ``<model>.json.lock``, so concurrent runs (threads or processes)
see each other. :func:`decide` is pure; :func:`claim`, :func:`finish` and
:func:`record_skip` do the locked file I/O.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from driftloop.errors import ConfigError, DataError

__all__ = [
    "Decision",
    "HygienePolicy",
    "IncidentRecord",
    "MonitorVerdict",
    "RetrainState",
    "SkipCode",
    "SkipRecord",
    "claim",
    "decide",
    "finish",
    "latest_monitor_verdict",
    "monitor_state_path",
    "monitor_verdict_from_events",
    "monitor_verdict_from_state",
    "read_state",
    "record_skip",
    "release_run",
    "skip_markdown",
    "state_path",
]

SkipCode = Literal[
    "duplicate_incident", "in_progress", "cooldown", "data_quality", "insufficient_data"
]
IncidentStatus = Literal["running", "registered", "rejected", "failed"]
#: statuses that count as "this incident had its retrain"
_DONE_OR_RUNNING: frozenset[str] = frozenset({"running", "registered", "rejected"})
#: skip records kept in the state file (the newest)
MAX_SKIPS = 200
#: monitor verdicts that block a retrain
BLOCKING_VERDICTS: frozenset[str] = frozenset({"quality_failed"})


class HygienePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cooldown: timedelta = Field(
        default=timedelta(minutes=30), description="after a finished retrain"
    )
    stale_after: timedelta = Field(
        default=timedelta(hours=2),
        description="a 'running' claim older than this is taken as a crashed run",
    )

    @classmethod
    def from_settings(cls, settings: object) -> HygienePolicy:
        minutes = float(getattr(settings, "retrain_cooldown_minutes"))  # noqa: B009
        return cls(cooldown=timedelta(minutes=minutes))


class MonitorVerdict(BaseModel):
    """The latest verdict of the monitor for a model, wherever it was read from."""

    verdict: str = Field(description="ok | drift | degraded | quality_failed | insufficient")
    at: AwareDatetime
    source: str = Field(description="where it was read (event id or state file)")
    detail: str = ""

    @property
    def blocks_retrain(self) -> bool:
        return self.verdict in BLOCKING_VERDICTS


class IncidentRecord(BaseModel):
    incident_id: str
    status: IncidentStatus
    started_at: AwareDatetime
    finished_at: AwareDatetime | None = None
    reason: str = ""
    trigger_event_id: str | None = None
    flow_run_id: str | None = None
    model_tag: str | None = None
    detail: str = ""


class SkipRecord(BaseModel):
    at: AwareDatetime
    incident_id: str | None
    code: SkipCode
    reason: str
    trigger_event_id: str | None = None
    flow_run_id: str | None = None


class RetrainState(BaseModel):
    """Everything hygiene remembers about one model's retrains."""

    model_name: str
    incidents: dict[str, IncidentRecord] = Field(default_factory=dict)
    skips: list[SkipRecord] = Field(default_factory=list)

    def running(self, now: datetime, stale_after: timedelta) -> IncidentRecord | None:
        live = [
            r
            for r in self.incidents.values()
            if r.status == "running" and now - r.started_at < stale_after
        ]
        return max(live, key=lambda r: r.started_at) if live else None

    def last_finished(self) -> IncidentRecord | None:
        done = [
            r
            for r in self.incidents.values()
            if r.status in ("registered", "rejected") and r.finished_at is not None
        ]
        return max(done, key=lambda r: r.finished_at) if done else None  # type: ignore[arg-type,return-value]


class Decision(BaseModel):
    proceed: bool
    code: SkipCode | None = None
    reason: str


# -- the rule (pure) ----------------------------------------------------------------


def decide(
    state: RetrainState,
    incident_id: str,
    now: datetime,
    policy: HygienePolicy,
    monitor: MonitorVerdict | None = None,
) -> Decision:
    """Whether a retrain for ``incident_id`` may start now, and if not, why."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    previous = state.incidents.get(incident_id)
    if previous is not None and previous.status in _DONE_OR_RUNNING:
        stale = previous.status == "running" and now - previous.started_at >= policy.stale_after
        if not stale:
            return Decision(
                proceed=False,
                code="duplicate_incident",
                reason=(
                    f"incident {incident_id} already has a retrain ({previous.status}, started "
                    f"{previous.started_at:%Y-%m-%d %H:%M:%S} UTC"
                    + (f", model {previous.model_tag}" if previous.model_tag else "")
                    + ")"
                ),
            )
    running = state.running(now, policy.stale_after)
    if running is not None and running.incident_id != incident_id:
        return Decision(
            proceed=False,
            code="in_progress",
            reason=(
                f"merged into the running retrain of incident {running.incident_id} (started "
                f"{running.started_at:%H:%M:%S} UTC): one retrain per model at a time"
            ),
        )
    last = state.last_finished()
    if last is not None and last.finished_at is not None:
        until = last.finished_at + policy.cooldown
        if now < until:
            return Decision(
                proceed=False,
                code="cooldown",
                reason=(
                    f"cool-down: the retrain of incident {last.incident_id} finished at "
                    f"{last.finished_at:%H:%M:%S} UTC; no retrain of {state.model_name} before "
                    f"{until:%H:%M:%S} UTC ({policy.cooldown.total_seconds() / 60:g} min)"
                ),
            )
    if monitor is not None and monitor.blocks_retrain:
        return Decision(
            proceed=False,
            code="data_quality",
            reason=(
                f"the latest monitor verdict ({monitor.at:%Y-%m-%d %H:%M:%S} UTC, "
                f"{monitor.source}) is a data-quality failure"
                + (f": {monitor.detail}" if monitor.detail else "")
                + "; fix the data before retraining"
            ),
        )
    return Decision(proceed=True, reason="ok")


# -- the state file -----------------------------------------------------------------


def state_path(state_dir: Path, model_name: str) -> Path:
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ConfigError(f"invalid model name {model_name!r}")
    return Path(state_dir).resolve() / "retrain" / f"{model_name}.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _load(path: Path, model_name: str) -> RetrainState:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return RetrainState(model_name=model_name)
    try:
        return RetrainState.model_validate_json(text)
    except ValueError as exc:
        raise DataError(f"retrain state {path} is corrupt: {exc}") from exc


def _save(path: Path, state: RetrainState) -> None:
    state.skips = state.skips[-MAX_SKIPS:]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(state.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(state_dir: Path, model_name: str) -> RetrainState:
    path = state_path(state_dir, model_name)
    with _locked(path):
        return _load(path, model_name)


def claim(
    state_dir: Path,
    model_name: str,
    incident_id: str,
    *,
    policy: HygienePolicy,
    monitor: MonitorVerdict | None = None,
    now: datetime | None = None,
    reason: str = "",
    trigger_event_id: str | None = None,
    flow_run_id: str | None = None,
) -> Decision:
    """Atomically decide and, when the retrain may run, mark ``incident_id`` running.

    A refused claim is recorded as a skip. Exactly one of any number of concurrent
    claims for one incident proceeds.
    """
    now = now or datetime.now(UTC)
    path = state_path(state_dir, model_name)
    with _locked(path):
        state = _load(path, model_name)
        decision = decide(state, incident_id, now, policy, monitor)
        if decision.proceed:
            state.incidents[incident_id] = IncidentRecord(
                incident_id=incident_id,
                status="running",
                started_at=now,
                reason=reason,
                trigger_event_id=trigger_event_id,
                flow_run_id=flow_run_id,
            )
        else:
            assert decision.code is not None
            state.skips.append(
                SkipRecord(
                    at=now,
                    incident_id=incident_id,
                    code=decision.code,
                    reason=decision.reason,
                    trigger_event_id=trigger_event_id,
                    flow_run_id=flow_run_id,
                )
            )
        _save(path, state)
    return decision


def finish(
    state_dir: Path,
    model_name: str,
    incident_id: str,
    status: Literal["registered", "rejected", "failed"],
    *,
    model_tag: str | None = None,
    detail: str = "",
    now: datetime | None = None,
) -> IncidentRecord:
    """Record how the retrain of ``incident_id`` ended (starts its model's cool-down)."""
    now = now or datetime.now(UTC)
    path = state_path(state_dir, model_name)
    with _locked(path):
        state = _load(path, model_name)
        record = state.incidents.get(incident_id) or IncidentRecord(
            incident_id=incident_id, status="running", started_at=now
        )
        record = record.model_copy(
            update={
                "status": status,
                "finished_at": now,
                "model_tag": model_tag or record.model_tag,
                "detail": detail,
            }
        )
        state.incidents[incident_id] = record
        _save(path, state)
    return record


def release_run(
    state_dir: Path,
    model_name: str,
    flow_run_id: str,
    *,
    detail: str = "",
    now: datetime | None = None,
) -> list[str]:
    """Mark the 'running' claims of a crashed or cancelled flow run as failed.

    Returns the incidents released (they may be retried; no cool-down starts).
    """
    now = now or datetime.now(UTC)
    path = state_path(state_dir, model_name)
    released = []
    with _locked(path):
        state = _load(path, model_name)
        for incident, record in state.incidents.items():
            if record.status == "running" and record.flow_run_id == flow_run_id:
                state.incidents[incident] = record.model_copy(
                    update={"status": "failed", "finished_at": now, "detail": detail}
                )
                released.append(incident)
        if released:
            _save(path, state)
    return released


def record_skip(state_dir: Path, model_name: str, skip: SkipRecord) -> None:
    """Append a skip decided elsewhere (e.g. a run cancelled before it could claim)."""
    path = state_path(state_dir, model_name)
    with _locked(path):
        state = _load(path, model_name)
        state.skips.append(skip)
        _save(path, state)


def skip_markdown(
    model_name: str, incident_id: str | None, decision: Decision, **context: object
) -> str:
    """The markdown artifact of a skipped retrain."""
    lines = [
        f"# Retrain of `{model_name}` skipped",
        "",
        f"**Reason ({decision.code}):** {decision.reason}",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| incident | `{incident_id or '-'}` |",
    ]
    lines += [f"| {k} | `{v}` |" for k, v in context.items() if v is not None]
    return "\n".join(lines) + "\n"


# -- where the latest monitor verdict comes from ---------------------------------------


def monitor_state_path(state_dir: Path, model_name: str) -> Path:
    """Where the monitor keeps its state (``driftloop.monitoring.state_path``).

    Repeated here so that a retrain without a monitor state file skips importing
    the monitor (seconds of scipy); tests/unit/test_hygiene.py keeps both in step.
    """
    return Path(state_dir) / "monitor" / f"{model_name}.json"


def monitor_verdict_from_state(state_dir: Path, model_name: str) -> MonitorVerdict | None:
    """The last verdict in the monitor's state file (``driftloop.monitoring``), if any."""
    path = monitor_state_path(state_dir, model_name)
    if not path.exists():
        return None
    from driftloop import monitoring

    state = monitoring.load_state(Path(state_dir), model_name)
    if state.last_verdict is None or state.updated_at is None:
        return None
    return MonitorVerdict(
        verdict=state.last_verdict, at=state.updated_at, source=f"monitor state {path}"
    )


def monitor_verdict_from_events(
    api_url: str,
    model_name: str,
    *,
    lookback: timedelta = timedelta(days=2),
    now: datetime | None = None,
) -> MonitorVerdict | None:
    """The newest monitor verdict for ``model_name`` in the Prefect event log.

    Looks at ``driftloop.monitor.completed`` (its ``verdict``) and
    ``driftloop.data_quality.failed`` (a ``quality_failed`` verdict) events of the
    model's resource within ``lookback``; the newest wins.
    """
    from driftloop import events

    now = now or datetime.now(UTC)
    found = events.read_events(
        api_url,
        names=[events.EventName.MONITOR_COMPLETED, events.EventName.DATA_QUALITY_FAILED],
        resource_id=events.model_resource_id(model_name),
        since=now - lookback,
    )
    if not found:
        return None
    last = max(found, key=lambda e: e.occurred)
    if last.event == events.EventName.DATA_QUALITY_FAILED:
        checks = last.payload.get("failed_checks") or []
        return MonitorVerdict(
            verdict="quality_failed",
            at=last.occurred,
            source=f"event {last.event} {last.id}",
            detail=", ".join(str(c) for c in checks),
        )
    return MonitorVerdict(
        verdict=str(last.payload.get("verdict", "ok")),
        at=last.occurred,
        source=f"event {last.event} {last.id}",
    )


def latest_monitor_verdict(
    api_url: str | None,
    model_name: str,
    *,
    state_dir: Path | None = None,
    lookback: timedelta = timedelta(days=2),
    now: datetime | None = None,
) -> MonitorVerdict | None:
    """The newest monitor verdict: from the monitor's state file and from its events.

    The state file (``<state_dir>/monitor/<model>.json``) is there when the monitor
    runs on this machine; the events are there wherever it runs. The newer wins;
    None when neither has one.
    """
    found = [
        v
        for v in (
            monitor_verdict_from_state(state_dir, model_name) if state_dir is not None else None,
            monitor_verdict_from_events(api_url, model_name, lookback=lookback, now=now)
            if api_url
            else None,
        )
        if v is not None
    ]
    return max(found, key=lambda v: v.at) if found else None
