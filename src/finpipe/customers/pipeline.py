"""The customers domain's own parts for one data source, run by the shared lifecycle.

One candidate (autoencoder embeddings + k-means) logged in the nightly run itself; promotion
on the test customers' silhouette. The domain depends on the source's config
(`FINPIPE_CUSTOMERS_CONFIG`: which delivered column is what, how files are read), so
`CUSTOMERS` is built from the configured file at each registry lookup (`__getattr__` below).
A feature partition is the snapshot as of its day: one row per customer active then.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

from finpipe import lifecycle
from finpipe.customers import plots as segment_plots
from finpipe.customers.config import CustomersConfig
from finpipe.customers.contract import active_customers_config, customers_contract
from finpipe.customers.features import BASE_FEATURES, is_mix_feature, update_customer_features
from finpipe.customers.metrics import quality_by_window, segment_profiles
from finpipe.customers.model import (
    CustomersTrainingConfig,
    check_segments_sane,
    evaluation_space,
    fit_segment_model,
    segment_quality,
)
from finpipe.customers.schema import DOMAIN
from finpipe.customers.synthetic import PLANTED, plan_customers_demo
from finpipe.customers.synthetic import write_planted_segments as write_planted_segments
from finpipe.domains import ChallengerOutcome, DemoNight, Domain
from finpipe.errors import ScoringError
from finpipe.ingest import RawContract
from finpipe.input_examples import stand_in_example
from finpipe.lifecycle import Candidate, Predictions, RunRecord, TrainingData
from finpipe.settings import Settings
from finpipe.storage import Storage, as_day
from finpipe.tracking import RegisteredModel
from finpipe.training import sets_by_id

log = logging.getLogger("finpipe.customers")

MODEL_LOADER = "finpipe.customers.model:FittedSegmentModel"
CANDIDATE = "autoencoder_kmeans"


# -- training ------------------------------------------------------------------------------
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


@dataclass
class CustomersNight(lifecycle.Night[CustomersTrainingConfig]):
    """One night's segmentation training set: the snapshot, its customer sets, the champion."""

    snapshot: pd.DataFrame
    sets: np.ndarray  # "train", "validation" or "test" by customer
    champion: ChampionView | None
    # the first segment id the champion's line never issued, also when the champion cannot
    # segment today's snapshot (`champion` None): new segments take ids from it
    next_id: int = 0
    segments: int = 0  # k of the fitted model

    def context(self) -> RunRecord:
        snapshot, sets, as_of = self.snapshot, self.sets, self.as_of
        columns = ["customer_id", *[c for c in snapshot.columns if c in BASE_FEATURES]]
        columns += [c for c in snapshot.columns if is_mix_feature(c)]
        return RunRecord(
            params={
                "customers": len(snapshot),
                "train_customers": int((sets == "train").sum()),
                "validation_customers": int((sets == "validation").sum()),
                "test_customers": int((sets == "test").sum()),
                "champion_version": self.champion.version if self.champion else "none",
            },
            data=TrainingData(
                snapshot[columns],
                source=f"features/{DOMAIN}/date={as_of}",
                name=f"{DOMAIN}-snapshot-{as_of}",
            ),
        )

    def candidates(self) -> list[str]:
        return [CANDIDATE]

    def floors(self, validation: Mapping[str, float]) -> dict[str, float]:
        """The promotion floor (`lifecycle.floor_refusal`): a minimum validation silhouette,
        and, when a champion exists, a minimum share of customers kept in its segment."""
        floors = {"silhouette_floor_minimum": self.config.silhouette_floor}
        if "same_segment_vs_champion" in validation:
            floors["same_segment_vs_champion_floor_stability"] = self.config.stability_floor
        return floors

    def fit(self, kind: str, on_epoch: lifecycle.EpochLogger, say: lifecycle.Say) -> Candidate:
        """Fit the segment model; its segment ids are aligned to the champion's, so the
        challenger already speaks the champion's ids."""
        snapshot, sets, champion = self.snapshot, self.sets, self.champion
        say(f"training the segment model on {int((sets == 'train').sum()):,} customers")
        fitted = fit_segment_model(
            snapshot,
            sets,
            self.config,
            champion_segments=champion.segments if champion else None,
            champion_k=champion.k if champion else None,
            champion_next_id=self.next_id,
            on_epoch=on_epoch,
        )
        predicted = fitted.predict(snapshot)
        check_segments_sane(predicted, fitted.k, CANDIDATE)
        self.segments = fitted.k
        comparisons = {
            "champion": champion.segments if champion else None,
            "previous_night": _previous_predictions(self.storage, self.as_of),
        }
        planted = _planted_segments(self.storage)
        segments = predicted["segment"].to_numpy()
        windows = quality_by_window(snapshot, sets, fitted, segments, comparisons, planted)
        windows["validation"].update(self.floors(windows["validation"]))
        test = windows["test"]
        say(
            f"{fitted.k} segments; test silhouette {test['silhouette']:.3f}"
            + f", autoencoder best epoch {fitted.best_epoch}"
            + (
                f", {test['same_segment_vs_champion']:.1%} keep the champion's segment"
                if "same_segment_vs_champion" in test
                else ""
            )
        )
        return Candidate(
            model=fitted,
            loader=MODEL_LOADER,
            input_example=stand_in_example(
                snapshot[sets == "train"], "customer_id", fitted.feature_columns
            ),
            windows=windows,
            record=RunRecord(
                metrics={
                    **{f"silhouette_k{k}": v for k, v in fitted.silhouette_by_k.items()},
                    "best_epoch": fitted.best_epoch,
                },
                documents={
                    "feature_columns.json": {
                        "feature_columns": fitted.feature_columns,
                        "log_scaled": fitted.log_columns,
                    }
                },
                tables={"segment_profiles.json": segment_profiles(snapshot, segments)},
                figures=segment_plots.run_figures(fitted.embed(snapshot), segments, fitted),
            ),
        )

    def outcome(self, challenger: ChallengerOutcome) -> CustomersTrainingOutcome:
        return CustomersTrainingOutcome(
            **challenger.to_dict(),
            segments=self.segments,
            validation_fraction=self.config.validation_fraction,
            test_fraction=self.config.test_fraction,
            customers=len(self.snapshot),
            train_customers=int((self.sets == "train").sum()),
        )


@dataclass(frozen=True)
class ChampionView:
    """The champion's segments for today's snapshot (what a challenger is aligned to)."""

    version: str
    k: int
    segments: pd.Series  # segment id by customer_id


def _champion_view(champion: RegisteredModel | None, snapshot: pd.DataFrame) -> ChampionView | None:
    """Return the champion's assignment of `snapshot`, or None without a usable champion."""
    if champion is None:
        return None
    try:
        predicted = champion.predict(snapshot)
    except Exception as error:  # a champion that cannot read today's features: fresh ids
        log.warning("champion v%s cannot segment today's snapshot: %s", champion.version, error)
        return None
    segments = predicted.set_index(predicted["customer_id"].astype("string"))["segment"]
    return ChampionView(version=champion.version, k=champion.model.k, segments=segments)


def _previous_predictions(storage: Storage, as_of: dt.date) -> pd.Series | None:
    days = storage.partition_dates("predictions", DOMAIN, end=as_of - dt.timedelta(days=1))
    if not days:
        return None
    previous = storage.read_partition("predictions", DOMAIN, days[-1])
    return previous.set_index(previous["customer_id"].astype("string"))["segment"]


# -- synthetic data and the demo -----------------------------------------------------------
def _planted_segments(storage: Storage) -> pd.Series | None:
    planted = storage.read_reference(DOMAIN, PLANTED)
    if planted is None:
        return None
    return planted.set_index(planted["customer_id"].astype("string"))["segment"]


# -- the domain ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CustomersParts:
    """The customers domain's own parts for one data source (`build_customers_domain` binds
    them to it); `finpipe.lifecycle` runs them."""

    name: str = DOMAIN
    training_config: type[CustomersTrainingConfig] = CustomersTrainingConfig
    training_outcome: type[CustomersTrainingOutcome] = CustomersTrainingOutcome
    selection_metric: str = "silhouette"  # one candidate: nothing to choose between
    nested_runs: bool = False  # the one model is logged in the nightly run itself
    scores_history: bool = False  # a night's snapshot is its partition
    config: CustomersConfig
    contract: RawContract  # ingest's checks of the source's files
    update_features: lifecycle.FeatureStep

    @property
    def feature_definition(self) -> dict[str, object]:
        return {"active_days": self.config.features.active_days}

    def prepare_training(
        self,
        storage: Storage,
        as_of: dt.date,
        config: CustomersTrainingConfig,
        champion: Callable[[], RegisteredModel | None],
    ) -> CustomersNight:
        snapshot = read_snapshot(storage, as_of)
        sets = sets_by_id(snapshot["customer_id"], config.validation_fraction, config.test_fraction)
        registered = champion()
        view = _champion_view(registered, snapshot)
        issued = 0 if registered is None else int(getattr(registered.model, "next_id", 0))
        return CustomersNight(storage, as_of, config, snapshot, sets, view, next_id=issued)

    def promotion_scorer(
        self,
        storage: Storage,
        outcome: CustomersTrainingOutcome,
        champion: Callable[[], RegisteredModel | None],
    ) -> lifecycle.ModelScore:
        """Return a model's silhouette on the outcome's held-out customers (`champion` is not
        read: customers keep their hashed set night after night).

        Both models segment the snapshot of the training day; the score is the silhouette of the
        test customers' segments in the common evaluation space (model-independent, see
        `evaluation_space`).
        """
        snapshot = read_snapshot(storage, as_day(outcome.as_of))
        sets = sets_by_id(
            snapshot["customer_id"], outcome.validation_fraction, outcome.test_fraction
        )
        test = sets == "test"
        space = evaluation_space(snapshot, sets)[test]

        def score(model: RegisteredModel) -> float:
            segments = model.predict(snapshot)["segment"].to_numpy()[test]
            return segment_quality(space, segments)["silhouette"]

        return score

    def prepare_scoring(self, storage: Storage, as_of: dt.date) -> lifecycle.Predict:
        """Return how the champion segments every customer active at `as_of`.

        Rows: customer_id, segment, segment_name, distance_to_centroid (in the champion's
        embedding). The night's profiles (`segment_profiles`: one row per segment), which the
        names come from, are published to segments/customers/<as_of>/ with the champion's
        name, version and run id, so each row's name can be traced to the profile it came from.
        """
        snapshot = read_snapshot(storage, as_of)

        def predict(champion: RegisteredModel) -> Predictions:
            try:
                predicted = champion.predict(snapshot)
            except ValueError as error:
                raise ScoringError(
                    f"champion v{champion.version} cannot segment the {as_of} snapshot ({error}); "
                    "rebuild features or retrain"
                ) from None
            profiles = segment_profiles(snapshot, predicted["segment"].to_numpy())
            names = profiles.set_index("segment")["segment_name"]
            scores = predicted[["customer_id", "segment", "distance_to_centroid"]]
            scores.insert(2, "segment_name", scores["segment"].map(names))
            return Predictions(scores, ["customer_id"], partitions={"segments": profiles})

        return predict

    def plan_demo(self, settings: Settings) -> list[DemoNight]:
        return plan_customers_demo(settings)


def build_customers_domain(config: CustomersConfig) -> Domain:
    """Return the customers domain for transaction files shaped as `config` describes."""
    features = partial(
        update_customer_features,
        active_days=config.features.active_days,
        mapped=list(config.columns.delivered()),
    )
    parts = CustomersParts(
        config=config, contract=customers_contract(config), update_features=features
    )
    return lifecycle.bind(parts)


def __getattr__(name: str) -> Domain:
    """`CUSTOMERS`: the domain for the configured source, built on each registry lookup.

    A module constant would freeze the config at import; reading FINPIPE_CUSTOMERS_CONFIG at
    lookup lets one process (a test session, a Prefect worker) serve several sources.
    """
    if name == "CUSTOMERS":
        return build_customers_domain(active_customers_config())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
