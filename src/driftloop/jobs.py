"""Composite jobs the CLI and the flows share: simulate history, build features, train a champion.

Each job is a plain function over :class:`~driftloop.settings.Settings`; the
Prefect flows wrap the same functions as tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import polars as pl
from deltalake import DeltaTable

from driftloop import features, registry, simulate
from driftloop.errors import DataError
from driftloop.settings import Settings
from driftloop.training import TrainConfig, TrainResult, build_training_frame, train_model

Progress = Callable[[str, float], None]

TRANSACTIONS = "transactions"


def generate_history(
    settings: Settings, config: simulate.SimulationConfig, *, mode: str = "overwrite"
) -> int:
    """Simulate transactions into the Delta table ``transactions``; return its version."""
    frame = simulate.simulate(config)
    return simulate.write_history(frame, settings.table(TRANSACTIONS), mode=mode)  # type: ignore[arg-type]


def load_history(
    settings: Settings, start: datetime | None = None, end: datetime | None = None
) -> pl.DataFrame:
    """Read the transaction history (a time window of it) from Delta."""
    location = settings.table(TRANSACTIONS)
    try:
        DeltaTable(location)
    except Exception as exc:  # TableNotFoundError and friends
        raise DataError(
            f"no transaction history at {location}: run `driftloop simulate` first"
        ) from exc
    return simulate.read_history(location, start, end)


def table_version(location: str) -> int | None:
    """The current version of a Delta table, or None when it does not exist."""
    try:
        return int(DeltaTable(location).version())
    except Exception:
        return None


def prepare_features(
    settings: Settings, transactions: pl.DataFrame, *, materialize: bool = True
) -> None:
    """Compute card and merchant aggregates, write the offline source, apply, materialise."""
    card = features.compute_card_features(transactions)
    merchant = features.compute_merchant_features(transactions)
    features.write_offline(settings, card, merchant)
    features.apply_repo(settings)
    if materialize:
        end = transactions["event_timestamp"].max()
        features.materialize(settings, end=end if isinstance(end, datetime) else None)


def train_and_register(
    settings: Settings,
    transactions: pl.DataFrame,
    config: TrainConfig | None = None,
    *,
    as_of: datetime | None = None,
    parent_tag: str | None = None,
    warm_start: bool = False,
    lineage: registry.Lineage | None = None,
    progress: Progress | None = None,
    stage: str = "candidate",
) -> tuple[str, TrainResult]:
    """Train on labelled transactions with Feast point-in-time features; save to the registry."""
    if progress:
        progress("features", 0.0)
    frame = build_training_frame(settings, transactions, as_of=as_of)
    if progress:
        progress("features", 1.0)
    parent_booster = None
    if warm_start and parent_tag is not None:
        parent_booster = registry.load_model(parent_tag).booster
    result = train_model(frame, config, parent_booster=parent_booster, progress=progress)
    lin = (lineage or registry.Lineage()).model_copy(
        update={
            "parent": parent_tag,
            "data_window_start": result.window_start.isoformat(),
            "data_window_end": result.window_end.isoformat(),
            "data_version": table_version(settings.table(TRANSACTIONS)),
            "mode": "warm_start" if parent_booster is not None else "full",
        }
    )
    profile = _reference_profile(result.reference)
    tag = registry.save_model(
        settings.model_name,
        booster=result.booster,
        encoder=result.encoder,
        threshold=result.threshold,
        metrics=result.metrics.model_dump(exclude={"n", "positives", "threshold"}),
        reference=result.reference,
        lineage=lin,
        profile=profile,
        extra_metadata={
            "holdout_rows": result.metrics.n,
            "holdout_positives": result.metrics.positives,
            "train_rows": result.n_rows,
            "best_iteration": result.best_iteration,
            "train_seconds": round(result.seconds, 3),
        },
        stage=stage,
    )
    return tag, result


def _reference_profile(reference: pl.DataFrame) -> dict | None:
    """Precomputed drift statistics of the reference (None until the drift module exists)."""
    try:
        from driftloop import drift
    except ImportError:
        return None
    build = getattr(drift, "build_profile", None)
    if build is None:
        return None
    return build(reference).model_dump(mode="json")
