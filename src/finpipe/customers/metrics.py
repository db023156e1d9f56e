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
from finpipe.customers.segment_names import name_segments, population_percentile


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


PROFILED_FEATURES = (
    "recency_days",
    "frequency",
    "monetary_total",
    "monetary_mean",
    "spend_90d",
    "tenure_days",
    "spend_trend",
)


CATEGORY_PREFIX = "category_share_"
UNRECORDED_CATEGORIES = ("unknown", "blank")  # the features' names for a missing / empty value


def top_categories(mean_shares: pd.DataFrame) -> pd.DataFrame:
    """Return each segment's `top_category` and `top_category_share` from its customers' mean
    share of purchases per category (`category_share_<name>` columns, one row per segment).

    The top category is the recorded one with the largest mean share; ties go to the name
    first in alphabetical order. Purchases without a category (the features' `unknown`, also
    every purchase from before a source delivered categories, and `blank`, an empty value; a
    delivered "Unknown" shares the feature) are no category a campaign can target: they never
    win, and a segment whose customers have no recorded category gets none (missing).
    `top_category_share` is the top category's mean share of all the segment's purchases,
    uncategorised ones included, so a label that rests on a small part of them reads as such.
    """
    unrecorded = [f"{CATEGORY_PREFIX}{name}" for name in UNRECORDED_CATEGORIES]
    recorded = mean_shares.drop(columns=unrecorded, errors="ignore").sort_index(axis=1)
    top = pd.DataFrame(
        {"top_category": pd.NA, "top_category_share": np.nan}, index=mean_shares.index
    ).astype({"top_category": "string"})
    if recorded.columns.empty:
        return top
    has_top = recorded.max(axis=1) > 0
    best = recorded.loc[has_top]
    top.loc[has_top, "top_category"] = best.idxmax(axis=1).str.removeprefix(CATEGORY_PREFIX)
    top.loc[has_top, "top_category_share"] = best.max(axis=1)
    return top


def segment_profiles(snapshot: pd.DataFrame, segments: np.ndarray) -> pd.DataFrame:
    """Return one row per segment, by id: its name, size and share, and for each profiled
    feature the median of its customers and that median's percentile among all customers.

    Columns: segment, segment_name (see `segment_names`), customers, share,
    median_<feature>, percentile_<feature> and, when the snapshot has category shares,
    top_category and top_category_share (see `top_categories`).
    """
    frame = snapshot.assign(segment=np.asarray(segments, dtype=np.int64))
    grouped = frame.groupby("segment", sort=True)
    profiles = pd.DataFrame({"customers": grouped.size()})
    profiles["share"] = profiles["customers"] / len(frame)
    for column in PROFILED_FEATURES:
        profiles[f"median_{column}"] = grouped[column].median()
    for column in PROFILED_FEATURES:
        profiles[f"percentile_{column}"] = population_percentile(
            frame[column], profiles[f"median_{column}"]
        )
    mix = [c for c in frame.columns if c.startswith(CATEGORY_PREFIX)]
    if mix:
        profiles = profiles.join(top_categories(grouped[mix].mean()))
    profiles = profiles.reset_index()
    profiles.insert(1, "segment_name", name_segments(profiles))
    return profiles


def night_to_night_agreement(previous: pd.DataFrame, current: pd.DataFrame) -> dict[str, float]:
    """Return how two nights' segment assignments agree on the customers scored both nights.

    Both frames have customer_id, segment and segment_name (a predictions partition).
    `same_segment` and `same_name` are shares of those customers; `customers` their number.
    """
    both = previous.merge(current, on="customer_id", suffixes=("_before", "_after"))
    if both.empty:
        return {"customers": 0, "same_segment": float("nan"), "same_name": float("nan")}
    return {
        "customers": len(both),
        "same_segment": float((both["segment_before"] == both["segment_after"]).mean()),
        "same_name": float((both["segment_name_before"] == both["segment_name_after"]).mean()),
    }
