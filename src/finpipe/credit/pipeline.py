"""The credit domain's pipeline steps: ingest contract, features, training, promotion, scoring.

Every step is a plain function over a `Storage`, `Settings` and the user's `LoanBookConfig`;
`credit_domain(book)` binds them into a `Domain`. `CREDIT` (what the registry names) is built
on access from the current settings (`FINPIPE_CREDIT_CONFIG`), so pointing that setting at
another config file switches the loan book without a code change.

Which rows do what:
- dated book (`columns.date` set): rows are applications dated by their own date. Training uses
  every labelled row up to the as-of day, split out of time (train, then validation, then test
  dates); scoring follows `[scoring] population`.
- cross-sectional book (no date column): every delivery is a snapshot of the whole book, dated
  by its ingest day. Training uses the labelled rows of the latest snapshot, split at random
  within each class (stratified).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal

import mlflow
import numpy as np
import pandas as pd
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from finpipe import promotion, tracking
from finpipe.credit import plots
from finpipe.credit.config import DATE_COLUMN, LoanBookConfig, load_loan_book
from finpipe.credit.features import LABEL, build_credit_features
from finpipe.credit.metrics import PSI_SIGNIFICANT, credit_metrics
from finpipe.credit.model import ClassifierConfig, FittedCreditModel, fit_loan_book_model
from finpipe.credit.schema import (
    DOMAIN,
    build_credit_suite,
    normalise_credit_frame,
    seen_categories,
)
from finpipe.domains import ChallengerOutcome, DemoNight, Domain, demo_nights
from finpipe.errors import ConfigError, ScoringError
from finpipe.features import FeatureUpdate, PartitionWriter, features_are_stale
from finpipe.ingest import RawContract
from finpipe.scoring import ScoringOutcome, publish_predictions
from finpipe.settings import Settings, load_settings
from finpipe.storage import Storage, as_day, write_json_atomic
from finpipe.training import time_split

log = logging.getLogger("finpipe.credit")

MODEL_LOADER = "finpipe.credit.model:FittedCreditModel"
ORACLE_FILE = "oracle.parquet"
MIN_DATES_FOR_TIME_SPLIT = 10


# -- ingest --------------------------------------------------------------------------------
def credit_suite(storage: Storage, *, book: LoanBookConfig) -> dict:
    """Return the book's suite, with the categories accepted so far in `storage`."""
    return build_credit_suite(book, seen_categories(storage, book))


def credit_contract(book: LoanBookConfig) -> RawContract:
    """Return the ingest contract of a loan book: keys (date, id), suite built in memory."""
    return RawContract(
        domain=DOMAIN,
        suite=book.suite_name,
        key_columns=(DATE_COLUMN, book.columns.id),
        date_column=DATE_COLUMN,
        normalise=partial(normalise_credit_frame, book=book),
        suite_spec=partial(credit_suite, book=book),
        normalise_takes_as_of=True,
    )


# -- features ------------------------------------------------------------------------------
def update_credit_features(
    storage: Storage,
    as_of: dt.date | str,
    *,
    book: LoanBookConfig,
    rebuild: bool = False,
    block_dates: int = 100,
    progress: Callable[[str], None] | None = None,
) -> FeatureUpdate:
    """Publish the feature partition of every validated date up to `as_of` that lacks one or
    is older than its validated partition (all of them with `rebuild`).

    A credit row's features depend on that row only, so each date is computed on its own.
    """
    started = time.perf_counter()
    as_of = as_day(as_of)
    update = FeatureUpdate()
    done = set(storage.partition_dates("features", DOMAIN, end=as_of))
    todo = [
        day
        for day in storage.partition_dates("validated", DOMAIN, end=as_of)
        if rebuild or day not in done or features_are_stale(storage, DOMAIN, day)
    ]
    with PartitionWriter(storage, DOMAIN, update, DATE_COLUMN) as writer:
        for start in range(0, len(todo), block_dates):
            block = todo[start : start + block_dates]
            validated = storage.read_partitions("validated", DOMAIN, days=block)
            features = build_credit_features(validated, book)
            writer.publish(features.sort_values([DATE_COLUMN, book.columns.id], kind="stable"))
            if progress:
                progress(f"features: {start + len(block)}/{len(todo)} dates built")
    update.seconds = round(time.perf_counter() - started, 3)
    return update


# -- training ------------------------------------------------------------------------------
class CreditTrainingConfig(BaseModel):
    """Hyper-parameters of a nightly credit retrain (also the Prefect form and MLflow params)."""

    models: list[Literal["mlp", "logistic"]] = Field(
        default_factory=lambda: ["mlp", "logistic"],
        description="mlp: the tabular network; logistic: the logistic-regression baseline.",
    )
    validation_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of labelled rows.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of labelled rows.")
    embargo_days: int = Field(
        0, ge=0, description="Dated books: distinct dates dropped between train, validation, test."
    )
    hidden: int = Field(64, ge=4, description="Hidden units of the network.")
    layers: int = Field(2, ge=1, le=6, description="Hidden layers of the network.")
    dropout: float = Field(0.1, ge=0, lt=1)
    batch_size: int = Field(512, ge=16)
    max_epochs: int = Field(60, ge=1)
    patience: int = Field(10, ge=1, description="Early-stopping patience in epochs.")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate of the network.")
    weight_decay: float = Field(1e-3, ge=0)
    logistic_learning_rate: float = Field(1e-2, gt=0, description="AdamW rate of the baseline.")
    class_weight: Literal["balanced", "none"] = Field(
        "balanced", description="balanced: defaults weigh n_good / n_bad in the loss."
    )
    unknown_rate: float = Field(
        0.02, ge=0, lt=0.5, description="Share of training categories blanked to unknown."
    )
    min_category_count: int = Field(
        3, ge=1, description="Categories seen fewer times in training go to the unknown bucket."
    )
    ig_steps: int = Field(32, ge=4, description="Integrated-gradient steps per reason code.")
    seed: int = 0
    device: str = Field("auto", description="auto (cuda when available), cpu or cuda.")
    cpu_threads: int = Field(
        1,
        ge=1,
        description="PyTorch CPU threads for training and scoring (small tabular nets gain "
        "little from more, and backfills score several dates at once).",
    )
    promotion_metric: Literal["auc", "ks"] = Field(
        "auc", description="Test metric a challenger must beat the champion on."
    )

    def classifier_config(self, kind: str) -> ClassifierConfig:
        logistic = kind == "logistic"
        return ClassifierConfig(
            kind=kind,
            hidden=self.hidden,
            layers=self.layers,
            dropout=self.dropout,
            batch_size=self.batch_size,
            max_epochs=self.max_epochs,
            patience=self.patience,
            learning_rate=self.logistic_learning_rate if logistic else self.learning_rate,
            weight_decay=self.weight_decay,
            class_weight=self.class_weight,
            unknown_rate=self.unknown_rate,
            min_category_count=self.min_category_count,
            ig_steps=self.ig_steps,
            seed=self.seed,
            device=self.device,
            cpu_threads=self.cpu_threads,
        )


@dataclass
class CreditTrainingOutcome(ChallengerOutcome):
    """What a nightly retrain produced: the challenger, its metrics and the split behind them."""

    split: str  # "out_of_time" or "stratified"
    validation_fraction: float
    test_fraction: float
    embargo_days: int
    seed: int
    test_rows: int
    test_start: str
    test_end: str
    train_rows: int
    first_date: str
    last_date: str


@dataclass(frozen=True)
class RowSplit:
    """Boolean masks over the training frame's rows, and how they were drawn."""

    kind: str
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def load_training_frame(storage: Storage, book: LoanBookConfig, as_of: dt.date) -> pd.DataFrame:
    """Return the labelled feature rows known at `as_of`, sorted by (date, id).

    Dated books: every date up to `as_of`; cross-sectional books: the latest snapshot only.
    """
    days = storage.partition_dates("features", DOMAIN, end=as_of)
    if not days:
        raise ScoringError(f"no credit feature partitions up to {as_of}; run the features step")
    if not book.is_dated:
        days = days[-1:]
    frame = storage.read_partitions("features", DOMAIN, days=days)
    frame = frame[frame[LABEL].notna()]
    return frame.sort_values([DATE_COLUMN, book.columns.id], kind="stable").reset_index(drop=True)


def split_rows(
    frame: pd.DataFrame,
    *,
    dated: bool,
    validation_fraction: float,
    test_fraction: float,
    embargo_days: int,
    seed: int,
) -> RowSplit:
    """Return train / validation / test masks over `frame` (deterministic for the same frame).

    Out of time when the book is dated and has at least 10 labelled dates (time_split over its
    distinct dates, `embargo_days` dates dropped between sets); otherwise stratified: within
    each class, a seeded shuffle gives the test and validation shares, the rest trains.
    """
    n = len(frame)
    dates = frame[DATE_COLUMN]
    if dated and dates.nunique() >= MIN_DATES_FOR_TIME_SPLIT:
        try:
            split = time_split(
                dates,
                validation_fraction=validation_fraction,
                test_fraction=test_fraction,
                embargo=embargo_days,
            )
        except ValueError as error:
            raise ConfigError(f"credit training split: {error}") from None
        return RowSplit(
            "out_of_time",
            dates.isin(split.train_dates).to_numpy(),
            dates.isin(split.validation_dates).to_numpy(),
            dates.isin(split.test_dates).to_numpy(),
        )
    rng = np.random.default_rng(seed)
    role = np.zeros(n, dtype=np.int8)  # 0 train, 1 validation, 2 test
    labels = frame[LABEL].to_numpy()
    for value in (0.0, 1.0):
        rows = rng.permutation(np.flatnonzero(labels == value))
        n_test = round(test_fraction * len(rows))
        n_validation = round(validation_fraction * len(rows))
        role[rows[:n_test]] = 2
        role[rows[n_test : n_test + n_validation]] = 1
    return RowSplit("stratified", role == 0, role == 1, role == 2)


def split_book_rows(
    frame: pd.DataFrame,
    book: LoanBookConfig,
    how: CreditTrainingConfig | CreditTrainingOutcome,
) -> RowSplit:
    """Return `split_rows` of `frame` with the fractions, embargo and seed of `how` (a training
    config, or the outcome that recorded them, so promotion rebuilds the very same split)."""
    return split_rows(
        frame,
        dated=book.is_dated,
        validation_fraction=how.validation_fraction,
        test_fraction=how.test_fraction,
        embargo_days=how.embargo_days,
        seed=how.seed,
    )


def scoring_population(storage: Storage, book: LoanBookConfig, as_of: dt.date) -> pd.DataFrame:
    """Return the feature rows to score at `as_of` under `[scoring] population`.

    unlabelled: every row without an outcome dated up to `as_of`; latest_snapshot: every row of
    the latest feature date on or before `as_of`.
    """
    days = storage.partition_dates("features", DOMAIN, end=as_of)
    if not days:
        raise ScoringError(f"no credit feature partitions up to {as_of}; run the features step")
    if book.scoring.population == "latest_snapshot":
        return storage.read_partitions("features", DOMAIN, days=days[-1:]).reset_index(drop=True)
    unlabelled = pc.field(LABEL).is_null(nan_is_null=True)
    return storage.read_partitions("features", DOMAIN, days=days, where=unlabelled)


def train_credit(
    storage: Storage,
    settings: Settings,
    as_of: dt.date | str,
    config: CreditTrainingConfig | None = None,
    *,
    book: LoanBookConfig,
    progress: Callable[[str], None] | None = None,
) -> CreditTrainingOutcome:
    """Train every configured model on one split, log each to MLflow as a nested run of one
    parent run, and register the best on validation AUC as `challenger`.

    The test rows stay untouched by selection; `promote_credit` compares the challenger with
    the champion on them.
    """
    started = time.perf_counter()
    config = config or CreditTrainingConfig()
    as_of = as_day(as_of)
    say = progress or log.info
    frame = load_training_frame(storage, book, as_of)
    split = split_book_rows(frame, book, config)
    population = scoring_population(storage, book, as_of)
    oracle = _oracle(storage, frame.loc[split.test, book.columns.id], frame.loc[split.test, LABEL])
    tracking.use_tracking(settings, DOMAIN)
    results: dict[str, dict] = {}
    with mlflow.start_run(run_name=f"nightly-{as_of.isoformat()}") as parent:
        _log_run_context(frame, split, population, config, book, as_of)
        for kind in config.models:
            say(f"training {kind} on {int(split.train.sum()):,} rows ({split.kind} split)")
            results[kind] = _train_one(frame, split, population, config, book, kind, oracle, say)
        _log_comparison(frame, split, results)
        candidate = promotion.best_on_validation(results, "auc")
        chosen = results[candidate]
        promotion.check_predictions_sane(chosen["test_pd"], candidate)
        version = promotion.register_challenger(settings, DOMAIN, chosen["model_uri"], candidate)
        if oracle is not None:
            mlflow.log_metric("test_oracle_auc", oracle)
            say(f"oracle AUC on the test rows: {oracle:.4f}")
        run_id = parent.info.run_id
    test_dates = frame.loc[split.test, DATE_COLUMN]
    return CreditTrainingOutcome(
        run_id=run_id,
        as_of=as_of.isoformat(),
        candidate=candidate,
        challenger_version=version,
        promotion_metric=config.promotion_metric,
        split=split.kind,
        validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction,
        embargo_days=config.embargo_days,
        seed=config.seed,
        test_rows=int(split.test.sum()),
        test_start=str(test_dates.min().date()),
        test_end=str(test_dates.max().date()),
        metrics={k: {"validation": r["validation"], "test": r["test"]} for k, r in results.items()},
        train_rows=int(split.train.sum()),
        first_date=str(frame[DATE_COLUMN].min().date()),
        last_date=str(frame[DATE_COLUMN].max().date()),
        seconds=round(time.perf_counter() - started, 3),
    )


def _train_one(frame, split, population, config, book, kind, oracle, say) -> dict:
    classifier = config.classifier_config(kind)
    with mlflow.start_run(run_name=kind, nested=True):
        mlflow.log_params({**asdict(classifier), "loan_book": book.name})
        fitted = fit_loan_book_model(
            frame,
            book,
            train=split.train,
            validation=split.validation,
            config=classifier,
            on_epoch=tracking.log_epoch,
        )
        labels = frame[LABEL].to_numpy()
        validation_pd = fitted.predict_pd(frame.loc[split.validation])
        test_rows = frame.loc[split.test]
        test_pd = fitted.predict_pd(test_rows)
        metrics = {
            "validation": credit_metrics(labels[split.validation], validation_pd),
            "test": credit_metrics(labels[split.test], test_pd),
        }
        if oracle is not None:
            metrics["test"]["oracle_auc"] = oracle
        for window, values in metrics.items():
            mlflow.log_metrics({f"{window}_{k}": float(v) for k, v in values.items()})
        mlflow.log_metrics(
            {
                "best_epoch": fitted.best_epoch,
                "calibration_a": fitted.calibration[0],
                "calibration_b": fitted.calibration[1],
            }
        )
        importance = _importance(fitted, test_rows)
        stability = fitted.population_stability(population) if len(population) else {}
        mlflow.log_dict(importance, "feature_importance.json")
        if stability:
            mlflow.log_dict(stability, "population_stability.json")
            mlflow.log_metrics({f"psi_{name}": value for name, value in stability.items()})
        _log_plots(kind, labels[split.test], test_pd, importance)
        example = test_rows[[book.columns.id, *book.feature_columns]].head(5)
        info = tracking.log_fitted_model(
            fitted,
            loader=MODEL_LOADER,
            input_example=example,
            output_example=fitted.predict(example),
        )
        say(
            f"{kind}: validation AUC {metrics['validation']['auc']:.4f}, test AUC "
            f"{metrics['test']['auc']:.4f}, KS {metrics['test']['ks']:.3f}, best epoch "
            f"{fitted.best_epoch}"
        )
    return {**metrics, "model_uri": info.model_uri, "test_pd": test_pd}


def _importance(fitted: FittedCreditModel, rows: pd.DataFrame) -> dict[str, float]:
    """Global importance: mean |integrated-gradient attribution| per feature over `rows`."""
    attributions = fitted.attributions(rows)
    values = (
        np.abs(attributions).mean(axis=0) if len(rows) else np.zeros(len(fitted.feature_columns))
    )
    ranked = sorted(zip(fitted.feature_columns, values, strict=True), key=lambda kv: -kv[1])
    return {name: float(value) for name, value in ranked}


def _log_plots(kind: str, labels, scores, importance: dict[str, float]) -> None:
    figures = {
        "plots/roc.png": plots.roc({kind: (labels, scores)}, f"{kind}: test ROC"),
        "plots/calibration.png": plots.calibration(labels, scores, f"{kind}: test calibration"),
        "plots/score_distribution.png": plots.score_distribution(
            labels, scores, f"{kind}: test PD by outcome"
        ),
        "plots/feature_importance.png": plots.feature_importance(
            importance, f"{kind}: global feature importance (test rows)"
        ),
    }
    tracking.log_figures(figures)


def _log_comparison(frame, split: RowSplit, results: dict[str, dict]) -> None:
    """The models' test ROC curves in one figure on the parent run (side by side)."""
    labels = frame.loc[split.test, LABEL].to_numpy()
    figure = plots.roc({k: (labels, r["test_pd"]) for k, r in results.items()}, "test ROC")
    tracking.log_figures({"plots/roc_models.png": figure})


def _log_run_context(frame, split: RowSplit, population, config, book, as_of) -> None:
    test_dates = frame.loc[split.test, DATE_COLUMN]
    mlflow.log_params(
        {
            **{k: str(v) for k, v in config.model_dump().items()},
            "as_of": as_of.isoformat(),
            "loan_book": book.name,
            "loan_book_config": book.source,
            "split": split.kind,
            "train_rows": int(split.train.sum()),
            "validation_rows": int(split.validation.sum()),
            "test_rows": int(split.test.sum()),
            "test_start": str(test_dates.min().date()),
            "test_end": str(test_dates.max().date()),
            "scoring_rows": len(population),
        }
    )
    mlflow.log_dict(book.model_dump(mode="json"), "loan_book.json")
    first, last = frame[DATE_COLUMN].min().date(), frame[DATE_COLUMN].max().date()
    tracking.log_training_data(
        frame,
        source=f"features/{DOMAIN}/date={first}..{last}",
        name=f"{DOMAIN}-{book.name}-{first}-to-{last}",
        targets=LABEL,
    )


def write_oracle(storage: Storage, truth: pd.DataFrame) -> None:
    """Keep a synthetic book's true PDs (id, true_pd) beside the data, for oracle-AUC reporting."""
    path = storage.root / "reference" / DOMAIN / ORACLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    truth.to_parquet(path, index=False)


def _oracle(storage: Storage, ids: pd.Series, labels: pd.Series) -> float | None:
    """Return the AUC of the true PDs on the test rows, when a synthetic oracle is present."""
    path = storage.root / "reference" / DOMAIN / ORACLE_FILE
    if not path.exists() or labels.nunique() < 2:
        return None
    truth = pd.read_parquet(path).set_index("id")["true_pd"]
    true_pd = truth.reindex(ids.astype(str).to_numpy()).to_numpy()
    if np.isnan(true_pd).any():
        return None
    return credit_metrics(labels.to_numpy(), true_pd)["auc"]


# -- promotion -----------------------------------------------------------------------------
def promote_credit(
    storage: Storage, settings: Settings, outcome: CreditTrainingOutcome, *, book: LoanBookConfig
) -> promotion.PromotionDecision:
    """Score challenger and champion on the same test rows; promote the challenger if better.

    The test rows are rebuilt from the outcome's split parameters over the same data, so both
    models are measured on exactly the rows the challenger never trained or was selected on.
    """
    frame = load_training_frame(storage, book, as_day(outcome.as_of))
    split = split_book_rows(frame, book, outcome)
    test = frame.loc[split.test].reset_index(drop=True)
    if len(test) != outcome.test_rows:
        raise ScoringError(
            f"the test rows of run {outcome.run_id} cannot be rebuilt ({len(test)} rows now, "
            f"{outcome.test_rows} at training): data up to {outcome.as_of} changed; retrain"
        )
    return promotion.promote_challenger(
        settings,
        DOMAIN,
        challenger_version=outcome.challenger_version,
        metric=outcome.promotion_metric,
        evaluate=lambda model: _test_score(model, test, outcome.promotion_metric),
        run_id=outcome.run_id,
    )


def _test_score(model: tracking.RegisteredModel, test: pd.DataFrame, metric: str) -> float:
    """Return `model`'s `metric` on the test rows; -inf if it cannot read them."""
    try:
        fitted = model.model
        scores = fitted.predict_pd(test)
    except Exception as error:  # a champion that can't read today's features loses its seat
        log.warning("v%s cannot score the current features: %s", model.version, error)
        return float("-inf")
    return float(credit_metrics(test[LABEL].to_numpy(), scores)[metric])


# -- scoring -------------------------------------------------------------------------------
def score_credit(
    storage: Storage, settings: Settings, as_of: dt.date | str, *, book: LoanBookConfig
) -> ScoringOutcome:
    """Score the population (see `scoring_population`) with the champion; publish
    predictions/credit/date=as_of with id, PD, grade, three reason codes and model version.

    A report of population stability (PSI of the score and of each feature against the
    champion's training rows) and of categories never seen in training (scored through the
    unknown bucket) is written to reports/credit/scoring/date=as_of.json.
    """
    as_of = as_day(as_of)
    population = scoring_population(storage, book, as_of)
    champion = tracking.load_model_version(settings, DOMAIN)
    fitted = champion.model
    missing = [c for c in [fitted.id_column, *fitted.feature_columns] if c not in population]
    if missing:
        raise ScoringError(
            f"credit features lack {missing} that champion v{champion.version} needs; the "
            "loan-book config changed since it was trained: retrain"
        )
    predicted = fitted.predict(population).reset_index(drop=True)
    predicted.insert(1, "record_date", population[DATE_COLUMN].to_numpy())
    _write_scoring_report(storage, as_of, champion, fitted, population, predicted["pd"])
    return publish_predictions(
        storage, DOMAIN, as_of, predicted, champion, sort_by=["record_date", "id"]
    )


def _write_scoring_report(
    storage, as_of, champion, fitted: FittedCreditModel, population, pd_values
) -> None:
    stability, unseen = {}, {}
    if len(population):
        indices = fitted.vocabulary.transform(population)  # once for both checks
        stability = fitted.population_stability(population, pd_values, indices)
        unseen = fitted.unseen_categories(population, indices)
    drifted = sorted(name for name, value in stability.items() if value > PSI_SIGNIFICANT)
    if drifted:
        log.warning("PSI above %s (population shift) for: %s", PSI_SIGNIFICANT, drifted)
    for column, values in unseen.items():
        log.warning("unseen %s categories scored as unknown: %s", column, values)
    write_json_atomic(
        storage.reports_dir() / DOMAIN / "scoring" / f"date={as_of.isoformat()}.json",
        {
            "as_of": as_of.isoformat(),
            "rows": len(population),
            "model_name": champion.name,
            "model_version": champion.version,
            "population_stability": stability,
            "drifted": drifted,
            "unseen_categories": unseen,
        },
    )


# -- demo ----------------------------------------------------------------------------------
def plan_credit_demo(
    settings: Settings,
    *,
    book: LoanBookConfig,
    applications: int = 30_000,
    nights: int = 3,
    seed: int = 7,
) -> list[DemoNight]:
    """Write a synthetic loan book as a lender's deliveries; return the nights the demo runs.

    The first night loads the history and that day's applications, each later night one day of
    new applications. Runs only with the synthetic loan-book config (the files follow it).
    """
    from finpipe.credit.synthetic import (
        CreditSyntheticConfig,
        delivery_day,
        generate_loan_book,
        write_deliveries,
    )

    if book.name != "synthetic":
        log.warning(
            "credit demo skipped: it needs the synthetic loan-book config, not %s", book.source
        )
        return []
    generated = generate_loan_book(CreditSyntheticConfig(applications=applications, seed=seed))
    drop = settings.home / "vendor_drop" / DOMAIN
    files = write_deliveries(generated.applications, drop, nightly_files=nights)
    write_oracle(Storage(settings.home), generated.true_pd.rename(columns={"loan_id": "id"}))
    return demo_nights(files, lambda daily: delivery_day(daily).isoformat())


# -- the domain ----------------------------------------------------------------------------
def credit_domain(book: LoanBookConfig) -> Domain:
    """Return the credit domain with every step bound to the loan book `book`."""
    return Domain(
        name=DOMAIN,
        contract=credit_contract(book),
        update_features=partial(update_credit_features, book=book),
        train=partial(train_credit, book=book),
        promote=partial(promote_credit, book=book),
        score=partial(score_credit, book=book),
        training_config=CreditTrainingConfig,
        training_outcome=CreditTrainingOutcome,
        plan_demo=partial(plan_credit_demo, book=book),
    )


def active_loan_book(settings: Settings | None = None) -> LoanBookConfig:
    """Return the loan book the settings name (FINPIPE_CREDIT_CONFIG; default the synthetic
    example)."""
    return load_loan_book((settings or load_settings()).credit_config)


def __getattr__(name: str) -> Domain:
    # `CREDIT` is read from the settings on every access, so it follows FINPIPE_CREDIT_CONFIG.
    if name == "CREDIT":
        return credit_domain(active_loan_book())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
