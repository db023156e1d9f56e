"""Calendar days as vendors write them: one reading per column, never a guess per row; and
what vendors write for a missing value.

A day written `08/01/2024` is 8 January in Europe and 1 August in the United States. Parsing
each value on its own (pandas' `format="mixed"`) reads `08/01/2024` month-first and
`13/01/2024` day-first in the same file, and the bars land on the wrong days without a word.
Here a column's numeric dates get one order:

- ISO dates and timestamps (`2024-01-08`, `2024-01-08T16:00:00+02:00`) are read as they are;
- `a/b/yyyy` (or `a.b.yyyy`, `a-b-yyyy`) follow `order` (`dmy`, `mdy`; the setting
  `FINPIPE_DATE_ORDER`), or, with `auto`, the order the column proves: a first number above 12
  means day-first, a second above 12 month-first. A column that proves neither (every number
  at most 12) is ambiguous, and one that proves both mixes orders: those values are reported
  unparsed, with what to do, rather than read one way or the other;
- anything else (`8 Jan 2024`, `January 8, 2024`) is read value by value: month names are not
  ambiguous.

Time zones: the day is the one *as written* (an offset or zone name after a time is dropped,
not converted: 00:30+02:00 is still that day's bar).
"""

from __future__ import annotations

import re

import pandas as pd

from finpipe.settings import DateOrder

_NUMERIC = re.compile(r"^(\d{1,2})([/.-])(\d{1,2})\2(\d{4}|\d{2})(?:[ T](.*))?$")
# An offset or zone name after a clock time: "+02:00", "-0500", "+05", "Z", " UTC", " GMT".
_ZONE = re.compile(
    r"(?<=\d\d:\d\d)(?::\d\d(?:\.\d+)?)?\s*(?:[+-]\d\d(?::?\d\d)?|[Zz]|UTC|GMT)$",
)
SET_ORDER = "deliver ISO dates (YYYY-MM-DD) or set FINPIPE_DATE_ORDER to dmy or mdy"
# A spreadsheet's or terminal's error values (Excel's #N/A, Bloomberg's #N/A N/A): never a
# value, in any column (`finpipe.ingest.read_delivery` reads them as missing).
ERROR_MARKERS = frozenset(
    {"#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "1.#IND", "1.#QNAN", "<NA>"}
)
# What vendors write for a missing number, date or label (pandas' own list). A delivery is read
# as text with only an empty field or an error value missing, so a ticker `NA` or a category
# `None` keeps its value; a number, date or label column reads these as missing.
MISSING_MARKERS = ERROR_MARKERS | {
    "-NaN", "-nan", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
}  # fmt: skip


def delivered_text(values: pd.Series) -> pd.Series:
    """Return `values` as stripped text, missing where empty or an error value (ERROR_MARKERS,
    spaces around it aside): what a text column (a ticker, an id, a category) holds."""
    text = values.astype("string").str.strip()
    return text.mask(((text == "") | text.isin(ERROR_MARKERS)).fillna(False).to_numpy())


def missing_marked(values: pd.Series) -> pd.Series:
    """Return `values` with each of MISSING_MARKERS (spaces around it aside) missing."""
    if values.dtype.kind in "biufcmM":  # a Parquet column of numbers or times
        return values
    marked = values.astype("string").str.strip().isin(MISSING_MARKERS).fillna(False)
    return values.mask(marked.to_numpy())


def strip_zone(text: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Return (`text` without a trailing offset or zone name, whether each value had one)."""
    has_zone = text.str.contains(_ZONE, na=False)
    if not has_zone.any():
        return text, has_zone
    return text.str.replace(_ZONE, "", regex=True).str.strip(), has_zone


def read_days(text: pd.Series, order: DateOrder) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Return (the day as written, the delivered text where it did not parse, whether each
    value had a zone) for stripped `text`: `strip_zone`, then `parse_days`."""
    local, has_zone = strip_zone(text)
    parsed, problems = parse_days(local, order)
    return parsed, problems.mask((problems == local).fillna(False), text), has_zone


def unparsed_text(raw: pd.Series, parsed: pd.Series) -> pd.Series:
    """Return the delivered text where a value of `raw` failed to parse into `parsed` (else
    <NA>): what ingest reports under `parseable_values`. A blank or one of MISSING_MARKERS is
    a missing value, not a failure."""
    suspects = parsed.isna().to_numpy() & raw.notna().to_numpy()
    if raw.dtype.kind in "biufM" or not suspects.any():  # numbers, or every value parsed
        return pd.Series(pd.NA, index=raw.index, dtype="string")
    text = raw.astype("string").str.strip()
    missing = ((text == "") | text.isin(MISSING_MARKERS)).fillna(False).to_numpy()
    return text.where(suspects & ~missing)


def parse_days(text: pd.Series, order: DateOrder = "auto") -> tuple[pd.Series, pd.Series]:
    """Return (the day of each value as datetime64[ns] midnight, unparsed text or <NA>).

    `text` is stripped text with <NA> for missing values and no zone suffix (`strip_zone`).
    A value that is not a date, or whose day/month order the column cannot tell, is NaT in the
    first result and its text, with the reason where it helps, in the second. Each distinct
    value is read once (a file of a million rows holds a few thousand dates).
    """
    codes, values = pd.factorize(text.mask(text == ""))
    days, problems = _parse_distinct(pd.Series(values, dtype="string"), order)
    missing = codes < 0
    taken = codes.clip(min=0)
    parsed = pd.Series(days.to_numpy()[taken], index=text.index, dtype="datetime64[ns]")
    said = pd.Series(problems.to_numpy()[taken], index=text.index, dtype="string")
    return parsed.mask(missing), said.mask(missing)


def _parse_distinct(text: pd.Series, order: DateOrder) -> tuple[pd.Series, pd.Series]:
    parsed = pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns]")
    problems = pd.Series(pd.NA, index=text.index, dtype="string")
    if text.empty:
        return parsed, problems
    # the usual case: ISO values, in one vectorised pass; the rest by their form
    parsed[:] = _naive_days(pd.to_datetime(text, format="ISO8601", errors="coerce"))
    rest = text[parsed.isna()]
    parts = rest.str.extract(_NUMERIC)
    numeric = parts[0].notna()
    other = rest[~numeric]
    if len(other):
        parsed[other.index] = _days_value_by_value(other)
    if numeric.any():
        days, why = _numeric_days(parts[numeric], order)
        parsed[days.index] = days
        problems[why.index] = why
    unparsed = parsed.isna() & problems.isna()
    problems[unparsed] = text[unparsed]
    return parsed, problems


def _numeric_days(parts: pd.DataFrame, order: DateOrder) -> tuple[pd.Series, pd.Series]:
    first, second = parts[0].astype(int), parts[2].astype(int)
    if order == "auto":
        day_first, month_first = (first > 12).any(), (second > 12).any()
        if day_first == month_first:
            text = parts[0] + parts[1] + parts[2] + parts[1] + parts[3]
            reason = (
                "mixes day-first and month-first dates"
                if day_first
                else "is ambiguous: every day and month is at most 12"
            )
            why = text + f" (the column {reason}; {SET_ORDER})"
            return pd.Series(pd.NaT, index=parts.index, dtype="datetime64[ns]"), why
        order = "dmy" if day_first else "mdy"
    day, month = (first, second) if order == "dmy" else (second, first)
    year = parts[3].astype(int)
    year = year.where(parts[3].str.len() == 4, year + 2000 - 100 * (year >= 69))  # as %y reads
    frame = pd.DataFrame({"year": year, "month": month, "day": day})
    days = pd.to_datetime(frame, errors="coerce").astype("datetime64[ns]")
    return days, pd.Series(pd.NA, index=parts.index, dtype="string")


def _days_value_by_value(text: pd.Series) -> pd.Series:
    days = [_day(value) for value in text]
    return pd.Series(days, index=text.index, dtype="datetime64[ns]")


def _day(value: str) -> pd.Timestamp | None:
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError):
        return None
    if stamp is pd.NaT:
        return None
    return stamp.tz_localize(None).normalize() if stamp.tzinfo else stamp.normalize()


def _naive_days(parsed: pd.Series) -> pd.Series:
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_localize(None)
    return parsed.dt.normalize().astype("datetime64[ns]")
