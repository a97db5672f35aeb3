"""online_fast.FastOnlineReader returns what features.online_features returns, on a real store."""

from __future__ import annotations

import random
from datetime import timedelta

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tests.fixtures.world import World

pytestmark = pytest.mark.integration

UNKNOWN = 10**12


@pytest.fixture(scope="module")
def store(world: World):
    from driftloop import features

    return features.get_store(world.settings())


def entity_pairs(world: World, n: int = 400) -> tuple[list[int | None], list[int | None]]:
    """Known pairs (with repeats), unknown cards and merchants, and missing ids."""
    recent = world.transactions.tail(n)
    cards: list[int | None] = recent["card_id"].to_list()
    merchants: list[int | None] = recent["merchant_id"].to_list()
    cards += [cards[0], UNKNOWN, cards[1], UNKNOWN, None]
    merchants += [merchants[0], merchants[1], UNKNOWN, UNKNOWN, merchants[2]]
    return cards, merchants


def test_frame_is_the_frame_of_online_features(world: World, store) -> None:
    from driftloop import features
    from driftloop.online_fast import FastOnlineReader

    cards, merchants = entity_pairs(world)
    expected = features.online_features(store, cards, merchants)
    got = FastOnlineReader(store).frame(cards, merchants)
    assert_frame_equal(got, expected)
    # the sample exercises known, unknown and missing entities
    assert expected["card_velocity__ts"].null_count() >= 2
    assert expected["merchant_risk__ts"].drop_nulls().len() > 0
    as_of = world.transactions["event_timestamp"].max() + timedelta(days=1)
    assert_frame_equal(
        FastOnlineReader(store).frame(cards, merchants, as_of=as_of),
        features.online_features(store, cards, merchants, as_of=as_of),
    )


def test_read_is_the_read_of_the_serving_reader(world: World, store) -> None:
    from driftloop.online_fast import FastOnlineReader
    from driftloop.serving import FeastOnlineReader

    cards, merchants = entity_pairs(world)
    known = [(c, m) for c, m in zip(cards, merchants, strict=True) if c is not None]
    card_ids = [c for c, _ in known]
    merchant_ids = [m for _, m in known]
    assert FastOnlineReader(store).read(card_ids, merchant_ids) == FeastOnlineReader(
        world.settings()
    ).read(card_ids, merchant_ids)
    assert FastOnlineReader(store).read([], []) == ([], [])
    with pytest.raises(ValueError):
        FastOnlineReader(store).read([1], [])


def test_pushed_values_are_read_live_nulls_included(world: World, store) -> None:
    """A card unknown to the store becomes known after a push (its unknown answer is
    not kept past the push); a value pushed as null reads as missing, as through
    Feast's response."""
    from driftloop import features
    from driftloop.online_fast import FastOnlineReader

    reader = FastOnlineReader(store)  # created before the push
    card = 10**9 + random.randrange(10**8)
    merchant = int(world.transactions["merchant_id"][-1])
    cards, merchants = reader.read([card], [merchant])
    assert cards == [None] and merchants[0] is not None
    at = world.transactions["event_timestamp"].max()
    pushed = pl.DataFrame(
        {
            "card_id": [card],
            "event_timestamp": [at],
            "card_txn_count_1h": [3],
            "card_txn_count_24h": [9],
            "card_amount_mean_1h": [None],
            "card_amount_mean_24h": [42.5],
            "card_last_txn_ts": [at.timestamp() - 60.0],
        },
        schema=features.CARD_FEATURE_SCHEMA,
    )
    features.push_card_features(store, pushed)
    cards, _ = reader.read([card], [merchant])
    assert cards[0] == {
        "card_txn_count_1h": 3,
        "card_txn_count_24h": 9,
        "card_amount_mean_1h": None,
        "card_amount_mean_24h": 42.5,
        "card_last_txn_ts": pytest.approx(at.timestamp() - 60.0),
        "event_timestamp": pytest.approx(at.timestamp()),
    }
    assert_frame_equal(
        reader.frame([card, card], [merchant, UNKNOWN]),
        features.online_features(store, [card, card], [merchant, UNKNOWN]),
    )


def test_direct_sqlite_reads_are_online_reads(world: World, store) -> None:
    """The rows read from SQLite directly (few entities, and many) decode to exactly what
    Feast's ``online_read`` gives: known, unknown and null-valued entities, same event
    times; ``read`` and ``frame`` answer the same through either."""
    from driftloop import features
    from driftloop.online_fast import FastOnlineReader

    direct = FastOnlineReader(store)
    generic = FastOnlineReader(store)
    generic._sqlite = None  # every read through online_read
    assert direct._sqlite is not None
    card = 2 * 10**9 + random.randrange(10**8)
    at = world.transactions["event_timestamp"].max()
    pushed = pl.DataFrame(
        {
            "card_id": [card],
            "event_timestamp": [at],
            "card_txn_count_1h": [None],
            "card_txn_count_24h": [2],
            "card_amount_mean_1h": [None],
            "card_amount_mean_24h": [None],
            "card_last_txn_ts": [None],
        },
        schema=features.CARD_FEATURE_SCHEMA,
    )
    features.push_card_features(store, pushed)
    cards, merchants = entity_pairs(world, n=40)
    known_cards = [c for c in cards if c is not None]
    known_merchants = [m for m in merchants if m is not None]
    samples = {
        features.CARD_VIEW: [[card], [UNKNOWN], known_cards[:1], [card, UNKNOWN, *known_cards]],
        features.MERCHANT_VIEW: [[UNKNOWN], known_merchants[:3], [*known_merchants, UNKNOWN]],
    }
    views = {v.name: v for v in direct._resolve()}
    for name, id_lists in samples.items():
        for ids in id_lists:
            expected = generic._read_view(views[name], ids)
            got = direct._read_view(views[name], ids)
            assert got == expected
            for entity in got:  # same types too (int counts stay ints)
                assert [type(v) for v in got[entity][1].values()] == [
                    type(v) for v in expected[entity][1].values()
                ]
    assert direct._sqlite.rows(views[features.CARD_VIEW], [card]) is not None  # taken
    nulls = direct._read_view(views[features.CARD_VIEW], [card])[card][1]
    assert nulls["card_txn_count_24h"] == 2 and nulls["card_amount_mean_24h"] is None
    few_cards, few_merchants = [card, known_cards[0], UNKNOWN], known_merchants[:3]
    assert direct.read(few_cards, few_merchants) == generic.read(few_cards, few_merchants)
    assert_frame_equal(
        direct.frame([*few_cards, None], [*few_merchants, None]),
        features.online_features(store, [*few_cards, None], [*few_merchants, None]),
    )


def card_row(card: int, at, count_24h: int) -> pl.DataFrame:
    from driftloop import features

    return pl.DataFrame(
        {
            "card_id": [card],
            "event_timestamp": [at],
            "card_txn_count_1h": [1],
            "card_txn_count_24h": [count_24h],
            "card_amount_mean_1h": [10.0],
            "card_amount_mean_24h": [20.0],
            "card_last_txn_ts": [at.timestamp() - 5.0],
        },
        schema=features.CARD_FEATURE_SCHEMA,
    )


def test_cached_reads_follow_every_committed_write(world: World, store) -> None:
    """Entities read once are answered from memory until the store changes: the second
    read of a batch runs no feature query, and answers what an uncached reader reads.
    A push from another connection (as from another process) and one through the
    reader's own store are both seen by the very next read, for a batch and one row."""
    from driftloop import features
    from driftloop.online_fast import FastOnlineReader

    reader = FastOnlineReader(store)
    uncached = FastOnlineReader(store, cache=False)
    card = 3 * 10**9 + random.randrange(10**8)
    cards, merchants = entity_pairs(world, n=300)
    known = [(c, m) for c, m in zip(cards, merchants, strict=True) if c is not None]
    batch_cards = [card, *(c for c, _ in known)]
    batch_merchants = [known[0][1], *(m for _, m in known)]

    def same_as_uncached() -> None:
        got, expected = (r.columns(batch_cards, batch_merchants) for r in (reader, uncached))
        for name, values in expected.values.items():
            np.testing.assert_array_equal(got.values[name], values, err_msg=name)
        np.testing.assert_array_equal(got.card_ts, expected.card_ts)
        np.testing.assert_array_equal(got.merchant_ts, expected.merchant_ts)
        assert reader.read([card], batch_merchants[:1]) == uncached.read(
            [card], batch_merchants[:1]
        )

    statements: list[str] = []
    conn = reader._sqlite._online_store._get_conn(reader._sqlite._config)
    conn.set_trace_callback(statements.append)
    try:
        same_as_uncached()  # the card is unknown: cached as unknown
        statements.clear()
        reader.columns(batch_cards, batch_merchants)
        reader.read([card], batch_merchants[:1])
        assert statements and all(s.startswith("PRAGMA") for s in statements), statements
        unknown = reader.columns([card] * 20, batch_merchants[:20])
        assert np.isnan(unknown.values["card_txn_count_24h"][0]) and np.isnan(unknown.card_ts[0])
        at = world.transactions["event_timestamp"].max()
        # another connection's commit (a FeatureStore of its own, as another process)
        features.push_card_features(features.get_store(world.settings()), card_row(card, at, 7))
        assert (
            reader.columns([card] * 20, batch_merchants[:20]).values["card_txn_count_24h"][0] == 7.0
        )
        assert reader.read([card], batch_merchants[:1])[0][0]["card_txn_count_24h"] == 7
        same_as_uncached()
        # a write through the reader's own connection
        features.push_card_features(store, card_row(card, at, 8))
        assert reader.read([card], batch_merchants[:1])[0][0]["card_txn_count_24h"] == 8
        assert (
            reader.columns([card] * 20, batch_merchants[:20]).values["card_txn_count_24h"][0] == 8.0
        )
        same_as_uncached()
    finally:
        conn.set_trace_callback(None)
