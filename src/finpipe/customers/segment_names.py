"""Segment names in a marketer's words, derived from the segments' profiles.

A name is three words, recency, frequency and spend, e.g. "recent, frequent, high spend" or
"lapsed, one-off, low spend". Conventions, stated once here:

- a segment's figure on a feature is the median over its customers (`median_<feature>` in the
  profiles table), and its population percentile (`percentile_<feature>`) is the share of all
  the night's customers below that median, ties counted half;
- its level on the feature (low, mid, high) is where that percentile ranks among the night's
  segments: the lowest third of the ranks is low, the top third high, the rest mid. Segments
  whose percentiles lie within `NEAR_TIE` of a neighbour's (sorted, chained) count as equal and
  share their average rank, so a feature that barely tells segments apart gives them the same
  level (mid, when it tells none apart). Ranking the segments, rather than placing each median
  among all customers' terciles, is deliberate: a segment that holds most customers sits at the
  population's middle on every feature by construction (on CDNOW the 71% of one-off buyers who
  lapsed would read "cooling, one-off, mid spend");
- frequency reads "one-off" whenever the segment's median customer bought once, whatever the
  rank (a literal fact beats a relative one);
- recency "lapsed" is checked against the segment's own rhythm, its usual gap between purchases,
  both ways. A segment whose rank says lapsed but whose median customer has been away no longer
  than one usual gap reads "cooling" (on the synthetic logs the big-ticket buyers, who buy every
  two months or so and never churn, rank in the top third on recency). A segment that ranks
  cooling but whose median customer has been away more than `LAPSED_AFTER_GAPS` usual gaps
  reads "lapsed": its customers have stopped buying, which is what a win-back campaign looks
  for, even when a bigger segment has been gone longer still (on the CDNOW sample on
  1998-06-30 the repeat buyers, away a median 213 days and used to buying every 96, rank mid
  behind the one-off buyers, gone 493 days). Between one and two gaps the rank decides. The
  check moves the rank's word one step at most, so a segment that ranks recent stays recent:
  the newest customers' rhythm rests on one or two intervals (two purchases two days apart,
  last seen 6 days ago, is 3 "gaps" away), and a win-back offer to them would be wrong. Two
  gaps is where an active buyer is rarely found: if buying is memoryless, a customer who still
  buys has been away longer than two usual gaps with probability e^-2 (14%), so for the
  segment's median customer to be past two gaps, more than 40% of its customers must have
  stopped.
  The gap is read from the profile alone, so names stay reproducible from the published table:
  (median tenure - median recency) / (median frequency - 1), the span from first to last
  purchase over the purchases after the first. Tenure alone over (frequency - 1) would count the
  time away as part of the gap, and a segment of two-purchase customers could then never read
  lapsed. A one-off segment has no gap and keeps the rank's word, as does a segment whose median
  customer bought on one day only (span 0: no rhythm to be late on);
- names are unique within a night: segments that share one get the first qualifier that tells
  them apart, ranked among those segments alone: basket size (mean spend per purchase), tenure,
  then spend trend; any still alike end with "(segment <id>)".

Names follow the night's profile: a segment whose behaviour changes may change its name, while
its id (aligned to the champion's, see `align_segment_ids`) stays.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NEAR_TIE = 0.05  # percentile points within which neighbouring segments count as equal
LAPSED_AFTER_GAPS = 2.0  # usual gaps away beyond which a repeat-buying segment reads lapsed
NAME_FEATURES = (  # (feature, words for low / mid / high), in the order they are named
    ("recency_days", ("recent", "cooling", "lapsed")),
    ("frequency", ("infrequent", "occasional", "frequent")),
    ("monetary_total", ("low spend", "mid spend", "high spend")),
)
QUALIFIERS = (  # tried in this order on segments that share a name
    ("monetary_mean", ("small baskets", "mid-size baskets", "big baskets")),
    ("tenure_days", ("new", "established", "long-standing")),
    ("spend_trend", ("declining", "steady", "growing")),
)
ONE_OFF = "one-off"
NAMED_FEATURES = tuple(f for f, _ in NAME_FEATURES + QUALIFIERS)


def population_percentile(population: pd.Series, values: pd.Series) -> pd.Series:
    """Return, for each of `values`, the share of `population` below it (ties count half).

    Missing population values are left out; a missing value gets NaN.
    """
    ordered = np.sort(population.dropna().to_numpy(dtype=np.float64))
    points = values.to_numpy(dtype=np.float64)
    if len(ordered) == 0:
        return pd.Series(np.nan, index=values.index)
    below = np.searchsorted(ordered, points, side="left")
    at_most = np.searchsorted(ordered, points, side="right")
    share = (below + at_most) / (2.0 * len(ordered))
    return pd.Series(np.where(np.isnan(points), np.nan, share), index=values.index)


def feature_levels(percentiles: pd.Series) -> pd.Series:
    """Return 0 (low), 1 (mid) or 2 (high) per segment: where its percentile ranks among them.

    Ranks run 0..k-1; neighbours (in sorted order) within `NEAR_TIE` of each other are chained
    into one group that shares its average rank. A rank below a third of k-1 is low, above two
    thirds high. A single segment, or one with a missing percentile, is mid.
    """
    levels = pd.Series(1, index=percentiles.index, dtype=np.int64)
    known = percentiles[percentiles.notna()].sort_values(kind="stable")
    span = len(known) - 1
    if span < 1:
        return levels
    values = known.to_numpy(dtype=np.float64)
    group = np.concatenate([[0], np.cumsum(np.diff(values) >= NEAR_TIE)])
    rank = pd.Series(np.arange(len(values), dtype=np.float64)).groupby(group).transform("mean")
    rank = rank.to_numpy()
    levels[known.index] = np.where(3 * rank < span, 0, np.where(3 * rank > 2 * span, 2, 1))
    return levels


def usual_gap_days(profiles: pd.DataFrame) -> pd.Series:
    """Return each segment's usual days between purchases, from its profile's medians.

    (median tenure - median recency) / (median frequency - 1): the median customer's span from
    first to last purchase, over the purchases after the first. NaN for a one-off segment
    (median frequency 1 or less) and for one whose span is 0 (every purchase on one day): neither
    has a rhythm.
    """
    span = profiles["median_tenure_days"] - profiles["median_recency_days"]
    repeats = profiles["median_frequency"] - 1
    return (span.where(span > 0) / repeats.where(repeats > 0)).rename("usual_gap_days")


def name_segments(profiles: pd.DataFrame) -> pd.Series:
    """Return each segment's name (a string Series indexed like `profiles`), unique per table.

    `profiles` has one row per segment with `segment` and, for every feature in
    `NAMED_FEATURES`, `median_<feature>` and `percentile_<feature>` (see `segment_profiles`).
    """
    words = []
    for feature, vocabulary in NAME_FEATURES:
        levels = feature_levels(profiles[f"percentile_{feature}"])
        words.append(levels.map(dict(enumerate(vocabulary))))
    one_off = profiles["median_frequency"] <= 1
    words[1] = words[1].where(~one_off, ONE_OFF)
    _, cooling, lapsed = NAME_FEATURES[0][1]
    gaps_away = profiles["median_recency_days"] / usual_gap_days(profiles)  # NaN: no rhythm
    words[0] = words[0].mask((words[0] == lapsed) & (gaps_away <= 1), cooling)
    words[0] = words[0].mask((words[0] == cooling) & (gaps_away > LAPSED_AFTER_GAPS), lapsed)
    names = words[0].str.cat(words[1:], sep=", ")
    for feature, vocabulary in QUALIFIERS:
        for _, group in names.groupby(names, sort=True):
            if len(group) < 2:
                continue
            members = group.index
            levels = feature_levels(profiles.loc[members, f"percentile_{feature}"])
            if levels.nunique() > 1:
                names[members] = group + ", " + levels.map(dict(enumerate(vocabulary)))
    alike = names.duplicated(keep=False)
    suffix = " (segment " + profiles["segment"].astype("int64").astype(str) + ")"
    names[alike] = names[alike] + suffix[alike]
    return names.astype("string").rename("segment_name")
