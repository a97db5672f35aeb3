"""Load the offline feature rows into Feast's online store (apply the repo first if needed).

The feature files themselves are written by whoever computes them
(``driftloop.features.write_offline``); this flow only moves them online.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from prefect import flow, task
from pydantic import BaseModel, ConfigDict, Field

from driftloop import features
from driftloop.settings import Settings, get_settings


class MaterializeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    end: datetime | None = Field(
        default=None, description="Load rows up to this time (UTC); empty: now"
    )
    start: datetime | None = Field(
        default=None,
        description="Start of a full load, or of a view's first load; empty: end minus the ttl",
    )
    full: bool = Field(
        default=False,
        description="Reload [start, end) for every view instead of continuing incrementally",
    )
    apply: Literal["if_needed", "always", "never"] = Field(
        default="if_needed",
        description="Run feast apply first: when the registry is missing or older than the repo",
    )
    views: list[Literal["card_velocity", "merchant_risk"]] = Field(
        default=["card_velocity", "merchant_risk"], min_length=1, description="Views to load"
    )


@task(retries=1, retry_delay_seconds=5)
def apply_feature_repo(settings: Settings, when: str) -> bool:
    if when == "never" or (when == "if_needed" and features.is_applied(settings)):
        return False
    features.apply_repo(settings)
    return True


@task(retries=2, retry_delay_seconds=10)
def materialize_views(settings: Settings, params: MaterializeParams) -> features.MaterializeResult:
    return features.materialize(
        settings, end=params.end, start=params.start, full=params.full, views=params.views
    )


@flow(name="materialize", log_prints=True)
def materialize(params: MaterializeParams | None = None) -> features.MaterializeResult:
    params = params or MaterializeParams()
    settings = get_settings()
    apply_feature_repo(settings, params.apply)
    result = materialize_views(settings, params)
    for view in result.views:
        print(f"{view.view}: {view.start:%Y-%m-%d %H:%M} -> {view.end:%Y-%m-%d %H:%M} UTC")
    return result


if __name__ == "__main__":
    materialize()
