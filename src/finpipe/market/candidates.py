"""The market's single models, one way to fit and read each: the nets and the boosted trees.

The nightly (`finpipe.market.pipeline`) and the backtest (`finpipe.backtest`) fit every
candidate but the ensemble through `fit_member`; the ensemble combines their predictions and
reads its members back with `load_member`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from finpipe.market.boosted import FittedMarketBoostedTrees, fit_boosted_trees
from finpipe.market.model import BOOSTED, FittedMarketModel, MarketTrainingConfig, fit_market_model
from finpipe.training import TimeSplit

MarketMember = FittedMarketModel | FittedMarketBoostedTrees
# The class MLflow's pyfunc wrapper loads each kind's folder with ("module:Class").
NET_LOADER = "finpipe.market.model:FittedMarketModel"
BOOSTED_LOADER = "finpipe.market.boosted:FittedMarketBoostedTrees"


def member_loader(kind: str) -> str:
    """The "module:Class" that reads a saved `kind` model (`finpipe.mlflow_model`)."""
    return BOOSTED_LOADER if kind == BOOSTED else NET_LOADER


def member_params(kind: str, config: MarketTrainingConfig) -> dict[str, str | int | float]:
    """The settings a `kind` fit uses, as its MLflow run's params."""
    if kind == BOOSTED:
        return {"model": BOOSTED, **config.boosted_trees.model_dump(), "seed": config.seed}
    return dict(config.train_config(kind).to_params())


def fit_member(
    kind: str,
    frame: pd.DataFrame,
    feature_columns: list[str],
    split: TimeSplit,
    config: MarketTrainingConfig,
    on_epoch: Callable[[dict], None] | None = None,
) -> MarketMember:
    """Fit candidate `kind` (a net, or the boosted trees) on `frame`'s train dates, stopping
    early on its validation dates; scaler, target statistics and trees from train dates only."""
    if kind == BOOSTED:
        return fit_boosted_trees(
            frame,
            feature_columns,
            split,
            config.boosted_trees,
            seed=config.seed,
            label=config.label,
            horizon=config.horizon,
            target=config.target,
            on_round=on_epoch,
        )
    return fit_market_model(
        frame,
        feature_columns,
        split,
        config.train_config(kind),
        label=config.label,
        horizon=config.horizon,
        target=config.target,
        on_epoch=on_epoch,
    )


def load_member(kind: str, directory: Path) -> MarketMember:
    """Read a `kind` model folder written by its `save`."""
    if kind == BOOSTED:
        return FittedMarketBoostedTrees.load(directory)
    return FittedMarketModel.load(directory)
