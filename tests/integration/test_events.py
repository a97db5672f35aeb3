"""Events against a real Prefect server: delivered, stored, filtered, parsed back."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from driftloop import events as ev
from driftloop.errors import EventError
from driftloop.prefect_local import LocalWorker, free_port

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, 12, tzinfo=UTC)
T1 = T0 + timedelta(hours=1)


def _examples(model: str, incident: str) -> dict[ev.EventName, dict[str, object]]:
    monitor = {
        "model_name": model,
        "window_start": T0,
        "window_end": T1,
        "rows": 1000,
        "drift_share": 0.4,
        "drifted_columns": ["amount"],
        "performance": None,
        "report_path": "reports/x.html",
        "predictions_version": 3,
        "verdict": "drift",
    }
    rollout = {
        "model_name": model,
        "incident_id": incident,
        "champion_tag": f"{model}:v1",
        "canary_tag": f"{model}:v2",
        "weights": {f"{model}:v1": 95, f"{model}:v2": 5},
        "step": 0,
        "verdict": None,
        "reason": None,
    }
    return {
        ev.EventName.MONITOR_COMPLETED: monitor,
        ev.EventName.DRIFT_DETECTED: {**monitor, "incident_id": incident},
        ev.EventName.PERFORMANCE_DEGRADED: {
            "model_name": model,
            "metric": "pr_auc",
            "value": 0.5,
            "baseline": 0.7,
            "incident_id": incident,
            "window": {"start": T0, "end": T1},
        },
        ev.EventName.DATA_QUALITY_FAILED: {"model_name": model, "failed_checks": ["nulls"]},
        ev.EventName.MODEL_REGISTERED: {
            "model_name": model,
            "model_tag": f"{model}:v2",
            "bento_tag": f"{model}_svc:v2",
            "parent_tag": f"{model}:v1",
            "metrics": {"pr_auc": 0.75},
            "incident_id": incident,
            "gate": {"passed": True},
        },
        ev.EventName.MODEL_REJECTED: {
            "model_name": model,
            "model_tag": f"{model}:v3",
            "reason": "worse on slice country=NG",
            "incident_id": incident,
        },
        ev.EventName.RETRAIN_SKIPPED: {
            "model_name": model,
            "reason": "cooldown",
            "incident_id": incident,
        },
        ev.EventName.ROLLOUT_STARTED: rollout,
        ev.EventName.ROLLOUT_STEPPED: {**rollout, "step": 1, "verdict": "pass"},
        ev.EventName.ROLLOUT_PROMOTED: {**rollout, "step": 3, "verdict": "pass"},
        ev.EventName.ROLLOUT_ROLLED_BACK: {**rollout, "step": 2, "verdict": "fail"},
        ev.EventName.LABELS_LANDED: {
            "model_name": model,
            "incident_id": incident,
            "delivery": "d-labels-1",
            "rows": 1200,
        },
        ev.EventName.DATA_LANDED: {
            "model_name": model,
            "incident_id": incident,
            "delivery": "d-data-1",
        },
    }


def _read_until(count: int, read: Callable[[], list[ev.ReceivedEvent]]) -> list[ev.ReceivedEvent]:
    """Events are stored in batches: poll until ``count`` are readable (or 20 s pass)."""
    deadline = time.monotonic() + 20
    while True:
        found = read()
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_every_event_is_delivered_and_parsed_back(prefect_api_url: str) -> None:
    model, incident = f"m{uuid.uuid4().hex[:8]}", ev.new_incident_id()
    since = datetime.now(UTC) - timedelta(seconds=1)
    examples = _examples(model, incident)
    ids = {name: ev.emit(prefect_api_url, name, data) for name, data in examples.items()}
    assert len(set(ids.values())) == len(ev.EventName)

    everything = _read_until(
        len(examples),
        lambda: ev.read_events(
            prefect_api_url,
            prefix="driftloop.",
            since=since,
            resource_id=ev.model_resource_id(model),
        ),
    )
    assert {e.event for e in everything} == set(ev.EventName)
    for event in everything:
        name = ev.EventName(event.event)
        payload = ev.parse_payload(event)
        assert str(event.id) == ids[name]
        assert type(payload) is ev.PAYLOAD_MODELS[name]
        assert payload == ev.PAYLOAD_MODELS[name].model_validate(examples[name])
        assert event.resource["prefect.resource.name"] == model

    # one incident's timeline: every adaptation event, none of the monitoring ones
    timeline = ev.read_events(prefect_api_url, since=since, incident_id=incident)
    assert {e.event for e in timeline} == set(ev.EventName) - {
        ev.EventName.MONITOR_COMPLETED,
        ev.EventName.DATA_QUALITY_FAILED,
    }
    assert all(ev.parse_payload(e).incident_id == incident for e in timeline)  # type: ignore[attr-defined]
    assert [e.occurred for e in timeline] == sorted(e.occurred for e in timeline)

    rollouts = ev.read_events(
        prefect_api_url,
        names=[ev.EventName.ROLLOUT_STEPPED, ev.EventName.ROLLOUT_PROMOTED],
        since=since,
        incident_id=incident,
    )
    assert sorted(e.event for e in rollouts) == [
        "driftloop.rollout.promoted",
        "driftloop.rollout.stepped",
    ]
    assert ev.read_events(prefect_api_url, since=since, incident_id="inc-none") == []


def test_confirmed_emit_is_readable_and_a_retry_does_not_duplicate(
    prefect_api_url: str, record_property: Callable[[str, object], None]
) -> None:
    model = f"m{uuid.uuid4().hex[:8]}"
    payload = ev.RetrainSkipped(model_name=model, reason="too few labels", incident_id=None)
    began = time.monotonic()
    event_id = ev.emit(prefect_api_url, ev.EventName.RETRAIN_SKIPPED, payload, confirm=True)
    record_property("emit_to_readable_seconds", round(time.monotonic() - began, 3))
    # the same id again (as a retry would send it) is stored once
    assert (
        ev.emit(prefect_api_url, ev.EventName.RETRAIN_SKIPPED, payload, event_id=event_id)
        == event_id
    )
    time.sleep(1.5)  # > the server's event flush interval
    found = ev.read_events(
        prefect_api_url,
        since=T0,
        names=["driftloop.retrain.skipped"],
        resource_id=ev.model_resource_id(model),
    )
    assert [str(e.id) for e in found] == [event_id]
    assert ev.parse_payload(found[0]) == payload


def test_read_events_follows_next_page(prefect_api_url: str) -> None:
    model = f"m{uuid.uuid4().hex[:8]}"
    since = datetime.now(UTC) - timedelta(seconds=1)
    with httpx.Client(timeout=5) as client:
        for i in range(60):  # the server pages by 50
            ev.emit(
                prefect_api_url,
                ev.EventName.RETRAIN_SKIPPED,
                {"model_name": model, "reason": f"r{i}"},
                client=client,
            )
    found = _read_until(
        60,
        lambda: ev.read_events(
            prefect_api_url, since=since, resource_id=ev.model_resource_id(model)
        ),
    )
    assert sorted(ev.parse_payload(e).reason for e in found) == sorted(f"r{i}" for i in range(60))  # type: ignore[attr-defined]


def test_emit_to_a_dead_server_fails_fast_with_event_error() -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"
    began = time.monotonic()
    with pytest.raises(EventError, match="after 3 attempts"):
        ev.emit(
            dead, ev.EventName.RETRAIN_SKIPPED, {"model_name": "fraud", "reason": "x"}, attempts=3
        )
    assert time.monotonic() - began < 10  # bounded retries (0.25 s + 0.5 s of backoff here)


def test_server_rejection_is_an_event_error(prefect_api_url: str) -> None:
    # a valid payload the server refuses (422): more related resources than it allows
    too_many = [{"prefect.resource.id": f"x.{i}", "prefect.resource.role": "x"} for i in range(600)]
    began = time.monotonic()
    with pytest.raises(EventError, match="HTTP 422"):
        ev.emit(
            prefect_api_url,
            ev.EventName.RETRAIN_SKIPPED,
            {"model_name": "fraud", "reason": "x"},
            related=too_many,
        )
    assert time.monotonic() - began < 5  # a 4xx is not retried


def test_worker_registers_and_stops_by_pid(prefect_worker: Callable[..., LocalWorker]) -> None:
    worker = prefect_worker(f"pool-{uuid.uuid4().hex[:6]}")
    assert worker.running and worker.pid is not None
    pid = worker.pid
    worker.stop()
    assert not worker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
