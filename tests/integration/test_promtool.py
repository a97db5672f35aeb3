"""The Prometheus files in infra/ pass promtool: config, rules, rule unit tests.

promtool comes with Debian's `prometheus` package (CI installs it). Without it the
promtool tests skip with that reason; the coverage check below needs no binary.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "infra" / "prometheus"
RULES = PROM_DIR / "rules" / "driftloop.rules.yml"
RULE_TESTS = PROM_DIR / "tests" / "driftloop.rules.test.yml"
DASHBOARD = REPO / "infra" / "grafana" / "dashboard.json"
README = REPO / "infra" / "README.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (apt-get install prometheus provides it)",
)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"


def alert_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"] for g in groups for r in g["rules"] if "alert" in r}


def arms_example() -> str:
    """The documented targets/arms.json example: the first ```json block in infra/README.md."""
    match = re.search(r"```json\n(.*?)```", README.read_text(), flags=re.S)
    assert match, "infra/README.md must show an example targets/arms.json in a ```json block"
    return match.group(1)


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard, Grafana variables substituted."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    subst = {"$__rate_interval": "1m", "$__range": "1h", "$model": ".*", "$version": ".*"}
    out = []
    for e in exprs:
        for k, v in subst.items():
            e = e.replace(k, v)
        out.append(e)
    return out


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    names = alert_names()
    assert names, "no alerts found"
    assert names - fires == set(), f"alerts never shown firing: {sorted(names - fires)}"
    assert names - quiet == set(), f"alerts never shown quiet: {sorted(names - quiet)}"
    assert (fires | quiet) - names == set(), "tests name alerts that do not exist"
    required = {
        "HighPredictLatency",
        "HighErrorRate",
        "CanaryBreach",
        "DriftDetected",
        "DataQualityFailed",
        "StaleFeatures",
        "PredictionLogBacklog",
        "MonitorNotRunning",
    }
    assert required <= names


def test_every_alert_has_a_runbook_section_in_the_infra_readme() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    anchors = {
        r["annotations"]["runbook_url"].split("#", 1)[1]
        for g in groups
        for r in g["rules"]
        if "alert" in r
    }
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", README.read_text(), flags=re.M)
    }
    assert anchors <= headings, f"runbook anchors without a heading: {sorted(anchors - headings)}"


@pytest.mark.integration
@needs_promtool
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.compose.yml"])
def test_promtool_check_config(config: str) -> None:
    result = promtool("check", "config", str(PROM_DIR / config))
    assert_ok(result)
    assert "rules found" in result.stdout, "the config must load the driftloop rule file"


@pytest.mark.integration
@needs_promtool
def test_promtool_check_rules() -> None:
    assert_ok(promtool("check", "rules", str(RULES)))


@pytest.mark.integration
@needs_promtool
def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert_ok(result)
    assert "SUCCESS" in result.stdout


@pytest.mark.integration
@needs_promtool
def test_documented_arms_targets_file_is_valid_file_sd(tmp_path: Path) -> None:
    """The arms.json format in infra/README.md is what Prometheus' file_sd accepts."""
    example = json.loads(arms_example())
    assert all({"targets", "labels"} <= set(group) for group in example)
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "arms.json").write_text(json.dumps(example))
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config.pop("rule_files")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert_ok(result)
    assert "WARNING" not in result.stdout + result.stderr  # the targets file was found and read

    (tmp_path / "targets" / "arms.json").write_text(
        json.dumps([{"targets": ["127.0.0.1:3101"], "labels": {"not-a-label": "x"}}])
    )
    assert promtool("check", "config", str(tmp_path / "prometheus.yml")).returncode != 0


@pytest.mark.integration
@needs_promtool
def test_documented_kubernetes_scrape_job_is_valid(tmp_path: Path) -> None:
    match = re.search(r"### On Kubernetes.*?```yaml\n(.*?)```", README.read_text(), flags=re.S)
    assert match, "infra/README.md must show the Kubernetes scrape job in a ```yaml block"
    config = yaml.safe_load(match.group(1))
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "driftloop-arms" and job["honor_labels"] is True
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    # Debian's Prometheus is built without Kubernetes discovery: check the rest
    # (relabelling) with a static target instead.
    job["static_configs"] = [{"targets": ["127.0.0.1:3000"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    assert_ok(promtool("check", "config", str(tmp_path / "prometheus.yml")))
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"model", "arm", "component"} <= targets


@pytest.mark.integration
@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    assert_ok(promtool("check", "rules", str(path)))
