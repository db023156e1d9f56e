"""The raw credit contract: a delivered loan-book file normalised to typed columns, and the Great
Expectations suite built from the loan-book config (plus the user's own rules).

Normalised columns: `date` (the configured date column, renamed; or the ingest day for
cross-sectional data), the id column, the label column (text; empty = an application to score),
numeric columns as float64 and categorical columns as text, in config order, then
`delivered_on`, the ingest's as-of day (a later delivery of the same date and id is a new
version of that loan: its outcome arriving). Columns the config does not name are dropped.
"""

from __future__ import annotations

import datetime as dt
import difflib
import importlib.resources

import pandas as pd

from finpipe.credit.config import DATE_COLUMN, DELIVERED_ON, LoanBookConfig
from finpipe.delivered_days import delivered_text, missing_marked, read_days, unparsed_text
from finpipe.errors import ConfigError, InputFileError
from finpipe.settings import load_settings
from finpipe.storage import Storage
from finpipe.validation import expectation_columns, load_suite_spec, rule_id

DOMAIN = "credit"
PARSE_ERRORS = "parse_errors"  # frame.attrs key that finpipe.ingest reports as `parseable_values`


def normalise_credit_frame(
    raw: pd.DataFrame,
    *,
    book: LoanBookConfig,
    source: str = "<frame>",
    as_of: dt.date | None = None,
) -> pd.DataFrame:
    """Return `raw` (all text, as read) with the config's columns typed, ready for validation.

    Text that is not a number (in a numeric column) or not a date (in the date column) becomes
    missing, and the raw text is kept in `frame.attrs["parse_errors"]`, which ingest turns into
    the failed rule `parseable_values` with the row and the text.

    Raises InputFileError when a column the config names is absent, with the closest column name
    found, so a typo in either the file or the config is easy to spot.
    """
    frame = raw.rename(columns=lambda c: str(c).strip())
    if frame.columns.duplicated().any():
        dupes = sorted(set(frame.columns[frame.columns.duplicated()]))
        raise InputFileError(f"{source}: columns {dupes} appear twice")
    _require_columns(frame, book, source)
    columns = book.columns
    out = pd.DataFrame(index=frame.index)
    problems: dict[str, pd.Series] = {}
    day = as_of or dt.datetime.now(dt.UTC).date()
    delivered = pd.Series(pd.Timestamp(day), index=frame.index).astype("datetime64[ns]")
    if columns.date is None:
        out[DATE_COLUMN] = delivered
    else:
        out[DATE_COLUMN], problems[columns.date] = _parse_dates(frame[columns.date])
    if columns.id_from_row_number:
        out[columns.id] = pd.array([str(i) for i in range(1, len(frame) + 1)], dtype="string")
    else:
        out[columns.id] = delivered_text(frame[columns.id])
    out[columns.label] = delivered_text(
        missing_marked(frame[columns.label])
    )  # `NA`: no outcome yet
    for column in book.numeric_columns:
        out[column] = pd.to_numeric(delivered_text(frame[column]), errors="coerce").astype(
            "float64"
        )
        problems[column] = unparsed_text(frame[column], out[column])
    for column in book.categorical_columns:
        out[column] = delivered_text(frame[column])
    out[DELIVERED_ON] = delivered
    out = out.reset_index(drop=True)
    out.attrs[PARSE_ERRORS] = {
        column: bad.reset_index(drop=True) for column, bad in problems.items() if bad.notna().any()
    }
    return out


def _require_columns(frame: pd.DataFrame, book: LoanBookConfig, source: str) -> None:
    absent = [c for c in book.delivered_columns if c not in frame.columns]
    if not absent:
        return
    hints = []
    for column in absent:
        close = difflib.get_close_matches(column, [str(c) for c in frame.columns], n=1)
        hints.append(f"{column!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise InputFileError(
        f"{source}: column(s) {', '.join(hints)} named in the loan-book config {book.source} are "
        f"not in the file, which has {list(frame.columns)}. Fix the config's column names or "
        "deliver the missing columns."
    )


def _parse_dates(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Return (the day as written, unparsed text): an offset or zone is dropped, not
    converted, and numeric dates read in one day/month order (`finpipe.delivered_days`)."""
    parsed, problems, _ = read_days(
        delivered_text(missing_marked(values)), load_settings().date_order
    )
    return parsed, problems


# -- the suite ---------------------------------------------------------------------------------
def seen_categories(storage: Storage, book: LoanBookConfig) -> dict[str, list[str]]:
    """Return the values of each categorical column in the data accepted so far (sorted)."""
    if not book.categorical_columns or not storage.partition_dates("validated", DOMAIN):
        return {}
    try:
        accepted = storage.read_partitions("validated", DOMAIN, columns=book.categorical_columns)
    except (KeyError, ValueError) as error:  # pyarrow: a column absent from a partition
        raise ConfigError(
            f"validated/{DOMAIN} holds data without the categorical columns of "
            f"{book.source} ({error}); each loan book needs its own FINPIPE_HOME"
        ) from None
    return {
        column: sorted(str(v) for v in accepted[column].dropna().unique())
        for column in book.categorical_columns
    }


def build_credit_suite(book: LoanBookConfig, seen: dict[str, list[str]] | None = None) -> dict:
    """Return the GX suite (JSON shape of expectations/*.json) for a loan book.

    From the config: every configured column exists; id not null and unique; date not null and
    not after the as-of day; label within its configured values (empty allowed: applications);
    numeric columns within their ranges (not null when `required`); and, for categorical
    columns, values seen in data accepted before: that rule is report-only (`mostly: 0`), so an
    unseen category is listed in the report and Data Docs but does not reject the batch (the
    model scores it through its unknown bucket). Then the rules of the user's suite
    `book.extra_expectations` (default `credit_<name>` when that file exists) are added; a user
    rule with the same id as a built one (same type and columns) replaces it.

    Raises ConfigError when a user rule names a column the config does not.
    """
    columns = book.columns
    origin = f"from the loan-book config {book.source}"
    entries: list[dict] = []

    def add(kind: str, notes: str, **kwargs) -> None:
        entries.append({"type": kind, "kwargs": kwargs, "meta": {"origin": origin}, "notes": notes})

    for column in [DATE_COLUMN, columns.id, columns.label, *book.feature_columns]:
        add("expect_column_to_exist", "Configured column.", column=column)
    add("expect_table_row_count_to_be_between", "An empty delivery is an error.", min_value=1)
    add("expect_column_values_to_not_be_null", "Every row needs an id.", column=columns.id)
    add(
        "expect_column_values_to_be_unique",
        "One row per loan or application in a delivery; every copy of a repeated id is reported. "
        "A later delivery may repeat an id with its date: that is the loan's outcome arriving.",
        column=columns.id,
    )
    add(
        "expect_column_values_to_not_be_null",
        "A date that could not be parsed arrives as missing.",
        column=DATE_COLUMN,
    )
    add(
        "expect_column_values_to_be_between",
        "No row is dated after the run's as-of day.",
        column=DATE_COLUMN,
        max_value={"$PARAMETER": "as_of"},
    )
    add(
        "expect_column_values_to_be_in_set",
        f"[label]: default {book.label.default}, non_default {book.label.non_default}; empty "
        "labels are applications to score.",
        column=columns.label,
        value_set=book.label.allowed,
    )
    for column, limits in book.numeric.items():
        if limits.required:
            add("expect_column_values_to_not_be_null", "required = true", column=column)
        bounds = {
            k: v for k, v in (("min_value", limits.min), ("max_value", limits.max)) if v is not None
        }
        if bounds:
            add(
                "expect_column_values_to_be_between",
                f"[numeric] {column} range.",
                column=column,
                **bounds,
            )
    for column in book.categorical_columns:
        values = (seen or {}).get(column)
        if values:
            add(
                "expect_column_values_to_be_in_set",
                "Report-only (mostly 0): categories not seen in accepted data are listed here; "
                "the batch is accepted and the model scores them through its unknown bucket.",
                column=column,
                value_set=values,
                mostly=0.0,
            )
    for extra in _extra_entries(book):  # a user rule with the same id replaces the config's
        same = [i for i, entry in enumerate(entries) if rule_id(entry) == rule_id(extra)]
        if same:
            entries[same[0]] = extra
        else:
            entries.append(extra)
    return {
        "name": book.suite_name,
        "meta": {
            "domain": DOMAIN,
            "key_columns": [DATE_COLUMN, columns.id, DELIVERED_ON],
            "config": book.source,
            "defined_in": (
                f"the loan-book config {book.source} (or expectations/"
                f"{book.extra_expectations or book.suite_name}.json, for a rule added there)"
            ),
            "parameters": {"as_of": "the run's as-of day: no row may be dated after it."},
        },
        "notes": [
            f"Built in memory from {book.source} by finpipe.credit.schema.build_credit_suite, "
            f"plus the rules of expectations/{book.suite_name}.json when present."
        ],
        "expectations": entries,
    }


def _extra_entries(book: LoanBookConfig) -> list[dict]:
    """Return the user's rules for this book, checked against the config's columns."""
    name = book.extra_expectations or book.suite_name
    exists = (importlib.resources.files("finpipe.expectations") / f"{name}.json").is_file()
    if not exists:
        if book.extra_expectations:
            raise ConfigError(
                f"{book.source}: extra_expectations = {name!r} but expectations/{name}.json "
                "does not exist; create it or remove the key"
            )
        return []
    spec = load_suite_spec(name)
    known = {DATE_COLUMN, book.columns.id, book.columns.label, *book.feature_columns}
    for entry in spec["expectations"]:
        unknown = [c for c in expectation_columns(entry) if c not in known]
        if unknown:
            raise ConfigError(
                f"expectations/{name}.json: {rule_id(entry)} names unknown column(s) {unknown}; "
                f"the loan-book config {book.source} has columns {sorted(known)}"
            )
    return [
        {**entry, "meta": {**entry.get("meta", {}), "origin": f"expectations/{name}.json"}}
        for entry in spec["expectations"]
    ]
