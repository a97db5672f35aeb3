"""The retrain job: its parameters and the steps ``flows/retrain.py`` composes.

Each step is a plain function (no Prefect here), in the order the flow runs them:

1. :func:`resolve_params` and :func:`check_hygiene`: dedupe, cool-down, data quality
   (:mod:`driftloop.hygiene`);
2. :func:`load_training_window`: the transaction history of the last
   ``window_days`` plus the labelled predictions that have arrived, labels as of
   ``as_of``;
3. :func:`train_challenger`: Feast point-in-time features, a full retrain or a
   warm start from the champion's booster, saved as a ``candidate`` with its
   lineage (incident, trigger event, data window, Delta versions, parent);
4. :func:`gate_window` and :func:`run_gate`: the challenger's holdout, i.e. the
   most recent labelled rows, which neither model trained on when the champion
   is older, scored by both (:mod:`driftloop.gate`);
5. :func:`register` (Bento built, lineage gets the verdict, ``driftloop.model.registered``)
   or :func:`reject` (stage ``rejected``, ``driftloop.model.rejected``); a skipped
   request ends in :func:`announce_skip` (``driftloop.retrain.skipped``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from driftloop import events, hygiene
from driftloop.errors import ConfigError, DataError
from driftloop.settings import Settings

if TYPE_CHECKING:
    import polars as pl

    from driftloop.gate import GateConfig, GateVerdict, ModelScorer
    from driftloop.training import TrainConfig, TrainResult

# The heavy modules (polars, xgboost, scikit-learn, Delta, Feast, BentoML) are imported
# inside the steps that need them: the flow reaches RUNNING, and hygiene can skip a
# request, before paying seconds of imports.

__all__ = [
    "InsufficientData",
    "RetrainOutcome",
    "RetrainParams",
    "TrainingWindow",
    "announce_skip",
    "champion_tag",
    "check_hygiene",
    "gate_window",
    "insufficient",
    "load_training_window",
    "mark_failed",
    "release_crashed_run",
    "register",
    "reject",
    "resolve_params",
    "run_gate",
    "train_challenger",
]

_MODEL_NAME = r"^[a-z][a-z0-9_-]{0,62}$"


class RetrainParams(BaseModel):
    """Parameters of the retrain flow (the trigger in ``prefect.yaml`` fills the first four)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str | None = Field(
        default=None,
        pattern=_MODEL_NAME,
        description="Model to retrain; empty: DRIFTLOOP_MODEL_NAME",
    )
    incident_id: str | None = Field(
        default=None,
        max_length=200,
        description="Incident this retrain answers; empty (schedule, manual): a new one",
    )
    reason: str = Field(
        default="manual",
        min_length=1,
        max_length=200,
        description="What asked for it: the triggering event's name, 'schedule' or 'manual'",
    )
    trigger_event_id: str | None = Field(
        default=None, max_length=200, description="Id of the triggering Prefect event"
    )
    mode: Literal["full", "warm_start"] = Field(
        default="full",
        description="full: train from scratch; warm_start: continue the champion's booster",
    )
    window_days: float = Field(
        default=14.0, gt=0, le=3650, description="Train on the last N days of labelled data"
    )
    as_of: datetime | None = Field(
        default=None, description="Use labels that had arrived by this time (UTC); empty: now"
    )
    feature_engine: Literal["polars", "feast"] = Field(
        default="polars",
        description="Point-in-time join: polars over the Feast sources (fast) or Feast itself",
    )
    n_estimators: int = Field(default=400, ge=1, le=5000, description="Boosting rounds (full)")
    include_predictions: bool = Field(
        default=True, description="Add labelled predictions from the prediction log"
    )
    min_labelled_rows: int = Field(
        default=1_000, ge=10, description="Fewer labelled rows in the window: skip, retry later"
    )
    min_positives: int = Field(
        default=30, ge=1, description="Fewer labelled frauds in the window: skip, retry later"
    )


class InsufficientData(DataError):
    """The training window has too few labels (yet): the retrain is skipped, not failed."""


class TrainingWindow(BaseModel):
    """The labelled data of one retrain and where it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    transactions: Any = Field(repr=False, description="pl.DataFrame with TRANSACTION_SCHEMA")
    start: datetime
    as_of: datetime
    history_rows: int
    prediction_rows: int
    labelled_rows: int
    data_version: int | None
    predictions_version: int | None
    labels_version: int | None


class RetrainOutcome(BaseModel):
    """What a retrain run did; the flow's return value."""

    status: Literal["skipped", "registered", "rejected"]
    model_name: str
    incident_id: str
    reason: str
    model_tag: str | None = None
    bento_tag: str | None = None
    champion_tag: str | None = None
    gate: dict[str, Any] | None = None
    event_id: str | None = None


# -- 1. parameters and hygiene --------------------------------------------------------


def resolve_params(params: RetrainParams, settings: Settings, now: datetime) -> RetrainParams:
    """Fill the model name, the incident id (a new one for schedule/manual runs) and as_of."""
    _engine_kwargs(params.feature_engine)  # refuse an unsupported engine before any work
    incident = params.incident_id or events.new_incident_id(now)
    as_of = params.as_of or now
    as_of = as_of.replace(tzinfo=UTC) if as_of.tzinfo is None else as_of.astimezone(UTC)
    return params.model_copy(
        update={
            "model_name": params.model_name or settings.model_name,
            "incident_id": incident,
            "as_of": as_of,
        }
    )


def model_settings(settings: Settings, params: RetrainParams) -> Settings:
    """Settings for the model being retrained (models are saved under ``settings.model_name``)."""
    name = params.model_name or settings.model_name
    return (
        settings
        if name == settings.model_name
        else settings.model_copy(update={"model_name": name})
    )


def check_hygiene(
    settings: Settings,
    params: RetrainParams,
    *,
    api_url: str | None,
    flow_run_id: str | None = None,
    now: datetime | None = None,
    monitor: hygiene.MonitorVerdict | None = None,
) -> hygiene.Decision:
    """Claim the incident for this run, or record why it is skipped."""
    assert params.model_name and params.incident_id, "resolve_params first"
    if monitor is None:
        monitor = hygiene.latest_monitor_verdict(
            api_url, params.model_name, state_dir=settings.state_dir, now=now
        )
    return hygiene.claim(
        settings.state_dir,
        params.model_name,
        params.incident_id,
        policy=hygiene.HygienePolicy.from_settings(settings),
        monitor=monitor,
        now=now,
        reason=params.reason,
        trigger_event_id=params.trigger_event_id,
        flow_run_id=flow_run_id,
    )


# -- 2. the training window -------------------------------------------------------------


def _labelled_predictions(
    settings: Settings, model_name: str, start: datetime, as_of: datetime
) -> pl.DataFrame:
    """Labelled predictions received in ``[start, as_of)``, shaped as transactions."""
    import polars as pl

    from driftloop import predlog
    from driftloop.schema import TRANSACTION_SCHEMA

    preds = predlog.read_predictions(
        settings, start, as_of, model_name=model_name, with_labels=True, labels_as_of=as_of
    )
    preds = preds.filter(pl.col("label").is_not_null() & pl.col("transaction_id").is_not_null())
    return (
        preds.sort("label_received_at")
        .unique(subset="transaction_id", keep="last", maintain_order=True)  # shadow arms log twice
        .select(
            "transaction_id",
            "card_id",
            "merchant_id",
            "amount",
            "category",
            "channel",
            "country",
            "event_timestamp",
            pl.col("label").cast(pl.Int8).alias("is_fraud"),
            pl.col("label_received_at").alias("label_available_at"),
        )
        .cast(TRANSACTION_SCHEMA)  # type: ignore[arg-type]
    )


def load_training_window(settings: Settings, params: RetrainParams) -> TrainingWindow:
    """History of the last ``window_days`` plus labelled predictions; labels as of ``as_of``."""
    import polars as pl

    from driftloop import jobs
    from driftloop.schema import TRANSACTION_SCHEMA
    from driftloop.training import label_arrived

    as_of = params.as_of or datetime.now(UTC)
    start = as_of - timedelta(days=params.window_days)
    data_version = jobs.table_version(settings.table(jobs.TRANSACTIONS))
    history = (
        jobs.load_history(settings, start=start, end=as_of)
        if data_version is not None  # a team may train on its prediction log alone
        else pl.DataFrame(schema=TRANSACTION_SCHEMA)
    )
    predictions_version = jobs.table_version(settings.table("predictions"))
    labels_version = jobs.table_version(settings.table("labels"))
    extra = pl.DataFrame(schema=TRANSACTION_SCHEMA)
    if params.include_predictions and predictions_version is not None:
        extra = _labelled_predictions(
            settings, params.model_name or settings.model_name, start, as_of
        )
        extra = extra.join(history.select("transaction_id"), on="transaction_id", how="anti")
    frame = pl.concat([history.select(list(TRANSACTION_SCHEMA)), extra]).sort("event_timestamp")
    labelled = label_arrived(frame, as_of)
    positives = int(labelled["is_fraud"].sum()) if labelled.height else 0
    if labelled.height < params.min_labelled_rows or positives < params.min_positives:
        raise InsufficientData(
            f"{labelled.height:,} labelled rows with {positives:,} frauds between "
            f"{start:%Y-%m-%d %H:%M} and {as_of:%Y-%m-%d %H:%M} UTC (needs "
            f"{params.min_labelled_rows:,} and {params.min_positives:,}): wait for labels"
        )
    return TrainingWindow(
        transactions=frame,
        start=start,
        as_of=as_of,
        history_rows=history.height,
        prediction_rows=extra.height,
        labelled_rows=labelled.height,
        data_version=data_version,
        predictions_version=predictions_version,
        labels_version=labels_version,
    )


# -- 3. the challenger ----------------------------------------------------------------


def _engine_kwargs(engine: str) -> dict[str, str]:
    if engine == "polars":
        return {}  # the default of jobs.train_and_register
    from driftloop import jobs

    if "engine" in inspect.signature(jobs.train_and_register).parameters:
        return {"engine": engine}
    raise ConfigError(
        f"feature_engine={engine!r} needs jobs.train_and_register(engine=...); use 'polars'"
    )


def train_challenger(
    settings: Settings,
    params: RetrainParams,
    window: TrainingWindow,
    champion_tag: str | None,
    *,
    config: TrainConfig | None = None,
    flow_run_id: str | None = None,
) -> tuple[str, TrainResult]:
    """Train and save the challenger (stage ``candidate``) with its lineage."""
    from driftloop import jobs, registry
    from driftloop.training import TrainConfig

    lineage = registry.Lineage(
        incident_id=params.incident_id,
        trigger_event=params.trigger_event_id,
        predictions_version=window.predictions_version,
        labels_version=window.labels_version,
        reason=params.reason,  # type: ignore[call-arg]  # extra field
        flow_run_id=flow_run_id,  # type: ignore[call-arg]
        labels_as_of=window.as_of.isoformat(),  # type: ignore[call-arg]
    )
    return jobs.train_and_register(
        model_settings(settings, params),
        window.transactions,
        config or TrainConfig.model_validate({"n_estimators": params.n_estimators}),
        as_of=window.as_of,
        parent_tag=champion_tag,
        warm_start=params.mode == "warm_start" and champion_tag is not None,
        lineage=lineage,
        stage="candidate",
        **_engine_kwargs(params.feature_engine),  # type: ignore[arg-type]
    )


# -- 4. the gate --------------------------------------------------------------------


def gate_window(
    settings: Settings,
    window: TrainingWindow,
    holdout_rows: int,
    *,
    engine: Literal["polars", "feast"] = "polars",
) -> pl.DataFrame:
    """The most recent ``holdout_rows`` labelled rows with point-in-time features."""
    from driftloop import features
    from driftloop.modeling import derive_frame
    from driftloop.training import label_arrived

    labelled = label_arrived(window.transactions, window.as_of).sort("event_timestamp")
    recent = labelled.tail(max(1, holdout_rows))
    return derive_frame(features.historical_features(settings, recent, engine=engine))


def champion_tag(model_name: str) -> str | None:
    """The newest ``champion`` of ``model_name`` (what a challenger must beat), or None."""
    from driftloop import registry

    return registry.champion_tag(model_name)


def scorer(tag: str) -> ModelScorer:
    from driftloop import registry
    from driftloop.gate import ModelScorer

    model = registry.load_model(tag)
    return ModelScorer(
        tag=model.tag, booster=model.booster, encoder=model.encoder, threshold=model.threshold
    )


def run_gate(
    settings: Settings,
    challenger_tag: str,
    champion_tag: str | None,
    window: pl.DataFrame,
    config: GateConfig | None = None,
) -> GateVerdict:
    """Challenger against champion on ``window`` (see :mod:`driftloop.gate`)."""
    from driftloop.gate import GateConfig, evaluate_gate

    return evaluate_gate(
        scorer(challenger_tag),
        scorer(champion_tag) if champion_tag else None,
        window,
        config or GateConfig.from_settings(settings),
    )


# -- 5. the outcome -----------------------------------------------------------------


def _flow_run_resource(flow_run_id: str | None) -> list[dict[str, str]]:
    if not flow_run_id:
        return []
    return [
        {
            "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
            "prefect.resource.role": "flow-run",
        }
    ]


def _metrics(result: TrainResult | None, verdict: GateVerdict) -> dict[str, float]:
    m = result.metrics if result is not None else verdict.challenger
    return {
        k: float(v)
        for k, v in m.model_dump(include={"roc_auc", "pr_auc", "precision", "recall", "f1"}).items()
        if v == v  # not NaN
    }


def register(
    settings: Settings,
    params: RetrainParams,
    verdict: GateVerdict,
    *,
    api_url: str,
    result: TrainResult | None = None,
    flow_run_id: str | None = None,
    build_bento: Callable[[str], str] | None = None,
) -> RetrainOutcome:
    """A passing challenger: build its Bento, record the verdict, announce it."""
    from driftloop import bento, registry

    assert params.model_name and params.incident_id
    tag = verdict.challenger_tag
    bento_tag = (build_bento or bento.build_model_bento)(tag)
    summary = verdict.summary()
    registry.update_lineage(tag, gate=summary, bento_tag=bento_tag)
    payload = events.ModelRegistered(
        model_name=params.model_name,
        incident_id=params.incident_id,
        model_tag=tag,
        bento_tag=bento_tag,
        parent_tag=verdict.champion_tag,
        metrics=_metrics(result, verdict),
        gate=summary,
    )
    event_id = events.emit(
        api_url, events.EventName.MODEL_REGISTERED, payload, related=_flow_run_resource(flow_run_id)
    )
    hygiene.finish(
        settings.state_dir, params.model_name, params.incident_id, "registered", model_tag=tag
    )
    return RetrainOutcome(
        status="registered",
        model_name=params.model_name,
        incident_id=params.incident_id,
        reason=verdict.reason,
        model_tag=tag,
        bento_tag=bento_tag,
        champion_tag=verdict.champion_tag,
        gate=summary,
        event_id=event_id,
    )


def reject(
    settings: Settings,
    params: RetrainParams,
    verdict: GateVerdict,
    *,
    api_url: str,
    flow_run_id: str | None = None,
) -> RetrainOutcome:
    """A failing challenger: stage ``rejected``, verdict in its lineage, ``model.rejected``."""
    from driftloop import registry

    assert params.model_name and params.incident_id
    tag = verdict.challenger_tag
    registry.set_stage(tag, "rejected")
    summary = verdict.summary()
    registry.update_lineage(tag, gate=summary)
    payload = events.ModelRejected(
        model_name=params.model_name,
        incident_id=params.incident_id,
        model_tag=tag,
        reason=verdict.reason,
        gate=summary,  # type: ignore[call-arg]  # extra field, kept by the payload model
    )
    event_id = events.emit(
        api_url, events.EventName.MODEL_REJECTED, payload, related=_flow_run_resource(flow_run_id)
    )
    hygiene.finish(
        settings.state_dir,
        params.model_name,
        params.incident_id,
        "rejected",
        model_tag=tag,
        detail=verdict.reason,
    )
    return RetrainOutcome(
        status="rejected",
        model_name=params.model_name,
        incident_id=params.incident_id,
        reason=verdict.reason,
        model_tag=tag,
        champion_tag=verdict.champion_tag,
        gate=summary,
        event_id=event_id,
    )


def announce_skip(
    params: RetrainParams,
    decision: hygiene.Decision,
    *,
    api_url: str | None,
    flow_run_id: str | None = None,
) -> RetrainOutcome:
    """Emit ``driftloop.retrain.skipped`` with the reason (hygiene already recorded it)."""
    assert params.model_name and params.incident_id
    event_id = None
    if api_url:
        payload = events.RetrainSkipped(
            model_name=params.model_name,
            incident_id=params.incident_id,
            reason=decision.reason,
            code=decision.code,  # type: ignore[call-arg]
            trigger_event_id=params.trigger_event_id,  # type: ignore[call-arg]
        )
        event_id = events.emit(
            api_url,
            events.EventName.RETRAIN_SKIPPED,
            payload,
            related=_flow_run_resource(flow_run_id),
        )
    return RetrainOutcome(
        status="skipped",
        model_name=params.model_name,
        incident_id=params.incident_id,
        reason=decision.reason,
        event_id=event_id,
    )


def insufficient(
    settings: Settings, params: RetrainParams, error: InsufficientData
) -> hygiene.Decision:
    """Record a retrain skipped for lack of labels (the incident may run again later)."""
    assert params.model_name
    decision = hygiene.Decision(proceed=False, code="insufficient_data", reason=str(error))
    hygiene.record_skip(
        settings.state_dir,
        params.model_name,
        hygiene.SkipRecord(
            at=datetime.now(UTC),
            incident_id=params.incident_id,
            code="insufficient_data",
            reason=str(error),
            trigger_event_id=params.trigger_event_id,
        ),
    )
    return decision


def mark_failed(settings: Settings, params: RetrainParams, error: BaseException) -> None:
    """Record a crashed retrain: the incident may be retried, no cool-down starts."""
    if params.model_name and params.incident_id:
        hygiene.finish(
            settings.state_dir,
            params.model_name,
            params.incident_id,
            "failed",
            detail=f"{type(error).__name__}: {error}"[:500],
        )


def release_crashed_run(
    settings: Settings, parameters: Mapping[str, Any], flow_run_id: str
) -> None:
    """Free the hygiene claim of a flow run that crashed or was cancelled mid-way."""
    raw = parameters.get("params") or {}
    name = (raw.get("model_name") if isinstance(raw, Mapping) else None) or settings.model_name
    hygiene.release_run(
        settings.state_dir, name, flow_run_id, detail="flow run crashed or was cancelled"
    )


def api_url_from(settings: Settings, environ: Mapping[str, str] | None = None) -> str | None:
    """The Prefect API URL: settings first, then ``PREFECT_API_URL``."""
    env = os.environ if environ is None else environ
    return settings.prefect_api_url or env.get("PREFECT_API_URL") or None
