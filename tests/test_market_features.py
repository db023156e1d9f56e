"""Market features and labels: hand-computed values, point-in-time and incremental = full."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import rankdata

from finpipe.market.features import (
    _ROWS_BEFORE_T,
    FEATURE_LOOKBACK_DAYS,
    _cross_sectional_rank,
    _features_in_float64,
    _TickerPanel,
    build_market_features,
    build_market_labels,
    market_feature_columns,
    skipped_market_features,
)
from finpipe.market.synthetic import MarketSyntheticConfig, generate_market_panel
from finpipe.training import time_split

PRICE_FEATURES = [
    "return_1d", "return_5d", "return_20d", "return_60d", "volatility_20d", "rsi_14", "macd",
    "macd_signal", "ma_ratio_5", "ma_ratio_20", "ma_ratio_60",
]  # fmt: skip
RANKS = ["return_5d_cs_rank", "return_20d_cs_rank", "volatility_20d_cs_rank"]


def one_ticker(close: list[float] | np.ndarray, ticker: str = "AAA", **columns) -> pd.DataFrame:
    days = pd.bdate_range("2024-01-01", periods=len(close)).as_unit("ns")
    frame = pd.DataFrame({"date": days, "ticker": ticker, "close": np.asarray(close, float)})
    for name, values in columns.items():
        frame[name] = np.asarray(values, float)
    return frame.astype({"ticker": "string"})


@pytest.fixture(scope="module")
def panel() -> pd.DataFrame:
    """Ten tickers over 320 days, two listing late and two delisting early."""
    config = MarketSyntheticConfig(
        tickers=10, days=320, seed=7, listing_fraction=0.2, delisting_fraction=0.2
    )
    return generate_market_panel(config).prices


@pytest.fixture(scope="module")
def full_features(panel) -> pd.DataFrame:
    return build_market_features(panel)


def test_lookback_is_set_by_the_macd_signal_line():
    # slow EMA over 2 * 26 rows, then its 9-span signal over 2 * 9 rows: 51 + 17 rows before t.
    assert FEATURE_LOOKBACK_DAYS == 68


def test_returns_and_moving_average_ratios_on_a_known_series():
    features = build_market_features(one_ticker([10, 11, 12, 13, 14, 15, 16, 18]))
    assert features["return_1d"].tolist()[:3] == pytest.approx([np.nan, 0.1, 1 / 11], nan_ok=True)
    assert features["return_5d"].isna().tolist() == [True] * 5 + [False] * 3
    assert features["return_5d"].iloc[5] == pytest.approx(15 / 10 - 1)
    assert features["return_5d"].iloc[7] == pytest.approx(18 / 12 - 1)
    assert features["ma_ratio_5"].isna().sum() == 4
    assert features["ma_ratio_5"].iloc[4] == pytest.approx(14 / 12 - 1)
    assert features["ma_ratio_5"].iloc[7] == pytest.approx(
        18 / 15.2 - 1
    )  # mean(13, 14, 15, 16, 18)
    assert features["ma_ratio_20"].isna().all()
    assert features[market_feature_columns(["close"])].dtypes.eq("float32").all()


def test_volatility_and_rsi_on_known_series():
    # Log returns alternate +1% / -1%: sample std over 20 of them is 0.01 * sqrt(20 / 19).
    log_price = np.cumsum([0.0] + [0.01, -0.01] * 15)
    zigzag = build_market_features(one_ticker(100 * np.exp(log_price)))
    assert zigzag["volatility_20d"].isna().sum() == 20
    assert zigzag["volatility_20d"].iloc[20] == pytest.approx(0.01 * np.sqrt(20 / 19), rel=1e-6)
    # Four rises of 2 and ten falls of 1 over the last 14 changes: RSI = 100 * 8 / (8 + 10).
    close = 30 + np.cumsum([0.0] + [2.0] * 4 + [-1.0] * 10)
    rsi = build_market_features(one_ticker(close))["rsi_14"]
    assert rsi.isna().sum() == 14
    assert rsi.iloc[14] == pytest.approx(100 * 8 / 18, rel=1e-6)


def test_rsi_is_100_when_rising_and_50_when_flat():
    rising = build_market_features(one_ticker(np.arange(1.0, 21.0)))
    assert rising["rsi_14"].iloc[14:].tolist() == [100.0] * 6
    flat = build_market_features(one_ticker(np.full(20, 7.0)))
    assert flat["rsi_14"].iloc[14:].tolist() == [50.0] * 6


def test_macd_is_zero_for_a_flat_price_once_its_windows_are_full():
    features = build_market_features(one_ticker(np.full(80, 42.0)))
    assert features["macd"].isna().sum() == 51
    assert np.abs(features["macd"].iloc[51:]).max() < 1e-6
    assert features["macd_signal"].isna().sum() == 68
    assert features["macd_signal"].notna().sum() == 12


def test_volume_range_and_open_features():
    close = np.full(25, 10.0)
    volume = np.full(25, 1000.0)
    volume[22] = 5000.0
    frame = one_ticker(close, open=np.full(25, 8.0), high=np.full(25, 11.0), low=np.full(25, 9.5))
    # A 2:1 split later on: the adjusted close of these days is half the close. The bar's shape
    # pairs open, high and low with the close of the same (unadjusted) prices.
    frame = frame.assign(adj_close=frame["close"] / 2)
    features = build_market_features(frame.assign(volume=volume))
    assert features["range_hl"].tolist() == pytest.approx([0.15] * 25)
    assert features["return_oc"].tolist() == pytest.approx([0.25] * 25)
    assert features["volume_z_20d"].isna().sum() == 19
    assert features["volume_z_20d"].iloc[19] == 0.0  # twenty equal volumes
    # One different value among 20 (the 19 others equal) always has z = 19 / sqrt(20).
    log_v = np.log1p(volume[3:23])
    expected = (log_v[-1] - log_v.mean()) / log_v.std(ddof=1)
    assert features["volume_z_20d"].iloc[22] == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(19 / np.sqrt(20), rel=1e-9)


def test_skipped_features_name_the_missing_column():
    assert skipped_market_features(["date", "ticker", "close"]) == {
        "volume_z_20d": "volume",
        "range_hl": "high, low",
        "return_oc": "open",
    }
    assert (
        skipped_market_features(["date", "ticker", "close", "open", "high", "low", "volume"]) == {}
    )
    features = build_market_features(one_ticker(np.arange(1.0, 30.0)))
    assert list(features.columns) == ["date", "ticker", *PRICE_FEATURES, *RANKS]
    assert market_feature_columns(["close", "high"]) == [*PRICE_FEATURES, *RANKS]


def test_a_day_without_volume_leaves_the_volume_z_score_out_for_that_day_alone():
    """A day delivered without volume (the column is optional) has no z-score; the 19 rows
    after it take theirs over the volumes their window holds (19 of 20), and a window with
    fewer than 15 stays empty. Before, every window holding the day was empty: the champion
    refused to score for 20 sessions."""
    rng = np.random.default_rng(3)
    volume = rng.uniform(1_000, 5_000, 60)
    volume[30] = np.nan
    volume[50:56] = np.nan  # six in a row: the windows after hold 14 values
    features = build_market_features(one_ticker(np.full(60, 10.0)).assign(volume=volume))
    got = features["volume_z_20d"].to_numpy()
    log_v = np.log1p(volume)

    def z_over_present(row: int) -> float:
        window = log_v[row - 19 : row + 1]
        present = window[np.isfinite(window)]
        return (log_v[row] - present.mean()) / present.std(ddof=1)

    assert np.isnan(got[30]) and np.isnan(got[50:56]).all()
    for row in [31, 40, 49]:
        assert got[row] == pytest.approx(z_over_present(row), rel=1e-5)
    assert np.isnan(got[56:60]).all()  # 14 of 20 present
    # windows without a gap are as before
    whole = build_market_features(
        one_ticker(np.full(60, 10.0)).assign(volume=np.nan_to_num(volume, nan=1e3))
    )
    np.testing.assert_array_equal(got[19:30], whole["volume_z_20d"].to_numpy()[19:30])


def test_output_is_sorted_by_date_then_ticker_whatever_the_input_order(panel, full_features):
    shuffled = panel.sample(frac=1.0, random_state=1)
    rebuilt = build_market_features(shuffled)
    pd.testing.assert_frame_equal(rebuilt, full_features, check_exact=True)
    assert len(full_features) == len(panel)
    pd.testing.assert_frame_equal(full_features[["date", "ticker"]], panel[["date", "ticker"]])


def test_adjusted_close_is_preferred_over_close():
    frame = one_ticker([10.0, 5.0, 5.5], adj_close=[5.0, 5.0, 5.5])  # a 2:1 split on day 2
    assert build_market_features(frame)["return_1d"].tolist()[1:] == pytest.approx([0.0, 0.1])


def test_an_empty_adj_close_column_leaves_the_features_on_close():
    frame = one_ticker([10.0, 11.0, 12.1], adj_close=[np.nan] * 3)  # a vendor's blank column
    assert build_market_features(frame)["return_1d"].tolist()[1:] == pytest.approx([0.1, 0.1])


@pytest.fixture(scope="module")
def blank_day_panel(panel) -> tuple[pd.DataFrame, pd.Timestamp]:
    """The panel with adj_close left empty for every ticker on one day (a vendor's file that
    ingest accepts, checking that day's returns on close)."""
    day = np.sort(panel["date"].unique())[200]
    blanked = panel.copy()
    blanked.loc[blanked["date"] == day, "adj_close"] = np.nan
    return blanked, day


def test_a_day_without_adj_close_puts_the_windows_that_hold_it_on_close(
    panel, full_features_float64, blank_day_panel
):
    """Each ticker's windows holding the day read its close, the others its adj_close as
    before: no feature goes missing for the lookback's 60-odd sessions after such a day."""
    blanked, day = blank_day_panel
    got = _features_in_float64(blanked)
    on_close = _features_in_float64(panel.drop(columns="adj_close"))
    ordered = got[["date", "ticker"]].copy()
    ordered["row"] = ordered.sort_values("date").groupby("ticker").cumcount()
    blank_row = ordered[ordered["date"] == day].set_index("ticker")["row"]
    since = ordered["row"] - ordered["ticker"].map(blank_row)  # NaN: no row that day
    for name in PRICE_FEATURES:
        holds_the_day = ((since >= 0) & (since <= _ROWS_BEFORE_T[name])).to_numpy()
        assert 0 < holds_the_day.sum() < len(got)
        expected = np.where(holds_the_day, on_close[name], full_features_float64[name])
        np.testing.assert_array_equal(got[name].to_numpy(), expected, err_msg=name)
    after = got["date"] >= day
    assert got.loc[after, PRICE_FEATURES].notna().all().all()


def test_a_split_outside_a_features_window_stays_adjusted_after_a_day_without_adj_close():
    """Only a window holding the empty row reads the close: a 2:1 split 15 rows later is no
    -50% day in return_1d, though macd's longer window still holds the empty row."""
    close = [100.0] * 20 + [50.0] * 10
    adjusted = [50.0] * 30
    adjusted[5] = np.nan
    features = _features_in_float64(one_ticker(close, adj_close=adjusted))
    assert features["return_1d"].tolist()[7:] == [0.0] * 23
    assert features["return_5d"].tolist()[11:] == [0.0] * 19
    assert features["ma_ratio_20"].iloc[20] == pytest.approx(50.0 / (1900 / 20 + 2.5) - 1.0)


def test_a_day_without_adj_close_at_a_tickers_end_leaves_the_next_tickers_windows():
    """Each ticker's rows are a block of the panel: a window never reaches into the ticker
    before it, and neither does the switch to close."""
    first = one_ticker(np.linspace(10.0, 20.0, 80), "AAA", adj_close=np.linspace(5, 10, 80))
    first.loc[79, "adj_close"] = np.nan  # its last row
    second = one_ticker(np.linspace(30.0, 40.0, 80), "BBB", adj_close=np.linspace(15, 25, 80))
    both = _features_in_float64(pd.concat([first, second]))
    alone = _features_in_float64(second)
    pd.testing.assert_frame_equal(
        both[both["ticker"] == "BBB"][PRICE_FEATURES].reset_index(drop=True),
        alone[PRICE_FEATURES].reset_index(drop=True),
        check_exact=True,
    )


def test_a_ticker_never_given_adj_close_is_read_on_its_close_beside_tickers_that_are():
    adjusted = one_ticker([10.0, 5.0, 5.5, 6.05], "AAA", adj_close=[5.0, 5.0, 5.5, 6.05])
    plain = one_ticker([20.0, 22.0, 24.2, 26.62], "BBB", adj_close=[np.nan] * 4)
    features = build_market_features(pd.concat([adjusted, plain]))
    by_ticker = features.set_index(["ticker", "date"])["return_1d"]
    assert by_ticker["BBB"].tolist()[1:] == pytest.approx([0.1, 0.1, 0.1])
    assert by_ticker["AAA"].tolist()[1:] == pytest.approx([0.0, 0.1, 0.1])  # the split adjusted


def test_a_label_reads_the_close_where_adj_close_is_empty_at_t_or_t_plus_h():
    frame = pd.concat(
        [
            one_ticker([10.0, 5.0, 5.5, 6.0], "AAA", adj_close=[5.0, 5.0, 5.5, np.nan]),
            one_ticker([1.0, 2.0, 3.0, 4.0], "BBB", adj_close=[2.0, 4.0, 6.0, 8.0]),
        ]
    )
    labels = build_market_labels(frame, horizon=1).set_index(["ticker", "date"])
    assert labels.loc["AAA", "forward_return_1d"].tolist()[:3] == pytest.approx(
        [0.0, 0.1, 6.0 / 5.5 - 1.0]  # the last from close: adj_close was left empty at t + h
    )
    assert labels.loc["BBB", "forward_return_1d"].tolist()[:3] == pytest.approx([1.0, 0.5, 1 / 3])


def test_cross_sectional_rank_uses_only_the_same_date():
    days = 6
    frames = [
        one_ticker(start * (1 + growth) ** np.arange(days), ticker)
        for ticker, start, growth in [("AAA", 10, 0.01), ("BBB", 20, 0.03), ("CCC", 5, -0.02)]
    ]
    features = build_market_features(pd.concat(frames))
    last = features[features["date"] == features["date"].max()].set_index("ticker")
    assert last["return_5d_cs_rank"].to_dict() == {"AAA": 0.5, "BBB": 1.0, "CCC": 0.0}
    assert features["return_5d_cs_rank"].isna().sum() == 15  # 5 dates x 3 tickers before 5 rows

    # A fourth ticker trading only on the last day changes ranks on that day only.
    extra = one_ticker([1.0] * days, "DDD").iloc[[-1]]
    with_extra = build_market_features(pd.concat([*frames, extra]))
    earlier = features["date"] < features["date"].max()
    pd.testing.assert_frame_equal(
        with_extra[with_extra["date"] < features["date"].max()].reset_index(drop=True),
        features[earlier].reset_index(drop=True),
        check_exact=True,
    )
    # DDD's return_5d is NaN (one row), so the three others keep their ranks.
    assert with_extra["return_5d_cs_rank"].iloc[-4:].tolist() == pytest.approx(
        [0.5, 1.0, 0.0, np.nan], nan_ok=True
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(  # one list per date: small integers (many ties), infinities or None (missing)
        st.lists(
            st.one_of(st.none(), st.integers(-3, 3), st.sampled_from([-np.inf, np.inf])),
            min_size=1,
            max_size=12,
        ),
        min_size=1,
        max_size=6,
    )
)
def test_cross_sectional_ranks_match_scipy_rankdata_with_ties_and_gaps(dates):
    """Each date's ranks are scipy's average ranks over its present values, as percentiles
    (a real +inf ranks among them, not with the padding the ranking sorts after it)."""
    frame = pd.DataFrame(
        [
            {"date": pd.Timestamp("2024-01-01") + pd.Timedelta(days=d), "ticker": f"T{i:02d}",
             "close": 10.0, "volatility": np.nan if v is None else float(v)}
            for d, values in enumerate(dates)
            for i, v in enumerate(values)
        ]
    )  # fmt: skip
    panel = _TickerPanel(frame)
    slots, shape = panel.date_matrix()
    by_date = frame.sort_values(["date", "ticker"])
    got = _cross_sectional_rank(by_date["volatility"].to_numpy(), slots, shape)

    expected = []
    for _, day in by_date.groupby("date", sort=True):
        values = day["volatility"].to_numpy()
        present = ~np.isnan(values)
        pct = np.full(len(values), np.nan)
        if present.sum() == 1:
            pct[present] = 0.5
        elif present.any():
            pct[present] = (rankdata(values[present]) - 1.0) / (present.sum() - 1.0)
        expected.append(pct)
    np.testing.assert_array_equal(got, np.concatenate(expected))


def _tail_before(prices: pd.DataFrame, first: pd.Timestamp, rows: int) -> pd.DataFrame:
    """Return the last `rows` rows per ticker before `first` plus every row from `first` on."""
    before = prices[prices["date"] < first].sort_values("date").groupby("ticker").tail(rows)
    return pd.concat([before, prices[prices["date"] >= first]])


@pytest.fixture(scope="module")
def full_features_float64(panel) -> pd.DataFrame:
    return _features_in_float64(panel)


def test_incremental_build_equals_full_build_exactly(panel, full_features, full_features_float64):
    dates = np.sort(panel["date"].unique())
    for k in (1, 10):
        first = dates[-k]
        tail = _tail_before(panel, first, FEATURE_LOOKBACK_DAYS).sample(frac=1.0, random_state=k)
        # At full precision first: float32 output would hide most last-bit differences.
        for build, full in [(_features_in_float64, full_features_float64)] + [
            (build_market_features, full_features)
        ]:
            incremental = build(tail)
            recent = incremental[incremental["date"] >= first].reset_index(drop=True)
            expected = full[full["date"] >= first].reset_index(drop=True)
            assert recent.notna().all().all()
            pd.testing.assert_frame_equal(recent, expected, check_exact=True)


def test_incremental_build_equals_full_build_exactly_after_a_day_without_adj_close(
    blank_day_panel,
):
    blanked, day = blank_day_panel
    full = _features_in_float64(blanked)
    dates = np.sort(blanked["date"].unique())
    at = int(np.searchsorted(dates, day))
    for first in (dates[at], dates[at + 5], dates[at + FEATURE_LOOKBACK_DAYS + 1]):
        tail = _tail_before(blanked, first, FEATURE_LOOKBACK_DAYS)
        incremental = _features_in_float64(tail)
        recent = incremental[incremental["date"] >= first].reset_index(drop=True)
        expected = full[full["date"] >= first].reset_index(drop=True)
        pd.testing.assert_frame_equal(recent, expected, check_exact=True)


def test_incremental_build_equals_full_build_exactly_after_a_day_without_volume(panel):
    dates = np.sort(panel["date"].unique())
    gapped = panel.assign(volume=panel["volume"].where(panel["date"] != dates[200]))
    full = _features_in_float64(gapped)
    assert full.loc[full["date"] == dates[201], "volume_z_20d"].notna().all()
    for first in (dates[200], dates[205], dates[219], dates[220]):
        tail = _tail_before(gapped, first, FEATURE_LOOKBACK_DAYS)
        incremental = _features_in_float64(tail)
        recent = incremental[incremental["date"] >= first].reset_index(drop=True)
        expected = full[full["date"] >= first].reset_index(drop=True)
        pd.testing.assert_frame_equal(recent, expected, check_exact=True)


def test_one_row_less_of_history_is_not_enough(panel, full_features):
    first = np.sort(panel["date"].unique())[-1]
    tail = _tail_before(panel, first, FEATURE_LOOKBACK_DAYS - 1)
    short = build_market_features(tail)
    assert short.loc[short["date"] == first, "macd_signal"].isna().all()
    assert full_features.loc[full_features["date"] == first, "macd_signal"].notna().all()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cutoff=st.integers(min_value=0, max_value=318),
    scale=st.floats(min_value=0.2, max_value=5.0),
    drop_share=st.floats(min_value=0.0, max_value=0.9),
    add_ticker=st.booleans(),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_changing_data_after_t_leaves_features_up_to_t_unchanged(
    panel, full_features_float64, cutoff, scale, drop_share, add_ticker, seed
):
    rng = np.random.default_rng(seed)
    t = np.sort(panel["date"].unique())[cutoff]
    later = panel["date"] > t
    changed = panel.copy()
    noise = rng.uniform(0.5, 1.5, later.sum()) * scale
    for column in ("open", "high", "low", "close", "adj_close", "volume"):
        changed.loc[later, column] = changed.loc[later, column] * noise
    changed = changed[~later | (rng.random(len(changed)) >= drop_share)]
    if add_ticker:
        new_rows = changed[changed["date"] > t].drop_duplicates("date").assign(ticker="NEWCO")
        changed = pd.concat([changed, new_rows.astype({"ticker": "string"})])
    rebuilt = _features_in_float64(changed.sample(frac=1.0, random_state=seed))
    full = full_features_float64
    pd.testing.assert_frame_equal(
        rebuilt[rebuilt["date"] <= t].reset_index(drop=True),
        full[full["date"] <= t].reset_index(drop=True),
        check_exact=True,
    )


@pytest.mark.parametrize("column", ["adj_close", "volume"])
def test_a_raw_column_first_delivered_after_t_changes_no_feature_up_to_t(panel, column):
    """A vendor that starts delivering adjusted closes (or volumes) after t: the earlier rows,
    read beside the new ones, hold the column empty. Which price the returns read is chosen for
    the whole frame (`price_column`), so this checks that no value up to t follows from it:
    features up to t equal those of the history as it was at t, bit for bit, and so do the
    labels realised by t."""
    t = np.sort(panel["date"].unique())[200]
    at_t = panel[panel["date"] <= t].drop(columns=[column])
    later = panel.copy()
    later.loc[later["date"] <= t, column] = np.nan
    if column == "adj_close":  # a split-adjusted series on another scale than the close
        later.loc[later["date"] > t, column] *= 0.25

    def up_to_t(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["date"] <= t].reset_index(drop=True)

    rebuilt, expected = up_to_t(_features_in_float64(later)), _features_in_float64(at_t)
    if column == "volume":  # its feature exists now, unknown (NaN) at every date up to t
        assert rebuilt.pop("volume_z_20d").isna().all()
    pd.testing.assert_frame_equal(rebuilt, expected, check_exact=True)
    labels, known = build_market_labels(later, horizon=5), build_market_labels(at_t, horizon=5)
    realised = known["forward_return_5d"].notna()
    pd.testing.assert_frame_equal(
        up_to_t(labels)[realised.to_numpy()], known[realised], check_exact=True
    )


def test_duplicate_keys_are_refused_with_an_example():
    frame = one_ticker([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="duplicate .date, ticker. rows, e.g. AAA on 2024-01-02"):
        build_market_features(pd.concat([frame, frame.iloc[[1]]]))


def test_forward_return_uses_row_t_plus_h_of_the_same_ticker():
    frame = pd.concat(
        [one_ticker([1.0, 2.0, 4.0, 8.0, 4.0], "AAA"), one_ticker([10.0, 10.0, 9.0], "BBB")]
    )
    labels = build_market_labels(frame.iloc[::-1], horizon=2)
    assert list(labels.columns) == ["date", "ticker", "forward_return_2d", "direction_2d"]
    aaa = labels[labels["ticker"] == "AAA"]
    bbb = labels[labels["ticker"] == "BBB"]
    assert aaa["forward_return_2d"].tolist() == pytest.approx(
        [3.0, 3.0, 0.0, np.nan, np.nan], nan_ok=True
    )
    assert aaa["direction_2d"].tolist()[:3] == [1.0, 1.0, 0.0]
    assert aaa["direction_2d"].iloc[3:].isna().all()
    assert bbb["forward_return_2d"].tolist() == pytest.approx([-0.1, np.nan, np.nan], nan_ok=True)
    assert bbb["direction_2d"].tolist()[0] == 0.0
    assert labels["date"].is_monotonic_increasing


def test_a_label_spanning_a_halt_is_unknown_so_the_embargo_holds(panel):
    """An h-day label is realised h sessions later or not at all: across a halt, a ticker's
    h-th next row is further ahead than the embargo of h dates that keeps a training label
    out of the next window, so the label is NaN there."""
    prices = pd.concat([one_ticker(np.arange(1.0, 11.0), "AAA"), one_ticker([5.0] * 10, "BBB")])
    halted = prices[~((prices["ticker"] == "AAA") & prices["date"].isin(prices["date"][3:5]))]
    aaa = build_market_labels(halted, horizon=2).query("ticker == 'AAA'")
    # AAA trades on sessions 0-2 and 5-9: only 0->2, 5->7, 6->8 and 7->9 are two sessions long.
    assert aaa["forward_return_2d"].tolist() == pytest.approx(
        [2.0, np.nan, np.nan, 8 / 6 - 1, 9 / 7 - 1, 10 / 8 - 1, np.nan, np.nan], nan_ok=True
    )
    # On a panel, a ticker halted for the first three embargo dates after the training window:
    # its last training rows' labels would be realised inside the validation window.
    sessions = pd.DatetimeIndex(np.sort(panel["date"].unique()))
    split = time_split(sessions, embargo=5)
    embargo = sessions[(sessions > split.train_dates[-1]) & (sessions < split.validation_dates[0])]
    ticker = panel["ticker"].iloc[0]
    halted = panel[~(panel["date"].isin(embargo[:3]) & (panel["ticker"] == ticker))]
    labels = build_market_labels(halted, horizon=5)
    trained = labels[labels["date"].isin(split.train_dates) & labels["forward_return_5d"].notna()]
    rows = halted.sort_values(["ticker", "date"])  # where each label is realised: row t+5
    rows = rows.assign(realised=rows.groupby("ticker")["date"].shift(-5))
    realised = trained.merge(rows[["date", "ticker", "realised"]], on=["date", "ticker"])
    assert realised["realised"].max() < split.validation_dates[0]
    assert ticker in set(trained["ticker"])


def test_a_label_never_reads_the_next_tickers_prices():
    """AAA is delisted after its 5th session and AAB (the next ticker in sort order: a
    rename) lists on the 6th: AAA's last h labels are unknown, not AAB's first prices."""
    old = one_ticker([10.0, 10.5, 11.0, 11.5, 12.0], ticker="AAA")
    new = one_ticker([100.0, 101.0, 102.0, 103.0], ticker="AAB")
    new["date"] = pd.bdate_range(old["date"].iloc[-1] + pd.offsets.BDay(), periods=4).as_unit("ns")
    labels = build_market_labels(pd.concat([old, new], ignore_index=True), horizon=2)
    by_ticker = labels.set_index(["ticker", labels.groupby("ticker").cumcount()])
    forward = by_ticker["forward_return_2d"]
    assert forward["AAA"].tolist()[:3] == pytest.approx([0.1, 11.5 / 10.5 - 1, 12 / 11 - 1])
    assert (
        forward["AAA"].iloc[3:].isna().all()
        and by_ticker.loc["AAA", "direction_2d"].iloc[3:].isna().all()
    )
    assert forward["AAB"].tolist()[:2] == pytest.approx([0.02, 103 / 101 - 1])


def test_labels_on_a_panel_are_nan_exactly_for_each_tickers_last_h_rows(panel):
    labels = build_market_labels(panel, horizon=5)
    rows_after = labels.groupby("ticker").cumcount(ascending=False)
    assert labels["forward_return_5d"].isna().equals(rows_after < 5)
    with pytest.raises(ValueError, match="horizon must be a positive"):
        build_market_labels(panel, horizon=0)
