"""A real Prometheus loads infra/prometheus, scrapes driftloop metrics and evaluates the rules.

The scrape config is infra/prometheus/prometheus.yml with only the addresses and
intervals changed: the router job points at a prometheus_client exporter standing
in for the router, the arms job reads a targets file in the documented format
pointing at an exporter standing in for a model arm, and the Pushgateway job at an
exporter exposing the monitor's pushed series. Prometheus (Debian's package)
binds 127.0.0.1 on a free port and is stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "infra" / "prometheus"
RULES = PROM_DIR / "rules" / "driftloop.rules.yml"
DASHBOARD = REPO / "infra" / "grafana" / "dashboard.json"

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus not installed (apt-get install prometheus provides it)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except httpx.HTTPError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def serve(registry: CollectorRegistry) -> tuple[int, Callable[[], None]]:
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return port, stop


def router_registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    requests = Counter(
        "driftloop_router_requests_total",
        "Routed requests",
        ["model", "arm", "version", "outcome"],
        registry=reg,
    )
    requests.labels("fraud", "champion", "v3", "ok").inc(95)
    requests.labels("fraud", "canary", "v4", "ok").inc(5)
    weight = Gauge(
        "driftloop_rollout_weight", "Traffic weight", ["model", "arm", "version"], registry=reg
    )
    weight.labels("fraud", "champion", "v3").set(95)
    weight.labels("fraud", "canary", "v4").set(5)
    Counter(
        "driftloop_rollout_breaches_total", "Guard breaches", ["model", "reason"], registry=reg
    ).labels("fraud", "error_rate")
    return reg


def arm_registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    predictions = Counter(
        "driftloop_predictions_total", "Scored rows", ["model", "version", "decision"], registry=reg
    )
    predictions.labels("fraud", "v4", "legit").inc(40)
    predictions.labels("fraud", "v4", "fraud").inc(2)
    latency = Histogram(
        "driftloop_predict_latency_seconds",
        "Scoring latency",
        ["model", "version", "endpoint"],
        buckets=(0.001, 0.01, 0.1, 1.0),
        registry=reg,
    )
    for _ in range(10):
        latency.labels("fraud", "v4", "predict").observe(0.004)
    # a BentoML-style series without model/version: it takes them from the target
    Counter(
        "bentoml_service_request_total",
        "HTTP requests",
        ["endpoint", "service_name", "service_version", "http_response_code", "runner_name"],
        registry=reg,
    ).labels("/predict", "driftloop-fraud", "abc", "200", "FraudModel").inc(42)
    return reg


def monitor_registry() -> CollectorRegistry:
    """What a Pushgateway exposes after the monitor pushed: job/instance set by the push."""
    reg = CollectorRegistry()
    share = Gauge(
        "driftloop_drift_share", "Drift share", ["model", "job", "instance"], registry=reg
    )
    share.labels("fraud", "driftloop-monitor", "").set(0.4)
    last = Gauge(
        "driftloop_monitor_last_run_timestamp_seconds",
        "Last monitor run",
        ["model", "job", "instance"],
        registry=reg,
    )
    last.labels("fraud", "driftloop-monitor", "").set(time.time())
    return reg


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[str]:
    stops: list[Callable[[], None]] = []
    router_port, stop = serve(router_registry())
    stops.append(stop)
    arm_port, stop = serve(arm_registry())
    stops.append(stop)
    monitor_port, stop = serve(monitor_registry())
    stops.append(stop)
    prom_port = free_port()

    targets = tmp_path / "targets"
    targets.mkdir()
    arms = [
        {
            "targets": [f"127.0.0.1:{arm_port}"],
            "labels": {"arm": "canary", "model": "fraud", "version": "v4"},
        }
    ]
    (targets / "arms.json").write_text(json.dumps(arms))

    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["driftloop-router"]["static_configs"][0]["targets"] = [f"127.0.0.1:{router_port}"]
    jobs["driftloop-arms"]["file_sd_configs"][0]["files"] = [str(targets / "*.json")]
    jobs["driftloop-arms"]["file_sd_configs"][0]["refresh_interval"] = "1s"
    jobs["driftloop-pushgateway"]["static_configs"][0]["targets"] = [f"127.0.0.1:{monitor_port}"]
    jobs["prometheus"]["static_configs"][0]["targets"] = [f"127.0.0.1:{prom_port}"]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))

    log = (tmp_path / "prometheus.log").open("w")
    assert PROMETHEUS is not None
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{prom_port}"
    try:
        wait_for(
            lambda: (
                proc.poll() is None and httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            ),
            "Prometheus /-/ready",
        )
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        for stop in stops:
            stop()
        if proc.returncode not in (0, -15):
            print((tmp_path / "prometheus.log").read_text())


def query(url: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_driftloop_targets_and_loads_the_rules(prometheus: str) -> None:
    url = prometheus

    def all_up() -> list[dict[str, Any]] | None:
        active = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        jobs = {t["labels"]["job"]: t["health"] for t in active}
        expected = {"driftloop-router", "driftloop-arms", "driftloop-pushgateway", "prometheus"}
        return active if set(jobs) == expected and all(h == "up" for h in jobs.values()) else None

    wait_for(all_up, "all four scrape jobs up")

    # router: its own labels, plus the target's component label
    routed = wait_for(
        lambda: query(url, 'driftloop_router_requests_total{job="driftloop-router"}'),
        "router requests",
    )
    assert {(s["metric"]["arm"], s["metric"]["component"]) for s in routed} == {
        ("champion", "router"),
        ("canary", "router"),
    }

    # arms from the targets file: the service's labels kept, target labels added
    predictions = query(url, 'driftloop_predictions_total{job="driftloop-arms"}')
    assert {s["metric"]["decision"] for s in predictions} == {"fraud", "legit"}
    for s in predictions:
        assert s["metric"]["model"] == "fraud"
        assert s["metric"]["version"] == "v4"
        assert s["metric"]["arm"] == "canary"
        assert s["metric"]["component"] == "model"
    bento = query(url, "bentoml_service_request_total")
    assert len(bento) == 1
    assert bento[0]["metric"]["model"] == "fraud"
    assert bento[0]["metric"]["arm"] == "canary"
    assert float(bento[0]["value"][1]) == 42

    # pushgateway: the pushed job label is honoured
    share = query(url, "driftloop_drift_share")
    assert [(s["metric"]["job"], float(s["value"][1])) for s in share] == [
        ("driftloop-monitor", 0.4)
    ]

    # rules loaded and evaluated without errors; recording rules produce series
    names = {
        r.get("alert") or r.get("record")
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
    }

    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else None

    rules = wait_for(rules_evaluated, "every rule evaluated with health ok")
    assert {r["name"] for r in rules} == names
    assert all(not r.get("lastError") for r in rules)

    rate = wait_for(
        lambda: query(url, "model_version:driftloop_predictions:rate5m"),
        "recording rule model_version:driftloop_predictions:rate5m",
    )
    assert rate[0]["metric"] == {
        "__name__": "model_version:driftloop_predictions:rate5m",
        "model": "fraud",
        "version": "v4",
    }

    # nothing is on fire in this healthy setup
    alerts = httpx.get(f"{url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    assert [a for a in alerts if a["state"] == "firing"] == []

    # every dashboard query runs against the real engine
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    subst = {"$__rate_interval": "1m", "$__range": "1h", "$model": ".*", "$version": ".*"}
    for expr in exprs:
        for k, v in subst.items():
            expr = expr.replace(k, v)
        query(url, expr)
    weights = query(url, 'max by (arm, version) (driftloop_rollout_weight{model=~".*"})')
    assert {(s["metric"]["arm"], float(s["value"][1])) for s in weights} == {
        ("champion", 95.0),
        ("canary", 5.0),
    }
