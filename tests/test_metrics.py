"""Market metrics against values worked out by hand on frames small enough to check on paper."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from finpipe.metrics import market_metrics, per_date_ic

D1, D2, D3 = pd.Timestamp("2024-01-02"), pd.Timestamp("2024-01-03"), pd.Timestamp("2024-01-04")


def _frame(rows: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["date", "ticker", "prediction", "forward_return_5d"])
    return frame.astype({"ticker": "string"})


# Two dates, four names. Worked by hand:
#   D1: x = .4 .3 .2 .1, y = .04 .01 .02 -.03 -> Pearson 10/sqrt(130), Spearman 0.8
#   D2: x = .1 .4 .3 .2, y = -.02 .03 .00 .01 -> Pearson 7/sqrt(65), Spearman 0.8
TWO_DATES = _frame(
    [
        (D1, "A", 0.4, 0.04),
        (D1, "B", 0.3, 0.01),
        (D1, "C", 0.2, 0.02),
        (D1, "D", 0.1, -0.03),
        (D2, "A", 0.1, -0.02),
        (D2, "B", 0.4, 0.03),
        (D2, "C", 0.3, 0.00),
        (D2, "D", 0.2, 0.01),
    ]
)


def test_per_date_ic_pearson_and_spearman_by_hand():
    ic = per_date_ic(TWO_DATES)
    rank_ic = per_date_ic(TWO_DATES, method="spearman")

    assert list(ic.index) == [D1, D2]
    assert ic.to_list() == pytest.approx([10 / math.sqrt(130), 7 / math.sqrt(65)])
    assert rank_ic.to_list() == pytest.approx([0.8, 0.8])


def test_rank_ic_averages_tied_ranks_whatever_the_rows_order():
    """Boosted trees and clipped scores tie: a tie gets the average of its ranks (scipy's
    spearmanr), so the rank IC does not depend on which ticker comes first."""
    from scipy.stats import spearmanr

    prediction = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    label = [0.03, -0.01, 0.02, 0.01, 0.04, -0.02]
    frame = _frame([(D1, t, p, y) for t, p, y in zip("ABCDEF", prediction, label, strict=True)])
    expected = spearmanr(prediction, label).statistic
    assert per_date_ic(frame, method="spearman").iloc[0] == pytest.approx(expected)
    reversed_rows = frame.iloc[::-1].reset_index(drop=True)
    assert per_date_ic(reversed_rows, method="spearman").iloc[0] == pytest.approx(expected)


def test_per_date_ic_drops_thin_and_constant_dates_and_missing_rows():
    frame = _frame(
        [
            (D1, "A", 1.0, 0.01),  # D1: only 2 names -> dropped
            (D1, "B", 2.0, 0.02),
            (D2, "A", 0.5, 0.01),  # D2: constant prediction -> dropped
            (D2, "B", 0.5, 0.03),
            (D2, "C", 0.5, 0.02),
            (D3, "A", 1.0, 0.01),  # D3: the NaN-label row is left out; 3 names remain
            (D3, "B", 2.0, 0.03),
            (D3, "C", 3.0, 0.02),
            (D3, "D", 4.0, np.nan),
        ]
    )
    ic = per_date_ic(frame)
    assert list(ic.index) == [D3]
    assert ic.iloc[0] == pytest.approx(0.5)  # x dev -1 0 1, y dev -1 1 0 -> 1 / sqrt(2 * 2)
    with pytest.raises(ValueError, match="method"):
        per_date_ic(frame, method="kendall")


def test_market_metrics_by_hand():
    metrics = market_metrics(TWO_DATES, quantiles=2)

    ics = [10 / math.sqrt(130), 7 / math.sqrt(65)]
    assert metrics["ic"] == pytest.approx(np.mean(ics))
    assert metrics["icir"] == pytest.approx(np.mean(ics) / np.std(ics, ddof=1))
    assert metrics["rank_ic"] == pytest.approx(0.8)
    assert math.isnan(metrics["rank_icir"])  # zero spread across dates: undefined, not infinite
    # D1: 3 of 4 signs right (D wrong); D2: C's zero label is skipped, A wrong -> 2 of 3
    assert metrics["directional_accuracy"] == pytest.approx(5 / 7)
    # squared errors sum to 0.5404 over 8 rows
    assert metrics["rmse"] == pytest.approx(math.sqrt(0.5404 / 8))
    # k = 4 // 2 = 2 names: D1 top {A, B} .025 - bottom {C, D} -.005 = .03;
    #                       D2 top {B, C} .015 - bottom {D, A} -.005 = .02
    assert metrics["top_minus_bottom"] == pytest.approx(0.025)
    assert metrics["turnover"] == pytest.approx(0.5)  # {A, B} -> {B, C}: half replaced
    assert (metrics["n_dates"], metrics["n_rows"]) == (2, 8)


def test_turnover_and_spread_over_three_dates():
    names = ["A", "B", "C", "D", "E", "F"]
    scores = {
        D1: [6, 5, 4, 3, 2, 1],  # top two: A, B
        D2: [6, 1, 5, 4, 3, 2],  # top two: A, C -> 1 of 2 new
        D3: [1, 2, 3, 6, 5, 4],  # top two: D, E -> 2 of 2 new
    }
    frame = _frame(
        [
            (d, n, float(s), float(s) / 100)
            for d, row in scores.items()
            for n, s in zip(names, row, strict=True)
        ]
    )
    metrics = market_metrics(frame, quantiles=3)  # k = 6 // 3 = 2

    assert metrics["turnover"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["top_minus_bottom"] == pytest.approx((5.5 - 1.5) / 100)  # every date
    assert metrics["ic"] == pytest.approx(1.0)
    # fewer names than quantiles: no quantile portfolio, so no spread and no turnover
    thin = market_metrics(frame, quantiles=7)
    assert math.isnan(thin["top_minus_bottom"]) and math.isnan(thin["turnover"])


def test_perfect_prediction_scores_one():
    rng = np.random.default_rng(0)
    label = rng.normal(scale=0.02, size=50)
    frame = pd.DataFrame(
        {
            "date": np.repeat(pd.bdate_range("2024-01-01", periods=5), 10),
            "ticker": pd.array(list("ABCDEFGHIJ") * 5, dtype="string"),
            "forward_return_5d": label,
            "prediction": label,
        }
    )
    metrics = market_metrics(frame)

    assert metrics["ic"] == pytest.approx(1.0)
    assert metrics["rank_ic"] == pytest.approx(1.0)
    assert metrics["directional_accuracy"] == 1.0
    assert metrics["rmse"] == 0.0
    assert metrics["top_minus_bottom"] > 0


def test_directional_accuracy_of_a_cross_sectional_score_is_against_the_dates_mean():
    """A per-date score says which names beat the day's average, not whether the market rose:
    with `cross_sectional` its sign is compared with the label less the date's mean label."""
    frame = _frame(
        [
            (D1, "A", 0.5, 0.05),  # mean .04: deviations +.01 -.01 -.02 +.02, all called
            (D1, "B", -0.5, 0.03),
            (D1, "C", -1.5, 0.02),
            (D1, "D", 1.5, 0.06),
            (D2, "A", 1.0, -0.01),  # mean -.025: deviations +.015 -.005 +.005 -.015
            (D2, "B", -1.0, -0.03),
            (D2, "C", -1.0, -0.02),  # the one wrong call
            (D2, "D", -1.0, -0.04),
        ]
    )
    across = market_metrics(frame, quantiles=2, cross_sectional=True)
    assert across["directional_accuracy"] == pytest.approx(7 / 8)
    assert market_metrics(frame, quantiles=2)["directional_accuracy"] == pytest.approx(5 / 8)
    assert across["ic"] == market_metrics(frame, quantiles=2)["ic"]  # nothing else moves
