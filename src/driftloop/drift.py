"""Reference statistics, vectorised drift tests and the drift rule.

Pure functions over polars frames and numpy arrays; no I/O, no Prefect.

How it is used::

    profile = build_profile(reference)                   # once, at training time
    profile.model_dump_json()                            # stored next to the model
    ...
    quality = check_quality(current, profile)            # driftloop.quality
    summary = compute_drift(
        profile, current, DriftThresholds.from_settings(settings),
        exclude=quality.failed_columns,                  # a data break is not drift
    )

Statistics
----------
The reference is summarised once into a JSON-serialisable :class:`ReferenceProfile`:
for each numeric column ``n_quantiles`` quantiles (for the KS test and the
Wasserstein distance), quantile bin edges and proportions (for PSI), mean,
std, min, max and null rate; for each categorical column its value counts.
Nulls and non-finite values (NaN, ±inf) are left out of every distribution and
counted in the null rate instead: a null-rate jump is a data-quality matter.

Numeric columns (and the model's ``score``) get
  * the two-sample Kolmogorov–Smirnov statistic and its asymptotic p-value,
    computed against the reference quantiles (accurate to ~0.5/n_quantiles);
  * PSI over the reference quantile bins (right-closed, proportions floored
    at 1e-4);
  * the Wasserstein-1 distance divided by the reference std (floored at 1e-3),
    i.e. Evidently's "Wasserstein distance (normed)".
Categorical columns get a chi-square test of homogeneity (reference counts vs
current counts) and the Jensen–Shannon distance (natural log, as in Evidently
and scipy, so Evidently's thresholds carry over). Every value unseen in the
reference is a bin of its own.

The drift rule
--------------
A feature is drifted only when BOTH the statistical evidence and the effect
size say so:

* numeric: KS p-value < ``pvalue`` AND (PSI > ``psi`` OR normed Wasserstein >
  ``wasserstein``);
* categorical: chi-square p-value < ``pvalue`` AND Jensen–Shannon distance >
  ``jsd``.

On large windows a p-value alone flags shifts far too small to matter (a
0.02 σ shift on 100k rows has a tiny p-value), and on small windows an effect
size alone is noise; requiring both avoids both failure modes. Each threshold
can be overridden per column (``DriftThresholds.overrides``).

The dataset (the monitored window) is drifted when ANY of:

1. the share of drifted features (among the features actually tested) is
   >= ``share``;
2. the prediction (``score``) distribution is drifted by the same rule;
3. a categorical column has values unseen in the reference on more than
   ``new_category_share`` of its rows (default 1 %).

Columns passed in ``exclude`` (normally ``QualityReport.failed_columns``) and
columns missing from the window or without any non-null value are reported as
skipped and take no part in the drift share: a data break is reported by the
quality check, never as drift. When a profiled feature is excluded, the
model's input is broken and its score moves for that reason: the score's
drift is still computed and shown, but ``prediction_confounded`` is set and
it does not make the dataset drifted (rule 2 is suspended).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats
from scipy.spatial import distance

from driftloop.errors import DataError, SchemaError
from driftloop.schema import CATEGORICAL_VOCAB, NUMERIC_FEATURES

#: quantiles kept per numeric column (KS / Wasserstein resolution ~1/1000)
N_QUANTILES = 1001
#: PSI bins from reference quantiles (fewer when the column has ties)
N_BINS = 20
#: floor of bin proportions in PSI (empty bins would make it infinite)
PSI_EPS = 1e-4
#: floor of the reference std when normalising the Wasserstein distance (as Evidently)
STD_FLOOR = 1e-3
#: how many unseen categorical values a FeatureDrift lists
MAX_UNSEEN_LISTED = 10

SCORE_COLUMN = "score"
LABEL_COLUMN = "label"

Probability = Annotated[float, Field(gt=0, lt=1)]
Positive = Annotated[float, Field(gt=0)]


# ---------------------------------------------------------------------------------
# reference profile
# ---------------------------------------------------------------------------------
class NumericProfile(BaseModel):
    """Summary of one numeric reference column (non-null, finite values only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["numeric"] = "numeric"
    n: int = Field(ge=1, description="non-null finite values")
    null_rate: float = Field(ge=0, le=1, description="share of null or non-finite values")
    min: float
    max: float
    mean: float
    std: float = Field(ge=0, description="population std (ddof=0)")
    bin_edges: list[float] = Field(description="interior PSI edges; bins are right-closed")
    bin_proportions: list[float] = Field(description="reference share per bin (len(edges)+1)")
    quantiles: list[float] = Field(description="values at probabilities linspace(0, 1, len)")

    def quantile(self, p: float) -> float:
        """Reference quantile at probability ``p`` (linear interpolation of the stored grid)."""
        q = np.asarray(self.quantiles)
        return float(np.interp(p, np.linspace(0.0, 1.0, q.size), q))


class CategoricalProfile(BaseModel):
    """Summary of one categorical reference column (non-null values only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["categorical"] = "categorical"
    n: int = Field(ge=1)
    null_rate: float = Field(ge=0, le=1)
    counts: dict[str, int]

    def proportions(self) -> dict[str, float]:
        return {k: v / self.n for k, v in self.counts.items()}


class ReferenceProfile(BaseModel):
    """What the monitor needs to know about the training-time reference.

    Built once by :func:`build_profile`; store it with ``model_dump_json()`` and
    load it with ``ReferenceProfile.model_validate_json(text)``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    n_rows: int = Field(ge=1)
    numeric: dict[str, NumericProfile]
    categorical: dict[str, CategoricalProfile]
    prediction: NumericProfile | None = Field(default=None, description="the score column")
    label_rate: float | None = Field(default=None, description="positive share of labels")

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]


def _finite_sorted(series: pl.Series) -> np.ndarray:
    """Non-null finite values of a numeric series, sorted, as float64."""
    s = series.cast(pl.Float64, strict=False)
    s = s.filter(s.is_finite())
    return s.sort().to_numpy()


def _quantiles_sorted(values: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Linear-interpolated quantiles of an already sorted array (np.quantile 'linear')."""
    pos = probs * (values.size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, values.size - 1)
    return values[lo] + (pos - lo) * (values[hi] - values[lo])


def _bin_proportions(sorted_values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of values in the right-closed bins (-inf, e0], (e0, e1], ..., (e_k, inf)."""
    cum = np.searchsorted(sorted_values, edges, side="right")
    counts = np.diff(np.concatenate(([0], cum, [sorted_values.size])))
    return counts / sorted_values.size


def profile_numeric(
    series: pl.Series, *, n_quantiles: int = N_QUANTILES, n_bins: int = N_BINS
) -> NumericProfile:
    """Profile one numeric column. Raises :class:`DataError` when it has no finite value."""
    values = _finite_sorted(series)
    if values.size == 0:
        raise DataError(f"reference column {series.name!r} has no non-null finite value")
    probs = np.linspace(0.0, 1.0, n_quantiles)
    quantiles = _quantiles_sorted(values, probs)
    edges = np.unique(_quantiles_sorted(values, np.arange(1, n_bins) / n_bins))
    return NumericProfile(
        n=int(values.size),
        null_rate=1.0 - values.size / max(series.len(), 1),
        min=float(values[0]),
        max=float(values[-1]),
        mean=float(values.mean()),
        std=float(values.std()),
        bin_edges=edges.tolist(),
        bin_proportions=_bin_proportions(values, edges).tolist(),
        quantiles=quantiles.tolist(),
    )


def profile_categorical(series: pl.Series) -> CategoricalProfile:
    """Profile one categorical column. Raises :class:`DataError` when it is all null."""
    counts = _value_counts(series)
    n = sum(counts.values())
    if n == 0:
        raise DataError(f"reference column {series.name!r} has no non-null value")
    return CategoricalProfile(n=n, null_rate=1.0 - n / max(series.len(), 1), counts=counts)


def _value_counts(series: pl.Series) -> dict[str, int]:
    s = series.drop_nulls().cast(pl.String)
    if s.len() == 0:
        return {}
    vc = s.value_counts(sort=True)
    return dict(zip(vc[s.name].to_list(), vc["count"].to_list(), strict=True))


def build_profile(
    reference: pl.DataFrame,
    *,
    numeric: Sequence[str] = NUMERIC_FEATURES,
    categorical: Sequence[str] = tuple(CATEGORICAL_VOCAB),
    score: str | None = SCORE_COLUMN,
    label: str | None = LABEL_COLUMN,
    n_quantiles: int = N_QUANTILES,
    n_bins: int = N_BINS,
) -> ReferenceProfile:
    """Summarise the reference frame (features + score + label) once.

    ``score`` and ``label`` are optional: pass ``None``, or leave them out of the
    frame, to profile features only.
    """
    if reference.height == 0:
        raise DataError("reference frame is empty")
    missing = [c for c in (*numeric, *categorical) if c not in reference.columns]
    if missing:
        raise SchemaError(f"reference: missing columns {missing}")
    not_numeric = [c for c in numeric if not reference.schema[c].is_numeric()]
    if not_numeric:
        raise SchemaError(f"reference: numeric columns of another type: {not_numeric}")
    prediction = None
    if score is not None and score in reference.columns:
        prediction = profile_numeric(reference[score], n_quantiles=n_quantiles, n_bins=n_bins)
    label_rate = None
    if label is not None and label in reference.columns:
        labels = reference[label].drop_nulls()
        label_rate = int(labels.cast(pl.Int64).sum()) / labels.len() if labels.len() else None
    return ReferenceProfile(
        n_rows=reference.height,
        numeric={
            c: profile_numeric(reference[c], n_quantiles=n_quantiles, n_bins=n_bins)
            for c in numeric
        },
        categorical={c: profile_categorical(reference[c]) for c in categorical},
        prediction=prediction,
        label_rate=label_rate,
    )


# ---------------------------------------------------------------------------------
# thresholds
# ---------------------------------------------------------------------------------
class FeatureThresholds(BaseModel):
    """Per-column overrides; a ``None`` keeps the dataset-wide value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pvalue: Probability | None = None
    psi: Positive | None = None
    wasserstein: Positive | None = None
    jsd: Annotated[float, Field(gt=0, le=1)] | None = None


class DriftThresholds(BaseModel):
    """Thresholds of the drift rule (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pvalue: Probability = Field(
        default=0.01, description="p-value below which a test is significant"
    )
    psi: Positive = Field(default=0.2, description="PSI above which a numeric shift matters")
    wasserstein: Positive = Field(
        default=0.1, description="normed Wasserstein above which it matters"
    )
    jsd: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.1, description="Jensen-Shannon distance above which a categorical shift matters"
    )
    share: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.25, description="share of drifted features at which the dataset is drifted"
    )
    new_category_share: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.01,
        description="share of rows with an unseen category above which the dataset drifts",
    )
    overrides: dict[str, FeatureThresholds] = Field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Any, **extra: Any) -> DriftThresholds:
        """Build from :class:`driftloop.settings.Settings` (``extra`` sets the other fields)."""
        values: dict[str, Any] = {
            "pvalue": settings.drift_pvalue,
            "psi": settings.drift_psi_threshold,
            "wasserstein": settings.drift_wasserstein_threshold,
            "jsd": settings.drift_jsd_threshold,
            "share": settings.drift_share_threshold,
        }
        new_share = getattr(settings, "drift_new_category_share", None)
        if new_share is not None:
            values["new_category_share"] = new_share
        values.update(extra)
        return cls(**values)

    def for_column(self, column: str) -> FeatureThresholds:
        """The thresholds in force for ``column``, overrides applied, all fields set."""
        o = self.overrides.get(column, FeatureThresholds())
        return FeatureThresholds(
            pvalue=o.pvalue if o.pvalue is not None else self.pvalue,
            psi=o.psi if o.psi is not None else self.psi,
            wasserstein=o.wasserstein if o.wasserstein is not None else self.wasserstein,
            jsd=o.jsd if o.jsd is not None else self.jsd,
        )


# ---------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------
class FeatureDrift(BaseModel):
    """The drift verdict of one column."""

    model_config = ConfigDict(extra="forbid")

    column: str
    kind: Literal["numeric", "categorical"]
    method: str = Field(description="test + deciding effect size, e.g. 'ks+psi'")
    statistic: float | None = Field(default=None, description="KS D or chi-square statistic")
    p_value: float | None = None
    effect_metric: str | None = Field(default=None, description="psi, wasserstein_normed or jsd")
    effect_size: float | None = Field(default=None, description="value of effect_metric")
    pvalue_threshold: float | None = None
    effect_threshold: float | None = None
    psi: float | None = None
    wasserstein_normed: float | None = None
    jsd: float | None = None
    unseen_share: float = Field(
        default=0.0, description="share of rows with a value unseen in reference"
    )
    unseen_values: list[str] = Field(default_factory=list)
    n_current: int = 0
    n_reference: int = 0
    drifted: bool = False
    skipped: bool = False
    skip_reason: str | None = None


class KSResult(BaseModel):
    """A two-sample KS test (used for the sliding window on recent scores)."""

    model_config = ConfigDict(extra="forbid")

    statistic: float
    p_value: float
    n_current: int
    n_reference: int
    drifted: bool


class DriftSummary(BaseModel):
    """The drift verdict of one monitored window. JSON-safe (plain floats)."""

    model_config = ConfigDict(extra="forbid")

    n_rows: int
    n_reference: int
    features: list[FeatureDrift]
    prediction: FeatureDrift | None = None
    drift_share: float = Field(description="drifted / tested features (score not counted)")
    n_tested: int
    drifted_columns: list[str]
    skipped_columns: list[str] = Field(description="columns not tested (score included)")
    new_categories: dict[str, float] = Field(
        default_factory=dict, description="column -> unseen share, where above threshold"
    )
    prediction_confounded: bool = Field(
        default=False, description="a feature failed quality: score drift is shown but not counted"
    )
    dataset_drifted: bool
    reasons: list[str] = Field(default_factory=list, description="why the dataset drifted")
    thresholds: DriftThresholds

    def feature(self, column: str) -> FeatureDrift:
        for f in self.features:
            if f.column == column:
                return f
        if self.prediction is not None and self.prediction.column == column:
            return self.prediction
        raise KeyError(column)


# ---------------------------------------------------------------------------------
# statistics (vectorised)
# ---------------------------------------------------------------------------------
def ks_against_quantiles(
    quantiles: np.ndarray, n_reference: int, current_sorted: np.ndarray
) -> tuple[float, float]:
    """KS statistic and asymptotic p-value of sorted ``current`` vs a reference quantile grid.

    The reference CDF is the step function through the quantile grid, taken at
    the middle of each step (error <= 0.5 / (len(quantiles) - 1)). Between two
    distinct reference values it is constant, so the supremum is reached at the
    grid points or just before them: only ~len(quantiles) binary searches into
    the current sample are needed.
    """
    k = quantiles.size
    uniq, last = np.unique(quantiles[::-1], return_index=True)
    last_index = k - 1 - last  # last grid position holding each distinct value
    f_ref = np.minimum((last_index + 0.5) / (k - 1), 1.0)
    f_ref[-1] = 1.0
    n = current_sorted.size
    f_cur_at = np.searchsorted(current_sorted, uniq, side="right") / n
    f_cur_before = np.searchsorted(current_sorted, uniq, side="left") / n
    # on [u_i, u_{i+1}) the reference is f_ref[i]; the current CDF rises from
    # f_cur_at[i] to f_cur_before[i+1]; before u_0 the reference is 0, after u_last 1.
    d = max(
        float(np.max(np.abs(f_ref - f_cur_at))),
        float(np.max(np.abs(f_ref[:-1] - f_cur_before[1:]), initial=0.0)),
        float(f_cur_before[0]),
    )
    en = n_reference * n / (n_reference + n)
    p = float(stats.kstwo.sf(d, max(int(round(en)), 1)))
    return d, min(max(p, 0.0), 1.0)


def wasserstein_against_quantiles(quantiles: np.ndarray, current_sorted: np.ndarray) -> float:
    """Wasserstein-1 distance as the integral of |Q_ref(p) - Q_cur(p)| on the quantile grid."""
    probs = np.linspace(0.0, 1.0, quantiles.size)
    diff = np.abs(quantiles - _quantiles_sorted(current_sorted, probs))
    return float(np.sum((diff[1:] + diff[:-1]) * 0.5 * np.diff(probs)))


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = PSI_EPS) -> float:
    """Population stability index of two proportion vectors over the same bins."""
    e = np.maximum(np.asarray(expected, dtype=float), eps)
    a = np.maximum(np.asarray(actual, dtype=float), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def _numeric_drift(
    column: str,
    ref: NumericProfile,
    current: pl.Series,
    thr: FeatureThresholds,
) -> FeatureDrift:
    cur = _finite_sorted(current)
    base: dict[str, Any] = {"column": column, "kind": "numeric", "n_reference": ref.n}
    if cur.size == 0:
        return FeatureDrift(
            **base, method="ks", skipped=True, skip_reason="no non-null value in window"
        )
    quantiles = np.asarray(ref.quantiles)
    d, p = ks_against_quantiles(quantiles, ref.n, cur)
    psi_value = psi(
        np.asarray(ref.bin_proportions), _bin_proportions(cur, np.asarray(ref.bin_edges))
    )
    w = wasserstein_against_quantiles(quantiles, cur) / max(ref.std, STD_FLOOR)
    assert thr.pvalue is not None and thr.psi is not None and thr.wasserstein is not None
    # the deciding effect size is the one furthest above (or closest to) its threshold
    if psi_value / thr.psi >= w / thr.wasserstein:
        metric, effect, effect_thr = "psi", psi_value, thr.psi
    else:
        metric, effect, effect_thr = "wasserstein_normed", w, thr.wasserstein
    significant = p < thr.pvalue
    large = psi_value > thr.psi or w > thr.wasserstein
    return FeatureDrift(
        **base,
        method=f"ks+{metric}",
        statistic=d,
        p_value=p,
        effect_metric=metric,
        effect_size=effect,
        pvalue_threshold=thr.pvalue,
        effect_threshold=effect_thr,
        psi=psi_value,
        wasserstein_normed=w,
        n_current=int(cur.size),
        drifted=bool(significant and large),
    )


def _categorical_drift(
    column: str,
    ref: CategoricalProfile,
    current: pl.Series,
    thr: FeatureThresholds,
) -> FeatureDrift:
    cur_counts = _value_counts(current)
    n_cur = sum(cur_counts.values())
    base: dict[str, Any] = {"column": column, "kind": "categorical", "n_reference": ref.n}
    if n_cur == 0:
        return FeatureDrift(
            **base, method="chi2", skipped=True, skip_reason="no non-null value in window"
        )
    unseen = {k: v for k, v in cur_counts.items() if k not in ref.counts}
    keys = [*ref.counts, *unseen]  # every unseen value is a bin of its own
    r = np.array([ref.counts.get(k, 0) for k in keys], dtype=float)
    c = np.array([cur_counts.get(k, 0) for k in keys], dtype=float)
    jsd = float(distance.jensenshannon(r / r.sum(), c / c.sum()))
    table = np.vstack([r, c])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        chi2, p = 0.0, 1.0
    else:
        res = stats.chi2_contingency(table, correction=False)
        chi2, p = float(res.statistic), float(res.pvalue)
    assert thr.pvalue is not None and thr.jsd is not None
    unseen_sorted = sorted(unseen, key=lambda k: -unseen[k])
    return FeatureDrift(
        **base,
        method="chi2+jsd",
        statistic=chi2,
        p_value=p,
        effect_metric="jsd",
        effect_size=jsd,
        pvalue_threshold=thr.pvalue,
        effect_threshold=thr.jsd,
        jsd=jsd,
        unseen_share=sum(unseen.values()) / n_cur,
        unseen_values=[str(k) for k in unseen_sorted[:MAX_UNSEEN_LISTED]],
        n_current=n_cur,
        drifted=bool(p < thr.pvalue and jsd > thr.jsd),
    )


def _skipped(column: str, kind: Literal["numeric", "categorical"], reason: str) -> FeatureDrift:
    return FeatureDrift(column=column, kind=kind, method="none", skipped=True, skip_reason=reason)


def _numeric_column(frame: pl.DataFrame, column: str) -> pl.Series | str:
    """The column, or the reason it cannot be tested."""
    if column not in frame.columns:
        return "missing from window"
    s = frame[column]
    if not (s.dtype.is_numeric() or s.dtype == pl.Null):
        return f"not numeric ({s.dtype})"
    return s


def compute_drift(
    profile: ReferenceProfile,
    current: pl.DataFrame,
    thresholds: DriftThresholds | None = None,
    *,
    exclude: Iterable[str] = (),
    score: str = SCORE_COLUMN,
) -> DriftSummary:
    """Test every profiled column of ``current`` against ``profile`` and apply the drift rule.

    ``exclude``: columns not to test, normally ``QualityReport.failed_columns``,
    so that a data break is reported as a quality failure and never counted as
    drift. They appear in ``skipped_columns``. The prediction (``score``)
    column is tested too and reported in ``prediction``, not in the drift share.
    See the module docstring for the rule.
    """
    thr = thresholds or DriftThresholds()
    excluded = set(exclude)
    features: list[FeatureDrift] = []
    for column, ref in profile.numeric.items():
        if column in excluded:
            features.append(_skipped(column, "numeric", "failed data quality"))
            continue
        s = _numeric_column(current, column)
        if isinstance(s, str):
            features.append(_skipped(column, "numeric", s))
            continue
        features.append(_numeric_drift(column, ref, s, thr.for_column(column)))
    for column, cref in profile.categorical.items():
        if column in excluded:
            features.append(_skipped(column, "categorical", "failed data quality"))
        elif column not in current.columns:
            features.append(_skipped(column, "categorical", "missing from window"))
        else:
            features.append(
                _categorical_drift(column, cref, current[column], thr.for_column(column))
            )

    prediction = None
    if profile.prediction is not None:
        if score in excluded:
            prediction = _skipped(score, "numeric", "failed data quality")
        else:
            s = _numeric_column(current, score)
            prediction = (
                _skipped(score, "numeric", s)
                if isinstance(s, str)
                else _numeric_drift(score, profile.prediction, s, thr.for_column(score))
            )

    tested = [f for f in features if not f.skipped]
    drifted = [f.column for f in tested if f.drifted]
    share = len(drifted) / len(tested) if tested else 0.0
    new_categories = {
        f.column: f.unseen_share
        for f in tested
        if f.kind == "categorical" and f.unseen_share > thr.new_category_share
    }
    reasons = []
    if tested and share >= thr.share:
        reasons.append(
            f"drift share {share:.2f} >= {thr.share:.2f} ({len(drifted)}/{len(tested)}: "
            f"{', '.join(drifted)})"
        )
    confounded = bool(excluded & set(profile.features))
    if prediction is not None and prediction.drifted and not confounded:
        reasons.append(
            f"prediction drift on {score} (p={prediction.p_value:.2g}, "
            f"{prediction.effect_metric}={prediction.effect_size:.3f})"
        )
    for column, unseen_share in new_categories.items():
        values = next(f.unseen_values for f in tested if f.column == column)
        reasons.append(
            f"unseen values in {column} on {unseen_share:.1%} of rows "
            f"(> {thr.new_category_share:.1%}): {', '.join(values)}"
        )
    return DriftSummary(
        n_rows=current.height,
        n_reference=profile.n_rows,
        features=features,
        prediction=prediction,
        drift_share=share,
        n_tested=len(tested),
        drifted_columns=drifted,
        skipped_columns=[
            f.column for f in (*features, *([prediction] if prediction else [])) if f.skipped
        ],
        new_categories=new_categories,
        prediction_confounded=confounded,
        dataset_drifted=bool(reasons),
        reasons=reasons,
        thresholds=thr,
    )


def sliding_window_ks(
    scores: pl.Series | np.ndarray | Sequence[float],
    reference_scores: NumericProfile | pl.Series | np.ndarray | Sequence[float],
    window: int = 1000,
    *,
    pvalue: float = 0.01,
) -> KSResult:
    """KS test of the last ``window`` scores (in arrival order) against the reference.

    ``reference_scores`` is either raw reference scores (exact two-sample test)
    or the profile's ``prediction`` summary (test against its quantile grid).
    ``drifted`` is ``p_value < pvalue``: on 1,000 rows the p-value alone is a
    sensible early warning. Null and non-finite scores are dropped first.
    """
    if window < 1:
        raise ValueError("window must be >= 1")
    cur = np.asarray(
        scores.cast(pl.Float64, strict=False).to_numpy()
        if isinstance(scores, pl.Series)
        else scores,
        dtype=float,
    )
    cur = cur[np.isfinite(cur)][-window:]
    if cur.size == 0:
        raise DataError("no finite score in the sliding window")
    cur_sorted = np.sort(cur)
    if isinstance(reference_scores, NumericProfile):
        d, p = ks_against_quantiles(
            np.asarray(reference_scores.quantiles), reference_scores.n, cur_sorted
        )
        n_ref = reference_scores.n
    else:
        ref = np.asarray(
            reference_scores.to_numpy()
            if isinstance(reference_scores, pl.Series)
            else reference_scores,
            dtype=float,
        )
        ref = ref[np.isfinite(ref)]
        if ref.size == 0:
            raise DataError("no finite reference score")
        res = stats.ks_2samp(ref, cur_sorted)
        d, p, n_ref = float(res.statistic), float(res.pvalue), int(ref.size)
    return KSResult(
        statistic=d, p_value=p, n_current=int(cur.size), n_reference=n_ref, drifted=p < pvalue
    )


def summary_payload(summary: DriftSummary) -> Mapping[str, Any]:
    """The small, JSON-safe part of a summary meant for an event payload."""
    return {
        "rows": summary.n_rows,
        "drift_share": summary.drift_share,
        "drifted_columns": summary.drifted_columns,
        "skipped_columns": summary.skipped_columns,
        "prediction_drifted": bool(summary.prediction and summary.prediction.drifted),
        "new_categories": summary.new_categories,
        "dataset_drifted": summary.dataset_drifted,
        "reasons": summary.reasons,
    }
