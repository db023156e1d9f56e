"""Bad deliveries through the real ingest path: a clear error, quarantine, nothing lost.

Each case starts from accepted history, offers one bad file for the next business day and
checks: the error names the file, the rule and a sample; the batch sits in quarantine with a
machine-readable report; every accepted partition is byte-for-byte what it was.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil

import pandas as pd
import pytest

from finpipe.errors import InputFileError, ValidationFailed
from finpipe.ingest import ingest_file
from finpipe.market.pipeline import MARKET_CONTRACT
from finpipe.market.synthetic import MarketSyntheticConfig, generate_market_panel
from finpipe.storage import Storage

AS_OF = "2099-01-01"


@pytest.fixture(scope="module")
def panel():
    return generate_market_panel(MarketSyntheticConfig(tickers=6, days=320, seed=5)).prices


@pytest.fixture(scope="module")
def accepted_root(tmp_path_factory, panel):
    """A storage root holding every date but the last, ingested once for the module."""
    folder = tmp_path_factory.mktemp("accepted")
    history = folder / "history.csv"
    _vendor(panel[panel["date"] < panel["date"].max()]).to_csv(history, index=False)
    ingest_file(Storage(folder / "root"), MARKET_CONTRACT, history, as_of=AS_OF)
    return folder / "root"


@pytest.fixture
def accepted(tmp_path, panel, accepted_root):
    """A copy of the accepted history for one test; returns (storage, last day's rows)."""
    shutil.copytree(accepted_root, tmp_path / "root")
    storage = Storage(tmp_path / "root")
    last_day = panel["date"].max()
    assert storage.partition_dates("validated", "market")[-1] < last_day.date()
    return storage, panel[panel["date"] == last_day].reset_index(drop=True)


def _vendor(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["date"] = out["date"].dt.strftime("%Y-%m-%d")
    return out.rename(columns={"adj_close": "Adj Close", "date": "Date", "ticker": "Ticker"})


def _csv(frame: pd.DataFrame) -> bytes:
    return _vendor(frame).to_csv(index=False).encode()


def _snapshot(storage: Storage) -> dict:
    folder = storage.root / "validated"
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*.parquet"))}


def _set(rows: pd.DataFrame, index: int, column: str, value) -> pd.DataFrame:
    rows = rows.astype({column: object}) if isinstance(value, str) else rows.copy()
    rows.loc[index, column] = value
    return rows


def _parquet_bytes(rows: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    rows.to_parquet(buffer, index=False)
    return buffer.getvalue()


# (file name, builder(last-day rows) -> bytes, rule named in the error, sample text in the error)
REJECTED = {
    "empty": ("empty.csv", lambda r: b"", "readable_file", "empty"),
    "header only": (
        "header.csv",
        lambda r: b"Date,Ticker,Close\n",
        "expect_table_row_count",
        "observed: 0",
    ),
    "missing required column": (
        "noclose.csv",
        lambda r: _csv(r.drop(columns=["close"])),
        "readable_file",
        "'close'",
    ),
    "text in numeric column": (
        "text.csv",
        lambda r: _csv(_set(r, 2, "volume", "12k")),
        "parseable_values",
        "12k",
    ),
    "NaN close": (
        "nan.csv",
        lambda r: _csv(_set(r, 1, "close", float("nan"))),
        "not_be_null",
        "row 1",
    ),
    "+inf price": ("inf.csv", lambda r: _csv(_set(r, 3, "high", float("inf"))), "(high)", "inf"),
    "-inf price": ("ninf.csv", lambda r: _csv(_set(r, 3, "low", float("-inf"))), "(low)", "inf"),
    "+inf volume": (
        "vinf.csv",
        lambda r: _csv(_set(r, 2, "volume", float("inf"))),
        "(volume)",
        "inf",
    ),
    "zero price": ("zero.csv", lambda r: _csv(_set(r, 0, "close", 0.0)), "(close)", "row 0"),
    "negative price": ("neg.csv", lambda r: _csv(_set(r, 4, "open", -3.0)), "(open)", "row 4"),
    "high below low": (
        "hilo.csv",
        lambda r: _csv(_set(r, 2, "high", float(r.loc[2, "low"]) * 0.5)),
        "(high, low)",
        "row 2",
    ),
    "duplicate keys in file": (
        "dupes.csv",
        lambda r: _csv(pd.concat([r, r.iloc[[1]]])),
        "compound_columns_to_be_unique",
        "row",
    ),
    "date after as-of": (
        "future.csv",
        lambda r: _csv(r.assign(date=pd.Timestamp("2099-02-01"))),
        "(date)",
        "2099-02-01",
    ),
    "unparseable date": (
        "baddate.csv",
        lambda r: _csv(r).replace(r["date"].iloc[0].strftime("%Y-%m-%d").encode(), b"31/02/20x", 1),
        "parseable_values",
        "31/02/20x",
    ),
    "mixed time zones": (
        "tz.csv",
        lambda r: _csv(r).replace(
            r["date"].iloc[0].strftime("%Y-%m-%d").encode(),
            r["date"].iloc[0].strftime("%Y-%m-%dT00:00:00+02:00").encode(),
            1,
        ),
        "parseable_values",
        "mixed time zones",
    ),
    "unadjusted split jump": (
        "split.csv",
        lambda r: _csv(
            r.drop(columns=["adj_close"])
            .pipe(_set, 0, "close", r.loc[0, "close"] / 2)
            .pipe(_set, 0, "low", r.loc[0, "close"] / 2.2)
        ),
        "abs_log_return_1d",
        "row 0",
    ),
    "truncated gzip": (
        "cut.csv.gz",
        lambda r: gzip.compress(_csv(r))[:-20],
        "readable_file",
        "truncated or corrupt",
    ),
    "corrupt parquet": (
        "bad.parquet",
        lambda r: _parquet_bytes(r)[:-40] + b"garbage",
        "readable_file",
        "cannot be read",
    ),
    "wrong delimiter": (
        "semi.csv",
        lambda r: _vendor(r).to_csv(index=False, sep=";").encode(),
        "readable_file",
        "not comma-separated",
    ),
    "non-UTF-8 bytes": (
        "latin1.csv",
        lambda r: _csv(r).replace(b"Ticker", b"Tick\xe9r", 1),
        "readable_file",
        "not UTF-8",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_bad_delivery_is_quarantined_with_a_clear_error(case, accepted, tmp_path):
    storage, rows = accepted
    name, build, rule, sample = REJECTED[case]
    path = tmp_path / name
    path.write_bytes(build(rows))
    before = _snapshot(storage)
    with pytest.raises(ValidationFailed) as caught:
        ingest_file(storage, MARKET_CONTRACT, path, as_of=AS_OF)
    message = str(caught.value)
    assert name in message
    assert rule in message, message
    assert sample in message, message
    folder = storage.root / caught.value.quarantine_path
    report = json.loads((folder / "report.json").read_text())
    assert report["success"] is False
    assert any(not r.get("success", True) for r in report["rules"])
    assert (folder / name).read_bytes() == path.read_bytes()
    assert _snapshot(storage) == before, "accepted partitions changed"


def test_a_rejected_file_sent_again_is_rejected_again_into_the_same_quarantine(accepted, tmp_path):
    """A bad file left in the drop folder is picked up again by the next night: the same clear
    error, and its quarantine folder replaced, not a filesystem error over the first one."""
    storage, rows = accepted
    path = tmp_path / "market_bad.csv"
    path.write_bytes(_csv(_set(rows, 2, "close", -1.0)))
    before = _snapshot(storage)
    caught = []
    for _ in range(2):
        with pytest.raises(ValidationFailed, match="market_bad.csv rejected") as rejected:
            ingest_file(storage, MARKET_CONTRACT, path, as_of=AS_OF)
        caught.append(rejected.value)
    first, again = caught
    assert again.quarantine_path == first.quarantine_path
    folder = storage.root / again.quarantine_path
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [
        "market_bad.csv",
        "report.json",
    ]
    assert json.loads((folder / "report.json").read_text())["success"] is False
    assert len(list(folder.parent.iterdir())) == 1
    assert _snapshot(storage) == before


def test_duplicate_keys_across_files_are_rejected(accepted, tmp_path):
    storage, rows = accepted
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_bytes(_csv(rows))
    second.write_bytes(_csv(rows.iloc[::-1]))  # same keys, different bytes
    ingest_file(storage, MARKET_CONTRACT, first, as_of=AS_OF)
    before = _snapshot(storage)
    with pytest.raises(ValidationFailed, match="duplicate_key_across_batches"):
        ingest_file(storage, MARKET_CONTRACT, second, as_of=AS_OF)
    assert _snapshot(storage) == before


@pytest.mark.parametrize(
    ("case", "transform"),
    [
        ("extra column is ignored", lambda r: _vendor(r).assign(Exchange="XNYS")),
        ("unsorted rows are accepted", lambda r: _vendor(r.iloc[::-1])),
        (
            "ticker case and whitespace are normalised",
            lambda r: _vendor(r.assign(ticker="  " + r["ticker"].str.lower() + " ")),
        ),
    ],
)
def test_tolerated_variants_are_accepted(case, transform, accepted, tmp_path):
    storage, rows = accepted
    path = tmp_path / "ok.csv"
    transform(rows).to_csv(path, index=False)
    outcome = ingest_file(storage, MARKET_CONTRACT, path, as_of=AS_OF)
    assert outcome.status == "validated"
    day = rows["date"].iloc[0].date()
    published = storage.read_partition("validated", "market", day)
    assert sorted(published["ticker"]) == sorted(rows["ticker"])
    assert "exchange" not in published.columns


def test_file_larger_than_the_limit_is_refused_before_landing(accepted, tmp_path):
    storage, rows = accepted
    path = tmp_path / "huge.csv"
    path.write_bytes(_csv(rows) * 50)
    with pytest.raises(InputFileError, match="over the 0 MiB limit .* FINPIPE_MAX_FILE_MB"):
        ingest_file(storage, MARKET_CONTRACT, path, as_of=AS_OF, max_file_bytes=1000)
    assert not any(p.name.endswith("huge.csv") for p in storage.landing_dir("market").iterdir())


@pytest.mark.parametrize("flow", ["nightly", "backfill"])
def test_a_run_stopped_by_a_quarantined_file_still_publishes_its_summary(flow, accepted, tmp_path):
    """The morning after a night whose delivery was quarantined, the Prefect UI shows a failed
    run with its summary artifact: which file, which rule on which row, where the report is,
    the command that lists the batches, and that nothing after ingest ran. The run still
    fails with the ingest's error and publishes nothing from the file."""
    from finpipe.flows.backfill import backfill
    from finpipe.flows.nightly import nightly

    from tests.conftest import finpipe_home
    from tests.test_backfill import _artifact

    storage, rows = accepted
    day = rows["date"].iloc[0].date()
    path = tmp_path / f"market_{day}.csv"
    path.write_bytes(_csv(_set(rows, 2, "close", -1.0)))
    before = _snapshot(storage)
    with finpipe_home(storage.root):
        if flow == "nightly":
            state = nightly(as_of=day, inputs=[str(path)], retrain=False, return_state=True)
        else:
            state = backfill(start=day, end=day, inputs=(str(path),), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValidationFailed, match=f"{path.name} rejected"):
        state.result()
    key = "nightly-market-summary" if flow == "nightly" else "backfill-market"
    artifact = _artifact(state.state_details.flow_run_id, key)
    assert artifact.type == "markdown"
    text = artifact.data
    [record] = [r for r in storage.batch_records("market") if r["status"] == "quarantined"]
    assert f"| {path.name} | {record['batch_id']} | {len(rows):,} | {day} .. {day} |" in text
    ticker = rows["ticker"].iloc[2]
    assert "- expect_column_values_to_be_between(close): 1 unexpected row(s)" in text
    assert f"e.g. row 2 (date={day}, ticker={ticker}) value -1." in text
    assert f"`{record['quarantine_path']}/report.json`" in text
    assert "`finpipe batches market`" in text
    assert "**Failed at ingest.** Nothing after it ran" in text
    assert "## Predictions" not in text and "## Training" not in text
    assert _snapshot(storage) == before, "accepted partitions changed"
    assert not storage.partition_dates("features", "market")


def test_a_quarantined_file_without_its_report_is_summarised_without_a_report_path():
    """A quarantine folder whose report is missing (a crash between the copy and the report)
    names no report path and says the report is missing, rather than pointing at a file that
    is not there and saying "see the report"."""
    from finpipe.flows.summaries import ingest_failed_markdown

    quarantined = {
        "file": "market_2024-01-02.csv",
        "batch_id": "b1",
        "rows": 10,
        "first_date": "2024-01-02",
        "last_date": "2024-01-02",
        "folder": "/store/quarantine/market/b1",
        "report": None,
        "data_docs": None,
        "rules": [],
    }
    text = ingest_failed_markdown("finpipe nightly", "market", "rejected", quarantined, "none")
    assert "No report was found in the quarantine folder" in text
    assert "- not recorded (no report)" in text
    assert "report.json" not in text and "None" not in text and "see the report" not in text


def test_a_summary_that_cannot_be_published_leaves_the_run_failing_with_the_ingest_error(
    monkeypatch, tmp_path
):
    """The summary of a run stopped at ingest is published on the way out; if publishing it
    fails (the Prefect API down), the run still fails with the ingest's error, not that one."""
    from types import SimpleNamespace

    from finpipe.flows import run_setup
    from prefect import flow

    def unreachable(**kwargs):
        raise RuntimeError("artifact API unreachable")

    monkeypatch.setattr(run_setup, "create_markdown_artifact", unreachable)
    run = SimpleNamespace(domain="market", storage=Storage(tmp_path))

    @flow
    def night() -> None:
        with run_setup.summary_if_ingest_fails(run, key="k", title="night", not_run="-"):
            raise ValidationFailed("market_2024-01-02.csv rejected")

    with pytest.raises(ValidationFailed, match="market_2024-01-02.csv rejected"):
        night()
