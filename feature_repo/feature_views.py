"""Feature views. Feature names match driftloop.schema CARD_FEATURES / MERCHANT_FEATURES."""

from datetime import timedelta

from data_sources import card_velocity_push, merchant_risk_source
from entities import card, merchant
from feast import FeatureView, Field
from feast.types import Float64, Int64

# The state after each transaction of a card. ttl bounds how far back a training join
# looks; Feast does not enforce it on online reads (feature age is measured by driftloop).
card_velocity = FeatureView(
    name="card_velocity",
    entities=[card],
    ttl=timedelta(days=2),
    schema=[
        Field(name="card_txn_count_1h", dtype=Int64),
        Field(name="card_txn_count_24h", dtype=Int64),
        Field(name="card_amount_mean_1h", dtype=Float64),
        Field(name="card_amount_mean_24h", dtype=Float64),
        Field(name="card_last_txn_ts", dtype=Float64, description="unix seconds"),
    ],
    online=True,
    source=card_velocity_push,
    tags={"owner": "driftloop", "cadence": "per-transaction"},
)

# One row per merchant and day, timestamped at the day start D 00:00 UTC.
merchant_risk = FeatureView(
    name="merchant_risk",
    entities=[merchant],
    ttl=timedelta(days=2),
    schema=[
        Field(name="merchant_txn_count_24h", dtype=Int64),
        Field(name="merchant_amount_mean_24h", dtype=Float64),
        Field(name="merchant_fraud_rate_30d", dtype=Float64),
    ],
    online=True,
    source=merchant_risk_source,
    tags={"owner": "driftloop", "cadence": "daily"},
)
