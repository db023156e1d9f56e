"""A vendor's correction of rows already published (`finpipe ingest --correction`): each row
replaces the published row with its key, the replaced rows are kept, nothing is duplicated,
and the features rebuilt afterwards equal a rebuild from scratch on the corrected data."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from finpipe.domains import get_domain
from finpipe.errors import ValidationFailed
from finpipe.ingest import BATCH_COLUMN, ingest_file
from finpipe.market.features import update_market_features

AS_OF = "2025-06-30"  # a past day: the command line refuses a later as-of
KEYS = ["date", "ticker"]


def _ingest(storage, path, **options):
    return ingest_file(storage, get_domain("market").contract, path, as_of=AS_OF, **options)


def _corrected(vendor: pd.DataFrame, day: str, folder, name: str) -> tuple[pd.DataFrame, object]:
    """The vendor's rows of `day` with every close 1% higher (a restated day), written to a file."""
    rows = vendor[vendor["Date"] == day].copy()
    for column in ("Open", "High", "Low", "Close", "Adj Close"):
        rows[column] = (rows[column] * 1.01).round(4)
    path = folder / name
    rows.to_csv(path, index=False)
    return rows, path


def test_a_correction_replaces_the_rows_it_repeats_and_keeps_the_replaced_ones(delivered, tmp_path):
    storage, files, vendor = delivered
    day = sorted(vendor["Date"].unique())[-10]  # inside the history file
    before = storage.read_partitions("validated", "market")
    rows, path = _corrected(vendor, day, tmp_path, f"market_{day}_restated.csv")

    # As an ordinary delivery it repeats published keys: quarantined, nothing changes.
    with pytest.raises(ValidationFailed, match="duplicate_key_across_batches"):
        _ingest(storage, path)
    pd.testing.assert_frame_equal(storage.read_partitions("validated", "market"), before)

    outcome = _ingest(storage, path, correction=True)
    assert outcome.status == "validated" and outcome.rows == len(rows) == 4
    assert "a correction: 4 published rows of b" in outcome.message
    after = storage.read_partitions("validated", "market")
    assert len(after) == len(before) and not after.duplicated(KEYS).any()
    restated = after[after["date"] == pd.Timestamp(day)].set_index("ticker").sort_index()
    expected = rows.set_index("Ticker").sort_index()
    assert restated["close"].tolist() == pytest.approx(expected["Close"].tolist())
    assert set(restated[BATCH_COLUMN]) == {outcome.batch_id}
    # Every other day is untouched, to the byte.
    others = after["date"] != pd.Timestamp(day)
    pd.testing.assert_frame_equal(
        after[others].reset_index(drop=True),
        before[before["date"] != pd.Timestamp(day)].reset_index(drop=True),
    )
    # The replaced rows are kept, as they were published, and the batch record says where.
    record = storage.read_batch_record("market", outcome.sha256)
    kept = pd.read_parquet(
        storage.local_path(f"state/market/superseded/{outcome.batch_id}.parquet")
    )
    pd.testing.assert_frame_equal(
        kept.sort_values(KEYS).reset_index(drop=True),
        before[before["date"] == pd.Timestamp(day)].sort_values(KEYS).reset_index(drop=True),
    )
    assert record["corrected_rows"] == 4 and record["corrected_batches"] == sorted(
        set(kept[BATCH_COLUMN])
    )
    # The same correction again, or the original file again, changes nothing.
    assert _ingest(storage, path, correction=True).status == "already_loaded"
    assert _ingest(storage, files[0]).status == "already_loaded"
    pd.testing.assert_frame_equal(storage.read_partitions("validated", "market"), after)


def test_a_correction_with_a_bad_row_is_quarantined_whole_and_replaces_nothing(delivered, tmp_path):
    storage, _, vendor = delivered
    day = sorted(vendor["Date"].unique())[-10]
    rows, path = _corrected(vendor, day, tmp_path, "restated.csv")
    rows.loc[rows.index[0], "Close"] = -5.0  # a negative price
    rows.to_csv(path, index=False)
    before = storage.read_partitions("validated", "market")
    with pytest.raises(ValidationFailed):
        _ingest(storage, path, correction=True)
    pd.testing.assert_frame_equal(storage.read_partitions("validated", "market"), before)
    assert not storage.exists("state/market/superseded")


def test_a_correction_cut_short_completes_on_a_rerun_with_the_first_copy_of_what_it_replaced(
    delivered, tmp_path, monkeypatch, disk_full_after_one_partition
):
    """Two days corrected in one file; the first partition written, then a failure: the
    re-run publishes both, and the superseded rows kept are all of them, from before."""
    storage, _, vendor = delivered
    days = sorted(vendor["Date"].unique())[-12:-10]
    first, _ = _corrected(vendor, days[0], tmp_path, "one.csv")
    second, _ = _corrected(vendor, days[1], tmp_path, "two.csv")
    path = tmp_path / "both.csv"
    pd.concat([first, second]).to_csv(path, index=False)
    before = storage.read_partitions("validated", "market")
    replaced = before[before["date"].isin(pd.to_datetime(days))]

    disk_full_after_one_partition()
    with pytest.raises(OSError, match="disk full"):
        _ingest(storage, path, correction=True)
    monkeypatch.undo()

    outcome = _ingest(storage, path, correction=True)
    assert outcome.status == "validated"
    after = storage.read_partitions("validated", "market")
    assert len(after) == len(before) and not after.duplicated(KEYS).any()
    corrected = after[after["date"].isin(pd.to_datetime(days))]
    assert set(corrected[BATCH_COLUMN]) == {outcome.batch_id}
    kept = pd.read_parquet(
        storage.local_path(f"state/market/superseded/{outcome.batch_id}.parquet")
    )
    pd.testing.assert_frame_equal(
        kept.sort_values(KEYS).reset_index(drop=True),
        replaced.sort_values(KEYS).reset_index(drop=True),
    )


def test_features_after_a_correction_equal_a_rebuild_from_scratch(delivered, tmp_path):
    storage, _, vendor = delivered
    last = pd.Timestamp(sorted(vendor["Date"].unique())[-1]).date()
    update_market_features(storage, last)
    day = sorted(vendor["Date"].unique())[-30]
    _, path = _corrected(vendor, day, tmp_path, "restated.csv")
    _ingest(storage, path, correction=True)

    update = update_market_features(storage, last)  # incremental: from the corrected day on
    assert update.dates_written[0] == day
    incremental = storage.read_partitions("features", "market")
    update_market_features(storage, last, rebuild=True)
    pd.testing.assert_frame_equal(incremental, storage.read_partitions("features", "market"))
    earlier = incremental[incremental["date"] < pd.Timestamp(day)]
    assert not earlier.empty  # days before the correction were not rewritten
    assert set(update.dates_written) == {
        d.date().isoformat() for d in incremental["date"].unique() if d >= pd.Timestamp(day)
    }


def test_the_command_line_takes_a_correction(delivered, tmp_path, monkeypatch):
    from finpipe.cli import app

    storage, _, vendor = delivered
    day = sorted(vendor["Date"].unique())[-5]
    _, path = _corrected(vendor, day, tmp_path, "restated.csv")
    monkeypatch.setenv("FINPIPE_HOME", str(storage.root))
    monkeypatch.delenv("FINPIPE_DROP_ROOTS", raising=False)
    runner = CliRunner()
    refused = runner.invoke(app, ["ingest", "market", str(path), "--as-of", AS_OF])
    assert isinstance(refused.exception, ValidationFailed)
    accepted = runner.invoke(app, ["ingest", "market", str(path), "--as-of", AS_OF, "--correction"])
    assert accepted.exit_code == 0, accepted.output
    assert "restated.csv: 4 rows over 1 date validated (a correction: 4 published rows" in (
        accepted.output
    )
