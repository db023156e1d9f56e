"""Every layer opens as a dataset in the tools a downstream user reaches for first.

pandas, pyarrow's dataset API, Polars and DuckDB each read a whole layer folder in one call, and
all four agree that `date` is a calendar day. A store of the old hive layout (`date=` folders,
timestamp columns) is refused with the command that converts it, and the conversion keeps every
row. The domain modules call `assert_layer_reads_everywhere` on the layers their real nightly
runs wrote.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from finpipe.cli import app
from finpipe.errors import StorageError
from finpipe.locks import held_locks
from finpipe.storage import Storage
from finpipe.storage_migration import migrate_hive_layout

DAYS = ["2024-01-02", "2024-01-03", "2024-01-04"]


def read_layer_every_way(folder: Path) -> dict[str, tuple[int, list[dt.date]]]:
    """Return, per reader, the row count and the sorted distinct days it finds in `folder`."""
    root = os.fspath(folder)
    pandas_days = pd.read_parquet(root)["date"]
    arrow = pads.dataset(root, partitioning="hive").to_table()
    polars = pl.scan_parquet(f"{root}/**/*.parquet", hive_partitioning=True).collect()
    duck = duckdb.sql(
        f"select date from read_parquet('{root}/**/*.parquet', hive_partitioning = true)"
    )
    assert arrow.schema.field("date").type == pa.date32()
    assert polars.schema["date"] == pl.Date
    assert [str(kind) for kind in duck.types] == ["DATE"]
    assert all(type(day) is dt.date for day in pandas_days)
    found = {
        "pandas": pandas_days.tolist(),
        "pyarrow": arrow.column("date").to_pylist(),
        "polars": polars["date"].to_list(),
        "duckdb": [row[0] for row in duck.fetchall()],
    }
    return {reader: (len(days), sorted(set(days))) for reader, days in found.items()}


def assert_layer_reads_everywhere(storage: Storage, layer: str, domain: str) -> None:
    """Every reader sees exactly the rows and days finpipe itself reads from the layer, whose
    files share one schema (given one file short of a column, Polars and DuckDB refuse the
    folder; given one with a column more, pandas, pyarrow and DuckDB leave it out)."""
    files = sorted(storage.layer_dir(layer, domain).glob("*/part-0.parquet"))
    schemas = [pq.read_schema(file).remove_metadata() for file in files]
    odd = [
        file.parent.name
        for file, schema in zip(files, schemas, strict=True)
        if schema != schemas[0]
    ]
    assert not odd, f"{layer}/{domain}: {odd} differ from {files[0].parent.name}'s schema"
    own = storage.read_partitions(layer, domain)
    expected = (len(own), sorted({day.date() for day in own["date"]}))
    assert expected[0] > 0, f"{layer}/{domain} is empty"
    for reader, seen in read_layer_every_way(storage.layer_dir(layer, domain)).items():
        assert seen == expected, f"{reader} reads {layer}/{domain} differently"


def _frame(day: str, tickers: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {"date": pd.Timestamp(day), "ticker": tickers, "close": range(1, len(tickers) + 1)}
    )


def _old_layout_store(root: Path) -> None:
    """Write partitions as finpipe did before the bare-day layout: `date=` folders, and the day
    as a nanosecond timestamp column."""
    for layer in ("validated", "predictions"):
        for day in DAYS:
            folder = root / layer / "market" / f"date={day}"
            folder.mkdir(parents=True)
            table = pa.Table.from_pandas(_frame(day, ["A", "B"]), preserve_index=False)
            pq.write_table(table, folder / "part-0.parquet")


def test_partitions_are_bare_day_folders_with_a_calendar_day_column(tmp_path):
    storage = Storage(tmp_path)
    key = storage.write_partition("features", "market", "2024-01-02", _frame("2024-01-02", ["A"]))
    assert key == "features/market/2024-01-02/part-0.parquet"
    path = tmp_path / key
    assert pq.read_schema(path).field("date").type == pa.date32()
    # finpipe's own reads give back the datetime64[ns] column it was given
    assert storage.read_partition("features", "market", "2024-01-02")["date"].dtype == "<M8[ns]"


def test_every_reader_opens_a_written_layer_with_date_as_a_day(tmp_path):
    storage = Storage(tmp_path)
    for day in DAYS:
        storage.write_partition("predictions", "market", day, _frame(day, ["A", "B", "C"]))
    assert_layer_reads_everywhere(storage, "predictions", "market")
    # an Arrow table (a slice of a block, as the feature build writes) is stored the same way
    block = pa.Table.from_pandas(_frame("2024-01-05", ["A"]), preserve_index=False)
    storage.write_partition("predictions", "market", "2024-01-05", block)
    assert read_layer_every_way(storage.layer_dir("predictions", "market"))["duckdb"][0] == 10


def test_old_hive_layout_is_refused_with_the_command_that_converts_it(tmp_path):
    _old_layout_store(tmp_path)
    with pytest.raises(StorageError, match="finpipe migrate-storage"):
        Storage(tmp_path).partition_dates("validated", "market")
    with pytest.raises(Exception, match="Unable to merge"):  # what users hit before
        pd.read_parquet(tmp_path / "validated" / "market")


def test_migration_keeps_every_row_and_a_rerun_changes_nothing(tmp_path):
    _old_layout_store(tmp_path)
    before = {
        layer: pd.concat(
            pd.read_parquet(tmp_path / layer / "market" / f"date={day}" / "part-0.parquet")
            for day in DAYS
        ).reset_index(drop=True)
        for layer in ("validated", "predictions")
    }
    changed = migrate_hive_layout(tmp_path)
    assert [(m.layer, m.partitions) for m in changed] == [("validated", 3), ("predictions", 3)]
    storage = Storage(tmp_path)
    for layer, rows in before.items():
        assert not list((tmp_path / layer / "market").glob("date=*"))
        expected = rows.assign(date=rows["date"].astype("datetime64[ns]"))
        pd.testing.assert_frame_equal(storage.read_partitions(layer, "market"), expected)
        assert_layer_reads_everywhere(storage, layer, "market")
    assert migrate_hive_layout(tmp_path) == []


def test_an_interrupted_migration_is_finished_by_a_rerun(tmp_path):
    """Stopped after publishing a bare-day copy but before removing the old folder: the rerun
    keeps the (complete) copy and removes the old folder."""
    _old_layout_store(tmp_path)
    storage = Storage(tmp_path)
    old = tmp_path / "validated" / "market" / "date=2024-01-03" / "part-0.parquet"
    storage.write_partition("validated", "market", "2024-01-03", pq.read_table(old))
    with pytest.raises(StorageError, match="old hive layout"):
        storage.partition_dates("validated", "market")
    converted = migrate_hive_layout(tmp_path)
    # every old folder counts, the one whose copy the first run had published too
    assert [(layer.layer, layer.partitions) for layer in converted] == [
        ("validated", 3),
        ("predictions", 3),
    ]
    assert [d.isoformat() for d in storage.partition_dates("validated", "market")] == DAYS
    assert len(storage.read_partitions("validated", "market")) == 6
    assert migrate_hive_layout(tmp_path) == []


def test_a_rerun_keeps_the_published_bare_day_copy_rather_than_rewriting_it(tmp_path):
    """The bare-day copy a stopped conversion published is complete: the rerun keeps it as it
    is (here told apart by a third row) and only removes the old folder."""
    _old_layout_store(tmp_path)
    storage = Storage(tmp_path)
    storage.write_partition(
        "validated", "market", "2024-01-03", _frame("2024-01-03", ["A", "B", "C"])
    )
    migrate_hive_layout(tmp_path)
    assert storage.read_partition("validated", "market", "2024-01-03")["ticker"].tolist() == [
        "A",
        "B",
        "C",
    ]
    assert not (tmp_path / "validated" / "market" / "date=2024-01-03").exists()


def test_each_domain_is_converted_under_its_history_lock_and_hidden_folders_are_no_domain(
    tmp_path, monkeypatch
):
    _old_layout_store(tmp_path)
    (tmp_path / "validated" / ".ipynb_checkpoints" / "notes").mkdir(parents=True)
    changes: list[tuple[str, tuple[str, ...]]] = []
    for method in ("write_partition", "delete_folder"):
        real = getattr(Storage, method)

        def spy(self, *args, _real=real, _method=method, **kwargs):
            changes.append((_method, held_locks()))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(Storage, method, spy)
    converted = migrate_hive_layout(tmp_path)
    assert [(m.layer, m.domain, m.partitions) for m in converted] == [
        ("validated", "market", 3),
        ("predictions", "market", 3),
    ]
    assert len(changes) == 12  # 6 partitions published again, 6 old folders removed
    assert {locks for _, locks in changes} == {("market/history",)}


def test_migrate_storage_command_reports_what_it_converted(tmp_path, monkeypatch):
    _old_layout_store(tmp_path)
    monkeypatch.setenv("FINPIPE_HOME", str(tmp_path))
    first = CliRunner().invoke(app, ["migrate-storage"])
    assert first.exit_code == 0, first.output
    assert "validated/market: 3 partitions converted" in first.output
    again = CliRunner().invoke(app, ["migrate-storage"])
    assert "nothing to convert" in again.output
