"""The validated layer as known at a time (`finpipe.vintages`): replaying the store's batch
records and superseded rows gives back, at every moment, exactly what the layer held then,
through deliveries, corrections of every domain and a correction cut short."""

from __future__ import annotations

import datetime as dt
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from finpipe.credit.contract import credit_contract
from finpipe.customers.synthetic import (
    CustomersSyntheticConfig,
    generate_customer_transactions,
)
from finpipe.customers.synthetic import write_vendor_files as write_transactions
from finpipe.domains import get_domain
from finpipe.errors import ConfigError, ValidationFailed
from finpipe.ingest import ingest_file
from finpipe.market.synthetic import MarketSyntheticConfig, generate_market_panel
from finpipe.market.synthetic import write_vendor_files as write_prices
from finpipe.storage import Storage
from finpipe.vintages import utc_time, validated_as_known
from tests.test_corrections_credit_customers import BOOK, D1, D2, _loans

START = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)


class _Clock:
    """Stands in for ingest's wall clock: each batch is validated an hour after the last."""

    def __init__(self, monkeypatch):
        self.now = START
        monkeypatch.setattr("finpipe.ingest._now", lambda: self.now.isoformat(timespec="seconds"))

    def tick(self) -> dt.datetime:
        self.now += dt.timedelta(hours=1)
        return self.now


def _read_export(path) -> pd.DataFrame:
    """`finpipe validated --out`'s file as finpipe's readers give a layer: days as datetime64."""
    frame = pd.read_parquet(path)
    return frame.assign(date=pd.to_datetime(frame["date"]).astype("datetime64[ns]"))


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(list(frame.columns), kind="stable").reset_index(drop=True)


def _replay(storage, contract, steps, clock) -> list[tuple[dt.datetime, pd.DataFrame]]:
    """Run `steps` (path, as-of, correction) one clock tick apart; return each moment and the
    layer as it stood right after it."""
    seen = []
    for path, as_of, correction in steps:
        when = clock.tick()
        assert ingest_file(storage, contract, path, as_of=as_of, correction=correction).status == (
            "validated"
        )
        seen.append((when, _sorted(storage.read_partitions("validated", contract.domain))))
    return seen


def _assert_every_moment(storage, contract, seen) -> None:
    assert validated_as_known(storage, contract, START).empty  # before the first batch
    for (when, layer), following in zip(seen, [*seen[1:], (None, None)], strict=True):
        for moment in (when, when + dt.timedelta(minutes=30)):
            pd.testing.assert_frame_equal(
                _sorted(validated_as_known(storage, contract, moment)), layer
            )
        if following[0] is not None:  # and nothing of the next batch before it
            assert not layer.equals(following[1])


def test_market_corrections_replay_to_what_the_layer_held(tmp_path, monkeypatch):
    panel = generate_market_panel(
        MarketSyntheticConfig(
            tickers=3, days=305, seed=5, listing_fraction=0.0, delisting_fraction=0.0
        )
    )
    files = write_prices(panel.prices, tmp_path / "drop", daily_files=2)
    vendor = pd.read_csv(files[0])
    days = sorted(vendor["Date"].unique())
    fixes = []
    for number, day in enumerate((days[-3], days[-3], days[-5])):  # the same day twice
        rows = vendor[vendor["Date"] == day].copy()
        for column in ("Open", "High", "Low", "Close", "Adj Close"):
            rows[column] = (rows[column] * (1.01 + number / 100)).round(4)
        fixes.append(tmp_path / f"fix{number}.csv")
        rows.to_csv(fixes[-1], index=False)
    storage, contract = Storage(tmp_path / "home"), get_domain("market").contract
    steps = [
        (files[0], "2030-01-01", False),
        (fixes[0], "2030-01-01", True),
        (files[1], "2030-01-01", False),
        (fixes[1], "2030-01-01", True),  # corrects the correction
        (fixes[2], "2030-01-01", True),
        (files[2], "2030-01-01", False),
    ]
    seen = _replay(storage, contract, steps, _Clock(monkeypatch))
    _assert_every_moment(storage, contract, seen)


def test_loan_and_transaction_corrections_replay_to_what_the_layer_held(tmp_path, monkeypatch):
    clock = _Clock(monkeypatch)
    storage, contract = Storage(tmp_path / "loans"), credit_contract(BOOK)
    night = _loans(tmp_path, "night.csv", ("L1", D1, "", 1000.0), ("L2", D2, "good", 20.0))
    later = _loans(tmp_path, "later.csv", ("L1", D1, "good", 1000.0))
    fix = _loans(tmp_path, "fix.csv", ("L1", D1, "bad", 1500.0), ("L2", D2, "good", 25.0))
    steps = [(night, "2024-01-05", False), (later, "2024-02-20", False), (fix, "2024-03-01", True)]
    _assert_every_moment(storage, contract, _replay(storage, contract, steps, clock))

    log = generate_customer_transactions(CustomersSyntheticConfig(customers=20, days=40, seed=4))
    files = write_transactions(log.transactions, tmp_path / "drop", daily_files=1)
    restated = pd.read_csv(files[0]).head(3).assign(Amount=lambda rows: rows["Amount"] + 1)
    restated.to_csv(tmp_path / "restated.csv", index=False)
    storage, contract = Storage(tmp_path / "customers"), get_domain("customers").contract
    steps = [
        (files[0], "2030-01-01", False),
        (tmp_path / "restated.csv", "2030-01-01", True),
        (files[1], "2030-01-01", False),
    ]
    _assert_every_moment(storage, contract, _replay(storage, contract, steps, clock))


def test_a_correction_cut_short_was_never_known(
    tmp_path, monkeypatch, disk_full_after_one_partition
):
    clock = _Clock(monkeypatch)
    storage, contract = Storage(tmp_path / "loans"), credit_contract(BOOK)
    night = _loans(tmp_path, "night.csv", ("L1", D1, "", 1000.0), ("L2", D2, "good", 20.0))
    fix = _loans(tmp_path, "fix.csv", ("L1", D1, "bad", 1500.0), ("L2", D2, "good", 25.0))
    ((_, layer),) = _replay(storage, contract, [(night, "2024-01-05", False)], clock)
    disk_full_after_one_partition()
    clock.tick()
    with pytest.raises(OSError, match="disk full"):
        ingest_file(storage, contract, fix, as_of="2024-03-01", correction=True)
    monkeypatch.undo()
    assert not _sorted(storage.read_partitions("validated", "credit")).equals(layer)  # half
    pd.testing.assert_frame_equal(
        _sorted(validated_as_known(storage, contract, clock.tick())), layer
    )


def test_the_command_line_writes_the_layer_as_known_at_a_time(tmp_path, monkeypatch):
    from finpipe.cli import app

    panel = generate_market_panel(MarketSyntheticConfig(tickers=2, days=305, seed=6))
    (history,) = write_prices(panel.prices, tmp_path / "drop", daily_files=0)
    rows = pd.read_csv(history)
    fixed = rows[rows["Date"] == rows["Date"].max()].copy()
    for column in ("Open", "High", "Low", "Close", "Adj Close"):
        fixed[column] = (fixed[column] * 1.01).round(4)
    fixed.to_csv(tmp_path / "fix.csv", index=False)
    storage, contract = Storage(tmp_path / "home"), get_domain("market").contract
    steps = [(history, "2030-01-01", False), (tmp_path / "fix.csv", "2030-01-01", True)]
    clock = _Clock(monkeypatch)
    seen = _replay(storage, contract, steps, clock)
    monkeypatch.setenv("FINPIPE_HOME", str(storage.root))
    out = tmp_path / "then.parquet"
    result = CliRunner().invoke(
        app, ["validated", "market", "--known-at", "2026-03-02T10:30", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert f"{len(rows)} rows of market as known at 2026-03-02T10:30:00+00:00" in result.output
    assert pq.read_schema(out).field("date").type == pa.date32()  # a calendar day, as stored
    pd.testing.assert_frame_equal(_sorted(_read_export(out)), seen[0][1])
    then = _read_export(out).set_index(["date", "ticker"])["close"]
    assert then.loc[pd.Timestamp(fixed["Date"].iloc[0])].tolist() == pytest.approx(
        (fixed["Close"] / 1.01).tolist(), abs=1e-3
    )
    latest = CliRunner().invoke(app, ["validated", "market", "--out", str(out)])
    assert latest.exit_code == 0, latest.output
    pd.testing.assert_frame_equal(_sorted(_read_export(out)), seen[1][1])

    # `finpipe batches` lists the deliveries in order, with the times --known-at takes.
    bad = tmp_path / "bad.csv"
    fixed.assign(Close=-1.0).to_csv(bad, index=False)
    clock.tick()
    with pytest.raises(ValidationFailed):
        ingest_file(storage, contract, bad, as_of="2030-01-01")
    unreadable = tmp_path / "unreadable.csv"
    unreadable.write_text("a,b\n1,2\n")
    clock.tick()
    with pytest.raises(ValidationFailed):
        ingest_file(storage, contract, unreadable, as_of="2030-01-01")
    listed = CliRunner().invoke(app, ["batches", "market"])
    assert listed.exit_code == 0, listed.output
    header, *lines = listed.output.strip().splitlines()
    assert header.split() == [
        "when", "status", "batch", "file", "rows", "replaced", "retracted", "dates"
    ]  # fmt: skip
    day = fixed["Date"].iloc[0]
    assert [line.split()[:2] + line.split()[3:] for line in lines] == [
        ["2026-03-02T10:00:00+00:00", "validated", history.name, f"{len(rows):,}", "-", "-"]
        + [rows["Date"].min(), "..", day],
        ["2026-03-02T11:00:00+00:00", "validated", "fix.csv", "2", "2", "0", day, "..", day],
        # A quarantined file: the rows its suite checked and their dates; none for one
        # refused before its suite ran (its columns are not the contract's).
        ["2026-03-02T12:00:00+00:00", "quarantined", "bad.csv", "2", "-", "-", day, "..", day],
        ["2026-03-02T13:00:00+00:00", "quarantined", unreadable.name, "-", "-", "-"]
        + ["-", "..", "-"],
    ]
    unknown = CliRunner().invoke(app, ["batches", "bonds"])
    assert isinstance(unknown.exception, ConfigError)
    assert "unknown domain 'bonds'" in str(unknown.exception)


def test_a_time_without_a_zone_is_utc_whatever_the_machines_time_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert utc_time("2026-03-02T10:00") == dt.datetime(2026, 3, 2, 10, tzinfo=dt.UTC)
        assert utc_time("2026-03-02T10:00-05:00") == dt.datetime(2026, 3, 2, 15, tzinfo=dt.UTC)
    finally:
        monkeypatch.undo()
        time.tzset()
