"""The market model: a feature frame with labels in, a fitted forward-return model out.

Point in time, in three places:
- the scaler (and the target scale) are fitted on training dates only and shipped with the model;
- a sequence model's window for the row (ticker, t) is that ticker's previous `lookback` rows
  in the frame, ending at t: never a later row, never another ticker's row. Rows with less
  history are left-padded with zeros (= the training mean after scaling) and still predicted.
  Windows count rows, not calendar days: a gap in a ticker's dates is not filled;
- training targets come only from train dates, which `time_split` separates from validation and
  test by an embargo of at least the label horizon. A validation row's window may include
  earlier train rows' *features*: those were known at the validation date, so that is correct.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Protocol, get_args

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, BeforeValidator, Field, field_validator
from torch import nn

from finpipe.attribution import integrated_gradients, top_contributions
from finpipe.model_files import SavesNetAndMetadata, load_weights
from finpipe.nets import build_net
from finpipe.training import (
    NET_KINDS,
    Batches,
    FeatureScaler,
    LearningRate,
    MaxEpochs,
    Patience,
    TimeSplit,
    TrainConfig,
    WeightDecay,
    canonical_kind,
    check_kind,
    loop_settings,
    predict_regressor,
    train_regressor,
    window_panel,
)

Target = Literal["return", "cross_sectional_zscore"]
# The market candidates a night may fit, by the names configs, run forms, the CLI and MLflow
# runs use: the nets, and the ensemble of the nets fitted beside it (`finpipe.market.ensemble`).
MarketModelKind = Literal["mlp", "gru", "tcn", "lgbm", "ensemble"]
MARKET_MODEL_KINDS: tuple[MarketModelKind, ...] = get_args(MarketModelKind)
ENSEMBLE: MarketModelKind = "ensemble"
MLP: MarketModelKind = "mlp"
GRU: MarketModelKind = "gru"
BOOSTED: MarketModelKind = "lgbm"  # LightGBM, the gradient-boosted baseline
# The temporal CNN is not a default: on 200 tickers x 1,000 days it fits as slowly as the GRU
# (142 s against 144 s) to a lower test IC (0.087 against 0.098); the ensemble costs ~1 s.
DEFAULT_MODELS: tuple[MarketModelKind, ...] = ("mlp", "gru", "lgbm", "ensemble")  # not list[str]
REASONS = 3  # reason_1 .. reason_3 per scored row
# Integrated-gradient steps per explained row. On 200 tickers with a GRU, 8 steps give the same
# top three features as 64 for every row, attributions adding up to the score gap within 0.12%,
# in 0.3 s a date (32 steps: 1.3 s): scoring explains every row it publishes.
IG_STEPS = 8


def _require_columns(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{what}: column(s) {missing} missing from the frame (it has {list(frame.columns)}); "
            "build features with the same feature set the model was trained on"
        )


def _ticker_codes(tickers: pd.Series) -> np.ndarray:
    """Integer codes that sort as the tickers do as strings (a missing ticker sorts last)."""
    if not isinstance(tickers.dtype, pd.StringDtype):
        tickers = tickers.astype("string")  # objects, categories, numbers: their string order
    codes, uniques = pd.factorize(tickers, sort=True)
    return np.where(codes < 0, len(uniques), codes)


def _date_keys(dates: pd.Series) -> np.ndarray:
    """Nanosecond integers that sort as the dates do (a missing date sorts last)."""
    values = dates.to_numpy().astype("datetime64[ns]")
    return np.where(np.isnat(values), np.iinfo(np.int64).max, values.view(np.int64))


def _sorted_panel(
    frame: pd.DataFrame, scaler: FeatureScaler, lookback: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (order, panel, positions): frame row `order[i]` is scaled into `panel[positions[i]]`.

    Rows are ordered by (ticker, date); with `lookback` > 1 the panel has zero rows before each
    ticker so that windows stay inside it (see `window_panel`).
    """
    groups, dates = _ticker_codes(frame["ticker"]), _date_keys(frame["date"])
    # One stable integer sort instead of a frame sort on the strings (22 ms -> 1.3 ms on a
    # scoring night of 21,000 rows, 2.0 s -> 0.3 s on 4M training rows), same order.
    order = np.lexsort((dates, groups))
    groups, dates = groups[order], dates[order]
    duplicated = np.zeros(len(order), dtype=bool)
    duplicated[1:] = (groups[1:] == groups[:-1]) & (dates[1:] == dates[:-1])
    if duplicated.any():
        first = order[np.flatnonzero(duplicated)[0]]
        ticker, date = frame["ticker"].iloc[first], frame["date"].iloc[first]
        raise ValueError(
            f"{int(duplicated.sum())} duplicate (ticker, date) rows, e.g. {ticker} on "
            f"{pd.Timestamp(date).date()}; each ticker needs one row per date"
        )
    scaled = scaler.transform(frame[list(scaler.columns)].iloc[order])
    if lookback <= 1:
        return order, scaled, np.arange(len(order), dtype=np.int64)
    panel, positions = window_panel(scaled, groups, lookback)
    return order, panel, positions


def _targets(frame: pd.DataFrame, label: str, target: Target) -> np.ndarray:
    """Return the training target per row: the label, or its per-date z-score (NaN where none)."""
    values = pd.to_numeric(frame[label]).astype(np.float64)
    values = values.where(np.isfinite(values))
    if target == "return":
        return values.to_numpy()
    by_date = values.groupby(frame["date"].to_numpy())
    std = by_date.transform("std", ddof=0)
    zscore = (values - by_date.transform("mean")) / std.where(std > 0)
    return zscore.where(by_date.transform("count") >= 2).to_numpy()


class _Attributed(Protocol):
    feature_columns: list[str]

    def predict(
        self, features: pd.DataFrame, *, score_from: pd.Timestamp | None = None
    ) -> pd.DataFrame: ...

    def attributions(
        self, features: pd.DataFrame, *, score_from: pd.Timestamp | None = None
    ) -> np.ndarray: ...


class ExplainsRows:
    """`explain` for a fitted market model with `predict`, `attributions` and
    `feature_columns` (the nets here, the boosted trees in `finpipe.market.boosted`)."""

    def explain(
        self: _Attributed, features: pd.DataFrame, *, score_from: pd.Timestamp | None = None
    ) -> pd.DataFrame:
        """Return `predict`'s rows with each row's three largest contributions (`reason_columns`):
        what scoring stores with every prediction."""
        predicted = self.predict(features, score_from=score_from)
        reasons = reason_columns(
            self.feature_columns,
            self.attributions(features, score_from=score_from),
            predicted.index,
        )
        return pd.concat([predicted, reasons], axis=1)


@dataclass
class FittedMarketModel(SavesNetAndMetadata, ExplainsRows):
    """A trained net plus everything needed to score a feature frame the same way again.

    `target` says what the net was trained on: "return" (the label; predictions are forward
    h-day returns) or "cross_sectional_zscore" (the label standardised across tickers per date;
    predictions are scores in those units). The net learns the target divided by `target_std`
    after subtracting `target_mean` (fitted on train dates); `predict` undoes that, so the
    losses in `history` are in those scaled units (an MSE of 1.0 = predicting the mean).
    """

    saved_as = "market"

    net: nn.Module
    config: TrainConfig
    feature_columns: list[str]
    scaler: FeatureScaler
    label: str
    horizon: int
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    target: Target = "return"
    target_mean: float = 0.0
    target_std: float = 1.0
    learning_rate: float | None = None  # the rate training applied; None: not recorded
    # the last date whose price its training or validation labels read
    # (`finpipe.market.pipeline.learnt_through`); None: saved before finpipe recorded it
    learnt_through: str | None = None

    def predict(
        self,
        features: pd.DataFrame,
        *,
        batch_size: int = 8192,
        device: str = "cpu",
        score_from: pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        """Return `date`, `ticker`, `prediction` (float64) for every row of `features`.

        Rows keep the input's order and index; extra columns are ignored. Sequence models read
        the window of row (ticker, t) from that ticker's previous `lookback` rows of `features`
        itself, ending at t; a row with less history is left-padded with zeros (the training
        mean) and still predicted, so pass `lookback - 1` rows of history before the dates you
        want scored. With `score_from`, rows dated before it only serve as window history: they
        are neither run through the net nor returned (same scores, less work).
        Eval mode, no gradients, deterministic.
        Raises ValueError naming any missing feature column or a duplicate (ticker, date).
        """
        batches, order, keep = self._inputs(features, score_from)
        scores = predict_regressor(self.net, batches, batch_size, device)
        prediction = np.full(len(features), np.nan, dtype=np.float64)
        prediction[order] = scores * self.target_std + self.target_mean
        return pd.DataFrame(
            {
                "date": features["date"].array[keep],
                "ticker": features["ticker"].array[keep],
                "prediction": prediction[keep],
            },
            index=features.index[keep],
        )

    @property
    def history_rows(self) -> int:
        """Rows of a ticker's history a prediction reads, its own row included."""
        return self.config.lookback if self.config.is_sequence else 1

    def _inputs(
        self, features: pd.DataFrame, score_from: pd.Timestamp | None
    ) -> tuple[Batches, np.ndarray, np.ndarray]:
        """Return (batches, order, keep): sample i is frame row `order[i]`; `keep` lists the
        frame rows `predict` returns, in frame order."""
        _require_columns(features, ["date", "ticker", *self.feature_columns], "predict")
        lookback = self.config.lookback if self.config.is_sequence else 0
        order, panel, positions = _sorted_panel(features, self.scaler, lookback)
        if score_from is not None:
            dates = features["date"].to_numpy().astype("datetime64[ns]")
            wanted = (dates >= np.datetime64(pd.Timestamp(score_from), "ns"))[order]
            order, positions = order[wanted], positions[wanted]
        batches = Batches(
            torch.from_numpy(panel),
            rows=torch.from_numpy(positions) if lookback or score_from is not None else None,
            lookback=lookback,
        )
        keep = np.sort(order) if score_from is not None else np.arange(len(features))
        return batches, order, keep

    def attributions(
        self,
        features: pd.DataFrame,
        *,
        score_from: pd.Timestamp | None = None,
        steps: int = IG_STEPS,
        rows_per_pass: int = 256,
    ) -> np.ndarray:
        """Return [rows, feature_columns] integrated-gradient attributions of the prediction of
        each row `predict` returns (same rows, same order), in prediction units.

        The path runs from the training-mean input (zero after scaling: the typical row) to the
        row's scaled input; for a sequence model the input is the whole lookback window and a
        feature's attribution is summed over the window's steps. A row's attributions add up
        to prediction(row) - prediction(training mean), up to the midpoint rule's error.
        """
        batches, order, keep = self._inputs(features, score_from)
        self.net.eval()
        parts = []
        for start in range(0, len(batches), 4096):
            inputs = batches.inputs(torch.arange(start, min(start + 4096, len(batches))))
            reference = torch.zeros(inputs.shape[1:], dtype=inputs.dtype)
            per_input = integrated_gradients(
                self.net, inputs, reference, steps=steps, rows_per_pass=rows_per_pass
            )
            parts.append(per_input.sum(axis=1) if per_input.ndim == 3 else per_input)
        n_features = len(self.feature_columns)
        explained = np.concatenate([np.zeros((0, n_features)), *parts]).astype(np.float64)
        by_row = np.zeros((len(features), n_features))
        by_row[order] = explained * self.target_std
        return by_row[keep]

    def to_dict(self) -> dict:
        """Everything but the weights, JSON-ready."""
        return {
            "config": self.config.to_params(),
            "feature_columns": list(self.feature_columns),
            "scaler": self.scaler.to_dict(),
            "label": self.label,
            "horizon": self.horizon,
            "target": self.target,
            "target_mean": self.target_mean,
            "target_std": self.target_std,
            "learning_rate": self.learning_rate,
            "learnt_through": self.learnt_through,
        }

    @classmethod
    def from_saved(cls, data: dict, directory: Path) -> FittedMarketModel:
        config = TrainConfig.from_params(data["config"])
        net = load_weights(build_net(config, len(data["feature_columns"])), directory)
        return cls(
            net=net,
            config=config,
            feature_columns=list(data["feature_columns"]),
            scaler=FeatureScaler.from_dict(data["scaler"]),
            label=data["label"],
            horizon=int(data["horizon"]),
            history=list(data["history"]),
            best_epoch=int(data["best_epoch"]),
            target=data["target"],
            target_mean=float(data["target_mean"]),
            target_std=float(data["target_std"]),
            learning_rate=data.get("learning_rate"),  # absent from models saved before it
            learnt_through=data.get("learnt_through"),  # absent from models saved before it
        )


def reason_columns(
    feature_columns: list[str], attributions: np.ndarray, index: pd.Index
) -> pd.DataFrame:
    """Return reason_k (the feature) and reason_k_impact (its attribution, prediction units),
    k = 1..3, per row: the features that moved the row's score most from the typical row's,
    either way, largest magnitude first (`finpipe.attribution.top_contributions`). A feature
    with no attribution at all is not a reason (its columns stay empty)."""
    order, top, shown = top_contributions(attributions, REASONS, positive_only=False)
    names = np.asarray(feature_columns, dtype=object)[order]
    names[~shown] = None
    columns: dict[str, object] = {}
    for k in range(order.shape[1]):
        columns[f"reason_{k + 1}"] = pd.array(names[:, k], dtype="string")
        columns[f"reason_{k + 1}_impact"] = np.where(shown[:, k], top[:, k], np.nan)
    return pd.DataFrame(columns, index=index)


def fit_market_model(
    frame: pd.DataFrame,
    feature_columns: list[str],
    split: TimeSplit,
    config: TrainConfig,
    *,
    label: str = "forward_return_5d",
    horizon: int = 5,
    target: Target = "return",
    on_epoch: Callable[[dict], None] | None = None,
) -> FittedMarketModel:
    """Fit `config.model` on the train dates of `frame`, early-stopping on validation dates.

    `frame` holds date, ticker, the feature columns (NaN allowed) and `label`. Rows with a NaN
    label are not training targets but still serve as history in sequence windows. The scaler
    and the target's mean/std are fitted on train dates only. Test dates are not touched.
    `target="cross_sectional_zscore"` trains on the label standardised across tickers per date
    (dates with fewer than 2 labelled names dropped), which removes the market-wide move that
    no cross-sectional model can predict; the default trains on the raw forward return so that
    predictions, RMSE and directional accuracy are in return units.
    Raises ValueError when the embargo is shorter than the horizon or a column is missing.
    """
    if split.embargo < horizon:
        raise ValueError(
            f"split embargo ({split.embargo} dates) is shorter than the label horizon "
            f"({horizon}): the last training labels would overlap the validation window; "
            f"use time_split(..., embargo={horizon})"
        )
    if target not in ("return", "cross_sectional_zscore"):
        raise ValueError(f"target must be 'return' or 'cross_sectional_zscore', got {target!r}")
    samples = training_samples(frame, feature_columns, split, config, label=label, target=target)
    result = train_regressor(
        build_net(config, len(samples.feature_columns)),
        samples.train,
        samples.validation,
        config,
        on_epoch=on_epoch,
    )
    return FittedMarketModel(
        net=result.model,
        config=config,
        feature_columns=samples.feature_columns,
        scaler=samples.scaler,
        label=label,
        horizon=horizon,
        history=result.history,
        best_epoch=result.best_epoch,
        target=target,
        target_mean=samples.target_mean,
        target_std=samples.target_std,
        learning_rate=result.learning_rate,
    )


@dataclass(frozen=True)
class TrainingSamples:
    """The tensors `fit_market_model` trains on, and the statistics fitted to make them."""

    train: Batches
    validation: Batches
    feature_columns: list[str]
    scaler: FeatureScaler
    target_mean: float
    target_std: float


def training_samples(
    frame: pd.DataFrame,
    feature_columns: list[str],
    split: TimeSplit,
    config: TrainConfig,
    *,
    label: str = "forward_return_5d",
    target: Target = "return",
) -> TrainingSamples:
    """Return the train and validation samples of `frame` as `fit_market_model` builds them.

    The scaler and target statistics are fitted on train dates only; validation windows may
    read earlier train rows' features (known at the validation date). Exposed so a benchmark
    can time the training loop on exactly the tensors the pipeline uses.
    """
    feature_columns = list(feature_columns)
    _require_columns(frame, ["date", "ticker", *feature_columns, label], "fit_market_model")
    dates = frame["date"]
    in_train = dates.isin(split.train_dates).to_numpy()
    in_validation = dates.isin(split.validation_dates).to_numpy()

    scaler = FeatureScaler.fit(frame.loc[in_train, feature_columns])
    lookback = config.lookback if config.is_sequence else 0
    order, panel, positions = _sorted_panel(frame, scaler, lookback)

    targets = _targets(frame, label, target)[order]
    labelled = np.isfinite(targets)
    train_rows = labelled & in_train[order]
    validation_rows = labelled & in_validation[order]
    if not train_rows.any() or not validation_rows.any():
        raise ValueError(
            f"no labelled rows on {'train' if not train_rows.any() else 'validation'} dates; "
            f"check that `{label}` is filled and the split's dates come from this frame"
        )
    target_mean, target_std = 0.0, 1.0
    if target == "return":
        target_mean = float(targets[train_rows].mean())
        target_std = float(targets[train_rows].std()) or 1.0
    scaled_targets = torch.from_numpy(((targets - target_mean) / target_std).astype(np.float32))
    features = torch.from_numpy(panel)
    row_index = torch.from_numpy(positions)

    def samples(mask: np.ndarray) -> Batches:
        where = torch.from_numpy(np.flatnonzero(mask))
        return Batches(features, scaled_targets[where], row_index[where], lookback)

    return TrainingSamples(
        train=samples(train_rows),
        validation=samples(validation_rows),
        feature_columns=feature_columns,
        scaler=scaler,
        target_mean=target_mean,
        target_std=target_std,
    )


class BoostedTreesConfig(BaseModel):
    """LightGBM's settings for the market's gradient-boosted baseline (`finpipe.market.boosted`);
    defaults chosen on validation IC on eight 200 x 1,000 synthetic panels (README); learning
    rate 0.1 and patience 30 (were 0.02 and 100), 63 bins found on at most 50,000 rows (were
    255 on 200,000) for fit time: about the same validation IC in a fifth of the trees and
    CPU time (issue #28's peer benchmark). Patience 30 rather than 40 kept the validation IC
    of six of seven 200 x 1,000 panels (seeds 3-9) within 1e-4, lowered one by 0.006, and
    saved 3-35% of the CPU."""

    learning_rate: float = Field(0.1, gt=0, le=1, description="Shrinkage per tree.")
    num_leaves: int = Field(7, ge=2, description="Leaves per tree.")
    min_leaf_fraction: float = Field(
        0.01,
        gt=0,
        lt=0.5,
        description=(
            "Smallest leaf, as a share of the training rows (LightGBM's min_data_in_leaf, at "
            "least 20): about 1,000 rows at 200 tickers x 3 years."
        ),
    )
    feature_fraction: float = Field(0.8, gt=0, le=1, description="Features drawn per tree.")
    bagging_fraction: float = Field(0.8, gt=0, le=1, description="Rows drawn per tree.")
    lambda_l2: float = Field(10.0, ge=0, description="L2 penalty on leaf values.")
    max_rounds: int = Field(2000, ge=1, description="Upper bound on trees.")
    patience: int = Field(
        30, ge=1, description="Stop after this many trees without a higher validation IC."
    )
    threads: int = Field(1, ge=1, description="LightGBM threads.")

    def lightgbm_params(self, train_rows: int, seed: int) -> dict[str, object]:
        """The parameters `lgb.train` takes, for `train_rows` training rows."""
        return {
            "objective": "regression",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": max(20, int(self.min_leaf_fraction * train_rows)),
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1 if self.bagging_fraction < 1 else 0,
            "lambda_l2": self.lambda_l2,
            "max_bin": 63,
            "bin_construct_sample_cnt": 50_000,
            "num_threads": self.threads,
            "seed": seed,
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }


# A market model kind as a config names it ('cnn' is read as 'tcn').
KindName = Annotated[MarketModelKind, BeforeValidator(canonical_kind)]


class MarketTrainingConfig(BaseModel):
    """Hyper-parameters of a nightly market retrain (also the Prefect form and MLflow params)."""

    horizon: int = Field(5, ge=1, le=60, description="Forward-return horizon h in trading days.")
    models: list[KindName] = Field(
        default_factory=lambda: list(DEFAULT_MODELS),
        description=(
            "Candidates to train and compare: mlp, gru, tcn (temporal CNN; 'cnn' is accepted "
            "for it), lgbm (LightGBM on one feature row, the gradient-boosted baseline) and "
            "ensemble (the z-scored average, or validation-fitted stack, of the models listed "
            "beside it)."
        ),
    )
    validation_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of dates.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of dates.")
    embargo: int | None = Field(
        None, ge=0, description="Dates dropped between windows; default (and minimum) = horizon."
    )
    history_dates: int | None = Field(
        756,
        ge=50,
        description=(
            "Train on the last N dates only (default 756, three years; None: all). Bounds the "
            "memory and time of a retrain however long the stored history grows."
        ),
    )
    history_start: dt.date | None = Field(
        None,
        description=(
            "Train on dates from this day on only (None: no start). With history_dates as well, "
            "the later of the two starts applies."
        ),
    )
    hidden: int = Field(64, ge=4, description="Hidden units.")
    layers: int = Field(2, ge=1, le=6, description="Hidden layers (MLP) / recurrent layers.")
    dropout: float = Field(0.1, ge=0, lt=1)
    lookback: int = Field(20, ge=2, le=250, description="Days of history a GRU/TCN sees.")
    batch_size: int = Field(512, ge=16)
    max_epochs: MaxEpochs = 30
    patience: Patience = 5
    learning_rate: LearningRate = 1e-3
    weight_decay: WeightDecay = 1e-4
    seed: int = 0
    seed_average: dict[KindName, Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: {MLP: 5},
        description=(
            "Nets averaged per kind (seed averaging, `TrainConfig.seeds`; a kind not listed: "
            "one net). Five MLPs from consecutive seeds raised the MLP's validation and test IC "
            "by about 0.004 on every panel measured, at five times the fit time (README)."
        ),
    )
    learning_rate_by_kind: dict[KindName, LearningRate] = Field(
        default_factory=dict,
        description=(
            "A learning rate for a kind of net instead of learning_rate (a kind not listed: "
            "learning_rate); full_rate_steps_by_kind scales it down on a large panel like any "
            'other rate. E.g. {"gru": 2e-4}, Qlib\'s GRU rate (README).'
        ),
    )
    full_rate_steps_by_kind: dict[KindName, Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: {GRU: 100},
        description=(
            "Per kind of net: optimiser steps an epoch takes at its full learning rate; an "
            "epoch of more steps (a larger panel) takes the rate x these steps / its steps "
            "(a kind not listed, or 0: never scaled). GRU 100: 5e-4 at 200 tickers x 3 years "
            "(200 steps of 512 rows), 2.1e-4 at 500 tickers, where it raised the GRU's "
            "validation IC on 4 of 5 panels; the MLP's fell when scaled, so it keeps 1e-3 "
            "(README)."
        ),
    )
    boosted_trees: BoostedTreesConfig = Field(
        default_factory=BoostedTreesConfig,
        description="The lgbm candidate's LightGBM settings (the nets' above do not apply).",
    )
    target: Literal["cross_sectional_zscore", "return"] = Field(
        "cross_sectional_zscore",
        description=(
            "What the nets learn: the forward return z-scored across tickers per date (scores "
            "for ranking, as in Qlib's CSZScoreNorm; RMSE is then in z units) or the raw return."
        ),
    )
    promotion_metric: Literal["ic", "rank_ic"] = Field(
        "ic", description="Test-window metric a challenger must beat the champion on."
    )

    @field_validator("models")
    @classmethod
    def _candidates(cls, models: list[MarketModelKind]) -> list[MarketModelKind]:
        """Each candidate once; an ensemble needs two nets to combine."""
        repeated = sorted({kind for kind in models if models.count(kind) > 1})
        if repeated:
            raise ValueError(f"models lists {repeated} more than once")
        nets = [kind for kind in models if kind != ENSEMBLE]
        if ENSEMBLE in models and len(nets) < 2:
            raise ValueError(
                f"the ensemble combines the nets trained beside it; models {models} has "
                f"{len(nets)}: list at least two of {list(NET_KINDS) + [BOOSTED]}"
            )
        return models

    def train_config(self, model: str) -> TrainConfig:
        kind = check_kind(model, NET_KINDS)
        loop = loop_settings(self)
        loop["learning_rate"] = self.learning_rate_by_kind.get(kind, self.learning_rate)
        return TrainConfig(
            model=kind,
            hidden=self.hidden,
            layers=self.layers,
            dropout=self.dropout,
            lookback=self.lookback,
            seeds=self.seed_average.get(kind, 1),
            full_rate_steps=self.full_rate_steps_by_kind.get(kind, 0),
            **loop,
        )

    @property
    def label(self) -> str:
        return f"forward_return_{self.horizon}d"
