"""Client traffic for router and rollout tests: bounded loops, every answer recorded."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import polars as pl

#: drop idle connections well before the server does (uvicorn closes them after 5 s):
#: reusing one the server is closing fails the request (ReadError) on any HTTP/1.1 client
KEEPALIVE = 2.0


@dataclass
class Result:
    card_id: int
    transaction_id: str
    status: int | None  # None: no answer (transport error)
    arm: str | None
    request_id: str | None
    at: float  # time.time() when the answer came back
    decision: bool | None = None
    detail: str = ""  # the body of an error answer (or the transport error)


def transactions(frame: pl.DataFrame, n_cards: int = 400) -> list[dict[str, Any]]:
    """One request template per distinct card (the newest transaction of each)."""
    rows = frame.sort("event_timestamp").unique("card_id", keep="last").head(n_cards)
    return [
        {
            "card_id": r["card_id"],
            "merchant_id": r["merchant_id"],
            "amount": r["amount"],
            "category": r["category"],
            "channel": r["channel"],
            "country": r["country"],
            "timestamp": r["event_timestamp"].isoformat(),
        }
        for r in rows.iter_rows(named=True)
    ]


def _parse(card: int, tid: str, response: httpx.Response | str) -> Result:
    now = time.time()
    if isinstance(response, str):
        return Result(card, tid, None, None, None, now, detail=response)
    if response.status_code != 200:
        return Result(card, tid, response.status_code, None, None, now, detail=response.text[:300])
    body = response.json()
    return Result(card, tid, 200, body["arm"], body["request_id"], now, body["decision"])


async def _send(
    client: httpx.AsyncClient, url: str, template: dict[str, Any], tid: str
) -> Result:
    body = {"transaction": {**template, "transaction_id": tid}}
    try:
        response: httpx.Response | str = await client.post(f"{url}/predict", json=body)
    except httpx.HTTPError as exc:
        response = f"{type(exc).__name__}: {exc}"
    return _parse(template["card_id"], tid, response)


def send(
    url: str,
    templates: list[dict[str, Any]],
    n: int,
    *,
    concurrency: int = 16,
    prefix: str = "t",
) -> list[Result]:
    """``n`` requests cycling over ``templates`` from ``concurrency`` clients."""

    async def run() -> list[Result]:
        out: list[Result] = []
        limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=KEEPALIVE)
        async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:
            next_i = 0

            async def worker() -> None:
                nonlocal next_i
                while next_i < n:
                    i = next_i
                    next_i += 1
                    tid = f"{prefix}-{i}-{time.monotonic_ns()}"
                    out.append(await _send(client, url, templates[i % len(templates)], tid))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out

    return asyncio.run(run())


@dataclass
class Traffic:
    """A background client loop: ``rate`` requests/s at most, until stopped (bounded)."""

    url: str
    templates: list[dict[str, Any]]
    concurrency: int = 8
    rate: float | None = None
    max_requests: int = 200_000
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Result]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        return self.results

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, keepalive_expiry=KEEPALIVE)
        interval = self.concurrency / self.rate if self.rate else 0.0
        sent = 0
        async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:

            async def worker(w: int) -> None:
                nonlocal sent
                while not self._stop.is_set() and sent < self.max_requests:
                    i = sent
                    sent += 1
                    started = time.monotonic()
                    template = self.templates[i % len(self.templates)]
                    tid = f"bg-{i}-{w}-{time.monotonic_ns()}"
                    self.results.append(await _send(client, self.url, template, tid))
                    if interval:
                        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

            await asyncio.gather(*(worker(w) for w in range(self.concurrency)))
