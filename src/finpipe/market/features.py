"""Point-in-time market features and forward-return labels.

Every per-ticker feature at row t is computed from that ticker's own rows up to and including t
(rows are the ticker's trading days; gaps in the calendar are not filled). Each window is summed
on its own, element by element in a fixed order (oldest row first), instead of with running sums
such as pandas' ``rolling().mean()``, whose last bits depend on where the series starts. So the
value at t is a function of the last ``FEATURE_LOOKBACK_DAYS + 1`` rows only and is bit-for-bit
the same whether the frame holds the ticker's full history or just those rows: the nightly job
computes today's features from a short tail and gets exactly what a backfill would. (Element-wise
NumPy operations, log and log1p included, give the same bits wherever an element sits in the
array; the tests check the whole feature set at float64, where float32 would hide most slips.)

Conventions, stated once here:
- prices: ``price_column`` (``adj_close`` when delivered, else ``close``) for returns, volatility,
  RSI, MACD and moving averages, except that a value whose rows hold one of its ticker's rows
  without ``adj_close`` is computed on ``close`` (one kind of price per window, as ingest checks
  such a ticker on its close; a label likewise where ``adj_close`` is empty at t or t+h); the
  unadjusted ``open``/``high``/``low``/``close`` for same-day bar shapes, since those are
  delivered unadjusted together;
- returns are simple returns over rows, ``P[t] / P[t-k] - 1``;
- ``volatility_20d`` is the daily (not annualised) sample standard deviation (ddof=1) of the
  last 20 daily log returns;
- ``rsi_14`` is the simple-average RSI in 0..100: ``100 * gains / (gains + losses)`` over the last
  14 price changes, 50 when the price did not move at all;
- ``macd`` is ``EMA12 / EMA26 - 1`` (relative, so it compares across price levels) and
  ``macd_signal`` its EMA9; each EMA uses weights ``(1 - a) ** k`` with ``a = 2 / (span + 1)``,
  truncated after ``2 * span`` rows and renormalised, so nothing has infinite memory;
- ``ma_ratio_k`` is ``P[t] / mean(P[t-k+1..t]) - 1``;
- ``volume_z_20d`` is the z-score of ``log1p(volume)`` at t against its last 20 values (t
  included), 0 when those 20 values are all equal (a spread below 1e-9). Rows of the window
  without a volume (a day delivered without the column) are left out while t has its own and
  at least 15 of the 20 do, so one such day costs that day's value alone, not the next 19;
- ``range_hl`` is ``(high - low) / close`` and ``return_oc`` is ``close / open - 1``, same day;
- ``*_cs_rank`` is the percentile rank in [0, 1] of a feature among the tickers on the same date
  (ties averaged, 0.5 for a lone ticker), using that date's rows only.
A value whose window is not full yet (a newly listed ticker) is NaN.

Labels look forward and are never features: ``forward_return_{h}d`` at t is ``P[t+h] / P[t] - 1``
over the ticker's own rows, NaN where row t+h is not in the frame or is not h sessions after t
(a halt in between).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from finpipe.errors import ScoringError
from finpipe.features import (
    FeatureUpdate,
    PartitionWriter,
    orphaned_feature_days,
    remove_feature_days,
    stale_feature_days,
)
from finpipe.ingest import BATCH_COLUMN
from finpipe.market.schema import CANONICAL_COLUMNS, DOMAIN, price_column
from finpipe.storage import Storage, as_day

KEY_COLUMNS = ["date", "ticker"]

RETURN_WINDOWS = (1, 5, 20, 60)
MOVING_AVERAGE_WINDOWS = (5, 20, 60)
VOLATILITY_WINDOW = 20
RSI_WINDOW = 14
MACD_FAST_SPAN, MACD_SLOW_SPAN, MACD_SIGNAL_SPAN = 12, 26, 9
EWMA_SPAN_MULTIPLE = 2  # a span-s EMA looks back 2*s rows; the weight left out is below 2%
VOLUME_WINDOW = 20
VOLUME_MIN_VALUES = 15  # of a window's rows, with t's own, for a z-score over a gap
CROSS_SECTIONAL_RANKED = ("return_5d", "return_20d", "volatility_20d")
_FLAT_LOG_VOLUME_STD = 1e-9
# Window sums run over the rows in chunks this long, every pass of a window over one chunk
# before the next, so the running sums stay in the core's cache instead of streaming from memory.
_CHUNK_ROWS = 1 << 14


def _ewma_rows(span: int) -> int:
    return EWMA_SPAN_MULTIPLE * span


# Rows before t that each feature reads; the largest is the lookback the nightly job must load.
_ROWS_BEFORE_T = {
    **{f"return_{k}d": k for k in RETURN_WINDOWS},
    "volatility_20d": VOLATILITY_WINDOW,  # 20 log returns need 21 prices
    "rsi_14": RSI_WINDOW,
    "macd": _ewma_rows(MACD_SLOW_SPAN) - 1,
    "macd_signal": _ewma_rows(MACD_SLOW_SPAN) - 1 + _ewma_rows(MACD_SIGNAL_SPAN) - 1,
    **{f"ma_ratio_{k}": k - 1 for k in MOVING_AVERAGE_WINDOWS},
    "volume_z_20d": VOLUME_WINDOW - 1,
    "range_hl": 0,
    "return_oc": 0,
}

FEATURE_LOOKBACK_DAYS: int = max(_ROWS_BEFORE_T.values())

# Raw columns each feature needs beyond `date` and `ticker`, in output order.
_FEATURE_INPUTS: dict[str, tuple[str, ...]] = {
    **{f"return_{k}d": ("close",) for k in RETURN_WINDOWS},
    "volatility_20d": ("close",),
    "rsi_14": ("close",),
    "macd": ("close",),
    "macd_signal": ("close",),
    **{f"ma_ratio_{k}": ("close",) for k in MOVING_AVERAGE_WINDOWS},
    "volume_z_20d": ("volume",),
    "range_hl": ("high", "low", "close"),
    "return_oc": ("open", "close"),
    **{f"{name}_cs_rank": ("close",) for name in CROSS_SECTIONAL_RANKED},
}


def market_feature_columns(available: Iterable[str]) -> list[str]:
    """Return the names of the features computable from the raw columns `available`, in order."""
    present = set(available)
    return [name for name, inputs in _FEATURE_INPUTS.items() if set(inputs) <= present]


def market_feature_inputs(name: str) -> tuple[str, ...]:
    """Return the raw columns the feature `name` reads (none for a name it does not know)."""
    return _FEATURE_INPUTS.get(name, ())


def market_feature_rows_before(name: str) -> int:
    """Return how many of a ticker's rows before t the feature `name` reads (0 if unknown)."""
    return _ROWS_BEFORE_T.get(name, 0)


def skipped_market_features(available: Iterable[str]) -> dict[str, str]:
    """Return feature name -> the missing raw column(s) that prevent it (comma-separated)."""
    present = set(available)
    skipped = {}
    for name, inputs in _FEATURE_INPUTS.items():
        missing = [column for column in inputs if column not in present]
        if missing:
            skipped[name] = ", ".join(missing)
    return skipped


def build_market_features(prices: pd.DataFrame) -> pd.DataFrame:
    """Return one row of point-in-time features per (date, ticker) of `prices`.

    `prices` is a canonical market frame (any tickers, any dates, any row order). The result has
    `date`, `ticker`, then `market_feature_columns(prices.columns)` as float32, sorted by date
    then ticker. Raises ValueError on missing key columns or duplicate (date, ticker) rows.
    """
    return _features(prices, np.float32)


def _features_in_float64(prices: pd.DataFrame) -> pd.DataFrame:
    """Return the features at full precision; the point-in-time guarantee holds here already,
    not only after rounding to float32 (which would hide most last-bit differences)."""
    return _features(prices, np.float64)


def _features(prices: pd.DataFrame, dtype: type[np.floating]) -> pd.DataFrame:
    """Compute every feature at float64 and return them as `dtype`, in date, ticker order.

    Values are rounded to `dtype` before they are put in date order: the same numbers as
    rounding afterwards, but a float32 reorder moves half the bytes (a tenth of the build).
    Ranks are taken over the float64 values.
    """
    panel = _TickerPanel(prices)
    basis = price_column(prices)
    columns = _price_features(panel, panel.column(basis))
    if basis == "adj_close":
        close = panel.column("close")
        blank = np.isnan(panel.column("adj_close")) & ~np.isnan(close)
        if blank.any():
            # A ticker's row without adj_close (a vendor left it empty; ingest checked that
            # ticker on its close) puts each feature whose own window holds it on close: no
            # series mixes the two prices, and no window without such a row changes.
            for name, values in _price_features(panel, close).items():
                on_close = panel.recent_count(blank, _ROWS_BEFORE_T[name] + 1) > 0
                columns[name] = np.where(on_close, values, columns[name])

    available = set(prices.columns)
    if "volume" in available:
        columns["volume_z_20d"] = _volume_z(panel, panel.column("volume"))
    close = panel.column("close")  # unadjusted, like the open, high and low it is paired with
    if {"high", "low"} <= available:
        columns["range_hl"] = (panel.column("high") - panel.column("low")) / close
    if "open" in available:
        columns["return_oc"] = close / panel.column("open") - 1.0

    by_date = panel.by_date
    out = {name: values.astype(dtype, copy=False)[by_date] for name, values in columns.items()}
    slots, shape = panel.date_matrix()
    for name in CROSS_SECTIONAL_RANKED:
        ranked = _cross_sectional_rank(columns[name][by_date], slots, shape)
        out[f"{name}_cs_rank"] = ranked.astype(dtype, copy=False)

    frame = panel.keys_by_date()
    names = market_feature_columns(available)
    return pd.concat([frame, pd.DataFrame({name: out[name] for name in names})], axis=1)


def _price_features(panel: _TickerPanel, price: np.ndarray) -> dict[str, np.ndarray]:
    """Return the features read from the price series `price` (panel layout), by name."""
    columns = {f"return_{k}d": price / panel.lag(price, k) - 1.0 for k in RETURN_WINDOWS}
    log_return = np.log(price / panel.lag(price, 1))
    columns["volatility_20d"] = panel.window_std(log_return, VOLATILITY_WINDOW, rows_before=20)
    columns["rsi_14"] = _rsi(panel, price)
    columns["macd"], columns["macd_signal"] = _macd(panel, price)
    for k in MOVING_AVERAGE_WINDOWS:
        columns[f"ma_ratio_{k}"] = price / (panel.window_sum(price, k) / k) - 1.0
    return columns


def build_market_labels(prices: pd.DataFrame, horizon: int = 5) -> pd.DataFrame:
    """Return date, ticker, `forward_return_{h}d` and `direction_{h}d`, sorted by date, ticker.

    The forward return at t is ``P[t+h] / P[t] - 1`` with P the price column and t+h the h-th
    next row of the same ticker; NaN where that row is not in the frame (the last h rows of each
    ticker) or is not the h-th next of the frame's dates (the ticker skipped a session: a halt).
    So every label is realised h sessions after its date, inside the embargo of h dates that
    keeps it from the next window of a time split. Direction is 1.0 when the forward return is
    > 0, 0.0 when <= 0, NaN when unknown. Labels are float64: they feed metrics as well as
    training.
    """
    if not isinstance(horizon, int | np.integer) or horizon < 1:
        raise ValueError(f"horizon must be a positive whole number of sessions, got {horizon!r}")
    panel = _TickerPanel(prices)
    basis = price_column(prices)
    price = panel.column(basis)
    forward = panel.lead(price, horizon) / price - 1.0
    if basis == "adj_close":  # adj_close empty at t or t + h: the close's return, as ingest checks
        close = panel.column("close")
        forward = np.where(np.isnan(forward), panel.lead(close, horizon) / close - 1.0, forward)
    session = panel.sessions()
    forward[panel.lead(session, horizon) - session != horizon] = np.nan
    direction = np.where(np.isnan(forward), np.nan, (forward > 0).astype(np.float64))
    frame = panel.keys_by_date()
    frame[f"forward_return_{horizon}d"] = forward[panel.by_date]
    frame[f"direction_{horizon}d"] = direction[panel.by_date]
    return frame


class _TickerPanel:
    """The rows of a market frame laid out as contiguous per-ticker blocks sorted by date.

    Array methods take and return float64 arrays in that layout; `by_date` reorders them to
    date, ticker order.
    """

    def __init__(self, prices: pd.DataFrame) -> None:
        missing = [c for c in ("date", "ticker", "close") if c not in prices.columns]
        if missing:
            raise ValueError(
                f"market features need columns {missing}; the frame has {list(prices.columns)}"
            )
        if prices["ticker"].isna().any() or prices["date"].isna().any():
            raise ValueError("market features need a date and a ticker on every row; found blanks")
        self._prices = prices
        ticker_code, _ = pd.factorize(prices["ticker"], sort=True)
        day = prices["date"].to_numpy().astype("datetime64[ns]").view(np.int64)
        # Partitions are read in date order, each sorted by ticker; then a stable sort by
        # ticker alone keeps each ticker's dates in order, and date order is its inverse.
        step = np.diff(day)
        self._in_date_order = bool(np.all((step > 0) | ((step == 0) & (np.diff(ticker_code) > 0))))
        if self._in_date_order:
            self.by_ticker = np.argsort(ticker_code, kind="stable")
        else:
            self.by_ticker = np.lexsort((day, ticker_code))
        self._code = ticker_code[self.by_ticker]
        self._day = day[self.by_ticker]
        same_key = (np.diff(self._code) == 0) & (np.diff(self._day) == 0)
        if same_key.any():
            row = self.by_ticker[np.flatnonzero(same_key)[0]]
            raise ValueError(
                f"duplicate (date, ticker) rows, e.g. {prices['ticker'].iloc[row]} on "
                f"{pd.Timestamp(prices['date'].iloc[row]).date()}: {int(same_key.sum())} extra "
                "row(s); validate and deduplicate the batch before building features"
            )
        n = len(prices)
        block_start = np.flatnonzero(np.r_[n > 0, np.diff(self._code) != 0])
        block_length = np.diff(np.r_[block_start, n]).astype(np.int64)
        # Row number within the ticker's own rows: windows only count when they fit inside it.
        self.position = np.arange(n) - np.repeat(block_start, block_length)
        if self._in_date_order:
            self.by_date = np.empty(n, dtype=np.intp)
            self.by_date[self.by_ticker] = np.arange(n)
        else:
            self.by_date = np.lexsort((self._code, self._day))

    def column(self, name: str) -> np.ndarray:
        values = self._prices[name].to_numpy(dtype=np.float64, na_value=np.nan)
        return values[self.by_ticker]

    def recent_count(self, flags: np.ndarray, rows: int) -> np.ndarray:
        """Return how many of the ticker's last `rows` rows up to each row (fewer at its start)
        have `flags` (booleans in panel layout) set."""
        through = np.cumsum(flags, dtype=np.int64)  # through each row, tickers one after another
        index = np.arange(len(flags))
        before = np.maximum(index - rows, index - self.position - 1)  # the row before the window
        return through - np.where(before >= 0, through[np.maximum(before, 0)], 0)

    def sessions(self) -> np.ndarray:
        """Return each row's position among the frame's distinct dates (float64)."""
        _, position = np.unique(self._day, return_inverse=True)
        return position.astype(np.float64)

    def lag(self, values: np.ndarray, k: int) -> np.ndarray:
        """Return values k rows earlier in the same ticker (NaN for its first k rows)."""
        out = np.full(values.shape, np.nan)
        out[k:] = values[:-k] if k else values
        out[self.position < k] = np.nan
        return out

    def lead(self, values: np.ndarray, k: int) -> np.ndarray:
        """Return values k rows later in the same ticker (NaN for its last k rows)."""
        out = np.full(values.shape, np.nan)
        if len(values) > k:
            out[:-k] = values[k:]
            out[:-k][self._code[k:] != self._code[:-k]] = np.nan
        return out

    def masked(self, out: np.ndarray, rows_before: int) -> np.ndarray:
        """Return `out` with NaN where the ticker has fewer than `rows_before` rows before t
        (the window would reach into another ticker)."""
        out[self.position < rows_before] = np.nan
        return out

    def window_sum(
        self, values: np.ndarray, window: int, *, rows_before: int | None = None
    ) -> np.ndarray:
        """Return the sum of the last `window` values up to each row, added oldest first."""
        return self.window_weighted_sum(values, np.ones(window), rows_before=rows_before)

    def window_weighted_sum(
        self, values: np.ndarray, weights: np.ndarray, *, rows_before: int | None = None
    ) -> np.ndarray:
        """Return sum_k weights[k] * values[t - k] (k = 0 is row t), added oldest first."""
        window = len(weights)
        out = np.full(len(values), np.nan)
        aligned = out[window - 1 :]  # entry m is row t = m + window - 1; values[m + j] its term j
        term = np.empty(min(_CHUNK_ROWS, len(aligned)))
        for lo, hi in _chunks(len(aligned)):
            total, scratch = aligned[lo:hi], term[: hi - lo]
            np.multiply(values[lo:hi], weights[window - 1], out=total)
            for j in range(1, window):
                weight, view = weights[window - 1 - j], values[lo + j : hi + j]
                if weight == 1.0:  # x * 1.0 is x exactly
                    np.add(total, view, out=total)
                else:
                    np.multiply(view, weight, out=scratch)
                    np.add(total, scratch, out=total)
        return self.masked(out, window - 1 if rows_before is None else rows_before)

    def window_mean_std(
        self, values: np.ndarray, window: int, *, rows_before: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the mean and sample standard deviation (ddof=1) of the last `window` values,
        from two passes over each window (mean first, then squared deviations)."""
        mean, std = np.full(len(values), np.nan), np.full(len(values), np.nan)
        mean_at, std_at = mean[window - 1 :], std[window - 1 :]  # entry m is row m + window - 1
        scratch = np.empty(min(_CHUNK_ROWS, len(mean_at)))
        for lo, hi in _chunks(len(mean_at)):
            average, squares, deviation = mean_at[lo:hi], std_at[lo:hi], scratch[: hi - lo]
            np.copyto(average, values[lo:hi])
            for j in range(1, window):
                np.add(average, values[lo + j : hi + j], out=average)
            np.divide(average, window, out=average)
            np.subtract(values[lo:hi], average, out=squares)
            np.square(squares, out=squares)
            for j in range(1, window):
                np.subtract(values[lo + j : hi + j], average, out=deviation)
                np.square(deviation, out=deviation)
                np.add(squares, deviation, out=squares)
            np.divide(squares, window - 1, out=squares)
            np.sqrt(squares, out=squares)
        return self.masked(mean, rows_before), self.masked(std, rows_before)

    def window_std(self, values: np.ndarray, window: int, *, rows_before: int) -> np.ndarray:
        return self.window_mean_std(values, window, rows_before=rows_before)[1]

    def keys_by_date(self) -> pd.DataFrame:
        """Return the `date` and `ticker` columns in date, ticker order, dtypes kept."""
        rows = slice(None) if self._in_date_order else self.by_ticker[self.by_date]
        return pd.DataFrame(
            {
                "date": self._prices["date"].iloc[rows].to_numpy(),
                "ticker": self._prices["ticker"].iloc[rows].reset_index(drop=True),
            }
        )

    def date_matrix(self) -> tuple[np.ndarray, tuple[int, int]]:
        """Return a dates x width matrix's shape and, for each row in date order, its flat
        position there: date d's rows fill matrix row d from the left (width = the most rows
        of any date)."""
        day = self._day[self.by_date]
        n = len(day)
        if n == 0:
            return np.zeros(0, dtype=np.int64), (0, 0)
        starts = np.flatnonzero(np.r_[True, day[1:] != day[:-1]])
        sizes = np.diff(np.r_[starts, n])
        width = int(sizes.max())
        slots = np.arange(n) + np.repeat(np.arange(len(starts)) * width - starts, sizes)
        return slots, (len(starts), width)


def _chunks(rows: int) -> list[tuple[int, int]]:
    """Return [lo, hi) bounds covering `rows` in steps of _CHUNK_ROWS."""
    return [(lo, min(lo + _CHUNK_ROWS, rows)) for lo in range(0, rows, _CHUNK_ROWS)]


def _rsi(panel: _TickerPanel, price: np.ndarray) -> np.ndarray:
    change = price - panel.lag(price, 1)
    gains = panel.window_sum(np.maximum(change, 0.0), RSI_WINDOW, rows_before=RSI_WINDOW)
    losses = panel.window_sum(np.maximum(-change, 0.0), RSI_WINDOW, rows_before=RSI_WINDOW)
    moved = gains + losses
    with np.errstate(invalid="ignore", divide="ignore"):
        rsi = 100.0 * gains / moved
    return np.where(moved == 0.0, 50.0, rsi)


def _ewma_weights(span: int) -> np.ndarray:
    """Return normalised EMA weights for lags 0 .. 2*span - 1 (lag 0 = the current row)."""
    decay = 1.0 - 2.0 / (span + 1.0)
    weights = decay ** np.arange(_ewma_rows(span))
    return weights / weights.sum()


def _macd(panel: _TickerPanel, price: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fast = panel.window_weighted_sum(price, _ewma_weights(MACD_FAST_SPAN))
    slow = panel.window_weighted_sum(price, _ewma_weights(MACD_SLOW_SPAN))
    macd = fast / slow - 1.0
    signal = panel.window_weighted_sum(
        macd, _ewma_weights(MACD_SIGNAL_SPAN), rows_before=_ROWS_BEFORE_T["macd_signal"]
    )
    return macd, signal


def _volume_z(panel: _TickerPanel, volume: np.ndarray) -> np.ndarray:
    log_volume = np.log1p(volume)
    mean, std = panel.window_mean_std(log_volume, VOLUME_WINDOW, rows_before=VOLUME_WINDOW - 1)
    # A full window holding a row without a volume: the values present, when t has its own and
    # enough of them do (a window without a gap keeps the two-pass figures above). Whole
    # arrays of such windows, not a loop over rows: sporadic gaps put most rows in one.
    gapped = np.isnan(mean) & np.isfinite(log_volume) & (panel.position >= VOLUME_WINDOW - 1)
    rows = np.flatnonzero(gapped)
    windows = np.lib.stride_tricks.sliding_window_view(log_volume, VOLUME_WINDOW)
    for lo, hi in _chunks(len(rows)):
        at = rows[lo:hi]
        values = windows[at - VOLUME_WINDOW + 1]
        present = np.isfinite(values)
        enough = present.sum(axis=1) >= VOLUME_MIN_VALUES
        kept = np.where(present, values, np.nan)[enough]
        mean[at[enough]] = np.nanmean(kept, axis=1)
        std[at[enough]] = np.nanstd(kept, axis=1, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (log_volume - mean) / std
    # Twenty equal volumes leave a std of rounding error, not exactly 0; a spread below 1e-9
    # in log volume is no spread at all, so the z-score is 0 there rather than noise.
    return np.where(std < _FLAT_LOG_VOLUME_STD, 0.0, z)


def _cross_sectional_rank(
    values: np.ndarray, slots: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Return the percentile rank in [0, 1] of each value among the same date's values.

    Ranks are 1-based with ties averaged and missing values left out (and left NaN), mapped to
    (rank - 1) / (count - 1); a lone value is 0.5. `slots` and `shape` lay the values out as a
    dates x names matrix (`_TickerPanel.date_matrix`). Each matrix row is sorted once; a run of
    equal sorted values spans positions first..last and each of its values ranks
    (first + last) / 2 + 1, what scipy's `rankdata(method="average")` gives, without its
    general-purpose NaN handling, which cost a quarter of the build.

    Padding and missing values sit in the matrix as +inf, not NaN: NumPy's vectorised sort
    takes a path about four times slower for rows holding NaN. They sort last, with any real
    +inf, so each run is cut at its row's count of present values, and a real +inf ranks among
    the present values only.
    """
    if len(values) == 0:
        return np.zeros(0)
    missing = np.isnan(values)
    width = shape[1]
    matrix = np.full(shape, np.inf)
    flat = matrix.reshape(-1)
    flat[slots] = values
    flat[slots[missing]] = np.inf
    absent = np.ones(shape, dtype=bool)
    absent.reshape(-1)[slots] = missing
    count = (width - np.count_nonzero(absent, axis=1)).astype(np.float64)[:, None]

    order = np.argsort(matrix, axis=1)
    ordered = np.take_along_axis(matrix, order, axis=1)
    column = np.arange(width)
    starts = np.empty(shape, dtype=bool)  # True where a run of equal sorted values begins
    starts[:, 0] = True
    np.not_equal(ordered[:, 1:], ordered[:, :-1], out=starts[:, 1:])
    ends = np.empty(shape, dtype=bool)
    ends[:, -1] = True
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, column, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, column, width)[:, ::-1], axis=1)[:, ::-1]
    last = np.minimum(last, count - 1.0)  # padding is never part of a tie
    with np.errstate(invalid="ignore", divide="ignore"):  # rank - 1 is (first + last) / 2
        pct = np.where(count == 1.0, 0.5, (first + last) / 2.0 / (count - 1.0))
    ranked = np.empty(shape)
    np.put_along_axis(ranked, order, pct, axis=1)
    out = ranked.reshape(-1)[slots]
    out[missing] = np.nan
    return out


# -- the training frame: features joined with the labels known at the as-of date ---------
def load_training_frame(
    storage: Storage,
    as_of: dt.date,
    horizon: int,
    start: dt.date | None = None,
    *,
    history_dates: int | None = None,
) -> pd.DataFrame:
    """Return features joined with forward-return labels known at `as_of`.

    Labels come from validated prices up to `as_of` only, so a label at t exists only when
    t + h is on or before `as_of`: nothing from after the as-of date leaks into training.
    With `history_dates`, only the last that many feature dates are read (and the prices from
    the first of them on), so memory follows the training window, not the whole history.
    """
    if history_dates:
        window = storage.partition_dates("features", DOMAIN, start=start, end=as_of)
        start = window[-history_dates] if len(window) > history_dates else start
    features = storage.read_partitions("features", DOMAIN, start=start, end=as_of)
    if features.empty:
        raise ScoringError(f"no feature partitions up to {as_of}; run the features step first")
    prices = storage.read_partitions("validated", DOMAIN, start=start, end=as_of)
    labels = build_market_labels(prices.drop(columns=[BATCH_COLUMN], errors="ignore"), horizon)
    frame = features.merge(labels, on=KEY_COLUMNS, how="left")
    return frame.sort_values(KEY_COLUMNS, kind="stable").reset_index(drop=True)


def feature_columns_of(frame: pd.DataFrame) -> list[str]:
    """Return the model inputs: every column except keys and labels."""
    return [
        c
        for c in frame.columns
        if c not in KEY_COLUMNS
        and not c.startswith(("forward_return_", "direction_"))
        and c != BATCH_COLUMN
    ]


# -- the nightly feature step: which dates, read with their lookback, published in blocks --
def dates_needing_features(
    storage: Storage,
    as_of: dt.date,
    rebuild: bool = False,
    removed: list[dt.date] | None = None,
) -> list[dt.date]:
    """Return validated dates up to `as_of` whose feature partition is missing or stale.

    Features at t depend on the previous FEATURE_LOOKBACK_DAYS rows, so once one date is
    missing or older than its validated data, every later date is recomputed too; that keeps
    an incremental run identical to a full rebuild. So are the dates after one a correction
    removed (`orphaned_feature_days`, listed by the caller when it has them): their lookback
    held its rows.
    """
    validated = storage.partition_dates("validated", DOMAIN, end=as_of)
    if rebuild:
        return validated
    done = set(storage.partition_dates("features", DOMAIN, end=as_of))
    stale = stale_feature_days(storage, DOMAIN, validated)
    if removed is None:
        removed = orphaned_feature_days(storage, DOMAIN, end=as_of)
    for i, day in enumerate(validated):
        if day not in done or day in stale or (removed and day > removed[0]):
            return validated[i:]
    return []


def update_market_features(
    storage: Storage,
    as_of: dt.date | str,
    *,
    rebuild: bool = False,
    block_dates: int = 500,
    progress: Callable[[str], None] | None = None,
    also: Collection[dt.date] = (),
) -> FeatureUpdate:
    """Compute and publish feature partitions for every date that needs them, up to `as_of`
    (every validated date has features after it, so `also` asks for none more).

    Works in blocks of `block_dates` dates, so memory stays bounded however long the history
    is. The first block is read with just the lookback history it needs; each later block
    carries the last FEATURE_LOOKBACK_DAYS rows of every ticker over from the block before
    instead of reading them again (exactly the rows its features depend on, however long a
    ticker paused). A block's partitions are written by threads while the next one is built.
    """
    started = time.perf_counter()
    as_of = as_day(as_of)
    removed = orphaned_feature_days(storage, DOMAIN, end=as_of)
    todo = dates_needing_features(storage, as_of, rebuild, removed)
    update = FeatureUpdate()
    if todo:
        _build_market_features(storage, as_of, todo, block_dates, update, progress)
    remove_feature_days(storage, DOMAIN, removed, update)  # last: see orphaned_feature_days
    update.seconds = round(time.perf_counter() - started, 3)
    return update


def _build_market_features(
    storage: Storage,
    as_of: dt.date,
    todo: list[dt.date],
    block_dates: int,
    update: FeatureUpdate,
    progress: Callable[[str], None] | None,
) -> None:
    """Build and publish the feature partitions of `todo` (validated dates, in order)."""
    validated = storage.partition_dates("validated", DOMAIN, end=as_of)
    position = {day: i for i, day in enumerate(validated)}
    blocks = [todo[i : i + block_dates] for i in range(0, len(todo), block_dates)]
    first = position[blocks[0][0]]
    window = validated[max(0, first - 2 * FEATURE_LOOKBACK_DAYS) : position[blocks[0][-1]] + 1]
    prices = read_with_lookback(
        storage,
        "validated",
        validated,
        window,
        blocks[0][0],
        FEATURE_LOOKBACK_DAYS,
        columns=list(CANONICAL_COLUMNS),
    )
    built = 0
    # One thread reads block n + 1 and a few write block n - 1 while block n is built.
    with PartitionWriter(storage, DOMAIN, update) as writer, ThreadPoolExecutor(1) as reader:
        for number, block in enumerate(blocks):
            ahead = None
            if number + 1 < len(blocks):  # every validated date after this block, up to the next
                days = validated[position[block[-1]] + 1 : position[blocks[number + 1][-1]] + 1]
                ahead = reader.submit(  # the price columns, not each row's batch id
                    storage.read_partitions,
                    "validated",
                    DOMAIN,
                    days=days,
                    columns=CANONICAL_COLUMNS,
                )
            features = build_market_features(prices)
            if not update.skipped_features:
                update.skipped_features = skipped_market_features(prices.columns)
            first_row = features["date"].searchsorted(pd.Timestamp(block[0]))  # sorted by date
            writer.publish(features.iloc[first_row:])
            built += len(block)
            if progress:
                progress(f"features: {built}/{len(todo)} dates built")
            if ahead is not None:
                carried = _last_rows_per_ticker(prices, FEATURE_LOOKBACK_DAYS)
                prices = pd.concat([carried, ahead.result()], ignore_index=True)


def _last_rows_per_ticker(prices: pd.DataFrame, rows: int) -> pd.DataFrame:
    """Return each ticker's last `rows` rows by date, in date order (a grouped `tail`, which
    pandas runs several times slower than this)."""
    if not prices["date"].is_monotonic_increasing:
        prices = prices.sort_values("date", kind="stable")
    code, _ = pd.factorize(prices["ticker"])
    by_ticker = np.argsort(code, kind="stable")  # each ticker's rows, oldest first
    counts = np.bincount(code)
    starts = np.cumsum(counts) - counts
    from_end = np.repeat(starts + counts, counts) - np.arange(len(code))  # 1 = the ticker's last
    keep = np.zeros(len(code), dtype=bool)
    keep[by_ticker] = from_end <= rows
    return prices[keep]


def read_with_lookback(
    storage: Storage,
    layer: str,
    dates: list[dt.date],
    window: list[dt.date],
    first: dt.date,
    rows: int,
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """Read the market `layer`'s partitions of `window` (consecutive entries of `dates`, the
    layer's dates), widened back so that every ticker with a row on or after `first` has its
    last `rows` rows before `first` in the frame: the rows a read from the first date holds.

    A ticker short of rows in the window either listed recently (nothing earlier exists) or
    paused trading for longer than the window; only the tickers and dates of the earlier
    partitions tell them apart, so those two columns are read, for the short tickers alone.
    """
    frame = storage.read_partitions(layer, DOMAIN, days=window, columns=columns)
    if window[0] == dates[0] or frame.empty:
        return frame
    cut = pd.Timestamp(first)
    before = frame.loc[frame["date"] < cut, "ticker"].value_counts()
    after = frame.loc[frame["date"] >= cut, "ticker"].unique()
    missing = {t: rows - before.get(t, 0) for t in after if before.get(t, 0) < rows}
    if not missing:
        return frame
    opens = dates.index(window[0])
    earlier = storage.read_partitions(
        layer,
        DOMAIN,
        days=dates[:opens],
        columns=["date", "ticker"],
        where=pc.field("ticker").isin(list(missing)),
    )
    if earlier.empty:  # every short ticker listed inside the window
        return frame
    earlier = earlier.sort_values("date", kind="stable")
    from_last = earlier.groupby("ticker", sort=False).cumcount(ascending=False)
    start = earlier.loc[from_last < earlier["ticker"].map(missing), "date"].min().date()
    extra = storage.read_partitions(  # only the tickers short of rows: the others have theirs
        layer,
        DOMAIN,
        days=dates[dates.index(start) : opens],
        columns=columns,
        where=pc.field("ticker").isin(list(earlier["ticker"].unique())),
    )
    return pd.concat([extra, frame], ignore_index=True)
