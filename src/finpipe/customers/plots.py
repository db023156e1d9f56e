"""Figures of a segmentation logged to MLflow: plain data in, a matplotlib Figure out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from finpipe.plots import learning_curve, subplots  # on the headless backend

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from finpipe.customers.model import FittedSegmentModel


def segment_map(embedding: np.ndarray, segments: np.ndarray, title: str) -> Figure:
    """Return a scatter of the embedding coloured by segment.

    A 2-D embedding is drawn as is; a wider one is projected on its first two principal
    components (fitted on these rows), which the axis labels say.
    """
    points = np.asarray(embedding, dtype=float)
    labels = ("embedding 1", "embedding 2")
    if points.shape[1] > 2:
        centred = points - points.mean(axis=0)
        _, _, axes = np.linalg.svd(centred, full_matrices=False)
        points = centred @ axes[:2].T
        labels = ("principal component 1", "principal component 2")
    fig, ax = subplots(figsize=(6, 5))
    for segment in np.unique(segments):
        mine = segments == segment
        ax.scatter(points[mine, 0], points[mine, 1], s=6, alpha=0.6, label=f"segment {segment}")
    ax.set(xlabel=labels[0], ylabel=labels[1], title=title)
    ax.legend(markerscale=3, fontsize="small")
    fig.tight_layout()
    return fig


def silhouette_by_k(scores: Mapping[int, float], chosen: int, title: str) -> Figure:
    """Return the validation silhouette of each number of segments tried, the chosen k marked."""
    ks = sorted(scores)
    fig, ax = subplots(figsize=(5, 3.5))
    ax.plot(ks, [scores[k] for k in ks], marker="o")
    ax.axvline(chosen, color="grey", linestyle=":", label=f"chosen k = {chosen}")
    ax.set(xlabel="segments (k)", ylabel="silhouette (validation)", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def run_figures(
    embedding: np.ndarray, segments: np.ndarray, fitted: FittedSegmentModel
) -> dict[str, Figure]:
    """Return the figures a segmentation run logs, by artifact path."""
    return {
        "plots/segment_map.png": segment_map(embedding, segments, "customers by segment"),
        "plots/silhouette_by_k.png": silhouette_by_k(
            fitted.silhouette_by_k, fitted.k, "choosing the number of segments"
        ),
        "plots/learning_curve.png": learning_curve(
            fitted.history, "autoencoder: reconstruction loss by epoch"
        ),
    }
