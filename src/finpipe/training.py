"""Generic supervised training: time split with embargo, a train-only scaler, one training loop.

Nothing here knows about a domain: `finpipe.market.model` and `finpipe.customers.model` turn
their frames into `Batches` and call `train_regressor`; the credit classifier brings its own
loss and inputs to the same `run_training_loop`. No Prefect, no MLflow: progress goes out
through `on_epoch` and the returned history.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Literal, Protocol, TypedDict, TypeVar, get_args

import numpy as np
import pandas as pd
import pydantic
import torch
import torch.nn.functional as F
from pydantic import BeforeValidator, Field
from torch import nn

from finpipe.errors import ModelRejected

# --------------------------------------------------------------------------------------------
# Time split
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeSplit:
    """Chronological train / validation / test dates with `embargo` dates dropped between sets."""

    train_dates: pd.DatetimeIndex
    validation_dates: pd.DatetimeIndex
    test_dates: pd.DatetimeIndex
    embargo: int

    def to_dict(self) -> dict[str, Any]:
        """First/last date and count of each set, for logging (MLflow params, reports)."""
        summary: dict[str, Any] = {"embargo": self.embargo}
        for name in ("train", "validation", "test"):
            dates = getattr(self, f"{name}_dates")
            summary[f"{name}_start"] = dates[0].date().isoformat()
            summary[f"{name}_end"] = dates[-1].date().isoformat()
            summary[f"{name}_dates"] = len(dates)
        return summary


def time_split(
    dates: Sequence[Any] | pd.Index | pd.Series | np.ndarray,
    *,
    validation_fraction: float = 0.15,
    test_fraction: float = 0.15,
    embargo: int,
) -> TimeSplit:
    """Split the distinct `dates` chronologically into train, validation and test.

    Validation and test each get `round(fraction * n)` of the n distinct dates (at least one);
    `embargo` whole dates are dropped between train|validation and validation|test, and train
    keeps the rest. A label at date t looks forward h dates (t+1 .. t+h), so with
    `embargo >= h` the last label of an earlier set is realised before the first date of the
    next set: no label window straddles two sets.

    Raises ValueError when there are too few dates for three non-empty sets and two embargoes.
    """
    if embargo < 0:
        raise ValueError(f"embargo must be >= 0 dates, got {embargo}")
    for name, fraction in (
        ("validation_fraction", validation_fraction),
        ("test_fraction", test_fraction),
    ):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {fraction}")
    unique = pd.DatetimeIndex(pd.unique(pd.DatetimeIndex(np.asarray(dates)))).dropna()
    unique = unique.sort_values()
    n = len(unique)
    n_validation = max(1, round(validation_fraction * n))
    n_test = max(1, round(test_fraction * n))
    n_train = n - n_validation - n_test - 2 * embargo
    if n_train < 1:
        raise ValueError(
            f"time_split needs at least {n_validation + n_test + 2 * embargo + 1} distinct dates "
            f"for {n_validation} validation + {n_test} test dates and two embargoes of {embargo}, "
            f"got {n}; supply a longer history or lower embargo/fractions"
        )
    validation_start = n_train + embargo
    test_start = validation_start + n_validation + embargo
    return TimeSplit(
        train_dates=unique[:n_train],
        validation_dates=unique[validation_start : validation_start + n_validation],
        test_dates=unique[test_start:],
        embargo=embargo,
    )


def sets_by_id(
    ids: pd.Series, validation_fraction: float, test_fraction: float, *, salt: str = ""
) -> np.ndarray:
    """Return "train", "validation" or "test" per id, from a hash of `salt` + the id.

    An id lands in the same set every night and in every process (pandas' hash uses a fixed
    key), however the rows around it change, so a test id never becomes a training id: a
    split for rows without a time order that promotion can compare models on.
    """
    text = ids.astype("string")
    hashed = pd.util.hash_pandas_object(salt + text if salt else text, index=False).to_numpy()
    position = (hashed % np.uint64(10_000)).astype(np.float64) / 10_000.0
    sets = np.full(len(position), "train", dtype=object)
    sets[position < test_fraction + validation_fraction] = "validation"
    sets[position < test_fraction] = "test"
    return sets


# --------------------------------------------------------------------------------------------
# Scaler
# --------------------------------------------------------------------------------------------

CLIP = 5.0


@dataclass(frozen=True)
class FeatureScaler:
    """Per-column standardisation fitted on the training window and shipped with the model.

    `transform` returns (x - mean) / std clipped to +-5, with NaN replaced by 0 (the training
    mean): a missing value carries no signal rather than an arbitrary one.
    """

    columns: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, features: pd.DataFrame) -> FeatureScaler:
        """Fit on every column of `features` (pass only training-window rows).

        Mean and std (ddof=0) ignore NaN. A column that is all NaN gets mean 0; a constant
        column gets std 1, so it transforms to 0 instead of dividing by zero.
        """
        means, stds = [], []
        for column in features.columns:
            values = features[column].to_numpy(dtype=np.float64, na_value=np.nan)
            values = values[np.isfinite(values)]
            mean = float(values.mean()) if values.size else 0.0
            std = float(values.std()) if values.size else 1.0
            means.append(mean)
            stds.append(std if std > 0.0 else 1.0)
        return cls(tuple(str(c) for c in features.columns), tuple(means), tuple(stds))

    def transform(self, features: pd.DataFrame) -> np.ndarray:
        """Return a float32 [rows, columns] array in `columns` order, standardised and clipped."""
        missing = [c for c in self.columns if c not in features.columns]
        if missing:
            raise ValueError(
                f"feature column(s) {missing} missing from the frame; the scaler was fitted on "
                f"{list(self.columns)}"
            )
        values = features[list(self.columns)].to_numpy(dtype=np.float32, na_value=np.nan, copy=True)
        values -= np.asarray(self.mean, dtype=np.float32)
        values /= np.asarray(self.std, dtype=np.float32)
        np.nan_to_num(values, copy=False, nan=0.0, posinf=CLIP, neginf=-CLIP)
        np.clip(values, -CLIP, CLIP, out=values)
        return values

    def to_dict(self) -> dict[str, list[Any]]:
        return {"columns": list(self.columns), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[Any]]) -> FeatureScaler:
        return cls(
            tuple(str(c) for c in data["columns"]),
            tuple(float(v) for v in data["mean"]),
            tuple(float(v) for v in data["std"]),
        )


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


NetKind = Literal["mlp", "gru", "tcn"]
NET_KINDS: tuple[NetKind, ...] = get_args(NetKind)
# Older names still accepted (configs, saved models): the temporal CNN was "cnn" before #26.
NET_ALIASES: dict[str, NetKind] = {"cnn": "tcn"}
KindT = TypeVar("KindT", bound=str)


def canonical_kind(name: object) -> object:
    """Return the kind an alias stands for ("cnn" -> "tcn"); any other value unchanged (a
    config's validation then accepts or refuses it)."""
    return NET_ALIASES.get(name, name) if isinstance(name, str) else name


def check_kind(name: str, kinds: Sequence[KindT]) -> KindT:
    """Return the member of `kinds` equal to `name` (a candidate's name as the lifecycle passes
    it, typed as its config's Literal); ValueError naming the kinds when there is none."""
    for kind in kinds:
        if kind == name:
            return kind
    raise ValueError(f"unknown model kind {name!r}; expected one of {list(kinds)}")


# The training loop's hyper-parameters as config fields: the constraint and description once,
# for TrainConfig and every domain's training config, each with its own default
# (`max_epochs: MaxEpochs = 30`).
MaxEpochs = Annotated[int, Field(ge=1, description="Upper bound on epochs.")]
Patience = Annotated[
    int, Field(ge=1, description="Stop after this many epochs without a better validation loss.")
]
LearningRate = Annotated[float, Field(gt=0.0, description="AdamW learning rate.")]
WeightDecay = Annotated[float, Field(ge=0.0, description="AdamW weight decay.")]


@pydantic.dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run; the same object feeds the CLI, Prefect and MLflow.

    Validated on construction (a bad value raises pydantic's ValidationError, a ValueError).
    """

    model: Annotated[
        NetKind,
        BeforeValidator(canonical_kind),
        Field(
            description="Network: mlp (one row), gru or tcn (temporal CNN; 'cnn' is accepted "
            "for it) over a lookback window per ticker."
        ),
    ] = "mlp"
    hidden: Annotated[int, Field(gt=0, description="Width of hidden layers / channels.")] = 64
    layers: Annotated[int, Field(gt=0, description="Hidden layers (mlp), GRU or conv layers.")] = 2
    dropout: Annotated[float, Field(ge=0.0, lt=1.0, description="Dropout probability.")] = 0.1
    lookback: Annotated[
        int, Field(gt=0, description="Rows of history per window for gru/tcn (ignored by mlp).")
    ] = 20
    batch_size: Annotated[int, Field(gt=0, description="Training rows per optimiser step.")] = 512
    max_epochs: MaxEpochs = 30
    patience: Patience = 5
    learning_rate: LearningRate = 1e-3
    weight_decay: WeightDecay = 1e-4
    seed: Annotated[int, Field(description="Seed for initialisation, shuffling, dropout.")] = 0
    seeds: Annotated[
        int,
        Field(
            ge=1,
            description="Nets trained from seeds seed, seed+1, ...; the model predicts their "
            "mean (seed averaging). 1: one net.",
        ),
    ] = 1
    full_rate_steps: Annotated[
        int,
        Field(
            ge=0,
            description="Optimiser steps an epoch takes at the full learning_rate; an epoch of "
            "more steps (more training rows) takes learning_rate x full_rate_steps / steps "
            "(`applied_learning_rate`). 0: the full rate at any size.",
        ),
    ] = 0
    device: Annotated[
        str, Field(description="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1'.")
    ] = "auto"

    @property
    def is_sequence(self) -> bool:
        """True when the net reads a [lookback, features] window rather than one row."""
        return self.model in ("gru", "tcn")

    def to_params(self) -> dict[str, str | int | float]:
        """Flat name -> value mapping, as MLflow params and Prefect parameters want it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TrainConfig:
        """Build from `to_params()` output (values may be strings, as MLflow returns them)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig parameter(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(params))

    @classmethod
    def descriptions(cls) -> dict[str, str]:
        """Field name -> one-line description (CLI help, docs)."""
        fields = cls.__pydantic_fields__  # type: ignore[attr-defined]
        return {name: info.description or "" for name, info in fields.items()}


def applied_learning_rate(learning_rate: float, steps: int, full_rate_steps: int) -> float:
    """The rate a training loop of `steps` optimiser steps an epoch applies: `learning_rate`
    up to `full_rate_steps` steps (0: at any number), then scaled down so that an epoch's rates
    add up to no more than `full_rate_steps` steps' worth. A larger panel then moves the
    weights about as far per epoch, between two early-stopping checks, as a smaller one."""
    if full_rate_steps <= 0 or steps <= full_rate_steps:
        return learning_rate
    return learning_rate * full_rate_steps / steps


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` intra-op CPU threads (None: leave torch's setting), restored
    after.

    A small net is bound by the fixed cost of each operation, not by arithmetic: on a CPU that
    other processes also use, two or more threads spend their time waiting for each other (the
    customers autoencoder on 25,000 customers took 10 minutes with 2 threads on a loaded 2-core
    machine and 30 s with one).
    """
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str) -> torch.device:
    """Return the torch device for a config value; 'auto' is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'auto'/'cpu'")
    return device


# --------------------------------------------------------------------------------------------
# Samples the loop draws batches from
# --------------------------------------------------------------------------------------------


def window_panel(
    features: np.ndarray, groups: np.ndarray, lookback: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (panel, positions) so that windows gathered from `panel` never cross groups.

    `features` [N, F] must be sorted so each group (ticker) is contiguous and time-ordered.
    `panel` is `features` with `lookback - 1` zero rows inserted before each group; row i of
    `features` sits at `panel[positions[i]]`, and `panel[positions[i] - lookback + 1 :
    positions[i] + 1]` is its window: the group's previous rows, left-padded with zeros (the
    training mean after scaling) when the group has fewer than `lookback` rows so far.
    """
    n = len(features)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} rows, features {n}")
    pad = max(lookback - 1, 0)
    starts = np.ones(n, dtype=bool)
    if n:
        starts[1:] = groups[1:] != groups[:-1]
    group_number = np.cumsum(starts) - 1  # 0 for the first group, 1 for the next, ...
    positions = np.arange(n, dtype=np.int64) + (group_number + 1) * pad
    n_groups = int(starts.sum())
    panel = np.zeros((n + n_groups * pad, features.shape[1]), dtype=features.dtype)
    panel[positions] = features
    return panel, positions


@dataclass(frozen=True)
class Batches:
    """Samples for the training loop: inputs are rows of `features` or windows ending at them.

    - `features` [M, F]: the (scaled) feature panel, shared between train and validation;
    - `targets` [N] or None (prediction only): one target per sample;
    - `rows` [N] int64: the panel row each sample sits at (None: sample i is row i);
    - `lookback`: 0 gives inputs [B, F]; L >= 1 gives windows [B, L, F] gathered as
      `features[rows[:, None] + arange(-L + 1, 1)]`, so the [N, L, F] tensor is never built.
      Build the panel with `window_panel` so windows cannot reach into another ticker.
    """

    features: torch.Tensor
    targets: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    lookback: int = 0
    _offsets: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self)
        if self.targets is not None and len(self.targets) != n:
            raise ValueError(f"{len(self.targets)} targets for {n} samples")
        if self.lookback and self.rows is None:
            raise ValueError("windows (lookback >= 1) need `rows` into a panel from window_panel")
        if self.lookback:
            offsets = torch.arange(1 - self.lookback, 1, device=self.features.device)
            object.__setattr__(self, "_offsets", offsets)

    def __len__(self) -> int:
        return len(self.features) if self.rows is None else len(self.rows)

    @property
    def n_features(self) -> int:
        return self.features.shape[1]

    def inputs(self, index: torch.Tensor) -> torch.Tensor:
        """Inputs of the samples at `index`: [B, F], or [B, lookback, F] windows."""
        rows = index if self.rows is None else self.rows[index]
        if self._offsets is not None:  # set exactly when lookback >= 1
            rows = rows[:, None] + self._offsets
        return self.features[rows]

    def to(self, device: torch.device, moved: dict[int, torch.Tensor] | None = None) -> Batches:
        """Copy to `device`; tensors already in `moved` (by id) are reused, not copied again."""
        moved = {} if moved is None else moved

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in moved:
                moved[id(tensor)] = tensor.to(device)
            return moved[id(tensor)]

        return Batches(
            move(self.features),
            None if self.targets is None else move(self.targets),
            None if self.rows is None else move(self.rows),
            self.lookback,
        )


# --------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------


NetT = TypeVar("NetT", bound=nn.Module)


class SeedAverage(nn.Module):
    """The mean output of `members`: nets of one architecture trained from different seeds.

    Averaging cancels the part of each net's scores that comes from its seed (initialisation,
    batch order, dropout) rather than from the data; `train_regressor` trains each member on
    its own, as it would a single net.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


@dataclass
class TrainResult(Generic[NetT]):
    """A trained model (on CPU, best-validation weights) and how it got there."""

    model: NetT
    history: list[dict[str, float]]  # one per epoch: epoch, train_loss, validation_loss, seconds
    best_epoch: int
    epochs_run: int
    device: str
    learning_rate: float  # the rate the optimiser applied (see applied_learning_rate)

    @property
    def best_validation_loss(self) -> float:
        return self.history[self.best_epoch - 1]["validation_loss"]


@torch.no_grad()
def mean_squared_error(model: nn.Module, batches: Batches, batch_size: int) -> torch.Tensor:
    """Mean squared error of `model` over all of `batches` (over every target value, as the
    training loss averages: per row and output), as a 0-d tensor on their device."""
    targets = batches.targets
    if targets is None:
        raise ValueError("mean_squared_error needs Batches with targets")
    model.eval()
    total = torch.zeros((), device=batches.features.device)
    for start in range(0, len(batches), batch_size):
        index = torch.arange(start, min(start + batch_size, len(batches)), device=total.device)
        prediction = model(batches.inputs(index))
        total += F.mse_loss(prediction, targets[index], reduction="sum")
    return total / targets[: len(batches)].numel()


@torch.no_grad()
def predict_regressor(
    model: nn.Module, batches: Batches, batch_size: int = 8192, device: str = "cpu"
) -> np.ndarray:
    """Return the model's outputs for every sample, in sample order, as float64 [N].

    Eval mode, no gradients, fixed batches: the same inputs give the same outputs.
    """
    target = resolve_device(device)
    model = model.to(target) if target.type == "cpu" else copy.deepcopy(model).to(target)
    model.eval()
    batches = batches.to(target)
    outputs = []
    for start in range(0, len(batches), batch_size):
        index = torch.arange(start, min(start + batch_size, len(batches)), device=target)
        outputs.append(model(batches.inputs(index)))
    if not outputs:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(outputs).cpu().numpy().astype(np.float64)


def train_regressor(
    model: NetT,
    train_batches: Batches,
    validation_batches: Batches,
    config: TrainConfig,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult[NetT]:
    """Train `model` on MSE with AdamW; early-stop on validation loss; return best weights.

    The loop is `run_training_loop`'s: each epoch shuffles (seeded), batches, steps, then
    evaluates the whole validation set; same seed and device -> same weights and losses.
    `model` is not modified: a copy is trained. A `SeedAverage` (`config.seeds` > 1) has each
    member trained by the same loop, member k with seed `config.seed + k`; the result's history
    and best epoch are the first member's (the net a one-seed run trains), and `on_epoch`
    hears only its epochs. The learning rate is `applied_learning_rate` for the train set's
    number of batches (`config.full_rate_steps`).
    """
    if isinstance(model, SeedAverage):
        trained = [
            train_regressor(
                member,
                train_batches,
                validation_batches,
                dataclasses.replace(config, seed=config.seed + k, seeds=1),
                on_epoch if k == 0 else None,
            )
            for k, member in enumerate(model.members)
        ]
        averaged = copy.deepcopy(model).cpu()
        for member, result in zip(averaged.members, trained, strict=True):
            member.load_state_dict(result.model.state_dict())
        first = trained[0]
        return TrainResult(
            averaged.eval(),
            first.history,
            first.best_epoch,
            first.epochs_run,
            first.device,
            first.learning_rate,
        )
    train_targets = train_batches.targets
    if train_targets is None or validation_batches.targets is None:
        raise ValueError("train_regressor needs Batches with targets")
    if len(train_batches) == 0 or len(validation_batches) == 0:
        raise ValueError(
            f"training needs samples in both sets, got {len(train_batches)} train and "
            f"{len(validation_batches)} validation rows"
        )
    device = resolve_device(config.device)
    moved: dict[int, torch.Tensor] = {}
    train = train_batches.to(device, moved)
    train_targets = moved[id(train_targets)]  # the same targets, on `device`
    validation = validation_batches.to(device, moved)
    eval_batch_size = 4 * config.batch_size
    steps = math.ceil(len(train) / config.batch_size)
    rate = applied_learning_rate(config.learning_rate, steps, config.full_rate_steps)
    config = dataclasses.replace(config, learning_rate=rate)

    def batch_loss(model: nn.Module, index: torch.Tensor, _: torch.Generator) -> torch.Tensor:
        return F.mse_loss(model(train.inputs(index)), train_targets[index])

    return run_training_loop(
        model,
        len(train),
        batch_loss,
        lambda model: mean_squared_error(model, validation, eval_batch_size),
        config,
        device,
        on_epoch,
        what="training diverged",
        check="the targets",
    )


class LoopSettings(Protocol):
    """The hyper-parameters `run_training_loop` reads (TrainConfig and the credit
    ClassifierConfig both have them)."""

    # Read-only members: both configs are frozen dataclasses.
    @property
    def batch_size(self) -> int: ...
    @property
    def max_epochs(self) -> int: ...
    @property
    def patience(self) -> int: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def seed(self) -> int: ...


class LoopValues(TypedDict):
    """`LoopSettings` as keyword arguments, so mypy checks a call they are unpacked into."""

    batch_size: int
    max_epochs: int
    patience: int
    learning_rate: float
    weight_decay: float
    seed: int


def loop_settings(config: LoopSettings) -> LoopValues:
    """Return `config`'s loop settings: what a domain's training config passes on to the config
    of each model it fits (`TrainConfig(model=..., **loop_settings(self))`)."""
    return {
        "batch_size": config.batch_size,
        "max_epochs": config.max_epochs,
        "patience": config.patience,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
    }


def run_training_loop(
    model: NetT,
    n_train: int,
    batch_loss: Callable[[NetT, torch.Tensor, torch.Generator], torch.Tensor],
    validation_loss: Callable[[NetT], torch.Tensor],
    config: LoopSettings,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    *,
    what: str,
    check: str,
) -> TrainResult[NetT]:
    """Train a copy of `model` on `device` with AdamW; early-stop; return the best weights.

    Each epoch: shuffle the `n_train` samples (seeded), and per batch of sample indices take
    `batch_loss(model, index, generator)` (the mean loss; `generator` is the loop's seeded RNG,
    for any augmentation), backward, step; then `validation_loss(model)` (a 0-d tensor).
    Training stops after `config.patience` epochs without a lower validation loss, and the
    weights of the best epoch are restored. Losses are summed on the device and read back once
    per epoch (one sync). Same seed and device -> same weights and losses; the global RNG is
    left as it was. Raises ModelRejected (`what`: ..., check `check`) when no epoch gave a
    finite validation loss.
    """
    model = copy.deepcopy(model).to(device)
    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state = math.inf, 0, None

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)  # dropout masks; the global RNG is restored on exit
        generator = torch.Generator(device=device).manual_seed(config.seed)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        for epoch in range(1, config.max_epochs + 1):
            started = time.perf_counter()
            model.train()
            train_loss_sum = torch.zeros((), device=device)
            order = torch.randperm(n_train, generator=generator, device=device)
            for start in range(0, n_train, config.batch_size):
                index = order[start : start + config.batch_size]
                loss = batch_loss(model, index, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                train_loss_sum += loss.detach() * len(index)
            losses = torch.stack([train_loss_sum / n_train, validation_loss(model)]).tolist()
            train_loss, epoch_validation_loss = losses  # the one sync
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "validation_loss": epoch_validation_loss,
                "seconds": time.perf_counter() - started,
            }
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            if epoch_validation_loss < best_loss:
                best_loss, best_epoch = epoch_validation_loss, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= config.patience:
                break

    if best_state is None:
        raise ModelRejected(
            f"{what}: validation loss was {history[0]['validation_loss']} at every epoch; "
            f"lower learning_rate (now {config.learning_rate}) or check {check}"
        )
    model.load_state_dict(best_state)
    return TrainResult(
        model=model.cpu().eval(),
        history=history,
        best_epoch=best_epoch,
        epochs_run=len(history),
        device=str(device),
        learning_rate=config.learning_rate,
    )
