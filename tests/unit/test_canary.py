"""The rollout runner's glue, without servers: evidence from router counter files, the
persisted record, ledger entries and plane actions, driven by a fake clock.

The plane is a small in-memory :class:`ServingPlane` passed in (its desired state is
the real file the router reads); the router is represented by the counter files it
would write. The real arms, router and flow are in tests/integration/.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from driftloop.canary import RolloutRecord, RolloutRunner, arm_name, status_report
from driftloop.errors import RolloutError
from driftloop.ledger import Ledger
from driftloop.plane.base import ArmHealth, ArmInfo, ArmStatus, ServingPlane, write_atomic
from driftloop.rollout import Phase, Role, RolloutPolicy
from driftloop.routing import ArmCounters, RouterSnapshot, stats_dir
from driftloop.settings import Settings

CHAMPION = "driftloop-fraud:v1"
CHALLENGER = "driftloop-fraud:v2"
POLICY = RolloutPolicy(
    steps=[25, 50, 100],
    bake_seconds=60,
    min_samples=100,
    evidence_deadline_seconds=300,
    post_promotion_guard_seconds=120,
    max_precision_drop=None,
    max_recall_drop=None,
)


class MemoryPlane(ServingPlane):
    """Arms that 'run' as soon as they are deployed; the desired state is the real file."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, "fraud")
        self.deployed: list[str] = []
        self.retired: list[str] = []

    def deploy(self, arm_name, bento_tag, env=None, *, role=Role.CANARY) -> ArmInfo:
        endpoint = f"http://127.0.0.1:9/{arm_name}"
        with self._locked():
            arms = {n: a.model_dump() for n, a in self.desired().arms.items()}
            arms[arm_name] = {"bento_tag": bento_tag, "role": role, "endpoint": endpoint}
            self._update(arms=arms)
        self.deployed.append(arm_name)
        return ArmInfo(name=arm_name, bento_tag=bento_tag, endpoint=endpoint, status="ready")

    def retire(self, arm_name) -> None:
        with self._locked():
            d = self.desired()
            assert d.weights.get(arm_name, 0) == 0, "retiring an arm with traffic"
            self._update(
                arms={n: a.model_dump() for n, a in d.arms.items() if n != arm_name},
                weights={n: w for n, w in d.weights.items() if n != arm_name},
            )
        self.retired.append(arm_name)

    def health(self) -> dict[str, ArmHealth]:
        return {
            n: ArmHealth(name=n, status=ArmStatus.READY, alive=True, ready=True)
            for n in self.desired().arms
        }

    def reconcile(self) -> dict[str, ArmInfo]:
        return {}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Router:
    """Writes the counter file a router process would write."""

    def __init__(self, settings: Settings) -> None:
        self.path = stats_dir(settings.state_dir, "fraud") / "r1.json"
        self.arms: dict[str, ArmCounters] = {}
        self.rng = np.random.default_rng(3)

    def serve(
        self, arm: str, n: int, *, latency: float = 3.0, errors: int = 0, invert: bool = False
    ) -> None:
        c = self.arms.setdefault(arm, ArmCounters())
        for score in self.rng.beta(1, 20, size=n):
            s = 1 - score if invert else score
            c.observe(latency)
            c.answer(float(s), bool(s >= 0.3))
        c.errors += errors
        now = datetime.now(UTC)
        snap = RouterSnapshot(
            instance="r1", model_name="fraud", pid=1, started_at=now, updated_at=now, arms=self.arms
        )
        write_atomic(self.path, snap.model_dump_json())


@pytest.fixture
def rig(tmp_path: Path) -> tuple[RolloutRunner, MemoryPlane, Router, Clock]:
    settings = Settings(data_root=str(tmp_path / "data"), state_dir=tmp_path / "state")
    plane = MemoryPlane(settings.state_dir)
    clock = Clock()
    runner = RolloutRunner(settings, plane, clock=clock, record_stages=False)
    runner.ensure_champion(CHAMPION)
    return runner, plane, Router(settings), clock


def names() -> tuple[str, str]:
    return arm_name("fraud", CHAMPION), arm_name("fraud", CHALLENGER)


def begin(runner: RolloutRunner) -> RolloutRecord:
    return runner.begin("fraud:v2", CHALLENGER, incident_id="inc-1", policy=POLICY,
                        warmup_timeout_seconds=0)


def actions(runner: RolloutRunner) -> list[tuple[str, str]]:
    return [(e.action, e.actor) for e in runner.ledger.entries()]


def test_first_champion_is_a_baseline_once(rig) -> None:
    runner, plane, _, _ = rig
    champ, _ = names()
    assert runner.ensure_champion(CHAMPION).name == champ  # already serving: no-op
    assert plane.deployed == [champ]
    assert plane.desired().weights == {champ: 100}
    assert actions(runner) == [("baseline", "system")]
    assert Ledger.for_settings(runner.settings).last_known_good("fraud").champion_tag == CHAMPION


def test_a_good_canary_steps_up_on_evidence_then_is_promoted(rig) -> None:
    runner, plane, router, clock = rig
    champ, canary = names()
    record = begin(runner)
    assert record.state.phase is Phase.CANARY and plane.desired().weights == {champ: 75, canary: 25}

    router.serve(champ, 300)
    router.serve(canary, 100)
    clock.tick(30)  # evidence, but not baked
    assert runner.tick().state.step_index == 0
    clock.tick(31)
    record = runner.tick()
    assert record.state.step_index == 1 and plane.desired().weights == {champ: 50, canary: 50}
    assert record.last_analysis["verdict"] == "pass"

    clock.tick(61)  # baked, but the new window has no evidence yet: wait
    assert runner.tick().state.step_index == 1
    router.serve(champ, 150)
    router.serve(canary, 150)
    record = runner.tick()
    assert record.state.phase is Phase.PROMOTED and plane.desired().weights[canary] == 100
    clock.tick(121)
    record = runner.tick()
    assert record.state.terminal and plane.retired == [champ]
    assert actions(runner)[1:] == [
        ("started", "system"),
        ("stepped", "system"),
        ("promoted", "system"),
        ("completed", "system"),
    ]


@pytest.mark.parametrize(
    ("serve", "breach"),
    [
        ({"errors": 5}, "error_rate"),
        ({"latency": 400.0}, "p99_ratio"),
        ({"invert": True}, "score_distance"),
    ],
)
def test_a_bad_canary_is_rolled_back_at_the_next_analysis(rig, serve, breach) -> None:
    runner, plane, router, clock = rig
    champ, canary = names()
    begin(runner)
    router.serve(champ, 300)
    router.serve(canary, 100, **serve)
    clock.tick(5)  # long before the bake time
    record = runner.tick()
    assert record.state.phase is Phase.ROLLED_BACK
    assert breach in record.last_analysis["failed"]
    assert plane.desired().weights == {champ: 100} and plane.retired == [canary]
    assert runner.tick().state.phase is Phase.ROLLED_BACK  # terminal: nothing more


def test_the_window_starts_with_the_step(rig) -> None:
    """Counts from before the canary started (e.g. a bad earlier run) are not evidence."""
    runner, _, router, clock = rig
    champ, canary = names()
    router.serve(champ, 500)
    router.serve(canary, 500, errors=50)  # before the rollout
    begin(runner)
    clock.tick(5)
    record = runner.tick()
    assert record.state.phase is Phase.CANARY
    assert record.last_analysis["verdict"] == "insufficient"
    assert record.last_analysis["canary_requests"] == 0


def test_no_evidence_until_the_deadline_aborts(rig) -> None:
    runner, plane, router, clock = rig
    champ, canary = names()
    begin(runner)
    router.serve(champ, 40)
    router.serve(canary, 10)
    clock.tick(299)
    assert runner.tick().state.phase is Phase.CANARY
    clock.tick(2)
    record = runner.tick()
    assert record.state.phase is Phase.ABORTED and "not enough evidence" in (
        record.state.history[-1].reason
    )
    assert plane.desired().weights == {champ: 100}


def test_manual_actions_are_the_same_transitions_as_human(rig) -> None:
    runner, plane, _, _ = rig
    champ, canary = names()
    begin(runner)
    runner.manual("weights", weights={"champion": 60, "canary": 40})
    assert plane.desired().weights == {champ: 60, canary: 40}
    runner.manual("promote")
    assert plane.desired().champion() == canary
    runner.manual("rollback")  # the warm old champion comes back
    assert plane.desired().champion() == champ and plane.desired().weights == {champ: 100}
    assert actions(runner)[-3:] == [
        ("stepped", "human"),
        ("promoted", "human"),
        ("rolled_back", "human"),
    ]
    with pytest.raises(RolloutError):
        runner.manual("promote")
    report = status_report(runner)
    assert report.rollout["phase"] == "rolled_back" and report.last_incident["actor"] == "human"


def test_rollback_after_the_guard_goes_to_the_last_known_good(rig) -> None:
    runner, plane, router, clock = rig
    champ, canary = names()
    begin(runner)
    runner.manual("promote")
    clock.tick(121)
    router.serve(canary, 10)
    assert runner.tick().state.terminal  # guard over: old champion retired
    runner.manual("rollback", reason="bad labels came in")
    desired = plane.desired()
    assert desired.champion() == champ and desired.weights == {champ: 100}
    assert plane.deployed.count(champ) == 2  # redeployed from the ledger's known good


def test_a_new_challenger_supersedes_one_still_stepping(rig) -> None:
    runner, plane, _, _ = rig
    champ, canary = names()
    begin(runner)
    other = "driftloop-fraud:v3"
    record = runner.begin("fraud:v3", other, policy=POLICY, warmup_timeout_seconds=0)
    assert record.challenger.bento_tag == other
    assert [a for a, _ in actions(runner)] == ["baseline", "started", "aborted", "started"]
    assert canary in plane.retired


def test_fail_safe_reverts_a_canary_nobody_watches(rig) -> None:
    runner, plane, _, _ = rig
    champ, _ = names()
    begin(runner)
    record = runner.fail_safe("the rollout flow failed")
    assert record.state.phase is Phase.ABORTED and plane.desired().weights == {champ: 100}
    assert runner.fail_safe("again").state.phase is Phase.ABORTED  # nothing to do
