"""``import driftloop`` makes the first ``import feast`` skip typeguard's instrumentation,
and only Feast's: typeguard's decorator is itself again afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import driftloop, feast, typeguard, typeguard._decorators
code = feast.FeatureView.__init__.__code__
print(json.dumps({
    "instrumented": "check_argument_types_internal" in code.co_names,
    "typechecked_restored": typeguard.typechecked is typeguard._decorators.typechecked,
    "finder_left": any(type(f).__name__ == "_FeastFinder" for f in sys.meta_path),
}))
"""


def _probe(**env: str) -> dict[str, bool]:
    full = {k: v for k, v in os.environ.items() if k != "DRIFTLOOP_FEAST_TYPECHECKS"} | env
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_feast_is_imported_without_typeguard_instrumentation() -> None:
    assert _probe() == {
        "instrumented": False, "typechecked_restored": True, "finder_left": False,
    }  # fmt: skip


def test_the_checks_can_be_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from driftloop import _feast_import

    monkeypatch.setenv(_feast_import.KEEP_CHECKS_ENV, "1")
    installed = _feast_import._FINDER in sys.meta_path
    try:
        # with the variable set, the finder steps aside: Feast loads as it ships
        assert _feast_import._FINDER.find_spec("feast") is None
        assert _feast_import._FINDER not in sys.meta_path
    finally:
        if installed:
            sys.meta_path.insert(0, _feast_import._FINDER)


def test_the_passthrough_keeps_both_decorator_forms() -> None:
    from driftloop._feast_import import _passthrough

    def f() -> int:
        return 1

    assert _passthrough(f) is f
    assert _passthrough(forward_ref_policy=None)(f) is f
