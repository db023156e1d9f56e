"""Vendor corrections of loans and of transactions (`finpipe ingest --correction`), whose keys
are not what a correction restates: a loan's versions carry their delivery day, and a
transaction's amount is part of its key. Real ingest (GX) into a temporary store."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finpipe.credit.config import load_loan_book, parse_loan_book
from finpipe.credit.contract import credit_contract, restate_loans
from finpipe.credit.features import (
    LABEL,
    build_credit_features,
    loans_as_known,
    update_credit_features,
)
from finpipe.credit.schema import normalise_credit_frame
from finpipe.customers.features import update_customer_features
from finpipe.customers.synthetic import (
    CustomersSyntheticConfig,
    generate_customer_transactions,
    write_vendor_files,
)
from finpipe.domains import get_domain
from finpipe.errors import InputFileError
from finpipe.ingest import BATCH_COLUMN, CheckedTogether, check_file, ingest_file
from finpipe.storage import Storage

BOOK = parse_loan_book(
    {
        "name": "tiny",
        "columns": {"id": "loan_id", "date": "applied", "label": "status"},
        "label": {"default": ["bad"], "non_default": ["good"]},
        "numeric": {"income": {"min": 0}},
        "grades": [{"grade": "A", "max_pd": 1.0}],
    }
)
D1, D2 = dt.date(2024, 1, 2), dt.date(2024, 1, 3)  # application days
NIGHT = dt.date(2024, 1, 5)  # the applications are delivered, L1 and L2 with no outcome yet
LATER = dt.date(2024, 2, 20)  # L1's outcome is delivered
FIXED = dt.date(2024, 3, 1)  # the lender's correction


def _loans(folder, name: str, *loans: tuple[str, dt.date, str, float]):
    """Write a delivery of (loan id, application day, status, income) rows; return its path."""
    path = folder / name
    pd.DataFrame(
        {
            "loan_id": [loan for loan, _, _, _ in loans],
            "applied": [day.isoformat() for _, day, _, _ in loans],
            "status": [status for _, _, status, _ in loans],
            "income": [income for _, _, _, income in loans],
        }
    ).to_csv(path, index=False)
    return path


def _versions(storage: Storage, loan: str) -> pd.DataFrame:
    rows = storage.read_partitions("validated", "credit")
    return rows[rows["loan_id"] == loan].sort_values("delivered_on").reset_index(drop=True)


@pytest.fixture
def loan_store(tmp_path):
    return published_loans(tmp_path)


def published_loans(tmp_path) -> tuple[Storage, object]:
    """L1 and L2 applied on D1, L3 on D2, delivered on NIGHT (L3 with its outcome); L1's
    outcome delivered LATER (a second version of L1): the store and the contract."""
    storage = Storage(tmp_path / "home")
    contract = credit_contract(BOOK)
    night = _loans(
        tmp_path,
        "night.csv",
        ("L1", D1, "", 1000.0),
        ("L2", D1, "", 2000.0),
        ("L3", D2, "good", 3000.0),
    )
    later = _loans(tmp_path, "later.csv", ("L1", D1, "good", 1000.0))
    assert ingest_file(storage, contract, night, as_of=NIGHT).status == "validated"
    assert ingest_file(storage, contract, later, as_of=LATER).status == "validated"
    return storage, contract


def test_a_loan_correction_restates_every_version_and_dates_a_changed_outcome_by_its_delivery(
    loan_store, tmp_path
):
    storage, contract = loan_store
    before = storage.read_partitions("validated", "credit")
    # The lender restates L1's income and outcome (it defaulted after all) and L3's income.
    fix = _loans(tmp_path, "fix.csv", ("L1", D1, "bad", 1500.0), ("L3", D2, "good", 3500.0))
    outcome = ingest_file(storage, contract, fix, as_of=FIXED, correction=True)
    assert outcome.status == "validated"
    assert "a correction: 3 published rows of" in outcome.message

    l1 = _versions(storage, "L1")
    # Every version takes the corrected income and keeps its delivery day and outcome; the
    # new outcome is a version of its own, delivered on the correction's day.
    assert l1["income"].tolist() == [1500.0, 1500.0, 1500.0]
    assert [d.date() for d in l1["delivered_on"]] == [NIGHT, LATER, FIXED]
    assert l1["status"].tolist()[1:] == ["good", "bad"]
    assert pd.isna(l1["status"].iloc[0])
    l3 = _versions(storage, "L3")  # the same outcome again is no new version
    assert l3["income"].tolist() == [3500.0] and l3["delivered_on"].iloc[0].date() == NIGHT
    assert _versions(storage, "L2").equals(before[before["loan_id"] == "L2"].reset_index(drop=True))
    after = storage.read_partitions("validated", "credit")
    assert not after.duplicated(list(contract.key_columns)).any()

    # Point in time: before the correction was delivered, L1 was known as a good loan.
    update_credit_features(storage, FIXED, book=BOOK)
    features = storage.read_partitions("features", "credit")
    known_then = loans_as_known(features, "loan_id", LATER).set_index("loan_id")
    known_now = loans_as_known(features, "loan_id", FIXED).set_index("loan_id")
    assert known_then.loc["L1", LABEL] == 0.0 and known_now.loc["L1", LABEL] == 1.0
    assert known_then.loc["L1", "income"] == 1500.0  # the record itself is restated
    # The features the incremental update wrote equal a rebuild from scratch.
    update_credit_features(storage, FIXED, book=BOOK, rebuild=True)
    pd.testing.assert_frame_equal(features, storage.read_partitions("features", "credit"))

    # The replaced versions are kept as they were published.
    kept = pd.read_parquet(
        storage.local_path(f"state/credit/superseded/{outcome.batch_id}.parquet")
    )
    expected = before[before["loan_id"].isin(["L1", "L3"])]
    order = ["loan_id", "delivered_on"]
    pd.testing.assert_frame_equal(
        kept.sort_values(order).reset_index(drop=True),
        expected.sort_values(order).reset_index(drop=True),
    )


def test_loan_corrections_checked_together_foresee_the_versions_ingest_then_keeps(
    loan_store, tmp_path
):
    """Two corrections of the same loan in one dry run: the second restates the versions the
    first left (its outcome version included), as ingest does when it loads them in order."""
    storage, contract = loan_store
    first = _loans(tmp_path, "first.csv", ("L1", D1, "bad", 1500.0))
    second = _loans(tmp_path, "second.csv", ("L1", D1, "bad", 1700.0), ("L2", D1, "", 2100.0))
    together = CheckedTogether()
    foreseen = [
        check_file(storage, contract, path, as_of=FIXED, correction=True, together=together)
        for path in (first, second)
    ]
    layer = together.published(storage, contract)
    dates = layer.partition_dates("validated", "credit")
    expected = layer.read_partitions("validated", "credit", days=dates)
    done = [
        ingest_file(storage, contract, path, as_of=FIXED, correction=True)
        for path in (first, second)
    ]
    # The second replaces L1's three versions (the first's outcome version among them) and L2.
    assert [o.corrected_rows for o in foreseen] == [o.corrected_rows for o in done] == [2, 4]
    assert [o.rows for o in foreseen] == [o.rows for o in done]
    order = ["loan_id", "delivered_on"]
    pd.testing.assert_frame_equal(
        storage.read_partitions("validated", "credit", days=dates)
        .sort_values(order)
        .reset_index(drop=True),
        expected.sort_values(order).reset_index(drop=True),
    )
    assert _versions(storage, "L1")["income"].tolist() == [1700.0] * 3


def test_a_corrected_loan_makes_every_later_credit_date_redone_not_only_its_own(
    loan_store, tmp_path
):
    """A credit date scores the loans still open then, applied on earlier days too: its
    completion record holds a fingerprint of the corrections of rows up to it, so a backfill
    redoes it after a correction of an earlier day's loan (a market date's record holds its own
    partitions only: its lookback is in its features). A loan's outcome delivered later does
    not change what an earlier date scored, and is not called stale."""
    from finpipe.date_runs import is_done, stale_scored_dates

    storage, contract = loan_store
    steps = _scored(storage, D1, D2)
    # L2's outcome arrives (an ordinary delivery): a new version in D1's partition.
    outcome = _loans(tmp_path, "outcome.csv", ("L2", D1, "bad", 2000.0))
    assert ingest_file(storage, contract, outcome, as_of=FIXED).status == "validated"
    update_credit_features(storage, FIXED, book=BOOK)
    assert stale_scored_dates(storage, "credit", [D1]) == ([], [])
    d2 = {
        layer: storage.fingerprint(storage.partition_key(layer, "credit", D2))
        for layer in ("validated", "features")
    }
    fix = _loans(tmp_path, "fix.csv", ("L1", D1, "good", 1500.0))  # applied on D1
    ingest_file(storage, contract, fix, as_of=FIXED, correction=True)
    update_credit_features(storage, FIXED, book=BOOK)
    # D2's own partitions are as they were; what it scores from is not.
    assert {
        layer: storage.fingerprint(storage.partition_key(layer, "credit", D2))
        for layer in ("validated", "features")
    } == d2
    assert not is_done(storage, "credit", D1, steps)
    assert not is_done(storage, "credit", D2, steps)
    # The nightly names both as stale though only D1's features were rebuilt, and so it does
    # when its update also wrote a date after D2 (tonight's, not scored yet).
    assert stale_scored_dates(storage, "credit", [D1]) == ([D1, D2], [])
    assert stale_scored_dates(storage, "credit", [D1, dt.date(2024, 1, 4)]) == ([D1, D2], [])


def _scored(storage: Storage, *days: dt.date) -> list[str]:
    """Build the features and record `days` as completed and scored (predictions published);
    return the steps recorded before scoring."""
    from finpipe.date_runs import completion_key, is_done, process_date, read_completion
    from tests.conftest import finpipe_home

    update_credit_features(storage, FIXED, book=BOOK)
    steps = ["validate", "features"]
    with finpipe_home(storage.root) as settings:
        for day in days:
            assert process_date(storage, settings, "credit", day, steps).status == "completed"
    for day in days:  # as if scored too: predictions published, the record saying so
        assert is_done(storage, "credit", day, steps)
        record = read_completion(storage, "credit", day)
        record["steps"].append("score")
        storage.write_json(completion_key(storage, "credit", day), record)
        storage.write_partition("predictions", "credit", day, pd.DataFrame({"id": ["L1"]}))
    return steps


def test_credit_predictions_scored_before_the_features_were_redefined_are_stale(loan_store):
    """Credit names a date stale for a correction only (a later outcome does not change what it
    scored), but features rebuilt under changed settings change what every date scores: after
    such a rebuild, a date whose own features changed is named too."""
    from finpipe.date_runs import stale_predictions

    storage, _ = loan_store
    _scored(storage, D1, D2)
    flipped = parse_loan_book(  # the lender's status codes read the other way round
        {
            "name": "tiny",
            "columns": {"id": "loan_id", "date": "applied", "label": "status"},
            "label": {"default": ["good"], "non_default": ["bad"]},
            "numeric": {"income": {"min": 0}},
            "grades": [{"grade": "A", "max_pd": 1.0}],
        }
    )
    rebuilt = update_credit_features(storage, FIXED, book=flipped, rebuild=True).to_dict()
    assert stale_predictions(storage, "credit", rebuilt) is None  # no correction: not named
    rebuilt["rebuilt_because"] = "default_values: ['bad'] -> ['good']"
    stale = stale_predictions(storage, "credit", rebuilt)
    assert stale is not None and stale["dates"] == [D1.isoformat(), D2.isoformat()]


def test_a_loan_correction_cut_short_ends_as_an_unbroken_one(
    loan_store, tmp_path, monkeypatch, disk_full_after_one_partition
):
    """L1 (applied D1) and L3 (D2) corrected in one file; D1's partition written, then a
    failure: the re-run restates from the first copy of the replaced versions, not from the
    partition it already rewrote, and ends where an unbroken correction ends."""
    storage, contract = loan_store
    fix = _loans(tmp_path, "fix.csv", ("L1", D1, "bad", 1500.0), ("L3", D2, "good", 3500.0))
    unbroken = Storage(tmp_path / "unbroken")
    for name in ("night", "later"):
        day = NIGHT if name == "night" else LATER
        ingest_file(unbroken, contract, tmp_path / f"{name}.csv", as_of=day)
    ingest_file(unbroken, contract, fix, as_of=FIXED, correction=True)

    written = disk_full_after_one_partition()
    with pytest.raises(OSError, match="disk full"):
        ingest_file(storage, contract, fix, as_of=FIXED, correction=True)
    monkeypatch.undo()
    assert written == [D1]
    outcome = ingest_file(storage, contract, fix, as_of=FIXED, correction=True)
    assert outcome.status == "validated" and "3 published rows" in outcome.message
    pd.testing.assert_frame_equal(
        storage.read_partitions("validated", "credit"),
        unbroken.read_partitions("validated", "credit"),
    )


def test_restate_loans_adds_new_loans_and_replaces_a_version_of_the_same_day():
    delivered = normalise_credit_frame(
        pd.DataFrame(
            {"loan_id": ["L1"], "applied": [D1.isoformat()], "status": [""], "income": ["10"]}
        ),
        book=BOOK,
        as_of=NIGHT,
    )
    fix = normalise_credit_frame(
        pd.DataFrame(
            {
                "loan_id": ["L1", "L9"],
                "applied": [D1.isoformat(), D2.isoformat()],
                "status": ["", "good"],
                "income": ["12", "90"],
            }
        ),
        book=BOOK,
        as_of=NIGHT,  # corrected on the day it was delivered
    )
    rows = restate_loans(delivered, fix, book=BOOK)
    assert rows["loan_id"].tolist() == ["L1", "L9"]
    assert rows["income"].tolist() == [12.0, 90.0]
    assert (rows["delivered_on"] == pd.Timestamp(NIGHT)).all()
    assert restate_loans(delivered.iloc[:0], fix, book=BOOK) is fix


_STATUS = st.sampled_from(["", "good", "bad"])
_LOAN = st.tuples(
    st.sampled_from([D1, D2]),  # applied
    st.lists(st.tuples(st.integers(0, 40), _STATUS), min_size=1, max_size=3),  # deliveries
    st.one_of(st.none(), st.tuples(_STATUS, st.integers(1, 9))),  # corrected (status, income)
)


@settings(max_examples=25, deadline=None)
@given(loans=st.lists(_LOAN, min_size=1, max_size=4), fixed_after=st.integers(1, 10))
def test_a_loan_correction_changes_no_outcome_known_before_it_and_restates_every_record(
    loans, fixed_after
):
    """Any book of loans with any versions, any correction of some of them delivered after
    them: at every day before the correction each loan is known with the outcome it had; from
    its day on, a corrected loan has the corrected outcome (its latest one when the correction
    has none); and at every day its attributes are the corrected ones."""
    versions, fixes = [], []
    for number, (applied, deliveries, fix) in enumerate(loans):
        loan = f"L{number}"
        for offset, status in deliveries:
            on = NIGHT + dt.timedelta(days=offset)
            versions.append(_frame(loan, applied, status, 100 + number, on))
        if fix is not None:
            fixes.append((loan, applied, *fix))
    book = pd.concat(versions, ignore_index=True)
    book = book.drop_duplicates(["date", "loan_id", "delivered_on"], keep="last")
    fixed_on = book["delivered_on"].max().date() + dt.timedelta(days=fixed_after)
    if fixes:
        corrected = pd.concat([_frame(*fix[:3], fix[3], fixed_on) for fix in fixes])
    else:
        corrected = _frame("L0", D1, "", 1, fixed_on).iloc[:0]
    named = book["loan_id"].isin(corrected["loan_id"])
    published = pd.concat(
        [book[~named], restate_loans(book[named], corrected, book=BOOK)], ignore_index=True
    )
    assert not published.duplicated(["date", "loan_id", "delivered_on"]).any()

    before, after = build_credit_features(book, BOOK), build_credit_features(published, BOOK)
    for day in sorted({*book["delivered_on"].dt.date, fixed_on - dt.timedelta(days=1)}):
        pd.testing.assert_series_equal(
            _known(after, day)[LABEL], _known(before, day)[LABEL], check_names=False
        )
    now = _known(after, fixed_on)
    earlier = _known(before, fixed_on)
    for loan, _, status, income in fixes:
        expected = {"good": 0.0, "bad": 1.0}.get(status, earlier.loc[loan, LABEL])
        assert now.loc[loan, LABEL] == expected or (
            pd.isna(expected) and pd.isna(now.loc[loan, LABEL])
        )
        assert now.loc[loan, "income"] == income
        assert _known(after, NIGHT).loc[loan, "income"] == income


def _frame(loan: str, applied: dt.date, status: str, income: float, on: dt.date) -> pd.DataFrame:
    """One delivered row of `loan`, validated as delivered on `on`."""
    raw = pd.DataFrame(
        {
            "loan_id": [loan],
            "applied": [applied.isoformat()],
            "status": [status],
            "income": [str(income)],
        }
    )
    return normalise_credit_frame(raw, book=BOOK, as_of=on)


def _known(features: pd.DataFrame, day: dt.date) -> pd.DataFrame:
    return loans_as_known(features, "loan_id", day).set_index("loan_id")


def test_a_book_without_dates_or_ids_refuses_a_correction_before_it_lands(tmp_path):
    storage = Storage(tmp_path / "home")
    german = credit_contract(load_loan_book("germancredit"))
    path = tmp_path / "german_fix.csv"
    path.write_text("anything\n1\n")
    with pytest.raises(InputFileError, match="not loaded as a correction: the loan book"):
        ingest_file(storage, german, path, as_of=NIGHT, correction=True)
    assert not storage.exists("landing")


# -- transactions ----------------------------------------------------------------------------
@pytest.fixture
def delivered(tmp_path):
    """A store with a customers history file and two daily files published; the files."""
    log = generate_customer_transactions(CustomersSyntheticConfig(customers=40, days=90, seed=2))
    files = write_vendor_files(log.transactions, tmp_path / "drop", daily_files=2)
    storage = Storage(tmp_path / "home")
    for path in files:
        assert _ingest(storage, path).status == "validated"
    return storage, files


@pytest.fixture
def transactions(delivered):
    """The store of `delivered`; the last file's rows."""
    storage, files = delivered
    return storage, pd.read_csv(files[-1])


def _ingest(storage, path, **options):
    return ingest_file(
        storage, get_domain("customers").contract, path, as_of="2030-01-01", **options
    )


def test_a_restated_amount_replaces_its_transaction_instead_of_adding_one(transactions, tmp_path):
    storage, last = transactions
    before = storage.read_partitions("validated", "customers")
    day = pd.Timestamp(pd.to_datetime(last["Transaction Time"]).dt.normalize().iloc[0])
    update_customer_features(storage, day.date(), active_days=365)
    fixed = last.head(1).assign(Amount=last["Amount"].head(1) * 10)
    path = tmp_path / "restated.csv"
    fixed.to_csv(path, index=False)
    # As an ordinary delivery the new amount is a new key: it would be a second transaction.
    outcome = _ingest(storage, path, correction=True)
    assert outcome.status == "validated" and "a correction: 1 published row of" in outcome.message

    after = storage.read_partitions("validated", "customers")
    assert len(after) == len(before)
    customer = fixed["Customer ID"].iloc[0]
    at = pd.Timestamp(fixed["Transaction Time"].iloc[0])
    mine = after[(after["customer_id"] == customer) & (after["timestamp"] == at)]
    assert mine["amount"].tolist() == pytest.approx([fixed["Amount"].iloc[0]])
    assert mine[BATCH_COLUMN].tolist() == [outcome.batch_id]
    untouched = (after["customer_id"] != customer) | (after["timestamp"] != at)
    pd.testing.assert_frame_equal(
        after[untouched].reset_index(drop=True),
        before[(before["customer_id"] != customer) | (before["timestamp"] != at)].reset_index(
            drop=True
        ),
    )
    # The day's snapshot is rebuilt from the corrected log: the same as a rebuild from scratch.
    update = update_customer_features(storage, day.date(), active_days=365)
    assert update.dates_written == [day.date().isoformat()]
    incremental = storage.read_partition("features", "customers", day.date())
    update_customer_features(storage, day.date(), active_days=365, rebuild=True)
    pd.testing.assert_frame_equal(
        incremental, storage.read_partition("features", "customers", day.date())
    )


def test_a_corrected_transaction_rebuilds_every_later_snapshot_and_none_before_it(
    delivered, tmp_path
):
    """A snapshot reads the whole history up to its day, so a correction of day d makes every
    snapshot from d on stale, not only the night's: each is rebuilt (and the predictions scored
    from it are then named stale, as for market), the ones before d are not."""
    storage, files = delivered
    days = storage.partition_dates("validated", "customers")[-3:]
    for day in days:  # one snapshot a night
        built = update_customer_features(storage, day, active_days=365)
        assert built.dates_written == [day.isoformat()]
    assert update_customer_features(storage, days[-1], active_days=365).dates_written == []
    before = {day: storage.read_partition("features", "customers", day) for day in days}

    restated = pd.read_csv(files[-2]).head(1)  # a purchase of the day before the last
    assert pd.Timestamp(restated["Transaction Time"].iloc[0]).date() == days[1]
    path = tmp_path / "restated.csv"
    restated.assign(Amount=restated["Amount"] * 10).to_csv(path, index=False)
    assert _ingest(storage, path, correction=True).status == "validated"

    update = update_customer_features(storage, days[-1], active_days=365)
    assert update.dates_written == [day.isoformat() for day in days[1:]]
    incremental = {day: storage.read_partition("features", "customers", day) for day in days}
    pd.testing.assert_frame_equal(incremental[days[0]], before[days[0]])
    for day in days[1:]:
        now, then = incremental[day], before[day]
        changed = ~((now == then) | (now.isna() & then.isna())).all(axis=1)
        assert now.loc[changed, "customer_id"].tolist() == [restated["Customer ID"].iloc[0]]
    update_customer_features(storage, days[-1], active_days=365, rebuild=True)
    for day in days:  # the same as a rebuild from scratch
        pd.testing.assert_frame_equal(
            incremental[day], storage.read_partition("features", "customers", day)
        )
    assert update_customer_features(storage, days[-1], active_days=365).dates_written == []


def test_a_correction_restates_all_of_a_customers_transactions_at_its_time_stamp(
    transactions, tmp_path
):
    """One published purchase restated as two (the vendor had merged them): both replace it."""
    storage, last = transactions
    before = storage.read_partitions("validated", "customers")
    first = last.head(1)
    split = pd.concat([first.assign(Amount=1.25), first.assign(Amount=2.5)], ignore_index=True)
    path = tmp_path / "split.csv"
    split.to_csv(path, index=False)
    assert _ingest(storage, path, correction=True).status == "validated"
    after = storage.read_partitions("validated", "customers")
    assert len(after) == len(before) + 1
    at = pd.Timestamp(first["Transaction Time"].iloc[0])
    mine = after[
        (after["customer_id"] == first["Customer ID"].iloc[0]) & (after["timestamp"] == at)
    ]
    assert sorted(mine["amount"]) == [1.25, 2.5]
