"""finpipe's market models beside Microsoft Qlib's on identical data (issue #28).

`python -m benchmarks.qlib_peer --tickers 200 --days 1000 --seeds 3` (from the repository root;
developer tooling, needs the `bench` extra: `pip install -e '.[bench]'`) builds, per seed, the
planted-signal synthetic panel (`finpipe.market.synthetic`, generator seed = the seed), finpipe's
features and label (`build_market_features`, `build_market_labels`) and the nightly's training
window and split (the last `history_dates` dates, `time_split` with an embargo of the horizon, as
`MarketDomain.prepare_training` cuts them), then fits on exactly those rows and dates:

- finpipe's candidates, by default the nightly's: mlp, gru, lgbm and their ensemble
  (`fit_member` with `MarketTrainingConfig`'s defaults, or the values given with `--set`;
  `fit_ensemble` on their predictions, its fit seconds counting its members');
- Qlib's DNN (`DNNModelPytorch`) and LightGBM (`LGBModel`) through a `DatasetH`, and its GRU
  (`pytorch_gru_ts.GRU`) through a `TSDatasetH` with `step_len` = finpipe's lookback, all on a
  `DataHandlerLP` whose `StaticDataLoader` holds finpipe's feature table and label. Features
  go through Qlib's `RobustZScoreNorm` (fitted on the train dates, clipped) and `Fillna`, the
  label through `DropnaLabel` and `CSZScoreNorm`, as Qlib's Alpha158 benchmarks configure
  them; the models take Qlib's published Alpha158 benchmark hyper-parameters (`QLIB_MODELS`).

Every model is scored on the test dates with finpipe's `market_metrics` against the raw forward
return: IC, rank IC, ICIR, and the seconds its fit took (`fit_s`; Qlib's dataset preparation,
which finpipe's fit does inside `fit_market_model`, is `prepare_s`) and the process's CPU seconds
over it (`fit_cpu_s`: the steadier measure on a shared machine). Torch and LightGBM run with
`--threads` threads on both sides. `--sample datasets/stocks_ohlcv.csv.gz` runs the real sample
instead (one panel; seeds then vary only the models' seeds).

Results: `results/qlib_peer_<panel>.json` (one record per seed and model) and `.md` (mean +-
standard error over seeds, the paired finpipe - Qlib difference per model class), each with a
provenance line (date, command, commit). `--update` keeps the existing file's records of the
models a run does not fit, each with its own provenance line.

Qlib 0.9.7 needs three work-arounds here, and only here: its recorder's default file-based
MLflow store is refused by MLflow 3.17, so `qlib.init` gets a SQLite tracking URI in the work
folder; `DNNModelPytorch` compares torch versions as strings ("2.13.0" <= "2.6.0"), so on torch
2.13 its default scheduler passes the `verbose` argument torch removed: the benchmark hands it
the same `ReduceLROnPlateau` settings as a scheduler factory instead; and the DNN's logged
validation IC (Qlib's `ICLoss`) skips dates with fewer than 50 names and then stops in a
debugger, so on a smaller panel (the 5-ticker sample) that metric is replaced by NaN (the fit
early-stops on the validation loss, as before).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer

from benchmarks.provenance import provenance
from finpipe.market.candidates import MarketMember, fit_member
from finpipe.market.ensemble import fit_ensemble
from finpipe.market.features import (
    KEY_COLUMNS,
    build_market_features,
    build_market_labels,
    feature_columns_of,
)
from finpipe.market.model import ENSEMBLE, MarketTrainingConfig
from finpipe.market.schema import normalise_market_frame
from finpipe.market.synthetic import MarketSyntheticConfig, generate_market_panel
from finpipe.metrics import market_metrics
from finpipe.training import TimeSplit, time_split

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("ic", "rank_ic", "icir", "rank_icir")
ICLOSS_MIN_NAMES = 50  # qlib.contrib.meta.data_selection.utils.ICLoss skips smaller dates
# Model class of each side's models: the paired table compares like with like.
MODEL_CLASS = {"mlp": "mlp", "dnn": "mlp", "gru": "gru", "tcn": "tcn", "lgbm": "gbdt"}

# Qlib's published Alpha158 benchmark settings (examples/benchmarks/{MLP,GRU,LightGBM}), in the
# keyword names qlib 0.9.7's model classes take. `n_jobs` (DataLoader workers) is 0: on a
# shared 2-core machine worker processes only add start-up and contention.
QLIB_MODELS: dict[str, dict[str, Any]] = {
    "dnn": {
        "loss": "mse",
        "lr": 0.002,
        "optimizer": "adam",
        "max_steps": 8000,
        "batch_size": 8192,
        "weight_decay": 0.0002,
        "early_stop_rounds": 50,
        "eval_steps": 20,
    },
    "gru": {
        "hidden_size": 64,
        "num_layers": 2,
        "dropout": 0.0,
        "n_epochs": 200,
        "lr": 2e-4,
        "early_stop": 10,
        "batch_size": 800,
        "metric": "loss",
        "loss": "mse",
        "n_jobs": 0,
    },
    "lgbm": {
        "loss": "mse",
        "colsample_bytree": 0.8879,
        "learning_rate": 0.2,
        "subsample": 0.8789,
        "lambda_l1": 205.6999,
        "lambda_l2": 580.9768,
        "max_depth": 8,
        "num_leaves": 210,
    },
}

app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
log = logging.getLogger("benchmarks.qlib_peer")


# --------------------------------------------------------------------------------------------
# The panel both sides see
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerPanel:
    """finpipe's training frame (date, ticker, features, label) and its embargoed split."""

    name: str
    frame: pd.DataFrame
    features: list[str]
    split: TimeSplit
    label: str

    def rows_of(self, dates: pd.DatetimeIndex) -> pd.DataFrame:
        return self.frame[self.frame["date"].isin(dates)]


def training_panel(prices: pd.DataFrame, config: MarketTrainingConfig, name: str) -> PeerPanel:
    """Return the nightly's training window of `prices`: features joined with the label, the
    last `history_dates` dates, and the split `MarketDomain.prepare_training` makes (labelled
    dates, an embargo of at least the horizon)."""
    features = build_market_features(prices)
    labels = build_market_labels(prices, config.horizon)[[*KEY_COLUMNS, config.label]]
    frame = features.merge(labels, on=KEY_COLUMNS, how="left")
    if config.history_dates:
        keep = np.sort(frame["date"].unique())[-config.history_dates :]
        frame = frame[frame["date"].isin(keep)]
    frame = frame.sort_values(KEY_COLUMNS, kind="stable").reset_index(drop=True)
    labelled = frame.loc[frame[config.label].notna(), "date"].unique()
    split = time_split(
        pd.DatetimeIndex(np.sort(labelled)),
        validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction,
        embargo=max(config.embargo or config.horizon, config.horizon),
    )
    return PeerPanel(name, frame, feature_columns_of(frame), split, config.label)


def synthetic_prices(tickers: int, days: int, seed: int, horizon: int) -> pd.DataFrame:
    config = MarketSyntheticConfig(tickers=tickers, days=days, seed=seed, horizon=horizon)
    return generate_market_panel(config).prices


def sample_prices(path: Path) -> pd.DataFrame:
    """The real OHLCV sample as the market schema reads a delivered file."""
    return normalise_market_frame(pd.read_csv(path), source=str(path))


# --------------------------------------------------------------------------------------------
# finpipe's side
# --------------------------------------------------------------------------------------------


def test_metrics(panel: PeerPanel, predicted: pd.DataFrame) -> dict[str, float]:
    """IC, rank IC and their ICIRs of `predicted` (date, ticker, prediction) on the test dates,
    against the raw forward return: the same computation for every model."""
    test = panel.rows_of(panel.split.test_dates)[[*KEY_COLUMNS, panel.label]]
    joined = test.merge(predicted[[*KEY_COLUMNS, "prediction"]], on=KEY_COLUMNS, how="left")
    scores = market_metrics(joined, label=panel.label)
    return {name: scores[name] for name in METRICS}


def fit_finpipe(
    panel: PeerPanel,
    kind: str,
    config: MarketTrainingConfig,
    fitted_nets: dict[str, tuple[MarketMember, float, float]] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Fit finpipe's `kind` as the nightly does; return its predictions from the validation
    window on and its fit facts. The nets fitted go into `fitted_nets` (with their seconds): an
    ensemble combines those fitted before it."""
    if kind == ENSEMBLE:
        return fit_finpipe_ensemble(panel, config, fitted_nets or {})
    started, cpu_started = time.perf_counter(), time.process_time()
    fitted = fit_member(kind, panel.frame, panel.features, panel.split, config)
    fit_s = time.perf_counter() - started
    fit_cpu_s = time.process_time() - cpu_started
    predicted = fitted.predict(panel.frame, score_from=panel.split.validation_dates[0])
    validation = panel.rows_of(panel.split.validation_dates)[[*KEY_COLUMNS, panel.label]]
    validation = validation.merge(predicted, on=KEY_COLUMNS)
    facts = {
        "fit_s": fit_s,
        "fit_cpu_s": fit_cpu_s,
        "epochs": len(fitted.history),
        "best_epoch": fitted.best_epoch,
        "learning_rate": getattr(fitted, "learning_rate", None),  # the nets' applied rate
        # what a recipe is chosen on (the test window only reports)
        "validation_ic": market_metrics(validation, label=panel.label)["ic"],
    }
    if fitted_nets is not None:
        fitted_nets[kind] = (fitted, fit_s, fit_cpu_s)
    return predicted, facts


def fit_finpipe_ensemble(
    panel: PeerPanel,
    config: MarketTrainingConfig,
    fitted_nets: dict[str, tuple[MarketMember, float, float]],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The nightly's ensemble of the nets fitted before it; its `fit_s` counts the members'
    fits too (it cannot exist without them), `combine_s` its own."""
    members = {kind: model for kind, (model, _, _) in fitted_nets.items()}
    started, cpu_started = time.perf_counter(), time.process_time()
    scored = panel.frame[[*KEY_COLUMNS, panel.label]].merge(
        _member_scores(panel, members), on=KEY_COLUMNS
    )
    ensemble = fit_ensemble(
        members,
        scored,
        panel.split.validation_dates,
        label=panel.label,
        horizon=config.horizon,
    )
    prediction, _ = ensemble.combine(scored)
    combine_s = time.perf_counter() - started
    combine_cpu_s = time.process_time() - cpu_started
    predicted = scored[KEY_COLUMNS].assign(prediction=prediction)
    facts = {
        "fit_s": combine_s + sum(seconds for _, seconds, _ in fitted_nets.values()),
        "fit_cpu_s": combine_cpu_s + sum(cpu for _, _, cpu in fitted_nets.values()),
        "combine_s": combine_s,
        "members": ",".join(members),
        "combination": ensemble.combination,
        "validation_ic": ensemble.selection["validation_ic"],
    }
    return predicted, facts


def _member_scores(panel: PeerPanel, members: dict[str, MarketMember]) -> pd.DataFrame:
    """date, ticker and one column per member: its prediction from the validation window on."""
    start = panel.split.validation_dates[0]
    scored = None
    for kind, member in members.items():
        predicted = member.predict(panel.frame, score_from=start).rename(
            columns={"prediction": kind}
        )
        scored = predicted if scored is None else scored.merge(predicted, on=KEY_COLUMNS)
    if scored is None:
        raise ValueError("the ensemble needs nets fitted before it; list them first")
    return scored


# --------------------------------------------------------------------------------------------
# Qlib's side
# --------------------------------------------------------------------------------------------


def init_qlib(workdir: Path) -> None:
    """Start Qlib with its experiment records in a SQLite MLflow store (MLflow 3.17 refuses
    the file store Qlib defaults to) and no data provider (the static loader holds the data)."""
    import qlib
    from mlflow.tracking import MlflowClient

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "provider").mkdir(exist_ok=True)
    uri = f"sqlite:///{workdir / 'qlib-mlflow.db'}"
    # Created here so that its artifacts go to the work folder, not ./mlruns.
    client = MlflowClient(uri)
    if client.get_experiment_by_name("qlib_peer") is None:
        client.create_experiment("qlib_peer", artifact_location=(workdir / "artifacts").as_uri())
    qlib.init(
        provider_uri=str(workdir / "provider"),
        region="us",
        kernels=1,
        logging_level=logging.WARNING,
        exp_manager={
            "class": "MLflowExpManager",
            "module_path": "qlib.workflow.expm",
            "kwargs": {
                "uri": uri,
                "default_exp_name": "qlib_peer",
            },
        },
    )


def qlib_table(panel: PeerPanel) -> pd.DataFrame:
    """finpipe's feature table and label as Qlib's static loader wants them: index
    (datetime, instrument), columns (feature | label, name)."""
    frame = panel.frame.rename(columns={"date": "datetime", "ticker": "instrument"})
    frame = frame.set_index(["datetime", "instrument"]).sort_index()
    features = frame[panel.features].astype(np.float32)
    label = frame[[panel.label]].rename(columns={panel.label: "LABEL0"})
    return pd.concat({"feature": features, "label": label}, axis=1)


def qlib_segments(split: TimeSplit) -> dict[str, tuple[pd.Timestamp, pd.Timestamp]]:
    """finpipe's windows as Qlib segments: the embargo dates fall between them, in none."""
    return {
        name: (dates[0], dates[-1])
        for name, dates in (
            ("train", split.train_dates),
            ("valid", split.validation_dates),
            ("test", split.test_dates),
        )
    }


def qlib_dataset(panel: PeerPanel, table: pd.DataFrame, step_len: int | None) -> Any:
    """A DatasetH (step_len None) or TSDatasetH over a DataHandlerLP on the static table."""
    from qlib.data.dataset import DatasetH, TSDatasetH
    from qlib.data.dataset.handler import DataHandlerLP
    from qlib.data.dataset.loader import StaticDataLoader

    train_start, train_end = panel.split.train_dates[0], panel.split.train_dates[-1]
    handler = DataHandlerLP(
        start_time=table.index.get_level_values("datetime").min(),
        end_time=table.index.get_level_values("datetime").max(),
        data_loader=StaticDataLoader(config=table),
        infer_processors=[
            {
                "class": "RobustZScoreNorm",
                "kwargs": {
                    "fit_start_time": train_start,
                    "fit_end_time": train_end,
                    "fields_group": "feature",
                    "clip_outlier": True,
                },
            },
            {"class": "Fillna", "kwargs": {"fields_group": "feature"}},
        ],
        learn_processors=[
            "DropnaLabel",
            {"class": "CSZScoreNorm", "kwargs": {"fields_group": "label"}},
        ],
    )
    segments = qlib_segments(panel.split)
    if step_len is None:
        return DatasetH(handler=handler, segments=segments)
    return TSDatasetH(handler=handler, segments=segments, step_len=step_len)


def _plateau_scheduler(optimizer: Any) -> Any:
    """DNNModelPytorch's default scheduler without the `verbose` argument torch 2.7 removed
    (qlib 0.9.7 compares torch versions as strings and passes it on torch 2.13)."""
    import torch

    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=0.5,
        patience=10,
        threshold=0.0001,
        threshold_mode="rel",
        cooldown=0,
        min_lr=0.00001,
        eps=1e-08,
    )


def _no_validation_ic(pred: Any, target: Any, index: Any) -> Any:
    """Stands in for DNNModelPytorch's logged validation IC where Qlib's ICLoss skips every date
    (fewer than 50 names) and then stops in a debugger; the fit early-stops on the loss."""
    import torch

    return torch.tensor(float("nan"))


def qlib_model(
    name: str, n_features: int, names: int, seed: int, threads: int, budget: dict[str, int]
) -> Any:
    """Qlib's model `name` with the published settings (`budget` caps steps/epochs/rounds);
    `names` is the most tickers on one date."""
    settings = dict(QLIB_MODELS[name])
    if name == "dnn":
        from qlib.contrib.model.pytorch_nn import DNNModelPytorch

        settings["max_steps"] = budget.get("dnn_steps", settings["max_steps"])
        model = DNNModelPytorch(
            **settings,
            GPU=-1,
            seed=seed,
            scheduler=_plateau_scheduler,
            pt_model_kwargs={"input_dim": n_features, "layers": (256,)},
        )
        if names < ICLOSS_MIN_NAMES:
            model.get_metric = _no_validation_ic
        return model
    if name == "gru":
        from qlib.contrib.model.pytorch_gru_ts import GRU

        settings["n_epochs"] = budget.get("gru_epochs", settings["n_epochs"])
        # The loaders drop the last partial batch: a validation window smaller than one batch
        # (the 5-ticker sample: 565 rows) would give no validation loss at all.
        settings["batch_size"] = min(settings["batch_size"], budget["validation_rows"])
        return GRU(**settings, d_feat=n_features, GPU=-1, seed=seed)
    if name == "lgbm":
        from qlib.contrib.model.gbdt import LGBModel

        rounds = budget.get("lgbm_rounds", 1000)
        return LGBModel(**settings, num_boost_round=rounds, num_threads=threads, seed=seed)
    raise typer.BadParameter(f"unknown Qlib model {name!r}; expected one of {list(QLIB_MODELS)}")


def fit_qlib(
    panel: PeerPanel,
    table: pd.DataFrame,
    name: str,
    *,
    seed: int,
    threads: int,
    lookback: int,
    budget: dict[str, int],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Fit Qlib's `name` on the panel inside a Qlib recorder; return its test predictions."""
    from qlib.workflow import R

    started = time.perf_counter()
    dataset = qlib_dataset(panel, table, lookback if name == "gru" else None)
    prepare_s = time.perf_counter() - started
    names = int(panel.frame.groupby("date")["ticker"].size().max())
    validation_rows = int(panel.rows_of(panel.split.validation_dates)[panel.label].notna().sum())
    budget = {**budget, "validation_rows": validation_rows}
    model = qlib_model(name, len(panel.features), names, seed, threads, budget)
    with R.start(experiment_name="qlib_peer", recorder_name=f"{panel.name}-{name}"):
        started, cpu_started = time.perf_counter(), time.process_time()
        model.fit(dataset)
        fit_s = time.perf_counter() - started
        fit_cpu_s = time.process_time() - cpu_started
        scores = model.predict(dataset) if name == "gru" else model.predict(dataset, "test")
    predicted = scores.rename("prediction").reset_index()
    predicted = predicted.rename(columns={"datetime": "date", "instrument": "ticker"})
    facts: dict[str, Any] = {"fit_s": fit_s, "fit_cpu_s": fit_cpu_s, "prepare_s": prepare_s}
    if name == "dnn":
        facts["best_step"] = model.best_step
    return predicted, facts


# --------------------------------------------------------------------------------------------
# The run and its tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one invocation fits."""

    finpipe_models: list[str]
    qlib_models: list[str]
    config: MarketTrainingConfig
    threads: int
    budget: dict[str, int]


def measure_panel(panel: PeerPanel, seed: int, plan: Plan) -> list[dict[str, Any]]:
    """Fit every model of `plan` on `panel`; one record each (errors recorded, not raised)."""
    config = plan.config.model_copy(update={"seed": seed})
    nets: dict[str, tuple[MarketMember, float, float]] = {}
    fits: list[tuple[str, str, Callable[[], tuple[pd.DataFrame, dict[str, Any]]]]] = [
        ("finpipe", kind, lambda kind=kind: fit_finpipe(panel, kind, config, nets))
        for kind in plan.finpipe_models
    ]
    if plan.qlib_models:
        table = qlib_table(panel)
        fits += [
            (
                "qlib",
                name,
                lambda name=name: fit_qlib(
                    panel,
                    table,
                    name,
                    seed=seed,
                    threads=plan.threads,
                    lookback=config.lookback,
                    budget=plan.budget,
                ),
            )
            for name in plan.qlib_models
        ]
    records = []
    for side, model, fit in fits:
        record: dict[str, Any] = {
            "panel": panel.name,
            "seed": seed,
            "side": side,
            "model": model,
            "model_class": MODEL_CLASS.get(model, model),
        }
        try:
            predicted, facts = fit()
            record.update(test_metrics(panel, predicted), **facts)
        except Exception as error:  # one model's failure is a record, not a lost run
            log.exception("%s %s failed on %s", side, model, panel.name)
            record["error"] = f"{type(error).__name__}: {error}"
        print(_record_line(record), flush=True)
        records.append(record)
    return records


def _record_line(record: dict[str, Any]) -> str:
    if "error" in record:
        return f"{record['panel']} {record['side']} {record['model']}: {record['error']}"
    return (
        f"{record['panel']} {record['side']} {record['model']}: IC {record['ic']:.4f} rank IC "
        f"{record['rank_ic']:.4f} ICIR {record['icir']:.3f} fit {record['fit_s']:.1f} s"
    )


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n); NaN with one value)."""
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not array.size:
        return math.nan, math.nan
    if array.size == 1:
        return float(array[0]), math.nan
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(array.size))


def _cell(values: list[float], digits: int, missing: str = "n/a") -> str:
    mean, error = mean_and_error(values)
    if math.isnan(mean):
        return missing if not values else "n/a"
    return f"{mean:.{digits}f}" if math.isnan(error) else f"{mean:.{digits}f} ± {error:.{digits}f}"


def summary_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per side and model, mean ± standard error over the seeds."""
    ok = [r for r in records if "error" not in r]
    lines = [
        "| side | model | seeds | test IC | rank IC | ICIR | rank ICIR | fit (s) | fit CPU (s) "
        "| prepare (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = list(dict.fromkeys((r["side"], r["model"]) for r in ok))
    for side, model in keys:
        rows = [r for r in ok if (r["side"], r["model"]) == (side, model)]
        cells = [_cell([r[m] for r in rows], 4 if "ir" not in m else 3) for m in METRICS]
        timing = [
            _cell([r[key] for r in rows if key in r], 1, missing)
            for key, missing in (("fit_s", "n/a"), ("fit_cpu_s", "n/a"), ("prepare_s", "in fit"))
        ]
        lines.append(f"| {side} | {model} | {len(rows)} | " + " | ".join(cells + timing) + " |")
    return "\n".join(lines)


def paired_table(records: list[dict[str, Any]]) -> str:
    """Markdown: per model class, finpipe - Qlib test IC and rank IC paired by seed (mean ±
    standard error of the differences), and the median fit-time ratios finpipe / Qlib: wall
    seconds, and CPU seconds (the process's, all its threads: on a shared machine the steadier
    of the two; n/a for records measured before the stage recorded it)."""
    ok = [r for r in records if "error" not in r]
    lines = [
        "| class | finpipe | Qlib | seeds | IC difference | rank IC difference | fit ratio "
        "| CPU ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ours in dict.fromkeys(r["model"] for r in ok if r["side"] == "finpipe"):
        group = MODEL_CLASS.get(ours, ours)
        for theirs in dict.fromkeys(
            r["model"] for r in ok if r["side"] == "qlib" and r["model_class"] == group
        ):
            pairs = [
                (a, b)
                for a in ok
                for b in ok
                if (a["side"], a["model"], b["side"], b["model"])
                == ("finpipe", ours, "qlib", theirs)
                and (a["panel"], a["seed"]) == (b["panel"], b["seed"])
            ]
            if not pairs:
                continue
            ic = _cell([a["ic"] - b["ic"] for a, b in pairs], 4)
            rank_ic = _cell([a["rank_ic"] - b["rank_ic"] for a, b in pairs], 4)
            ratio = float(np.median([a["fit_s"] / b["fit_s"] for a, b in pairs]))
            cpu = [
                a["fit_cpu_s"] / b["fit_cpu_s"]
                for a, b in pairs
                if "fit_cpu_s" in a and "fit_cpu_s" in b
            ]
            cpu_ratio = f"{float(np.median(cpu)):.2f}" if cpu else "n/a"
            lines.append(
                f"| {group} | {ours} | {theirs} | {len(pairs)} | {ic} | {rank_ic} | {ratio:.2f} "
                f"| {cpu_ratio} |"
            )
    return "\n".join(lines)


def best_line(records: list[dict[str, Any]]) -> str:
    """One line: each side's model with the best mean test IC, and their paired difference. A
    model with no IC (a constant prediction, e.g. Qlib's LightGBM finding no split) has no rank
    here."""
    ok = [r for r in records if "error" not in r]
    best = {}
    for side in ("finpipe", "qlib"):
        means = {
            m: mean_and_error([r["ic"] for r in ok if (r["side"], r["model"]) == (side, m)])[0]
            for m in {r["model"] for r in ok if r["side"] == side}
        }
        scored = {m: value for m, value in means.items() if math.isfinite(value)}
        if not scored:
            return ""
        best[side] = max(scored, key=lambda m: scored[m])
    ours, theirs = (
        {
            (r["panel"], r["seed"]): r["ic"]
            for r in ok
            if (r["side"], r["model"]) == (side, best[side])
        }
        for side in ("finpipe", "qlib")
    )
    both = sorted(set(ours) & set(theirs))
    difference = _cell([ours[k] - theirs[k] for k in both], 4)
    return (
        f"Best by mean test IC: finpipe {best['finpipe']}, Qlib {best['qlib']}; paired "
        f"difference {difference} over {len(both)} seed(s)."
    )


def write_results(
    records: list[dict[str, Any]],
    out: Path,
    name: str,
    command: str,
    about: str,
    *,
    update: bool = False,
    added: list[Path] | None = None,
) -> Path:
    """Write `<name>.json` (records) and `<name>.md` (provenance, tables) under `out`.

    With `update`, the records of an existing `<name>.json` whose side, model and seed this run
    did not fit are kept beside the new ones, each with the provenance line it was measured under
    (the .md lists every line with the models it covers). The records of each `added` results
    file (runs made in other processes at the same time) join them the same way, with their
    own provenance lines."""
    out.mkdir(parents=True, exist_ok=True)
    line = provenance(command)
    records = [{**r, "provenance": line} for r in records]
    path = out / f"{name}.json"
    for other in added or []:
        records = _merged(records, json.loads(other.read_text()))
    if update and path.is_file():
        records = _merged(records, json.loads(path.read_text()))
    path.write_text(
        json.dumps({"provenance": line, "about": about, "records": records}, indent=1) + "\n"
    )
    errors = [r for r in records if "error" in r]
    lines = list(dict.fromkeys(r["provenance"] for r in records)) or [line]
    covers = {
        each: ", ".join(
            dict.fromkeys(f"{r['side']} {r['model']}" for r in records if r["provenance"] == each)
        )
        for each in lines
    }
    text = [
        f"# finpipe beside Qlib: {about}",
        "",
        *(lines if len(lines) == 1 else [f"- {covers[each]}: {each}" for each in lines]),
        "",
        summary_table(records),
        "",
        "Paired by seed (finpipe - Qlib; fit ratio = finpipe / Qlib, median):",
        "",
        paired_table(records),
        "",
        best_line(records),
        "",
    ]
    text += [f"- error: {_record_line(r)}" for r in errors]
    path = out / f"{name}.md"
    path.write_text("\n".join(text) + "\n")
    return path


def _merged(records: list[dict[str, Any]], earlier: dict[str, Any]) -> list[dict[str, Any]]:
    """`earlier`'s records (a results file's) of the side, model and seed `records` lacks,
    with their provenance, before `records` (runs split by seed merge too)."""
    fitted = {(r["side"], r["model"], r["seed"]) for r in records}
    return [
        {"provenance": earlier["provenance"], **r}
        for r in earlier["records"]
        if (r["side"], r["model"], r["seed"]) not in fitted
    ] + records


def _overrides(values: list[str]) -> dict[str, Any]:
    """`--set name=value` pairs; a value starting with `{` or `[` is read as JSON
    (`{"gru": 3}`), any other is passed as text (pydantic converts `2e-4` or `true`)."""
    pairs: dict[str, Any] = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set takes name=value, got {item!r}")
        key, text = key.strip(), text.strip()
        try:
            pairs[key] = json.loads(text) if text.startswith(("{", "[")) else text
        except json.JSONDecodeError as error:
            raise typer.BadParameter(f"--set {key}: {text!r} is not JSON ({error})") from None
    return pairs


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def measure(
    plan: Plan, seed_list: range, sample: Path | None, tickers: int, days: int
) -> tuple[list[dict[str, Any]], str]:
    """Fit `plan` on each seed's panel (or on the real `sample` with each seed); return the
    records and the description of the panels and windows."""
    config = plan.config
    records: list[dict[str, Any]] = []
    if sample is not None:
        panel = training_panel(sample_prices(sample), config, sample.name.split(".")[0])
        about = (
            f"{sample.name}, {panel.frame['ticker'].nunique()} tickers (one panel: the seeds "
            "vary the models only, so ± is their spread, not the test window's sampling error)"
        )
        for seed in seed_list:
            records += measure_panel(panel, seed, plan)
    else:
        about = f"synthetic {tickers} tickers x {days} days"
        for seed in seed_list:
            prices = synthetic_prices(tickers, days, seed, config.horizon)
            panel = training_panel(prices, config, f"synthetic-{tickers}x{days}-seed{seed}")
            records += measure_panel(panel, seed, plan)
    split = panel.split
    about += (
        f"; train {len(split.train_dates)}, validation {len(split.validation_dates)}, test "
        f"{len(split.test_dates)} dates, embargo {split.embargo}; threads {plan.threads}"
    )
    if config.model_fields_set:
        about += "; finpipe settings " + ", ".join(
            f"{key}={getattr(config, key)}" for key in sorted(config.model_fields_set)
        )
    return records, about


@app.command()
def main(
    tickers: Annotated[int, typer.Option(min=5, help="Synthetic panel: tickers.")] = 200,
    days: Annotated[int, typer.Option(min=305, help="Synthetic panel: trading days.")] = 1000,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds 0..n-1 (panel and models).")] = 3,
    first_seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    sample: Annotated[
        Path | None, typer.Option(help="A real OHLCV file instead of the synthetic panel.")
    ] = None,
    finpipe: Annotated[
        str, typer.Option(help="finpipe candidates, comma-separated (ensemble last).")
    ] = "mlp,gru,lgbm,ensemble",
    qlib: Annotated[str, typer.Option(help="Qlib models: dnn, gru, lgbm ('' for none).")] = (
        "dnn,gru,lgbm"
    ),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="MarketTrainingConfig field=value (repeatable)."),
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="Torch / LightGBM threads.")] = 1,
    qlib_dnn_steps: Annotated[int | None, typer.Option(help="Cap Qlib DNN steps.")] = None,
    qlib_gru_epochs: Annotated[int | None, typer.Option(help="Cap Qlib GRU epochs.")] = None,
    lgbm_rounds: Annotated[int | None, typer.Option(help="Cap LightGBM rounds.")] = None,
    name: Annotated[str | None, typer.Option(help="Results file name (no suffix).")] = None,
    update: Annotated[
        bool,
        typer.Option(
            help="Keep an existing results file's records of the models (and seeds) this "
            "run does not fit."
        ),
    ] = False,
    add: Annotated[
        list[Path] | None,
        typer.Option(
            help="Another run's results .json (e.g. one fitted in a parallel process) whose "
            "records join this file's, each with its own provenance (repeatable)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Results folder.")] = RESULTS,
    workdir: Annotated[Path | None, typer.Option(help="Qlib's scratch folder.")] = None,
) -> None:
    """Fit finpipe's and Qlib's market models on the same panels; write the side-by-side table."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(threads)
    config = MarketTrainingConfig.model_validate(_overrides(set_ or []))
    budget = {
        key: value
        for key, value in (
            ("dnn_steps", qlib_dnn_steps),
            ("gru_epochs", qlib_gru_epochs),
            ("lgbm_rounds", lgbm_rounds),
        )
        if value is not None
    }
    plan = Plan(_names(finpipe), _names(qlib), config, threads, budget)
    if plan.qlib_models:
        init_qlib(workdir or Path(tempfile.mkdtemp(prefix="finpipe-qlib-peer-")))

    if plan.finpipe_models or plan.qlib_models or not add:
        records, about = measure(plan, range(first_seed, first_seed + seeds), sample, tickers, days)
    else:  # only merging other runs' files: their panels' description
        records, about = [], json.loads(add[0].read_text())["about"]
    command = "python -m benchmarks.qlib_peer " + shlex.join(sys.argv[1:])
    default = "qlib_peer_sample" if sample is not None else "qlib_peer"
    path = write_results(records, out, name or default, command, about, update=update, added=add)
    written = json.loads(path.with_suffix(".json").read_text())["records"]
    print(summary_table(written))
    print()
    print(paired_table(written))
    print(best_line(written))
    print(f"results: {path}")


if __name__ == "__main__":
    app()
