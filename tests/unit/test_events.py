"""The event contract: names, payload models, and the JSON sent to Prefect."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from driftloop import events as ev
from driftloop.errors import EventError

START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
END = datetime(2025, 3, 1, 13, 0, tzinfo=UTC)
ROLLOUT = {
    "model_name": "fraud",
    "incident_id": "inc-1",
    "champion_tag": "fraud:v1",
    "canary_tag": "fraud:v2",
    "weights": {"fraud:v1": 75, "fraud:v2": 25},
    "step": 1,
    "verdict": "pass",
    "reason": None,
}
MONITOR = {
    "model_name": "fraud",
    "window_start": START,
    "window_end": END,
    "rows": 1200,
    "drift_share": 0.3,
    "drifted_columns": ["amount", "country"],
    "performance": {"pr_auc": 0.71},
    "report_path": "/state/reports/fraud/2025-03-01T12.html",
    "predictions_version": 42,
    "verdict": "drift",
}
#: a valid payload of every event, and one field that must be present
EXAMPLES: dict[ev.EventName, tuple[dict[str, Any], str]] = {
    ev.EventName.MONITOR_COMPLETED: (MONITOR, "rows"),
    ev.EventName.DRIFT_DETECTED: ({**MONITOR, "incident_id": "inc-1"}, "drift_share"),
    ev.EventName.PERFORMANCE_DEGRADED: (
        {
            "model_name": "fraud",
            "metric": "pr_auc",
            "value": 0.52,
            "baseline": 0.71,
            "incident_id": "inc-1",
            "window": {"start": START, "end": END},
        },
        "baseline",
    ),
    ev.EventName.DATA_QUALITY_FAILED: (
        {"model_name": "fraud", "failed_checks": ["schema:amount"], "report_path": None},
        "failed_checks",
    ),
    ev.EventName.MODEL_REGISTERED: (
        {
            "model_name": "fraud",
            "model_tag": "fraud:v2",
            "bento_tag": "fraud_service:v2",
            "parent_tag": "fraud:v1",
            "metrics": {"pr_auc": 0.74, "roc_auc": 0.93},
            "incident_id": "inc-1",
            "gate": {"passed": True, "margin": 0.005},
        },
        "bento_tag",
    ),
    ev.EventName.MODEL_REJECTED: (
        {"model_name": "fraud", "model_tag": "fraud:v2", "reason": "slice", "incident_id": "inc-1"},
        "reason",
    ),
    ev.EventName.RETRAIN_SKIPPED: (
        {"model_name": "fraud", "reason": "cooldown", "incident_id": None},
        "reason",
    ),
    ev.EventName.ROLLOUT_STARTED: (ROLLOUT, "champion_tag"),
    ev.EventName.ROLLOUT_STEPPED: (ROLLOUT, "weights"),
    ev.EventName.ROLLOUT_PROMOTED: (ROLLOUT, "canary_tag"),
    ev.EventName.ROLLOUT_ROLLED_BACK: ({**ROLLOUT, "verdict": "fail", "reason": "p99"}, "step"),
    ev.EventName.LABELS_LANDED: (
        {"model_name": "fraud", "delivery": "d1", "rows": 10},
        "model_name",
    ),
    ev.EventName.DATA_LANDED: ({"model_name": "fraud", "delivery": "d2"}, "model_name"),
}


def test_every_event_has_one_payload_model_and_an_example() -> None:
    assert set(ev.PAYLOAD_MODELS) == set(ev.EventName) == set(EXAMPLES)
    assert all(model.event is name for name, model in ev.PAYLOAD_MODELS.items())
    assert all(name.startswith(ev.EVENT_PREFIX) for name in ev.EventName)


@pytest.mark.parametrize("name", list(ev.EventName))
def test_payload_round_trips_through_json(name: ev.EventName) -> None:
    model = ev.PAYLOAD_MODELS[name]
    payload = model.model_validate(EXAMPLES[name][0])
    text = payload.model_dump_json()
    assert model.model_validate_json(text) == payload
    assert model.model_validate(json.loads(text)) == payload


@pytest.mark.parametrize("name", list(ev.EventName))
def test_missing_required_field_is_rejected(name: ev.EventName) -> None:
    data, required = EXAMPLES[name]
    for field in ("model_name", required):
        incomplete = {k: v for k, v in data.items() if k != field}
        with pytest.raises(ValidationError, match=field):
            ev.PAYLOAD_MODELS[name].model_validate(incomplete)


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in ev.EventName
        if n not in ("driftloop.monitor.completed", "driftloop.data_quality.failed")
    ],
)
def test_adaptation_payloads_carry_incident_id(name: ev.EventName) -> None:
    model = ev.PAYLOAD_MODELS[name]
    assert issubclass(model, ev.AdaptationPayload)
    data = {k: v for k, v in EXAMPLES[name][0].items() if k != "incident_id"}
    assert "incident_id" in model.model_validate(data).model_dump()


@pytest.mark.parametrize(
    ("name", "change"),
    [
        (ev.EventName.MONITOR_COMPLETED, {"drift_share": 1.5}),
        (ev.EventName.MONITOR_COMPLETED, {"drift_share": math.nan}),
        (ev.EventName.MONITOR_COMPLETED, {"verdict": "fine"}),
        (ev.EventName.MONITOR_COMPLETED, {"window_start": datetime(2025, 3, 1, 12)}),
        (ev.EventName.MONITOR_COMPLETED, {"window_end": datetime(2025, 3, 1, 11, tzinfo=UTC)}),
        (ev.EventName.MONITOR_COMPLETED, {"rows": -1}),
        (ev.EventName.MODEL_REGISTERED, {"metrics": {"pr_auc": math.inf}}),
        (ev.EventName.DATA_QUALITY_FAILED, {"failed_checks": []}),
        (ev.EventName.ROLLOUT_STEPPED, {"weights": {"fraud:v2": 120}}),
        (ev.EventName.RETRAIN_SKIPPED, {"model_name": "bad name"}),
    ],
)
def test_invalid_values_are_rejected(name: ev.EventName, change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ev.PAYLOAD_MODELS[name].model_validate({**EXAMPLES[name][0], **change})


def test_numpy_values_become_python_values() -> None:
    payload = ev.MonitorCompleted.model_validate(
        {
            **MONITOR,
            "rows": np.int64(10),
            "drift_share": np.float32(0.25),
            "performance": {"pr_auc": np.float64(0.5)},
            "drifted_columns": np.array(["amount"]),
        }
    )
    assert payload.rows == 10 and type(payload.rows) is int
    assert payload.drift_share == 0.25 and payload.drifted_columns == ["amount"]
    json.loads(payload.model_dump_json())


def test_unknown_fields_are_kept_for_forward_compatibility() -> None:
    data = {**EXAMPLES[ev.EventName.RETRAIN_SKIPPED][0], "labels_available": 12}
    payload = ev.RetrainSkipped.model_validate(data)
    assert payload.model_dump()["labels_available"] == 12


def test_build_event_has_model_resource_incident_and_json_payload() -> None:
    event_id = uuid.uuid4()
    body = ev.build_event(
        ev.EventName.MODEL_REGISTERED,
        EXAMPLES[ev.EventName.MODEL_REGISTERED][0],
        event_id=event_id,
        related=[
            {"prefect.resource.id": "prefect.flow-run.1", "prefect.resource.role": "flow-run"}
        ],
    )
    assert body["id"] == str(event_id)
    assert body["event"] == "driftloop.model.registered"
    assert body["resource"] == {
        "prefect.resource.id": "driftloop.model.fraud",
        "prefect.resource.name": "fraud",
    }
    assert body["related"][0] == {
        "prefect.resource.id": "driftloop.incident.inc-1",
        "prefect.resource.role": "incident",
        "prefect.resource.name": "inc-1",
    }
    assert body["related"][1]["prefect.resource.role"] == "flow-run"
    assert json.loads(json.dumps(body)) == body
    assert datetime.fromisoformat(body["occurred"]).tzinfo is not None


def test_build_event_without_incident_has_no_incident_resource() -> None:
    body = ev.build_event("driftloop.monitor.completed", MONITOR)
    assert body["related"] == []
    body = ev.build_event("driftloop.retrain.skipped", EXAMPLES[ev.EventName.RETRAIN_SKIPPED][0])
    assert body["related"] == []


def test_build_event_is_accepted_by_prefects_server_schema() -> None:
    from prefect.server.events.schemas.events import Event

    for name, (data, _) in EXAMPLES.items():
        body = ev.build_event(name, data)
        event = Event.model_validate(body)
        assert event.resource.id == "driftloop.model.fraud"
        assert event.payload == body["payload"]


def test_parse_payload_turns_a_received_event_into_its_model() -> None:
    for name, (data, _) in EXAMPLES.items():
        body = ev.build_event(name, data)
        received = ev.ReceivedEvent.model_validate({**body, "received": body["occurred"]})
        payload = ev.parse_payload(received)
        assert type(payload) is ev.PAYLOAD_MODELS[name]
        assert payload == ev.PAYLOAD_MODELS[name].model_validate(data)
        assert received.resource_id == "driftloop.model.fraud"


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("driftloop.model.exploded", {"model_name": "fraud"}),
        (ev.EventName.RETRAIN_SKIPPED, {"model_name": "fraud"}),
        (ev.EventName.RETRAIN_SKIPPED, ev.ModelRejected(model_name="f", model_tag="t", reason="r")),
    ],
)
def test_build_event_rejects_unknown_names_and_wrong_payloads(name: str, payload: Any) -> None:
    with pytest.raises(EventError):
        ev.build_event(name, payload)


def test_build_event_requires_role_on_related_resources() -> None:
    with pytest.raises(EventError, match="role"):
        ev.build_event(
            ev.EventName.MONITOR_COMPLETED, MONITOR, related=[{"prefect.resource.id": "x"}]
        )


def test_parse_payload_rejects_foreign_or_broken_events() -> None:
    body = ev.build_event(ev.EventName.RETRAIN_SKIPPED, EXAMPLES[ev.EventName.RETRAIN_SKIPPED][0])
    with pytest.raises(EventError):
        ev.parse_payload({**body, "event": "prefect.flow-run.Completed"})
    with pytest.raises(EventError):
        ev.parse_payload({**body, "payload": {"model_name": "fraud"}})


def test_incident_ids_are_unique_and_sortable() -> None:
    ids = {ev.new_incident_id() for _ in range(100)}
    assert len(ids) == 100
    assert ev.new_incident_id(START).startswith("inc-20250301T120000Z-")


def test_read_events_needs_an_aware_since() -> None:
    with pytest.raises(EventError, match="timezone"):
        ev.read_events("http://127.0.0.1:9/api", since=datetime(2025, 1, 1))
