"""The model service against a real `bentoml serve`, Feast SQLite store and Delta tables."""

from __future__ import annotations

import time
from datetime import datetime

import httpx
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.world import FEEDBACK_TOKEN, Server, World

pytestmark = pytest.mark.integration


def tx(world: World, i: int = 0, **overrides: object) -> dict:
    """The ``i``-th newest transaction of the history as a ``/predict`` body, with a fresh
    transaction id and ``overrides`` applied."""
    return world.request(i, f"it-{i}-{time.monotonic_ns()}") | overrides


@pytest.fixture(scope="module")
def server(world: World, tmp_path_factory: pytest.TempPathFactory):
    from tests.fixtures.world import start_bentoml

    env = {
        **world.env,
        "DRIFTLOOP_MODEL_TAG": world.model_tag,
        "DRIFTLOOP_FEEDBACK_TOKEN": FEEDBACK_TOKEN,
        "DRIFTLOOP_SHIPPER_INTERVAL_SECONDS": "0.5",
        "DRIFTLOOP_SPOOL_SEGMENT_SECONDS": "0.5",
        "DRIFTLOOP_MAX_BATCH_ROWS": "500",
    }
    s = start_bentoml(
        "bentos.service:FraudModel", env, tmp_path_factory.mktemp("svc") / "bentoml.log"
    )
    yield s
    s.stop()


def post(server: Server, path: str, body: object, **kw: object) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30, **kw)


def wait_rows(
    world: World, table: str, column: str, values: set[str], timeout: float = 30.0
) -> pl.DataFrame:
    location = world.settings().table(table)
    deadline = time.monotonic() + timeout
    found = pl.DataFrame()
    while time.monotonic() < deadline:
        try:
            found = pl.read_delta(location).filter(pl.col(column).is_in(list(values)))
            if set(found[column].to_list()) >= values:
                return found
        except Exception:  # table not created yet
            pass
        time.sleep(0.5)
    raise AssertionError(
        f"{len(values) - found.height} of {len(values)} rows never reached {table}"
    )


def test_predict_round_trip_and_logged_to_delta(server: Server, world: World) -> None:
    body = tx(world)
    r = post(server, "/predict", {"transaction": body})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["transaction_id"] == body["transaction_id"]
    assert 0.0 <= out["score"] <= 1.0
    assert out["decision"] == (out["score"] >= out["threshold"])
    assert f"{out['model']}:{out['model_version']}" == world.model_tag
    assert out["arm"] == "champion"
    assert out["feature_age_seconds"] is not None and out["feature_age_seconds"] >= 0
    logged = wait_rows(world, "predictions", "request_id", {out["request_id"]})
    row = logged.row(0, named=True)
    assert row["score"] == pytest.approx(out["score"])
    assert row["card_txn_count_24h"] is not None
    assert row["model_version"] == out["model_version"]


def test_predict_batch(server: Server, world: World) -> None:
    bodies = [tx(world, i) for i in range(200)]
    r = post(server, "/predict_batch", {"transactions": bodies})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o["transaction_id"] for o in out] == [b["transaction_id"] for b in bodies]
    wait_rows(world, "predictions", "request_id", {o["request_id"] for o in out})


def test_features_come_from_feast(server: Server, world: World) -> None:
    """Pushing a new card aggregate online changes the score of the same request."""
    from driftloop import features

    body = tx(world, 3, amount=900.0, category="jewelry", channel="online", country="NG")
    before = post(server, "/predict", {"transaction": body}).json()
    now = datetime.fromisoformat(body["timestamp"])
    pushed = pl.DataFrame(
        {
            "card_id": [body["card_id"]],
            "event_timestamp": [now],
            "card_txn_count_1h": [40],
            "card_txn_count_24h": [60],
            "card_amount_mean_1h": [5.0],
            "card_amount_mean_24h": [5.0],
            "card_last_txn_ts": [now.timestamp() - 2.0],
        },
        schema=features.CARD_FEATURE_SCHEMA,
    )
    features.push_card_features(features.get_store(world.settings()), pushed)
    after = post(server, "/predict", {"transaction": {**body, "transaction_id": "it-after"}}).json()
    assert after["score"] != pytest.approx(before["score"], abs=1e-6)
    assert after["feature_age_seconds"] == pytest.approx(0.0, abs=1.0)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"amount": -5}, "amount"),
        ({"amount": 1e12}, "amount"),
        ({"amount": "12.5"}, "amount"),
        ({"card_id": "abc"}, "card_id"),
        ({"merchant_id": None}, "merchant_id"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"surprise": 1}, "surprise"),
        ({"transaction_id": ""}, "transaction_id"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(
    server: Server, world: World, change: dict, field: str
) -> None:
    r = post(server, "/predict", {"transaction": tx(world) | change})
    assert 400 <= r.status_code < 500, r.text
    assert field in r.text


def test_missing_required_field_and_oversized_batch(server: Server, world: World) -> None:
    body = tx(world)
    del body["merchant_id"]
    r = post(server, "/predict", {"transaction": body})
    assert 400 <= r.status_code < 500 and "merchant_id" in r.text
    r = post(server, "/predict_batch", {"transactions": [tx(world, i) for i in range(501)]})
    assert r.status_code == 400 and "transactions" in r.text and "500" in r.text


def test_unseen_category_unknown_entity_and_missing_values_are_scored(
    server: Server, world: World
) -> None:
    body = tx(
        world,
        card_id=10**12,
        merchant_id=10**12,
        category="electronics",
        country=None,
        channel=None,
    )
    r = post(server, "/predict", {"transaction": body})
    assert r.status_code == 200, r.text
    out = r.json()
    assert sorted(out["unknown_entities"]) == ["card", "merchant"]
    assert out["unseen_categories"] == ["category"]
    assert out["feature_age_seconds"] is None
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    version = out["model_version"]
    assert (
        f'driftloop_unseen_category_total{{field="category",model="fraud",version="{version}"}}'
        in metrics
    )
    assert (
        f'driftloop_unknown_entity_total{{entity="card",model="fraud",version="{version}"}}'
        in metrics
    )
    assert (
        f'driftloop_predictions_total{{decision="legit",model="fraud",version="{version}"}}'
        in metrics
    )
    assert "driftloop_predict_latency_seconds_bucket" in metrics
    assert "driftloop_predlog_backlog_records" in metrics


def test_feedback_requires_the_token_and_is_stored(server: Server, world: World) -> None:
    body = {"transaction_id": "fb-1", "label": 1}
    assert post(server, "/feedback", {"label": body}).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert post(server, "/feedback", {"label": body}, headers=bad).status_code == 401
    good = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
    r = post(server, "/feedback", {"label": {"transaction_id": "fb-1", "label": 2}}, headers=good)
    assert r.status_code == 400 and "label" in r.text
    r = post(server, "/feedback", {"label": body}, headers=good)
    assert r.status_code == 200, r.text
    label_id = r.json()["label_id"]
    stored = wait_rows(world, "labels", "label_id", {label_id})
    assert stored.row(0, named=True)["transaction_id"] == "fb-1"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=8,
)
fields = st.sampled_from(
    [
        "transaction_id",
        "card_id",
        "merchant_id",
        "amount",
        "category",
        "channel",
        "country",
        "timestamp",
        "request_id",
        "x",
    ]
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(changes=st.dictionaries(fields, json_values, max_size=4), drop=st.sets(fields, max_size=2))
def test_no_input_makes_the_service_fail_with_5xx(
    server: Server, world: World, changes: dict, drop: set
) -> None:
    body = tx(world) | changes
    for f in drop:
        body.pop(f, None)
    r = post(server, "/predict", {"transaction": body})
    assert r.status_code < 500, r.text


def test_openapi_and_health_endpoints(server: Server) -> None:
    spec = httpx.get(f"{server.url}/docs.json", timeout=10)
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    assert {"/predict", "/predict_batch", "/feedback"} <= set(paths)
    assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/", timeout=10).status_code == 200
