"""Prometheus metrics of driftloop's services (prometheus-client), defined once.

Every series carries the model name; model-service series also carry the version.
The names are the contract of ``infra/prometheus`` rules and the Grafana dashboard.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.0,
)
_AGE_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 86_400, 7 * 86_400)
_SCORE_BUCKETS = tuple(i / 20 for i in range(1, 20))

PREDICT_LATENCY = Histogram(
    "driftloop_predict_latency_seconds",
    "Time to score a request (features + model + log), by endpoint",
    ["model", "version", "endpoint"],
    buckets=_LATENCY_BUCKETS,
)
PREDICTIONS = Counter(
    "driftloop_predictions_total", "Scored rows by decision", ["model", "version", "decision"]
)
ERRORS = Counter(
    "driftloop_prediction_errors_total", "Failed requests by kind", ["model", "version", "kind"]
)
SCORE = Histogram(
    "driftloop_score", "Distribution of fraud scores", ["model", "version"], buckets=_SCORE_BUCKETS
)
FEATURE_AGE = Histogram(
    "driftloop_feature_age_seconds",
    "Age of the online card features used for scoring",
    ["model", "version"],
    buckets=_AGE_BUCKETS,
)
UNKNOWN_ENTITY = Counter(
    "driftloop_unknown_entity_total",
    "Rows scored without online features for an entity",
    ["model", "version", "entity"],
)
UNSEEN_CATEGORY = Counter(
    "driftloop_unseen_category_total",
    "Rows with a categorical value the model never saw (fallback bucket)",
    ["model", "version", "field"],
)
MISSING_VALUE = Counter(
    "driftloop_missing_value_total",
    "Rows with a missing optional field (scored with native missing handling)",
    ["model", "version", "field"],
)
PREDLOG_BACKLOG = Gauge(
    "driftloop_predlog_backlog_records",
    "Prediction-log records spooled locally and not yet in Delta",
    ["model", "version"],
)
FEEDBACK = Counter("driftloop_feedback_total", "Labels received by outcome", ["model", "outcome"])

# -- router and rollout (bentos/router.py) ------------------------------------------
ROUTER_REQUESTS = Counter(
    "driftloop_router_requests_total",
    "Requests the router sent to an arm, by outcome: ok, error (the arm answered with an "
    "error), fallback (the arm did not answer; the champion served the request)",
    ["model", "arm", "version", "outcome"],
)
ROUTER_LATENCY = Histogram(
    "driftloop_router_latency_seconds",
    "End-to-end latency seen by the router, per arm chosen (retries included)",
    ["model", "arm"],
    buckets=_LATENCY_BUCKETS,
)
ROLLOUT_WEIGHT = Gauge(
    "driftloop_rollout_weight",
    "Traffic weight of an arm in percent (0-100), as the router applies it",
    ["model", "arm", "version"],
    multiprocess_mode="livemax",
)
ROLLOUT_BREACHES = Counter(
    "driftloop_rollout_breaches_total",
    "Automatic rollbacks of a canary, by the check it breached",
    ["model", "reason"],
)
