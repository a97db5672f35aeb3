"""Champion training end to end: Delta history -> Feast features -> XGBoost -> BentoML store."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from driftloop.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    import os

    from driftloop import jobs, registry
    from driftloop.simulate import SimulationConfig

    root = tmp_path_factory.mktemp("train")
    settings = Settings(
        data_root=str(root / "data"),
        state_dir=root / "state",
        bentoml_home=root / "bentoml",
        feast_repo=Path(__file__).resolve().parents[2] / "feature_repo",
    )
    saved = {k: os.environ.get(k) for k in ("BENTOML_HOME", "DRIFTLOOP_DATA_ROOT")}
    settings.apply_environment()
    try:
        version = jobs.generate_history(settings, SimulationConfig(n_events=200_000, seed=2))
        history = jobs.load_history(settings)
        jobs.prepare_features(settings, history)
        tag, result = jobs.train_and_register(settings, history, stage="champion")
        yield settings, tag, result, version, registry.load_model(tag), history
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_stable_holdout_auc_is_at_least_0_90(trained) -> None:
    _, _, result, _, model, _ = trained
    assert result.metrics.roc_auc >= 0.90
    assert model.metadata["metrics"]["roc_auc"] == pytest.approx(result.metrics.roc_auc)
    assert 0.0 < model.threshold < 1.0
    assert result.metrics.positives >= 100


def test_metadata_lineage_and_reference_are_stored(trained) -> None:
    from driftloop.registry import lineage_of

    settings, tag, result, version, model, history = trained
    meta = model.metadata
    assert meta["feature_service"] == "fraud_v1"
    assert meta["features"] == list(model.encoder.features)
    lin = lineage_of(meta)
    assert lin.parent is None
    assert lin.data_version == version
    assert lin.code_version.startswith("0.1.0")
    assert lin.data_window_start <= lin.data_window_end
    ref = model.reference()
    assert 10_000 <= ref.height <= 50_000
    assert {"score", "label", "amount", "category", "card_txn_count_1h"} <= set(ref.columns)
    assert ref["score"].is_between(0, 1).all()
    assert model.profile_json() is not None
    assert tag.startswith("fraud:v") and not tag.endswith("latest")


def test_unseen_categories_and_missing_values_score_without_error(trained) -> None:
    from driftloop.modeling import predict

    _, _, _, _, model, _ = trained
    rows = [
        {"amount": 50.0, "category": "electronics", "channel": "hologram", "country": "XX"},
        {"amount": 50.0},
        {
            "amount": 5000.0,
            "category": None,
            "channel": None,
            "country": None,
            "card_txn_count_1h": None,
        },
    ]
    scores = predict(model.booster, model.encoder.encode_rows(rows))
    assert scores.shape == (3,)
    assert np.all((scores >= 0) & (scores <= 1))
    frame = pl.DataFrame(rows, infer_schema_length=None)
    for f in model.encoder.features:
        if f not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(f))
    X = model.encoder.encode_frame(frame)
    assert not math.isnan(predict(model.booster, X)[0])
    assert model.encoder.is_unseen("category", "electronics")


def test_no_leakage_training_rows_only_use_labels_that_had_arrived(trained) -> None:
    """Training with an as-of cut-off drops rows whose labels arrived after it."""
    from driftloop.training import label_arrived

    _, _, _, _, _, history = trained
    cutoff = (
        history["event_timestamp"].max()
        - (history["event_timestamp"].max() - history["event_timestamp"].min()) / 2
    )
    kept = label_arrived(history, cutoff)
    assert kept.height < history.height
    assert (kept["label_available_at"] <= cutoff).all()
