"""The live stream of the demo: simulated transactions sent through the router, late labels,
fresh card aggregates pushed to the online store.

Two layers, kept apart:

* **Planning** (pure, unit-tested): :func:`plan_stream` simulates one world (the
  history the champion is trained on, then the live stream, which switches to the
  injected scenario at the injection time) and lays the live events on the wall
  clock: :func:`wall_offsets` gives, for each live transaction, when to send it and
  when its label is due, in seconds after the stream starts. ``speed`` is simulated
  seconds per wall second; with ``pace="steady"`` the transactions go out at a steady
  rate (the simulated clock runs faster at night, when there are fewer of them),
  with ``pace="clock"`` at their own simulated times divided by ``speed``.
* **Streaming** (:class:`LiveTraffic`, I/O): a background thread with one asyncio
  loop and one pooled httpx client sends each transaction through the router's
  ``POST /predict`` when it is due (bounded concurrency), records every acknowledged
  ``request_id``, and sends each label to a model arm's ``POST /feedback`` when its
  (compressed) label delay has passed. A second thread plays the streaming feature
  source: every ``push_seconds`` it pushes the card aggregates of the transactions
  sent since the last push to the Feast online store
  (:func:`driftloop.features.push_card_features`), appends them to the offline source
  every ``offline_seconds`` (what a streaming source's offline sink does, so that a
  retrain's point-in-time join sees them), and loads each new simulated day's
  merchant rows into the online store when the stream's clock crosses midnight (the
  daily batch job).

The card aggregates are computed once, vectorised, over the whole world
(:func:`driftloop.features.compute_card_features`): the state after each transaction
is what a streaming aggregator would hold after seeing it; the pusher releases each
row only once its transaction has been sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from driftloop.errors import ConfigError, DataError
from driftloop.simulate import Scenario, SimulationConfig, simulate

log = logging.getLogger(__name__)

Pace = Literal["steady", "clock"]
#: how labels travel: all through ``/feedback``, or the frauds (chargebacks) through
#: ``/feedback`` and the many more legitimate outcomes landed in bulk in the label log
LabelMode = Literal["feedback", "mixed"]

__all__ = [
    "LiveTraffic",
    "Pace",
    "StreamPlan",
    "StreamSpec",
    "TrafficStats",
    "card_states",
    "due_until",
    "previous_of_card",
    "plan_stream",
    "request_id_for",
    "wall_offsets",
]


# --------------------------------------------------------------------------------------
# planning (pure)
# --------------------------------------------------------------------------------------


class StreamSpec(BaseModel):
    """What the demo streams, and how fast. Every field has a demo-sized default."""

    model_config = ConfigDict(extra="forbid")

    scenario: Scenario = Field("concept_drift", description="injected drift scenario")
    speed: float = Field(
        1440.0, gt=0, le=1_000_000, description="simulated seconds per wall second"
    )
    rate: float = Field(
        80.0, gt=0, le=5_000, description="transactions per wall second (on average)"
    )
    pace: Pace = Field("steady", description="steady rate, or each event at its own time")
    history_days: float = Field(
        3.0, gt=0, le=365, description="simulated days of history before the stream"
    )
    live_seconds: float = Field(
        900.0, gt=0, le=86_400, description="wall seconds of live stream planned (an upper bound)"
    )
    inject_after_seconds: float = Field(
        45.0, ge=0, description="wall seconds of live stream before the scenario starts"
    )
    seed: int = Field(7, ge=0)
    label_delay_median_hours: float = Field(1.0, gt=0, description="simulated label delay")
    label_delay_sigma: float = Field(0.8, ge=0)

    @property
    def events_per_sim_second(self) -> float:
        return self.rate / self.speed

    @property
    def history_events(self) -> int:
        return max(1, round(self.events_per_sim_second * self.history_days * 86_400))

    @property
    def live_events(self) -> int:
        return max(1, round(self.rate * self.live_seconds))


class StreamPlan(BaseModel):
    """A simulated world split into history and a live stream laid on the wall clock."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    spec: StreamSpec
    #: simulated time at which the live stream begins (= the end of the history)
    live_start: datetime
    #: simulated time at which the injected scenario begins
    drift_at: datetime
    #: wall seconds after the stream starts at which the first drifted transaction is sent
    inject_offset: float
    #: position in the send plan of the first drifted transaction
    inject_index: int
    history: Any = Field(repr=False, description="pl.DataFrame, TRANSACTION_SCHEMA")
    #: live transactions (TRANSACTION_SCHEMA) + send_at, label_at (wall offsets, seconds)
    live: Any = Field(repr=False)
    _clock: tuple[np.ndarray, np.ndarray] | None = PrivateAttr(default=None)

    @property
    def world(self) -> pl.DataFrame:
        """History and live stream together (transaction columns only)."""
        return pl.concat([self.history, self.live.drop("send_at", "label_at")])

    def sim_time(self, offset: float) -> datetime:
        """The simulated time of the stream at ``offset`` wall seconds (by the send plan)."""
        if self._clock is None:
            live: pl.DataFrame = self.live
            self._clock = (
                live["send_at"].to_numpy(),
                live["event_timestamp"].dt.epoch("us").to_numpy() / 1e6,
            )
        sends, ts = self._clock
        return sim_time_at(sends, ts, offset, self.live_start, self.spec.speed)


def sim_time_at(
    sends: np.ndarray, ts: np.ndarray, offset: float, start: datetime, speed: float
) -> datetime:
    """The simulated time at wall ``offset`` of a send plan (``sends`` wall offsets of
    events at simulated unix seconds ``ts``); before and after it the clock runs at
    ``speed``."""
    if sends.size == 0 or offset <= sends[0]:
        return start + timedelta(seconds=max(0.0, offset) * speed)
    if offset >= sends[-1]:
        return datetime.fromtimestamp(float(ts[-1]) + (offset - sends[-1]) * speed, UTC)
    return datetime.fromtimestamp(float(np.interp(offset, sends, ts)), UTC)


def wall_offsets(
    event_seconds: np.ndarray,
    label_seconds: np.ndarray,
    *,
    start: float,
    speed: float,
    pace: Pace = "steady",
    rate: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Wall offsets (seconds after the stream starts) of each send and each label.

    ``event_seconds`` (sorted) and ``label_seconds`` are simulated unix seconds;
    ``start`` is the simulated time at offset 0. ``pace="clock"``: offset =
    (simulated time - start) / speed. ``pace="steady"``: the i-th event goes out at
    ``(i + 0.5) / rate`` and a label at the wall time the send plan reaches its
    simulated time (linear interpolation between sends; beyond the last send the
    clock runs on at ``speed``), so a label is never due before its transaction.
    """
    ev = np.asarray(event_seconds, dtype=np.float64)
    lb = np.asarray(label_seconds, dtype=np.float64)
    if ev.shape != lb.shape:
        raise ValueError("event_seconds and label_seconds must have the same length")
    if ev.size and np.any(np.diff(ev) < 0):
        raise ValueError("event_seconds must be sorted")
    if speed <= 0:
        raise ValueError("speed must be > 0")
    if pace == "clock":
        return (ev - start) / speed, (lb - start) / speed
    if pace != "steady":
        raise ValueError(f"pace must be 'steady' or 'clock', not {pace!r}")
    if rate is None or rate <= 0:
        raise ValueError("pace='steady' needs a rate > 0")
    sends = (np.arange(ev.size, dtype=np.float64) + 0.5) / rate
    if ev.size == 0:
        return sends, sends.copy()
    labels = np.interp(lb, ev, sends)
    after = lb > ev[-1]
    labels[after] = sends[-1] + (lb[after] - ev[-1]) / speed
    # a label never precedes its own send (equal simulated times, rounding)
    return sends, np.maximum(labels, sends)


def request_id_for(transaction_id: str) -> str:
    """The request id the stream sends with a transaction (labels name it back)."""
    return f"rq-{transaction_id}"


def plan_stream(spec: StreamSpec, live_start: datetime) -> StreamPlan:
    """Simulate the world of ``spec`` and lay its live part on the wall clock.

    The history covers ``history_days`` before ``live_start``. The live stream has the
    same density of transactions per simulated second (so card aggregates look the
    same), runs ``speed`` times faster than the wall clock and switches to
    ``spec.scenario`` at ``inject_after_seconds``: the stable world's rows before the
    injection time and the scenario world's rows after it, both simulated with the
    same seed (same cards, merchants and compromised merchants).
    """
    if live_start.tzinfo is None:
        live_start = live_start.replace(tzinfo=UTC)
    live_start = live_start.astimezone(UTC).replace(microsecond=0)
    density = spec.events_per_sim_second
    live_sim_seconds = spec.live_events / density
    begin = live_start - timedelta(days=spec.history_days)
    days = spec.history_days + live_sim_seconds / 86_400
    total = spec.history_events + spec.live_events
    # the injection, in simulated time: where the send plan is at inject_after_seconds
    drift_at = live_start + timedelta(seconds=spec.inject_after_seconds * spec.speed)
    common: dict[str, Any] = {
        "n_events": total,
        "seed": spec.seed,
        "start": begin,
        "days": days,
        "drift_start": drift_at,
        "label_delay_median_hours": spec.label_delay_median_hours,
        "label_delay_sigma": spec.label_delay_sigma,
    }
    stable = simulate(SimulationConfig(scenario="stable", id_prefix="tx", **common))
    if spec.scenario == "stable":
        world = stable
    else:
        drifted = simulate(SimulationConfig(scenario=spec.scenario, id_prefix="dx", **common))
        world = pl.concat(
            [
                stable.filter(pl.col("event_timestamp") < drift_at),
                drifted.filter(pl.col("event_timestamp") >= drift_at),
            ]
        ).sort("event_timestamp", maintain_order=True)
    history = world.filter(pl.col("event_timestamp") < live_start)
    live = world.filter(pl.col("event_timestamp") >= live_start)
    if history.is_empty() or live.is_empty():
        raise DataError("the planned stream has no history or no live part: raise rate or days")
    ev = live["event_timestamp"].dt.epoch("us").to_numpy() / 1e6
    lb = live["label_available_at"].dt.epoch("us").to_numpy() / 1e6
    sends, labels = wall_offsets(
        ev, lb, start=live_start.timestamp(), speed=spec.speed, pace=spec.pace, rate=spec.rate
    )
    live = live.with_columns(send_at=pl.Series(sends), label_at=pl.Series(labels))
    drifted_rows = np.flatnonzero(ev >= drift_at.timestamp())
    inject_index = int(drifted_rows[0]) if drifted_rows.size else int(sends.size)
    inject_offset = float(sends[inject_index]) if drifted_rows.size else float(sends[-1])
    return StreamPlan(
        spec=spec,
        live_start=live_start,
        drift_at=drift_at,
        inject_offset=inject_offset,
        inject_index=inject_index,
        history=history,
        live=live,
    )


def due_until(offsets: np.ndarray, start_index: int, now: float) -> int:
    """The index one past the last of ``offsets`` (sorted) at or before ``now``,
    searching from ``start_index``: ``offsets[start_index:result]`` are due."""
    return max(start_index, int(np.searchsorted(offsets, now, side="right")))


# --------------------------------------------------------------------------------------
# streaming (I/O)
# --------------------------------------------------------------------------------------


class TrafficStats(BaseModel):
    """A snapshot of the stream, for the live view and the final report."""

    elapsed: float = 0.0
    sent: int = 0
    acknowledged: int = 0
    errors: int = 0
    in_flight: int = 0
    held: int = Field(0, description="due, waiting for their card's previous state")
    lag_seconds: float = Field(0.0, description="how far behind its plan the sender is")
    labels_sent: int = Field(0, description="labels sent to /feedback")
    labels_landed: int = Field(0, description="labels landed in bulk in the label log")
    labels_failed: int = 0
    pushes: int = 0
    pushed_rows: int = 0
    push_errors: int = 0
    offline_parts: int = 0
    merchant_days: int = 0
    rate: float = Field(0.0, description="acknowledged per second, last few seconds")
    injected: bool = False
    sim_time: datetime | None = None
    last_error: str | None = None
    by_arm: dict[str, int] = Field(default_factory=dict)


@dataclass
class _Counters:
    sent: int = 0
    acknowledged: int = 0
    errors: int = 0
    in_flight: int = 0
    labels_sent: int = 0
    labels_landed: int = 0
    labels_failed: int = 0
    pushes: int = 0
    pushed_rows: int = 0
    push_errors: int = 0
    offline_parts: int = 0
    merchant_days: int = 0
    last_error: str | None = None
    by_arm: dict[str, int] = field(default_factory=dict)


FeedbackTarget = Callable[[], str | None]


class LiveTraffic:
    """Streams a :class:`StreamPlan` through the router; see the module docstring.

    ``feedback_url`` returns the base URL of a model arm to send labels to (asked per
    batch of labels: arms come and go during a rollout). ``settings`` (for the Feast
    store and the offline source) may be None to disable the feature source.

    **Feature freshness on a compressed clock.** A card's state is pushed once its
    transaction has been answered, and a transaction whose card's previous transaction
    is not yet answered and pushed is held back until it is: every transaction is
    scored with the state after its card's previous transaction, exactly what training
    joins point in time. (Without this, at thousands of simulated seconds per wall
    second, a burst's follow-up transactions would be scored before their card's state
    caught up, and the velocity features would differ from training's.)
    """

    def __init__(
        self,
        plan: StreamPlan,
        router_url: str,
        feedback_url: FeedbackTarget,
        feedback_token: str | None,
        settings: Any | None = None,
        *,
        concurrency: int = 32,
        batch_size: int = 1,
        labels: LabelMode = "feedback",
        label_log: Any | None = None,
        push_seconds: float = 0.1,
        offline_seconds: float = 5.0,
        timeout: float = 30.0,
    ) -> None:
        if concurrency < 1 or batch_size < 1:
            raise ConfigError("concurrency and batch_size must be >= 1")
        if labels not in ("feedback", "mixed"):
            raise ConfigError(f"labels must be 'feedback' or 'mixed', not {labels!r}")
        if labels == "mixed" and label_log is None:
            raise ConfigError("labels='mixed' needs a label_log (driftloop.predlog.LabelLog)")
        self.plan = plan
        self.router_url = router_url.rstrip("/")
        self.feedback_url = feedback_url
        self.feedback_token = feedback_token
        self.settings: Any = settings
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.labels_mode = labels
        self.label_log: Any = label_log
        self.push_seconds = push_seconds
        self.offline_seconds = offline_seconds
        self.timeout = timeout
        live: pl.DataFrame = plan.live
        n = live.height
        self._send_at = live["send_at"].to_numpy()
        self._label_order = np.argsort(live["label_at"].to_numpy(), kind="stable")
        self._label_at = live["label_at"].to_numpy()[self._label_order]
        self._bodies = self._request_bodies(live)
        self._labels = live["is_fraud"].to_list()
        self._observed = [t.isoformat() for t in live["label_available_at"].to_list()]
        self._prev = previous_of_card(live)
        self._acked = np.zeros(n, dtype=bool)
        self._done = np.zeros(n, dtype=bool)  # the predict call has finished
        # the state after this transaction is online (all True without a feature source)
        self._pushed = np.full(n, settings is None, dtype=bool)
        self._label_due = np.zeros(n, dtype=bool)  # its label delay has passed
        self._ready: deque[int] = deque()  # labels to send (due, prediction answered)
        self._landing: list[dict[str, Any]] = []  # legitimate outcomes waiting to be landed
        self._held: deque[int] = deque()  # due, waiting for their card's previous state
        self._next = 0  # transactions [0, _next) were due and taken (sent or held)
        self._lock = threading.Lock()
        self._c = _Counters()
        self._rate_marks: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._started_at: float | None = None
        self._injected_at: datetime | None = None
        self._threads: list[threading.Thread] = []

    @staticmethod
    def _request_bodies(live: pl.DataFrame) -> list[dict[str, Any]]:
        rows = live.select(
            "transaction_id",
            "card_id",
            "merchant_id",
            "amount",
            "category",
            "channel",
            "country",
            "event_timestamp",
        ).to_dicts()
        bodies = []
        for r in rows:
            tx = {k: v for k, v in r.items() if v is not None and k != "event_timestamp"}
            tx["timestamp"] = r["event_timestamp"].isoformat()
            tx["request_id"] = request_id_for(r["transaction_id"])
            bodies.append({"transaction": tx})
        return bodies

    # -- control ------------------------------------------------------------------------
    def start(self) -> LiveTraffic:
        if self._threads:
            return self
        self._started_at = time.monotonic()
        sender = threading.Thread(
            target=lambda: asyncio.run(self._run()), name="driftloop-traffic", daemon=True
        )
        self._threads.append(sender)
        if self.settings is not None:
            self._threads.append(
                threading.Thread(
                    target=self._feature_source, name="driftloop-features", daemon=True
                )
            )
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop sending; waits for requests in flight (and a last feature push)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def elapsed(self) -> float:
        return 0.0 if self._started_at is None else time.monotonic() - self._started_at

    @property
    def injected(self) -> bool:
        """The first transaction of the injected scenario has been sent."""
        return self._injected_at is not None

    @property
    def injected_at(self) -> datetime | None:
        """When the first transaction of the injected scenario was sent (wall clock)."""
        return self._injected_at

    def acknowledged_request_ids(self) -> list[str]:
        """Request ids the router answered with 200 (must all reach Delta)."""
        with self._lock:
            idx = np.flatnonzero(self._acked)
        return [self._bodies[i]["transaction"]["request_id"] for i in idx]

    def stats(self) -> TrafficStats:
        now = self.elapsed()
        with self._lock:
            c = self._c
            marks = self._rate_marks
            marks.append((now, c.acknowledged))
            while len(marks) > 2 and marks[0][0] < now - 5.0:
                marks.pop(0)
            (t0, a0), (t1, a1) = marks[0], marks[-1]
            rate = (a1 - a0) / (t1 - t0) if t1 > t0 else 0.0
            oldest = self._held[0] if self._held else self._next
            lag = 0.0
            if oldest < len(self._send_at) and self._send_at[oldest] < now:
                lag = now - float(self._send_at[oldest])
            return TrafficStats(
                elapsed=now,
                sent=c.sent,
                acknowledged=c.acknowledged,
                errors=c.errors,
                in_flight=c.in_flight,
                held=len(self._held),
                lag_seconds=lag,
                labels_sent=c.labels_sent,
                labels_landed=c.labels_landed,
                labels_failed=c.labels_failed,
                pushes=c.pushes,
                pushed_rows=c.pushed_rows,
                push_errors=c.push_errors,
                offline_parts=c.offline_parts,
                merchant_days=c.merchant_days,
                rate=rate,
                injected=self.injected,
                sim_time=self.plan.sim_time(now) if self._started_at is not None else None,
                last_error=c.last_error,
                by_arm=dict(c.by_arm),
            )

    # -- the sender -----------------------------------------------------------------------
    def _sendable(self, i: int) -> bool:
        p = self._prev[i]
        return p < 0 or bool(self._pushed[p])

    def _take(self, now: float) -> list[int]:
        """Transactions to send now, in plan order: held ones whose card caught up, then
        newly due ones (those whose card is still busy are held)."""
        out: list[int] = []
        if self._held:
            still: deque[int] = deque()
            for i in self._held:
                (out if self._sendable(i) else still).append(i)
            self._held = still
        due = due_until(self._send_at, self._next, now)
        for i in range(self._next, due):
            (out if self._sendable(i) else self._held).append(i)
        self._next = due
        return out

    async def _run(self) -> None:
        """The sender: predictions when due, labels when due *and* answered, both with
        bounded concurrency and neither starving the other when the stack falls behind."""
        import httpx

        limits = httpx.Limits(
            max_connections=self.concurrency * 2, max_keepalive_connections=self.concurrency * 2
        )
        headers = {}
        if self.feedback_token:
            headers["Authorization"] = f"Bearer {self.feedback_token}"
        predict_sem = asyncio.Semaphore(self.concurrency)
        label_sem = asyncio.Semaphore(max(2, self.concurrency // 2))
        tasks: set[asyncio.Task[None]] = set()
        waiting: deque[int] = deque()  # taken, not yet handed to a call
        label_index = 0
        last_landing = 0.0
        n = len(self._send_at)

        def spawn(coro: Any) -> None:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async with httpx.AsyncClient(
            limits=limits, timeout=self.timeout, trust_env=False
        ) as client:
            while not self._stop.is_set():
                now = self.elapsed()
                busy = False
                with self._lock:
                    waiting.extend(self._take(now))
                while waiting and not predict_sem.locked():
                    rows = [waiting.popleft() for _ in range(min(self.batch_size, len(waiting)))]
                    await predict_sem.acquire()
                    if self._injected_at is None and max(rows) >= self.plan.inject_index:
                        self._injected_at = datetime.now(UTC)
                    spawn(self._predict(client, rows, predict_sem))
                    busy = True
                ldue = due_until(self._label_at, label_index, now)
                for j in range(label_index, ldue):
                    i = int(self._label_order[j])
                    self._label_due[i] = True
                    if self._done[i] and self._acked[i]:
                        self._ready.append(i)
                label_index = ldue
                if self.labels_mode == "mixed":
                    self._route_negatives()
                if self._ready and not label_sem.locked():
                    base = self.feedback_url()
                    while base is not None and self._ready and not label_sem.locked():
                        await label_sem.acquire()
                        i = self._ready.popleft()
                        spawn(self._feedback(client, base, headers, i, label_sem))
                        busy = True
                if self._landing and now - last_landing >= 0.5:
                    last_landing = now
                    batch, self._landing = self._landing, []
                    await asyncio.to_thread(self._land, batch)
                if (
                    self._next >= n
                    and not self._held
                    and not waiting
                    and label_index >= n
                    and not self._ready
                    and not tasks
                ):
                    break
                await asyncio.sleep(0 if busy else 0.005)
            if tasks:
                await asyncio.wait(tasks, timeout=self.timeout)
            if self.labels_mode == "mixed":
                self._route_negatives()
            if self._landing:
                batch, self._landing = self._landing, []
                await asyncio.to_thread(self._land, batch)

    async def _predict(self, client: Any, rows: list[int], sem: asyncio.Semaphore) -> None:
        """One call to the router: ``/predict`` for one row, ``/predict_batch`` for more."""
        n = len(rows)
        with self._lock:
            self._c.sent += n
            self._c.in_flight += n
        arms: list[str | None] = []
        ok = False
        try:
            if n == 1:
                url, body = f"{self.router_url}/predict", self._bodies[rows[0]]
            else:
                url = f"{self.router_url}/predict_batch"
                body = {"transactions": [self._bodies[i]["transaction"] for i in rows]}
            import httpx

            try:
                r = await client.post(url, json=body)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                # a pooled keep-alive connection the server closed as it was reused: the
                # request did not get through; once more on a fresh connection (request
                # ids make a repeat harmless)
                r = await client.post(url, json=body)
            ok = r.status_code == 200
            if ok:
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    answer = r.json()
                    answers = answer if isinstance(answer, list) else [answer]
                    arms = [a.get("arm") for a in answers]
            with self._lock:
                if ok:
                    self._acked[rows] = True
                    self._c.acknowledged += n
                    for arm in arms:
                        if arm:
                            self._c.by_arm[arm] = self._c.by_arm.get(arm, 0) + 1
                else:
                    self._c.errors += n
                    self._c.last_error = f"predict HTTP {r.status_code}: {r.text[:200]}"
        except Exception as exc:  # transport errors: counted, the stream goes on
            with self._lock:
                self._c.errors += n
                self._c.last_error = f"predict: {type(exc).__name__}: {exc}"[:300]
        finally:
            with self._lock:
                self._c.in_flight -= n
                self._done[rows] = True
            if ok:
                for i in rows:
                    if self._label_due[i]:
                        self._ready.append(i)  # its label was waiting for the answer
            sem.release()

    def _route_negatives(self) -> None:
        """In ``mixed`` mode, ready labels of legitimate transactions go to the bulk feed;
        frauds (the chargebacks, one by one) stay for ``/feedback``."""
        keep: deque[int] = deque()
        while self._ready:
            i = self._ready.popleft()
            if self._labels[i]:
                keep.append(i)
            else:
                self._landing.append(self._label_body(i)["label"])
        self._ready = keep

    def _land(self, labels: list[dict[str, Any]]) -> None:
        """Land a batch of labels in the label log (spooled, shipped to Delta)."""
        from driftloop.serving import FeedbackRequest, label_record

        try:
            records = [label_record(FeedbackRequest.model_validate(b)) for b in labels]
            self.label_log.append(records)
            with self._lock:
                self._c.labels_landed += len(records)
        except Exception as exc:
            with self._lock:
                self._c.labels_failed += len(labels)
                self._c.last_error = f"label landing: {type(exc).__name__}: {exc}"[:300]

    def _label_body(self, i: int) -> dict[str, Any]:
        return {
            "label": {
                "request_id": self._bodies[i]["transaction"]["request_id"],
                "transaction_id": self._bodies[i]["transaction"]["transaction_id"],
                "label": int(self._labels[i]),
                "observed_at": self._observed[i],
            }
        }

    async def _feedback(
        self, client: Any, base: str, headers: dict[str, str], i: int, sem: asyncio.Semaphore
    ) -> None:
        body = self._label_body(i)
        try:
            r = await client.post(f"{base.rstrip('/')}/feedback", json=body, headers=headers)
            with self._lock:
                if r.status_code == 200:
                    self._c.labels_sent += 1
                else:
                    self._c.labels_failed += 1
                    self._c.last_error = f"feedback HTTP {r.status_code}: {r.text[:200]}"
        except Exception as exc:
            with self._lock:
                self._c.labels_failed += 1
                self._c.last_error = f"feedback: {type(exc).__name__}: {exc}"[:300]
        finally:
            sem.release()

    # -- the feature source ------------------------------------------------------------------
    def _feature_source(self) -> None:
        from driftloop import features

        settings = self.settings
        try:
            store = features.get_store(settings)
            card = card_states(self.plan)
            merchant = features.compute_merchant_features(self.plan.world).filter(
                pl.col("event_timestamp") > self.plan.live_start
            )
        except Exception as exc:
            log.exception("feature source could not start")
            with self._lock:
                self._c.push_errors += 1
                self._c.last_error = f"features: {exc}"[:300]
            self._pushed[:] = True  # never hold transactions for a source that is not there
            return
        card_tx = card["tx_index"].to_numpy()
        card = card.drop("tx_index")
        row_pushed = np.zeros(card.height, dtype=bool)
        frontier = 0  # card rows [0, frontier) are all online
        unwritten: list[int] = []  # card rows online, not yet in the offline source
        last_offline = time.monotonic()
        day = _day_start(self.plan.live_start)
        while True:
            stopping = self._stop.is_set()
            with self._lock:
                done = self._done.copy()
                horizon_tx = self._next
            hi = int(np.searchsorted(card_tx, horizon_tx, side="left"))
            window = np.arange(frontier, hi)
            todo = window[done[card_tx[window]] & ~row_pushed[window]]
            if todo.size:
                rows = card[todo]
                try:
                    features.push_card_features(store, rows)
                    row_pushed[todo] = True
                    with self._lock:
                        self._pushed[card_tx[todo]] = True
                        self._c.pushes += 1
                        self._c.pushed_rows += int(todo.size)
                    unwritten.extend(todo.tolist())
                except Exception as exc:  # skipped: a lost state must not hold its card
                    row_pushed[todo] = True
                    with self._lock:
                        self._pushed[card_tx[todo]] = True
                        self._c.push_errors += 1
                        self._c.last_error = f"push: {exc}"[:300]
            while frontier < hi and row_pushed[frontier]:
                frontier += 1
            if unwritten and (stopping or time.monotonic() - last_offline >= self.offline_seconds):
                try:
                    features.write_offline(settings, card[sorted(unwritten)], None, mode="append")
                    unwritten = []
                    with self._lock:
                        self._c.offline_parts += 1
                except Exception as exc:
                    with self._lock:
                        self._c.push_errors += 1
                        self._c.last_error = f"offline append: {exc}"[:300]
                last_offline = time.monotonic()
            sim_now = self.plan.sim_time(self.elapsed())
            if sim_now >= day + timedelta(days=1):
                try:
                    day = _day_start(sim_now)
                    rows = merchant.filter(pl.col("event_timestamp") == day)
                    if rows.height:
                        store.write_to_online_store(features.MERCHANT_VIEW, rows.to_pandas())
                    with self._lock:
                        self._c.merchant_days += 1
                except Exception as exc:
                    with self._lock:
                        self._c.push_errors += 1
                        self._c.last_error = f"merchant rows: {exc}"[:300]
            if stopping:
                return
            self._stop.wait(self.push_seconds)


def previous_of_card(live: pl.DataFrame) -> np.ndarray:
    """For each transaction (in plan order), the position of its card's last transaction
    at an earlier simulated time (-1 for none): the state it must be scored with."""
    frame = live.select("card_id", "event_timestamp").with_row_index("i")
    groups = (
        frame.group_by("card_id", "event_timestamp")
        .agg(pl.col("i").max().alias("last"))
        .sort("card_id", "event_timestamp")
        .with_columns(prev=pl.col("last").shift(1).over("card_id"))
    )
    joined = frame.join(
        groups.select("card_id", "event_timestamp", "prev"),
        on=["card_id", "event_timestamp"],
        how="left",
    ).sort("i")
    return joined["prev"].fill_null(-1).cast(pl.Int64).to_numpy()


def _day_start(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def card_states(plan: StreamPlan) -> pl.DataFrame:
    """The card state after each live transaction (CARD_FEATURE_SCHEMA + ``tx_index``, the
    position in the send plan of the transaction it follows), computed with a day of
    history as lead-in and ordered by ``tx_index``: the row may be pushed once that
    transaction has been answered (so a transaction is never scored with its own state)."""
    from driftloop import features

    lead_in = plan.history.filter(pl.col("event_timestamp") >= plan.live_start - timedelta(days=1))
    live: pl.DataFrame = plan.live
    states = features.compute_card_features(pl.concat([lead_in, live.drop("send_at", "label_at")]))
    index = (
        live.select("card_id", "event_timestamp")
        .with_row_index("tx_index")
        .group_by("card_id", "event_timestamp")
        .agg(pl.col("tx_index").max().cast(pl.Int64))
    )
    return states.join(index, on=["card_id", "event_timestamp"], how="inner").sort(
        "tx_index", maintain_order=True
    )
