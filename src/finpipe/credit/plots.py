"""Credit figures logged to MLflow: each takes plain arrays and returns a matplotlib Figure."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from finpipe import plots
from finpipe.plots import subplots  # on the headless backend

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    """Return ROC curves, one per name -> (labels, pd), with each AUC in the legend."""
    fig, ax = subplots(figsize=(5, 5))
    for name, (labels, scores) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random")
    ax.set(xlabel="false positive rate", ylabel="true positive rate (defaults caught)", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def calibration(labels: np.ndarray, scores: np.ndarray, title: str, bins: int = 10) -> Figure:
    """Return observed default rate against mean PD per PD decile (the diagonal is perfect)."""
    # here: sklearn.calibration imports its calibrated classifiers, 0.4 s a scoring run skips
    from sklearn.calibration import calibration_curve

    observed, predicted = calibration_curve(labels, scores, n_bins=bins, strategy="quantile")
    fig, ax = subplots(figsize=(5, 5))
    top = max(float(np.max(predicted)), float(np.max(observed)), 0.05) * 1.05
    ax.plot([0, top], [0, top], color="grey", linestyle=":", label="perfect calibration")
    ax.plot(predicted, observed, marker="o", label="PD deciles")
    ax.set(xlabel="mean predicted PD", ylabel="observed default rate", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def score_distribution(labels: np.ndarray, scores: np.ndarray, title: str) -> Figure:
    """Return the PD histograms of defaulters and non-defaulters (each normalised)."""
    fig, ax = subplots(figsize=(6, 3.5))
    # A list: matplotlib's stubs type `bins` as a Sequence, which an ndarray is not.
    edges = np.linspace(0, max(float(np.max(scores)), 1e-3), 31).tolist()
    for value, name, colour in ((0, "no default", "#1a9850"), (1, "default", "#d73027")):
        ax.hist(
            scores[labels == value], bins=edges, density=True, alpha=0.5, color=colour, label=name
        )
    ax.set(xlabel="PD", ylabel="density", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def feature_importance(importance: dict[str, float], title: str) -> Figure:
    """Return a horizontal bar chart of mean |attribution| per feature, largest on top."""
    xlabel = "mean |attribution| (log-odds, integrated gradients)"
    return plots.feature_importance(importance, title, xlabel)


def candidate_figures(
    kind: str, labels: np.ndarray, scores: np.ndarray, importance: dict[str, float]
) -> dict[str, Figure]:
    """Return the figures a candidate's run logs (its test rows), by artifact path."""
    return {
        "plots/roc.png": roc({kind: (labels, scores)}, f"{kind}: test ROC"),
        "plots/calibration.png": calibration(labels, scores, f"{kind}: test calibration"),
        "plots/score_distribution.png": score_distribution(
            labels, scores, f"{kind}: test PD by outcome"
        ),
        "plots/feature_importance.png": feature_importance(
            importance, f"{kind}: global feature importance (test rows)"
        ),
    }
