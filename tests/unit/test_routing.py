"""Traffic splitting, pure: weight table, sticky hash, fallback, counters and their maths."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driftloop.canary import arm_name, arm_stats, compared_arms, event_for, time_bound_seconds
from driftloop.errors import ServingError
from driftloop.plane.base import ArmSpec, DesiredState
from driftloop.rollout import (
    ArmRef,
    Phase,
    RolloutPolicy,
    Verdict,
    advance,
    analyse,
    start_rollout,
)
from driftloop.routing import (
    BUCKETS,
    LATENCY_EDGES_MS,
    SCORE_EDGES,
    Arm,
    ArmCounters,
    RouteTable,
    coarsen,
    histogram_quantile,
    should_retry,
    sticky_bucket,
    version_of,
    window,
)

ARMS = {
    "champ": Arm("champ", "http://127.0.0.1:1", "v1"),
    "canary": Arm("canary", "http://127.0.0.1:2", "v2"),
    "standby": Arm("standby", "http://127.0.0.1:3", "v0"),
}
CARDS = range(20_000)


def table(canary: int, **kw: object) -> RouteTable:
    return RouteTable.build({"champ": 100 - canary, "canary": canary}, ARMS, "champ", **kw)


# -- the sticky hash ---------------------------------------------------------------------


def test_bucket_is_stable_across_processes() -> None:
    """Not Python's salted hash(): another interpreter puts cards in the same buckets."""
    here = [sticky_bucket(c) for c in (0, 1, 42, 2**40, 2**62)]
    code = (
        "from driftloop.routing import sticky_bucket;"
        "print([sticky_bucket(c) for c in (0, 1, 42, 2**40, 2**62)])"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert str(here) == there
    assert all(0 <= b < BUCKETS for b in here)


@pytest.mark.parametrize("canary", [1, 5, 25, 50, 90])
def test_shares_follow_the_weights(canary: int) -> None:
    t = table(canary)
    share = sum(t.choose(c) == "canary" for c in CARDS) / len(CARDS)
    assert share == pytest.approx(canary / 100, abs=0.01)


def test_same_card_same_arm_for_a_given_table() -> None:
    t1, t2 = table(25), table(25)
    assert all(t1.choose(c) == t2.choose(c) == t1.choose(c) for c in range(2000))


@settings(deadline=None, max_examples=40)
@given(st.lists(st.integers(min_value=1, max_value=99), min_size=2, max_size=6, unique=True))
def test_growing_the_canary_only_moves_cards_to_it(steps: list[int]) -> None:
    steps.sort()
    cards = range(1500)
    before = {c for c in cards if table(steps[0]).choose(c) == "canary"}
    for pct in steps[1:]:
        now = {c for c in cards if table(pct).choose(c) == "canary"}
        assert before <= now
        before = now


def test_zero_weight_arms_get_nothing_and_100_gets_everything() -> None:
    t = RouteTable.build({"champ": 0, "canary": 100, "standby": 0}, ARMS, "champ")
    assert {t.choose(c) for c in range(5000)} == {"canary"}
    t = RouteTable.build({"champ": 100, "canary": 0}, ARMS, "champ")
    assert {t.choose(c) for c in range(5000)} == {"champ"}


def test_fallback_goes_to_the_champion() -> None:
    t = table(10)
    assert t.fallback("canary") == "champ"
    assert t.fallback("champ") is None


@pytest.mark.parametrize(
    ("weights", "champion", "message"),
    [
        ({"champ": 90, "canary": 5}, "champ", "sum to 100"),
        ({"champ": 110, "canary": -10}, "champ", "negative"),
        ({"champ": 100, "ghost": 0}, "champ", "unknown arms"),
        ({"champ": 100}, "ghost", "champion"),
    ],
)
def test_invalid_tables_are_refused(weights: dict, champion: str, message: str) -> None:
    with pytest.raises(ServingError, match=message):
        RouteTable.build(weights, ARMS, champion)


def test_table_from_the_plane_desired_state() -> None:
    desired = DesiredState(
        model_name="fraud",
        arms={
            "champ": ArmSpec(bento_tag="driftloop-fraud:v1", role="champion",
                             endpoint="http://127.0.0.1:1/"),
            "canary": ArmSpec(bento_tag="driftloop-fraud:v2", role="canary",
                              endpoint="http://127.0.0.1:2"),
            "new": ArmSpec(bento_tag="driftloop-fraud:v3", role="shadow"),  # not started yet
        },
        weights={"champ": 75, "canary": 25},
        shadow=["canary"],
        version=7,
    )
    t = RouteTable.from_desired(desired)
    assert t.champion == "champ" and t.version == 7
    assert t.arms["champ"].endpoint == "http://127.0.0.1:1"
    assert t.arms["canary"].version == "v2"
    assert "new" not in t.arms and t.shadow == ("canary",)
    # a fresh plane with only a champion and no weights routes everything to it
    lone = DesiredState(model_name="fraud", arms={"champ": desired.arms["champ"]})
    assert {RouteTable.from_desired(lone).choose(c) for c in range(100)} == {"champ"}
    with pytest.raises(ServingError, match="no champion"):
        RouteTable.from_desired(DesiredState(model_name="fraud"))


def test_a_new_canary_without_weight_is_warmed_not_routed() -> None:
    arms = {
        "champ": ArmSpec(bento_tag="m:v1", role="champion", endpoint="http://127.0.0.1:1"),
        "canary": ArmSpec(bento_tag="m:v2", role="canary", endpoint="http://127.0.0.1:2"),
    }
    fresh = DesiredState(model_name="fraud", arms=arms, weights={"champ": 100})
    t = RouteTable.from_desired(fresh)
    assert t.warming == ("canary",) and {t.choose(c) for c in range(500)} == {"champ"}
    stepped = fresh.model_copy(update={"weights": {"champ": 95, "canary": 5}})
    assert RouteTable.from_desired(stepped).warming == ()
    shadowed = fresh.model_copy(update={"shadow": ["canary"]})
    assert RouteTable.from_desired(shadowed).warming == ()


def test_retry_only_after_transport_errors_and_503() -> None:
    assert should_retry(None) and should_retry(503)
    assert not any(should_retry(s) for s in (200, 400, 404, 500, 502))


def test_version_of() -> None:
    assert version_of("driftloop-fraud:v2026") == "v2026"
    assert version_of("service:Svc") == "Svc"
    assert version_of("plain") == "plain"


# -- counters ------------------------------------------------------------------------


def test_counters_window_subtracts_the_baseline_per_instance() -> None:
    a = ArmCounters()
    for ms in (1.0, 2.0, 3.0):
        a.observe(ms)
        a.answer(0.1, False)
    base = {"r1": {"champ": a.model_copy(deep=True)}}
    a.observe(50.0)
    a.answer(0.9, True)
    a.errors += 1
    b = ArmCounters()
    b.observe(4.0, rows=10)  # a batch of 10 rows, one call
    current = {"r1": {"champ": a}, "r2": {"champ": b, "canary": ArmCounters()}}
    w = window(current, base)
    assert w["champ"].requests == 1 + 10
    assert w["champ"].errors == 1 and w["champ"].decisions == 1 and w["champ"].positives == 1
    assert sum(w["champ"].latency) == 2  # two calls
    assert w["canary"].requests == 0
    # a restarted router reusing an instance id with smaller counts counts from zero
    assert window({"r1": {"champ": b}}, base)["champ"].requests == 10


def test_histogram_quantile() -> None:
    c = ArmCounters()
    rng = np.random.default_rng(0)
    values = rng.lognormal(mean=1.5, sigma=0.5, size=5000)
    for v in values:
        c.observe(float(v))
    p99 = c.latency_quantile_ms(0.99)
    assert p99 == pytest.approx(float(np.quantile(values, 0.99)), rel=0.2)
    assert histogram_quantile([0, 0], [1.0], 0.5) is None
    assert histogram_quantile([0, 5], [1.0], 0.99) == 1.0  # the open last bucket
    assert len(c.latency) == len(LATENCY_EDGES_MS) + 1


def test_coarsen_keeps_mass_and_makes_quantile_bins() -> None:
    rng = np.random.default_rng(1)
    champion, canary = ArmCounters(), ArmCounters()
    for s in rng.beta(1, 30, size=4000):
        champion.answer(float(s), bool(s > 0.1))
    for s in rng.beta(1, 30, size=1000):
        canary.answer(float(s), bool(s > 0.1))
    ref, oth = coarsen(champion.scores, canary.scores, 10)
    assert sum(ref) == 4000 and sum(oth) == 1000
    assert len(ref) == len(oth) and 5 <= len(ref) <= 11
    assert max(ref) < 4000 * 0.25  # roughly even bins of the champion
    assert len(champion.scores) == len(SCORE_EDGES) + 1


def _answered(scores: np.ndarray, threshold: float = 0.3, latency: float = 3.0) -> ArmCounters:
    c = ArmCounters()
    for s in scores:
        c.observe(latency)
        c.answer(float(s), bool(s >= threshold))
    return c


POLICY = RolloutPolicy(steps=[25, 50, 100], min_samples=200, score_bins=10)


def test_router_counters_feed_the_analysis() -> None:
    rng = np.random.default_rng(2)
    champ = _answered(rng.beta(1, 20, size=3000))
    good = _answered(rng.beta(1, 20, size=600))
    ch, ca = coarsen(champ.scores, good.scores, POLICY.score_bins)
    verdict = analyse(POLICY, arm_stats(champ, None, ch), arm_stats(good, None, ca))
    assert verdict.verdict is Verdict.PASS, verdict.reason

    inverted = _answered(1 - rng.beta(1, 20, size=600))
    ch, ca = coarsen(champ.scores, inverted.scores, POLICY.score_bins)
    verdict = analyse(POLICY, arm_stats(champ, None, ch), arm_stats(inverted, None, ca))
    assert verdict.verdict is Verdict.FAIL
    assert {"score_distance", "decision_agreement"} <= {c.name for c in verdict.failed}

    slow = _answered(rng.beta(1, 20, size=600), latency=300.0)
    ch, ca = coarsen(champ.scores, slow.scores, POLICY.score_bins)
    verdict = analyse(POLICY, arm_stats(champ, None, ch), arm_stats(slow, None, ca))
    assert [c.name for c in verdict.failed] == ["p99_ratio"]


def test_fallbacks_count_as_failures_of_the_arm() -> None:
    c = ArmCounters()
    for _ in range(100):
        c.observe(1.0)
    c.fallbacks, c.errors = 3, 2
    stats = arm_stats(c)
    assert stats.errors == 5 and stats.requests == 100


# -- rollout plumbing ------------------------------------------------------------------


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_events_map_the_state_machine_onto_the_event_contract() -> None:
    from driftloop.canary import RolloutRecord
    from driftloop.events import build_event

    champion = ArmRef(name="driftloop-fraud-v1", bento_tag="driftloop-fraud:v1")
    canary = ArmRef(name="driftloop-fraud-v2", bento_tag="driftloop-fraud:v2")
    state, _ = start_rollout(
        POLICY, model_name="fraud", champion=champion, canary=canary, now=T0, incident_id="inc-1"
    )
    record = RolloutRecord(
        state=state, challenger=canary, deadline=T0, window_started_at=T0, model_tag="fraud:v2"
    )
    state, actions = advance(state, None, T0)
    emit = actions[-1]
    name, payload = event_for(record, emit)
    assert name == "driftloop.rollout.started"
    assert payload["weights"] == {"driftloop-fraud:v1": 75, "driftloop-fraud:v2": 25}
    body = build_event(name, payload)  # validates against the payload model
    assert body["payload"]["incident_id"] == "inc-1"
    assert compared_arms(state) == (champion.name, canary.name)
    assert state.phase is Phase.CANARY


@pytest.mark.parametrize(
    "tag",
    ["driftloop-fraud:v202611251851454d8f", "svc:" + "x" * 80, "driftloop-fraud:1abc", "a:B_C"],
)
def test_arm_names_fit_the_arm_setting(tag: str) -> None:
    from driftloop.plane.base import ARM_NAME_PATTERN
    from driftloop.settings import Settings

    name = arm_name("fraud", tag)
    assert Settings(arm=name).arm == name and re.match(ARM_NAME_PATTERN, name)
    assert arm_name("fraud", tag) == name != arm_name("fraud", tag + "2")


def test_time_bound_covers_every_step() -> None:
    policy = RolloutPolicy(steps=[5, 25, 50, 100], bake_seconds=60,
                           evidence_deadline_seconds=900, post_promotion_guard_seconds=600)
    assert time_bound_seconds(policy, 10) >= 3 * 900 + 600
