"""Synthetic market panel: realism, the planted signal, defect injection and vendor files."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from finpipe.errors import ConfigError
from finpipe.market.evaluation import oracle_ic
from finpipe.market.schema import normalise_market_frame
from finpipe.market.synthetic import (
    DEFECT_KINDS,
    ORACLE,
    MarketSyntheticConfig,
    generate_market_panel,
    inject_defects,
    trading_calendar,
    write_vendor_files,
)
from finpipe.storage import Storage

SMALL = MarketSyntheticConfig(tickers=8, days=320, seed=3)


@pytest.fixture(scope="module")
def default_market():
    return generate_market_panel(MarketSyntheticConfig())


@pytest.fixture(scope="module")
def small_prices() -> pd.DataFrame:
    return generate_market_panel(SMALL).prices


def test_same_seed_gives_identical_panel_and_other_seed_does_not():
    first, again = generate_market_panel(SMALL), generate_market_panel(SMALL)
    pd.testing.assert_frame_equal(first.prices, again.prices, check_exact=True)
    pd.testing.assert_frame_equal(first.expected_return, again.expected_return, check_exact=True)
    assert first.sectors == again.sectors

    other = generate_market_panel(MarketSyntheticConfig(tickers=8, days=320, seed=4))
    assert not np.allclose(first.prices["close"].iloc[:8], other.prices["close"].iloc[:8])


def test_panel_has_canonical_columns_dtypes_and_order(default_market):
    prices = default_market.prices
    assert list(prices.columns) == [
        "date", "ticker", "open", "high", "low", "close", "adj_close", "volume"
    ]  # fmt: skip
    assert prices["date"].dtype == "datetime64[ns]"
    assert prices["ticker"].dtype == "string"
    assert (prices["ticker"] == prices["ticker"].str.upper()).all()
    assert (
        prices[["open", "high", "low", "close", "adj_close", "volume"]].dtypes.eq("float64").all()
    )
    assert prices["ticker"].nunique() == 50
    assert prices["date"].nunique() == 750
    assert not prices.duplicated(["date", "ticker"]).any()
    resorted = prices.sort_values(["date", "ticker"], ignore_index=True)
    pd.testing.assert_frame_equal(prices, resorted)
    # No splits or dividends: the adjusted close is the close.
    assert (prices["close"] == prices["adj_close"]).all()
    assert sorted(default_market.sectors) == sorted(prices["ticker"].unique())
    assert set(default_market.sectors.values()) == {0, 1, 2, 3, 4}


def test_bars_are_consistent_and_positive(default_market):
    prices = default_market.prices
    assert (prices[["open", "high", "low", "close", "volume"]] > 0).all().all()
    assert (prices["high"] >= prices[["open", "close"]].max(axis=1)).all()
    assert (prices["low"] <= prices[["open", "close"]].min(axis=1)).all()
    assert (prices["volume"] == prices["volume"].round()).all()


def test_returns_have_heavy_tails_clustering_and_volume_follows_moves(default_market):
    prices = default_market.prices.sort_values(["ticker", "date"])
    log_return = np.log(prices["adj_close"]).groupby(prices["ticker"]).diff()
    frame = prices.assign(r=log_return).dropna(subset=["r"])
    by_ticker = frame.groupby("ticker")["r"]
    assert by_ticker.apply(lambda r: r.kurt()).median() > 1.5  # a normal has 0
    assert by_ticker.apply(lambda r: r.abs().autocorr(1)).median() > 0.05  # volatility clusters
    assert abs(by_ticker.apply(lambda r: r.autocorr(1)).median()) < 0.05
    assert np.corrcoef(np.log(frame["volume"]), frame["r"].abs())[0, 1] > 0.1


def test_some_tickers_list_late_and_some_delist_early(default_market):
    span = default_market.prices.groupby("ticker")["date"].agg(["min", "max", "count"])
    first_day, last_day = default_market.prices["date"].min(), default_market.prices["date"].max()
    assert (span["min"] > first_day).sum() == 5  # listing_fraction 0.1 of 50
    assert (span["max"] < last_day).sum() == 5
    assert span["count"].min() >= 120


def test_calendar_skips_weekends_and_exchange_holidays():
    days = trading_calendar("2021-01-04", 760)
    assert pd.Series(days.year).value_counts().sort_index().loc[2021:2023].tolist() == [
        252,
        251,
        250,
    ]  # fmt: skip  (the NYSE's trading-day counts for those years)
    assert (days.dayofweek < 5).all()
    closed = ["2021-01-18", "2021-04-02", "2021-07-05", "2021-11-25", "2021-12-24", "2022-06-20"]
    assert not days.isin(pd.to_datetime(closed)).any()
    open_ = ["2021-06-18", "2021-10-11", "2021-11-26", "2021-12-23"]  # no Juneteenth yet, Columbus
    assert pd.to_datetime(open_).isin(days).all()


def test_oracle_ic_at_defaults_is_in_the_documented_band(default_market):
    oracle = default_market.oracle_ic(5)
    assert 0.10 <= oracle <= 0.20
    assert oracle == pytest.approx(0.134, abs=0.002)
    # A longer horizon dilutes the 5-day planted part with more noise.
    assert default_market.oracle_ic(20) < oracle


def test_the_oracle_ic_of_a_test_window_covers_every_date_of_it(tmp_path):
    rng = np.random.default_rng(0)
    dates = pd.bdate_range("2024-01-01", periods=3)
    frame = pd.DataFrame(
        {"date": np.repeat(dates, 30), "ticker": np.tile([f"T{k:02d}" for k in range(30)], 3)}
    )
    frame["expected_forward_return"] = rng.normal(size=len(frame))
    last = frame["date"] == dates[-1]  # its IC is 1: leaving it out shows
    frame["forward_return_5d"] = np.where(
        last, frame["expected_forward_return"], rng.normal(size=len(frame))
    )
    storage = Storage(tmp_path)
    storage.write_reference("market", ORACLE, frame.drop(columns="forward_return_5d"))

    by_hand = np.mean(
        [
            np.corrcoef(day["expected_forward_return"], day["forward_return_5d"])[0, 1]
            for _, day in frame.groupby("date")
        ]
    )
    test_window = frame.drop(columns="expected_forward_return")
    assert oracle_ic(storage, test_window, "forward_return_5d") == pytest.approx(by_hand, rel=1e-9)


def test_no_oracle_ic_when_the_oracle_covers_none_of_the_test_windows_tickers(tmp_path):
    dates = pd.bdate_range("2024-01-01", periods=3)
    oracle = pd.DataFrame(
        {"date": np.repeat(dates, 4), "ticker": np.tile(["A", "B", "C", "D"], 3)}
    ).assign(expected_forward_return=np.arange(12.0))
    storage = Storage(tmp_path)
    storage.write_reference("market", ORACLE, oracle)
    test_window = oracle[["date"]].assign(
        ticker=np.tile(["W", "X", "Y", "Z"], 3), forward_return_5d=np.arange(12.0)
    )
    assert oracle_ic(storage, test_window, "forward_return_5d") is None


def test_expected_return_is_zero_until_a_ticker_has_sixty_rows(default_market):
    expected = default_market.expected_return
    assert expected[["date", "ticker"]].equals(default_market.prices[["date", "ticker"]])
    row = expected.groupby("ticker").cumcount()
    assert (expected.loc[row < 60, "expected_forward_return"] == 0.0).all()
    assert (expected.loc[row == 60, "expected_forward_return"] != 0.0).all()


def test_expected_return_is_the_documented_score_recomputed_from_the_prices():
    """The oracle is exactly the module doc's formula applied to the delivered adj_close: v is
    the 20-day standard deviation (ddof 1) of log returns up to and including s, the reversal
    is over 5 days scaled by sqrt(5), the momentum over days s-60..s-5 scaled by sqrt(55), and
    expected_forward_return sums the last `horizon` scores of the ticker."""
    market = generate_market_panel(SMALL)
    prices = market.prices.sort_values(["ticker", "date"])
    log_price = np.log(prices["adj_close"])
    by_ticker = log_price.groupby(prices["ticker"])
    vol = by_ticker.diff().groupby(prices["ticker"]).transform(lambda r: r.rolling(20).std(ddof=1))
    reversal = -(log_price - by_ticker.shift(5)) / (vol * np.sqrt(5.0))
    momentum = (by_ticker.shift(5) - by_ticker.shift(60)) / (vol * np.sqrt(55.0))
    score = SMALL.signal_strength * vol * (np.tanh(reversal) + 0.5 * np.tanh(momentum))
    score = score.where(prices.groupby("ticker").cumcount() >= 60, 0.0)
    expected = score.groupby(prices["ticker"]).transform(
        lambda g: g.rolling(SMALL.horizon, min_periods=1).sum()
    )
    generated = market.expected_return.set_index(["date", "ticker"])["expected_forward_return"]
    recomputed = pd.Series(
        expected.to_numpy(), index=pd.MultiIndex.from_frame(prices[["date", "ticker"]])
    )
    np.testing.assert_allclose(
        generated.to_numpy(), recomputed.reindex(generated.index).to_numpy(), rtol=1e-7, atol=1e-12
    )


def test_oracle_ic_is_the_mean_per_date_correlation_over_rows_with_both_values():
    """Rows without a realised label (a ticker that delists) are left out of their date, and a
    date with exactly three tickers that have both values still counts."""
    from finpipe.market.synthetic import SyntheticMarket

    rng = np.random.default_rng(1)
    dates = pd.bdate_range("2024-01-01", periods=12)
    rows = [(d, t) for d in dates for t in "ABCD" if t != "D" or d <= dates[7]]
    prices = pd.DataFrame(rows, columns=["date", "ticker"]).astype({"ticker": "string"})
    prices["adj_close"] = np.exp(rng.normal(4.0, 0.3, len(prices)))
    prices["close"] = prices["adj_close"]
    expected = prices[["date", "ticker"]].assign(
        expected_forward_return=rng.normal(size=len(prices))
    )
    market = SyntheticMarket(prices, expected, {t: 0 for t in "ABCD"}, horizon=2)

    wide = prices.pivot(index="date", columns="ticker", values="adj_close")
    realised = (wide.shift(-2) / wide - 1.0).stack().rename("realised").reset_index()
    both = expected.merge(realised, on=["date", "ticker"]).dropna()
    per_date = [
        np.corrcoef(day["expected_forward_return"], day["realised"])[0, 1]
        for _, day in both.groupby("date")
        if len(day) >= 3
    ]
    assert sorted(both.groupby("date").size().unique()) == [3, 4]  # the cases this test is about
    assert market.oracle_ic() == pytest.approx(np.mean(per_date), rel=1e-9)


def test_zero_signal_strength_plants_nothing():
    market = generate_market_panel(MarketSyntheticConfig(tickers=8, days=320, signal_strength=0))
    assert (market.expected_return["expected_forward_return"] == 0.0).all()
    assert np.isnan(market.oracle_ic())


@pytest.mark.parametrize(
    ("tickers", "days", "seed"),
    [(8, 320, 0), (8, 320, 9), (40, 700, 7), (200, 1000, 7), (500, 1260, 3)],
)
def test_generated_panels_pass_the_market_suite(tickers, days, seed):
    """The generator's panels are accepted by its own suite (warnings allowed). Before the
    bounds, 200 x 1,000 seed 7 had volumes of 9e15 (the suite's bound is 1e13) and 500 x 1,260
    seed 3 a one-day |log return| of 3.1 (bound 1.0)."""
    from finpipe.market.quality import add_market_checks_columns
    from finpipe.validation import validate_frame

    prices = generate_market_panel(MarketSyntheticConfig(tickers, days, seed)).prices
    batch = add_market_checks_columns(normalise_market_frame(prices))
    report = validate_frame(
        batch,
        suite_name="market_ohlcv",
        batch_name=f"synthetic-{tickers}x{days}-{seed}",
        parameters={"as_of": prices["date"].max()},
    )
    errors = [(r.rule, r.unexpected_count) for r in report.rules if not r.success]
    assert report.success, errors
    assert batch["abs_log_return_1d"].max() < 0.9 + 1e-9


def test_moves_and_volumes_stay_bounded_whatever_the_shocks():
    """The bounds hold for any input, not only for the seeds above: moves of any size (even
    +-50 in log terms) land within +-0.9, moves up to 0.35 are unchanged, and volume stays at
    most MAX_VOLUME for the quietest ticker on the wildest day."""
    from finpipe.market.synthetic import MAX_VOLUME, _bounded_moves, _intraday_bars

    moves = np.array([-50.0, -1.2, -0.9, -0.35, -0.02, 0.0, 0.1, 0.35, 0.36, 0.95, 3.1, 50.0])
    bounded = _bounded_moves(moves)
    assert (np.abs(bounded) <= 0.9).all() and (np.sign(bounded) == np.sign(moves)).all()
    small = np.abs(moves) <= 0.35
    np.testing.assert_array_equal(bounded[small], moves[small])
    assert (np.diff(bounded) >= 0).all()  # order kept
    rng = np.random.default_rng(0)
    log_return = _bounded_moves(rng.standard_t(1.0, size=(2000, 50)))  # Cauchy shocks
    close = np.exp(np.cumsum(log_return, axis=0))
    *_, volume = _intraday_bars(close, log_return, np.full((2000, 50), 0.5), np.full(50, 1e-4), rng)
    assert volume.max() <= MAX_VOLUME < 1e13


def test_bad_config_is_reported_with_every_problem():
    with pytest.raises(ConfigError, match="tickers must be at least 2.*days must be at least 305"):
        generate_market_panel(MarketSyntheticConfig(tickers=1, days=100))


def test_the_smallest_allowed_panel_is_generated():
    """The shortest calendar `_check_config` accepts (60 + horizon + 2 x 120 = 305 days)."""
    market = generate_market_panel(MarketSyntheticConfig(tickers=2, days=305))
    assert market.prices["date"].nunique() == 305


def test_nan_defect_blanks_close_only(small_prices):
    corrupted = inject_defects(small_prices, ["nan"], rows_per_defect=3, seed=1)
    changed = corrupted["close"].isna()
    assert changed.sum() == 3
    unchanged = corrupted.drop(columns="close")
    pd.testing.assert_frame_equal(unchanged, small_prices.drop(columns="close"))


def test_non_positive_price_defect_writes_zero_and_negative_closes(small_prices):
    corrupted = inject_defects(small_prices, ["non_positive_price"], rows_per_defect=3)
    bad = corrupted.index[corrupted["close"] <= 0]
    assert len(bad) == 3
    assert corrupted.loc[bad, "close"].tolist()[0] == 0.0
    assert corrupted.loc[bad[1], "close"] == -small_prices.loc[bad[1], "close"]


def test_non_positive_price_defect_hits_only_rows_with_a_positive_close(small_prices):
    frame = small_prices.copy()
    frame.loc[frame.index >= 5, "close"] = np.nan  # only rows 0-4 have a price to corrupt
    corrupted = inject_defects(frame, ["non_positive_price"], rows_per_defect=3)
    assert (corrupted["close"] <= 0).sum() == 3
    assert corrupted["close"].isna().sum() == frame["close"].isna().sum()


def test_duplicate_key_defect_adds_copies_next_to_originals(small_prices):
    corrupted = inject_defects(small_prices, ["duplicate_key"], rows_per_defect=3)
    assert len(corrupted) == len(small_prices) + 3
    assert corrupted.duplicated(["date", "ticker"]).sum() == 3
    assert corrupted.duplicated().sum() == 3  # exact copies
    assert corrupted["date"].is_monotonic_increasing


def test_high_below_low_defect_swaps_the_range(small_prices):
    corrupted = inject_defects(small_prices, ["high_below_low"], rows_per_defect=4)
    assert (corrupted["high"] < corrupted["low"]).sum() == 4
    assert (small_prices["high"] < small_prices["low"]).sum() == 0


def test_stale_price_defect_freezes_one_ticker_for_ten_days(small_prices):
    corrupted = inject_defects(small_prices, ["stale_price"], rows_per_defect=3, seed=2)
    changed = corrupted.index[corrupted["close"] != small_prices["close"]]
    assert corrupted.loc[changed, "ticker"].nunique() == 1
    ticker = corrupted.loc[changed[0], "ticker"]
    closes = corrupted.loc[corrupted["ticker"] == ticker, "close"].to_numpy()
    run = np.flatnonzero(np.diff(closes) == 0)
    assert len(run) == 9 and np.all(np.diff(run) == 1)  # ten equal closes in a row
    # The whole bar is repeated, as a stale feed does: every price column is frozen.
    frozen = corrupted.loc[corrupted["ticker"] == ticker].iloc[run[0] : run[-1] + 2]
    assert frozen[["open", "high", "low", "close", "adj_close"]].nunique().tolist() == [1] * 5
    assert frozen["volume"].nunique() > 1


def test_stale_price_run_is_consecutive_by_date_in_a_frame_not_sorted_by_date(small_prices):
    shuffled = small_prices.sample(frac=1.0, random_state=0).reset_index(drop=True)
    corrupted = inject_defects(shuffled, ["stale_price"], rows_per_defect=3, seed=2)
    changed = corrupted.index[corrupted["close"] != shuffled["close"]]
    ticker = corrupted.loc[changed[0], "ticker"]
    closes = corrupted[corrupted["ticker"] == ticker].sort_values("date")["close"].to_numpy()
    run = np.flatnonzero(np.diff(closes) == 0)
    assert len(run) == 9 and np.all(np.diff(run) == 1)  # ten equal closes on consecutive dates


def test_all_defects_together_hit_distinct_rows_and_leave_the_input_alone(small_prices):
    before = small_prices.copy()
    corrupted = inject_defects(small_prices, DEFECT_KINDS, rows_per_defect=2, seed=5)
    pd.testing.assert_frame_equal(small_prices, before)
    assert corrupted["close"].isna().sum() == 2
    assert (corrupted["close"] <= 0).sum() == 2
    assert (corrupted["high"] < corrupted["low"]).sum() == 2
    assert len(corrupted) == len(small_prices) + 2


def test_unknown_defect_kind_names_the_allowed_ones(small_prices):
    with pytest.raises(ValueError, match="unknown defect kind.*'split'.*'stale_price'"):
        inject_defects(small_prices, ["nan", "split"])


def test_vendor_files_are_a_history_file_then_daily_files(tmp_path, small_prices):
    paths = write_vendor_files(small_prices, tmp_path, daily_files=3)
    dates = sorted(small_prices["date"].unique())
    first, last = (pd.Timestamp(d).strftime("%Y-%m-%d") for d in (dates[0], dates[-4]))
    assert [p.name for p in paths] == [
        f"market_history_{first}_{last}.csv.gz",
        *(f"market_{pd.Timestamp(d).strftime('%Y-%m-%d')}.csv" for d in dates[-3:]),
    ]
    with gzip.open(paths[0], "rt") as history:
        assert history.readline().strip() == "Date,Ticker,Open,High,Low,Close,Adj Close,Volume"
    daily = pd.read_csv(paths[1])
    assert daily["Date"].unique().tolist() == [pd.Timestamp(dates[-3]).strftime("%Y-%m-%d")]
    assert daily["Volume"].dtype == "int64"

    delivered = pd.concat([pd.read_csv(p, float_precision="round_trip") for p in paths])
    assert len(delivered) == len(small_prices)
    restored = normalise_market_frame(delivered)
    expected = small_prices[list(restored.columns)]
    pd.testing.assert_frame_equal(restored, expected, check_exact=True)
    assert sorted(tmp_path.iterdir()) == sorted(paths)  # no temporary files left behind


def test_vendor_files_with_no_daily_files_is_one_history_file(tmp_path, small_prices):
    prices = small_prices.drop(columns=["open", "adj_close"])
    paths = write_vendor_files(prices, tmp_path, daily_files=0)
    assert len(paths) == 1 and paths[0].suffixes == [".csv", ".gz"]
    assert list(pd.read_csv(paths[0]).columns) == [
        "Date", "Ticker", "High", "Low", "Close", "Volume"
    ]  # fmt: skip
    assert len(pd.read_csv(paths[0])) == len(prices)
