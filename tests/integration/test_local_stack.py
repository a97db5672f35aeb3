"""``driftloop up``'s stack on a real ``prefect server start``: the pool is created first,
the worker starts while ``prefect deploy --all`` runs, and ``down`` stops both by PID."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from driftloop import local_stack
from driftloop.prefect_local import ensure_process_pool
from tests.fixtures.world import pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_up_deploys_while_the_worker_starts_and_down_stops_both(tmp_path: Path) -> None:
    state = tmp_path / "state"
    info = local_stack.up(state, {"DRIFTLOOP_STATE_DIR": str(state)}, root=REPO)
    try:
        api = info.api_url
        pool = httpx.get(f"{api}/work_pools/{info.pool}", timeout=10).json()
        # the pool carries the process worker's job template, as `prefect work-pool create`
        assert pool["type"] == "process"
        assert "command" in pool["base_job_template"]["variables"]["properties"]
        ensure_process_pool(api, info.pool)  # exists already: nothing to do, no error
        workers = httpx.post(
            f"{api}/work_pools/{info.pool}/workers/filter", json={}, timeout=10
        ).json()
        assert len(workers) == 1
        for name, flow in [("monitor", "monitor"), ("retrain", "retrain"), ("rollout", "rollout")]:
            assert local_stack.deployment_id(api, flow, name)
        assert pid_alive(info.server_pid) and pid_alive(info.worker_pid)
    finally:
        stopped = local_stack.down(state)
    assert stopped is not None
    assert not pid_alive(info.server_pid) and not pid_alive(info.worker_pid)
