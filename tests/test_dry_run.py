"""`finpipe ingest --dry-run` (`finpipe.ingest.check_file`): what ingest would do with a file,
with the same verdict, rules and counts, and nothing written to the store."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from finpipe.domains import get_domain
from finpipe.errors import ValidationFailed
from finpipe.ingest import CheckedTogether, check_file, ingest_file
from finpipe.storage import Storage

AS_OF = "2025-06-30"  # a past day: the command line refuses a later as-of


def _store_files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the store with its size and modification time."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _files(delivered, tmp_path) -> dict[str, Path]:
    """A new day (clean), a bad one (a negative close) and a correction that restates one
    published bar and retracts another."""
    storage, files, vendor = delivered
    days = sorted(vendor["Date"].unique())
    last = vendor[vendor["Date"] == days[-1]]
    new = last.assign(Date=(pd.Timestamp(days[-1]) + pd.offsets.BDay(1)).date().isoformat())
    bad = new.assign(Close=-1.0)
    restated = vendor[vendor["Date"] == days[-10]].head(1).assign(Retracted="false")
    restated[["Open", "High", "Low", "Close", "Adj Close"]] *= 1.01
    retracted = vendor[vendor["Date"] == days[-11]].head(1).assign(Retracted="true")
    written = {
        "new.csv": new,
        "bad.csv": bad,
        "fix.csv": pd.concat([restated, retracted]),
    }
    for name, rows in written.items():
        rows.to_csv(tmp_path / name, index=False)
    return {name: tmp_path / name for name in written}


def test_a_check_says_what_ingest_then_does_and_writes_nothing(delivered, tmp_path):
    storage, _, _ = delivered
    contract = get_domain("market").contract
    files = _files(delivered, tmp_path)
    before = _store_files(storage.root)

    new = check_file(storage, contract, files["new.csv"], as_of=AS_OF)
    fix = check_file(storage, contract, files["fix.csv"], as_of=AS_OF, correction=True)
    with pytest.raises(ValidationFailed, match="would be rejected") as caught:
        check_file(storage, contract, files["bad.csv"], as_of=AS_OF)
    assert caught.value.quarantine_path is None and "Nothing was written" in str(caught.value)
    assert _store_files(storage.root) == before  # not a landing, record, report or partition
    assert (new.status, fix.status) == ("checked", "checked")
    assert "nothing written" in new.message and "would be replaced, 1 of them retracted" in (
        fix.message
    )

    assert "Details:" not in str(caught.value)  # no Data Docs to point at

    # Ingest then does what the checks said, for each file.
    with pytest.raises(ValidationFailed) as quarantined:
        ingest_file(storage, contract, files["bad.csv"], as_of=AS_OF)
    report = json.loads((Path(quarantined.value.quarantine_path) / "report.json").read_text())
    failed = [rule["rule"] for rule in report["rules"] if not rule["success"]]
    assert f"rules failed: {', '.join(failed)})" in str(caught.value)
    loaded = ingest_file(storage, contract, files["new.csv"], as_of=AS_OF)
    corrected = ingest_file(storage, contract, files["fix.csv"], as_of=AS_OF, correction=True)
    for checked, done in ((new, loaded), (fix, corrected)):
        fields = ("rows", "first_date", "last_date", "dates", "corrected_rows", "retracted_rows")
        assert [getattr(checked, f) for f in fields] == [getattr(done, f) for f in fields]
    assert (fix.corrected_rows, fix.retracted_rows) == (2, 1)
    # A file already loaded is said to be, as ingest says it.
    assert check_file(storage, contract, files["new.csv"], as_of=AS_OF).status == "already_loaded"


def test_a_rejection_reads_as_sentences_and_names_only_the_rules_that_reject(delivered, tmp_path):
    """The rules listed as failed are the ones that reject the file (a warning the same rows
    trip is reported as one, not as data accepted), and each message's sentences end before
    what follows them."""
    storage, _, _ = delivered
    contract = get_domain("market").contract
    tick = pd.read_csv(_files(delivered, tmp_path)["new.csv"])
    tick.loc[tick.index[0], ["Open", "High", "Low", "Close", "Adj Close"]] *= 10  # a bad tick
    tick.to_csv(tmp_path / "tick.csv", index=False)
    with pytest.raises(ValidationFailed) as caught:
        check_file(storage, contract, tmp_path / "tick.csv", as_of=AS_OF)
    message = str(caught.value)
    assert "(rules failed: expect_column_values_to_be_between(abs_log_return_1d))." in message
    assert "1 warning, which alone would not reject it: large_move_1d" in message
    assert "data accepted" not in message

    (tmp_path / "semicolon.csv").write_text("date;ticker;close\n2024-01-02;A;1\n")
    with pytest.raises(ValidationFailed) as checked:
        check_file(storage, contract, tmp_path / "semicolon.csv", as_of=AS_OF)
    with pytest.raises(ValidationFailed) as ingested:
        ingest_file(storage, contract, tmp_path / "semicolon.csv", as_of=AS_OF)
    assert "as the delimiter. Nothing was written." in str(checked.value)
    assert "as the delimiter. Batch kept in" in str(ingested.value)
    assert "). semicolon.csv: one column named" in str(ingested.value)  # not the landed copy

    tick.iloc[[1]].to_csv(tmp_path / "one.csv", index=False)
    one = check_file(storage, contract, tmp_path / "one.csv", as_of=AS_OF)
    assert one.message.startswith("one.csv: 1 row over 1 date would be published")


def test_the_command_line_checks_every_file_and_exits_2_when_one_would_be_rejected(
    delivered, tmp_path, monkeypatch
):
    from finpipe.cli import app

    storage, _, _ = delivered
    files = _files(delivered, tmp_path)
    monkeypatch.setenv("FINPIPE_HOME", str(storage.root))
    monkeypatch.delenv("FINPIPE_DROP_ROOTS", raising=False)
    before = _store_files(storage.root)
    both = [str(files["bad.csv"]), str(files["new.csv"])]
    result = CliRunner().invoke(app, ["ingest", "market", *both, "--as-of", AS_OF, "--dry-run"])
    assert isinstance(result.exception, ValidationFailed)
    assert "1 of 2 file(s) would be rejected" in str(result.exception)
    assert "bad.csv would be rejected" in result.output
    assert "new.csv: 4 rows over 1 date would be published; nothing written" in result.output
    assert _store_files(storage.root) == before
    fix = [str(files["fix.csv"]), "--as-of", AS_OF, "--dry-run", "--correction"]
    result = CliRunner().invoke(app, ["ingest", "market", *fix])
    assert result.exit_code == 0, result.output
    assert "2 published rows would be replaced, 1 of them retracted" in result.output
    assert _store_files(storage.root) == before


def test_files_checked_together_see_the_ones_before_them_as_ingest_would(
    delivered, tmp_path, monkeypatch
):
    """The same day delivered twice (once byte for byte, once with another volume): the dry run
    says what loading them in order does, not what each would do alone."""
    from finpipe.cli import app

    storage, _, _ = delivered
    files = _files(delivered, tmp_path)
    copy = tmp_path / "new_again.csv"
    copy.write_bytes(files["new.csv"].read_bytes())
    overlap = tmp_path / "new_revised.csv"
    pd.read_csv(files["new.csv"]).assign(Volume=1234.0).to_csv(overlap, index=False)
    monkeypatch.setenv("FINPIPE_HOME", str(storage.root))
    monkeypatch.delenv("FINPIPE_DROP_ROOTS", raising=False)
    before = _store_files(storage.root)
    given = [str(files["new.csv"]), str(copy), str(overlap), str(files["bad.csv"])]
    result = CliRunner().invoke(app, ["ingest", "market", *given, "--as-of", AS_OF, "--dry-run"])
    assert _store_files(storage.root) == before
    assert "new.csv: 4 rows over 1 date would be published" in result.output
    assert "new_again.csv: the same content as new.csv, checked above" in result.output
    assert (
        "new_revised.csv would be rejected (rules failed: duplicate_key_across_batches). "
        "Rule duplicate_key_across_batches: 4 row(s) repeat keys of new.csv, checked above"
    ) in result.output
    assert "2 of 4 file(s) would be rejected (above); ingest stops at the first, " in str(
        result.exception
    )
    # Each alone against the store, both would be published.
    contract = get_domain("market").contract
    for path in (copy, overlap):
        assert check_file(storage, contract, path, as_of=AS_OF).status == "checked"

    # Loading them in order does what the dry run said.
    assert ingest_file(storage, contract, files["new.csv"], as_of=AS_OF).status == "validated"
    assert ingest_file(storage, contract, copy, as_of=AS_OF).status == "already_loaded"
    with pytest.raises(ValidationFailed, match="duplicate_key_across_batches"):
        ingest_file(storage, contract, overlap, as_of=AS_OF)


def test_a_repeated_key_names_the_files_checked_above_and_else_the_batches_accepted():
    sha = "0123456789ab" + "f" * 52
    together = CheckedTogether(names={sha: "new.csv"})
    assert together.whose(["b0123456789ab"]) == "of new.csv, checked above (ingest loads it first)"
    assert together.whose(["b0123456789ab", "bfedcba987654"]) == (
        "of new.csv, checked above (ingest loads it first), or already accepted from an "
        "earlier batch"
    )
    assert together.whose(["bfedcba987654"]) == "already accepted from an earlier batch"


def test_a_file_checked_after_another_measures_its_move_from_that_files_prices(delivered, tmp_path):
    """Market's move rule compares a day's price with the last accepted one. Checked together,
    a later day is measured from the earlier file's prices, as ingest does once it loaded it:
    a real doubling after a doubling passes, a fall back to the old price after a jump does
    not (each alone against the store, the other way round)."""
    storage, _, vendor = delivered
    contract = get_domain("market").contract
    last_day = max(vendor["Date"])
    last = vendor[vendor["Date"] == last_day]
    prices = ["Open", "High", "Low", "Close", "Adj Close"]

    def day(offset: int, scale: float, name: str) -> Path:
        date = (pd.Timestamp(last_day) + pd.offsets.BDay(offset)).date().isoformat()
        rows = last.assign(Date=date)
        rows[prices] *= scale
        rows.to_csv(tmp_path / name, index=False)
        return tmp_path / name

    up, doubled = day(1, 2.5, "up.csv"), day(2, 5.0, "doubled.csv")  # |log| 0.92, then 0.69
    back = day(2, 0.9, "back.csv")  # from up: |log| 1.02, over the rule's 1.0

    together = CheckedTogether()
    assert check_file(storage, contract, up, as_of=AS_OF, together=together).status == "checked"
    outcome = check_file(storage, contract, doubled, as_of=AS_OF, together=together)
    assert outcome.status == "checked"
    with pytest.raises(ValidationFailed, match=r"doubled.csv would be rejected.*abs_log_return"):
        check_file(storage, contract, doubled, as_of=AS_OF)  # from the store's price: 1.61
    together = CheckedTogether()
    check_file(storage, contract, up, as_of=AS_OF, together=together)
    with pytest.raises(ValidationFailed, match=r"back.csv would be rejected.*abs_log_return"):
        check_file(storage, contract, back, as_of=AS_OF, together=together)
    assert check_file(storage, contract, back, as_of=AS_OF).status == "checked"

    # Loading them in order does what the checks together said.
    assert ingest_file(storage, contract, up, as_of=AS_OF).status == "validated"
    with pytest.raises(ValidationFailed, match="abs_log_return"):
        ingest_file(storage, contract, back, as_of=AS_OF)
    assert ingest_file(storage, contract, doubled, as_of=AS_OF).status == "validated"


def test_corrections_checked_together_see_what_the_ones_before_them_changed(delivered, tmp_path):
    """Corrections checked in one dry run are matched against the layer as the earlier ones
    leave it, as ingest does when it loads them in order: a row an earlier one retracted is
    gone, a row it added is there, and a date it half-emptied is removed by the next."""
    storage, _, vendor = delivered
    contract = get_domain("market").contract
    days = sorted(vendor["Date"].unique())
    on_a = vendor[vendor["Date"] == days[-10]].sort_values("Ticker")
    on_b = vendor[vendor["Date"] == days[-11]].sort_values("Ticker")
    assert len(on_a) == len(on_b) == 4

    def file(name: str, *parts: tuple[pd.DataFrame, str]) -> Path:
        rows = pd.concat([rows.assign(Retracted=flag) for rows, flag in parts])
        rows.to_csv(tmp_path / name, index=False)
        return tmp_path / name

    added = on_a.head(1).assign(Ticker="ZZZZ")  # a bar the vendor had left out
    first = file(
        "first.csv", (on_a.iloc[[1]], "true"), (on_b.iloc[[0, 1]], "true"), (added, "false")
    )
    again = file("again.csv", (on_a.iloc[[1]], "true"))  # what first.csv retracted
    rest = file("rest.csv", (on_b.iloc[[2, 3]], "true"))  # the rest of day b
    unadded = file("unadded.csv", (added, "true"))  # what first.csv added

    def check(path: Path, together: CheckedTogether | None = None):
        return check_file(storage, contract, path, as_of=AS_OF, correction=True, together=together)

    before = _store_files(storage.root)
    together = CheckedTogether()
    assert check(first, together).removed_dates == []
    with pytest.raises(ValidationFailed, match="again.csv would be rejected.*name no published"):
        check(again, together)
    assert check(rest, together).removed_dates == [days[-11]]
    assert check(unadded, together).status == "checked"
    assert _store_files(storage.root) == before
    # The layer they leave reads as the store does: day a without the bars retracted, typed.
    day_a = pd.Timestamp(days[-10]).date()
    left = together.published(storage, contract).read_partitions(
        "validated", "market", days=[day_a], columns=["date", "ticker"]
    )
    assert left["date"].dtype.kind == "M"
    assert sorted(left["ticker"]) == sorted({*on_a["Ticker"]} - {on_a["Ticker"].iloc[1]})
    # Each alone against the store, the other way round.
    assert check(again).status == "checked"
    assert check(rest).removed_dates == []
    with pytest.raises(ValidationFailed, match="unadded.csv would be rejected.*name no published"):
        check(unadded)

    # Loading them in order does what the checks together said.
    def load(path: Path):
        return ingest_file(storage, contract, path, as_of=AS_OF, correction=True)

    assert load(first).status == "validated"
    with pytest.raises(ValidationFailed, match="retraction_names_no_published_row"):
        load(again)
    assert load(rest).removed_dates == [days[-11]]
    assert load(unadded).status == "validated"


# -- the property: a dry run says what ingest then does, file by file, whatever the files ---
_DAYS = [day.date().isoformat() for day in pd.bdate_range("2024-01-02", periods=4)]
_TICKERS = ["A", "B", "C", "D"]  # the history: the first three days of A, B and C
_KEYS = [(day, ticker) for day in _DAYS for ticker in _TICKERS]
# Per key, what a file does: nothing, deliver (a correction: restate, or add) or retract.
_FILE = st.tuples(
    st.booleans(),  # a correction
    st.lists(st.sampled_from(["-", "-", "put", "retract"]), min_size=16, max_size=16),
)


@settings(max_examples=12, deadline=None, derandomize=True)
# A delivery of a new key, a correction retracting it, the same delivery again.
@example(files=[(False, ["-"] * 15 + ["put"]), (True, ["-"] * 15 + ["retract"])] * 2)
# A published bar retracted, then delivered again; a bar a correction adds, then delivered.
@example(files=[(True, ["retract"] + ["-"] * 15), (False, ["put"] + ["-"] * 15)])
@example(files=[(True, ["-"] * 15 + ["put"]), (False, ["-"] * 15 + ["put"])])
# Two corrections retracting the same bar; then one emptying a day the first half-emptied.
@example(
    files=[
        (True, ["retract", "retract"] + ["-"] * 14),
        (True, ["retract"] + ["-"] * 15),
        (True, ["-", "-", "retract"] + ["-"] * 13),
    ]
)
@given(files=st.lists(_FILE, min_size=2, max_size=4))
def test_a_dry_run_says_what_ingest_then_does_file_by_file(files):
    """Deliveries and corrections, checked together then loaded in order: each file's verdict
    (loaded or skipped, its rows, the rows it replaces and retracts, the dates it removes, or
    the rules it breaks) is the same, and the layer the dry run foresaw is the one left."""
    contract = get_domain("market").contract
    history = pd.DataFrame(
        [
            (day, ticker, 100.0 + i)
            for i, (day, ticker) in enumerate(_KEYS)
            if day != _DAYS[-1] and ticker != "D"
        ],
        columns=["Date", "Ticker", "Close"],
    )
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        storage = Storage(root / "home")
        history.to_csv(root / "history.csv", index=False)
        ingest_file(storage, contract, root / "history.csv", as_of=AS_OF)
        paths = [
            _written(root, n, correction, actions) for n, (correction, actions) in enumerate(files)
        ]
        before = _store_files(storage.root)
        together = CheckedTogether()
        foreseen = [
            _verdict(
                lambda p=p, c=c: check_file(
                    storage, contract, p, as_of=AS_OF, correction=c, together=together
                )
            )
            for p, c in paths
        ]
        assert _store_files(storage.root) == before
        layer = together.published(storage, contract)
        dates = layer.partition_dates("validated", "market")
        expected = layer.read_partitions("validated", "market", days=dates)
        done = [
            _verdict(lambda p=p, c=c: ingest_file(storage, contract, p, as_of=AS_OF, correction=c))
            for p, c in paths
        ]
        assert foreseen == done
        assert storage.partition_dates("validated", "market") == dates
        columns = ["date", "ticker", "close", "batch_id"]
        pd.testing.assert_frame_equal(
            _sorted(storage.read_partitions("validated", "market", days=dates)[columns]),
            _sorted(expected[columns]),
        )


def _written(root: Path, number: int, correction: bool, actions: list[str]) -> tuple[Path, bool]:
    """Write file `number`: per key of _KEYS, a bar delivered (or restated) or retracted; an
    ordinary delivery brings the bars it puts that the history lacks (ticker D, the last day),
    so that what decides its verdict is the files before it."""
    rows = [
        (day, ticker, 110.0 + number + i / 10, action == "retract")
        for i, ((day, ticker), action) in enumerate(zip(_KEYS, actions, strict=True))
        if action != "-"
        and (correction or (action == "put" and (ticker == "D" or day == _DAYS[-1])))
    ]
    frame = pd.DataFrame(rows, columns=["Date", "Ticker", "Close", "Retracted"])
    if not correction:
        frame = frame.drop(columns="Retracted")
    path = root / f"file{number}.csv"
    frame.to_csv(path, index=False)
    return path, correction


def _verdict(run) -> tuple:
    """What ingest or its dry run did with a file, in terms both say it."""
    try:
        outcome = run()
    except ValidationFailed as error:
        return ("rejected", re.search(r"rules failed: (.*?)\)\.", str(error)).group(1))
    status = "loaded" if outcome.status in ("checked", "validated") else outcome.status
    return (
        status,
        outcome.rows,
        outcome.corrected_rows,
        outcome.retracted_rows,
        list(outcome.removed_dates or []),
    )


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.astype({"ticker": object, "batch_id": object})
    return frame.sort_values(["date", "ticker"], ignore_index=True)
