"""Market deliveries through the ingest path: real price moves are warnings, splits in
unadjusted closes are errors that say what to do."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from finpipe.domains import get_domain
from finpipe.errors import ValidationFailed
from finpipe.ingest import ingest_file
from finpipe.market.schema import normalise_market_frame
from finpipe.storage import Storage
from finpipe.validation import ValidationReport
from tests.test_layout_readers import read_layer_every_way


def _sample(shared_datasets) -> pd.DataFrame:
    return pd.read_csv(shared_datasets / "stocks_ohlcv.csv.gz")


def _ingest(storage: Storage, path, as_of="2013-03-01"):
    return ingest_file(storage, get_domain("market").contract, path, as_of=as_of)


def test_an_earnings_jump_is_accepted_with_a_warning(tmp_path, shared_datasets):
    msft = _sample(shared_datasets).query("Ticker == 'MSFT'").tail(60).reset_index(drop=True)
    gap_day = msft.loc[40, "Date"]
    prices = ["Open", "High", "Low", "Close", "Adj Close"]
    msft.loc[40:, prices] *= 1.52  # a +52% earnings gap that holds
    path = tmp_path / "msft.csv"
    msft.to_csv(path, index=False)
    storage = Storage(tmp_path / "home")

    outcome = _ingest(storage, path)

    assert (outcome.status, outcome.rows) == ("validated", 60)
    [warning] = outcome.warnings
    assert warning.startswith("large_move_1d(abs_log_return_1d): 1 unexpected row(s)")
    assert f"date={gap_day}, ticker=MSFT" in warning
    assert "validated with 1 warning: large_move_1d" in outcome.message
    record = storage.read_batch_record("market", outcome.sha256)
    assert record["warnings"] == [warning]
    published = storage.read_partitions("validated", "market")
    assert len(published) == 60  # every row, the jump included


def test_a_split_in_unadjusted_closes_is_rejected_with_the_advice(tmp_path, shared_datasets):
    raw = _sample(shared_datasets).drop(columns=["Adj Close"])
    path = tmp_path / "unadjusted.csv"
    raw.to_csv(path, index=False)
    storage = Storage(tmp_path / "home")
    with pytest.raises(ValidationFailed) as caught:
        _ingest(storage, path)
    message = str(caught.value)
    assert "date=2000-06-21, ticker=AAPL" in message  # AAPL's 2:1 split
    assert "deliver adj_close" in message
    assert "FINPIPE_MARKET_CLOSE_IS_ADJUSTED=true" in message
    [folder] = storage.quarantine_dir("market").iterdir()
    report = json.loads((folder / "report.json").read_text())
    broken = [r for r in report["rules"] if not r["success"] and r["severity"] == "error"]
    assert [r["rule"] for r in broken] == [
        "expect_column_values_to_be_between(abs_log_return_1d_unadjusted)"
    ]
    assert storage.partition_dates("validated", "market") == []


def test_declaring_close_adjusted_accepts_large_moves_with_warnings(
    tmp_path, shared_datasets, monkeypatch
):
    monkeypatch.setenv("FINPIPE_MARKET_CLOSE_IS_ADJUSTED", "true")
    raw = _sample(shared_datasets).drop(columns=["Adj Close"]).query("Ticker == 'MSFT'")
    raw = raw[raw["Date"].between("2002-11-01", "2003-05-30")]  # the split, not 13 years of dates
    path = tmp_path / "closes.csv"
    raw.to_csv(path, index=False)
    outcome = _ingest(Storage(tmp_path / "home"), path)
    assert outcome.status == "validated"
    assert any("date=2003-02-18, ticker=MSFT" in w for w in outcome.warnings)  # the 2:1 split


def _bars(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def _failed_rules(storage: Storage, error: ValidationFailed) -> dict[str, dict]:
    report = json.loads((storage.root / error.quarantine_path / "report.json").read_text())
    return {r["rule"]: r for r in report["rules"] if not r["success"]}


def test_a_bad_tick_is_caught_when_the_batch_also_holds_an_older_row(tmp_path):
    """Each ticker's first row is compared with its own last accepted price: a late row of
    another ticker, older than the ticker's last accepted day, once left it unchecked."""
    storage = Storage(tmp_path / "home")
    days = pd.bdate_range("2024-01-02", "2024-01-10").strftime("%Y-%m-%d")
    history = "date,ticker,close\n" + "".join(f"{d},AAPL,100\n{d},IBM,50\n" for d in days)
    _ingest(storage, _bars(tmp_path, "history.csv", history), as_of="2024-01-31")
    late = "date,ticker,close\n2024-01-11,AAPL,1000\n2023-12-29,IBM,50\n"
    with pytest.raises(ValidationFailed) as caught:
        _ingest(storage, _bars(tmp_path, "tick.csv", late), as_of="2024-01-31")
    failed = _failed_rules(storage, caught.value)
    moves = failed["expect_column_values_to_be_between(abs_log_return_1d)"]
    assert (moves["sample_rows"], moves["sample_values"]) == ([0], [pytest.approx(2.302585)])
    assert storage.read_partitions("validated", "market")["close"].max() == 100


def test_a_column_delivered_twice_is_refused_not_half_read(tmp_path):
    storage = Storage(tmp_path / "home")
    path = _bars(tmp_path, "twice.csv", "date,ticker,close,close\n2024-01-02,AAPL,185.6,18.56\n")
    with pytest.raises(ValidationFailed, match=r"column\(s\) \['close'\] appear more than once"):
        _ingest(storage, path, as_of="2024-01-31")
    assert storage.partition_dates("validated", "market") == []


def test_day_first_dates_land_on_their_days_and_zone_names_keep_the_day(tmp_path):
    storage = Storage(tmp_path / "home")
    european = "date,ticker,close\n08/01/2024,AAPL,108\n09/01/2024,AAPL,109\n15/01/2024,AAPL,115\n"
    _ingest(storage, _bars(tmp_path, "eu.csv", european), as_of="2024-01-31")
    export = (
        "date,ticker,close\n2024-01-16 21:00:00 UTC,AAPL,116\n2024-01-17T16:00:00+05,AAPL,117\n"
    )
    _ingest(storage, _bars(tmp_path, "export.csv", export), as_of="2024-01-31")
    published = storage.read_partitions("validated", "market").sort_values("date")
    assert published["date"].dt.strftime("%m-%d").tolist() == [
        "01-08",
        "01-09",
        "01-15",
        "01-16",
        "01-17",
    ]
    assert published["close"].tolist() == [108, 109, 115, 116, 117]


def test_an_ambiguous_day_month_order_is_quarantined_with_what_to_do(tmp_path):
    storage = Storage(tmp_path / "home")
    path = _bars(tmp_path, "daily.csv", "date,ticker,close\n08/01/2024,AAPL,108\n")
    with pytest.raises(ValidationFailed) as caught:
        _ingest(storage, path, as_of="2024-12-31")
    parse = _failed_rules(storage, caught.value)["parseable_values"]
    assert "FINPIPE_DATE_ORDER" in parse["sample_values"][0]["date"]


def test_blank_and_invisible_tickers_are_refused_not_published_as_other_instruments(tmp_path):
    storage = Storage(tmp_path / "home")
    text = "date,ticker,close\n2024-01-02,AAPL,185\n2024-01-02,   ,185\n2024-01-03,AAPL\u200b,186\n"
    with pytest.raises(ValidationFailed) as caught:
        _ingest(storage, _bars(tmp_path, "tickers.csv", text), as_of="2024-01-31")
    failed = _failed_rules(storage, caught.value)
    assert failed["expect_column_values_to_not_be_null(ticker)"]["sample_rows"] == [1, 2]
    assert failed["parseable_values"]["sample_values"] == [
        {"ticker": "'AAPL\\u200b' (invisible characters)"}
    ]


@pytest.mark.unit
def test_a_file_mixing_time_zones_reports_only_the_rows_of_the_rarer_form():
    text = (
        "date,ticker,close\n2024-01-02,AAA,10.0\n2024-01-03,AAA,10.1\n"
        "2024-01-04T00:00:00+02:00,AAA,10.2\n2024-01-05,AAA,10.3\n2024-01-08,AAA,10.4\n"
    )
    frame = normalise_market_frame(pd.read_csv(io.StringIO(text)))
    problems = frame.attrs["parse_errors"]["date"]
    assert problems.dropna().to_dict() == {2: "mixed time zones: 2024-01-04T00:00:00+02:00"}
    days = frame["date"].dt.strftime("%m-%d").fillna("unparsed").tolist()
    assert days == ["01-02", "01-03", "unparsed", "01-05", "01-08"]


@pytest.mark.parametrize(
    ("text", "broken"),
    [
        (  # the suite's rules, then one ingest checks itself (its `message`)
            "date,ticker,close\n2024-01-02,BBB,10.0\n2024-01-03,BBB,12k\n",
            ["expect_column_values_to_not_be_null(close)", "parseable_values"],
        ),
        ("", ["readable_file"]),  # refused before the suite ran: no rows, values or row count
    ],
    ids=["suite and ingest rules", "unreadable file"],
)
def test_a_quarantined_report_reads_back_as_a_validation_report(tmp_path, text, broken):
    path = _bars(tmp_path, "bars.csv", text)
    storage = Storage(tmp_path / "home")
    with pytest.raises(ValidationFailed) as caught:
        _ingest(storage, path, as_of="2024-01-31")
    payload = json.loads((storage.root / caught.value.quarantine_path / "report.json").read_text())

    report = ValidationReport.from_dict(payload)

    assert (report.source, [r.rule for r in report.failures()]) == (str(path), broken)
    assert report.failures()[-1].message == payload["rules"][-1]["message"]
    restored = report.to_dict()  # all the file says, and defaults for what it leaves out
    assert {k: v for k, v in restored.items() if k in payload and k != "rules"} == {
        k: v for k, v in payload.items() if k != "rules"
    }
    assert all(
        written.items() <= read.items()
        for written, read in zip(payload["rules"], restored["rules"], strict=True)
    )
    assert ValidationReport.from_dict(restored) == report


def test_the_same_bytes_under_two_names_keep_both_names_in_one_record(tmp_path):
    """A batch is its content: two rejected deliveries of the same bytes share a record and a
    quarantine, which name both files, so the earlier one does not drop out of sight; and a
    loaded file delivered again under another name is said to be that file."""
    from finpipe.calendars import BusinessDays
    from finpipe.status import domain_status, needs_attention
    from finpipe.vintages import batch_history

    storage = Storage(tmp_path / "home")
    bad = "date,ticker,close\n2024-01-02,AAA,-1\n"
    for name in ("market_2024-01-02.csv", "market_2024-01-03.csv"):
        (tmp_path / name).write_text(bad)
        with pytest.raises(ValidationFailed):
            _ingest(storage, tmp_path / name, as_of="2024-01-03")
    status = domain_status(storage, "market", BusinessDays())
    [shown] = status.quarantined
    assert shown.file == "market_2024-01-03.csv (also delivered as market_2024-01-02.csv)"
    assert needs_attention(status) == ["1 quarantined file waiting for a fixed delivery"]
    [row] = batch_history(storage, "market").to_dict("records")
    assert row["file"] == shown.file

    # Fixed under the later name only: the earlier name still waits for its delivery.
    (tmp_path / "market_2024-01-03.csv").write_text("date,ticker,close\n2024-01-03,AAA,5\n")
    _ingest(storage, tmp_path / "market_2024-01-03.csv", as_of="2024-01-03")
    assert domain_status(storage, "market", BusinessDays()).waiting == 1
    (tmp_path / "market_2024-01-02.csv").write_text("date,ticker,close\n2024-01-02,AAA,4\n")
    _ingest(storage, tmp_path / "market_2024-01-02.csv", as_of="2024-01-03")
    assert domain_status(storage, "market", BusinessDays()).waiting == 0

    (tmp_path / "copy.csv").write_text("date,ticker,close\n2024-01-02,AAA,4\n")
    again = _ingest(storage, tmp_path / "copy.csv", as_of="2024-01-03")
    assert again.status == "already_loaded"
    assert " as market_2024-01-02.csv (the same bytes); skipped" in again.message


def test_bad_bytes_fixed_under_each_name_they_came_as_wait_for_nothing(tmp_path, monkeypatch):
    """Each name's fix counts from when that name's bad delivery landed, not from the last
    landing of the bytes; and the same file by another path is not a second name."""
    from finpipe.calendars import BusinessDays
    from finpipe.status import domain_status

    storage = Storage(tmp_path / "home")
    bad, fixed = "date,ticker,close\n2024-01-02,AAA,-1\n", "date,ticker,close\n2024-01-02,AAA,{}\n"
    for name, price in [("a.csv", 4), ("b.csv", 5)]:
        (tmp_path / name).write_text(bad)
        with pytest.raises(ValidationFailed):
            _ingest(storage, tmp_path / name, as_of="2024-01-03")
        (tmp_path / name).write_text(fixed.format(price))
        if name == "a.csv":
            _ingest(storage, tmp_path / name, as_of="2024-01-03")
        else:  # a correction: b.csv restates the row a.csv published
            ingest_file(storage, get_domain("market").contract, tmp_path / name,
                        as_of="2024-01-03", correction=True)  # fmt: skip
    status = domain_status(storage, "market", BusinessDays())
    assert (status.waiting, status.redelivered) == (0, 1)

    (tmp_path / "c.csv").write_text("date,ticker,close\n2024-01-03,AAA,-2\n")
    monkeypatch.chdir(tmp_path)
    for path in (tmp_path / "c.csv", Path("c.csv")):  # a glob's absolute path, a typed one
        with pytest.raises(ValidationFailed):
            _ingest(storage, path, as_of="2024-01-03")
    [shown] = domain_status(storage, "market", BusinessDays()).quarantined
    assert shown.file == "c.csv"


def test_a_day_delivered_without_the_optional_columns_keeps_the_layer_schema(tmp_path):
    """A daily file of date, ticker and close after a history with every column: its partition
    holds the optional columns too, empty, in the layer's order. Without them Polars and DuckDB
    refused to read the layer (column "open" not found in that file)."""
    storage = Storage(tmp_path / "home")
    history = "date,ticker,open,high,low,close,adj_close,volume\n" + "".join(
        f"2024-01-0{d},{t},10,11,9,10.5,10.4,1000\n" for d in (2, 3) for t in ("AAPL", "IBM")
    )
    _ingest(storage, _bars(tmp_path, "history.csv", history), as_of="2024-01-31")
    daily = "date,ticker,close\n2024-01-04,AAPL,10.6\n2024-01-04,IBM,10.7\n"
    _ingest(storage, _bars(tmp_path, "daily.csv", daily), as_of="2024-01-31")
    files = sorted(storage.layer_dir("validated", "market").glob("*/part-0.parquet"))
    schemas = [pq.read_schema(file).remove_metadata() for file in files]
    assert len(files) == 3 and all(schema == schemas[0] for schema in schemas)
    assert schemas[0].names == [
        "date", "ticker", "close", "open", "high", "low", "volume", "adj_close", "batch_id"
    ]  # fmt: skip
    seen = read_layer_every_way(storage.layer_dir("validated", "market"))
    assert {reader: rows for reader, (rows, _) in seen.items()} == dict.fromkeys(seen, 6)
    day = storage.read_partition("validated", "market", "2024-01-04")
    assert day[["open", "volume", "adj_close"]].isna().all(axis=None)


def test_a_day_without_the_optional_columns_after_a_narrow_newest_file_keeps_them(tmp_path):
    """A close-only day came first, then the full history before it (a backfill): the layer
    holds the optional columns, so the next close-only day is published with them, though the
    newest file (the first close-only day, published when the layer was empty) lacks them."""
    storage = Storage(tmp_path / "home")
    close_only = "date,ticker,close\n2024-01-{day},AAPL,10.6\n2024-01-{day},IBM,10.7\n"
    _ingest(storage, _bars(tmp_path, "d10.csv", close_only.format(day=10)), as_of="2024-01-31")
    history = "date,ticker,open,high,low,close,adj_close,volume\n" + "".join(
        f"2024-01-0{d},{t},10,11,9,10.5,10.4,1000\n" for d in (8, 9) for t in ("AAPL", "IBM")
    )
    _ingest(storage, _bars(tmp_path, "history.csv", history), as_of="2024-01-31")
    _ingest(storage, _bars(tmp_path, "d11.csv", close_only.format(day=11)), as_of="2024-01-31")
    layer = storage.layer_dir("validated", "market")
    assert pq.read_schema(layer / "2024-01-11" / "part-0.parquet").names == (
        pq.read_schema(layer / "2024-01-08" / "part-0.parquet").names
    )
