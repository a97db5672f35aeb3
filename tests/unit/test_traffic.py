"""The demo's stream plan: sends and labels on the wall clock, the scenario switch,
the card states the feature source pushes (pure parts of driftloop.traffic)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from driftloop.schema import TRANSACTION_SCHEMA
from driftloop.traffic import (
    StreamSpec,
    card_states,
    due_until,
    plan_stream,
    previous_of_card,
    request_id_for,
    sim_time_at,
    wall_offsets,
)

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SMALL = StreamSpec(
    rate=20.0, speed=3600.0, history_days=1.0, live_seconds=60.0, inject_after_seconds=20.0
)


@pytest.fixture(scope="module")
def plan():  # a small world: 1 day of history, one minute of stream
    return plan_stream(SMALL, START)


# -- wall_offsets ---------------------------------------------------------------------


def test_clock_pace_divides_simulated_time_by_speed() -> None:
    ev = np.array([100.0, 160.0, 400.0])
    lb = np.array([700.0, 160.0, 1000.0])
    sends, labels = wall_offsets(ev, lb, start=100.0, speed=60.0, pace="clock")
    assert sends.tolist() == [0.0, 1.0, 5.0]
    assert labels.tolist() == [10.0, 1.0, 15.0]


def test_steady_pace_sends_at_a_constant_rate() -> None:
    ev = np.array([0.0, 1.0, 50.0, 51.0])  # bunched in simulated time
    sends, _ = wall_offsets(ev, ev, start=0.0, speed=1.0, pace="steady", rate=4.0)
    assert np.allclose(np.diff(sends), 0.25)
    assert sends[0] == pytest.approx(0.125)


def test_steady_labels_follow_the_send_plan_and_never_precede_their_send() -> None:
    ev = np.array([0.0, 10.0, 20.0, 30.0])
    lb = np.array([10.0, 15.0, 20.0, 40.0])  # at a send, between sends, equal, beyond the end
    sends, labels = wall_offsets(ev, lb, start=0.0, speed=5.0, pace="steady", rate=1.0)
    assert sends.tolist() == [0.5, 1.5, 2.5, 3.5]
    assert labels[0] == pytest.approx(1.5)  # the wall time the plan reaches t=10
    assert labels[1] == pytest.approx(2.0)  # halfway between the sends of t=10 and t=20
    assert labels[2] == pytest.approx(2.5)  # a label due at its own event time: at its send
    assert labels[3] == pytest.approx(3.5 + 10.0 / 5.0)  # beyond the last event: at speed
    assert np.all(labels >= sends)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pace": "steady"}, "rate"),
        ({"pace": "sometimes", "rate": 1.0}, "pace"),
        ({"pace": "clock", "speed": 0.0}, "speed"),
    ],
)
def test_wall_offsets_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"start": 0.0, "speed": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        wall_offsets(np.array([0.0, 1.0]), np.array([1.0, 2.0]), **args)


def test_wall_offsets_needs_sorted_events() -> None:
    with pytest.raises(ValueError, match="sorted"):
        wall_offsets(np.array([2.0, 1.0]), np.array([3.0, 3.0]), start=0, speed=1, rate=1)


def test_due_until() -> None:
    offsets = np.array([0.5, 1.0, 1.0, 2.0])
    assert due_until(offsets, 0, 0.1) == 0
    assert due_until(offsets, 0, 1.0) == 3  # both sends at 1.0 are due
    assert due_until(offsets, 3, 1.0) == 3  # never moves backwards
    assert due_until(offsets, 0, 9.0) == 4


def test_each_transaction_waits_for_its_cards_previous_one() -> None:
    t = [START + timedelta(minutes=m) for m in (0, 1, 2, 2, 3, 4)]
    live = pl.DataFrame(
        {"card_id": [1, 2, 1, 1, 2, 1], "event_timestamp": t},
        schema={"card_id": pl.Int64, "event_timestamp": pl.Datetime("us", "UTC")},
    )
    # two transactions of card 1 at the same instant both wait for the one before them;
    # the next one waits for the later of the two (their shared state)
    assert previous_of_card(live).tolist() == [-1, -1, 0, 0, 1, 3]


def test_sim_time_interpolates_the_send_plan() -> None:
    sends = np.array([1.0, 2.0])
    ts = np.array([START.timestamp() + 100, START.timestamp() + 300])
    assert sim_time_at(sends, ts, 0.5, START, 10.0) == START + timedelta(seconds=5)
    assert sim_time_at(sends, ts, 1.5, START, 10.0) == START + timedelta(seconds=200)
    assert sim_time_at(sends, ts, 3.0, START, 10.0) == START + timedelta(seconds=310)


def test_request_ids_satisfy_the_serving_contract() -> None:
    assert re.fullmatch(r"^[A-Za-z0-9_.:@/-]+$", request_id_for("tx-7-123"))


# -- plan_stream -----------------------------------------------------------------------


def test_the_plan_splits_history_and_stream_at_the_live_start(plan) -> None:
    assert plan.live_start == START
    assert plan.history["event_timestamp"].max() < START
    assert plan.live["event_timestamp"].min() >= START
    assert plan.history.schema == pl.Schema(TRANSACTION_SCHEMA)
    # the stream's density matches the history's: rate / speed per simulated second
    assert plan.history.height == pytest.approx(SMALL.history_events, rel=0.1)
    assert plan.live.height == pytest.approx(SMALL.live_events, rel=0.1)
    assert plan.world.height == plan.history.height + plan.live.height


def test_sends_are_steady_and_labels_come_after_their_transaction(plan) -> None:
    sends = plan.live["send_at"].to_numpy()
    assert np.all(np.diff(sends) > 0)
    assert np.allclose(np.diff(sends), 1.0 / SMALL.rate)
    assert np.all(plan.live["label_at"].to_numpy() >= sends)
    # the transactions go out in simulated-time order
    assert plan.live["event_timestamp"].is_sorted()


def test_the_scenario_starts_at_the_injection(plan) -> None:
    drift_at = START + timedelta(seconds=SMALL.inject_after_seconds * SMALL.speed)
    assert plan.drift_at == drift_at
    live = plan.live.with_row_index("i")
    before = live.filter(pl.col("event_timestamp") < drift_at)
    after = live.filter(pl.col("event_timestamp") >= drift_at)
    assert before["transaction_id"].str.starts_with("tx-").all()  # the stable world
    assert after["transaction_id"].str.starts_with("dx-").all()  # the scenario's world
    assert plan.inject_index == after["i"].min()
    assert plan.inject_offset == pytest.approx(float(plan.live["send_at"][plan.inject_index]))
    assert plan.live["transaction_id"].n_unique() == plan.live.height


def test_a_stable_plan_never_switches() -> None:
    spec = SMALL.model_copy(update={"scenario": "stable"})
    p = plan_stream(spec, START)
    assert p.live["transaction_id"].str.starts_with("tx-").all()


def test_the_same_spec_gives_the_same_plan(plan) -> None:
    again = plan_stream(SMALL, START)
    assert again.live.equals(plan.live)
    assert again.history.equals(plan.history)


def test_concept_drift_raises_fraud_after_the_injection(plan) -> None:
    spec = SMALL.model_copy(update={"live_seconds": 240.0, "inject_after_seconds": 60.0})
    p = plan_stream(spec, START)
    rate = p.live.group_by(pl.col("event_timestamp") >= p.drift_at).agg(pl.col("is_fraud").mean())
    by = dict(zip(rate[:, 0].to_list(), rate[:, 1].to_list(), strict=True))
    assert by[True] > by[False]


# -- the feature source's rows -----------------------------------------------------------


def test_card_states_are_released_only_after_their_own_transaction(plan) -> None:
    states = card_states(plan)
    assert states["tx_index"].is_sorted()
    live = plan.live.with_row_index("tx_index").with_columns(pl.col("tx_index").cast(pl.Int64))
    joined = states.join(
        live.select("tx_index", "card_id", "event_timestamp"), on="tx_index", how="left"
    )
    # each state is the card's state after the transaction it is released with
    assert (joined["card_id"] == joined["card_id_right"]).all()
    assert (joined["event_timestamp"] == joined["event_timestamp_right"]).all()
    ts = joined["event_timestamp"].dt.epoch("us").cast(pl.Float64) / 1e6
    assert ((joined["card_last_txn_ts"] - ts).abs() < 1e-3).all()
    # a day of history leads in: a card seen in the history counts it
    first = states.unique("card_id", keep="first")
    assert first["card_txn_count_24h"].max() > 1


# -- the stream against a real HTTP server ------------------------------------------------


class LabelLogStub:
    """Stands in for driftloop.predlog.LabelLog: keeps what is landed."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def append(self, records: list[dict]) -> None:
        self.records.extend(records)


@pytest.fixture
def http_router():
    """A tiny router + model arm on 127.0.0.1 (uvicorn in a thread), recording calls."""
    import socket
    import threading
    import time as _time

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    seen: dict[str, list] = {"predict": [], "batch": [], "feedback": [], "answered": []}

    def answer(tx: dict) -> dict:
        seen["answered"].append(tx["request_id"])
        return {"request_id": tx["request_id"], "arm": "champion", "score": 0.1}

    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        seen["predict"].append(body["transaction"]["request_id"])
        return JSONResponse(answer(body["transaction"]))

    async def predict_batch(request: Request) -> JSONResponse:
        body = await request.json()
        seen["batch"].append(len(body["transactions"]))
        return JSONResponse([answer(t) for t in body["transactions"]])

    async def feedback(request: Request) -> JSONResponse:
        assert request.headers["authorization"] == "Bearer t0k"
        label = (await request.json())["label"]
        seen["feedback"].append((label["request_id"], label["label"]))
        return JSONResponse({"label_id": "x", "accepted": True})

    app = Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/predict_batch", predict_batch, methods=["POST"]),
            Route("/feedback", feedback, methods=["POST"]),
        ]
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = _time.monotonic() + 10
    while not server.started and _time.monotonic() < deadline:
        _time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(10)


@pytest.mark.integration
@pytest.mark.parametrize(("batch", "labels"), [(1, "feedback"), (8, "mixed")])
def test_the_stream_sends_everything_once_and_labels_after_answers(
    http_router, batch: int, labels: str
) -> None:
    import time as _time

    from driftloop.traffic import LiveTraffic

    url, seen = http_router
    spec = StreamSpec(
        rate=100.0,
        speed=3600.0,
        history_days=0.5,
        live_seconds=1.5,
        inject_after_seconds=0.7,
        label_delay_median_hours=0.05,
    )
    plan = plan_stream(spec, START)
    log = LabelLogStub()
    traffic = LiveTraffic(
        plan, url, lambda: url, "t0k", None, batch_size=batch, labels=labels, label_log=log
    )
    traffic.start()
    deadline = _time.monotonic() + 90
    while traffic.running and _time.monotonic() < deadline:
        _time.sleep(0.1)
    traffic.stop()
    stats = traffic.stats()
    n = plan.live.height
    ids = plan.live["transaction_id"].map_elements(request_id_for, return_dtype=pl.String)
    assert sorted(seen["answered"]) == sorted(ids.to_list())  # each one, once
    assert stats.acknowledged == n and stats.errors == 0
    assert sorted(traffic.acknowledged_request_ids()) == sorted(ids.to_list())
    assert traffic.injected_at is not None
    if batch == 1:
        assert len(seen["predict"]) == n and not seen["batch"]
    else:
        assert max(seen["batch"]) <= batch and sum(seen["batch"]) + len(seen["predict"]) == n
    fraud = dict(zip(ids.to_list(), plan.live["is_fraud"].to_list(), strict=True))
    fed = {rid: label for rid, label in seen["feedback"]}
    landed = {r["request_id"]: r["label"] for r in log.records}
    assert len(fed) + len(landed) == n  # every label exactly once, one way or the other
    assert all(fraud[rid] == label for rid, label in {**fed, **landed}.items())
    if labels == "mixed":
        assert set(fed.values()) <= {1} and set(landed.values()) <= {0}
        assert stats.labels_landed == len(landed) and stats.labels_sent == len(fed)
    else:
        assert not landed and stats.labels_sent == n
