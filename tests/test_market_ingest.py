"""Market deliveries through the ingest path: real price moves are warnings, splits in
unadjusted closes are errors that say what to do."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from finpipe.domains import get_domain
from finpipe.errors import ValidationFailed
from finpipe.ingest import ingest_file
from finpipe.storage import Storage


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
