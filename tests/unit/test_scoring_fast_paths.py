"""The one-row shortcuts of the scorer's helpers give what their general paths give."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import TypeAdapter

from driftloop.predlog import records_from_columns
from driftloop.serving import _epoch_micros, _observe_many, _uuid4_hex

PARIS = ZoneInfo("Europe/Paris")
PARSED = TypeAdapter(datetime).validate_python("2026-01-10T12:00:00.250001+05:30")
NOW = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    "value",
    [
        None,
        NOW,
        PARSED,
        datetime(2026, 1, 5, 1, 2, 3, 7, tzinfo=timezone(timedelta(hours=-3))),
        datetime(2026, 7, 5, 1, 2, 3, 999_999, tzinfo=PARIS),
        datetime(2026, 10, 25, 2, 30, tzinfo=PARIS, fold=1),  # the repeated hour
        datetime(2000, 1, 1, tzinfo=UTC),
    ],
)
def test_one_timestamp_is_what_a_column_of_them_gives(value: datetime | None) -> None:
    default = datetime(2026, 2, 2, 2, 2, 2, 2, tzinfo=UTC)
    one = _epoch_micros([value], 1, default=default)
    two = _epoch_micros([value, value], 2, default=default)
    assert one.dtype == np.int64 and one.tolist() == two.tolist()[:1]
    expected = ((value or default) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert one.tolist() == [expected]


def _samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], str]]:
    return [
        (s.name, s.labels, repr(s.value))
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    ]


@pytest.mark.parametrize("value", [0.0, 0.05, 0.05000001, 0.5, 1.0, 7.5, math.inf, math.nan])
def test_observing_one_value_is_histogram_observe(value: float) -> None:
    registries = CollectorRegistry(), CollectorRegistry()
    fast, slow = (
        Histogram("h", "h", ["m"], buckets=(0.05, 0.1, 0.5, 1.0), registry=r).labels("x")
        for r in registries
    )
    for dtype in (np.float64, np.float32):
        _observe_many(fast, np.array([value], dtype=dtype))
        slow.observe(float(np.array([value], dtype=dtype)[0]))
    assert _samples(registries[0]) == _samples(registries[1])


def test_one_request_id_is_a_uuid4_hex() -> None:
    ids = {_uuid4_hex(1)[0] for _ in range(200)}
    assert len(ids) == 200
    for hex_id in ids:
        assert len(hex_id) == 32 and uuid.UUID(hex_id).hex == hex_id
        assert uuid.UUID(hex_id).version == 4 and uuid.UUID(hex_id).variant == uuid.RFC_4122


def test_records_from_columns_one_row_and_many() -> None:
    columns = {
        "f": np.array([1.5, math.nan]),
        "f32": np.array([0.25, math.nan], dtype=np.float32),
        "i": np.array([3, 4], dtype=np.int64),
        "b": np.array([True, False]),
        "i8": np.array([1, 0], dtype=np.int8),
        "t": np.array(["2026-01-01T00:00:00.000001", "NaT"], dtype="datetime64[us]"),
        "s": ["a", None],
        "tuple": ("x", "y"),
        "scalar": "v",
        "u": np.array(["p", "q"]),
    }
    expected = [
        {
            "f": 1.5,
            "f32": 0.25,
            "i": 3,
            "b": True,
            "i8": 1,
            "t": datetime(2026, 1, 1, 0, 0, 0, 1),
            "s": "a",
            "tuple": "x",
            "scalar": "v",
            "u": "p",
        },
        {
            "f": None,
            "f32": None,
            "i": 4,
            "b": False,
            "i8": 0,
            "t": None,
            "s": None,
            "tuple": "y",
            "scalar": "v",
            "u": "q",
        },
    ]
    got = records_from_columns(columns, 2)
    assert got == expected
    assert [[type(v) for v in r.values()] for r in got] == [
        [type(v) for v in r.values()] for r in expected
    ]
    one = records_from_columns(
        {k: v if isinstance(v, str) else v[:1] for k, v in columns.items()}, 1
    )
    assert one == expected[:1]


def test_scorer_keeps_the_labelled_children() -> None:
    from driftloop.serving import Scorer

    counter = Counter("c", "c", ["model", "version", "kind"], registry=CollectorRegistry())
    scorer = Scorer.__new__(Scorer)
    scorer._labels = ("fraud", "v1")
    scorer._children = {}
    assert scorer._child(counter, "a") is counter.labels("fraud", "v1", "a")
    assert scorer._child(counter, "a") is scorer._child(counter, "a")
    assert scorer._child(counter, "b") is counter.labels("fraud", "v1", "b")


@pytest.mark.parametrize("value", [PARSED, NOW, NOW.replace(tzinfo=None), NOW.astimezone(PARIS)])
def test_the_row_path_takes_the_hour_in_utc_as_the_columnar_path(value: datetime) -> None:
    """``modeling.derive_row`` (the bare baseline's row path) and the scorer's columns agree
    on the hour of day and the seconds since the card's last transaction."""
    from driftloop.modeling import derive_row

    micros = _epoch_micros([value], 1, default=NOW)[0]
    row = derive_row(10.0, value, {"card_last_txn_ts": micros / 1e6 - 90.0})
    assert row["hour_of_day"] == float((micros // 3_600_000_000) % 24)
    assert row["secs_since_last_txn"] == pytest.approx(90.0)
