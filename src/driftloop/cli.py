"""The ``driftloop`` command line. Settings are read here, at the edge.

Every command turns a :class:`~driftloop.errors.DriftloopError` into a one-line
message on stderr and exit code 1; typer rejects bad arguments with exit code 2.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from driftloop.errors import DriftloopError
from driftloop.settings import Settings, get_settings

app = typer.Typer(
    name="driftloop",
    help="driftloop: serve, log, monitor, retrain, canary, promote or roll back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


def _settings(**overrides: Any) -> Settings:
    s = get_settings(**{k: v for k, v in overrides.items() if v is not None})
    s.apply_environment()
    return s


def _parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not an ISO-8601 time", param_hint=name) from exc
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@app.command()
def simulate(
    events: Annotated[int, typer.Option(min=1, max=50_000_000, help="rows to generate")] = 200_000,
    seed: Annotated[int, typer.Option(min=0, help="random seed (same seed, same stream)")] = 0,
    scenario: Annotated[
        str, typer.Option(help="stable | covariate_shift | new_category | concept_drift | data_break")
    ] = "stable",
    start: Annotated[str | None, typer.Option(help="first event time, ISO-8601 (UTC)")] = None,
    days: Annotated[float, typer.Option(min=0.001, max=3650, help="length of the stream")] = 14.0,
    drift_start: Annotated[
        str | None, typer.Option(help="when the scenario begins, ISO-8601 (default: 60 % in)")
    ] = None,
    append: Annotated[bool, typer.Option(help="append instead of overwriting the table")] = False,
    data_root: Annotated[str | None, typer.Option(help="overrides DRIFTLOOP_DATA_ROOT")] = None,
) -> None:
    """Generate a card-transaction stream and write it to the Delta table `transactions`."""
    from driftloop import jobs
    from driftloop.simulate import SCENARIOS, SimulationConfig

    if scenario not in SCENARIOS:
        raise typer.BadParameter(f"{scenario!r}; choose one of {', '.join(SCENARIOS)}", param_hint="--scenario")
    settings = _settings(data_root=data_root)
    cfg_kwargs: dict[str, Any] = {"n_events": events, "seed": seed, "scenario": scenario, "days": days}
    if (t := _parse_time(start, "--start")) is not None:
        cfg_kwargs["start"] = t
    if (t := _parse_time(drift_start, "--drift-start")) is not None:
        cfg_kwargs["drift_start"] = t
    cfg = SimulationConfig(**cfg_kwargs)
    t0 = time.perf_counter()
    version = jobs.generate_history(settings, cfg, mode="append" if append else "overwrite")
    dt = time.perf_counter() - t0
    console.print(
        f"wrote {events:,} transactions ({scenario}, seed {seed}) to "
        f"{settings.table(jobs.TRANSACTIONS)} (Delta version {version}) in {dt:.2f} s"
    )


@app.command()
def train(
    as_of: Annotated[
        str | None, typer.Option(help="train on labels that had arrived by this time (ISO-8601)")
    ] = None,
    n_estimators: Annotated[int, typer.Option(min=1, max=5000)] = 400,
    max_depth: Annotated[int, typer.Option(min=1, max=16)] = 6,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    stage: Annotated[str, typer.Option(help="stage label: champion | candidate")] = "champion",
    data_root: Annotated[str | None, typer.Option(help="overrides DRIFTLOOP_DATA_ROOT")] = None,
) -> None:
    """Train a model on the history with Feast point-in-time features and register it."""
    from driftloop import jobs
    from driftloop.training import TrainConfig

    if stage not in ("champion", "candidate"):
        raise typer.BadParameter("must be champion or candidate", param_hint="--stage")
    settings = _settings(data_root=data_root)
    cutoff = _parse_time(as_of, "--as-of")
    config = TrainConfig(n_estimators=n_estimators, max_depth=max_depth, seed=seed)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("loading history", total=1.0)

        def progress(stage_name: str, fraction: float) -> None:
            bar.update(task, description=stage_name, completed=fraction)

        history = jobs.load_history(settings, end=cutoff)
        progress("features", 0.0)
        jobs.prepare_features(settings, history)
        tag, result = jobs.train_and_register(
            settings, history, config, as_of=cutoff, progress=progress, stage=stage
        )
    m = result.metrics
    console.print(
        f"registered [bold]{tag}[/] ({stage}) in {result.seconds:.1f} s training: "
        f"ROC AUC {m.roc_auc:.3f}, PR AUC {m.pr_auc:.3f}, precision {m.precision:.3f}, "
        f"recall {m.recall:.3f} at threshold {m.threshold:.3f} on {m.n:,} holdout rows"
    )


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List registered model versions with their lineage and stage."""
    from driftloop import registry

    settings = _settings()
    infos = registry.list_models(settings.model_name)
    if as_json:
        console.print_json(json.dumps([i.model_dump(mode="json") for i in infos]))
        return
    table = Table(title=f"models of {settings.model_name}")
    for col in ("tag", "stage", "created", "ROC AUC", "recall", "parent", "incident", "mode"):
        table.add_column(col)
    for i in infos:
        table.add_row(
            i.tag,
            i.stage,
            i.created[:19],
            f"{i.metrics.get('roc_auc', float('nan')):.3f}",
            f"{i.metrics.get('recall', float('nan')):.3f}",
            i.lineage.parent or "-",
            i.lineage.incident_id or "-",
            i.lineage.mode,
        )
    console.print(table)


@app.command()
def build(
    model_tag: Annotated[str, typer.Option(help="explicit model tag, name:version")],
) -> None:
    """Build the model Bento (from bentofile.yaml) pinning one model version."""
    from driftloop.bento import build_model_bento

    _settings()
    if ":" not in model_tag or model_tag.endswith(":latest"):
        raise typer.BadParameter("must be name:version (never :latest)", param_hint="--model-tag")
    t0 = time.perf_counter()
    tag = build_model_bento(model_tag)
    console.print(f"built Bento [bold]{tag}[/] for {model_tag} in {time.perf_counter() - t0:.1f} s")
    console.print(f"serve it with: bentoml serve {tag} --host 127.0.0.1 --port 3000")


@app.command()
def ship(
    data_root: Annotated[str | None, typer.Option(help="overrides DRIFTLOOP_DATA_ROOT")] = None,
) -> None:
    """Recover: ship every spooled prediction and label segment into Delta now."""
    from driftloop import predlog

    settings = _settings(data_root=data_root)
    for result in predlog.ship_all(settings):
        console.print(result.model_dump_json())


@app.command()
def webhook(
    port: Annotated[int, typer.Option(min=1, max=65535, help="port on DRIFTLOOP_HOST")] = 8787,
    tolerance: Annotated[float, typer.Option(min=1, help="max clock skew / age, seconds")] = 300.0,
) -> None:
    """Serve the authenticated webhook endpoint (POST /hooks) that feeds Prefect."""
    import uvicorn

    from driftloop.errors import ConfigError
    from driftloop.webhook import create_app

    settings = _settings()
    if settings.webhook_secret is None:
        raise ConfigError("set DRIFTLOOP_WEBHOOK_SECRET to serve webhooks")
    if not settings.prefect_api_url:
        raise ConfigError("set DRIFTLOOP_PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    app_ = create_app(
        secret=settings.webhook_secret.get_secret_value(),
        api_url=settings.prefect_api_url,
        state_dir=settings.state_dir.resolve(),
        tolerance=tolerance,
    )
    uvicorn.run(app_, host=settings.host, port=port, log_level="warning", access_log=False)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except DriftloopError as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
