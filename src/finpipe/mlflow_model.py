"""MLflow "models from code" entry point for every finpipe model.

MLflow copies this file into each logged model and runs it at load time, so models are
rebuilt from code plus a saved folder (weights, scaler, feature list) — no pickled Python
objects. `model_config["loader"]` names the class ("module:Class") whose `load(dir)` reads
the folder. Do not import this module: it registers the model with MLflow as a side effect.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

log = logging.getLogger("finpipe.mlflow_model")


class FinpipeModel(PythonModel):
    """A pyfunc shell: loads the finpipe model folder and delegates `predict` to it.

    A market model that reads a window of each ticker's rows (GRU, TCN, an ensemble holding
    one: `history_rows` > 1) predicts every row of its input, each from that ticker's earlier
    rows in the input, as finpipe scores: the latest date is scored as published when the
    input holds each of its tickers' last `history_rows` rows (the logged input example does).
    With fewer, the windows are zero-padded and a warning says how many dates it needs.
    """

    def load_context(self, context) -> None:
        module_name, class_name = context.model_config["loader"].split(":")
        model_class = getattr(importlib.import_module(module_name), class_name)
        self.model = model_class.load(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        shortfall = short_history(model_input, getattr(self.model, "history_rows", 1))
        if shortfall:
            log.warning(shortfall)
        return self.model.predict(model_input)


def short_history(features: pd.DataFrame, history_rows: int) -> str | None:
    """Why a model reading each ticker's last `history_rows` rows would zero-pad the windows
    of the latest date of `features`, or None when every ticker there has them."""
    if history_rows <= 1 or features.empty or not {"date", "ticker"} <= set(features.columns):
        return None
    dates = pd.to_datetime(features["date"])
    latest = dates.max()
    tickers = features.loc[dates == latest, "ticker"]
    rows = features.loc[features["ticker"].isin(tickers)].groupby("ticker").size()
    short = rows[rows < history_rows]
    if short.empty:
        return None
    return (
        f"this model reads the last {history_rows} dates of each ticker's feature rows (its "
        f"lookback) to score a date; {len(short)} of {len(rows)} tickers on {latest.date()} have "
        f"fewer (e.g. {short.index[0]}: {int(short.iloc[0])}), so their windows are zero-padded "
        f"and their scores are not the ones finpipe publishes. Pass the {history_rows} latest "
        "dates of feature rows."
    )


mlflow.models.set_model(FinpipeModel())
