"""The market domain's own parts, run by the shared lifecycle (`finpipe.lifecycle`).

The raw contract; a training night that fits the configured nets (MLP, GRU, CNN) on an
embargoed time split, picks one on validation IC and reports the planted signal's IC when a
synthetic panel kept one; promotion on the test window's IC; scoring of one date's tickers.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from finpipe import lifecycle, plots
from finpipe.domains import ChallengerOutcome, DemoNight
from finpipe.errors import ScoringError
from finpipe.features import FeatureUpdate
from finpipe.ingest import RawContract
from finpipe.lifecycle import Candidate, Predictions, RunRecord, TrainingData
from finpipe.market.features import (
    KEY_COLUMNS,
    feature_columns_of,
    load_training_frame,
    update_market_features,
)
from finpipe.market.model import FittedMarketModel, MarketTrainingConfig, fit_market_model
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
        return list(self.config.models)

    def fit(self, kind: str, on_epoch: lifecycle.EpochLogger, say: lifecycle.Say) -> Candidate:
        frame, features, split, config = self.frame, self.features, self.split, self.config
        say(f"training {kind} on {len(frame):,} rows, {len(features)} features")
        train_config = config.train_config(kind)
        fitted = fit_market_model(
            frame,
            features,
            split,
            train_config,
            label=config.label,
            horizon=config.horizon,
            target=config.target,
            on_epoch=on_epoch,
        )
        scored = frame[[*KEY_COLUMNS, config.label]].merge(
            fitted.predict(frame), on=KEY_COLUMNS, how="left"
        )
        validation = scored[scored["date"].isin(split.validation_dates)]
        test = scored[scored["date"].isin(split.test_dates)]
        windows = {"validation": _metrics(validation, config), "test": _metrics(test, config)}
        windows["validation"].update(self.ic_floor(validation))
        say(
            f"{kind}: validation IC {windows['validation']['ic']:.4f}, "
            f"test IC {windows['test']['ic']:.4f}, best epoch {fitted.best_epoch}"
        )
        example = frame.loc[frame["date"] == split.test_dates[-1], [*KEY_COLUMNS, *features]]
        return Candidate(
            model=fitted,
            loader=MODEL_LOADER,
            input_example=example.head(5),
            windows=windows,
            record=RunRecord(
                params={**train_config.to_params(), "label": config.label},
                metrics={"best_epoch": fitted.best_epoch},
                figures=_plots(fitted, test, config.label, kind),
            ),
            test_predictions=test["prediction"].to_numpy(),
        )

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
        """The planted signal's IC on the test window, when a synthetic oracle is present."""
        test_window = self.frame[self.frame["date"].isin(self.split.test_dates)]
        oracle = _oracle_ic(self.storage, test_window, self.config.label)
        if oracle is None:
            return RunRecord()
        say(f"oracle IC on the test window: {oracle:.4f}")
        metrics = {"test_oracle_ic": oracle}
        for kind, candidate in fitted.items():
            metrics[f"{kind}_ic_to_oracle"] = candidate.windows["test"]["ic"] / oracle
            candidate.windows["test"]["oracle_ic"] = oracle
        return RunRecord(metrics=metrics)

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


def _metrics(scored: pd.DataFrame, config: MarketTrainingConfig) -> dict[str, float]:
    """Return market metrics; RMSE is measured in the units the net was trained on."""
    metrics = market_metrics(scored, label=config.label)
    if config.target == "cross_sectional_zscore":
        by_date = scored.groupby("date")[config.label]
        z = (scored[config.label] - by_date.transform("mean")) / by_date.transform("std")
        error = (scored["prediction"] - z).to_numpy(dtype=float)
        metrics["rmse"] = float(np.sqrt(np.nanmean(error**2)))
    return metrics


def _plots(fitted: FittedMarketModel, test: pd.DataFrame, label: str, kind: str) -> dict:
    return {
        "plots/learning_curve.png": plots.learning_curve(fitted.history, f"{kind}: loss by epoch"),
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
            storage, as_of, config.horizon, history_dates=config.history_dates
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
            fitted = champion.model
            lookback = getattr(fitted.config, "lookback", 1) if fitted.config.model != "mlp" else 1
            # The sequence window is the previous `lookback` rows; one spare date costs nothing.
            days = storage.partition_dates("features", DOMAIN, end=as_of, last=lookback + 1)
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
            # Earlier dates are window history only: the net runs on the as-of rows alone.
            predicted = fitted.predict(features, score_from=pd.Timestamp(as_of))
            today = predicted.loc[
                predicted["date"] == pd.Timestamp(as_of), ["ticker", "prediction"]
            ]
            return Predictions(today, sort_by=["ticker"])

        return predict

    def plan_demo(self, settings: Settings) -> list[DemoNight]:
        return plan_market_demo(settings)


MARKET = lifecycle.bind(MarketParts())
train_market, promote_market, score_market = MARKET.train, MARKET.promote, MARKET.score
