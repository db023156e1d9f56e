"""The market's gradient-boosted baseline: LightGBM trees on one feature row.

The bar the nets must clear (issue #28): the same rows, features, target and windows as the
nets (`finpipe.market.model`), fitted by LightGBM with early stopping on the validation window.
Trees need no scaler: a feature's missing value is LightGBM's own "missing" branch, and any
monotone rescaling of a feature gives the same splits. The target is the nets' (`_targets`:
the label z-scored across tickers per date, or the raw return), from train dates only.

The kept round is the one with the highest validation IC, so that IC is the maximum of many
and biased upward (on labels of pure noise, +0.028 where the test IC is 0). The validation IC
the trees report, which picks the night's candidate and sets every candidate's floor, is a
cross-fitted one instead, as the stacked ensemble's is (`finpipe.market.ensemble`): each half of
the validation dates scored at the round chosen on the other half (less the `horizon` dates
next to it, whose labels overlap it), so no date is scored at a round chosen on itself.

Saved as a model folder (`finpipe.model_files`): `model.json` (feature columns, label, target,
settings, the validation loss by round, how the round was chosen) and `booster.txt`,
LightGBM's own text format.
Explanations are LightGBM's exact per-row contributions (TreeSHAP, `pred_contrib`), which add
up to the prediction less the trees' expected value (not the score of a training-mean input,
as the nets' integrated gradients do), in prediction units. A feature missing on a row took the
trees' missing branch, so unlike a net's it can carry a contribution and be a reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Self, cast

import numpy as np
import pandas as pd

from finpipe.market.model import (
    BoostedTreesConfig,
    ExplainsRows,
    Target,
    _require_columns,
    _targets,
)
from finpipe.model_files import read_model_metadata, save_model_metadata
from finpipe.training import TimeSplit

if TYPE_CHECKING:  # imported where trees are fitted or read: most processes never need it
    import lightgbm as lgb

BOOSTER_FILE = "booster.txt"


@dataclass
class FittedMarketBoostedTrees(ExplainsRows):
    """A fitted LightGBM booster plus what scoring needs to read a feature frame the same way.

    Predictions are in the target's units (`target`, as the nets'); `history` holds the
    training and validation L2 loss by round (`epoch` = round) and `best_epoch` the round kept.
    `selection` holds the kept round's validation IC (`best_round_validation_ic`, the highest)
    and the cross-fitted one the trees report as theirs (`validation_ic`). After a fit (not
    saved), `cross_fitted_validation` holds the predictions behind that IC: `date`, `ticker`,
    `prediction` of each labelled validation row at the round chosen on the other half, which
    an ensemble of these trees is weighted and judged on (`finpipe.market.ensemble`).
    """

    saved_as: ClassVar[str] = "market boosted trees"

    booster: lgb.Booster
    feature_columns: list[str]
    label: str
    horizon: int
    target: Target
    settings: dict[str, object]
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    selection: dict[str, float] = field(default_factory=dict)
    # the last date whose price its training or validation labels read
    # (`finpipe.market.pipeline.learnt_through`); None: saved before finpipe recorded it
    learnt_through: str | None = None
    cross_fitted_validation: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    @property
    def history_rows(self) -> int:
        """Rows of a ticker's history a prediction reads: its own only."""
        return 1

    def _rows(
        self, features: pd.DataFrame, score_from: pd.Timestamp | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(keep, inputs): the frame rows `predict` returns (positions, frame order) and their
        feature matrix in `feature_columns` order."""
        _require_columns(features, ["date", "ticker", *self.feature_columns], "predict")
        keep = np.arange(len(features))
        if score_from is not None:
            dates = features["date"].to_numpy().astype("datetime64[ns]")
            keep = np.flatnonzero(dates >= np.datetime64(pd.Timestamp(score_from), "ns"))
        columns = features[self.feature_columns].iloc[keep]
        return keep, columns.to_numpy(dtype=np.float64, na_value=np.nan)

    def predict(
        self, features: pd.DataFrame, *, score_from: pd.Timestamp | None = None
    ) -> pd.DataFrame:
        """Return `date`, `ticker`, `prediction` (float64) for every row of `features`, or for
        those dated `score_from` or later; rows keep the input's order and index."""
        keep, inputs = self._rows(features, score_from)
        prediction = (
            self.booster.predict(inputs, num_iteration=self.best_epoch or None)
            if len(keep)
            else np.zeros(0)
        )
        return pd.DataFrame(
            {
                "date": features["date"].array[keep],
                "ticker": features["ticker"].array[keep],
                "prediction": np.asarray(prediction, dtype=np.float64),
            },
            index=features.index[keep],
        )

    def attributions(
        self, features: pd.DataFrame, *, score_from: pd.Timestamp | None = None
    ) -> np.ndarray:
        """Return [rows, feature_columns] contributions of each returned row's prediction
        (LightGBM's TreeSHAP values, prediction units); each row's add up to its prediction
        less the trees' expected value."""
        keep, inputs = self._rows(features, score_from)
        if not len(keep):
            return np.zeros((0, len(self.feature_columns)))
        contributions = self.booster.predict(
            inputs, num_iteration=self.best_epoch or None, pred_contrib=True
        )
        return np.asarray(contributions, dtype=np.float64)[:, :-1]  # the last: expected value

    def save(self, directory: Path) -> None:
        """Write `booster.txt` (through a temporary file renamed into place) and `model.json`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        booster = directory / BOOSTER_FILE
        self.booster.save_model(str(booster.with_suffix(".tmp")), num_iteration=self.best_epoch)
        os.replace(booster.with_suffix(".tmp"), booster)
        save_model_metadata(
            directory,
            {
                "model": "lgbm",
                "feature_columns": list(self.feature_columns),
                "label": self.label,
                "horizon": self.horizon,
                "target": self.target,
                "settings": self.settings,
                "history": self.history,
                "best_epoch": self.best_epoch,
                "selection": self.selection,
                "learnt_through": self.learnt_through,
            },
        )

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a model written by `save`."""
        directory = Path(directory)
        data = read_model_metadata(directory, cls.saved_as, with_weights=False)
        booster_file = directory / BOOSTER_FILE
        if not booster_file.is_file():
            raise FileNotFoundError(
                f"{booster_file} not found: {directory} does not hold a saved {cls.saved_as} "
                f"model (expected {BOOSTER_FILE} beside model.json)"
            )
        import lightgbm as lgb

        return cls(
            booster=lgb.Booster(model_file=str(booster_file)),
            feature_columns=list(data["feature_columns"]),
            label=data["label"],
            horizon=int(data["horizon"]),
            target=data["target"],
            settings=dict(data["settings"]),
            history=list(data["history"]),
            best_epoch=int(data["best_epoch"]),  # the saved booster holds the kept rounds only
            # absent from models saved before the cross-fitted validation IC
            selection={k: float(v) for k, v in data.get("selection", {}).items()},
            learnt_through=data.get("learnt_through"),  # absent from models saved before it
        )


class _DailyScore:
    """The mean daily IC (Pearson across tickers per date) and the mean squared error of
    predictions of fixed rows: LightGBM's evaluation, one vectorised pass per round."""

    def __init__(self, dates: np.ndarray, targets: np.ndarray):
        self.codes = pd.factorize(dates, sort=True)[0]  # date order: `daily_ic`'s columns
        self.dates = int(self.codes.max()) + 1 if len(self.codes) else 0
        self.count = np.bincount(self.codes, minlength=self.dates)
        self.targets = targets - self._date_means(targets)
        self.targets_ss = np.bincount(self.codes, self.targets**2, self.dates)
        self.raw_targets = targets

    def _date_means(self, values: np.ndarray) -> np.ndarray:
        return (np.bincount(self.codes, values, self.dates) / self.count)[self.codes]

    def daily_ic(self, predictions: np.ndarray) -> np.ndarray:
        """Return the IC of each date, in date order (NaN where predictions or targets are
        constant)."""
        centred = predictions - self._date_means(predictions)
        covariance = np.bincount(self.codes, centred * self.targets, self.dates)
        spread = np.bincount(self.codes, centred**2, self.dates) * self.targets_ss
        daily = np.full(self.dates, np.nan)
        defined = spread > 0
        daily[defined] = covariance[defined] / np.sqrt(spread[defined])
        return daily

    def metrics(self, predictions: np.ndarray) -> list[tuple[str, float, bool]]:
        daily = self.daily_ic(predictions)
        defined = np.isfinite(daily)
        ic = float(daily[defined].mean()) if defined.any() else 0.0
        loss = float(np.mean((predictions - self.raw_targets) ** 2))
        return [("ic", ic, True), ("l2", loss, False)]


IC_EVERY = 5
"""Rounds between two validation-IC evaluations (early stopping's granularity): the IC is
computed in Python, so every round it cost as much as growing a tree."""


def validation_halves(dates: int, horizon: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return (chosen_on, scored) pairs of validation date positions (date order): each half
    of the window is scored at the round chosen on the other half less the `horizon` dates next
    to it, whose labels overlap it (fewer on a window too short to spare them: at least one
    date is left to choose on). None for a window of one date."""
    if dates < 2:
        return []
    half = dates // 2
    gap = min(horizon, half - 1)
    first, second = np.arange(half), np.arange(half, dates)
    return [(second[gap:], first), (first[: half - gap], second)]


class _ICEarlyStopping:
    """A LightGBM callback: the validation window's mean daily IC every `every` rounds (and at
    the last), on the whole window and on each half's choosing dates (`validation_halves`).

    Each keeps its own best round until `patience` rounds pass without a higher IC on its
    dates; then its best is final, and training stops once every one's is. The whole window's
    best is the round kept (`best_round`). A half's best (`best_rounds[k]`) is decided by its
    own dates alone, whatever the other half did, so scoring the other half at it
    (`cross_fitted_ic`) is not selected on the dates it scores.

    The validation predictions are summed tree by tree (`start_iteration`), so each evaluation
    costs the `every` new trees only; the whole window's IC of round r is in `ics[r]`, its IC
    by date (date order) in `daily[r]`.
    """

    def __init__(
        self,
        inputs: np.ndarray,
        scorer: _DailyScore,
        every: int,
        patience: int,
        halves: list[tuple[np.ndarray, np.ndarray]],
    ):
        # after record_evaluation (20), so a stopping round's losses are recorded too; an
        # instance attribute: lgb.train gives callbacks without one an order before all others
        self.order = 30
        self.inputs, self.scorer, self.every, self.patience = inputs, scorer, every, patience
        self.predictions = np.zeros(len(inputs))
        self.done = 0
        self.ics: dict[int, float] = {}
        self.daily: dict[int, np.ndarray] = {}
        # the dates each best is chosen on: the whole window, then each half's choosing dates
        self.windows = [np.arange(scorer.dates), *(chosen_on for chosen_on, _ in halves)]
        self.best_rounds = [0] * len(self.windows)
        self.best_ics = [-np.inf] * len(self.windows)
        # each one's predictions of the validation rows at its best round (the booster keeps
        # the whole window's best rounds only, so a half's later best cannot be asked of it)
        self.best_predictions = [np.zeros(0)] * len(self.windows)
        self.settled = [False] * len(self.windows)

    @property
    def best_round(self) -> int:
        return self.best_rounds[0]

    def __call__(self, env: lgb.callback.CallbackEnv) -> None:
        rounds = env.iteration + 1
        if rounds % self.every and rounds != env.end_iteration:
            return
        booster = cast("lgb.Booster", env.model)  # lgb.train's, not cv's
        self.predictions += booster.predict(
            self.inputs, start_iteration=self.done, num_iteration=rounds - self.done, num_threads=1
        )
        self.done = rounds
        self.daily[rounds] = daily = self.scorer.daily_ic(self.predictions)
        self.ics[rounds] = _mean_ic(daily)
        for k, dates in enumerate(self.windows):
            if self.settled[k]:  # its best is final
                continue
            ic = _mean_ic(daily[dates])
            if ic > self.best_ics[k]:
                self.best_rounds[k], self.best_ics[k] = rounds, ic
                self.best_predictions[k] = self.predictions.copy()
            elif rounds - self.best_rounds[k] >= self.patience:
                self.settled[k] = True
        if all(self.settled):
            from lightgbm.callback import EarlyStopException

            raise EarlyStopException(
                self.best_round - 1, [("validation", "ic", self.best_ics[0], True)]
            )


def _mean_ic(daily: np.ndarray) -> float:
    """The mean of the dates' ICs that are defined (0 when none is)."""
    defined = np.isfinite(daily)
    return float(daily[defined].mean()) if defined.any() else 0.0


def cross_fitted_ic(
    daily: Mapping[int, np.ndarray],
    halves: list[tuple[np.ndarray, np.ndarray]],
    chosen: list[int],
) -> float:
    """Return the mean daily validation IC of each half of `halves` scored at the round
    `chosen` on the other half (`chosen[k]` for `halves[k]`, from `_ICEarlyStopping`); `daily`
    maps each evaluated round to its IC by validation date, in date order."""
    scored = [daily[round_][dates] for round_, (_, dates) in zip(chosen, halves, strict=True)]
    return _mean_ic(np.concatenate(scored))


def cross_fitted_predictions(
    date_positions: np.ndarray,
    halves: list[tuple[np.ndarray, np.ndarray]],
    chosen: list[np.ndarray],
) -> np.ndarray:
    """Return each validation row's prediction at the round chosen on the other half: the
    rows of `halves[k]`'s scored dates from `chosen[k]`, the validation rows' predictions at
    that round (`_ICEarlyStopping.best_predictions`); the rows behind `cross_fitted_ic`.
    `date_positions` gives each row's validation date, in date order."""
    predictions = np.full(len(date_positions), np.nan)
    for at_round, (_, dates) in zip(chosen, halves, strict=True):
        rows = np.isin(date_positions, dates)
        predictions[rows] = at_round[rows]
    return predictions


def fit_boosted_trees(
    frame: pd.DataFrame,
    feature_columns: list[str],
    split: TimeSplit,
    config: BoostedTreesConfig,
    *,
    seed: int = 0,
    label: str = "forward_return_5d",
    horizon: int = 5,
    target: Target = "cross_sectional_zscore",
    on_round: Callable[[dict], None] | None = None,
) -> FittedMarketBoostedTrees:
    """Fit LightGBM on the train dates of `frame`, early-stopping on the validation dates.

    Rows with a NaN label are not training rows; test dates are not touched. The same rows
    and target as `fit_market_model` (embargo checked the same way). Trees are added until
    `config.patience` rounds pass without a higher mean daily IC on the validation window
    (the metric the night selects on: its L2 loss, dominated by each date's level, stopped
    one of eight 200 x 1,000 panels at round 2 with a negative IC), evaluated every
    `IC_EVERY` rounds; the best evaluated round is kept. Each half of the validation window
    has its own early stopping too (training goes on until every one has stopped), and
    `selection` records the kept round's validation IC and the cross-fitted one the trees
    report (`cross_fitted_ic`; on 100 panels of pure-noise labels, +0.018 ± 0.003 against
    +0.003 ± 0.003, test IC -0.002 ± 0.003). The train and validation L2 losses are
    LightGBM's own, every round. `on_round` hears each round's losses and validation IC
    (NaN on rounds not evaluated) after the fit (as a net's `on_epoch` hears each epoch's).
    Raises ValueError when the embargo is shorter than the horizon or a column is missing.
    """
    import lightgbm as lgb

    if split.embargo < horizon:
        raise ValueError(
            f"split embargo ({split.embargo} dates) is shorter than the label horizon "
            f"({horizon}): use time_split(..., embargo={horizon})"
        )
    feature_columns = list(feature_columns)
    _require_columns(frame, ["date", "ticker", *feature_columns, label], "fit_boosted_trees")
    targets = _targets(frame, label, target)
    labelled = np.isfinite(targets)
    train = labelled & frame["date"].isin(split.train_dates).to_numpy()
    validation = labelled & frame["date"].isin(split.validation_dates).to_numpy()
    if not train.any() or not validation.any():
        raise ValueError(
            f"no labelled rows on {'train' if not train.any() else 'validation'} dates; "
            f"check that `{label}` is filled and the split's dates come from this frame"
        )
    inputs = frame[feature_columns].to_numpy(dtype=np.float64, na_value=np.nan)
    params = config.lightgbm_params(int(train.sum()), seed)
    dates = frame["date"].to_numpy()
    train_set = lgb.Dataset(inputs[train], targets[train], free_raw_data=False)
    validation_set = lgb.Dataset(inputs[validation], targets[validation], reference=train_set)
    scorer = _DailyScore(dates[validation], targets[validation])
    halves = validation_halves(scorer.dates, horizon)
    stopping = _ICEarlyStopping(
        inputs[validation],
        scorer,
        every=min(IC_EVERY, config.patience),
        patience=config.patience,
        halves=halves,
    )
    losses: dict[str, dict[str, list[float]]] = {}
    booster = lgb.train(
        {**params, "metric": "l2"},
        train_set,
        num_boost_round=config.max_rounds,
        valid_sets=[validation_set, train_set],
        valid_names=["validation", "train"],
        callbacks=[lgb.record_evaluation(losses), stopping],
    )
    best = booster.best_iteration or stopping.best_round or booster.current_iteration()
    history = [
        {
            "epoch": k + 1,
            "train_loss": losses["train"]["l2"][k],
            "validation_loss": losses["validation"]["l2"][k],
            "validation_ic": stopping.ics.get(k + 1, float("nan")),
        }
        for k in range(len(losses["validation"]["l2"]))
    ]
    if on_round is not None:
        for record in history:
            on_round(record)
    cross_fitted = None
    if halves:
        predictions = cross_fitted_predictions(scorer.codes, halves, stopping.best_predictions[1:])
        cross_fitted = frame.loc[validation, ["date", "ticker"]].assign(prediction=predictions)
    return FittedMarketBoostedTrees(
        booster=booster,
        feature_columns=feature_columns,
        label=label,
        horizon=horizon,
        target=target,
        settings={**params, "max_rounds": config.max_rounds, "patience": config.patience},
        history=history,
        best_epoch=best,
        selection={
            "best_round_validation_ic": stopping.ics.get(best, float("nan")),
            "validation_ic": cross_fitted_ic(stopping.daily, halves, stopping.best_rounds[1:])
            if halves
            else stopping.ics.get(best, float("nan")),  # one date: no halves to cross-fit
        },
        cross_fitted_validation=cross_fitted,
    )
