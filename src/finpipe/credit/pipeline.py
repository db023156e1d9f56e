"""The credit domain's own parts for one loan book, run by the shared lifecycle.

`credit_domain(book)` binds them into a `Domain`. `CREDIT` (what the registry names) is built
on access from the current settings (`FINPIPE_CREDIT_CONFIG`), so pointing that setting at
another config file switches the loan book without a code change.

Which rows do what:
- dated book (`columns.date` set): rows are applications dated by their own date. Training uses
  the loans up to the as-of day as known then (`features.loans_as_known`: outcomes delivered
  later are not used) whose outcome window has passed (`[label] outcome_window_days`), split out
  of time (train, then validation, then test dates); scoring follows `[scoring] population`.
- cross-sectional book (no date column): every delivery is a snapshot of the whole book, dated
  by its ingest day. Training uses the labelled rows of the latest snapshot, split by a hash
  of the loan id (a loan keeps its set as the book grows).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import cache, partial

import numpy as np
import pandas as pd

from finpipe import lifecycle
from finpipe.credit import plots
from finpipe.credit.config import DATE_COLUMN, LoanBookConfig
from finpipe.credit.contract import active_loan_book, credit_contract
from finpipe.credit.features import (
    LABEL,
    credit_feature_definition,
    load_training_frame,
    nothing_to_score_reason,
    scoring_population,
    update_credit_features,
)
from finpipe.credit.metrics import (
    auc_standard_error,
    credit_metrics,
    global_importance,
    scoring_report,
    stability_populations,
)
from finpipe.credit.model import (
    CreditTrainingConfig,
    FitWindow,
    RowSplit,
    fit_loan_book_model,
    split_rows,
)
from finpipe.credit.schema import DOMAIN
from finpipe.credit.synthetic import ORACLE, plan_credit_demo
from finpipe.credit.synthetic import write_oracle as write_oracle
from finpipe.domains import ChallengerOutcome, DemoNight, Domain
from finpipe.errors import ScoringError
from finpipe.ingest import RawContract
from finpipe.input_examples import stand_in_example
from finpipe.lifecycle import Candidate, Predictions, RunRecord, TrainingData
from finpipe.promotion import ComparedOn
from finpipe.settings import Settings
from finpipe.storage import Storage, as_day
from finpipe.tracking import RegisteredModel

log = logging.getLogger("finpipe.credit")

MODEL_LOADER = "finpipe.credit.model:FittedCreditModel"


def _auc_error(validation: Mapping[str, float], auc: float) -> float | None:
    """The standard error of `auc` on the validation window's class counts (None: one class
    only, no AUC to measure against)."""
    defaults = int(round(validation["default_rate"] * validation["n"]))
    error = auc_standard_error(auc, defaults, int(validation["n"]) - defaults)
    return error if np.isfinite(error) else None


def chance_auc_floor(validation: Mapping[str, float]) -> dict[str, float]:
    """The bar every credit model must clear (`lifecycle.floor_refusal`): a validation AUC above
    a coin flip's 0.5 by one standard error of a coin flip's AUC on the same window, so a first
    model that learnt nothing (a book too small or too noisy) never becomes champion."""
    error = _auc_error(validation, 0.5)
    return {} if error is None else {"auc_floor_chance": 0.5 + error}


def state_auc_floor(fitted: Mapping[str, Candidate]) -> dict[str, float]:
    """State the logistic baseline's validation AUC less one standard error of it as a floor on
    every candidate (`lifecycle.state_baseline_floor`). The candidate with the best validation
    AUC is the one chosen, so with the baseline among them this bar never refuses: it records
    how far above the baseline the choice is; `chance_auc_floor` is the bar that refuses."""
    return lifecycle.state_baseline_floor(
        fitted, "logistic", "auc", "logistic_baseline", lambda v: _auc_error(v, v["auc"])
    )


# -- training ------------------------------------------------------------------------------
@dataclass
class CreditTrainingOutcome(ChallengerOutcome):
    """What a nightly retrain produced: the challenger, its metrics and the split behind them."""

    split: str  # "out_of_time" or "by_loan_id"
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


def split_book_rows(
    frame: pd.DataFrame,
    book: LoanBookConfig,
    how: CreditTrainingConfig | CreditTrainingOutcome,
) -> RowSplit:
    """Return `split_rows` of `frame` with the fractions, embargo and seed of `how` (a training
    config, or the outcome that recorded them, so promotion rebuilds the very same split),
    purging loans whose outcome window (the book's) reaches into the next window."""
    split = split_rows(
        frame,
        id_column=book.columns.id,
        dated=book.is_dated,
        validation_fraction=how.validation_fraction,
        test_fraction=how.test_fraction,
        embargo_days=how.embargo_days,
        seed=how.seed,
        outcome_window_days=book.label.outcome_window_days,
    )
    if split.purged:
        log.info(
            "credit split: %d loans purged from train and validation, their %d-day outcome "
            "window reaching into the next window",
            split.purged,
            book.label.outcome_window_days,
        )
    return split


@dataclass
class CreditNight(lifecycle.Night[CreditTrainingConfig]):
    """One night's credit training set: the labelled rows, their split and the population."""

    book: LoanBookConfig
    frame: pd.DataFrame
    split: RowSplit
    population: pd.DataFrame
    oracle: float | None

    def context(self) -> RunRecord:
        frame, split, book = self.frame, self.split, self.book
        test_dates = frame.loc[split.test, DATE_COLUMN]
        first, last = frame[DATE_COLUMN].min().date(), frame[DATE_COLUMN].max().date()
        return RunRecord(
            params={
                "loan_book": book.name,
                "loan_book_config": book.source,
                "outcome_window_days": book.label.outcome_window_days,
                "split": split.kind,
                "split_purged_rows": split.purged,
                "train_rows": int(split.train.sum()),
                "validation_rows": int(split.validation.sum()),
                "test_rows": int(split.test.sum()),
                "test_start": str(test_dates.min().date()),
                "test_end": str(test_dates.max().date()),
                "scoring_rows": len(self.population),
            },
            documents={"loan_book.json": book.model_dump(mode="json")},
            data=TrainingData(
                frame,
                source=f"features/{DOMAIN}/date={first}..{last}",
                name=f"{DOMAIN}-{book.name}-{first}-to-{last}",
                targets=LABEL,
            ),
        )

    def candidates(self) -> list[str]:
        return list(self.config.models)

    def fit(self, kind: str, on_epoch: lifecycle.EpochLogger, say: lifecycle.Say) -> Candidate:
        frame, split, book = self.frame, self.split, self.book
        say(f"training {kind} on {int(split.train.sum()):,} rows ({split.kind} split)")
        classifier = self.config.classifier_config(kind)
        fitted = fit_loan_book_model(
            frame,
            book,
            train=split.train,
            validation=split.validation,
            config=classifier,
            on_epoch=on_epoch,
        )
        fitted.fit_window = FitWindow.of(
            frame,
            split,
            dated=book.is_dated,
            validation_fraction=self.config.validation_fraction,
            test_fraction=self.config.test_fraction,
            seed=self.config.seed,
        )
        labels = frame[LABEL].to_numpy()
        test_rows = frame.loc[split.test]
        test_pd = fitted.predict_pd(test_rows)
        windows = {
            "validation": credit_metrics(
                labels[split.validation], fitted.predict_pd(frame.loc[split.validation])
            ),
            "test": credit_metrics(labels[split.test], test_pd),
        }
        windows["validation"].update(chance_auc_floor(windows["validation"]))
        if self.oracle is not None:
            windows["test"]["oracle_auc"] = self.oracle
        importance = global_importance(fitted, test_rows)
        population = self.population
        stability = fitted.population_stability(population) if len(population) else {}
        documents: dict[str, Mapping[str, object]] = {"feature_importance.json": importance}
        if stability:  # the values, and which two populations they compare
            documents["population_stability.json"] = {
                "psi": stability,
                **stability_populations(
                    fitted,
                    f"this {kind} model",
                    f"loans to score on {self.as_of.isoformat()}",
                    len(population),
                ),
            }
        say(
            f"{kind}: validation AUC {windows['validation']['auc']:.4f}, test AUC "
            f"{windows['test']['auc']:.4f}, KS {windows['test']['ks']:.3f}, best epoch "
            f"{fitted.best_epoch}"
        )
        return Candidate(
            model=fitted,
            loader=MODEL_LOADER,
            input_example=stand_in_example(
                frame.loc[split.train], book.columns.id, book.feature_columns
            ),
            windows=windows,
            record=RunRecord(
                params={**asdict(classifier), "loan_book": book.name},
                metrics={
                    "best_epoch": fitted.best_epoch,
                    "calibration_a": fitted.calibration[0],
                    "calibration_b": fitted.calibration[1],
                    "reference_pd": fitted.reference_pd(),
                    **{f"psi_{name}": value for name, value in stability.items()},
                },
                documents=documents,
                figures=plots.candidate_figures(kind, labels[split.test], test_pd, importance),
            ),
            test_predictions=test_pd,
        )

    def conclude(self, fitted: Mapping[str, Candidate], say: lifecycle.Say) -> RunRecord:
        """The models' test ROC curves in one figure (side by side), the oracle's AUC and the
        promotion floor."""
        labels = self.frame.loc[self.split.test, LABEL].to_numpy()
        curves = {
            kind: (labels, c.test_predictions)
            for kind, c in fitted.items()
            if c.test_predictions is not None
        }
        if self.oracle is not None:
            say(f"oracle AUC on the test rows: {self.oracle:.4f}")
        metrics = {} if self.oracle is None else {"test_oracle_auc": self.oracle}
        metrics.update(state_auc_floor(fitted))
        return RunRecord(
            metrics=metrics,
            figures={"plots/roc_models.png": plots.roc(curves, "test ROC")},
        )

    def outcome(self, challenger: ChallengerOutcome) -> CreditTrainingOutcome:
        frame, split, config = self.frame, self.split, self.config
        test_dates = frame.loc[split.test, DATE_COLUMN]
        return CreditTrainingOutcome(
            **challenger.to_dict(),
            split=split.kind,
            validation_fraction=config.validation_fraction,
            test_fraction=config.test_fraction,
            embargo_days=config.embargo_days,
            seed=config.seed,
            test_rows=int(split.test.sum()),
            test_start=str(test_dates.min().date()),
            test_end=str(test_dates.max().date()),
            train_rows=int(split.train.sum()),
            first_date=str(frame[DATE_COLUMN].min().date()),
            last_date=str(frame[DATE_COLUMN].max().date()),
        )


def _oracle(storage: Storage, ids: pd.Series, labels: pd.Series) -> float | None:
    """Return the AUC of the true PDs on the test rows, when a synthetic oracle is present."""
    if labels.nunique() < 2:
        return None
    truth = storage.read_reference(DOMAIN, ORACLE)
    if truth is None:
        return None
    true_pd = truth.set_index("id")["true_pd"].reindex(ids.astype(str).to_numpy()).to_numpy()
    if np.isnan(true_pd).any():
        return None
    return credit_metrics(labels.to_numpy(), true_pd)["auc"]


def comparison_rows(
    test: pd.DataFrame, champion: RegisteredModel | None, id_column: str
) -> pd.DataFrame:
    """Return the `test` rows the champion's model never trained or was validated on (its
    `fit_window`), as `lifecycle.rows_the_champion_never_learnt` says."""

    def learnt(champion: RegisteredModel) -> lifecycle.LearntRows | None:
        window: FitWindow | None = champion.model.fit_window
        if window is None:
            return None
        return lifecycle.LearntRows(
            window.covers(test, id_column),
            f"its split: {window.split} up to {window.last_date or 'its snapshot'}, "
            f"test fraction {window.test_fraction}, seed {window.seed}",
        )

    kept = lifecycle.rows_the_champion_never_learnt(
        test, champion, learnt, unit="test loan", units=len, logger=log
    )
    return kept if kept is test else kept.reset_index(drop=True)


# -- the domain ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CreditParts:
    """The credit domain's own parts for one loan book (`credit_domain` binds them to it);
    `finpipe.lifecycle` runs them."""

    name: str = DOMAIN
    training_config: type[CreditTrainingConfig] = CreditTrainingConfig
    training_outcome: type[CreditTrainingOutcome] = CreditTrainingOutcome
    selection_metric: str = "auc"  # validation AUC picks the candidate
    nested_runs: bool = True
    scores_history: bool = True  # open loans of every earlier day
    book: LoanBookConfig  # every step reads, trains and scores the files this book describes
    contract: RawContract  # ingest's checks of the book's files
    update_features: lifecycle.FeatureStep

    @property
    def feature_definition(self) -> dict[str, object]:
        return credit_feature_definition(self.book)

    def prepare_training(
        self,
        storage: Storage,
        as_of: dt.date,
        config: CreditTrainingConfig,
        champion: Callable[[], RegisteredModel | None],
    ) -> CreditNight:
        frame = load_training_frame(storage, self.book, as_of)
        split = split_book_rows(frame, self.book, config)
        population = scoring_population(storage, self.book, as_of)
        test = frame.loc[split.test]
        oracle = _oracle(storage, test[self.book.columns.id], test[LABEL])
        return CreditNight(storage, as_of, config, self.book, frame, split, population, oracle)

    def promotion_scorer(
        self,
        storage: Storage,
        outcome: CreditTrainingOutcome,
        champion: Callable[[], RegisteredModel | None],
    ) -> lifecycle.JudgedScore:
        """Return a model's promotion metric on the outcome's test rows that the champion
        never trained or was validated on (`comparison_rows`), and how many of them that is.

        The test rows are rebuilt from the outcome's split parameters over the same data, so the
        challenger never trained or was selected on them. A champion trained under other split
        settings (another test fraction, seed or split kind) may have learnt from some of them;
        those are left out for both models, so both are measured on the same loans. The rows
        are settled on the first score, with the champion `champion` loads then (promotion
        scores under the champion lock, so it is the champion being compared).
        """
        frame = load_training_frame(storage, self.book, as_day(outcome.as_of))
        split = split_book_rows(frame, self.book, outcome)
        test = frame.loc[split.test].reset_index(drop=True)
        if len(test) != outcome.test_rows:
            raise ScoringError(
                f"the test rows of run {outcome.run_id} cannot be rebuilt ({len(test)} rows now, "
                f"{outcome.test_rows} at training): data up to {outcome.as_of} changed; retrain"
            )

        @cache
        def judged() -> pd.DataFrame:
            return comparison_rows(test, champion(), self.book.columns.id)

        def score(model: RegisteredModel) -> float:
            rows = judged()
            return float(
                credit_metrics(rows[LABEL].to_numpy(), model.model.predict_pd(rows))[
                    outcome.promotion_metric
                ]
            )

        def compared_on() -> ComparedOn:
            return ComparedOn(len(judged()), len(test), "test loan")

        return lifecycle.JudgedScore(score, compared_on)

    def learnt_through(self, model: RegisteredModel) -> dt.date | None:
        """Return the last date of `model`'s fit window (`FitWindow.last_date`): loans dated up
        to it may be among those it trained or was validated on (all of them out of time, those
        of its training and validation ids by loan id). None for a book without dates or a
        model saved before finpipe recorded its window."""
        window: FitWindow | None = model.model.fit_window
        if window is None or window.last_date is None:
            return None
        return dt.date.fromisoformat(window.last_date)

    def prepare_scoring(self, storage: Storage, as_of: dt.date) -> lifecycle.Predict:
        """Return how the champion scores the population (see `scoring_population`): id, PD, grade,
        three reason codes and the row's own date. An empty population is scored as no rows,
        with the reason (`nothing_to_score_reason`) for the run to warn about.

        The scoring report holds population stability (PSI of the score and of each feature
        against the champion's training rows) and the categories never seen in training (scored
        through the unknown bucket).
        """
        population = scoring_population(storage, self.book, as_of)

        def predict(champion: RegisteredModel) -> Predictions:
            fitted = champion.model
            missing = [
                c for c in [fitted.id_column, *fitted.feature_columns] if c not in population
            ]
            if missing:
                raise ScoringError(
                    f"credit features lack {missing} that champion v{champion.version} needs; the "
                    "loan-book config changed since it was trained: retrain"
                )
            predicted = fitted.predict(population).reset_index(drop=True)
            predicted.insert(1, "record_date", population[DATE_COLUMN].to_numpy())
            report = scoring_report(as_of, champion, population, predicted["pd"])
            return Predictions(
                predicted,
                sort_by=["record_date", "id"],
                report=report,
                empty_reason=nothing_to_score_reason(storage, self.book, as_of)
                if predicted.empty
                else None,
            )

        return predict

    def plan_demo(self, settings: Settings) -> list[DemoNight]:
        return plan_credit_demo(settings, book=self.book)


def credit_domain(book: LoanBookConfig) -> Domain:
    """Return the credit domain with every step bound to the loan book `book`."""
    features = partial(update_credit_features, book=book)
    parts = CreditParts(book=book, contract=credit_contract(book), update_features=features)
    return lifecycle.bind(parts)


def __getattr__(name: str) -> Domain:
    # `CREDIT` is read from the settings on every access, so it follows FINPIPE_CREDIT_CONFIG.
    if name == "CREDIT":
        return credit_domain(active_loan_book())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
