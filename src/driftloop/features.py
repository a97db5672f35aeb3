"""Feature computation and the Feast adapter (the repo lives in ``feature_repo/``).

Two layers in one module, kept apart:

* pure aggregates over a transaction frame (:func:`compute_card_features`,
  :func:`compute_merchant_features`): polars only, no I/O;
* a small adapter over Feast 0.67 (:func:`apply_repo`, :func:`get_store`,
  :func:`write_offline`, :func:`materialize`, :func:`historical_features`,
  :func:`online_features`, :func:`push_card_features`).

Point-in-time contract
----------------------
* ``card_velocity`` rows are the state of a card *after* a transaction, timestamped
  at that transaction. Training asks for each transaction at ``event_timestamp - 1 ms``
  (``historical_features(..., query_offset=...)``) so the row of the transaction itself
  is excluded, as it is at serving time, where the online store holds the state pushed
  after the card's previous transaction.
* ``merchant_risk`` rows are timestamped at the start ``D`` of a UTC day and use only
  transactions before ``D`` and labels that had arrived before ``D``.

The Feast repo reads ``$DRIFTLOOP_DATA_ROOT``; these functions take it from
:class:`~driftloop.settings.Settings` and never need it exported in the caller.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from driftloop.errors import ConfigError, FeatureStoreError, SchemaError
from driftloop.schema import CARD_FEATURES, MERCHANT_FEATURES, TRANSACTION_SCHEMA, validate_frame
from driftloop.settings import Settings

if TYPE_CHECKING:  # feast takes seconds to import: only the adapter functions import it
    from feast import FeatureStore

#: names fixed by feature_repo/ (kept in step by tests/integration/test_features.py)
CARD_VIEW = "card_velocity"
MERCHANT_VIEW = "merchant_risk"
CARD_PUSH_SOURCE = "card_velocity_push"
FEATURE_SERVICE = "fraud_v1"
#: ttl of both views in feature_repo/feature_views.py
VIEW_TTL = timedelta(days=2)
#: default offset of training queries: the state strictly before the transaction
DEFAULT_QUERY_OFFSET = timedelta(milliseconds=1)

#: column types of the feature frames (entity key, event_timestamp, features)
CARD_FEATURE_SCHEMA: dict[str, pl.DataType] = {
    "card_id": pl.Int64(),
    "event_timestamp": pl.Datetime("us", "UTC"),
    "card_txn_count_1h": pl.Int64(),
    "card_txn_count_24h": pl.Int64(),
    "card_amount_mean_1h": pl.Float64(),
    "card_amount_mean_24h": pl.Float64(),
    "card_last_txn_ts": pl.Float64(),
}
MERCHANT_FEATURE_SCHEMA: dict[str, pl.DataType] = {
    "merchant_id": pl.Int64(),
    "event_timestamp": pl.Datetime("us", "UTC"),
    "merchant_txn_count_24h": pl.Int64(),
    "merchant_amount_mean_24h": pl.Float64(),
    "merchant_fraud_rate_30d": pl.Float64(),
}
_FEATURE_DTYPES: dict[str, pl.DataType] = {
    **{f: CARD_FEATURE_SCHEMA[f] for f in CARD_FEATURES},
    **{f: MERCHANT_FEATURE_SCHEMA[f] for f in MERCHANT_FEATURES},
}
_VIEW_FEATURES: dict[str, tuple[str, ...]] = {
    CARD_VIEW: CARD_FEATURES,
    MERCHANT_VIEW: MERCHANT_FEATURES,
}
_TS = pl.Datetime("us", "UTC")
_DATA_ROOT_VAR = "DRIFTLOOP_DATA_ROOT"


# -- pure aggregates ----------------------------------------------------------------------


def compute_card_features(tx: pl.DataFrame) -> pl.DataFrame:
    """The state of each card after each of its transactions.

    One row per (card_id, event_timestamp), timestamped at the transaction: count and
    mean amount over the trailing windows ``(t - 1h, t]`` and ``(t - 24h, t]`` (the
    transaction itself included) and ``card_last_txn_ts`` = ``t`` in unix seconds.
    Transactions of one card at the same instant collapse to one row (their windows are
    identical). Compute over the whole history, or include 24 h of lead-in before the
    first row you keep: windows are cut at the first transaction of ``tx``.
    """
    needed = ("card_id", "amount", "event_timestamp")
    validate_frame(tx, {k: TRANSACTION_SCHEMA[k] for k in needed}, name="transactions")
    ts = "event_timestamp"
    by_card = (
        tx.lazy()
        .select("card_id", ts, "amount")
        .filter(pl.col("card_id").is_not_null() & pl.col(ts).is_not_null())
        .sort("card_id", ts)
    )
    one = pl.col(ts).is_not_null().cast(pl.Int64)  # 1 per transaction
    return (
        by_card.with_columns(
            card_txn_count_1h=one.rolling_sum_by(ts, "1h").over("card_id"),
            card_txn_count_24h=one.rolling_sum_by(ts, "24h").over("card_id"),
            card_amount_mean_1h=pl.col("amount").rolling_mean_by(ts, "1h").over("card_id"),
            card_amount_mean_24h=pl.col("amount").rolling_mean_by(ts, "24h").over("card_id"),
            card_last_txn_ts=pl.col(ts).dt.epoch("us").cast(pl.Float64) / 1e6,
        )
        .unique(subset=["card_id", ts], keep="last", maintain_order=True)
        .select(list(CARD_FEATURE_SCHEMA))
        .cast(CARD_FEATURE_SCHEMA)  # type: ignore[arg-type]
        .collect()
    )


def compute_merchant_features(
    tx: pl.DataFrame,
    *,
    smoothing: float = 20.0,
    fraud_window_days: int = 30,
    last_day: datetime | None = None,
) -> pl.DataFrame:
    """Daily merchant rows, timestamped at the start ``D`` (00:00 UTC) of each day.

    * ``merchant_txn_count_24h`` / ``merchant_amount_mean_24h``: transactions in
      ``[D - 24h, D)`` (0 and null when there were none);
    * ``merchant_fraud_rate_30d``: over transactions in ``[D - 30d, D)`` whose label
      had arrived before ``D`` (``label_available_at < D``), the smoothed rate
      ``(frauds + smoothing * prior) / (labelled + smoothing)``, where ``prior`` is the
      rate over all merchants under the same rule. Null while no label has arrived at
      all. Rows with a null label or ``label_available_at`` never count.

    Every merchant gets a row for every day from the day after its first transaction
    up to ``last_day`` (default: the day after the last transaction), so a join never
    falls back to an older day's row.
    """
    if smoothing < 0 or fraud_window_days < 1:
        raise ValueError("smoothing must be >= 0 and fraud_window_days >= 1")
    needed = ("merchant_id", "amount", "event_timestamp", "is_fraud", "label_available_at")
    validate_frame(tx, {k: TRANSACTION_SCHEMA[k] for k in needed}, name="transactions")
    base = (
        tx.lazy()
        .select(*needed)
        .filter(pl.col("merchant_id").is_not_null() & pl.col("event_timestamp").is_not_null())
    )
    day = pl.col("event_timestamp").dt.truncate("1d")
    one_day = pl.duration(days=1)

    # the grid: merchant x day, from its first day + 1 to last_day
    bounds = base.group_by("merchant_id").agg(first=day.min() + one_day)
    if last_day is None:
        end = base.select(day.max() + one_day).collect().item()
        if end is None:
            return pl.DataFrame(schema=MERCHANT_FEATURE_SCHEMA)
    else:
        end = _utc(last_day).replace(hour=0, minute=0, second=0, microsecond=0)
    grid = (
        bounds.with_columns(
            event_timestamp=pl.datetime_ranges(
                "first", pl.lit(end, dtype=_TS), interval="1d", time_unit="us", time_zone="UTC"
            )
        )
        .explode("event_timestamp")
        .drop_nulls("event_timestamp")
        .select("merchant_id", "event_timestamp")
    )

    # 24 h before D is exactly day D - 1
    daily = base.group_by("merchant_id", event_timestamp=day + one_day).agg(
        merchant_txn_count_24h=pl.len().cast(pl.Int64),
        merchant_amount_mean_24h=pl.col("amount").mean(),
    )

    # a label counts on days D in [max(tx day, label day) + 1, tx day + window]:
    # add it at the first such day, remove it the day after the last, cumulate.
    labelled = (
        base.filter(pl.col("is_fraud").is_not_null() & pl.col("label_available_at").is_not_null())
        .select(
            "merchant_id",
            fraud=pl.col("is_fraud").cast(pl.Int64),
            start=pl.max_horizontal(day, pl.col("label_available_at").dt.truncate("1d")) + one_day,
            stop=day + pl.duration(days=fraud_window_days + 1),
        )
        .filter(pl.col("start") < pl.col("stop"))
    )
    deltas = pl.concat(
        [
            labelled.select(
                "merchant_id", event_timestamp="start", dn=pl.lit(1, pl.Int64), df="fraud"
            ),
            labelled.select(
                "merchant_id", event_timestamp="stop", dn=pl.lit(-1, pl.Int64), df=-pl.col("fraud")
            ),
        ]
    )
    per_merchant = deltas.group_by("merchant_id", "event_timestamp").agg(
        pl.col("dn").sum(), pl.col("df").sum()
    )
    per_day = (
        deltas.group_by("event_timestamp")
        .agg(pl.col("dn").sum(), pl.col("df").sum())
        .sort("event_timestamp")
        .select(
            "event_timestamp",
            prior_n=pl.col("dn").cum_sum(),
            prior_f=pl.col("df").cum_sum(),
        )
    )
    n, f = pl.col("n"), pl.col("f")
    prior = pl.when(pl.col("prior_n") > 0).then(pl.col("prior_f") / pl.col("prior_n"))
    counts = (
        grid.join(per_merchant, on=["merchant_id", "event_timestamp"], how="full", coalesce=True)
        .sort("merchant_id", "event_timestamp")
        .with_columns(
            n=pl.col("dn").fill_null(0).cum_sum().over("merchant_id"),
            f=pl.col("df").fill_null(0).cum_sum().over("merchant_id"),
        )
        # keep grid days only (label deltas outside the grid are already in the sums)
        .join(grid, on=["merchant_id", "event_timestamp"], how="semi")
        .collect()
        .sort("event_timestamp")
    )
    return (
        counts.join_asof(per_day.collect(), on="event_timestamp", strategy="backward")
        .join(daily.collect(), on=["merchant_id", "event_timestamp"], how="left")
        .select(
            "merchant_id",
            "event_timestamp",
            merchant_txn_count_24h=pl.col("merchant_txn_count_24h").fill_null(0),
            merchant_amount_mean_24h=pl.col("merchant_amount_mean_24h"),
            merchant_fraud_rate_30d=(f + smoothing * prior) / (n + smoothing),
        )
        .sort("merchant_id", "event_timestamp")
        .cast(MERCHANT_FEATURE_SCHEMA)  # type: ignore[arg-type]
    )


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# -- offline files ------------------------------------------------------------------------


def _data_root(settings: Settings) -> Path:
    try:
        return settings.local_data_root
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}. The embedded Feast repo (SQLite online store, file offline store) "
            "needs a local data root."
        ) from exc


def offline_path(settings: Settings, view: str) -> Path:
    """The folder of parquet part files read by the batch source of ``view``."""
    return _data_root(settings) / "features" / view


def write_offline(
    settings: Settings,
    card_df: pl.DataFrame | None,
    merchant_df: pl.DataFrame | None,
    *,
    mode: Literal["overwrite", "append"] = "overwrite",
) -> dict[str, Path]:
    """Write feature frames to the offline store: ``<data_root>/features/<view>/``.

    Each view is a folder of parquet part files (Feast reads the whole folder).
    ``overwrite`` replaces the view's folder with one new part (the usual case: the
    aggregates are recomputed from the full history). ``append`` adds a new part and
    keeps the old ones: only for rows not written before, since Feast picks an
    arbitrary row when two share an entity and an event timestamp. A frame passed as
    ``None`` leaves its view untouched. Each part is written to a temporary name and
    renamed, so a reader never sees half a file. Returns the written part per view.
    """
    if mode not in ("overwrite", "append"):
        raise ValueError(f"mode must be 'overwrite' or 'append', not {mode!r}")
    written: dict[str, Path] = {}
    for view, frame, schema in (
        (CARD_VIEW, card_df, CARD_FEATURE_SCHEMA),
        (MERCHANT_VIEW, merchant_df, MERCHANT_FEATURE_SCHEMA),
    ):
        if frame is None:
            continue
        validate_frame(frame, schema, name=f"{view} features")
        folder = offline_path(settings, view)
        folder.mkdir(parents=True, exist_ok=True)
        part = folder / f"part-{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = folder / f".{part.name}.tmp"
        frame.select(list(schema)).write_parquet(tmp)
        if mode == "overwrite":
            for old in folder.glob("*.parquet"):
                old.unlink()
        tmp.rename(part)
        written[view] = part
    return written


# -- the Feast repo -----------------------------------------------------------------------


def _repo_path(settings: Settings) -> Path:
    repo = settings.feast_repo.resolve()
    if not (repo / "feature_store.yaml").is_file():
        raise ConfigError(f"no feature_store.yaml in the Feast repo {repo} (setting feast_repo)")
    return repo


def _repo_config(settings: Settings):  # -> feast.RepoConfig
    """feature_store.yaml with ``DRIFTLOOP_DATA_ROOT`` taken from the settings, not os.environ."""
    import yaml
    from feast.repo_config import RepoConfig

    repo = _repo_path(settings)
    root = str(_data_root(settings))
    text = (repo / "feature_store.yaml").read_text()
    text = text.replace("${" + _DATA_ROOT_VAR + "}", root).replace("$" + _DATA_ROOT_VAR, root)
    try:
        config = RepoConfig(**yaml.safe_load(os.path.expandvars(text)))
    except Exception as exc:
        raise FeatureStoreError(f"invalid {repo / 'feature_store.yaml'}: {exc}") from exc
    config.repo_path = repo
    return config


def get_store(settings: Settings) -> FeatureStore:
    """A FeatureStore on the repo of ``settings.feast_repo`` and ``settings.data_root``."""
    from feast import FeatureStore

    config = _repo_config(settings)
    return FeatureStore(repo_path=str(config.repo_path), config=config)


_APPLY_LOCK = threading.Lock()


@contextmanager
def _repo_importable(repo: Path, root: Path) -> Iterator[list[str]]:
    """Make the repo's modules importable with ``DRIFTLOOP_DATA_ROOT`` = ``root``, then undo.

    The repo's modules have generic top-level names (``entities``...): they are evicted
    from ``sys.modules`` before and after, so a second apply with another data root
    re-reads its paths.
    """
    from feast.repo_operations import get_repo_files

    files = get_repo_files(repo)
    names = [".".join(f.relative_to(repo).with_suffix("").parts) for f in files]
    saved_env = os.environ.get(_DATA_ROOT_VAR)
    saved_bytecode = sys.dont_write_bytecode

    def evict() -> None:
        for name in names:
            sys.modules.pop(name, None)

    evict()
    os.environ[_DATA_ROOT_VAR] = str(root)
    sys.path.insert(0, str(repo))
    sys.dont_write_bytecode = True
    try:
        yield names
    finally:
        sys.dont_write_bytecode = saved_bytecode
        sys.path.remove(str(repo))
        evict()
        if saved_env is None:
            os.environ.pop(_DATA_ROOT_VAR, None)
        else:
            os.environ[_DATA_ROOT_VAR] = saved_env


def apply_repo(settings: Settings, *, isolated: bool = False, timeout: float = 300.0) -> None:
    """Register the definitions of ``feature_repo/`` and create the online tables.

    ``isolated=True`` runs ``feast apply`` in a child process, with ``cwd`` the repo and
    ``DRIFTLOOP_DATA_ROOT`` exported: exactly what a Feast user runs, at the price of
    importing Feast again (~8 s here). The default applies in this process with Feast's
    own ``apply_total_with_repo_instance`` (the function under ``feast apply``) after
    importing the repo's modules ourselves, which avoids ``apply_total``'s ``os.chdir``
    and its module cache that would pin the first data root.
    """
    repo = _repo_path(settings)
    root = _data_root(settings)
    (root / "feast").mkdir(parents=True, exist_ok=True)
    if isolated:
        _apply_subprocess(repo, root, timeout)
        return

    import importlib

    from feast import Entity, FeatureService, FeatureView, Project
    from feast.data_source import DataSource, PushSource
    from feast.repo_contents import RepoContents
    from feast.repo_operations import apply_total_with_repo_instance

    config = _repo_config(settings)
    with _APPLY_LOCK, _repo_importable(repo, root) as modules:
        contents = RepoContents(
            projects=[Project(name=config.project, description="")],
            data_sources=[],
            entities=[],
            feature_views=[],
            feature_services=[],
            on_demand_feature_views=[],
            stream_feature_views=[],
            label_views=[],
            permissions=[],
        )

        def add(bucket: list, obj: object) -> None:
            if not any(obj is seen for seen in bucket):
                bucket.append(obj)

        try:
            for name in modules:
                module = importlib.import_module(name)
                for obj in vars(module).values():
                    if isinstance(obj, DataSource):
                        add(contents.data_sources, obj)
                        if isinstance(obj, PushSource) and obj.batch_source is not None:
                            add(contents.data_sources, obj.batch_source)
                    elif isinstance(obj, Entity):
                        add(contents.entities, obj)
                    elif type(obj) is FeatureView:  # this repo defines plain views only
                        add(contents.feature_views, obj)
                    elif isinstance(obj, FeatureService):
                        add(contents.feature_services, obj)
            store = get_store(settings)
            apply_total_with_repo_instance(
                store, config.project, store.registry, contents, skip_source_validation=True
            )
        except Exception as exc:
            raise FeatureStoreError(f"feast apply of {repo} failed: {exc}") from exc


def _apply_subprocess(repo: Path, root: Path, timeout: float) -> None:
    feast_cli = Path(sys.executable).with_name("feast")
    cmd = [str(feast_cli)] if feast_cli.exists() else [sys.executable, "-m", "feast.cli.cli"]
    env = {**os.environ, _DATA_ROOT_VAR: str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        done = subprocess.run(
            [*cmd, "apply"], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FeatureStoreError(f"`feast apply` in {repo} did not run: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-2000:]
        raise FeatureStoreError(f"`feast apply` in {repo} failed ({done.returncode}):\n{tail}")


def is_applied(settings: Settings) -> bool:
    """True when the registry exists and is newer than every definition file of the repo."""
    registry = _data_root(settings) / "feast" / "registry.db"
    if not registry.is_file():
        return False
    repo = _repo_path(settings)
    newest = max(p.stat().st_mtime for p in [repo / "feature_store.yaml", *repo.glob("*.py")])
    return registry.stat().st_mtime >= newest


# -- materialisation ----------------------------------------------------------------------


class ViewMaterialization(BaseModel):
    """One feature view loaded into the online store over ``[start, end)``."""

    model_config = ConfigDict(frozen=True)

    view: str
    start: datetime
    end: datetime


class MaterializeResult(BaseModel):
    """What :func:`materialize` loaded; views already up to date are absent."""

    model_config = ConfigDict(frozen=True)

    full: bool
    end: datetime
    views: list[ViewMaterialization] = Field(default_factory=list)


def materialize(
    settings: Settings | FeatureStore,
    end: datetime | None = None,
    start: datetime | None = None,
    *,
    full: bool = False,
    views: Sequence[str] = (CARD_VIEW, MERCHANT_VIEW),
) -> MaterializeResult:
    """Load the latest offline rows of each view into the online store.

    Incremental by default: each view continues from where its last materialisation
    ended. A view never materialised starts at ``start`` or, by default, ``end - ttl``
    (Feast's own incremental default is *wall-clock* now - ttl, which misses simulated
    data in the past). ``full=True`` reloads ``[start or end - ttl, end)`` for every
    view. ``end`` defaults to now (UTC).

    Note: the SQLite online store overwrites by entity whatever the timestamps, so
    materialising an interval older than rows pushed since replaces them.
    """
    store = settings if not isinstance(settings, Settings) else get_store(settings)
    end_utc = _utc(end) if end is not None else datetime.now(UTC)
    done: list[ViewMaterialization] = []
    try:
        for name in views:
            view = store.get_feature_view(name)
            ttl = view.ttl if view.ttl and view.ttl.total_seconds() > 0 else VIEW_TTL
            last = view.most_recent_end_time
            if full or last is None:
                begin = _utc(start) if start is not None else end_utc - ttl
            else:
                begin = _utc(last)
            if begin >= end_utc:
                continue
            store.materialize(begin, end_utc, feature_views=[name])
            done.append(ViewMaterialization(view=name, start=begin, end=end_utc))
    except Exception as exc:
        raise FeatureStoreError(f"materialisation failed: {exc}") from exc
    return MaterializeResult(full=full, end=end_utc, views=done)


# -- retrieval ----------------------------------------------------------------------------


def historical_features(
    settings: Settings | FeatureStore,
    entity_df: pl.DataFrame,
    *,
    query_offset: timedelta = DEFAULT_QUERY_OFFSET,
    feature_service: str = FEATURE_SERVICE,
    engine: Literal["polars", "feast"] = "polars",
) -> pl.DataFrame:
    """``entity_df`` joined point-in-time with the features of ``feature_service``.

    ``entity_df`` needs ``card_id``, ``merchant_id`` and ``event_timestamp``; its other
    columns, its rows and their order are kept. Each row is looked up at
    ``event_timestamp - query_offset`` (default 1 ms: the card state before the
    transaction, as serving sees it): per view, the latest row of the entity with
    ``query time - ttl <= row time <= query time``, else nulls.

    What is joined comes from the Feast registry (the service's views and features, each
    view's ttl and batch source). ``engine="polars"`` (default) does the as-of join with
    polars on the batch source's parquet. ``engine="feast"`` uses
    ``FeatureStore.get_historical_features``; Feast 0.67's file (dask) offline store
    drops an entity row when its entity has rows but none inside the ttl window (we
    return nulls for such rows, including for the other view's features, which Feast
    also lost) and cross-joins each entity row with all rows of its entity: keep it for
    cross-checks on small frames.
    """
    key_schema = {"card_id": pl.Int64(), "merchant_id": pl.Int64(), "event_timestamp": _TS}
    validate_frame(entity_df, key_schema, name="entity_df")
    if query_offset < timedelta(0):
        raise ValueError("query_offset must be >= 0")
    if engine not in ("polars", "feast"):
        raise ValueError(f"engine must be 'polars' or 'feast', not {engine!r}")
    clash = [c for c in entity_df.columns if c in _FEATURE_DTYPES or c.startswith("__dl_")]
    if clash:
        raise SchemaError(f"entity_df: columns {clash} clash with feature names")
    store = settings if not isinstance(settings, Settings) else get_store(settings)
    try:
        service = store.get_feature_service(feature_service)
    except Exception as exc:
        raise FeatureStoreError(f"no feature service {feature_service!r}: {exc}") from exc
    wanted = [f.name for p in service.feature_view_projections for f in p.features]
    unknown = [f for f in wanted if f not in _FEATURE_DTYPES]
    if unknown:
        raise FeatureStoreError(f"feature service {feature_service!r} has unknown {unknown}")

    # one query per distinct (card, merchant, query time); joined back at the end
    keys = ["card_id", "merchant_id", "__dl_qt"]
    frame = entity_df.with_columns(__dl_qt=pl.col("event_timestamp") - query_offset)
    query = frame.select(keys).unique()
    try:
        if engine == "feast":
            found = _join_feast(store, service, query)
        else:
            found = _join_polars(store, service, query)
    except FeatureStoreError:
        raise
    except Exception as exc:
        raise FeatureStoreError(f"historical retrieval failed: {exc}") from exc
    found = found.select(
        *[pl.col(k).cast(frame.schema[k]) for k in keys],
        *[pl.col(f).cast(_FEATURE_DTYPES[f]) for f in wanted],
    )
    return frame.join(found, on=keys, how="left", nulls_equal=True, maintain_order="left").drop(
        "__dl_qt"
    )


def _join_polars(store: FeatureStore, service, query: pl.DataFrame) -> pl.DataFrame:
    from feast import FileSource

    out = query.sort("__dl_qt")
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name)
        source = view.batch_source
        if not isinstance(source, FileSource):
            raise FeatureStoreError(
                f"view {view.name}: the polars engine reads file sources, not {source!r}; "
                "use engine='feast'"
            )
        keys = [c.name for c in view.entity_columns]
        if len(keys) != 1:
            raise FeatureStoreError(f"view {view.name}: one join key expected, got {keys}")
        key = keys[0]
        names = [f.name for f in projection.features]
        ts = source.timestamp_field
        rows = _read_source(source.path, [key, ts, *names])
        rows = (
            rows.select(
                pl.col(key).cast(pl.Int64),
                pl.col(ts).cast(_TS).alias("__dl_ts"),
                *[pl.col(n).cast(_FEATURE_DTYPES[n]) for n in names],
            )
            .drop_nulls(["__dl_ts"])
            .sort("__dl_ts")
        )
        tolerance = view.ttl if view.ttl and view.ttl.total_seconds() > 0 else None
        out = out.join_asof(
            rows,
            left_on="__dl_qt",
            right_on="__dl_ts",
            by=key,
            strategy="backward",
            tolerance=tolerance,
            check_sortedness=False,
        ).drop("__dl_ts")
    return out


def _read_source(path: str, columns: list[str]) -> pl.DataFrame:
    """All parquet rows of a file source (a single file or a folder of part files)."""
    location = Path(path)
    if location.is_dir():
        parts = sorted(location.glob("*.parquet"))
        if not parts:
            return pl.DataFrame(schema={c: pl.Null() for c in columns})
        return pl.scan_parquet(parts).select(columns).collect()
    if not location.exists():
        return pl.DataFrame(schema={c: pl.Null() for c in columns})
    return pl.read_parquet(location, columns=columns)


def _join_feast(store: FeatureStore, service, query: pl.DataFrame) -> pl.DataFrame:
    request = query.rename({"__dl_qt": "event_timestamp"}).to_pandas()
    joined = store.get_historical_features(entity_df=request, features=service).to_df()
    return pl.from_pandas(joined).rename({"event_timestamp": "__dl_qt"})


def online_features(
    store_or_settings: FeatureStore | Settings,
    card_ids: Sequence[int | None],
    merchant_ids: Sequence[int | None],
    *,
    feature_service: str = FEATURE_SERVICE,
    as_of: datetime | None = None,
) -> pl.DataFrame:
    """Latest online values for a batch of (card, merchant) pairs, in order.

    Columns: ``card_id``, ``merchant_id``, the features of ``feature_service`` and, per
    view, ``<view>__ts``: the event timestamp (Datetime UTC, whole seconds) of the row
    served, for feature age. An unknown entity gives nulls, never an error.

    Feast does not enforce a view's ttl online. With ``as_of`` given, values of a view
    whose row is older than its ttl at ``as_of`` are nulled, as the offline join would.
    Pass a long-lived FeatureStore from :func:`get_store` on the serving path.
    """
    if len(card_ids) != len(merchant_ids):
        raise ValueError("card_ids and merchant_ids must have the same length")
    store = (
        get_store(store_or_settings)
        if isinstance(store_or_settings, Settings)
        else store_or_settings
    )
    cards = [_MISSING if c is None else int(c) for c in card_ids]
    merchants = [_MISSING if m is None else int(m) for m in merchant_ids]
    try:
        service = _feature_service(store, feature_service)
        response = store.get_online_features(
            features=service, entity_rows={"card_id": cards, "merchant_id": merchants}
        )
    except Exception as exc:
        raise FeatureStoreError(f"online read failed: {exc}") from exc
    return _online_frame(response.proto, cards, merchants, as_of)


#: stands for a null entity key in an online request (Feast cannot sort None keys)
_MISSING = -(2**63)
_SERVICE_CACHE_SECONDS = 60.0
_services: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _feature_service(store: FeatureStore, name: str):  # -> feast.FeatureService
    """The FeatureService, cached per store for a minute (Feast rebuilds it from protos
    on every get_feature_service call: ~1-5 ms)."""
    cached = _services.setdefault(store, {})
    hit = cached.get(name)
    now = time.monotonic()
    if hit is None or now - hit[0] > _SERVICE_CACHE_SECONDS:
        hit = (now, store.get_feature_service(name, allow_cache=True))
        cached[name] = hit
    return hit[1]


def _online_frame(proto, cards, merchants, as_of: datetime | None) -> pl.DataFrame:
    """Decode a GetOnlineFeaturesResponse proto: values, statuses and event timestamps."""
    from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

    present = FieldStatus.PRESENT
    data: dict[str, list] = {
        "card_id": [None if c == _MISSING else c for c in cards],
        "merchant_id": [None if m == _MISSING else m for m in merchants],
    }
    schema: dict[str, pl.DataType] = {"card_id": pl.Int64(), "merchant_id": pl.Int64()}
    stamps: dict[str, list] = {}
    for name, vector in zip(proto.metadata.feature_names.val, proto.results, strict=True):
        if name not in _FEATURE_DTYPES:
            continue
        ok = [s == present for s in vector.statuses]
        values = []
        for good, value in zip(ok, vector.values, strict=True):
            kind = value.WhichOneof("val") if good else None
            values.append(getattr(value, kind) if kind and kind != "null_val" else None)
        data[name] = values
        schema[name] = _FEATURE_DTYPES[name]
        view = CARD_VIEW if name in CARD_FEATURES else MERCHANT_VIEW
        if view not in stamps:
            stamps[view] = [
                ts.seconds * 1_000_000 + ts.nanos // 1000 if good else None
                for good, ts in zip(ok, vector.event_timestamps, strict=True)
            ]
    for view, micros in stamps.items():
        data[f"{view}__ts"] = micros
        schema[f"{view}__ts"] = pl.Int64()
    order = ["card_id", "merchant_id", *[f for f in _FEATURE_DTYPES if f in data]]
    order += [f"{view}__ts" for view in _VIEW_FEATURES if view in stamps]
    frame = (
        pl.DataFrame(data, schema=schema)
        .select(order)
        .cast({f"{view}__ts": _TS for view in stamps})  # type: ignore[dict-item]
    )
    if as_of is not None:
        cutoff = _utc(as_of) - VIEW_TTL
        frame = frame.with_columns(
            pl.when(pl.col(f"{view}__ts") >= cutoff).then(pl.col(f)).alias(f)
            for view in stamps
            for f in _VIEW_FEATURES[view]
            if f in data
        )
    return frame


def push_card_features(store: FeatureStore, rows: pl.DataFrame) -> None:
    """Push card states (``card_id``, ``event_timestamp`` + CARD_FEATURES) to the online store.

    Online only (``PushMode.ONLINE``, ~20 ms): pushing offline rewrites the parquet.
    """
    from feast.data_source import PushMode

    validate_frame(rows, CARD_FEATURE_SCHEMA, name="card feature rows")
    if rows.height == 0:
        return
    try:
        store.push(
            CARD_PUSH_SOURCE,
            rows.select(list(CARD_FEATURE_SCHEMA)).to_pandas(),
            to=PushMode.ONLINE,
        )
    except Exception as exc:
        raise FeatureStoreError(f"push to {CARD_PUSH_SOURCE} failed: {exc}") from exc
