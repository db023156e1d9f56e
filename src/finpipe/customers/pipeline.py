"""The customers domain's pipeline steps: ingest contract, feature snapshots, training, scoring.

Each step is a plain function over a `Storage` and `Settings`; the generic Prefect tasks wrap
them one to one. The domain depends on the data source's config (`FINPIPE_CUSTOMERS_CONFIG`:
which delivered column is what, how files are read), so `CUSTOMERS` is built from the
configured file each time the registry looks it up (see `__getattr__` at the bottom).

Storage:
    validated/customers/date=D/    transactions dated D
    features/customers/date=T/     the snapshot as of T: one row per customer active at T
    predictions/customers/date=T/  customer_id, segment, distance_to_centroid + provenance
    reference/customers/segments.parquet  planted segments, when the data is synthetic
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import mlflow
import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.metrics import adjusted_rand_score

from finpipe import plots, promotion, tracking
from finpipe.customers import plots as segment_plots
from finpipe.customers.config import CustomersConfig, load_customers_config
from finpipe.customers.features import BASE_FEATURES, build_customer_features, is_mix_feature
from finpipe.customers.model import (
    FittedSegmentModel,
    SegmentModelParams,
    check_segments_sane,
    customer_sets,
    evaluation_space,
    fit_segment_model,
    segment_quality,
)
from finpipe.customers.schema import (
    DOMAIN,
    KEY_COLUMNS,
    SUITE,
    add_transaction_checks,
    normalise_transactions,
)
from finpipe.domains import ChallengerOutcome, DemoNight, Domain, demo_nights
from finpipe.errors import ConfigError, ScoringError
from finpipe.features import FeatureUpdate
from finpipe.ingest import BATCH_COLUMN, RawContract
from finpipe.scoring import ScoringOutcome, publish_predictions
from finpipe.settings import Settings, load_settings
from finpipe.storage import Storage, as_day

log = logging.getLogger("finpipe.customers")

MODEL_LOADER = "finpipe.customers.model:FittedSegmentModel"
CANDIDATE = "autoencoder_kmeans"
PLANTED_FILE = "segments.parquet"


# -- ingest --------------------------------------------------------------------------------
def customers_contract(config: CustomersConfig) -> RawContract:
    """Return the raw contract for transaction files shaped as `config` describes."""
    return RawContract(
        domain=DOMAIN,
        suite=SUITE,
        key_columns=KEY_COLUMNS,
        date_column="date",
        normalise=functools.partial(normalise_transactions, config=config),
        add_check_columns=lambda frame, storage: add_transaction_checks(
            frame, allow_refunds=config.rules.allow_refunds
        ),
        read_options=config.read.pandas_options(),
    )


# -- features ------------------------------------------------------------------------------
def snapshots_needing_update(
    storage: Storage, as_of: dt.date, rebuild: bool = False
) -> list[dt.date]:
    """Return the snapshot days up to `as_of` to (re)compute.

    `as_of` itself when its snapshot is missing or older than any validated partition on or
    before it (late data changes history); with `rebuild`, every existing snapshot too.
    """
    existing = storage.partition_dates("features", DOMAIN, end=as_of)
    if rebuild:
        return sorted({*existing, as_of})
    if as_of not in existing:
        return [as_of]
    built = storage.partition_file("features", DOMAIN, as_of).stat().st_mtime_ns
    for day in storage.partition_dates("validated", DOMAIN, end=as_of):
        if storage.partition_file("validated", DOMAIN, day).stat().st_mtime_ns > built:
            return [as_of]
    return []


def update_customer_features(
    storage: Storage,
    as_of: dt.date | str,
    *,
    active_days: int,
    rebuild: bool = False,
    progress: Callable[[str], None] | None = None,
) -> FeatureUpdate:
    """Compute and publish the feature snapshot as of `as_of` (and older ones if rebuilding).

    A snapshot at t reads every validated transaction dated on or before t: lifetime features
    (tenure, frequency) need the whole history.
    """
    started = time.perf_counter()
    as_of = as_day(as_of)
    update = FeatureUpdate()
    todo = snapshots_needing_update(storage, as_of, rebuild)
    if not todo:
        return update
    history = storage.read_partitions("validated", DOMAIN, end=max(todo))
    history = history.drop(columns=[BATCH_COLUMN], errors="ignore")
    for column in ("category", "channel"):
        if column not in history.columns:
            update.skipped_features[f"{column}_share_*"] = f"no {column} column delivered"
    for day in todo:
        snapshot = build_customer_features(history, day, active_days=active_days)
        storage.write_partition("features", DOMAIN, day, snapshot)
        update.add(day, len(snapshot))
        if progress:
            progress(f"features: snapshot {day} with {len(snapshot):,} active customers")
    update.seconds = round(time.perf_counter() - started, 3)
    return update


# -- training ------------------------------------------------------------------------------
class CustomersTrainingConfig(SegmentModelParams):
    """Hyper-parameters of a nightly segmentation retrain (the Prefect form and MLflow params)."""

    validation_fraction: float = Field(
        0.15, gt=0, lt=0.5, description="Share of customers (by id hash) for early stopping/k."
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=0.5, description="Share of customers (by id hash) held out for promotion."
    )
    promotion_metric: Literal["silhouette"] = Field(
        "silhouette",
        description="Test-customer silhouette, in the common feature space, a challenger must "
        "beat the champion on.",
    )


@dataclass
class CustomersTrainingOutcome(ChallengerOutcome):
    """What a nightly retrain produced: the registered challenger and how to re-evaluate it."""

    segments: int
    validation_fraction: float
    test_fraction: float
    customers: int
    train_customers: int


def read_snapshot(storage: Storage, as_of: dt.date) -> pd.DataFrame:
    """Return the feature snapshot as of `as_of`; ScoringError when it was never built."""
    if as_of not in storage.partition_dates("features", DOMAIN, start=as_of, end=as_of):
        raise ScoringError(
            f"no customers feature snapshot for {as_of}; run the features step first "
            f"(`finpipe run nightly --domain customers --as-of {as_of}`)"
        )
    return storage.read_partition("features", DOMAIN, as_of)


def train_customers(
    storage: Storage,
    settings: Settings,
    as_of: dt.date | str,
    config: CustomersTrainingConfig | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> CustomersTrainingOutcome:
    """Fit the segment model on the snapshot as of `as_of`, log it, register it as challenger.

    Segment ids are aligned to the current champion's before registering, so the challenger
    already speaks the champion's ids. Logged: parameters, learning curve, silhouette for every
    k tried, validation/test quality, stability against the champion and against last night's
    predictions, the segment profiles table and the segment map.
    """
    started = time.perf_counter()
    config = config or CustomersTrainingConfig()
    as_of = as_day(as_of)
    say = progress or log.info
    snapshot = read_snapshot(storage, as_of)
    sets = customer_sets(snapshot["customer_id"], config.validation_fraction, config.test_fraction)
    champion = _champion_view(settings, snapshot)
    tracking.use_tracking(settings, DOMAIN)
    with mlflow.start_run(run_name=f"nightly-{as_of.isoformat()}") as run:
        _log_run_context(snapshot, sets, config, as_of, champion)
        say(f"training the segment model on {int((sets == 'train').sum()):,} customers")
        fitted = fit_segment_model(
            snapshot,
            sets,
            config,
            champion_segments=champion.segments if champion else None,
            champion_k=champion.k if champion else None,
            on_epoch=tracking.log_epoch,
        )
        predicted = fitted.predict(snapshot)
        check_segments_sane(predicted, fitted.k, CANDIDATE)
        metrics = _quality_by_window(storage, snapshot, sets, fitted, predicted, champion, as_of)
        _log_results(snapshot, fitted, predicted, metrics)
        with warnings.catch_warnings():
            # MLflow hints that the integer `segment` could not hold a missing value; it never
            # is missing (every customer gets a segment).
            warnings.simplefilter("ignore", UserWarning)
            info = tracking.log_fitted_model(
                fitted,
                loader=MODEL_LOADER,
                input_example=snapshot[["customer_id", *fitted.feature_columns]].head(5),
                output_example=fitted.predict(snapshot.head(5)),
            )
        version = promotion.register_challenger(settings, DOMAIN, info.model_uri, CANDIDATE)
        test = metrics["test"]
        say(
            f"{fitted.k} segments; test silhouette {test['silhouette']:.3f}"
            + (
                f", {test['same_segment_vs_champion']:.1%} keep the champion's segment"
                if "same_segment_vs_champion" in test
                else ""
            )
        )
        run_id = run.info.run_id
    return CustomersTrainingOutcome(
        run_id=run_id,
        as_of=as_of.isoformat(),
        candidate=CANDIDATE,
        challenger_version=version,
        promotion_metric=config.promotion_metric,
        segments=fitted.k,
        validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction,
        metrics={CANDIDATE: metrics},
        customers=len(snapshot),
        train_customers=int((sets == "train").sum()),
        seconds=round(time.perf_counter() - started, 3),
    )


@dataclass(frozen=True)
class ChampionView:
    """The champion's segments for today's snapshot (what a challenger is aligned to)."""

    version: str
    k: int
    segments: pd.Series  # segment id by customer_id


def _champion_view(settings: Settings, snapshot: pd.DataFrame) -> ChampionView | None:
    """Return the champion's assignment of `snapshot`, or None without a usable champion."""
    if tracking.current_alias_version(settings, DOMAIN, tracking.CHAMPION) is None:
        return None
    champion = tracking.load_model_version(settings, DOMAIN)
    try:
        predicted = champion.predict(snapshot)
    except Exception as error:  # a champion that cannot read today's features: fresh ids
        log.warning("champion v%s cannot segment today's snapshot: %s", champion.version, error)
        return None
    segments = predicted.set_index(predicted["customer_id"].astype("string"))["segment"]
    return ChampionView(version=champion.version, k=champion.model.k, segments=segments)


def _quality_by_window(storage, snapshot, sets, fitted, predicted, champion, as_of) -> dict:
    """Return {"validation": {...}, "test": {...}}, each measured on that window's customers.

    - silhouette, davies_bouldin: in the common evaluation space (the promotion metric);
    - embedding_silhouette: in the model's own embedding (what k was chosen on);
    - same_segment_vs_champion, ari_vs_champion: against the champion's segments for the
      same snapshot (the retrain's effect alone);
    - same_segment_vs_previous_night, ari_vs_previous_night: against the last published
      predictions before `as_of`, customers in both (what a user of the segments sees change);
    - ari_vs_planted: against the planted segments, when the data is synthetic.
    """
    space = evaluation_space(snapshot, sets)
    embedding = fitted.embed(snapshot)
    segments = predicted["segment"].to_numpy()
    ids = snapshot["customer_id"].astype("string")
    comparisons = {"champion": champion.segments if champion else None}
    comparisons["previous_night"] = _previous_predictions(storage, as_of)
    planted = _planted_segments(storage)
    result = {}
    for window in ("validation", "test"):
        mine = sets == window
        values = {
            **segment_quality(space[mine], segments[mine]),
            "embedding_silhouette": segment_quality(embedding[mine], segments[mine])["silhouette"],
            "segments": fitted.k,
            "customers": int(mine.sum()),
        }
        for name, other in comparisons.items():
            if other is None:
                continue
            theirs = ids[mine].map(other)
            known = theirs.notna().to_numpy()
            if known.any():
                ours, theirs = segments[mine][known], theirs[known].to_numpy(dtype=np.int64)
                values[f"same_segment_vs_{name}"] = float(np.mean(ours == theirs))
                values[f"ari_vs_{name}"] = float(adjusted_rand_score(theirs, ours))
        if planted is not None:
            truth = ids[mine].map(planted)
            known = truth.notna().to_numpy()
            if known.any():
                values["ari_vs_planted"] = float(
                    adjusted_rand_score(truth[known].to_numpy(), segments[mine][known])
                )
        result[window] = values
    return result


def _previous_predictions(storage: Storage, as_of: dt.date) -> pd.Series | None:
    days = storage.partition_dates("predictions", DOMAIN, end=as_of - dt.timedelta(days=1))
    if not days:
        return None
    previous = storage.read_partition("predictions", DOMAIN, days[-1])
    return previous.set_index(previous["customer_id"].astype("string"))["segment"]


def segment_profiles(snapshot: pd.DataFrame, segments: np.ndarray) -> pd.DataFrame:
    """Return one row per segment: size, share and the median RFM and spend of its customers."""
    frame = snapshot.assign(segment=segments)
    grouped = frame.groupby("segment", sort=True)
    profiles = pd.DataFrame({"customers": grouped.size()})
    profiles["share"] = profiles["customers"] / len(frame)
    for column in (
        "recency_days",
        "frequency",
        "monetary_total",
        "monetary_mean",
        "spend_90d",
        "tenure_days",
        "spend_trend",
    ):
        profiles[f"median_{column}"] = grouped[column].median()
    mix = [c for c in frame.columns if c.startswith("category_share_")]
    if mix:
        top = grouped[mix].mean().idxmax(axis=1).str.removeprefix("category_share_")
        profiles["top_category"] = top
    return profiles.reset_index()


def _log_run_context(snapshot, sets, config, as_of, champion) -> None:
    mlflow.log_params(
        {
            **{k: str(v) for k, v in config.model_dump().items()},
            "as_of": as_of.isoformat(),
            "customers": len(snapshot),
            "train_customers": int((sets == "train").sum()),
            "validation_customers": int((sets == "validation").sum()),
            "test_customers": int((sets == "test").sum()),
            "champion_version": champion.version if champion else "none",
        }
    )
    columns = ["customer_id", *[c for c in snapshot.columns if c in BASE_FEATURES]]
    columns += [c for c in snapshot.columns if is_mix_feature(c)]
    tracking.log_training_data(
        snapshot[columns],
        source=f"features/{DOMAIN}/date={as_of}",
        name=f"{DOMAIN}-snapshot-{as_of}",
    )


def _log_results(snapshot, fitted: FittedSegmentModel, predicted, metrics) -> None:
    for window, values in metrics.items():
        mlflow.log_metrics({f"{window}_{k}": float(v) for k, v in values.items()})
    mlflow.log_metrics({f"silhouette_k{k}": v for k, v in fitted.silhouette_by_k.items()})
    mlflow.log_metric("best_epoch", fitted.best_epoch)
    mlflow.log_dict(
        {"feature_columns": fitted.feature_columns, "log_scaled": fitted.log_columns},
        "feature_columns.json",
    )
    mlflow.log_table(
        segment_profiles(snapshot, predicted["segment"].to_numpy()), "segment_profiles.json"
    )
    figures = {
        "plots/segment_map.png": segment_plots.segment_map(
            fitted.embed(snapshot), predicted["segment"].to_numpy(), "customers by segment"
        ),
        "plots/silhouette_by_k.png": segment_plots.silhouette_by_k(
            fitted.silhouette_by_k, fitted.k, "choosing the number of segments"
        ),
        "plots/learning_curve.png": plots.learning_curve(
            fitted.history, "autoencoder: reconstruction loss by epoch"
        ),
    }
    tracking.log_figures(figures)


def promote_customers(
    storage: Storage, settings: Settings, outcome: CustomersTrainingOutcome
) -> promotion.PromotionDecision:
    """Score challenger and champion on the same held-out customers; promote if better.

    Both models segment the snapshot of the training day; the score is the silhouette of the
    test customers' segments in the common evaluation space (model-independent, see
    `evaluation_space`). A model that cannot read the snapshot scores -inf.
    """
    snapshot = read_snapshot(storage, as_day(outcome.as_of))
    sets = customer_sets(
        snapshot["customer_id"], outcome.validation_fraction, outcome.test_fraction
    )
    test = sets == "test"
    space = evaluation_space(snapshot, sets)[test]

    def evaluate(model: tracking.RegisteredModel) -> float:
        try:
            segments = model.predict(snapshot)["segment"].to_numpy()[test]
        except Exception as error:
            log.warning("v%s cannot segment the snapshot: %s", model.version, error)
            return float("-inf")
        return segment_quality(space, segments)["silhouette"]

    return promotion.promote_challenger(
        settings,
        DOMAIN,
        challenger_version=outcome.challenger_version,
        metric=outcome.promotion_metric,
        evaluate=evaluate,
        run_id=outcome.run_id,
    )


# -- scoring -------------------------------------------------------------------------------
def score_customers(storage: Storage, settings: Settings, as_of: dt.date | str) -> ScoringOutcome:
    """Segment every customer active at `as_of` with the champion; publish the predictions.

    Rows: customer_id, segment, distance_to_centroid (in the champion's embedding), plus the
    model name, version and run id that produced them.
    """
    as_of = as_day(as_of)
    snapshot = read_snapshot(storage, as_of)
    champion = tracking.load_model_version(settings, DOMAIN)
    try:
        predicted = champion.predict(snapshot)
    except ValueError as error:
        raise ScoringError(
            f"champion v{champion.version} cannot segment the {as_of} snapshot ({error}); "
            "rebuild features or retrain"
        ) from None
    scores = predicted[["customer_id", "segment", "distance_to_centroid"]]
    return publish_predictions(storage, DOMAIN, as_of, scores, champion, sort_by=["customer_id"])


# -- synthetic data and the demo -----------------------------------------------------------
def write_planted_segments(storage: Storage, planted: pd.DataFrame) -> None:
    """Keep a synthetic log's planted segments beside the data, for ARI-vs-truth reporting."""
    path = storage.root / "reference" / DOMAIN / PLANTED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    planted.to_parquet(path, index=False)


def _planted_segments(storage: Storage) -> pd.Series | None:
    path = storage.root / "reference" / DOMAIN / PLANTED_FILE
    if not path.exists():
        return None
    planted = pd.read_parquet(path)
    return planted.set_index(planted["customer_id"].astype("string"))["segment"]


def plan_customers_demo(
    settings: Settings, *, customers: int = 1500, days: int = 730, nights: int = 3, seed: int = 7
) -> list[DemoNight]:
    """Write a synthetic transaction log as vendor files and return the nights the demo runs.

    The first night loads the history file and the first daily file; each later night one
    daily file. The planted segments are kept under reference/ for ARI reporting.
    """
    from finpipe.customers.synthetic import (
        VENDOR_COLUMNS,
        CustomersSyntheticConfig,
        generate_customer_transactions,
        write_vendor_files,
    )

    mapping = load_customers_config(settings.customers_config).columns.delivered()
    if mapping != VENDOR_COLUMNS:
        raise ConfigError(
            f"finpipe demo writes synthetic transaction files, which customers config "
            f"{settings.customers_config!r} does not describe; unset FINPIPE_CUSTOMERS_CONFIG "
            "(or set it to synthetic) to run the demo"
        )
    generated = generate_customer_transactions(
        CustomersSyntheticConfig(customers=customers, days=days, seed=seed)
    )
    drop = settings.home / "vendor_drop" / DOMAIN
    files = write_vendor_files(generated.transactions, drop, daily_files=nights)
    write_planted_segments(Storage(settings.home), generated.segments)
    log.info("generated %s transactions in %s", len(generated.transactions), drop)
    return demo_nights(files, lambda daily: daily.stem.removeprefix("customers_"))


# -- the domain ----------------------------------------------------------------------------
def build_customers_domain(config: CustomersConfig) -> Domain:
    """Return the customers domain for transaction files shaped as `config` describes."""
    return Domain(
        name=DOMAIN,
        contract=customers_contract(config),
        update_features=functools.partial(
            update_customer_features, active_days=config.features.active_days
        ),
        train=train_customers,
        promote=promote_customers,
        score=score_customers,
        training_config=CustomersTrainingConfig,
        training_outcome=CustomersTrainingOutcome,
        plan_demo=plan_customers_demo,
    )


def __getattr__(name: str) -> Domain:
    """`CUSTOMERS`: the domain for the configured source, built on each registry lookup.

    A module constant would freeze the config at import; reading FINPIPE_CUSTOMERS_CONFIG at
    lookup lets one process (a test session, a Prefect worker) serve several sources.
    """
    if name == "CUSTOMERS":
        return build_customers_domain(load_customers_config(load_settings().customers_config))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
