"""The model registry: BentoML's model store plus driftloop's lineage metadata.

A saved model directory holds ``model.ubj`` (the XGBoost booster),
``encoder.json``, ``reference.parquet`` (the drift reference sample, with scores
and labels) and, when available, ``profile.json`` (precomputed reference
statistics). BentoML ``labels`` carry the stage and model family; ``metadata``
carries metrics, threshold, features and lineage.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from driftloop import __version__
from driftloop.errors import ModelError
from driftloop.modeling import FeatureEncoder, make_booster_single_threaded

if TYPE_CHECKING:  # xgboost (and the scikit-learn it imports) loads with a model
    import xgboost as xgb

FEATURE_SERVICE = "fraud_v1"


class Lineage(BaseModel):
    """Where a model came from."""

    model_config = ConfigDict(extra="allow")

    parent: str | None = None
    incident_id: str | None = None
    trigger_event: str | None = None
    data_window_start: str | None = None
    data_window_end: str | None = None
    data_version: int | None = Field(None, description="Delta version of the training data")
    predictions_version: int | None = None
    labels_version: int | None = None
    code_version: str = __version__
    gate: dict[str, Any] | None = None
    mode: str = "full"


class ModelInfo(BaseModel):
    """A registered model version as listed by ``driftloop models``."""

    tag: str
    name: str
    version: str
    created: str
    stage: str
    metrics: dict[str, float]
    threshold: float
    lineage: Lineage


class LoadedModel(BaseModel):
    """A model ready to score."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    tag: str
    booster: Any
    encoder: FeatureEncoder
    threshold: float
    metadata: dict[str, Any]
    path: Path

    @property
    def version(self) -> str:
        return self.tag.split(":", 1)[1]

    def reference(self) -> pl.DataFrame:
        return pl.read_parquet(self.path / "reference.parquet")

    def profile_json(self) -> dict[str, Any] | None:
        p = self.path / "profile.json"
        return json.loads(p.read_text()) if p.exists() else None


def code_version() -> str:
    """The git commit of the code, when run from a checkout; the package version otherwise."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def new_version() -> str:
    """An explicit, sortable version: UTC time plus a random suffix."""
    return f"v{datetime.now(UTC):%Y%m%d%H%M%S}{secrets.token_hex(2)}"


def save_model(
    name: str,
    *,
    booster: xgb.Booster,
    encoder: FeatureEncoder,
    threshold: float,
    metrics: dict[str, float],
    reference: pl.DataFrame,
    lineage: Lineage,
    profile: dict[str, Any] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    stage: str = "candidate",
) -> str:
    """Save a model version to the BentoML store; return its tag ``name:version``."""
    import bentoml

    version = new_version()
    lineage = lineage.model_copy(update={"code_version": code_version()})
    metadata: dict[str, Any] = {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "threshold": float(threshold),
        "feature_service": FEATURE_SERVICE,
        "features": list(encoder.features),
        # BentoML metadata refuses None values: lineage is kept as one JSON string
        "lineage": lineage.model_dump_json(),
        "reference_rows": reference.height,
        "created": datetime.now(UTC).isoformat(),
        **{k: v for k, v in (extra_metadata or {}).items() if v is not None},
    }
    labels = {"family": "driftloop", "stage": stage, "parent": lineage.parent or "none"}
    with bentoml.models.create(
        f"{name}:{version}", labels=labels, metadata=metadata, module="driftloop.registry"
    ) as model:
        path = Path(model.path)
        booster.save_model(str(path / "model.ubj"))
        (path / "encoder.json").write_text(encoder.model_dump_json())
        reference.write_parquet(path / "reference.parquet")
        if profile is not None:
            (path / "profile.json").write_text(json.dumps(profile))
        tag = str(model.tag)
    return tag


def load_model(tag: str) -> LoadedModel:
    """Load a model by explicit tag (``name:version``); ``latest`` is refused."""
    import bentoml

    if ":" not in tag or tag.endswith(":latest"):
        raise ModelError(f"model tag {tag!r} must name an explicit version (name:version)")
    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as exc:
        raise ModelError(f"model {tag!r} is not in the BentoML store") from exc
    import xgboost as xgb

    path = Path(model.path)
    booster = xgb.Booster()
    booster.load_model(str(path / "model.ubj"))
    make_booster_single_threaded(booster)
    encoder = FeatureEncoder.model_validate_json((path / "encoder.json").read_text())
    meta = dict(model.info.metadata)
    return LoadedModel(
        tag=str(model.tag),
        booster=booster,
        encoder=encoder,
        threshold=float(cast(Any, meta["threshold"])),
        metadata=meta,
        path=path,
    )


def lineage_of(metadata: dict[str, Any]) -> Lineage:
    """The lineage stored in a model's metadata."""
    raw = metadata.get("lineage")
    if isinstance(raw, str):
        return Lineage.model_validate_json(raw)
    return Lineage.model_validate(raw or {})


def list_models(name: str) -> list[ModelInfo]:
    """Every stored version of ``name``, oldest first."""
    import bentoml

    out = []
    try:
        stored = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return []
    for m in stored:
        meta = dict(m.info.metadata)
        if "lineage" not in meta:
            continue
        out.append(
            ModelInfo(
                tag=str(m.tag),
                name=m.tag.name,
                version=str(m.tag.version),
                created=str(meta.get("created", m.info.creation_time)),
                stage=str(m.info.labels.get("stage", "candidate")),
                metrics=cast(dict[str, float], meta.get("metrics", {})),
                threshold=float(cast(Any, meta.get("threshold", 0.5))),
                lineage=lineage_of(meta),
            )
        )
    return sorted(out, key=lambda i: i.created)


def set_stage(tag: str, stage: str) -> None:
    """Record a model's stage (candidate, champion, retired, rejected) in its labels."""
    import bentoml

    model = bentoml.models.get(tag)
    info = model.info
    labels = dict(info.labels)
    labels["stage"] = stage
    # ModelInfo is frozen in BentoML; rewrite model.yaml through its own API.
    object.__setattr__(info, "labels", labels)
    model.flush()


def update_lineage(tag: str, **fields: Any) -> Lineage:
    """Add or change lineage fields of a saved model (e.g. its gate verdict); return it."""
    import bentoml

    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as exc:
        raise ModelError(f"model {tag!r} is not in the BentoML store") from exc
    info = model.info
    metadata = dict(info.metadata)
    lineage = lineage_of(metadata).model_copy(update=fields)
    metadata["lineage"] = lineage.model_dump_json()
    object.__setattr__(info, "metadata", metadata)
    model.flush()
    return lineage


def champion_tag(name: str) -> str | None:
    """The newest version of ``name`` whose stage is ``champion``, or None."""
    champions = [m for m in list_models(name) if m.stage == "champion"]
    return champions[-1].tag if champions else None
