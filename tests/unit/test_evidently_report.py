"""The Evidently 0.7 adapter: a real DataDriftPreset run on small frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from driftloop.evidently_report import EvidentlyResult, result_from_snapshot, run_evidently


def _frame(n: int, seed: int, shift: float = 0.0, new_share: float = 0.0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    category = rng.choice(np.array(["grocery", "gas", "travel"]), n)
    category[rng.random(n) < new_share] = "electronics"
    return pl.DataFrame(
        {
            "amount": rng.gamma(2.0, 30.0, n) + shift * 42.4,
            "hour_of_day": rng.integers(0, 24, n).astype(float),
            "category": category,
            "score": rng.beta(1.0, 20.0, n),
        }
    )


COLUMNS = ["amount", "hour_of_day", "category", "score"]
# Evidently's own imports (numpy.core, litestar) warn; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_run_writes_html_and_returns_typed_columns(tmp_path: Path) -> None:
    html = tmp_path / "reports" / "drift.html"
    result = run_evidently(
        _frame(3_000, 0),
        _frame(3_000, 1, shift=1.0, new_share=0.3),
        COLUMNS,
        html,
        max_rows=2_000,
    )
    assert isinstance(result, EvidentlyResult)
    assert html.exists() and html.stat().st_size > 10_000
    assert result.html_path == str(html)
    assert (result.n_reference, result.n_current) == (2_000, 2_000)  # sampled down
    assert set(result.columns) == set(COLUMNS)
    amount = result.columns["amount"]
    assert amount.method == "Wasserstein distance (normed)" and not amount.is_p_value
    assert amount.drifted and amount.score > 0.5 and type(amount.score) is float
    assert result.columns["category"].method == "Jensen-Shannon distance"
    assert result.columns["category"].drifted
    assert not result.columns["hour_of_day"].drifted
    assert not result.columns["score"].drifted
    assert result.drifted_columns == ["amount", "category"]
    assert result.drifted_count == 2 and result.drift_share == pytest.approx(0.5)
    assert result.dataset_drifted  # 0.5 >= Evidently's default share 0.5
    json.loads(result.model_dump_json())


def test_small_reference_uses_p_value_tests() -> None:
    result = run_evidently(_frame(500, 0), _frame(500, 1, shift=1.0), ["amount", "score"])
    amount = result.columns["amount"]
    assert amount.is_p_value and "p_value" in amount.method
    assert amount.drifted and amount.score < 0.05
    assert result.html_path is None


def test_result_from_snapshot_without_tests_uses_the_method_direction() -> None:
    snapshot = {
        "metrics": [
            {
                "id": "a",
                "config": {"type": "evidently:metric_v2:DriftedColumnsCount", "drift_share": 0.5},
                "value": {"count": np.float64(1.0), "share": np.float64(0.5)},
            },
            {
                "id": "b",
                "config": {
                    "type": "evidently:metric_v2:ValueDrift",
                    "column": "x",
                    "method": "K-S p_value",
                    "threshold": 0.05,
                },
                "value": np.float64(0.001),
            },
            {
                "id": "c",
                "config": {
                    "type": "evidently:metric_v2:ValueDrift",
                    "column": "y",
                    "method": "Wasserstein distance (normed)",
                    "threshold": 0.1,
                },
                "value": np.float64(0.05),
            },
        ],
        "tests": [],
    }
    result = result_from_snapshot(snapshot)
    assert result.columns["x"].drifted and result.columns["x"].is_p_value
    assert not result.columns["y"].drifted
    assert result.drift_share == 0.5 and type(result.drift_share) is float
    assert result.share_threshold == 0.5 and result.dataset_drifted


def test_import_evidently_loads_what_run_evidently_needs() -> None:
    import sys

    from driftloop.evidently_report import import_evidently

    import_evidently()
    import_evidently()  # idempotent
    assert "evidently.presets" in sys.modules
