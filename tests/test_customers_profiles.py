"""Segment profiles and names in a marketer's words (pure functions on frames built here)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
from scipy.stats import percentileofscore

from finpipe.customers.features import build_customer_features
from finpipe.customers.metrics import (
    PROFILED_FEATURES,
    night_to_night_agreement,
    segment_profiles,
    top_categories,
)
from finpipe.customers.segment_names import (
    NAMED_FEATURES,
    feature_levels,
    name_segments,
    population_percentile,
    usual_gap_days,
)


def _customers(segment: int, n: int, **features: float) -> pd.DataFrame:
    """`n` customers of one segment, each feature spread a little around the given value."""
    spread = np.linspace(0.9, 1.1, n)
    frame = pd.DataFrame({"customer_id": [f"{segment}-{i}" for i in range(n)], "segment": segment})
    defaults = {"monetary_mean": 30.0, "spend_90d": 50.0, "tenure_days": 400.0, "spend_trend": 0.0}
    for name, value in {**defaults, **features}.items():
        frame[name] = value * spread if name != "frequency" else value
    return frame


def test_a_profile_with_clear_extremes_gets_the_expected_words():
    snapshot = pd.concat(
        [  # ids deliberately not in the order of the words
            _customers(0, 10, recency_days=400, frequency=1, monetary_total=20),
            _customers(1, 10, recency_days=3, frequency=30, monetary_total=3000),
            _customers(2, 10, recency_days=60, frequency=6, monetary_total=300),
        ],
        ignore_index=True,
    )
    profiles = segment_profiles(snapshot.drop(columns="segment"), snapshot["segment"].to_numpy())
    assert profiles["segment_name"].tolist() == [
        "lapsed, one-off, low spend",
        "recent, frequent, high spend",
        "cooling, occasional, mid spend",
    ]
    assert profiles["customers"].tolist() == [10, 10, 10]
    assert profiles["share"].tolist() == pytest.approx([1 / 3] * 3)
    assert profiles.loc[1, "median_recency_days"] == pytest.approx(3.0)
    # segment 1's median recency is above 5 of its own customers and below the 20 others
    assert profiles.loc[1, "percentile_recency_days"] == pytest.approx(5 / 30)
    assert {f"percentile_{f}" for f in PROFILED_FEATURES} <= set(profiles.columns)


def test_one_off_is_literal_even_when_the_rank_says_otherwise():
    profiles = _table(
        [
            {"recency_days": 0.9, "frequency": 0.5, "monetary_total": 0.5, "median_frequency": 1},
            {"recency_days": 0.5, "frequency": 0.1, "monetary_total": 0.1, "median_frequency": 1},
            {"recency_days": 0.1, "frequency": 0.9, "monetary_total": 0.9, "median_frequency": 9},
        ]
    )
    assert name_segments(profiles).tolist() == [
        "lapsed, one-off, mid spend",  # mid rank on frequency, but its median customer bought once
        "cooling, one-off, low spend",
        "recent, frequent, high spend",
    ]


def _table(rows: list[dict[str, float]]) -> pd.DataFrame:
    """A profiles table: percentiles as given (0.5 for the rest), medians of 2 unless given."""
    table = pd.DataFrame({"segment": range(len(rows))})
    for feature in NAMED_FEATURES:
        table[f"percentile_{feature}"] = [r.get(feature, 0.5) for r in rows]
        table[f"median_{feature}"] = [r.get(f"median_{feature}", 2.0) for r in rows]
    return table


def test_lapsed_by_rank_reads_cooling_while_within_its_usual_gap_between_purchases():
    """The demo's last night (2024-06-28): the planted big-ticket buyers, who never churn, rank
    second-highest on recency (top third), but their median customer, 44 days away, buys about
    every (556.5 - 44) / (8 - 1) = 73 days; the planted lapsed ones, 238 days away, every 19."""
    profiles = _table(
        [  # recency percentile and the medians the gap is read from, as published that night
            {"recency_days": 0.50, "median_recency_days": 13, "median_tenure_days": 572,
             "median_frequency": 23, "frequency": 0.5, "monetary_total": 0.5},
            {"recency_days": 0.20, "median_recency_days": 3, "median_tenure_days": 600,
             "median_frequency": 103, "frequency": 0.9, "monetary_total": 0.9},
            {"recency_days": 0.90, "median_recency_days": 238, "median_tenure_days": 622,
             "median_frequency": 21, "frequency": 0.5, "monetary_total": 0.5},
            {"recency_days": 0.71, "median_recency_days": 44, "median_tenure_days": 556.5,
             "median_frequency": 8, "frequency": 0.2, "monetary_total": 0.8},
            {"recency_days": 0.32, "median_recency_days": 6, "median_tenure_days": 41,
             "median_frequency": 4, "frequency": 0.2, "monetary_total": 0.1},
        ]
    )  # fmt: skip
    assert usual_gap_days(profiles).tolist() == pytest.approx(
        [559 / 22, 597 / 102, 384 / 20, 512.5 / 7, 35 / 3]
    )
    assert name_segments(profiles).tolist() == [
        "cooling, occasional, mid spend",
        "recent, frequent, high spend",
        "lapsed, occasional, mid spend",
        "cooling, infrequent, high spend",  # was "lapsed, ...": 44 days away, buys every 73
        "recent, infrequent, low spend",
    ]


def test_the_usual_gap_leaves_the_time_away_out():
    """Two purchases 30 days apart, the last 100 days ago: lapsed. Tenure over (frequency - 1)
    would give a 130-day gap, and a two-purchase segment could never read lapsed."""
    profiles = _table(
        [
            {"recency_days": 0.9, "median_recency_days": 100, "median_tenure_days": 130},
            {"recency_days": 0.5, "median_recency_days": 20, "median_tenure_days": 400},
            {"recency_days": 0.1, "median_recency_days": 5, "median_tenure_days": 400},
            {
                "recency_days": 0.95,
                "median_frequency": 1,
                "median_recency_days": 3,
                "median_tenure_days": 3,
            },
        ]
    )
    assert usual_gap_days(profiles).iloc[0] == pytest.approx(30.0)
    assert np.isnan(usual_gap_days(profiles).iloc[3])  # one-off: no gap, the rank decides
    names = name_segments(profiles)
    assert names.str.split(",").str[0].tolist() == ["lapsed", "cooling", "recent", "lapsed"]


def test_a_segment_far_past_its_rhythm_reads_lapsed_though_a_bigger_one_is_gone_longer():
    """The CDNOW sample on 1998-06-18, as published: the repeat buyers, a median 216.5 days away
    and used to buying every (489 - 216.5) / (4 - 1) = 91 days, rank mid on recency only
    because the one-off buyers (68%) have been gone 481 days. They are 2.4 gaps late: lapsed,
    the segment a win-back campaign is for."""
    profiles = _table(
        [
            {"recency_days": 0.655, "median_recency_days": 481, "median_tenure_days": 491,
             "median_frequency": 1, "frequency": 0.256, "monetary_total": 0.346},
            {"recency_days": 0.257, "median_recency_days": 216.5, "median_tenure_days": 489,
             "median_frequency": 4, "frequency": 0.805, "monetary_total": 0.769},
            {"recency_days": 0.070, "median_recency_days": 37, "median_tenure_days": 487,
             "median_frequency": 6, "frequency": 0.890, "monetary_total": 0.862},
        ]
    )  # fmt: skip
    assert (profiles["median_recency_days"] / usual_gap_days(profiles))[1] == pytest.approx(
        2.38, abs=0.01
    )
    assert name_segments(profiles).tolist() == [
        "lapsed, one-off, low spend",
        "lapsed, occasional, mid spend",  # was "cooling, ...": its rank alone said mid
        "recent, frequent, high spend",
    ]


def test_two_usual_gaps_away_turns_cooling_to_lapsed_and_between_one_and_two_the_rank_decides():
    """Gaps of 30 days (tenure - recency = 90 over 3 repeat purchases) for every segment. The
    check moves the rank's word one step at most: a segment that ranks recent stays recent, as
    the newest customers do (two purchases two days apart, last seen 6 days ago: 3 "gaps"
    away, and they read lapsed when the rule ignored the rank)."""

    def away(recency: float, percentile: float) -> dict[str, float]:
        return {
            "recency_days": percentile,
            "median_recency_days": recency,
            "median_tenure_days": recency + 90,
            "median_frequency": 4,
        }

    profiles = _table(
        [
            away(61, 0.10),  # ranks recent, 2.03 gaps away: recent still
            away(59, 0.45),  # ranks mid, 1.97 gaps away
            away(45, 0.70),  # ranks mid, 1.5 gaps away
            away(45, 0.95),  # ranks lapsed, 1.5 gaps away
            away(25, 0.99),  # ranks lapsed, within one gap
            {"recency_days": 0.55, "median_recency_days": 80, "median_tenure_days": 80},
            away(5, 0.20),  # ranks recent, well within its rhythm
        ]
    )
    recency = name_segments(profiles).str.split(",").str[0].tolist()
    # segment 5: two purchases on one day, 80 days ago: no rhythm to be late on, the rank decides
    assert recency == ["recent", "cooling", "cooling", "lapsed", "cooling", "cooling", "recent"]
    newest = _table(
        [
            {  # ranks recent: two purchases two days apart, last seen 6 days ago (3 "gaps")
                "recency_days": 0.05,
                "median_recency_days": 6,
                "median_tenure_days": 8,
                "median_frequency": 2,
            },
            away(70, 0.40),  # ranks cooling, 2.33 gaps away
            away(400, 0.90),  # ranks lapsed
        ]
    )
    assert name_segments(newest).str.split(",").str[0].tolist() == ["recent", "lapsed", "lapsed"]
    assert np.isnan(usual_gap_days(profiles).iloc[5])


def test_names_are_unique_per_night_with_a_qualifier_then_the_segment_id():
    same = {"recency_days": 0.1, "frequency": 0.9, "monetary_total": 0.9}
    profiles = _table(
        [
            {**same, "monetary_mean": 0.2, "tenure_days": 0.5},
            {**same, "monetary_mean": 0.8, "tenure_days": 0.5},
            {"recency_days": 0.9, "frequency": 0.1, "monetary_total": 0.1},
            {"recency_days": 0.9, "frequency": 0.1, "monetary_total": 0.1},
            {"recency_days": 0.5, "frequency": 0.5, "monetary_total": 0.5},
        ]
    )
    names = name_segments(profiles)
    assert names.tolist() == [
        "recent, frequent, high spend, small baskets",
        "recent, frequent, high spend, big baskets",
        "lapsed, infrequent, low spend (segment 2)",  # alike on every feature: the id decides
        "lapsed, infrequent, low spend (segment 3)",
        "cooling, occasional, mid spend",
    ]
    assert names.is_unique


def test_a_later_qualifier_separates_what_an_earlier_one_cannot():
    same = {"recency_days": 0.1, "frequency": 0.9, "monetary_total": 0.9, "monetary_mean": 0.5}
    profiles = _table(
        [
            {**same, "tenure_days": 0.5, "spend_trend": 0.1},
            {**same, "tenure_days": 0.52, "spend_trend": 0.9},  # within NEAR_TIE on tenure
            {"recency_days": 0.9, "frequency": 0.1, "monetary_total": 0.1},
        ]
    )
    assert name_segments(profiles).tolist() == [
        "recent, frequent, high spend, declining",
        "recent, frequent, high spend, growing",
        "lapsed, infrequent, low spend",
    ]


def test_a_qualifier_ranks_the_segments_sharing_a_name_among_themselves():
    """Two high spenders with baskets at the 60th and 75th percentile: both are big among all
    five segments, but one is the smaller of the two that share the name."""
    same = {"recency_days": 0.1, "frequency": 0.9, "monetary_total": 0.9}
    other = {"recency_days": 0.9, "frequency": 0.1, "monetary_total": 0.1}
    profiles = _table(
        [
            {**same, "monetary_mean": 0.60},
            {**same, "monetary_mean": 0.75},
            {**other, "monetary_mean": 0.1, "tenure_days": 0.1},
            {**other, "monetary_mean": 0.1, "tenure_days": 0.9},
            {"monetary_mean": 0.3},
        ]
    )
    assert name_segments(profiles).tolist()[:4] == [
        "recent, frequent, high spend, small baskets",
        "recent, frequent, high spend, big baskets",
        "lapsed, infrequent, low spend, new",
        "lapsed, infrequent, low spend, long-standing",
    ]


def test_a_segments_top_category_is_the_one_its_customers_buy_most():
    snapshot = pd.concat(
        [
            _customers(0, 10, recency_days=400, frequency=1, monetary_total=20),
            _customers(1, 10, recency_days=3, frequency=30, monetary_total=3000),
        ],
        ignore_index=True,
    )
    books = np.where(snapshot["segment"] == 0, 0.7, 0.1)
    snapshot = snapshot.assign(
        category_share_books=books,
        category_share_groceries=np.where(snapshot["segment"] == 0, 0.2, 0.6),
        category_share_toys=1.0 - books - np.where(snapshot["segment"] == 0, 0.2, 0.6),
    )
    profiles = segment_profiles(snapshot.drop(columns="segment"), snapshot["segment"].to_numpy())
    assert profiles["top_category"].tolist() == ["books", "groceries"]


def test_purchases_without_a_category_never_make_a_segments_top_category():
    """A source that delivered categories from 2024-03-01 on: earlier purchases have none (the
    features' `category_share_unknown`). Segment 0 bought mostly before then, so most of its
    purchases are uncategorised (a mean 63%): its top category is the one it bought most among
    the rest, books (27%, toys 10%); segment 1 bought only before then: it has none."""

    def bought(customer: str, days: list[str], categories: list[str | None]) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "customer_id": pd.array([customer] * len(days), dtype="string"),
                "date": pd.to_datetime(days).astype("datetime64[ns]"),
                "amount": 10.0,
                "category": pd.array(categories, dtype="string"),
            }
        )

    before, after = ["2024-01-10", "2024-02-10", "2024-02-20"], ["2024-03-10", "2024-03-20"]
    transactions = pd.concat(
        [
            bought("a", before + after, [None, None, None, "books", "toys"]),
            bought("b", before[1:] + after[:1], [None, None, "books"]),
            bought("c", before, [None, None, None]),
            bought("d", before[:2], [None, None]),
        ],
        ignore_index=True,
    )
    snapshot = build_customer_features(transactions, "2024-04-01", active_days=365)
    assert "category_share_unknown" in snapshot.columns
    profiles = segment_profiles(snapshot, np.array([0, 0, 1, 1]))
    assert profiles["top_category"].tolist() == ["books", pd.NA]
    assert profiles["top_category_share"].tolist()[0] == pytest.approx((1 / 5 + 1 / 3) / 2)
    assert np.isnan(profiles["top_category_share"].tolist()[1])


def test_a_top_category_tie_goes_to_the_name_first_in_alphabetical_order():
    shares = pd.DataFrame(
        {"category_share_toys": [0.4], "category_share_books": [0.4], "category_share_blank": [0.2]}
    )
    assert top_categories(shares).iloc[0].tolist() == ["books", 0.4]


@pytest.mark.parametrize(
    ("percentiles", "levels"),
    [
        ([0.9, 0.1, 0.5], [2, 0, 1]),
        ([0.10, 0.13, 0.5, 0.9], [0, 0, 1, 2]),  # 0.10 and 0.13 count as one rank
        ([0.10, 0.16, 0.5, 0.9], [0, 1, 1, 2]),  # 0.06 apart: two ranks
        ([0.40, 0.43, 0.46], [1, 1, 1]),  # a chain of near ties tells nobody apart
        ([0.2, 0.8], [0, 2]),
        ([0.7], [1]),
        ([0.2, np.nan, 0.8], [0, 1, 2]),
    ],
)
def test_levels_rank_segments_with_near_ties_chained(percentiles, levels):
    assert feature_levels(pd.Series(percentiles)).tolist() == levels


def test_population_percentile_matches_scipy():
    rng = np.random.default_rng(3)
    population = pd.Series(rng.integers(0, 12, size=200).astype(float))
    values = pd.Series([-1.0, 0.0, 3.0, 5.5, 11.0, 20.0])
    expected = [percentileofscore(population, v, kind="mean") / 100 for v in values]
    assert population_percentile(population, values).tolist() == pytest.approx(expected)


def test_night_to_night_agreement_counts_customers_scored_both_nights():
    before = pd.DataFrame(
        {"customer_id": ["a", "b", "c", "d"], "segment": [0, 1, 1, 2], "segment_name": list("xyyz")}
    )
    after = pd.DataFrame(
        {"customer_id": ["b", "c", "d", "e"], "segment": [1, 2, 2, 0], "segment_name": list("yyzx")}
    )
    assert night_to_night_agreement(before, after) == {
        "customers": 3,
        "same_segment": pytest.approx(2 / 3),
        "same_name": pytest.approx(1.0),
    }


def test_the_stability_run_delivers_each_row_once_on_its_night(tmp_path):
    from benchmarks.customers_stability import business_nights, split_deliveries

    sample = tmp_path / "sample.txt"
    days = ["19980612", "19980613", "19980614", "19980615", "19980616", "19980617"]
    sample.write_text("".join(f" 0000{i} 000{i} {day}  1   9.99\n" for i, day in enumerate(days)))
    nights = business_nights(dt.date(1998, 6, 16), 2)
    assert nights == [dt.date(1998, 6, 15), dt.date(1998, 6, 16)]  # Monday, Tuesday
    files = split_deliveries(sample, nights, tmp_path / "out")
    delivered = [[line.split()[2] for line in f.read_text().splitlines()] for f in files]
    assert delivered == [days[:4], ["19980616"]]  # the weekend arrives with Monday's file
