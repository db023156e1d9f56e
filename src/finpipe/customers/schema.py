"""The raw customers contract: one row per transaction, normalised from a source's own columns.

Canonical columns after `normalise_transactions`:

    customer_id  string          the customer (stripped; empty text is a missing key)
    date         datetime64[ns]  the transaction day (the partition key)
    timestamp    datetime64[ns]  when it happened; the day at midnight when only a day is given
    amount       float64         in the account currency; negative = refund
    category     string          optional, when the source has one
    channel      string          optional, when the source has one

Timestamps with a time zone are converted to UTC and made tz-naive. Columns the config does not
map are dropped (the contract ignores them).

Two quirks of real transaction logs and what finpipe does with them (the CDNOW sample has both):
- $0 purchases are kept: they are purchase occasions (free items, promotions) that count in
  frequency and recency and add nothing to spend.
- Exact duplicate rows are reported by the suite (`row_fingerprint` not unique) and kept as
  separate transactions while they are at most 1% of a batch: without a transaction id two
  identical purchases on one day cannot be told from a double send, and dropping them would
  undercount real repeat purchases. Above 1% the batch is quarantined (a double export).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from finpipe.customers.config import CustomersConfig
from finpipe.delivered_days import delivered_text, unparsed_text
from finpipe.errors import InputFileError

DOMAIN = "customers"
SUITE = "customers_transactions"
# What makes a transaction the same one again: a batch repeating these values for rows another
# batch already published is rejected (overlap safety).
KEY_COLUMNS = ("date", "customer_id", "timestamp", "amount")
# What a correction restates: a customer's transactions at one time stamp (a whole day when the
# source gives days only), all replaced by the correction's rows for them. The amount is not in
# it: a restated amount is the same transaction, not a second one.
RESTATED_BY = ("date", "customer_id", "timestamp")
PARSE_ERRORS = "parse_errors"  # frame.attrs key that finpipe.ingest reports as `parseable_values`
OPTIONAL_COLUMNS = ("category", "channel")
CHECK_COLUMNS = ("disallowed_refund", "row_fingerprint")


def normalise_transactions(
    raw: pd.DataFrame, *, config: CustomersConfig, source: str = "<frame>"
) -> pd.DataFrame:
    """Return `raw` renamed to the contract's columns with canonical dtypes, ready to validate.

    Values that cannot be parsed become missing (NaT, NaN, <NA>) so the suite's not-null rules
    report them with the row. Raises InputFileError when a mapped column is absent.
    """
    mapping = config.columns.delivered()
    missing = [
        f"{column!r} (-> {field})" for field, column in mapping.items() if column not in raw.columns
    ]
    if missing:
        raise InputFileError(
            f"{source}: column(s) {', '.join(missing)} not in the file, which has "
            f"{list(map(str, raw.columns))[:12]}; fix the [columns] mapping of customers config "
            f"{config.name!r} or the delivery"
        )
    frame = pd.DataFrame(index=pd.RangeIndex(len(raw)))
    frame["customer_id"] = delivered_text(raw[mapping["customer_id"]])
    moment = _parse_times(raw[config.columns.time_column], config.parse.date_format)
    frame["date"] = moment.dt.normalize()
    frame["timestamp"] = moment
    frame["amount"] = pd.to_numeric(raw[mapping["amount"]], errors="coerce").astype("float64")
    for column in OPTIONAL_COLUMNS:
        if column in mapping:
            frame[column] = delivered_text(raw[mapping[column]])
    problems = {
        config.columns.time_column: unparsed_text(raw[config.columns.time_column], moment),
        mapping["amount"]: unparsed_text(raw[mapping["amount"]], frame["amount"]),
    }
    frame.attrs[PARSE_ERRORS] = {
        column: bad.reset_index(drop=True) for column, bad in problems.items() if bad.notna().any()
    }
    return frame


def add_transaction_checks(frame: pd.DataFrame, *, allow_refunds: bool) -> pd.DataFrame:
    """Return `frame` plus the derived columns the suite checks (drop them before storing).

    - `disallowed_refund`: the amount where it is negative and refunds are not allowed by the
      config, else missing; the suite expects it to be missing everywhere.
    - `row_fingerprint`: a 64-bit hash of the row's contract columns; equal rows share it, so
      its uniqueness rule counts exact duplicates.
    """
    checked = frame.copy()
    amount = checked["amount"] if "amount" in checked else pd.Series(np.nan, index=checked.index)
    refund = amount < 0
    checked["disallowed_refund"] = amount.where(refund & (not allow_refunds)).astype("float64")
    contract = [c for c in (*KEY_COLUMNS, *OPTIONAL_COLUMNS) if c in checked.columns]
    fingerprint = pd.util.hash_pandas_object(checked[contract], index=False)
    checked["row_fingerprint"] = fingerprint.to_numpy().view(np.int64)
    return checked


def _parse_times(values: pd.Series, date_format: str | None) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    else:
        text = values.astype("string").str.strip()
        parsed = pd.to_datetime(text, errors="coerce", utc=True, format=date_format or "ISO8601")
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed.astype("datetime64[ns]")
