"""The demo end to end: ``driftloop demo`` in a compressed mode, as a user runs it.

Two demos run side by side in subprocesses (``tests/e2e/demos.py``); each test then
asserts from the server's events and the promotion ledger that one incident went
drift -> retrain -> registered -> rollout steps -> promoted (or, with a challenger
forced to fail, rolled back), that no acknowledged prediction is missing from Delta,
and that no automation action failed; finally ``driftloop demo --stop`` stops everything by PID and
the module checks it did.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from driftloop import events
from driftloop.demo import DemoRun
from driftloop.ledger import Ledger
from driftloop.plane.base import desired_state_path, load_desired_state
from driftloop.settings import Settings
from tests.e2e.demos import Demos

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[DemoRun, str]]]:
    """Both demo variants run to their end; stop what they kept running (``--stop``)
    afterwards, and check that it stopped."""
    runner = Demos(tmp_path_factory.mktemp("demos"))
    try:
        yield runner.start().wait()
    finally:
        problems = runner.stop()
        assert not problems, problems


@pytest.fixture
def demo_run(
    demos: dict[str, tuple[DemoRun, str]], request: pytest.FixtureRequest
) -> tuple[DemoRun, str]:
    """One variant's finished demo (see ``demos``)."""
    return demos[request.param]


def _incident_events(run: DemoRun) -> list[events.ReceivedEvent]:
    assert run.api_url and run.incident_id, "the demo recorded no incident"
    since = run.started_at - timedelta(seconds=5)
    return events.read_events(
        run.api_url, prefix="driftloop.", since=since, incident_id=run.incident_id
    )


def _settings(run: DemoRun) -> Settings:
    return Settings(
        data_root=run.env["DRIFTLOOP_DATA_ROOT"],
        state_dir=Path(run.env["DRIFTLOOP_STATE_DIR"]),
        model_name=run.model_name,
    )


def _assert_nothing_lost(run: DemoRun) -> None:
    from driftloop import predlog

    acked = [
        line for line in (Path(run.run_dir) / "acknowledged.txt").read_text().splitlines() if line
    ]
    assert len(acked) > 1000
    frame = predlog.read_predictions(
        _settings(run), run.started_at - timedelta(minutes=1), run.started_at + timedelta(hours=1)
    )
    missing = set(acked) - set(frame["request_id"].to_list())
    assert not missing, f"{len(missing)} acknowledged predictions missing from Delta"


def _assert_no_failed_actions(run: DemoRun) -> None:
    log = Path(run.run_dir) / "prefect" / "server.log"
    failed = [
        line for line in log.read_text(errors="replace").splitlines() if "Action failed" in line
    ]
    assert not failed, "\n".join(failed)


def _assert_artifact(run: DemoRun) -> None:
    import httpx

    from driftloop.timeline import artifact_key

    body = {"artifacts": {"key": {"any_": [artifact_key(run.incident_id)]}}}
    found = httpx.post(f"{run.api_url}/artifacts/filter", json=body, timeout=10).json()
    assert found and "time to mitigate" in found[0]["data"]


def _order(evs: list[events.ReceivedEvent], names: list[str]) -> list[str]:
    """The names of ``evs`` in time order, keeping only ``names`` and collapsing repeats."""
    out: list[str] = []
    for e in sorted(evs, key=lambda e: e.occurred):
        short = e.event.removeprefix("driftloop.")
        if short in names and (not out or out[-1] != short):
            out.append(short)
    return out


@pytest.mark.parametrize("demo_run", ["promote"], indirect=True)
def test_demo_promotes_the_retrained_model(demo_run: tuple[DemoRun, str]) -> None:
    run, output = demo_run
    assert run.outcome == "promoted", output
    evs = _incident_events(run)
    assert {e.incident_id for e in evs} == {run.incident_id}
    flow = _order(
        evs,
        [
            "drift.detected",
            "performance.degraded",
            "model.registered",
            "rollout.started",
            "rollout.stepped",
            "rollout.promoted",
        ],
    )
    alarm = flow[0]
    assert alarm in ("drift.detected", "performance.degraded"), flow
    rest = [f for f in flow if f not in ("drift.detected", "performance.degraded")]
    assert rest[:2] == ["model.registered", "rollout.started"], flow
    assert rest[-1] == "rollout.promoted" and "rollout.stepped" in rest, flow
    injected = run.injected_at
    assert injected is not None
    first_alarm = min(e.occurred for e in evs if e.event.endswith(alarm))
    assert first_alarm > injected
    one_each = [
        "driftloop.model.registered",
        "driftloop.rollout.started",
        "driftloop.rollout.promoted",
    ]
    assert all(sum(e.event == n for e in evs) == 1 for n in one_each)

    ledger = Ledger.for_settings(_settings(run))
    assert [e.action for e in ledger.entries(model_name=run.model_name)][0] == "baseline"
    actions = [e.action for e in ledger.entries(incident_id=run.incident_id)]
    assert actions[0] == "started" and "stepped" in actions and "promoted" in actions, actions
    assert actions.index("promoted") > actions.index("stepped")

    # the registered challenger now serves everything
    registered = next(e for e in evs if e.event == "driftloop.model.registered")
    desired = load_desired_state(desired_state_path(_settings(run).state_dir, run.model_name))
    assert desired is not None
    champion = desired.champion()
    assert champion is not None
    assert desired.arms[champion].bento_tag == registered.payload["bento_tag"]
    assert desired.weights.get(champion) == 100

    _assert_nothing_lost(run)
    _assert_no_failed_actions(run)
    _assert_artifact(run)
    timeline = Path(run.timeline_path or "")
    assert timeline.with_suffix(".md").exists() and timeline.with_suffix(".png").exists()


@pytest.mark.parametrize("demo_run", ["rollback"], indirect=True)
def test_a_failing_canary_is_rolled_back(demo_run: tuple[DemoRun, str]) -> None:
    run, output = demo_run
    assert run.outcome == "rolled_back", output
    evs = _incident_events(run)
    flow = _order(evs, ["model.registered", "rollout.started", "rollout.rolled_back"])
    assert flow == ["model.registered", "rollout.started", "rollout.rolled_back"], flow
    assert not [e for e in evs if e.event == "driftloop.rollout.promoted"]
    rolled = next(e for e in evs if e.event == "driftloop.rollout.rolled_back")
    assert "error_rate" in str(rolled.payload.get("reason")) + str(rolled.payload.get("analysis"))

    ledger = Ledger.for_settings(_settings(run))
    actions = [e.action for e in ledger.entries(incident_id=run.incident_id)]
    assert actions[0] == "started" and actions[-1] in ("rolled_back", "aborted"), actions
    baseline = ledger.entries(model_name=run.model_name)[0]
    desired = load_desired_state(desired_state_path(_settings(run).state_dir, run.model_name))
    assert desired is not None
    champion = desired.champion()
    assert champion is not None
    assert desired.arms[champion].bento_tag == baseline.champion_tag  # the old champion stays
    assert desired.weights.get(champion) == 100

    _assert_nothing_lost(run)
    _assert_no_failed_actions(run)
