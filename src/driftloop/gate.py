"""The promotion gate: a challenger against the champion, before any traffic sees it.

Pure domain code (numpy, polars, xgboost scoring; no store, no clock, no network).
The caller loads both models, builds one labelled window (the most recent labelled
rows, with their point-in-time features) and gets back a typed :class:`GateVerdict`.

Checks, all on the *same* window:

1. **Primary metric with a margin.** The primary metric is PR AUC (average
   precision) by default: fraud is rare (about 1-2 % of rows), PR AUC is
   threshold-free, so it compares two models whatever decision thresholds they
   chose, and unlike ROC AUC it is not flattered by the mass of easy negatives.
   ``recall`` (at each model's own threshold) can be chosen instead. The
   challenger must reach ``champion + margin``.
2. **No slice regression.** Per merchant category and per amount band, the
   challenger's primary metric may not fall more than ``slice_tolerance`` below
   the champion's. A drop fails the gate when it is both *material* (beyond the
   tolerance) and *real*: a paired Poisson bootstrap of the slice (both models
   scored on the same resampled rows) puts the 95th percentile of the
   difference below zero. On a slice with 30 frauds, PR AUC alone moves by
   +-0.05 between resamples; without this, noise rejects good challengers. Slices
   with too few rows or frauds are reported as skipped.
3. **Behavioural checks** (Made-With-ML's model tests): *minimum functionality*,
   obvious fraud (huge foreign online jewelry purchase at night on a card in a
   burst, at a merchant with a high fraud rate) must score at or above the
   model's threshold and obvious legitimate purchases (small domestic daytime
   grocery at a point of sale) below it; *invariance*, fields the model must not
   read (transaction and request ids, entity keys, the serving arm) do not change
   any score.

With no champion (the first model) only the behavioural checks apply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from driftloop.modeling import FeatureEncoder, predict
from driftloop.training import Metrics, evaluate

PrimaryMetric = Literal["pr_auc", "recall"]
SliceStatus = Literal["pass", "fail", "skipped"]

#: fields a fraud model must never read; the invariance check perturbs them
IRRELEVANT_FIELDS: tuple[str, ...] = (
    "transaction_id",
    "request_id",
    "card_id",
    "merchant_id",
    "arm",
    "model_version",
)

__all__ = [
    "IRRELEVANT_FIELDS",
    "BehaviouralResult",
    "GateConfig",
    "GateVerdict",
    "MetricComparison",
    "ModelScorer",
    "SliceResult",
    "amount_band",
    "evaluate_gate",
    "legit_cases",
    "obvious_fraud_cases",
]


class GateConfig(BaseModel):
    """How strict the gate is. ``margin`` and ``slice_tolerance`` come from settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    primary_metric: PrimaryMetric = Field(
        default="pr_auc",
        description="pr_auc (threshold-free; default) or recall at each model's threshold",
    )
    margin: float = Field(
        default=0.005, ge=0, description="challenger must beat the champion by this"
    )
    slice_tolerance: float = Field(
        default=0.05, ge=0, description="largest allowed drop of the primary metric on any slice"
    )
    min_slice_rows: int = Field(default=200, ge=1, description="smaller slices are skipped")
    min_slice_positives: int = Field(
        default=30, ge=1, description="slices with fewer frauds are skipped"
    )
    amount_bands: tuple[float, ...] = Field(
        default=(25.0, 100.0, 500.0),
        description="upper bounds of the amount bands (the last is open)",
    )
    bootstrap_rounds: int = Field(
        default=200, ge=0, description="paired bootstrap resamples per slice (0: off)"
    )
    seed: int = Field(default=0, ge=0, description="seed of the bootstrap")
    invariance_rows: int = Field(
        default=256, ge=1, description="rows perturbed by the invariance check"
    )
    invariance_atol: float = Field(default=1e-6, ge=0, description="largest allowed score change")
    min_window_positives: int = Field(
        default=20,
        ge=1,
        description="fewer labelled frauds in the window: no metric verdict possible",
    )

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> GateConfig:
        """Margin and slice tolerance from :class:`~driftloop.settings.Settings`."""
        values = {"margin": settings.gate_margin, "slice_tolerance": settings.gate_slice_tolerance}
        return cls(**{**values, **overrides})


@dataclass(frozen=True)
class ModelScorer:
    """A model as the gate sees it: booster, encoder, decision threshold and a name."""

    tag: str
    booster: Any  # xgboost.Booster
    encoder: FeatureEncoder
    threshold: float

    def score(self, frame: pl.DataFrame) -> np.ndarray:
        return predict(self.booster, self.encoder.encode_frame(frame))

    def score_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return predict(self.booster, self.encoder.encode_rows(rows))


# -- results ---------------------------------------------------------------------


class MetricComparison(BaseModel):
    """The primary metric of both models on the whole window."""

    metric: PrimaryMetric
    challenger: float
    champion: float | None
    required: float | None = Field(description="champion + margin (None without champion)")
    delta: float | None
    passed: bool


class SliceResult(BaseModel):
    dimension: Literal["category", "amount_band"]
    value: str
    rows: int
    positives: int
    challenger: float | None
    champion: float | None
    delta: float | None
    delta_high: float | None = Field(
        default=None, description="95th percentile of the bootstrapped difference"
    )
    status: SliceStatus
    note: str = ""


class BehaviouralResult(BaseModel):
    name: str
    kind: Literal["minimum_functionality", "invariance"]
    passed: bool
    detail: str


class GateVerdict(BaseModel):
    """The gate's decision and every number behind it."""

    passed: bool
    reasons: list[str] = Field(default_factory=list, description="why it failed (empty on pass)")
    challenger_tag: str
    champion_tag: str | None
    primary_metric: PrimaryMetric
    margin: float
    slice_tolerance: float
    window_rows: int
    window_positives: int
    window_start: str | None = None
    window_end: str | None = None
    challenger: Metrics
    champion: Metrics | None
    primary: MetricComparison
    slices: list[SliceResult]
    behavioural: list[BehaviouralResult]

    @property
    def reason(self) -> str:
        """One line: why it failed, or a pass summary."""
        if not self.passed:
            return "; ".join(self.reasons)
        p = self.primary
        if p.champion is None:
            return f"passed (no champion): {p.metric} {p.challenger:.4f}"
        return (
            f"passed: {p.metric} {p.challenger:.4f} vs champion {p.champion:.4f} "
            f"(required {p.required:.4f})"
        )

    def summary(self) -> dict[str, Any]:
        """A small JSON-able dict for events and lineage (no per-slice detail)."""
        return {
            "passed": self.passed,
            "reason": self.reason,
            "primary_metric": self.primary_metric,
            "challenger": _finite(self.primary.challenger),
            "champion": _finite(self.primary.champion),
            "margin": self.margin,
            "slice_tolerance": self.slice_tolerance,
            "window_rows": self.window_rows,
            "window_positives": self.window_positives,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "slices_failed": [
                f"{s.dimension}={s.value}" for s in self.slices if s.status == "fail"
            ],
            "slices_skipped": sum(s.status == "skipped" for s in self.slices),
            "behavioural_failed": [b.name for b in self.behavioural if not b.passed],
            "champion_tag": self.champion_tag,
        }

    def table(self) -> list[dict[str, Any]]:
        """Rows for a Prefect table artifact: one per check."""
        rows: list[dict[str, Any]] = []

        def add(check: str, challenger: Any, champion: Any, required: str, status: str) -> None:
            rows.append(
                {
                    "check": check,
                    "challenger": _fmt(challenger),
                    "champion": _fmt(champion),
                    "required": required,
                    "status": status,
                }
            )

        p = self.primary
        add(
            f"{p.metric} (window: {self.window_rows} rows, {self.window_positives} frauds)",
            p.challenger,
            p.champion,
            "-" if p.required is None else f">= {p.required:.4f}",
            "pass" if p.passed else "fail",
        )
        for name in ("roc_auc", "pr_auc", "precision", "recall", "f1"):
            if name != p.metric:
                add(
                    name,
                    getattr(self.challenger, name),
                    None if self.champion is None else getattr(self.champion, name),
                    "info",
                    "-",
                )
        for s in self.slices:
            add(
                f"slice {s.dimension}={s.value} ({s.rows} rows, {s.positives} frauds)",
                s.challenger,
                s.champion,
                f"drop <= {self.slice_tolerance:.3f}",
                s.status if not s.note else f"{s.status} ({s.note})",
            )
        for b in self.behavioural:
            add(f"{b.kind}: {b.name}", b.detail, "", "pass", "pass" if b.passed else "fail")
        return rows


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if not math.isfinite(x) else f"{x:.4f}"
    return str(x)


# -- slices ----------------------------------------------------------------------


def amount_band(bounds: Sequence[float]) -> pl.Expr:
    """An expression naming the amount band of each row, e.g. ``25-100`` or ``500+``."""
    edges = [0.0, *bounds]
    expr: Any = pl.when(pl.col("amount").is_null()).then(pl.lit("missing"))
    for lo, hi in zip(edges, edges[1:], strict=False):
        expr = expr.when(pl.col("amount") < hi).then(pl.lit(f"{lo:g}-{hi:g}"))
    return expr.otherwise(pl.lit(f"{edges[-1]:g}+"))


def _metric(metric: PrimaryMetric, y: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    return float(getattr(evaluate(y, scores, threshold), metric))


def _slices(
    frame: pl.DataFrame,
    y: np.ndarray,
    s_chal: np.ndarray,
    s_champ: np.ndarray,
    challenger: ModelScorer,
    champion: ModelScorer,
    cfg: GateConfig,
) -> list[SliceResult]:
    keys = frame.select(
        pl.col("category").cast(pl.String).fill_null("missing").alias("category"),
        amount_band(cfg.amount_bands).alias("amount_band"),
    )
    out: list[SliceResult] = []
    for dimension in ("category", "amount_band"):
        values = keys[dimension].to_numpy()
        for value in sorted(set(values.tolist())):
            mask = values == value
            rows, positives = int(mask.sum()), int(y[mask].sum())
            if (
                rows < cfg.min_slice_rows
                or positives < cfg.min_slice_positives
                or positives == rows
            ):
                out.append(
                    SliceResult(
                        dimension=dimension,  # type: ignore[arg-type]
                        value=str(value),
                        rows=rows,
                        positives=positives,
                        challenger=None,
                        champion=None,
                        delta=None,
                        status="skipped",
                        note=f"< {cfg.min_slice_rows} rows or < {cfg.min_slice_positives} frauds",
                    )
                )
                continue
            mc = _metric(cfg.primary_metric, y[mask], s_chal[mask], challenger.threshold)
            mm = _metric(cfg.primary_metric, y[mask], s_champ[mask], champion.threshold)
            delta = mc - mm
            high = None
            status: SliceStatus = "pass"
            note = ""
            if delta < -cfg.slice_tolerance:
                high = _bootstrap_delta_high(
                    cfg, y[mask], s_chal[mask], s_champ[mask], challenger, champion
                )
                if high is None or high < 0:
                    status = "fail"
                else:
                    note = "within noise: bootstrap 95th percentile of the difference >= 0"
            out.append(
                SliceResult(
                    dimension=dimension,  # type: ignore[arg-type]
                    value=str(value),
                    rows=rows,
                    positives=positives,
                    challenger=mc,
                    champion=mm,
                    delta=delta,
                    delta_high=high,
                    status=status,
                    note=note,
                )
            )
    return out


def _weighted_metric(
    metric: PrimaryMetric, y: np.ndarray, scores: np.ndarray, threshold: float, w: np.ndarray
) -> float:
    """PR AUC (average precision) or recall with row weights (for the Poisson bootstrap)."""
    pos = float(np.sum(w * y))
    if pos <= 0:
        return float("nan")
    if metric == "recall":
        return float(np.sum(w * y * (scores >= threshold)) / pos)
    order = np.argsort(-scores, kind="stable")
    wy, wn = (w * y)[order], (w * (1 - y))[order]
    tp, fp = np.cumsum(wy), np.cumsum(wn)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
    return float(np.sum(precision * wy) / pos)


def _bootstrap_delta_high(
    cfg: GateConfig,
    y: np.ndarray,
    s_chal: np.ndarray,
    s_champ: np.ndarray,
    challenger: ModelScorer,
    champion: ModelScorer,
) -> float | None:
    """95th percentile of (challenger - champion) over paired Poisson resamples of a slice."""
    if cfg.bootstrap_rounds == 0:
        return None
    rng = np.random.default_rng(cfg.seed)
    yf = y.astype(np.float64)
    deltas = []
    for _ in range(cfg.bootstrap_rounds):
        w = rng.poisson(1.0, y.size).astype(np.float64)
        d = _weighted_metric(cfg.primary_metric, yf, s_chal, challenger.threshold, w) - (
            _weighted_metric(cfg.primary_metric, yf, s_champ, champion.threshold, w)
        )
        if np.isfinite(d):
            deltas.append(d)
    return float(np.percentile(deltas, 95)) if deltas else None


# -- behavioural checks ----------------------------------------------------------

_FRAUD_BASE: dict[str, Any] = {
    "amount": 4_800.0,
    "hour_of_day": 3.0,
    "category": "jewelry",
    "channel": "online",
    "country": "NG",
    "card_txn_count_1h": 6.0,
    "card_txn_count_24h": 9.0,
    "card_amount_mean_1h": 3_900.0,
    "card_amount_mean_24h": 900.0,
    "secs_since_last_txn": 45.0,
    "amount_to_card_mean": 5.3,
    "merchant_txn_count_24h": 40.0,
    "merchant_amount_mean_24h": 1_500.0,
    "merchant_fraud_rate_30d": 0.35,
}
_LEGIT_BASE: dict[str, Any] = {
    "amount": 18.5,
    "hour_of_day": 14.0,
    "category": "grocery",
    "channel": "pos",
    "country": "US",
    "card_txn_count_1h": 1.0,
    "card_txn_count_24h": 3.0,
    "card_amount_mean_1h": 18.5,
    "card_amount_mean_24h": 30.0,
    "secs_since_last_txn": 21_000.0,
    "amount_to_card_mean": 0.6,
    "merchant_txn_count_24h": 120.0,
    "merchant_amount_mean_24h": 35.0,
    "merchant_fraud_rate_30d": 0.003,
}


def obvious_fraud_cases() -> dict[str, dict[str, Any]]:
    """Named rows every fraud model must flag (minimum functionality)."""
    return {
        "fraud: huge foreign online jewelry at night in a burst": dict(_FRAUD_BASE),
        "fraud: same, travel merchant": {**_FRAUD_BASE, "category": "travel", "country": "BR"},
        "fraud: same, first seen minutes after a burst at 01:00": {
            **_FRAUD_BASE,
            "hour_of_day": 1.0,
            "card_txn_count_1h": 8.0,
            "secs_since_last_txn": 20.0,
        },
    }


def legit_cases() -> dict[str, dict[str, Any]]:
    """Named rows no fraud model may flag (minimum functionality)."""
    return {
        "legit: small domestic daytime grocery at a pos": dict(_LEGIT_BASE),
        "legit: same, restaurant at 12:00": {
            **_LEGIT_BASE,
            "category": "restaurant",
            "hour_of_day": 12.0,
            "amount": 24.0,
        },
        "legit: same, gas at 09:00": {**_LEGIT_BASE, "category": "gas", "hour_of_day": 9.0},
    }


def _minimum_functionality(model: ModelScorer) -> list[BehaviouralResult]:
    out = []
    for expect_fraud, cases in ((True, obvious_fraud_cases()), (False, legit_cases())):
        names = list(cases)
        scores = model.score_rows([cases[n] for n in names])
        for name, score in zip(names, scores, strict=True):
            ok = score >= model.threshold if expect_fraud else score < model.threshold
            rel = ">=" if expect_fraud else "<"
            out.append(
                BehaviouralResult(
                    name=name,
                    kind="minimum_functionality",
                    passed=bool(ok),
                    detail=f"score {score:.4f}, expected {rel} threshold {model.threshold:.4f}",
                )
            )
    return out


def _perturb(frame: pl.DataFrame) -> pl.DataFrame:
    """The same rows with every irrelevant field changed (ids reversed, keys shifted)."""
    changes = []
    for name in IRRELEVANT_FIELDS:
        if name not in frame.columns:
            continue
        dtype = frame.schema[name]
        if dtype == pl.String:
            changes.append((pl.lit("perturbed-") + pl.col(name).str.reverse()).alias(name))
        elif dtype.is_integer():
            changes.append((pl.col(name) + 7_919).alias(name))
        elif dtype.is_float():
            changes.append((pl.col(name) + 7_919.0).alias(name))
    return frame.with_columns(changes) if changes else frame


def _invariance(model: ModelScorer, frame: pl.DataFrame, cfg: GateConfig) -> BehaviouralResult:
    sample = frame.head(cfg.invariance_rows)
    # rows also carry fields the gate adds: make sure they exist, with values
    if "request_id" not in sample.columns:
        sample = sample.with_columns(
            pl.format("req-{}", pl.int_range(pl.len())).alias("request_id")
        )
    if "arm" not in sample.columns:
        sample = sample.with_columns(pl.lit("champion").alias("arm"))
    before = model.score(sample)
    after = model.score(_perturb(sample))
    worst = float(np.max(np.abs(before - after))) if before.size else 0.0
    fields = [f for f in IRRELEVANT_FIELDS if f in sample.columns]
    return BehaviouralResult(
        name=f"irrelevant fields ({', '.join(fields)})",
        kind="invariance",
        passed=worst <= cfg.invariance_atol,
        detail=f"largest score change {worst:.2e} over {sample.height} rows",
    )


# -- the gate --------------------------------------------------------------------


def evaluate_gate(
    challenger: ModelScorer,
    champion: ModelScorer | None,
    window: pl.DataFrame,
    config: GateConfig | None = None,
    *,
    label: str = "is_fraud",
) -> GateVerdict:
    """Score both models on ``window`` (features + ``label``) and decide.

    ``window`` must hold every feature of both encoders, ``category``, ``amount``
    and the label column; rows with a null label are dropped.
    """
    cfg = config or GateConfig()
    frame = window.filter(pl.col(label).is_not_null())
    y = frame[label].cast(pl.Int64).to_numpy()
    reasons: list[str] = []
    s_chal = challenger.score(frame)
    chal_metrics = evaluate(y, s_chal, challenger.threshold)
    chal_value = float(getattr(chal_metrics, cfg.primary_metric))
    enough = int(y.sum()) >= cfg.min_window_positives and int(y.sum()) < y.size
    if not enough:
        reasons.append(
            f"window has {int(y.sum())} labelled frauds in {y.size} rows "
            f"(< {cfg.min_window_positives}): no metric verdict possible"
        )

    champ_metrics: Metrics | None = None
    slices: list[SliceResult] = []
    if champion is not None:
        s_champ = champion.score(frame)
        champ_metrics = evaluate(y, s_champ, champion.threshold)
        champ_value = float(getattr(champ_metrics, cfg.primary_metric))
        required = champ_value + cfg.margin
        primary_ok = enough and math.isfinite(chal_value) and chal_value >= required
        primary = MetricComparison(
            metric=cfg.primary_metric,
            challenger=chal_value,
            champion=champ_value,
            required=required,
            delta=chal_value - champ_value,
            passed=primary_ok,
        )
        if enough and not primary_ok:
            reasons.append(
                f"{cfg.primary_metric} {chal_value:.4f} does not beat champion "
                f"{champ_value:.4f} by margin {cfg.margin:g} (needs {required:.4f})"
            )
        if enough:
            slices = _slices(frame, y, s_chal, s_champ, challenger, champion, cfg)
            failed = [s for s in slices if s.status == "fail"]
            if failed:
                reasons.append(
                    "slice regression beyond "
                    f"{cfg.slice_tolerance:g}: "
                    + ", ".join(f"{s.dimension}={s.value} ({s.delta:+.4f})" for s in failed)
                )
    else:
        primary = MetricComparison(
            metric=cfg.primary_metric,
            challenger=chal_value,
            champion=None,
            required=None,
            delta=None,
            passed=enough,
        )

    behavioural = [*_minimum_functionality(challenger), _invariance(challenger, frame, cfg)]
    broken = [b for b in behavioural if not b.passed]
    if broken:
        reasons.append("behavioural checks failed: " + ", ".join(b.name for b in broken))

    ts = frame["event_timestamp"] if "event_timestamp" in frame.columns else None
    return GateVerdict(
        passed=not reasons,
        reasons=reasons,
        challenger_tag=challenger.tag,
        champion_tag=None if champion is None else champion.tag,
        primary_metric=cfg.primary_metric,
        margin=cfg.margin,
        slice_tolerance=cfg.slice_tolerance,
        window_rows=int(y.size),
        window_positives=int(y.sum()),
        window_start=None if ts is None or ts.is_empty() else ts.min().isoformat(),  # type: ignore[union-attr]
        window_end=None if ts is None or ts.is_empty() else ts.max().isoformat(),  # type: ignore[union-attr]
        challenger=chal_metrics,
        champion=champ_metrics,
        primary=primary,
        slices=slices,
        behavioural=behavioural,
    )
