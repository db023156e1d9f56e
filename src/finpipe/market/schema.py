"""The raw market contract: column names, dtypes and how a vendor file is normalised to them."""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pandas as pd

from finpipe.delivered_days import (
    DateOrder,
    delivered_text,
    missing_marked,
    read_days,
    unparsed_text,
)
from finpipe.errors import InputFileError
from finpipe.settings import load_settings

DOMAIN = "market"
KEY_COLUMNS = ("date", "ticker")
REQUIRED_COLUMNS = ("date", "ticker", "close")
OPTIONAL_COLUMNS = ("open", "high", "low", "volume", "adj_close")
PRICE_COLUMNS = ("open", "high", "low", "close", "adj_close")
NUMERIC_COLUMNS = (*PRICE_COLUMNS, "volume")
CANONICAL_COLUMNS = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)

# Vendor spellings seen in the wild, after lower-casing and turning spaces/dashes into "_".
_ALIASES = {
    "adjclose": "adj_close",
    "adjusted_close": "adj_close",
    "adj_close_price": "adj_close",
    "symbol": "ticker",
    "timestamp": "date",
    "trade_date": "date",
    "vol": "volume",
}


def normalise_column_name(name: str) -> str:
    """Return the canonical spelling of a vendor column name (`Adj Close` -> `adj_close`)."""
    cleaned = re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")
    return _ALIASES.get(cleaned, cleaned)


def price_column(frame: pd.DataFrame) -> str:
    """Return the column returns are computed from: `adj_close` when delivered (on any row),
    else `close` (an `Adj Close` column left empty is not delivered).

    Unadjusted closes jump at splits; the adjusted series does not, so it is preferred. The
    return checks go ticker by ticker: a ticker whose adj_close is empty on some row is checked
    on its close (`finpipe.market.quality.add_market_checks_columns`).
    """
    if "adj_close" in frame.columns and frame["adj_close"].notna().any():
        return "adj_close"
    return "close"


def normalise_market_frame(
    raw: pd.DataFrame, *, source: str = "<frame>", date_order: DateOrder | None = None
) -> pd.DataFrame:
    """Return `raw` with canonical column names and dtypes, ready for validation.

    - column names normalised (case, spaces, known aliases); unknown extra columns are dropped
      (documented: the contract ignores them);
    - `date` parsed to a tz-naive day (the day as written; see `_parse_dates` on time zones),
      numeric dates in one day/month order per file (`date_order`, by default the setting
      `FINPIPE_DATE_ORDER`);
    - `ticker` stripped and upper-cased;
    - numeric columns coerced to float64; text that is not a number becomes NaN, and the raw
      text is kept in `frame.attrs["parse_errors"]` so ingest reports it with its row.

    Raises InputFileError when a required column is missing.
    """
    frame = raw.rename(columns=normalise_column_name)
    if frame.columns.duplicated().any():
        dupes = sorted(set(frame.columns[frame.columns.duplicated()]))
        raise InputFileError(f"{source}: columns {dupes} appear twice after normalising names")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise InputFileError(
            f"{source}: missing required column(s) {missing}; found {list(raw.columns)}. "
            f"The market contract needs {list(REQUIRED_COLUMNS)}."
        )
    keep = [c for c in CANONICAL_COLUMNS if c in frame.columns]
    frame = frame[keep].copy()
    problems: dict[str, pd.Series] = {}
    order = date_order or load_settings().date_order
    frame["date"], problems["date"] = _parse_dates(frame["date"], order)
    frame["ticker"], problems["ticker"] = _tickers(frame["ticker"])
    for column in NUMERIC_COLUMNS:
        if column in frame.columns:
            raw_values = frame[column]
            frame[column] = pd.to_numeric(raw_values, errors="coerce").astype("float64")
            problems[column] = unparsed_text(raw_values, frame[column])
    frame = frame.reset_index(drop=True)
    frame.attrs[PARSE_ERRORS] = {
        column: bad.reset_index(drop=True) for column, bad in problems.items() if bad.notna().any()
    }
    return frame


PARSE_ERRORS = "parse_errors"


# Characters no one types into a ticker and no screen shows (Unicode controls, format
# characters such as zero-width spaces, soft hyphens and direction marks, combining marks,
# separators other than the space): `AAPL\u200b` would be a second AAPL.
_INVISIBLE = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Mn", "Me", "Zl", "Zp"})


def _tickers(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Return (ticker stripped and upper-cased, <NA> where blank; the text of those holding
    invisible characters, reported unparsed). Each distinct value is looked at once."""
    ticker = delivered_text(values).str.upper()
    codes, names = pd.factorize(ticker)
    hidden_names = np.array([_has_invisible(str(name)) for name in names], dtype=bool)
    hidden = pd.Series(hidden_names[codes.clip(min=0)] & (codes >= 0), index=values.index)
    problems = pd.Series(pd.NA, index=values.index, dtype="string")
    problems[hidden] = [f"{ascii(text)} (invisible characters)" for text in ticker[hidden]]
    return ticker.mask(hidden), problems


def _has_invisible(name: str) -> bool:
    return any(
        unicodedata.category(character) in _INVISIBLE or character.isspace() and character != " "
        for character in name
    )


def _parse_dates(values: pd.Series, order: DateOrder) -> tuple[pd.Series, pd.Series]:
    """Return (trading day, unparsed text) for a column of dates or timestamps.

    Time-zone policy: a trading date is the calendar day *as written* by the exchange or
    vendor, so an explicit offset is dropped, not converted (converting 00:00+02:00 to UTC
    would move the bar to the previous day). A file that mixes stamps with and without an
    offset is ambiguous: the rows whose form is in the minority are reported unparsed.
    Day/month order: one per column (`finpipe.delivered_days`).
    """
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
        if getattr(parsed.dt, "tz", None) is not None:
            parsed = parsed.dt.tz_localize(None)
        return parsed.dt.normalize().astype("datetime64[ns]"), pd.Series(pd.NA, index=values.index)
    text = missing_marked(values.astype("string").str.strip())
    parsed, problems, has_offset = read_days(text, order)
    with_offset, without = int(has_offset.sum()), int((~has_offset & text.notna()).sum())
    if with_offset and without:
        minority = has_offset if with_offset <= without else (~has_offset & text.notna())
        problems = problems.where(~minority, "mixed time zones: " + text)
        parsed = parsed.where(~minority)
    return parsed, problems


def empty_market_frame() -> pd.DataFrame:
    """Return an empty frame with the canonical columns and dtypes."""
    return pd.DataFrame(
        {
            "date": pd.Series([], dtype="datetime64[ns]"),
            "ticker": pd.Series([], dtype="string"),
            **{c: pd.Series([], dtype=np.float64) for c in NUMERIC_COLUMNS},
        }
    )
