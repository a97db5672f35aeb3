"""The CLI: clear help, one-line errors and non-zero exits on bad arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DRIFTLOOP = str(Path(sys.executable).with_name("driftloop"))


def run(*args: str, env_root: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ)
    if env_root is not None:
        env.update(
            DRIFTLOOP_DATA_ROOT=str(env_root / "data"),
            DRIFTLOOP_STATE_DIR=str(env_root / "state"),
            DRIFTLOOP_BENTOML_HOME=str(env_root / "bentoml"),
        )
    return subprocess.run([DRIFTLOOP, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("command", ["simulate", "train", "models", "build", "ship"])
def test_help_is_clear(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0
    assert "Usage" in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["simulate", "--events", "0"], "--events"),
        (["simulate", "--scenario", "nope"], "--scenario"),
        (["simulate", "--start", "yesterday"], "--start"),
        (["train", "--stage", "prod"], "--stage"),
        (["build", "--model-tag", "fraud:latest"], "--model-tag"),
    ],
)
def test_bad_arguments_exit_non_zero_with_a_message(
    args: list[str], needle: str, tmp_path: Path
) -> None:
    out = run(*args, env_root=tmp_path)
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_train_without_history_is_a_one_line_error(tmp_path: Path) -> None:
    out = run("train", env_root=tmp_path)
    assert out.returncode == 1
    assert "driftloop simulate" in out.stderr
    assert "Traceback" not in out.stderr


def test_simulate_writes_delta(tmp_path: Path) -> None:
    out = run(
        "simulate",
        "--events",
        "2000",
        "--seed",
        "3",
        "--scenario",
        "new_category",
        env_root=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    import polars as pl

    df = pl.read_delta(str(tmp_path / "data" / "transactions"))
    assert df.height == 2000
