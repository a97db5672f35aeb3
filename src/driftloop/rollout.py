"""The rollout state machine and the analysis of a canary against its champion.

Pure domain code: no I/O, no clock. The caller passes ``now`` and the measured
:class:`ArmStats`; it gets back a new :class:`RolloutState` and a list of
*actions* (data) to carry out in order: deploy or retire an arm, set weights and
roles, emit an event. The serving plane executes the arm actions
(:meth:`driftloop.plane.base.ServingPlane.apply`); the flow emits the events and
appends the ledger.

Lifecycle::

    start_rollout ─▶ PENDING ──advance──▶ SHADOW (shadow_first) ──PASS+bake──▶ CANARY step 0
                                     └──▶ CANARY step 0 ──PASS+bake──▶ step 1 ... ──▶ PROMOTED
    SHADOW/CANARY ──FAIL (any time)────────────────────▶ ROLLED_BACK (champion 100, canary retired)
    SHADOW/CANARY ──INSUFFICIENT past evidence deadline──▶ ABORTED   (champion 100, canary retired)
    PROMOTED (old champion warm) ──FAIL before guard end──▶ ROLLED_BACK (old champion 100)
    PROMOTED (old champion warm) ──guard over──▶ PROMOTED, old champion retired ("completed")

Steps below 100 are canary steps; reaching 100 *is* the promotion (at 100 % the
champion gets no traffic, so nothing is left to compare against). The seed rule
"5 % for 10 minutes, promote if the error rate stays below 1 %" is
``RolloutPolicy(steps=[5, 100], bake_seconds=600, max_error_rate=0.01)``.
A rollout never promotes without evidence: INSUFFICIENT only waits, and past the
deadline it aborts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from driftloop.errors import RolloutError

if TYPE_CHECKING:
    from driftloop.settings import Settings

# --------------------------------------------------------------------------------------
# vocabulary
# --------------------------------------------------------------------------------------


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INSUFFICIENT = "insufficient"


class Phase(StrEnum):
    PENDING = "pending"
    SHADOW = "shadow"
    CANARY = "canary"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


class Role(StrEnum):
    """The role of a serving arm (shared with the serving plane and the router)."""

    CHAMPION = "champion"
    CANARY = "canary"
    SHADOW = "shadow"  # receives mirrored traffic, its answers are discarded
    STANDBY = "standby"  # old champion kept warm during the post-promotion guard


CheckName = Literal[
    "error_rate",
    "p99_ratio",
    "score_distance",
    "decision_agreement",
    "precision_drop",
    "recall_drop",
]

#: event names emitted by the state machine (resource ``driftloop.model.<name>``)
EVENT_STARTED = "driftloop.rollout.started"
EVENT_STEPPED = "driftloop.rollout.stepped"
EVENT_PROMOTED = "driftloop.rollout.promoted"
EVENT_ROLLED_BACK = "driftloop.rollout.rolled_back"
EVENT_ABORTED = "driftloop.rollout.aborted"
EVENT_COMPLETED = "driftloop.rollout.completed"

_DEFAULT_REQUIRED: frozenset[CheckName] = frozenset({"error_rate"})

ACTOR_SYSTEM = "system"
ACTOR_HUMAN = "human"

_THRESHOLD_OF: dict[CheckName, str] = {
    "error_rate": "max_error_rate",
    "p99_ratio": "max_p99_ratio",
    "score_distance": "max_score_distance",
    "decision_agreement": "min_decision_agreement",
    "precision_drop": "max_precision_drop",
    "recall_drop": "max_recall_drop",
}


# --------------------------------------------------------------------------------------
# policy
# --------------------------------------------------------------------------------------


class RolloutPolicy(BaseModel):
    """How a canary is stepped up and judged. A threshold of ``None`` disables its check."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: list[int] = Field(
        default_factory=lambda: [5, 25, 50, 100],
        description="Canary traffic percentages; strictly increasing, ending at 100 (= promote).",
    )
    bake_seconds: float = Field(
        default=60.0, ge=0, description="Minimum time on a step before moving on."
    )
    min_samples: int = Field(default=200, ge=1, description="Requests needed on each arm to judge.")
    evidence_deadline_seconds: float = Field(
        default=900.0, gt=0, description="A step without enough evidence after this long aborts."
    )
    shadow_first: bool = Field(
        default=False, description="Mirror traffic to the canary before any step."
    )

    max_error_rate: float | None = Field(
        default=0.01, ge=0, le=1, description="Absolute canary error rate above which it fails."
    )
    max_p99_ratio: float | None = Field(
        default=1.5, gt=0, description="Canary p99 / champion p99 above which it fails."
    )
    p99_floor_ms: float = Field(
        default=5.0,
        ge=0,
        description="Champion p99 below this is taken as this (ratios of tiny numbers).",
    )
    score_distance: Literal["psi", "ks"] = "psi"
    max_score_distance: float | None = Field(
        default=0.25,
        gt=0,
        description="PSI (or KS statistic) between the arms' score distributions.",
    )
    score_bins: int = Field(default=10, ge=2, le=100, description="Quantile bins for the PSI.")
    min_decision_agreement: float | None = Field(
        default=0.9,
        ge=0,
        le=1,
        description="Share of identical decisions (paired, or its upper bound).",
    )
    max_precision_drop: float | None = Field(default=0.02, ge=0, le=1)
    max_recall_drop: float | None = Field(default=0.02, ge=0, le=1)
    drop_mode: Literal["absolute", "relative"] = Field(
        default="absolute",
        description="absolute: drop in points (0.02 = 2 points); relative: share of champion's.",
    )
    min_labelled: int = Field(
        default=30,
        ge=1,
        description="Labelled positives per arm (tp+fp, tp+fn) to judge precision/recall.",
    )
    required_checks: frozenset[CheckName] = Field(
        default=_DEFAULT_REQUIRED,
        description="Checks that must be measured for a PASS (others are judged when measurable).",
    )
    post_promotion_guard_seconds: float = Field(
        default=600.0, ge=0, description="The old champion stays warm this long after promotion."
    )

    @field_validator("steps")
    @classmethod
    def _steps_increase_to_100(cls, v: list[int]) -> list[int]:
        if not v or any(not 0 < s <= 100 for s in v) or v != sorted(set(v)) or v[-1] != 100:
            raise ValueError("steps must increase strictly within (0, 100] and end at 100")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> RolloutPolicy:
        if len(self.steps) < 2 and not self.shadow_first:
            raise ValueError(
                "a rollout needs at least one canary step below 100 or shadow_first "
                "(it would otherwise promote without evidence)"
            )
        for name in self.required_checks:
            if getattr(self, _THRESHOLD_OF[name]) is None:
                raise ValueError(f"required check {name!r} is disabled (its threshold is None)")
        return self

    @property
    def canary_steps(self) -> list[int]:
        """The partial steps (below 100); the step after the last one is the promotion."""
        return [s for s in self.steps if s < 100]

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RolloutPolicy:
        """The policy from ``DRIFTLOOP_ROLLOUT_*`` settings, plus explicit overrides."""
        values: dict[str, Any] = {
            "steps": list(settings.rollout_steps),
            "bake_seconds": settings.rollout_bake_seconds,
            "min_samples": settings.rollout_min_samples,
        }
        values.update(overrides)
        return cls(**values)


# --------------------------------------------------------------------------------------
# evidence and analysis
# --------------------------------------------------------------------------------------


class ArmStats(BaseModel):
    """What one arm did during the analysis window."""

    model_config = ConfigDict(extra="forbid")

    requests: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    p99_ms: float | None = Field(default=None, ge=0)
    scores: list[float] = Field(default_factory=list, description="A sample of scores.")
    score_histogram: list[float] | None = Field(
        default=None, description="Counts on bins shared by both arms (instead of a sample)."
    )
    decisions: int | None = Field(
        default=None, ge=0, description="Decisions made (default: successes)."
    )
    positive_decisions: int = Field(default=0, ge=0)
    paired: int = Field(
        default=0, ge=0, description="Requests answered by both arms (shadow mode)."
    )
    paired_agreements: int = Field(
        default=0, ge=0, description="Of those, same decision as the champion."
    )
    tp: int = Field(default=0, ge=0)
    fp: int = Field(default=0, ge=0)
    fn: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> ArmStats:
        if self.errors > self.requests:
            raise ValueError("errors cannot exceed requests")
        if self.paired_agreements > self.paired:
            raise ValueError("paired_agreements cannot exceed paired")
        if self.positive_decisions > self.n_decisions:
            raise ValueError("positive_decisions cannot exceed decisions")
        return self

    @property
    def n_decisions(self) -> int:
        return self.decisions if self.decisions is not None else self.requests - self.errors

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def decision_rate(self) -> float | None:
        n = self.n_decisions
        return self.positive_decisions / n if n else None

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None


class Check(BaseModel):
    """One criterion: its measured value, threshold and outcome (``None`` = not measured)."""

    name: CheckName
    value: float | None = None
    threshold: float | None = None
    passed: bool | None = None
    detail: str = ""


class Analysis(BaseModel):
    """The verdict on a canary for one window, with every check behind it."""

    verdict: Verdict
    reason: str
    checks: list[Check] = Field(default_factory=list)
    champion_requests: int = 0
    canary_requests: int = 0

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def summary(self) -> dict[str, Any]:
        """A small JSON-able digest for events and the ledger."""
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "champion_requests": self.champion_requests,
            "canary_requests": self.canary_requests,
            "checks": {
                c.name: (None if c.value is None else round(c.value, 6)) for c in self.checks
            },
            "failed": [c.name for c in self.failed],
        }


_EPS = 1e-4


def _psi_from_counts(expected: np.ndarray, actual: np.ndarray) -> float:
    e = expected / max(expected.sum(), 1.0)
    a = actual / max(actual.sum(), 1.0)
    e = np.clip(e, _EPS, None)
    a = np.clip(a, _EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def _ks_from_counts(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.cumsum(expected) / max(expected.sum(), 1.0)
    a = np.cumsum(actual) / max(actual.sum(), 1.0)
    return float(np.max(np.abs(e - a)))


def psi(reference: list[float] | np.ndarray, current: list[float] | np.ndarray, bins: int) -> float:
    """Population stability index of ``current`` against quantile bins of ``reference``."""
    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    inner = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_counts = np.bincount(np.searchsorted(inner, ref, side="right"), minlength=len(inner) + 1)
    cur_counts = np.bincount(np.searchsorted(inner, cur, side="right"), minlength=len(inner) + 1)
    return _psi_from_counts(ref_counts.astype(float), cur_counts.astype(float))


def ks_statistic(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic (largest gap between the empirical CDFs)."""
    x = np.sort(np.asarray(a, dtype=float))
    y = np.sort(np.asarray(b, dtype=float))
    grid = np.concatenate([x, y])
    cdf_x = np.searchsorted(x, grid, side="right") / len(x)
    cdf_y = np.searchsorted(y, grid, side="right") / len(y)
    return float(np.max(np.abs(cdf_x - cdf_y)))


def _score_distance(
    policy: RolloutPolicy, champion: ArmStats, canary: ArmStats
) -> tuple[float | None, str]:
    if len(champion.scores) >= policy.min_samples and len(canary.scores) >= policy.min_samples:
        if policy.score_distance == "psi":
            return psi(champion.scores, canary.scores, policy.score_bins), "psi on samples"
        return ks_statistic(champion.scores, canary.scores), "ks on samples"
    ch, ca = champion.score_histogram, canary.score_histogram
    if ch is not None and ca is not None:
        if len(ch) != len(ca):
            raise RolloutError("the arms' score histograms have different bins")
        if sum(ch) >= policy.min_samples and sum(ca) >= policy.min_samples:
            e, a = np.asarray(ch, dtype=float), np.asarray(ca, dtype=float)
            if policy.score_distance == "psi":
                return _psi_from_counts(e, a), "psi on histograms"
            return _ks_from_counts(e, a), "ks on binned histograms"
    return None, "not enough scores on both arms"


def _drop(policy: RolloutPolicy, champion: float, canary: float) -> float:
    diff = champion - canary
    if policy.drop_mode == "relative":
        return diff / champion if champion > 0 else 0.0
    return diff


def analyse(policy: RolloutPolicy, champion: ArmStats, canary: ArmStats) -> Analysis:
    """Judge the canary against the champion over one window.

    FAIL as soon as any measured check breaches its threshold (an error budget
    already spent fails before ``min_samples``); INSUFFICIENT while either arm
    has fewer than ``min_samples`` requests or a required check is unmeasured;
    otherwise PASS.
    """
    checks: list[Check] = []
    enough = canary.requests >= policy.min_samples and champion.requests >= policy.min_samples

    # error rate: absolute, on the canary
    if policy.max_error_rate is not None:
        limit = policy.max_error_rate
        rate = canary.error_rate
        if canary.requests >= policy.min_samples:
            checks.append(
                Check(
                    name="error_rate",
                    value=rate,
                    threshold=limit,
                    passed=rate is not None and rate <= limit,
                    detail=f"{canary.errors}/{canary.requests} errors",
                )
            )
        elif canary.errors > limit * policy.min_samples:
            checks.append(
                Check(
                    name="error_rate",
                    value=rate,
                    threshold=limit,
                    passed=False,
                    detail=(
                        f"{canary.errors} errors in {canary.requests} requests already exceed the "
                        f"budget of {limit:g} x {policy.min_samples} requests"
                    ),
                )
            )
        else:
            checks.append(
                Check(name="error_rate", value=rate, threshold=limit, detail="too few requests")
            )

    if enough:
        checks.extend(_comparative_checks(policy, champion, canary))
    else:
        for name in _THRESHOLD_OF:
            if name != "error_rate" and getattr(policy, _THRESHOLD_OF[name]) is not None:
                checks.append(
                    Check(
                        name=name,
                        threshold=getattr(policy, _THRESHOLD_OF[name]),
                        detail="too few requests",
                    )
                )

    counts = dict(champion_requests=champion.requests, canary_requests=canary.requests)
    failed = [c for c in checks if c.passed is False]
    if failed:
        reason = "; ".join(
            f"{c.name} {_fmt(c.value)} breaches {_fmt(c.threshold)} ({c.detail})" for c in failed
        )
        return Analysis(verdict=Verdict.FAIL, reason=reason, checks=checks, **counts)
    if not enough:
        reason = (
            f"not enough evidence: canary {canary.requests}/{policy.min_samples}, "
            f"champion {champion.requests}/{policy.min_samples} requests"
        )
        return Analysis(verdict=Verdict.INSUFFICIENT, reason=reason, checks=checks, **counts)
    required = policy.required_checks
    missing = sorted(c.name for c in checks if c.passed is None and c.name in required)
    if missing:
        reason = f"not enough evidence: required checks not measured: {', '.join(missing)}"
        return Analysis(verdict=Verdict.INSUFFICIENT, reason=reason, checks=checks, **counts)
    passed = ", ".join(f"{c.name} {_fmt(c.value)}" for c in checks if c.passed)
    return Analysis(
        verdict=Verdict.PASS, reason=f"all measured checks pass: {passed}", checks=checks, **counts
    )


def _comparative_checks(policy: RolloutPolicy, champion: ArmStats, canary: ArmStats) -> list[Check]:
    out: list[Check] = []
    if policy.max_p99_ratio is not None:
        limit = policy.max_p99_ratio
        if champion.p99_ms is not None and canary.p99_ms is not None:
            ratio = canary.p99_ms / max(champion.p99_ms, policy.p99_floor_ms, 1e-9)
            out.append(
                Check(
                    name="p99_ratio",
                    value=ratio,
                    threshold=limit,
                    passed=ratio <= limit,
                    detail=f"canary {canary.p99_ms:.1f} ms vs champion {champion.p99_ms:.1f} ms",
                )
            )
        else:
            out.append(Check(name="p99_ratio", threshold=limit, detail="p99 not reported"))

    if policy.max_score_distance is not None:
        limit = policy.max_score_distance
        dist, how = _score_distance(policy, champion, canary)
        out.append(
            Check(
                name="score_distance",
                value=dist,
                threshold=limit,
                passed=None if dist is None else dist <= limit,
                detail=how,
            )
        )

    if policy.min_decision_agreement is not None:
        limit = policy.min_decision_agreement
        value: float | None = None
        how = "not enough decisions"
        if canary.paired >= policy.min_samples:
            value, how = canary.paired_agreements / canary.paired, f"paired on {canary.paired}"
        else:
            rate_k, rate_c = champion.decision_rate, canary.decision_rate
            if (
                rate_k is not None
                and rate_c is not None
                and min(champion.n_decisions, canary.n_decisions) >= policy.min_samples
            ):
                # unpaired arms: two deciders with positive rates p and q agree on at most
                # 1 - |p - q| of the requests, so a bound below the minimum is a sure fail
                value = 1.0 - abs(rate_k - rate_c)
                how = f"upper bound from positive rates {rate_k:.3f} vs {rate_c:.3f}"
        out.append(
            Check(
                name="decision_agreement",
                value=value,
                threshold=limit,
                passed=None if value is None else value >= limit,
                detail=how,
            )
        )

    drops: tuple[tuple[CheckName, float | None, str, Callable[[ArmStats], int]], ...] = (
        ("precision_drop", policy.max_precision_drop, "precision", lambda s: s.tp + s.fp),
        ("recall_drop", policy.max_recall_drop, "recall", lambda s: s.tp + s.fn),
    )
    for name, max_drop, metric, support in drops:
        if max_drop is None:
            continue
        k, c = getattr(champion, metric), getattr(canary, metric)
        if k is None or c is None or min(support(champion), support(canary)) < policy.min_labelled:
            out.append(
                Check(
                    name=name, threshold=max_drop, detail=f"fewer than {policy.min_labelled} labels"
                )
            )
            continue
        drop = _drop(policy, k, c)
        out.append(
            Check(
                name=name,
                value=drop,
                threshold=max_drop,
                passed=drop <= max_drop,
                detail=f"{metric} champion {k:.3f} vs canary {c:.3f} ({policy.drop_mode})",
            )
        )
    return out


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4g}" if math.isfinite(x) else str(x)


# --------------------------------------------------------------------------------------
# actions (data; carried out by the plane and the flow)
# --------------------------------------------------------------------------------------


class DeployArm(BaseModel):
    model_config = ConfigDict(frozen=True)
    kind: Literal["deploy"] = "deploy"
    arm: str
    bento_tag: str
    role: Role


class SetWeights(BaseModel):
    """The complete routing table: weights over arms (sum 100) and mirrored arms."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["set_weights"] = "set_weights"
    weights: dict[str, int]
    shadow: list[str] = Field(default_factory=list)


class SetRoles(BaseModel):
    model_config = ConfigDict(frozen=True)
    kind: Literal["set_roles"] = "set_roles"
    roles: dict[str, Role]


class RetireArm(BaseModel):
    model_config = ConfigDict(frozen=True)
    kind: Literal["retire"] = "retire"
    arm: str


class Emit(BaseModel):
    model_config = ConfigDict(frozen=True)
    kind: Literal["emit"] = "emit"
    event: str
    payload: dict[str, Any]


Action = Annotated[
    DeployArm | SetWeights | SetRoles | RetireArm | Emit, Field(discriminator="kind")
]


# --------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------


class ArmRef(BaseModel):
    """A serving arm: its name (stable, DNS-safe) and the Bento it serves."""

    model_config = ConfigDict(frozen=True)
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    bento_tag: str = Field(min_length=1)


class Transition(BaseModel):
    """One recorded change of the rollout (the ledger and the events are built from it)."""

    at: AwareDatetime
    event: str
    actor: str
    from_phase: Phase
    to_phase: Phase
    step_index: int
    weights: dict[str, int]
    reason: str = ""
    verdict: Verdict | None = None
    analysis: dict[str, Any] | None = None


class RolloutState(BaseModel):
    """Where one rollout stands. Roles move: after promotion the canary *is* the champion."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    incident_id: str | None = None
    policy: RolloutPolicy
    phase: Phase = Phase.PENDING
    champion: ArmRef
    canary: ArmRef | None
    standby: ArmRef | None = Field(
        default=None, description="Old champion kept warm during the guard."
    )
    previous_champion: ArmRef | None = Field(
        default=None, description="Champion before the promotion."
    )
    step_index: int = Field(
        default=-1, description="Index into policy.canary_steps; -1 outside steps."
    )
    weights: dict[str, int] = Field(default_factory=dict)
    shadow: list[str] = Field(default_factory=list)
    started_at: AwareDatetime
    step_started_at: AwareDatetime
    guard_until: AwareDatetime | None = None
    history: list[Transition] = Field(default_factory=list)

    @property
    def terminal(self) -> bool:
        """Nothing more will happen without a human (promotion guard over, or reverted)."""
        if self.phase in (Phase.ROLLED_BACK, Phase.ABORTED):
            return True
        return self.phase is Phase.PROMOTED and self.standby is None

    @property
    def canary_percent(self) -> int:
        return self.weights.get(self.canary.name, 0) if self.canary else 0

    def arms(self) -> dict[str, str]:
        """Live arms of this rollout: name -> bento tag."""
        out = {self.champion.name: self.champion.bento_tag}
        for ref in (self.canary, self.standby):
            if ref is not None:
                out[ref.name] = ref.bento_tag
        return out


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise RolloutError("rollout times must be timezone-aware")
    return now


def _payload(state: RolloutState, transition: Transition) -> dict[str, Any]:
    return {
        "model_name": state.model_name,
        "incident_id": state.incident_id,
        "phase": state.phase.value,
        "step": state.step_index,
        "canary_percent": state.canary_percent,
        "weights": dict(state.weights),
        "champion": state.champion.bento_tag,
        "canary": state.canary.bento_tag if state.canary else None,
        "standby": state.standby.bento_tag if state.standby else None,
        "verdict": transition.verdict.value if transition.verdict else None,
        "reason": transition.reason,
        "actor": transition.actor,
        "analysis": transition.analysis,
    }


def _move(
    state: RolloutState,
    now: datetime,
    event: str,
    *,
    actor: str,
    reason: str,
    analysis: Analysis | None = None,
    **changes: Any,
) -> tuple[RolloutState, Emit]:
    """Apply ``changes``, record the transition, and return the matching Emit action."""
    moved = state.model_copy(update=changes)
    transition = Transition(
        at=now,
        event=event,
        actor=actor,
        from_phase=state.phase,
        to_phase=moved.phase,
        step_index=moved.step_index,
        weights=dict(moved.weights),
        reason=reason,
        verdict=analysis.verdict if analysis else None,
        analysis=analysis.summary() if analysis else None,
    )
    moved = moved.model_copy(update={"history": [*state.history, transition]})
    return moved, Emit(event=event, payload=_payload(moved, transition))


def start_rollout(
    policy: RolloutPolicy,
    *,
    model_name: str,
    champion: ArmRef,
    canary: ArmRef,
    now: datetime,
    incident_id: str | None = None,
) -> tuple[RolloutState, list[Action]]:
    """A PENDING rollout and the action to deploy the canary (idle: weight 0).

    Call :func:`advance` once the canary is ready to start shadowing or stepping.
    """
    now = _aware(now)
    if champion.name == canary.name:
        raise RolloutError(f"champion and canary share the arm name {champion.name!r}")
    state = RolloutState(
        model_name=model_name,
        incident_id=incident_id,
        policy=policy,
        champion=champion,
        canary=canary,
        weights={champion.name: 100, canary.name: 0},
        started_at=now,
        step_started_at=now,
    )
    role = Role.SHADOW if policy.shadow_first else Role.CANARY
    return state, [DeployArm(arm=canary.name, bento_tag=canary.bento_tag, role=role)]


def _enter_step(
    state: RolloutState,
    index: int,
    now: datetime,
    *,
    event: str,
    actor: str,
    reason: str,
    analysis: Analysis | None = None,
) -> tuple[RolloutState, list[Action]]:
    assert state.canary is not None
    percent = state.policy.canary_steps[index]
    weights = {state.champion.name: 100 - percent, state.canary.name: percent}
    new, emit = _move(
        state,
        now,
        event,
        actor=actor,
        reason=reason,
        analysis=analysis,
        phase=Phase.CANARY,
        step_index=index,
        weights=weights,
        shadow=[],
        step_started_at=now,
    )
    actions: list[Action] = []
    if state.phase is not Phase.CANARY:
        actions.append(SetRoles(roles={state.canary.name: Role.CANARY}))
    actions += [SetWeights(weights=weights), emit]
    return new, actions


def _revert_canary(
    state: RolloutState,
    now: datetime,
    *,
    phase: Phase,
    event: str,
    actor: str,
    reason: str,
    analysis: Analysis | None = None,
) -> tuple[RolloutState, list[Action]]:
    """Champion back to 100 %, canary retired (from PENDING, SHADOW or CANARY)."""
    assert state.canary is not None
    weights = {state.champion.name: 100}
    new, emit = _move(
        state,
        now,
        event,
        actor=actor,
        reason=reason,
        analysis=analysis,
        phase=phase,
        step_index=-1,
        weights=weights,
        shadow=[],
        canary=None,
        step_started_at=now,
    )
    return new, [
        SetWeights(weights={state.champion.name: 100, state.canary.name: 0}),
        RetireArm(arm=state.canary.name),
        emit,
    ]


def _promote(
    state: RolloutState,
    now: datetime,
    *,
    actor: str,
    reason: str,
    analysis: Analysis | None = None,
) -> tuple[RolloutState, list[Action]]:
    assert state.canary is not None
    new_champion, old = state.canary, state.champion
    guard = state.policy.post_promotion_guard_seconds
    weights = {new_champion.name: 100, old.name: 0}
    new, emit = _move(
        state,
        now,
        EVENT_PROMOTED,
        actor=actor,
        reason=reason,
        analysis=analysis,
        phase=Phase.PROMOTED,
        step_index=len(state.policy.canary_steps),
        weights=weights,
        shadow=[],
        champion=new_champion,
        canary=None,
        standby=old,
        previous_champion=old,
        step_started_at=now,
        guard_until=now + timedelta(seconds=guard),
    )
    actions: list[Action] = [
        SetRoles(roles={new_champion.name: Role.CHAMPION, old.name: Role.STANDBY}),
        SetWeights(weights=weights),
        emit,
    ]
    if guard == 0:
        new, more = _complete(new, now, actor=actor)
        actions += more
    return new, actions


def _complete(
    state: RolloutState, now: datetime, *, actor: str
) -> tuple[RolloutState, list[Action]]:
    """The guard window is over: retire the old champion."""
    assert state.standby is not None
    old = state.standby
    weights = {state.champion.name: 100}
    new, emit = _move(
        state,
        now,
        EVENT_COMPLETED,
        actor=actor,
        reason=f"post-promotion guard over; {old.bento_tag} retired",
        standby=None,
        guard_until=None,
        weights=weights,
    )
    return new, [RetireArm(arm=old.name), emit]


def _restore(
    state: RolloutState,
    target: ArmRef,
    now: datetime,
    *,
    actor: str,
    reason: str,
    analysis: Analysis | None = None,
    warm: bool,
) -> tuple[RolloutState, list[Action]]:
    """From PROMOTED: make ``target`` champion again and retire the current champion."""
    bad = state.champion
    weights = {target.name: 100}
    new, emit = _move(
        state,
        now,
        EVENT_ROLLED_BACK,
        actor=actor,
        reason=reason,
        analysis=analysis,
        phase=Phase.ROLLED_BACK,
        step_index=-1,
        weights=weights,
        shadow=[],
        champion=target,
        canary=None,
        standby=None,
        guard_until=None,
        step_started_at=now,
    )
    actions: list[Action] = []
    if not warm:
        actions.append(DeployArm(arm=target.name, bento_tag=target.bento_tag, role=Role.STANDBY))
    actions += [
        SetRoles(roles={target.name: Role.CHAMPION}),
        SetWeights(weights={target.name: 100, bad.name: 0}),
        RetireArm(arm=bad.name),
        emit,
    ]
    return new, actions


def advance(
    state: RolloutState, analysis: Analysis | None, now: datetime
) -> tuple[RolloutState, list[Action]]:
    """One tick of the rollout: the new state and the actions to carry out, in order.

    ``analysis`` is the verdict on the window just measured (``None`` counts as
    INSUFFICIENT). PENDING starts the first phase; SHADOW/CANARY roll back on
    FAIL, wait on INSUFFICIENT until the evidence deadline (then abort), and move
    on after PASS once the step has baked; PROMOTED rolls back on FAIL while the
    old champion is warm and retires it when the guard window is over. A
    terminal state is returned unchanged with no actions.
    """
    now = _aware(now)
    policy = state.policy
    verdict = analysis.verdict if analysis else Verdict.INSUFFICIENT

    if state.phase is Phase.PENDING:
        assert state.canary is not None
        if policy.shadow_first:
            new, emit = _move(
                state,
                now,
                EVENT_STARTED,
                actor=ACTOR_SYSTEM,
                reason="canary ready; shadowing",
                phase=Phase.SHADOW,
                step_index=-1,
                weights={state.champion.name: 100, state.canary.name: 0},
                shadow=[state.canary.name],
                step_started_at=now,
            )
            return new, [SetWeights(weights=new.weights, shadow=new.shadow), emit]
        return _enter_step(
            state, 0, now, event=EVENT_STARTED, actor=ACTOR_SYSTEM, reason="canary ready"
        )

    if state.phase in (Phase.SHADOW, Phase.CANARY):
        if verdict is Verdict.FAIL:
            assert analysis is not None
            return _revert_canary(
                state,
                now,
                phase=Phase.ROLLED_BACK,
                event=EVENT_ROLLED_BACK,
                actor=ACTOR_SYSTEM,
                reason=analysis.reason,
                analysis=analysis,
            )
        elapsed = (now - state.step_started_at).total_seconds()
        if verdict is Verdict.INSUFFICIENT:
            if elapsed >= policy.evidence_deadline_seconds:
                why = analysis.reason if analysis else "no analysis"
                return _revert_canary(
                    state,
                    now,
                    phase=Phase.ABORTED,
                    event=EVENT_ABORTED,
                    actor=ACTOR_SYSTEM,
                    reason=f"evidence deadline ({policy.evidence_deadline_seconds:g} s) "
                    f"passed: {why}",
                    analysis=analysis,
                )
            return state, []
        if elapsed < policy.bake_seconds:
            return state, []
        nxt = state.step_index + 1
        if nxt < len(policy.canary_steps):
            return _enter_step(
                state,
                nxt,
                now,
                event=EVENT_STEPPED,
                actor=ACTOR_SYSTEM,
                reason=analysis.reason if analysis else "",
                analysis=analysis,
            )
        return _promote(
            state,
            now,
            actor=ACTOR_SYSTEM,
            reason=analysis.reason if analysis else "",
            analysis=analysis,
        )

    if state.phase is Phase.PROMOTED and state.standby is not None:
        if verdict is Verdict.FAIL:
            assert analysis is not None
            return _restore(
                state,
                state.standby,
                now,
                actor=ACTOR_SYSTEM,
                reason=f"post-promotion guard: {analysis.reason}",
                analysis=analysis,
                warm=True,
            )
        if state.guard_until is not None and now >= state.guard_until:
            return _complete(state, now, actor=ACTOR_SYSTEM)
        return state, []

    return state, []


# --------------------------------------------------------------------------------------
# manual actions (same transitions, recorded with the human actor)
# --------------------------------------------------------------------------------------


def promote(
    state: RolloutState, now: datetime, *, actor: str = ACTOR_HUMAN, reason: str = "manual promote"
) -> tuple[RolloutState, list[Action]]:
    """Promote the canary now (from SHADOW or CANARY)."""
    now = _aware(now)
    if state.phase not in (Phase.SHADOW, Phase.CANARY):
        raise RolloutError(f"cannot promote a rollout in phase {state.phase.value}")
    return _promote(state, now, actor=actor, reason=reason)


def rollback(
    state: RolloutState,
    now: datetime,
    *,
    actor: str = ACTOR_HUMAN,
    reason: str = "manual rollback",
    target: ArmRef | None = None,
) -> tuple[RolloutState, list[Action]]:
    """Go back to the last known good champion.

    During PENDING/SHADOW/CANARY that is the current champion (the canary is
    retired). After a promotion it is the warm standby, or once the guard is over
    ``target`` (e.g. from :meth:`driftloop.ledger.Ledger.last_known_good`),
    defaulting to the champion before the promotion, which is redeployed first.
    """
    now = _aware(now)
    if state.phase in (Phase.PENDING, Phase.SHADOW, Phase.CANARY):
        return _revert_canary(
            state,
            now,
            phase=Phase.ROLLED_BACK,
            event=EVENT_ROLLED_BACK,
            actor=actor,
            reason=reason,
        )
    if state.phase is Phase.PROMOTED:
        if state.standby is not None and (target is None or target == state.standby):
            return _restore(state, state.standby, now, actor=actor, reason=reason, warm=True)
        target = target or state.previous_champion
        if target is None:
            raise RolloutError("no known good champion to roll back to")
        if target.name == state.champion.name:
            raise RolloutError(f"{target.name} is already the champion")
        warm = state.standby is not None and target.name == state.standby.name
        return _restore(state, target, now, actor=actor, reason=reason, warm=warm)
    raise RolloutError(f"cannot roll back a rollout in phase {state.phase.value}")


def set_weights(
    state: RolloutState,
    weights: dict[str, int],
    now: datetime,
    *,
    actor: str = ACTOR_HUMAN,
    reason: str = "manual weights",
) -> tuple[RolloutState, list[Action]]:
    """Set the champion/canary split by hand (SHADOW or CANARY).

    100 % to the canary is a promotion. Otherwise the rollout continues in
    CANARY from the largest policy step not above the new canary share, with the
    bake and evidence clocks restarted.
    """
    now = _aware(now)
    if state.phase not in (Phase.SHADOW, Phase.CANARY) or state.canary is None:
        raise RolloutError(f"cannot set weights on a rollout in phase {state.phase.value}")
    expected = {state.champion.name, state.canary.name}
    if set(weights) != expected:
        raise RolloutError(f"weights must name exactly {sorted(expected)}, got {sorted(weights)}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) != 100:
        raise RolloutError(f"weights must be non-negative and sum to 100, got {weights}")
    percent = weights[state.canary.name]
    if percent == 100:
        return _promote(state, now, actor=actor, reason=reason)
    steps = state.policy.canary_steps
    index = max([i for i, s in enumerate(steps) if s <= percent], default=0)
    new, emit = _move(
        state,
        now,
        EVENT_STEPPED,
        actor=actor,
        reason=reason,
        phase=Phase.CANARY,
        step_index=index,
        weights=dict(weights),
        shadow=[],
        step_started_at=now,
    )
    actions: list[Action] = []
    if state.phase is not Phase.CANARY:
        actions.append(SetRoles(roles={state.canary.name: Role.CANARY}))
    return new, [*actions, SetWeights(weights=dict(weights)), emit]


def abort(
    state: RolloutState, now: datetime, *, actor: str = ACTOR_SYSTEM, reason: str
) -> tuple[RolloutState, list[Action]]:
    """Stop a rollout that cannot proceed (e.g. the canary never became ready)."""
    now = _aware(now)
    if state.phase not in (Phase.PENDING, Phase.SHADOW, Phase.CANARY):
        raise RolloutError(f"cannot abort a rollout in phase {state.phase.value}")
    return _revert_canary(
        state, now, phase=Phase.ABORTED, event=EVENT_ABORTED, actor=actor, reason=reason
    )
