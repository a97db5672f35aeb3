"""The exception hierarchy of driftloop.

Every error raised on purpose by the library derives from :class:`DriftloopError`,
so callers at the edges (CLI, services, flows) can catch one type and turn it
into a clear message, an HTTP 4xx or a non-zero exit.

    DriftloopError
    ├── ConfigError          settings or a config file are invalid
    ├── DataError            a frame or table breaks its schema or is empty
    │   └── SchemaError      missing/extra/mistyped columns
    ├── FeatureStoreError    Feast repo, materialisation or online read failed
    ├── ModelError           a model is missing, unloadable or mis-described
    │   └── GateRejected     a challenger failed its gate (carries the reason)
    ├── LogError             the prediction log (spool / Delta) failed
    ├── EventError           a Prefect event could not be delivered
    ├── ServingError         a Bento, an arm or the router failed
    └── RolloutError         an illegal rollout transition or a breach
"""

from __future__ import annotations


class DriftloopError(Exception):
    """Base class of every deliberate driftloop error."""


class ConfigError(DriftloopError):
    """Settings or a configuration file are invalid."""


class DataError(DriftloopError):
    """Data does not satisfy what the code needs (empty window, bad values)."""


class SchemaError(DataError):
    """A frame has missing, extra or mistyped columns."""


class FeatureStoreError(DriftloopError):
    """The Feast repo, a materialisation or an online read failed."""


class ModelError(DriftloopError):
    """A model is missing, cannot be loaded or lacks its metadata."""


class GateRejected(ModelError):
    """A challenger failed its promotion gate."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LogError(DriftloopError):
    """The prediction log (local spool or Delta table) failed."""


class EventError(DriftloopError):
    """An event could not be delivered to the Prefect API."""


class ServingError(DriftloopError):
    """A Bento, a serving arm or the router failed."""


class RolloutError(DriftloopError):
    """An illegal rollout transition, or a rollout that cannot proceed."""
