"""The market's raw contract: what ingest checks a delivery of daily OHLCV rows against.

Keys (date, ticker), the `market_ohlcv` suite, and the derived columns it bounds: each
ticker's daily return, its first row in a batch compared with its last accepted price.
"""

from __future__ import annotations

import bisect
import datetime as dt

import pandas as pd

from finpipe.ingest import PublishedRows, RawContract
from finpipe.market.quality import add_market_checks_columns
from finpipe.market.schema import DOMAIN, OPTIONAL_COLUMNS, normalise_market_frame, price_column
from finpipe.settings import load_settings


def accepted_prices_before(
    storage: PublishedRows, first_days: pd.Series, column: str
) -> pd.DataFrame | None:
    """Return the accepted `column` prices (ticker, date, price) a batch's first rows are
    compared with: for each ticker, its prices on the last 10 validated dates before its
    first row in the batch (`first_days`: that day, indexed by ticker).

    Ten dates are enough for a daily-return check: a ticker absent for longer simply has no
    previous price. Each ticker's own first day counts, not the batch's earliest: a batch
    that also holds an older row of another ticker must not leave this ticker unchecked.
    """
    listed = storage.partition_dates("validated", DOMAIN, end=max(first_days) - dt.timedelta(1))
    days = sorted({day for first in set(first_days) for day in _last_before(listed, first)})
    if not days:
        return None
    prior = storage.read_partitions("validated", DOMAIN, days=days)
    if column not in prior.columns:
        return None
    prior = prior[prior["ticker"].isin(first_days.index)].dropna(subset=[column])
    return prior[["ticker", "date", column]].rename(columns={column: "price"})


def _last_before(days: list[dt.date], day: dt.date, count: int = 10) -> list[dt.date]:
    """The last `count` of the sorted `days` before `day`."""
    end = bisect.bisect_left(days, day)
    return days[max(end - count, 0) : end]


def _add_market_checks(frame: pd.DataFrame, storage: PublishedRows) -> pd.DataFrame:
    # Read as the batch arrives: whether the user declared `close` already adjusted.
    adjusted = load_settings().market_close_is_adjusted
    keyed = frame.dropna(subset=["date", "ticker"]) if not frame.empty else frame
    if keyed.empty:
        return add_market_checks_columns(frame, None, close_is_adjusted=adjusted)
    first_days = keyed.groupby("ticker")["date"].min().dt.date
    previous = accepted_prices_before(storage, first_days, price_column(frame))
    return add_market_checks_columns(frame, previous, close_is_adjusted=adjusted)


MARKET_CONTRACT = RawContract(
    domain=DOMAIN,
    suite="market_ohlcv",
    key_columns=("date", "ticker"),
    date_column="date",
    normalise=normalise_market_frame,
    add_check_columns=_add_market_checks,
    optional_columns=dict.fromkeys(OPTIONAL_COLUMNS, "float64"),
)


def active_contract() -> RawContract:
    """Return the market's ingest contract (one for every setting)."""
    return MARKET_CONTRACT
