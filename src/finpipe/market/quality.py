"""Market data-quality columns: the derived figures the `market_ohlcv` suite bounds.

GX has no per-ticker lag, so the daily return a suite rule bounds is computed here and added
to the batch before validation (the market contract's `add_check_columns`); the columns are
dropped before the batch is stored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from finpipe.market.schema import price_column

MARKET_CHECK_COLUMNS = ("abs_log_return_1d", "abs_log_return_1d_unadjusted")


def add_market_checks_columns(
    batch: pd.DataFrame,
    previous_close: pd.DataFrame | None = None,
    *,
    close_is_adjusted: bool = False,
) -> pd.DataFrame:
    """Return `batch` (same rows, same order) plus the derived columns the market suite bounds.

    - `abs_log_return_1d`: |ln(p_t / p_t-1)| per ticker in date order. A ticker is checked on
      its adj_close when the batch delivers one on each of its rows, else on its close, as a
      file without adj_close is: a vendor that leaves adj_close empty for one ticker still
      has that ticker's bad ticks caught, and no ticker's series mixes the two prices. A
      ticker's first row in the batch is compared with its last accepted price before that day
      from `previous_close` (columns ticker, date, price, on the basis of
      `price_column(batch)`); it is NaN for a ticker without one, or checked on its close
      while the batch's basis is adj_close. A missing or non-positive price, or a row without
      date or ticker, gives NaN: the not-null and > 0 rules report those rows instead.
    - `abs_log_return_1d_unadjusted`: the same figure on the rows of tickers checked on their
      unadjusted close (NaN on the others), added only when there are such tickers, so the
      suite's tighter split bound applies only to them. With `close_is_adjusted` (the user
      says close is already adjusted) it is never added.

    A batch without date, ticker or close is returned unchanged: the suite reports the missing
    column. Drop MARKET_CHECK_COLUMNS before storing the batch.
    """
    if not {"date", "ticker", "close"} <= set(batch.columns):
        return batch
    basis = price_column(batch)
    keys = pd.DataFrame(
        {"ticker": batch["ticker"].astype("string"), "date": batch["date"]}
    ).set_axis(pd.RangeIndex(len(batch)))  # positions: the caller's index may repeat
    on_close = _checked_on_close(batch, basis)
    price = _prices(batch, "close").where(on_close, _prices(batch, basis))
    ordered = (
        keys.assign(price=price, on_close=on_close)
        .dropna(subset=["ticker", "date"])  # rows without a key have no place in a series
        .sort_values(["ticker", "date"], kind="stable")
    )
    previous = ordered.groupby("ticker", sort=False)["price"].shift(1)
    if previous_close is not None and len(previous_close):
        first_rows = ~ordered["ticker"].duplicated()
        if basis == "adj_close":  # previous_close holds adjusted prices: not for close tickers
            first_rows &= ~ordered["on_close"]
        previous.loc[first_rows] = _last_accepted_prices(
            ordered.loc[first_rows, ["ticker", "date"]], previous_close
        )
    both_positive = (ordered["price"] > 0) & (previous > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_return = np.log(ordered["price"] / previous).abs()
    log_return = log_return.where(both_positive).astype("float64")

    result = batch.copy()
    result["abs_log_return_1d"] = log_return.reindex(keys.index).to_numpy()
    if on_close.any() and not close_is_adjusted:
        unadjusted = result["abs_log_return_1d"].where(on_close.to_numpy())
        result["abs_log_return_1d_unadjusted"] = unadjusted
    else:
        result = result.drop(columns="abs_log_return_1d_unadjusted", errors="ignore")
    return result


def _checked_on_close(batch: pd.DataFrame, basis: str) -> pd.Series:
    """Return, per position of `batch`, whether its ticker's returns come from the unadjusted
    close: every row when the batch's `basis` (`price_column`) is close, else the rows of each
    ticker whose adj_close is empty on some row of the batch."""
    if basis == "close":
        return pd.Series(True, index=pd.RangeIndex(len(batch)))
    missing = pd.Series(batch["adj_close"].isna().to_numpy())
    ticker = batch["ticker"].astype("string").to_numpy()
    return missing.groupby(ticker, dropna=False).transform("any").astype(bool)


def _prices(batch: pd.DataFrame, column: str) -> pd.Series:
    """Return `batch[column]` as float64 (text as NaN), indexed by position."""
    values = pd.to_numeric(batch[column], errors="coerce").astype("float64")
    return values.set_axis(pd.RangeIndex(len(batch)))


def _last_accepted_prices(first_rows: pd.DataFrame, previous_close: pd.DataFrame) -> pd.Series:
    """Return, per row of `first_rows`, the ticker's last `previous_close` price strictly before
    that row's date (NaN when there is none), indexed like `first_rows`."""
    missing = {"ticker", "date", "price"} - set(previous_close.columns)
    if missing:
        raise ValueError(
            f"previous_close needs columns ticker, date, price; {sorted(missing)} missing "
            f"(got {list(previous_close.columns)})"
        )
    prior = pd.DataFrame(
        {
            "ticker": previous_close["ticker"].astype("string").str.strip().str.upper(),
            "date": pd.to_datetime(previous_close["date"]).astype("datetime64[ns]"),
            "previous_price": previous_close["price"].astype("float64"),
        }
    ).dropna(subset=["date", "previous_price"])
    left = first_rows.assign(
        row=first_rows.index, date=first_rows["date"].astype("datetime64[ns]")
    ).dropna(subset=["ticker", "date"])
    matched = pd.merge_asof(
        left.sort_values("date"),
        prior.sort_values("date"),
        on="date",
        by="ticker",
        allow_exact_matches=False,
        direction="backward",
    )
    return matched.set_index("row")["previous_price"].reindex(first_rows.index)
