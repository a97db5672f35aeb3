"""Serving planes: where the model arms run and how traffic is split between them.

- :mod:`driftloop.plane.base`: the :class:`ServingPlane` interface and the desired
  state file the router reads (:func:`load_desired_state`).
- :mod:`driftloop.plane.local`: ``bentoml serve`` processes on one machine.
- :mod:`driftloop.plane.kubernetes`: Deployments, Services and a Gateway API
  HTTPRoute rendered from ``infra/kubernetes/`` and applied with kubectl.

The implementations are imported from their modules (``from driftloop.plane.local
import LocalPlane``) so that importing this package stays cheap.
"""

from driftloop.plane.base import (
    ArmHealth,
    ArmInfo,
    ArmSpec,
    ArmStatus,
    DesiredState,
    ServingPlane,
    arm_name_for,
    desired_state_path,
    load_desired_state,
    save_desired_state,
)

__all__ = [
    "ArmHealth",
    "ArmInfo",
    "ArmSpec",
    "ArmStatus",
    "DesiredState",
    "ServingPlane",
    "arm_name_for",
    "desired_state_path",
    "load_desired_state",
    "save_desired_state",
]
