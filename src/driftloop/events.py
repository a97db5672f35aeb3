"""The event contract between driftloop's flows: names, resources and typed payloads.

Every event is named ``driftloop.<noun>.<verb>`` and concerns the resource
``driftloop.model.<model name>``. Events of one adaptation also carry the related
resource ``driftloop.incident.<incident id>`` (role ``incident``) and the same
``incident_id`` in their payload, so one filter returns an incident's timeline.
Payloads are small: pointers to reports and Delta versions, never data.

:func:`emit` posts to the Prefect server's ``POST /events`` and returns only once
the server has accepted the event (HTTP 2xx; optionally once it is readable).
Unlike ``prefect.events.emit_event`` it is not fire-and-forget: it raises
:class:`~driftloop.errors.EventError` when the event cannot be delivered.
:func:`read_events` queries ``POST /events/filter`` and :func:`parse_payload` turns a
received event back into its payload model.

This module does not import Prefect (importing it costs ~3 s); it speaks the
server's JSON API with httpx.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar, Literal

import httpx
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from driftloop.errors import EventError

__all__ = [
    "INCIDENT_ROLE",
    "PAYLOAD_MODELS",
    "AdaptationPayload",
    "DataQualityFailed",
    "DriftDetected",
    "EventName",
    "EventPayload",
    "ModelRegistered",
    "ModelRejected",
    "MonitorCompleted",
    "PerformanceDegraded",
    "ReceivedEvent",
    "RetrainSkipped",
    "RolloutPayload",
    "RolloutPromoted",
    "RolloutRolledBack",
    "RolloutStarted",
    "RolloutStepped",
    "TimeWindow",
    "build_event",
    "emit",
    "incident_resource_id",
    "model_resource",
    "model_resource_id",
    "new_incident_id",
    "parse_payload",
    "read_events",
    "wait_for_event",
]


class EventName(StrEnum):
    """Every event driftloop emits. The values are the Prefect event names."""

    MONITOR_COMPLETED = "driftloop.monitor.completed"
    DRIFT_DETECTED = "driftloop.drift.detected"
    PERFORMANCE_DEGRADED = "driftloop.performance.degraded"
    DATA_QUALITY_FAILED = "driftloop.data_quality.failed"
    MODEL_REGISTERED = "driftloop.model.registered"
    MODEL_REJECTED = "driftloop.model.rejected"
    RETRAIN_SKIPPED = "driftloop.retrain.skipped"
    ROLLOUT_STARTED = "driftloop.rollout.started"
    ROLLOUT_STEPPED = "driftloop.rollout.stepped"
    ROLLOUT_PROMOTED = "driftloop.rollout.promoted"
    ROLLOUT_ROLLED_BACK = "driftloop.rollout.rolled_back"
    LABELS_LANDED = "driftloop.labels.landed"
    DATA_LANDED = "driftloop.data.landed"


#: prefix shared by every driftloop event (for ``read_events(prefix=...)`` and triggers)
EVENT_PREFIX = "driftloop."
MODEL_RESOURCE_PREFIX = "driftloop.model."
INCIDENT_RESOURCE_PREFIX = "driftloop.incident."
#: role of the incident in an event's related resources
INCIDENT_ROLE = "incident"

_MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


# -- resources ---------------------------------------------------------------------


def model_resource_id(model_name: str) -> str:
    """``driftloop.model.<model name>``: the resource every driftloop event concerns."""
    return f"{MODEL_RESOURCE_PREFIX}{model_name}"


def model_resource(model_name: str) -> dict[str, str]:
    """The primary resource (Prefect labels) of an event about ``model_name``."""
    return {
        "prefect.resource.id": model_resource_id(model_name),
        "prefect.resource.name": model_name,
    }


def incident_resource_id(incident_id: str) -> str:
    """``driftloop.incident.<incident id>``: the related resource linking an adaptation."""
    return f"{INCIDENT_RESOURCE_PREFIX}{incident_id}"


def new_incident_id(now: datetime | None = None) -> str:
    """A new, sortable, human-readable incident id such as ``inc-20250101T120000Z-3f9a1c``."""
    now = now or datetime.now(UTC)
    return f"inc-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


# -- payloads ----------------------------------------------------------------------


def _to_builtin(value: Any) -> Any:
    """Turn numpy scalars/arrays (as Evidently and polars return them) into Python values."""
    if isinstance(value, Mapping):
        return {k: _to_builtin(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_builtin(v) for v in value]
    if type(value).__module__ == "numpy":
        if hasattr(value, "tolist"):
            return value.tolist()
        if hasattr(value, "item"):
            return value.item()
    return value


class EventPayload(BaseModel):
    """Base of every payload. Unknown keys are kept (a newer producer may add fields)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, validate_assignment=True)

    #: the event this payload belongs to (set on each concrete class)
    event: ClassVar[EventName]

    model_name: str = Field(pattern=_MODEL_NAME_PATTERN, description="Name of the model")

    @model_validator(mode="before")
    @classmethod
    def _numpy_to_builtin(cls, data: Any) -> Any:
        return _to_builtin(data) if isinstance(data, Mapping) else data


class AdaptationPayload(EventPayload):
    """A payload of an adaptation step; every one carries the incident it belongs to."""

    incident_id: str | None = Field(
        default=None, description="Id shared by every event of one adaptation (None: none open)"
    )


class TimeWindow(BaseModel):
    """A half-open time window ``[start, end)`` of logged predictions."""

    model_config = ConfigDict(extra="forbid")

    start: AwareDatetime
    end: AwareDatetime

    @model_validator(mode="after")
    def _ordered(self) -> TimeWindow:
        if self.end < self.start:
            raise ValueError("window end is before its start")
        return self


Verdict = Literal["ok", "drift", "degraded", "quality_failed", "insufficient"]


class MonitorCompleted(EventPayload):
    """One monitoring window was analysed (emitted on every monitor run)."""

    event: ClassVar[EventName] = EventName.MONITOR_COMPLETED

    window_start: AwareDatetime
    window_end: AwareDatetime
    rows: int = Field(ge=0, description="Rows in the current window")
    drift_share: float = Field(ge=0.0, le=1.0, description="Share of drifted columns")
    drifted_columns: list[str] = Field(default_factory=list)
    performance: dict[str, float] | None = Field(
        default=None, description="Labelled metrics of the window, if labels had arrived"
    )
    report_path: str | None = Field(default=None, description="Path or URI of the report")
    predictions_version: int | None = Field(
        default=None, ge=0, description="Delta version of `predictions` that was read"
    )
    verdict: Verdict

    @model_validator(mode="after")
    def _window_ordered(self) -> MonitorCompleted:
        if self.window_end < self.window_start:
            raise ValueError("window_end is before window_start")
        return self


class DriftDetected(MonitorCompleted, AdaptationPayload):
    """The drift rule fired; opens (or continues) an incident."""

    event: ClassVar[EventName] = EventName.DRIFT_DETECTED

    verdict: Verdict = "drift"


class PerformanceDegraded(AdaptationPayload):
    """Labelled performance fell below its baseline."""

    event: ClassVar[EventName] = EventName.PERFORMANCE_DEGRADED

    metric: str = Field(min_length=1, description="e.g. 'pr_auc'")
    value: float
    baseline: float
    window: TimeWindow


class DataQualityFailed(EventPayload):
    """Schema or quality checks broke; this does not start a retrain."""

    event: ClassVar[EventName] = EventName.DATA_QUALITY_FAILED

    failed_checks: list[str] = Field(min_length=1)
    report_path: str | None = None


class ModelRegistered(AdaptationPayload):
    """A challenger passed its gate; its model and Bento are in the stores."""

    event: ClassVar[EventName] = EventName.MODEL_REGISTERED

    model_tag: str = Field(min_length=1)
    bento_tag: str = Field(min_length=1)
    parent_tag: str | None = Field(default=None, description="The champion it was compared to")
    metrics: dict[str, float] = Field(default_factory=dict)
    gate: dict[str, Any] = Field(default_factory=dict, description="Gate checks and verdicts")


class ModelRejected(AdaptationPayload):
    """A challenger failed its gate."""

    event: ClassVar[EventName] = EventName.MODEL_REJECTED

    model_tag: str = Field(min_length=1)
    reason: str = Field(min_length=1)


class RetrainSkipped(AdaptationPayload):
    """A retrain was asked for but not run (cool-down, too few labels, ...)."""

    event: ClassVar[EventName] = EventName.RETRAIN_SKIPPED

    reason: str = Field(min_length=1)


class LabelsLanded(AdaptationPayload):
    """An external system says labels landed (from a webhook); extra keys pass through."""

    event: ClassVar[EventName] = EventName.LABELS_LANDED

    delivery: str | None = None


class DataLanded(AdaptationPayload):
    """An external system says new data landed (from a webhook); extra keys pass through."""

    event: ClassVar[EventName] = EventName.DATA_LANDED

    delivery: str | None = None


class RolloutPayload(AdaptationPayload):
    """Common shape of the ``driftloop.rollout.*`` events."""

    champion_tag: str = Field(min_length=1)
    canary_tag: str = Field(min_length=1)
    weights: dict[str, int] = Field(description="Traffic percent per arm tag")
    step: int = Field(ge=0, description="Index of the rollout step")
    verdict: str | None = Field(default=None, description="Analysis verdict of the step")
    reason: str | None = None

    @model_validator(mode="after")
    def _weights_are_percentages(self) -> RolloutPayload:
        if any(not 0 <= w <= 100 for w in self.weights.values()):
            raise ValueError("weights must be percentages in [0, 100]")
        return self


class RolloutStarted(RolloutPayload):
    event: ClassVar[EventName] = EventName.ROLLOUT_STARTED


class RolloutStepped(RolloutPayload):
    event: ClassVar[EventName] = EventName.ROLLOUT_STEPPED


class RolloutPromoted(RolloutPayload):
    event: ClassVar[EventName] = EventName.ROLLOUT_PROMOTED


class RolloutRolledBack(RolloutPayload):
    event: ClassVar[EventName] = EventName.ROLLOUT_ROLLED_BACK


#: the payload model of each event
PAYLOAD_MODELS: dict[EventName, type[EventPayload]] = {
    m.event: m
    for m in (
        MonitorCompleted,
        DriftDetected,
        PerformanceDegraded,
        DataQualityFailed,
        ModelRegistered,
        ModelRejected,
        RetrainSkipped,
        RolloutStarted,
        RolloutStepped,
        RolloutPromoted,
        RolloutRolledBack,
        LabelsLanded,
        DataLanded,
    )
}


def _event_name(name: EventName | str) -> EventName:
    try:
        return EventName(name)
    except ValueError:
        raise EventError(f"unknown driftloop event {name!r}") from None


def validate_payload(
    name: EventName | str, payload: EventPayload | Mapping[str, Any]
) -> EventPayload:
    """Validate ``payload`` (a model or a mapping) as the payload of event ``name``."""
    model = PAYLOAD_MODELS[_event_name(name)]
    if isinstance(payload, EventPayload):
        if type(payload) is not model:
            raise EventError(f"{name} takes a {model.__name__}, not a {type(payload).__name__}")
        return payload
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise EventError(f"invalid payload for {name}: {exc}") from exc


# -- the event on the wire -----------------------------------------------------------


class ReceivedEvent(BaseModel):
    """An event as the Prefect server returns it (a light copy of Prefect's model)."""

    model_config = ConfigDict(extra="ignore")

    id: uuid.UUID
    event: str
    occurred: AwareDatetime
    received: AwareDatetime | None = None
    resource: dict[str, str]
    related: list[dict[str, str]] = Field(default_factory=list)
    payload: dict[str, Any] = Field(default_factory=dict)
    follows: uuid.UUID | None = None

    @property
    def resource_id(self) -> str:
        return self.resource["prefect.resource.id"]

    @property
    def incident_id(self) -> str | None:
        value = self.payload.get("incident_id")
        return value if isinstance(value, str) else None


def parse_payload(event: ReceivedEvent | Mapping[str, Any]) -> EventPayload:
    """The typed payload model of a received driftloop event."""
    if not isinstance(event, ReceivedEvent):
        event = ReceivedEvent.model_validate(event)
    name = _event_name(event.event)
    try:
        return PAYLOAD_MODELS[name].model_validate(event.payload)
    except ValidationError as exc:
        raise EventError(f"event {event.id} ({name}) has an invalid payload: {exc}") from exc


def build_event(
    name: EventName | str,
    payload: EventPayload | Mapping[str, Any],
    *,
    event_id: uuid.UUID | str | None = None,
    related: Sequence[Mapping[str, str]] | None = None,
    occurred: datetime | None = None,
    follows: uuid.UUID | str | None = None,
) -> dict[str, Any]:
    """The JSON body of one event as ``POST /events`` expects it (validated payload)."""
    model = validate_payload(name, payload)
    related_resources: list[dict[str, str]] = []
    incident_id = getattr(model, "incident_id", None)
    if incident_id:
        related_resources.append(
            {
                "prefect.resource.id": incident_resource_id(incident_id),
                "prefect.resource.role": INCIDENT_ROLE,
                "prefect.resource.name": incident_id,
            }
        )
    for resource in related or ():
        if not resource.get("prefect.resource.id") or not resource.get("prefect.resource.role"):
            raise EventError(
                "a related resource needs 'prefect.resource.id' and 'prefect.resource.role' labels"
            )
        related_resources.append({str(k): str(v) for k, v in resource.items()})
    body: dict[str, Any] = {
        "id": str(uuid.UUID(str(event_id)) if event_id is not None else uuid.uuid4()),
        "event": str(_event_name(name)),
        "occurred": (occurred or datetime.now(UTC)).astimezone(UTC).isoformat(),
        "resource": model_resource(model.model_name),
        "related": related_resources,
        "payload": model.model_dump(mode="json"),
    }
    if follows is not None:
        body["follows"] = str(uuid.UUID(str(follows)))
    return body


def _events_url(api_url: str, path: str = "") -> str:
    return f"{api_url.rstrip('/')}/events{path}"


def emit(
    api_url: str,
    name: EventName | str,
    payload: EventPayload | Mapping[str, Any],
    *,
    event_id: uuid.UUID | str | None = None,
    related: Sequence[Mapping[str, str]] | None = None,
    follows: uuid.UUID | str | None = None,
    confirm: bool = False,
    confirm_timeout: float = 15.0,
    attempts: int = 4,
    backoff: float = 0.25,
    timeout: float = 5.0,
    client: httpx.Client | None = None,
) -> str:
    """Deliver one event to the Prefect API at ``api_url``; return its id.

    Returns once the server answered 2xx (the event is queued for automations and
    storage); with ``confirm=True`` also waits until the event is readable through
    ``/events/filter``. Connection errors, timeouts and 5xx answers are retried
    ``attempts`` times with exponential backoff; a retry reuses the event id, and
    the server stores one event per id and its triggers skip ids already seen.
    Raises :class:`EventError` when it gives up, on a 4xx answer, or on an invalid
    payload.
    """
    body = build_event(name, payload, event_id=event_id, related=related, follows=follows)
    url = _events_url(api_url)
    owns_client = client is None
    http = client or httpx.Client(timeout=timeout)
    try:
        last_error: str = "no attempt made"
        for attempt in range(max(1, attempts)):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                response = http.post(url, json=[body])
            except httpx.TransportError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if response.is_success:
                break
            last_error = f"HTTP {response.status_code}: {response.text[:500]}"
            if response.status_code < 500 and response.status_code != 429:
                raise EventError(f"{url} rejected event {body['event']}: {last_error}")
        else:
            raise EventError(
                f"could not deliver {body['event']} to {url} after {attempts} attempts: "
                f"{last_error}"
            )
        if confirm:
            wait_for_event(api_url, body["id"], timeout=confirm_timeout, client=http)
        return str(body["id"])
    finally:
        if owns_client:
            http.close()


def _filter_body(
    *,
    names: Sequence[EventName | str] | None,
    prefix: str | Sequence[str] | None,
    since: datetime,
    until: datetime | None,
    resource_id: str | None,
    incident_id: str | None,
    event_ids: Sequence[uuid.UUID | str] | None,
    limit: int,
) -> dict[str, Any]:
    if since.tzinfo is None:
        raise EventError("since must be timezone-aware")
    occurred: dict[str, str] = {"since": since.astimezone(UTC).isoformat()}
    # the server's default `until` is "now" at query time; events stamped a moment in
    # the future by a client clock would be missed, so look a little ahead
    occurred["until"] = (
        (until or datetime.now(UTC) + timedelta(minutes=5)).astimezone(UTC).isoformat()
    )
    filt: dict[str, Any] = {"occurred": occurred, "order": "ASC"}
    name_filter: dict[str, list[str]] = {}
    if names:
        name_filter["name"] = [str(n) for n in names]
    if prefix:
        name_filter["prefix"] = [prefix] if isinstance(prefix, str) else list(prefix)
    if name_filter:
        filt["event"] = name_filter
    if resource_id:
        filt["resource"] = {"id": [resource_id]}
    if incident_id:
        filt["related"] = {"id": [incident_resource_id(incident_id)], "role": [INCIDENT_ROLE]}
    if event_ids:
        filt["id"] = {"id": [str(i) for i in event_ids]}
    return {"filter": filt, "limit": limit}


def read_events(
    api_url: str,
    *,
    names: Sequence[EventName | str] | None = None,
    prefix: str | Sequence[str] | None = None,
    since: datetime,
    until: datetime | None = None,
    resource_id: str | None = None,
    incident_id: str | None = None,
    event_ids: Sequence[uuid.UUID | str] | None = None,
    max_events: int = 10_000,
    timeout: float = 10.0,
    client: httpx.Client | None = None,
) -> list[ReceivedEvent]:
    """Events matching the filter, oldest first, following ``next_page`` links.

    ``names`` are exact event names, ``prefix`` a name prefix (e.g. ``"driftloop."``);
    ``incident_id`` selects the events of one adaptation. Use :func:`parse_payload` on
    each result for its typed payload. Raises :class:`EventError` if the API fails.
    """
    body = _filter_body(
        names=names,
        prefix=prefix,
        since=since,
        until=until,
        resource_id=resource_id,
        incident_id=incident_id,
        event_ids=event_ids,
        limit=50,  # the server's maximum page size
    )
    owns_client = client is None
    http = client or httpx.Client(timeout=timeout)
    events: list[ReceivedEvent] = []
    try:
        response = http.post(_events_url(api_url, "/filter"), json=body)
        while True:
            if not response.is_success:
                raise EventError(
                    f"reading events failed: HTTP {response.status_code}: {response.text[:500]}"
                )
            page = response.json()
            events.extend(ReceivedEvent.model_validate(e) for e in page.get("events", []))
            next_page = page.get("next_page")
            if not next_page or len(events) >= max_events:
                break
            response = http.get(next_page)
    except httpx.HTTPError as exc:
        raise EventError(f"reading events from {api_url} failed: {exc}") from exc
    finally:
        if owns_client:
            http.close()
    return events[:max_events]


def wait_for_event(
    api_url: str,
    event_id: uuid.UUID | str,
    *,
    timeout: float = 15.0,
    interval: float = 0.2,
    client: httpx.Client | None = None,
) -> ReceivedEvent:
    """Poll until the event ``event_id`` is readable; raise :class:`EventError` on timeout.

    The server stores events in batches (every few seconds), so an accepted event
    becomes readable a little later; automations see it at once.
    """
    since = datetime.now(UTC) - timedelta(days=1)
    deadline = time.monotonic() + timeout
    while True:
        found = read_events(api_url, since=since, event_ids=[event_id], client=client)
        if found:
            return found[0]
        if time.monotonic() >= deadline:
            raise EventError(f"event {event_id} not readable from {api_url} after {timeout} s")
        time.sleep(interval)


def payloads(events: Iterable[ReceivedEvent]) -> list[EventPayload]:
    """Typed payloads of ``events``, in order."""
    return [parse_payload(e) for e in events]
