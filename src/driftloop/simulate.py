"""A card-transaction stream with a hidden fraud concept and named drift scenarios.

Everything is vectorised with numpy and assembled into one polars frame, so a
few hundred thousand events take well under a second. The same
:class:`SimulationConfig` (including its seed) always gives the same frame.

The hidden concept: each transaction carries a fraud log-odds that rises with
the amount, night hours, card-not-present (online) use, a foreign country, a
risky merchant category and a compromised merchant. Fraud is drawn from that
probability (the noise), and each fraud spawns a short burst of further frauds
on the same card within minutes (what card velocity features see).

Scenarios change the stream from ``drift_start`` on:

``stable``
    nothing changes.
``covariate_shift``
    amounts grow (log-mean +0.8) and activity moves to the night.
``new_category``
    merchants of a category never seen before (``electronics``) take ~15 % of traffic.
``concept_drift``
    card testing: small ``digital_goods`` purchases, which were safe, become a
    main fraud pattern. Inputs barely move; a static model's recall falls.
``data_break``
    an upstream bug: ``amount`` arrives in cents (x100), or with
    ``break_kind="null"`` the ``channel`` column arrives empty. The true fraud
    concept is unchanged.

Labels arrive late: ``label_available_at = event_timestamp + delay``, the delay
drawn from a log-normal distribution (median and spread configurable).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from driftloop.errors import DataError
from driftloop.schema import (
    CHANNELS,
    COUNTRIES,
    HOME_COUNTRY,
    NEW_CATEGORY,
    TRANSACTION_SCHEMA,
    validate_frame,
)

Scenario = Literal["stable", "covariate_shift", "new_category", "concept_drift", "data_break"]
SCENARIOS: tuple[str, ...] = (
    "stable",
    "covariate_shift",
    "new_category",
    "concept_drift",
    "data_break",
)

# log-mean of the amount per category (exp(3.5) ~ $33)
_AMOUNT_LOGMEAN = {
    "grocery": 3.5,
    "gas": 3.7,
    "restaurant": 3.4,
    "retail": 4.0,
    "travel": 5.4,
    "entertainment": 3.6,
    "health": 4.2,
    "jewelry": 5.6,
    "digital_goods": 2.7,
    "utilities": 4.4,
    NEW_CATEGORY: 5.5,
}
_CATEGORY_WEIGHT = {
    "grocery": 0.22,
    "gas": 0.13,
    "restaurant": 0.15,
    "retail": 0.16,
    "travel": 0.04,
    "entertainment": 0.07,
    "health": 0.06,
    "jewelry": 0.02,
    "digital_goods": 0.10,
    "utilities": 0.05,
}
_CATEGORY_RISK = {
    "grocery": -0.8,
    "gas": -0.2,
    "restaurant": -0.5,
    "retail": 0.2,
    "travel": 0.8,
    "entertainment": 0.0,
    "health": -0.6,
    "jewelry": 1.5,
    "digital_goods": 0.3,
    "utilities": -1.0,
    NEW_CATEGORY: 1.2,
}
_ONLINE_SHARE = {c: 0.25 for c in _CATEGORY_WEIGHT} | {
    "digital_goods": 1.0,
    "travel": 0.6,
    "gas": 0.02,
    "utilities": 0.7,
    NEW_CATEGORY: 0.6,
}
# daytime-peaked activity by hour
_HOUR_WEIGHT = np.array(
    [2, 1, 1, 1, 1, 2, 4, 6, 8, 9, 10, 10, 11, 10, 10, 10, 10, 11, 11, 10, 8, 6, 4, 3], dtype=float
)
_NIGHT_HOUR_WEIGHT = np.array(
    [9, 9, 8, 8, 7, 5, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 7, 8, 9, 9], dtype=float
)


class SimulationConfig(BaseModel):
    """What to simulate. Deterministic for a given value of every field."""

    model_config = ConfigDict(extra="forbid")

    n_events: int = Field(100_000, ge=1, le=50_000_000, description="rows to generate")
    seed: int = Field(0, ge=0, description="random seed")
    scenario: Scenario = Field("stable", description="drift scenario")
    start: datetime = Field(
        datetime(2026, 1, 1, tzinfo=UTC), description="timestamp of the first event (UTC)"
    )
    days: float = Field(14.0, gt=0, le=3650, description="length of the stream in days")
    drift_start: datetime | None = Field(
        None, description="when the scenario begins (default: 60 % into the stream)"
    )
    n_cards: int | None = Field(None, ge=10, description="cards (default n_events/40)")
    n_merchants: int = Field(2_000, ge=10, description="merchants")
    compromised_merchant_share: float = Field(0.02, ge=0, le=1)
    label_delay_median_hours: float = Field(6.0, gt=0, description="median label delay")
    label_delay_sigma: float = Field(1.0, ge=0, description="log-normal spread of the delay")
    break_kind: Literal["unit", "null"] = Field("unit", description="data_break: x100 or nulls")
    id_prefix: str = Field("tx", pattern=r"^[A-Za-z0-9_-]{1,20}$")

    @model_validator(mode="after")
    def _check(self) -> SimulationConfig:
        if self.start.tzinfo is None:
            self.start = self.start.replace(tzinfo=UTC)
        if self.drift_start is not None and self.drift_start.tzinfo is None:
            self.drift_start = self.drift_start.replace(tzinfo=UTC)
        return self

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=self.days)

    @property
    def drift_at(self) -> datetime:
        if self.drift_start is not None:
            return self.drift_start
        return self.start + timedelta(days=self.days * 0.6)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _pick(
    rng: np.random.Generator, values: tuple[str, ...], weights: list[float], n: int
) -> np.ndarray:
    p = np.asarray(weights, dtype=float)
    return rng.choice(len(values), size=n, p=p / p.sum())


def simulate(config: SimulationConfig | None = None, **kwargs: object) -> pl.DataFrame:
    """Generate the transaction stream described by ``config`` (or keyword fields).

    Returns a frame with :data:`driftloop.schema.TRANSACTION_SCHEMA`, sorted by
    ``event_timestamp``, with exactly ``n_events`` rows.
    """
    cfg = config if config is not None else SimulationConfig(**kwargs)  # type: ignore[arg-type]
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_events
    n_cards = cfg.n_cards or max(50, n // 40)
    start_us = int(cfg.start.timestamp() * 1e6)
    span_us = int(cfg.days * 86_400 * 1e6)
    drift_us = int(cfg.drift_at.timestamp() * 1e6)

    # --- entities -------------------------------------------------------------
    cats = list(_CATEGORY_WEIGHT)
    merchant_cat = _pick(rng, tuple(cats), list(_CATEGORY_WEIGHT.values()), cfg.n_merchants)
    merchant_compromised = rng.random(cfg.n_merchants) < cfg.compromised_merchant_share
    merchant_pop = rng.lognormal(0.0, 1.0, cfg.n_merchants)
    card_activity = rng.lognormal(0.0, 0.8, n_cards)

    # --- base events: oversample, bursts are added, then subsample to n ------
    m = int(n * 1.02) + 10
    day = rng.integers(0, max(1, int(np.ceil(cfg.days))), m)
    hour = rng.choice(24, size=m, p=_HOUR_WEIGHT / _HOUR_WEIGHT.sum())
    ts = start_us + ((day * 24 + hour) * 3600 + rng.random(m) * 3600) * 1_000_000
    ts = ts.astype(np.int64)
    in_range = ts < start_us + span_us
    ts = np.where(in_range, ts, start_us + (rng.random(m) * span_us).astype(np.int64))
    after = ts >= drift_us
    if cfg.scenario == "covariate_shift":
        # move post-drift activity towards the night
        night_hour = rng.choice(24, size=m, p=_NIGHT_HOUR_WEIGHT / _NIGHT_HOUR_WEIGHT.sum())
        day_start = ts - (ts - start_us) % (86_400 * 1_000_000)
        shifted = day_start + (night_hour * 3600 + rng.random(m) * 3600) * 1_000_000
        ts = np.where(after & (shifted >= drift_us), shifted.astype(np.int64), ts)
        after = ts >= drift_us

    card = rng.choice(n_cards, size=m, p=card_activity / card_activity.sum()).astype(np.int64)
    merchant = rng.choice(cfg.n_merchants, size=m, p=merchant_pop / merchant_pop.sum()).astype(
        np.int64
    )
    cat_names = np.array(cats + [NEW_CATEGORY], dtype=object)
    cat_idx = merchant_cat[merchant]
    if cfg.scenario == "new_category":
        # new merchants of an unseen category take ~15 % of post-drift traffic
        newcomer = after & (rng.random(m) < 0.15)
        n_new_merchants = max(5, cfg.n_merchants // 50)
        merchant = np.where(
            newcomer, cfg.n_merchants + rng.integers(0, n_new_merchants, m), merchant
        )
        cat_idx = np.where(newcomer, len(cats), cat_idx)
        compromised = np.where(
            newcomer, False, merchant_compromised[np.minimum(merchant, cfg.n_merchants - 1)]
        )
    else:
        compromised = merchant_compromised[merchant]
    category = cat_names[cat_idx]

    amount_logmean = np.array([_AMOUNT_LOGMEAN[c] for c in cat_names])[cat_idx]
    if cfg.scenario == "covariate_shift":
        amount_logmean = amount_logmean + np.where(after, 0.8, 0.0)
    amount = np.round(np.exp(rng.normal(amount_logmean, 0.7)), 2) + 0.5

    online_share = np.array([_ONLINE_SHARE[c] for c in cat_names])[cat_idx]
    u = rng.random(m)
    channel_idx = np.where(u < online_share, 1, np.where(rng.random(m) < 0.04, 2, 0))
    foreign = rng.random(m) < 0.07
    country_idx = np.where(foreign, rng.integers(1, len(COUNTRIES), m), 0)

    # --- the hidden fraud concept --------------------------------------------
    hour_of_day = ((ts // 1_000_000) % 86_400) // 3600
    night = (hour_of_day <= 4).astype(float)
    cat_risk = np.array([_CATEGORY_RISK[c] for c in cat_names])[cat_idx]
    z = (
        -7.4
        + 1.3 * (np.log(amount) - 4.0)
        + 1.8 * night
        + 1.2 * (channel_idx == 1)
        + 2.0 * foreign
        + cat_risk
        + 3.0 * compromised
    )
    if cfg.scenario == "concept_drift":
        # card testing: small digital purchases turn fraudulent after the drift
        testing = after & (cat_idx == cats.index("digital_goods")) & (amount < 25.0)
        z = z + np.where(testing, 5.0, 0.0)
        # and the old signature fades a little
        z = z - np.where(after & ~testing, 0.4, 0.0)
    fraud = rng.random(m) < _sigmoid(z)
    # a small share of label noise
    fraud ^= rng.random(m) < 0.0003

    # --- bursts: each fraud spawns follow-up frauds on the same card ---------
    parents = np.flatnonzero(fraud)
    k = rng.poisson(1.6, parents.size)
    src = np.repeat(parents, k)
    b = src.size
    burst_ts = ts[src] + (rng.exponential(8 * 60, b) * 1_000_000).astype(np.int64)
    burst_amount = np.round(amount[src] * rng.lognormal(0.0, 0.3, b), 2)

    def cat_b(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, a[src]])

    all_ts = np.concatenate([ts, burst_ts])
    all_card = cat_b(card)
    all_merchant = cat_b(merchant)
    all_amount = np.concatenate([amount, burst_amount])
    all_category = cat_b(category)
    all_channel = cat_b(channel_idx)
    all_country = cat_b(country_idx)
    all_fraud = np.concatenate([fraud, np.ones(b, dtype=bool)])

    inside = np.flatnonzero(all_ts < start_us + span_us)
    keep = np.sort(rng.choice(inside, size=min(n, inside.size), replace=False))
    order = keep[np.argsort(all_ts[keep], kind="stable")]
    ts_o = all_ts[order]

    delay_us = (
        rng.lognormal(
            np.log(cfg.label_delay_median_hours * 3600), cfg.label_delay_sigma, order.size
        )
        * 1_000_000
    ).astype(np.int64)

    frame = pl.DataFrame(
        {
            "transaction_id": np.arange(order.size),
            "card_id": all_card[order],
            "merchant_id": all_merchant[order],
            "amount": all_amount[order].astype(np.float64),
            "category": all_category[order].astype(str),
            "channel_idx": all_channel[order].astype(np.int64),
            "country_idx": all_country[order].astype(np.int64),
            "ts": ts_o,
            "is_fraud": all_fraud[order].astype(np.int8),
            "label_ts": ts_o + delay_us,
        }
    )
    channel_map = dict(enumerate(CHANNELS))
    country_map = dict(enumerate(COUNTRIES))
    frame = frame.select(
        pl.concat_str(
            [pl.lit(f"{cfg.id_prefix}-{cfg.seed}-"), pl.col("transaction_id").cast(pl.String)]
        ).alias("transaction_id"),
        "card_id",
        "merchant_id",
        "amount",
        "category",
        pl.col("channel_idx").replace_strict(channel_map, return_dtype=pl.String).alias("channel"),
        pl.col("country_idx").replace_strict(country_map, return_dtype=pl.String).alias("country"),
        pl.from_epoch("ts", time_unit="us").dt.replace_time_zone("UTC").alias("event_timestamp"),
        "is_fraud",
        pl.from_epoch("label_ts", time_unit="us")
        .dt.replace_time_zone("UTC")
        .alias("label_available_at"),
    )
    if cfg.scenario == "data_break":
        broken = pl.col("event_timestamp") >= cfg.drift_at
        if cfg.break_kind == "unit":
            frame = frame.with_columns(
                pl.when(broken)
                .then(pl.col("amount") * 100)
                .otherwise(pl.col("amount"))
                .alias("amount")
            )
        else:
            frame = frame.with_columns(
                pl.when(broken).then(None).otherwise(pl.col("channel")).alias("channel")
            )
    validate_frame(frame, TRANSACTION_SCHEMA, allow_extra=False, name="simulated transactions")
    return frame


def is_home(country: str) -> bool:
    return country == HOME_COUNTRY


def write_history(
    frame: pl.DataFrame, location: str, *, mode: Literal["overwrite", "append"] = "overwrite"
) -> int:
    """Write transactions to a Delta table partitioned by ``date``; return the new table version."""
    from deltalake import DeltaTable

    if frame.is_empty():
        raise DataError("no transactions to write")
    validate_frame(frame, TRANSACTION_SCHEMA, name="transactions")
    out = frame.with_columns(pl.col("event_timestamp").dt.strftime("%Y-%m-%d").alias("date"))
    out.write_delta(location, mode=mode, delta_write_options={"partition_by": ["date"]})
    return int(DeltaTable(location).version())


def read_history(
    location: str, start: datetime | None = None, end: datetime | None = None
) -> pl.DataFrame:
    """Read transactions back from Delta (optionally a time window), pruning date partitions."""
    lf = pl.scan_delta(location)
    if start is not None:
        lf = lf.filter(
            (pl.col("date") >= start.strftime("%Y-%m-%d")) & (pl.col("event_timestamp") >= start)
        )
    if end is not None:
        lf = lf.filter(
            (pl.col("date") <= end.strftime("%Y-%m-%d")) & (pl.col("event_timestamp") < end)
        )
    return lf.drop("date").sort("event_timestamp").collect()
