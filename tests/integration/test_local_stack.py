"""``driftloop up``'s stack on a real ``prefect server start``: the pool is created first,
the worker starts while ``prefect deploy --all`` runs, a failing automation action shows
in the server log, and ``down`` stops both by PID."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import httpx
import pytest

from driftloop import events as ev
from driftloop import local_stack
from driftloop.prefect_local import LocalPrefectServer, ensure_process_pool, port_is_free
from tests.fixtures.world import pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

#: an automation whose action cannot run (no such deployment): the server logs
#: "Action failed"
BROKEN = {
    "name": "broken",
    "trigger": {
        "type": "event",
        "posture": "Reactive",
        "expect": ["driftloop.retrain.skipped"],
        "match": {"prefect.resource.id": "driftloop.model.*"},
        "threshold": 1,
        "within": 0,
    },
    "actions": [
        {
            "type": "run-deployment",
            "source": "selected",
            "deployment_id": str(uuid.UUID(int=0)),
            "parameters": {},
        }
    ],
}


def test_up_deploys_while_the_worker_starts_and_down_stops_both(tmp_path: Path) -> None:
    state = tmp_path / "state"
    info = local_stack.up(state, {"DRIFTLOOP_STATE_DIR": str(state)}, root=REPO)
    try:
        api = info.api_url
        assert httpx.get(f"{api}/health", timeout=10).json() is True
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

        # a failing automation action is found in the server's log
        log = LocalPrefectServer(Path(info.prefect_home))  # the log of the stack's server
        httpx.post(f"{api}/automations/", json=BROKEN, timeout=10).raise_for_status()
        time.sleep(1)  # the triggers service picks automations up asynchronously
        offset = log.log_offset()
        ev.emit(api, ev.EventName.RETRAIN_SKIPPED, {"model_name": "fraud", "reason": "x"})
        deadline = time.monotonic() + 20
        while not log.failed_actions(offset) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert log.failed_actions(offset)
    finally:
        stopped = local_stack.down(state)
    assert stopped is not None
    assert not pid_alive(info.server_pid) and not pid_alive(info.worker_pid)
    for pgid in (info.server_pid, info.worker_pid):
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)  # no process of either group is left
    assert port_is_free(info.port)
