"""Trigger hygiene: one retrain per incident, cool-down, in-progress merge, data-quality block."""

from __future__ import annotations

import json
import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from driftloop import hygiene
from driftloop.hygiene import Decision, HygienePolicy, MonitorVerdict, RetrainState

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = HygienePolicy(cooldown=timedelta(minutes=30))


def _claim(state_dir: Path, incident: str, now: datetime = T0, **kw: object) -> Decision:
    return hygiene.claim(state_dir, "fraud", incident, policy=POLICY, now=now, **kw)  # type: ignore[arg-type]


def _claim_in_process(args: tuple[str, str, int]) -> bool:
    state_dir, incident, i = args
    decision = hygiene.claim(
        Path(state_dir),
        "fraud",
        incident,
        policy=POLICY,
        trigger_event_id=f"event-{i}",
        reason="driftloop.drift.detected",
    )
    return decision.proceed


# -- the pure rule -------------------------------------------------------------------


def test_a_fresh_model_may_retrain() -> None:
    assert hygiene.decide(RetrainState(model_name="fraud"), "inc-1", T0, POLICY).proceed


def test_decide_needs_an_aware_time() -> None:
    with pytest.raises(ValueError):
        hygiene.decide(RetrainState(model_name="fraud"), "inc-1", T0.replace(tzinfo=None), POLICY)


@pytest.mark.parametrize(
    ("verdict", "blocks"),
    [("quality_failed", True), ("ok", False), ("drift", False), ("insufficient", False)],
)
def test_only_a_data_quality_verdict_blocks(verdict: str, blocks: bool) -> None:
    monitor = MonitorVerdict(verdict=verdict, at=T0, source="test", detail="amount x100")
    d = hygiene.decide(RetrainState(model_name="fraud"), "inc-1", T0, POLICY, monitor)
    assert d.proceed is not blocks
    if blocks:
        assert d.code == "data_quality" and "amount x100" in d.reason


def test_a_running_claim_older_than_stale_after_no_longer_blocks(tmp_path: Path) -> None:
    assert _claim(tmp_path, "inc-1").proceed
    later = T0 + POLICY.stale_after + timedelta(seconds=1)
    # the crashed run's incident may be claimed again, and other incidents are not merged
    assert _claim(tmp_path, "inc-1", later).proceed
    state = hygiene.read_state(tmp_path, "fraud")
    assert state.incidents["inc-1"].started_at == later


# -- the locked state file -----------------------------------------------------------


def test_a_burst_of_ten_events_for_one_incident_gives_exactly_one_retrain(
    tmp_path: Path,
) -> None:
    """Ten processes claim the same incident at once: one proceeds, nine are recorded."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(10) as pool:
        results = pool.map(_claim_in_process, [(str(tmp_path), "inc-burst", i) for i in range(10)])
    assert sum(results) == 1
    state = hygiene.read_state(tmp_path, "fraud")
    assert list(state.incidents) == ["inc-burst"]
    assert state.incidents["inc-burst"].status == "running"
    assert len(state.skips) == 9
    assert {s.code for s in state.skips} == {"duplicate_incident"}
    assert all("inc-burst already has a retrain" in s.reason for s in state.skips)
    winner = state.incidents["inc-burst"].trigger_event_id
    assert winner not in {s.trigger_event_id for s in state.skips}


def test_the_incident_stays_deduplicated_after_its_retrain_finished(tmp_path: Path) -> None:
    assert _claim(tmp_path, "inc-1").proceed
    hygiene.finish(tmp_path, "fraud", "inc-1", "rejected", model_tag="fraud:v1", now=T0)
    later = T0 + timedelta(days=3)  # long after the cool-down
    d = _claim(tmp_path, "inc-1", later)
    assert not d.proceed and d.code == "duplicate_incident"
    assert "rejected" in d.reason and "fraud:v1" in d.reason


def test_a_second_incident_inside_the_cooldown_is_skipped_with_its_reason(
    tmp_path: Path,
) -> None:
    assert _claim(tmp_path, "inc-1").proceed
    done = T0 + timedelta(minutes=5)
    hygiene.finish(tmp_path, "fraud", "inc-1", "registered", model_tag="fraud:v1", now=done)

    d = _claim(tmp_path, "inc-2", done + timedelta(minutes=10), trigger_event_id="ev-2")
    assert not d.proceed and d.code == "cooldown"
    assert "inc-1" in d.reason and "12:35:00" in d.reason  # cool-down ends 30 min after finish

    # recorded, and readable by anyone from the state file
    path = hygiene.state_path(tmp_path, "fraud")
    raw = json.loads(path.read_text())
    [skip] = raw["skips"]
    assert skip["code"] == "cooldown" and skip["incident_id"] == "inc-2"
    assert skip["trigger_event_id"] == "ev-2" and "cool-down" in skip["reason"]
    assert "inc-2" not in raw["incidents"]

    # after the cool-down the same incident may retrain
    assert _claim(tmp_path, "inc-2", done + timedelta(minutes=31)).proceed


def test_a_new_incident_is_merged_into_a_running_retrain(tmp_path: Path) -> None:
    assert _claim(tmp_path, "inc-1").proceed
    d = _claim(tmp_path, "inc-2", T0 + timedelta(minutes=1))
    assert not d.proceed and d.code == "in_progress" and "inc-1" in d.reason


def test_a_failed_retrain_may_be_retried_and_starts_no_cooldown(tmp_path: Path) -> None:
    assert _claim(tmp_path, "inc-1").proceed
    hygiene.finish(tmp_path, "fraud", "inc-1", "failed", detail="DataError: boom", now=T0)
    assert _claim(tmp_path, "inc-2", T0 + timedelta(minutes=1)).proceed
    hygiene.finish(tmp_path, "fraud", "inc-2", "failed", now=T0 + timedelta(minutes=2))
    assert _claim(tmp_path, "inc-1", T0 + timedelta(minutes=3)).proceed


def test_a_data_quality_verdict_blocks_a_retrain_and_is_recorded(tmp_path: Path) -> None:
    monitor = MonitorVerdict(
        verdict="quality_failed", at=T0, source="event driftloop.data_quality.failed x"
    )
    d = _claim(tmp_path, "inc-1", monitor=monitor)
    assert not d.proceed and d.code == "data_quality"
    state = hygiene.read_state(tmp_path, "fraud")
    assert state.incidents == {} and state.skips[0].code == "data_quality"
    # once the monitor says ok again, the same incident may retrain
    ok = MonitorVerdict(verdict="ok", at=T0 + timedelta(minutes=15), source="event")
    assert _claim(tmp_path, "inc-1", T0 + timedelta(minutes=15), monitor=ok).proceed


def test_models_do_not_share_state(tmp_path: Path) -> None:
    assert _claim(tmp_path, "inc-1").proceed
    other = hygiene.claim(tmp_path, "churn", "inc-1", policy=POLICY, now=T0)
    assert other.proceed


def test_skips_are_bounded(tmp_path: Path) -> None:
    assert _claim(tmp_path, "inc-1").proceed
    for _ in range(hygiene.MAX_SKIPS + 5):
        _claim(tmp_path, "inc-1")
    assert len(hygiene.read_state(tmp_path, "fraud").skips) == hygiene.MAX_SKIPS


def test_skip_markdown_names_reason_and_incident() -> None:
    d = Decision(proceed=False, code="cooldown", reason="cool-down: wait")
    md = hygiene.skip_markdown("fraud", "inc-9", d, reason="driftloop.drift.detected")
    assert "cool-down: wait" in md and "inc-9" in md and "driftloop.drift.detected" in md


def test_invalid_model_names_are_refused(tmp_path: Path) -> None:
    from driftloop.errors import ConfigError

    with pytest.raises(ConfigError):
        hygiene.state_path(tmp_path, "../escape")


def test_policy_from_settings() -> None:
    from driftloop.settings import Settings

    policy = HygienePolicy.from_settings(Settings(retrain_cooldown_minutes=7.5))
    assert policy.cooldown == timedelta(minutes=7.5)


def test_the_monitor_state_file_is_read_and_the_newest_verdict_wins(tmp_path: Path) -> None:
    from driftloop import monitoring

    assert hygiene.latest_monitor_verdict(None, "fraud", state_dir=tmp_path) is None
    assert hygiene.monitor_state_path(tmp_path, "fraud") == monitoring.state_path(tmp_path, "fraud")
    state = monitoring.MonitorState(
        model_name="fraud", last_verdict="quality_failed", updated_at=T0
    )
    monitoring.save_state(tmp_path, state)
    verdict = hygiene.latest_monitor_verdict(None, "fraud", state_dir=tmp_path)
    assert verdict is not None and verdict.blocks_retrain and "monitor state" in verdict.source
    d = _claim(tmp_path, "inc-1", monitor=verdict)
    assert not d.proceed and d.code == "data_quality"

    monitoring.save_state(
        tmp_path, state.model_copy(update={"last_verdict": "drift", "updated_at": T0})
    )
    assert not hygiene.latest_monitor_verdict(None, "fraud", state_dir=tmp_path).blocks_retrain  # type: ignore[union-attr]


def test_a_crashed_run_releases_its_claim(tmp_path: Path) -> None:
    assert _claim(tmp_path, "inc-1", flow_run_id="run-1").proceed
    assert not _claim(tmp_path, "inc-2", T0 + timedelta(minutes=1)).proceed  # in progress
    assert hygiene.release_run(tmp_path, "fraud", "run-other") == []
    assert hygiene.release_run(tmp_path, "fraud", "run-1", detail="crashed") == ["inc-1"]
    record = hygiene.read_state(tmp_path, "fraud").incidents["inc-1"]
    assert record.status == "failed" and record.detail == "crashed"
    assert _claim(tmp_path, "inc-2", T0 + timedelta(minutes=2)).proceed
