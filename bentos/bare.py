"""A bare model service: the baseline of ``benchmarks/serving.py``.

The same XGBoost model (``DRIFTLOOP_MODEL_TAG``, an explicit tag), the same request
and response models and the same BentoML options as ``bentos/service.py``, but no
Feast read, no prediction log and no driftloop metrics: the card and merchant
features are missing (NaN, which XGBoost routes natively), only the request-time
fields are encoded. What our service costs over this one is the price of Feast,
logging and metrics. ``/predict_columns`` is the library's columnar scorer with no
features, no log and no metrics (``Scorer(..., MissingFeatures(), None,
record_metrics=False)``).

    DRIFTLOOP_MODEL_TAG=fraud:v... bentoml serve bentos.bare:BareModel
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Annotated

import bentoml
from pydantic import Field

try:  # inside a built Bento the library is shipped under src/
    import driftloop  # noqa: F401
except ImportError:  # pragma: no cover - only in a Bento without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from driftloop.serving import (  # noqa: E402
    MissingFeatures,
    PredictionColumns,
    PredictionResponse,
    Scorer,
    TransactionColumns,
    TransactionRequest,
)

MAX_BATCH = 10_000


@bentoml.service(
    name="driftloop_bare",
    workers=1,
    traffic={"timeout": 30, "max_concurrency": 256},
    logging={"access": {"enabled": False}},
)
class BareModel:
    """Scores transactions with the model alone (no features, no log)."""

    def __init__(self) -> None:
        from driftloop import registry
        from driftloop.errors import ModelError
        from driftloop.settings import get_settings

        settings = get_settings()
        settings.apply_environment()
        if not settings.model_tag:
            raise ModelError("no model tag: set DRIFTLOOP_MODEL_TAG")
        self.model = registry.load_model(settings.model_tag)
        self.name = settings.model_name
        self.arm = settings.arm
        self.max_rows = settings.max_batch_rows
        self.scorer = Scorer(
            self.model,
            MissingFeatures(),
            None,
            model_name=self.name,
            arm=self.arm,
            record_metrics=False,
        )

    def _score(self, requests: list[TransactionRequest]) -> list[PredictionResponse]:
        from datetime import UTC, datetime

        from driftloop.modeling import derive_row, predict

        now = datetime.now(UTC)
        rows = []
        for req in requests:
            row = {
                "amount": req.amount,
                "category": req.category,
                "channel": req.channel,
                "country": req.country,
            }
            row.update(derive_row(req.amount, req.timestamp or now, {}))
            rows.append(row)
        scores = predict(self.model.booster, self.model.encoder.encode_rows(rows))
        threshold = self.model.threshold
        return [
            PredictionResponse(
                request_id=req.request_id or uuid.uuid4().hex,
                transaction_id=req.transaction_id,
                score=float(s),
                decision=bool(s >= threshold),
                threshold=threshold,
                model=self.name,
                model_version=self.model.version,
                arm=self.arm,
                feature_age_seconds=None,
            )
            for req, s in zip(requests, scores, strict=True)
        ]

    @bentoml.api
    def predict(self, transaction: TransactionRequest) -> PredictionResponse:
        """Score one transaction."""
        return self._score([transaction])[0]

    @bentoml.api
    def predict_batch(
        self,
        transactions: Annotated[
            list[TransactionRequest], Field(min_length=1, max_length=MAX_BATCH)
        ],
    ) -> list[PredictionResponse]:
        """Score many transactions in one call (at most 10,000 rows)."""
        return self._score(transactions)

    @bentoml.api
    def predict_columns(self, columns: TransactionColumns) -> PredictionColumns:
        """Score a batch given column-wise (as ``bentos/service.py``)."""
        if columns.rows > self.max_rows:
            raise bentoml.exceptions.InvalidArgument(
                f"columns: {columns.rows} rows exceeds the limit of {self.max_rows}"
            )
        return self.scorer.score_columns(columns)
