"""Build the model Bento for one explicit model tag from ``bentofile.yaml``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from driftloop.errors import ModelError, ServingError

#: the label under which a Bento records the model version it serves
MODEL_TAG_LABEL = "model_tag"


def project_root() -> Path:
    """The checkout holding ``bentofile.yaml`` (this file is at src/driftloop/bento.py)."""
    return Path(__file__).resolve().parents[2]


def build_model_bento(model_tag: str, *, root: Path | None = None) -> str:
    """Build a Bento pinning ``model_tag`` (``name:version``); return the Bento tag.

    The Bento's version is the model's version, so ``driftloop-fraud:<version>``
    serves exactly ``<name>:<version>``.
    """
    import bentoml

    if ":" not in model_tag or model_tag.endswith(":latest"):
        raise ModelError(f"model tag {model_tag!r} must name an explicit version")
    try:
        bentoml.models.get(model_tag)
    except bentoml.exceptions.NotFound as exc:
        raise ModelError(f"model {model_tag!r} is not in the BentoML store") from exc
    root = (root or project_root()).resolve()
    spec = yaml.safe_load((root / "bentofile.yaml").read_text())
    spec["models"] = [model_tag]
    spec.setdefault("labels", {})[MODEL_TAG_LABEL] = model_tag
    with tempfile.TemporaryDirectory() as tmp:
        bentofile = Path(tmp, "bentofile.yaml")
        bentofile.write_text(yaml.safe_dump(spec))
        try:
            bento = bentoml.bentos.build_bentofile(
                str(bentofile),
                build_ctx=str(root),
                version=model_tag.split(":", 1)[1],
            )
        except Exception as exc:  # BentoML raises several types here
            raise ServingError(f"bentoml build failed for {model_tag}: {exc}") from exc
    return str(bento.tag)


def model_tag_of_bento(bento_tag: str) -> str:
    """The model tag a Bento was built for."""
    import bentoml

    bento = bentoml.get(bento_tag)
    tag = bento.info.labels.get(MODEL_TAG_LABEL)
    if not tag:
        raise ServingError(f"Bento {bento_tag} has no {MODEL_TAG_LABEL} label")
    return str(tag)


def model_tag_from_bento_dir(start: Path) -> str | None:
    """When running inside a built Bento, the pinned model tag from its ``bento.yaml``."""
    for parent in [start, *start.parents][:5]:
        manifest = parent / "bento.yaml"
        if manifest.exists():
            info = yaml.safe_load(manifest.read_text()) or {}
            tag = (info.get("labels") or {}).get(MODEL_TAG_LABEL)
            return str(tag) if tag else None
    return None
