"""The monitor: one window of logged predictions judged against the champion's reference.

Plain functions composed by ``flows/monitor.py`` (which only adds retries,
artifacts and logging). Three layers, kept apart in this module:

* **pure** — :func:`judge` turns (reference profile, holdout baseline, window
  frame, parameters, incident state) into a typed :class:`MonitorResult`:
  verdict, drift / quality / performance summaries, the new incident state and
  the events to emit (:meth:`MonitorResult.events`). :func:`check_performance`
  and :func:`advance_state` are its pure parts.
* **I/O adapters** — :func:`load_window` (polars scan of the Delta log, date
  partitions pruned, pinned to one Delta version), :func:`load_champion`,
  :func:`load_state` / :func:`save_state` (a small JSON file per model),
  :func:`write_report` (Evidently HTML on a bounded sample; :func:`start_report`
  builds it in a background thread while :func:`judge` runs),
  :func:`publish_metrics` (Prometheus gauges, Pushgateway + textfile) and
  :func:`emit_events`.

The verdict of a window
-----------------------
Checked in this order; the first that applies is the verdict:

1. ``insufficient`` — fewer than ``min_rows`` predictions in the window:
   nothing is judged, the incident state is kept as it was.
2. ``quality_failed`` — :func:`driftloop.quality.check_quality` found an error
   (schema, null rate, unit change, impossible values, vocabulary break).
   Drift is still computed on the columns that passed (for the report) but
   **neither drift nor performance is reported**: a model fed broken inputs
   drifts and degrades because of the break, and retraining on broken data
   would be wrong. Only ``driftloop.data_quality.failed`` is emitted, and the
   window neither extends nor ends an incident or a drift streak.
3. ``drift`` — the window is drifted by the rule of :mod:`driftloop.drift`
   (statistical evidence AND effect size per feature; share of drifted
   features, score drift, or unseen categories for the dataset) in
   ``consecutive_windows`` consecutive judged windows (the seed's "drift
   exceeds threshold for three consecutive batches"; default
   ``settings.drift_consecutive_windows``). A drifted window before the streak
   is long enough is reported as ``ok`` with ``drift_pending``.
4. ``degraded`` — labelled performance fell (:func:`check_performance`).
5. ``ok``.

When both drift and degradation fire, the verdict is ``drift`` and both events
are emitted, with the same incident id.

Labelled performance (:func:`check_performance`)
-------------------------------------------------
Over the predictions of the window whose label had arrived by
``labels_as_of`` (optionally a window ``performance_lag_minutes`` older, so
labels have had time to arrive). With at least ``min_labelled`` labelled rows
and ``min_positives`` positives, a metric (recall, precision, ROC AUC, PR AUC)
is degraded when BOTH

* it fell more than ``performance_drop`` (relative) below the champion's
  holdout value (:func:`driftloop.performance.metric_drops`), and
* the fall is statistically significant: one-sided z-test of
  ``baseline - value`` with the standard errors of both estimates (binomial
  for recall over positives and precision over predicted positives,
  Hanley–McNeil for ROC AUC, binomial over positives as an approximation for
  PR AUC), at ``performance_alpha`` divided by the number of metrics compared
  (Bonferroni). Labels are not independent: fraud comes in bursts on one card,
  so the counts behind the standard errors are the distinct ``cluster_column``
  values (default ``card_id``) among positives, negatives and predicted
  positives (:func:`effective_counts`), and the baseline's counts are scaled
  by the same ratios.

As with drift, the effect size alone fires on noise: a daily window with 80
frauds in bursts measures recall to about ±0.09, a 20 % relative error, so a
10 % drop rule alone flags about every other stable day of the simulator.

Incidents and the consecutive-windows rule (:func:`advance_state`)
------------------------------------------------------------------
State per model lives in ``<state_dir>/monitor/<model>.json``: the number of
consecutive drifted windows and the open incident. An incident opens when
drift fires or performance degrades, stays open (same ``incident_id``) while
the following windows are drifted or degraded, and closes at the first clean
window (quality passed, not drifted, not degraded); the next alert opens a new
one. Incident ids are derived from the model and the window that opened the
incident, so re-judging the same window (a retried flow run) gives the same id;
re-judging the last window starts again from the state before it, so a retry
never counts a window twice.

Prometheus
----------
:func:`publish_metrics` sets, on a dedicated registry, ``driftloop_drift_score
{model,feature}`` (the deciding effect size: PSI, normed Wasserstein or
Jensen–Shannon distance), ``driftloop_drift_share{model}``,
``driftloop_drift_detected{model}`` (1 when the drift verdict fired),
``driftloop_monitor_last_run_timestamp_seconds{model}``,
``driftloop_performance{model,metric}`` and
``driftloop_data_quality_failed{model}``; pushes them to a Pushgateway (job
``driftloop-monitor``, grouped by model) when a URL is given, and always writes
them to ``<state_dir>/metrics/monitor_<model>.prom`` for a node-exporter
textfile collector (one file per model: the collector reads every ``*.prom``
file of the folder, and one shared file would keep only the last model).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import polars as pl
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from scipy import stats

from driftloop import events as ev
from driftloop import predlog
from driftloop.drift import (
    DriftSummary,
    DriftThresholds,
    FeatureThresholds,
    KSResult,
    ReferenceProfile,
    compute_drift,
    sliding_window_ks,
)
from driftloop.errors import ConfigError, DataError, EventError, ModelError
from driftloop.performance import (
    DEFAULT_METRICS,
    MIN_LABELLED,
    MIN_POSITIVES,
    PerformanceSummary,
    compute_performance,
    metric_drops,
)
from driftloop.quality import QualityReport, check_quality

if TYPE_CHECKING:
    from driftloop.evidently_report import EvidentlyResult
    from driftloop.settings import Settings

__all__ = [
    "LABEL_COLUMNS",
    "METRICS_JOB",
    "Baseline",
    "ChampionReference",
    "EffectiveCounts",
    "IncidentState",
    "MetricCheck",
    "MonitorParams",
    "MonitorResult",
    "MonitorState",
    "PerformanceCheck",
    "PlannedEvent",
    "ThresholdOverrides",
    "Verdict",
    "Window",
    "WindowInfo",
    "advance_state",
    "artifact_key",
    "check_performance",
    "effective_counts",
    "emit_events",
    "find_champion",
    "incident_id_for",
    "judge",
    "load_champion",
    "load_state",
    "load_window",
    "metrics_textfile",
    "publish_metrics",
    "report_path_for",
    "save_state",
    "should_report",
    "start_report",
    "state_path",
    "write_report",
]

Verdict = Literal["ok", "drift", "degraded", "quality_failed", "insufficient"]
ReportMode = Literal["always", "on_alert", "never"]
MetricName = Literal["precision", "recall", "f1", "roc_auc", "pr_auc"]
_DEFAULT_METRICS: tuple[MetricName, ...] = ("recall", "precision", "roc_auc", "pr_auc")

#: columns :func:`driftloop.predlog.attach_labels` adds to a window
LABEL_COLUMNS: tuple[str, ...] = ("label", "label_id", "label_observed_at", "label_received_at")
#: Pushgateway job of the monitor's gauges (the contract of infra/prometheus rules)
METRICS_JOB = "driftloop-monitor"
#: namespace of the monitor's deterministic event ids
_EVENT_NAMESPACE = uuid.UUID("6c1f3f0e-9a59-4d0b-8a43-7d0f2b1d5e21")
_MODEL_NAME = r"^[a-z][a-z0-9_-]{0,62}$"


# ---------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------
class ThresholdOverrides(BaseModel):
    """Drift thresholds; an empty field takes the value from settings."""

    model_config = ConfigDict(extra="forbid")

    pvalue: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        default=None, description="p-value below which a per-feature test is significant"
    )
    psi: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="PSI above which a numeric shift matters"
    )
    wasserstein: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="Normed Wasserstein distance above which a numeric shift matters"
    )
    jsd: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="Jensen-Shannon distance above which a categorical shift matters"
    )
    share: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="Share of drifted features at which the window is drifted"
    )
    new_category_share: Annotated[float, Field(ge=0, lt=1)] | None = Field(
        default=None,
        description="Share of rows with an unseen category that makes the window drift",
    )
    per_column: dict[str, FeatureThresholds] = Field(
        default_factory=dict, description="Per-feature overrides (pvalue, psi, wasserstein, jsd)"
    )


class MonitorParams(BaseModel):
    """Parameters of one monitor run. Empty fields take their default from settings
    (:meth:`resolve`); bounds and descriptions make the Prefect run form."""

    model_config = ConfigDict(extra="forbid")

    model_name: Annotated[str, Field(pattern=_MODEL_NAME)] | None = Field(
        default=None, description="Model to monitor (empty: settings.model_name)"
    )
    model_tag: str | None = Field(
        default=None,
        description="Explicit champion tag name:version (empty: newest model with stage champion)",
    )
    window_minutes: Annotated[int, Field(ge=1, le=60 * 24 * 90)] | None = Field(
        default=None,
        description="Length of the window of predictions (empty: settings.monitor_window_minutes)",
    )
    last_rows: Annotated[int, Field(ge=1, le=50_000_000)] | None = Field(
        default=None,
        description="Judge the last N predictions received before window_end "
        "instead of a time window",
    )
    lookback_days: Annotated[int, Field(ge=1, le=366)] = Field(
        default=7, description="How far back last_rows may look"
    )
    window_end: AwareDatetime | None = Field(
        default=None, description="End of the window, exclusive (empty: now)"
    )
    labels_as_of: AwareDatetime | None = Field(
        default=None, description="Count labels received up to this time (empty: now)"
    )
    performance_lag_minutes: Annotated[int, Field(ge=0, le=60 * 24 * 90)] = Field(
        default=0,
        description="Judge labelled performance on the window this much older, so that labels "
        "have had time to arrive (0: the same window)",
    )
    thresholds: ThresholdOverrides = Field(
        default_factory=ThresholdOverrides, description="Drift thresholds"
    )
    consecutive_windows: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        default=None,
        description="Drift must hold in this many consecutive windows "
        "(empty: settings.drift_consecutive_windows)",
    )
    performance_drop: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        default=None,
        description="Relative fall of a metric below the holdout baseline that counts as degraded "
        "(empty: settings.performance_drop_threshold)",
    )
    performance_alpha: Annotated[float, Field(gt=0, lt=0.5)] = Field(
        default=0.01, description="Significance level of the performance test (Bonferroni-split)"
    )
    performance_metrics: list[MetricName] = Field(
        default_factory=lambda: list(_DEFAULT_METRICS),
        min_length=1,
        description="Metrics compared with the holdout baseline",
    )
    cluster_column: str | None = Field(
        default="card_id",
        description="Labels sharing this column's value count as one observation in the "
        "performance test (fraud comes in bursts on one card); empty: every label counts",
    )
    min_labelled: Annotated[int, Field(ge=1)] = Field(
        default=MIN_LABELLED, description="Fewest labelled predictions for a performance verdict"
    )
    min_positives: Annotated[int, Field(ge=1)] = Field(
        default=MIN_POSITIVES, description="Fewest positive labels for a performance verdict"
    )
    min_rows: Annotated[int, Field(ge=1)] = Field(
        default=100, description="Windows with fewer predictions are 'insufficient'"
    )
    sliding_window_rows: Annotated[int, Field(ge=10, le=1_000_000)] = Field(
        default=1000, description="KS test of the last N scores against the reference"
    )
    report: ReportMode = Field(
        default="always", description="When to write the Evidently HTML report"
    )
    report_sample_rows: Annotated[int, Field(ge=100, le=500_000)] = Field(
        default=5_000, description="Rows sampled from each side for the HTML report"
    )
    pushgateway_url: str | None = Field(
        default=None,
        description="Pushgateway for the monitor's gauges (empty: $DRIFTLOOP_PUSHGATEWAY_URL)",
    )
    emit: bool = Field(default=True, description="Emit Prefect events")

    @field_validator("model_tag")
    @classmethod
    def _explicit_tag(cls, v: str | None) -> str | None:
        if v is not None and (":" not in v or v.endswith(":latest")):
            raise ValueError("model_tag must name an explicit version (name:version)")
        return v

    def resolve(self, settings: Settings) -> MonitorParams:
        """A copy with every settings-backed field filled in."""
        t = self.thresholds
        thresholds = t.model_copy(
            update={
                "pvalue": t.pvalue or settings.drift_pvalue,
                "psi": t.psi or settings.drift_psi_threshold,
                "wasserstein": t.wasserstein or settings.drift_wasserstein_threshold,
                "jsd": t.jsd or settings.drift_jsd_threshold,
                "share": t.share or settings.drift_share_threshold,
                "new_category_share": t.new_category_share
                if t.new_category_share is not None
                else getattr(settings, "drift_new_category_share", None),
            }
        )
        model_name = self.model_name
        if model_name is None and self.model_tag is not None:
            model_name = self.model_tag.split(":", 1)[0]
        return self.model_copy(
            update={
                "model_name": model_name or settings.model_name,
                "window_minutes": self.window_minutes or settings.monitor_window_minutes,
                "thresholds": thresholds,
                "consecutive_windows": self.consecutive_windows
                or settings.drift_consecutive_windows,
                "performance_drop": self.performance_drop or settings.performance_drop_threshold,
                "pushgateway_url": self.pushgateway_url or settings.pushgateway_url,
            }
        )

    # what judge() uses; library defaults where a field was left empty
    @property
    def name(self) -> str:
        if self.model_name is None:
            raise ConfigError("MonitorParams.model_name is not set: call resolve(settings)")
        return self.model_name

    def drift_thresholds(self) -> DriftThresholds:
        t = self.thresholds
        values: dict[str, Any] = {
            k: getattr(t, k)
            for k in ("pvalue", "psi", "wasserstein", "jsd", "share", "new_category_share")
            if getattr(t, k) is not None
        }
        return DriftThresholds(**values, overrides=dict(t.per_column))

    @property
    def required_windows(self) -> int:
        return self.consecutive_windows or 1

    @property
    def drop_threshold(self) -> float:
        return self.performance_drop or 0.10


# ---------------------------------------------------------------------------------
# the champion
# ---------------------------------------------------------------------------------
class Baseline(BaseModel):
    """The champion's holdout metrics, with the counts they were measured on."""

    model_config = ConfigDict(extra="forbid")

    metrics: dict[str, float]
    n_labelled: int | None = Field(default=None, description="holdout rows")
    n_positives: int | None = Field(default=None, description="holdout positive labels")

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Baseline:
        """From a registered model's metadata: ``metrics``, ``holdout_rows``,
        ``holdout_positives``."""
        metrics = {
            str(k): float(v)
            for k, v in dict(metadata.get("metrics") or {}).items()
            if isinstance(v, int | float) and math.isfinite(float(v))
        }
        rows = metadata.get("holdout_rows")
        positives = metadata.get("holdout_positives")
        return cls(
            metrics=metrics,
            n_labelled=int(rows) if rows is not None else None,
            n_positives=int(positives) if positives is not None else None,
        )


class ChampionReference(BaseModel):
    """What the monitor needs of the serving model: reference statistics and baseline."""

    model_config = ConfigDict(extra="forbid")

    tag: str
    profile: ReferenceProfile
    baseline: Baseline
    threshold: float
    reference_path: str | None = Field(default=None, description="reference parquet (for reports)")

    @property
    def version(self) -> str:
        return self.tag.split(":", 1)[1]


def find_champion(model_name: str) -> str:
    """The tag of the newest registered version of ``model_name`` whose stage is champion."""
    from driftloop import registry

    champions = [m for m in registry.list_models(model_name) if m.stage == "champion"]
    if not champions:
        raise ModelError(f"no model {model_name!r} with stage 'champion' in the registry")
    return champions[-1].tag  # list_models is oldest first


def load_champion(model_name: str, tag: str | None = None) -> ChampionReference:
    """Load the reference profile and holdout baseline stored with the champion (or ``tag``)."""
    from driftloop import registry
    from driftloop.drift import build_profile

    model = registry.load_model(tag or find_champion(model_name))
    raw = model.profile_json()
    if raw is not None:
        profile = ReferenceProfile.model_validate(raw)
    else:  # a model saved before profiles were stored
        profile = build_profile(model.reference())
    reference = model.path / "reference.parquet"
    return ChampionReference(
        tag=model.tag,
        profile=profile,
        baseline=Baseline.from_metadata(model.metadata),
        threshold=model.threshold,
        reference_path=str(reference) if reference.exists() else None,
    )


# ---------------------------------------------------------------------------------
# the window
# ---------------------------------------------------------------------------------
class WindowInfo(BaseModel):
    """Which predictions were judged (pointers only, no data)."""

    model_config = ConfigDict(extra="forbid")

    start: AwareDatetime
    end: AwareDatetime
    rows: int = Field(ge=0)
    mode: Literal["time", "rows"] = "time"
    predictions_version: int | None = Field(default=None, description="Delta version read")
    labels_version: int | None = None
    labels_as_of: AwareDatetime | None = None
    performance_start: AwareDatetime | None = Field(
        default=None, description="start of the window labelled performance was measured on"
    )
    performance_end: AwareDatetime | None = None


class Window(BaseModel):
    """A loaded window: its frame (predictions + joined labels) and where it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    info: WindowInfo
    frame: Any = Field(description="pl.DataFrame of predictions with label columns")
    labelled: Any = Field(
        default=None, description="pl.DataFrame for performance when lagged; None: frame"
    )


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _table_version(settings: Settings, spec: predlog.TableSpec) -> int | None:
    from deltalake import DeltaTable

    uri = settings.table(spec.name)
    if not DeltaTable.is_deltatable(uri):
        return None
    return int(DeltaTable(uri).version())


def _read_last_rows(
    settings: Settings,
    model_name: str,
    model_version: str | None,
    end: datetime,
    n: int,
    lookback_days: int,
    version: int | None,
) -> pl.DataFrame:
    """The last ``n`` predictions received before ``end``, reading one date partition at a time."""
    lf = predlog.scan_table(settings, predlog.PREDICTIONS, version=version)
    if lf is None:
        return predlog.PREDICTIONS.empty()
    parts: list[pl.DataFrame] = []
    total = 0
    keep = [pl.col("model_name") == model_name]
    if model_version is not None:
        keep.append(pl.col("model_version") == model_version)
    for back in range(lookback_days + 1):
        day = (end - timedelta(days=back)).date().isoformat()
        part = lf.filter(
            pl.col(predlog.PARTITION_COLUMN) == day,
            pl.col("received_at") < end,
            *keep,
        ).collect()
        parts.append(part)
        total += part.height
        if total >= n:
            break
    frame = pl.concat(parts, how="vertical") if parts else predlog.PREDICTIONS.empty()
    return frame.sort("received_at").tail(n)


#: label columns as :func:`driftloop.predlog.attach_labels` names them in the window
_LABEL_RENAME = {
    "label_id": "label_id",
    "label": "label",
    "observed_at": "label_observed_at",
    "received_at": "label_received_at",
}


def _attach_labels(predictions: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """:func:`driftloop.predlog.attach_labels`, with a fast path for the usual case.

    When every label and every prediction carries a request_id and no request_id is
    labelled twice, each prediction's winning label is simply the one with its
    request_id. The fast path finds it by joining 64-bit hashes of the request ids
    (a join of two integer columns, not of 1M strings and the 28 columns riding on
    them), checks that every match has the very same request_id, and gathers the
    label columns next to the predictions: 0.3-0.5 s instead of 1.5-2.5 s on a
    1M-row window. Anything else (labels matched on transaction_id, relabelled
    requests, a hash collision) takes the general path. Same frame either way.
    """
    if (
        labels.height == 0
        or labels["request_id"].null_count() > 0
        or predictions["request_id"].null_count() > 0
    ):
        return predlog.attach_labels(predictions, labels)
    label_keys = labels["request_id"].hash(seed=0)
    if label_keys.n_unique() != labels.height:  # relabelled request (or a collision)
        return predlog.attach_labels(predictions, labels)
    rows = (
        pl.DataFrame({"_k": predictions["request_id"].hash(seed=0)})
        .join(
            pl.DataFrame({"_k": label_keys}).with_row_index("_i"),
            on="_k",
            how="left",
            maintain_order="left",
        )
        .get_column("_i")
    )
    matched = labels["request_id"].gather(rows)
    if not (matched.is_null() | (matched == predictions["request_id"]).fill_null(False)).all():
        return predlog.attach_labels(predictions, labels)  # a hash collision
    winners = labels.select(pl.col(list(_LABEL_RENAME)).gather(rows)).rename(_LABEL_RENAME)
    return predictions.hstack(winners.get_columns())


def load_window(
    settings: Settings,
    params: MonitorParams,
    now: datetime | None = None,
    *,
    model_version: str | None = None,
) -> Window:
    """Read the window of predictions (and labels arrived by ``labels_as_of``) from Delta.

    Only predictions of ``params.model_name`` (and of ``model_version``, normally the
    champion's, when given: a canary's rows are not the champion's) are kept. Both
    tables are pinned to their current version, recorded in the window info. Only the
    date partitions of the window are scanned.
    """
    now = _utc(now or datetime.now(UTC))
    end = _utc(params.window_end or now)
    labels_as_of = _utc(params.labels_as_of or now)
    name = params.name
    p_version = _table_version(settings, predlog.PREDICTIONS)
    l_version = _table_version(settings, predlog.LABELS)

    def labelled(frame: pl.DataFrame, start: datetime) -> pl.DataFrame:
        if model_version is not None:
            frame = frame.filter(pl.col("model_version") == model_version)
        labels = predlog.read_labels(
            settings,
            received_from=start - predlog.LABEL_LOOKBACK,
            as_of=labels_as_of,
            version=l_version,
        )
        return _attach_labels(frame, labels)

    if params.last_rows is not None:
        frame = _read_last_rows(
            settings, name, model_version, end, params.last_rows, params.lookback_days, p_version
        )
        start = frame["received_at"].min() if frame.height else end
        assert isinstance(start, datetime)
        mode: Literal["time", "rows"] = "rows"
    else:
        start = end - timedelta(minutes=params.window_minutes or 60)
        frame = predlog.read_predictions(settings, start, end, model_name=name, version=p_version)
        mode = "time"
    frame = labelled(frame, start)

    perf_frame = None
    perf_start, perf_end = start, end
    if params.performance_lag_minutes:
        lag = timedelta(minutes=params.performance_lag_minutes)
        perf_start, perf_end = start - lag, end - lag
        perf_frame = labelled(
            predlog.read_predictions(
                settings, perf_start, perf_end, model_name=name, version=p_version
            ),
            perf_start,
        )
    info = WindowInfo(
        start=start,
        end=end,
        rows=frame.height,
        mode=mode,
        predictions_version=p_version,
        labels_version=l_version,
        labels_as_of=labels_as_of,
        performance_start=perf_start,
        performance_end=perf_end,
    )
    return Window(info=info, frame=frame, labelled=perf_frame)


# ---------------------------------------------------------------------------------
# incident state
# ---------------------------------------------------------------------------------
class IncidentState(BaseModel):
    """What consecutive runs of the monitor must know of each other."""

    model_config = ConfigDict(extra="forbid")

    consecutive_drifted: int = Field(default=0, ge=0, description="drifted windows in a row")
    incident_id: str | None = Field(default=None, description="the open incident, if any")
    incident_opened_at: AwareDatetime | None = Field(
        default=None, description="end of the window that opened it"
    )


class MonitorState(IncidentState):
    """The state file of one model (``<state_dir>/monitor/<model>.json``)."""

    model_name: str
    last_window_start: AwareDatetime | None = None
    last_window_end: AwareDatetime | None = None
    last_verdict: Verdict | None = None
    updated_at: AwareDatetime | None = None
    previous: IncidentState | None = Field(
        default=None, description="the state before the last window (to re-judge it)"
    )

    def core(self) -> IncidentState:
        return IncidentState(
            consecutive_drifted=self.consecutive_drifted,
            incident_id=self.incident_id,
            incident_opened_at=self.incident_opened_at,
        )

    def base_for(self, start: datetime, end: datetime) -> IncidentState:
        """The state a window starts from: the one before it when it is the last window again."""
        if (
            self.previous is not None
            and self.last_window_start == start
            and self.last_window_end == end
        ):
            return self.previous
        return self.core()


def incident_id_for(model_name: str, window_start: datetime, window_end: datetime) -> str:
    """The id of an incident opened by this window: sortable, readable, deterministic."""
    end = _utc(window_end)
    digest = hashlib.sha256(
        f"{model_name}|{_utc(window_start).isoformat()}|{end.isoformat()}".encode()
    ).hexdigest()[:6]
    return f"inc-{end:%Y%m%dT%H%M%SZ}-{digest}"


def advance_state(
    state: MonitorState,
    *,
    window_start: datetime,
    window_end: datetime,
    judged: bool,
    drifted: bool,
    degraded: bool,
    required_windows: int,
    verdict: Verdict,
    now: datetime | None = None,
) -> tuple[MonitorState, bool]:
    """Apply one window to the state; return the new state and whether drift fired.

    ``judged`` is False for windows that say nothing about drift (insufficient
    rows, failed quality): they keep the streak and the incident as they were.
    """
    base = state.base_for(window_start, window_end)
    fired = False
    if not judged:
        core = base
    else:
        count = base.consecutive_drifted + 1 if drifted else 0
        fired = drifted and count >= required_windows
        if fired or degraded:
            opened = base.incident_id is None
            core = IncidentState(
                consecutive_drifted=count,
                incident_id=base.incident_id
                or incident_id_for(state.model_name, window_start, window_end),
                incident_opened_at=_utc(window_end) if opened else base.incident_opened_at,
            )
        elif drifted:  # the streak grows, not long enough yet: an open incident stays open
            core = base.model_copy(update={"consecutive_drifted": count})
        else:  # a clean window ends the streak and the incident
            core = IncidentState()
    new = MonitorState(
        **core.model_dump(),
        model_name=state.model_name,
        last_window_start=_utc(window_start),
        last_window_end=_utc(window_end),
        last_verdict=verdict,
        updated_at=_utc(now or datetime.now(UTC)),
        previous=base,
    )
    return new, fired


def state_path(state_dir: Path, model_name: str) -> Path:
    return Path(state_dir) / "monitor" / f"{model_name}.json"


def load_state(state_dir: Path, model_name: str) -> MonitorState:
    """The model's monitor state; a fresh one when there is none."""
    path = state_path(state_dir, model_name)
    if not path.exists():
        return MonitorState(model_name=model_name)
    try:
        return MonitorState.model_validate_json(path.read_text())
    except ValueError as exc:
        raise DataError(f"monitor state {path} is unreadable: {exc}") from exc


def save_state(state_dir: Path, state: MonitorState) -> Path:
    """Write the state atomically (temporary file + rename)."""
    path = state_path(state_dir, state.model_name)
    _atomic_write(path, state.model_dump_json(indent=2).encode())
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------
# performance
# ---------------------------------------------------------------------------------
class MetricCheck(BaseModel):
    """One metric compared with its holdout baseline."""

    model_config = ConfigDict(extra="forbid")

    metric: str
    value: float
    baseline: float
    drop: float = Field(description="relative drop, (baseline - value) / baseline")
    z: float | None = Field(default=None, description="z of the one-sided test; None: no SE")
    p_value: float | None = None
    beyond_threshold: bool
    significant: bool

    @property
    def degraded(self) -> bool:
        return self.beyond_threshold and self.significant


class PerformanceCheck(BaseModel):
    """The degradation verdict of a window's labelled performance."""

    model_config = ConfigDict(extra="forbid")

    degraded: bool
    enough_labels: bool
    reason: str
    checks: list[MetricCheck] = Field(default_factory=list)
    alpha: float = Field(description="per-metric significance level (Bonferroni-split)")

    @property
    def drops(self) -> list[MetricCheck]:
        """The degraded metrics, largest relative drop first."""
        return sorted((c for c in self.checks if c.degraded), key=lambda c: -c.drop)


def _binomial_se(p: float, n: float | None) -> float | None:
    if n is None or n <= 0:
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def _auc_se(auc: float, n_pos: float | None, n_neg: float | None) -> float | None:
    """Hanley & McNeil (1982) standard error of a ROC AUC."""
    if not n_pos or not n_neg or n_pos <= 0 or n_neg <= 0:
        return None
    q1 = auc / (2 - auc)
    q2 = 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    return math.sqrt(max(var, 0.0))


def _metric_se(
    metric: str,
    value: float,
    *,
    positives: float | None,
    negatives: float | None,
    predicted_positives: float | None,
) -> float | None:
    if metric == "roc_auc":
        return _auc_se(value, positives, negatives)
    if metric == "precision":
        return _binomial_se(value, predicted_positives)
    # recall, PR AUC (approximation) and F1 (approximation): binomial over positives
    return _binomial_se(value, positives)


class EffectiveCounts(BaseModel):
    """How many independent observations stand behind a window's metrics.

    Labels of one cluster (one card: fraud comes in bursts on the same card) are
    not independent; counting each cluster once is the conservative effective size.
    """

    model_config = ConfigDict(extra="forbid")

    positives: float = Field(ge=0, description="distinct clusters among positive labels")
    negatives: float = Field(ge=0, description="distinct clusters among negative labels")
    predicted_positives: float = Field(ge=0, description="distinct clusters among predicted 1")
    positive_ratio: float = Field(
        gt=0, le=1, description="effective / raw positives (applied to the baseline's counts too)"
    )
    negative_ratio: float = Field(gt=0, le=1)


def effective_counts(
    frame: pl.DataFrame,
    threshold: float,
    cluster_column: str,
    *,
    score: str = "score",
    label: str = "label",
) -> EffectiveCounts | None:
    """Distinct ``cluster_column`` values among the labelled positives, negatives and
    predicted positives of ``frame``; None when the column is absent or nothing is labelled."""
    if cluster_column not in frame.columns or label not in frame.columns:
        return None
    s = pl.col(score).cast(pl.Float64)
    y = pl.col(label).cast(pl.Float64) > 0.5
    lab = frame.filter(pl.col(label).is_not_null() & s.is_finite())
    if lab.height == 0:
        return None
    c = pl.col(cluster_column)
    row = lab.select(
        pos=y.sum(),
        neg=(~y).sum(),
        pred=(s >= threshold).sum(),
        c_pos=c.filter(y).n_unique(),
        c_neg=c.filter(~y).n_unique(),
        c_pred=c.filter(s >= threshold).n_unique(),
    ).row(0, named=True)
    return EffectiveCounts(
        positives=row["c_pos"],
        negatives=row["c_neg"],
        predicted_positives=row["c_pred"],
        positive_ratio=row["c_pos"] / row["pos"] if row["pos"] else 1.0,
        negative_ratio=row["c_neg"] / row["neg"] if row["neg"] else 1.0,
    )


def check_performance(
    summary: PerformanceSummary,
    baseline: Baseline,
    *,
    drop_threshold: float,
    alpha: float = 0.01,
    metrics: Sequence[str] = DEFAULT_METRICS,
    effective: EffectiveCounts | None = None,
) -> PerformanceCheck:
    """Degraded when a metric fell beyond ``drop_threshold`` AND significantly (module doc).

    ``effective`` (see :func:`effective_counts`) replaces the raw counts behind the
    window's standard errors, and scales the baseline's counts by the same ratios.
    """
    if not summary.enough_labels:
        return PerformanceCheck(
            degraded=False,
            enough_labels=False,
            alpha=alpha,
            reason=(
                f"not enough labels: {summary.n_labelled} labelled, {summary.n_positives} "
                f"positive (need {summary.min_labelled} and {summary.min_positives})"
            ),
        )
    compared = [m for m in metrics if m in baseline.metrics and summary.metric(m) is not None]
    if not compared:
        return PerformanceCheck(
            degraded=False,
            enough_labels=True,
            alpha=alpha,
            reason="no metric comparable with the baseline",
        )
    per_metric_alpha = alpha / len(compared)
    beyond = {d.metric for d in metric_drops(summary, baseline.metrics, drop_threshold, compared)}
    # counts behind each estimate, window and holdout
    w_pos = float(summary.n_positives)
    w_neg = float(summary.n_labelled - summary.n_positives)
    w_pred = (
        summary.predicted_positive_rate * summary.n_labelled
        if summary.predicted_positive_rate is not None
        else None
    )
    b_pos = float(baseline.n_positives) if baseline.n_positives is not None else None
    b_neg = (
        float(baseline.n_labelled - baseline.n_positives)
        if baseline.n_labelled is not None and baseline.n_positives is not None
        else None
    )
    b_recall, b_precision = baseline.metrics.get("recall"), baseline.metrics.get("precision")
    b_pred = (
        b_recall * b_pos / b_precision
        if b_pos is not None and b_recall is not None and b_precision
        else None
    )
    if effective is not None:
        w_pos, w_neg = effective.positives, effective.negatives
        w_pred = effective.predicted_positives
        r_pos, r_neg = effective.positive_ratio, effective.negative_ratio
        b_pos = None if b_pos is None else b_pos * r_pos
        b_neg = None if b_neg is None else b_neg * r_neg
        b_pred = None if b_pred is None else b_pred * r_pos
    checks = []
    for m in compared:
        value = summary.metric(m)
        base = baseline.metrics[m]
        assert value is not None
        se_w = _metric_se(m, value, positives=w_pos, negatives=w_neg, predicted_positives=w_pred)
        se_b = _metric_se(m, base, positives=b_pos, negatives=b_neg, predicted_positives=b_pred)
        se = math.hypot(se_w or 0.0, se_b or 0.0)
        if se > 0:
            z = (base - value) / se
            p = float(stats.norm.sf(z))
            significant = p < per_metric_alpha
        else:
            z, p = None, None
            significant = value < base
        checks.append(
            MetricCheck(
                metric=m,
                value=float(value),
                baseline=float(base),
                drop=(base - value) / base if base > 0 else 0.0,
                z=None if z is None else float(z),
                p_value=p,
                beyond_threshold=m in beyond,
                significant=significant,
            )
        )
    result = PerformanceCheck(
        degraded=False, enough_labels=True, alpha=per_metric_alpha, reason="", checks=checks
    )
    drops = result.drops
    if drops:
        result.degraded = True
        result.reason = "; ".join(
            f"{c.metric} {c.value:.3f} < baseline {c.baseline:.3f} "
            f"(-{c.drop:.1%}, allowed -{drop_threshold:.0%}, p={c.p_value:.2g})"
            for c in drops
        )
    else:
        noisy = [c.metric for c in checks if c.beyond_threshold]
        result.reason = f"within {drop_threshold:.0%} of baseline on {', '.join(compared)}" + (
            f" (drops on {', '.join(noisy)} not significant at {per_metric_alpha:.2g})"
            if noisy
            else ""
        )
    return result


# ---------------------------------------------------------------------------------
# the result and its events
# ---------------------------------------------------------------------------------
class PlannedEvent(BaseModel):
    """An event to emit: its name, payload and deterministic id."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: ev.EventName
    payload: ev.EventPayload
    event_id: str


class MonitorResult(BaseModel):
    """Everything one monitor run found. JSON-safe; built by :func:`judge`."""

    model_config = ConfigDict(extra="forbid")

    model_name: str
    model_tag: str
    run_id: str = Field(description="id of the run; event ids derive from it")
    window: WindowInfo
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list)
    quality: QualityReport
    drift: DriftSummary | None = None
    performance: PerformanceSummary | None = None
    performance_check: PerformanceCheck | None = None
    sliding_ks: KSResult | None = None
    drifted_window: bool = Field(description="the window is drifted (before the N-window rule)")
    drift_fired: bool = Field(description="the drift rule fired (N consecutive drifted windows)")
    drift_pending: bool = Field(description="drifted, but fewer than N windows in a row")
    consecutive_drifted: int
    consecutive_required: int
    incident_id: str | None = None
    state: MonitorState
    report_path: str | None = None
    evidently_drifted_columns: list[str] | None = Field(
        default=None, description="Evidently's verdicts on the report sample (second opinion)"
    )

    @property
    def degraded(self) -> bool:
        return bool(self.performance_check and self.performance_check.degraded)

    def with_report(self, report: EvidentlyResult | None) -> MonitorResult:
        """A copy pointing at the written report (and Evidently's second opinion)."""
        if report is None:
            return self
        return self.model_copy(
            update={
                "report_path": report.html_path,
                "evidently_drifted_columns": report.drifted_columns,
            }
        )

    def _event_id(self, name: ev.EventName) -> str:
        return str(uuid.uuid5(_EVENT_NAMESPACE, f"{self.run_id}|{self.model_name}|{name}"))

    def events(self) -> list[PlannedEvent]:
        """The events this run emits: ``monitor.completed`` always, then the alerts."""
        w = self.window
        drift = self.drift
        performance = (
            self.performance.metrics()
            if self.performance is not None and self.performance.n_labelled > 0
            else None
        )
        common: dict[str, Any] = {
            "model_name": self.model_name,
            "window_start": w.start,
            "window_end": w.end,
            "rows": w.rows,
            "drift_share": drift.drift_share if drift else 0.0,
            "drifted_columns": drift.drifted_columns if drift else [],
            "performance": performance,
            "report_path": self.report_path,
            "predictions_version": w.predictions_version,
            # extra keys (payloads keep unknown keys)
            "model_tag": self.model_tag,
            "labels_version": w.labels_version,
            "consecutive_drifted_windows": self.consecutive_drifted,
            "reasons": self.reasons,
        }
        out = [
            PlannedEvent(
                name=ev.EventName.MONITOR_COMPLETED,
                payload=ev.MonitorCompleted.model_validate(
                    {**common, "verdict": self.verdict, "incident_id": self.incident_id}
                ),
                event_id=self._event_id(ev.EventName.MONITOR_COMPLETED),
            )
        ]
        if self.verdict == "quality_failed":
            out.append(
                PlannedEvent(
                    name=ev.EventName.DATA_QUALITY_FAILED,
                    payload=ev.DataQualityFailed.model_validate(
                        {
                            "model_name": self.model_name,
                            "failed_checks": self.quality.failed_checks or ["unknown"],
                            "report_path": self.report_path,
                            "window_start": w.start,
                            "window_end": w.end,
                            "rows": w.rows,
                            "reasons": self.quality.reasons,
                            "failed_columns": self.quality.failed_columns,
                            "model_tag": self.model_tag,
                            "predictions_version": w.predictions_version,
                        }
                    ),
                    event_id=self._event_id(ev.EventName.DATA_QUALITY_FAILED),
                )
            )
            return out
        if self.drift_fired:
            assert drift is not None
            out.append(
                PlannedEvent(
                    name=ev.EventName.DRIFT_DETECTED,
                    payload=ev.DriftDetected.model_validate(
                        {
                            **common,
                            "incident_id": self.incident_id,
                            "new_categories": drift.new_categories,
                            "prediction_drifted": bool(
                                drift.prediction and drift.prediction.drifted
                            ),
                        }
                    ),
                    event_id=self._event_id(ev.EventName.DRIFT_DETECTED),
                )
            )
        if self.degraded:
            assert self.performance_check is not None and self.performance is not None
            worst = self.performance_check.drops[0]
            out.append(
                PlannedEvent(
                    name=ev.EventName.PERFORMANCE_DEGRADED,
                    payload=ev.PerformanceDegraded.model_validate(
                        {
                            "model_name": self.model_name,
                            "incident_id": self.incident_id,
                            "metric": worst.metric,
                            "value": worst.value,
                            "baseline": worst.baseline,
                            "window": {
                                "start": w.performance_start or w.start,
                                "end": w.performance_end or w.end,
                            },
                            "drops": [c.model_dump() for c in self.performance_check.drops],
                            "reason": self.performance_check.reason,
                            "n_labelled": self.performance.n_labelled,
                            "n_positives": self.performance.n_positives,
                            "labels_as_of": w.labels_as_of,
                            "model_tag": self.model_tag,
                            "report_path": self.report_path,
                        }
                    ),
                    event_id=self._event_id(ev.EventName.PERFORMANCE_DEGRADED),
                )
            )
        return out

    # -- what a person reads ----------------------------------------------------------
    def feature_table(self) -> list[dict[str, Any]]:
        """One row per tested column (features, then the score): tests, effect sizes, verdicts."""
        if self.drift is None:
            return []
        rows = []
        cols = [*self.drift.features, *([self.drift.prediction] if self.drift.prediction else [])]
        for f in cols:
            rows.append(
                {
                    "column": f.column,
                    "kind": "prediction" if f is self.drift.prediction else f.kind,
                    "test": f.method,
                    "statistic": _round(f.statistic),
                    "p_value": _round(f.p_value),
                    "effect": f.effect_metric,
                    "effect_size": _round(f.effect_size),
                    "effect_threshold": f.effect_threshold,
                    "psi": _round(f.psi),
                    "wasserstein_normed": _round(f.wasserstein_normed),
                    "jsd": _round(f.jsd),
                    "unseen_share": _round(f.unseen_share),
                    "drifted": f.drifted,
                    "skipped": f.skip_reason or "",
                }
            )
        return rows

    def markdown(self) -> str:
        """The verdict, its reasons and the evidence, for a Prefect markdown artifact."""
        w = self.window
        lines = [
            f"# Monitor `{self.model_name}`: **{self.verdict.upper().replace('_', ' ')}**",
            "",
            f"- window: `{w.start:%Y-%m-%d %H:%M:%S}` to `{w.end:%Y-%m-%d %H:%M:%S}` UTC, "
            f"{w.rows:,} predictions (Delta `predictions` v{w.predictions_version}, "
            f"`labels` v{w.labels_version})",
            f"- champion: `{self.model_tag}`",
            f"- incident: `{self.incident_id}`" if self.incident_id else "- incident: none open",
            f"- drifted windows in a row: {self.consecutive_drifted} "
            f"(rule fires at {self.consecutive_required})",
        ]
        if self.report_path:
            lines.append(f"- report: `{self.report_path}`")
        if self.reasons:
            lines += ["", "## Why", *[f"- {r}" for r in self.reasons]]
        q = self.quality
        lines += ["", "## Data quality", "passed" if q.passed else "**failed**"]
        lines += [f"- {i.severity}: {i.message}" for i in q.issues]
        if self.drift is not None:
            d = self.drift
            lines += [
                "",
                "## Drift",
                f"drift share {d.drift_share:.2f} ({len(d.drifted_columns)}/{d.n_tested} "
                f"features; dataset drifted: {d.dataset_drifted})",
            ]
            if d.drifted_columns:
                lines.append(f"- drifted: {', '.join(d.drifted_columns)}")
            if d.skipped_columns:
                lines.append(f"- not tested: {', '.join(d.skipped_columns)}")
            if d.prediction is not None and not d.prediction.skipped:
                lines.append(
                    f"- score: KS p={d.prediction.p_value:.2g}, "
                    f"{d.prediction.effect_metric}={d.prediction.effect_size:.3f}"
                    + (" (confounded by a quality failure)" if d.prediction_confounded else "")
                )
        if self.sliding_ks is not None:
            k = self.sliding_ks
            lines.append(
                f"- last {k.n_current} scores: KS D={k.statistic:.3f}, p={k.p_value:.2g}"
                + (" (early warning)" if k.drifted else "")
            )
        if self.evidently_drifted_columns is not None:
            lines.append(
                "- Evidently on the report sample flags: "
                + (", ".join(self.evidently_drifted_columns) or "nothing")
            )
        if self.performance is not None and self.performance_check is not None:
            p = self.performance
            lines += [
                "",
                "## Labelled performance",
                f"{p.n_labelled:,} labelled, {p.n_positives:,} positive; "
                f"{self.performance_check.reason}",
            ]
            if self.performance_check.checks:
                lines += ["", "| metric | value | baseline | drop | p |", "|---|---|---|---|---|"]
                lines += [
                    f"| {c.metric} | {c.value:.3f} | {c.baseline:.3f} | {c.drop:+.1%} | "
                    f"{'' if c.p_value is None else f'{c.p_value:.2g}'} |"
                    for c in self.performance_check.checks
                ]
        return "\n".join(lines)


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def judge(
    profile: ReferenceProfile,
    baseline: Baseline | Mapping[str, float],
    threshold: float,
    window_frame: pl.DataFrame,
    params: MonitorParams,
    state: MonitorState,
    *,
    window: WindowInfo,
    model_tag: str = "unknown:unknown",
    labelled_frame: pl.DataFrame | None = None,
    run_id: str | None = None,
    now: datetime | None = None,
) -> MonitorResult:
    """Judge one window (pure): quality, drift, labelled performance, the N-window rule.

    ``window_frame`` holds the window's predictions with their joined labels
    (``label`` null where none arrived); ``labelled_frame`` replaces it for
    performance when performance is judged on an older window. ``params``
    should be resolved (:meth:`MonitorParams.resolve`); empty fields take the
    library defaults. See the module docstring for the verdict.
    """
    base = baseline if isinstance(baseline, Baseline) else Baseline(metrics=dict(baseline))
    name = params.name
    run = run_id or uuid.uuid4().hex
    quality = check_quality(window_frame, profile, optional_columns=LABEL_COLUMNS)
    sufficient = window_frame.height >= params.min_rows
    reasons: list[str] = []

    drift: DriftSummary | None = None
    sliding: KSResult | None = None
    perf: PerformanceSummary | None = None
    perf_check: PerformanceCheck | None = None
    if sufficient:
        drift = compute_drift(
            profile, window_frame, params.drift_thresholds(), exclude=quality.failed_columns
        )
        if profile.prediction is not None and "score" in window_frame.columns:
            scores = (
                window_frame.select(pl.col("score").sort_by("received_at"))["score"]
                if "received_at" in window_frame.columns
                else window_frame["score"]
            )
            try:
                sliding = sliding_window_ks(
                    scores,
                    profile.prediction,
                    params.sliding_window_rows,
                    pvalue=params.drift_thresholds().pvalue,
                )
            except DataError:
                sliding = None
        perf_source = window_frame if labelled_frame is None else labelled_frame
        if "label" in perf_source.columns and "score" in perf_source.columns:
            perf = compute_performance(
                perf_source,
                threshold,
                min_labelled=params.min_labelled,
                min_positives=params.min_positives,
            )
            perf_check = check_performance(
                perf,
                base,
                drop_threshold=params.drop_threshold,
                alpha=params.performance_alpha,
                metrics=params.performance_metrics,
                effective=effective_counts(perf_source, threshold, params.cluster_column)
                if params.cluster_column
                else None,
            )

    drifted = bool(drift and drift.dataset_drifted)
    degraded = bool(perf_check and perf_check.degraded)
    judged = sufficient and quality.passed
    if not sufficient:
        verdict: Verdict = "insufficient"
        reasons.append(f"{window_frame.height} predictions in the window (< {params.min_rows})")
    elif not quality.passed:
        verdict = "quality_failed"
        reasons += quality.reasons
    else:
        verdict = "ok"  # refined below, once the N-window rule is applied

    new_state, fired = advance_state(
        state,
        window_start=window.start,
        window_end=window.end,
        judged=judged,
        drifted=drifted,
        degraded=judged and degraded,
        required_windows=params.required_windows,
        verdict=verdict,
        now=now,
    )
    if judged:
        if fired:
            verdict = "drift"
        elif degraded:
            verdict = "degraded"
        if drifted:
            assert drift is not None
            reasons += drift.reasons
            if not fired:
                reasons.append(
                    f"drifted window {new_state.consecutive_drifted} of "
                    f"{params.required_windows} needed in a row"
                )
        if degraded:
            assert perf_check is not None
            reasons.append(f"performance degraded: {perf_check.reason}")
        new_state = new_state.model_copy(update={"last_verdict": verdict})
    return MonitorResult(
        model_name=name,
        model_tag=model_tag,
        run_id=run,
        window=window,
        verdict=verdict,
        reasons=reasons,
        quality=quality,
        drift=drift,
        performance=perf,
        performance_check=perf_check,
        sliding_ks=sliding,
        drifted_window=drifted,
        drift_fired=judged and fired,
        drift_pending=judged and drifted and not fired,
        consecutive_drifted=new_state.consecutive_drifted,
        consecutive_required=params.required_windows,
        incident_id=new_state.incident_id if judged and (fired or degraded) else None,
        state=new_state,
    )


# ---------------------------------------------------------------------------------
# publishing: report, gauges, events
# ---------------------------------------------------------------------------------
def artifact_key(model_name: str, suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for the model's monitor."""
    slug = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-") or "model"
    return f"monitor-{slug}-{suffix}"


def report_path_for(reports_dir: Path, model_name: str, window: WindowInfo) -> Path:
    """``<reports_dir>/<model>/<model>_<start>_<end>.html`` (UTC, basic ISO format)."""
    fmt = "%Y%m%dT%H%M%SZ"
    name = f"{model_name}_{_utc(window.start):{fmt}}_{_utc(window.end):{fmt}}.html"
    return Path(reports_dir) / model_name / name


def should_report(result: MonitorResult, mode: ReportMode) -> bool:
    if mode == "never" or result.verdict == "insufficient":
        return False
    return mode == "always" or result.verdict != "ok" or result.drift_pending


def write_report(
    model_name: str,
    window: WindowInfo,
    profile: ReferenceProfile,
    reference: pl.DataFrame,
    window_frame: pl.DataFrame,
    reports_dir: Path,
    *,
    sample_rows: int = 5_000,
    seed: int = 0,
) -> EvidentlyResult:
    """The Evidently HTML report of the window, on a bounded sample of both sides.

    It does not depend on the verdict, so it can run alongside :func:`judge`.
    Columns: the profiled features and the score, minus those absent, entirely
    null or of another type on either side (Evidently cannot test them; the
    quality check reports them). Written to :func:`report_path_for`.
    """
    from driftloop.evidently_report import run_evidently

    wanted = [*profile.features, *(["score"] if profile.prediction is not None else [])]
    cur = window_frame.select([c for c in wanted if c in window_frame.columns])
    if cur.height > sample_rows:  # sample before the null checks: cheaper on large windows
        cur = cur.sample(n=sample_rows, seed=seed + 1)
    columns = [
        c
        for c in wanted
        if c in reference.columns
        and c in cur.columns
        and reference[c].null_count() < reference.height
        and cur[c].null_count() < cur.height
        and reference.schema[c] == cur.schema[c]
    ]
    path = report_path_for(reports_dir, model_name, window)
    return run_evidently(reference, cur, columns, path, max_rows=sample_rows, seed=seed)


def start_report(
    model_name: str,
    window: WindowInfo,
    profile: ReferenceProfile,
    reference: pl.DataFrame,
    window_frame: pl.DataFrame,
    reports_dir: Path,
    *,
    sample_rows: int = 5_000,
    seed: int = 0,
) -> Future[EvidentlyResult]:
    """:func:`write_report` in a background thread; its future's ``result()`` gives the
    report or raises what it raised.

    The report needs only the reference sample and the window, not the verdict, so
    it can be built while :func:`judge` runs: judging is numpy/polars work that
    releases the GIL, Evidently is mostly Python (plotly figures). Same report as
    :func:`write_report` (same sample, same seed).
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftloop-report")
    try:
        return executor.submit(
            write_report,
            model_name,
            window,
            profile,
            reference,
            window_frame,
            reports_dir,
            sample_rows=sample_rows,
            seed=seed,
        )
    finally:
        executor.shutdown(wait=False)  # the thread ends with the report


def metrics_textfile(state_dir: Path, model_name: str) -> Path:
    return Path(state_dir) / "metrics" / f"monitor_{model_name}.prom"


def publish_metrics(
    result: MonitorResult,
    state_dir: Path,
    *,
    pushgateway_url: str | None = None,
    now: float | None = None,
    timeout: float = 10.0,
) -> Path:
    """Set the monitor's gauges; push them to the Pushgateway (if any) and write the textfile.

    Returns the textfile's path. A push that fails raises (``OSError``/``URLError``).
    """
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile

    registry = CollectorRegistry()
    model = result.model_name
    score = Gauge(
        "driftloop_drift_score",
        "Drift effect size per feature in the last monitored window (PSI, normed Wasserstein "
        "or Jensen-Shannon distance, whichever decided)",
        ["model", "feature"],
        registry=registry,
    )
    share = Gauge(
        "driftloop_drift_share", "Share of drifted features", ["model"], registry=registry
    )
    detected = Gauge(
        "driftloop_drift_detected", "1 when the drift rule fired", ["model"], registry=registry
    )
    last_run = Gauge(
        "driftloop_monitor_last_run_timestamp_seconds",
        "When the monitor last judged a window",
        ["model"],
        registry=registry,
    )
    performance = Gauge(
        "driftloop_performance",
        "Labelled performance of the last window",
        ["model", "metric"],
        registry=registry,
    )
    quality_failed = Gauge(
        "driftloop_data_quality_failed",
        "1 when the last window failed its data-quality checks",
        ["model"],
        registry=registry,
    )
    if result.drift is not None:
        cols = [*result.drift.features]
        if result.drift.prediction is not None:
            cols.append(result.drift.prediction)
        for f in cols:
            if f.effect_size is not None and math.isfinite(f.effect_size):
                score.labels(model, f.column).set(f.effect_size)
        share.labels(model).set(result.drift.drift_share)
    else:
        share.labels(model).set(0.0)
    detected.labels(model).set(1.0 if result.drift_fired else 0.0)
    quality_failed.labels(model).set(1.0 if result.verdict == "quality_failed" else 0.0)
    last_run.labels(model).set(time.time() if now is None else now)
    if result.performance is not None and result.performance.n_labelled > 0:
        for metric, value in result.performance.metrics().items():
            if metric not in ("n_labelled", "n_positives") and math.isfinite(value):
                performance.labels(model, metric).set(value)

    path = metrics_textfile(state_dir, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
    if pushgateway_url:
        push_to_gateway(
            pushgateway_url,
            job=METRICS_JOB,
            grouping_key={"model": model},
            registry=registry,
            timeout=timeout,
        )
    return path


def emit_events(
    api_url: str, result: MonitorResult, *, confirm: bool = True, confirm_timeout: float = 30.0
) -> list[str]:
    """Deliver the run's events (:meth:`MonitorResult.events`); with ``confirm``, return
    only once the server has stored every one of them (readable through its API).

    Event ids derive from the run id, so a retried delivery is stored once.
    """
    planned = result.events()
    ids = [ev.emit(api_url, p.name, p.payload, event_id=p.event_id, confirm=False) for p in planned]
    if confirm:
        since = datetime.now(UTC) - timedelta(days=1)
        deadline = time.monotonic() + confirm_timeout
        missing = set(ids)
        while missing:
            found = ev.read_events(api_url, since=since, event_ids=sorted(missing))
            missing -= {str(e.id) for e in found}
            if not missing:
                break
            if time.monotonic() >= deadline:
                raise EventError(
                    f"events {sorted(missing)} not readable from {api_url} "
                    f"after {confirm_timeout} s"
                )
            time.sleep(0.2)
    return ids
