"""Canary a registered challenger behind the router; promote it or roll it back by itself.

Triggered by ``driftloop.model.registered`` (``prefect.yaml``). The decisions are
:mod:`driftloop.rollout`'s (a pure state machine); measuring and acting are
:class:`driftloop.canary.RolloutRunner`'s (router counters, labels, serving plane,
ledger, events). The flow paces them: deploy the canary and start, then one
analysis task every ``analysis_interval_seconds`` until the rollout is over.
Waiting between analyses *is* the canary; the record's deadline bounds the loop.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from driftloop.canary import RolloutOptions, RolloutRecord, RolloutRunner
from driftloop.plane.local import LocalPlane
from driftloop.settings import Settings, get_settings


class RolloutOutcome(BaseModel):
    model_name: str
    challenger: str
    phase: str
    champion: str
    reason: str
    incident_id: str | None
    transitions: int


@task(name="start-canary", cache_policy=NO_CACHE)
def start_canary(
    runner: RolloutRunner,
    model_tag: str,
    bento_tag: str,
    incident_id: str | None,
    options: RolloutOptions,
) -> RolloutRecord:
    return runner.begin(
        model_tag,
        bento_tag,
        incident_id=incident_id,
        policy=options.resolve_policy(runner.settings),
        analysis_interval_seconds=options.analysis_interval_seconds,
        canary_env=options.canary_env,
        warmup_timeout_seconds=options.warmup_timeout_seconds,
    )


@task(name="analyse-and-advance", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def analyse_and_advance(runner: RolloutRunner) -> RolloutRecord | None:
    record = runner.tick()
    if record is not None:
        verdict = (record.last_analysis or {}).get("reason", "no analysis")
        get_run_logger().info(
            "%s, weights %s: %s", record.state.phase.value, record.state.weights, verdict
        )
    return record


def _api_url(settings: Settings) -> str | None:
    from prefect.settings import PREFECT_API_URL

    return settings.prefect_api_url or PREFECT_API_URL.value()


@flow(name="rollout")
def rollout(
    model_tag: str,
    bento_tag: str,
    incident_id: str | None = None,
    options: RolloutOptions | None = None,
) -> RolloutOutcome:
    options = options or RolloutOptions()
    settings = get_settings()
    settings.apply_environment()
    plane = LocalPlane(settings, ready_timeout=options.arm_ready_timeout_seconds)
    runner = RolloutRunner(settings, plane, api_url=_api_url(settings))
    try:
        record = start_canary(runner, model_tag, bento_tag, incident_id, options)
        while not record.state.terminal and record.challenger.bento_tag == bento_tag:
            time.sleep(options.analysis_interval_seconds)
            latest = analyse_and_advance(runner)
            if latest is None:  # the record was removed by hand
                break
            record = latest
    except Exception as exc:  # nobody would watch the canary any more: fail closed
        runner.fail_safe(f"the rollout flow failed: {type(exc).__name__}: {exc}")
        raise
    last = record.state.history[-1] if record.state.history else None
    return RolloutOutcome(
        model_name=record.state.model_name,
        challenger=record.challenger.bento_tag,
        phase=record.state.phase.value,
        champion=record.state.champion.bento_tag,
        reason=last.reason if last else "",
        incident_id=record.state.incident_id,
        transitions=len(record.state.history),
    )


if __name__ == "__main__":
    import sys

    rollout(sys.argv[1], sys.argv[2])
