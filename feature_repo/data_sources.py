"""Batch and push sources. The parquet lives under ``$DRIFTLOOP_DATA_ROOT/features/``.

``driftloop.features.write_offline`` writes these folders; each is a directory of
parquet part files (Feast's file offline store reads the whole directory).
"""

import os

from feast import FileSource, PushSource
from feast.data_format import ParquetFormat

_root = os.environ.get("DRIFTLOOP_DATA_ROOT", "").strip()
if not _root:
    raise RuntimeError(
        "DRIFTLOOP_DATA_ROOT is not set. Export it to driftloop's local data root before "
        "running feast, e.g. `export DRIFTLOOP_DATA_ROOT=$PWD/.driftloop/data`."
    )
_root = os.path.abspath(_root)
_features = os.path.join(_root, "features")
# Feast's file registry creates registry.db but not its parent folder: make it here so that
# a plain `feast apply` works on a fresh data root.
os.makedirs(os.path.join(_root, "feast"), exist_ok=True)

card_velocity_source = FileSource(
    name="card_velocity_source",
    path=os.path.join(_features, "card_velocity"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    description="Card state after each transaction (driftloop.features.compute_card_features).",
)

# Streaming updates: serving pushes the state after a transaction straight online.
card_velocity_push = PushSource(
    name="card_velocity_push",
    batch_source=card_velocity_source,
    description="Online pushes of card_velocity rows (driftloop.features.push_card_features).",
)

merchant_risk_source = FileSource(
    name="merchant_risk_source",
    path=os.path.join(_features, "merchant_risk"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    description="Daily merchant aggregates at day start, labels known before that day only.",
)
