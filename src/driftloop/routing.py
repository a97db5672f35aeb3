"""Traffic splitting, pure: the weight table, the sticky hash, and the router's counters.

The router (``bentos/router.py``) turns the plane's desired state into a
:class:`RouteTable` and asks it, per request, which arm serves the card:

- **Sticky by card.** ``sticky_bucket(card_id)`` hashes the card id (BLAKE2b, so
  the same in every process and across restarts, unlike ``hash()``) into one of
  :data:`BUCKETS` buckets. The table lays the arms' weights end to end over
  ``[0, BUCKETS)``, the champion first and the other arms after it in name
  order, so the same card sees the same arm for a given weight table. Growing a
  canary from 5 % to 25 % only moves cards *to* it: its range grows downwards
  from the top, and every card it had stays.
- **Fallback.** A request for an arm that does not answer (connection refused,
  or 503) is retried once on the champion (:func:`should_retry`); the client
  gets the champion's answer and the router counts a ``fallback``.

The router keeps :class:`ArmCounters` per arm (requests, errors, fallbacks, a
latency histogram, a score histogram, decisions, and for mirrored traffic the
decisions paired with the primary answer) and writes them to a small state file
per router process (:class:`RouterSnapshot`). The rollout reads those files, and
:func:`window` subtracts the snapshot taken when a step began: the canary and the
champion are judged on the same window, as the client saw them (errors never
reach the prediction log; the log's ``latency_ms`` misses queueing).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from driftloop.errors import ServingError

if TYPE_CHECKING:
    from driftloop.plane.base import DesiredState

#: the hash space a card id falls into (percent weights x 100: 0.01 % resolution)
BUCKETS = 10_000

#: upper edges (ms) of the router's latency histogram: 0.5 ms .. ~60 s, +20 % per bucket
LATENCY_EDGES_MS: tuple[float, ...] = tuple(round(0.5 * 1.2**i, 4) for i in range(65))

#: upper edges of the score histogram: even steps on the logit scale, so the crowded
#: low end of a fraud score (0.001..0.05) is as finely binned as the rest
SCORE_EDGES: tuple[float, ...] = tuple(1.0 / (1.0 + math.exp(-x / 4.0)) for x in range(-36, 37))

#: HTTP statuses after which a request is retried (once, on the champion)
RETRY_STATUSES = frozenset({503})

#: a new canary arm (no weight yet) gets mirrored copies of live requests until it has
#: answered this many, so that it is warm (caches, connections) before it is judged
WARMUP_REQUESTS = 20


# --------------------------------------------------------------------------------------
# the weight table
# --------------------------------------------------------------------------------------


def sticky_bucket(card_id: int) -> int:
    """The bucket in ``[0, BUCKETS)`` of a card: stable across processes and restarts."""
    digest = hashlib.blake2b(int(card_id).to_bytes(8, "little", signed=True), digest_size=8)
    return int.from_bytes(digest.digest(), "little") % BUCKETS


@dataclass(frozen=True)
class Arm:
    name: str
    endpoint: str
    version: str = ""


@dataclass(frozen=True)
class RouteTable:
    """Which arm serves which bucket, plus the champion (fallback) and mirrored arms."""

    arms: Mapping[str, Arm]
    champion: str
    #: (upper bound, arm) in increasing order; a bucket b goes to the first arm with b < bound
    bounds: tuple[tuple[int, str], ...]
    shadow: tuple[str, ...] = ()
    weights: Mapping[str, int] | None = None
    version: int = 0
    #: canary arms without weight (just deployed): warmed up with mirrored requests
    warming: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        weights: Mapping[str, int],
        arms: Mapping[str, Arm],
        champion: str,
        shadow: Sequence[str] = (),
        version: int = 0,
        warming: Sequence[str] = (),
    ) -> RouteTable:
        """A table from percent weights (sum 100) over known arms."""
        if champion not in arms:
            raise ServingError(f"the champion {champion!r} is not among the arms")
        unknown = (set(weights) | set(shadow)) - set(arms)
        if unknown:
            raise ServingError(f"weights name unknown arms: {sorted(unknown)}")
        if any(w < 0 for w in weights.values()):
            raise ServingError(f"negative weight in {dict(weights)}")
        total = sum(weights.values())
        if total != 100:
            raise ServingError(f"weights must sum to 100, got {dict(weights)}")
        order = [champion, *sorted(n for n in weights if n != champion)]
        bounds: list[tuple[int, str]] = []
        upper = 0
        for name in order:
            w = weights.get(name, 0)
            if w > 0:
                upper += w * BUCKETS // 100
                bounds.append((upper, name))
        return cls(
            arms=dict(arms),
            champion=champion,
            bounds=tuple(bounds),
            shadow=tuple(s for s in shadow if s in arms),
            weights=dict(weights),
            version=version,
            warming=tuple(w for w in warming if w in arms and not weights.get(w)),
        )

    @classmethod
    def from_desired(cls, desired: DesiredState) -> RouteTable:
        """The table of a plane's desired state (arms without an endpoint are skipped).

        No weights yet (a fresh plane with only a champion) routes all to the champion.
        """
        champion = desired.champion()
        if champion is None:
            raise ServingError(f"no champion arm in the desired state of {desired.model_name}")
        arms = {
            name: Arm(
                name=name, endpoint=spec.endpoint.rstrip("/"), version=version_of(spec.bento_tag)
            )
            for name, spec in desired.arms.items()
            if spec.endpoint
        }
        if champion not in arms:
            raise ServingError(f"the champion arm {champion!r} has no endpoint yet")
        weights = dict(desired.weights) or {champion: 100}
        weights = {n: w for n, w in weights.items() if n in arms or w != 0}
        warming = [
            n
            for n, spec in desired.arms.items()
            if spec.role in ("canary", "shadow") and not weights.get(n) and n not in desired.shadow
        ]
        return cls.build(weights, arms, champion, desired.shadow, desired.version, warming)

    def choose(self, card_id: int) -> str:
        """The arm that serves ``card_id``."""
        bucket = sticky_bucket(card_id)
        for bound, name in self.bounds:
            if bucket < bound:
                return name
        return self.bounds[-1][1]  # unreachable when weights sum to 100

    def fallback(self, arm: str) -> str | None:
        """Where a request for a dead ``arm`` goes: the champion (None for the champion)."""
        return None if arm == self.champion else self.champion


def version_of(bento_tag: str) -> str:
    """The version part of a Bento tag (``driftloop-fraud:v1`` -> ``v1``), else the tag."""
    return bento_tag.split(":", 1)[1] if ":" in bento_tag else bento_tag


def should_retry(status: int | None) -> bool:
    """Retry after a transport failure (``status`` None) or a 503 (overloaded/stopping)."""
    return status is None or status in RETRY_STATUSES


# --------------------------------------------------------------------------------------
# counters
# --------------------------------------------------------------------------------------


def _zeros(n: int) -> list[int]:
    return [0] * n


class ArmCounters(BaseModel):
    """What the router saw of one arm (cumulative since the router process started)."""

    model_config = ConfigDict(extra="forbid")

    requests: int = 0
    errors: int = Field(default=0, description="Answered with an error (after any retry).")
    fallbacks: int = Field(default=0, description="Did not answer; the champion served instead.")
    mirrored: int = Field(default=0, description="Of the requests, mirrored (shadow) copies.")
    latency: list[int] = Field(default_factory=lambda: _zeros(len(LATENCY_EDGES_MS) + 1))
    scores: list[int] = Field(default_factory=lambda: _zeros(len(SCORE_EDGES) + 1))
    decisions: int = 0
    positives: int = 0
    paired: int = 0
    agreements: int = 0

    # -- recording (the router's request path: keep it cheap) -------------------------
    def observe(self, latency_ms: float, *, rows: int = 1, mirrored: bool = False) -> None:
        """One call to the arm carrying ``rows`` requests (1, or a sub-batch)."""
        self.requests += rows
        if mirrored:
            self.mirrored += rows
        self.latency[bisect.bisect_left(LATENCY_EDGES_MS, latency_ms)] += 1

    def answer(self, score: float, decision: bool) -> None:
        self.decisions += 1
        self.positives += bool(decision)
        self.scores[bisect.bisect_left(SCORE_EDGES, score)] += 1

    def pair(self, agree: bool) -> None:
        self.paired += 1
        self.agreements += bool(agree)

    # -- arithmetic -------------------------------------------------------------------
    def minus(self, base: ArmCounters) -> ArmCounters:
        """Counts since ``base`` (an earlier snapshot of the same counters)."""
        return ArmCounters(
            requests=self.requests - base.requests,
            errors=self.errors - base.errors,
            fallbacks=self.fallbacks - base.fallbacks,
            mirrored=self.mirrored - base.mirrored,
            latency=[a - b for a, b in zip(self.latency, base.latency, strict=True)],
            scores=[a - b for a, b in zip(self.scores, base.scores, strict=True)],
            decisions=self.decisions - base.decisions,
            positives=self.positives - base.positives,
            paired=self.paired - base.paired,
            agreements=self.agreements - base.agreements,
        )

    def plus(self, other: ArmCounters) -> ArmCounters:
        return ArmCounters(
            requests=self.requests + other.requests,
            errors=self.errors + other.errors,
            fallbacks=self.fallbacks + other.fallbacks,
            mirrored=self.mirrored + other.mirrored,
            latency=[a + b for a, b in zip(self.latency, other.latency, strict=True)],
            scores=[a + b for a, b in zip(self.scores, other.scores, strict=True)],
            decisions=self.decisions + other.decisions,
            positives=self.positives + other.positives,
            paired=self.paired + other.paired,
            agreements=self.agreements + other.agreements,
        )

    def negative(self) -> bool:
        """Any count below zero (a difference of counters from different processes)."""
        scalars = (
            self.requests,
            self.errors,
            self.fallbacks,
            self.mirrored,
            self.decisions,
            self.positives,
            self.paired,
            self.agreements,
        )
        return min(scalars) < 0 or min(self.latency) < 0 or min(self.scores) < 0

    @property
    def failed(self) -> int:
        """Requests the arm did not answer well: errors plus fallbacks."""
        return self.errors + self.fallbacks

    def latency_quantile_ms(self, q: float) -> float | None:
        return histogram_quantile(self.latency, LATENCY_EDGES_MS, q)


class RouterSnapshot(BaseModel):
    """The counters of one router process, as written to its state file."""

    model_config = ConfigDict(extra="forbid")

    instance: str
    model_name: str
    pid: int
    started_at: AwareDatetime
    updated_at: AwareDatetime
    arms: dict[str, ArmCounters] = Field(default_factory=dict)


def stats_dir(state_dir: Path, model_name: str) -> Path:
    """Where router processes write their counters: ``<state_dir>/router/<model>/``."""
    return Path(state_dir).resolve() / "router" / model_name


def router_home(state_dir: Path, model_name: str) -> Path:
    """A ``BENTOML_HOME`` of the router's own (it needs no model or Bento store).

    Every ``bentoml serve`` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when it
    starts; sharing that home with the arms would wipe the router's metrics each time
    the plane starts an arm.
    """
    return Path(state_dir).resolve() / "router" / f"{model_name}-bentoml-home"


#: counters of every router instance: instance id -> arm -> counters
Counters = dict[str, dict[str, ArmCounters]]


def counters_of(snapshots: Iterable[RouterSnapshot]) -> Counters:
    return {s.instance: {a: c.model_copy(deep=True) for a, c in s.arms.items()} for s in snapshots}


def window(current: Counters, baseline: Counters) -> dict[str, ArmCounters]:
    """Per-arm counts since ``baseline``, summed over router instances.

    An instance absent from the baseline (a router started since) counts from zero;
    an instance gone from ``current`` (its file removed) contributes nothing.
    """
    out: dict[str, ArmCounters] = {}
    for instance, arms in current.items():
        base = baseline.get(instance, {})
        for arm, counters in arms.items():
            delta = counters.minus(base[arm]) if arm in base else counters
            if delta.negative():  # a counter went backwards: not the same process
                delta = counters
            out[arm] = out[arm].plus(delta) if arm in out else delta
    return out


def histogram_quantile(counts: Sequence[int], edges: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram with upper ``edges`` (last bucket open).

    Linear interpolation inside the bucket, as Prometheus' ``histogram_quantile``;
    the open last bucket answers its lower edge. None for an empty histogram.
    """
    if not 0 <= q <= 1:
        raise ValueError("q must be within [0, 1]")
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            if i >= len(edges):
                return float(edges[-1])
            lower = 0.0 if i == 0 else edges[i - 1]
            return lower + (edges[i] - lower) * ((rank - seen) / c)
        seen += c
    return float(edges[-1])


def coarsen(
    reference: Sequence[int], other: Sequence[int], bins: int
) -> tuple[list[int], list[int]]:
    """Merge two fine histograms on shared bins into about ``bins`` quantile bins of
    ``reference`` (the champion), for a PSI with the bias of ``bins`` bins, not of the
    fine ones. Both outputs share the same merged bins."""
    if len(reference) != len(other):
        raise ValueError("histograms must share their bins")
    total = sum(reference)
    if total == 0 or bins < 2:
        return [sum(reference)], [sum(other)]
    ref_out: list[int] = []
    oth_out: list[int] = []
    acc_r = acc_o = 0
    cum = 0
    target = 1
    for r, o in zip(reference, other, strict=True):
        acc_r += r
        acc_o += o
        cum += r
        if cum * bins >= target * total and target < bins:
            ref_out.append(acc_r)
            oth_out.append(acc_o)
            acc_r = acc_o = 0
            while target < bins and cum * bins >= target * total:
                target += 1
    if acc_r or acc_o or not ref_out:
        ref_out.append(acc_r)
        oth_out.append(acc_o)
    return ref_out, oth_out
