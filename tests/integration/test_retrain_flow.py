"""Retrain on events, end to end on a real Prefect server, process worker and stores.

A concept-drift world of its own (Delta history, Feast repo, a champion trained
before the drift) under a model name of its own, so the session's ``world`` stays
untouched; BentoML uses the session's store (``BENTOML_HOME`` is fixed per process
at its first use).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl
import pytest

from driftloop import events, hygiene, jobs, local_stack, registry, retraining
from driftloop.prefect_local import LocalPrefectServer, LocalWorker
from driftloop.settings import Settings
from driftloop.simulate import SimulationConfig
from driftloop.training import TrainConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MODEL = "fraud_drift"
FAST = TrainConfig(n_estimators=60, max_depth=5, learning_rate=0.15, early_stopping_rounds=10)


@dataclass
class DriftWorld:
    settings: Settings
    env: dict[str, str]
    champion: str
    drift_at: datetime


@pytest.fixture(scope="module")
def drift_world(world: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DriftWorld]:
    root = tmp_path_factory.mktemp("drift-world")
    env = {
        **world.env,
        "DRIFTLOOP_DATA_ROOT": str(root / "data"),
        "DRIFTLOOP_STATE_DIR": str(root / "state"),
        "DRIFTLOOP_MODEL_NAME": MODEL,
        "DRIFTLOOP_HOME": str(REPO),
    }
    settings = Settings(
        data_root=env["DRIFTLOOP_DATA_ROOT"],
        state_dir=Path(env["DRIFTLOOP_STATE_DIR"]),
        bentoml_home=Path(env["DRIFTLOOP_BENTOML_HOME"]),
        feast_repo=Path(env["DRIFTLOOP_FEAST_REPO"]),
        model_name=MODEL,
    )
    # recent history, so that "the last 14 days with labels arrived by now" is all of it
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=8)
    cfg = SimulationConfig(
        n_events=40_000,
        seed=5,
        scenario="concept_drift",
        start=start,
        days=7.5,
        drift_start=start + timedelta(days=3),
    )
    jobs.generate_history(settings, cfg)
    history = jobs.load_history(settings)
    jobs.prepare_features(settings, history, materialize=False)
    champion, _ = jobs.train_and_register(
        settings,
        history.filter(pl.col("event_timestamp") < cfg.drift_at),
        FAST,
        as_of=cfg.drift_at,
        stage="champion",
    )
    yield DriftWorld(settings=settings, env=env, champion=champion, drift_at=cfg.drift_at)


def _drift_event(incident: str) -> events.DriftDetected:
    now = datetime.now(UTC)
    return events.DriftDetected(
        model_name=MODEL,
        incident_id=incident,
        window_start=now - timedelta(hours=1),
        window_end=now,
        rows=5_000,
        drift_share=0.3,
        drifted_columns=["amount", "category"],
    )


def _wait(check: Callable[[], Any], timeout: float, what: str, info: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{info()}")
        time.sleep(0.5)


def _read(api_url: str, name: events.EventName, incident: str, since: datetime) -> list[Any]:
    return events.read_events(api_url, names=[name], incident_id=incident, since=since)


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.mark.slow
def test_drift_event_retrains_gates_builds_and_announces(
    drift_world: DriftWorld,
    prefect_server: LocalPrefectServer,
    prefect_api_url: str,
    prefect_worker: Callable[..., LocalWorker],
) -> None:
    """A burst of 10 drift events for one incident -> one retrain -> model, Bento, event.

    Then a second incident inside the cool-down -> a run that skips, with its reason.
    """
    import bentoml

    api = prefect_api_url
    pool = f"retrain-{uuid.uuid4().hex[:6]}"  # a pool of our own: no other test's worker
    worker = prefect_worker(pool, env=drift_world.env, cwd=REPO)
    local_stack.deploy(api, prefect_server.home, drift_world.env, names=["retrain"], pool=pool)
    dep = local_stack.deployment_id(api, "retrain", "retrain")
    try:

        def info() -> str:
            runs = local_stack.flow_runs(api, dep)
            states = [
                (r["name"], r["state_type"], (r.get("state") or {}).get("message")) for r in runs
            ]
            return (
                f"runs: {states}\nworker log:\n{worker.log_tail(60)}\n"
                f"server log:\n{prefect_server.log_tail(20)}"
            )

        before = {m.tag for m in registry.list_models(MODEL)}
        since = datetime.now(UTC) - timedelta(seconds=5)
        incident = f"inc-{uuid.uuid4().hex[:8]}"
        ids = [
            events.emit(api, events.EventName.DRIFT_DETECTED, _drift_event(incident))
            for _ in range(10)
        ]

        [registered] = _wait(
            lambda: _read(api, events.EventName.MODEL_REGISTERED, incident, since),
            240,
            "driftloop.model.registered",
            info,
        )
        payload = events.parse_payload(registered)
        assert isinstance(payload, events.ModelRegistered)
        assert payload.incident_id == incident
        assert payload.parent_tag == drift_world.champion
        assert payload.gate["passed"] is True
        assert payload.gate["challenger"] > payload.gate["champion"]

        # a new model, with its lineage, and a Bento pinned to it
        new = [m for m in registry.list_models(MODEL) if m.tag not in before]
        assert [m.tag for m in new] == [payload.model_tag]
        lineage = new[0].lineage
        assert new[0].stage == "candidate"
        assert lineage.incident_id == incident
        assert lineage.trigger_event in ids
        assert lineage.parent == drift_world.champion
        assert lineage.gate is not None and lineage.gate["passed"] is True
        assert lineage.data_version == 0 and lineage.data_window_end is not None
        assert lineage.model_extra and lineage.model_extra["reason"] == "driftloop.drift.detected"
        assert lineage.model_extra["bento_tag"] == payload.bento_tag
        bento = bentoml.bentos.get(payload.bento_tag)
        assert bento.info.labels["model_tag"] == payload.model_tag

        # all ten triggered runs end; one retrained, the rest were cancelled or skipped
        def triggered() -> list[dict[str, Any]]:
            runs = local_stack.flow_runs(api, dep)  # the weekly schedule's runs are not ours
            return [r for r in runs if (r.get("created_by") or {}).get("type") == "AUTOMATION"]

        runs = _wait(
            lambda: (
                (
                    (rs := triggered())
                    and len(rs) == 10
                    and all(r["state_type"] in TERMINAL for r in rs)
                )
                and rs
            ),
            120,
            "the burst's ten runs to finish",
            info,
        )
        assert sum(r["state_type"] == "COMPLETED" for r in runs) >= 1
        assert not [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")], info()
        time.sleep(1.0)  # events are stored in batches
        assert len(_read(api, events.EventName.MODEL_REGISTERED, incident, since)) == 1
        state = hygiene.read_state(drift_world.settings.state_dir, MODEL)
        assert state.incidents[incident].status == "registered"
        skipped = _read(api, events.EventName.RETRAIN_SKIPPED, incident, since)
        assert all("already has a retrain" in e.payload["reason"] for e in skipped)
        cancelled = [r for r in runs if r["state_type"] == "CANCELLED"]
        assert len(skipped) + len(cancelled) == 9
        assert all("concurrency limit" in r["state"]["message"] for r in cancelled)

        # the gate verdict is a table artifact of the run
        arts = httpx.post(
            f"{api}/artifacts/filter",
            json={"artifacts": {"key": {"any_": ["retrain-gate-fraud-drift"]}}},
        ).json()
        assert arts and arts[0]["type"] == "table"

        # a second incident inside the cool-down: the run starts, skips, says why
        second = f"inc-{uuid.uuid4().hex[:8]}"
        events.emit(api, events.EventName.DRIFT_DETECTED, _drift_event(second))
        [skip] = _wait(
            lambda: _read(api, events.EventName.RETRAIN_SKIPPED, second, since),
            120,
            "driftloop.retrain.skipped for the second incident",
            info,
        )
        assert skip.payload["code"] == "cooldown" and "cool-down" in skip.payload["reason"]
        assert {m.tag for m in registry.list_models(MODEL)} == before | {payload.model_tag}
        state = hygiene.read_state(drift_world.settings.state_dir, MODEL)
        assert state.skips[-1].incident_id == second and state.skips[-1].code == "cooldown"
    finally:
        worker.stop()
        local_stack.remove_deployment(api, dep)


def test_a_challenger_trained_on_shuffled_labels_is_rejected_with_an_event(
    drift_world: DriftWorld, prefect_api_url: str, tmp_path: Path
) -> None:
    """The flow's steps without the flow: the challenger is worse, so model.rejected."""
    # hygiene state of its own: this rejection starts no cool-down for the other tests
    settings = drift_world.settings.model_copy(update={"state_dir": tmp_path})
    incident = f"inc-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    params = retraining.resolve_params(
        retraining.RetrainParams(incident_id=incident, reason="test"), settings, now
    )
    assert retraining.check_hygiene(settings, params, api_url=prefect_api_url).proceed
    window = retraining.load_training_window(settings, params)
    labels = window.transactions["is_fraud"].to_numpy()
    window.transactions = window.transactions.with_columns(
        pl.Series("is_fraud", np.random.default_rng(1).permutation(labels))
    )
    tag, result = retraining.train_challenger(
        settings, params, window, drift_world.champion, config=FAST
    )
    frame = retraining.gate_window(settings, window, result.metrics.n)
    verdict = retraining.run_gate(settings, tag, drift_world.champion, frame)
    assert not verdict.passed

    outcome = retraining.reject(settings, params, verdict, api_url=prefect_api_url)
    assert outcome.status == "rejected" and outcome.event_id
    events.wait_for_event(prefect_api_url, outcome.event_id)
    [event] = _read(prefect_api_url, events.EventName.MODEL_REJECTED, incident, now - timedelta(1))
    payload = events.parse_payload(event)
    assert isinstance(payload, events.ModelRejected)
    assert payload.model_name == MODEL and payload.incident_id == incident
    assert payload.model_tag == tag and "does not beat champion" in payload.reason
    info = next(m for m in registry.list_models(MODEL) if m.tag == tag)
    assert info.stage == "rejected"
    assert info.lineage.gate is not None and info.lineage.gate["passed"] is False
    assert info.lineage.incident_id == incident and info.lineage.parent == drift_world.champion
    assert hygiene.read_state(tmp_path, MODEL).incidents[incident].status == "rejected"


def test_warm_start_continues_the_champion_and_records_it(
    drift_world: DriftWorld, tmp_path: Path
) -> None:
    settings = drift_world.settings.model_copy(update={"state_dir": tmp_path})
    params = retraining.resolve_params(
        retraining.RetrainParams(mode="warm_start", reason="test"), settings, datetime.now(UTC)
    )
    window = retraining.load_training_window(settings, params)
    config = FAST.model_copy(update={"warm_start_rounds": 10})
    tag, result = retraining.train_challenger(
        settings, params, window, drift_world.champion, config=config
    )
    champion = registry.load_model(drift_world.champion)
    assert result.booster.num_boosted_rounds() > champion.booster.num_boosted_rounds()
    info = next(m for m in registry.list_models(MODEL) if m.tag == tag)
    assert info.lineage.mode == "warm_start" and info.lineage.parent == drift_world.champion
    assert info.stage == "candidate"
    registry.set_stage(tag, "rejected")  # keep the registry of the other tests tidy


def test_a_window_without_enough_labels_is_skipped_not_failed(
    drift_world: DriftWorld,
    prefect_api_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flow itself, in this process: too few labels -> a skip with its reason."""
    import sys

    sys.path.insert(0, str(REPO))
    from flows.retrain import retrain

    for key, value in {**drift_world.env, "DRIFTLOOP_STATE_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    incident = f"inc-{uuid.uuid4().hex[:8]}"
    since = datetime.now(UTC) - timedelta(seconds=5)
    params = retraining.RetrainParams(incident_id=incident, min_positives=10**6)
    outcome = retrain(params)
    assert outcome.status == "skipped" and "wait for labels" in outcome.reason
    assert outcome.event_id is not None
    events.wait_for_event(prefect_api_url, outcome.event_id)
    [skip] = _read(prefect_api_url, events.EventName.RETRAIN_SKIPPED, incident, since)
    assert skip.payload["code"] == "insufficient_data"
    state = hygiene.read_state(tmp_path, MODEL)
    assert state.incidents[incident].status == "failed"  # may run again once labels arrive
    assert state.skips[-1].code == "insufficient_data"
    # and when labels suffice, the same incident may retrain
    decision = hygiene.decide(state, incident, datetime.now(UTC), hygiene.HygienePolicy())
    assert decision.proceed


def test_a_data_quality_failure_read_from_the_server_blocks_a_retrain(
    prefect_api_url: str, tmp_path: Path
) -> None:
    model = f"dq{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC)
    assert hygiene.latest_monitor_verdict(prefect_api_url, model) is None
    eid = events.emit(
        prefect_api_url,
        events.EventName.DATA_QUALITY_FAILED,
        events.DataQualityFailed(model_name=model, failed_checks=["amount in cents (x100)"]),
    )
    events.wait_for_event(prefect_api_url, eid)
    verdict = hygiene.latest_monitor_verdict(prefect_api_url, model)
    assert verdict is not None and verdict.blocks_retrain and "x100" in verdict.detail

    settings = Settings(state_dir=tmp_path, model_name=model)
    params = retraining.resolve_params(retraining.RetrainParams(), settings, now)
    decision = retraining.check_hygiene(settings, params, api_url=prefect_api_url)
    assert not decision.proceed and decision.code == "data_quality"

    # a later healthy monitor run lifts the block
    window = {"window_start": now - timedelta(hours=1), "window_end": now, "rows": 100}
    ok = events.MonitorCompleted(model_name=model, drift_share=0.0, verdict="ok", **window)
    events.wait_for_event(
        prefect_api_url, events.emit(prefect_api_url, events.EventName.MONITOR_COMPLETED, ok)
    )
    assert not hygiene.latest_monitor_verdict(prefect_api_url, model).blocks_retrain  # type: ignore[union-attr]
    assert retraining.check_hygiene(settings, params, api_url=prefect_api_url).proceed


@pytest.mark.slow
def test_deploy_all_creates_every_deployment_schedule_and_trigger(
    prefect_server: LocalPrefectServer, prefect_api_url: str, tmp_path: Path
) -> None:
    """``prefect --no-prompt deploy --all`` from the checkout, as ``driftloop up`` runs it.

    The one change to prefect.yaml: its work pool, renamed to one no worker polls, so
    the schedules of the session's shared server start nothing anywhere.
    """
    import yaml

    api = prefect_api_url
    pool = f"deploy-all-{uuid.uuid4().hex[:6]}"
    httpx.post(f"{api}/work_pools/", json={"name": pool, "type": "process"}).raise_for_status()
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for d in config["deployments"]:
        d["work_pool"] = {**d["work_pool"], "name": pool}
    copy = tmp_path / "prefect.yaml"
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    local_stack.deploy(api, prefect_server.home, {"DRIFTLOOP_HOME": str(REPO)}, prefect_file=copy)
    names = {
        "monitor": "monitor",
        "retrain": "retrain",
        "materialize": "materialize",
        "maintain-logs": "maintain-logs",
        "rollout": "rollout",
    }
    ids = {d: local_stack.deployment_id(api, flow, d) for d, flow in names.items()}
    try:
        automations = httpx.post(f"{api}/automations/filter", json={}).json()
        owned: dict[str, list[str]] = {}
        for a in automations:
            owner = a["trigger"].get("match_related") or {}
            for d, dep in ids.items():
                if any(dep in str(v) for v in owner.values()) or any(
                    dep in str(act.get("deployment_id")) for act in a["actions"]
                ):
                    owned.setdefault(d, []).append(a["name"])
        assert sorted(owned["retrain"]) == ["retrain-on-degraded-performance", "retrain-on-drift"]
        assert owned["rollout"] == ["rollout-on-registered-model"]
        assert set(owned) == {"retrain", "rollout"}
        for d, dep in ids.items():
            got = httpx.get(f"{api}/deployments/{dep}").json()
            assert got["work_pool_name"] == pool
            assert got["job_variables"]["env"] == {"OMP_WAIT_POLICY": "PASSIVE"}
            [step] = got["pull_steps"]
            assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
            assert bool(got["schedules"]) == (d != "rollout"), d
            strategy = (got.get("concurrency_options") or {}).get("collision_strategy")
            assert strategy == ("ENQUEUE" if d == "rollout" else "CANCEL_NEW"), d
    finally:
        for dep in ids.values():
            local_stack.remove_deployment(api, dep)
