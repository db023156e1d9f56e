"""Synthetic daily market panels with a known, planted predictable component, plus defect injection.

The generator stands in for an EOD vendor in tests, demos and benchmarks. What it models:

- an exchange calendar: business days without the usual NYSE holidays (New Year, MLK day,
  Presidents' day, Good Friday, Memorial day, Juneteenth from 2022, Independence day, Labor day,
  Thanksgiving, Christmas);
- log returns ``r[i,t] = alpha[i,t] + beta_m[i] * f_m[t] + beta_s[i] * f_sector(i)[t] + e[i,t]``:
  a market factor (with a small positive drift), one factor per sector, and an idiosyncratic
  shock. Every shock (factors included) is Student-t (4 degrees of freedom, scaled to unit
  variance) times a GARCH(1,1) volatility ``s2[t] = w + 0.10 * e[t-1]**2 + 0.88 * s2[t-1]``, so
  tails are heavy (median excess kurtosis of daily returns about 3.5) and volatility clusters;
- open, high, low consistent with the close (``high >= max(open, close)``,
  ``low <= min(open, close)``, all > 0) and a log-normal volume that rises with ``|r| / vol``;
- bounds that keep every panel inside the market suite (``expectations/market_ohlcv.json``) at
  any size and seed: one-day moves beyond ``|log r|`` 0.35 are squeezed to at most 0.9 (the
  suite rejects 1.0) and volume stays at most ``MAX_VOLUME`` = 5e12 (the suite rejects 1e13);
- listings and delistings: a fraction of tickers starts late, another stops early.

There are no splits and no dividends, so ``close == adj_close`` on every row. Prices are not
rounded to cents.

The planted signal. With ``P`` the adjusted close, ``L = log P`` and ``v[i,s]`` the sample standard
deviation (ddof=1) of the last 20 daily log returns up to ``s``, the score known at the close of
``s`` is

    g[i,s] = signal_strength * v[i,s] * (tanh(z_rev) + 0.5 * tanh(z_mom))
    z_rev  = -(L[s] - L[s-5]) / (v[i,s] * sqrt(5))        short-term reversal of the 5-day return
    z_mom  =  (L[s-5] - L[s-60]) / (v[i,s] * sqrt(55))    momentum over days s-60..s-5

(``g = 0`` until a ticker has 60 rows of its own history). ``g[i,s]`` is added to the log return
of day ``s + horizon``: alpha[i,t] = g[i,t-horizon]. Because every alpha of the next ``horizon``
days was fixed at or before ``t``, the planted part of the forward ``horizon``-day log return is
exactly point-in-time:

    expected_forward_return[i,t] = g[i,t-horizon+1] + ... + g[i,t]

With the default ``signal_strength = 0.12`` the oracle information coefficient (mean per-date
Pearson correlation of ``expected_forward_return`` with the realised 5-day forward return of
``adj_close``) is 0.134 for the default config (seed 0) and 0.154 on average over seeds 0-19
(range 0.11 to 0.18) on 50 tickers x 750 days. It is the ceiling a model can reach: the rest of
the forward return is unpredictable noise. A ridge regression on `build_market_features` trained
on the first 60% of dates reaches most of it out of sample, so the signal is learnable.
"""

from __future__ import annotations

import gzip
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.tseries.holiday import (
    AbstractHolidayCalendar,
    GoodFriday,
    Holiday,
    USLaborDay,
    USMartinLutherKingJr,
    USMemorialDay,
    USPresidentsDay,
    USThanksgivingDay,
    nearest_workday,
    sunday_to_monday,
)

from finpipe.domains import DemoNight, demo_nights
from finpipe.errors import ConfigError
from finpipe.market.features import build_market_labels
from finpipe.market.schema import DOMAIN
from finpipe.settings import Settings
from finpipe.storage import Storage

DEFECT_KINDS = ("nan", "non_positive_price", "duplicate_key", "high_below_low", "stale_price")

# Vendor header spelling, in delivery order (`Adj Close` as Yahoo-style vendors write it).
VENDOR_COLUMNS = {
    "date": "Date",
    "ticker": "Ticker",
    "open": "Open",
    "high": "High",
    "low": "Low",
    "close": "Close",
    "adj_close": "Adj Close",
    "volume": "Volume",
}

_STUDENT_T_DF = 4.0
_GARCH_ARCH = 0.10
_GARCH_PERSISTENCE = 0.88
_SIGNAL_HISTORY_ROWS = 60  # rows of a ticker's own history the planted score needs
_MOMENTUM_WEIGHT = 0.5
_MIN_LISTED_ROWS = 120  # a late listing or early delisting still leaves this many rows
_STALE_RUN_MIN_ROWS = 10
# Bounds that keep every generated value inside expectations/market_ohlcv.json (|log r| <= 1.0,
# volume <= 1e13), whatever the size and seed: see _bounded_moves and _intraday_bars.
_MOVE_KNEE = 0.35
_MOVE_BOUND = 0.9
_SURPRISE_KNEE = 12.0
_SURPRISE_BOUND = 14.0
MAX_VOLUME = 5e12

log = logging.getLogger("finpipe.market")
ORACLE = "oracle"  # reference/market/oracle.parquet: the planted signal


class _ExchangeCalendar(AbstractHolidayCalendar):
    """NYSE-style full-day closures (no early closes, no one-off closures)."""

    rules = [
        Holiday("New Year's Day", month=1, day=1, observance=sunday_to_monday),
        USMartinLutherKingJr,
        USPresidentsDay,
        GoodFriday,
        USMemorialDay,
        Holiday("Juneteenth", month=6, day=19, start_date="2022-01-01", observance=nearest_workday),
        Holiday("Independence Day", month=7, day=4, observance=nearest_workday),
        USLaborDay,
        USThanksgivingDay,
        Holiday("Christmas Day", month=12, day=25, observance=nearest_workday),
    ]


@dataclass(frozen=True)
class MarketSyntheticConfig:
    """Shape and randomness of a synthetic market panel.

    tickers: number of tickers. days: trading days in the calendar. seed: everything is a pure
    function of the config, seed included. start: first calendar day (holidays and weekends are
    skipped). sectors: number of sector factors. horizon: trading days over which the planted
    signal is defined (the label horizon a model is meant to predict). signal_strength: scale of
    the planted daily drift in units of each ticker's 20-day volatility; 0.12 gives an oracle
    IC of about 0.15 at horizon 5, 0 gives a market with nothing to learn.
    listing_fraction / delisting_fraction: share of tickers that start late / stop early.
    """

    tickers: int = 50
    days: int = 750
    seed: int = 0
    start: str = "2021-01-04"
    sectors: int = 5
    horizon: int = 5
    signal_strength: float = 0.12
    listing_fraction: float = 0.1
    delisting_fraction: float = 0.1


@dataclass
class SyntheticMarket:
    """A generated panel and the ground truth behind it.

    prices: canonical columns date, ticker, open, high, low, close, adj_close, volume, sorted by
    date then ticker, one row per listed (date, ticker).
    expected_return: date, ticker, expected_forward_return: the planted, point-in-time part of the
    log return over the next `horizon` trading days, one row per row of `prices`.
    sectors: ticker -> sector number.
    horizon: the horizon `expected_return` is defined for.
    """

    prices: pd.DataFrame
    expected_return: pd.DataFrame
    sectors: dict[str, int]
    horizon: int = 5

    def oracle_ic(self, horizon: int | None = None) -> float:
        """Return the mean over dates of the per-date Pearson correlation between
        `expected_forward_return` and the realised forward `horizon`-day return of adj_close.

        The realised return is the label a model is trained on (`build_market_labels`). Dates
        where fewer than three tickers have both values, or where either side is constant
        across tickers (before any ticker has 60 rows of history), are skipped. With a horizon
        other than the generator's, the same `expected_forward_return` is compared with the
        longer or shorter realised return.
        """
        labels = build_market_labels(
            self.prices, horizon=self.horizon if horizon is None else horizon
        )
        realised = labels.columns[2]
        both = self.expected_return.merge(
            labels[["date", "ticker", realised]], on=["date", "ticker"]
        )
        both = both.dropna(subset=["expected_forward_return", realised])
        return _mean_cross_sectional_pearson(
            both["date"], both["expected_forward_return"].to_numpy(), both[realised].to_numpy()
        )


def generate_market_panel(config: MarketSyntheticConfig) -> SyntheticMarket:
    """Return a synthetic market panel and its planted expected returns (see the module doc)."""
    _check_config(config)
    rng = np.random.default_rng(config.seed)
    n_days, n_tickers, n_sectors = config.days, config.tickers, config.sectors
    dates = trading_calendar(config.start, n_days)
    names = _ticker_names(n_tickers, rng)
    sector_of = rng.permutation(np.arange(n_tickers) % n_sectors)
    first_row, last_row = _listing_rows(config, rng)

    idio_vol = np.exp(rng.uniform(np.log(0.008), np.log(0.025), n_tickers))
    factor_vol = np.concatenate([[0.010], rng.uniform(0.005, 0.009, n_sectors)])
    beta_market = np.clip(rng.normal(1.0, 0.25, n_tickers), 0.3, 2.0)
    beta_sector = np.clip(rng.normal(1.0, 0.3, n_tickers), 0.2, 2.0)
    market_drift = 0.0003
    log_price_0 = rng.uniform(np.log(5.0), np.log(500.0), n_tickers)

    # One GARCH recursion for tickers and factors: columns [tickers..., market, sectors...].
    target_vol = np.concatenate([idio_vol, factor_vol])
    z = rng.standard_t(_STUDENT_T_DF, size=(n_days, target_vol.size))
    z /= np.sqrt(_STUDENT_T_DF / (_STUDENT_T_DF - 2.0))
    omega = target_vol**2 * (1.0 - _GARCH_ARCH - _GARCH_PERSISTENCE)
    variance = np.empty((n_days, target_vol.size))
    variance[0] = target_vol**2
    shocks = np.empty_like(variance)
    shocks[0] = np.sqrt(variance[0]) * z[0]
    for t in range(1, n_days):
        variance[t] = (
            omega + _GARCH_ARCH * shocks[t - 1] ** 2 + _GARCH_PERSISTENCE * variance[t - 1]
        )
        shocks[t] = np.sqrt(variance[t]) * z[t]

    common = (
        beta_market * (market_drift + shocks[:, n_tickers])[:, None]
        + beta_sector * shocks[:, n_tickers + 1 :][:, sector_of]
    )
    score, log_return = _simulate_planted_score(
        common + shocks[:, :n_tickers], first_row, config.signal_strength, config.horizon
    )
    close = np.exp(log_price_0 + np.cumsum(log_return, axis=0))
    expected = _trailing_sum(score, config.horizon)

    total_vol = np.sqrt(
        variance[:, :n_tickers]
        + (beta_market**2) * variance[:, [n_tickers]]
        + (beta_sector**2) * variance[:, n_tickers + 1 :][:, sector_of]
    )
    open_, high, low, volume = _intraday_bars(close, log_return, total_vol, idio_vol, rng)

    listed = (np.arange(n_days)[:, None] >= first_row) & (np.arange(n_days)[:, None] <= last_row)
    day_index, ticker_index = np.nonzero(listed)  # row-major: date, then ticker (names are sorted)
    tickers = pd.array(names[ticker_index], dtype="string")
    prices = pd.DataFrame(
        {
            "date": dates[day_index],
            "ticker": tickers,
            "open": open_[listed],
            "high": high[listed],
            "low": low[listed],
            "close": close[listed],
            "adj_close": close[listed],
            "volume": volume[listed],
        }
    )
    expected_return = pd.DataFrame(
        {
            "date": prices["date"],
            "ticker": tickers,
            "expected_forward_return": expected[listed],
        }
    )
    sectors = {str(name): int(sector) for name, sector in zip(names, sector_of, strict=True)}
    return SyntheticMarket(prices, expected_return, sectors, config.horizon)


def trading_calendar(start: str, days: int) -> pd.DatetimeIndex:
    """Return the first `days` exchange trading days from `start` (business days minus holidays)."""
    # Nanoseconds: the canonical `date` dtype (pandas 3 builds ranges in microseconds).
    candidates = pd.bdate_range(start=start, periods=days + 12 * (days // 240 + 2)).as_unit("ns")
    holidays = _ExchangeCalendar().holidays(candidates[0], candidates[-1]).as_unit("ns")
    return candidates[~candidates.isin(holidays)][:days].rename("date")


def _check_defects(prices: pd.DataFrame, kinds: Sequence[str], rows_per_defect: int) -> None:
    """Raise ValueError for an unknown defect kind or one the frame cannot carry."""
    unknown = [kind for kind in kinds if kind not in DEFECT_KINDS]
    if unknown:
        raise ValueError(
            f"unknown defect kind(s) {unknown}; allowed kinds are {list(DEFECT_KINDS)}"
        )
    if rows_per_defect < 1:
        raise ValueError(f"rows_per_defect must be at least 1, got {rows_per_defect}")
    if "high_below_low" in kinds and not {"high", "low"} <= set(prices.columns):
        raise ValueError("defect 'high_below_low' needs `high` and `low` columns in the frame")


def inject_defects(
    prices: pd.DataFrame, kinds: Sequence[str], *, rows_per_defect: int = 3, seed: int = 0
) -> pd.DataFrame:
    """Return a copy of `prices` with each kind of defect planted on `rows_per_defect` rows.

    - ``nan``: `close` set to NaN (other columns untouched);
    - ``non_positive_price``: `close` set to 0.0 on the first row, then alternately to the
      negated close and 0.0;
    - ``duplicate_key``: exact copies of rows inserted right after the originals;
    - ``high_below_low``: `high` and `low` swapped (rows where high > low), needs both columns;
    - ``stale_price``: one ticker's price columns (open, high, low, close, adj_close) frozen at the
      first value of a run of ``max(10, rows_per_defect)`` consecutive rows, volume untouched.

    Different kinds land on different rows. The result keeps the input's row order (duplicates
    follow their original) with a fresh RangeIndex. Raises ValueError for an unknown kind.
    """
    _check_defects(prices, kinds, rows_per_defect)
    rng = np.random.default_rng(seed)
    frame = prices.reset_index(drop=True).copy()
    taken = np.zeros(len(frame), dtype=bool)

    if "stale_price" in kinds:
        rows = _stale_run_rows(frame, max(_STALE_RUN_MIN_ROWS, rows_per_defect), rng)
        for column in ("open", "high", "low", "close", "adj_close"):
            if column in frame.columns:
                position = frame.columns.get_loc(column)
                frame.iloc[rows, position] = frame.iloc[rows[0], position]
        taken[rows] = True

    def pick(eligible: np.ndarray) -> np.ndarray:
        pool = np.flatnonzero(eligible & ~taken)
        if pool.size < rows_per_defect:
            raise ValueError(f"frame has too few rows ({len(frame)}) for the defects asked for")
        rows = np.sort(rng.choice(pool, size=rows_per_defect, replace=False))
        taken[rows] = True
        return rows

    everywhere = np.ones(len(frame), dtype=bool)
    close_at = frame.columns.get_loc("close")
    if "nan" in kinds:
        frame.iloc[pick(everywhere), close_at] = np.nan
    if "non_positive_price" in kinds:
        rows = pick(frame["close"].to_numpy(dtype=float, na_value=np.nan) > 0)
        values = frame["close"].to_numpy(dtype=float)[rows]  # fancy indexing copies
        frame.iloc[rows, close_at] = np.where(np.arange(rows.size) % 2 == 0, 0.0, -values)
    if "high_below_low" in kinds:
        # Copies: the first assignment below would otherwise show through a view of the frame.
        high = frame["high"].to_numpy(dtype=float, copy=True)
        low = frame["low"].to_numpy(dtype=float, copy=True)
        rows = pick(high > low)
        frame.iloc[rows, frame.columns.get_loc("high")] = low[rows]
        frame.iloc[rows, frame.columns.get_loc("low")] = high[rows]
    if "duplicate_key" in kinds:
        rows = pick(everywhere)
        order = np.sort(np.concatenate([np.arange(len(frame)), rows]), kind="stable")
        frame = frame.iloc[order]
    return frame.reset_index(drop=True)


def write_vendor_files(prices: pd.DataFrame, out_dir: Path, *, daily_files: int = 5) -> list[Path]:
    """Write `prices` the way an EOD vendor delivers it and return the paths in delivery order.

    First one gzip CSV ``market_history_<first>_<last>.csv.gz`` holding every date except the
    last `daily_files`, then one plain CSV ``market_<YYYY-MM-DD>.csv`` per remaining date. Header
    ``Date,Ticker,Open,High,Low,Close,Adj Close,Volume`` (only the columns the frame has), dates as
    YYYY-MM-DD, integral volumes without a decimal point. Each file appears whole or not at all.
    """
    missing = [c for c in ("date", "ticker", "close") if c not in prices.columns]
    if missing:
        raise ValueError(f"cannot write vendor files: frame lacks column(s) {missing}")
    dates = np.sort(prices["date"].dropna().unique())
    if daily_files < 0 or daily_files >= len(dates):
        raise ValueError(
            f"daily_files must be between 0 and {len(dates) - 1} (the frame has {len(dates)} "
            f"dates and the history file needs at least one), got {daily_files}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vendor = _to_vendor_frame(prices)
    day = prices["date"].to_numpy()
    history_dates, daily_dates = (
        dates[: len(dates) - daily_files],
        dates[len(dates) - daily_files :],
    )

    first, last = (pd.Timestamp(d).strftime("%Y-%m-%d") for d in history_dates[[0, -1]])
    history_path = out_dir / f"market_history_{first}_{last}.csv.gz"
    _write_atomically(vendor[day <= history_dates[-1]], history_path, compress=True)
    paths = [history_path]
    for date in daily_dates:
        path = out_dir / f"market_{pd.Timestamp(date).strftime('%Y-%m-%d')}.csv"
        _write_atomically(vendor[day == date], path, compress=False)
        paths.append(path)
    return paths


def _check_config(config: MarketSyntheticConfig) -> None:
    needed_days = _SIGNAL_HISTORY_ROWS + config.horizon + 2 * _MIN_LISTED_ROWS
    problems = []
    if config.tickers < 2:
        problems.append(f"tickers must be at least 2, got {config.tickers}")
    if config.days < needed_days:
        problems.append(f"days must be at least {needed_days}, got {config.days}")
    if config.sectors < 1:
        problems.append(f"sectors must be at least 1, got {config.sectors}")
    if config.horizon < 1:
        problems.append(f"horizon must be at least 1, got {config.horizon}")
    if config.signal_strength < 0:
        problems.append(f"signal_strength must be >= 0, got {config.signal_strength}")
    fractions = (config.listing_fraction, config.delisting_fraction)
    if min(fractions) < 0 or sum(fractions) > 1:
        problems.append(
            f"listing_fraction and delisting_fraction must be >= 0 and sum to at most 1, "
            f"got {config.listing_fraction} and {config.delisting_fraction}"
        )
    if problems:
        raise ConfigError("MarketSyntheticConfig: " + "; ".join(problems))


def _ticker_names(count: int, rng: np.random.Generator) -> np.ndarray:
    """Return `count` distinct upper-case 3-4 letter tickers, sorted."""
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    names: set[str] = set()
    while len(names) < count:
        length = rng.integers(3, 5)
        names.add("".join(rng.choice(letters, size=length)))
    return np.array(sorted(names), dtype=object)


def _listing_rows(
    config: MarketSyntheticConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return each ticker's first and last row in the calendar (late listings, early delistings)."""
    n, days = config.tickers, config.days
    n_listing = round(n * config.listing_fraction)
    n_delisting = round(n * config.delisting_fraction)
    order = rng.permutation(n)
    first_row = np.zeros(n, dtype=np.int64)
    last_row = np.full(n, days - 1, dtype=np.int64)
    late, early = order[:n_listing], order[n_listing : n_listing + n_delisting]
    first_row[late] = rng.integers(1, days // 2 - _MIN_LISTED_ROWS, size=late.size)
    last_row[early] = rng.integers(days // 2 + _MIN_LISTED_ROWS, days - 1, size=early.size)
    return first_row, last_row


def _simulate_planted_score(
    unplanned: np.ndarray, first_row: np.ndarray, strength: float, horizon: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return g[t, i], the planted score known at the close of day t (see the module doc), and
    the daily log returns: `unplanned` (factors + idiosyncratic) plus g[t - horizon], bounded
    by `_bounded_moves` (on the rare squeezed day the planted part is squeezed with the rest).

    The score feeds back into prices, so days are simulated in order; each step is vectorised
    across tickers. Row 0 has no return: its close is the starting price.
    """
    n_days, n_tickers = unplanned.shape
    log_return = np.zeros((n_days, n_tickers))
    log_price = np.zeros((n_days, n_tickers))
    score = np.zeros((n_days, n_tickers))
    lag = _SIGNAL_HISTORY_ROWS
    for t in range(1, n_days):
        log_return[t] = _bounded_moves(unplanned[t] + (score[t - horizon] if t >= horizon else 0.0))
        log_price[t] = log_price[t - 1] + log_return[t]
        if t < lag or strength == 0.0:
            continue
        vol = log_return[t - 19 : t + 1].std(axis=0, ddof=1)
        reversal = -(log_price[t] - log_price[t - 5]) / (vol * np.sqrt(5.0))
        momentum = (log_price[t - 5] - log_price[t - lag]) / (vol * np.sqrt(lag - 5.0))
        raw = strength * vol * (np.tanh(reversal) + _MOMENTUM_WEIGHT * np.tanh(momentum))
        score[t] = np.where(t - first_row >= lag, raw, 0.0)
    return score, log_return


def _squeezed(values: np.ndarray, knee: float, bound: float) -> np.ndarray:
    """Return `values` with every magnitude beyond `knee` compressed smoothly (tanh) into
    (knee, bound), sign kept; magnitudes up to `knee` are returned unchanged."""
    size = np.abs(values)
    room = bound - knee
    squeezed = knee + room * np.tanh(np.maximum(size - knee, 0.0) / room)
    return np.where(size > knee, np.sign(values) * squeezed, values)


def _bounded_moves(log_return: np.ndarray) -> np.ndarray:
    """Return daily log returns whose moves beyond +-0.35 are squeezed to at most +-0.9.

    Student-t shocks times a GARCH volatility have no upper bound (a large shock raises the next
    days' volatility, which makes the next large shock likelier): unbounded, a 500-ticker,
    5-year panel had one-day moves of |log r| 3.1, which the market suite rejects as bad ticks
    (|log r| > 1.0). Moves beyond 0.35 (the suite's warning level) are what real crash and
    takeover days look like, so they are kept, only squeezed into (0.35, 0.9).
    """
    return _squeezed(log_return, _MOVE_KNEE, _MOVE_BOUND)


def _trailing_sum(values: np.ndarray, window: int) -> np.ndarray:
    """Return, for each row t, values[t - window + 1] + ... + values[t] (missing rows count 0)."""
    total = np.zeros_like(values)
    for lag in range(window):
        total[lag:] += values[: len(values) - lag]
    return total


def _intraday_bars(
    close: np.ndarray,
    log_return: np.ndarray,
    total_vol: np.ndarray,
    idio_vol: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return open, high, low and volume arrays consistent with `close`."""
    previous_close = np.vstack([close[:1], close[:-1]])
    # The overnight gap carries part of the day's move, as it does on real tapes.
    gap = 0.3 * log_return + rng.normal(0.0, 0.25, close.shape) * total_vol
    open_ = previous_close * np.exp(gap)
    upper = np.abs(rng.normal(0.0, 0.5, close.shape)) * total_vol
    lower = np.abs(rng.normal(0.0, 0.5, close.shape)) * total_vol
    high = np.maximum(open_, close) * np.exp(upper)
    low = np.minimum(open_, close) * np.exp(-lower)
    base_volume = np.exp(rng.uniform(np.log(2e5), np.log(2e7), close.shape[1]))
    # A day's volume multiplies by e^0.8 per unit of surprise; beyond 12 units the surprise is
    # squeezed below 14 (x7e4 at most). Unbounded, one GARCH burst on a quiet ticker gave
    # volumes of 1e16 and beyond (200 tickers x 1,000 days), which the market suite rejects
    # (volume <= 1e13). MAX_VOLUME guarantees the bound; it is reached only by the busiest
    # tickers on their wildest days with lognormal noise above 3.5 standard deviations.
    surprise = _squeezed(np.abs(log_return) / (idio_vol * 2.0), _SURPRISE_KNEE, _SURPRISE_BOUND)
    log_volume = np.log(base_volume) + 0.8 * surprise + rng.normal(0.0, 0.35, close.shape)
    volume = np.minimum(np.round(np.exp(log_volume)), MAX_VOLUME)
    return open_, high, low, volume


def _mean_cross_sectional_pearson(dates: pd.Series, x: np.ndarray, y: np.ndarray) -> float:
    """Return the mean over dates of the Pearson correlation of x and y within each date."""
    frame = pd.DataFrame({"date": dates.to_numpy(), "x": x, "y": y})
    grouped = frame.groupby("date")
    frame["dx"] = frame["x"] - grouped["x"].transform("mean")
    frame["dy"] = frame["y"] - grouped["y"].transform("mean")
    frame["xy"], frame["xx"], frame["yy"] = (
        frame["dx"] * frame["dy"],
        frame["dx"] ** 2,
        frame["dy"] ** 2,
    )
    sums = frame.groupby("date")[["xy", "xx", "yy"]].sum()
    counts = grouped.size()
    usable = (counts >= 3) & (sums["xx"] > 0) & (sums["yy"] > 0)
    sums = sums[usable]
    if sums.empty:
        return float("nan")
    return float((sums["xy"] / np.sqrt(sums["xx"] * sums["yy"])).mean())


def _stale_run_rows(frame: pd.DataFrame, run: int, rng: np.random.Generator) -> np.ndarray:
    """Return the positions of `run` consecutive-by-date rows of one ticker with enough rows."""
    by_ticker = frame.groupby("ticker", sort=True).indices
    eligible = [t for t, rows in by_ticker.items() if len(rows) >= run + 1]
    if not eligible:
        raise ValueError(f"no ticker has the {run + 1} rows a stale_price run needs")
    ticker = eligible[rng.integers(len(eligible))]
    rows = by_ticker[ticker]
    rows = rows[np.argsort(frame["date"].to_numpy()[rows], kind="stable")]
    start = rng.integers(0, len(rows) - run + 1)
    return np.sort(rows[start : start + run])


def _to_vendor_frame(prices: pd.DataFrame) -> pd.DataFrame:
    """Return `prices` with vendor column names, dates as text and whole volumes as integers."""
    columns = [c for c in VENDOR_COLUMNS if c in prices.columns]
    vendor = prices[columns].copy()
    vendor["date"] = vendor["date"].dt.strftime("%Y-%m-%d")
    if "volume" in vendor.columns:
        volume = vendor["volume"]
        whole = volume.dropna()
        if (whole == np.round(whole)).all():
            vendor["volume"] = volume.astype("Int64")
    return vendor.rename(columns=VENDOR_COLUMNS)


def _write_atomically(frame: pd.DataFrame, path: Path, *, compress: bool) -> None:
    """Write `frame` as CSV to `path` through a temporary file renamed into place."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as raw:
            if compress:
                # mtime=0 keeps the bytes identical for identical data (idempotent deliveries).
                with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as zipped:
                    zipped.write(frame.to_csv(index=False).encode("utf-8"))
            else:
                raw.write(frame.to_csv(index=False).encode("utf-8"))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# -- the planted signal and the demo ----------------------------------------------------------
def write_oracle(storage: Storage, oracle: pd.DataFrame) -> str:
    """Keep a synthetic panel's planted signal beside the data, for oracle-IC reporting."""
    return storage.write_reference(DOMAIN, ORACLE, oracle)


def plan_market_demo(
    settings: Settings, *, tickers: int = 40, days: int = 700, nights: int = 3, seed: int = 7
) -> list[DemoNight]:
    """Write a synthetic panel as vendor files (a history file, then `nights` daily files) and
    its planted signal; return the nights the demo runs (`demo_nights`), each training at most
    12 epochs."""
    panel = generate_market_panel(MarketSyntheticConfig(tickers=tickers, days=days, seed=seed))
    drop = settings.local_home / "vendor_drop" / DOMAIN
    files = write_vendor_files(panel.prices, drop, daily_files=nights)
    write_oracle(Storage(settings.home), panel.expected_return)
    log.info("generated %s rows in %s (oracle IC %.4f)", len(panel.prices), drop, panel.oracle_ic())
    return demo_nights(
        files, lambda daily: daily.stem.removeprefix("market_"), training={"max_epochs": 12}
    )
