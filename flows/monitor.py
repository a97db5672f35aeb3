"""Judge the latest window of the prediction log against the serving champion.

Reads the window from Delta, judges data quality, drift and labelled performance
(the rules live in ``driftloop.monitoring``), saves the incident state, publishes
an Evidently report, Prefect artifacts and Prometheus gauges, and emits
``driftloop.monitor.completed`` plus ``drift.detected`` / ``performance.degraded`` /
``data_quality.failed`` when their rule fires (confirmed delivery).
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import TypeVar, cast

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from driftloop import monitoring
from driftloop.errors import ConfigError
from driftloop.evidently_report import EvidentlyResult
from driftloop.monitoring import ChampionReference, MonitorParams, MonitorResult, Window
from driftloop.settings import Settings, get_settings

T = TypeVar("T")


@task(retries=2, retry_delay_seconds=5)
def load_reference(params: MonitorParams) -> ChampionReference:
    return monitoring.load_champion(params.name, params.model_tag)


@task(retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def load_window(settings: Settings, params: MonitorParams, now: datetime, version: str) -> Window:
    return monitoring.load_window(settings, params, now, model_version=version)


@task(cache_policy=NO_CACHE)
def judge(
    champion: ChampionReference, window: Window, params: MonitorParams, settings: Settings
) -> MonitorResult:
    result = monitoring.judge(
        champion.profile,
        champion.baseline,
        champion.threshold,
        window.frame,
        params,
        monitoring.load_state(settings.state_dir, params.name),
        window=window.info,
        model_tag=champion.tag,
        labelled_frame=window.labelled,
        run_id=str(flow_run.id or "") or None,
    )
    monitoring.save_state(settings.state_dir, result.state)
    return result


@task(cache_policy=NO_CACHE)
def write_report(
    champion: ChampionReference, window: Window, params: MonitorParams, settings: Settings
) -> EvidentlyResult | None:
    if champion.reference_path is None:
        return None
    try:
        return monitoring.write_report(
            params.name,
            window.info,
            champion.profile,
            pl.read_parquet(champion.reference_path),
            window.frame,
            settings.reports_dir,
            sample_rows=params.report_sample_rows,
        )
    except Exception as exc:  # the report is for people: never lose the verdict over it
        get_run_logger().warning("Evidently report failed: %s: %s", type(exc).__name__, exc)
        return None


@task(cache_policy=NO_CACHE)
def publish(result: MonitorResult, params: MonitorParams, settings: Settings) -> MonitorResult:
    key = functools.partial(monitoring.artifact_key, result.model_name)
    if result.report_path:
        create_link_artifact(
            link=f"file://{result.report_path}",
            link_text=f"Evidently report, window ending {result.window.end:%Y-%m-%d %H:%M}",
            key=key("report"),
            description="Evidently data-drift report of the window (bounded sample)",
        )
    create_markdown_artifact(result.markdown(), key=key("verdict"), description="Verdict")
    create_table_artifact(
        result.feature_table(), key=key("features"), description="Per-feature drift scores"
    )
    monitoring.publish_metrics(result, settings.state_dir, pushgateway_url=params.pushgateway_url)
    return result


@task(retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE)
def emit(api_url: str, result: MonitorResult) -> list[str]:
    return monitoring.emit_events(api_url, result)


def _as_is(value: T) -> T:
    """Pass a large input to a task as it is: Prefect does not walk it (seconds saved)."""
    return cast(T, quote(value))


def _api_url(settings: Settings) -> str:
    from prefect.settings import get_current_settings

    url = settings.prefect_api_url or get_current_settings().api.url
    if not url:
        raise ConfigError("the monitor needs PREFECT_API_URL to deliver its events")
    return str(url)


@flow(name="monitor", log_prints=True)
def monitor(params: MonitorParams | None = None) -> MonitorResult:
    settings = get_settings()
    params = (params or MonitorParams()).resolve(settings)
    champion = load_reference(params)
    window = load_window(settings, params, datetime.now(UTC), champion.version)
    champ, win = _as_is(champion), _as_is(window)  # not walked by Prefect
    result = judge(champ, win, params, settings)
    report = None
    if monitoring.should_report(result, params.report):
        report = write_report(champ, win, params, settings)
    result = result.with_report(report)
    result = publish(_as_is(result), params, settings)
    if params.emit:
        emit(_api_url(settings), _as_is(result))
    print(
        f"{result.model_name}: {result.verdict} on {result.window.rows} rows; "
        f"incident {result.incident_id}; {'; '.join(result.reasons) or 'no alert'}"
    )
    return result


if __name__ == "__main__":
    monitor()
