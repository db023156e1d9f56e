"""The market domain's own parts, run by the shared lifecycle (`finpipe.lifecycle`).

A training night that fits the configured models (nets, boosted trees) on an embargoed time
split, then their ensemble when asked, measures and explains each candidate on the test window
(`finpipe.market.evaluation`), picks one on validation IC and reports the planted signal's IC
when a synthetic panel kept one; promotion on the test window's IC, over the dates the champion
never learnt from; scoring of one date's tickers, each row with the three features that moved
its score most. The raw contract ingest checks deliveries against is
`finpipe.market.contract`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pandas as pd

from finpipe import lifecycle, plots
from finpipe.domains import ChallengerOutcome, DemoNight
from finpipe.errors import ScoringError
from finpipe.ingest import RawContract
from finpipe.lifecycle import Candidate, Predictions, RunRecord, TrainingData
from finpipe.market.boosted import FittedMarketBoostedTrees
from finpipe.market.candidates import MarketMember, fit_member, member_loader, member_params
from finpipe.market.contract import MARKET_CONTRACT
from finpipe.market.ensemble import fit_ensemble
from finpipe.market.evaluation import (
    IMPORTANCE_TABLE,
    MarketModel,
    ShuffledPredictions,
    candidate_figures,
    members_table,
    naive_ic_floor,
    oracle_ic,
    test_window_importance,
    window_metrics,
)
from finpipe.market.features import (
    KEY_COLUMNS,
    feature_columns_of,
    load_training_frame,
    market_feature_inputs,
    market_feature_rows_before,
    read_with_lookback,
    update_market_features,
)
from finpipe.market.model import BOOSTED, ENSEMBLE, MarketTrainingConfig
from finpipe.market.schema import DOMAIN
from finpipe.market.synthetic import plan_market_demo
from finpipe.market.synthetic import write_oracle as write_oracle
from finpipe.metrics import market_metrics
from finpipe.promotion import ComparedOn
from finpipe.settings import Settings
from finpipe.storage import Storage, as_day
from finpipe.text import counted
from finpipe.tracking import RegisteredModel
from finpipe.training import TimeSplit, time_split

log = logging.getLogger("finpipe.market")

ENSEMBLE_LOADER = "finpipe.market.ensemble:FittedMarketEnsemble"


# -- training ------------------------------------------------------------------------------
@dataclass
class TrainingOutcome(ChallengerOutcome):
    """What a nightly retrain produced: the registered challenger and the windows it used."""

    horizon: int
    label: str
    test_start: str
    test_end: str
    train_rows: int
    first_date: str
    last_date: str


@dataclass
class MarketNight(lifecycle.Night[MarketTrainingConfig]):
    """One night's market training set: the labelled panel and its embargoed time split."""

    frame: pd.DataFrame
    features: list[str]
    split: TimeSplit
    embargo: int
    # The nets fitted so far, their predictions on every row of `frame` and on each shuffle of
    # the importance window: the ensemble, fitted last, combines them.
    nets: dict[str, MarketMember] = field(default_factory=dict)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    shuffled_predictions: ShuffledPredictions = field(default_factory=dict)

    def context(self) -> RunRecord:
        frame, split, config = self.frame, self.split, self.config
        first, last = frame["date"].min().date(), frame["date"].max().date()
        windows = {
            f"{name}_{end}": str(dates[index].date())
            for name, dates in (
                ("train", split.train_dates),
                ("validation", split.validation_dates),
                ("test", split.test_dates),
            )
            for end, index in (("start", 0), ("end", -1))
        }
        return RunRecord(
            params={"embargo_effective": self.embargo, "n_features": len(self.features), **windows},
            data=TrainingData(
                frame[[*KEY_COLUMNS, *self.features, config.label]],
                source=f"features/{DOMAIN}/date={first}..{last}",
                name=f"{DOMAIN}-features-{first}-to-{last}",
                targets=config.label,
            ),
            documents={"feature_columns.json": {"feature_columns": self.features}},
        )

    @property
    def train_rows(self) -> int:
        """The rows a candidate fits: the labelled ones of the train dates (not the validation
        and test rows, nor those whose label is not known: a ticker delisted since)."""
        frame = self.frame
        return int(
            (frame["date"].isin(self.split.train_dates) & frame[self.config.label].notna()).sum()
        )

    def learnt_through(self) -> str:
        """The last date whose price tonight's candidates learnt from (`learnt_through`)."""
        return learnt_through(self.frame["date"], self.split, self.config.horizon)

    def candidates(self) -> list[str]:
        """The nets in the configured order, then the ensemble of them when asked for."""
        nets: list[str] = [kind for kind in self.config.models if kind != ENSEMBLE]
        return nets + [ENSEMBLE] * (ENSEMBLE in self.config.models)

    def fit(self, kind: str, on_epoch: lifecycle.EpochLogger, say: lifecycle.Say) -> Candidate:
        if kind == ENSEMBLE:
            return self.fit_ensemble(say)
        frame, features, config = self.frame, self.features, self.config
        dates = counted(len(self.split.train_dates), "train date")
        # Only the first of seed-averaged nets logs its epochs: say that the others follow, or
        # their minutes of training read as a hang.
        seeds = 1 if kind == BOOSTED else config.train_config(kind).seeds
        averaged = (
            f" ({seeds} nets from seeds {config.seed}-{config.seed + seeds - 1}, averaged; "
            "epoch lines are the first's)"
            if seeds > 1
            else ""
        )
        say(
            f"training {kind}{averaged} on {self.train_rows:,} rows over {dates}, "
            f"{len(features)} features"
        )
        fitted = fit_member(kind, frame, features, self.split, config, on_epoch)
        fitted.learnt_through = self.learnt_through()
        scored = frame[[*KEY_COLUMNS, config.label]].merge(
            fitted.predict(frame), on=KEY_COLUMNS, how="left"
        )
        self.nets[kind], self.predictions[kind] = fitted, scored["prediction"].to_numpy()
        # The trees' best round is their highest validation IC, not their lowest loss: their
        # losses by round are the run's metrics, not a curve marking another round as best.
        curve, metrics = {}, {"best_epoch": float(fitted.best_epoch)}
        if isinstance(fitted, FittedMarketBoostedTrees):
            metrics["best_round_validation_ic"] = fitted.selection["best_round_validation_ic"]
        else:
            title = f"{kind}: loss by epoch"
            curve = {"plots/learning_curve.png": plots.learning_curve(fitted.history, title)}
            if fitted.learning_rate is not None:  # what it trained at (scaled on a large panel)
                metrics["learning_rate_applied"] = fitted.learning_rate
        candidate = self.measure(
            kind,
            fitted,
            member_loader(kind),
            scored,
            RunRecord(
                params={**member_params(kind, config), "label": config.label},
                metrics=metrics,
                figures=curve,
            ),
        )
        windows = candidate.windows
        if isinstance(fitted, FittedMarketBoostedTrees) and "validation_ic" in fitted.selection:
            # Their kept round is their highest validation IC: the IC that competes is the
            # cross-fitted one (see finpipe.market.boosted).
            windows["validation"]["ic"] = fitted.selection["validation_ic"]
        say(
            f"{kind}: validation IC {windows['validation']['ic']:.4f}, "
            f"test IC {windows['test']['ic']:.4f}, best epoch {fitted.best_epoch}"
        )
        return candidate

    def fit_ensemble(self, say: lifecycle.Say) -> Candidate:
        """The ensemble of the nets fitted before it, weighted on the validation window; its run
        logs each member's validation and test IC beside its own."""
        frame, split, config = self.frame, self.split, self.config
        label = config.label
        members = {kind: self.nets[kind] for kind in self.candidates() if kind in self.nets}
        member_scores = frame[[*KEY_COLUMNS, label]].assign(
            **{kind: self.predictions[kind] for kind in members}
        )
        ensemble = fit_ensemble(
            members,
            member_scores,
            split.validation_dates,
            label=label,
            horizon=config.horizon,
        )
        ensemble.learnt_through = self.learnt_through()
        prediction, _ = ensemble.combine(member_scores)
        scored = member_scores.assign(prediction=prediction)
        table = members_table(scored, members, ensemble, split, label)
        side_by_side = {
            f"member_{row.candidate}_{window}_ic": getattr(row, f"{window}_ic")
            for row in table.itertuples()
            for window in ("validation", "test")
        }
        record = RunRecord(
            params={
                "members": ",".join(members),
                "combination": ensemble.combination,
                **{f"weight_{kind}": round(w, 6) for kind, w in ensemble.weights.items()},
                "label": label,
            },
            metrics={**ensemble.selection, **side_by_side},
            tables={"ensemble/members.json": table},
        )
        candidate = self.measure(ENSEMBLE, ensemble, ENSEMBLE_LOADER, scored, record, z_units=True)
        windows = candidate.windows
        # Stacked weights were fitted on the validation window: the IC that competes with the
        # members' is the cross-fitted one (see finpipe.market.ensemble).
        windows["validation"]["ic"] = ensemble.selection["validation_ic"]
        say(
            f"ensemble ({ensemble.combination} of {', '.join(members)}): validation IC "
            f"{windows['validation']['ic']:.4f}, test IC {windows['test']['ic']:.4f}; members' "
            "test IC "
            + ", ".join(
                f"{row.candidate} {row.test_ic:.4f}"
                for row in table.itertuples()
                if row.candidate != ENSEMBLE  # the table's last row: its own, given above
            )
        )
        return candidate

    def measure(
        self,
        kind: str,
        model: MarketModel,
        loader: str,
        scored: pd.DataFrame,
        record: RunRecord,
        *,
        z_units: bool = False,
    ) -> Candidate:
        """Return `model` as a candidate: its metrics on the validation and test rows of
        `scored` (RMSE in z units with `z_units`), its validation IC floor (`naive_ic_floor`),
        and its permutation importance and figures added to `record`."""
        split, label = self.split, self.config.label
        validation = scored[scored["date"].isin(split.validation_dates)]
        test = scored[scored["date"].isin(split.test_dates)]
        windows = {
            "validation": window_metrics(validation, self.config, zscore_units=z_units),
            "test": window_metrics(test, self.config, zscore_units=z_units),
        }
        features = self.frame[self.frame["date"].isin(split.validation_dates)]
        windows["validation"].update(naive_ic_floor(validation, features, label))
        importance = test_window_importance(
            kind, model, self.frame, self.features, split, self.config, self.shuffled_predictions
        )
        record.tables = {**record.tables, IMPORTANCE_TABLE: importance}
        record.figures = {**record.figures, **candidate_figures(test, label, kind, importance)}
        example = input_example(self.frame, self.features, split.test_dates[-1], model.history_rows)
        return Candidate(model, loader, example, windows, record, test["prediction"].to_numpy())

    def conclude(self, fitted: Mapping[str, Candidate], say: lifecycle.Say) -> RunRecord:
        """Every candidate's validation and test IC side by side (`candidates.json`), the
        boosted trees' floor (`boosted_trees_floor`) and the planted signal's IC on the test
        window, when a synthetic oracle is present."""
        floor = boosted_trees_floor(fitted)
        tables = {"candidates.json": lifecycle.compare_candidates(fitted, ("ic", "rank_ic"))}
        test_window = self.frame[self.frame["date"].isin(self.split.test_dates)]
        oracle = oracle_ic(self.storage, test_window, self.config.label)
        if oracle is None:
            return RunRecord(metrics=floor, tables=tables)
        say(f"oracle IC on the test window: {oracle:.4f}")
        metrics = {**floor, "test_oracle_ic": oracle}
        for kind, candidate in fitted.items():
            metrics[f"{kind}_ic_to_oracle"] = candidate.windows["test"]["ic"] / oracle
            candidate.windows["test"]["oracle_ic"] = oracle
        return RunRecord(metrics=metrics, tables=tables)

    def outcome(self, challenger: ChallengerOutcome) -> TrainingOutcome:
        frame, split = self.frame, self.split
        return TrainingOutcome(
            **challenger.to_dict(),
            horizon=self.config.horizon,
            label=self.config.label,
            test_start=str(split.test_dates[0].date()),
            test_end=str(split.test_dates[-1].date()),
            train_rows=self.train_rows,
            first_date=str(frame["date"].min().date()),
            last_date=str(frame["date"].max().date()),
        )


def learnt_through(dates: pd.Series, split: TimeSplit, horizon: int) -> str:
    """Return the last date (ISO) whose price a model fitted on `split` learnt from: the
    `horizon`-th of the panel's `dates` after its last validation date (the panel's last date
    when fewer follow), since the label at t is the return from t to t + h sessions. A later
    promotion never judges the model on a date up to it (`comparison_window`), whatever split
    settings that night uses."""
    sessions = pd.DatetimeIndex(np.sort(dates.unique()))
    last_fit = split.validation_dates[-1]  # validation follows every train date
    position = min(sessions.searchsorted(last_fit) + horizon, len(sessions) - 1)
    return str(sessions[position].date())


def _dates_in(rows: pd.DataFrame) -> int:
    return int(rows["date"].nunique())  # promotion counts market's test rows in dates


def comparison_window(test_window: pd.DataFrame, champion: RegisteredModel | None) -> pd.DataFrame:
    """Return the rows of `test_window` dated after the champion's `learnt_through` (the dates
    it never trained or was validated on, nor read a label's price from), as
    `lifecycle.rows_the_champion_never_learnt` says."""

    def learnt(champion: RegisteredModel) -> lifecycle.LearntRows | None:
        through = champion.model.learnt_through
        if through is None:
            return None
        return lifecycle.LearntRows(
            (test_window["date"] <= pd.Timestamp(through)).to_numpy(),
            f"its labels read prices through {through}",
        )

    return lifecycle.rows_the_champion_never_learnt(
        test_window,
        champion,
        learnt,
        unit="test date",
        units=_dates_in,
        logger=log,
    )


def input_example(
    frame: pd.DataFrame, features: list[str], day: pd.Timestamp, history_rows: int, tickers: int = 5
) -> pd.DataFrame:
    """The logged model's input example: the feature rows of the first `tickers` tickers of
    `day`, each with the `history_rows - 1` rows before it that a sequence model's window
    reads (none for a model of one row), so the pyfunc predicts `day` from its own example as
    scoring does (`prepare_scoring`)."""
    names = frame.loc[frame["date"] == day, "ticker"].head(tickers)
    rows = frame[frame["ticker"].isin(names) & (frame["date"] <= day)]
    rows = rows.sort_values(["date", "ticker"], kind="stable").groupby("ticker").tail(history_rows)
    return rows[[*KEY_COLUMNS, *features]]


def boosted_trees_floor(fitted: Mapping[str, Candidate]) -> dict[str, float]:
    """State the gradient-boosted baseline as a promotion floor on every candidate, as credit
    states its logistic baseline: the trees' validation IC less one standard error of their
    mean daily IC (`lifecycle.state_baseline_floor`)."""
    return lifecycle.state_baseline_floor(
        fitted, BOOSTED, "ic", "boosted_trees", lambda v: v["ic_floor_standard_error"]
    )


@dataclass(frozen=True)
class MarketParts:
    """The market domain's own parts; `finpipe.lifecycle` runs them."""

    name: str = DOMAIN
    contract: RawContract = MARKET_CONTRACT
    update_features: lifecycle.FeatureStep = update_market_features
    training_config: type[MarketTrainingConfig] = MarketTrainingConfig
    training_outcome: type[TrainingOutcome] = TrainingOutcome
    selection_metric: str = "ic"  # validation IC picks the candidate
    nested_runs: bool = True
    scores_history: bool = False  # the lookback is in each date's features

    @property
    def feature_definition(self) -> dict[str, object]:
        return {}  # the code alone defines market's features

    def prepare_training(
        self,
        storage: Storage,
        as_of: dt.date,
        config: MarketTrainingConfig,
        champion: Callable[[], RegisteredModel | None],
    ) -> MarketNight:
        """Return the labelled panel known at `as_of` and its train/validation/test split, with an
        embargo of at least the horizon between windows (labels look h days ahead)."""
        frame = load_training_frame(
            storage, as_of, config.horizon, config.history_start, history_dates=config.history_dates
        )
        if config.history_dates:
            keep = np.sort(frame["date"].unique())[-config.history_dates :]
            frame = frame[frame["date"].isin(keep)].reset_index(drop=True)
        labelled = frame.loc[frame[config.label].notna(), "date"].unique()
        embargo = max(config.embargo or config.horizon, config.horizon)
        split = time_split(
            pd.DatetimeIndex(np.sort(labelled)),
            validation_fraction=config.validation_fraction,
            test_fraction=config.test_fraction,
            embargo=embargo,
        )
        return MarketNight(storage, as_of, config, frame, feature_columns_of(frame), split, embargo)

    def promotion_scorer(
        self,
        storage: Storage,
        outcome: TrainingOutcome,
        champion: Callable[[], RegisteredModel | None],
    ) -> lifecycle.JudgedScore:
        """Return a model's promotion metric on the outcome's test dates that the champion
        never learnt from (`comparison_window`), rebuilt from storage with the history before
        them that a sequence model's lookback reads, and how many of them that is.

        The challenger's embargoed split keeps it off its test window. A champion fitted under
        other settings (a later train end, another validation or test fraction, horizon or
        embargo) may have trained or been validated on some of those dates; they are left out
        for both models, so both are measured on the same dates. The dates are settled on the
        first score, with the champion `champion` loads then (promotion scores under the
        champion lock, so it is the champion being compared).
        """
        test_start, test_end = as_day(outcome.test_start), as_day(outcome.test_end)
        context_start = test_start - dt.timedelta(days=400)  # room for any sequence lookback
        frame = load_training_frame(storage, as_day(outcome.as_of), outcome.horizon, context_start)
        in_test = (frame["date"] >= pd.Timestamp(test_start)) & (
            frame["date"] <= pd.Timestamp(test_end)
        )
        test_window = frame.loc[in_test, [*KEY_COLUMNS, outcome.label]]
        inputs = frame.drop(columns=[outcome.label, f"direction_{outcome.horizon}d"])

        @cache
        def judged() -> pd.DataFrame:
            return comparison_window(test_window, champion())

        def score(model: RegisteredModel) -> float:
            scored = judged().merge(model.predict(inputs), on=KEY_COLUMNS)
            return float(market_metrics(scored, label=outcome.label)[outcome.promotion_metric])

        def compared_on() -> ComparedOn:
            return ComparedOn(_dates_in(judged()), _dates_in(test_window), "test date")

        return lifecycle.JudgedScore(score, compared_on)

    def learnt_through(self, model: RegisteredModel) -> dt.date | None:
        """Return the last date whose price `model`'s training or validation labels read (its
        recorded `learnt_through`); None for a model saved before finpipe recorded it."""
        through: str | None = model.model.learnt_through
        return None if through is None else dt.date.fromisoformat(through)

    def prepare_scoring(self, storage: Storage, as_of: dt.date) -> lifecycle.Predict:
        """Return how the champion scores every ticker of `as_of`.

        The champion sees the feature rows of the last few dates (its sequence lookback) up to
        `as_of` only.
        """
        if not storage.exists(storage.partition_key("features", DOMAIN, as_of)):
            raise ScoringError(f"no feature partition for {as_of}; run the features step first")

        def predict(champion: RegisteredModel) -> Predictions:
            fitted: MarketModel = champion.model
            # The sequence window: each ticker's previous `history_rows` rows, however long
            # ago it last traded, as training and the backtest read them.
            days = storage.partition_dates("features", DOMAIN, end=as_of)
            window = days[-(fitted.history_rows + 1) :]
            features = read_with_lookback(
                storage, "features", days, window, as_of, fitted.history_rows
            )
            # A column absent from the as-of partition would arrive as NaN after the concat and be
            # silently imputed: refuse it, as the model's signature would for a missing column.
            today = features[features["date"] == pd.Timestamp(as_of)]
            missing = [
                c for c in fitted.feature_columns if c not in today.columns or today[c].isna().all()
            ]
            if missing:
                raise ScoringError(
                    f"features for {as_of} lack {missing} (missing or all empty) that champion "
                    f"v{champion.version} needs; {_refill_advice(storage, as_of, missing)}"
                )
            # Earlier dates are window history only: the net runs on the as-of rows alone,
            # and each row gets the three features that moved its score most (reason_k).
            predicted = fitted.explain(features, score_from=pd.Timestamp(as_of))
            today = predicted.loc[predicted["date"] == pd.Timestamp(as_of)]
            return Predictions(today.drop(columns="date"), sort_by=["ticker"])

        return predict

    def plan_demo(self, settings: Settings) -> list[DemoNight]:
        return plan_market_demo(settings)


def _refill_advice(storage: Storage, as_of: dt.date, missing: list[str]) -> str:
    """Say how the features `missing` at `as_of` come back: the days of their windows whose
    delivery lacked the raw columns they read (corrections deliver them), or a rebuild."""
    reach: dict[str, int] = {}  # each raw column: how many days before as_of it is read
    for name in missing:
        for column in market_feature_inputs(name):
            reach[column] = max(reach.get(column, 0), market_feature_rows_before(name))
    days = storage.partition_dates("validated", DOMAIN, end=as_of)
    days = days[-(max(reach.values(), default=0) + 1) :]
    if not days or days[-1] != as_of:  # retracted whole since its features were built
        return "rebuild features or retrain"
    rows = storage.read_partitions("validated", DOMAIN, days=days)
    lacking: dict[dt.date, list[str]] = {}
    for day, delivered in rows.groupby("date", sort=True):
        back = len(days) - 1 - days.index(as_day(day))  # sessions before as_of
        gone = [
            c
            for c, limit in reach.items()
            if back <= limit and (c not in delivered or delivered[c].isna().all())
        ]
        if gone:
            lacking[as_day(day)] = gone
    if not lacking:
        return "rebuild features or retrain"
    named = "; ".join(f"{day} has no {', '.join(gone)}" for day, gone in lacking.items())
    which = "the day" if list(lacking) == [as_of] else "those days"
    return (
        f"the deliveries their windows read lack those columns ({named}): deliver {which} "
        f"with them as corrections (finpipe ingest market FILE --correction), then re-score "
        f"(finpipe status names the backfill)"
    )


MARKET = lifecycle.bind(MarketParts())
train_market, promote_market, score_market = MARKET.train, MARKET.promote, MARKET.score
