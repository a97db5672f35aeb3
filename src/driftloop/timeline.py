"""The incident timeline: what the loop did about one drift, step by step, and how fast.

Built from what the loop itself recorded, never from the demo's own bookkeeping
(except the moment the drift was injected, which only the demo knows):

* the Prefect server's events (``driftloop.*``, :func:`driftloop.events.read_events`):
  monitor windows, the drift / degraded-performance alarm that opened the incident,
  the gate's verdict (``model.registered`` / ``model.rejected``), each rollout step
  with its analysis, the promotion or the rollback;
* the retrain flow runs of the incident (their start, from the Prefect API);
* the promotion ledger (entries of the incident with no event of their own).

Pure parts: :func:`build_timeline`, :func:`to_markdown`, :func:`metric_series`.
I/O parts: :func:`collect` (Prefect API), :func:`save` / :func:`load` (JSON next to
the markdown), :func:`publish_artifact` (a Prefect markdown artifact),
:func:`write_chart` (PNG with matplotlib, self-contained HTML with plotly) of the
labelled accuracy and recall over time from the Delta prediction log joined with
its labels, the timeline's events marked on it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from driftloop.errors import DataError, EventError

__all__ = [
    "Durations",
    "FlowRunInfo",
    "Timeline",
    "TimelineEntry",
    "artifact_key",
    "build_timeline",
    "collect",
    "find_incident",
    "load",
    "metric_series",
    "publish_artifact",
    "rich_table",
    "save",
    "to_markdown",
    "write_chart",
]

Outcome = Literal["promoted", "rolled_back", "rejected", "skipped", "open"]

ALARMS = ("driftloop.drift.detected", "driftloop.performance.degraded")
ROLLOUT_END = ("driftloop.rollout.promoted", "driftloop.rollout.rolled_back")
#: monitor verdicts that say something is wrong with the window
_ALERTING = ("drift", "degraded", "quality_failed")
#: what each event is called on the timeline
_KIND = {
    "driftloop.drift.detected": "drift detected",
    "driftloop.performance.degraded": "performance degraded",
    "driftloop.model.registered": "gate passed, model registered",
    "driftloop.model.rejected": "gate failed, model rejected",
    "driftloop.retrain.skipped": "retrain skipped",
    "driftloop.rollout.started": "rollout started",
    "driftloop.rollout.stepped": "canary step",
    "driftloop.rollout.promoted": "promoted",
    "driftloop.rollout.rolled_back": "rolled back",
}


class FlowRunInfo(BaseModel):
    """The little the timeline needs of a flow run (from ``/flow_runs/filter``)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    name: str
    flow: str
    state_type: str | None = None
    start_time: AwareDatetime | None = None
    end_time: AwareDatetime | None = None
    expected_start_time: AwareDatetime | None = None
    incident_id: str | None = None

    @classmethod
    def from_api(cls, run: Mapping[str, Any], flow: str) -> FlowRunInfo:
        params = run.get("parameters") or {}
        inner = params.get("params") if isinstance(params.get("params"), Mapping) else params
        incident = inner.get("incident_id") if isinstance(inner, Mapping) else None
        return cls(
            id=str(run["id"]),
            name=str(run.get("name", "")),
            flow=flow,
            state_type=run.get("state_type"),
            start_time=run.get("start_time"),
            end_time=run.get("end_time"),
            expected_start_time=run.get("expected_start_time"),
            incident_id=incident if isinstance(incident, str) else None,
        )


class TimelineEntry(BaseModel):
    at: AwareDatetime
    kind: str
    title: str
    detail: str = ""
    since_injection: float | None = Field(default=None, description="seconds after injection")
    event_id: str | None = None
    event: str | None = None


class Durations(BaseModel):
    """Seconds between the milestones of the incident (None: not reached)."""

    detect: float | None = Field(default=None, description="injection -> first alarm")
    retrain: float | None = Field(default=None, description="first alarm -> gate verdict")
    promote: float | None = Field(default=None, description="gate verdict -> promotion or rollback")
    mitigate: float | None = Field(
        default=None, description="injection -> promotion or rollback (time to mitigate)"
    )


class Timeline(BaseModel):
    model_name: str
    incident_id: str | None
    scenario: str | None = None
    injected_at: AwareDatetime | None = None
    outcome: Outcome
    entries: list[TimelineEntry]
    durations: Durations
    monitor_runs: int = Field(0, description="monitor windows judged since the injection")
    retrain_requests: int = Field(
        0, description="retrain runs asked for this incident (one trains, the rest are skipped)"
    )
    wall_seconds: float | None = Field(default=None, description="the demo's whole wall time")
    notes: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------------------
# building (pure)
# --------------------------------------------------------------------------------------


def _event_dict(e: Any) -> dict[str, Any]:
    if isinstance(e, BaseModel):
        return e.model_dump(mode="python")
    return dict(e)


def _when(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if v.is_integer() and abs(v) >= 1 else f"{v:.{digits}f}"
    return str(v)


def find_incident(events: Iterable[Any], after: datetime | None = None) -> str | None:
    """The incident opened by the first alarm (drift or degraded performance) after
    ``after``: the one the timeline is about."""
    for e in sorted((_event_dict(x) for x in events), key=lambda d: _when(d["occurred"])):
        if e["event"] in ALARMS and (after is None or _when(e["occurred"]) >= after):
            incident = (e.get("payload") or {}).get("incident_id")
            if incident:
                return str(incident)
    return None


def _weights(payload: Mapping[str, Any]) -> str:
    weights = payload.get("weights") or {}
    return ", ".join(f"{_short(k)} {v}%" for k, v in weights.items())


def _short(tag: str) -> str:
    """``driftloop-fraud:abc123def`` -> ``abc123def`` (version part of a tag)."""
    return tag.split(":", 1)[1] if ":" in tag else tag


def _analysis(a: Mapping[str, Any] | None) -> str:
    if not a:
        return ""
    checks = a.get("checks") or {}
    parts = [f"{k} {_fmt(v)}" for k, v in checks.items() if v is not None]
    counts = f"champion {a.get('champion_requests', '-')} / canary {a.get('canary_requests', '-')}"
    verdict = a.get("verdict", "")
    return f"{verdict}: {counts} requests" + (f"; {', '.join(parts)}" if parts else "")


def _describe(name: str, p: Mapping[str, Any]) -> tuple[str, str]:
    """(title, detail) of one driftloop event."""
    title = _KIND.get(name, name)
    if name == "driftloop.drift.detected":
        cols = ", ".join(p.get("drifted_columns") or []) or "-"
        share = _fmt(p.get("drift_share"))
        return title, f"drift share {share} ({cols}) on {p.get('rows', '-')} rows"
    if name == "driftloop.performance.degraded":
        return title, (
            f"{p.get('metric')} {_fmt(p.get('value'))} vs baseline {_fmt(p.get('baseline'))}"
        )
    if name in ("driftloop.model.registered", "driftloop.model.rejected"):
        g = p.get("gate") or {}
        metric = g.get("primary_metric", "metric")
        detail = (
            f"{metric} challenger {_fmt(g.get('challenger'))} vs champion "
            f"{_fmt(g.get('champion'))} (margin {_fmt(g.get('margin'))}) on "
            f"{g.get('window_rows', '-')} rows / {g.get('window_positives', '-')} frauds"
        )
        failed = g.get("slices_failed") or []
        if failed:
            detail += f"; slices failed: {', '.join(failed)}"
        if name == "driftloop.model.registered":
            detail += f"; model {p.get('model_tag')}"
        else:
            detail += f"; {p.get('reason', '')}"
        return title, detail
    if name == "driftloop.retrain.skipped":
        return title, str(p.get("reason", ""))
    if name.startswith("driftloop.rollout."):
        detail = _weights(p)
        analysis = _analysis(p.get("analysis"))
        if analysis:
            detail += f"; {analysis}"
        elif p.get("reason"):
            detail += f"; {p.get('reason')}"
        if name == "driftloop.rollout.stepped":
            title = f"canary step {p.get('step', '')} ({p.get('canary_percent', '-')}%)"
        return title, detail
    return title, ""


def build_timeline(
    events: Sequence[Any],
    *,
    model_name: str,
    incident_id: str | None = None,
    injected_at: datetime | None = None,
    scenario: str | None = None,
    flow_runs: Sequence[FlowRunInfo] = (),
    ledger: Sequence[Any] = (),
    wall_seconds: float | None = None,
) -> Timeline:
    """The timeline of one incident (default: the first opened after ``injected_at``).

    ``events`` are received Prefect events (models or dicts with ``event``,
    ``occurred``, ``id``, ``payload``), any order, any incident; ``ledger`` are
    promotion-ledger entries. Pure: no I/O, no clock.
    """
    evs = sorted((_event_dict(e) for e in events), key=lambda d: _when(d["occurred"]))
    incident = incident_id or find_incident(evs, injected_at)
    entries: list[TimelineEntry] = []
    notes: list[str] = []

    def since(t: datetime) -> float | None:
        return None if injected_at is None else (t - injected_at).total_seconds()

    def add(
        at: datetime, kind: str, title: str, detail: str = "", e: Mapping | None = None
    ) -> None:
        entries.append(
            TimelineEntry(
                at=at,
                kind=kind,
                title=title,
                detail=detail,
                since_injection=since(at),
                event_id=str(e["id"]) if e else None,
                event=e["event"] if e else None,
            )
        )

    if injected_at is not None:
        add(injected_at, "injected", "drift injected", f"scenario {scenario or '?'}")

    def of_incident(e: Mapping[str, Any]) -> bool:
        return incident is not None and (e.get("payload") or {}).get("incident_id") == incident

    ours = [e for e in evs if of_incident(e)]
    alarms = [e for e in ours if e["event"] in ALARMS]
    first_alarm = _when(alarms[0]["occurred"]) if alarms else None

    # monitor windows after the injection: count them, show the first drifted one
    monitors = [
        e
        for e in evs
        if e["event"] == "driftloop.monitor.completed"
        and (injected_at is None or _when(e["occurred"]) >= injected_at)
    ]
    drifted = next(
        (m for m in monitors if (m.get("payload") or {}).get("verdict") in _ALERTING),
        None,
    )
    if drifted is not None:
        p = drifted["payload"]
        perf = p.get("performance") or {}
        perf_s = ", ".join(f"{k} {_fmt(v)}" for k, v in perf.items())
        detail = (
            f"window {_when(p['window_start']):%H:%M:%S}-{_when(p['window_end']):%H:%M:%S} "
            f"({p.get('rows', '-')} rows): verdict {p.get('verdict')}, drift share "
            f"{_fmt(p.get('drift_share'))}" + (f"; {perf_s}" if perf_s else "")
        )
        add(
            _when(drifted["occurred"]),
            "first_drifted_window",
            "first drifted window",
            detail,
            drifted,
        )

    # the first alarm of each kind (the monitor repeats them every window)
    seen: set[str] = set()
    for e in alarms:
        if e["event"] in seen:
            continue
        seen.add(e["event"])
        title, detail = _describe(e["event"], e.get("payload") or {})
        add(
            _when(e["occurred"]),
            "alarm",
            f"{title} (incident opened)" if e is alarms[0] else title,
            detail,
            e,
        )
    repeats = len(alarms) - len(seen)
    if repeats:
        notes.append(f"{repeats} further alarms carried the same incident id (deduplicated)")

    runs = [r for r in flow_runs if incident is not None and r.incident_id == incident]
    retrains = [r for r in runs if r.flow == "retrain"]
    started = [r for r in retrains if r.start_time is not None]
    if started:
        first = min(started, key=lambda r: r.start_time)  # type: ignore[arg-type, return-value]
        assert first.start_time is not None
        add(
            first.start_time,
            "retrain_started",
            "retrain started",
            f"flow run {first.name} ({first.state_type})",
        )
    if len(retrains) > 1:
        notes.append(
            f"{len(retrains)} retrain runs were requested for the incident; "
            f"{len(retrains) - 1} were cancelled or skipped (one retrain per incident)"
        )

    for e in ours:
        name = e["event"]
        if name in ALARMS or name not in _KIND:
            continue
        title, detail = _describe(name, e.get("payload") or {})
        kind = {
            "driftloop.model.registered": "gate",
            "driftloop.model.rejected": "gate",
            "driftloop.rollout.promoted": "promoted",
            "driftloop.rollout.rolled_back": "rolled_back",
        }.get(name, name.rsplit(".", 1)[-1])
        if name == "driftloop.retrain.skipped":
            continue  # summarised in the notes
        add(_when(e["occurred"]), kind, title, detail, e)
    skipped = [e for e in ours if e["event"] == "driftloop.retrain.skipped"]
    if skipped:
        notes.append(f"{len(skipped)} retrain requests skipped by hygiene (same incident)")

    # ledger entries of the incident that no event reports (e.g. the guard completing)
    for entry in ledger:
        d = _event_dict(entry)
        if incident is None or d.get("incident_id") != incident:
            continue
        if d.get("action") == "completed":
            add(
                _when(d["timestamp"]),
                "completed",
                "post-promotion guard passed",
                str(d.get("reason", "")),
            )

    entries.sort(key=lambda x: (x.at, x.kind != "injected"))

    registered = next((e for e in ours if e["event"] == "driftloop.model.registered"), None)
    rejected = next((e for e in ours if e["event"] == "driftloop.model.rejected"), None)
    end = next((e for e in ours if e["event"] in ROLLOUT_END), None)
    verdict = registered or rejected
    if end is not None:
        outcome: Outcome = (
            "promoted" if end["event"] == "driftloop.rollout.promoted" else "rolled_back"
        )
    elif rejected is not None:
        outcome = "rejected"
    elif skipped and not registered and not started:
        outcome = "skipped"
    else:
        outcome = "open"
    t_verdict = _when(verdict["occurred"]) if verdict else None
    t_end = _when(end["occurred"]) if end else None

    def gap(a: datetime | None, b: datetime | None) -> float | None:
        return None if a is None or b is None else round((b - a).total_seconds(), 1)

    durations = Durations(
        detect=gap(injected_at, first_alarm),
        retrain=gap(first_alarm, t_verdict),
        promote=gap(t_verdict, t_end),
        mitigate=gap(injected_at, t_end),
    )
    return Timeline(
        model_name=model_name,
        incident_id=incident,
        scenario=scenario,
        injected_at=injected_at,
        outcome=outcome,
        entries=entries,
        durations=durations,
        monitor_runs=len(monitors),
        retrain_requests=len(retrains),
        wall_seconds=wall_seconds,
        notes=notes,
    )


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f} s" if v < 600 else f"{v / 60:.1f} min"


def _offset(v: float | None) -> str:
    return "" if v is None else f"{v:+.0f} s"


def to_markdown(t: Timeline, *, chart: str | None = None) -> str:
    """The timeline as a markdown document (a table, the durations, notes)."""
    d = t.durations
    lines = [
        f"# Incident {t.incident_id or '(none)'} — {t.model_name}",
        "",
        f"**Outcome: {t.outcome.replace('_', ' ')}**"
        + (f" · scenario `{t.scenario}`" if t.scenario else "")
        + (f" · injected {t.injected_at:%Y-%m-%d %H:%M:%S} UTC" if t.injected_at else ""),
        "",
        "| time to detect | time to retrain | time to promote | **time to mitigate** |",
        "| --- | --- | --- | --- |",
        f"| {_secs(d.detect)} | {_secs(d.retrain)} | {_secs(d.promote)} "
        f"| **{_secs(d.mitigate)}** |",
        "",
        "| time (UTC) | since injection | step | detail |",
        "| --- | --- | --- | --- |",
    ]
    for e in t.entries:
        detail = e.detail.replace("|", "\\|")
        lines.append(f"| {e.at:%H:%M:%S} | {_offset(e.since_injection)} | {e.title} | {detail} |")
    lines += ["", f"Monitor windows judged since the injection: {t.monitor_runs}."]
    if t.wall_seconds is not None:
        lines.append(f"Demo wall time: {_secs(t.wall_seconds)}.")
    for note in t.notes:
        lines.append(f"- {note}")
    if chart:
        lines += ["", f"![labelled accuracy and recall over time]({chart})"]
    return "\n".join(lines) + "\n"


def rich_table(t: Timeline) -> Any:
    """The timeline as a rich Table (rich is imported here only)."""
    from rich.table import Table

    d = t.durations
    table = Table(
        title=f"incident {t.incident_id or '(none)'}: {t.outcome.replace('_', ' ')}",
        caption=(
            f"detect {_secs(d.detect)} · retrain {_secs(d.retrain)} · "
            f"promote {_secs(d.promote)} · time to mitigate {_secs(d.mitigate)}"
        ),
        show_lines=False,
    )
    table.add_column("UTC", no_wrap=True)
    table.add_column("+s", justify="right", no_wrap=True)
    table.add_column("step", max_width=24)
    table.add_column("detail", ratio=1)
    for e in t.entries:
        table.add_row(f"{e.at:%H:%M:%S}", _offset(e.since_injection), e.title, e.detail)
    return table


# --------------------------------------------------------------------------------------
# the chart
# --------------------------------------------------------------------------------------


def metric_series(
    frame: pl.DataFrame, bucket_seconds: float = 10.0, *, smooth: int = 1, min_positives: int = 1
) -> pl.DataFrame:
    """Labelled accuracy, recall and precision per time bucket of ``received_at``.

    ``frame``: predictions with ``received_at``, ``decision`` and ``label`` (null when
    no label arrived; those rows count only in ``rows``). ``smooth`` > 1 pools each
    bucket with the ``smooth - 1`` before it (a trailing window, counts summed before
    the ratios); recall and precision need ``min_positives`` in their denominator.
    Pure.
    """
    if bucket_seconds <= 0 or smooth < 1 or min_positives < 1:
        raise ValueError("bucket_seconds must be > 0, smooth and min_positives >= 1")
    needed = {"received_at", "decision", "label"}
    if missing := needed - set(frame.columns):
        raise DataError(f"predictions frame lacks {sorted(missing)}")
    every = f"{int(bucket_seconds * 1_000_000)}us"
    lab = pl.col("label").is_not_null()
    dec = pl.col("decision").cast(pl.Int64) == 1
    pos = pl.col("label").cast(pl.Int64) == 1
    counts = ("rows", "labelled", "correct", "tp", "fn", "fp")
    out = (
        frame.sort("received_at")
        .group_by_dynamic("received_at", every=every, label="left")
        .agg(
            rows=pl.len(),
            labelled=lab.sum(),
            correct=(lab & (dec == pos)).sum(),
            tp=(lab & dec & pos).sum(),
            fn=(lab & ~dec & pos).sum(),
            fp=(lab & dec & ~pos).sum(),
        )
    )
    if smooth > 1:
        out = out.with_columns(
            pl.col(c).rolling_sum(window_size=smooth, min_samples=1) for c in counts
        )
    tp, fn, fp = pl.col("tp"), pl.col("fn"), pl.col("fp")
    return out.with_columns(
        accuracy=pl.when(pl.col("labelled") > 0).then(pl.col("correct") / pl.col("labelled")),
        recall=pl.when(tp + fn >= min_positives).then(tp / (tp + fn)),
        precision=pl.when(tp + fp >= min_positives).then(tp / (tp + fp)),
    ).rename({"received_at": "at"})


_MARKED = {
    "injected",
    "first_drifted_window",
    "alarm",
    "retrain_started",
    "gate",
    "started",
    "stepped",
    "promoted",
    "rolled_back",
}


def write_chart(series: pl.DataFrame, t: Timeline, png: Path, html: Path) -> tuple[Path, Path]:
    """A PNG (matplotlib) and a self-contained HTML (plotly) of accuracy and recall over
    time with the timeline's steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    marks = [e for e in t.entries if e.kind in _MARKED]
    x = series["at"].to_list()
    title = f"{t.model_name}: incident {t.incident_id or '-'} ({t.outcome.replace('_', ' ')})"

    fig, ax = plt.subplots(figsize=(11, 5), dpi=110)
    ax.plot(x, series["accuracy"].to_list(), label="accuracy (labelled)", color="#1f77b4")
    ax.plot(x, series["recall"].to_list(), label="recall (labelled)", color="#d62728")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share")
    ax.set_xlabel("time (UTC)")
    ax.set_title(title)
    for m in marks:
        ax.axvline(
            m.at,  # type: ignore[arg-type]
            color="grey",
            linestyle="--",
            linewidth=0.8,
        )
        ax.annotate(
            m.title.replace(" (incident opened)", ""),
            xy=(m.at, 0.02),
            fontsize=7,
            rotation=90,
            ha="right",
            va="bottom",
            color="#333333",
        )
    ax.legend(loc="lower left")
    fig.autofmt_xdate()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)

    pf = go.Figure()
    pf.add_trace(go.Scatter(x=x, y=series["accuracy"].to_list(), name="accuracy (labelled)"))
    pf.add_trace(go.Scatter(x=x, y=series["recall"].to_list(), name="recall (labelled)"))
    for i, m in enumerate(marks):
        pf.add_shape(
            type="line", x0=m.at, x1=m.at, y0=0, y1=1.05, line={"dash": "dash", "width": 1}
        )
        pf.add_annotation(
            x=m.at,
            y=1.05 - 0.06 * (i % 6),
            text=m.title,
            showarrow=False,
            xanchor="left",
            font={"size": 10},
        )
    pf.update_layout(title=title, yaxis={"range": [0, 1.1]}, xaxis_title="time (UTC)")
    pf.write_html(html, include_plotlyjs=True, full_html=True)
    return png, html


# --------------------------------------------------------------------------------------
# I/O: the Prefect API, files, artifacts
# --------------------------------------------------------------------------------------


def _deployment_runs(api_url: str, flow: str, name: str, client: Any) -> list[FlowRunInfo]:
    base = api_url.rstrip("/")
    r = client.get(f"{base}/deployments/name/{flow}/{name}")
    if not r.is_success:
        return []
    body = {
        "deployments": {"id": {"any_": [r.json()["id"]]}},
        "sort": "EXPECTED_START_TIME_ASC",
        "limit": 200,
    }
    runs = client.post(f"{base}/flow_runs/filter", json=body)
    runs.raise_for_status()
    return [FlowRunInfo.from_api(run, flow) for run in runs.json()]


def collect(
    api_url: str, since: datetime, *, until: datetime | None = None
) -> tuple[list[Any], list[FlowRunInfo]]:
    """Every ``driftloop.*`` event since ``since`` and the retrain/rollout flow runs."""
    import httpx

    from driftloop import events

    evs = events.read_events(api_url, prefix=events.EVENT_PREFIX, since=since, until=until)
    try:
        with httpx.Client(timeout=10, trust_env=False) as client:
            runs = _deployment_runs(api_url, "retrain", "retrain", client)
            runs += _deployment_runs(api_url, "rollout", "rollout", client)
    except httpx.HTTPError as exc:
        raise EventError(f"reading flow runs from {api_url} failed: {exc}") from exc
    return evs, runs


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:120] or "incident"


def save(t: Timeline, directory: Path, *, chart: str | None = None) -> tuple[Path, Path]:
    """Write ``timeline-<incident>.json`` and ``.md`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"timeline-{_slug(t.incident_id or 'none')}"
    js = directory / f"{stem}.json"
    md = directory / f"{stem}.md"
    js.write_text(t.model_dump_json(indent=2))
    md.write_text(to_markdown(t, chart=chart))
    return js, md


def load(path: Path) -> Timeline:
    return Timeline.model_validate_json(Path(path).read_text())


def find_saved(root: Path, incident_id: str) -> Path | None:
    """The newest saved timeline of ``incident_id`` (or ``latest``) under ``root``."""
    pattern = (
        "timeline-*.json" if incident_id == "latest" else f"timeline-{_slug(incident_id)}.json"
    )
    found = sorted(Path(root).rglob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def artifact_key(incident_id: str | None) -> str:
    """The key of an incident's Prefect markdown artifact."""
    return f"incident-{_slug(incident_id or 'none')}"


def publish_artifact(api_url: str, t: Timeline, *, chart: str | None = None) -> str | None:
    """Create the timeline's Prefect markdown artifact (:func:`artifact_key`); its id."""
    import httpx

    body = {
        "key": artifact_key(t.incident_id),
        "type": "markdown",
        "data": to_markdown(t, chart=chart),
        "description": f"driftloop incident timeline ({t.outcome})",
    }
    try:
        r = httpx.post(f"{api_url.rstrip('/')}/artifacts/", json=body, timeout=10, trust_env=False)
    except httpx.HTTPError as exc:
        raise EventError(f"creating the timeline artifact failed: {exc}") from exc
    if not r.is_success:
        raise EventError(f"creating the timeline artifact failed: HTTP {r.status_code}: {r.text}")
    return str(r.json().get("id"))


def to_json(t: Timeline) -> str:
    return json.dumps(t.model_dump(mode="json"), indent=2)


def window(t: Timeline, pad_seconds: float = 60.0) -> tuple[datetime, datetime]:
    """The time span the timeline covers, padded (for reading the predictions to chart)."""
    times = [e.at for e in t.entries]
    if not times:
        raise DataError("an empty timeline has no time span")
    pad = timedelta(seconds=pad_seconds)
    return min(times) - pad, max(times) + pad
