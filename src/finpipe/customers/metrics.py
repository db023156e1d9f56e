"""Segmentation metrics: quality by customer window, agreement with other assignments, profiles.

Every figure is computed on one window's customers (validation or test, by id hash); the
promotion metric is the silhouette in the common evaluation space (`evaluation_space`), which
does not depend on the model, so two models' figures compare like for like.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score

from finpipe.customers.model import FittedSegmentModel, evaluation_space, segment_quality


def quality_by_window(
    snapshot: pd.DataFrame,
    sets: np.ndarray,
    fitted: FittedSegmentModel,
    segments: np.ndarray,
    comparisons: Mapping[str, pd.Series | None],
    planted: pd.Series | None,
) -> dict[str, dict[str, float]]:
    """Return {"validation": {...}, "test": {...}}, each measured on that window's customers.

    `comparisons` are other assignments of the same customers by name (segment by customer
    id): the champion's for this snapshot, the last published ones; `planted` the true
    segments of synthetic data.

    - silhouette, davies_bouldin: in the common evaluation space (the promotion metric);
    - embedding_silhouette: in the model's own embedding (what k was chosen on);
    - same_segment_vs_<name>, ari_vs_<name>: against each comparison, customers in both
      (vs champion: the retrain's effect alone; vs previous_night: what a user sees change);
    - ari_vs_planted: against the planted segments, when the data is synthetic.
    """
    space = evaluation_space(snapshot, sets)
    embedding = fitted.embed(snapshot)
    ids = snapshot["customer_id"].astype("string")
    result = {}
    for window in ("validation", "test"):
        mine = sets == window
        values = {
            **segment_quality(space[mine], segments[mine]),
            "embedding_silhouette": segment_quality(embedding[mine], segments[mine])["silhouette"],
            "segments": fitted.k,
            "customers": int(mine.sum()),
        }
        for name, other in comparisons.items():
            if other is None:
                continue
            theirs = ids[mine].map(other)
            known = theirs.notna().to_numpy()
            if known.any():
                ours, theirs = segments[mine][known], theirs[known].to_numpy(dtype=np.int64)
                values[f"same_segment_vs_{name}"] = float(np.mean(ours == theirs))
                values[f"ari_vs_{name}"] = float(adjusted_rand_score(theirs, ours))
        if planted is not None:
            truth = ids[mine].map(planted)
            known = truth.notna().to_numpy()
            if known.any():
                values["ari_vs_planted"] = float(
                    adjusted_rand_score(truth[known].to_numpy(), segments[mine][known])
                )
        result[window] = values
    return result


def segment_profiles(snapshot: pd.DataFrame, segments: np.ndarray) -> pd.DataFrame:
    """Return one row per segment: size, share and the median RFM and spend of its customers."""
    frame = snapshot.assign(segment=segments)
    grouped = frame.groupby("segment", sort=True)
    profiles = pd.DataFrame({"customers": grouped.size()})
    profiles["share"] = profiles["customers"] / len(frame)
    for column in (
        "recency_days",
        "frequency",
        "monetary_total",
        "monetary_mean",
        "spend_90d",
        "tenure_days",
        "spend_trend",
    ):
        profiles[f"median_{column}"] = grouped[column].median()
    mix = [c for c in frame.columns if c.startswith("category_share_")]
    if mix:
        top = grouped[mix].mean().idxmax(axis=1).str.removeprefix("category_share_")
        profiles["top_category"] = top
    return profiles.reset_index()
