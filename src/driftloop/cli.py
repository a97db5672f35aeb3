"""The ``driftloop`` command line. Settings are read here, at the edge.

Every command turns a :class:`~driftloop.errors.DriftloopError` into a one-line
message on stderr and exit code 1; typer rejects bad arguments with exit code 2.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
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
        str,
        typer.Option(help="stable | covariate_shift | new_category | concept_drift | data_break"),
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
        raise typer.BadParameter(
            f"{scenario!r}; choose one of {', '.join(SCENARIOS)}", param_hint="--scenario"
        )
    settings = _settings(data_root=data_root)
    cfg_kwargs: dict[str, Any] = {
        "n_events": events,
        "seed": seed,
        "scenario": scenario,
        "days": days,
    }
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


@app.command()
def up(
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Prefect server port (default: free)")
    ] = None,
    stop: Annotated[bool, typer.Option("--stop", help="stop the running stack (by PID)")] = False,
) -> None:
    """Start a local Prefect server, deploy prefect.yaml and start a process worker."""
    import os

    from driftloop import local_stack

    settings = _settings()
    if stop:
        stopped = local_stack.down(settings.state_dir)
        if stopped is None:
            console.print(f"no stack recorded under {settings.state_dir.resolve()}")
        else:
            console.print(
                f"stopped worker (pid {stopped.worker_pid}) and server (pid {stopped.server_pid})"
            )
        return
    # flow runs start in the checkout (prefect.yaml's pull step): pass absolute locations
    env = {k: v for k, v in os.environ.items() if k.startswith("DRIFTLOOP_")}
    env["DRIFTLOOP_STATE_DIR"] = str(settings.state_dir.resolve())
    env["DRIFTLOOP_FEAST_REPO"] = str(settings.feast_repo.resolve())
    if "BENTOML_HOME" in os.environ:
        env["BENTOML_HOME"] = os.environ["BENTOML_HOME"]
    t0 = time.perf_counter()
    with console.status("starting the Prefect server, the worker and the deployments"):
        info = local_stack.up(settings.state_dir, env, port=port)
    console.print(f"driftloop stack up in {time.perf_counter() - t0:.0f} s")
    console.print(f"  Prefect UI   {info.ui_url}")
    console.print(f"  Prefect API  {info.api_url}")
    console.print(f"  worker       pool {info.pool!r}, pid {info.worker_pid}")
    console.print(f"  server       pid {info.server_pid}, home {info.prefect_home}")
    console.print(f"  use it:      export PREFECT_API_URL={info.api_url}")
    console.print(f"               export DRIFTLOOP_PREFECT_API_URL={info.api_url}")
    console.print("  stop with:   driftloop up --stop")


# -- rollout: status, promote, rollback, weights, serve ------------------------------


def _rollout_runner(settings: Settings) -> Any:  # driftloop.canary.RolloutRunner
    import os

    from driftloop.canary import RolloutRunner
    from driftloop.plane.local import LocalPlane

    api_url = settings.prefect_api_url or os.environ.get("PREFECT_API_URL")
    return RolloutRunner(settings, LocalPlane(settings), api_url=api_url)


def _print_transition(record: Any) -> None:
    state = record.state
    last = state.history[-1]
    console.print(
        f"{last.event.rsplit('.', 1)[-1]} by {last.actor}: {last.from_phase.value} -> "
        f"{last.to_phase.value}, weights {dict(last.weights)}; {last.reason}"
    )


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Arms with their roles, weights and health; the rollout phase; the last incident."""
    from driftloop.canary import status_report

    report = status_report(_rollout_runner(_settings()))
    if as_json:
        console.print_json(report.model_dump_json())
        return
    title = f"{report.model_name}: {report.phase}"
    if report.incident_id:
        title += f" (incident {report.incident_id})"
    table = Table(title=title)
    for col in ("arm", "role", "bento", "weight %", "shadow", "status", "endpoint"):
        table.add_column(col, overflow="fold")
    for a in report.arms:
        table.add_row(
            a.name,
            a.role,
            a.bento_tag,
            str(a.weight),
            "yes" if a.shadow else "",
            a.status,
            a.endpoint or "-",
        )
    console.print(table)
    r = report.rollout
    if r:
        last = (r.get("last_analysis") or {}).get("reason") or r.get("last_transition") or "-"
        console.print(
            f"rollout of {r['challenger']}: {r['phase']}, step {r['step']} of {r['steps']}, "
            f"canary {r['canary_percent']} %; last: {last}"
        )
    if report.last_incident:
        i = report.last_incident
        console.print(
            f"last incident {i['incident_id']}: {i['action']} at {i['at'][:19]} "
            f"by {i['actor']}: {i['reason']}"
        )


@app.command()
def promote(
    reason: Annotated[str, typer.Option(help="why, for the ledger")] = "manual promote",
) -> None:
    """Promote the canary to 100 % now (ledger: actor human)."""
    _print_transition(_rollout_runner(_settings()).manual("promote", reason=reason))


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="why, for the ledger")] = "manual rollback",
) -> None:
    """Roll back to the last known good champion (ledger: actor human)."""
    _print_transition(_rollout_runner(_settings()).manual("rollback", reason=reason))


@app.command()
def weights(
    split: Annotated[
        list[str], typer.Argument(help="arm=percent pairs: champion=90 canary=10 (or arm names)")
    ],
    reason: Annotated[str, typer.Option(help="why, for the ledger")] = "manual weights",
) -> None:
    """Set the champion/canary split by hand (ledger: actor human)."""
    parsed: dict[str, int] = {}
    for item in split:
        name, _, value = item.partition("=")
        if not name or not value.strip().isdigit():
            raise typer.BadParameter(f"{item!r} is not arm=percent", param_hint="SPLIT")
        parsed[name.strip()] = int(value)
    _print_transition(_rollout_runner(_settings()).manual("weights", weights=parsed, reason=reason))


@app.command()
def serve(
    port: Annotated[int, typer.Option(min=1, max=65535, help="router port")] = 3000,
    bento: Annotated[
        str | None, typer.Option(help="Bento to serve if no champion runs (default: known good)")
    ] = None,
    stop: Annotated[
        bool, typer.Option("--stop", help="stop every arm of the serving plane (by PID)")
    ] = False,
) -> None:
    """Run the champion arm (the serving plane) and the router in front of it.

    The arms belong to the plane and keep running when the router stops; a later
    `driftloop serve` reattaches to them, `driftloop serve --stop` stops them.
    """
    import os

    from driftloop.bento import project_root
    from driftloop.errors import ServingError

    settings = _settings()
    if stop:
        from driftloop.plane.local import LocalPlane

        plane = LocalPlane(settings)
        names = sorted(plane.actual().arms)
        plane.stop_all()
        console.print(f"stopped {len(names)} arm(s): {', '.join(names) or '-'}")
        return
    runner = _rollout_runner(settings)
    with console.status("starting the champion arm"):
        champion = runner.ensure_champion(bento)
    root = project_root()
    if not (root / "bentos" / "router.py").exists():
        raise ServingError(f"bentos/router.py not found under {root}: run from a checkout")
    console.print(f"champion {champion.bento_tag} (arm {champion.name}) is serving")
    console.print(f"router on http://{settings.host}:{port} (Ctrl+C stops the router only)")
    from driftloop.routing import router_home

    env = {
        **os.environ,
        "DRIFTLOOP_STATE_DIR": str(settings.state_dir.resolve()),
        # a home of its own: an arm starting empties its home's Prometheus directory
        "BENTOML_HOME": str(router_home(settings.state_dir, settings.model_name)),
    }
    cmd = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "bentos.router:Router",
        "--host",
        settings.host,
        "--port",
        str(port),
        "--working-dir",
        str(root),
    ]
    raise typer.Exit(_run_until_stopped(cmd, env, root))


def _run_until_stopped(cmd: list[str], env: dict[str, str], cwd: Path) -> int:
    """Run a server in its own session; on Ctrl-C or SIGTERM stop its whole process tree
    (BentoML workers run in sessions of their own) by PID, then return its exit code."""
    import signal
    import subprocess

    from driftloop.servers import stop_tree

    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _term)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_tree(proc.pid, timeout=15)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def demo(
    scenario: Annotated[
        str,
        typer.Option(
            help="drift to inject: concept_drift | covariate_shift | new_category | data_break"
        ),
    ] = "concept_drift",
    speed: Annotated[
        float | None, typer.Option(min=1, help="simulated seconds per wall second [2880]")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(min=1, max=2000, help="transactions per second [120]")
    ] = None,
    inject_after: Annotated[
        float | None, typer.Option(min=0, help="seconds of traffic before the drift [40]")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=30, help="give up after this many seconds [600]")
    ] = None,
    monitor_interval: Annotated[
        float | None, typer.Option(min=5, help="monitor schedule, seconds [20]")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="random seed of the world [1]")] = None,
    fail_canary: Annotated[
        bool, typer.Option(help="start the challenger with injected errors (it must roll back)")
    ] = False,
    keep_running: Annotated[
        bool, typer.Option(help="leave the stack up at the end (stop it with --stop)")
    ] = False,
    stop: Annotated[bool, typer.Option("--stop", help="stop a demo left running")] = False,
    home: Annotated[str, typer.Option(help="where demo runs are kept")] = ".driftloop/demo",
    live: Annotated[
        bool | None, typer.Option("--live/--no-live", help="live view (default: on a terminal)")
    ] = None,
) -> None:
    """Run the whole adaptive loop on the embedded stack, inject drift, show the timeline."""
    import warnings
    from pathlib import Path

    from driftloop.demo import FAIL_CANARY_ENV, DemoOptions, run_demo, stop_demo

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # third-party noise

    if stop:
        if stop_demo(Path(home), console=console) is None:
            console.print(f"no demo run under {home}")
        return
    given = {
        "speed": speed,
        "rate": rate,
        "inject_after_seconds": inject_after,
        "timeout_seconds": timeout,
        "monitor_interval_seconds": monitor_interval,
        "seed": seed,
    }
    options = DemoOptions(
        home=Path(home),
        scenario=scenario,
        keep_running=keep_running,
        live_view=live,
        canary_env=dict(FAIL_CANARY_ENV) if fail_canary else {},
        **{k: v for k, v in given.items() if v is not None},
    )
    result = run_demo(get_settings(), options=options, console=console)
    d = result.timeline.durations if result.timeline is not None else None
    console.print(
        f"[bold]{result.outcome}[/] in {result.wall_seconds:.0f} s "
        f"(set-up {result.setup_seconds:.0f} s)"
        + (f"; time to mitigate {d.mitigate:.0f} s" if d and d.mitigate is not None else "")
    )
    if result.outcome not in ("promoted", "rolled_back"):
        raise typer.Exit(3)


@app.command()
def timeline(
    incident: Annotated[str, typer.Argument(help="incident id, or 'latest'")] = "latest",
    home: Annotated[str, typer.Option(help="where demo runs are kept")] = ".driftloop/demo",
    api_url: Annotated[
        str | None, typer.Option(help="rebuild from this Prefect API (default: saved timeline)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show an incident's timeline again (saved by the demo, or rebuilt from Prefect)."""
    from datetime import timedelta
    from pathlib import Path

    from driftloop import timeline as tl
    from driftloop.ledger import Ledger

    settings = _settings()
    url = api_url or settings.prefect_api_url
    if url:
        since = datetime.now(UTC) - timedelta(days=7)
        evs, runs = tl.collect(url, since)
        t = tl.build_timeline(
            evs,
            model_name=settings.model_name,
            incident_id=None if incident == "latest" else incident,
            flow_runs=runs,
            ledger=Ledger.for_settings(settings).entries(model_name=settings.model_name),
        )
    else:
        path = tl.find_saved(Path(home), incident)
        if path is None:
            raise typer.BadParameter(f"no saved timeline for {incident!r} under {home}")
        t = tl.load(path)
    if as_json:
        console.print_json(t.model_dump_json())
        return
    console.print(tl.rich_table(t))
    for note in t.notes:
        console.print(f"  - {note}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except DriftloopError as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
