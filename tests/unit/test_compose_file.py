"""infra/compose/compose.yaml, checked statically (no Docker engine here).

Every service has a pinned image, credentials only come from ${VAR}, every
required variable is listed in .env.example, mounts and dependencies resolve.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "infra" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"

SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY", re.I)
ONLY_VARS = re.compile(r"(\$\{[A-Z0-9_]+(?::?[-?][^}]*)?\})+")
VAR_REF = re.compile(r"\$\{([A-Z0-9_]+)(:?[-?])?([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_services_present(compose: dict[str, Any]) -> None:
    services = set(compose["services"])
    required = {
        "postgres",
        "redis",
        "minio",
        "prefect-server",
        "prefect-worker",
        "router",
        "model-champion",
        "model-canary",
        "pushgateway",
        "prometheus",
        "grafana",
    }
    assert required <= services, f"missing services: {sorted(required - services)}"


def test_every_service_has_a_pinned_image(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image, f"service {name} has no image"
        assert "build" not in service, f"service {name} must use a built image"
        if ONLY_VARS.fullmatch(image):
            continue  # a driftloop image chosen by the user
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"


def test_no_literal_secrets(compose: dict[str, Any]) -> None:
    blocks = [environment(s) for s in compose["services"].values()]
    blocks += [
        {key: str(value) for key, value in block.items()}
        for name, block in compose.items()
        if name.startswith("x-") and isinstance(block, dict)
    ]
    for env in blocks:
        for key, value in env.items():
            if SECRET_KEY.search(key):
                assert ONLY_VARS.fullmatch(value), f"{key} must come from ${{VAR}}, not {value!r}"
    # credentials inside strings (connection strings, URLs) are references too
    text = COMPOSE.read_text()
    for m in re.finditer(r"(?i)password\s*=\s*(\S+)", text):
        assert m.group(1).startswith(("${", '"$$', "$$")), f"literal password: {m.group(0)}"
    assert not re.search(r"://[^/\s:@]+:[^/\s@$]+@", text), "credentials inside a URL"


def test_required_variables_are_documented_and_empty_in_env_example() -> None:
    text = COMPOSE.read_text()
    required = {m.group(1) for m in VAR_REF.finditer(text) if m.group(2) in (":?", "?")}
    example: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    assert required <= set(example), f"not in .env.example: {sorted(required - set(example))}"
    for key, value in example.items():
        if SECRET_KEY.search(key) or key.endswith("_USER"):
            assert value == "", f".env.example must not carry a value for {key}"


def test_dependencies_mounts_and_ports_resolve(compose: dict[str, Any]) -> None:
    services = compose["services"]
    volumes = set(compose.get("volumes", {}))
    for name, service in services.items():
        deps = service.get("depends_on", [])
        for dep in deps:
            assert dep in services, f"{name} depends on unknown service {dep}"
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).resolve().exists(), f"{name}: missing {source}"
            else:
                assert source in volumes, f"{name}: undeclared volume {source}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} binds all interfaces"


def test_prometheus_and_grafana_use_the_repository_configs(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    config = next(a for a in prom["command"] if a.startswith("--config.file="))
    in_container = config.split("=", 1)[1]
    assert in_container.startswith("/etc/prometheus/")
    assert "../prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert (REPO / "infra" / "prometheus" / Path(in_container).name).is_file()
    graf = compose["services"]["grafana"]
    assert any(v.startswith("../grafana/dashboard.json:") for v in graf["volumes"])
    provider = yaml.safe_load(
        (REPO / "infra/grafana/provisioning/dashboards/driftloop.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert any(v.split(":")[1].startswith(path) for v in graf["volumes"])
