"""MLflow "models from code" entry point for every finpipe model.

MLflow copies this file into each logged model and runs it at load time, so models are
rebuilt from code plus a saved folder (weights, scaler, feature list) — no pickled Python
objects. `model_config["loader"]` names the class ("module:Class") whose `load(dir)` reads
the folder. Do not import this module: it registers the model with MLflow as a side effect.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class FinpipeModel(PythonModel):
    """A pyfunc shell: loads the finpipe model folder and delegates `predict` to it."""

    def load_context(self, context) -> None:
        module_name, class_name = context.model_config["loader"].split(":")
        model_class = getattr(importlib.import_module(module_name), class_name)
        self.model = model_class.load(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.model.predict(model_input)


mlflow.models.set_model(FinpipeModel())
