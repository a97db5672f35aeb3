"""The model service: one pinned model version behind typed BentoML APIs.

A thin adapter over :mod:`driftloop.serving`. The model tag comes from
``DRIFTLOOP_MODEL_TAG`` or, when served from a Bento, from the Bento's own
``model_tag`` label; never ``:latest``.

    bentoml serve bentos.service:FraudModel           # from a checkout, DRIFTLOOP_MODEL_TAG set
    bentoml serve driftloop-fraud:<version>            # a built Bento pins its model
"""

from __future__ import annotations

import gc
import sys
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType
from pydantic import Field

try:  # inside a built Bento the library is shipped under src/
    import driftloop  # noqa: F401
except ImportError:  # pragma: no cover - only in a Bento without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from driftloop import metrics  # noqa: E402
from driftloop.online_fast import FastOnlineReader  # noqa: E402
from driftloop.serving import (  # noqa: E402
    ARROW_STREAM,
    FeedbackRequest,
    FeedbackResponse,
    PredictionColumns,
    PredictionResponse,
    Scorer,
    TransactionColumns,
    TransactionRequest,
    columns_from_arrow,
    label_record,
    predictions_to_arrow,
    token_ok,
)

MAX_BATCH = 10_000


class Unauthorized(bentoml.exceptions.BentoMLException):
    error_code = HTTPStatus.UNAUTHORIZED


class FeedbackDisabled(bentoml.exceptions.BentoMLException):
    error_code = HTTPStatus.SERVICE_UNAVAILABLE


class FaultInjectingBooster:
    """TEST ONLY: wraps the booster to fail, slow down or invert scores on purpose.

    Active only when a ``DRIFTLOOP_FAULT_*`` setting is set (all off by default); the
    faults happen inside scoring, so the prediction log records them as they were served.
    """

    def __init__(self, booster: Any, settings: Any) -> None:
        import logging

        self._booster = booster
        self._error_rate = settings.fault_error_rate
        self._delay = settings.fault_latency_ms / 1000.0
        self._invert = settings.fault_invert_scores
        logging.getLogger(__name__).warning(
            "FAULT INJECTION ON: error_rate=%s latency_ms=%s invert_scores=%s",
            self._error_rate,
            settings.fault_latency_ms,
            self._invert,
        )

    def inplace_predict(self, X: Any, *args: Any, **kwargs: Any) -> Any:
        import random
        import time

        if self._delay:
            time.sleep(self._delay)
        if self._error_rate and random.random() < self._error_rate:
            raise RuntimeError("injected fault (DRIFTLOOP_FAULT_ERROR_RATE)")
        scores = self._booster.inplace_predict(X, *args, **kwargs)
        return 1.0 - scores if self._invert else scores


@bentoml.service(
    name="driftloop_model",
    workers=1,
    traffic={"timeout": 30, "max_concurrency": 256},
    logging={"access": {"enabled": False}},
)
class FraudModel:
    """Scores card transactions with features from the Feast online store."""

    def __init__(self) -> None:
        from driftloop import bento, predlog, registry
        from driftloop.errors import ModelError
        from driftloop.settings import get_settings

        settings = get_settings()
        settings.apply_environment()
        tag = settings.model_tag or bento.model_tag_from_bento_dir(Path(__file__).resolve().parent)
        if not tag:
            raise ModelError("no model tag: set DRIFTLOOP_MODEL_TAG or serve a built Bento")
        self.settings = settings
        self.model = registry.load_model(tag)
        if settings.fault_error_rate or settings.fault_latency_ms or settings.fault_invert_scores:
            self.model = self.model.model_copy(
                update={"booster": FaultInjectingBooster(self.model.booster, settings)}
            )
        self.predictions = predlog.PredictionLog(settings)
        self.labels = predlog.LabelLog(settings)
        self.predictions.start()
        self.labels.start()
        self.scorer = Scorer(
            self.model,
            FastOnlineReader(settings, cache=settings.online_cache),
            self.predictions,
            model_name=settings.model_name,
            arm=settings.arm,
        )
        self._token = (
            settings.feedback_token.get_secret_value() if settings.feedback_token else None
        )
        self._backlog = metrics.PREDLOG_BACKLOG.labels(settings.model_name, self.model.version)
        self._backlog.set_function(self.predictions.backlog_rows)
        # What exists now (Feast registry and protobufs, the model, pydantic schemas) lives
        # as long as the worker: keep it out of the collector's full passes, which the
        # containers of a batch of thousands of rows would otherwise trigger mid-request.
        gc.freeze()

    @bentoml.api
    def predict(self, transaction: TransactionRequest) -> PredictionResponse:
        """Score one transaction."""
        return self.scorer.score([transaction], endpoint="predict")[0]

    @bentoml.api
    def predict_batch(
        self,
        transactions: Annotated[
            list[TransactionRequest], Field(min_length=1, max_length=MAX_BATCH)
        ],
    ) -> list[PredictionResponse]:
        """Score many transactions in one call (at most 10,000 rows)."""
        self._check_rows("transactions", len(transactions))
        return self.scorer.score(transactions, endpoint="predict_batch")

    @bentoml.api
    def predict_columns(self, columns: TransactionColumns) -> PredictionColumns:
        """Score a batch given column-wise, the fast batch path: one array per field.

        At most ``DRIFTLOOP_MAX_BATCH_ROWS`` rows; answers column-wise, in row order.
        """
        self._check_rows("columns", columns.rows)
        return self.scorer.score_columns(columns, endpoint="predict_columns")

    @bentoml.api
    def predict_arrow(
        self, table: Annotated[Path, ContentType(ARROW_STREAM)], /
    ) -> Annotated[bytes, ContentType(ARROW_STREAM)]:
        """Score a batch sent as an Arrow IPC stream (or a Parquet file) body.

        The columns and rules of ``predict_columns``; answers an Arrow IPC stream.
        """
        from driftloop.errors import DataError

        try:
            columns = columns_from_arrow(table.read_bytes())
        except DataError as exc:
            raise bentoml.exceptions.InvalidArgument(str(exc)) from exc
        self._check_rows("table", columns.rows)
        return predictions_to_arrow(self.scorer.score_columns(columns, endpoint="predict_arrow"))

    def _check_rows(self, field: str, rows: int) -> None:
        if rows > self.settings.max_batch_rows:
            metrics.ERRORS.labels(
                self.settings.model_name, self.model.version, "batch_too_large"
            ).inc()
            raise bentoml.exceptions.InvalidArgument(
                f"{field}: {rows} rows exceeds the limit of {self.settings.max_batch_rows}"
            )

    @bentoml.api
    def feedback(self, label: FeedbackRequest, ctx: bentoml.Context) -> FeedbackResponse:
        """Record a late label. Requires ``Authorization: Bearer $DRIFTLOOP_FEEDBACK_TOKEN``."""
        if self._token is None:
            metrics.FEEDBACK.labels(self.settings.model_name, "disabled").inc()
            raise FeedbackDisabled("feedback is disabled: set DRIFTLOOP_FEEDBACK_TOKEN")
        if not token_ok(ctx.request.headers.get("authorization"), self._token):
            metrics.FEEDBACK.labels(self.settings.model_name, "unauthorized").inc()
            raise Unauthorized("authorization: missing or invalid bearer token")
        record = label_record(label)
        self.labels.append([record])
        metrics.FEEDBACK.labels(self.settings.model_name, "accepted").inc()
        return FeedbackResponse(label_id=record["label_id"])

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.predictions.stop(flush=True)
        self.labels.stop(flush=True)
