"""Credit metrics and population stability, with their conventions stated here once.

- `pd` is a probability of default in [0, 1]; the label is 1 for default, 0 otherwise.
- ROC AUC: probability that a random defaulter gets a higher PD than a random non-defaulter
  (ties count one half). Gini = 2 * AUC - 1 (the accuracy ratio of the CAP curve).
- KS: the largest gap between the cumulative PD distributions of defaulters and
  non-defaulters, max(TPR - FPR) over thresholds, in [0, 1].
- Brier: mean squared error of the PD against the 0/1 outcome (lower is better).
- Log loss: mean negative log-likelihood of the outcomes, PDs clipped to [1e-15, 1 - 1e-15].
- PSI (population stability index) between an expected (training) and an actual (scoring)
  distribution over the same bins: sum((a - e) * ln(a / e)). Shares are floored at 1e-4 so an
  empty bin does not make it infinite. Reading, the industry convention: below 0.10 stable,
  0.10 to 0.25 a moderate shift worth a look, above 0.25 a significant shift (retrain or
  investigate).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score, roc_curve

if TYPE_CHECKING:
    from finpipe.credit.model import FittedCreditModel
    from finpipe.tracking import RegisteredModel

log = logging.getLogger("finpipe.credit")

PSI_FLOOR = 1e-4
PSI_MODERATE = 0.10
PSI_SIGNIFICANT = 0.25


def credit_metrics(labels, pd_values) -> dict[str, float]:
    """Return auc, gini, ks, brier, log_loss, default_rate and n for PDs against 0/1 outcomes.

    Rows with a missing outcome or PD are left out. With only one class present the ranking
    metrics (auc, gini, ks) are NaN.
    """
    y = np.asarray(labels, dtype=float)
    p = np.asarray(pd_values, dtype=float)
    keep = np.isfinite(y) & np.isfinite(p)
    y, p = y[keep].astype(int), np.clip(p[keep], 0.0, 1.0)
    result = {
        "auc": float("nan"),
        "gini": float("nan"),
        "ks": float("nan"),
        "brier": float(brier_score_loss(y, p)) if len(y) else float("nan"),
        "log_loss": float(log_loss(y, p, labels=[0, 1])) if len(y) else float("nan"),
        "default_rate": float(y.mean()) if len(y) else float("nan"),
        "n": int(len(y)),
    }
    if len(np.unique(y)) == 2:
        auc = float(roc_auc_score(y, p))
        fpr, tpr, _ = roc_curve(y, p)
        result.update(auc=auc, gini=2.0 * auc - 1.0, ks=float(np.max(tpr - fpr)))
    return result


def auc_standard_error(auc: float, defaults: int, non_defaults: int) -> float:
    """Return the standard error of an ROC AUC (Hanley & McNeil, 1982, Radiology 143:29-36)
    from the AUC and the two class counts; NaN when a class is empty."""
    if defaults < 1 or non_defaults < 1 or not np.isfinite(auc):
        return float("nan")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc**2 / (1.0 + auc)
    variance = (
        auc * (1.0 - auc) + (defaults - 1) * (q1 - auc**2) + (non_defaults - 1) * (q2 - auc**2)
    ) / (defaults * non_defaults)
    return float(np.sqrt(max(variance, 0.0)))


def psi(expected_shares, actual_shares) -> float:
    """Return the population stability index of two share vectors over the same bins."""
    e = np.maximum(np.asarray(expected_shares, dtype=float), PSI_FLOOR)
    a = np.maximum(np.asarray(actual_shares, dtype=float), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def quantile_edges(values, bins: int = 10) -> list[float]:
    """Return the inner bin edges that cut the finite `values` into `bins` equal-count bins
    (fewer when values repeat)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return []
    edges = np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])
    return [float(e) for e in np.unique(edges)]


def binned_shares(values, edges: list[float]) -> list[float]:
    """Return the share of `values` in each bin of `edges` (right-closed), plus a last bin for
    missing values: len(edges) + 2 shares summing to 1 (all zero for no values)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return [0.0] * (len(edges) + 2)
    missing = ~np.isfinite(values)
    counts = np.bincount(
        np.searchsorted(np.asarray(edges, dtype=float), values[~missing], side="left"),
        minlength=len(edges) + 1,
    ).astype(float)
    counts = np.append(counts, missing.sum())
    return [float(c) for c in counts / values.size]


def category_shares(indices, size: int) -> list[float]:
    """Return the share of each category index 0..size-1 (0 is the unknown bucket)."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return [0.0] * size
    return [float(c) for c in np.bincount(indices, minlength=size) / indices.size]


# -- what a run and a scoring night report beside the metrics ------------------------------
def global_importance(fitted: FittedCreditModel, rows: pd.DataFrame) -> dict[str, float]:
    """Global importance: mean |integrated-gradient attribution| per feature over `rows`."""
    attributions = fitted.attributions(rows)
    values = (
        np.abs(attributions).mean(axis=0) if len(rows) else np.zeros(len(fitted.feature_columns))
    )
    ranked = sorted(zip(fitted.feature_columns, values, strict=True), key=lambda kv: -kv[1])
    return {name: float(value) for name, value in ranked}


def stability_populations(
    fitted: FittedCreditModel, model: str, actual: str, actual_rows: int
) -> dict[str, object]:
    """Return which two populations a PSI report compares, to be written beside its values:
    the expected one, `model`'s training rows (their count and dates, where the model recorded
    them), the actual one, `actual` with `actual_rows` rows, and how both were binned."""
    recorded = fitted.population
    return {
        "expected": {
            "population": f"training rows of {model}",
            "rows": recorded.get("rows"),
            "first_date": recorded.get("first_date"),
            "last_date": recorded.get("last_date"),
        },
        "actual": {"population": actual, "rows": actual_rows},
        "bins": (
            "deciles of the training rows' PD and of each numeric (plus a missing bin); each "
            "category of the training vocabulary (plus the unknown bucket)"
        ),
    }


def scoring_report(
    as_of: dt.date, champion: RegisteredModel, population: pd.DataFrame, pd_values: pd.Series
) -> dict[str, object]:
    """Return the scoring report of `as_of`: population stability (PSI of the score and of each
    feature against the champion's training rows, logged when significant) with the two
    populations it compares, the categories never seen in training (scored through the
    unknown bucket), and the reference applicant the night's reason codes are measured from."""
    fitted: FittedCreditModel = champion.model
    stability, unseen = {}, {}
    if len(population):
        indices = fitted.vocabulary.transform(population)  # once for both checks
        stability = fitted.population_stability(population, pd_values, indices)
        unseen = fitted.unseen_categories(population, indices)
    drifted = sorted(name for name, value in stability.items() if value > PSI_SIGNIFICANT)
    if drifted:
        log.warning("PSI above %s (population shift) for: %s", PSI_SIGNIFICANT, drifted)
    for column, values in unseen.items():
        log.warning("unseen %s categories scored as unknown: %s", column, values)
    return {
        "as_of": as_of.isoformat(),
        "rows": len(population),
        "model_name": champion.name,
        "model_version": champion.version,
        "population_stability": stability,
        "population_stability_compares": stability_populations(
            fitted,
            f"{champion.name} v{champion.version}",
            f"loans scored on {as_of.isoformat()}",
            len(population),
        ),
        "drifted": drifted,
        "unseen_categories": unseen,
        "reason_codes_measured_from": fitted.reason_baseline(),
    }
