"""One settings object for driftloop, read from ``DRIFTLOOP_*`` environment variables.

Read it at the edges (CLI, flow entry, service start) with :func:`get_settings`;
never at import time. Switching from the embedded default to scale-out is a
matter of these values, never of code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from driftloop.errors import ConfigError

_URI_SCHEMES = ("s3://", "s3a://", "gs://", "az://", "abfss://", "file://")


def is_uri(location: str) -> bool:
    """True when ``location`` is an object-store (or file://) URI rather than a plain path."""
    return location.startswith(_URI_SCHEMES)


def join(root: str, *parts: str) -> str:
    """Join path segments under a data root that is either a local path or a URI."""
    if is_uri(root):
        return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(root, *parts))


class Settings(BaseSettings):
    """All of driftloop's configuration. Environment prefix ``DRIFTLOOP_``."""

    model_config = SettingsConfigDict(env_prefix="DRIFTLOOP_", extra="forbid")

    # where state lives
    data_root: str = Field(
        default=".driftloop/data",
        description="Local path or object-store URI (s3://bucket/prefix) holding Delta tables.",
    )
    state_dir: Path = Field(
        default=Path(".driftloop/state"),
        description="Local directory for spools, monitor state and rollout desired state.",
    )
    model_name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")] = "fraud"
    prefect_api_url: str | None = Field(
        default=None, description="Prefect API URL, e.g. http://127.0.0.1:4200/api"
    )
    bentoml_home: Path | None = Field(default=None, description="BENTOML_HOME for model stores")
    feast_repo: Path = Field(default=Path("feature_repo"), description="The Feast repo folder")

    # serving
    host: str = "127.0.0.1"
    model_tag: str | None = Field(default=None, description="Explicit model tag to serve")
    arm: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")] = Field(
        default="champion", description="Name of the serving arm, recorded in every log record"
    )
    max_batch_rows: Annotated[int, Field(ge=1, le=100_000)] = 10_000
    online_cache: bool = Field(
        default=True,
        description=(
            "answer entities read since the Feast SQLite online store last changed from "
            "memory (any committed write drops the cache)"
        ),
    )
    feedback_token: SecretStr | None = Field(default=None, description="Token for POST /feedback")
    webhook_secret: SecretStr | None = Field(default=None, description="HMAC secret for webhooks")

    # prediction log
    spool_segment_rows: Annotated[int, Field(ge=1)] = 5_000
    spool_segment_seconds: Annotated[float, Field(gt=0)] = 2.0
    shipper_interval_seconds: Annotated[float, Field(gt=0)] = 5.0
    shipper_batch_segments: Annotated[int, Field(ge=1)] = 64
    spool_fsync: bool = Field(
        default=False,
        description=(
            "fsync every spool write (and the spool directory on each new or sealed "
            "segment): records then survive a machine crash, not only a process crash, "
            "at the cost of a disk flush per request"
        ),
    )

    # monitoring thresholds
    drift_psi_threshold: Annotated[float, Field(gt=0)] = 0.2
    drift_wasserstein_threshold: Annotated[float, Field(gt=0)] = 0.1
    drift_jsd_threshold: Annotated[float, Field(gt=0, le=1)] = 0.1
    drift_pvalue: Annotated[float, Field(gt=0, lt=1)] = 0.01
    drift_share_threshold: Annotated[float, Field(gt=0, le=1)] = 0.25
    drift_consecutive_windows: Annotated[int, Field(ge=1)] = 1
    performance_drop_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.10
    monitor_window_minutes: Annotated[int, Field(ge=1)] = 60
    pushgateway_url: str | None = Field(
        default=None, description="Prometheus Pushgateway the monitor pushes its gauges to"
    )

    # orchestration
    warm_worker: bool = Field(
        default=True,
        description="flow runs of driftloop's process worker fork from a warm engine "
        "(driftloop.warm_engine); off: Prefect's own flow-run command",
    )

    # retraining
    retrain_cooldown_minutes: Annotated[float, Field(ge=0)] = 30.0
    gate_margin: Annotated[float, Field(ge=0)] = 0.005
    gate_slice_tolerance: Annotated[float, Field(ge=0)] = 0.05

    # rollout
    rollout_steps: list[int] = Field(default_factory=lambda: [5, 25, 50, 100])
    rollout_bake_seconds: Annotated[float, Field(gt=0)] = 60.0
    rollout_min_samples: Annotated[int, Field(ge=1)] = 200

    # fault injection, for tests and drills only: all off by default. A model arm started
    # with these misbehaves on purpose (bentos/service.py), to exercise the rollback path.
    fault_error_rate: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0, description="TEST ONLY: share of scoring calls that fail with a 500"
    )
    fault_latency_ms: Annotated[float, Field(ge=0, le=60_000)] = Field(
        default=0.0, description="TEST ONLY: extra latency added to every scoring call"
    )
    fault_invert_scores: bool = Field(
        default=False, description="TEST ONLY: answer 1 - score (a model gone bad)"
    )

    @field_validator("data_root")
    @classmethod
    def _data_root_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("data_root must not be empty")
        return v

    @field_validator("rollout_steps")
    @classmethod
    def _steps_increase_to_100(cls, v: list[int]) -> list[int]:
        if not v or any(not 0 < s <= 100 for s in v) or v != sorted(set(v)) or v[-1] != 100:
            raise ValueError("rollout_steps must increase strictly within (0, 100] and end at 100")
        return v

    # -- derived locations ---------------------------------------------------------
    def table(self, name: str) -> str:
        """Location of the Delta table ``name`` under the data root."""
        return join(self.data_root, name)

    @property
    def local_data_root(self) -> Path:
        if is_uri(self.data_root):
            raise ConfigError(
                f"data_root {self.data_root!r} is a URI; this operation needs a local path"
            )
        return Path(self.data_root).resolve()

    @property
    def reports_dir(self) -> Path:
        return (self.state_dir / "reports").resolve()

    @property
    def spool_dir(self) -> Path:
        return (self.state_dir / "spool").resolve()

    def apply_environment(self) -> None:
        """Export what third-party tools read from the environment (BentoML, Feast)."""
        os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
        if self.bentoml_home is not None:
            os.environ["BENTOML_HOME"] = str(self.bentoml_home.resolve())
        if not is_uri(self.data_root):
            os.environ["DRIFTLOOP_DATA_ROOT"] = str(Path(self.data_root).resolve())


def get_settings(**overrides: object) -> Settings:
    """Read settings from the environment (plus explicit overrides) and validate them."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except Exception as exc:  # pydantic.ValidationError, surfaced as a ConfigError
        raise ConfigError(f"invalid driftloop settings: {exc}") from exc
