"""One versioned feature service per model: training and serving name the same features."""

from feast import FeatureService
from feature_views import card_velocity, merchant_risk

fraud_v1 = FeatureService(
    name="fraud_v1",
    features=[card_velocity, merchant_risk],
    description="Features of the fraud model v1 (driftloop.schema CARD_ + MERCHANT_FEATURES).",
    tags={"model": "fraud"},
)
