"""Authenticated webhooks: external calls become Prefect events or deployment runs.

Open-source Prefect has no webhooks; this small Starlette app fills the gap.
A caller signs each delivery with a shared secret (``DRIFTLOOP_WEBHOOK_SECRET``)::

    ts=$(date +%s); id=$(uuidgen); body='{"action":"retrain_now","model":"fraud"}'
    sig=$(printf '%s.%s.%s' "$ts" "$id" "$body" \\
          | openssl dgst -sha256 -hmac "$DRIFTLOOP_WEBHOOK_SECRET" -hex | sed 's/^.* //')
    curl -X POST http://127.0.0.1:8787/hooks \\
      -H "X-Driftloop-Timestamp: $ts" -H "X-Driftloop-Delivery: $id" \\
      -H "X-Driftloop-Signature: sha256=$sig" -d "$body"

The signature is HMAC-SHA256 over ``"<timestamp>.<delivery id>.<raw body>"``.
A delivery is refused (401) when a header is missing, the signature is wrong,
the timestamp is more than ``tolerance`` seconds away from now (stale), or its
delivery id was already accepted (replay; ids are remembered in SQLite under
the state dir for longer than the tolerance, so a restart does not forget them).

Actions:

=================  ==========================================================
``labels_landed``  event ``driftloop.labels.landed`` (payload passed through)
``data_landed``    event ``driftloop.data.landed``
``retrain_now``    a run of the deployment ``retrain/retrain`` with the model
                   name, reason ``webhook`` and a new incident id
=================  ==========================================================
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from driftloop.errors import DriftloopError

SIGNATURE_HEADER = "x-driftloop-signature"
TIMESTAMP_HEADER = "x-driftloop-timestamp"
DELIVERY_HEADER = "x-driftloop-delivery"
MAX_BODY_BYTES = 64 * 1024


class WebhookRejected(DriftloopError):
    """A delivery failed authentication; ``reason`` says why (returned to the caller)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WebhookCall(BaseModel):
    """The body of a delivery."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["labels_landed", "data_landed", "retrain_now"]
    model: str = Field("fraud", pattern=r"^[a-z][a-z0-9_-]{0,62}$")
    payload: dict[str, Any] = Field(default_factory=dict)


def sign(secret: str, timestamp: str, delivery: str, body: bytes) -> str:
    """The ``X-Driftloop-Signature`` value for a delivery."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{delivery}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class ReplayGuard:
    """Remembers accepted delivery ids (SQLite, thread-safe) for ``ttl`` seconds."""

    def __init__(self, path: Path, ttl: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL)")
        self._lock = threading.Lock()
        self.ttl = ttl

    def first_time(self, delivery: str, now: float) -> bool:
        with self._lock:
            self._db.execute("DELETE FROM seen WHERE at < ?", (now - self.ttl,))
            try:
                self._db.execute("INSERT INTO seen (id, at) VALUES (?, ?)", (delivery, now))
            except sqlite3.IntegrityError:
                return False
            return True

    def close(self) -> None:
        self._db.close()


def verify(
    secret: str,
    headers: dict[str, str],
    body: bytes,
    *,
    now: float,
    tolerance: float,
    guard: ReplayGuard,
) -> None:
    """Raise :class:`WebhookRejected` unless the delivery is authentic, fresh and new."""
    sig = headers.get(SIGNATURE_HEADER)
    ts = headers.get(TIMESTAMP_HEADER)
    delivery = headers.get(DELIVERY_HEADER)
    if not sig or not ts or not delivery:
        raise WebhookRejected(
            f"missing header: {SIGNATURE_HEADER}, {TIMESTAMP_HEADER}, {DELIVERY_HEADER} required"
        )
    if len(delivery) > 128:
        raise WebhookRejected(f"{DELIVERY_HEADER}: longer than 128 characters")
    try:
        sent = float(ts)
    except ValueError as exc:
        raise WebhookRejected(f"{TIMESTAMP_HEADER}: not a unix time") from exc
    if not hmac.compare_digest(sign(secret, ts, delivery, body), sig):
        raise WebhookRejected(f"{SIGNATURE_HEADER}: signature does not match")
    if abs(now - sent) > tolerance:
        raise WebhookRejected(f"{TIMESTAMP_HEADER}: stale (more than {tolerance:.0f} s from now)")
    if not guard.first_time(delivery, now):
        raise WebhookRejected(f"{DELIVERY_HEADER}: replayed delivery")


def create_app(
    *,
    secret: str,
    api_url: str,
    state_dir: Path,
    tolerance: float = 300.0,
) -> Any:
    """The Starlette app: ``POST /hooks`` and ``GET /healthz``."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from driftloop import events

    guard = ReplayGuard(state_dir / "webhook" / "deliveries.sqlite", ttl=2 * tolerance + 60)

    def act(call: WebhookCall, delivery: str) -> dict[str, Any]:
        if call.action == "retrain_now":
            incident = events.new_incident_id()
            with httpx.Client(base_url=api_url, timeout=10) as client:
                dep = client.get("/deployments/name/retrain/retrain")
                if dep.status_code == 404:
                    raise WebhookRejected(
                        "deployment retrain/retrain does not exist: deploy prefect.yaml"
                    )
                dep.raise_for_status()
                run = client.post(
                    f"/deployments/{dep.json()['id']}/create_flow_run",
                    json={
                        "parameters": {
                            "params": {
                                "model_name": call.model,
                                "incident_id": incident,
                                "reason": "webhook",
                                "trigger_event_id": delivery,
                            }
                        }
                    },
                )
                run.raise_for_status()
            return {"flow_run_id": run.json()["id"], "incident_id": incident}
        name = f"driftloop.{call.action.replace('_', '.')}"
        event_id = events.emit(
            api_url,
            name,
            {"model_name": call.model, "delivery": delivery, **call.payload},
        )
        return {"event": name, "event_id": event_id}

    async def hooks(request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"error": "body: larger than 64 KiB"}, status_code=413)
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            verify(secret, headers, body, now=time.time(), tolerance=tolerance, guard=guard)
        except WebhookRejected as exc:
            return JSONResponse({"error": exc.reason}, status_code=401)
        try:
            call = WebhookCall.model_validate_json(body)
        except ValidationError as exc:
            fields = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
            )
            return JSONResponse({"error": fields}, status_code=422)
        try:
            result = act(call, headers[DELIVERY_HEADER])
        except WebhookRejected as exc:
            return JSONResponse({"error": exc.reason}, status_code=409)
        except (httpx.HTTPError, DriftloopError) as exc:
            return JSONResponse({"error": f"prefect: {exc}"}, status_code=502)
        return JSONResponse({"accepted": True, **result}, status_code=202)

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/hooks", hooks, methods=["POST"]), Route("/healthz", healthz)])


def new_delivery_id() -> str:
    return uuid.uuid4().hex
