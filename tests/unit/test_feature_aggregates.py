"""The pure aggregates of driftloop.features: hand-made cases and brute-force oracles."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from driftloop.errors import SchemaError
from driftloop.features import (
    CARD_FEATURE_SCHEMA,
    MERCHANT_FEATURE_SCHEMA,
    compute_card_features,
    compute_merchant_features,
)
from driftloop.schema import TRANSACTION_SCHEMA

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def tx_frame(rows: list[dict]) -> pl.DataFrame:
    """Transactions with defaults for the columns a case does not care about."""
    full = []
    for i, r in enumerate(rows):
        full.append(
            {
                "transaction_id": f"t{i}",
                "card_id": 1,
                "merchant_id": 1,
                "amount": 10.0,
                "category": "grocery",
                "channel": "pos",
                "country": "US",
                "is_fraud": 0,
                "label_available_at": None,
                **r,
            }
        )
    return pl.DataFrame(full, schema=TRANSACTION_SCHEMA)


def random_tx(seed: int, n: int = 400, cards: int = 7, merchants: int = 4, days: int = 9):
    rng = np.random.default_rng(seed)
    # minute resolution makes equal timestamps and exact window edges likely
    minutes = rng.integers(0, days * 24 * 60, n)
    ts = [T0 + timedelta(minutes=int(m)) for m in minutes]
    delay = rng.integers(0, 4 * 24 * 60, n)
    label_at = [
        None if rng.random() < 0.1 else t + timedelta(minutes=int(d))
        for t, d in zip(ts, delay, strict=True)
    ]
    return tx_frame(
        [
            {
                "card_id": int(rng.integers(0, cards)),
                "merchant_id": int(rng.integers(0, merchants)),
                "amount": float(rng.integers(1, 100)),
                "event_timestamp": t,
                "is_fraud": int(rng.random() < 0.2),
                "label_available_at": la,
            }
            for t, la in zip(ts, label_at, strict=True)
        ]
    )


# -- card -----------------------------------------------------------------------------------


def test_card_state_after_each_transaction() -> None:
    tx = tx_frame(
        [
            {"event_timestamp": T0 + timedelta(hours=10), "amount": 10.0},
            {"event_timestamp": T0 + timedelta(hours=10, minutes=30), "amount": 30.0},
            {"event_timestamp": T0 + timedelta(hours=11), "amount": 50.0},  # 10:00 is out
            {"event_timestamp": T0 + timedelta(hours=35), "amount": 70.0},  # next day 11:00
            {"card_id": 2, "event_timestamp": T0 + timedelta(hours=10, minutes=5), "amount": 1.0},
        ]
    )
    out = compute_card_features(tx)
    assert out.schema == pl.Schema(CARD_FEATURE_SCHEMA)
    card1 = out.filter(pl.col("card_id") == 1)
    assert card1["card_txn_count_1h"].to_list() == [1, 2, 2, 1]
    assert card1["card_amount_mean_1h"].to_list() == [10.0, 20.0, 40.0, 70.0]
    # (t - 24h, t]: at day-2 11:00 the 11:00 of day 1 is exactly 24 h back, so out
    assert card1["card_txn_count_24h"].to_list() == [1, 2, 3, 1]
    assert card1["card_amount_mean_24h"].to_list() == [10.0, 20.0, 30.0, 70.0]
    assert card1["card_last_txn_ts"].to_list() == [
        t.timestamp() for t in card1["event_timestamp"].to_list()
    ]
    card2 = out.filter(pl.col("card_id") == 2)
    assert card2.select("card_txn_count_1h", "card_amount_mean_1h").row(0) == (1, 1.0)


def test_card_simultaneous_transactions_collapse_to_one_row() -> None:
    at = T0 + timedelta(hours=3)
    tx = tx_frame(
        [{"event_timestamp": at, "amount": 10.0}, {"event_timestamp": at, "amount": 20.0}]
    )
    out = compute_card_features(tx)
    assert out.height == 1
    assert out.select("card_txn_count_1h", "card_amount_mean_1h").row(0) == (2, 15.0)


def test_card_features_do_not_depend_on_row_order() -> None:
    tx = random_tx(1)
    shuffled = tx.sample(fraction=1.0, shuffle=True, seed=3)
    assert compute_card_features(tx).equals(compute_card_features(shuffled))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_card_features_match_brute_force(seed: int) -> None:
    tx = random_tx(seed)
    got = {(r["card_id"], r["event_timestamp"]): r for r in compute_card_features(tx).to_dicts()}
    rows = tx.to_dicts()
    assert len(got) == len({(r["card_id"], r["event_timestamp"]) for r in rows})
    for r in rows:
        mine = [o for o in rows if o["card_id"] == r["card_id"]]
        t = r["event_timestamp"]
        for hours, suffix in ((1, "1h"), (24, "24h")):
            start = t - timedelta(hours=hours)
            window = [o["amount"] for o in mine if start < o["event_timestamp"] <= t]
            row = got[(r["card_id"], t)]
            assert row[f"card_txn_count_{suffix}"] == len(window)
            assert row[f"card_amount_mean_{suffix}"] == pytest.approx(np.mean(window))


def test_card_features_reject_a_mistyped_frame() -> None:
    bad = tx_frame([{"event_timestamp": T0}]).with_columns(pl.col("card_id").cast(pl.Utf8))
    with pytest.raises(SchemaError):
        compute_card_features(bad)


# -- merchant -------------------------------------------------------------------------------


def day(n: int, hours: float = 0.0) -> datetime:
    return T0 + timedelta(days=n, hours=hours)


def test_merchant_rate_uses_only_labels_arrived_before_the_day() -> None:
    tx = tx_frame(
        [
            # merchant 1: a fraud labelled the same evening
            {"merchant_id": 1, "event_timestamp": day(0, 10), "amount": 10.0, "is_fraud": 1,
             "label_available_at": day(0, 20)},
            # merchant 2: a fraud labelled at 06:00 the next day, a legit one labelled at once
            {"merchant_id": 2, "event_timestamp": day(0, 11), "amount": 20.0, "is_fraud": 1,
             "label_available_at": day(1, 6)},
            {"merchant_id": 2, "event_timestamp": day(0, 12), "amount": 40.0, "is_fraud": 0,
             "label_available_at": day(0, 13)},
        ]
    )
    out = compute_merchant_features(tx, smoothing=20.0, last_day=day(3))
    assert out.schema == pl.Schema(MERCHANT_FEATURE_SCHEMA)
    m2 = {r["event_timestamp"]: r for r in out.filter(pl.col("merchant_id") == 2).to_dicts()}
    assert sorted(m2) == [day(1), day(2), day(3)]
    # D = day 1: labels known before D: m1 fraud, m2 legit -> prior 1/2; m2 has 0 of 1
    assert m2[day(1)]["merchant_fraud_rate_30d"] == pytest.approx((0 + 20 * 0.5) / (1 + 20))
    assert m2[day(1)]["merchant_txn_count_24h"] == 2
    assert m2[day(1)]["merchant_amount_mean_24h"] == 30.0
    # D = day 2: all three labels -> prior 2/3; m2 has 1 of 2
    assert m2[day(2)]["merchant_fraud_rate_30d"] == pytest.approx((1 + 20 * 2 / 3) / (2 + 20))
    # no transaction in the 24 h before day 2
    assert m2[day(2)]["merchant_txn_count_24h"] == 0
    assert m2[day(2)]["merchant_amount_mean_24h"] is None


def test_merchant_rate_window_and_missing_labels() -> None:
    tx = tx_frame(
        [
            {"merchant_id": 1, "event_timestamp": day(0, 10), "is_fraud": 1,
             "label_available_at": day(0, 11)},
            # a label that never arrives does not count
            {"merchant_id": 1, "event_timestamp": day(0, 12), "is_fraud": 0,
             "label_available_at": None},
        ]
    )
    out = compute_merchant_features(tx, smoothing=0.0, fraud_window_days=30, last_day=day(32))
    rate = dict(zip(out["event_timestamp"].to_list(), out["merchant_fraud_rate_30d"].to_list(),
                    strict=True))
    assert rate[day(1)] == 1.0
    assert rate[day(30)] == 1.0  # the transaction is 29 d 14 h before day 30
    assert rate[day(31)] is None  # 30 d 14 h before: out of the window, no label left


def test_merchant_rate_is_null_before_any_label_arrives() -> None:
    tx = tx_frame([{"merchant_id": 3, "event_timestamp": day(0, 1), "is_fraud": 1,
                    "label_available_at": day(5)}])
    out = compute_merchant_features(tx, last_day=day(6))
    rate = dict(zip(out["event_timestamp"].to_list(), out["merchant_fraud_rate_30d"].to_list(),
                    strict=True))
    assert rate[day(1)] is None and rate[day(5)] is None
    assert rate[day(6)] == pytest.approx(1.0)  # prior 1, merchant 1 of 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merchant_features_match_brute_force(seed: int) -> None:
    smoothing = 5.0
    tx = random_tx(seed, merchants=3, days=40)
    out = compute_merchant_features(tx, smoothing=smoothing, fraud_window_days=10)
    rows = tx.to_dicts()
    last = max(r["event_timestamp"] for r in rows).replace(hour=0, minute=0) + timedelta(days=1)
    expected_rows = 0
    got = {(r["merchant_id"], r["event_timestamp"]): r for r in out.to_dicts()}
    for m in {r["merchant_id"] for r in rows}:
        mine = [r for r in rows if r["merchant_id"] == m]
        d = min(r["event_timestamp"] for r in mine).replace(hour=0, minute=0) + timedelta(days=1)
        while d <= last:
            expected_rows += 1
            row = got[(m, d)]
            prev = [r["amount"] for r in mine if d - timedelta(days=1) <= r["event_timestamp"] < d]
            assert row["merchant_txn_count_24h"] == len(prev)
            mean = row["merchant_amount_mean_24h"]
            assert mean == (pytest.approx(np.mean(prev)) if prev else None)

            def known(r: dict, d: datetime = d) -> bool:
                return (
                    d - timedelta(days=10) <= r["event_timestamp"] < d
                    and r["label_available_at"] is not None
                    and r["label_available_at"] < d
                )

            everyone = [r["is_fraud"] for r in rows if known(r)]
            theirs = [r["is_fraud"] for r in mine if known(r)]
            if not everyone:
                assert row["merchant_fraud_rate_30d"] is None
            else:
                prior = sum(everyone) / len(everyone)
                want = (sum(theirs) + smoothing * prior) / (len(theirs) + smoothing)
                assert row["merchant_fraud_rate_30d"] == pytest.approx(want)
            d += timedelta(days=1)
    assert out.height == expected_rows


def test_merchant_features_of_no_transactions_is_empty() -> None:
    out = compute_merchant_features(pl.DataFrame(schema=TRANSACTION_SCHEMA))
    assert out.height == 0 and out.schema == pl.Schema(MERCHANT_FEATURE_SCHEMA)
