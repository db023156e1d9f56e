"""Storage layout: atomic, idempotent partitions; safe names; landing never rewritten."""

from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pytest

from finpipe.errors import ConfigError, StorageError
from finpipe.storage import Storage, as_day, check_name, file_sha256


def _frame(day: str, tickers: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {"date": pd.Timestamp(day), "ticker": tickers, "close": range(1, len(tickers) + 1)}
    )


def test_partition_written_twice_is_replaced_not_duplicated(tmp_path):
    storage = Storage(tmp_path)
    storage.write_partition("validated", "market", "2024-01-02", _frame("2024-01-02", ["A", "B"]))
    storage.write_partition("validated", "market", "2024-01-02", _frame("2024-01-02", ["A", "B"]))
    folder = storage.partition_dir("validated", "market", "2024-01-02")
    assert sorted(p.name for p in folder.iterdir()) == ["part-0.parquet"]
    assert len(storage.read_partitions("validated", "market")) == 2


def test_leftover_temporary_file_is_invisible_to_readers(tmp_path):
    storage = Storage(tmp_path)
    key = storage.write_partition("features", "market", "2024-01-02", _frame("2024-01-02", ["A"]))
    path = storage.local_path(key)
    # What a writer killed mid-write leaves behind: a hidden temp file beside the partition,
    # and a partition folder with only a temp file in it.
    (path.parent / ".part-0.parquet.dead.tmp").write_bytes(b"PAR1 half a file")
    half = storage.partition_dir("features", "market", "2024-01-03")
    half.mkdir(parents=True)
    (half / ".part-0.parquet.dead.tmp").write_bytes(b"PAR1")
    assert storage.partition_dates("features", "market") == [dt.date(2024, 1, 2)]
    assert storage.read_partitions("features", "market")["ticker"].tolist() == ["A"]


@pytest.mark.parametrize(
    ("armed", "killed_at"), [("partition-before-publish", 1), ("partition-before-publish@3", 3)]
)
def test_a_crash_point_kills_at_its_first_arrival_or_its_nth(
    tmp_path, monkeypatch, armed, killed_at
):
    """The crash matrix kills a delivery's publish in its middle with `<point>@<n>`: the
    partitions before the n-th are published, the n-th and later are not."""
    import finpipe.faults

    class Killed(Exception):
        pass

    def kill(pid, signal):
        raise Killed

    monkeypatch.setattr(finpipe.faults, "_reached", type(finpipe.faults._reached)())
    monkeypatch.setattr(finpipe.faults.os, "kill", kill)
    monkeypatch.setenv("FINPIPE_CRASH_AT", armed)
    storage = Storage(tmp_path)
    days = ["2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05"]
    with pytest.raises(Killed):
        for day in days:
            storage.write_partition("validated", "market", day, _frame(day, ["A"]))
    published = [day.isoformat() for day in storage.partition_dates("validated", "market")]
    assert published == days[: killed_at - 1]
    monkeypatch.setenv("FINPIPE_CRASH_AT", "model-registered@1")  # another point: no kill
    storage.write_partition("validated", "market", days[-1], _frame(days[-1], ["A"]))


def test_read_partitions_filters_dates_and_columns(tmp_path):
    storage = Storage(tmp_path)
    for day in ["2024-01-02", "2024-01-03", "2024-01-04"]:
        storage.write_partition("validated", "market", day, _frame(day, ["A", "B"]))
    frame = storage.read_partitions(
        "validated", "market", start="2024-01-03", end="2024-01-04", columns=["date", "close"]
    )
    assert list(frame.columns) == ["date", "close"]
    assert sorted(frame["date"].dt.strftime("%Y-%m-%d").unique()) == ["2024-01-03", "2024-01-04"]


def test_read_columns_across_files_of_different_schemas(tmp_path):
    """Chosen columns read in one scan as the first and last files type them, or file by file
    when only a middle file has one: either way every file's values and order are kept."""
    storage = Storage(tmp_path)
    days = ["2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05"]
    frames = [
        _frame(days[0], ["A", "B"]).assign(close=[1.5, 2.5], volume=[10.0, 20.0]),
        _frame(days[1], ["A"]),  # close as int64, no volume column
        _frame(days[2], ["B"]).assign(close=[3.5], note=["only here"]),
        _frame(days[3], ["A", "C"]).assign(close=[4.5, 5.5], volume=[30.0, None]),
    ]
    for day, frame in zip(days, frames, strict=True):
        storage.write_partition("validated", "market", day, frame)

    frame = storage.read_partitions(
        "validated", "market", days=[as_day(d) for d in days], columns=["ticker", "close", "volume"]
    )
    assert frame["ticker"].tolist() == ["A", "B", "A", "B", "A", "C"]
    assert frame["close"].tolist() == [1.5, 2.5, 1.0, 3.5, 4.5, 5.5]
    assert frame["close"].dtype == "float64"
    assert frame["volume"].tolist() == pytest.approx(
        [10.0, 20.0, np.nan, np.nan, 30.0, np.nan], nan_ok=True
    )

    middle_only = storage.read_partitions("validated", "market", columns=["ticker", "note"])
    assert middle_only["note"].tolist()[3] == "only here"
    assert middle_only["note"].isna().sum() == 5

    # A filtered scan types the columns the same way, filtering inside each file.
    dated = [as_day(d) for d in days]
    above = storage.read_partitions("validated", "market", days=dated, where=pc.field("close") > 2)
    assert above["ticker"].tolist() == ["B", "B", "A", "C"]
    assert above["close"].tolist() == [2.5, 3.5, 4.5, 5.5]
    assert above["volume"].tolist() == pytest.approx([20.0, np.nan, 30.0, np.nan], nan_ok=True)
    assert "note" not in above  # in neither end file: the cheap scan does not look for it
    noted = storage.read_partitions(
        "validated", "market", days=dated, columns=["ticker", "note"], where=pc.field("close") > 2
    )
    assert noted["note"].tolist()[1] == "only here"  # asked for: every file's schema is read


@pytest.mark.parametrize("bad", ["../etc", "/abs", "Market", "a/b", "", "..", "x" * 80])
def test_unsafe_names_are_refused(bad):
    with pytest.raises(ConfigError, match="invalid domain"):
        check_name(bad)


def test_bad_dates_are_refused_with_the_value():
    assert as_day("2024-02-29") == dt.date(2024, 2, 29)
    with pytest.raises(ConfigError, match="'2024-13-01'"):
        as_day("2024-13-01")
    with pytest.raises(ConfigError, match="expected YYYY-MM-DD"):
        as_day("../../etc/passwd")


def test_landing_copy_is_content_addressed_and_never_rewritten(tmp_path):
    storage = Storage(tmp_path / "root")
    source = tmp_path / "prices.csv"
    source.write_text("date,ticker,close\n2024-01-02,A,1\n")
    sha = file_sha256(source)
    key = storage.land_file("market", source, sha)
    landed = storage.local_path(key)
    first_mtime = os.stat(landed).st_mtime_ns
    again = storage.land_file("market", source, sha)
    assert again == key
    assert os.stat(landed).st_mtime_ns == first_mtime
    assert landed.read_text() == source.read_text()
    assert landed.name == f"{sha[:12]}__prices.csv"


def test_a_long_file_name_lands_shortened_with_its_start_and_suffixes(tmp_path):
    """A 230-character name (Linux allows 255) once overflowed the landing name's hash prefix
    and temporary wrapper; it lands, and is quarantined, under a shortened name."""
    storage = Storage(tmp_path / "root")
    source = tmp_path / f"vendor_eod_{'x' * 212}.csv.gz"
    source.write_bytes(b"not read here")
    landed = storage.land_file("market", source, file_sha256(source))
    name = storage.local_path(landed).name
    assert len(name) == 12 + 2 + 150
    assert name.startswith(f"{file_sha256(source)[:12]}__vendor_eod_xxx")
    assert name.endswith("x~.csv.gz")
    key = storage.quarantine_batch(
        "market", "b1", landed, {"success": False}, file_name=source.name
    )
    assert (storage.local_path(key) / name.split("__", 1)[1]).exists()


def test_quarantine_keeps_file_and_report(tmp_path):
    storage = Storage(tmp_path / "root")
    source = tmp_path / "bad.csv"
    source.write_text("date,ticker,close\n2024-01-02,A,-1\n")
    landed = storage.land_file("market", source, file_sha256(source))
    key = storage.quarantine_batch(
        "market", "b123", landed, {"success": False}, file_name="bad.csv"
    )
    folder = storage.local_path(key)
    assert sorted(p.name for p in folder.iterdir()) == ["bad.csv", "report.json"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_the_last_dates_are_the_newest_published_ones_within_the_bounds(tmp_path):
    storage = Storage(tmp_path)
    days = [dt.date(2023, 12, 28) + dt.timedelta(days=i) for i in range(12)]
    for day in days[::-1]:  # written newest first: the listing order is not the date order
        storage.write_partition("features", "market", day, _frame(day.isoformat(), ["A"]))
    os.remove(storage.partition_file("features", "market", days[9]))  # a folder, no file
    storage.partition_dir("features", "market", "2024-02-01").mkdir()  # empty, past the end
    published = [d for d in days if d != days[9]]

    assert storage.partition_dates("features", "market") == published
    assert storage.partition_dates("features", "market", last=3) == published[-3:]
    assert storage.partition_dates("features", "market", end=days[10], last=3) == [
        days[7],
        days[8],
        days[10],
    ]
    assert storage.partition_dates("features", "market", start=days[2], end=days[4]) == days[2:5]
    assert storage.partition_dates("features", "market", start=days[2], last=50) == published[2:]
    assert storage.partition_dates("features", "credit") == []


def test_object_store_settings_mistakes_are_one_clear_line(monkeypatch):
    """Each of these was a traceback, or an error whose reason was dropped."""
    from finpipe.object_store import _connect, as_storage_error
    from finpipe.settings import load_settings

    with pytest.raises(ConfigError, match=r"AWS_ENDPOINT_URL='127.0.0.1:8333' needs its scheme"):
        _connect("127.0.0.1:8333", "", "", "")
    monkeypatch.setenv("FINPIPE_HOME", "s3://bucket/team//x")
    with pytest.raises(ConfigError, match="without an empty one"):
        load_settings()
    pyarrow_says = OSError(
        "AWS Error SIGNATURE_DOES_NOT_MATCH during ListObjectsV2: check your key"
    )
    error = as_storage_error(pyarrow_says, "cannot read s3://bucket/fp/state")
    assert str(error) == (
        "cannot read s3://bucket/fp/state: OSError: AWS Error SIGNATURE_DOES_NOT_MATCH during "
        "ListObjectsV2: check your key"
    )


def _client_error(status: int, operation: str = "PutObject"):
    from botocore.exceptions import ClientError

    body = {"Error": {"Code": str(status), "Message": "said"}}
    return ClientError({**body, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


class _FakeS3:
    """A boto3 client whose calls answer from a script: an error to raise, or None."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), 0

    def _answer(self, **_):
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            raise answer

    put_object = head_bucket = _answer


def test_a_create_only_write_retries_a_conflict_and_reports_an_existing_object(monkeypatch):
    from finpipe import object_store
    from finpipe.object_store import S3Connection

    monkeypatch.setattr(object_store.time, "sleep", lambda seconds: None)

    def put(*answers, create_only=True):
        client = _FakeS3(*answers)
        connection = S3Connection(fs=None, client=client, endpoint="http://s3")  # type: ignore[arg-type]
        return connection.put("b", "k", b"x", create_only=create_only), client.calls

    assert put(_client_error(409)) == (True, 2)  # another create in flight: sent again
    assert put(_client_error(412)) == (False, 1)  # it exists
    with pytest.raises(StorageError, match="cannot write s3://b/k: HTTP 409"):
        put(*[_client_error(409)] * object_store._CONFLICT_RETRIES)
    with pytest.raises(StorageError, match="HTTP 409"):
        put(_client_error(409), create_only=False)  # a plain write is not retried


def test_a_bucket_these_credentials_may_not_see_counts_as_existing():
    from finpipe.object_store import S3Connection

    def exists(answer):
        connection = S3Connection(fs=None, client=_FakeS3(answer), endpoint="http://s3")  # type: ignore[arg-type]
        return connection.bucket_exists("team")

    assert exists(None) is True
    assert exists(_client_error(404, "HeadBucket")) is False
    assert exists(_client_error(403, "HeadBucket")) is True  # reads say why they fail
    with pytest.raises(StorageError, match="cannot reach s3://team: HTTP 500"):
        exists(_client_error(500, "HeadBucket"))


@pytest.mark.parametrize(
    "name",
    ["EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"],
)
def test_a_store_that_does_not_answer_in_time_is_transient(name):
    import botocore.exceptions

    from finpipe.errors import StoreUnavailable
    from finpipe.object_store import as_storage_error

    error = getattr(botocore.exceptions, name)(endpoint_url="http://s3")
    said = as_storage_error(error, "cannot read s3://b/k")
    assert isinstance(said, StoreUnavailable)
    assert (
        str(said) == f"cannot read s3://b/k: the object store did not answer ({name}); retry later"
    )
    timed_out = as_storage_error(OSError("AWS Error NETWORK_CONNECTION: timed out"), "x")
    assert isinstance(timed_out, StoreUnavailable)
