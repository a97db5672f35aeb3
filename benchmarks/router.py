"""Router: splitter overhead against calling the model arm directly, and rollback time.

In one run, on one world (history, Feast, a champion Bento):

1. **Overhead.** The champion runs as a LocalPlane arm (``bentoml serve`` of its
   Bento) with the router (``bentos/router.py``) in front. Rounds of ``--requests``
   POST /predict at concurrency 16 go alternately straight to the arm and through
   the router; requests/s, p50 and p99 per path are the medians over the rounds,
   and the ratio of router to direct throughput is the median of the per-round
   ratios (alternating rounds share the machine's load, which other work on the
   same two cores changes from minute to minute). CPU seconds per request of each
   process are measured from /proc. Floor: the router keeps >= 70 % of the direct
   throughput.
2. **Rollback time.** A challenger whose every request fails
   (``DRIFTLOOP_FAULT_ERROR_RATE=1``) is rolled out by the real rollout flow (a
   local Prefect server) with the *default* policy and analysis interval, under
   client traffic at concurrency 8. Measured from the first failed client request:
   the rollback decision (the ledger entry), the last failed client request, and
   the canary retired (the flow's end). Floor: weights back to the champion within
   30 s.

    python benchmarks/router.py [--requests 1500] [--rounds 5] [--skip-rollback]

Prints a table and writes benchmarks/results/router.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as c  # noqa: E402

CONCURRENCY = 16
FLOOR_RATIO = 0.70
FLOOR_ROLLBACK_SECONDS = 30.0


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    from driftloop.plane.local import descendants

    return [pid, *(p.pid for p in descendants(pid))]


def overhead(world: c.World, arm_url: str, arm_pid: int, router: c.Server, args: Any) -> dict:
    def body(i: int) -> dict:
        return {"transaction": world.request(i)}

    for url in (arm_url, router.url):  # warm up both paths (connections, caches)
        c.run_load(f"{url}/predict", body, requests=200, concurrency=CONCURRENCY)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        row: dict[str, Any] = {"round": r + 1}
        for name, url in (("direct", arm_url), ("router", router.url)):
            before = (cpu_seconds(tree(arm_pid)), cpu_seconds(tree(router.pid)))
            result = c.run_load(
                f"{url}/predict", body, requests=args.requests, concurrency=CONCURRENCY
            )
            after = (cpu_seconds(tree(arm_pid)), cpu_seconds(tree(router.pid)))
            row[name] = {
                **result.summary(),
                "arm_cpu_ms_per_request": (after[0] - before[0]) / args.requests * 1000,
                "router_cpu_ms_per_request": (after[1] - before[1]) / args.requests * 1000,
            }
        row["ratio"] = row["router"]["requests_per_second"] / row["direct"]["requests_per_second"]
        rounds.append(row)
        print(
            f"round {r + 1}: direct {row['direct']['requests_per_second']:.0f} req/s, "
            f"router {row['router']['requests_per_second']:.0f} req/s ({row['ratio']:.0%})"
        )

    def med(path: str, key: str) -> float:
        return statistics.median(r[path][key] for r in rounds)

    summary = {
        path: {
            key: med(path, key)
            for key in (
                "requests_per_second",
                "p50_ms",
                "p99_ms",
                "arm_cpu_ms_per_request",
                "router_cpu_ms_per_request",
            )
        }
        for path in ("direct", "router")
    }
    errors = sum(r[p]["errors"] for r in rounds for p in ("direct", "router"))
    ratio = statistics.median(r["ratio"] for r in rounds)
    return {
        "concurrency": CONCURRENCY,
        "requests_per_round": args.requests,
        "rounds": rounds,
        **summary,
        "errors": errors,
        "router_to_direct_throughput": ratio,
        "floor": FLOOR_RATIO,
        "meets_floor": ratio >= FLOOR_RATIO,
    }


class Client:
    """Background traffic through the router; keeps (time, status) of every answer."""

    def __init__(self, world: c.World, url: str, concurrency: int = 8) -> None:
        self.world, self.url, self.concurrency = world, url, concurrency
        self.answers: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(concurrency)
        ]

    def _run(self, w: int) -> None:
        i = w
        with httpx.Client(timeout=30, trust_env=False) as http:
            while not self._stop.is_set():
                try:
                    status = http.post(
                        f"{self.url}/predict", json={"transaction": self.world.request(i)}
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((time.time(), status))
                i += self.concurrency

    def __enter__(self) -> Client:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def rollback_time(world: c.World, settings: Any, router: c.Server, root: Path) -> dict:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from driftloop import registry
    from driftloop.canary import DEFAULT_ANALYSIS_INTERVAL_SECONDS, RolloutOptions, bento_for_model
    from driftloop.ledger import Ledger
    from driftloop.prefect_local import LocalPrefectServer
    from driftloop.rollout import RolloutPolicy

    m = registry.load_model(world.model_tag)
    challenger = registry.save_model(
        "fraud",
        booster=m.booster,
        encoder=m.encoder,
        threshold=m.threshold,
        metrics=m.metadata["metrics"],
        reference=m.reference(),
        lineage=registry.lineage_of(m.metadata),
        stage="candidate",
    )
    bento = bento_for_model(challenger)
    server = LocalPrefectServer(root / "prefect").start()
    try:
        os.environ["PREFECT_API_URL"] = server.api_url
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            from flows.rollout import rollout

            policy = RolloutPolicy.from_settings(settings)
            options = RolloutOptions(canary_env={"DRIFTLOOP_FAULT_ERROR_RATE": "1.0"})
            with Client(world, router.url) as client:
                time.sleep(2)
                started = time.time()
                outcome = rollout(challenger, bento, incident_id="bench-rollback", options=options)
                ended = time.time()
                time.sleep(2)
    finally:
        server.stop()
    entries = Ledger.for_settings(settings).entries(incident_id="bench-rollback")
    decided = next(e for e in entries if e.action == "rolled_back").timestamp.timestamp()
    canary_on = next(e for e in entries if e.action == "started").timestamp.timestamp()
    failures = [t for t, s in client.answers if s != 200]
    first_fail = min(failures) if failures else canary_on
    last_fail = max(failures) if failures else canary_on
    during = [(t, s) for t, s in client.answers if canary_on <= t <= decided]
    return {
        "analysis_interval_seconds": DEFAULT_ANALYSIS_INTERVAL_SECONDS,
        "policy": {
            "steps": policy.steps,
            "bake_seconds": policy.bake_seconds,
            "min_samples": policy.min_samples,
            "max_error_rate": policy.max_error_rate,
        },
        "outcome": outcome.phase,
        "reason": outcome.reason,
        "flow_seconds": ended - started,
        "canary_deploy_seconds": canary_on - started,
        "breach_to_rollback_decision_seconds": decided - first_fail,
        "breach_to_last_failed_request_seconds": last_fail - first_fail,
        "breach_to_canary_retired_seconds": ended - first_fail,
        "failed_requests": len(failures),
        "requests_while_canary_served": len(during),
        "failed_share_while_canary_served": (
            sum(s != 200 for _, s in during) / len(during) if during else 0.0
        ),
        "floor_seconds": FLOOR_ROLLBACK_SECONDS,
        "meets_floor": (decided - first_fail) <= FLOOR_ROLLBACK_SECONDS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1500, help="requests per round and path")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-rollback", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        root = Path(tmp)
        print("building the world (history, features, champion) ...", flush=True)
        world = c.build_world(root / "world")
        os.environ["DRIFTLOOP_STATE_DIR"] = world.env["DRIFTLOOP_STATE_DIR"]
        settings = world.settings()

        from driftloop.canary import RolloutRunner, bento_for_model
        from driftloop.plane.local import LocalPlane

        plane = LocalPlane(settings)
        router = None
        try:
            champion = RolloutRunner(settings, plane).ensure_champion(
                bento_for_model(world.model_tag)
            )
            record = plane.actual().arms[champion.name]
            from driftloop.routing import router_home

            router = c.start_bentoml(
                "bentos.router:Router",
                {"BENTOML_HOME": str(router_home(settings.state_dir, settings.model_name))},
                root / "router.log",
            )
            print("overhead: direct vs router ...", flush=True)
            over = overhead(world, record.endpoint, record.main.pid, router, args)
            rollback = None
            if not args.skip_rollback:
                print("rollback time: a failing challenger, default policy ...", flush=True)
                rollback = rollback_time(world, settings, router, root)
        finally:
            if router is not None:
                router.stop()
            plane.stop_all()

    rows = [
        [
            path,
            over[path]["requests_per_second"],
            over[path]["p50_ms"],
            over[path]["p99_ms"],
            over[path]["arm_cpu_ms_per_request"],
            over[path]["router_cpu_ms_per_request"],
        ]
        for path in ("direct", "router")
    ]
    print()
    header = ["path", "req/s", "p50 ms", "p99 ms", "arm cpu ms/req", "router cpu ms/req"]
    c.print_table(rows, header)
    print(
        f"\nrouter keeps {over['router_to_direct_throughput']:.0%} of direct throughput "
        f"(floor {FLOOR_RATIO:.0%}: {'met' if over['meets_floor'] else 'NOT met'})"
    )
    if rollback:
        rb = rollback
        print(
            f"rollback after a breach: decision {rb['breach_to_rollback_decision_seconds']:.1f} s,"
            f" last failed request {rb['breach_to_last_failed_request_seconds']:.1f} s, "
            f"canary retired {rb['breach_to_canary_retired_seconds']:.1f} s "
            f"(interval {rollback['analysis_interval_seconds']:g} s; floor "
            f"{FLOOR_ROLLBACK_SECONDS:g} s: {'met' if rollback['meets_floor'] else 'NOT met'})"
        )
    path = c.write_result(
        "router", {"machine": c.machine(), "overhead": over, "rollback": rollback}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
