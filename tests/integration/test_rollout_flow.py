"""The rollout flow against real arms, a real router and a real Prefect API.

One champion, one router and short bake times; each scenario runs the flow (a
real Prefect flow run) while a bounded client loop sends traffic through the
router, then checks what the client saw, the plane's weights, the ledger, the
registry stages and the events:

- a good challenger (the champion's model, saved again as a new version) walks
  25 % -> 50 % -> promoted, and the old champion is retired after the guard;
- challengers that fail requests, answer slowly, or invert their scores
  (``DRIFTLOOP_FAULT_*`` on the canary arm) are rolled back by themselves, the
  champion is back at 100 % and failed client requests all fell in the canary's
  share;
- with too little traffic the rollout aborts ("not enough evidence");
- the CLI's weights / promote / rollback / status act on the same rollout.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from driftloop import registry
from driftloop.canary import RolloutOptions, RolloutRunner, arm_name, bento_for_model
from driftloop.cli import app
from driftloop.events import read_events
from driftloop.ledger import Ledger
from driftloop.plane.local import LocalPlane
from driftloop.rollout import RolloutPolicy
from driftloop.routing import Arm, RouteTable, router_home
from driftloop.settings import Settings
from flows.rollout import rollout
from tests.fixtures.world import Server, World, beside, start_bentoml
from tests.integration._traffic import Result, Traffic, transactions

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POLICY = RolloutPolicy(
    steps=[25, 50, 100],
    bake_seconds=2,
    min_samples=100,
    score_bins=5,
    evidence_deadline_seconds=90,
    post_promotion_guard_seconds=2,
    max_p99_ratio=4.0,
    p99_floor_ms=250,  # p99s under ~250 ms are noise on a busy 2-core machine
    min_decision_agreement=0.8,
)
OPTIONS = RolloutOptions(analysis_interval_seconds=0.5, policy=POLICY)


def clone_model(tag: str) -> str:
    """The same model saved again as a new version: a challenger that is as good."""
    m = registry.load_model(tag)
    return registry.save_model(
        tag.split(":", 1)[0],
        booster=m.booster,
        encoder=m.encoder,
        threshold=m.threshold,
        metrics=m.metadata["metrics"],
        reference=m.reference(),
        lineage=registry.lineage_of(m.metadata).model_copy(update={"parent": tag}),
        profile=m.profile_json(),
        stage="candidate",
    )


@dataclass
class Stage:
    settings: Settings
    plane: LocalPlane
    runner: RolloutRunner
    router: Server
    templates: list[dict]
    champion_model: str
    champion_bento: str
    good_model: str
    good_bento: str
    other_model: str
    other_bento: str

    def champion(self) -> str:
        name = self.plane.desired().champion()
        assert name is not None
        return name


@pytest.fixture(scope="module")
def stage(
    world: World, tmp_path_factory: pytest.TempPathFactory, prefect_server: Any
) -> Iterator[Stage]:
    root = tmp_path_factory.mktemp("rollout")
    settings = world.settings().model_copy(update={"state_dir": root / "state"})
    env = pytest.MonkeyPatch()
    env.setenv("DRIFTLOOP_STATE_DIR", str(settings.state_dir))  # what the flow reads
    plane = LocalPlane(settings, ready_timeout=240)
    router: Server | None = None
    try:
        champion_bento = bento_for_model(world.model_tag)
        good = clone_model(world.model_tag)
        other = clone_model(world.model_tag)
        runner = RolloutRunner(settings, plane)

        def start_router() -> Server:
            return start_bentoml(
                "bentos.router:Router",
                {
                    **world.env,
                    "DRIFTLOOP_STATE_DIR": str(settings.state_dir),
                    "BENTOML_HOME": str(router_home(settings.state_dir, "fraud")),
                },
                root / "router.log",
            )

        # the router reads its routes per request: it starts while the champion does
        with beside(start_router, undo=Server.stop) as router_started:
            champion = runner.ensure_champion(champion_bento)
        router = router_started.result()
        baseline = Ledger.for_settings(settings).entries()
        assert [e.action for e in baseline] == ["baseline"]
        assert baseline[0].champion_tag == champion_bento and champion.bento_tag == champion_bento
        yield Stage(
            settings=settings,
            plane=plane,
            runner=runner,
            router=router,
            templates=transactions(world.transactions, 400),
            champion_model=world.model_tag,
            champion_bento=champion_bento,
            good_model=good,
            good_bento=bento_for_model(good),
            other_model=other,
            other_bento=bento_for_model(other),
        )
    finally:
        if router is not None:
            router.stop()
        plane.stop_all()
        env.undo()


def run_flow(
    stage: Stage,
    model_tag: str,
    bento_tag: str,
    incident: str,
    *,
    options: RolloutOptions = OPTIONS,
    concurrency: int = 16,
    rate: float | None = None,
) -> tuple[Any, list[Result], float]:
    """Run the flow under client traffic; returns its outcome, the answers and its end."""
    with Traffic(stage.router.url, stage.templates, concurrency=concurrency, rate=rate) as t:
        time.sleep(1.0)
        outcome = rollout(model_tag, bento_tag, incident_id=incident, options=options)
        ended = time.time()
        time.sleep(2.0)  # traffic after the end: the champion alone
    return outcome, t.results, ended


def breaches(url: str, reason: str, timeout: float = 10.0) -> dict[str, float]:
    """driftloop_rollout_breaches_total by reason, from the router's /metrics."""
    deadline = time.monotonic() + timeout
    found: dict[str, float] = {}
    while time.monotonic() < deadline and reason not in found:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        found = {
            s.labels["reason"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "driftloop_rollout_breaches_total"
        }
        time.sleep(0.5)
    return found


def rollout_events(api_url: str, incident: str, expect: str) -> list[str]:
    since = datetime.now(UTC) - timedelta(hours=1)
    deadline = time.monotonic() + 30
    names: list[str] = []
    while time.monotonic() < deadline:
        names = [e.event for e in read_events(api_url, since=since, incident_id=incident)]
        if expect in names:
            break
        time.sleep(0.5)
    return names


def test_good_challenger_is_promoted_through_every_step(stage: Stage, prefect_api_url: str) -> None:
    old_champion = stage.champion()
    outcome, results, _ = run_flow(stage, stage.good_model, stage.good_bento, "inc-good")

    assert outcome.phase == "promoted", outcome
    assert Counter(r.status for r in results)[200] == len(results)  # no client saw a failure
    entries = Ledger.for_settings(stage.settings).entries(incident_id="inc-good")
    assert [e.action for e in entries] == ["started", "stepped", "promoted", "completed"]
    canary = arm_name("fraud", stage.good_bento)
    assert [e.weights.get(canary) for e in entries[:3]] == [25, 50, 100]
    assert entries[0].analysis is None and entries[1].analysis["verdict"] == "pass"
    assert entries[2].champion_tag == stage.good_bento
    desired = stage.plane.desired()
    new = desired.champion()
    assert desired.weights == {new: 100} and desired.arms[new].bento_tag == stage.good_bento
    assert old_champion not in desired.arms and old_champion not in stage.plane.actual().arms
    assert any(r.arm == new for r in results)
    stages = {m.tag: m.stage for m in registry.list_models("fraud")}
    assert stages[stage.good_model] == "champion"
    assert stages[stage.champion_model] == "retired"
    names = rollout_events(prefect_api_url, "inc-good", "driftloop.rollout.promoted")
    assert names[:3] == [
        "driftloop.rollout.started",
        "driftloop.rollout.stepped",
        "driftloop.rollout.promoted",
    ]


@pytest.mark.parametrize(
    ("fault", "breached", "clients", "min_samples"),
    [
        ({"DRIFTLOOP_FAULT_ERROR_RATE": "1.0"}, "error_rate", 16, 100),
        # one scoring thread at +250 ms: queued requests wait up to clients x service time,
        # so the canary answers ~4 requests/s; every answer is slow, 40 show it
        ({"DRIFTLOOP_FAULT_LATENCY_MS": "250"}, "p99_ratio", 8, 40),
        ({"DRIFTLOOP_FAULT_INVERT_SCORES": "true"}, "score_distance", 16, 100),
    ],
    ids=["errors", "slow", "inverted"],
)
def test_bad_challenger_is_rolled_back_by_itself(
    stage: Stage,
    prefect_api_url: str,
    fault: dict[str, str],
    breached: str,
    clients: int,
    min_samples: int,
) -> None:
    champion = stage.champion()
    incident = f"inc-{breached}"
    policy = POLICY.model_copy(update={"min_samples": min_samples})
    options = OPTIONS.model_copy(update={"canary_env": fault, "policy": policy})
    outcome, results, ended = run_flow(
        stage, stage.other_model, stage.other_bento, incident, options=options,
        concurrency=clients,
    )

    assert outcome.phase == "rolled_back", outcome
    entries = Ledger.for_settings(stage.settings).entries(incident_id=incident)
    assert [e.action for e in entries] == ["started", "rolled_back"]
    assert breached in entries[-1].analysis["failed"], entries[-1].analysis
    # the champion is back at 100 %, the canary is gone
    desired = stage.plane.desired()
    assert desired.champion() == champion and desired.weights == {champion: 100}
    canary = arm_name("fraud", stage.other_bento)
    assert canary not in desired.arms and canary not in stage.plane.actual().arms
    # failed client requests all fell in the canary's share (25 % of the cards)
    arms = {champion: Arm(champion, "-"), canary: Arm(canary, "-")}
    step0 = RouteTable.build({champion: 75, canary: 25}, arms, champion)
    failed = [r for r in results if r.status != 200]
    elsewhere = [r for r in failed if step0.choose(r.card_id) != canary]
    assert not elsewhere, elsewhere[:5]
    assert len(failed) <= 0.30 * len(results)
    assert bool(failed) is (breached == "error_rate")
    after = [r for r in results if r.at > ended]  # the canary is gone: all champion
    assert after and all(r.status == 200 and r.arm == champion for r in after)
    stages = {m.tag: m.stage for m in registry.list_models("fraud")}
    assert stages[stage.other_model] == "rejected"
    # the series behind the CanaryBreach alert
    assert breaches(stage.router.url, breached).get(breached, 0) >= 1
    names = rollout_events(prefect_api_url, incident, "driftloop.rollout.rolled_back")
    assert names == ["driftloop.rollout.started", "driftloop.rollout.rolled_back"]


def test_low_traffic_is_not_enough_evidence_never_a_promotion(stage: Stage) -> None:
    champion = stage.champion()
    policy = POLICY.model_copy(update={"evidence_deadline_seconds": 6.0})
    options = OPTIONS.model_copy(update={"policy": policy})
    outcome, results, _ = run_flow(
        stage,
        stage.other_model,
        stage.other_bento,
        "inc-quiet",
        options=options,
        concurrency=1,
        rate=4.0,
    )
    assert outcome.phase == "aborted", outcome
    assert "not enough evidence" in outcome.reason
    entries = Ledger.for_settings(stage.settings).entries(incident_id="inc-quiet")
    assert [e.action for e in entries] == ["started", "aborted"]
    desired = stage.plane.desired()
    assert desired.champion() == champion and desired.weights == {champion: 100}
    assert all(r.status == 200 for r in results)


def test_cli_acts_on_the_rollout_with_human_ledger_entries(stage: Stage) -> None:
    champion = stage.champion()
    policy = POLICY.model_copy(update={"evidence_deadline_seconds": 600, "bake_seconds": 600})
    record = stage.runner.begin(
        stage.other_model,
        stage.other_bento,
        incident_id="inc-cli",
        policy=policy,
        warmup_timeout_seconds=0,  # no traffic in this test
    )
    canary = record.state.canary.name
    cli = CliRunner()

    shown = cli.invoke(app, ["status", "--json"])
    assert shown.exit_code == 0, shown.output
    assert '"phase": "canary"' in shown.output and canary in shown.output

    moved = cli.invoke(app, ["weights", "champion=70", "canary=30"])
    assert moved.exit_code == 0, moved.output
    assert stage.plane.desired().weights == {champion: 70, canary: 30}

    promoted = cli.invoke(app, ["promote", "--reason", "looks good to me"])
    assert promoted.exit_code == 0, promoted.output
    desired = stage.plane.desired()
    assert desired.champion() == canary and desired.weights[canary] == 100

    back = cli.invoke(app, ["rollback"])
    assert back.exit_code == 0, back.output
    desired = stage.plane.desired()
    assert desired.champion() == champion and desired.weights == {champion: 100}
    assert canary not in desired.arms

    entries = Ledger.for_settings(stage.settings).entries(incident_id="inc-cli")
    assert [(e.action, e.actor) for e in entries] == [
        ("started", "system"),
        ("stepped", "human"),
        ("promoted", "human"),
        ("rolled_back", "human"),
    ]
    text = cli.invoke(app, ["status"])
    assert text.exit_code == 0 and "rolled_back" in text.output
