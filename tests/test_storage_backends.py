"""The storage guarantees on both backends: a local folder, and a real S3 server (moto's, one
per session) holding the store under a prefix of a bucket. Then the market nightly with
FINPIPE_HOME=s3://... writing every layer to the bucket (advisory locks on the session's
PostgreSQL, as an object-store home requires)."""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
import uuid

import pandas as pd
import pyarrow.compute as pc
import pytest

from finpipe.domains import get_domain
from finpipe.errors import ConfigError, StorageError, StoreUnavailable, ValidationFailed
from finpipe.features import record_inputs, stale_feature_days
from finpipe.ingest import ingest_file
from finpipe.locks import history_lock
from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    inject_defects,
    write_vendor_files,
)
from finpipe.storage import Storage, file_sha256
from finpipe.vintages import validated_as_known
from tests.conftest import finpipe_home

MARKET = get_domain("market").contract
DAYS = ["2024-01-02", "2024-01-03", "2024-01-04"]


def _frame(day: str, tickers: list[str], close: float = 1.0) -> pd.DataFrame:
    return pd.DataFrame(
        {"date": pd.Timestamp(day), "ticker": tickers, "close": close + pd.RangeIndex(len(tickers))}
    )


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.new_bucket("storage")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch) -> Storage:
    """An empty store: a local folder, or a fresh prefix of the module's bucket."""
    if request.param == "local":
        return Storage(tmp_path / "store")
    s3_server = request.getfixturevalue("s3_server")
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    return Storage(f"s3://{request.getfixturevalue('bucket')}/{uuid.uuid4().hex[:12]}")


def _files(store: Storage, key: str = "") -> list[str]:
    return store.list_files(key)


def test_partitions_are_published_read_and_replaced(store):
    for number, day in enumerate(DAYS):
        store.write_partition("validated", "market", day, _frame(day, ["A", "B"], close=number))
    assert store.partition_dates("validated", "market") == [dt.date.fromisoformat(d) for d in DAYS]
    assert store.partition_dates("validated", "market", start=DAYS[1], last=1) == [
        dt.date(2024, 1, 4)
    ]
    frame = store.read_partitions("validated", "market", columns=["date", "close"])
    assert frame["close"].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 3.0]
    assert frame["date"].dtype == "<M8[ns]"
    above = store.read_partitions("validated", "market", where=pc.field("close") > 1.5)
    assert above["ticker"].tolist() == ["B", "A", "B"]
    # Writing a day again replaces its one object: no second file, no duplicated rows.
    store.write_partition("validated", "market", DAYS[0], _frame(DAYS[0], ["A", "B", "C"], 7.0))
    assert _files(store, "validated/market/2024-01-02") == [
        "validated/market/2024-01-02/part-0.parquet"
    ]
    assert store.read_partition("validated", "market", DAYS[0])["close"].tolist() == [7, 8, 9]
    assert store.partition_rows("validated", "market", DAYS[0]) == 3
    assert len(store.read_partitions("validated", "market")) == 7
    # Outside finpipe, pandas reads the whole layer from its location (pyarrow's file system,
    # from the same AWS variables on S3), with `date` a calendar day.
    outside = pd.read_parquet(store.location(store.layer_key("validated", "market")))
    assert len(outside) == 7 and all(type(d) is dt.date for d in outside["date"])


def test_a_publish_that_fails_leaves_the_old_partition_whole_and_nothing_beside_it(
    store, monkeypatch
):
    store.write_partition("features", "market", DAYS[0], _frame(DAYS[0], ["A"]))
    before = store.read_bytes(store.partition_key("features", "market", DAYS[0]))

    def killed(point: str) -> None:  # the process dies between writing and publishing
        raise KeyboardInterrupt(point)

    monkeypatch.setattr("finpipe.storage.crash_point", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write_partition("features", "market", DAYS[0], _frame(DAYS[0], ["A", "B"]))
    with pytest.raises(KeyboardInterrupt):
        store.write_partition("features", "market", DAYS[1], _frame(DAYS[1], ["A", "B"]))
    assert store.read_bytes(store.partition_key("features", "market", DAYS[0])) == before
    assert store.partition_dates("features", "market") == [dt.date(2024, 1, 2)]
    assert _files(store, "features") == ["features/market/2024-01-02/part-0.parquet"]


def test_a_reader_sees_the_old_or_the_new_partition_never_a_part(store):
    small, large = _frame(DAYS[0], ["A"] * 50), _frame(DAYS[0], ["B"] * 5000)
    day = dt.date.fromisoformat(DAYS[0])
    store.write_partition("predictions", "market", DAYS[0], small)
    seen: list[int] = []
    errors: list[Exception] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                seen.append(len(store.read_partition("predictions", "market", DAYS[0])))
                seen.append(len(store.read_partitions("predictions", "market", days=[day])))
            except Exception as error:  # a torn read: the test fails below
                errors.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for number in range(60):
            frame = large if number % 2 == 0 else small
            store.write_partition("predictions", "market", DAYS[0], frame)
    finally:
        done.set()
        reader.join()
    assert not errors, errors[0]
    assert seen and set(seen) <= {50, 5000}


def test_a_file_lands_once_and_a_second_copy_never_replaces_it(store, tmp_path):
    source = tmp_path / "prices.csv"
    source.write_text("date,ticker,close\n2024-01-02,A,1\n")
    sha = file_sha256(source)
    key = store.land_file("market", source, sha)
    assert key == f"landing/market/{sha[:12]}__prices.csv"
    impostor = tmp_path / "other" / "prices.csv"  # other bytes offered under the same name
    impostor.parent.mkdir()
    impostor.write_text("date,ticker,close\n2024-01-02,A,999\n")
    assert store.land_file("market", impostor, sha) == key
    assert store.read_bytes(key) == source.read_bytes()
    # Create-only is the store's own rule, not a look before the write: the second writer of
    # a key is refused whatever it sends.
    assert store.create_bytes("state/market/once.txt", b"first") is True
    assert store.create_bytes("state/market/once.txt", b"second") is False
    assert store.read_bytes("state/market/once.txt") == b"first"
    assert _files(store, "landing") == [key]


def test_batch_records_are_written_replaced_and_listed(store):
    assert store.read_batch_record("market", "a" * 64) is None
    first = {"sha256": "b" * 64, "status": "landed", "landed_at": "2024-01-02T00:00:00"}
    store.write_batch_record("market", first)
    store.write_batch_record("market", {**first, "status": "validated"})
    store.write_batch_record("market", {"sha256": "a" * 64, "landed_at": "2024-01-01T00:00:00"})
    assert store.read_batch_record("market", "b" * 64)["status"] == "validated"
    assert [r["sha256"][0] for r in store.batch_records("market")] == ["a", "b"]
    assert store.batch_records("credit") == []


def test_reference_files_are_kept_and_filtered(store):
    assert store.read_reference("market", "oracle") is None
    oracle = pd.DataFrame({"ticker": ["A", "B", "C"], "expected": [0.1, 0.2, 0.3]})
    key = store.write_reference("market", "oracle", oracle)
    assert key == "reference/market/oracle.parquet"
    pd.testing.assert_frame_equal(store.read_reference("market", "oracle"), oracle)
    kept = store.read_reference("market", "oracle", filters=[("ticker", "in", ["B"])])
    assert kept["expected"].tolist() == [0.2]


def test_fingerprints_follow_content_and_tell_stale_features(store):
    for day in DAYS:
        store.write_partition("validated", "market", day, _frame(day, ["A"]))
    prints = store.partition_fingerprints("validated", "market")
    assert sorted(prints) == [dt.date.fromisoformat(d) for d in DAYS]
    assert (
        store.fingerprint(store.partition_key("validated", "market", DAYS[1]))
        == prints[dt.date(2024, 1, 3)]
    )
    record_inputs(store, "market", {day.isoformat(): value for day, value in prints.items()})
    assert stale_feature_days(store, "market") == set()
    store.write_partition("validated", "market", DAYS[1], _frame(DAYS[1], ["A"]))  # same rows
    assert stale_feature_days(store, "market") == set()
    store.write_partition("validated", "market", DAYS[1], _frame(DAYS[1], ["A", "B"]))
    assert stale_feature_days(store, "market") == {dt.date(2024, 1, 3)}
    assert store.fingerprint("validated/market/2030-01-01/part-0.parquet") is None


def test_a_store_holding_the_old_hive_layout_is_refused_naming_the_fix(store):
    """A partition in a `date=` folder (finpipe before 2026-12, or a half-converted store)
    beside bare-day ones: reading the layer stops with the command that converts it, on disk
    and in a bucket alike, instead of leaving that day out."""
    store.write_partition("validated", "market", "2024-01-03", _frame("2024-01-03", ["A"]))
    assert store.partition_dates("validated", "market") == [dt.date(2024, 1, 3)]
    buffer = io.BytesIO()
    _frame("2024-01-02", ["A"]).to_parquet(buffer, index=False)
    store.write_bytes("validated/market/date=2024-01-02/part-0.parquet", buffer.getvalue())
    with pytest.raises(StorageError, match="date=2024-01-02.*old hive layout.*migrate-storage"):
        store.partition_dates("validated", "market")


@pytest.fixture(scope="module")
def deliveries(tmp_path_factory):
    """A small market history, its next day, and that day again with bad prices."""
    root = tmp_path_factory.mktemp("deliveries")
    panel = generate_market_panel(MarketSyntheticConfig(tickers=3, days=305, seed=2))
    history, day = write_vendor_files(panel.prices, root, daily_files=1)
    rows = pd.read_csv(day)
    bad = inject_defects(
        rows.rename(columns=str.lower).rename(columns={"adj close": "adj_close"}),
        ["non_positive_price"],
        rows_per_defect=1,
    )
    bad_path = root / "bad" / day.name
    bad_path.parent.mkdir()
    bad.rename(columns={"adj_close": "Adj Close"}).to_csv(bad_path, index=False)
    return history, day, bad_path


def test_ingest_publishes_once_and_quarantines_a_bad_file_with_its_report(store, deliveries):
    history, day, bad = deliveries
    first = ingest_file(store, MARKET, history, as_of="2030-01-01")
    again = ingest_file(store, MARKET, history, as_of="2030-01-01")
    assert (first.status, again.status) == ("validated", "already_loaded")
    assert first.landed_path == store.location(
        f"landing/market/{first.sha256[:12]}__{history.name}"
    )
    assert first.data_docs == store.location(
        f"reports/data_docs/market/{first.batch_id}/index.html"
    )
    assert store.exists(f"reports/data_docs/market/{first.batch_id}/index.html")
    rows = len(store.read_partitions("validated", "market"))
    assert rows == first.rows  # the re-run added nothing
    with pytest.raises(ValidationFailed) as caught:
        ingest_file(store, MARKET, bad, as_of="2030-01-01")
    folder = f"quarantine/market/b{file_sha256(bad)[:12]}"
    assert caught.value.quarantine_path == store.location(folder)
    held = _files(store, folder)
    assert f"{folder}/{bad.name}" in held and f"{folder}/data_docs/index.html" in held
    report = json.loads(store.read_bytes(f"{folder}/report.json"))
    assert report["success"] is False and any(not r["success"] for r in report["rules"])
    assert store.read_batch_record("market", file_sha256(bad))["status"] == "quarantined"
    assert len(store.read_partitions("validated", "market")) == rows  # nothing from it
    good = ingest_file(store, MARKET, day, as_of="2030-01-01")
    assert good.status == "validated"
    assert len(_files(store, "landing/market")) == 3  # history, the bad file, the good day


def test_the_status_reads_what_ingest_left_in_either_store(store, deliveries):
    from finpipe.calendars import BusinessDays
    from finpipe.status import domain_status

    _, day, bad = deliveries
    ingest_file(store, MARKET, day, as_of="2030-01-01")
    with pytest.raises(ValidationFailed):
        ingest_file(store, MARKET, bad, as_of="2030-01-01")
    status = domain_status(store, "market", BusinessDays())
    assert status.files == {"validated": 1, "quarantined": 1}
    (quarantined,) = status.quarantined
    folder = f"quarantine/market/b{file_sha256(bad)[:12]}"
    assert quarantined.report == store.location(f"{folder}/report.json")
    report = json.loads(store.read_bytes(f"{folder}/report.json"))
    broken = [r["rule"] for r in report["rules"] if not r["success"]]
    assert quarantined.rules == ", ".join(dict.fromkeys(broken)) and broken
    validated = store.partition_dates("validated", "market")
    assert (status.layers["validated"].first, status.layers["validated"].last) == (
        validated[0],
        validated[-1],
    )
    assert status.layers["predictions"].days == 0 and status.newest_scored is None


@pytest.mark.parametrize("domain", ["market", "credit"])  # credit's scoring reads history too
def test_a_backfills_plan_read_in_one_go_agrees_with_asking_date_by_date(store, domain):
    """`done_dates` (listings) against `is_done` (requests per date), and the batched
    fingerprints against the single ones, over dates in every state a record can be in."""
    from finpipe.date_runs import (
        completion_key,
        done_dates,
        is_done,
        partition_fingerprint,
        partition_fingerprints,
    )

    date_column = get_domain(domain).contract.date_column
    days = [dt.date(2024, 1, day) for day in range(1, 11)]
    for day in days[:8]:
        store.write_partition("validated", domain, day, pd.DataFrame({date_column: [day]}))
        store.write_partition("features", domain, day, pd.DataFrame({date_column: [day]}))
    states = {  # day -> (status, steps, predictions published)
        days[0]: ("completed", ["validate", "features", "score"], True),
        days[1]: ("completed", ["validate", "features", "score"], False),  # predictions gone
        days[2]: ("completed", ["validate", "features"], False),
        days[3]: ("failed", ["validate", "features", "score"], True),
        days[4]: ("completed", ["validate", "features", "score"], True),  # data changed since
        days[5]: ("completed", ["validate", "features", "score"], True),
        days[8]: ("completed", ["validate", "features", "score"], True),  # no data now
    }
    for day, (status, steps, published) in states.items():
        inputs = partition_fingerprint(store, domain, day)
        record = {"status": status, "steps": steps, "inputs": inputs}
        store.write_json(completion_key(store, domain, day), record)
        if published:
            store.write_partition("predictions", domain, day, pd.DataFrame({"x": [1]}))
    store.write_partition("validated", domain, days[4], pd.DataFrame({date_column: [days[0]]}))
    # a correction of a row dated 6 Jan: credit's dates from then on were scored from old rows
    kept = io.BytesIO()
    pd.DataFrame({date_column: [days[5]]}).to_parquet(kept)
    store.write_bytes(store.state_key(domain, "superseded", "b0.parquet"), kept.getvalue())

    assert partition_fingerprints(store, domain, days) == {
        day: partition_fingerprint(store, domain, day) for day in days
    }
    for steps in (["validate", "features", "score"], ["validate", "features"], ["validate"]):
        one_by_one = {day for day in days if is_done(store, domain, day, steps)}
        assert done_dates(store, domain, days, steps) == one_by_one
        assert done_dates(store, domain, [str(day) for day in days], steps) == one_by_one
    # 9 Jan had no data then and has none now: its record still holds. Credit's 6 Jan and 9 Jan
    # were scored before the correction of a 6 Jan row.
    expected = {days[0], days[5], days[8]} if domain == "market" else {days[0]}
    assert done_dates(store, domain, days, ["validate", "features", "score"]) == expected


def test_a_correction_replaces_published_rows_and_keeps_them_in_the_store(
    store, deliveries, tmp_path, monkeypatch
):
    history, day, _ = deliveries
    monkeypatch.setattr("finpipe.ingest._now", lambda: "2026-01-01T00:00:00+00:00")
    for path in (history, day):
        ingest_file(store, MARKET, path, as_of="2030-01-01")
    before = store.read_partitions("validated", "market")
    restated = pd.read_csv(day)
    prices = [c for c in ("Open", "High", "Low", "Close", "Adj Close") if c in restated]
    restated[prices] = (restated[prices] * 1.01).round(4)  # the day restated 1% higher
    path = tmp_path / f"restated_{day.name}"
    restated.to_csv(path, index=False)
    monkeypatch.setattr("finpipe.ingest._now", lambda: "2026-01-02T00:00:00+00:00")
    outcome = ingest_file(store, MARKET, path, as_of="2030-01-01", correction=True)
    after = store.read_partitions("validated", "market")
    # The layer as known before the correction comes back from the store (finpipe.vintages).
    pd.testing.assert_frame_equal(validated_as_known(store, MARKET, "2026-01-01T12:00"), before)
    pd.testing.assert_frame_equal(validated_as_known(store, MARKET, "2026-01-02"), after)
    assert len(after) == len(before) and not after.duplicated(["date", "ticker"]).any()
    last = after[after["date"] == after["date"].max()].sort_values("ticker")
    assert last["close"].tolist() == pytest.approx(restated.sort_values("Ticker")["Close"].tolist())
    kept = pd.read_parquet(
        io.BytesIO(store.read_bytes(f"state/market/superseded/{outcome.batch_id}.parquet"))
    )
    replaced = before[before["date"] == before["date"].max()]
    pd.testing.assert_frame_equal(
        kept.sort_values("ticker").reset_index(drop=True),
        replaced.sort_values("ticker").reset_index(drop=True),
    )
    # A retraction of one bar of the history: gone from the store, back for an earlier reader.
    first = after[after["date"] == after["date"].min()].iloc[0]
    cancel = tmp_path / "cancel.csv"
    columns = list(pd.read_csv(history, nrows=0).columns)
    bar = {"Date": first["date"].date().isoformat(), "Ticker": first["ticker"], "Retracted": "y"}
    pd.DataFrame([bar]).reindex(columns=[*columns, "Retracted"]).to_csv(cancel, index=False)
    monkeypatch.setattr("finpipe.ingest._now", lambda: "2026-01-03T00:00:00+00:00")
    retraction = ingest_file(store, MARKET, cancel, as_of="2030-01-01", correction=True)
    assert retraction.retracted_rows == 1
    pd.testing.assert_frame_equal(validated_as_known(store, MARKET, "2026-01-02"), after)
    gone = (after["date"] == first["date"]) & (after["ticker"] == first["ticker"])
    remaining = after[~gone].reset_index(drop=True)
    pd.testing.assert_frame_equal(store.read_partitions("validated", "market"), remaining)
    # Every bar of the last day retracted: its partition leaves the store.
    the_day = last["date"].iloc[0].date()
    bars = [{"Date": the_day.isoformat(), "Ticker": t} for t in last["ticker"]]
    whole = tmp_path / "cancel_day.csv"
    pd.DataFrame(bars).reindex(columns=columns).assign(Retracted="y").to_csv(whole, index=False)
    monkeypatch.setattr("finpipe.ingest._now", lambda: "2026-01-04T00:00:00+00:00")
    removal = ingest_file(store, MARKET, whole, as_of="2030-01-01", correction=True)
    assert removal.removed_dates == [the_day.isoformat()]
    assert the_day not in store.partition_dates("validated", "market")
    assert not _files(store, f"validated/market/{the_day}")
    pd.testing.assert_frame_equal(validated_as_known(store, MARKET, "2026-01-03T12:00"), remaining)
    pd.testing.assert_frame_equal(
        store.read_partitions("validated", "market"),
        remaining[remaining["date"] != last["date"].iloc[0]].reset_index(drop=True),
    )


def test_an_object_store_home_without_a_lock_database_fails_early_saying_what_to_set(
    monkeypatch,
):
    from finpipe.flows.run_setup import set_up_run

    lock = history_lock("s3://bucket/finpipe", "market", locks_url="")
    with pytest.raises(ConfigError, match="set FINPIPE_LOCKS_URL"), lock:
        pass
    # A flow stops as it starts, before it reads a delivery or the store.
    monkeypatch.setenv("FINPIPE_HOME", "s3://bucket/finpipe")
    with pytest.raises(ConfigError, match=r"object store \(s3://bucket/finpipe\).*LOCKS_URL"):
        set_up_run("nightly", "market", ["/nonexistent/market_2024-01-02.csv"])


def test_a_store_that_does_not_answer_is_a_transient_error_naming_the_object(monkeypatch):
    """What the flows' tasks retry (an S3 server restarting), with no credential in it."""
    from tests.servers import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "finpipe-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-to-be-shown")
    store = Storage("s3://bucket/finpipe")
    for attempt in (
        lambda: store.partition_dates("validated", "market"),
        lambda: store.read_json("state/market/completed/2024-01-02.json"),
        lambda: store.write_partition("validated", "market", DAYS[0], _frame(DAYS[0], ["A"])),
    ):
        with pytest.raises(
            StoreUnavailable, match="s3://bucket/finpipe/.*did not answer"
        ) as caught:
            attempt()
        assert caught.value.transient and "not-to-be-shown" not in str(caught.value)


def test_a_bucket_that_does_not_exist_is_an_error_not_an_empty_store(s3_server, monkeypatch):
    """A typo in the bucket's name once read as an empty store: "no delivered file yet", and
    a backfill ending Completed with every date "no data"."""
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    typo = Storage("s3://no-such-bucket-finpipe/fp")
    with pytest.raises(ConfigError, match="the bucket 'no-such-bucket-finpipe' does not exist"):
        typo.partition_dates("validated", "market")
    with pytest.raises(ConfigError, match="does not exist"):
        typo.list_files("state/market/batches")
    empty = Storage(f"s3://{s3_server.new_bucket('empty')}/fp")  # exists, holds nothing
    assert empty.partition_dates("validated", "market") == []


def test_a_batch_quarantined_again_keeps_its_report_until_the_new_one_lands(
    s3_server, bucket, tmp_path, monkeypatch
):
    """On disk a quarantine entry is staged and renamed; in a bucket the report is the last
    object written, and a second quarantine of the batch no longer deletes the first entry
    before writing (a kill in between left the file without its report)."""
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    store = Storage(f"s3://{bucket}/{uuid.uuid4().hex[:12]}")
    source = tmp_path / "bad.csv"
    source.write_text("date,ticker,close\n2024-01-02,A,-1\n")
    landed = store.land_file("market", source, file_sha256(source))
    key = store.quarantine_batch("market", "b1", landed, {"run": 1}, file_name="bad.csv")
    killed = Storage(store.url)
    killed.write_json = lambda *_: (_ for _ in ()).throw(KeyboardInterrupt)  # before the report
    with pytest.raises(KeyboardInterrupt):
        killed.quarantine_batch("market", "b1", landed, {"run": 2}, file_name="bad.csv")
    assert store.read_json(f"{key}/report.json") == {"run": 1}
    # Once the new report lands, nothing of the earlier entry is left beside it.
    store.quarantine_batch("market", "b1", landed, {"run": 3}, file_name="bad (2).csv")
    assert store.list_files(key) == [f"{key}/bad_2_.csv", f"{key}/report.json"]
    assert store.read_json(f"{key}/report.json") == {"run": 3}


FAST = {"max_epochs": 2, "models": ["mlp"], "hidden": 8}


def test_the_market_nightly_writes_every_layer_to_the_bucket(
    s3_server, postgres, tmp_path, monkeypatch
):
    from finpipe.flows.nightly import nightly

    from tests.team_fixtures import new_database

    bucket = s3_server.new_bucket("nightly")
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FINPIPE_LOCKS_URL", new_database(postgres, "s3_nightly"))
    monkeypatch.setenv("FINPIPE_LOCAL_DIR", str(tmp_path / "local"))
    panel = generate_market_panel(MarketSyntheticConfig(tickers=4, days=305, seed=4))
    files = write_vendor_files(panel.prices, tmp_path / "drop", daily_files=1)
    as_of = dt.date.fromisoformat(files[-1].stem.removeprefix("market_"))
    with finpipe_home(f"s3://{bucket}/team") as settings:
        assert settings.home == f"s3://{bucket}/team"
        summary = nightly(
            domain="market", as_of=as_of, inputs=[str(f) for f in files], training=FAST
        )
    keys = s3_server.keys(bucket)
    assert all(key.startswith("team/") for key in keys)
    by_area = {"/".join(key.split("/")[1:3]) for key in keys}
    assert {
        "landing/market",
        "validated/market",
        "features/market",
        "predictions/market",
        "reports/data_docs",
        "state/market",
    } <= by_area
    days = sorted(panel.prices["date"].dt.date.unique())
    store = Storage(f"s3://{bucket}/team")
    assert store.partition_dates("validated", "market") == days
    assert store.partition_dates("features", "market") == days
    assert store.partition_dates("predictions", "market") == [as_of]
    predictions = store.read_partition("predictions", "market", as_of)
    assert len(predictions) == 4 and predictions["model_version"].eq("1").all()
    assert summary["predictions"]["rows"] == 4
    assert f"team/state/market/completed/{as_of}.json" in keys
    assert {f"team/state/market/batches/{file_sha256(f)}.json" for f in files} <= set(keys)
    # Nothing of the store was written to the local folder: only MLflow's and Prefect's state.
    local = {p.relative_to(tmp_path / "local").parts[0] for p in (tmp_path / "local").rglob("*")}
    assert local <= {"mlflow.db", "mlartifacts", "prefect"}
