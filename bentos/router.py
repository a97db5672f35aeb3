"""The traffic splitter: one BentoML service in front of the model arms.

Same contract as the model service (``POST /predict {"transaction": ...}``,
``POST /predict_batch {"transactions": [...]}``); the answer is the arm's own
answer, byte for byte, so ``arm`` and ``model_version`` say who served it.

    DRIFTLOOP_STATE_DIR=... BENTOML_HOME=<a home of its own> \
        bentoml serve bentos.router:Router --port 3000

(``driftloop serve`` does this; the router's own ``BENTOML_HOME``,
:func:`driftloop.routing.router_home`, keeps arm starts from wiping its metrics.)

- **Weights** come from the serving plane's desired state
  (``<state_dir>/plane/<model>.json``, :func:`load_desired_state`: one ``stat``
  per request, re-read when the file changes), so a rollout step or a rollback
  takes effect on the next request, and a restarted router routes as before.
- **Sticky by card**: :class:`driftloop.routing.RouteTable` (pure, unit-tested).
- **Fallback**: an arm that refuses the connection or answers 503 is retried once
  on the champion; the client gets the champion's answer (outcome ``fallback``).
  A refused arm is skipped for :data:`DEAD_ARM_SECONDS` (its share goes straight
  to the champion). Any other error is returned as the arm gave it.
- **Shadow**: arms listed under ``shadow`` get a mirrored copy of each request in
  a background task, off the request path; they log their predictions themselves
  (with their arm name), the router only counts them and pairs their decisions
  with the primary answer. Their answers are never returned. A canary just
  deployed (no weight yet) is mirrored to the same way until it has answered
  :data:`~driftloop.routing.WARMUP_REQUESTS` requests: it is warm before it is judged.
- **One shared HTTP client session** (a pool of :data:`POOL_SIZE` keep-alive
  connections) for every call; no ``bentoml.depends`` (see STACK_NOTES). It is
  aiohttp's (a BentoML dependency), not httpx's: httpx's AsyncClient cost 2.5 ms
  of CPU per call on our 2-core machine, aiohttp's 0.7 ms, and the router's CPU
  is what it takes away from the model arms on the same cores.
- **Counters** per arm (:class:`driftloop.routing.ArmCounters`) are flushed every
  :data:`FLUSH_SECONDS` to ``<state_dir>/router/<model>/<instance>.json`` for the
  rollout's analysis; Prometheus series ``driftloop_router_*`` and
  ``driftloop_rollout_*`` are on ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import bentoml
import orjson
from pydantic import Field
from starlette.responses import Response

try:  # inside a built Bento the library is shipped under src/
    import driftloop  # noqa: F401
except ImportError:  # pragma: no cover - only in a Bento without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from driftloop import metrics  # noqa: E402
from driftloop.errors import ServingError  # noqa: E402
from driftloop.ledger import Ledger  # noqa: E402
from driftloop.plane.base import desired_state_path, load_desired_state, write_atomic  # noqa: E402
from driftloop.routing import (  # noqa: E402
    WARMUP_REQUESTS,
    ArmCounters,
    RouterSnapshot,
    RouteTable,
    should_retry,
    stats_dir,
)
from driftloop.serving import PredictionResponse, TransactionRequest  # noqa: E402

logger = logging.getLogger(__name__)

MAX_BATCH = 10_000
#: keep-alive connections to the arms, shared by all requests (>= the router's concurrency)
POOL_SIZE = 256
ARM_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 1.0
#: shorter than uvicorn's 5 s keep-alive, so we rarely reuse a connection the arm closed
KEEPALIVE_SECONDS = 4.0
#: after a refused connection, an arm's share goes straight to the champion this long
DEAD_ARM_SECONDS = 1.0
#: mirrored requests in flight at most; beyond, mirroring is skipped (never queued)
MAX_SHADOW_INFLIGHT = 128
FLUSH_SECONDS = 0.5
#: router state files not updated for this long are removed at start
STALE_STATS_SECONDS = 86_400.0

_JSON = {"content-type": "application/json"}


@dataclass
class Answer:
    """The outcome of sending one request (or sub-batch) to an arm."""

    arm: str  # the arm chosen
    served_by: str  # the arm that answered (the champion after a fallback)
    status: int | None  # None: nobody answered
    content: bytes
    outcome: str  # ok | error | fallback

    @property
    def ok(self) -> bool:
        return self.status == 200


class Splitter:
    """Routes requests to arms; the whole router minus the BentoML decorations."""

    def __init__(self, state_dir: Path, model_name: str, ledger: Ledger) -> None:
        self.model = model_name
        self.desired_path = desired_state_path(state_dir, model_name)
        self.ledger = ledger
        self.instance = uuid.uuid4().hex[:12]
        self.stats_dir = stats_dir(state_dir, model_name)
        self.stats_path = self.stats_dir / f"{self.instance}.json"
        self.started_at = datetime.now(UTC)
        self.counters: dict[str, ArmCounters] = {}
        self._session: aiohttp.ClientSession | None = None  # made in the event loop
        self._table: RouteTable | None = None
        self._table_key: tuple[int, datetime] | None = None
        self._desired_seen: object | None = None
        self._gauge_arms: dict[str, str] = {}
        self._dead_until: dict[str, float] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._warm: dict[tuple[str, str], int] = {}  # (arm, endpoint) -> warm-ups sent
        self.shadow_skipped = 0
        self._dirty = True
        self._ledger_key: tuple[int, int] | None = None
        self._ledger_seen = -1  # ledger entries of this model already accounted for

    # -- the routing table ------------------------------------------------------------
    def table(self) -> RouteTable:
        desired = load_desired_state(self.desired_path)
        if desired is None:
            raise ServingError(f"no desired state at {self.desired_path}: no arm to route to")
        if desired is not self._desired_seen:
            key = (desired.version, desired.updated_at)
            if key != self._table_key or self._table is None:
                self._table = RouteTable.from_desired(desired)
                self._table_key = key
                self._set_weight_gauge(self._table)
            self._desired_seen = desired
        assert self._table is not None
        return self._table

    def _set_weight_gauge(self, table: RouteTable) -> None:
        weights = table.weights or {}
        for name, arm in table.arms.items():
            self._gauge_arms[name] = arm.version
        for name, version in self._gauge_arms.items():
            metrics.ROLLOUT_WEIGHT.labels(self.model, name, version).set(weights.get(name, 0))

    def _arm(self, name: str) -> ArmCounters:
        c = self.counters.get(name)
        if c is None:
            c = self.counters[name] = ArmCounters()
        return c

    # -- calling arms -----------------------------------------------------------------
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=POOL_SIZE, keepalive_timeout=KEEPALIVE_SECONDS
                ),
                timeout=aiohttp.ClientTimeout(
                    total=ARM_TIMEOUT_SECONDS, sock_connect=CONNECT_TIMEOUT_SECONDS
                ),
                trust_env=False,  # never send 127.0.0.1 traffic through an HTTP(S)_PROXY
            )
        return self._session

    async def _post(
        self, table: RouteTable, arm: str, path: str, body: bytes
    ) -> tuple[int | None, bytes]:
        url = table.arms[arm].endpoint + path
        try:
            async with self.session().post(url, data=body, headers=_JSON) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                self._dead_until[arm] = time.monotonic() + DEAD_ARM_SECONDS
            return None, f"{type(exc).__name__}: {exc}".encode()

    async def call(
        self, table: RouteTable, arm: str, path: str, body: bytes, rows: int = 1
    ) -> Answer:
        """Send to ``arm``; on a transport failure or a 503 retry once on the champion."""
        started = time.perf_counter()
        fallback = table.fallback(arm)
        dead = fallback is not None and self._dead_until.get(arm, 0.0) > time.monotonic()
        status, content = (None, b"skipped: arm refused connections") if dead else (
            await self._post(table, arm, path, body)
        )
        served_by = arm
        if should_retry(status):
            target = fallback or arm
            status, content = await self._post(table, target, path, body)
            served_by = target
        if status == 200:
            outcome = "ok" if served_by == arm else "fallback"
        else:
            outcome = "error"
        elapsed = time.perf_counter() - started
        counters = self._arm(arm)
        counters.observe(elapsed * 1000.0, rows=rows)
        if outcome == "error":
            counters.errors += rows
        elif outcome == "fallback":
            counters.fallbacks += rows
        self._dirty = True
        version = table.arms[arm].version
        metrics.ROUTER_REQUESTS.labels(self.model, arm, version, outcome).inc()
        metrics.ROUTER_LATENCY.labels(self.model, arm).observe(elapsed)
        return Answer(arm=arm, served_by=served_by, status=status, content=content, outcome=outcome)

    def _record_answers(self, arm: str, answers: list[dict[str, Any]]) -> None:
        counters = self._arm(arm)
        for a in answers:
            counters.answer(float(a["score"]), bool(a["decision"]))

    # -- mirroring --------------------------------------------------------------------
    def mirror(
        self,
        table: RouteTable,
        path: str,
        body: bytes,
        primary: list[dict[str, Any]] | None,
        rows: int,
    ) -> None:
        """Send a copy to each shadow (or warming) arm in the background, never awaited."""
        if len(self._inflight) >= MAX_SHADOW_INFLIGHT:
            self.shadow_skipped += 1
            return
        for arm in self.mirrors(table):
            task = asyncio.create_task(self._mirror(table, arm, path, body, primary, rows))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def mirrors(self, table: RouteTable) -> list[str]:
        """Shadow arms, plus new canaries not yet sent their warm-up requests."""
        out = list(table.shadow)
        for arm in table.warming:
            key = (arm, table.arms[arm].endpoint)
            sent = self._warm.get(key, 0)
            if sent < WARMUP_REQUESTS:  # a fixed number: a slow arm is not flooded
                self._warm[key] = sent + 1
                out.append(arm)
        return out

    async def _mirror(
        self,
        table: RouteTable,
        arm: str,
        path: str,
        body: bytes,
        primary: list[dict[str, Any]] | None,
        rows: int,
    ) -> None:
        started = time.perf_counter()
        status, content = await self._post(table, arm, path, body)
        elapsed = time.perf_counter() - started
        counters = self._arm(arm)
        counters.observe(elapsed * 1000.0, rows=rows, mirrored=True)
        self._dirty = True
        outcome = "ok" if status == 200 else "error"
        metrics.ROUTER_REQUESTS.labels(self.model, arm, table.arms[arm].version, outcome).inc()
        metrics.ROUTER_LATENCY.labels(self.model, arm).observe(elapsed)
        if status != 200:
            counters.errors += rows
            return
        try:
            parsed = orjson.loads(content)
            answers = parsed if isinstance(parsed, list) else [parsed]
            self._record_answers(arm, answers)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("shadow arm %s answered something that is not a prediction", arm)
            return
        if primary is not None:
            for mine, theirs in zip(answers, primary, strict=False):
                counters.pair(bool(mine.get("decision")) == bool(theirs.get("decision")))

    # -- the two endpoints ------------------------------------------------------------
    async def predict(self, tx: TransactionRequest) -> Response:
        table = self.table()
        if tx.request_id is None:  # shared by the primary and any mirrored copy
            tx = tx.model_copy(update={"request_id": uuid.uuid4().hex})
        body = b'{"transaction":' + tx.model_dump_json(exclude_none=True).encode() + b"}"
        arm = table.choose(tx.card_id)
        answer = await self.call(table, arm, "/predict", body)
        parsed: list[dict[str, Any]] | None = None
        if answer.ok:
            try:
                parsed = [orjson.loads(answer.content)]
                self._record_answers(answer.served_by, parsed)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                parsed = None
        if table.shadow or table.warming:
            self.mirror(table, "/predict", body, parsed, 1)
        return _response(answer)

    async def predict_batch(self, txs: list[TransactionRequest]) -> Response:
        table = self.table()
        encoded: list[bytes] = []
        groups: dict[str, list[int]] = {}
        for i, tx in enumerate(txs):
            if tx.request_id is None:
                tx = tx.model_copy(update={"request_id": uuid.uuid4().hex})
            encoded.append(tx.model_dump_json(exclude_none=True).encode())
            groups.setdefault(table.choose(tx.card_id), []).append(i)

        def body_of(indices: list[int]) -> bytes:
            return b'{"transactions":[' + b",".join(encoded[i] for i in indices) + b"]}"

        plan = [(arm, idx, body_of(idx)) for arm, idx in groups.items()]
        answers = await asyncio.gather(
            *(
                self.call(table, arm, "/predict_batch", body, rows=len(idx))
                for arm, idx, body in plan
            )
        )
        results: list[Any] = [None] * len(txs)
        failed: Answer | None = None
        for (_arm, idx, _body), answer in zip(plan, answers, strict=True):
            if not answer.ok:
                failed = failed or answer
                continue
            try:
                items = orjson.loads(answer.content)
                self._record_answers(answer.served_by, items)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                failed = failed or Answer(answer.arm, answer.served_by, 502, b"", "error")
                continue
            for i, item in zip(idx, items, strict=True):
                results[i] = item
        if table.shadow or table.warming:
            whole = body_of(list(range(len(txs))))
            self.mirror(table, "/predict_batch", whole, None if failed else results, len(txs))
        if failed is not None:
            return _response(failed)
        if len(plan) == 1:
            return _response(answers[0])
        return Response(orjson.dumps(results), status_code=200, media_type="application/json")

    # -- housekeeping -----------------------------------------------------------------
    def snapshot(self) -> RouterSnapshot:
        return RouterSnapshot(
            instance=self.instance,
            model_name=self.model,
            pid=os.getpid(),
            started_at=self.started_at,
            updated_at=datetime.now(UTC),
            arms={n: c.model_copy(deep=True) for n, c in self.counters.items()},
        )

    def flush(self) -> bytes | None:
        """The state file's new content if something changed (written by the caller)."""
        if not self._dirty:
            return None
        self._dirty = False
        return self.snapshot().model_dump_json().encode()

    def write_stats(self, data: bytes) -> None:
        write_atomic(self.stats_path, data)

    def remove_stale_stats(self) -> None:
        cutoff = time.time() - STALE_STATS_SECONDS
        for path in self.stats_dir.glob("*.json") if self.stats_dir.is_dir() else ():
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()

    def count_breaches(self) -> None:
        """Count automatic rollbacks appended to the ledger since this router started."""
        try:
            st = self.ledger.path.stat()
        except FileNotFoundError:
            if self._ledger_seen < 0:
                self._ledger_seen = 0
            return
        key = (st.st_size, st.st_mtime_ns)
        if key == self._ledger_key:
            return
        self._ledger_key = key
        entries = self.ledger.entries(model_name=self.model)
        if self._ledger_seen < 0:  # at start: only breaches from now on count
            self._ledger_seen = len(entries)
            return
        for entry in entries[self._ledger_seen :]:
            if entry.action == "rolled_back" and entry.actor == "system" and entry.analysis:
                for reason in entry.analysis.get("failed") or ["unknown"]:
                    metrics.ROLLOUT_BREACHES.labels(self.model, str(reason)).inc()
        self._ledger_seen = len(entries)

    async def housekeeping(self) -> None:
        await asyncio.to_thread(self.remove_stale_stats)
        while True:
            try:
                with contextlib.suppress(ServingError):
                    self.table()  # keeps the weight gauge current without traffic
                data = self.flush()
                if data is not None:
                    await asyncio.to_thread(self.write_stats, data)
                await asyncio.to_thread(self.count_breaches)
            except Exception:  # the loop must survive; the next pass retries
                logger.exception("router housekeeping failed")
            await asyncio.sleep(FLUSH_SECONDS)

    async def close(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        data = self.flush()
        if data is not None:
            self.write_stats(data)
        if self._session is not None:
            await self._session.close()


def _response(answer: Answer) -> Response:
    if answer.status is None:
        why = answer.content.decode(errors="replace")
        body = orjson.dumps({"error": f"no arm answered: {why}"})
        return Response(body, status_code=503, media_type="application/json")
    return Response(answer.content, status_code=answer.status, media_type="application/json")


def _unavailable(exc: Exception) -> Response:
    body = orjson.dumps({"error": str(exc)})
    return Response(body, status_code=503, media_type="application/json")


@bentoml.service(
    name="driftloop_router",
    workers=1,
    traffic={"timeout": 60, "max_concurrency": 1024},
    logging={"access": {"enabled": False}},
)
class Router:
    """Splits traffic between the model arms of the serving plane."""

    def __init__(self) -> None:
        from driftloop.settings import get_settings

        settings = get_settings()  # no apply_environment(): the router has no BentoML store
        self.splitter = Splitter(
            settings.state_dir, settings.model_name, Ledger.for_settings(settings)
        )
        self._housekeeping: asyncio.Task[None] | None = None

    @bentoml.on_startup
    async def _start(self) -> None:
        self._housekeeping = asyncio.create_task(self.splitter.housekeeping())

    @bentoml.api
    async def predict(self, transaction: TransactionRequest) -> PredictionResponse:
        """Score one transaction on the arm its card is routed to."""
        try:
            return await self.splitter.predict(transaction)  # type: ignore[return-value]
        except ServingError as exc:
            return _unavailable(exc)  # type: ignore[return-value]

    @bentoml.api
    async def predict_batch(
        self,
        transactions: Annotated[
            list[TransactionRequest], Field(min_length=1, max_length=MAX_BATCH)
        ],
    ) -> list[PredictionResponse]:
        """Score many transactions; each row goes to the arm its card is routed to."""
        try:
            return await self.splitter.predict_batch(transactions)  # type: ignore[return-value]
        except ServingError as exc:
            return _unavailable(exc)  # type: ignore[return-value]

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        await self.splitter.close()
