"""prefect.yaml is code: its entrypoints import, its parameters validate, its triggers render.

Trigger templates are rendered here exactly as the Prefect server renders them (the
server's own v1-template upgrade, hydration and sandboxed Jinja environment) against
sample driftloop events, then validated against the flow's parameter schema. A template
that would fail on the server (where it only logs "Action failed ... InvalidJinja"
and silently creates no run) fails here.
"""

from __future__ import annotations

import copy
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from driftloop import events

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "prefect.yaml"
_DEPLOYMENTS: list[dict[str, Any]] = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
DEPLOYMENT_NAMES = [d["name"] for d in _DEPLOYMENTS]


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


def deployment(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in config["deployments"] if d["name"] == name)


def load_flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    path, func = entrypoint.split(":")
    return load_flow_from_entrypoint(f"{REPO / path}:{func}")


def schema_errors(flow, parameters: dict[str, Any], *, ignore_required: bool = False) -> list[str]:
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    schema = parameter_schema(flow).model_dump_for_openapi()
    found = validate(parameters, schema, raise_on_error=False, ignore_required=ignore_required)
    return [e.message for e in found]


def render(parameters: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """Render trigger parameters as the server's RunDeployment action does."""
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    RunDeployment._register_filters_if_needed()
    params = copy.deepcopy(parameters)
    RunDeployment._upgrade_v1_templates(params)
    received = ReceivedEvent.model_validate({**event, "received": datetime.now(UTC)})
    return hydrate(
        params,
        HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": received}),
    )


def sample_events() -> dict[str, dict[str, Any]]:
    now = datetime.now(UTC)
    window = {"window_start": now - timedelta(hours=1), "window_end": now, "rows": 5000}
    drift = events.DriftDetected(
        model_name="fraud",
        incident_id="inc-20260101T000000Z-abc123",
        drift_share=0.4,
        drifted_columns=["amount"],
        **window,
    )
    return {
        "drift": events.build_event(events.EventName.DRIFT_DETECTED, drift),
        "drift without incident": events.build_event(
            events.EventName.DRIFT_DETECTED, drift.model_copy(update={"incident_id": None})
        ),
        "degraded": events.build_event(
            events.EventName.PERFORMANCE_DEGRADED,
            events.PerformanceDegraded(
                model_name="fraud",
                incident_id="inc-2",
                metric="pr_auc",
                value=0.2,
                baseline=0.5,
                window=events.TimeWindow(start=now - timedelta(hours=1), end=now),
            ),
        ),
        "registered": events.build_event(
            events.EventName.MODEL_REGISTERED,
            events.ModelRegistered(
                model_name="fraud",
                incident_id="inc-3",
                model_tag="fraud:v1",
                bento_tag="driftloop-fraud:v1",
            ),
        ),
    }


def test_the_file_is_a_valid_prefect_project(config: dict[str, Any]) -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(config)
    assert {d.name for d in model.deployments} == {
        "monitor",
        "retrain",
        "materialize",
        "maintain-logs",
        "rollout",
    }
    for d in model.deployments:
        assert d.work_pool is not None and d.work_pool.name == "driftloop"
        assert d.work_pool.job_variables["env"]["OMP_WAIT_POLICY"] == "PASSIVE"


def test_every_flow_file_has_a_deployment(config: dict[str, Any]) -> None:
    entrypoints = {d["entrypoint"].split(":")[0] for d in config["deployments"]}
    flow_files = {f"flows/{p.name}" for p in (REPO / "flows").glob("*.py") if p.name[0] != "_"}
    assert flow_files <= entrypoints


def test_pull_step_uses_an_environment_variable_not_a_path(config: dict[str, Any]) -> None:
    [step] = config["pull"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert re.fullmatch(r"\{\{ \$[A-Z_]+ \}\}", directory)
    assert "/work" not in PREFECT_YAML.read_text()


@pytest.mark.parametrize("name", DEPLOYMENT_NAMES)
def test_entrypoint_imports_and_its_parameters_validate(config: dict[str, Any], name: str) -> None:
    d = deployment(config, name)
    path = REPO / d["entrypoint"].split(":")[0]
    assert path.exists(), f"{name}: {path} does not exist"
    flow = load_flow(d["entrypoint"])
    assert flow.name == name
    # deployments run only by their triggers get the required parameters from the event
    triggered_only = bool(d.get("triggers")) and not d.get("schedules")
    assert schema_errors(flow, d.get("parameters", {}), ignore_required=triggered_only) == []
    for schedule in d.get("schedules", []):
        params = {**d.get("parameters", {}), **schedule.get("parameters", {})}
        assert schema_errors(flow, params) == [], schedule


def test_triggers_are_valid_deployment_triggers(config: dict[str, Any]) -> None:
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    expected = {
        "retrain": {
            events.EventName.DRIFT_DETECTED.value,
            events.EventName.PERFORMANCE_DEGRADED.value,
        },
        "rollout": {events.EventName.MODEL_REGISTERED.value},
    }
    for d in config["deployments"]:
        specs = copy.deepcopy(d.get("triggers") or [])
        triggers = _initialize_deployment_triggers(d["name"], specs)
        expects = {e for t in triggers for e in t.expect}
        assert expects == expected.get(d["name"], set()), d["name"]
        for t in triggers:
            assert t.match.model_dump() == {"prefect.resource.id": "driftloop.model.*"}
            assert t.posture == "Reactive" and t.threshold == 1


def _template_strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _template_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _template_strings(v)]
    return [value] if isinstance(value, str) and "{{" in value else []


def test_templates_use_the_forms_that_render_in_prefect_3_9(config: dict[str, Any]) -> None:
    templates = [
        s
        for d in config["deployments"]
        for t in d.get("triggers") or []
        for s in _template_strings(t.get("parameters"))
    ]
    assert templates
    for template in templates:
        if "event.payload." in template:
            assert "| default(none)" in template, template
        if "event.id" in template:
            assert "event.id | string" in template, template


def test_retrain_triggers_render_into_valid_parameters(config: dict[str, Any]) -> None:
    from driftloop.retraining import RetrainParams

    d = deployment(config, "retrain")
    flow = load_flow(d["entrypoint"])
    samples = sample_events()
    by_event = {t["expect"][0]: t for t in d["triggers"]}
    for key in ("drift", "drift without incident", "degraded"):
        event = samples[key]
        trigger = by_event[event["event"]]
        rendered = render(trigger["parameters"], event)
        assert schema_errors(flow, rendered) == [], (key, rendered)
        params = RetrainParams.model_validate(rendered["params"])
        assert params.model_name == "fraud"
        assert params.reason == event["event"]
        assert params.trigger_event_id == event["id"]
        assert params.incident_id == event["payload"].get("incident_id")


def test_rollout_trigger_renders_into_valid_parameters(config: dict[str, Any]) -> None:
    d = deployment(config, "rollout")
    flow = load_flow(d["entrypoint"])
    event = sample_events()["registered"]
    rendered = render(d["triggers"][0]["parameters"], event)
    assert schema_errors(flow, rendered) == []
    assert rendered["model_tag"] == "fraud:v1"
    assert rendered["bento_tag"] == "driftloop-fraud:v1"
    assert rendered["incident_id"] == "inc-3"


def test_the_renderer_catches_what_the_server_would_reject() -> None:
    """Negative control: a bare ``{{ event.id }}`` fails to render, as on the server."""
    from prefect.utilities.schema_tools.hydration import HydrationError

    event = sample_events()["drift"]
    with pytest.raises(HydrationError):
        render({"params": {"trigger_event_id": "{{ event.id }}"}}, event)
    assert render({"x": "{{ event.id | string }}"}, event) == {"x": event["id"]}
    uuid.UUID(event["id"])


def test_retrain_concurrency_and_fallback_schedule(config: dict[str, Any]) -> None:
    d = deployment(config, "retrain")
    assert d["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    [weekly] = d["schedules"]
    assert weekly["cron"] == "0 3 * * 1" and weekly["timezone"] == "UTC"
    assert weekly["parameters"] == {"params": {"reason": "schedule"}}
    monitor = deployment(config, "monitor")
    assert "interval" in monitor["schedules"][0]
