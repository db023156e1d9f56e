"""The segment model: an autoencoder embeds customer snapshots; k-means segments the embedding.

Fit on train, apply everywhere: the log transform's column list, the scaler, the category
vocabulary (mix columns present among training customers), the autoencoder weights and the
centroids are all learned from the training customers of one snapshot and saved with the model.

Segment identities: a fresh k-means numbers its clusters arbitrarily, so "segment 3" would mean
a different group after every retrain. `align_segment_ids` renumbers the new clusters so that
each takes the id of the champion segment it shares most customers with (Hungarian matching on
the contingency table of the two assignments of the same snapshot). Matching on assignments
rather than on centroids is deliberate: two autoencoders embed customers in different
coordinate systems, so their centroids cannot be compared, whereas "which customers are in it"
is exactly what a stable segment id promises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field, model_validator
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import davies_bouldin_score, silhouette_score
from torch import nn

from finpipe.customers.features import BASE_FEATURES, LOG_SCALED, MIX_PREFIXES, is_mix_feature
from finpipe.errors import ModelRejected
from finpipe.model_files import SavesNetAndMetadata, load_weights
from finpipe.training import (
    Batches,
    FeatureScaler,
    LearningRate,
    MaxEpochs,
    Patience,
    TrainConfig,
    WeightDecay,
    loop_settings,
    resolve_device,
    torch_threads,
    train_regressor,
)

SILHOUETTE_SAMPLE = 5000  # silhouette is O(n^2); beyond this it is estimated on a seeded sample


class SegmentModelParams(BaseModel):
    """Hyper-parameters of the autoencoder and the k-means search."""

    embedding_dim: int = Field(
        2,
        ge=2,
        le=32,
        description="Width of the learned embedding (2 also makes the segment map exact).",
    )
    hidden: int = Field(32, ge=4, description="Hidden units of encoder and decoder layers.")
    layers: int = Field(2, ge=1, le=4, description="Hidden layers in the encoder (and decoder).")
    k_min: int = Field(2, ge=2, description="Fewest segments tried.")
    k_max: int = Field(8, ge=2, description="Most segments tried.")
    k_tolerance: float = Field(
        0.02,
        ge=0,
        description="Keep the champion's number of segments unless another k's validation "
        "silhouette beats it by more than this (stops k flickering between nights).",
    )
    kmeans_restarts: int = Field(10, ge=1, description="k-means initialisations per k.")
    silhouette_floor: float = Field(
        0.1,
        ge=-1,
        le=1,
        description="Promotion floor: the validation silhouette (common evaluation space) a "
        "segmentation must beat to become champion; below about 0.1 there is no real structure.",
    )
    stability_floor: float = Field(
        0.6,
        ge=0,
        le=1,
        description="Promotion floor: the share of validation customers a retrain must keep in "
        "the champion's segment (segment ids mean the same thing from night to night).",
    )
    batch_size: int = Field(128, ge=8)
    max_epochs: MaxEpochs = 200
    patience: Patience = 15
    learning_rate: LearningRate = 3e-3
    weight_decay: WeightDecay = 1e-5
    cpu_threads: int | None = Field(
        1,
        ge=1,
        description="Intra-op CPU threads while the autoencoder fits (None: torch's default). "
        "One is fastest for a net this small, above all on a busy machine.",
    )
    seed: int = 0
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda'.")

    @model_validator(mode="after")
    def _k_range(self) -> SegmentModelParams:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must not exceed k_max ({self.k_max})")
        return self

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            model="mlp",
            hidden=self.hidden,
            layers=self.layers,
            dropout=0.0,
            device=self.device,
            **loop_settings(self),
        )


class SegmentAutoencoder(nn.Module):
    """[B, F] -> [B, F] through an `embedding_dim` code; `encode` returns the code [B, E]."""

    def __init__(self, n_features: int, hidden: int, embedding_dim: int, layers: int):
        super().__init__()

        def stack(width_in: int, width_out: int) -> nn.Sequential:
            blocks: list[nn.Module] = []
            width = width_in
            for _ in range(layers):
                blocks += [nn.Linear(width, hidden), nn.GELU()]
                width = hidden
            return nn.Sequential(*blocks, nn.Linear(width, width_out))

        self.encoder = stack(n_features, embedding_dim)
        self.decoder = stack(embedding_dim, n_features)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def build_autoencoder(
    n_features: int, architecture: Mapping[str, int], seed: int
) -> SegmentAutoencoder:
    """Return an autoencoder initialised from `seed` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SegmentAutoencoder(
            n_features,
            hidden=int(architecture["hidden"]),
            embedding_dim=int(architecture["embedding_dim"]),
            layers=int(architecture["layers"]),
        )


def model_inputs(
    frame: pd.DataFrame, feature_columns: Sequence[str], log_columns: Sequence[str]
) -> pd.DataFrame:
    """Return the feature columns as float64, heavy-tailed ones through sign(x)*log1p(|x|).

    A category/channel share column the frame lacks is 0 (the customer never bought there);
    any other missing column is an error naming it.
    """
    missing = [c for c in feature_columns if c not in frame.columns and not is_mix_feature(c)]
    if missing:
        raise ValueError(
            f"feature column(s) {missing} missing from the snapshot (it has "
            f"{list(frame.columns)}); rebuild the features or retrain the model"
        )
    values = pd.DataFrame(
        {c: frame[c].astype("float64") if c in frame.columns else 0.0 for c in feature_columns},
        index=frame.index,
    )
    logged = [c for c in log_columns if c in values.columns]
    values[logged] = np.sign(values[logged]) * np.log1p(values[logged].abs())
    return values


def fit_block_scaler(inputs: pd.DataFrame) -> FeatureScaler:
    """Return a scaler that standardises every column and weighs each mix block as one feature.

    A snapshot has one share column per category (and per channel); standardised alone, ten
    categories would weigh ten times as much as recency in every distance, and per-customer
    noise in the mix would drown the behavioural features. Dividing each block's columns by
    sqrt(columns in the block) gives the block the total variance of one feature. The factor
    is folded into the scaler's std, so it is fitted, saved and applied with the scaler.
    """
    scaler = FeatureScaler.fit(inputs)
    std = list(scaler.std)
    for prefix in MIX_PREFIXES:
        block = [i for i, column in enumerate(scaler.columns) if column.startswith(prefix)]
        for i in block:
            std[i] *= float(np.sqrt(len(block)))
    return FeatureScaler(scaler.columns, scaler.mean, tuple(std))


def evaluation_space(snapshot: pd.DataFrame, sets: np.ndarray) -> np.ndarray:
    """Return the common space promotion compares segmentations in: the snapshot's features,
    log-scaled and block-standardised with statistics of its training customers.

    It depends on the snapshot only, never on a model: silhouettes measured in each model's own
    embedding would not be comparable, since two autoencoders embed customers differently.
    """
    train = np.asarray(sets) == "train"
    columns = snapshot_feature_columns(snapshot, train)
    inputs = model_inputs(snapshot, columns, [c for c in LOG_SCALED if c in columns])
    return fit_block_scaler(inputs.loc[train]).transform(inputs).astype(np.float64)


def segment_quality(space: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Return silhouette (higher is better, -1..1) and Davies-Bouldin (lower is better).

    With fewer than two segments (or every customer in its own) neither is defined: the
    silhouette is reported as -1 (the worst) so such a model never wins, Davies-Bouldin as NaN.
    """
    labels = np.asarray(labels)
    distinct = len(np.unique(labels))
    if distinct < 2 or distinct >= len(labels):
        return {"silhouette": -1.0, "davies_bouldin": float("nan")}
    sample = min(len(labels), SILHOUETTE_SAMPLE)
    silhouette = silhouette_score(space, labels, sample_size=sample, random_state=seed)
    return {
        "silhouette": float(silhouette),
        "davies_bouldin": float(davies_bouldin_score(space, labels)),
    }


def align_segment_ids(
    clusters: np.ndarray, champion_segments: np.ndarray | None, k: int, *, next_id: int = 0
) -> list[int]:
    """Return the segment id of each cluster 0..k-1, matched to the champion's segments.

    `clusters` and `champion_segments` are the new and the champion's assignment of the same
    customers. Each new cluster takes the id of the champion segment it shares most customers
    with, under a one-to-one matching that maximises the customers keeping their id
    (scipy's `linear_sum_assignment`). Clusters left over when k grew, or paired with a
    champion segment they share no customer with, get fresh ids: above the champion's largest
    and from `next_id` on, the first id no earlier model issued, so an id a shrinking k retired
    (or a champion segment empty today) never returns with another meaning.
    Without a champion, ids follow cluster size (`next_id` = largest), as they do when no
    customer of `clusters` has a champion segment.
    """
    clusters = np.asarray(clusters)
    sizes = np.bincount(clusters, minlength=k)
    if champion_segments is None or len(champion_segments) == 0:
        by_size = np.argsort(-sizes, kind="stable")
        ids = np.empty(k, dtype=np.int64)
        ids[by_size] = next_id + np.arange(k)  # (none shared with a champion: all fresh)
        return [int(i) for i in ids]
    champion_segments = np.asarray(champion_segments, dtype=np.int64)
    old_ids = np.unique(champion_segments)
    overlap = np.zeros((k, len(old_ids)), dtype=np.int64)
    np.add.at(overlap, (clusters, np.searchsorted(old_ids, champion_segments)), 1)
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    # The matching pairs every cluster with a champion segment while any is left, even one it
    # shares no customer with (a segment split in two as two others merge): such a pair would
    # hand the id to a group it never meant, so that cluster is new and gets a fresh id.
    shared = overlap[rows, cols] > 0
    ids = np.full(k, -1, dtype=np.int64)
    ids[rows[shared]] = old_ids[cols[shared]]
    fresh = max(int(old_ids.max()) + 1, next_id)
    for cluster in np.argsort(-sizes, kind="stable"):
        if ids[cluster] < 0:
            ids[cluster] = fresh
            fresh += 1
    return [int(i) for i in ids]


@dataclass
class FittedSegmentModel(SavesNetAndMetadata):
    """Everything needed to segment a customer snapshot the same way again.

    `centroids[j]` is cluster j's centre in the embedding; `segment_ids[j]` the stable id it is
    published as. `silhouette_by_k` holds the validation silhouette of every k tried.
    `next_id` is the first segment id neither this model nor a champion before it issued (see
    `align_segment_ids`).
    """

    saved_as = "segment"

    net: SegmentAutoencoder
    architecture: dict[str, int]
    feature_columns: list[str]
    log_columns: list[str]
    scaler: FeatureScaler
    centroids: np.ndarray
    segment_ids: list[int]
    silhouette_by_k: dict[int, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seed: int = 0
    next_id: int = 0

    @property
    def k(self) -> int:
        return len(self.segment_ids)

    def scaled_inputs(self, frame: pd.DataFrame) -> np.ndarray:
        """Return the float32 [rows, features] the autoencoder reads."""
        inputs = model_inputs(frame, self.feature_columns, self.log_columns)
        return self.scaler.transform(inputs)

    @torch.no_grad()
    def embed(self, frame: pd.DataFrame, *, device: str = "cpu") -> np.ndarray:
        """Return the [rows, embedding_dim] embedding of a snapshot (eval mode, deterministic)."""
        target = resolve_device(device)
        self.net.eval()
        net = self.net.to(target)
        inputs = torch.from_numpy(self.scaled_inputs(frame)).to(target)
        codes = [net.encode(inputs[s : s + 8192]) for s in range(0, len(inputs), 8192)]
        self.net.cpu()
        if not codes:
            return np.zeros((0, self.centroids.shape[1]), dtype=np.float64)
        return torch.cat(codes).cpu().numpy().astype(np.float64)

    def assign(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (cluster index, Euclidean distance to its centroid) for embedded rows."""
        distances = np.linalg.norm(embedding[:, None, :] - self.centroids[None, :, :], axis=2)
        cluster = distances.argmin(axis=1) if len(embedding) else np.zeros(0, dtype=np.int64)
        return cluster, distances[np.arange(len(embedding)), cluster]

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Return `customer_id`, `segment` (int64) and `distance_to_centroid` for every row.

        Rows keep the input's order and index; extra columns are ignored. Raises ValueError
        naming a missing feature column.
        """
        if "customer_id" not in frame.columns:
            raise ValueError(f"predict needs a customer_id column; got {list(frame.columns)}")
        cluster, distance = self.assign(self.embed(frame))
        segment = np.asarray(self.segment_ids, dtype=np.int64)[cluster]
        return pd.DataFrame(
            {
                "customer_id": frame["customer_id"].astype("string"),
                "segment": segment,
                "distance_to_centroid": distance.astype(np.float64),
            },
            index=frame.index,
        )

    def to_dict(self) -> dict:
        """Everything but the weights, JSON-ready."""
        return {
            "architecture": self.architecture,
            "feature_columns": self.feature_columns,
            "log_columns": self.log_columns,
            "scaler": self.scaler.to_dict(),
            "centroids": self.centroids.tolist(),
            "segment_ids": self.segment_ids,
            "silhouette_by_k": {str(k): v for k, v in self.silhouette_by_k.items()},
            "seed": self.seed,
            "next_id": self.next_id,
        }

    @classmethod
    def from_saved(cls, data: dict, directory: Path) -> FittedSegmentModel:
        net = build_autoencoder(len(data["feature_columns"]), data["architecture"], data["seed"])
        return cls(
            net=load_weights(net, directory),
            architecture={k: int(v) for k, v in data["architecture"].items()},
            feature_columns=list(data["feature_columns"]),
            log_columns=list(data["log_columns"]),
            scaler=FeatureScaler.from_dict(data["scaler"]),
            centroids=np.asarray(data["centroids"], dtype=np.float64),
            segment_ids=[int(i) for i in data["segment_ids"]],
            silhouette_by_k={int(k): float(v) for k, v in data["silhouette_by_k"].items()},
            history=list(data["history"]),
            best_epoch=int(data["best_epoch"]),
            seed=int(data["seed"]),
            # (a model saved before next_id was recorded: the ids it holds)
            next_id=int(data.get("next_id", max(int(i) for i in data["segment_ids"]) + 1)),
        )


def snapshot_feature_columns(snapshot: pd.DataFrame, train: np.ndarray) -> list[str]:
    """Return the model inputs: the base features plus each mix column used by a training
    customer (the category vocabulary is fitted on the training customers only)."""
    mix = [c for c in snapshot.columns if is_mix_feature(c) and snapshot.loc[train, c].gt(0).any()]
    return [*[c for c in BASE_FEATURES if c in snapshot.columns], *sorted(mix)]


def choose_k(scores: Mapping[int, float], champion_k: int | None, tolerance: float) -> int:
    """Return the k with the best silhouette, or the champion's k when it is within `tolerance`."""
    best = max(scores, key=lambda k: (scores[k], -k))
    if (
        champion_k is not None
        and champion_k in scores
        and scores[champion_k] >= scores[best] - tolerance
    ):
        return int(champion_k)
    return int(best)


def fit_segment_model(
    snapshot: pd.DataFrame,
    sets: np.ndarray,
    params: SegmentModelParams,
    *,
    champion_segments: pd.Series | None = None,
    champion_k: int | None = None,
    champion_next_id: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
) -> FittedSegmentModel:
    """Fit the autoencoder and k-means on the training customers of one snapshot.

    `sets` labels each snapshot row "train", "validation" or "test". The autoencoder learns to
    reconstruct the scaled train rows, early-stopping on validation rows; k-means is fitted on
    the train embeddings for each k in [k_min, k_max] and k is chosen by the silhouette of the
    validation embeddings (see `choose_k`). Test rows take no part in fitting. `champion_segments`
    (the champion's segment per customer_id, this snapshot) renumbers the clusters to the
    champion's ids (see `align_segment_ids`); a new segment gets an id from `champion_next_id`
    (the champion's `next_id`) on.
    Raises ModelRejected when there are too few customers to cluster.
    """
    sets = np.asarray(sets)
    train, validation = sets == "train", sets == "validation"
    if train.sum() < params.k_max * 5 or validation.sum() < params.k_max + 1:
        raise ModelRejected(
            f"{int(train.sum())} train and {int(validation.sum())} validation customers are too "
            f"few to try up to {params.k_max} segments; lower k_max or wait for more customers"
        )
    feature_columns = snapshot_feature_columns(snapshot, train)
    log_columns = [c for c in LOG_SCALED if c in feature_columns]
    inputs = model_inputs(snapshot, feature_columns, log_columns)
    scaler = fit_block_scaler(inputs.loc[train])
    scaled = torch.from_numpy(scaler.transform(inputs))
    architecture = {
        "hidden": params.hidden,
        "layers": params.layers,
        "embedding_dim": params.embedding_dim,
    }

    def samples(mask: np.ndarray) -> Batches:
        rows = scaled[torch.from_numpy(np.flatnonzero(mask))]
        return Batches(rows, rows)

    with torch_threads(params.cpu_threads):
        result = train_regressor(
            build_autoencoder(len(feature_columns), architecture, params.seed),
            samples(train),
            samples(validation),
            params.train_config(),
            on_epoch=on_epoch,
        )
    fitted = FittedSegmentModel(
        net=result.model,
        architecture=architecture,
        feature_columns=feature_columns,
        log_columns=log_columns,
        scaler=scaler,
        centroids=np.zeros((1, params.embedding_dim)),
        segment_ids=[0],
        history=result.history,
        best_epoch=result.best_epoch,
        seed=params.seed,
    )
    embedding = fitted.embed(snapshot)
    candidates: dict[int, KMeans] = {}
    for k in range(params.k_min, params.k_max + 1):
        candidates[k] = KMeans(k, n_init=params.kmeans_restarts, random_state=params.seed).fit(
            embedding[train]
        )
        labels = candidates[k].predict(embedding[validation])
        fitted.silhouette_by_k[k] = segment_quality(embedding[validation], labels, params.seed)[
            "silhouette"
        ]
    k = choose_k(fitted.silhouette_by_k, champion_k, params.k_tolerance)
    fitted.centroids = candidates[k].cluster_centers_.astype(np.float64)
    clusters, _ = fitted.assign(embedding)
    previous = None
    if champion_segments is not None:
        previous = snapshot["customer_id"].astype("string").map(champion_segments).to_numpy()
        known = ~pd.isna(previous)
        clusters, previous = clusters[known], previous[known].astype(np.int64)
    fitted.segment_ids = align_segment_ids(clusters, previous, k, next_id=champion_next_id)
    fitted.next_id = max(max(fitted.segment_ids) + 1, champion_next_id)
    return fitted


def check_segments_sane(predicted: pd.DataFrame, k: int, what: str) -> None:
    """Raise ModelRejected unless every one of the k segments has customers and every distance
    is finite: an empty or NaN segment is never registered."""
    if predicted.empty:
        raise ModelRejected(f"{what}: no customers were assigned a segment; not registered")
    if not np.isfinite(predicted["distance_to_centroid"].to_numpy(dtype=float)).all():
        raise ModelRejected(f"{what}: distances contain NaN/inf; not registered")
    used = predicted["segment"].nunique()
    if used < k:
        raise ModelRejected(
            f"{what}: only {used} of {k} segments have customers in the snapshot; not registered"
        )


class CustomersTrainingConfig(SegmentModelParams):
    """Hyper-parameters of a nightly segmentation retrain (the Prefect form and MLflow params)."""

    validation_fraction: float = Field(
        0.15, gt=0, lt=0.5, description="Share of customers (by id hash) for early stopping/k."
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=0.5, description="Share of customers (by id hash) held out for promotion."
    )
    promotion_metric: Literal["silhouette"] = Field(
        "silhouette",
        description="Test-customer silhouette, in the common feature space, a challenger must "
        "beat the champion on.",
    )
