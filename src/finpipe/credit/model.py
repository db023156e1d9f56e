"""The PD model: a tabular network (or its logistic-regression baseline) with everything it needs
to score a loan book the same way again.

Inputs, all fitted on the training rows only and shipped with the model:
- numeric columns standardised by a `FeatureScaler` (missing -> 0, the training mean) plus one
  missing-value indicator per column, so "income not given" is a signal of its own;
- categorical columns mapped through a `Vocabulary`: index 0 is the unknown bucket, for values
  never seen in training (or seen fewer than `min_category_count` times) and for missing ones.
  During training a small share of categories (`unknown_rate`) is replaced by the unknown index,
  so the unknown bucket learns an average effect instead of keeping its random initial value.

`TabularNet` embeds each categorical column, concatenates embeddings, scaled numerics and
missing indicators, and runs an MLP to one logit. The logistic baseline is the same class with
no hidden layer and 1-wide embeddings: a 1-wide embedding is exactly a one-hot weight (started
at zero, no effect), so it is a logistic regression on one-hot categories and scaled numerics,
explained and served by the same code as the network.

Class imbalance: the loss weighs defaults by n_non_default / n_default (`class_weight =
"balanced"`), which ranks well but inflates PDs; the logit is then recalibrated on the
validation rows by Platt scaling, PD = sigmoid(a * logit + b), so PDs match observed default
rates again.

Reason codes: integrated gradients (Sundararajan et al., 2017; `finpipe.attribution`, shared
with the market models) of the calibrated log-odds from a reference applicant to the scored
one. The reference is the typical training applicant: every
numeric at its training mean, nothing missing, each categorical at its training-average
embedding. A feature's attribution is the sum over its inputs (value and missing indicator, or
embedding vector) and the attributions add up to log-odds(applicant) - log-odds(reference).
The three features with the largest positive attribution are the reasons PD is higher than for
the typical applicant; fewer than three positive ones leave the rest empty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from finpipe.attribution import integrated_gradients, top_contributions
from finpipe.credit.config import DATE_COLUMN, LoanBookConfig
from finpipe.credit.features import LABEL
from finpipe.credit.metrics import (
    binned_shares,
    category_shares,
    psi,
    quantile_edges,
)
from finpipe.errors import ConfigError, ModelRejected
from finpipe.model_files import SavesNetAndMetadata, load_weights
from finpipe.training import (
    FeatureScaler,
    LearningRate,
    MaxEpochs,
    Patience,
    WeightDecay,
    check_kind,
    loop_settings,
    resolve_device,
    run_training_loop,
    sets_by_id,
    time_split,
    torch_threads,
)

REASONS = 3
ModelKind = Literal["mlp", "logistic"]
MODEL_KINDS: tuple[ModelKind, ...] = get_args(ModelKind)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """Category -> index per categorical column, fitted on training rows; 0 = unknown."""

    columns: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns: list[str], min_count: int = 1) -> Vocabulary:
        """Keep, per column, the values seen at least `min_count` times, sorted."""
        kept = []
        for column in columns:
            counts = _as_text(frame[column]).value_counts()
            kept.append(tuple(sorted(str(v) for v in counts[counts >= min_count].index)))
        return cls(tuple(columns), tuple(kept))

    @property
    def sizes(self) -> list[int]:
        """Rows of each column's embedding table: its categories plus the unknown bucket."""
        return [len(values) + 1 for values in self.categories]

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Return int64 [rows, columns] indices; unseen or missing values map to 0."""
        out = np.zeros((len(frame), len(self.columns)), dtype=np.int64)
        for j, (column, values) in enumerate(zip(self.columns, self.categories, strict=True)):
            text = _trimmed(frame[column])
            position = pc.index_in(text, value_set=pa.array(values, type=text.type))
            out[:, j] = pc.fill_null(position, -1).to_numpy() + 1  # not found becomes 0
        return out

    def unseen(
        self, frame: pd.DataFrame, indices: np.ndarray | None = None
    ) -> dict[str, dict[str, int]]:
        """Return {column: {value: rows}} of present values the vocabulary does not know
        (`indices`: the frame's `transform`, when already computed)."""
        indices = self.transform(frame) if indices is None else indices
        report = {}
        for j, column in enumerate(self.columns):
            unknown = indices[:, j] == 0  # unseen or missing: only these rows are looked at
            strange = _as_text(frame[column][unknown]).dropna().value_counts()
            if len(strange):
                report[column] = {str(k): int(v) for k, v in strange.items()}
        return report

    def to_dict(self) -> dict:
        return {"columns": list(self.columns), "categories": [list(v) for v in self.categories]}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        return cls(tuple(data["columns"]), tuple(tuple(v) for v in data["categories"]))


def _as_text(values: pd.Series) -> pd.Series:
    """Categories as stripped text (object dtype), missing or blank as None; numbers as their
    text."""
    text = _trimmed(values).to_numpy(zero_copy_only=False)
    return pd.Series(text, index=values.index, dtype=object)


def _trimmed(values: pd.Series) -> pa.Array:
    """`_as_text` as an Arrow string array (trimmed in Arrow: pandas' string methods cost
    several times more per column)."""
    text = pc.utf8_trim_whitespace(pa.array(values.astype("string").array))
    return pc.if_else(pc.equal(text, ""), None, text)


@dataclass(frozen=True)
class Inputs:
    """Model inputs of N rows: scaled numerics, missing indicators, category indices, labels."""

    numeric: torch.Tensor  # float32 [N, Fn]
    missing: torch.Tensor  # float32 [N, Fn]
    categories: torch.Tensor  # int64 [N, Fc]
    labels: torch.Tensor | None = None  # float32 [N]

    def __len__(self) -> int:
        return self.numeric.shape[0]

    def rows(self, index: torch.Tensor) -> Inputs:
        labels = None if self.labels is None else self.labels[index]
        return Inputs(self.numeric[index], self.missing[index], self.categories[index], labels)

    def to(self, device: torch.device) -> Inputs:
        labels = None if self.labels is None else self.labels.to(device)
        return Inputs(
            self.numeric.to(device), self.missing.to(device), self.categories.to(device), labels
        )


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


def embedding_width(size: int) -> int:
    """Embedding width for a column with `size` rows (categories + unknown): fastai's rule
    1.6 * size ** 0.56, between 2 and 16."""
    return int(min(16, max(2, round(1.6 * size**0.56))))


class TabularNet(nn.Module):
    """(numeric [B, Fn], missing [B, Fn], categories [B, Fc]) -> default logit [B].

    Inputs are concatenated into one dense vector (numerics, missing indicators, embeddings)
    that `logit_of_dense` maps to the logit; integrated gradients interpolate that vector.
    """

    def __init__(
        self,
        n_numeric: int,
        category_sizes: list[int],
        embedding_widths: list[int],
        hidden: int = 64,
        layers: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.n_numeric = n_numeric
        self.embedding_widths = list(embedding_widths)
        tables = [
            nn.Embedding(size, width)
            for size, width in zip(category_sizes, embedding_widths, strict=True)
        ]
        if not layers:
            # The logistic baseline: a 1-wide embedding times its head weight is a category's
            # coefficient. It starts at zero (no effect), so early stopping (a handful of
            # epochs) shrinks it towards no effect; from nn.Embedding's N(0, 1) draw it kept
            # up to 0.5 log-odds of that draw, which changed with the seed.
            for table in tables:
                nn.init.zeros_(table.weight)
        self.embeddings = nn.ModuleList(tables)
        blocks: list[nn.Module] = []
        width = 2 * n_numeric + sum(embedding_widths)
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, 1)
        # Wide & deep: a linear path beside the MLP, so the net never has less than the
        # logistic scorecard to work with; the hidden layers add the non-linear part.
        self.wide = nn.Linear(2 * n_numeric + sum(embedding_widths), 1) if layers else None

    def dense(
        self, numeric: torch.Tensor, missing: torch.Tensor, categories: torch.Tensor
    ) -> torch.Tensor:
        embedded = [table(categories[:, j]) for j, table in enumerate(self.embeddings)]
        return torch.cat([numeric, missing, *embedded], dim=1)

    def logit_of_dense(self, dense: torch.Tensor) -> torch.Tensor:
        logit = self.head(self.body(dense))
        if self.wide is not None:
            logit = logit + self.wide(dense)
        return logit.squeeze(-1)

    def forward(
        self, numeric: torch.Tensor, missing: torch.Tensor, categories: torch.Tensor
    ) -> torch.Tensor:
        return self.logit_of_dense(self.dense(numeric, missing, categories))

    def feature_slices(self) -> list[list[int]]:
        """Dense positions of each feature: numerics (value + indicator), then categoricals."""
        n = self.n_numeric
        slices = [[j, n + j] for j in range(n)]
        start = 2 * n
        for width in self.embedding_widths:
            slices.append(list(range(start, start + width)))
            start += width
        return slices


# --------------------------------------------------------------------------------------------
# Config and training loop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierConfig:
    """How one PD model is fitted: `CreditTrainingConfig.classifier_config(kind)` builds it, so
    the values (and their defaults and descriptions) are that config's."""

    kind: ModelKind
    hidden: int
    layers: int
    dropout: float
    batch_size: int
    max_epochs: int
    patience: int
    learning_rate: float
    weight_decay: float
    class_weight: Literal["balanced", "none"]
    unknown_rate: float
    min_category_count: int
    ig_steps: int
    seed: int
    device: str
    cpu_threads: int

    def architecture(self, n_numeric: int, sizes: list[int]) -> dict:
        """Constructor arguments of the TabularNet this config builds."""
        logistic = self.kind == "logistic"
        return {
            "n_numeric": n_numeric,
            "category_sizes": sizes,
            "embedding_widths": [1 if logistic else embedding_width(s) for s in sizes],
            "hidden": self.hidden,
            "layers": 0 if logistic else self.layers,
            "dropout": 0.0 if logistic else self.dropout,
        }


def build_net(architecture: dict, seed: int) -> TabularNet:
    """Return a TabularNet initialised from `seed` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TabularNet(**architecture)


@torch.no_grad()
def weighted_log_loss(
    net: TabularNet, data: Inputs, pos_weight: torch.Tensor, batch_size: int = 8192
) -> torch.Tensor:
    """Mean class-weighted binary cross-entropy of `net` over `data`, a 0-d device tensor."""
    net.eval()
    total = torch.zeros((), device=data.numeric.device)
    for start in range(0, len(data), batch_size):
        part = data.rows(
            torch.arange(start, min(start + batch_size, len(data)), device=total.device)
        )
        logit = net(part.numeric, part.missing, part.categories)
        total += F.binary_cross_entropy_with_logits(
            logit, _labels(part), pos_weight=pos_weight, reduction="sum"
        )
    return total / len(data)


def train_classifier(
    net: TabularNet,
    train: Inputs,
    validation: Inputs,
    config: ClassifierConfig,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[TabularNet, list[dict], int]:
    """Fit `net` on class-weighted BCE with AdamW; early-stop on validation; return (best net on
    CPU in eval mode, history, best epoch).

    Each epoch: shuffle (seeded), batch, blank a few categories to unknown, forward, loss,
    backward, step; then the validation loss (same weighting): the shared
    `run_training_loop`. Same seed and device -> same weights. `net` itself is not modified.
    """
    device = resolve_device(config.device)
    with torch_threads(config.cpu_threads):
        return _train_classifier(net, train, validation, config, device, on_epoch)


def _train_classifier(
    net: TabularNet,
    train: Inputs,
    validation: Inputs,
    config: ClassifierConfig,
    device: torch.device,
    on_epoch: Callable[[dict], None] | None,
) -> tuple[TabularNet, list[dict], int]:
    train, validation = train.to(device), validation.to(device)
    positives = float(_labels(train).sum())
    if config.class_weight == "balanced" and positives > 0:
        weight = (len(train) - positives) / positives
    else:
        weight = 1.0
    pos_weight = torch.tensor(weight, device=device)

    def batch_loss(
        model: TabularNet, index: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        batch = train.rows(index)
        categories = batch.categories
        if config.unknown_rate > 0 and categories.numel():
            blank = torch.rand(categories.shape, generator=generator, device=device)
            categories = categories.masked_fill(blank < config.unknown_rate, 0)
        logit = model(batch.numeric, batch.missing, categories)
        return F.binary_cross_entropy_with_logits(logit, _labels(batch), pos_weight=pos_weight)

    result = run_training_loop(
        net,
        len(train),
        batch_loss,
        lambda model: weighted_log_loss(model, validation, pos_weight),
        config,
        device,
        on_epoch,
        what=config.kind,
        check="the labels",
    )
    return result.model, result.history, result.best_epoch


def fit_platt(logits: np.ndarray, labels: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """Return (a, b) minimising the log loss of sigmoid(a * logit + b) on `labels` (Newton).

    A tiny ridge keeps the 2x2 system solvable when the validation rows separate perfectly.
    """
    x = np.column_stack([np.asarray(logits, float), np.ones(len(logits))])
    y = np.asarray(labels, float)
    w = np.array([1.0, 0.0])
    ridge = 1e-6 * np.eye(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -35, 35)))
        gradient = x.T @ (p - y) + ridge @ w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + ridge
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(w[0]), float(w[1])


# --------------------------------------------------------------------------------------------
# The fitted model
# --------------------------------------------------------------------------------------------


@dataclass
class FittedCreditModel(SavesNetAndMetadata):
    """A trained PD model plus everything needed to score and explain a loan book again."""

    saved_as = "credit"

    kind: ModelKind
    net: TabularNet
    architecture: dict
    id_column: str
    numeric_columns: list[str]
    categorical_columns: list[str]
    scaler: FeatureScaler
    vocabulary: Vocabulary
    calibration: tuple[float, float]  # Platt (a, b): PD = sigmoid(a * logit + b)
    grades: list[tuple[str, float]]  # (grade, max_pd), max_pd increasing, the last 1.0
    reference_dense: list[float]  # the typical training applicant (IG baseline)
    # training shares for PSI, with the training rows and dates they come from (models saved
    # before finpipe recorded those lack them)
    population: dict = field(default_factory=dict)
    # numeric column -> how reason codes show its values ([numeric] display); absent: number
    value_displays: dict[str, str] = field(default_factory=dict)
    # the loans it trained or was validated on (None: saved before finpipe recorded them)
    fit_window: FitWindow | None = None
    ig_steps: int = 32
    cpu_threads: int = 1
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0

    @property
    def feature_columns(self) -> list[str]:
        return [*self.numeric_columns, *self.categorical_columns]

    # -- inputs and scores ---------------------------------------------------------------
    def inputs(self, frame: pd.DataFrame, labels: np.ndarray | None = None) -> Inputs:
        """Return the model inputs of `frame` (unseen categories go to the unknown bucket)."""
        _require_columns(frame, self.feature_columns)
        numeric = frame[self.numeric_columns].apply(pd.to_numeric, errors="coerce")
        return Inputs(
            numeric=torch.from_numpy(self.scaler.transform(numeric)),
            missing=torch.from_numpy(numeric.isna().to_numpy(dtype=np.float32, copy=True)),
            categories=torch.from_numpy(self.vocabulary.transform(frame)),
            labels=None if labels is None else torch.as_tensor(labels, dtype=torch.float32),
        )

    def logits(self, frame: pd.DataFrame, batch_size: int = 8192) -> np.ndarray:
        """Return the uncalibrated logit of every row (float64 [N])."""
        return self._logits(self.inputs(frame), batch_size)

    @torch.no_grad()
    def _logits(self, data: Inputs, batch_size: int = 8192) -> np.ndarray:
        self.net.eval()
        out = [
            self.net(*_parts(data.rows(torch.arange(s, min(s + batch_size, len(data))))))
            for s in range(0, len(data), batch_size)
        ]
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)

    def predict_pd(self, frame: pd.DataFrame) -> np.ndarray:
        """Return the calibrated probability of default of every row (float64 [N])."""
        return self._pd(self.inputs(frame))

    def _pd(self, data: Inputs) -> np.ndarray:
        a, b = self.calibration
        return _sigmoid(a * self._logits(data) + b)

    @torch.no_grad()
    def reference_pd(self) -> float:
        """Return the calibrated PD of the reference applicant the reason codes measure from
        (the module docstring): a scored PD below it still gets reasons, those of its
        features that raise it most above that point."""
        self.net.eval()
        reference = torch.tensor([self.reference_dense], dtype=torch.float32)
        a, b = self.calibration
        logit = float(self.net.logit_of_dense(reference).item())
        return float(_sigmoid(np.asarray(a * logit + b)))

    def reason_baseline(self) -> dict[str, object]:
        """Return what reason codes are measured from, for reports read beside them: the
        reference applicant's PD, who that applicant is, and the unit of `reason_k_impact`."""
        return {
            "reference_pd": self.reference_pd(),
            "reference_applicant": (
                "the typical training applicant: every numeric at its training mean, nothing "
                "missing, each category at its training-average embedding"
            ),
            "impact_unit": (
                "calibrated log-odds of default: how much the feature raised the applicant's "
                "log-odds above the reference applicant's (every feature's, negative ones "
                "included, add up to that gap)"
            ),
        }

    def grade(self, pd_values: np.ndarray) -> np.ndarray:
        """Return the risk grade of each PD: the first band whose max_pd is at least the PD."""
        bounds = np.asarray([bound for _, bound in self.grades])
        names = np.asarray([name for name, _ in self.grades], dtype=object)
        index = np.searchsorted(bounds, np.clip(pd_values, 0.0, 1.0))
        return names[np.minimum(index, len(names) - 1)]

    # -- explanations --------------------------------------------------------------------
    def attributions(self, frame: pd.DataFrame, rows_per_pass: int = 512) -> np.ndarray:
        """Return [N, features] integrated-gradient attributions in calibrated log-odds.

        Row i sums (up to the midpoint-rule error of `ig_steps` steps) to
        a * (logit(row i) - logit(reference)); see the module docstring.
        """
        with torch_threads(self.cpu_threads):
            return self._attributions(self.inputs(frame), rows_per_pass)

    def _attributions(self, data: Inputs, rows_per_pass: int = 512) -> np.ndarray:
        """The shared `integrated_gradients` over the dense input vector, summed per feature."""
        self.net.eval()
        reference = torch.tensor(self.reference_dense, dtype=torch.float32)
        with torch.no_grad():
            dense = self.net.dense(*_parts(data))
        per_input = integrated_gradients(
            self.net.logit_of_dense,
            dense,
            reference,
            steps=self.ig_steps,
            rows_per_pass=rows_per_pass,
        )
        out = np.zeros((len(data), len(self.net.feature_slices())), dtype=np.float64)
        for j, positions in enumerate(self.net.feature_slices()):
            out[:, j] = per_input[:, positions].sum(axis=1)
        return out * self.calibration[0]

    def reason_codes(self, frame: pd.DataFrame, attributions: np.ndarray) -> pd.DataFrame:
        """Return reason_k, reason_k_value, reason_k_impact (k = 1..3) per row: the features
        with the largest positive attribution, the row's value of each (text as the book's
        `display` says, `format_value`; "missing"), and the attribution in log-odds (a number).
        Fewer positive attributions leave the rest empty."""
        features = np.asarray(self.feature_columns, dtype=object)
        order, top, positive = top_contributions(attributions, REASONS, positive_only=True)
        reasons = order.shape[1]
        chosen = np.where(positive, order, -1)  # [rows, reasons] feature index, -1 for none
        names = features[order]  # object [rows, reasons]: a copy
        names[~positive] = None
        shown = np.full(names.shape, None, dtype=object)
        for j in np.unique(chosen[positive]):  # each feature's values, only where shown
            cells = chosen == j
            rows = cells.any(axis=1)
            text = np.empty(len(frame), dtype=object)
            style = self.value_displays.get(features[j], "number")
            text[rows] = _display(frame[features[j]], rows, style)
            shown[cells] = np.broadcast_to(text[:, None], names.shape)[cells]
        columns: dict[str, object] = {}
        for k in range(reasons):
            columns[f"reason_{k + 1}"] = pd.array(names[:, k], dtype="string")
            columns[f"reason_{k + 1}_value"] = pd.array(shown[:, k], dtype="string")
            columns[f"reason_{k + 1}_impact"] = np.where(positive[:, k], top[:, k], np.nan)
        return pd.DataFrame(columns, index=frame.index)

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Return id, pd, grade and three reason codes per row of `frame` (its order and index).

        `frame` holds the id and the feature columns the model was trained on (extra columns
        are ignored). Unseen categories are scored through the unknown bucket, never refused.
        """
        _require_columns(frame, [self.id_column])
        data = self.inputs(frame)  # once for the PDs and their explanations
        pd_values = self._pd(data)
        with torch_threads(self.cpu_threads):
            reasons = self.reason_codes(frame, self._attributions(data))
        scored = pd.DataFrame(
            {
                "id": frame[self.id_column].astype("string").array,
                "pd": pd_values,
                "grade": pd.array(self.grade(pd_values), dtype="string"),
            },
            index=frame.index,
        )
        return pd.concat([scored, reasons], axis=1)

    # -- population stability -----------------------------------------------------------
    def population_shares(
        self,
        frame: pd.DataFrame,
        edges: dict | None = None,
        pd_values: np.ndarray | None = None,
        indices: np.ndarray | None = None,
    ) -> dict:
        """Return {"edges": ..., "shares": {name: shares}} of the score and every feature.

        Bins: deciles of the training PDs and numerics (plus a missing bin), the vocabulary
        (plus the unknown bucket) for categoricals. Pass the training `edges` to bin a new
        population the same way, and its `pd_values` and category `indices` (the vocabulary's
        `transform`) when they are already computed.
        """
        pd_values = self.predict_pd(frame) if pd_values is None else np.asarray(pd_values)
        if edges is None:  # fitting: the training population's bins
            edges = {"score": quantile_edges(pd_values)}
            for column in self.numeric_columns:
                edges[column] = quantile_edges(pd.to_numeric(frame[column], errors="coerce"))
        shares = {"score": binned_shares(pd_values, edges["score"])}
        for column in self.numeric_columns:
            values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
            shares[column] = binned_shares(values, edges[column])
        indices = self.vocabulary.transform(frame) if indices is None else indices
        for j, (column, size) in enumerate(
            zip(self.categorical_columns, self.vocabulary.sizes, strict=True)
        ):
            shares[column] = category_shares(indices[:, j], size)
        return {"edges": edges, "shares": shares}

    def population_stability(
        self,
        frame: pd.DataFrame,
        pd_values: np.ndarray | None = None,
        indices: np.ndarray | None = None,
    ) -> dict[str, float]:
        """Return the PSI of the score and of each feature between training and `frame`
        (`pd_values` and `indices` as for `population_shares`)."""
        if not self.population:
            return {}
        edges = self.population["edges"]
        actual = self.population_shares(frame, edges, pd_values, indices)["shares"]
        expected = self.population["shares"]
        return {name: psi(expected[name], actual[name]) for name in expected}

    def unseen_categories(
        self, frame: pd.DataFrame, indices: np.ndarray | None = None
    ) -> dict[str, dict[str, int]]:
        """Return {column: {value: rows}} of categories scored through the unknown bucket."""
        return self.vocabulary.unseen(frame, indices)

    # -- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Everything but the weights, JSON-ready."""
        return {
            "kind": self.kind,
            "architecture": self.architecture,
            "id_column": self.id_column,
            "numeric_columns": self.numeric_columns,
            "categorical_columns": self.categorical_columns,
            "scaler": self.scaler.to_dict(),
            "vocabulary": self.vocabulary.to_dict(),
            "calibration": list(self.calibration),
            "grades": [list(g) for g in self.grades],
            "reference_dense": self.reference_dense,
            "population": self.population,
            "value_displays": self.value_displays,
            "fit_window": None if self.fit_window is None else asdict(self.fit_window),
            "ig_steps": self.ig_steps,
            "cpu_threads": self.cpu_threads,
        }

    @classmethod
    def from_saved(cls, data: dict, directory: Path) -> FittedCreditModel:
        net = load_weights(TabularNet(**data["architecture"]), directory)
        return cls(
            kind=data["kind"],
            net=net,
            architecture=data["architecture"],
            id_column=data["id_column"],
            numeric_columns=list(data["numeric_columns"]),
            categorical_columns=list(data["categorical_columns"]),
            scaler=FeatureScaler.from_dict(data["scaler"]),
            vocabulary=Vocabulary.from_dict(data["vocabulary"]),
            calibration=(float(data["calibration"][0]), float(data["calibration"][1])),
            grades=[(str(g), float(b)) for g, b in data["grades"]],
            reference_dense=[float(v) for v in data["reference_dense"]],
            population=data["population"],
            value_displays=dict(data.get("value_displays", {})),  # saved before: all numbers
            fit_window=FitWindow(**data["fit_window"]) if data.get("fit_window") else None,
            ig_steps=int(data["ig_steps"]),
            cpu_threads=int(data["cpu_threads"]),
            history=list(data["history"]),
            best_epoch=int(data["best_epoch"]),
        )


def fit_credit_model(
    frame: pd.DataFrame,
    *,
    id_column: str,
    numeric_columns: list[str],
    categorical_columns: list[str],
    label: str,
    train: np.ndarray,
    validation: np.ndarray,
    grades: list[tuple[str, float]],
    config: ClassifierConfig,
    on_epoch: Callable[[dict], None] | None = None,
    value_displays: dict[str, str] | None = None,
) -> FittedCreditModel:
    """Fit a PD model on the `train` rows of `frame`, early-stopped and calibrated on the
    `validation` rows (boolean masks). Scaler, vocabulary, IG reference and PSI bins come from
    the training rows only; no other row is read. `value_displays` (numeric column -> number,
    amount or percent) says how reason codes show values.

    Raises ModelRejected when a set lacks defaults or non-defaults.
    """
    labels = pd.to_numeric(frame[label], errors="coerce").to_numpy(dtype=float)
    for name, mask in (("training", train), ("validation", validation)):
        present = set(np.unique(labels[mask & np.isfinite(labels)]).tolist())
        if present != {0.0, 1.0}:
            raise ModelRejected(
                f"{config.kind}: the {name} rows need both defaults and non-defaults, got "
                f"outcomes {sorted(present)} in {int(mask.sum())} rows; deliver more labelled "
                "loans or check the [label] values in the loan-book config"
            )
    train_rows = frame.loc[train]
    scaler = FeatureScaler.fit(train_rows[numeric_columns].apply(pd.to_numeric, errors="coerce"))
    vocabulary = Vocabulary.fit(train_rows, categorical_columns, config.min_category_count)
    architecture = config.architecture(len(numeric_columns), vocabulary.sizes)
    model = FittedCreditModel(
        kind=config.kind,
        net=build_net(architecture, config.seed),
        architecture=architecture,
        id_column=id_column,
        numeric_columns=list(numeric_columns),
        categorical_columns=list(categorical_columns),
        scaler=scaler,
        vocabulary=vocabulary,
        calibration=(1.0, 0.0),
        grades=[(str(g), float(b)) for g, b in grades],
        reference_dense=[],
        value_displays=dict(value_displays or {}),
        ig_steps=config.ig_steps,
        cpu_threads=config.cpu_threads,
    )
    model.net, model.history, model.best_epoch = train_classifier(
        model.net,
        model.inputs(train_rows, labels[train]),
        model.inputs(frame.loc[validation], labels[validation]),
        config,
        on_epoch,
    )
    model.calibration = fit_platt(model.logits(frame.loc[validation]), labels[validation])
    model.reference_dense = _reference_dense(model, train_rows)
    model.population = {
        **model.population_shares(train_rows),
        **training_population(train_rows),
    }
    return model


def training_population(train_rows: pd.DataFrame) -> dict[str, object]:
    """Return the rows and date range of the training loans PSI compares against, so that a
    stability report can say which population its expected shares are (dates None when the
    frame has no date column)."""
    dates = train_rows[DATE_COLUMN] if DATE_COLUMN in train_rows else pd.Series(dtype=object)
    known = dates.dropna()
    first, last = (known.min(), known.max()) if len(known) else (None, None)
    return {
        "rows": len(train_rows),
        "first_date": None if first is None else str(pd.Timestamp(first).date()),
        "last_date": None if last is None else str(pd.Timestamp(last).date()),
    }


def fit_loan_book_model(
    frame: pd.DataFrame,
    book: LoanBookConfig,
    *,
    train: np.ndarray,
    validation: np.ndarray,
    config: ClassifierConfig,
    on_epoch: Callable[[dict], None] | None = None,
) -> FittedCreditModel:
    """Return `fit_credit_model` on the columns, label and grade bands `book` names."""
    return fit_credit_model(
        frame,
        id_column=book.columns.id,
        numeric_columns=book.numeric_columns,
        categorical_columns=book.categorical_columns,
        label=LABEL,
        train=train,
        validation=validation,
        grades=[(band.grade, band.max_pd) for band in book.grades],
        config=config,
        on_epoch=on_epoch,
        value_displays={name: column.display for name, column in book.numeric.items()},
    )


def _reference_dense(model: FittedCreditModel, train_rows: pd.DataFrame) -> list[float]:
    """The typical training applicant as a dense input: numerics at the training mean (0),
    nothing missing, each embedding at its training-average vector."""
    with torch.no_grad():
        dense = model.net.dense(*_parts(model.inputs(train_rows)))
    reference = dense.mean(dim=0)
    reference[: 2 * model.net.n_numeric] = 0.0
    return [float(v) for v in reference]


def _parts(data: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return data.numeric, data.missing, data.categories


def _labels(data: Inputs) -> torch.Tensor:
    if data.labels is None:
        raise ValueError("training and its validation loss need Inputs with labels")
    return data.labels


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -35.0, 35.0)))


def _display(values: pd.Series, rows: np.ndarray, style: str = "number") -> np.ndarray:
    """The values at `rows` (a boolean mask) as a risk officer reads them: numbers in the
    column's `style` (`format_value`), text as is, "missing" for missing values."""
    if pd.api.types.is_numeric_dtype(values):
        numbers = values.to_numpy(np.float64, na_value=np.nan)[rows]
        return np.array(
            ["missing" if v != v else format_value(v, style) for v in numbers.tolist()], object
        )
    text = pc.fill_null(_trimmed(values).filter(pa.array(rows)), "missing")
    return text.to_numpy(zero_copy_only=False)


def format_value(value: float, style: str = "number") -> str:
    """Return `value` as reason codes show it, never in exponent form: "amount" with
    thousands separators (whole units from 100 up, cents below), "percent" a ratio times 100
    with a % sign, "number" (also any other style) with up to four significant digits and
    thousands separators; trailing zeros are dropped."""
    if style == "amount":
        return f"{value:,.0f}" if abs(value) >= 100 else _fixed(value, decimals=2)
    if style == "percent":
        return f"{_significant(value * 100, 3)}%"
    return _significant(value, 4)


def _significant(value: float, digits: int) -> str:
    """`value` in fixed point with `digits` significant digits (no fewer integer digits, at
    most six decimals: 1.2e-05 reads 0.000012)."""
    if not np.isfinite(value) or value == 0:
        return _fixed(value, 0)
    magnitude = int(np.floor(np.log10(abs(value))))
    return _fixed(value, decimals=min(6, max(0, digits - 1 - magnitude)))


def _fixed(value: float, decimals: int) -> str:
    """`value` with thousands separators and `decimals` decimals, trailing zeros dropped."""
    text = f"{value:,.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _require_columns(frame: pd.DataFrame, columns: list[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"column(s) {missing} missing from the frame (it has {list(frame.columns)}); "
            "score features built with the loan-book config the model was trained on"
        )


class CreditTrainingConfig(BaseModel):
    """Hyper-parameters of a nightly credit retrain (also the Prefect form and MLflow params)."""

    models: list[ModelKind] = Field(
        default_factory=lambda: list(MODEL_KINDS),
        description="mlp: the tabular network; logistic: the logistic-regression baseline.",
    )
    validation_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of labelled rows.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of labelled rows.")
    embargo_days: int = Field(
        0,
        ge=0,
        description=(
            "Dated books: distinct dates dropped between train, validation, test. On top of "
            "it, loans whose outcome window ([label] outcome_window_days) reaches into the "
            "next window are purged from theirs."
        ),
    )
    hidden: int = Field(64, ge=4, description="Hidden units of the network.")
    layers: int = Field(2, ge=1, le=6, description="Hidden layers of the network.")
    dropout: float = Field(0.1, ge=0, lt=1)
    batch_size: int = Field(512, ge=16)
    max_epochs: MaxEpochs = 60
    patience: Patience = 10
    learning_rate: LearningRate = 1e-3  # the network's; the baseline has its own
    weight_decay: WeightDecay = 1e-3
    logistic_learning_rate: float = Field(1e-2, gt=0, description="AdamW rate of the baseline.")
    class_weight: Literal["balanced", "none"] = Field(
        "balanced", description="balanced: defaults weigh n_good / n_bad in the loss."
    )
    unknown_rate: float = Field(
        0.02, ge=0, lt=0.5, description="Share of training categories blanked to unknown."
    )
    min_category_count: int = Field(
        3, ge=1, description="Categories seen fewer times in training go to the unknown bucket."
    )
    ig_steps: int = Field(32, ge=4, description="Integrated-gradient steps per reason code.")
    seed: int = 0
    device: str = Field("auto", description="auto (cuda when available), cpu or cuda.")
    cpu_threads: int = Field(
        1,
        ge=1,
        description="PyTorch CPU threads for training and scoring (small tabular nets gain "
        "little from more, and backfills score several dates at once).",
    )
    promotion_metric: Literal["auc", "ks"] = Field(
        "auc", description="Test metric a challenger must beat the champion on."
    )

    def classifier_config(self, kind: str) -> ClassifierConfig:
        model_kind = check_kind(kind, MODEL_KINDS)
        loop = loop_settings(self)
        if model_kind == "logistic":
            loop["learning_rate"] = self.logistic_learning_rate
        return ClassifierConfig(
            kind=model_kind,
            hidden=self.hidden,
            layers=self.layers,
            dropout=self.dropout,
            **loop,
            class_weight=self.class_weight,
            unknown_rate=self.unknown_rate,
            min_category_count=self.min_category_count,
            ig_steps=self.ig_steps,
            device=self.device,
            cpu_threads=self.cpu_threads,
        )


# -- which labelled rows train, validate and test -----------------------------------------
MIN_DATES_FOR_TIME_SPLIT = 10


@dataclass(frozen=True)
class RowSplit:
    """Boolean masks over the training frame's rows, and how they were drawn; `purged`: the
    train and validation loans dropped because their outcome window reaches into the next set."""

    kind: str
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    purged: int = 0


def split_rows(
    frame: pd.DataFrame,
    *,
    id_column: str,
    dated: bool,
    validation_fraction: float,
    test_fraction: float,
    embargo_days: int,
    seed: int,
    outcome_window_days: int = 0,
) -> RowSplit:
    """Return train / validation / test masks over `frame` (deterministic for the same frame).

    Out of time when the book is dated and has at least 10 labelled dates (time_split over its
    distinct dates, `embargo_days` dates dropped between sets); otherwise by a hash of the
    seed and the loan id (`sets_by_id`), so a loan keeps its set as the book grows and a
    champion trained on an earlier snapshot is never tested on loans it learnt from.

    Out of time, a loan's label is whether it defaulted within `outcome_window_days` of its
    date: it looks that far ahead. A training loan whose window ends after the first
    validation date, or a validation loan whose window ends after the first test date, learnt
    (or was judged on) defaults in the next set, so it is purged from its own (`purged` counts
    them). Raises ConfigError naming what to change when no training or validation loan is
    left.
    """
    dates = frame[DATE_COLUMN]
    if dated and dates.nunique() >= MIN_DATES_FOR_TIME_SPLIT:
        try:
            split = time_split(
                dates,
                validation_fraction=validation_fraction,
                test_fraction=test_fraction,
                embargo=embargo_days,
            )
        except ValueError as error:
            raise ConfigError(f"credit training split: {error}") from None
        decided = (dates + pd.Timedelta(days=outcome_window_days)).to_numpy()
        train = dates.isin(split.train_dates).to_numpy()
        validation = dates.isin(split.validation_dates).to_numpy()
        late_train = train & (decided > split.validation_dates[0].to_datetime64())
        late_validation = validation & (decided > split.test_dates[0].to_datetime64())
        for name, rows, late, next_set in (
            ("training", train, late_train, split.validation_dates),
            ("validation", validation, late_validation, split.test_dates),
        ):
            if rows.any() and late.all(where=rows):
                raise ConfigError(
                    f"credit training split: the outcome window of every {name} loan "
                    f"([label] outcome_window_days = {outcome_window_days}) ends after the "
                    f"next window starts on {next_set[0].date()}: each would look ahead, and "
                    "none is left; raise embargo_days (distinct dates dropped between "
                    "windows) to cover the outcome window, make the windows longer "
                    "(validation_fraction, test_fraction) or deliver a longer history "
                    "(a run's training settings: --training embargo_days=N, or the run "
                    "form's training field)"
                )
        return RowSplit(
            "out_of_time",
            train & ~late_train,
            validation & ~late_validation,
            dates.isin(split.test_dates).to_numpy(),
            purged=int(late_train.sum() + late_validation.sum()),
        )
    sets = _loan_sets(frame[id_column], validation_fraction, test_fraction, seed)
    return RowSplit("by_loan_id", sets == "train", sets == "validation", sets == "test")


def _loan_sets(
    ids: pd.Series, validation_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """The by-loan-id set of each id (`sets_by_id` salted with the seed)."""
    return sets_by_id(ids, validation_fraction, test_fraction, salt=f"{seed}:")


@dataclass(frozen=True)
class FitWindow:
    """The loans a model trained or was early-stopped and calibrated on, saved with it so that
    a later night's promotion never judges it on them (`covers`), whatever split settings that
    night uses.

    Out of time: every loan dated up to `last_date`, the last date before the model's own test
    window: its purged loans and its embargo's dates too. A model is not judged on the period it
    learnt from, nor on loans whose outcome windows overlap the defaults it was early-stopped
    and calibrated on (its validation labels were settled up to its first test date, which is
    why its own split purged and embargoed those loans). By loan id: the loans the id hash of
    `seed` and the fractions put in training or validation, and in a dated book only those up
    to `last_date`, the latest training or validation date (later loans came after the model).
    """

    split: str  # the RowSplit kind: "out_of_time" or "by_loan_id"
    last_date: str | None  # None: a book without dates, whose rows carry their snapshot's day
    validation_fraction: float
    test_fraction: float
    seed: int

    @classmethod
    def of(
        cls,
        frame: pd.DataFrame,
        split: RowSplit,
        *,
        dated: bool,
        validation_fraction: float,
        test_fraction: float,
        seed: int,
    ) -> FitWindow:
        """Return the fit window of a model fitted on `split` of `frame` (the split settings
        `validation_fraction`, `test_fraction` and `seed` drew it with)."""
        dates = frame[DATE_COLUMN]
        fit_dates = dates[split.train | split.validation]
        if not dated or not len(fit_dates):
            return cls(split.kind, None, validation_fraction, test_fraction, seed)
        last = fit_dates.max()
        if split.kind == "out_of_time" and split.test.any():
            last = dates[dates < dates[split.test].min()].max()
        return cls(split.kind, str(last.date()), validation_fraction, test_fraction, seed)

    def covers(self, frame: pd.DataFrame, id_column: str) -> np.ndarray:
        """Return a boolean mask of the rows of `frame` the model trained or was validated on."""
        covered = np.ones(len(frame), dtype=bool)
        if self.split == "by_loan_id":
            sets = _loan_sets(
                frame[id_column], self.validation_fraction, self.test_fraction, self.seed
            )
            covered = sets != "test"
        if self.last_date is not None:
            covered &= (frame[DATE_COLUMN] <= pd.Timestamp(self.last_date)).to_numpy()
        return covered
