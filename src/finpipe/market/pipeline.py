"""The market domain's own parts, run by the shared lifecycle (`finpipe.lifecycle`).

The raw contract; a training night that fits the configured nets (MLP, GRU, temporal CNN) on an
embargoed time split, then their ensemble when asked, explains each candidate (permutation
importance on the test window), picks one on validation IC and reports the planted signal's IC
when a synthetic panel kept one; promotion on the test window's IC; scoring of one date's
tickers, each row with the three features that moved its score most.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from finpipe import lifecycle, plots
from finpipe.attribution import Shuffle, permutation_importance
from finpipe.domains import ChallengerOutcome, DemoNight
from finpipe.errors import ScoringError
from finpipe.features import FeatureUpdate
from finpipe.ingest import RawContract
from finpipe.lifecycle import Candidate, Predictions, RunRecord, TrainingData
from finpipe.market.boosted import FittedMarketBoostedTrees
from finpipe.market.candidates import MarketMember, fit_member, member_loader, member_params
from finpipe.market.ensemble import FittedMarketEnsemble, fit_ensemble
from finpipe.market.features import (
    KEY_COLUMNS,
    feature_columns_of,
    load_training_frame,
    update_market_features,
)
from finpipe.market.model import (
    BOOSTED,
    ENSEMBLE,
    MarketTrainingConfig,
)
from finpipe.market.quality import add_market_checks_columns
from finpipe.market.schema import DOMAIN, normalise_market_frame, price_column
from finpipe.market.synthetic import ORACLE, plan_market_demo
from finpipe.market.synthetic import write_oracle as write_oracle
from finpipe.metrics import market_metrics, per_date_ic
from finpipe.settings import Settings, load_settings
from finpipe.storage import Storage, as_day
from finpipe.tracking import RegisteredModel
from finpipe.training import TimeSplit, time_split

log = logging.getLogger("finpipe.market")

MODEL_LOADER = "finpipe.market.model:FittedMarketModel"
ENSEMBLE_LOADER = "finpipe.market.ensemble:FittedMarketEnsemble"
MarketModel = MarketMember | FittedMarketEnsemble


# -- ingest --------------------------------------------------------------------------------
def last_accepted_prices(storage: Storage, before: dt.date, column: str) -> pd.DataFrame | None:
    """Return each ticker's last accepted `column` price before `before` (ticker, date, price).

    Looks back over the last 10 validated dates, which is enough for a daily-return check:
    a ticker absent for longer simply has no previous price.
    """
    days = storage.partition_dates("validated", DOMAIN, end=before - dt.timedelta(days=1))[-10:]
    if not days:
        return None
    prior = storage.read_partitions("validated", DOMAIN, days=days)
    if column not in prior.columns:
        return None
    prior = prior.dropna(subset=[column]).sort_values(["ticker", "date"])
    last = prior.groupby("ticker", as_index=False).tail(1)
    return last[["ticker", "date", column]].rename(columns={column: "price"})


def _add_market_checks(frame: pd.DataFrame, storage: Storage) -> pd.DataFrame:
    # Read as the batch arrives: whether the user declared `close` already adjusted.
    adjusted = load_settings().market_close_is_adjusted
    if frame.empty or frame["date"].isna().all():
        return add_market_checks_columns(frame, None, close_is_adjusted=adjusted)
    previous = last_accepted_prices(storage, frame["date"].min().date(), price_column(frame))
    return add_market_checks_columns(frame, previous, close_is_adjusted=adjusted)


MARKET_CONTRACT = RawContract(
    domain=DOMAIN,
    suite="market_ohlcv",
    key_columns=("date", "ticker"),
    date_column="date",
    normalise=normalise_market_frame,
    add_check_columns=_add_market_checks,
)


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
class MarketNight:
    """One night's market training set: the labelled panel and its embargoed time split."""

    storage: Storage
    as_of: dt.date
    config: MarketTrainingConfig
    frame: pd.DataFrame
    features: list[str]
    split: TimeSplit
    embargo: int
    # The nets fitted so far, their predictions on every row of `frame` and on each shuffle of
    # the importance window: the ensemble, fitted last, combines them.
    nets: dict[str, MarketMember] = field(default_factory=dict)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    shuffled_predictions: dict[str, dict[Shuffle | None, np.ndarray]] = field(default_factory=dict)

    @property
    def promotion_metric(self) -> str:
        return self.config.promotion_metric

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
            params={
                **{k: str(v) for k, v in config.model_dump().items()},
                "as_of": self.as_of.isoformat(),
                "embargo_effective": self.embargo,
                "n_features": len(self.features),
                **windows,
            },
            data=TrainingData(
                frame[[*KEY_COLUMNS, *self.features, config.label]],
                source=f"features/{DOMAIN}/date={first}..{last}",
                name=f"{DOMAIN}-features-{first}-to-{last}",
                targets=config.label,
            ),
            documents={"feature_columns.json": {"feature_columns": self.features}},
        )

    def candidates(self) -> list[str]:
        """The nets in the configured order, then the ensemble of them when asked for."""
        nets: list[str] = [kind for kind in self.config.models if kind != ENSEMBLE]
        return nets + [ENSEMBLE] * (ENSEMBLE in self.config.models)

    def fit(self, kind: str, on_epoch: lifecycle.EpochLogger, say: lifecycle.Say) -> Candidate:
        if kind == ENSEMBLE:
            return self.fit_ensemble(say)
        frame, features, split, config = self.frame, self.features, self.split, self.config
        say(f"training {kind} on {len(frame):,} rows, {len(features)} features")
        fitted = fit_member(kind, frame, features, split, config, on_epoch)
        scored = frame[[*KEY_COLUMNS, config.label]].merge(
            fitted.predict(frame), on=KEY_COLUMNS, how="left"
        )
        self.nets[kind], self.predictions[kind] = fitted, scored["prediction"].to_numpy()
        validation = scored[scored["date"].isin(split.validation_dates)]
        test = scored[scored["date"].isin(split.test_dates)]
        windows = {"validation": _metrics(validation, config), "test": _metrics(test, config)}
        windows["validation"].update(self.ic_floor(validation))
        say(
            f"{kind}: validation IC {windows['validation']['ic']:.4f}, "
            f"test IC {windows['test']['ic']:.4f}, best epoch {fitted.best_epoch}"
        )
        importance = self.importance(kind, fitted)
        # The trees' best round is their highest validation IC, not their lowest loss: their
        # losses by round are the run's metrics, not a curve marking another round as best.
        curve = (
            {}
            if isinstance(fitted, FittedMarketBoostedTrees)
            else {
                "plots/learning_curve.png": plots.learning_curve(
                    fitted.history, f"{kind}: loss by epoch"
                )
            }
        )
        return Candidate(
            model=fitted,
            loader=member_loader(kind),
            input_example=self.input_example(),
            windows=windows,
            record=RunRecord(
                params={**member_params(kind, config), "label": config.label},
                metrics={"best_epoch": fitted.best_epoch},
                tables={IMPORTANCE_TABLE: importance},
                figures={**curve, **_plots(test, config.label, kind, importance)},
            ),
            test_predictions=test["prediction"].to_numpy(),
        )

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
            members, member_scores, split.validation_dates, label=label, horizon=config.horizon
        )
        prediction, _ = ensemble.combine(member_scores)
        scored = member_scores.assign(prediction=prediction)
        validation = scored[scored["date"].isin(split.validation_dates)]
        test = scored[scored["date"].isin(split.test_dates)]
        windows = {
            "validation": _metrics(validation, config, zscore_units=True),
            "test": _metrics(test, config, zscore_units=True),
        }
        # Stacked weights were fitted on the validation window: the IC that competes with the
        # members' is the cross-fitted one (see finpipe.market.ensemble).
        windows["validation"]["ic"] = ensemble.selection["validation_ic"]
        windows["validation"].update(self.ic_floor(validation))
        members_table = _members_table(scored, members, ensemble, split, label)
        say(
            f"ensemble ({ensemble.combination} of {', '.join(members)}): validation IC "
            f"{windows['validation']['ic']:.4f}, test IC {windows['test']['ic']:.4f}; members' "
            "test IC "
            + ", ".join(f"{row.candidate} {row.test_ic:.4f}" for row in members_table.itertuples())
        )
        importance = self.importance(ENSEMBLE, ensemble)
        side_by_side = {
            f"{row.candidate}_{window}_ic": getattr(row, f"{window}_ic")
            for row in members_table.itertuples()
            for window in ("validation", "test")
        }
        return Candidate(
            model=ensemble,
            loader=ENSEMBLE_LOADER,
            input_example=self.input_example(),
            windows=windows,
            record=RunRecord(
                params={
                    "members": ",".join(members),
                    "combination": ensemble.combination,
                    **{f"weight_{kind}": round(w, 6) for kind, w in ensemble.weights.items()},
                    "label": label,
                },
                metrics={
                    **ensemble.selection,
                    **{f"member_{k}": v for k, v in side_by_side.items()},
                },
                tables={"ensemble/members.json": members_table, IMPORTANCE_TABLE: importance},
                figures=_plots(test, label, ENSEMBLE, importance),
            ),
            test_predictions=test["prediction"].to_numpy(),
        )

    def input_example(self) -> pd.DataFrame:
        """Five rows of the last test date: the logged model's input example."""
        last = self.frame["date"] == self.split.test_dates[-1]
        return self.frame.loc[last, [*KEY_COLUMNS, *self.features]].head(5)

    def importance(self, kind: str, model: MarketModel) -> pd.DataFrame:
        """Permutation importance of each feature on the test window: the drop in the model's
        mean daily IC when the feature is shuffled across tickers within each date (in every
        row the model reads, lookback history included), one seeded shuffle per feature.

        Every candidate of the night is scored on the same shuffles; the ensemble combines its
        members' predictions on them instead of predicting again.
        """
        label, test_dates = self.config.label, self.split.test_dates
        dates = pd.DatetimeIndex(np.sort(self.frame["date"].unique()))
        # Windows count a ticker's rows, not dates: twice the night's longest lookback in
        # dates leaves room for a ticker's missing days.
        first = max(0, int(dates.searchsorted(test_dates[0])) - 2 * self.config.lookback)
        rows = self.frame["date"].between(dates[first], test_dates[-1])
        window = self.frame.loc[rows, [*KEY_COLUMNS, *self.features, label]]
        labels = window.loc[window["date"] >= test_dates[0], ["date", label]]
        saved = self.shuffled_predictions.setdefault(kind, {})

        def predict(frame: pd.DataFrame, shuffle: Shuffle | None) -> np.ndarray:
            if isinstance(model, FittedMarketEnsemble):
                members = [self.shuffled_predictions.get(k, {}).get(shuffle) for k in model.members]
                if all(values is not None for values in members):
                    scored = labels.assign(**dict(zip(model.members, members, strict=True)))
                    return model.combine(scored)[0]
            predicted = model.predict(frame.drop(columns=label), score_from=test_dates[0])
            return predicted["prediction"].to_numpy()  # the rows of `labels`, in order

        def test_ic(frame: pd.DataFrame, shuffle: Shuffle | None) -> float:
            saved[shuffle] = predict(frame, shuffle)
            daily = per_date_ic(labels.assign(prediction=saved[shuffle]), label=label)
            return float(daily.mean())

        return permutation_importance(
            test_ic, window, model.feature_columns, within="date", seed=self.config.seed
        ).rename(columns={"importance": "ic_drop", "score": "shuffled_ic", "baseline": "ic"})

    def ic_floor(self, validation: pd.DataFrame) -> dict[str, float]:
        """The validation IC a candidate must beat to become champion (`lifecycle.floor_refusal`):
        one standard error of its own mean daily IC above zero, and the IC of two naive
        signals on the same window: momentum (the trailing 20-day return) and short-term
        reversal (minus the trailing 5-day return)."""
        label = self.config.label
        daily = per_date_ic(validation, "prediction", label)
        floor = {
            "ic_floor_standard_error": float(daily.std(ddof=1) / np.sqrt(len(daily)))
            if len(daily) > 1
            else float("inf")
        }
        window = self.frame[self.frame["date"].isin(self.split.validation_dates)]
        signals = {}
        if "return_20d" in window:
            signals["momentum"] = window["return_20d"]
        if "return_5d" in window:
            signals["reversal"] = -window["return_5d"]
        for name, signal in signals.items():
            naive = window[["date", label]].assign(prediction=signal)
            floor[f"ic_floor_{name}"] = float(per_date_ic(naive, "prediction", label).mean())
        return floor

    def conclude(self, fitted: Mapping[str, Candidate], say: lifecycle.Say) -> RunRecord:
        """Every candidate's validation and test IC side by side (`candidates.json`), the
        boosted trees' floor (`boosted_trees_floor`) and the planted signal's IC on the test
        window, when a synthetic oracle is present."""
        floor = boosted_trees_floor(fitted)
        table = pd.DataFrame(
            [
                {
                    "candidate": kind,
                    **{
                        f"{window}_{metric}": candidate.windows[window][metric]
                        for window in ("validation", "test")
                        for metric in ("ic", "rank_ic")
                    },
                }
                for kind, candidate in fitted.items()
            ]
        )
        test_window = self.frame[self.frame["date"].isin(self.split.test_dates)]
        oracle = _oracle_ic(self.storage, test_window, self.config.label)
        if oracle is None:
            return RunRecord(metrics=floor, tables={"candidates.json": table})
        say(f"oracle IC on the test window: {oracle:.4f}")
        metrics = {**floor, "test_oracle_ic": oracle}
        for kind, candidate in fitted.items():
            metrics[f"{kind}_ic_to_oracle"] = candidate.windows["test"]["ic"] / oracle
            candidate.windows["test"]["oracle_ic"] = oracle
        return RunRecord(metrics=metrics, tables={"candidates.json": table})

    def outcome(self, challenger: ChallengerOutcome) -> TrainingOutcome:
        frame, split = self.frame, self.split
        return TrainingOutcome(
            **challenger.to_dict(),
            horizon=self.config.horizon,
            label=self.config.label,
            test_start=str(split.test_dates[0].date()),
            test_end=str(split.test_dates[-1].date()),
            train_rows=int(frame["date"].isin(split.train_dates).sum()),
            first_date=str(frame["date"].min().date()),
            last_date=str(frame["date"].max().date()),
        )


def boosted_trees_floor(fitted: Mapping[str, Candidate]) -> dict[str, float]:
    """State the gradient-boosted baseline as a promotion floor on every candidate
    (`lifecycle.floor_refusal`), as credit states its logistic baseline: the trees' validation
    IC less one standard error of their mean daily IC. Returns it as a figure to log; nothing
    when the trees were not fitted tonight."""
    baseline = fitted.get(BOOSTED)
    if baseline is None:
        return {}
    validation = baseline.windows["validation"]
    floor = validation["ic"] - validation["ic_floor_standard_error"]
    for candidate in fitted.values():
        candidate.windows["validation"]["ic_floor_boosted_trees"] = floor
    return {"validation_ic_floor_boosted_trees": floor}


def _metrics(
    scored: pd.DataFrame, config: MarketTrainingConfig, *, zscore_units: bool = False
) -> dict[str, float]:
    """Return market metrics; RMSE is measured in the units the net was trained on (z units
    for the ensemble, whose scores are cross-sectional z-scores whatever the target)."""
    metrics = market_metrics(scored, label=config.label)
    if config.target == "cross_sectional_zscore" or zscore_units:
        by_date = scored.groupby("date")[config.label]
        z = (scored[config.label] - by_date.transform("mean")) / by_date.transform("std")
        error = (scored["prediction"] - z).to_numpy(dtype=float)
        metrics["rmse"] = float(np.sqrt(np.nanmean(error**2)))
    return metrics


IMPORTANCE_TABLE = "importance/permutation_importance.json"


def _members_table(
    scored: pd.DataFrame,
    members: Mapping[str, MarketMember],
    ensemble: FittedMarketEnsemble,
    split: TimeSplit,
    label: str,
) -> pd.DataFrame:
    """Each member's weight and validation/test IC and rank IC, then the ensemble's."""
    rows = []
    for name in [*members, ENSEMBLE]:
        column = "prediction" if name == ENSEMBLE else name
        row: dict[str, object] = {
            "candidate": name,
            "weight": 1.0 if name == ENSEMBLE else ensemble.weights[name],
        }
        for window, dates in (("validation", split.validation_dates), ("test", split.test_dates)):
            rows_in = scored[scored["date"].isin(dates)]
            values = market_metrics(rows_in, prediction=column, label=label)
            row[f"{window}_ic"], row[f"{window}_rank_ic"] = values["ic"], values["rank_ic"]
        rows.append(row)
    table = pd.DataFrame(rows)
    # The ensemble's validation IC is the one it competes with: cross-fitted when stacked.
    table.loc[table["candidate"] == ENSEMBLE, "validation_ic"] = ensemble.selection["validation_ic"]
    return table


def _plots(test: pd.DataFrame, label: str, kind: str, importance: pd.DataFrame) -> dict:
    return {
        "plots/feature_importance.png": plots.feature_importance(
            dict(zip(importance["feature"], importance["ic_drop"], strict=True)),
            f"{kind}: permutation importance (test window)",
            xlabel="drop in mean daily IC when shuffled across tickers",
        ),
        "plots/ic_by_date.png": plots.ic_by_date(
            per_date_ic(test, label=label), f"{kind}: test IC by date"
        ),
        "plots/return_by_decile.png": plots.return_by_decile(
            test, "prediction", label, f"{kind}: test {label} by prediction decile"
        ),
    }


def _oracle_ic(storage: Storage, test_window: pd.DataFrame, label: str) -> float | None:
    """Return the planted signal's IC on the test window, when a synthetic oracle is present."""
    # Only the test window's rows: the oracle covers the whole history.
    first, last = test_window["date"].min(), test_window["date"].max()
    oracle = storage.read_reference(
        DOMAIN, ORACLE, filters=[("date", ">=", first), ("date", "<=", last)]
    )
    if oracle is None:
        return None
    joined = test_window[[*KEY_COLUMNS, label]].merge(oracle, on=KEY_COLUMNS)
    if joined.empty:
        return None
    joined = joined.rename(columns={"expected_forward_return": "prediction"})
    return float(market_metrics(joined, label=label)["ic"])


@dataclass(frozen=True)
class MarketParts:
    """The market domain's own parts; `finpipe.lifecycle` runs them."""

    name: str = DOMAIN
    contract: RawContract = MARKET_CONTRACT
    training_config: type[MarketTrainingConfig] = MarketTrainingConfig
    training_outcome: type[TrainingOutcome] = TrainingOutcome
    selection_metric: str = "ic"  # validation IC picks the candidate
    nested_runs: bool = True

    def update_features(
        self, storage: Storage, as_of: dt.date, *, rebuild: bool, progress: lifecycle.Say | None
    ) -> FeatureUpdate:
        return update_market_features(storage, as_of, rebuild=rebuild, progress=progress)

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

    def promotion_scorer(self, storage: Storage, outcome: TrainingOutcome) -> lifecycle.ModelScore:
        """Return a model's promotion metric on the outcome's test window, rebuilt from storage
        (with the history before it that a sequence model's lookback reads)."""
        test_start, test_end = as_day(outcome.test_start), as_day(outcome.test_end)
        context_start = test_start - dt.timedelta(days=400)  # room for any sequence lookback
        frame = load_training_frame(storage, as_day(outcome.as_of), outcome.horizon, context_start)
        in_test = (frame["date"] >= pd.Timestamp(test_start)) & (
            frame["date"] <= pd.Timestamp(test_end)
        )
        test_window = frame.loc[in_test, [*KEY_COLUMNS, outcome.label]]
        inputs = frame.drop(columns=[outcome.label, f"direction_{outcome.horizon}d"])

        def score(model: RegisteredModel) -> float:
            scored = test_window.merge(model.predict(inputs), on=KEY_COLUMNS)
            return float(market_metrics(scored, label=outcome.label)[outcome.promotion_metric])

        return score

    def prepare_scoring(self, storage: Storage, as_of: dt.date) -> lifecycle.Predict:
        """Return how the champion scores every ticker of `as_of`.

        The champion sees the feature rows of the last few dates (its sequence lookback) up to
        `as_of` only.
        """
        if not storage.exists(storage.partition_key("features", DOMAIN, as_of)):
            raise ScoringError(f"no feature partition for {as_of}; run the features step first")

        def predict(champion: RegisteredModel) -> Predictions:
            fitted: MarketModel = champion.model
            # The sequence window is the previous `history_rows` rows; one spare date is free.
            days = storage.partition_dates(
                "features", DOMAIN, end=as_of, last=fitted.history_rows + 1
            )
            features = storage.read_partitions("features", DOMAIN, days=days)
            # A column absent from the as-of partition would arrive as NaN after the concat and be
            # silently imputed: refuse it, as the model's signature would for a missing column.
            today = features[features["date"] == pd.Timestamp(as_of)]
            missing = [
                c for c in fitted.feature_columns if c not in today.columns or today[c].isna().all()
            ]
            if missing:
                raise ScoringError(
                    f"features for {as_of} lack {missing} (missing or all empty) that champion "
                    f"v{champion.version} needs; rebuild features or retrain"
                )
            # Earlier dates are window history only: the net runs on the as-of rows alone,
            # and each row gets the three features that moved its score most (reason_k).
            predicted = fitted.explain(features, score_from=pd.Timestamp(as_of))
            today = predicted.loc[predicted["date"] == pd.Timestamp(as_of)]
            return Predictions(today.drop(columns="date"), sort_by=["ticker"])

        return predict

    def plan_demo(self, settings: Settings) -> list[DemoNight]:
        return plan_market_demo(settings)


MARKET = lifecycle.bind(MarketParts())
train_market, promote_market, score_market = MARKET.train, MARKET.promote, MARKET.score
