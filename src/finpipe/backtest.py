"""Walk-forward backtests of the market models: retrained on schedule through the past, each
window scored out of sample, and the signal traded on paper (`finpipe.portfolio`).

A backtest from `start` to `end` cuts the sessions of the market's calendar into windows of
`retrain_every` sessions. The window of retrain date R:

- **trains** with the nightly's own code (`fit_market_model`, one fit per model kind, the
  scaler and target statistics fitted on the window's training dates only) on feature rows
  dated before R, labelled from validated prices dated before R. A label at t is the return to
  the ticker's row h sessions later (none across a halt), so every label the window sees was
  realised before R: the last labelled date is `horizon` sessions before R (the embargo at the
  cut-off).
  The labelled dates are split chronologically into train and validation (early stopping)
  with an embargo of `max(embargo, horizon)` dates between them; there is no test set: the
  window's own out-of-sample dates are its test. `train_window` None trains on every labelled
  date before the cut-off (expanding); N on the last N (rolling);
- **scores** the dates from R up to the day before the next retrain date, each from feature
  rows up to that date (a sequence model reads the previous `lookback` rows).

Nothing a window computes depends on data dated at or after its next retrain date, and its
model on nothing dated at or after R (tests/test_backtest.py changes that data and checks).

Outputs go to the backtest's own store (`Storage.backtest_store(name)`: `backtests/<name>/`),
never to the nightly's `predictions/`:

    predictions/market/YYYY-MM-DD/part-0.parquet   date, ticker, model, prediction, retrain_date
    state/market/windows/<R>.json                   the window's record

A window is the unit of work. Its record is written last, after its predictions, and holds a
fingerprint of what it depends on: the training parameters, its dates and the content
fingerprints (`Storage.partition_fingerprints`) of every partition it reads. A re-run redoes
only the windows without a record, with a record of another fingerprint (parameters or data
changed) or with a missing prediction partition; the others are read back as they are. The
portfolio parameters (`top_k`, `cost_bps`, ...) are not part of a window: changing them
re-evaluates without retraining.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from finpipe import plots, portfolio, tracking
from finpipe.errors import ConfigError, FinpipeError
from finpipe.ingest import BATCH_COLUMN
from finpipe.market.boosted import FittedMarketBoostedTrees
from finpipe.market.candidates import MarketMember, fit_member, member_loader
from finpipe.market.ensemble import FittedMarketEnsemble, fit_ensemble
from finpipe.market.features import KEY_COLUMNS, build_market_labels, feature_columns_of
from finpipe.market.model import (
    ENSEMBLE,
    FittedMarketModel,
    MarketTrainingConfig,
)
from finpipe.market.pipeline import ENSEMBLE_LOADER, learnt_through
from finpipe.market.schema import DOMAIN, price_column
from finpipe.market.synthetic import ORACLE
from finpipe.metrics import market_metrics
from finpipe.settings import Settings, describe_invalid
from finpipe.storage import Storage, check_name
from finpipe.training import TimeSplit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("finpipe.backtest")

WINDOWS = "windows"
PREDICTIONS = "predictions"
# Logging to MLflow and drawing figures, one window at a time: matplotlib's pyplot is not
# thread-safe, and a SQLite tracking store takes one writer at a time anyway.
_TRACKING = threading.Lock()


class BacktestIncomplete(FinpipeError):
    """Some windows of a backtest failed; the others are done and recorded, and a re-run
    redoes only the failed ones."""


# -- parameters ----------------------------------------------------------------------------
class BacktestConfig(BaseModel):
    """What a backtest runs: its dates, retrain schedule, models and portfolio parameters."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(
        "default", description="Names the backtest's store, backtests/<name>/ (a-z, 0-9, _)."
    )
    start: dt.date = Field(description="First date scored out of sample.")
    end: dt.date = Field(description="Last date scored out of sample, included.")
    retrain_every: int = Field(
        63, ge=1, le=2520, description="Sessions between retrains (21: monthly, 63: quarterly)."
    )
    train_window: int | None = Field(
        None,
        ge=20,
        description="Labelled dates each retrain learns from: None every date before the "
        "cut-off (expanding), N the last N (rolling).",
    )
    top_k: int = Field(10, ge=1, description="Names held on each side of a portfolio.")
    n_drop: int | None = Field(
        None,
        ge=1,
        description="Names the turnover-limited long-only portfolio may replace a day "
        "(default top_k // 5, at least 1).",
    )
    cost_bps: float = Field(10.0, ge=0, le=1000, description="Cost in bps of traded value.")
    training: MarketTrainingConfig = Field(
        default_factory=lambda: MarketTrainingConfig(history_dates=None),
        description="The nightly's training parameters (models, horizon, epochs, ...).",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_name(value, "backtest name")

    @model_validator(mode="after")
    def _ordered(self) -> BacktestConfig:
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self

    @property
    def horizon(self) -> int:
        return self.training.horizon

    @property
    def label(self) -> str:
        return self.training.label

    @property
    def replacements(self) -> int:
        """Names the turnover-limited portfolio replaces a day at most."""
        return self.n_drop or max(1, self.top_k // 5)

    def window_params(self) -> dict[str, object]:
        """The parameters a window's output depends on (its fingerprint's part)."""
        return {
            "training": self.training.model_dump(mode="json"),
            "train_window": self.train_window,
        }

    def to_params(self) -> dict[str, str | int | float]:
        """Flat parameters for the MLflow run."""
        params: dict[str, str | int | float] = {
            "name": self.name,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "retrain_every": self.retrain_every,
            "train_window": self.train_window or "expanding",
            "top_k": self.top_k,
            "n_drop": self.replacements,
            "cost_bps": self.cost_bps,
        }
        params.update({k: str(v) for k, v in self.training.model_dump().items()})
        return params


# The backtest's own fields: a `training` override naming one would be silently replaced.
OWN_TRAINING_FIELDS = ("models", "horizon", "history_dates")


def backtest_training(
    training: Mapping[str, object], models: Sequence[str], horizon: int
) -> dict[str, object]:
    """Return the training overrides of every window: `training` with the backtest's models and
    horizon (and no history limit: `train_window` says what a window learns from); ConfigError
    when `training` sets one of those itself, which would be silently replaced."""
    taken = [name for name in OWN_TRAINING_FIELDS if name in training]
    if taken:
        raise ConfigError(
            f"training sets {', '.join(taken)}, which the backtest sets itself: use its "
            "models and horizon fields (and train_window for the history each window reads)"
        )
    return {**training, "models": list(models), "horizon": horizon, "history_dates": None}


def backtest_config(**values: object) -> BacktestConfig:
    """Return the checked config, or ConfigError saying which parameter is wrong."""
    try:
        return BacktestConfig.model_validate(values)
    except ValidationError as error:  # one line: each field, its value, what it takes
        raise ConfigError(f"invalid backtest parameters: {describe_invalid(error)}") from None
    except ValueError as error:
        raise ConfigError(f"invalid backtest parameters: {error}") from None


DEMO_NAME = "demo"


def demo_backtest_parameters(
    storage: Storage, *, sessions: int = 60, windows: int = 3
) -> dict[str, object]:
    """Return the `backtest` flow's parameters for the short backtest `finpipe demo` runs
    after the market nights: the last `sessions` stored feature dates in `windows` retrains,
    one small MLP a window (one seed, a few epochs), one window at a time in the flow's
    process (no worker processes to start), `top_k` an eighth of the universe (1 to 10).
    """
    days = storage.partition_dates("features", DOMAIN)
    if len(days) < sessions:
        raise ConfigError(f"the demo backtest needs {sessions} feature dates, found {len(days)}")
    tickers = storage.read_partition("features", DOMAIN, days[-1])["ticker"].nunique()
    return {
        "name": DEMO_NAME,
        "start": days[-sessions],
        "end": days[-1],
        "retrain_every": -(-sessions // windows),
        "models": ["mlp"],
        "top_k": max(1, min(10, tickers // 8)),
        "cost_bps": 10.0,
        "concurrency": 1,
        "training": {"max_epochs": 3, "hidden": 16, "seed_average": {"mlp": 1}},
    }


# -- the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """One retrain: the model learns from data before `retrain` and scores `retrain` to `last`."""

    retrain: dt.date
    last: dt.date

    @property
    def key(self) -> str:
        return self.retrain.isoformat()

    def to_dict(self) -> dict[str, str]:
        return {"retrain": self.retrain.isoformat(), "last": self.last.isoformat()}

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> Window:
        return cls(dt.date.fromisoformat(data["retrain"]), dt.date.fromisoformat(data["last"]))


def check_within_data(end: dt.date, last_validated: dt.date | None) -> None:
    """Raise ConfigError when a backtest's `end` is after the last date with validated data:
    the windows past it would train and score nothing (each retrain a copy of the last)."""
    if last_validated is None:
        raise ConfigError("no validated market data yet: ingest the history first")
    if end > last_validated:
        raise ConfigError(
            f"the backtest ends on {end}, after the last date with validated market data, "
            f"{last_validated}: set end to {last_validated} or earlier, or ingest the "
            "deliveries after it first"
        )


def plan_windows(sessions: Sequence[dt.date], retrain_every: int) -> list[Window]:
    """Return the windows of `sessions` (in order): a retrain every `retrain_every` sessions
    from the first, each scoring its sessions up to the next retrain."""
    if not sessions:
        raise ConfigError("the backtest's range has no sessions on the market's calendar")
    if retrain_every < 1:
        raise ConfigError(f"retrain_every must be at least 1 session, got {retrain_every}")
    days = sorted(sessions)
    return [
        Window(days[i], days[min(i + retrain_every, len(days)) - 1])
        for i in range(0, len(days), retrain_every)
    ]


@dataclass(frozen=True)
class WindowReads:
    """The partitions a window reads: feature dates (history, then scored) and price dates."""

    features: tuple[dt.date, ...]
    prices: tuple[dt.date, ...]


def window_reads(
    window: Window, feature_dates: Sequence[dt.date], config: BacktestConfig
) -> WindowReads:
    """Return the partitions `window` reads, from the stored feature dates.

    History: every date before the retrain date (expanding), or the last `train_window`
    labelled dates plus the `horizon` unlabelled ones before the cut-off and `lookback` dates
    of sequence history (rolling). Prices are read for the history dates only; features also
    for the scored dates.
    """
    before = [d for d in feature_dates if d < window.retrain]
    scored = [d for d in feature_dates if window.retrain <= d <= window.last]
    if config.train_window is not None:
        keep = config.train_window + config.horizon + config.training.lookback
        before = before[-keep:]
    return WindowReads(features=tuple(before + scored), prices=tuple(before))


# -- one window ----------------------------------------------------------------------------
def training_frame(
    window: Window, features: pd.DataFrame, prices: pd.DataFrame, config: BacktestConfig
) -> pd.DataFrame:
    """Return the feature rows dated before the retrain date with their labels, computed from
    the prices dated before it only (a label not realised by then is NaN)."""
    cutoff = pd.Timestamp(window.retrain)
    history = features[features["date"] < cutoff]
    known = prices[prices["date"] < cutoff].drop(columns=[BATCH_COLUMN], errors="ignore")
    labels = build_market_labels(known, config.horizon)[[*KEY_COLUMNS, config.label]]
    frame = history.drop(columns=[BATCH_COLUMN], errors="ignore").merge(
        labels, on=KEY_COLUMNS, how="left"
    )
    return frame.sort_values(KEY_COLUMNS, kind="stable").reset_index(drop=True)


def window_split(frame: pd.DataFrame, window: Window, config: BacktestConfig) -> TimeSplit:
    """Return the window's train and validation dates (no test: the scored dates are its test).

    The labelled dates (the last `train_window` of them when rolling) are split in time order:
    validation is the last `validation_fraction`, after an embargo of `max(embargo, horizon)`
    dates. ConfigError when the window has too little labelled history.
    """
    training = config.training
    labelled = pd.DatetimeIndex(np.sort(frame.loc[frame[config.label].notna(), "date"].unique()))
    if config.train_window is not None:
        labelled = labelled[-config.train_window :]
    embargo = max(training.embargo or training.horizon, training.horizon)
    n_validation = max(1, round(training.validation_fraction * len(labelled)))
    n_train = len(labelled) - n_validation - embargo
    if n_train < 20:
        raise ConfigError(
            f"window {window.key}: {len(labelled)} labelled dates before the cut-off, too few "
            f"for {n_validation} validation dates, an embargo of {embargo} and 20 training "
            "dates; start the backtest later or load more history"
        )
    return TimeSplit(
        train_dates=labelled[:n_train],
        validation_dates=labelled[n_train + embargo :],
        test_dates=pd.DatetimeIndex([]),
        embargo=embargo,
    )


WindowModel = MarketMember | FittedMarketEnsemble


@dataclass
class WindowFit:
    """A window's fitted models, their validation metrics and its out-of-sample predictions."""

    window: Window
    split: TimeSplit
    models: dict[str, WindowModel]
    validation: dict[str, dict[str, float]]
    predictions: pd.DataFrame  # date, ticker, model, prediction, retrain_date
    training_rows: int
    learnt_through: str  # the last date whose price the models learnt from (each records it)
    example: pd.DataFrame  # a few scored feature rows (the logged models' input example)


def fit_window(
    window: Window,
    features: pd.DataFrame,
    prices: pd.DataFrame,
    config: BacktestConfig,
    say: Callable[[str], None] = log.info,
) -> WindowFit:
    """Train every model of `config` for `window` and score its dates (see the module doc).

    `features` and `prices` are the rows of `window_reads`; nothing dated after `window.last`
    is read, and the models read nothing dated on or after `window.retrain`. The nets are
    fitted as the nightly fits them; an `ensemble` combines them with weights chosen on the
    window's validation dates (`finpipe.market.ensemble`). Each model records the last date
    whose price it learnt from (`learnt_through`, the day before `window.retrain`), as the
    nightly's do: one promoted or compared later is never judged on a date up to it.
    """
    label = config.label
    frame = training_frame(window, features, prices, config)
    split = window_split(frame, window, config)
    through = learnt_through(frame["date"], split, config.horizon)
    columns = feature_columns_of(frame)
    cutoff, last = pd.Timestamp(window.retrain), pd.Timestamp(window.last)
    scoring = features[features["date"] <= last].drop(columns=[BATCH_COLUMN], errors="ignore")
    # One column per model: its predictions on the validation dates and on the scored dates.
    on_validation = frame.loc[frame["date"].isin(split.validation_dates), [*KEY_COLUMNS, label]]
    on_scored = scoring.loc[scoring["date"] >= cutoff, KEY_COLUMNS]
    models: dict[str, WindowModel] = {}
    nets: dict[str, MarketMember] = {}
    for kind in [k for k in config.training.models if k != ENSEMBLE]:
        fitted = fit_member(kind, frame, columns, split, config.training)
        fitted.learnt_through = through
        # scored with the rows before them as sequence history, as the nightly scores
        validated = fitted.predict(frame, score_from=split.validation_dates[0])
        on_validation[kind] = validated["prediction"].reindex(on_validation.index)
        on_scored[kind] = fitted.predict(scoring, score_from=cutoff)["prediction"]
        nets[kind] = models[kind] = fitted
    validation = {kind: _validation_metrics(on_validation, kind, label) for kind in nets}
    for name, member in nets.items():
        if isinstance(member, FittedMarketBoostedTrees) and "validation_ic" in member.selection:
            # their kept round was chosen on these dates: the IC they report is cross-fitted,
            # as the nightly's (finpipe.market.boosted)
            validation[name]["ic"] = member.selection["validation_ic"]
    if ENSEMBLE in config.training.models:
        ensemble = fit_ensemble(
            nets, on_validation, split.validation_dates, label=label, horizon=config.horizon
        )
        ensemble.learnt_through = through
        on_validation[ENSEMBLE], _ = ensemble.combine(on_validation)
        on_scored[ENSEMBLE], _ = ensemble.combine(on_scored)
        validation[ENSEMBLE] = _validation_metrics(on_validation, ENSEMBLE, label)
        validation[ENSEMBLE]["ic"] = ensemble.selection["validation_ic"]  # cross-fitted if stacked
        models[ENSEMBLE] = ensemble
    for name, metrics in validation.items():
        say(f"window {window.key}: {name} validation IC {metrics['ic']:.4f}")
    predictions = on_scored.melt(
        id_vars=KEY_COLUMNS, value_vars=list(models), var_name="model", value_name="prediction"
    ).assign(retrain_date=cutoff)
    return WindowFit(
        window=window,
        split=split,
        models=models,
        validation=validation,
        predictions=predictions.sort_values(["date", "model", "ticker"]).reset_index(drop=True),
        training_rows=int(frame["date"].isin(split.train_dates).sum()),
        learnt_through=through,
        example=scoring.loc[scoring["date"] >= cutoff, [*KEY_COLUMNS, *columns]].head(5),
    )


def _validation_metrics(scored: pd.DataFrame, kind: str, label: str) -> dict[str, float]:
    """IC-type metrics of column `kind` on the validation dates (free of units, so also right
    for z-score targets and the ensemble's z units)."""
    metrics = market_metrics(scored, prediction=kind, label=label)
    wanted = ("ic", "rank_ic", "icir", "rank_icir", "top_minus_bottom", "n_dates", "n_rows")
    return {name: float(metrics[name]) for name in wanted}


def _model_record(model: WindowModel) -> tuple[dict[str, str | int | float], dict[str, float]]:
    """The parameters and metrics a window model's run records besides the window's."""
    if isinstance(model, FittedMarketEnsemble):
        params: dict[str, str | int | float] = {
            "members": ",".join(model.members),
            "combination": model.combination,
        }
        weights = {f"weight_{kind}": w for kind, w in model.weights.items()}
        return params, {**weights, **model.selection}
    if isinstance(model, FittedMarketModel):
        return dict(model.config.to_params()), {"best_epoch": model.best_epoch}
    settings = {k: v for k, v in model.settings.items() if isinstance(v, str | int | float)}
    return {"model": "lgbm", **settings}, {"best_epoch": model.best_epoch}


def log_window_models(fit: WindowFit, parent_run_id: str, config: BacktestConfig) -> dict:
    """Log each of the window's models as a run nested in the backtest's run (never
    registered); return {model kind: run id}."""
    split, window = fit.split, fit.window
    dates = {
        "retrain_date": window.key,
        "scored_through": window.last.isoformat(),
        "train_start": str(split.train_dates[0].date()),
        "train_end": str(split.train_dates[-1].date()),
        "validation_start": str(split.validation_dates[0].date()),
        "validation_end": str(split.validation_dates[-1].date()),
        "learnt_through": fit.learnt_through,
        "train_window": config.train_window or "expanding",
        "label": config.label,
    }
    runs = {}
    with _TRACKING:
        for kind, model in fit.models.items():
            params, metrics = _model_record(model)
            with tracking.child_run(f"{kind}-{window.key}", parent_run_id) as run_id:
                tracking.tag_run("finpipe.backtest", config.name)
                tracking.log_params({**params, **dates})
                validation = {f"validation_{k}": v for k, v in fit.validation[kind].items()}
                tracking.log_metrics({**validation, **metrics})
                if isinstance(model, FittedMarketModel):
                    for row in model.history:
                        tracking.log_epoch(row)
                    title = f"{kind}, retrain {window.key}: loss by epoch"
                    tracking.log_figures(
                        {"plots/learning_curve.png": plots.learning_curve(model.history, title)}
                    )
                tracking.log_fitted_model(
                    model,
                    name=tracking.logged_model_name(DOMAIN, kind),
                    tags={
                        tracking.DOMAIN_TAG: DOMAIN,
                        tracking.CANDIDATE_TAG: kind,
                        "finpipe.backtest": config.name,
                        "retrain_date": window.key,
                        "learnt_through": fit.learnt_through,
                    },
                    loader=ENSEMBLE_LOADER if kind == ENSEMBLE else member_loader(kind),
                    input_example=fit.example,
                    output_example=model.predict(fit.example),
                )
                runs[kind] = run_id
    return runs


# -- records, fingerprints and the plan ----------------------------------------------------
def window_record_key(store: Storage, window: Window) -> str:
    return store.state_key(DOMAIN, WINDOWS, f"{window.key}.json")


def read_window_record(store: Storage, window: Window) -> dict | None:
    """Return the record of `window`, or None when it never completed."""
    return store.read_json(window_record_key(store, window))


def data_fingerprints(
    storage: Storage, days: Mapping[str, Sequence[dt.date]]
) -> dict[str, dict[dt.date, str]]:
    """Return {layer: {day: fingerprint}} of the market partitions of `days` by layer."""
    return {
        layer: storage.partition_fingerprints(layer, DOMAIN, days=set(wanted))
        for layer, wanted in days.items()
    }


def window_fingerprint(
    config: BacktestConfig,
    window: Window,
    reads: WindowReads,
    known: Mapping[str, Mapping[dt.date, str]],
) -> str:
    """Return the SHA-256 of what `window` depends on: its parameters, its dates and the
    fingerprints (from `known`, by layer and day) of the partitions it reads."""
    payload = {
        "parameters": config.window_params(),
        "window": window.to_dict(),
        "features": [[d.isoformat(), known["features"].get(d)] for d in reads.features],
        "validated": [[d.isoformat(), known["validated"].get(d)] for d in reads.prices],
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def is_window_done(store: Storage, window: Window, fingerprint: str) -> bool:
    """Whether `window` completed with this fingerprint and its partitions are all there."""
    record = read_window_record(store, window)
    if not record or record.get("status") != "completed":
        return False
    if record.get("fingerprint") != fingerprint:
        return False
    return all(
        store.exists(store.partition_key(PREDICTIONS, DOMAIN, day)) for day in record["dates"]
    )


@dataclass(frozen=True)
class PlannedWindow:
    window: Window
    fingerprint: str
    done: bool


def plan_backtest(
    storage: Storage, config: BacktestConfig, sessions: Sequence[dt.date], *, force: bool = False
) -> list[PlannedWindow]:
    """Return the backtest's windows, each with its fingerprint and whether it is done."""
    windows = plan_windows(sessions, config.retrain_every)
    feature_dates = storage.partition_dates("features", DOMAIN, end=config.end)
    if not [d for d in feature_dates if d < windows[0].retrain]:
        raise ConfigError(
            f"no market features before {windows[0].retrain}: the first window has nothing "
            "to learn from; load history before the backtest's start"
        )
    reads = {w: window_reads(w, feature_dates, config) for w in windows}
    wanted = {
        "features": sorted({d for r in reads.values() for d in r.features}),
        "validated": sorted({d for r in reads.values() for d in r.prices}),
    }
    known = data_fingerprints(storage, wanted)
    store = storage.backtest_store(config.name)
    planned = []
    for window in windows:
        fingerprint = window_fingerprint(config, window, reads[window], known)
        done = not force and is_window_done(store, window, fingerprint)
        planned.append(PlannedWindow(window, fingerprint, done))
    return planned


@dataclass
class WindowOutcome:
    """What happened to one window (a row of the run's windows table)."""

    retrain: str
    last: str
    status: str  # completed, done earlier, failed
    dates: int = 0
    rows: int = 0
    seconds: float = 0.0
    runs: dict[str, str] = field(default_factory=dict)
    validation_ic: dict[str, float] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def run_window(
    storage: Storage,
    config: BacktestConfig,
    planned: PlannedWindow,
    *,
    parent_run_id: str | None = None,
    say: Callable[[str], None] = log.info,
) -> WindowOutcome:
    """Fit, log, score and record one window; its record is written last.

    Reads the partitions `window_reads` names, fits with `fit_window`, logs each model as a
    run nested in `parent_run_id` (none: not logged), publishes one predictions partition per
    scored date in the backtest's store and then the window record with `planned.fingerprint`.
    """
    started = time.perf_counter()
    window = planned.window
    feature_dates = storage.partition_dates("features", DOMAIN, end=window.last)
    reads = window_reads(window, feature_dates, config)
    features = storage.read_partitions("features", DOMAIN, days=reads.features)
    prices = storage.read_partitions("validated", DOMAIN, days=reads.prices)
    fit = fit_window(window, features, prices, config, say)
    runs = log_window_models(fit, parent_run_id, config) if parent_run_id else {}
    store = storage.backtest_store(config.name)
    dates = []
    for day, rows in fit.predictions.groupby("date", sort=True):
        store.write_partition(PREDICTIONS, DOMAIN, day, rows)
        dates.append(pd.Timestamp(day).date().isoformat())
    seconds = round(time.perf_counter() - started, 3)
    outcome = WindowOutcome(
        retrain=window.key,
        last=window.last.isoformat(),
        status="completed",
        dates=len(dates),
        rows=len(fit.predictions),
        seconds=seconds,
        runs=runs,
        validation_ic={kind: metrics["ic"] for kind, metrics in fit.validation.items()},
    )
    store.write_json(
        window_record_key(store, window),
        {
            **outcome.to_dict(),
            "fingerprint": planned.fingerprint,
            "dates": dates,
            "train_start": str(fit.split.train_dates[0].date()),
            "train_end": str(fit.split.train_dates[-1].date()),
            "validation_end": str(fit.split.validation_dates[-1].date()),
            "learnt_through": fit.learnt_through,
            "training_rows": fit.training_rows,
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )
    return outcome


def outcome_from_record(store: Storage, window: Window) -> WindowOutcome:
    """Return a `done earlier` outcome for a window a previous run completed."""
    record = read_window_record(store, window) or {}
    return WindowOutcome(
        retrain=window.key,
        last=window.last.isoformat(),
        status="done earlier",
        dates=len(record.get("dates", [])),
        rows=record.get("rows", 0),
        seconds=record.get("seconds", 0.0),
        runs=record.get("runs", {}),
        validation_ic=record.get("validation_ic", {}),
        message=f"completed {record.get('finished_at')}",
    )


# -- evaluation ----------------------------------------------------------------------------
STRATEGIES = ("long_short", "long_only", "long_only_limited")


@dataclass
class BacktestReport:
    """How each signal would have traded and how well it ranked (`finpipe.portfolio`)."""

    summary: pd.DataFrame  # one row per signal and strategy (and the benchmark)
    ic_by_year: pd.DataFrame  # signal, year, ic, rank_ic, icir, dates
    deciles: pd.DataFrame  # signal, decile, mean_forward_return
    daily_ic: pd.DataFrame  # signal, date, ic, rank_ic, names
    results: dict[str, dict[str, portfolio.PortfolioResult]]  # signal -> strategy -> result

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow: `<signal>/<strategy>/<figure>` and `<signal>/ic` etc."""
        out: dict[str, float] = {}
        figures = (
            "annualised_return",
            "annualised_volatility",
            "information_ratio",
            "max_drawdown",
            "hit_rate",
            "mean_turnover",
            "excess_return",
            "excess_information_ratio",
            "delisted_exits",
        )
        for row in self.summary.to_dict("records"):
            for name in figures:
                value = row.get(name)
                if value is not None and np.isfinite(value):
                    out[f"{row['signal']}/{row['strategy']}/{name}"] = float(value)
        for signal, daily in self.daily_ic.groupby("signal"):
            out[f"{signal}/ic"] = float(daily["ic"].mean())
            out[f"{signal}/rank_ic"] = float(daily["rank_ic"].mean())
            std = float(daily["ic"].std(ddof=1))
            if std > 0:
                out[f"{signal}/icir"] = float(daily["ic"].mean()) / std
        return out

    def figures(self) -> Iterator[tuple[str, Figure]]:
        """Cumulative return vs the benchmark, drawdown, IC through time and decile bars, as
        (artifact path, figure) pairs drawn one at a time: a report of many signals (two
        figures each) never holds them all open at once (pyplot warns past 20)."""
        long_short = {s: r["long_short"].net for s, r in self.results.items()}
        long_only = {s: r["long_only"].net for s, r in self.results.items()}
        first = next(iter(self.results.values()))["long_only"]
        if first.benchmark is not None:
            long_only["equal-weight universe"] = first.benchmark
        yield (
            "plots/cumulative_return.png",
            plots.cumulative_returns(
                {"long-short (net)": long_short, "long-only (net) vs benchmark": long_only},
                "cumulative return (summed daily returns, after costs)",
            ),
        )
        yield (
            "plots/drawdown.png",
            plots.drawdowns(
                long_short, "long-short drawdown (below the running peak, summed returns)"
            ),
        )
        for signal, daily in self.daily_ic.groupby("signal"):
            series = daily.set_index("date")["ic"]
            yield f"plots/ic_{signal}.png", plots.ic_by_date(series, f"{signal}: IC by date")
        for signal, table in self.deciles.groupby("signal"):
            means = table.set_index("decile")["mean_forward_return"]
            yield (
                f"plots/deciles_{signal}.png",
                plots.decile_bars(means, f"{signal}: mean forward return by prediction decile"),
            )


def forward_returns(prices: pd.DataFrame, horizon: int) -> pd.DataFrame:
    """date, ticker, forward_return: the label a prediction of that date is about."""
    labels = build_market_labels(prices.drop(columns=[BATCH_COLUMN], errors="ignore"), horizon)
    return labels.rename(columns={f"forward_return_{horizon}d": "forward_return"})[
        ["date", "ticker", "forward_return"]
    ]


def signals_of(predictions: pd.DataFrame, oracle: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    """Each model's predictions (date, ticker, prediction) and the oracle's on the rows the
    models scored (a ticker no model could score, e.g. too short a history, is left out of
    the oracle's book too, so the two are compared on one universe)."""
    signals = {
        str(model): rows[["date", "ticker", "prediction"]].reset_index(drop=True)
        for model, rows in predictions.groupby("model", sort=True)
    }
    if oracle is not None and not oracle.empty:
        scored = predictions[["date", "ticker"]].drop_duplicates()
        chosen = oracle.merge(scored, on=["date", "ticker"]).sort_values(["date", "ticker"])
        signals["oracle"] = chosen.rename(columns={"expected_forward_return": "prediction"})[
            ["date", "ticker", "prediction"]
        ].reset_index(drop=True)
    return signals


def evaluate(
    predictions: pd.DataFrame,
    prices: pd.DataFrame,
    config: BacktestConfig,
    oracle: pd.DataFrame | None = None,
) -> BacktestReport:
    """Trade each signal under `finpipe.portfolio`'s conventions and measure its ranking.

    Strategies: `long_short` (top k minus bottom k), `long_only` (top k, against the
    equal-weight universe) and `long_only_limited` (top k replacing at most `n_drop` names a
    day, Qlib's TopkDropout); all after `cost_bps`. IC against the `horizon`-day forward return.
    """
    # A session without adj_close moves by its close, as its features and labels read it.
    returns = portfolio.daily_returns(prices, price_column(prices), fallback="close")
    forward = forward_returns(prices, config.horizon)
    k, cost = config.top_k, config.cost_bps
    results: dict[str, dict[str, portfolio.PortfolioResult]] = {}
    rows, years, deciles, daily = [], [], [], []
    for signal, frame in signals_of(predictions, oracle).items():
        results[signal] = {
            "long_short": portfolio.long_short(frame, returns, k=k, cost_bps=cost),
            "long_only": portfolio.long_only(frame, returns, k=k, cost_bps=cost),
            "long_only_limited": portfolio.long_only(
                frame, returns, k=k, cost_bps=cost, n_drop=config.replacements
            ),
        }
        rows.append(portfolio.summarise(results[signal]).assign(signal=signal))
        ic = portfolio.information_coefficients(frame, forward)
        daily.append(ic.assign(signal=signal))
        if not ic.empty:
            years.append(portfolio.ic_by_year(ic).assign(signal=signal))
        by_decile = portfolio.return_by_decile(frame, forward).reset_index()
        deciles.append(by_decile.assign(signal=signal))
    first = next(iter(results.values()))["long_only"] if results else None
    if first is not None and first.benchmark is not None:
        bench = {"strategy": "benchmark", "signal": "equal_weight"}
        rows.append(pd.DataFrame([{**bench, **portfolio.risk_figures(first.benchmark).to_dict()}]))
    summary = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    order = ["signal", "strategy"]
    summary = summary[order + [c for c in summary.columns if c not in order]]
    return BacktestReport(
        summary=summary,
        ic_by_year=_stack(years, ["signal", "year", "ic", "rank_ic", "icir", "dates"]),
        deciles=_stack(deciles, ["signal", "decile", "mean_forward_return"]),
        daily_ic=_stack(daily, ["signal", "date", "ic", "rank_ic", "names"]),
        results=results,
    )


def _stack(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def read_backtest(
    storage: Storage, config: BacktestConfig
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """Return the backtest's predictions from `start` to `end`, the validated prices they are
    evaluated on (through the few sessions after `end` its returns and labels need, where
    stored) and the synthetic oracle over the same dates (None without one)."""
    store = storage.backtest_store(config.name)
    predictions = store.read_partitions(PREDICTIONS, DOMAIN, config.start, config.end)
    if predictions.empty:
        raise ConfigError(f"backtest {config.name!r} has no predictions from {config.start}")
    stored = storage.partition_dates("validated", DOMAIN, start=config.start)
    within = [d for d in stored if d <= config.end]
    after = [d for d in stored if d > config.end][: max(config.horizon, 2)]
    prices = storage.read_partitions("validated", DOMAIN, days=within + after)
    oracle = storage.read_reference(
        DOMAIN,
        ORACLE,
        filters=[
            ("date", ">=", pd.Timestamp(config.start)),
            ("date", "<=", pd.Timestamp(config.end)),
        ],
    )
    return predictions, prices, oracle


def evaluate_backtest(storage: Storage, config: BacktestConfig) -> BacktestReport:
    """Return the report of the backtest's stored predictions (`read_backtest`, `evaluate`)."""
    predictions, prices, oracle = read_backtest(storage, config)
    return evaluate(predictions, prices, config, oracle)


@contextlib.contextmanager
def backtest_run(settings: Settings, config: BacktestConfig) -> Iterator[str]:
    """Hold the backtest's MLflow run, `backtest-<name>` in the market experiment, with its
    parameters; yield its id (the parent of the windows' runs). It ends FAILED if the block
    raises."""
    tracking.use_tracking(settings, DOMAIN)
    with tracking.run(f"backtest-{config.name}") as run_id:
        tracking.tag_run("finpipe.backtest", config.name)
        tracking.log_params(config.to_params())
        yield run_id


def record_windows(outcomes: Sequence[WindowOutcome]) -> None:
    """Log the windows to the active MLflow run as `tables/windows.json`: each one's status and
    the MLflow run of each of its models. A window done by an earlier run of the backtest keeps
    its model runs nested under that run's `backtest-<name>`; this table leads to them."""
    rows = [
        {"retrain": o.retrain, "scored_to": o.last, "status": o.status, "model": kind, "run": run}
        for o in outcomes
        for kind, run in (o.runs or {"": ""}).items()
    ]
    with _TRACKING:
        tracking.log_table(pd.DataFrame(rows), "tables/windows.json")


def record_report(report: BacktestReport) -> None:
    """Log the report's metrics, tables and figures to the active MLflow run."""
    with _TRACKING:
        tracking.log_metrics(report.metrics())
        tracking.log_table(report.summary, "tables/portfolio_summary.json")
        tracking.log_table(report.ic_by_year, "tables/ic_by_year.json")
        tracking.log_table(report.deciles, "tables/return_by_decile.json")
        tracking.log_figures(report.figures())


# -- the run summary -----------------------------------------------------------------------
_COLUMNS = {
    "annualised_return": "ann. return",
    "annualised_volatility": "ann. vol",
    "information_ratio": "IR",
    "max_drawdown": "max DD",
    "hit_rate": "hit rate",
    "mean_turnover": "turnover",
    "excess_return": "excess return",
    "excess_information_ratio": "excess IR",
    # the session a book lost all its value: its figures after it are a flat 0, not a strategy
    "wiped_out": "wiped out",
    # held names sold at their last price because they stopped trading (finpipe.portfolio)
    "delisted_exits": "delisted exits",
}


def report_markdown(
    config: BacktestConfig, report: BacktestReport | None, windows: Sequence[WindowOutcome]
) -> str:
    """Return the backtest's summary for the Prefect UI: portfolios, IC by year, windows (the
    windows only when some failed and nothing was evaluated)."""
    training = config.training
    lines = [
        f"# finpipe backtest `{config.name}`: {config.start} to {config.end}",
        "",
        f"Retrain every {config.retrain_every} sessions "
        f"({config.train_window or 'expanding'} training window), models "
        f"{', '.join(training.models)}, horizon {training.horizon}, top {config.top_k}, "
        f"{config.cost_bps:g} bps; long-only limited replaces at most {config.replacements} "
        "names a day. Conventions: `finpipe.portfolio` (trade at t+1, arithmetic, 252 days).",
    ]
    if report is not None:
        lines += _report_tables(report)
    lines += [
        "",
        "## Windows",
        "| retrain | scored to | status | dates | seconds | validation IC |",
        "|---|---|---|---|---|---|",
    ]
    for item in windows:
        ics = ", ".join(f"{k} {v:.4f}" for k, v in item.validation_ic.items())
        lines.append(
            f"| {item.retrain} | {item.last} | {item.status} | {item.dates} | "
            f"{item.seconds:g} | {ics if item.status == 'completed' else item.message} |"
        )
    return "\n".join(lines)


def _report_tables(report: BacktestReport) -> list[str]:
    lines = [
        "",
        "## Portfolios (after costs)",
        "| signal | strategy | " + " | ".join(_COLUMNS.values()) + " |",
        "|---|---|" + "---|" * len(_COLUMNS),
    ]
    for row in report.summary.to_dict("records"):
        cells = [_cell(row.get(name)) for name in _COLUMNS]
        lines.append(f"| {row['signal']} | {row['strategy']} | " + " | ".join(cells) + " |")
    lines += ["", "## IC by year", "| signal | year | IC | rank IC | ICIR | dates |"]
    lines.append("|---|---|---|---|---|---|")
    for row in report.ic_by_year.to_dict("records"):
        values = [_cell(row[c]) for c in ("ic", "rank_ic", "icir")]
        lines.append(
            f"| {row['signal']} | {row['year']} | " + " | ".join(values) + f" | {row['dates']} |"
        )
    return lines


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
