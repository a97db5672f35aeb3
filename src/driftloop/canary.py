"""The I/O side of a canary rollout: evidence, the persisted rollout, and carrying out actions.

:mod:`driftloop.rollout` decides (pure); this module measures and acts:

- **Evidence** (:func:`measure`): per arm, what the router saw since the current
  step began: requests, errors and fallbacks, latency p99, score histogram and
  decisions, paired decisions of mirrored traffic (the router's counter files,
  :mod:`driftloop.routing`, minus the snapshot taken when the step began), plus
  labelled tp/fp/fn from the prediction log joined with late labels
  (:func:`labelled_counts`). Both arms are measured on the same window, from the
  same vantage point, the client's: the prediction log holds only successes,
  reaches Delta a few seconds late and its ``latency_ms`` misses queueing, so it
  is used for what only it has, the labels.
- **The rollout record** (:class:`RolloutStore`): the state machine's
  :class:`~driftloop.rollout.RolloutState` plus the evidence baseline, in
  ``<state_dir>/rollout/<model>.json``, changed only under a file lock, so the
  flow and a human at the CLI can act on the same rollout.
- **The runner** (:class:`RolloutRunner`): starts a rollout (champion first if
  none runs, with a ``baseline`` ledger entry), ticks it (heal arms, measure,
  analyse, advance) and carries out every decision the same way whoever made it:
  the plane applies the actions, the ledger records each transition, the events
  go to Prefect.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from driftloop.errors import DriftloopError, EventError, RolloutError
from driftloop.ledger import Ledger, LedgerEntry
from driftloop.plane.base import (
    ServingPlane,
    arm_name_for,
    file_lock,
    write_atomic,
)
from driftloop.rollout import (
    ACTOR_HUMAN,
    ACTOR_SYSTEM,
    Action,
    Analysis,
    ArmRef,
    ArmStats,
    DeployArm,
    Emit,
    Phase,
    Role,
    RolloutPolicy,
    RolloutState,
    abort,
    advance,
    analyse,
    promote,
    rollback,
    set_weights,
    start_rollout,
)
from driftloop.routing import (
    WARMUP_REQUESTS,
    ArmCounters,
    Counters,
    RouterSnapshot,
    coarsen,
    stats_dir,
    version_of,
    window,
)
from driftloop.settings import Settings

log = logging.getLogger(__name__)

#: analysis interval when none is given (no setting yet): a breach is acted on within it
DEFAULT_ANALYSIS_INTERVAL_SECONDS = 10.0
#: consecutive failed readiness checks before a live arm is restarted
UNREADY_TICKS = 3
#: arm names are recorded in every prediction (Settings.arm allows 32 characters)
MAX_ARM_NAME = 32


def arm_name(model_name: str, bento_tag: str) -> str:
    """The arm serving ``bento_tag``: ``<model>-<version>``, a DNS-1123 label that fits
    ``DRIFTLOOP_ARM``; long ones are cut and keep a hash of the tag to stay distinct."""
    name = arm_name_for(version_of(bento_tag), prefix=model_name)
    if len(name) <= MAX_ARM_NAME:
        return name
    digest = hashlib.blake2b(bento_tag.encode(), digest_size=4).hexdigest()
    return f"{name[: MAX_ARM_NAME - 9].rstrip('-')}-{digest}"


# --------------------------------------------------------------------------------------
# options and the persisted record
# --------------------------------------------------------------------------------------


class RolloutOptions(BaseModel):
    """How the rollout flow runs (its parameter; the policy decides, these pace)."""

    model_config = ConfigDict(extra="forbid")

    analysis_interval_seconds: float = Field(
        default=DEFAULT_ANALYSIS_INTERVAL_SECONDS,
        gt=0,
        le=3600,
        description="Seconds between analyses; a breach is rolled back within one interval.",
    )
    policy: RolloutPolicy | None = Field(
        default=None, description="The canary policy; default: from DRIFTLOOP_ROLLOUT_* settings."
    )
    canary_env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment of the canary arm (e.g. DRIFTLOOP_FAULT_* in a drill).",
    )
    warmup_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        le=600,
        description="How long a new canary may be warmed with mirrored traffic before it "
        "takes any (it stops early once warm).",
    )
    arm_ready_timeout_seconds: float = Field(
        default=180.0,
        gt=0,
        le=3600,
        description="How long a new arm may take to answer /readyz (a busy machine is slow).",
    )

    def resolve_policy(self, settings: Settings) -> RolloutPolicy:
        return self.policy or RolloutPolicy.from_settings(settings)


def time_bound_seconds(policy: RolloutPolicy, interval: float) -> float:
    """The longest a rollout can legitimately take: every step waits at most its bake
    or its evidence deadline, then the guard; plus slack for slow ticks."""
    per_step = max(policy.bake_seconds, policy.evidence_deadline_seconds) + 2 * interval
    steps = len(policy.canary_steps) + (1 if policy.shadow_first else 0)
    return steps * per_step + policy.post_promotion_guard_seconds + 2 * interval + 120.0


class RolloutRecord(BaseModel):
    """One model's current rollout, as persisted: the state plus what the runner needs."""

    model_config = ConfigDict(extra="forbid")

    state: RolloutState
    challenger: ArmRef = Field(description="The arm this rollout started for.")
    model_tag: str | None = None
    canary_env: dict[str, str] = Field(default_factory=dict)
    analysis_interval_seconds: float = DEFAULT_ANALYSIS_INTERVAL_SECONDS
    deadline: AwareDatetime = Field(description="Past this, a still undecided rollout aborts.")
    window_started_at: AwareDatetime
    baseline: Counters = Field(
        default_factory=dict, description="Router counters when the window began."
    )
    last_analysis: dict[str, Any] | None = None
    last_analysed_at: AwareDatetime | None = None

    def arm_tags(self) -> dict[str, str]:
        """Every arm this rollout knows of: name -> bento tag."""
        out = {self.challenger.name: self.challenger.bento_tag}
        s = self.state
        for ref in (s.previous_champion, s.standby, s.canary, s.champion):
            if ref is not None:
                out[ref.name] = ref.bento_tag
        return out


class RolloutStore:
    """``<state_dir>/rollout/<model>.json``, replaced atomically, changed under a lock."""

    def __init__(self, state_dir: Path, model_name: str) -> None:
        root = Path(state_dir).resolve() / "rollout"
        self.path = root / f"{model_name}.json"
        self._lock = root / f"{model_name}.lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with file_lock(self._lock):
            yield

    def load(self) -> RolloutRecord | None:
        try:
            return RolloutRecord.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise RolloutError(f"rollout record {self.path} is unreadable: {exc}") from exc

    def save(self, record: RolloutRecord) -> None:
        write_atomic(self.path, record.model_dump_json(indent=1))


# --------------------------------------------------------------------------------------
# evidence
# --------------------------------------------------------------------------------------


def read_counters(state_dir: Path, model_name: str) -> Counters:
    """The counters of every router process of ``model_name`` (unreadable files skipped)."""
    directory = stats_dir(state_dir, model_name)
    out: Counters = {}
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        try:
            snap = RouterSnapshot.model_validate_json(path.read_bytes())
        except (OSError, ValueError):
            continue
        out[snap.instance] = snap.arms
    return out


def labelled_counts(
    settings: Settings, start: datetime, end: datetime, arms: Sequence[str]
) -> dict[str, tuple[int, int, int]]:
    """(tp, fp, fn) per arm over predictions received in ``[start, end)`` whose label
    has arrived (joined on request id)."""
    import polars as pl

    from driftloop import predlog

    if end <= start or not arms:
        return {}
    frame = predlog.read_predictions(
        settings, start, end, model_name=settings.model_name, with_labels=True
    )
    frame = frame.filter(pl.col("arm").is_in(list(arms)) & pl.col("label").is_not_null())
    if frame.is_empty():
        return {}
    agg = frame.group_by("arm").agg(
        tp=((pl.col("decision") == 1) & (pl.col("label") == 1)).sum(),
        fp=((pl.col("decision") == 1) & (pl.col("label") == 0)).sum(),
        fn=((pl.col("decision") == 0) & (pl.col("label") == 1)).sum(),
    )
    return {r["arm"]: (int(r["tp"]), int(r["fp"]), int(r["fn"])) for r in agg.iter_rows(named=True)}


def arm_stats(
    counters: ArmCounters | None,
    labels: tuple[int, int, int] | None = None,
    score_histogram: list[int] | None = None,
) -> ArmStats:
    """The state machine's view of one arm's window."""
    c = counters or ArmCounters()
    tp, fp, fn = labels or (0, 0, 0)
    return ArmStats(
        requests=c.requests,
        errors=min(c.failed, c.requests),
        p99_ms=c.latency_quantile_ms(0.99),
        score_histogram=[float(x) for x in score_histogram] if score_histogram else None,
        decisions=c.decisions,
        positive_decisions=c.positives,
        paired=c.paired,
        paired_agreements=c.agreements,
        tp=tp,
        fp=fp,
        fn=fn,
    )


def compared_arms(state: RolloutState) -> tuple[str, str] | None:
    """(reference, judged) arms of the current phase: champion vs canary (or shadow),
    or after a promotion the warm old champion vs the new champion."""
    if state.phase in (Phase.SHADOW, Phase.CANARY) and state.canary is not None:
        return state.champion.name, state.canary.name
    if state.phase is Phase.PROMOTED and state.standby is not None:
        return state.standby.name, state.champion.name
    return None


def measure(
    settings: Settings,
    policy: RolloutPolicy,
    reference: str,
    judged: str,
    counters: Mapping[str, ArmCounters],
    window_start: datetime,
    now: datetime,
) -> tuple[ArmStats, ArmStats]:
    """ArmStats of the reference and the judged arm over one window."""
    ref, jud = counters.get(reference), counters.get(judged)
    ref_hist, jud_hist = coarsen(
        (ref or ArmCounters()).scores, (jud or ArmCounters()).scores, policy.score_bins
    )
    labels: dict[str, tuple[int, int, int]] = {}
    if policy.max_precision_drop is not None or policy.max_recall_drop is not None:
        try:
            labels = labelled_counts(settings, window_start, now, [reference, judged])
        except Exception as exc:  # labels are optional evidence (Delta/polars raise their own)
            log.warning("labelled outcomes unavailable: %s", exc)
    return (
        arm_stats(ref, labels.get(reference), ref_hist),
        arm_stats(jud, labels.get(judged), jud_hist),
    )


# --------------------------------------------------------------------------------------
# events
# --------------------------------------------------------------------------------------

_EVENT_OF = {
    "started": "driftloop.rollout.started",
    "stepped": "driftloop.rollout.stepped",
    "promoted": "driftloop.rollout.promoted",
    "rolled_back": "driftloop.rollout.rolled_back",
    # not enough evidence: the canary is reverted like a rollback; the payload says why
    "aborted": "driftloop.rollout.rolled_back",
}


def event_for(record: RolloutRecord, emit: Emit) -> tuple[str, dict[str, Any]] | None:
    """The driftloop event (name, payload) of a state-machine Emit; None for those that
    only go to the ledger (``completed``: the post-promotion guard ended)."""
    outcome = emit.event.rsplit(".", 1)[-1]
    name = _EVENT_OF.get(outcome)
    if name is None:
        return None
    p = emit.payload
    tags = record.arm_tags()
    payload: dict[str, Any] = {
        "model_name": p["model_name"],
        "incident_id": p.get("incident_id"),
        "champion_tag": p["champion"],
        "canary_tag": record.challenger.bento_tag,
        "weights": {tags.get(arm, arm): int(w) for arm, w in p["weights"].items()},
        "step": max(int(p["step"]), 0),
        "verdict": p.get("verdict"),
        "reason": p.get("reason"),
        "outcome": outcome,
        "phase": p.get("phase"),
        "actor": p.get("actor"),
        "canary_percent": p.get("canary_percent"),
        "model_tag": record.model_tag,
        "analysis": p.get("analysis"),
    }
    return name, payload


# --------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


class RolloutRunner:
    """Starts, ticks and steers the rollout of one model on one serving plane."""

    def __init__(
        self,
        settings: Settings,
        plane: ServingPlane,
        *,
        api_url: str | None = None,
        ledger: Ledger | None = None,
        clock: Callable[[], datetime] = _now,
        record_stages: bool = True,
    ) -> None:
        self.settings = settings
        self.plane = plane
        self.model = plane.model_name
        self.api_url = api_url
        self.ledger = ledger or Ledger.for_settings(settings)
        self.store = RolloutStore(settings.state_dir, self.model)
        self.clock = clock
        self.record_stages = record_stages  # registry stage labels follow what serves
        self._unready: dict[str, int] = {}

    # -- the champion -----------------------------------------------------------------
    def champion(self) -> ArmRef | None:
        desired = self.plane.desired()
        name = desired.champion()
        return ArmRef(name=name, bento_tag=desired.arms[name].bento_tag) if name else None

    def ensure_champion(self, bento_tag: str | None = None, *, actor: str = ACTOR_SYSTEM) -> ArmRef:
        """The serving champion; if none is deployed, deploy ``bento_tag`` (default: the
        last known good from the ledger, else the registry's champion) at 100 % and
        record it in the ledger as the ``baseline``."""
        current = self.champion()
        if current is not None:
            self.heal()
            return current
        tag = bento_tag or self._known_good_bento()
        arm = arm_name(self.model, tag)
        self.plane.deploy(arm, tag, role=Role.CHAMPION)
        self.plane.set_weights({arm: 100}, shadow=[])
        self.plane.set_phase("steady")
        self.ledger.append(
            LedgerEntry(
                model_name=self.model,
                action="baseline",
                phase="steady",
                champion_arm=arm,
                champion_tag=tag,
                arms={arm: tag},
                weights={arm: 100},
                reason="first champion deployed",
                actor=actor,
            )
        )
        return ArmRef(name=arm, bento_tag=tag)

    def _known_good_bento(self) -> str:
        entry = self.ledger.last_known_good(self.model)
        if entry is not None and entry.champion_tag:
            return entry.champion_tag
        from driftloop import registry

        champions = [m for m in registry.list_models(self.model) if m.stage == "champion"]
        if not champions:
            raise RolloutError(f"no champion of {self.model} to serve: train one first")
        return bento_for_model(champions[-1].tag)

    def heal(self) -> list[str]:
        """Restart arms whose process is gone, or that failed their readiness check
        :data:`UNREADY_TICKS` times in a row (a busy arm may miss one); returns them."""
        sick: list[str] = []
        for name, h in self.plane.health().items():
            if h.ready:
                self._unready.pop(name, None)
                continue
            self._unready[name] = self._unready.get(name, 0) + 1
            if not h.alive or self._unready[name] >= UNREADY_TICKS:
                sick.append(name)
        if sick:
            log.warning("arms %s are down; reconciling the plane", sick)
            self.plane.reconcile()
            for name in sick:
                self._unready.pop(name, None)
        return sick

    # -- one rollout ------------------------------------------------------------------
    def begin(
        self,
        model_tag: str | None,
        bento_tag: str,
        *,
        incident_id: str | None = None,
        policy: RolloutPolicy,
        analysis_interval_seconds: float = DEFAULT_ANALYSIS_INTERVAL_SECONDS,
        canary_env: Mapping[str, str] | None = None,
        warmup_timeout_seconds: float = 30.0,
    ) -> RolloutRecord:
        """Deploy ``bento_tag`` as the canary, let the router warm it up with mirrored
        requests (up to ``warmup_timeout_seconds``), and start stepping it (or shadowing).

        A rollout of the same Bento already under way is resumed. One of another Bento
        still stepping is aborted (superseded); one in its post-promotion guard is
        ticked until the guard ends first.
        """
        self._settle_previous(bento_tag, analysis_interval_seconds)
        with self.store.locked():
            existing = self.store.load()
            if existing is not None and not existing.state.terminal:  # same challenger
                if existing.state.phase is Phase.PENDING:  # its deploy was interrupted
                    return self._start_pending(existing, warmup_timeout_seconds)
                return existing
            champion = self.ensure_champion()
            canary = ArmRef(name=arm_name(self.model, bento_tag), bento_tag=bento_tag)
            if canary.name == champion.name:
                raise RolloutError(f"{bento_tag} is already the champion of {self.model}")
            now = self.clock()
            state, actions = start_rollout(
                policy,
                model_name=self.model,
                champion=champion,
                canary=canary,
                now=now,
                incident_id=incident_id,
            )
            bound = time_bound_seconds(policy, analysis_interval_seconds)
            record = RolloutRecord(
                state=state,
                challenger=canary,
                model_tag=model_tag,
                canary_env=dict(canary_env or {}),
                analysis_interval_seconds=analysis_interval_seconds,
                deadline=now + timedelta(seconds=bound),
                window_started_at=now,
            )
            self.store.save(record)
            return self._start_pending(record, warmup_timeout_seconds, actions)

    def _start_pending(
        self,
        record: RolloutRecord,
        warmup_timeout_seconds: float,
        actions: Sequence[Action] | None = None,
    ) -> RolloutRecord:
        """Deploy the canary of a PENDING rollout, wait for it to be warm, start it."""
        state, canary = record.state, record.challenger
        if actions is None:
            role = Role.SHADOW if state.policy.shadow_first else Role.CANARY
            actions = [DeployArm(arm=canary.name, bento_tag=canary.bento_tag, role=role)]
        before = self.answered(canary.name)
        try:
            self.plane.apply(actions, env=record.canary_env)
        except DriftloopError as exc:
            log.error("canary %s did not start: %s", canary.bento_tag, exc)
            new, more = abort(state, self.clock(), reason=f"canary did not start: {exc}")
            return self._execute(record, new, more)
        deadline = time.monotonic() + warmup_timeout_seconds
        while self.answered(canary.name) - before < WARMUP_REQUESTS:
            if time.monotonic() >= deadline:
                log.warning("canary %s is not warm (little traffic); going on", canary.bento_tag)
                break
            time.sleep(0.25)
        now = self.clock()
        bound = time_bound_seconds(state.policy, record.analysis_interval_seconds)
        record = record.model_copy(update={"deadline": now + timedelta(seconds=bound)})
        new, more = advance(state, None, now)
        return self._execute(record, new, more)

    def answered(self, arm: str) -> int:
        """Requests ``arm`` has answered through the routers so far (all instances)."""
        counters = read_counters(self.settings.state_dir, self.model)
        return sum(arms[arm].requests for arms in counters.values() if arm in arms)

    def _settle_previous(self, bento_tag: str, interval: float) -> None:
        with self.store.locked():
            existing = self.store.load()
            if existing is None or existing.state.terminal:
                return
            if existing.challenger.bento_tag == bento_tag:
                return
            if existing.state.phase is not Phase.PROMOTED:
                new, actions = abort(
                    existing.state, self.clock(), reason=f"superseded by {bento_tag}"
                )
                self._execute(existing, new, actions)
                return
        # in its post-promotion guard: finish it (the guard is bounded)
        record: RolloutRecord | None = existing
        while record is not None and not record.state.terminal:
            time.sleep(min(interval, 5.0))
            record = self.tick()

    def tick(self) -> RolloutRecord | None:
        """One analysis: heal the arms, measure the window, analyse, advance, act."""
        with self.store.locked():
            record = self.store.load()
            if record is None or record.state.terminal:
                return record
            self.heal()
            now = self.clock()
            analysis = self.analyse(record, now)
            new, actions = advance(record.state, analysis, now)
            if (
                not new.terminal
                and now >= record.deadline
                and new.phase in (Phase.PENDING, Phase.SHADOW, Phase.CANARY)
            ):
                why = analysis.reason if analysis else "no analysis"
                new, more = abort(new, now, reason=f"rollout time bound passed: {why}")
                actions = [*actions, *more]
            return self._execute(record, new, actions, analysis=analysis, analysed_at=now)

    def analyse(self, record: RolloutRecord, now: datetime) -> Analysis | None:
        arms = compared_arms(record.state)
        if arms is None:
            return None
        counters = window(read_counters(self.settings.state_dir, self.model), record.baseline)
        reference, judged = measure(
            self.settings,
            record.state.policy,
            arms[0],
            arms[1],
            counters,
            record.window_started_at,
            now,
        )
        return analyse(record.state.policy, reference, judged)

    def fail_safe(self, reason: str) -> RolloutRecord | None:
        """Revert a canary nobody will watch any more (its flow failed): champion at 100 %."""
        with self.store.locked():
            record = self.store.load()
            if record is None or record.state.phase not in (
                Phase.PENDING,
                Phase.SHADOW,
                Phase.CANARY,
            ):
                return record
            new, actions = abort(record.state, self.clock(), reason=reason)
            return self._execute(record, new, actions)

    # -- by hand ----------------------------------------------------------------------
    def manual(
        self,
        action: Literal["promote", "rollback", "weights"],
        *,
        weights: Mapping[str, int] | None = None,
        reason: str | None = None,
        actor: str = ACTOR_HUMAN,
    ) -> RolloutRecord:
        """The same transitions as the flow's, recorded with ``actor`` (human)."""
        with self.store.locked():
            record = self.store.load()
            if record is None:
                raise RolloutError(f"no rollout of {self.model} is recorded")
            state, now = record.state, self.clock()
            if action == "promote":
                new, actions = promote(state, now, actor=actor, reason=reason or "manual promote")
            elif action == "rollback":
                target = None
                if state.phase is Phase.PROMOTED and state.standby is None:
                    good = self.ledger.last_known_good(
                        self.model, exclude_tag=state.champion.bento_tag
                    )
                    if good is None or not good.champion_tag:
                        raise RolloutError("no last known good champion in the ledger")
                    target = ArmRef(
                        name=arm_name(self.model, good.champion_tag), bento_tag=good.champion_tag
                    )
                new, actions = rollback(
                    state, now, actor=actor, reason=reason or "manual rollback", target=target
                )
            else:
                resolved = self._resolve_weights(state, weights or {})
                new, actions = set_weights(
                    state, resolved, now, actor=actor, reason=reason or "manual weights"
                )
            return self._execute(record, new, actions)

    @staticmethod
    def _resolve_weights(state: RolloutState, weights: Mapping[str, int]) -> dict[str, int]:
        """Accept role names (champion, canary) as well as arm names."""
        alias = {"champion": state.champion.name}
        if state.canary is not None:
            alias["canary"] = state.canary.name
        return {alias.get(k, k): int(v) for k, v in weights.items()}

    # -- carrying out a decision ------------------------------------------------------
    def _execute(
        self,
        record: RolloutRecord,
        new: RolloutState,
        actions: Sequence[Action],
        *,
        analysis: Analysis | None = None,
        analysed_at: datetime | None = None,
    ) -> RolloutRecord:
        emits = self.plane.apply(actions, env=record.canary_env) if actions else []
        for transition in new.history[len(record.state.history) :]:
            self.ledger.append_transition(new, transition)
            if self.record_stages:
                self._record_stages(record, new, transition.event, transition.from_phase)
        changes: dict[str, Any] = {"state": new}
        if analysis is not None:
            changes["last_analysis"] = analysis.summary()
            changes["last_analysed_at"] = analysed_at
        old = record.state
        if (new.phase, new.step_index, new.step_started_at) != (
            old.phase,
            old.step_index,
            old.step_started_at,
        ):  # a new step (or phase): a new window, judged on what happens from now on
            changes["window_started_at"] = new.step_started_at
            changes["baseline"] = read_counters(self.settings.state_dir, self.model)
        record = record.model_copy(update=changes)
        self.store.save(record)
        for emit in emits:
            if isinstance(emit, Emit):
                self._emit(record, emit)
        return record

    def _record_stages(
        self, record: RolloutRecord, new: RolloutState, event: str, from_phase: Phase
    ) -> None:
        """Keep the registry's stage labels in step with what serves (best effort)."""
        outcome = event.rsplit(".", 1)[-1]
        changes: list[tuple[str, str]] = []  # (bento tag, stage)
        if outcome == "promoted":
            changes.append((new.champion.bento_tag, "champion"))
        elif outcome == "completed" and record.state.standby is not None:
            changes.append((record.state.standby.bento_tag, "retired"))
        elif outcome == "rolled_back" and from_phase is Phase.PROMOTED:
            changes += [
                (new.champion.bento_tag, "champion"),
                (record.state.champion.bento_tag, "rejected"),
            ]
        elif outcome == "rolled_back":
            changes.append((record.challenger.bento_tag, "rejected"))
        for bento_tag, stage in changes:
            try:
                from driftloop import registry
                from driftloop.bento import model_tag_of_bento

                if bento_tag == record.challenger.bento_tag and record.model_tag:
                    model_tag = record.model_tag
                else:
                    model_tag = model_tag_of_bento(bento_tag)
                registry.set_stage(model_tag, stage)
            except Exception as exc:  # BentoML raises several types; the stage is a label
                log.warning("could not mark %s as %s: %s", bento_tag, stage, exc)

    def _emit(self, record: RolloutRecord, emit: Emit) -> None:
        event = event_for(record, emit)
        if event is None:
            return
        if self.api_url is None:
            log.warning("no Prefect API URL: %s not emitted", event[0])
            return
        from driftloop.events import emit as send

        try:
            send(self.api_url, event[0], event[1])
        except EventError as exc:  # the decision is already carried out and recorded
            log.error("could not emit %s: %s", event[0], exc)


def bento_for_model(model_tag: str) -> str:
    """The Bento serving ``model_tag``: an existing one (by its model_tag label) or a new build."""
    import bentoml

    from driftloop.bento import MODEL_TAG_LABEL, build_model_bento

    for bento in bentoml.list():
        if bento.info.labels.get(MODEL_TAG_LABEL) == model_tag:
            return str(bento.tag)
    return build_model_bento(model_tag)


# --------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------


class ArmStatusRow(BaseModel):
    name: str
    role: str
    bento_tag: str
    weight: int
    shadow: bool
    endpoint: str | None
    status: str


class StatusReport(BaseModel):
    """What ``driftloop status`` shows."""

    model_name: str
    phase: str
    incident_id: str | None
    arms: list[ArmStatusRow]
    rollout: dict[str, Any] | None = None
    last_incident: dict[str, Any] | None = None
    last_entry: dict[str, Any] | None = None


def status_report(runner: RolloutRunner, *, check_health: bool = True) -> StatusReport:
    desired = runner.plane.desired()
    health = runner.plane.health() if check_health else {}
    rows = [
        ArmStatusRow(
            name=name,
            role=spec.role.value,
            bento_tag=spec.bento_tag,
            weight=desired.weights.get(name, 0),
            shadow=name in desired.shadow,
            endpoint=spec.endpoint,
            status=health[name].status.value if name in health else "unknown",
        )
        for name, spec in desired.arms.items()
    ]
    record = runner.store.load()
    rollout_info = None
    if record is not None:
        s = record.state
        rollout_info = {
            "phase": s.phase.value,
            "challenger": record.challenger.bento_tag,
            "model_tag": record.model_tag,
            "step": s.step_index,
            "steps": s.policy.steps,
            "canary_percent": s.canary_percent,
            "started_at": s.started_at.isoformat(),
            "step_started_at": s.step_started_at.isoformat(),
            "incident_id": s.incident_id,
            "last_analysis": record.last_analysis,
            "last_transition": s.history[-1].reason if s.history else None,
        }
    entries = runner.ledger.entries(model_name=runner.model)
    incident = next((e for e in reversed(entries) if e.incident_id), None)
    return StatusReport(
        model_name=runner.model,
        phase=desired.phase,
        incident_id=desired.incident_id,
        arms=rows,
        rollout=rollout_info,
        last_incident=None
        if incident is None
        else {
            "incident_id": incident.incident_id,
            "action": incident.action,
            "at": incident.timestamp.isoformat(),
            "reason": incident.reason,
            "actor": incident.actor,
        },
        last_entry=entries[-1].model_dump(mode="json", exclude={"analysis"}) if entries else None,
    )
