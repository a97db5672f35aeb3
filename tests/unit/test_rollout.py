"""The rollout state machine and canary analysis (pure: no servers, no clock)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driftloop.errors import RolloutError
from driftloop.rollout import (
    Analysis,
    ArmRef,
    ArmStats,
    DeployArm,
    Emit,
    Phase,
    RetireArm,
    Role,
    RolloutPolicy,
    RolloutState,
    SetRoles,
    SetWeights,
    Verdict,
    abort,
    advance,
    analyse,
    ks_statistic,
    promote,
    psi,
    rollback,
    set_weights,
    start_rollout,
)
from driftloop.settings import get_settings

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
CHAMP = ArmRef(name="fraud-v1", bento_tag="fraud_svc:v1")
CANARY = ArmRef(name="fraud-v2", bento_tag="fraud_svc:v2")
POLICY = RolloutPolicy(
    steps=[5, 25, 50, 100],
    bake_seconds=60,
    min_samples=100,
    evidence_deadline_seconds=300,
    post_promotion_guard_seconds=120,
    required_checks=frozenset({"error_rate", "p99_ratio"}),
)
TICK = timedelta(seconds=30)

_rng = np.random.default_rng(7)
GOOD_SCORES = _rng.beta(1, 30, size=400).tolist()


def stats(
    requests: int = 400,
    error_rate: float = 0.0,
    p99_ms: float = 12.0,
    scores: list[float] | None = None,
    tp: int = 80,
    fp: int = 20,
    fn: int = 20,
) -> ArmStats:
    sample = GOOD_SCORES if scores is None else scores
    positives = sum(s >= 0.5 for s in sample)
    decided = requests - round(requests * error_rate)
    return ArmStats(
        requests=requests,
        errors=round(requests * error_rate),
        p99_ms=p99_ms,
        scores=sample,
        decisions=decided,
        positive_decisions=min(decided, round(decided * positives / len(sample))),
        tp=tp,
        fp=fp,
        fn=fn,
    )


Scenario = Callable[[RolloutState], tuple[ArmStats, ArmStats]]


@dataclass
class Run:
    state: RolloutState
    actions: list
    ticks: int


def drive(policy: RolloutPolicy, scenario: Scenario, max_ticks: int = 60) -> Run:
    """Start a rollout and tick it every 30 s with the scenario's stats until terminal."""
    now = T0
    state, actions = start_rollout(
        policy, model_name="fraud", champion=CHAMP, canary=CANARY, now=now, incident_id="inc-1"
    )
    all_actions = list(actions)
    state, actions = advance(state, None, now)  # the canary is ready
    all_actions += actions
    ticks = 0
    while not state.terminal and ticks < max_ticks:
        now += TICK
        ticks += 1
        champion, canary = scenario(state)
        state, actions = advance(state, analyse(policy, champion, canary), now)
        all_actions += actions
        for a in actions:  # the invariant of every routing table
            if isinstance(a, SetWeights):
                assert sum(a.weights.values()) == 100
    return Run(state, all_actions, ticks)


def events(run: Run) -> list[str]:
    return [a.event.rsplit(".", 1)[-1] for a in run.actions if isinstance(a, Emit)]


def good(_: RolloutState) -> tuple[ArmStats, ArmStats]:
    return stats(), stats()


def erroring(_: RolloutState) -> tuple[ArmStats, ArmStats]:
    return stats(), stats(error_rate=0.05)


def slow(_: RolloutState) -> tuple[ArmStats, ArmStats]:
    return stats(p99_ms=12.0), stats(p99_ms=60.0)


def inverted(_: RolloutState) -> tuple[ArmStats, ArmStats]:
    return stats(), stats(scores=[1.0 - s for s in GOOD_SCORES])


def low_traffic(_: RolloutState) -> tuple[ArmStats, ArmStats]:
    return stats(), stats(requests=20)


def worse_recall(_: RolloutState) -> tuple[ArmStats, ArmStats]:
    return stats(tp=80, fn=20), stats(tp=70, fn=30)


@pytest.mark.parametrize(
    ("scenario", "phase", "expected_events", "failed_check"),
    [
        (good, Phase.PROMOTED, ["started", "stepped", "stepped", "promoted", "completed"], None),
        (erroring, Phase.ROLLED_BACK, ["started", "rolled_back"], "error_rate"),
        (slow, Phase.ROLLED_BACK, ["started", "rolled_back"], "p99_ratio"),
        (inverted, Phase.ROLLED_BACK, ["started", "rolled_back"], "score_distance"),
        (worse_recall, Phase.ROLLED_BACK, ["started", "rolled_back"], "recall_drop"),
        (low_traffic, Phase.ABORTED, ["started", "aborted"], None),
    ],
    ids=["good", "errors", "slow", "inverted", "recall", "low-traffic"],
)
def test_scenarios(scenario, phase, expected_events, failed_check):
    run = drive(POLICY, scenario)
    assert run.state.phase is phase
    assert run.state.terminal
    assert events(run) == expected_events
    assert all(t.to_phase is not Phase.PROMOTED for t in run.state.history) or phase is (
        Phase.PROMOTED
    )
    if failed_check is not None:
        last = run.state.history[-1]
        assert failed_check in last.analysis["failed"]
        assert failed_check in last.reason


def test_good_canary_walks_every_step_then_promotes_and_retires_the_old_champion():
    run = drive(POLICY, good)
    weights = [a.weights for a in run.actions if isinstance(a, SetWeights)]
    assert weights == [
        {"fraud-v1": 95, "fraud-v2": 5},
        {"fraud-v1": 75, "fraud-v2": 25},
        {"fraud-v1": 50, "fraud-v2": 50},
        {"fraud-v2": 100, "fraud-v1": 0},
    ]
    s = run.state
    assert s.champion == CANARY and s.canary is None and s.standby is None
    assert s.previous_champion == CHAMP
    assert s.weights == {"fraud-v2": 100}
    roles = [a.roles for a in run.actions if isinstance(a, SetRoles)]
    assert {"fraud-v2": Role.CHAMPION, "fraud-v1": Role.STANDBY} in roles
    # the old champion is retired only after the guard window, and last
    assert isinstance(run.actions[-2], RetireArm) and run.actions[-2].arm == "fraud-v1"
    promoted_at = next(t.at for t in s.history if t.to_phase is Phase.PROMOTED)
    assert s.history[-1].at - promoted_at >= timedelta(seconds=POLICY.post_promotion_guard_seconds)
    # every step baked at least bake_seconds
    steps = [t.at for t in s.history if t.event.endswith(("started", "stepped", "promoted"))]
    bake = timedelta(seconds=POLICY.bake_seconds)
    assert all(b - a >= bake for a, b in zip(steps, steps[1:], strict=False))
    # the first action deploys the canary idle
    assert run.actions[0] == DeployArm(arm="fraud-v2", bento_tag="fraud_svc:v2", role=Role.CANARY)


def test_error_breach_rolls_back_within_one_interval():
    run = drive(POLICY, erroring)
    assert run.ticks == 1
    tail = run.actions[-3:]
    assert tail[0] == SetWeights(weights={"fraud-v1": 100, "fraud-v2": 0})
    assert tail[1] == RetireArm(arm="fraud-v2")
    assert isinstance(tail[2], Emit) and tail[2].event == "driftloop.rollout.rolled_back"
    assert tail[2].payload["incident_id"] == "inc-1"
    assert tail[2].payload["verdict"] == "fail"
    assert run.state.champion == CHAMP and run.state.canary is None
    assert run.state.weights == {"fraud-v1": 100}


def test_inverted_scores_fail_score_distance_and_decision_agreement():
    champion, canary = inverted(None)  # type: ignore[arg-type]
    result = analyse(POLICY, champion, canary)
    assert result.verdict is Verdict.FAIL
    assert {"score_distance", "decision_agreement"} <= {c.name for c in result.failed}


def test_low_traffic_waits_until_the_deadline_then_aborts_never_promotes():
    run = drive(POLICY, low_traffic)
    assert run.state.phase is Phase.ABORTED
    aborted = run.state.history[-1]
    assert aborted.at - T0 >= timedelta(seconds=POLICY.evidence_deadline_seconds)
    assert "not enough evidence" in aborted.reason
    assert not any(t.to_phase is Phase.PROMOTED for t in run.state.history)
    assert RetireArm(arm="fraud-v2") in run.actions


def test_insufficient_before_deadline_changes_nothing():
    state, _ = start_rollout(POLICY, model_name="fraud", champion=CHAMP, canary=CANARY, now=T0)
    state, _ = advance(state, None, T0)
    same, actions = advance(state, analyse(POLICY, *low_traffic(state)), T0 + TICK)
    assert same == state and actions == []


def test_pass_before_bake_waits():
    state, _ = start_rollout(POLICY, model_name="fraud", champion=CHAMP, canary=CANARY, now=T0)
    state, _ = advance(state, None, T0)
    same, actions = advance(state, analyse(POLICY, *good(state)), T0 + timedelta(seconds=59))
    assert same.step_index == 0 and actions == []
    moved, _ = advance(state, analyse(POLICY, *good(state)), T0 + timedelta(seconds=60))
    assert moved.step_index == 1 and moved.canary_percent == 25


def test_seed_rule_is_expressible():
    """'5 % for 10 minutes, promote if the error rate stays below 1 %'."""
    seed = RolloutPolicy(
        steps=[5, 100],
        bake_seconds=600,
        max_error_rate=0.01,
        min_samples=100,
        evidence_deadline_seconds=1800,
        post_promotion_guard_seconds=0,
    )
    ok = drive(seed, lambda s: (stats(), stats(requests=1000, error_rate=0.005)))
    assert ok.state.phase is Phase.PROMOTED and ok.state.terminal
    promoted = next(t for t in ok.state.history if t.to_phase is Phase.PROMOTED)
    assert promoted.at - T0 >= timedelta(minutes=10)
    bad = drive(seed, lambda s: (stats(), stats(requests=1000, error_rate=0.02)))
    assert bad.state.phase is Phase.ROLLED_BACK


def test_seed_precision_recall_rule_is_expressible():
    """'revert if precision or recall drop by more than 2 %' (absolute points here)."""
    policy = POLICY.model_copy(update={"max_precision_drop": 0.02, "max_recall_drop": 0.02})
    champion = stats(tp=90, fp=10, fn=10)  # precision 0.90, recall 0.90
    assert analyse(policy, champion, stats(tp=89, fp=11, fn=11)).verdict is Verdict.PASS
    bad = analyse(policy, champion, stats(tp=87, fp=13, fn=10))  # precision 0.87
    assert bad.verdict is Verdict.FAIL and [c.name for c in bad.failed] == ["precision_drop"]
    relative = policy.model_copy(update={"drop_mode": "relative", "max_precision_drop": 0.05})
    assert analyse(relative, champion, stats(tp=87, fp=13, fn=10)).verdict is Verdict.PASS


def test_early_fail_when_the_error_budget_is_spent_before_min_samples():
    result = analyse(POLICY, stats(), ArmStats(requests=10, errors=3))
    assert result.verdict is Verdict.FAIL
    assert result.failed[0].name == "error_rate"
    # one error in ten requests is within a budget of 0.01 x 100: wait for more
    assert analyse(POLICY, stats(), ArmStats(requests=10, errors=1)).verdict is (
        Verdict.INSUFFICIENT
    )


def test_required_check_unmeasured_is_insufficient_not_pass():
    no_latency = stats().model_copy(update={"p99_ms": None})
    result = analyse(POLICY, stats(), no_latency)
    assert result.verdict is Verdict.INSUFFICIENT
    assert "p99_ratio" in result.reason


def test_labels_are_optional_unless_required():
    unlabelled = stats(tp=0, fp=0, fn=0)
    assert analyse(POLICY, unlabelled, unlabelled).verdict is Verdict.PASS
    strict = POLICY.model_copy(
        update={"required_checks": frozenset({"error_rate", "precision_drop"})}
    )
    assert analyse(strict, unlabelled, unlabelled).verdict is Verdict.INSUFFICIENT


def test_paired_agreement_from_shadow_traffic():
    canary = stats().model_copy(update={"paired": 400, "paired_agreements": 340})
    result = analyse(POLICY, stats(), canary)
    check = next(c for c in result.checks if c.name == "decision_agreement")
    assert check.value == pytest.approx(0.85) and check.passed is False


def test_score_distances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 5000), rng.normal(0, 1, 5000)
    assert psi(a, b, 10) < 0.02
    assert psi(a, b + 1.0, 10) > 0.5
    assert ks_statistic(a, b) < 0.05
    assert ks_statistic(a, b + 1.0) > 0.3
    hist = POLICY.model_copy(update={"score_distance": "ks"})
    same = analyse(
        hist,
        ArmStats(requests=400, p99_ms=10, score_histogram=[100, 100, 100, 100]),
        ArmStats(requests=400, p99_ms=10, score_histogram=[100, 100, 100, 100]),
    )
    moved = analyse(
        hist,
        ArmStats(requests=400, p99_ms=10, score_histogram=[300, 50, 30, 20]),
        ArmStats(requests=400, p99_ms=10, score_histogram=[20, 30, 50, 300]),
    )
    assert same.verdict is Verdict.PASS
    assert moved.verdict is Verdict.FAIL and moved.failed[0].name == "score_distance"


def test_shadow_first_mirrors_before_any_step():
    policy = POLICY.model_copy(update={"shadow_first": True})
    state, actions = start_rollout(
        policy, model_name="fraud", champion=CHAMP, canary=CANARY, now=T0
    )
    assert actions == [DeployArm(arm="fraud-v2", bento_tag="fraud_svc:v2", role=Role.SHADOW)]
    state, actions = advance(state, None, T0)
    assert state.phase is Phase.SHADOW
    assert actions[0] == SetWeights(weights={"fraud-v1": 100, "fraud-v2": 0}, shadow=["fraud-v2"])
    state, actions = advance(state, analyse(policy, *good(state)), T0 + timedelta(seconds=60))
    assert state.phase is Phase.CANARY and state.canary_percent == 5 and state.shadow == []
    assert actions[0] == SetRoles(roles={"fraud-v2": Role.CANARY})
    run = drive(policy, good)
    assert run.state.phase is Phase.PROMOTED


def test_failure_during_the_guard_restores_the_warm_old_champion():
    def sour_after_promotion(state: RolloutState) -> tuple[ArmStats, ArmStats]:
        if state.phase is Phase.PROMOTED:
            return stats(), stats(error_rate=0.1)
        return good(state)

    run = drive(POLICY, sour_after_promotion)
    s = run.state
    assert s.phase is Phase.ROLLED_BACK and s.champion == CHAMP and s.standby is None
    assert events(run)[-2:] == ["promoted", "rolled_back"]
    tail = run.actions[-4:]
    assert tail[0] == SetRoles(roles={"fraud-v1": Role.CHAMPION})
    assert tail[1] == SetWeights(weights={"fraud-v1": 100, "fraud-v2": 0})
    assert tail[2] == RetireArm(arm="fraud-v2")
    assert not any(isinstance(a, DeployArm) for a in run.actions[1:])  # it was still warm


# -- manual actions --------------------------------------------------------------------


def _canary_state() -> RolloutState:
    state, _ = start_rollout(POLICY, model_name="fraud", champion=CHAMP, canary=CANARY, now=T0)
    return advance(state, None, T0)[0]


def test_manual_promote_is_recorded_as_human():
    state, actions = promote(_canary_state(), T0 + TICK, reason="looks fine")
    assert state.phase is Phase.PROMOTED and state.champion == CANARY and state.standby == CHAMP
    assert state.history[-1].actor == "human" and state.history[-1].reason == "looks fine"
    assert SetWeights(weights={"fraud-v2": 100, "fraud-v1": 0}) in actions


def test_manual_rollback_during_canary_and_after_the_guard():
    state, actions = rollback(_canary_state(), T0 + TICK)
    assert state.phase is Phase.ROLLED_BACK and state.history[-1].actor == "human"
    assert actions[:2] == [
        SetWeights(weights={"fraud-v1": 100, "fraud-v2": 0}),
        RetireArm(arm="fraud-v2"),
    ]
    promoted, _ = promote(_canary_state(), T0)
    done, _ = advance(promoted, None, T0 + timedelta(seconds=POLICY.post_promotion_guard_seconds))
    assert done.terminal and done.standby is None
    back, actions = rollback(done, T0 + timedelta(hours=1))
    assert back.champion == CHAMP
    assert actions[0] == DeployArm(arm="fraud-v1", bento_tag="fraud_svc:v1", role=Role.STANDBY)
    assert actions[-2] == RetireArm(arm="fraud-v2")
    other = ArmRef(name="fraud-v0", bento_tag="fraud_svc:v0")
    back, actions = rollback(done, T0 + timedelta(hours=1), target=other)
    assert back.champion == other and actions[0].bento_tag == "fraud_svc:v0"


def test_manual_weights():
    state, actions = set_weights(_canary_state(), {"fraud-v1": 70, "fraud-v2": 30}, T0 + TICK)
    assert state.phase is Phase.CANARY and state.step_index == 1 and state.canary_percent == 30
    assert state.step_started_at == T0 + TICK and state.history[-1].actor == "human"
    assert SetWeights(weights={"fraud-v1": 70, "fraud-v2": 30}) in actions
    full, _ = set_weights(_canary_state(), {"fraud-v1": 0, "fraud-v2": 100}, T0 + TICK)
    assert full.phase is Phase.PROMOTED
    with pytest.raises(RolloutError):
        set_weights(_canary_state(), {"fraud-v1": 70, "fraud-v2": 20}, T0)
    with pytest.raises(RolloutError):
        set_weights(_canary_state(), {"fraud-v1": 70, "other": 30}, T0)


def test_illegal_transitions_raise():
    rolled, _ = rollback(_canary_state(), T0)
    for action in (promote, rollback):
        with pytest.raises(RolloutError):
            action(rolled, T0)
    with pytest.raises(RolloutError):
        abort(rolled, T0, reason="x")
    with pytest.raises(RolloutError):
        advance(_canary_state(), None, datetime(2026, 1, 1))  # naive time
    # terminal states ignore further ticks
    assert advance(rolled, None, T0 + TICK) == (rolled, [])


def test_abort_from_pending():
    state, _ = start_rollout(POLICY, model_name="fraud", champion=CHAMP, canary=CANARY, now=T0)
    aborted, actions = abort(state, T0, reason="canary never became ready")
    assert aborted.phase is Phase.ABORTED and RetireArm(arm="fraud-v2") in actions


def test_policy_validation_and_settings():
    with pytest.raises(ValueError):
        RolloutPolicy(steps=[100])  # would promote without a single measured step
    assert RolloutPolicy(steps=[100], shadow_first=True).canary_steps == []
    with pytest.raises(ValueError):
        RolloutPolicy(steps=[50, 25, 100])
    with pytest.raises(ValueError):
        RolloutPolicy(max_p99_ratio=None, required_checks=frozenset({"p99_ratio"}))
    policy = RolloutPolicy.from_settings(
        get_settings(rollout_steps=[10, 100], rollout_bake_seconds=5, rollout_min_samples=7),
        shadow_first=True,
    )
    assert (policy.steps, policy.bake_seconds, policy.min_samples, policy.shadow_first) == (
        [10, 100],
        5,
        7,
        True,
    )


def test_state_round_trips_through_json():
    run = drive(POLICY, good)
    again = RolloutState.model_validate_json(run.state.model_dump_json())
    assert again == run.state


# -- property: never promote without a PASS, weights always sum to 100 -----------------

VERDICTS = st.sampled_from([Verdict.PASS, Verdict.FAIL, Verdict.INSUFFICIENT, None])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(VERDICTS, st.integers(1, 400)), max_size=40), st.booleans())
def test_property_no_blind_promotion(ticks, shadow_first):
    policy = POLICY.model_copy(update={"shadow_first": shadow_first})
    state, _ = start_rollout(policy, model_name="fraud", champion=CHAMP, canary=CANARY, now=T0)
    now = T0
    state, _ = advance(state, None, now)
    passes = 0
    for verdict, seconds in ticks:
        now += timedelta(seconds=seconds)
        analysis = None if verdict is None else Analysis(verdict=verdict, reason="r")
        before = state.phase
        state, actions = advance(state, analysis, now)
        passes += verdict is Verdict.PASS
        for a in actions:
            if isinstance(a, SetWeights):
                assert sum(a.weights.values()) == 100 and all(w >= 0 for w in a.weights.values())
        if before in (Phase.SHADOW, Phase.CANARY) and verdict is Verdict.FAIL:
            assert state.phase is Phase.ROLLED_BACK
        if state.phase is Phase.PROMOTED:
            # one PASS per canary step (plus shadow) at least
            assert passes >= len(policy.canary_steps) + int(shadow_first)
