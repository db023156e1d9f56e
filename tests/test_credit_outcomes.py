"""Late credit outcomes: a later delivery of a loan updates its label, point in time, and a loan
trains only once its outcome window has passed. Pure functions and Parquet in a temporary
store (no GX, Prefect or MLflow)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from finpipe.credit.config import parse_loan_book
from finpipe.credit.features import (
    LABEL,
    NothingToTrain,
    build_credit_features,
    load_training_frame,
    loans_as_known,
    nothing_to_score_reason,
    scoring_population,
    update_credit_features,
)
from finpipe.credit.schema import normalise_credit_frame
from finpipe.storage import Storage

D1, D2, D3 = dt.date(2024, 1, 2), dt.date(2024, 1, 3), dt.date(2024, 1, 4)  # application days
NIGHT = dt.date(2024, 1, 5)  # the applications are delivered
LATER = dt.date(2024, 2, 20)  # their outcomes are delivered


def _book(window: int = 0):
    return parse_loan_book(
        {
            "name": "tiny",
            "columns": {"id": "loan_id", "date": "applied", "label": "status"},
            "label": {"default": ["bad"], "non_default": ["good"], "outcome_window_days": window},
            "numeric": {"x": {}},
            "grades": [{"grade": "A", "max_pd": 1.0}],
        }
    )


def _rows(*loans: tuple[str, dt.date, str]) -> pd.DataFrame:
    """A delivery as read from CSV (text): (loan id, application day, status) per row."""
    return pd.DataFrame(
        {
            "loan_id": [loan for loan, _, _ in loans],
            "applied": [day.isoformat() for _, day, _ in loans],
            "status": [status for _, _, status in loans],
            "x": [str(i) for i in range(len(loans))],
        }
    )


def _deliver(storage: Storage, book, raw: pd.DataFrame, on: dt.date) -> None:
    """Publish a delivery into validated/ the way ingest merges it into date partitions."""
    frame = normalise_credit_frame(raw, book=book, as_of=on)
    for stamp, rows in frame.groupby("date"):
        day = pd.Timestamp(stamp).date()
        if day in storage.partition_dates("validated", "credit"):
            rows = pd.concat([storage.read_partition("validated", "credit", day), rows])
        storage.write_partition("validated", "credit", day, rows)
    update_credit_features(storage, on, book=book)


APPLICATIONS = _rows(("L1", D1, ""), ("L2", D1, "good"), ("L3", D2, ""), ("L4", D3, ""))
OUTCOMES = _rows(("L1", D1, "bad"), ("L3", D2, "good"))


@pytest.fixture
def store(tmp_path) -> Storage:
    """Applications delivered on NIGHT, then the outcomes of L1 and L3 delivered LATER."""
    storage = Storage(tmp_path)
    book = _book()
    _deliver(storage, book, APPLICATIONS, NIGHT)
    _deliver(storage, book, OUTCOMES, LATER)
    return storage


def _labels(frame: pd.DataFrame) -> dict[str, float]:
    return dict(zip(frame["loan_id"], frame[LABEL], strict=True))


def test_a_late_outcome_updates_the_label_and_adds_no_duplicate_loan(store):
    book = _book()
    trained = load_training_frame(store, book, LATER)
    assert _labels(trained) == {"L1": 1.0, "L2": 0.0, "L3": 0.0}
    assert not trained.duplicated(["date", "loan_id"]).any()
    # Stored: every delivery of L1 as it came (a version each), not a rejected duplicate.
    validated = store.read_partition("validated", "credit", D1)
    stored = zip(validated["loan_id"], validated["delivered_on"].dt.date, strict=True)
    assert sorted(stored) == [
        ("L1", NIGHT),
        ("L1", LATER),
        ("L2", NIGHT),
    ]
    features = store.read_partition("features", "credit", D1)
    marked = zip(features["loan_id"], features["outcome_update"], strict=True)
    assert sorted(marked) == [("L1", False), ("L1", True), ("L2", False)]
    # The outcome's delivery day is recorded on the row that trains.
    l1 = trained[trained["loan_id"] == "L1"].iloc[0]
    assert l1["delivered_on"].date() == LATER and l1["date"].date() == D1


def test_redelivering_the_same_outcomes_adds_no_feature_rows(store):
    book = _book()
    before = store.read_partitions("features", "credit")
    again = _rows(("L1", D1, "bad"), ("L2", D1, "good"), ("L3", D2, ""))  # no news at all
    _deliver(store, book, again, LATER + dt.timedelta(days=30))
    after = store.read_partitions("features", "credit")
    pd.testing.assert_frame_equal(before, after)
    assert len(store.read_partitions("validated", "credit")) == len(APPLICATIONS) + 2 + 3


def test_an_outcome_delivered_after_t_is_not_used_at_t(store):
    book = _book()
    eve = LATER - dt.timedelta(days=1)
    assert _labels(load_training_frame(store, book, eve)) == {"L2": 0.0}
    assert sorted(scoring_population(store, book, eve)["loan_id"]) == ["L1", "L3", "L4"]
    assert sorted(scoring_population(store, book, LATER)["loan_id"]) == ["L4"]


def test_later_deliveries_change_nothing_known_earlier(tmp_path):
    """The training frame and population at t are the same before and after outcomes arrive."""
    book = _book()
    storage = Storage(tmp_path)
    _deliver(storage, book, APPLICATIONS, NIGHT)
    frame, population = (
        load_training_frame(storage, book, NIGHT),
        scoring_population(storage, book, NIGHT),
    )
    _deliver(storage, book, OUTCOMES, LATER)
    _deliver(storage, book, _rows(("L1", D1, "good")), LATER + dt.timedelta(days=1))
    pd.testing.assert_frame_equal(load_training_frame(storage, book, NIGHT), frame)
    pd.testing.assert_frame_equal(scoring_population(storage, book, NIGHT), population)
    # ... and the latest delivered outcome wins from its day on (a correction).
    corrected = load_training_frame(storage, book, LATER + dt.timedelta(days=1))
    assert _labels(corrected)["L1"] == 0.0


def test_a_loan_inside_its_outcome_window_trains_only_once_matured(store):
    book = _book(window=30)
    inside = D2 + dt.timedelta(days=29)  # L2 (D1) has matured, L3 (D2) not yet
    assert _labels(load_training_frame(store, book, inside)) == {"L2": 0.0}
    later = D2 + dt.timedelta(days=30)  # L3's window ends; its outcome is known by LATER only
    assert _labels(load_training_frame(store, book, later)) == {"L2": 0.0}
    assert _labels(load_training_frame(store, book, LATER)) == {"L1": 1.0, "L2": 0.0, "L3": 0.0}
    # An early outcome waits for its window too: L4 defaults 5 days in, trains 30 days in.
    _deliver(store, book, _rows(("L4", D3, "bad")), D3 + dt.timedelta(days=5))
    assert "L4" not in _labels(load_training_frame(store, book, D3 + dt.timedelta(days=29)))
    assert _labels(load_training_frame(store, book, D3 + dt.timedelta(days=30)))["L4"] == 1.0


def test_nothing_matured_says_when_the_first_loan_will(store):
    with pytest.raises(
        NothingToTrain, match=r"none is 90 days past .* first matures on 2024-04-01"
    ):
        load_training_frame(store, _book(window=90), LATER)
    fresh = Storage(store.root / "fresh")
    _deliver(fresh, _book(), _rows(("L9", D1, "")), NIGHT)
    with pytest.raises(NothingToTrain, match="none of the 1 loans up to that day has a known"):
        load_training_frame(fresh, _book(), NIGHT)


def test_an_empty_population_says_why(store):
    book = _book()
    _deliver(store, book, _rows(("L4", D3, "good")), LATER)  # L4's outcome: nothing left open
    assert scoring_population(store, book, LATER).empty
    assert nothing_to_score_reason(store, book, LATER) == (
        "nothing to score on 2024-02-20: no new applications dated that day, and every one of "
        "the 4 loans up to it has its outcome"
    )
    assert "1 new applications dated that day" in nothing_to_score_reason(store, book, D3)


def test_a_cross_sectional_book_scores_the_open_loans_of_its_latest_snapshot_only(tmp_path):
    """Each delivery of a book without a date column is the whole book: an earlier snapshot's
    open loan is either open in the latest one too, or has its outcome there."""
    storage = Storage(tmp_path)
    book = parse_loan_book(
        {
            "name": "snapshots",
            "columns": {"id": "loan_id", "label": "status"},
            "label": {"default": ["bad"], "non_default": ["good"]},
            "numeric": {"x": {}},
            "grades": [{"grade": "A", "max_pd": 1.0}],
        }
    )

    def snapshot(*loans: tuple[str, str]) -> pd.DataFrame:
        return _rows(*((loan, NIGHT, status) for loan, status in loans)).drop(columns="applied")

    _deliver(storage, book, snapshot(("L1", ""), ("L2", ""), ("L3", "good")), NIGHT)
    _deliver(storage, book, snapshot(("L1", "bad"), ("L2", ""), ("L3", "good")), LATER)
    population = scoring_population(storage, book, LATER)
    assert population[["loan_id", "date"]].values.tolist() == [["L2", pd.Timestamp(LATER)]]
    last = LATER + dt.timedelta(days=1)
    _deliver(storage, book, snapshot(("L1", "bad"), ("L2", "good"), ("L3", "good")), last)
    assert scoring_population(storage, book, last).empty
    assert nothing_to_score_reason(storage, book, last) == (
        "nothing to score on 2024-02-21: 3 new applications dated that day, and every one of "
        "the 3 loans up to it has its outcome"
    )


def _reference(deliveries: list[pd.DataFrame], as_of: dt.date) -> dict[tuple, tuple]:
    """Loan by loan, every delivery kept: the first delivery's x, and the last non-empty
    status among the first delivery and those delivered on or before `as_of`."""
    versions: dict[tuple, list[tuple]] = {}
    for delivery in deliveries:  # in delivery order
        for row in delivery.itertuples(index=False):
            versions.setdefault((row.date, row.loan_id), []).append(
                (row.delivered_on, row.x, row.status)
            )
    flag = {"bad": 1.0, "good": 0.0}
    known = {}
    for key, rows in versions.items():
        usable = [v for i, v in enumerate(rows) if i == 0 or v[0] <= pd.Timestamp(as_of)]
        outcomes = [flag[status] for _, _, status in usable if isinstance(status, str)]
        known[key] = (rows[0][1], outcomes[-1] if outcomes else None)
    return known


def test_loans_as_known_matches_a_loan_by_loan_reference():
    book = _book()
    rng = np.random.default_rng(4)
    deliveries = []
    for night in range(6):  # 25 of 40 loans per delivery, each with an empty or a set status
        ids = rng.choice(40, size=25, replace=False)
        statuses = rng.choice(["", "good", "bad"], size=25)
        loans = zip(ids, statuses, strict=True)
        raw = _rows(*[(f"L{n}", D1 + dt.timedelta(days=int(n % 3)), s) for n, s in loans])
        on = NIGHT + dt.timedelta(days=10 * night)
        deliveries.append(normalise_credit_frame(raw, book=book, as_of=on))
    features = build_credit_features(pd.concat(deliveries, ignore_index=True), book)
    assert len(features) < sum(map(len, deliveries))  # deliveries with no news are dropped
    for as_of in (NIGHT, NIGHT + dt.timedelta(days=25), NIGHT + dt.timedelta(days=60)):
        known = loans_as_known(features, "loan_id", as_of)
        got = {
            (row.date, row.loan_id): (row.x, None if np.isnan(outcome) else outcome)
            for row, outcome in zip(known.itertuples(index=False), known[LABEL], strict=True)
        }
        assert len(got) == len(known)  # one row per loan
        assert got == _reference(deliveries, as_of)


def test_the_nightly_split_purges_by_the_books_outcome_window(caplog):
    """`split_book_rows` (training and promotion) passes the book's window to the split: no
    training loan's outcome is decided after validation starts, and the purge is logged."""
    import logging

    from finpipe.credit.model import CreditTrainingConfig
    from finpipe.credit.pipeline import split_book_rows

    dates = pd.bdate_range("2019-01-01", "2022-12-30")
    frame = pd.DataFrame({"date": dates, "loan_id": [f"L{i}" for i in range(len(dates))]})
    config = CreditTrainingConfig(validation_fraction=0.3, test_fraction=0.2)
    with caplog.at_level(logging.INFO, "finpipe.credit"):
        split = split_book_rows(frame, _book(365), config)
    train, validation = frame.loc[split.train, "date"], frame.loc[split.validation, "date"]
    assert (train + pd.Timedelta(days=365) <= validation.min()).all()
    assert split.purged > 0 and split_book_rows(frame, _book(0), config).purged == 0
    assert f"{split.purged} loans purged" in caplog.text
