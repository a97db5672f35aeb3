"""Keep the prediction and label tables fast and bounded: ship, compact, checkpoint, vacuum.

Versions that registered models point to (their lineage's ``predictions_version`` /
``labels_version``) and any listed in the parameters stay readable.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from prefect import flow, task
from pydantic import BaseModel, ConfigDict, Field

from driftloop import maintenance, predlog
from driftloop.settings import Settings, get_settings

LogTable = Literal["predictions", "labels"]


class MaintainLogsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tables: list[LogTable] = Field(
        default=["predictions", "labels"], min_length=1, description="Log tables to maintain"
    )
    ship_spool: bool = Field(
        default=True, description="First ship what this machine's spool holds (recovery)"
    )
    compact_days: int | None = Field(
        default=2,
        ge=1,
        le=3660,
        description="Compact the partitions of the last N days; empty: all",
    )
    retention_hours: int = Field(
        default=168, ge=0, le=24 * 3660, description="Vacuum files removed longer ago than this"
    )
    protected_versions: dict[LogTable, list[int]] = Field(
        default_factory=dict, description="Delta versions per table that must stay readable"
    )
    protect_model_versions: bool = Field(
        default=True, description="Also protect the versions registered models point to"
    )


@task
def ship_spool(settings: Settings, tables: list[LogTable]) -> list[predlog.ShipResult]:
    return predlog.ship_all(settings, tables)


@task
def model_protected_versions(settings: Settings) -> dict[str, list[int]]:
    from driftloop.registry import list_models

    settings.apply_environment()  # BENTOML_HOME
    models = [m for m in list_models(settings.model_name) if m.stage != "rejected"]
    return maintenance.protected_versions_from_lineage(m.lineage for m in models)


@task(retries=2, retry_delay_seconds=10)
def compact(settings: Settings, table: str, days: int | None) -> maintenance.CompactResult:
    since = None if days is None else (datetime.now(UTC) - timedelta(days=days)).date()
    return maintenance.compact(settings, table, since=since)


@task(retries=2, retry_delay_seconds=10)
def checkpoint(
    settings: Settings, table: str, protected: list[int]
) -> maintenance.CheckpointResult:
    return maintenance.checkpoint(settings, table, protected_versions=protected)


@task(retries=2, retry_delay_seconds=10)
def vacuum(
    settings: Settings, table: str, retention_hours: int, protected: list[int]
) -> maintenance.VacuumResult:
    return maintenance.vacuum(
        settings, table, retention_hours=retention_hours, protected_versions=protected
    )


@flow(name="maintain-logs", log_prints=True)
def maintain_logs(params: MaintainLogsParams | None = None) -> list[maintenance.VacuumResult]:
    params = params or MaintainLogsParams()
    settings = get_settings()
    if params.ship_spool:
        ship_spool(settings, params.tables)
    from_models = model_protected_versions(settings) if params.protect_model_versions else {}
    results = []
    for table in params.tables:
        protected = sorted({*params.protected_versions.get(table, []), *from_models.get(table, [])})
        compact(settings, table, params.compact_days)
        checkpoint(settings, table, protected)
        results.append(vacuum(settings, table, params.retention_hours, protected))
    return results


if __name__ == "__main__":
    maintain_logs()
