"""The raw market contract: column names, dtypes and how a vendor file is normalised to them."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from finpipe.errors import InputFileError

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
    """Return the column returns are computed from: `adj_close` when delivered, else `close`.

    Unadjusted closes jump at splits; the adjusted series does not, so it is preferred.
    """
    if "adj_close" in frame.columns and frame["adj_close"].notna().any():
        return "adj_close"
    return "close"


def normalise_market_frame(raw: pd.DataFrame, *, source: str = "<frame>") -> pd.DataFrame:
    """Return `raw` with canonical column names and dtypes, ready for validation.

    - column names normalised (case, spaces, known aliases); unknown extra columns are dropped
      (documented: the contract ignores them);
    - `date` parsed to a tz-naive day (a tz-aware timestamp is converted to UTC first);
    - `ticker` stripped and upper-cased;
    - numeric columns coerced to float64; text that is not a number becomes NaN, which the
      not-null rules then report with the row.

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
    frame["date"] = _parse_dates(frame["date"])
    frame["ticker"] = frame["ticker"].astype("string").str.strip().str.upper()
    for column in NUMERIC_COLUMNS:
        if column in frame.columns:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame.reset_index(drop=True)


def _parse_dates(values: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    else:
        parsed = pd.to_datetime(values.astype("string"), errors="coerce", utc=True, format="mixed")
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed.dt.normalize().astype("datetime64[ns]")


def empty_market_frame() -> pd.DataFrame:
    """Return an empty frame with the canonical columns and dtypes."""
    return pd.DataFrame(
        {
            "date": pd.Series([], dtype="datetime64[ns]"),
            "ticker": pd.Series([], dtype="string"),
            **{c: pd.Series([], dtype=np.float64) for c in NUMERIC_COLUMNS},
        }
    )
