"""Adapter over Evidently 0.7: the human drift report and a second opinion.

:func:`run_evidently` samples both frames to a bounded size, runs Evidently's
``DataDriftPreset`` (current API: ``evidently.Report``/``Dataset``/
``DataDefinition``, not ``evidently.legacy``), writes the self-contained HTML
report and returns a typed :class:`EvidentlyResult`. Only
:func:`result_from_snapshot` reads Evidently's snapshot dict; nobody else
indexes it.

Evidently picks its test per column (above 1,000 reference rows: normed
Wasserstein for numeric columns, Jensen–Shannon distance for categorical ones
and for numeric columns with at most 5 distinct values; below: KS / chi-square
/ Z-test p-values). The drift rule of record is :mod:`driftloop.drift`, which
is vectorised and also requires statistical significance; this report is
for people and for the benchmark's agreement check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

#: rows sampled from each frame before Evidently runs (it takes ~5 s per 100k x 10 columns)
MAX_ROWS = 20_000


class EvidentlyColumn(BaseModel):
    """Evidently's verdict on one column."""

    model_config = ConfigDict(extra="forbid")

    column: str
    method: str = Field(description="Evidently's method name, e.g. 'Wasserstein distance (normed)'")
    score: float = Field(description="drift score: a distance, or a p-value for p-value methods")
    threshold: float | None = None
    is_p_value: bool = Field(description="True when a low score means drift")
    drifted: bool


class EvidentlyResult(BaseModel):
    """Typed content of an Evidently data-drift snapshot."""

    model_config = ConfigDict(extra="forbid")

    columns: dict[str, EvidentlyColumn]
    drifted_count: int
    drift_share: float = Field(description="share of drifted columns, as Evidently counts it")
    share_threshold: float | None = Field(
        default=None, description="Evidently's dataset drift share"
    )
    dataset_drifted: bool
    html_path: str | None = None
    n_reference: int = 0
    n_current: int = 0

    @property
    def drifted_columns(self) -> list[str]:
        return [c for c, r in self.columns.items() if r.drifted]


def _is_p_value(method: str) -> bool:
    return "p_value" in method.lower().replace("-", "_").replace(" ", "_")


def result_from_snapshot(snapshot: Mapping[str, Any]) -> EvidentlyResult:
    """Turn ``snapshot.dict()`` of a DataDriftPreset run into an :class:`EvidentlyResult`.

    The one place that knows the snapshot's layout: ``metrics`` holds a
    ``DriftedColumnsCount`` (``value.count``, ``value.share``) and one
    ``ValueDrift`` per column (``config.column``, ``config.method``,
    ``config.threshold``, ``value``); ``tests`` (when the report ran with
    ``include_tests=True``) holds each column's pass/fail, linked by
    ``metric_config.metric_id``. Without tests the flag is recomputed from
    the method's direction (p-value below, or distance at or above, threshold).
    Numpy scalars are cast to plain floats.
    """
    metrics = snapshot.get("metrics", [])
    statuses = {
        t.get("metric_config", {}).get("metric_id"): t.get("status")
        for t in snapshot.get("tests", []) or []
    }
    columns: dict[str, EvidentlyColumn] = {}
    count = share = share_threshold = None
    for m in metrics:
        config = m.get("config", {})
        kind = str(config.get("type", "")).rsplit(":", 1)[-1]
        if kind == "DriftedColumnsCount":
            count = int(m["value"]["count"])
            share = float(m["value"]["share"])
            share_threshold = config.get("drift_share")
        elif kind == "ValueDrift":
            method = str(config.get("method"))
            score = float(m["value"])
            threshold = config.get("threshold")
            threshold = None if threshold is None else float(threshold)
            p_kind = _is_p_value(method)
            status = statuses.get(m.get("id"))
            if status is not None:
                drifted = status == "FAIL"
            elif threshold is None:
                drifted = False
            else:
                drifted = score < threshold if p_kind else score >= threshold
            col = str(config["column"])
            columns[col] = EvidentlyColumn(
                column=col,
                method=method,
                score=score,
                threshold=threshold,
                is_p_value=p_kind,
                drifted=drifted,
            )
    n_drifted = sum(c.drifted for c in columns.values()) if count is None else count
    if share is None:
        share = n_drifted / len(columns) if columns else 0.0
    share_thr = None if share_threshold is None else float(share_threshold)
    return EvidentlyResult(
        columns=columns,
        drifted_count=n_drifted,
        drift_share=share,
        share_threshold=share_thr,
        dataset_drifted=share_thr is not None and share >= share_thr,
    )


def import_evidently() -> None:
    """Import Evidently now (about 5 s) rather than in the first :func:`run_evidently`.

    For a process that will build a report and has time to spare before it (or that
    times its work apart from its imports). Idempotent.
    """
    import evidently  # noqa: F401
    import evidently.presets  # noqa: F401


def _sample(frame: pl.DataFrame, max_rows: int, seed: int) -> pl.DataFrame:
    return frame.sample(n=max_rows, seed=seed) if frame.height > max_rows else frame


def run_evidently(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    columns: Sequence[str],
    html_path: str | Path | None = None,
    *,
    max_rows: int = MAX_ROWS,
    categorical: Sequence[str] | None = None,
    drift_share: float = 0.5,
    seed: int = 0,
) -> EvidentlyResult:
    """Run Evidently's DataDriftPreset on at most ``max_rows`` rows of each frame.

    ``categorical`` defaults to the string / categorical / boolean columns
    among ``columns``; the rest are numerical. Writes the HTML report to
    ``html_path`` (folders created) when given.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    cols = list(columns)
    if categorical is None:
        categorical = [
            c
            for c in cols
            if reference.schema[c] in (pl.String, pl.Categorical, pl.Boolean)
            or isinstance(reference.schema[c], pl.Enum)
        ]
    cat = [c for c in cols if c in set(categorical)]
    num = [c for c in cols if c not in set(cat)]
    definition = DataDefinition(numerical_columns=num, categorical_columns=cat)
    ref = _sample(reference.select(cols), max_rows, seed)
    cur = _sample(current.select(cols), max_rows, seed + 1)
    report = Report([DataDriftPreset(columns=cols, drift_share=drift_share)], include_tests=True)
    snapshot = report.run(
        Dataset.from_pandas(cur.to_pandas(), data_definition=definition),
        Dataset.from_pandas(ref.to_pandas(), data_definition=definition),
    )
    result = result_from_snapshot(snapshot.dict())
    result.n_reference, result.n_current = ref.height, cur.height
    if html_path is not None:
        path = Path(html_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(path))
        result.html_path = str(path)
    return result
