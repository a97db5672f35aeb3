"""driftloop.features against a real Feast 0.67 repo: SQLite online store, file offline store.

Every test has its own data root under tmp_path; the definitions are the repo's own
feature_repo/. The first test to touch Feast pays its import (~8 s on two busy cores).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from driftloop import features as F
from driftloop.schema import CARD_FEATURES, MERCHANT_FEATURES, TRANSACTION_SCHEMA
from driftloop.settings import Settings, get_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2] / "feature_repo"
T0 = datetime(2024, 5, 1, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    root = tmp_path / "data"
    monkeypatch.setenv("DRIFTLOOP_DATA_ROOT", str(root))
    return get_settings(data_root=str(root), feast_repo=REPO, state_dir=tmp_path / "state")


@pytest.fixture
def applied(settings: Settings) -> Settings:
    F.apply_repo(settings)
    return settings


def simulated(n: int = 3000, cards: int = 60, merchants: int = 12, days: int = 6) -> pl.DataFrame:
    """A hand-rolled stand-in for driftloop.simulate: n transactions over `days` days."""
    rng = np.random.default_rng(7)
    micros = np.sort(rng.integers(0, days * 86_400_000_000, n))
    t0 = int(T0.timestamp()) * 1_000_000
    ts = pl.Series(micros + t0, dtype=pl.Int64).cast(pl.Datetime("us", "UTC"))
    delay = pl.Series(rng.integers(3_600, 5 * 86_400, n)).cast(pl.Int64) * 1_000_000
    frame = pl.DataFrame(
        {
            "transaction_id": [f"t{i}" for i in range(n)],
            "card_id": rng.integers(0, cards, n),
            "merchant_id": rng.integers(0, merchants, n),
            "amount": rng.lognormal(3.0, 1.0, n),
            "category": rng.choice(["grocery", "travel"], n),
            "channel": rng.choice(["pos", "online"], n),
            "country": rng.choice(["US", "GB"], n),
            "event_timestamp": ts,
            "is_fraud": (rng.random(n) < 0.05).astype(np.int8),
        }
    )
    frame = frame.with_columns(
        label_available_at=pl.col("event_timestamp") + delay.cast(pl.Duration("us"))
    )
    return frame.select(list(TRANSACTION_SCHEMA)).cast(TRANSACTION_SCHEMA)  # type: ignore[arg-type]


def latest(frame: pl.DataFrame, key: str, end: datetime) -> pl.DataFrame:
    """The last row per entity strictly before `end` and within the 2-day ttl."""
    window = pl.col("event_timestamp").is_between(end - F.VIEW_TTL, end, closed="left")
    return frame.filter(window).sort("event_timestamp").group_by(key).last().sort(key)


# -- the repo applies -----------------------------------------------------------------------


@pytest.mark.slow  # a second Python importing Feast: 15 s idle, 35-50 s on shared cores
def test_feast_apply_cli_from_the_repo(settings: Settings) -> None:
    """`feast apply` exactly as a Feast user runs it, then the registry holds the repo."""
    env = {**os.environ, "DRIFTLOOP_DATA_ROOT": settings.data_root, "PYTHONDONTWRITEBYTECODE": "1"}
    feast = Path(sys.executable).with_name("feast")
    done = subprocess.run(
        [str(feast), "apply"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Created feature view card_velocity" in done.stdout
    store = F.get_store(settings)
    assert {v.name for v in store.list_feature_views()} == {F.CARD_VIEW, F.MERCHANT_VIEW}
    assert {e.name for e in store.list_entities()} == {"card", "merchant"}
    service = store.get_feature_service(F.FEATURE_SERVICE)
    names = [f.name for p in service.feature_view_projections for f in p.features]
    assert sorted(names) == sorted(CARD_FEATURES + MERCHANT_FEATURES)
    push = store.get_data_source(F.CARD_PUSH_SOURCE)
    assert push.batch_source.path == str(F.offline_path(settings, F.CARD_VIEW))


def test_repo_refuses_to_load_without_data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRIFTLOOP_DATA_ROOT", raising=False)
    with pytest.raises(RuntimeError, match="DRIFTLOOP_DATA_ROOT is not set"):
        runpy.run_path(str(REPO / "data_sources.py"))


def test_apply_in_process_follows_each_data_root(tmp_path: Path) -> None:
    """Two applies in one process, two data roots: each registry points at its own files."""
    stores = []
    for name in ("a", "b"):
        s = get_settings(data_root=str(tmp_path / name), feast_repo=REPO)
        F.apply_repo(s)
        F.apply_repo(s)  # idempotent
        assert F.is_applied(s)
        stores.append((s, F.get_store(s)))
    for s, store in stores:
        source = store.get_feature_view(F.MERCHANT_VIEW).batch_source
        assert source.path == str(F.offline_path(s, F.MERCHANT_VIEW))
    # the constants of driftloop.features stay in step with the repo
    store = stores[0][1]
    assert {v.name: v.ttl for v in store.list_feature_views()} == {
        F.CARD_VIEW: F.VIEW_TTL, F.MERCHANT_VIEW: F.VIEW_TTL
    }
    assert store.get_data_source(F.CARD_PUSH_SOURCE).name == F.CARD_PUSH_SOURCE
    assert "data_sources" not in sys.modules  # the repo's modules were evicted


# -- offline -> online ----------------------------------------------------------------------


def test_round_trip_returns_latest_state_and_incremental_adds_newer(applied: Settings) -> None:
    tx = simulated()
    cards, merchants = F.compute_card_features(tx), F.compute_merchant_features(tx)
    cut = T0 + timedelta(days=4, hours=6)
    F.write_offline(applied, cards.filter(pl.col("event_timestamp") < cut), merchants)
    store = F.get_store(applied)
    first = F.materialize(store, end=cut)
    assert {v.view for v in first.views} == {F.CARD_VIEW, F.MERCHANT_VIEW}
    assert all(v.start == cut - F.VIEW_TTL for v in first.views)

    want = latest(cards, "card_id", cut)
    ids = want["card_id"].to_list()
    online = F.online_features(store, ids, [0] * len(ids))
    assert online["card_id"].to_list() == ids
    for f in CARD_FEATURES:
        assert online[f].to_list() == pytest.approx(want[f].to_list()), f
    # feature age: the event time of the served row (Feast keeps whole seconds)
    assert online["card_velocity__ts"].to_list() == want["event_timestamp"].dt.truncate(
        "1s"
    ).to_list()
    m = latest(merchants, "merchant_id", cut)
    online_m = F.online_features(store, [None] * m.height, m["merchant_id"].to_list())
    for f in MERCHANT_FEATURES:
        assert online_m[f].to_list() == pytest.approx(m[f].to_list()), f
    assert online_m["merchant_risk__ts"].to_list() == m["event_timestamp"].to_list()

    # the rest of the history arrives as a new part; an incremental run picks it up
    F.write_offline(applied, cards.filter(pl.col("event_timestamp") >= cut), None, mode="append")
    end = T0 + timedelta(days=7)
    second = F.materialize(F.get_store(applied), end=end)
    assert [(v.start, v.end) for v in second.views] == [(cut, end), (cut, end)]
    want = latest(cards, "card_id", end)
    online = F.online_features(store, want["card_id"].to_list(), want["card_id"].to_list())
    assert online["card_txn_count_24h"].to_list() == want["card_txn_count_24h"].to_list()
    assert online["card_last_txn_ts"].to_list() == pytest.approx(want["card_last_txn_ts"].to_list())


def test_pushed_card_state_is_served(applied: Settings) -> None:
    tx = simulated(n=500)
    F.write_offline(applied, F.compute_card_features(tx), F.compute_merchant_features(tx))
    store = F.get_store(applied)
    F.materialize(store, end=T0 + timedelta(days=6))
    pushed_at = T0 + timedelta(days=6, minutes=3)
    row = pl.DataFrame(
        {
            "card_id": [3],
            "event_timestamp": [pushed_at],
            "card_txn_count_1h": [9],
            "card_txn_count_24h": [41],
            "card_amount_mean_1h": [123.5],
            "card_amount_mean_24h": [77.25],
            "card_last_txn_ts": [pushed_at.timestamp()],
        },
        schema=F.CARD_FEATURE_SCHEMA,
    )
    F.push_card_features(store, row)
    got = F.online_features(store, [3, 999_999], [1, 1]).row(0, named=True)
    assert [got[f] for f in CARD_FEATURES] == [9, 41, 123.5, 77.25, pushed_at.timestamp()]
    assert got["card_velocity__ts"] == pushed_at


def test_unknown_entities_give_nulls(applied: Settings) -> None:
    tx = simulated(n=300)
    F.write_offline(applied, F.compute_card_features(tx), F.compute_merchant_features(tx))
    store = F.get_store(applied)
    F.materialize(store, end=T0 + timedelta(days=6))
    end = T0 + timedelta(days=6)
    known_card = int(latest(F.compute_card_features(tx), "card_id", end)["card_id"][0])
    out = F.online_features(store, [123_456, None, known_card], [None, 98_765, 555])
    assert out.height == 3
    assert out.row(0, named=True)["merchant_id"] is None
    for f in (*CARD_FEATURES, "card_velocity__ts"):
        assert out[f].to_list()[:2] == [None, None], f
    for f in (*MERCHANT_FEATURES, "merchant_risk__ts"):
        assert out[f].null_count() == 3, f
    assert out["card_txn_count_24h"][2] is not None
    # historical: unknown ids join to nulls, the row stays
    hist = F.historical_features(
        store,
        pl.DataFrame(
            {"card_id": [123_456], "merchant_id": [98_765], "event_timestamp": [T0]},
            schema={"card_id": pl.Int64, "merchant_id": pl.Int64,
                    "event_timestamp": pl.Datetime("us", "UTC")},
        ),
    )
    assert hist.height == 1
    assert hist.select(CARD_FEATURES + MERCHANT_FEATURES).null_count().row(0) == (1,) * 8


def test_online_as_of_nulls_rows_older_than_ttl(applied: Settings) -> None:
    tx = simulated(n=300)
    F.write_offline(applied, F.compute_card_features(tx), None)
    store = F.get_store(applied)
    F.materialize(store, end=T0 + timedelta(days=6), views=[F.CARD_VIEW])
    card = int(tx["card_id"][-1])
    fresh = F.online_features(store, [card], [0], as_of=T0 + timedelta(days=6))
    stale = F.online_features(store, [card], [0], as_of=T0 + timedelta(days=9))
    assert fresh["card_txn_count_24h"][0] is not None
    assert stale["card_txn_count_24h"][0] is None
    assert stale["card_velocity__ts"][0] == fresh["card_velocity__ts"][0]


# -- point-in-time correctness ----------------------------------------------------------------


def hand_made() -> pl.DataFrame:
    def at(days: int, hours: float) -> datetime:
        return T0 + timedelta(days=days, hours=hours)

    rows = [
        # card 5: two transactions 30 min apart
        (5, 1, 10.0, at(0, 10), 0, at(0, 11)),
        (5, 1, 30.0, at(0, 10.5), 0, at(0, 11)),
        # merchant 2: a fraud whose label arrives at 06:00 on day 1, a legit one at once
        (6, 2, 20.0, at(0, 11), 1, at(1, 6)),
        (7, 2, 40.0, at(0, 12), 0, at(0, 13)),
        # merchant 1: a fraud labelled the same evening
        (8, 1, 50.0, at(0, 14), 1, at(0, 20)),
    ]
    return pl.DataFrame(
        [
            {
                "transaction_id": f"t{i}", "card_id": c, "merchant_id": m, "amount": a,
                "category": "grocery", "channel": "pos", "country": "US",
                "event_timestamp": t, "is_fraud": y, "label_available_at": la,
            }
            for i, (c, m, a, t, y, la) in enumerate(rows)
        ],
        schema=TRANSACTION_SCHEMA,
    )


def entities(rows: list[tuple[int, int, datetime]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "card_id": [r[0] for r in rows],
            "merchant_id": [r[1] for r in rows],
            "event_timestamp": [r[2] for r in rows],
            "request": list(range(len(rows))),
        },
        schema={"card_id": pl.Int64, "merchant_id": pl.Int64,
                "event_timestamp": pl.Datetime("us", "UTC"), "request": pl.Int64},
    )


def test_card_rows_after_the_query_time_are_never_used(applied: Settings) -> None:
    tx = hand_made()
    F.write_offline(applied, F.compute_card_features(tx), F.compute_merchant_features(tx))
    second = T0 + timedelta(hours=10.5)
    ent = entities(
        [
            (5, 1, second),  # the 2nd transaction itself: state after the 1st only
            (5, 1, T0 + timedelta(hours=10.25)),  # between the two
            (5, 1, T0 + timedelta(hours=9.99)),  # before any: nothing
            (5, 1, second + timedelta(days=2, seconds=1)),  # beyond the 2-day ttl: nothing
            (5, 1, second),  # a duplicate row stays a row
        ]
    )
    out = F.historical_features(applied, ent)
    assert out["request"].to_list() == [0, 1, 2, 3, 4]
    assert out["card_txn_count_1h"].to_list() == [1, 1, None, None, 1]
    assert out["card_amount_mean_1h"].to_list() == [10.0, 10.0, None, None, 10.0]
    assert out["card_last_txn_ts"][0] == (T0 + timedelta(hours=10)).timestamp()
    # without the offset the transaction's own row is used: what training must avoid
    own = F.historical_features(applied, ent.head(1), query_offset=timedelta(0))
    assert own.select("card_txn_count_1h", "card_amount_mean_1h").row(0) == (2, 20.0)


def test_merchant_labels_arrived_after_the_query_are_never_used(applied: Settings) -> None:
    tx = hand_made()
    merchants = F.compute_merchant_features(tx, last_day=T0 + timedelta(days=3))
    F.write_offline(applied, F.compute_card_features(tx), merchants)
    ent = entities(
        [
            (6, 2, T0 + timedelta(days=1, hours=10)),  # fraud label arrived at 06:00 today
            (6, 2, T0 + timedelta(days=2, minutes=30)),  # ...and is known from the next day
            (6, 2, T0 + timedelta(hours=23)),  # day 0: no merchant row yet
        ]
    )
    out = F.historical_features(applied, ent)
    # day 1: labels known before 00:00 are 4 (1 fraud, merchant 1's): prior 1/4, and
    # merchant 2 has only its legit one. A leaky join would count the fraud: 1 of 2.
    assert out["merchant_fraud_rate_30d"][0] == pytest.approx((0 + 20 * 1 / 4) / (1 + 20))
    # day 2: all 5 labels (2 frauds): prior 2/5; merchant 2 has 1 of 2
    assert out["merchant_fraud_rate_30d"][1] == pytest.approx((1 + 20 * 2 / 5) / (2 + 20))
    assert out["merchant_fraud_rate_30d"][2] is None
    assert out["merchant_txn_count_24h"].to_list() == [2, 0, None]


def test_feast_engine_agrees_where_it_keeps_rows(applied: Settings) -> None:
    """Cross-check our as-of join against Feast's own historical retrieval."""
    tx = simulated(n=1500)
    F.write_offline(applied, F.compute_card_features(tx), F.compute_merchant_features(tx))
    ent = tx.filter(pl.col("event_timestamp") >= T0 + timedelta(days=1)).select(
        "card_id", "merchant_id", "event_timestamp", "transaction_id"
    )
    ours = F.historical_features(applied, ent)
    feast = F.historical_features(applied, ent, engine="feast")
    assert ours["transaction_id"].to_list() == feast["transaction_id"].to_list()
    both = ours.join(feast, on="transaction_id", suffix="_feast")
    kept = both.filter(pl.col("card_last_txn_ts_feast").is_not_null())
    assert kept.height > 0.8 * both.height
    for f in CARD_FEATURES + MERCHANT_FEATURES:
        assert kept[f].to_list() == pytest.approx(kept[f"{f}_feast"].to_list()), f
