"""Kubernetes manifests rendered from infra/kubernetes/, checked structurally (no cluster
here), and the desired-state bookkeeping the Kubernetes plane shares with the local one."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from driftloop.errors import ConfigError, ServingError
from driftloop.plane.base import (
    ArmSpec,
    DesiredState,
    arm_name_for,
    desired_state_path,
    load_desired_state,
    save_desired_state,
)
from driftloop.plane.kubernetes import (
    DEFAULT_TEMPLATE_DIR,
    KubernetesConfig,
    KubernetesPlane,
    image_for,
    object_name,
    render_manifests,
    to_yaml,
)
from driftloop.rollout import Role, SetWeights
from driftloop.settings import get_settings

CONFIG = KubernetesConfig(
    namespace="ml",
    image_registry="ghcr.io/acme/",
    gateway_name="edge",
    gateway_namespace="gateways",
    hostnames=["fraud.example.com"],
)


def desired() -> DesiredState:
    return DesiredState(
        model_name="fraud",
        arms={
            "fraud-svc-v1": ArmSpec(bento_tag="fraud_svc:v1abc", role=Role.CHAMPION),
            "fraud-svc-v2": ArmSpec(bento_tag="fraud_svc:v2def", role=Role.CANARY),
            "fraud-svc-v3": ArmSpec(bento_tag="fraud_svc:v3ghi", role=Role.SHADOW),
        },
        weights={"fraud-svc-v1": 95, "fraud-svc-v2": 5, "fraud-svc-v3": 0},
        shadow=["fraud-svc-v3"],
        phase="canary",
    )


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def test_templates_are_in_infra():
    assert {"deployment.yaml", "service.yaml", "httproute.yaml", "README.md"} <= {
        p.name for p in DEFAULT_TEMPLATE_DIR.iterdir()
    }


def test_render_structure():
    docs = list(yaml.safe_load_all(to_yaml(render_manifests(desired(), CONFIG))))
    kinds = by_kind(docs)
    assert sorted(kinds) == ["Deployment", "HTTPRoute", "Service"]
    assert len(kinds["Deployment"]) == len(kinds["Service"]) == 3
    for doc in docs:
        assert doc["metadata"]["namespace"] == "ml"
        assert doc["metadata"]["labels"]["driftloop.io/model"] == "fraud"

    deployments = {d["metadata"]["name"]: d for d in kinds["Deployment"]}
    assert set(deployments) == {"fraud-fraud-svc-v1", "fraud-fraud-svc-v2", "fraud-fraud-svc-v3"}
    canary = deployments["fraud-fraud-svc-v2"]
    assert canary["apiVersion"] == "apps/v1"
    assert canary["metadata"]["labels"]["driftloop.io/role"] == "canary"
    assert canary["metadata"]["annotations"]["driftloop.io/bento-tag"] == "fraud_svc:v2def"
    selector = canary["spec"]["selector"]["matchLabels"]
    pod_labels = canary["spec"]["template"]["metadata"]["labels"]
    assert selector == pod_labels and selector["driftloop.io/arm"] == "fraud-svc-v2"
    assert "driftloop.io/role" not in pod_labels  # a promotion must not restart pods
    (container,) = canary["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/acme/fraud_svc:v2def"
    assert container["ports"] == [{"name": "http", "containerPort": 3000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["DRIFTLOOP_ARM"] == "fraud-svc-v2" and env["DRIFTLOOP_MODEL_NAME"] == "fraud"

    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    assert set(services) == set(deployments)
    svc = services["fraud-fraud-svc-v2"]
    assert svc["apiVersion"] == "v1" and svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == selector
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 3000, "targetPort": "http", "protocol": "TCP"}
    ]

    (route,) = kinds["HTTPRoute"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["metadata"]["name"] == "fraud-route"
    assert route["spec"]["parentRefs"] == [{"name": "edge", "namespace": "gateways"}]
    assert route["spec"]["hostnames"] == ["fraud.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    refs = {r["name"]: r for r in rule["backendRefs"]}
    assert sum(r["weight"] for r in rule["backendRefs"]) == 100
    assert refs["fraud-fraud-svc-v1"]["weight"] == 95 and refs["fraud-fraud-svc-v2"]["weight"] == 5
    assert all(r["port"] == 3000 and r["name"] in services for r in rule["backendRefs"])
    assert rule["filters"] == [
        {
            "type": "RequestMirror",
            "requestMirror": {"backendRef": {"name": "fraud-fraud-svc-v3", "port": 3000}},
        }
    ]


def test_names_and_images():
    assert object_name("fraud_v2", "Svc_A") == "fraud-v2-svc-a"
    assert len(object_name("m" * 40, "a" * 40)) <= 63
    assert arm_name_for("fraud_svc:AbC12") == "fraud-svc-abc12"
    assert image_for("fraud_svc:v1") == "fraud_svc:v1"
    with pytest.raises(ServingError):
        image_for("service:Svc extra")
    with pytest.raises(ServingError):
        image_for("service.py")


def test_no_route_without_weights():
    state = desired().model_copy(update={"weights": {}, "shadow": []})
    assert {d["kind"] for d in render_manifests(state, CONFIG)} == {"Deployment", "Service"}


def test_template_errors_are_config_errors(tmp_path):
    for name in ("deployment.yaml", "service.yaml", "httproute.yaml"):
        shutil.copy(DEFAULT_TEMPLATE_DIR / name, tmp_path / name)
    (tmp_path / "service.yaml").write_text("kind: Service\nmetadata: {name: ${nope}}\n")
    with pytest.raises(ConfigError, match="placeholder"):
        render_manifests(desired(), CONFIG.model_copy(update={"template_dir": tmp_path}))
    with pytest.raises(ConfigError, match="missing"):
        render_manifests(desired(), CONFIG.model_copy(update={"template_dir": tmp_path / "x"}))


# -- the plane in render-only mode ------------------------------------------------------


def test_plane_renders_to_a_file_and_keeps_desired_state(tmp_path):
    settings = get_settings(state_dir=tmp_path / "state")
    plane = KubernetesPlane(settings, "fraud", config=CONFIG, apply=False)
    info = plane.deploy("svc-v1", "fraud_svc:v1", role=Role.CHAMPION)
    assert info.status.value == "rendered"
    assert info.endpoint == "http://fraud-svc-v1.ml.svc.cluster.local:3000"
    plane.set_weights({"svc-v1": 100})
    plane.deploy("svc-v2", "fraud_svc:v2")
    rest = plane.apply([SetWeights(weights={"svc-v1": 90, "svc-v2": 10})])
    assert rest == []

    docs = list(yaml.safe_load_all(plane.manifest_path.read_text()))
    (route,) = [d for d in docs if d["kind"] == "HTTPRoute"]
    assert {r["name"]: r["weight"] for r in route["spec"]["rules"][0]["backendRefs"]} == {
        "fraud-svc-v1": 90,
        "fraud-svc-v2": 10,
    }
    state = load_desired_state(desired_state_path(settings.state_dir, "fraud"))
    assert state.weights == {"svc-v1": 90, "svc-v2": 10}
    assert state.arms["svc-v2"].role is Role.CANARY

    with pytest.raises(ServingError, match="weight"):
        plane.retire("svc-v2")  # still has traffic
    with pytest.raises(ServingError):
        plane.set_weights({"svc-v1": 50, "svc-v2": 40})  # not 100
    with pytest.raises(ServingError):
        plane.set_weights({"svc-v1": 50, "ghost": 50})  # unknown arm
    with pytest.raises(ServingError):
        plane.deploy("svc-v3", "service:Svc extra")  # not a Bento tag

    plane.set_roles({"svc-v2": Role.CHAMPION, "svc-v1": Role.STANDBY})
    plane.set_weights({"svc-v2": 100, "svc-v1": 0})
    plane.retire("svc-v1")
    plane.retire("svc-v1")  # idempotent
    docs = list(yaml.safe_load_all(plane.manifest_path.read_text()))
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} == {"fraud-svc-v2"}
    assert plane.desired().champion() == "svc-v2"
    assert set(plane.health()) == {"svc-v2"}
    assert plane.reconcile()["svc-v2"].status.value == "rendered"


def test_desired_state_reader_sees_every_change(tmp_path):
    path = desired_state_path(tmp_path, "fraud")
    assert load_desired_state(path) is None
    state = desired()
    for canary in (5, 25, 50, 25, 5):  # same file size each time, rewritten within ms
        state = save_desired_state(
            path,
            state.model_copy(
                update={
                    "weights": {
                        "fraud-svc-v1": 100 - canary,
                        "fraud-svc-v2": canary,
                        "fraud-svc-v3": 0,
                    }
                }
            ),
        )
        assert load_desired_state(path).weights["fraud-svc-v2"] == canary
    assert load_desired_state(path).version == state.version == 5
    # an old file is served from the cache (same object) until it changes
    old = os.stat(path).st_mtime - 10
    os.utime(path, (old, old))
    first = load_desired_state(path)
    assert load_desired_state(path) is first
    save_desired_state(path, state.model_copy(update={"phase": "promoted"}))
    assert load_desired_state(path).phase == "promoted"
    assert not list(path.parent.glob("*.tmp"))


def test_desired_state_validation():
    with pytest.raises(ValueError):
        DesiredState(model_name="m", arms={"a": ArmSpec(bento_tag="x:1")}, weights={"a": 90})
    with pytest.raises(ValueError):
        DesiredState(model_name="m", arms={"a": ArmSpec(bento_tag="x:1")}, weights={"b": 100})
    with pytest.raises(ValueError):
        DesiredState(model_name="m", arms={"Bad_Name": ArmSpec(bento_tag="x:1")})


def test_rollout_actions_drive_the_plane(tmp_path):
    """The actions of a whole rollout, applied to a render-only plane."""
    from datetime import UTC, datetime, timedelta

    from driftloop.rollout import (
        Analysis,
        ArmRef,
        RolloutPolicy,
        Verdict,
        abort,
        advance,
        start_rollout,
    )

    settings = get_settings(state_dir=tmp_path / "state")
    plane = KubernetesPlane(settings, "fraud", config=CONFIG, apply=False)
    champion = ArmRef(name="svc-v1", bento_tag="fraud_svc:v1")
    canary = ArmRef(name="svc-v2", bento_tag="fraud_svc:v2")
    plane.deploy(champion.name, champion.bento_tag, role=Role.CHAMPION)
    plane.set_weights({champion.name: 100})

    policy = RolloutPolicy(steps=[10, 100], bake_seconds=0, post_promotion_guard_seconds=60)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    state, actions = start_rollout(
        policy, model_name="fraud", champion=champion, canary=canary, now=now, incident_id="i-1"
    )
    emitted = plane.apply(actions)
    state, actions = advance(state, None, now)
    emitted += plane.apply(actions)
    desired = plane.desired()
    assert desired.weights == {"svc-v1": 90, "svc-v2": 10}
    assert (desired.phase, desired.incident_id) == ("canary", "i-1")
    passed = Analysis(verdict=Verdict.PASS, reason="ok")
    state, actions = advance(state, passed, now + timedelta(seconds=30))
    emitted += plane.apply(actions)
    desired = plane.desired()
    assert desired.weights == {"svc-v1": 0, "svc-v2": 100} and desired.champion() == "svc-v2"
    assert desired.arms["svc-v1"].role is Role.STANDBY and desired.phase == "promoted"
    state, actions = advance(state, None, now + timedelta(seconds=120))
    emitted += plane.apply(actions)
    assert set(plane.desired().arms) == {"svc-v2"} and plane.desired().weights == {"svc-v2": 100}
    assert [e.event.rsplit(".", 1)[-1] for e in emitted] == [
        "started",
        "promoted",
        "completed",
    ]

    # a canary that never deployed: the abort's routing table names it with weight 0
    ghost = ArmRef(name="svc-v3", bento_tag="fraud_svc:v3")
    state, _ = start_rollout(
        policy, model_name="fraud", champion=canary, canary=ghost, now=now, incident_id="i-2"
    )
    state, actions = abort(state, now, reason="deploy failed")
    plane.apply(actions)
    assert plane.desired().weights == {"svc-v2": 100}
    assert plane.desired().phase == "aborted"
