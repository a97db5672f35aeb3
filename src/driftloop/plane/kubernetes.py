"""The Kubernetes serving plane: Bento images behind a Gateway API HTTPRoute.

Each arm becomes a Deployment and a Service rendered from
``infra/kubernetes/deployment.yaml`` and ``service.yaml``; the traffic split is
one HTTPRoute (``httproute.yaml``) whose ``backendRefs`` weights are the desired
weights and whose ``RequestMirror`` filters feed shadow arms. The image of an
arm is its Bento tag (what ``bentoml containerize <tag>`` builds), under an
optional registry prefix.

With ``kubectl`` on PATH (or ``apply=True``) manifests are applied with
``kubectl apply -f -`` and deploys wait for ``kubectl rollout status``;
otherwise (``apply=False``) the plane only renders: the full manifest set of the
model is written to ``output_dir/<model>.yaml`` for a GitOps tool or a human to
apply. The desired state file is kept the same way as by the local plane.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from string import Template
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from driftloop.errors import ConfigError, ServingError
from driftloop.plane.base import (
    ArmHealth,
    ArmInfo,
    ArmSpec,
    ArmStatus,
    DesiredState,
    ServingPlane,
    plane_dir,
    write_atomic,
)
from driftloop.rollout import Role
from driftloop.settings import Settings

#: infra/kubernetes in the source tree (src/driftloop/plane/kubernetes.py -> repo root)
DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[3] / "infra" / "kubernetes"

_DNS1035 = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
_BENTO_TAG = re.compile(r"^[a-z0-9][a-z0-9._-]*:[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")


class KubernetesConfig(BaseModel):
    """Where and how the arms of one model run in a cluster."""

    model_config = ConfigDict(extra="forbid")

    namespace: str = Field(default="driftloop", pattern=_DNS1035.pattern)
    image_registry: str = Field(default="", description="Prefix of Bento images, e.g. ghcr.io/acme")
    gateway_name: str = "driftloop"
    gateway_namespace: str | None = Field(
        default=None, description="Default: the route's namespace."
    )
    hostnames: list[str] = Field(default_factory=list)
    path_prefix: str = "/"
    port: int = Field(default=3000, ge=1, le=65535, description="The Bento's HTTP port.")
    replicas: int = Field(default=1, ge=0)
    resources: dict[str, Any] = Field(
        default_factory=lambda: {
            "requests": {"cpu": "250m", "memory": "512Mi"},
            "limits": {"memory": "1Gi"},
        }
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra container environment.")
    env_from_secrets: list[str] = Field(
        default_factory=list, description="Secrets loaded as environment (tokens, credentials)."
    )
    template_dir: Path = DEFAULT_TEMPLATE_DIR


def object_name(model_name: str, arm_name: str) -> str:
    """The Deployment/Service name of an arm: ``<model>-<arm>``, a DNS-1035 label."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"{model_name}-{arm_name}".lower())
    name = re.sub(r"-{2,}", "-", name)[:63].strip("-")
    if not _DNS1035.match(name):
        raise ServingError(f"cannot make a Kubernetes name from {model_name!r}/{arm_name!r}")
    return name


def route_name(model_name: str) -> str:
    return object_name(model_name, "route")


def image_for(bento_tag: str, registry: str = "") -> str:
    """The container image of a Bento tag (``bentoml containerize`` names it by the tag)."""
    if not _BENTO_TAG.match(bento_tag):
        raise ServingError(
            f"{bento_tag!r} is not a Bento tag (name:version); the Kubernetes plane serves "
            "built Bentos only"
        )
    return f"{registry.rstrip('/')}/{bento_tag}" if registry else bento_tag


def _label(value: str) -> str:
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:63].strip("-._")
    if not _LABEL_VALUE.match(value):
        raise ServingError(f"invalid label value {value!r}")
    return value


def _render(template_dir: Path, name: str, values: dict[str, Any]) -> dict[str, Any]:
    path = template_dir / name
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"Kubernetes template {path} is missing") from exc
    # comment lines may mention ${...} freely: they are dropped before substitution
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    try:
        rendered = Template(text).substitute({k: json.dumps(v) for k, v in values.items()})
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"template {path}: unknown or malformed placeholder {exc}") from exc
    doc = yaml.safe_load(rendered)
    if not isinstance(doc, dict) or "kind" not in doc:
        raise ConfigError(f"template {path} did not render to one Kubernetes object")
    return doc


def render_manifests(desired: DesiredState, config: KubernetesConfig) -> list[dict[str, Any]]:
    """The Kubernetes objects for ``desired``: a Deployment and a Service per arm, then
    the HTTPRoute (when weights are set). Pure apart from reading the templates."""
    model = desired.model_name
    base_labels = {
        "app.kubernetes.io/name": "driftloop-model",
        "app.kubernetes.io/part-of": "driftloop",
        "app.kubernetes.io/managed-by": "driftloop",
        "driftloop.io/model": _label(model),
    }
    docs: list[dict[str, Any]] = []
    for arm, spec in sorted(desired.arms.items()):
        name = object_name(model, arm)
        selector = {**base_labels, "driftloop.io/arm": _label(arm)}
        env = {
            "BENTOML_DO_NOT_TRACK": "True",
            "DRIFTLOOP_MODEL_NAME": model,
            "DRIFTLOOP_ARM": arm,
            "DRIFTLOOP_BENTO_TAG": spec.bento_tag,
            **config.env,
        }
        values = {
            "name": name,
            "namespace": config.namespace,
            "labels": {**selector, "driftloop.io/role": spec.role.value},
            "pod_labels": selector,
            "selector": selector,
            "annotations": {"driftloop.io/bento-tag": spec.bento_tag},
            "replicas": config.replicas,
            "image": image_for(spec.bento_tag, config.image_registry),
            "port": config.port,
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "env_from": [{"secretRef": {"name": s}} for s in config.env_from_secrets],
            "resources": config.resources,
        }
        docs.append(_render(config.template_dir, "deployment.yaml", values))
        docs.append(_render(config.template_dir, "service.yaml", values))
    if desired.weights:
        parent: dict[str, Any] = {"name": config.gateway_name}
        if config.gateway_namespace:
            parent["namespace"] = config.gateway_namespace
        values = {
            "name": route_name(model),
            "namespace": config.namespace,
            "labels": base_labels,
            "annotations": {
                "driftloop.io/phase": desired.phase,
                "driftloop.io/desired-version": str(desired.version),
            },
            "parent_refs": [parent],
            "hostnames": config.hostnames,
            "path_prefix": config.path_prefix,
            "filters": [
                {
                    "type": "RequestMirror",
                    "requestMirror": {
                        "backendRef": {"name": object_name(model, arm), "port": config.port}
                    },
                }
                for arm in desired.shadow
            ],
            "backend_refs": [
                {"name": object_name(model, arm), "port": config.port, "weight": weight}
                for arm, weight in sorted(desired.weights.items())
            ],
        }
        docs.append(_render(config.template_dir, "httproute.yaml", values))
    return docs


def to_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)


class KubernetesPlane(ServingPlane):
    """Serves the arms of one model on Kubernetes (scale-out), or renders their manifests."""

    def __init__(
        self,
        settings: Settings,
        model_name: str | None = None,
        *,
        config: KubernetesConfig | None = None,
        apply: bool | None = None,
        kubectl: str = "kubectl",
        context: str | None = None,
        output_dir: Path | None = None,
        rollout_timeout: float = 300.0,
    ) -> None:
        super().__init__(settings.state_dir, model_name or settings.model_name)
        self.config = config or KubernetesConfig()
        self.kubectl = kubectl
        self.context = context
        self.apply_enabled = shutil.which(kubectl) is not None if apply is None else apply
        self.output_dir = output_dir or plane_dir(settings.state_dir) / "kubernetes"
        self.rollout_timeout = rollout_timeout

    # -- rendering and applying --------------------------------------------------------
    def render(self, desired: DesiredState | None = None) -> list[dict[str, Any]]:
        return render_manifests(desired or self.desired(), self.config)

    def render_yaml(self, desired: DesiredState | None = None) -> str:
        return to_yaml(self.render(desired))

    @property
    def manifest_path(self) -> Path:
        return self.output_dir / f"{self.model_name}.yaml"

    def _kubectl(self, *args: str, stdin: str | None = None) -> str:
        cmd = [self.kubectl, *(["--context", self.context] if self.context else []), *args]
        try:
            done = subprocess.run(
                cmd,
                input=stdin,
                capture_output=True,
                text=True,
                check=False,
                timeout=self.rollout_timeout + 30,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServingError(f"{' '.join(cmd)} failed: {exc}") from exc
        if done.returncode != 0:
            raise ServingError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-1000:]}")
        return done.stdout

    def _sync(self) -> str:
        """Render the whole desired state; apply it or write it to ``manifest_path``."""
        text = self.render_yaml()
        if self.apply_enabled:
            self._kubectl("apply", "-f", "-", stdin=text)
        else:
            write_atomic(self.manifest_path, text)
        return text

    def _endpoint(self, arm: str) -> str:
        name = object_name(self.model_name, arm)
        return f"http://{name}.{self.config.namespace}.svc.cluster.local:{self.config.port}"

    # -- the ServingPlane interface ----------------------------------------------------
    def deploy(
        self,
        arm_name: str,
        bento_tag: str,
        env: dict[str, str] | None = None,
        *,
        role: Role = Role.CANARY,
    ) -> ArmInfo:
        image_for(bento_tag, self.config.image_registry)  # fail early on a non-Bento target
        if env:
            raise ServingError(
                "per-arm env is not supported on Kubernetes; use KubernetesConfig.env "
                "or env_from_secrets"
            )
        with self._locked():
            desired = self.desired()
            arms = {n: a.model_dump() for n, a in desired.arms.items()}
            arms[arm_name] = ArmSpec(
                bento_tag=bento_tag, role=role, endpoint=self._endpoint(arm_name)
            ).model_dump()
            self._update(arms=arms)
            self._sync()
        status = ArmStatus.RENDERED
        if self.apply_enabled:
            self._kubectl(
                "rollout",
                "status",
                "-n",
                self.config.namespace,
                f"deployment/{object_name(self.model_name, arm_name)}",
                f"--timeout={int(self.rollout_timeout)}s",
            )
            status = ArmStatus.READY
        return ArmInfo(
            name=arm_name, bento_tag=bento_tag, endpoint=self._endpoint(arm_name), status=status
        )

    def _weights_changed(self) -> None:
        with self._locked():
            self._sync()

    def set_roles(self, roles: dict[str, Role]) -> None:
        super().set_roles(roles)
        with self._locked():
            self._sync()

    def retire(self, arm_name: str) -> None:
        with self._locked():
            desired = self.desired()
            if arm_name not in desired.arms:
                return
            if desired.weights.get(arm_name, 0) > 0:
                raise ServingError(
                    f"arm {arm_name} still has weight {desired.weights[arm_name]}; "
                    "set its weight to 0 before retiring it"
                )
            self._update(
                arms={n: a.model_dump() for n, a in desired.arms.items() if n != arm_name},
                weights={n: w for n, w in desired.weights.items() if n != arm_name},
                shadow=[n for n in desired.shadow if n != arm_name],
            )
            self._sync()
            if self.apply_enabled:
                name = object_name(self.model_name, arm_name)
                self._kubectl(
                    "delete",
                    "-n",
                    self.config.namespace,
                    "--ignore-not-found",
                    f"deployment/{name}",
                    f"service/{name}",
                )

    def health(self) -> dict[str, ArmHealth]:
        desired = self.desired()
        if not self.apply_enabled:
            return {
                arm: ArmHealth(
                    name=arm,
                    status=ArmStatus.RENDERED,
                    alive=False,
                    ready=False,
                    endpoint=spec.endpoint,
                    detail=f"rendered to {self.manifest_path}",
                )
                for arm, spec in desired.arms.items()
            }
        raw = self._kubectl(
            "get",
            "deployments",
            "-n",
            self.config.namespace,
            "-l",
            f"driftloop.io/model={_label(self.model_name)}",
            "-o",
            "json",
        )
        by_arm = {
            item["metadata"]["labels"].get("driftloop.io/arm"): item
            for item in json.loads(raw).get("items", [])
        }
        out: dict[str, ArmHealth] = {}
        for arm, spec in desired.arms.items():
            item = by_arm.get(arm)
            if item is None:
                out[arm] = ArmHealth(
                    name=arm,
                    status=ArmStatus.STOPPED,
                    alive=False,
                    ready=False,
                    endpoint=spec.endpoint,
                    detail="no Deployment",
                )
                continue
            want = item.get("spec", {}).get("replicas", 1)
            ready = item.get("status", {}).get("readyReplicas", 0) or 0
            ok = ready >= max(want, 1)
            out[arm] = ArmHealth(
                name=arm,
                status=ArmStatus.READY if ok else ArmStatus.UNHEALTHY,
                alive=ready > 0,
                ready=ok,
                endpoint=spec.endpoint,
                detail=f"{ready}/{want} replicas ready",
            )
        return out

    def reconcile(self) -> dict[str, ArmInfo]:
        """(Re)apply the whole desired state; Kubernetes restarts dead pods itself."""
        with self._locked():
            self._sync()
        health = self.health()
        return {
            arm: ArmInfo(
                name=arm,
                bento_tag=spec.bento_tag,
                endpoint=spec.endpoint,
                status=health[arm].status if arm in health else ArmStatus.STOPPED,
            )
            for arm, spec in self.desired().arms.items()
        }
