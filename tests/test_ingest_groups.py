"""Many delivered files at once (`finpipe.ingest.ingest_files`): clean runs of files share one
Great Expectations run, and every file still gets the verdict, report, quarantine and batch
record that ingesting it alone gives.

Each test compares against the reference: the same files offered one by one to `ingest_file`.
"""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

import finpipe.ingest
from finpipe.errors import ValidationFailed
from finpipe.ingest import ingest_file, ingest_files
from finpipe.market.pipeline import MARKET_CONTRACT
from finpipe.market.synthetic import MarketSyntheticConfig, generate_market_panel
from finpipe.storage import Storage

AS_OF = "2099-01-01"
DAILY_FILES = 12


@pytest.fixture(scope="module")
def panel() -> pd.DataFrame:
    return generate_market_panel(MarketSyntheticConfig(tickers=4, days=305, seed=3)).prices


@pytest.fixture(scope="module")
def history_root(tmp_path_factory, panel):
    """A store holding every date but the last DAILY_FILES ones, ingested once."""
    folder = tmp_path_factory.mktemp("groups")
    days = sorted(panel["date"].unique())
    history = folder / "history.csv"
    _vendor(panel[panel["date"] < days[-DAILY_FILES]]).to_csv(history, index=False)
    ingest_file(Storage(folder / "root"), MARKET_CONTRACT, history, as_of=AS_OF)
    return folder / "root"


@pytest.fixture
def stores(tmp_path, history_root):
    """Two copies of the history: one for ingest_files, one for file-by-file ingest_file."""
    shutil.copytree(history_root, tmp_path / "grouped")
    shutil.copytree(history_root, tmp_path / "single")
    return Storage(tmp_path / "grouped"), Storage(tmp_path / "single")


@pytest.fixture
def gx_runs(monkeypatch) -> list[str]:
    """The batch name of every GX run ingest makes during the test."""
    names: list[str] = []
    validate_frame = finpipe.ingest.validate_frame

    def counted(*args, **kwargs):
        names.append(kwargs["batch_name"])
        return validate_frame(*args, **kwargs)

    monkeypatch.setattr(finpipe.ingest, "validate_frame", counted)
    return names


def _vendor(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["date"] = out["date"].dt.strftime("%Y-%m-%d")
    return out


def _daily_files(folder, panel, change=None) -> list:
    """Write the last DAILY_FILES dates as one CSV each; `change(k, rows)` edits file k."""
    folder.mkdir(exist_ok=True)
    paths = []
    for k, day in enumerate(sorted(panel["date"].unique())[-DAILY_FILES:]):
        rows = panel[panel["date"] == day].reset_index(drop=True)
        if change is not None:
            rows = change(k, rows)
        path = folder / f"market_{pd.Timestamp(day):%Y-%m-%d}.csv"
        _vendor(rows).to_csv(path, index=False)
        paths.append(path)
    return paths


def _one_by_one(storage, paths) -> list:
    outcomes = []
    for path in paths:
        try:
            outcomes.append(ingest_file(storage, MARKET_CONTRACT, path, as_of=AS_OF))
        except ValidationFailed as rejected:
            return [*outcomes, rejected]
    return outcomes


def _grouped(storage, paths) -> list:
    outcomes = []
    try:
        for outcome in ingest_files(storage, MARKET_CONTRACT, paths, as_of=AS_OF):
            outcomes.append(outcome)
    except ValidationFailed as rejected:
        outcomes.append(rejected)
    return outcomes


def _same_store(grouped: Storage, single: Storage) -> None:
    """Both stores hold the same validated partitions and the same per-file verdicts."""
    days = grouped.partition_dates("validated", "market")
    assert days == single.partition_dates("validated", "market")
    pd.testing.assert_frame_equal(
        grouped.read_partitions("validated", "market", days=days[-DAILY_FILES:]),
        single.read_partitions("validated", "market", days=days[-DAILY_FILES:]),
    )

    def verdicts(storage):
        return {
            record["sha256"]: (record["status"], record.get("warnings"), record.get("rows"))
            for record in storage.batch_records("market")
        }

    assert verdicts(grouped) == verdicts(single)


def test_clean_files_share_one_gx_run_and_store_what_one_by_one_stores(
    tmp_path, panel, stores, gx_runs
):
    grouped, single = stores
    paths = _daily_files(tmp_path / "drop", panel)

    outcomes = _grouped(grouped, paths)

    assert [o.status for o in outcomes] == ["validated"] * DAILY_FILES
    assert len(gx_runs) == 1 and gx_runs[0].endswith(f"{DAILY_FILES} files")
    assert all(o.dates == 1 and o.data_docs == outcomes[0].data_docs for o in outcomes)
    assert all(
        f"{DAILY_FILES} files in one GX run" in record["validated_with"]
        for record in grouped.batch_records("market")
        if record["source"].startswith(str(tmp_path / "drop"))
    )
    _one_by_one(single, paths)
    _same_store(grouped, single)

    # Offered again: every file is already loaded, nothing is published twice.
    again = _grouped(grouped, paths)
    assert [o.status for o in again] == ["already_loaded"] * DAILY_FILES
    _same_store(grouped, single)


def _negative_close(k: int, rows: pd.DataFrame) -> pd.DataFrame:
    if k == 6:
        rows.loc[1, "close"] = -rows.loc[1, "close"]
    return rows


def test_a_bad_file_stops_the_run_where_one_by_one_stops_with_its_own_report(
    tmp_path, panel, stores
):
    grouped, single = stores
    paths = _daily_files(tmp_path / "drop", panel, _negative_close)

    outcomes = _grouped(grouped, paths)
    reference = _one_by_one(single, paths)

    assert [o.status for o in outcomes[:6]] == ["validated"] * 6
    rejected = outcomes[6]
    assert isinstance(rejected, ValidationFailed) and len(outcomes) == 7
    assert paths[6].name in str(rejected) and str(rejected) == str(reference[6]).replace(
        str(single.root), str(grouped.root)
    )
    report = json.loads(
        (grouped.quarantine_dir("market") / _batch(paths[6]) / "report.json").read_text()
    )
    broken = [rule for rule in report["rules"] if not rule["success"]]
    assert broken and all(rule["sample_rows"] == [1] for rule in broken)
    _same_store(grouped, single)  # files after the bad one: neither landed nor recorded


def _jump_and_back(k: int, rows: pd.DataFrame) -> pd.DataFrame:
    if k == 3:  # one name up 50% for a day: a large move (a warning), and back the next day
        for column in ("open", "high", "low", "close", "adj_close"):
            rows.loc[0, column] *= 1.5
    return rows


def test_a_file_with_a_warning_gets_its_own_report_and_the_rest_still_share_runs(
    tmp_path, panel, stores, gx_runs
):
    grouped, single = stores
    paths = _daily_files(tmp_path / "drop", panel, _jump_and_back)

    outcomes = _grouped(grouped, paths)

    assert [o.status for o in outcomes] == ["validated"] * DAILY_FILES
    warned = [k for k, outcome in enumerate(outcomes) if outcome.warnings]
    assert warned == [3, 4]  # the jump, and the return to the old level
    assert all("large_move_1d" in outcomes[k].warnings[0] for k in warned)
    # Splitting found the two files in far fewer runs than one per file.
    assert len(gx_runs) < DAILY_FILES / 2 + 1 + 2 * math.ceil(math.log2(DAILY_FILES))
    _one_by_one(single, paths)
    _same_store(grouped, single)


def test_a_key_repeated_across_two_files_of_a_run_is_rejected_as_one_by_one_rejects_it(
    tmp_path, panel, stores
):
    grouped, single = stores
    yesterday = sorted(panel["date"].unique())[-DAILY_FILES + 4]

    def repeat_yesterday(k: int, rows: pd.DataFrame) -> pd.DataFrame:
        if k == 5:  # file 4's day again, a little changed (a vendor's re-send)
            return rows.assign(date=yesterday, volume=rows["volume"] + 1)
        return rows

    paths = _daily_files(tmp_path / "drop", panel, repeat_yesterday)

    outcomes = _grouped(grouped, paths)
    reference = _one_by_one(single, paths)

    assert isinstance(outcomes[5], ValidationFailed) and isinstance(reference[5], ValidationFailed)
    assert "duplicate_key_across_batches" in str(outcomes[5])
    _same_store(grouped, single)


def test_a_day_already_published_and_sent_again_in_a_group_is_rejected_as_one_by_one(
    tmp_path, panel, stores
):
    """A vendor re-sends a published day (changed a little) beside the next day's clean file:
    the group's own keys do not repeat, but the re-sent file's repeat an earlier batch's."""
    grouped, single = stores
    paths = _daily_files(tmp_path / "drop", panel)
    for storage in stores:
        ingest_file(storage, MARKET_CONTRACT, paths[0], as_of=AS_OF)
    sent_again = tmp_path / "drop" / "resent.csv"
    resent = pd.read_csv(paths[0])
    resent.assign(volume=resent["volume"] + 1).to_csv(sent_again, index=False)

    outcomes = _grouped(grouped, [paths[1], sent_again])
    reference = _one_by_one(single, [paths[1], sent_again])

    assert isinstance(outcomes[-1], ValidationFailed) and isinstance(
        reference[-1], ValidationFailed
    )
    assert "duplicate_key_across_batches" in str(outcomes[-1])
    validated = grouped.read_partitions("validated", "market")
    assert not validated.duplicated(["date", "ticker"]).any()
    _same_store(grouped, single)


def test_a_file_whose_publish_was_cut_short_after_a_partition_loads_whole_when_run_again(
    tmp_path, panel, stores, disk_full_after_one_partition, monkeypatch
):
    """A publish cut short (disk full, a killed process) leaves one of the file's days
    written and its batch `landed`: the re-run replaces that day's rows of its own batch
    (neither doubling them nor taking them for another batch's) and publishes the rest."""
    grouped, single = stores  # here: one store cut short, one loaded cleanly
    week = tmp_path / "week.csv"
    pd.concat(pd.read_csv(path) for path in _daily_files(tmp_path / "drop", panel)[:5]).to_csv(
        week, index=False
    )
    ingest_file(single, MARKET_CONTRACT, week, as_of=AS_OF)

    written = disk_full_after_one_partition()
    with pytest.raises(OSError, match="disk full"):
        ingest_file(grouped, MARKET_CONTRACT, week, as_of=AS_OF)
    monkeypatch.undo()
    assert len(written) == 1
    outcome = ingest_file(grouped, MARKET_CONTRACT, week, as_of=AS_OF)

    assert outcome.status == "validated"
    validated = grouped.read_partitions("validated", "market")
    assert not validated.duplicated(["date", "ticker"]).any()
    _same_store(grouped, single)


def _batch(path) -> str:
    from finpipe.storage import file_sha256

    return f"b{file_sha256(path)[:12]}"
