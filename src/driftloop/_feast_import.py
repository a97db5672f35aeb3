"""Import Feast without its import-time type-check instrumentation.

Feast decorates its definition classes (``FeatureView``, ``DataSource``,
``OnDemandFeatureView``, ...) with typeguard's ``@typechecked``. typeguard 4 implements
that decorator by reading each class's source, rewriting its AST and compiling it again,
at import. That is most of the cost of ``import feast``: 8.5 s against 2.5 s without it
on the 2-core machines we run on, paid by every serving worker, flow run and CLI call
that touches Feast. The checks it buys are argument type checks on Feast's own API,
which our calls satisfy statically (mypy) and the tests exercise.

:func:`install` (called by ``driftloop/__init__``) adds a finder to ``sys.meta_path``
that acts once, on the first ``import feast`` in the process: while Feast's package
initialiser runs, ``typeguard.typechecked`` returns what it decorates unchanged; the
real decorator is restored right after, so other libraries' (and Feast submodules
imported later) keep their checks. ``DRIFTLOOP_FEAST_TYPECHECKS=1`` keeps Feast's
checks (read when the first ``import feast`` happens, not at driftloop's import).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any

#: environment variable that keeps Feast's typeguard instrumentation
KEEP_CHECKS_ENV = "DRIFTLOOP_FEAST_TYPECHECKS"


def _passthrough(target: Any = None, **_: Any) -> Any:
    """``typeguard.typechecked`` that decorates nothing: ``@d`` and ``@d(...)`` forms."""
    if target is None:
        return _passthrough
    return target


class _Loader(importlib.abc.Loader):
    """Runs Feast's real loader with typeguard's decorator switched off."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            import typeguard
        except ImportError:  # pragma: no cover - typeguard is a Feast dependency
            self._inner.exec_module(module)
            return
        real = typeguard.typechecked
        typeguard.typechecked = _passthrough  # type: ignore[assignment]
        try:
            self._inner.exec_module(module)
        finally:
            typeguard.typechecked = real


class _FeastFinder(importlib.abc.MetaPathFinder):
    """Finds ``feast`` through the rest of ``sys.meta_path`` and wraps its loader."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "feast":
            return None
        uninstall()
        if os.environ.get(KEEP_CHECKS_ENV, "").strip().lower() in {"1", "true", "yes"}:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _FeastFinder()


def install() -> None:
    """Add the finder (no-op if Feast is already imported or the finder is in place)."""
    if "feast" in sys.modules or _FINDER in sys.meta_path:
        return
    sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Remove the finder (it only ever acts once)."""
    try:
        sys.meta_path.remove(_FINDER)
    except ValueError:
        pass
