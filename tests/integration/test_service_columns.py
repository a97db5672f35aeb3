"""The columnar batch endpoints (/predict_columns, /predict_arrow) against a real `bentoml
serve`, Feast SQLite store and Delta prediction log; plus the batch Feast read under them."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import numpy as np
import polars as pl
import pytest

from tests.fixtures.world import Server, World

pytestmark = pytest.mark.integration

MAX_ROWS = 2_000
FIELDS = (
    "transaction_id",
    "card_id",
    "merchant_id",
    "amount",
    "category",
    "channel",
    "country",
    "timestamp",
    "request_id",
)


@pytest.fixture(scope="module")
def server(world: World, tmp_path_factory: pytest.TempPathFactory):
    from tests.fixtures.world import start_bentoml

    env = {
        **world.env,
        "DRIFTLOOP_MODEL_TAG": world.model_tag,
        "DRIFTLOOP_SHIPPER_INTERVAL_SECONDS": "0.5",
        "DRIFTLOOP_SPOOL_SEGMENT_SECONDS": "0.5",
        "DRIFTLOOP_MAX_BATCH_ROWS": str(MAX_ROWS),
    }
    s = start_bentoml(
        "bentos.service:FraudModel", env, tmp_path_factory.mktemp("svc-cols") / "bentoml.log"
    )
    yield s
    s.stop()


def rows(world: World, n: int, tag: str, *, edge_cases: bool = True) -> list[dict[str, Any]]:
    """``n`` transactions of the history as request objects, with every kind of edge case:
    unknown entities, unseen and missing categories, integer amounts, a non-UTC offset."""
    out = []
    stamp = time.monotonic_ns()
    for i in range(n):
        body = world.request(i, f"{tag}-{i}-{stamp}", f"{tag}-r{i}-{stamp}")
        if edge_cases:
            if i % 7 == 1:
                body["card_id"] = 10**12 + i  # unknown card
            if i % 11 == 2:
                body["merchant_id"] = 10**12 + i  # unknown merchant
            if i % 5 == 3:
                body["category"] = "electronics"  # unseen
            if i % 6 == 4:
                body["channel"] = None
            if i % 9 == 5:
                body["amount"] = 250  # an integer amount
            if i % 13 == 6:
                ist = timezone(timedelta(hours=5, minutes=30))  # not UTC
                stamp_at = datetime.fromisoformat(body["timestamp"])
                body["timestamp"] = stamp_at.astimezone(ist).isoformat()
        out.append(body)
    return out


def as_columns(bodies: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {f: [b.get(f) for b in bodies] for f in FIELDS}


def post(server: Server, path: str, body: object, **kw: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


def logged(world: World, request_ids: set[str], timeout: float = 45.0) -> pl.DataFrame:
    """The rows of ``request_ids`` in the Delta prediction log, read with driftloop.predlog."""
    from driftloop import predlog

    settings = world.settings()
    start = datetime.now(UTC) - timedelta(hours=1)
    deadline = time.monotonic() + timeout
    found = pl.DataFrame()
    while time.monotonic() < deadline:
        frame = predlog.read_predictions(settings, start, datetime.now(UTC) + timedelta(hours=1))
        found = frame.filter(pl.col("request_id").is_in(list(request_ids)))
        if found.height >= len(request_ids):
            return found
        time.sleep(0.5)
    raise AssertionError(f"{len(request_ids) - found.height} of {len(request_ids)} rows not logged")


# -- same answers as the row path -------------------------------------------------------
def test_columns_answer_as_predict_batch_does(server: Server, world: World) -> None:
    bodies = rows(world, 300, "same")
    listed = post(server, "/predict_batch", {"transactions": bodies})
    assert listed.status_code == 200, listed.text
    by_row = listed.json()
    r = post(server, "/predict_columns", {"columns": as_columns(bodies)})
    assert r.status_code == 200, r.text
    cols = r.json()
    assert cols["rows"] == len(bodies)
    assert cols["transaction_id"] == [b["transaction_id"] for b in bodies]
    assert cols["request_id"] == [b["request_id"] for b in bodies]
    assert cols["score"] == [o["score"] for o in by_row]
    assert cols["decision"] == [o["decision"] for o in by_row]
    assert cols["feature_age_seconds"] == [o["feature_age_seconds"] for o in by_row]
    for o in by_row:
        assert (o["threshold"], o["model"], o["model_version"], o["arm"]) == (
            cols["threshold"],
            cols["model"],
            cols["model_version"],
            cols["arm"],
        )
    for entity, flags in cols["unknown_entities"].items():
        assert flags == [entity in o["unknown_entities"] for o in by_row]
    for column, flags in cols["unseen_categories"].items():
        assert flags == [column in o["unseen_categories"] for o in by_row]
    # the batch did exercise the edge cases
    assert any(cols["unknown_entities"]["card"]) and any(cols["unknown_entities"]["merchant"])
    assert any(cols["unseen_categories"]["category"])
    assert not all(cols["unknown_entities"]["card"])


def test_arrow_and_parquet_bodies_answer_as_json_columns(server: Server, world: World) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    bodies = rows(world, 120, "arrow")
    expected = post(server, "/predict_columns", {"columns": as_columns(bodies)}).json()
    columns = as_columns(bodies)
    columns["timestamp"] = [datetime.fromisoformat(t) for t in columns["timestamp"]]
    columns["amount"] = [float(a) for a in columns["amount"]]
    table = pa.table(columns)
    stream = pa.BufferOutputStream()
    with pa.ipc.new_stream(stream, table.schema) as writer:
        writer.write_table(table)
    parquet = io.BytesIO()
    pq.write_table(table, parquet)
    for body in (stream.getvalue().to_pybytes(), parquet.getvalue()):
        r = httpx.post(
            f"{server.url}/predict_arrow",
            content=body,
            headers={"content-type": "application/vnd.apache.arrow.stream"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/vnd.apache.arrow.stream")
        got = pa.ipc.open_stream(r.content).read_all().to_pydict()
        assert got["request_id"] == expected["request_id"]
        assert got["score"] == expected["score"]
        assert got["decision"] == expected["decision"]
        assert got["unknown_card"] == expected["unknown_entities"]["card"]
        assert got["unseen_category"] == expected["unseen_categories"]["category"]
        assert set(got["model_version"]) == {expected["model_version"]}
    r = httpx.post(
        f"{server.url}/predict_arrow",
        content=b"not arrow",
        headers={"content-type": "application/vnd.apache.arrow.stream"},
        timeout=30,
    )
    assert r.status_code == 400 and "Arrow" in r.text, r.text
    bad = pa.table({**columns, "card_id": [float(c) for c in columns["card_id"]]})
    out = io.BytesIO()
    pq.write_table(bad, out)
    r = httpx.post(f"{server.url}/predict_arrow", content=out.getvalue(), timeout=30)
    assert r.status_code == 400 and "card_id" in r.text, r.text


# -- every row is logged durably ---------------------------------------------------------
def test_every_row_lands_in_the_delta_prediction_log(server: Server, world: World) -> None:
    from driftloop.schema import PREDICTION_SCHEMA

    large = rows(world, 1_500, "log-large")  # encoded as one frame
    small = rows(world, 5, "log-small")  # encoded record by record
    anonymous = as_columns(rows(world, 80, "log-anon"))
    del anonymous["request_id"]  # ids are made by the service
    answers = []
    for columns in (as_columns(large), as_columns(small), anonymous):
        r = post(server, "/predict_columns", {"columns": columns})
        assert r.status_code == 200, r.text
        answers.append(r.json())
    made = answers[2]["request_id"]
    assert len(set(made)) == len(made) and all(len(x) == 32 for x in made)
    scores = {
        rid: score for a in answers for rid, score in zip(a["request_id"], a["score"], strict=True)
    }
    log = logged(world, set(scores))
    assert log.height == len(scores)  # each row exactly once
    assert dict(log.schema) == PREDICTION_SCHEMA
    assert dict(zip(log["request_id"], log["score"], strict=True)) == pytest.approx(scores)
    by_id = {r["request_id"]: r for r in log.iter_rows(named=True)}
    first = by_id[large[0]["request_id"]]
    assert first["transaction_id"] == large[0]["transaction_id"]
    assert first["event_timestamp"] == datetime.fromisoformat(large[0]["timestamp"])
    assert first["card_txn_count_24h"] is not None
    assert first["model_version"] == answers[0]["model_version"]
    assert first["decision"] == int(answers[0]["decision"][0])
    unknown = by_id[large[1]["request_id"]]  # an unknown card: features missing, not NaN
    assert unknown["card_txn_count_24h"] is None and unknown["feature_age_seconds"] is None
    assert by_id[large[4]["request_id"]]["channel"] is None
    offset = large[6]  # sent with a +05:30 offset: the hour feature is the UTC hour, as trained
    utc_hour = datetime.fromisoformat(offset["timestamp"]).astimezone(UTC).hour
    assert by_id[offset["request_id"]]["hour_of_day"] == utc_hour


def test_a_batch_in_one_non_utc_offset_is_timed_in_utc(server: Server, world: World) -> None:
    # every timestamp with the same +05:30 offset: the fast path of the event-time
    # conversion (one zone for the whole column); logged through the Arrow spool
    ist = timezone(timedelta(hours=5, minutes=30))
    bodies = rows(world, 100, "ist", edge_cases=False)
    for b in bodies:
        b["timestamp"] = datetime.fromisoformat(b["timestamp"]).astimezone(ist).isoformat()
    r = post(server, "/predict_columns", {"columns": as_columns(bodies)})
    assert r.status_code == 200, r.text
    log = logged(world, {b["request_id"] for b in bodies})
    by_id = {row["request_id"]: row for row in log.iter_rows(named=True)}
    assert log.height == len(bodies)
    for b in bodies:
        sent = datetime.fromisoformat(b["timestamp"])
        row = by_id[b["request_id"]]
        assert row["event_timestamp"] == sent
        assert row["hour_of_day"] == sent.astimezone(UTC).hour


def test_metrics_count_columnar_rows(server: Server, world: World) -> None:
    r = post(server, "/predict_columns", {"columns": as_columns(rows(world, 40, "metrics"))})
    assert r.status_code == 200, r.text
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    version = r.json()["model_version"]
    assert (
        f'driftloop_predict_latency_seconds_count{{endpoint="predict_columns",model="fraud",'
        f'version="{version}"}}' in text
    )
    assert (
        f'driftloop_unseen_category_total{{field="category",model="fraud",version="{version}"}}'
        in text
    )


# -- strict validation --------------------------------------------------------------------
DROP = object()  # leave the column out


def cols(**change: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "transaction_id": ["a", "b"],
        "card_id": [1, 2],
        "merchant_id": [3, 4],
        "amount": [10.0, 20.5],
        "category": ["retail", None],
    }
    base.update(change)
    return {k: v for k, v in base.items() if v is not DROP}


BAD = [
    pytest.param(cols(card_id=[1]), "card_id has 1", id="unequal lengths"),
    pytest.param(cols(merchant_id=DROP), "merchant_id", id="missing column"),
    pytest.param(cols(card_id=["x", "y"]), "card_id", id="wrong type"),
    pytest.param(cols(card_id=[1.5, 2]), "card_id", id="float id"),
    pytest.param(cols(amount=["10", 2]), "amount", id="string amount"),
    pytest.param(cols(amount=[True, 2]), "amount", id="boolean amount"),
    pytest.param(cols(amount=[10.0, -1]), "amount", id="amount out of range"),
    pytest.param(cols(merchant_id=[3, None]), "merchant_id", id="null where not allowed"),
    pytest.param(cols(transaction_id=["a", None]), "transaction_id", id="null transaction id"),
    pytest.param(cols(transaction_id=["a", "b c"]), "transaction_id", id="bad id"),
    pytest.param(cols(amount=10.0), "amount", id="column not a list"),
    pytest.param(cols(surprise=[1, 2]), "surprise", id="unknown column"),
    pytest.param(cols(timestamp=["yesterday", None]), "timestamp", id="bad timestamp"),
    pytest.param(
        cols(timestamp=["1999-01-01T00:00:00Z", None]), "timestamp", id="timestamp out of range"
    ),
    pytest.param(
        cols(transaction_id=[], card_id=[], merchant_id=[], amount=[]),
        "transaction_id",
        id="empty batch",
    ),
]


@pytest.mark.parametrize(("columns", "named"), BAD)
def test_bad_columns_are_a_4xx_naming_the_field(
    server: Server, columns: dict[str, Any], named: str
) -> None:
    r = post(server, "/predict_columns", {"columns": columns})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert named in r.text, r.text


def test_oversized_batch_and_non_object_body_are_rejected(server: Server, world: World) -> None:
    big = as_columns(rows(world, MAX_ROWS + 1, "big", edge_cases=False))
    r = post(server, "/predict_columns", {"columns": big})
    assert r.status_code == 400 and "columns" in r.text and str(MAX_ROWS) in r.text, r.text
    r = post(server, "/predict_columns", {"columns": [1, 2, 3]})
    assert 400 <= r.status_code < 500 and "columns" in r.text, r.text


def test_openapi_lists_the_columnar_endpoints(server: Server) -> None:
    paths = httpx.get(f"{server.url}/docs.json", timeout=10).json()["paths"]
    assert {"/predict_columns", "/predict_arrow"} <= set(paths)


# -- the batch Feast read (in process, the world's SQLite store) ---------------------------
def test_batch_online_read_equals_the_per_row_read(world: World) -> None:
    from driftloop import features
    from driftloop.online_fast import FastOnlineReader
    from driftloop.serving import OnlineColumns

    reader = FastOnlineReader(features.get_store(world.settings()))
    tx = world.transactions.tail(3_000)
    cards = [*tx["card_id"].to_list(), 10**12, 0]
    merchants = [*tx["merchant_id"].to_list(), 7, 10**13]
    got = reader.columns(cards, merchants)
    want = OnlineColumns.from_entities(*reader.read(cards, merchants))
    assert reader._sqlite is not None  # the batch path of the embedded store was used
    for name, values in want.values.items():
        np.testing.assert_array_equal(got.values[name], values, err_msg=name)
    np.testing.assert_array_equal(got.card_ts, want.card_ts)
    np.testing.assert_array_equal(got.merchant_ts, want.merchant_ts)
    assert np.isnan(got.card_ts[-2]) and np.isnan(got.merchant_ts[-1])
    assert not np.isnan(got.card_ts[:-2]).all()


def test_feast_values_decode_in_bulk_as_protobuf_does() -> None:
    import math

    from feast.protos.feast.types.Value_pb2 import Null, Value

    from driftloop.errors import FeatureStoreError
    from driftloop.online_fast import decode_values

    values = [Value(double_val=x) for x in (0.0, -0.0, 1.5, -2.25e300, math.inf, 5e-324)]
    values += [Value(float_val=x) for x in (0.0, 3.25, -1e30)]
    values += [Value(int64_val=x) for x in (0, 1, 127, 128, 300, -1, -(2**63), 2**63 - 1)]
    values += [Value(int32_val=x) for x in (0, 5, -5, 2**31 - 1, -(2**31))]
    values += [Value(bool_val=True), Value(bool_val=False), Value(unix_timestamp_val=1767822486)]
    values += [Value(null_val=Null.NULL), Value()]
    expected = [
        math.nan if (kind := v.WhichOneof("val")) in (None, "null_val") else float(getattr(v, kind))
        for v in values
    ]
    got = decode_values([v.SerializeToString() for v in values])
    np.testing.assert_array_equal(got, np.array(expected))
    with pytest.raises(FeatureStoreError):
        decode_values([Value(string_val="x").SerializeToString()])
