"""Webhooks: signed deliveries become Prefect events; bad, stale and replayed ones are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from driftloop.prefect_local import free_port
from driftloop.webhook import new_delivery_id, sign

pytestmark = pytest.mark.integration
SECRET = "test-webhook-secret"


@pytest.fixture
def hook(prefect_api_url: str, tmp_path: Path):
    port = free_port()
    env = {
        **os.environ,
        "DRIFTLOOP_WEBHOOK_SECRET": SECRET,
        "DRIFTLOOP_PREFECT_API_URL": prefect_api_url,
        "DRIFTLOOP_STATE_DIR": str(tmp_path / "state"),
    }
    log = (tmp_path / "webhook.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("driftloop")), "webhook", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "webhook.log").read_text())
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def signed(
    body: bytes, *, ts: float | None = None, delivery: str | None = None, secret: str = SECRET
) -> dict:
    t = str(int(ts if ts is not None else time.time()))
    d = delivery or new_delivery_id()
    return {
        "X-Driftloop-Timestamp": t,
        "X-Driftloop-Delivery": d,
        "X-Driftloop-Signature": sign(secret, t, d, body),
        "Content-Type": "application/json",
    }


def test_valid_signature_is_accepted_and_becomes_an_event(hook: str, prefect_api_url: str) -> None:
    from driftloop.events import read_events

    since = datetime.now(UTC) - timedelta(seconds=5)
    body = b'{"action": "labels_landed", "model": "fraud", "payload": {"rows": 120}}'
    r = httpx.post(f"{hook}/hooks", content=body, headers=signed(body), timeout=10)
    assert r.status_code == 202, r.text
    event_id = r.json()["event_id"]
    deadline = time.monotonic() + 20
    found = []
    while time.monotonic() < deadline and not found:
        found = [
            e
            for e in read_events(prefect_api_url, names=["driftloop.labels.landed"], since=since)
            if str(e.id) == event_id
        ]
        time.sleep(0.3)
    assert found, "the webhook's event never reached the Prefect server"
    assert found[0].payload["rows"] == 120


def test_missing_wrong_stale_and_replayed_signatures_are_refused(hook: str) -> None:
    body = b'{"action": "data_landed"}'
    r = httpx.post(f"{hook}/hooks", content=body, timeout=10)
    assert r.status_code == 401 and "missing header" in r.text
    r = httpx.post(f"{hook}/hooks", content=body, headers=signed(body, secret="wrong"), timeout=10)
    assert r.status_code == 401 and "signature" in r.text
    tampered = signed(body)
    r = httpx.post(
        f"{hook}/hooks", content=b'{"action": "retrain_now"}', headers=tampered, timeout=10
    )
    assert r.status_code == 401 and "signature" in r.text
    r = httpx.post(
        f"{hook}/hooks", content=body, headers=signed(body, ts=time.time() - 3600), timeout=10
    )
    assert r.status_code == 401 and "stale" in r.text
    headers = signed(body)
    assert httpx.post(f"{hook}/hooks", content=body, headers=headers, timeout=10).status_code == 202
    r = httpx.post(f"{hook}/hooks", content=body, headers=headers, timeout=10)
    assert r.status_code == 401 and "replayed" in r.text


def test_bad_body_names_the_field(hook: str) -> None:
    body = b'{"action": "reboot"}'
    r = httpx.post(f"{hook}/hooks", content=body, headers=signed(body), timeout=10)
    assert r.status_code == 422 and "action" in r.text
