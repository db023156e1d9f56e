"""One lifecycle for every domain: train, record, select, register, promote, score.

A domain supplies only what is its own, through `DomainParts`: its raw contract, its feature
step, its candidate models and how to fit and measure them (a `TrainingNight`), how to score a
registered model on the promotion window and how to predict a scoring date. This module owns
everything around them, the same for every domain:

- one MLflow parent run `nightly-<as-of>` with the training config, the as-of date and the
  night's context, and a nested run per candidate (or the candidate in the parent run, for a
  domain with one model);
- the candidate with the best validation `selection_metric`, sanity-checked, registered and
  aliased `challenger`;
- champion/challenger promotion on the same evaluation window (a champion that cannot read the
  window scores -inf, so one that no longer fits today's features loses its seat; a
  challenger that cannot is an error, and one whose score is NaN is never promoted);
- scoring with the champion, an optional scoring report and the predictions partition (and
  any other table of the night) with model provenance.

Helpers a domain may use: `Night` (the fields and defaults every night shares),
`state_baseline_floor` (a baseline candidate's score as every candidate's floor) and
`compare_candidates` (their metrics side by side).

Domain code states what a run records as a `RunRecord` and never calls MLflow itself.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from pydantic import BaseModel

from finpipe import plots, promotion, tracking
from finpipe.domains import ChallengerOutcome, DemoNight, Domain
from finpipe.errors import ConfigError
from finpipe.features import FeatureUpdate
from finpipe.ingest import RawContract
from finpipe.locks import DEFAULT_TIMEOUT_SECONDS, history_lock
from finpipe.scoring import ScoringOutcome, publish_predictions
from finpipe.settings import Settings
from finpipe.storage import Storage, as_day
from finpipe.text import counted
from finpipe.tracking import RegisteredModel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

Say = Callable[[str], None]
EpochLogger = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class TrainingData:
    """A frame logged as a run's training data set (schema and a sample), and where it is from."""

    frame: pd.DataFrame
    source: str
    name: str
    targets: str | None = None


@dataclass
class RunRecord:
    """What one MLflow run records, as a domain states it; the lifecycle writes it."""

    params: Mapping[str, str | int | float] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    documents: Mapping[str, Mapping[str, object]] = field(default_factory=dict)  # JSON by path
    tables: Mapping[str, pd.DataFrame] = field(default_factory=dict)  # table artifacts by path
    figures: Mapping[str, Figure] = field(default_factory=dict)  # images by path
    data: TrainingData | None = None


class FittedModel(Protocol):
    """A fitted model as finpipe ships it: a self-describing folder and a frame-in, frame-out
    `predict`; `loader` ("module:Class") names the class whose `load(folder)` reads it back."""

    def save(self, directory: Path) -> None: ...

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame: ...


@dataclass
class Candidate:
    """One fitted candidate: the model, its metrics by window and what its run records.

    `windows` is {window: {metric: value}} with at least "validation" (the selection window)
    and "test"; each value is logged as `<window>_<metric>`. `test_predictions` must be finite
    and not constant before the candidate may be registered (None when the domain checks its
    own predictions, e.g. segments).
    """

    model: FittedModel
    loader: str
    input_example: pd.DataFrame
    windows: dict[str, dict[str, float]]
    record: RunRecord = field(default_factory=RunRecord)
    test_predictions: npt.NDArray[np.float64] | None = None


OutcomeT = TypeVar("OutcomeT", bound=ChallengerOutcome)
OutcomeT_co = TypeVar("OutcomeT_co", bound=ChallengerOutcome, covariant=True)
ConfigT = TypeVar("ConfigT", bound=BaseModel)


class PromotesOn(Protocol):
    """A training config that names the metric a challenger must beat the champion on."""

    @property
    def promotion_metric(self) -> str: ...


NightConfigT = TypeVar("NightConfigT", bound=PromotesOn)


class TrainingNight(Protocol[OutcomeT_co]):
    """One night's training set as a domain prepared it; the lifecycle drives it."""

    @property
    def promotion_metric(self) -> str:
        """The evaluation-window metric a challenger must beat the champion on."""
        ...

    def context(self) -> RunRecord:
        """The parent run's parameters, training data and documents."""
        ...

    def candidates(self) -> Sequence[str]:
        """The candidate models to fit, in order (each gets its nested run of that name)."""
        ...

    def fit(self, kind: str, on_epoch: EpochLogger, say: Say) -> Candidate:
        """Fit and measure candidate `kind` (inside its run: `on_epoch` logs each epoch)."""
        ...

    def conclude(self, fitted: Mapping[str, Candidate], say: Say) -> RunRecord:
        """What the parent run records once every candidate is fitted (comparisons, oracle
        figures); may add figures to the candidates' `windows` for the outcome."""
        ...

    def outcome(self, challenger: ChallengerOutcome) -> OutcomeT_co:
        """The domain's outcome: `challenger` plus what promotion needs to rebuild its window."""
        ...


@dataclass
class Night(Generic[NightConfigT]):
    """What every domain's `TrainingNight` holds (where, when, with which config) and its
    defaults: promotion on the config's `promotion_metric`, nothing to conclude."""

    storage: Storage
    as_of: dt.date
    config: NightConfigT

    @property
    def promotion_metric(self) -> str:
        return self.config.promotion_metric

    def conclude(self, fitted: Mapping[str, Candidate], say: Say) -> RunRecord:
        return RunRecord()


class FeatureStep(Protocol):
    """A domain's feature step: writes the feature partitions up to `as_of` that are missing
    (every one with `rebuild`) and says which. Each of `also` (dates on or before `as_of`
    that a run will process) that has validated data must have features afterwards too: a
    domain that builds every validated date has nothing more to do; one that builds only the
    dates its nights run (customers' snapshots) builds those in the same step."""

    def __call__(
        self,
        storage: Storage,
        as_of: dt.date,
        *,
        rebuild: bool,
        progress: Say | None,
        also: Collection[dt.date] = (),
    ) -> FeatureUpdate: ...


ModelScore = Callable[[RegisteredModel], float]
Predict = Callable[[RegisteredModel], "Predictions"]


@dataclass(frozen=True)
class JudgedScore:
    """A `ModelScore` that also says what it judged the models on (`compared_on`, read once
    both were scored, e.g. 16 of 94 test dates), for the promotion decision's reason. A domain's
    `promotion_scorer` returns one where it may leave rows out; a plain `ModelScore` still
    works, and its decision says "on the same test window"."""

    score: ModelScore
    compared_on: Callable[[], promotion.ComparedOn]

    def __call__(self, model: RegisteredModel) -> float:
        return self.score(model)


@dataclass(frozen=True)
class Predictions:
    """A scoring date's rows (keys and predictions) as a domain computed them with a model.

    `sort_by` names the key columns: the rows are published sorted by them, and two rows with
    the same keys, or a row without them, are refused with nothing published.

    `report`, when given, is written to reports/<domain>/scoring/date=<as-of>.json.
    `empty_reason` says why `rows` is empty, for the run to warn with. `partitions` are other
    tables of the night ({dataset: table}, e.g. customers' segment profiles), published as
    <dataset>/<domain>/<as-of> with the model's provenance before the predictions.
    """

    rows: pd.DataFrame
    sort_by: list[str]
    report: Mapping[str, object] | None = None
    empty_reason: str | None = None
    partitions: Mapping[str, pd.DataFrame] = field(default_factory=dict)


class DomainParts(Protocol[ConfigT, OutcomeT]):
    """What a domain supplies; `bind` turns it into the `Domain` the flows run. Parts that can
    say which dates a model learnt from also implement `LearntDates`."""

    @property
    def name(self) -> str: ...

    @property
    def contract(self) -> RawContract: ...

    @property
    def training_config(self) -> type[ConfigT]: ...

    @property
    def training_outcome(self) -> type[OutcomeT]: ...

    @property
    def selection_metric(self) -> str:
        """The validation metric (higher is better) that picks the candidate to register."""
        ...

    @property
    def nested_runs(self) -> bool:
        """True: one nested run per candidate; False: the single candidate in the parent run."""
        ...

    @property
    def scores_history(self) -> bool:
        """True when scoring a date reads the rows of earlier dates known by then (credit's
        open loans): a correction of any earlier day makes its predictions stale, a later
        delivery (a loan's outcome) does not. False when a date's own partitions hold all it
        scores from (market's lookback is in its features)."""
        ...

    @property
    def feature_definition(self) -> Mapping[str, object]:
        """The settings the feature step computes with, as JSON values (a loan book's columns
        and labels, customers' active days; empty when the code alone defines them): when they
        change, the next feature step rebuilds every date instead of mixing two definitions."""
        ...

    @property
    def update_features(self) -> FeatureStep:
        """The feature step: a method, or a `FeatureStep` attribute (e.g. bound to a config)."""
        ...

    def prepare_training(
        self,
        storage: Storage,
        as_of: dt.date,
        config: ConfigT,
        champion: Callable[[], RegisteredModel | None],
    ) -> TrainingNight[OutcomeT]:
        """Read and split the night's training data (`champion` loads the current one)."""
        ...

    def promotion_scorer(
        self,
        storage: Storage,
        outcome: OutcomeT,
        champion: Callable[[], RegisteredModel | None],
    ) -> ModelScore:
        """Rebuild the outcome's evaluation window; return a model's score on it (`champion`
        loads the current champion, e.g. to leave out what it trained on; called while scoring,
        under the promotion's champion lock). A `JudgedScore` also says how many rows both
        models were judged on, for the decision's reason."""
        ...

    def prepare_scoring(self, storage: Storage, as_of: dt.date) -> Predict:
        """Read what scoring `as_of` needs (failing early if it is missing); return how a
        model predicts it."""
        ...

    def plan_demo(self, settings: Settings) -> list[DemoNight]:
        """Write the demo's synthetic deliveries; return the nights the demo runs."""
        ...


@runtime_checkable
class LearntDates(Protocol):
    """Domain parts that know the last date a registered model learnt from, so that scoring
    says which predictions are in-sample (`ScoringOutcome.in_sample`): a backfill scores past
    dates with today's champion, which may have trained on them. Optional: a domain whose
    models record no such date (customers' segmentations) leaves it out, and its predictions
    are not flagged."""

    def learnt_through(self, model: RegisteredModel) -> dt.date | None:
        """Return the last date whose rows or labels `model` trained or was validated on;
        None when it records none (a model saved by an earlier finpipe)."""
        ...


# -- training ------------------------------------------------------------------------------
def train_challenger(
    parts: DomainParts[ConfigT, OutcomeT],
    storage: Storage,
    settings: Settings,
    as_of: dt.date | str,
    config: ConfigT,
    *,
    progress: Say | None = None,
    tags: Mapping[str, str] | None = None,
    holder: str = "training",
    lock_timeout: float | None = None,
) -> OutcomeT:
    """Fit every candidate in one parent run, register the best on validation as `challenger`.

    The test window stays untouched by selection; `promote` compares the challenger with the
    champion on it. `tags` go on the parent run (e.g. the Prefect flow run that trained).

    The training set is read under the domain's history lock (as `holder`, waiting up to
    `lock_timeout` seconds), so an ingest or a feature update never lands halfway through the
    read; the models are fitted after it is released.
    """
    started = time.perf_counter()
    as_of = as_day(as_of)
    say = progress or log.info
    timeout = DEFAULT_TIMEOUT_SECONDS if lock_timeout is None else lock_timeout
    with history_lock(storage.url, parts.name, holder=holder, timeout=timeout, on_wait=say):
        known_at = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        night = parts.prepare_training(
            storage, as_of, config, lambda: tracking.current_champion(settings, parts.name)
        )
    tracking.use_tracking(settings, parts.name)
    fitted: dict[str, Candidate] = {}
    uris: dict[str, str] = {}
    with tracking.run(f"nightly-{as_of.isoformat()}") as run_id:
        tracking.tag_run(tracking.DATA_KNOWN_AT_TAG, known_at)
        for key, value in (tags or {}).items():
            tracking.tag_run(key, value)
        settings_of_night = {k: str(v) for k, v in config.model_dump().items()}
        _write(RunRecord(params={**settings_of_night, "as_of": as_of.isoformat()}))
        _write(night.context())
        for kind in night.candidates():
            own_run = tracking.run(kind, nested=True) if parts.nested_runs else nullcontext()
            with own_run:
                fitted[kind] = night.fit(kind, epoch_logger(kind, say), say)
                uris[kind] = _write_candidate(fitted[kind], parts.name, kind, as_of)
        _write(night.conclude(fitted, say))
        windows = {kind: candidate.windows for kind, candidate in fitted.items()}
        chosen = promotion.best_on_validation(windows, parts.selection_metric)
        predictions = fitted[chosen].test_predictions
        if predictions is not None:
            promotion.check_predictions_sane(predictions, chosen)
        refusal = None
        if settings.promotion_floor:
            refusal = floor_refusal(windows[chosen]["validation"], chosen)
        version = promotion.register_challenger(
            settings, parts.name, uris[chosen], chosen, as_of.isoformat()
        )
        floor = "refused" if refusal else "passed" if settings.promotion_floor else "off"
        tracking.tag_run("quality_floor", floor)
        if refusal:
            say(f"quality floor: {refusal}; v{version} is registered but will not be promoted")
            tracking.tag_version(settings, parts.name, version, tracking.QUALITY_FLOOR_TAG, refusal)
    return night.outcome(
        ChallengerOutcome(
            run_id=run_id,
            as_of=as_of.isoformat(),
            candidate=chosen,
            challenger_version=version,
            promotion_metric=night.promotion_metric,
            metrics={kind: dict(values) for kind, values in windows.items()},
            seconds=round(time.perf_counter() - started, 3),
        )
    )


def floor_refusal(validation: Mapping[str, float], kind: str) -> str | None:
    """Why the chosen candidate may not become champion, or None when it may.

    A domain states its quality floor in the candidate's validation metrics, as components
    named `<metric>_floor_<what>` (e.g. `ic_floor_standard_error`, `ic_floor_momentum`: the
    naive baselines the model must beat on the validation window); the selection metric is
    the usual one, but any validation metric may have a floor (customers' segment stability).
    The candidate must score strictly above every component. A domain that states none has no
    floor.
    """
    missed = []
    for key, floor in validation.items():
        measured, _, name = key.partition("_floor_")
        if not name or measured not in validation:
            continue
        value = validation[measured]
        if not value > floor:
            what = name.replace("_", " ")
            missed.append(f"validation {measured} {value:.4f} does not beat {what} {floor:.4f}")
    return f"{kind}: {'; '.join(missed)}" if missed else None


def state_baseline_floor(
    fitted: Mapping[str, Candidate],
    baseline: str,
    metric: str,
    name: str,
    standard_error: Callable[[Mapping[str, float]], float | None],
) -> dict[str, float]:
    """State a baseline candidate's validation `metric` less one standard error of it as a
    promotion floor `<metric>_floor_<name>` on every candidate (see `floor_refusal`).

    `standard_error` reads the error from the baseline's validation metrics (None: it cannot be
    measured, no floor). Returns the floor as a parent-run metric to log; nothing when the
    baseline was not fitted tonight.
    """
    candidate = fitted.get(baseline)
    if candidate is None:
        return {}
    validation = candidate.windows["validation"]
    error = standard_error(validation)
    if error is None:
        return {}
    floor = validation[metric] - error
    for each in fitted.values():
        each.windows["validation"][f"{metric}_floor_{name}"] = floor
    return {f"validation_{metric}_floor_{name}": floor}


def compare_candidates(
    fitted: Mapping[str, Candidate],
    metrics: Sequence[str],
    windows: Sequence[str] = ("validation", "test"),
) -> pd.DataFrame:
    """Return one row per candidate with its `<window>_<metric>` values side by side."""
    return pd.DataFrame(
        [
            {
                "candidate": kind,
                **{
                    f"{window}_{metric}": candidate.windows[window][metric]
                    for window in windows
                    for metric in metrics
                },
            }
            for kind, candidate in fitted.items()
        ]
    )


def _write(record: RunRecord) -> None:
    """Log `record` to the active run; its figures are closed whether or not that succeeds."""
    try:
        _log(record)
    finally:
        for figure in record.figures.values():
            plots.close(figure)


def _log(record: RunRecord) -> None:
    """Log each part of `record` to the active run."""
    if record.params:
        tracking.log_params(record.params)
    if record.metrics:
        tracking.log_metrics(record.metrics)
    for path, document in record.documents.items():
        tracking.log_document(document, path)
    for path, table in record.tables.items():
        tracking.log_table(table, path)
    if record.figures:
        tracking.log_figures(record.figures)
    if record.data is not None:
        data = record.data
        tracking.log_training_data(
            data.frame, source=data.source, name=data.name, targets=data.targets
        )


def _write_candidate(candidate: Candidate, domain: str, kind: str, as_of: dt.date) -> str:
    """Log a candidate's metrics by window, its record and its model; return the model URI.

    The model is logged as `<domain>-<kind>` (e.g. `market-mlp`), tagged with its domain,
    candidate and as-of date, so a night's models are told apart in the experiment's Models
    tab and found with `mlflow.search_logged_models`."""
    by_window = {
        f"{window}_{k}": float(v)
        for window, values in candidate.windows.items()
        for k, v in values.items()
    }
    _write(replace(candidate.record, metrics={**by_window, **candidate.record.metrics}))
    info = tracking.log_fitted_model(
        candidate.model,
        name=tracking.logged_model_name(domain, kind),
        tags={
            tracking.DOMAIN_TAG: domain,
            tracking.CANDIDATE_TAG: kind,
            tracking.AS_OF_TAG: as_of.isoformat(),
        },
        loader=candidate.loader,
        input_example=candidate.input_example,
        output_example=candidate.model.predict(candidate.input_example),
    )
    return info.model_uri


# -- promotion -----------------------------------------------------------------------------
def promote(
    parts: DomainParts[ConfigT, OutcomeT],
    storage: Storage,
    settings: Settings,
    outcome: OutcomeT,
    *,
    lock_timeout: float | None = None,
    progress: Say | None = None,
) -> promotion.PromotionDecision:
    """Score challenger and champion on the same evaluation window; promote if better.

    Both models are loaded from the registry and scored by the same code, so the comparison
    is like for like. The decision and both figures are logged to the training run. One
    promotion of a domain at a time (`promotion.promote_challenger` holds its champion lock,
    waiting up to `lock_timeout` seconds, default DEFAULT_TIMEOUT_SECONDS, and saying so
    through `progress`). The reason says what both were judged on when the domain's scorer
    is a `JudgedScore`.
    """
    score = parts.promotion_scorer(
        storage, outcome, lambda: tracking.current_champion(settings, parts.name)
    )

    def evaluate(model: RegisteredModel) -> float:
        if model.version == outcome.challenger_version:
            return float(score(model))  # trained on these features: a failure is an error
        try:
            return float(score(model))
        except (MemoryError, torch.OutOfMemoryError):  # the machine's fault: fail, keep it
            raise
        except Exception as error:  # a champion that can't read today's features loses its seat
            log.warning("v%s cannot score the current features: %s", model.version, error)
            return float("-inf")

    return promotion.promote_challenger(
        settings,
        parts.name,
        challenger_version=outcome.challenger_version,
        metric=outcome.promotion_metric,
        evaluate=evaluate,
        compared_on=score.compared_on if isinstance(score, JudgedScore) else None,
        run_id=outcome.run_id,
        lock_root=storage.url,
        lock_timeout=DEFAULT_TIMEOUT_SECONDS if lock_timeout is None else lock_timeout,
        on_wait=progress or log.info,
    )


@dataclass(frozen=True)
class LearntRows:
    """Which of a night's test rows a champion learnt from (`mask`), and what the domain
    knows that from (`basis`, e.g. "its labels read prices through 2024-03-28")."""

    mask: npt.NDArray[np.bool_]
    basis: str


def rows_the_champion_never_learnt(
    rows: pd.DataFrame,
    champion: RegisteredModel | None,
    learnt: Callable[[RegisteredModel], LearntRows | None],
    *,
    unit: str,
    units: Callable[[pd.DataFrame], int],
    logger: logging.Logger,
) -> pd.DataFrame:
    """Return the `rows` the champion never trained or was validated on, for a domain's
    `promotion_scorer` to judge both models on: all of them without a champion, or when
    `learnt` finds nothing recorded (a champion saved by an earlier finpipe; a warning says
    so). Otherwise the learnt rows are left out, with a warning counting them in `unit`s
    (`units` counts a frame's, e.g. its loans or its dates) and saying when none is left:
    both models then score NaN, which is never promoted. The warning goes to the domain's
    `logger`."""
    if champion is None:
        return rows
    found = learnt(champion)
    if found is None:
        logger.warning(
            "champion v%s records no training window (saved by an earlier finpipe): it is "
            "compared on all %s, some of which it may have trained on",
            champion.version,
            counted(units(rows), unit),
        )
        return rows
    if found.mask.any():
        logger.warning(
            "promotion: %s of %s left out for both models: champion v%s trained or was "
            "validated on them (%s)%s",
            f"{units(rows.loc[found.mask]):,}",
            counted(units(rows), unit),
            champion.version,
            found.basis,
            "; none is left, so the challenger cannot be measured and is not promoted"
            if found.mask.all()
            else "",
        )
    return rows.loc[~found.mask]


# -- scoring -------------------------------------------------------------------------------
def score(
    parts: DomainParts[ConfigT, OutcomeT],
    storage: Storage,
    settings: Settings,
    as_of: dt.date | str,
) -> ScoringOutcome:
    """Score `as_of` with the champion and publish predictions/<domain>/<as_of>.

    Every output row names the model version and run that produced it; the outcome also says
    the last date the champion learnt from, where the domain knows it (`LearntDates`), so the
    run can warn that a date on or before it is scored in-sample.
    """
    as_of = as_day(as_of)
    predict = parts.prepare_scoring(storage, as_of)
    champion = tracking.load_model_version(settings, parts.name)
    learnt = parts.learnt_through(champion) if isinstance(parts, LearntDates) else None
    predictions = predict(champion)
    if predictions.report is not None:
        key = storage.reports_key(parts.name, "scoring", f"date={as_of.isoformat()}.json")
        storage.write_json(key, dict(predictions.report))
    for dataset, table in predictions.partitions.items():  # before: they name the predictions
        table = table.assign(
            model_name=champion.name, model_version=champion.version, run_id=champion.run_id
        )
        table.insert(0, "date", pd.Timestamp(as_of))
        storage.write_partition(dataset, parts.name, as_of, table)
    outcome = publish_predictions(
        storage, parts.name, as_of, predictions.rows, champion, sort_by=predictions.sort_by
    )
    if not outcome.rows:  # published all the same, so the date is done and says why
        outcome.warning = predictions.empty_reason or f"no {parts.name} rows to score on {as_of}"
    outcome.learnt_through = None if learnt is None else learnt.isoformat()
    return outcome


def check_feature_rows(storage: Storage, domain: str, update: FeatureUpdate) -> None:
    """Raise ConfigError when the last partition a domain's feature step wrote has no `date`
    column: every reader of the layer (training windows, scoring, `pd.read_parquet`) selects
    rows by it, and a step that drops it fails much later, far from its cause."""
    if not update.dates_written:
        return
    day = update.dates_written[-1]
    if "date" not in storage.read_partition("features", domain, day).columns:
        raise ConfigError(
            f"the {domain} feature step wrote features/{domain}/{day} without a 'date' "
            "column: keep the validated rows' date in the feature rows"
        )


# How long a fit may go without a line in the flow's log: a short fit says its first epoch
# only (the demo's 185-epoch autoencoder said 185 lines), a long one an epoch every so often.
EPOCH_LINE_EVERY_SECONDS = 10.0


def epoch_logger(
    kind: str,
    say: Say,
    every: float = EPOCH_LINE_EVERY_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> EpochLogger:
    """Return the `on_epoch` of a candidate's fit: each epoch's losses go to its MLflow run
    (the loss curves), and the flow's log says the first epoch and then one at least `every`
    seconds after the last it said, so a fit of many minutes shows it is moving without a line
    for each of hundreds of short epochs. Each shipped domain's summary of a candidate names
    its best epoch."""
    said_at: float | None = None

    def log(row: dict[str, float]) -> None:
        nonlocal said_at
        tracking.log_epoch(row)
        now = clock()
        if said_at is not None and now - said_at < every:
            return
        said_at = now
        say(
            f"{kind} epoch {int(row['epoch'])}: train loss {row['train_loss']:.4f}, "
            f"validation loss {row['validation_loss']:.4f}"
        )

    return log


# -- binding -------------------------------------------------------------------------------
def bind(parts: DomainParts[ConfigT, OutcomeT]) -> Domain:
    """Return the `Domain` the flows run: `parts`' own steps, the lifecycle around them.

    Raises ConfigError when the contract is another domain's: ingest files its batches under
    the contract's name, the flows read them under the parts' name."""
    if parts.contract.domain != parts.name:
        raise ConfigError(
            f"domain {parts.name!r} has the raw contract of domain {parts.contract.domain!r}: "
            f"give its RawContract domain={parts.name!r}"
        )

    def config_of(config: BaseModel | None) -> ConfigT:
        if config is None:
            return parts.training_config()
        if isinstance(config, parts.training_config):
            return config
        return parts.training_config.model_validate(config.model_dump())

    def outcome_of(outcome: ChallengerOutcome) -> OutcomeT:
        if isinstance(outcome, parts.training_outcome):
            return outcome
        return parts.training_outcome(**outcome.to_dict())

    def update_features(
        storage: Storage,
        as_of: dt.date | str,
        *,
        rebuild: bool = False,
        progress: Say | None = None,
        also: Collection[dt.date] = (),
    ) -> FeatureUpdate:
        update = parts.update_features(
            storage, as_day(as_of), rebuild=rebuild, progress=progress, also=also
        )
        check_feature_rows(storage, parts.name, update)
        return update

    def train(
        storage: Storage,
        settings: Settings,
        as_of: dt.date | str,
        config: BaseModel | None = None,
        *,
        progress: Say | None = None,
        tags: Mapping[str, str] | None = None,
        holder: str = "training",
        lock_timeout: float | None = None,
    ) -> ChallengerOutcome:
        return train_challenger(
            parts,
            storage,
            settings,
            as_of,
            config_of(config),
            progress=progress,
            tags=tags,
            holder=holder,
            lock_timeout=lock_timeout,
        )

    def promote_step(
        storage: Storage,
        settings: Settings,
        outcome: ChallengerOutcome,
        *,
        lock_timeout: float | None = None,
        progress: Say | None = None,
    ) -> promotion.PromotionDecision:
        return promote(
            parts,
            storage,
            settings,
            outcome_of(outcome),
            lock_timeout=lock_timeout,
            progress=progress,
        )

    def score_step(storage: Storage, settings: Settings, as_of: dt.date | str) -> ScoringOutcome:
        return score(parts, storage, settings, as_of)

    return Domain(
        name=parts.name,
        contract=parts.contract,
        update_features=update_features,
        train=train,
        promote=promote_step,
        score=score_step,
        training_config=parts.training_config,
        training_outcome=parts.training_outcome,
        plan_demo=parts.plan_demo,
        code_module=type(parts).__module__,
        scores_history=parts.scores_history,
        feature_definition=parts.feature_definition,
    )
