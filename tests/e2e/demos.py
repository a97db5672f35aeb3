"""The end-to-end demo runs of ``test_demo.py``.

Each demo is ``driftloop demo`` in a compressed mode, as a user runs it, in a
subprocess with ``--keep-running`` (so its Prefect server is still up to be asked),
each in its own home with its own stack and ports: two users' demos on one machine,
side by side (the second ``STAGGER_SECONDS`` later). Everything they leave running is
stopped by PID (``driftloop demo --stop``) by :meth:`Demos.stop`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from driftloop.demo import DemoRun, latest_run, load_run
from tests.fixtures.world import pid_alive

REPO = Path(__file__).resolve().parents[2]
#: the demo's own time budget (``--timeout``)
DEMO_TIMEOUT = 1000
FAST = [
    "--no-live",
    "--keep-running",
    "--inject-after", "25",
    "--monitor-interval", "15",
    "--timeout", str(DEMO_TIMEOUT),
]  # fmt: skip
#: the two demos: a healthy loop on the running example (concept drift), and the same
#: drift whose retrained challenger is forced to fail on the canary. (A new category is
#: detected sooner, ~35 s against ~2.5 min, but its retrained challenger beat the
#: champion by 0.025-0.04 PR AUC in two runs and lost by 0.01 in a third, on a loaded
#: machine: the gate rightly rejected it and the demo had nothing to roll out. A concept
#: drift's challenger wins by ~0.3.)
VARIANTS: dict[str, list[str]] = {"promote": [], "rollback": ["--fail-canary"]}
#: the second demo starts this much later, so the two set-ups (the CPU-heaviest part)
#: do not coincide
STAGGER_SECONDS = 20.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DRIFTLOOP_", "PREFECT_"))}
    env["BENTOML_DO_NOT_TRACK"] = "True"
    env.pop("BENTOML_HOME", None)
    return env


def command(home: Path, *extra: str) -> list[str]:
    """``driftloop demo --home <home> ...`` with this interpreter."""
    return [sys.executable, "-m", "driftloop.cli", "demo", "--home", str(home), *extra]


def run_demo(home: Path, *extra: str, timeout: float = 1000) -> subprocess.CompletedProcess[str]:
    """Run ``driftloop demo`` to its end (``--stop`` and the like)."""
    return subprocess.run(
        command(home, *extra), cwd=REPO, env=_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@dataclass
class _Launched:
    proc: subprocess.Popen[str]
    log: Path
    started: float


class Demos:
    """Both variants, the second launched ``STAGGER_SECONDS`` after the first."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.homes = {name: base / name / "demo" for name in VARIANTS}
        self.launched: dict[str, _Launched] = {}
        self.runs: dict[str, tuple[DemoRun, str]] = {}

    def start(self) -> Demos:
        for i, (name, extra) in enumerate(VARIANTS.items()):
            if i:
                time.sleep(STAGGER_SECONDS)
            log = self.base / f"{name}.log"
            with log.open("w") as out:
                proc = subprocess.Popen(
                    command(self.homes[name], *FAST, *extra), cwd=REPO, env=_env(),
                    text=True, stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            self.launched[name] = _Launched(proc, log, time.monotonic())
        return self

    def wait(self) -> dict[str, tuple[DemoRun, str]]:
        """Wait for both demos to end; their runs and the tail of their output."""
        for name, launched in self.launched.items():
            if name in self.runs:
                continue
            left = max(1.0, DEMO_TIMEOUT + 180 - (time.monotonic() - launched.started))
            try:
                code: int | str = launched.proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                launched.proc.terminate()
                code = "timed out"
            output = f"after {time.monotonic() - launched.started:.0f} s: exit {code}\n"
            output += launched.log.read_text(errors="replace")[-10000:]
            run_dir = latest_run(self.homes[name])
            assert run_dir is not None, output
            self.runs[name] = (load_run(run_dir), output)
        return self.runs

    def stop(self) -> list[str]:
        """Stop what the demos keep running (by PID); what still runs afterwards."""
        problems: list[str] = []
        for launched in self.launched.values():
            if launched.proc.poll() is None:
                launched.proc.kill()
                launched.proc.wait(timeout=30)
        for name in self.launched:
            stopped = run_demo(self.homes[name], "--stop", timeout=180)
            if stopped.returncode != 0:
                problems.append(f"{name}: demo --stop failed: {stopped.stderr[-2000:]}")
        time.sleep(1.0)
        for name in self.launched:
            run_dir = latest_run(self.homes[name])
            if run_dir is None:
                continue
            run = load_run(run_dir)
            for rec in (run.server, run.worker, run.router):
                if rec is not None and pid_alive(rec.pid):
                    problems.append(f"{name}: {rec.name} (pid {rec.pid}) still runs")
        return problems
