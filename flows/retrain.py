"""Retrain on drift or degraded performance: hygiene, challenger, gate, Bento, announcement.

Started by the automations of ``prefect.yaml`` (``driftloop.drift.detected``,
``driftloop.performance.degraded``) or its weekly schedule. The steps live in
:mod:`driftloop.retraining`; this file only orders them and reports.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prefect import Flow, State, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.runtime import flow_run

from driftloop import hygiene, retraining
from driftloop.errors import ConfigError
from driftloop.retraining import RetrainOutcome, RetrainParams, TrainingWindow
from driftloop.settings import Settings, get_settings

if TYPE_CHECKING:  # imported by the steps that need them: the run starts sooner
    from driftloop.gate import GateVerdict
    from driftloop.training import TrainResult


def _key(kind: str, model_name: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"retrain-{kind}-{model_name}".lower())


@task(cache_policy=NO_CACHE)
def check_hygiene(settings: Settings, params: RetrainParams, api_url: str) -> hygiene.Decision:
    return retraining.check_hygiene(settings, params, api_url=api_url, flow_run_id=flow_run.id)


def _retry_io_errors(task: object, run: object, state: State) -> bool:
    """Retry a failed read, but not a window that simply has too few labels yet."""
    return not isinstance(state.result(raise_on_failure=False), retraining.InsufficientData)


@task(
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_io_errors,
)
def load_window(settings: Settings, params: RetrainParams) -> TrainingWindow:
    return retraining.load_training_window(settings, params)


@task(cache_policy=NO_CACHE)
def train_challenger(
    settings: Settings, params: RetrainParams, window: TrainingWindow, champion: str | None
) -> tuple[str, TrainResult]:
    return retraining.train_challenger(settings, params, window, champion, flow_run_id=flow_run.id)


@task(cache_policy=NO_CACHE)
def gate(
    settings: Settings,
    params: RetrainParams,
    window: TrainingWindow,
    challenger: str,
    champion: str | None,
    holdout_rows: int,
) -> GateVerdict:
    frame = retraining.gate_window(settings, window, holdout_rows, engine=params.feature_engine)
    return retraining.run_gate(settings, challenger, champion, frame)


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def register(
    settings: Settings,
    params: RetrainParams,
    verdict: GateVerdict,
    result: TrainResult,
    api_url: str,
) -> RetrainOutcome:
    return retraining.register(
        settings, params, verdict, api_url=api_url, result=result, flow_run_id=flow_run.id
    )


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def reject(
    settings: Settings, params: RetrainParams, verdict: GateVerdict, api_url: str
) -> RetrainOutcome:
    return retraining.reject(settings, params, verdict, api_url=api_url, flow_run_id=flow_run.id)


def skip(params: RetrainParams, decision: hygiene.Decision, api_url: str) -> RetrainOutcome:
    """Say why nothing was trained: Prefect log, markdown artifact, retrain.skipped event."""
    model = params.model_name or ""
    get_run_logger().warning(
        "retrain of %s skipped (%s): %s", model, decision.code, decision.reason
    )
    md = hygiene.skip_markdown(model, params.incident_id, decision, reason=params.reason)
    create_markdown_artifact(md, key=_key("skipped", model), description=decision.reason)
    return retraining.announce_skip(params, decision, api_url=api_url, flow_run_id=flow_run.id)


def _release_claim(flow: Flow, run: FlowRun, state: State) -> None:
    """on_crashed / on_cancellation: a run killed mid-way must not block its model."""
    retraining.release_crashed_run(get_settings(), run.parameters or {}, str(run.id))


@flow(
    name="retrain", log_prints=True, on_crashed=[_release_claim], on_cancellation=[_release_claim]
)
def retrain(params: RetrainParams | None = None) -> RetrainOutcome:
    settings = get_settings()
    settings.apply_environment()
    api_url = retraining.api_url_from(settings)
    if not api_url:
        raise ConfigError("retrain needs a Prefect API URL (PREFECT_API_URL) to emit its events")
    params = retraining.resolve_params(params or RetrainParams(), settings, datetime.now(UTC))
    model = params.model_name or settings.model_name
    decision = check_hygiene(settings, params, api_url)
    if not decision.proceed:
        return skip(params, decision, api_url)
    try:
        try:
            window = load_window(settings, params)
        except retraining.InsufficientData as exc:
            retraining.mark_failed(settings, params, exc)  # may run again once labels arrive
            return skip(params, retraining.insufficient(settings, params, exc), api_url)
        print(f"training window: {window.labelled_rows:,} labelled rows since {window.start:%F}")
        champion = retraining.champion_tag(model)
        challenger, result = train_challenger(settings, params, window, champion)
        verdict = gate(settings, params, window, challenger, champion, result.metrics.n)
        create_table_artifact(verdict.table(), key=_key("gate", model), description=verdict.reason)
        print(f"gate for {verdict.challenger_tag}: {verdict.reason}")
        if verdict.passed:
            return register(settings, params, verdict, result, api_url)
        return reject(settings, params, verdict, api_url)
    except BaseException as exc:
        retraining.mark_failed(settings, params, exc)
        raise


if __name__ == "__main__":
    retrain()
