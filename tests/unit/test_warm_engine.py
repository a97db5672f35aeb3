"""The warm engine's reading of ``prefect.yaml`` and its load-time environment rule."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from driftloop.warm_engine import (
    CLIENT,
    client_command,
    entrypoints_of,
    load_time_mismatch,
    run_env_of,
)

REPO = Path(__file__).resolve().parents[2]


def test_the_projects_prefect_yaml_gives_every_flow_file_and_the_shared_run_env() -> None:
    files = entrypoints_of(REPO / "prefect.yaml")
    assert {"flows/monitor.py", "flows/retrain.py", "flows/rollout.py"} <= set(files)
    assert all((REPO / f).is_file() for f in files)
    # OpenMP must sleep at barriers in flow runs: the engine loads XGBoost with it
    assert run_env_of(REPO / "prefect.yaml")["OMP_WAIT_POLICY"] == "PASSIVE"


def test_only_the_env_every_deployment_shares_is_adopted(tmp_path: Path) -> None:
    spec = tmp_path / "prefect.yaml"
    spec.write_text(
        textwrap.dedent(
            """\
            definitions:
              pool: &pool
                name: p
                job_variables: {env: {OMP_WAIT_POLICY: PASSIVE, A: "1"}}
            deployments:
              - {name: one, entrypoint: "flows/a.py:a", work_pool: *pool}
              - name: two
                entrypoint: "flows/b.py:b"
                work_pool:
                  name: p
                  job_variables: {env: {OMP_WAIT_POLICY: PASSIVE, A: "2"}}
              - {name: three, entrypoint: "flows/a.py:other", work_pool: *pool}
            """
        )
    )
    assert entrypoints_of(spec) == ["flows/a.py", "flows/b.py"]
    assert run_env_of(spec) == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_a_missing_or_broken_prefect_yaml_preloads_nothing(tmp_path: Path) -> None:
    assert entrypoints_of(tmp_path / "absent.yaml") == []
    broken = tmp_path / "prefect.yaml"
    broken.write_text("deployments: [unclosed")
    assert entrypoints_of(broken) == [] and run_env_of(broken) == {}


def test_load_time_variables_must_match_others_may_differ() -> None:
    engine = {"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/bin", "DRIFTLOOP_MODEL_NAME": "a"}
    same = {"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin", "DRIFTLOOP_MODEL_NAME": "b"}
    assert load_time_mismatch(same, engine) == []
    assert load_time_mismatch({"OPENBLAS_NUM_THREADS": "1", **same}, engine) == [
        "OPENBLAS_NUM_THREADS"
    ]
    assert load_time_mismatch({}, engine) == ["OMP_WAIT_POLICY"]


def test_the_client_command_runs_the_standard_library_client_in_isolated_mode() -> None:
    command = client_command(Path("/run/x.sock"))
    assert command == [sys.executable, "-I", "-S", str(CLIENT), "/run/x.sock"]
    # the client must stay importable without site-packages
    source = CLIENT.read_text()
    assert "import driftloop" not in source and "import prefect" not in source
