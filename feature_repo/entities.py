"""Entities of the fraud example: the card and the merchant of a transaction."""

from feast import Entity, ValueType

card = Entity(
    name="card",
    join_keys=["card_id"],
    value_type=ValueType.INT64,
    description="A payment card (simulated transactions: card_id Int64).",
)

merchant = Entity(
    name="merchant",
    join_keys=["merchant_id"],
    value_type=ValueType.INT64,
    description="A merchant (simulated transactions: merchant_id Int64).",
)
