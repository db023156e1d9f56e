"""The market's raw contract: what ingest checks a delivery of daily OHLCV rows against.

Keys (date, ticker), the `market_ohlcv` suite, and the derived columns it bounds: each
ticker's daily return, its first row in a batch compared with its last accepted price.
"""

from __future__ import annotations

import datetime as dt

import pandas as pd

from finpipe.ingest import PublishedRows, RawContract
from finpipe.market.quality import add_market_checks_columns
from finpipe.market.schema import DOMAIN, normalise_market_frame, price_column
from finpipe.settings import load_settings


def last_accepted_prices(
    storage: PublishedRows, before: dt.date, column: str
) -> pd.DataFrame | None:
    """Return each ticker's last accepted `column` price before `before` (ticker, date, price).

    Looks back over the last 10 validated dates, which is enough for a daily-return check:
    a ticker absent for longer simply has no previous price.
    """
    days = storage.partition_dates("validated", DOMAIN, end=before - dt.timedelta(days=1))[-10:]
    if not days:
        return None
    prior = storage.read_partitions("validated", DOMAIN, days=days)
    if column not in prior.columns:
        return None
    prior = prior.dropna(subset=[column]).sort_values(["ticker", "date"])
    last = prior.groupby("ticker", as_index=False).tail(1)
    return last[["ticker", "date", column]].rename(columns={column: "price"})


def _add_market_checks(frame: pd.DataFrame, storage: PublishedRows) -> pd.DataFrame:
    # Read as the batch arrives: whether the user declared `close` already adjusted.
    adjusted = load_settings().market_close_is_adjusted
    if frame.empty or frame["date"].isna().all():
        return add_market_checks_columns(frame, None, close_is_adjusted=adjusted)
    previous = last_accepted_prices(storage, frame["date"].min().date(), price_column(frame))
    return add_market_checks_columns(frame, previous, close_is_adjusted=adjusted)


MARKET_CONTRACT = RawContract(
    domain=DOMAIN,
    suite="market_ohlcv",
    key_columns=("date", "ticker"),
    date_column="date",
    normalise=normalise_market_frame,
    add_check_columns=_add_market_checks,
)
