"""A loan book's raw contract: what ingest checks a delivery of loan rows against.

Keys (date, id, delivered_on), so a later delivery of a loan (its outcome) is a new version,
not a duplicate; the GX suite is built in memory from the book's config and the categories
accepted so far.
"""

from __future__ import annotations

from functools import partial

from finpipe.credit.config import DATE_COLUMN, DELIVERED_ON, LoanBookConfig
from finpipe.credit.schema import (
    DOMAIN,
    build_credit_suite,
    normalise_credit_frame,
    seen_categories,
)
from finpipe.ingest import RawContract
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
    )
