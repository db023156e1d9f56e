"""A vendor's retraction of rows it delivered: a correction's rows flagged `retracted` remove
the published rows they name (a bar that never traded, a loan entered twice, a cancelled
purchase), are kept with what they replaced, are undone for a reader of an earlier vintage,
and leave features equal to a rebuild from scratch. What a retraction cannot do is refused
before anything changes, with the rule in the quarantine's report."""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from finpipe.domains import get_domain
from finpipe.errors import ValidationFailed
from finpipe.ingest import BATCH_COLUMN, ingest_file, ingest_files
from finpipe.market.features import update_market_features
from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    write_vendor_files,
)
from finpipe.storage import Storage, file_sha256
from finpipe.vintages import batch_history, validated_as_known
from tests.test_corrections import _ingest

AS_OF = "2030-01-01"
KEYS = ["date", "ticker"]


def _retraction(vendor, named: list[tuple[str, str]], path, restated: pd.DataFrame | None = None):
    """Write a correction that retracts the vendor's rows `named` ((day, ticker) pairs: only
    their keys filled in) and restates `restated`; return its path."""
    rows = pd.DataFrame([{"Date": day, "Ticker": ticker} for day, ticker in named])
    rows = rows.reindex(columns=list(vendor.columns)).assign(Retracted="true")
    if restated is not None:
        rows = pd.concat([restated.assign(Retracted="false"), rows], ignore_index=True)
    rows.to_csv(path, index=False)
    return path


def _day_tickers(vendor, back: int) -> tuple[str, list[str]]:
    day = sorted(vendor["Date"].unique())[-back]
    return day, sorted(vendor.loc[vendor["Date"] == day, "Ticker"])


def _report(error: ValidationFailed) -> dict:
    return json.loads((Path(error.quarantine_path) / "report.json").read_text())


def test_a_retracted_row_removes_the_published_row_and_is_kept_with_its_batch(delivered, tmp_path):
    storage, _, vendor = delivered
    day, tickers = _day_tickers(vendor, 10)
    restated_day, _ = _day_tickers(vendor, 20)
    restated = vendor[vendor["Date"] == restated_day].copy()
    for column in ("Open", "High", "Low", "Close", "Adj Close"):
        restated[column] = (restated[column] * 1.01).round(4)
    path = _retraction(vendor, [(day, tickers[1])], tmp_path / "cancel.csv", restated)
    before = storage.read_partitions("validated", "market")

    outcome = _ingest(storage, path, correction=True)
    assert outcome.status == "validated" and outcome.rows == 4  # the restated rows
    assert (outcome.corrected_rows, outcome.retracted_rows) == (5, 1)
    assert "5 published rows of b" in outcome.message and "1 of them retracted" in outcome.message
    after = storage.read_partitions("validated", "market")
    gone = (after["date"] == pd.Timestamp(day)) & (after["ticker"] == tickers[1])
    assert not gone.any() and len(after) == len(before) - 1
    # The other tickers of that day, and every day not named, are untouched.
    untouched = ~before["date"].isin(pd.to_datetime([day, restated_day]))
    pd.testing.assert_frame_equal(
        after[~after["date"].isin(pd.to_datetime([day, restated_day]))].reset_index(drop=True),
        before[untouched].reset_index(drop=True),
    )
    same_day = after[after["date"] == pd.Timestamp(day)]
    assert sorted(same_day["ticker"]) == [t for t in tickers if t != tickers[1]]
    # What it removed is kept with what it restated, and a reader of the earlier vintage gets
    # the row back; the same file again changes nothing.
    kept = pd.read_parquet(
        storage.local_path(f"state/market/superseded/{outcome.batch_id}.parquet")
    )
    retracted = before[(before["date"] == pd.Timestamp(day)) & (before["ticker"] == tickers[1])]
    assert len(kept) == 5 and len(kept.merge(retracted[KEYS])) == 1
    record = storage.read_batch_record("market", outcome.sha256)
    earlier = dt.datetime.fromisoformat(record["validated_at"]) - dt.timedelta(microseconds=1)
    contract = get_domain("market").contract
    pd.testing.assert_frame_equal(validated_as_known(storage, contract, earlier), before)
    assert _ingest(storage, path, correction=True).status == "already_loaded"
    pd.testing.assert_frame_equal(storage.read_partitions("validated", "market"), after)
    listed = batch_history(storage, "market").iloc[-1]
    assert (listed["file"], listed["replaced"], listed["retracted"]) == ("cancel.csv", 5, 1)


def test_a_corrections_message_counts_the_dates_of_its_rows_not_of_its_retractions(
    delivered, tmp_path
):
    """Four restated rows of one day and a retracted bar of another: "4 rows over 1 date",
    dry run and ingest alike; the batch record's first and last dates still span both days
    (the dates it changed, what `finpipe batches` lists)."""
    from finpipe.ingest import check_file

    storage, _, vendor = delivered
    day, tickers = _day_tickers(vendor, 10)
    restated_day, _ = _day_tickers(vendor, 20)
    restated = vendor[vendor["Date"] == restated_day].copy()
    restated["Volume"] += 1
    path = _retraction(vendor, [(day, tickers[1])], tmp_path / "cancel.csv", restated)
    contract = get_domain("market").contract

    predicted = check_file(storage, contract, path, as_of=AS_OF, correction=True)
    assert predicted.message.startswith("cancel.csv: 4 rows over 1 date would be published (")
    assert predicted.dates == 1
    outcome = _ingest(storage, path, correction=True)
    assert outcome.message.startswith("cancel.csv: 4 rows over 1 date validated (a correction: ")
    assert "5 published rows of b" in outcome.message and "1 of them retracted" in outcome.message
    assert outcome.dates == 1
    record = storage.read_batch_record("market", outcome.sha256)
    assert (record["first_date"], record["last_date"]) == (restated_day, day)


def test_a_bar_delivered_under_the_wrong_ticker_moves_by_a_retraction_and_a_new_row(
    delivered, tmp_path
):
    storage, _, vendor = delivered
    day, tickers = _day_tickers(vendor, 10)
    bar = vendor[(vendor["Date"] == day) & (vendor["Ticker"] == tickers[0])]
    path = _retraction(vendor, [(day, tickers[0])], tmp_path / "move.csv", bar.assign(Ticker="NEW"))
    before = storage.read_partitions("validated", "market")
    outcome = _ingest(storage, path, correction=True)
    assert (outcome.rows, outcome.corrected_rows, outcome.retracted_rows) == (1, 1, 1)
    after = storage.read_partitions("validated", "market")
    moved = after[after["date"] == pd.Timestamp(day)].set_index("ticker")
    assert sorted(moved.index) == sorted(["NEW", *tickers[1:]])
    was = before[(before["date"] == pd.Timestamp(day)) & (before["ticker"] == tickers[0])]
    assert moved.loc["NEW", "close"] == pytest.approx(was["close"].iloc[0])


def test_a_file_of_retractions_only_publishes_nothing_and_features_follow(delivered, tmp_path):
    storage, _, vendor = delivered
    last = pd.Timestamp(sorted(vendor["Date"].unique())[-1]).date()
    update_market_features(storage, last)
    day, tickers = _day_tickers(vendor, 30)
    later, later_tickers = _day_tickers(vendor, 25)
    named = [(day, tickers[0]), (later, later_tickers[2])]
    outcome = _ingest(storage, _retraction(vendor, named, tmp_path / "cancel.csv"), correction=True)
    assert (outcome.rows, outcome.corrected_rows, outcome.retracted_rows) == (0, 2, 2)
    assert (outcome.first_date, outcome.last_date) == (day, later)

    update = update_market_features(storage, last)  # incremental: from the first retracted day
    assert update.dates_written[0] == day
    incremental = storage.read_partitions("features", "market")
    assert not (
        (incremental["date"] == pd.Timestamp(day)) & (incremental["ticker"] == tickers[0])
    ).any()
    update_market_features(storage, last, rebuild=True)
    pd.testing.assert_frame_equal(incremental, storage.read_partitions("features", "market"))


def test_retracting_every_bar_of_a_date_removes_the_date_and_features_follow(
    delivered, tmp_path, monkeypatch, disk_full_after_one_partition
):
    """A date the vendor never traded (every bar retracted) leaves the validated layer, kept
    for earlier vintages; the feature step removes its features and rebuilds the later dates
    whose lookback held its bars, last, so a step cut short ends as a rebuild would."""
    from finpipe.ingest import check_file

    storage, files, vendor = delivered
    last = pd.Timestamp(sorted(vendor["Date"].unique())[-1]).date()
    update_market_features(storage, last)
    day, tickers = _day_tickers(vendor, 30)
    after_day, _ = _day_tickers(vendor, 29)
    path = _retraction(vendor, [(day, t) for t in tickers], tmp_path / "holiday.csv")
    contract = get_domain("market").contract
    predicted = check_file(storage, contract, path, as_of=AS_OF, correction=True)
    assert predicted.removed_dates == [day] and "would be removed" in predicted.message
    before = storage.read_partitions("validated", "market")
    assert storage.read_batch_record("market", predicted.sha256) is None  # nothing written

    outcome = _ingest(storage, path, correction=True)
    assert (outcome.rows, outcome.retracted_rows, outcome.removed_dates) == (0, 4, [day])
    assert f"every row of {day} retracted" in outcome.message
    the_day = dt.date.fromisoformat(day)
    assert the_day not in storage.partition_dates("validated", "market")
    assert not storage.local_path(f"validated/market/{day}").exists()
    record = storage.read_batch_record("market", outcome.sha256)
    assert record["removed_dates"] == [day]
    pd.testing.assert_frame_equal(
        storage.read_partitions("validated", "market"),
        before[before["date"] != pd.Timestamp(day)].reset_index(drop=True),
    )
    earlier = storage.read_batch_record("market", file_sha256(files[-1]))["validated_at"]
    pd.testing.assert_frame_equal(validated_as_known(storage, contract, earlier), before)

    # The feature step cut short while rebuilding: the removed date's features are still there.
    disk_full_after_one_partition()
    with pytest.raises(OSError, match="disk full"):
        update_market_features(storage, last)
    assert the_day in storage.partition_dates("features", "market")
    monkeypatch.undo()
    update = update_market_features(storage, last)
    assert update.dates_removed == [day] and update.dates_written[0] == after_day
    assert the_day not in storage.partition_dates("features", "market")
    incremental = storage.read_partitions("features", "market")
    update_market_features(storage, last, rebuild=True)
    pd.testing.assert_frame_equal(incremental, storage.read_partitions("features", "market"))
    assert update_market_features(storage, last).dates_written == []


def test_a_retraction_cut_short_completes_on_a_rerun_with_the_first_copy(
    delivered, tmp_path, monkeypatch, disk_full_after_one_partition
):
    """Cut short after it removed a whole date and rewrote one more: the re-run ends as an
    unbroken run would, the removed date counted."""
    storage, _, vendor = delivered
    whole, second, third = (_day_tickers(vendor, back) for back in (13, 12, 11))
    named = [(whole[0], t) for t in whole[1]] + [(second[0], second[1][0]), (third[0], third[1][3])]
    path = _retraction(vendor, named, tmp_path / "cancel.csv")
    before = storage.read_partitions("validated", "market")

    writes = disk_full_after_one_partition()
    with pytest.raises(OSError, match="disk full"):
        _ingest(storage, path, correction=True)
    assert writes == [dt.date.fromisoformat(second[0])]  # the whole date went before it
    assert dt.date.fromisoformat(whole[0]) not in storage.partition_dates("validated", "market")
    monkeypatch.undo()
    outcome = _ingest(storage, path, correction=True)
    assert (outcome.status, outcome.retracted_rows) == ("validated", len(named))
    assert outcome.removed_dates == [whole[0]]
    after = storage.read_partitions("validated", "market")
    index = pd.MultiIndex.from_arrays(
        [pd.to_datetime([d for d, _ in named]), [t for _, t in named]]
    )
    expected = before[~pd.MultiIndex.from_frame(before[KEYS]).isin(index)]
    pd.testing.assert_frame_equal(after, expected.reset_index(drop=True))
    kept = pd.read_parquet(
        storage.local_path(f"state/market/superseded/{outcome.batch_id}.parquet")
    )
    assert sorted(kept["ticker"]) == sorted(t for _, t in named)


def test_what_a_retraction_cannot_do_is_quarantined_with_its_rule_and_changes_nothing(
    delivered, tmp_path
):
    storage, _, vendor = delivered
    day, tickers = _day_tickers(vendor, 10)
    before = storage.read_partitions("validated", "market")
    cases = [
        # A row never published (a ticker the vendor never delivered that day).
        (
            "retraction_names_no_published_row",
            _retraction(vendor, [(day, "NOPE")], tmp_path / "unknown.csv"),
        ),
        # One such row beside a good one: the whole correction is refused, the good one too.
        (
            "retraction_names_no_published_row",
            _retraction(vendor, [(day, tickers[0]), (day, "NOPE")], tmp_path / "one_unknown.csv"),
        ),
        # The same row retracted and restated in one file.
        (
            "retracted_and_restated",
            _retraction(
                vendor,
                [(day, tickers[0])],
                tmp_path / "both.csv",
                vendor[(vendor["Date"] == day) & (vendor["Ticker"] == tickers[0])],
            ),
        ),
    ]
    for rule, path in cases:
        with pytest.raises(ValidationFailed, match=rule) as caught:
            _ingest(storage, path, correction=True)
        failed = [r for r in _report(caught.value)["rules"] if not r["success"]]
        assert [r["rule"] for r in failed] == [rule]
        assert "nothing was retracted" in str(caught.value)
    # A value that is not a yes or a no: unreadable, with the row and the value.
    odd = tmp_path / "odd.csv"
    _retraction(vendor, [(day, tickers[0])], odd)
    pd.read_csv(odd).assign(Retracted="maybe").to_csv(odd, index=False)
    with pytest.raises(ValidationFailed, match="row 0: 'maybe'"):
        _ingest(storage, odd, correction=True)
    pd.testing.assert_frame_equal(storage.read_partitions("validated", "market"), before)
    assert not storage.exists("state/market/superseded")


def test_a_rejected_correction_names_the_rows_of_its_file_around_its_retractions(
    delivered, tmp_path
):
    """The suite sees only the rows a correction restates; its report still counts the rows of
    the file, retracted ones included, so the row it names is the one to fix."""
    storage, _, vendor = delivered
    day, tickers = _day_tickers(vendor, 10)
    restated_day, _ = _day_tickers(vendor, 20)
    restated = vendor[vendor["Date"] == restated_day].head(3).astype(str)
    restated.loc[restated.index[1], "Close"] = "-5.0"  # file row 3: not a price
    restated.loc[restated.index[2], "Volume"] = "lots"  # file row 4: not a number
    path = tmp_path / "mixed.csv"
    _retraction(vendor, [(day, t) for t in tickers[:2]], path)
    retractions = pd.read_csv(path, dtype=str, keep_default_na=False)
    rows = pd.concat([retractions, restated.assign(Retracted="no")], ignore_index=True)
    # Rows 0 and 1 retract, 2-4 restate: the suite sees 3 rows, the bad ones its second and third.
    rows.to_csv(path, index=False)
    before = storage.read_partitions("validated", "market")

    with pytest.raises(ValidationFailed) as caught:
        _ingest(storage, path, correction=True)
    failed = {r["rule"]: r for r in _report(caught.value)["rules"] if not r["success"]}
    close = next(r for name, r in failed.items() if "close" in r["columns"] and "low" not in name)
    assert close["sample_rows"] == [3]
    assert failed["parseable_values"]["sample_rows"] == [4]
    assert "row 3" in str(caught.value)
    pd.testing.assert_frame_equal(storage.read_partitions("validated", "market"), before)


def test_an_ordinary_delivery_with_retracted_rows_is_quarantined_alone_or_in_a_group(tmp_path):
    """Without --correction the flag would be an ignored extra column and the row published;
    a clean file before it in the same run (a group of files for one GX run) is published."""
    panel = generate_market_panel(MarketSyntheticConfig(tickers=2, days=305, seed=9))
    (clean,) = write_vendor_files(panel.prices, tmp_path / "drop", daily_files=0)
    rows = pd.read_csv(clean).assign(Retracted="false")
    dates = sorted(rows["Date"].unique())
    first, flagged = tmp_path / "first.csv", tmp_path / "flagged.csv"
    rows[rows["Date"] < dates[200]].to_csv(first, index=False)
    later = rows[rows["Date"] >= dates[200]].reset_index(drop=True)
    later.loc[2, "Retracted"] = "TRUE"
    later.to_csv(flagged, index=False)
    storage, contract = Storage(tmp_path / "home"), get_domain("market").contract
    outcomes = []
    with pytest.raises(ValidationFailed, match="retraction_outside_correction") as caught:
        outcomes.extend(ingest_files(storage, contract, [first, flagged], as_of=AS_OF))
    (rule,) = _report(caught.value)["rules"]
    assert (rule["unexpected_count"], rule["sample_rows"]) == (1, [2])
    assert "--correction" in str(caught.value)
    ((published, _),) = [(o.batch_id, o.status) for o in outcomes if o.status == "validated"]
    assert set(storage.read_partitions("validated", "market")[BATCH_COLUMN]) == {published}
    # All flags false: an ordinary delivery.
    later.assign(Retracted="false").to_csv(flagged, index=False)
    (outcome,) = ingest_files(storage, contract, [flagged], as_of=AS_OF)
    assert outcome.status == "validated" and outcome.rows == len(later)


# -- loans and transactions: what a retracted row names is the domain's -----------------------
def test_a_retracted_loan_loses_every_version_and_features_follow(tmp_path):
    from finpipe.credit.features import loans_as_known, update_credit_features
    from tests.test_corrections_credit_customers import BOOK, D1, D2, _loans, published_loans

    storage, contract = published_loans(tmp_path)
    before = storage.read_partitions("validated", "credit")
    # The lender entered L1 twice (it is L2): both of its versions go; L3 is restated.
    cancel = tmp_path / "cancel.csv"
    rows = pd.read_csv(_loans(tmp_path, "fix.csv", ("L3", D2, "good", 3500.0)))
    retracted = pd.DataFrame({"loan_id": ["L1"], "applied": [D1.isoformat()]})
    pd.concat([rows, retracted], ignore_index=True).assign(retracted=["no", "yes"]).to_csv(
        cancel, index=False
    )
    fixed = dt.date(2024, 3, 1)
    outcome = ingest_file(storage, contract, cancel, as_of=fixed, correction=True)
    assert (outcome.corrected_rows, outcome.retracted_rows) == (3, 2)
    after = storage.read_partitions("validated", "credit")
    assert "L1" not in set(after["loan_id"])
    assert after.loc[after["loan_id"] == "L3", "income"].tolist() == [3500.0]
    pd.testing.assert_frame_equal(
        after[after["loan_id"] == "L2"].reset_index(drop=True),
        before[before["loan_id"] == "L2"].reset_index(drop=True),
    )
    update_credit_features(storage, fixed, book=BOOK)
    features = storage.read_partitions("features", "credit")
    assert "L1" not in set(loans_as_known(features, "loan_id", fixed)["loan_id"])
    update_credit_features(storage, fixed, book=BOOK, rebuild=True)
    pd.testing.assert_frame_equal(features, storage.read_partitions("features", "credit"))


def test_retracting_the_only_loan_of_a_day_removes_the_day_and_its_features(tmp_path):
    from finpipe.credit.features import loans_as_known, update_credit_features
    from tests.test_corrections_credit_customers import BOOK, D1, D2, FIXED, published_loans

    storage, contract = published_loans(tmp_path)
    update_credit_features(storage, FIXED, book=BOOK)
    assert storage.partition_dates("features", "credit") == [D1, D2]
    cancel = tmp_path / "cancel.csv"
    row = {"loan_id": "L3", "applied": D2.isoformat(), "status": "", "income": ""}
    pd.DataFrame([row]).assign(retracted="yes").to_csv(cancel, index=False)
    outcome = ingest_file(storage, contract, cancel, as_of=FIXED, correction=True)
    assert (outcome.retracted_rows, outcome.removed_dates) == (1, [D2.isoformat()])
    assert storage.partition_dates("validated", "credit") == [D1]
    update = update_credit_features(storage, FIXED, book=BOOK)
    assert (update.dates_written, update.dates_removed) == ([], [D2.isoformat()])
    assert storage.partition_dates("features", "credit") == [D1]
    features = storage.read_partitions("features", "credit")
    assert sorted(set(loans_as_known(features, "loan_id", FIXED)["loan_id"])) == ["L1", "L2"]
    update_credit_features(storage, FIXED, book=BOOK, rebuild=True)
    pd.testing.assert_frame_equal(features, storage.read_partitions("features", "credit"))


def test_a_retracted_purchase_removes_the_customers_transactions_at_its_time_stamp(tmp_path):
    from finpipe.customers.features import update_customer_features
    from finpipe.customers.synthetic import (
        CustomersSyntheticConfig,
        generate_customer_transactions,
    )
    from finpipe.customers.synthetic import write_vendor_files as write_transactions

    log = generate_customer_transactions(CustomersSyntheticConfig(customers=40, days=90, seed=2))
    files = write_transactions(log.transactions, tmp_path / "drop", daily_files=2)
    storage, contract = Storage(tmp_path / "home"), get_domain("customers").contract
    for path in files:
        ingest_file(storage, contract, path, as_of=AS_OF)
    before = storage.read_partitions("validated", "customers")
    history = pd.read_csv(files[0])
    days = pd.to_datetime(history["Transaction Time"]).dt.normalize()
    busiest = days.value_counts().index[0]  # a day that keeps rows when one stamp goes
    last = history[(days == busiest).to_numpy()]
    day = busiest.date()
    update_customer_features(storage, day, active_days=365)
    cancel = tmp_path / "cancel.csv"
    last.head(1).assign(Amount=None, Retracted=1).to_csv(cancel, index=False)
    outcome = ingest_file(storage, contract, cancel, as_of=AS_OF, correction=True)
    assert outcome.rows == 0 and outcome.retracted_rows >= 1

    after = storage.read_partitions("validated", "customers")
    customer = last["Customer ID"].iloc[0]
    at = pd.Timestamp(last["Transaction Time"].iloc[0])
    named = (before["customer_id"] == customer) & (before["timestamp"] == at)
    assert outcome.retracted_rows == int(named.sum())
    pd.testing.assert_frame_equal(after, before[~named].reset_index(drop=True))
    update = update_customer_features(storage, day, active_days=365)
    assert update.dates_written == [day.isoformat()]
    incremental = storage.read_partition("features", "customers", day)
    update_customer_features(storage, day, active_days=365, rebuild=True)
    pd.testing.assert_frame_equal(incremental, storage.read_partition("features", "customers", day))


# -- the property: a correction's result equals a naive reference, whatever it names ---------
_DAYS = pd.bdate_range("2024-01-02", periods=3)
_TICKERS = ["A", "B", "C"]
_ACTION = st.sampled_from(["keep", "retract", "restate"])


@settings(max_examples=10, deadline=None, derandomize=True)
# Every bar named (none kept from the published ones).
@example(actions=["retract", "retract", "restate"] * 3, added=[False, False, False])
# A day whose bars are all retracted: removed, unless the correction adds one to it.
@example(actions=["retract"] * 3 + ["keep"] * 6, added=[False, False, False])
@example(actions=["retract"] * 3 + ["restate", "keep", "retract"] * 2, added=[True, False, False])
@example(actions=["retract"] * 9, added=[False, False, False])  # every bar: no day left
@given(
    actions=st.lists(_ACTION, min_size=9, max_size=9),
    added=st.lists(st.booleans(), min_size=3, max_size=3),  # a new ticker's bar, by day
)
def test_a_correction_publishes_what_a_naive_reference_computes(actions, added):
    """Every published bar kept, retracted or restated, new bars added: the layer afterwards
    is the published rows less the retracted keys, restated ones replaced, new ones added; a
    day left with no bar is removed (every day, when every bar is retracted); the layer as
    known before the correction is the layer before it."""
    history = pd.DataFrame(
        [(d.date().isoformat(), t, 100.0 + i) for i, (d, t) in enumerate(_keys())],
        columns=["Date", "Ticker", "Close"],
    )
    fix = [
        (d.date().isoformat(), t, 101.0 + i if action == "restate" else None, action == "retract")
        for i, ((d, t), action) in enumerate(zip(_keys(), actions, strict=True))
        if action != "keep"
    ] + [
        (d.date().isoformat(), "D", 50.0, False) for d, new in zip(_DAYS, added, strict=True) if new
    ]
    correction = pd.DataFrame(fix, columns=["Date", "Ticker", "Close", "Retracted"])
    with tempfile.TemporaryDirectory() as folder:
        storage = Storage(Path(folder) / "home")
        history.to_csv(Path(folder) / "history.csv", index=False)
        first = _ingest(storage, Path(folder) / "history.csv")
        before = storage.read_partitions("validated", "market")
        if correction.empty:
            return
        correction.to_csv(Path(folder) / "fix.csv", index=False)
        expected = _reference(before, correction)
        emptied = [d.date() for d in _DAYS if not (expected["date"] == d).any()]
        outcome = _ingest(storage, Path(folder) / "fix.csv", correction=True)
        assert outcome.removed_dates == [d.isoformat() for d in emptied]
        left = [d.date() for d in _DAYS if d.date() not in emptied]
        assert storage.partition_dates("validated", "market") == left
        if left:
            after = storage.read_partitions("validated", "market")
            columns = ["date", "ticker", "close"]
            pd.testing.assert_frame_equal(
                after[columns].astype({"ticker": object}).reset_index(drop=True),
                expected[columns].astype({"ticker": object}),
            )
        validated_at = storage.read_batch_record("market", first.sha256)["validated_at"]
        contract = get_domain("market").contract
        pd.testing.assert_frame_equal(validated_as_known(storage, contract, validated_at), before)


def _keys() -> list[tuple[pd.Timestamp, str]]:
    return [(d, t) for d in _DAYS for t in _TICKERS]


def _reference(before: pd.DataFrame, correction: pd.DataFrame) -> pd.DataFrame:
    """The published rows less those the correction names, then its rows that are not
    retracted: written out row by row, as a reader would."""
    named = {
        (pd.Timestamp(d), t) for d, t in zip(correction["Date"], correction["Ticker"], strict=True)
    }
    rows = [
        {"date": d, "ticker": t, "close": c}
        for d, t, c in zip(before["date"], before["ticker"], before["close"], strict=True)
        if (d, t) not in named
    ]
    rows += [
        {"date": pd.Timestamp(d), "ticker": t, "close": c}
        for d, t, c, gone in correction.itertuples(index=False)
        if not gone
    ]
    frame = pd.DataFrame(rows, columns=["date", "ticker", "close"])
    frame["date"] = frame["date"].astype("datetime64[ns]")  # as the layer stores it
    return frame.sort_values(["date", "ticker"]).reset_index(drop=True)
