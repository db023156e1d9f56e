"""A loan book's raw contract: what ingest checks a delivery of loan rows against.

Keys (date, id, delivered_on), so a later delivery of a loan (its outcome) is a new version,
not a duplicate; the GX suite is built in memory from the book's config and the categories
accepted so far. A correction restates loans by (date, id): `restate_loans`.
"""

from __future__ import annotations

from functools import partial

import pandas as pd

from finpipe.credit.config import DATE_COLUMN, DELIVERED_ON, LoanBookConfig, load_loan_book
from finpipe.credit.schema import (
    DOMAIN,
    build_credit_suite,
    normalise_credit_frame,
    seen_categories,
)
from finpipe.ingest import RawContract
from finpipe.settings import Settings, load_settings
from finpipe.storage import Storage


def credit_suite(storage: Storage, *, book: LoanBookConfig) -> dict:
    """Return the book's suite, with the categories accepted so far in `storage`."""
    return build_credit_suite(book, seen_categories(storage, book))


def credit_contract(book: LoanBookConfig) -> RawContract:
    """Return the ingest contract of a loan book: keys (date, id, delivered_on), so a later
    delivery of a loan (its outcome) is a new version, not a duplicate; suite built in memory."""
    return RawContract(
        domain=DOMAIN,
        suite=book.suite_name,
        key_columns=(DATE_COLUMN, book.columns.id, DELIVERED_ON),
        date_column=DATE_COLUMN,
        normalise=partial(normalise_credit_frame, book=book),
        suite_spec=partial(credit_suite, book=book),
        normalise_takes_as_of=True,
        read_options=book.read.pandas_options(),
        correction_keys=(DATE_COLUMN, book.columns.id),
        restate=partial(restate_loans, book=book),
        refuses_corrections=_why_no_corrections(book),
    )


def restate_loans(
    replaced: pd.DataFrame, corrected: pd.DataFrame, *, book: LoanBookConfig
) -> pd.DataFrame:
    """Return the rows a correction of loans publishes, from the published versions of the
    loans it restates (`replaced`) and its own validated rows (`corrected`).

    A loan is its (date, id) and each delivery of it a version stamped `delivered_on`. A
    correction restates the loan's record: every version takes the corrected attributes and
    keeps its own delivery day and outcome, so no outcome becomes known earlier than it was
    delivered. Where the corrected outcome differs from the latest one published, the
    correction is also an outcome update, known from its own delivery day. A version delivered
    on the correction's own day is replaced by it, and a loan never published is added.
    """
    keys = [DATE_COLUMN, book.columns.id]
    label = book.columns.label
    if replaced.empty or corrected.empty:
        return corrected
    day = corrected[DELIVERED_ON].iloc[0]  # every row of a delivery: its as-of day
    versions = replaced.reindex(columns=corrected.columns)
    versions[DELIVERED_ON] = versions[DELIVERED_ON].fillna(versions[DATE_COLUMN])
    versions = versions[(versions[DELIVERED_ON] != day).to_numpy()]
    attributes = [c for c in corrected.columns if c not in (*keys, label, DELIVERED_ON)]
    restated = versions.drop(columns=attributes).merge(
        corrected[[*keys, *attributes]], on=keys, how="left"
    )[list(corrected.columns)]
    outcomes = versions[versions[label].notna().to_numpy()].sort_values(DELIVERED_ON)
    latest = outcomes.groupby(keys)[label].last()
    rows = pd.MultiIndex.from_frame(corrected[keys])
    known = latest.reindex(rows).astype("string").to_numpy(dtype=object, na_value=None)
    mine = corrected[label].astype("string").to_numpy(dtype=object, na_value=None)
    new_outcome = [m is not None and m != k for m, k in zip(mine, known, strict=True)]
    published = rows.isin(pd.MultiIndex.from_frame(versions[keys]))
    return pd.concat([restated, corrected[~published | new_outcome]], ignore_index=True)


def _why_no_corrections(book: LoanBookConfig) -> str | None:
    """Return why this book's loans cannot be corrected, or None when they can."""
    if book.columns.id_from_row_number:
        return (
            f"the loan book {book.source} numbers its rows as ids (columns.id_from_row_number), "
            "so a correction cannot name the loans it restates; deliver the book again in full"
        )
    if not book.is_dated:
        return (
            f"the loan book {book.source} has no application date (columns.date), so each "
            "delivery is its own snapshot dated by its ingest day and a correction cannot name "
            "the earlier rows it restates; deliver the snapshot again instead"
        )
    return None


def active_loan_book(settings: Settings | None = None) -> LoanBookConfig:
    """Return the loan book the settings name (FINPIPE_CREDIT_CONFIG; default the synthetic
    example)."""
    return load_loan_book((settings or load_settings()).credit_config)


def active_contract() -> RawContract:
    """Return the ingest contract of the loan book the settings name (FINPIPE_CREDIT_CONFIG)."""
    return credit_contract(active_loan_book())
