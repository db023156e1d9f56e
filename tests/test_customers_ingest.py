"""Customers ingest: configs, CDNOW through the ordinary path, bad batches quarantined."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from finpipe.customers.config import load_customers_config, shipped_config_names
from finpipe.customers.contract import customers_contract
from finpipe.customers.schema import CHECK_COLUMNS, SUITE, add_transaction_checks
from finpipe.customers.synthetic import (
    CustomersSyntheticConfig,
    generate_customer_transactions,
    write_vendor_files,
)
from finpipe.errors import ConfigError, ValidationFailed
from finpipe.ingest import ingest_file, read_delivery
from finpipe.read_options import ReadOptions
from finpipe.storage import Storage
from finpipe.validation import validate_frame

SYNTHETIC = customers_contract(load_customers_config("synthetic"))
CDNOW = customers_contract(load_customers_config("cdnow"))


@pytest.fixture(scope="module")
def daily_file(tmp_path_factory):
    """One clean synthetic day as a vendor file, and its rows in vendor column names."""
    folder = tmp_path_factory.mktemp("drop")
    generated = generate_customer_transactions(
        CustomersSyntheticConfig(customers=300, days=120, seed=5)
    )
    path = write_vendor_files(generated.transactions, folder, daily_files=1)[1]
    return path, pd.read_csv(path, dtype=str)


def test_same_seed_gives_the_same_log_and_segments_in_their_planted_shares():
    config = CustomersSyntheticConfig(customers=1000, days=60, seed=2)
    first, again = generate_customer_transactions(config), generate_customer_transactions(config)
    pd.testing.assert_frame_equal(first.transactions, again.transactions, check_exact=True)
    pd.testing.assert_frame_equal(first.segments, again.segments, check_exact=True)
    shares = first.segments["segment"].value_counts(normalize=True)
    for segment in config.segments:  # 1,000 draws: within 0.05 of the planted share
        assert shares[segment.name] == pytest.approx(segment.share, abs=0.05), segment.name


def test_vendor_files_deliver_each_transaction_once_history_then_the_last_days(tmp_path):
    generated = generate_customer_transactions(
        CustomersSyntheticConfig(customers=100, days=30, seed=1)
    )
    transactions = generated.transactions
    paths = write_vendor_files(transactions, tmp_path, daily_files=2)
    last_days = sorted(transactions["date"].unique())[-2:]
    assert [p.name for p in paths[1:]] == [
        f"customers_{pd.Timestamp(day).date()}.csv" for day in last_days
    ]
    history = pd.read_csv(paths[0], parse_dates=["Transaction Time"])
    assert history["Transaction Time"].dt.normalize().max() < last_days[0]
    delivered = sum(len(pd.read_csv(path)) for path in paths)
    assert delivered == len(transactions)


def test_shipped_configs_and_config_errors(tmp_path):
    assert shipped_config_names() == ["cdnow", "cdnow_master", "synthetic"]
    cdnow = load_customers_config("cdnow")
    assert cdnow.read.pandas_options() == {
        "sep": r"\s+",
        "header": None,
        "names": ["customer_id", "customer_index", "date", "cds", "dollars"],
    }
    assert load_customers_config("synthetic").read.pandas_options() is None
    with pytest.raises(ConfigError, match="unknown customers config 'crm'.*cdnow"):
        load_customers_config("crm")
    both = tmp_path / "both.toml"
    both.write_text('[columns]\ncustomer_id = "id"\namount = "x"\ntimestamp = "t"\ndate = "d"\n')
    with pytest.raises(ConfigError, match=r"both.toml: columns: .*exactly one of timestamp"):
        load_customers_config(both)
    broken = tmp_path / "broken.toml"
    broken.write_text("[columns\n")
    with pytest.raises(ConfigError, match="broken.toml is not valid TOML"):
        load_customers_config(broken)


def test_read_options_need_column_names_without_a_header_and_names_replace_a_header(tmp_path):
    with pytest.raises(ValidationError, match="header = false needs names"):
        ReadOptions(header=False, names=[])
    # With a header row (the default), names rename its columns: the header is not a row.
    delivered = tmp_path / "renamed.csv"
    delivered.write_text("id,amount\n1,2.5\n")
    renamed = read_delivery(
        delivered, ReadOptions(names=["customer_id", "dollars"]).pandas_options()
    )
    assert renamed.to_dict("list") == {"customer_id": ["1"], "dollars": ["2.5"]}
    headless = read_delivery(
        delivered, ReadOptions(header=False, names=["customer_id", "dollars"]).pandas_options()
    )
    assert headless["customer_id"].tolist() == ["id", "1"]


def test_cdnow_sample_loads_through_the_ingest_path(tmp_path, shared_datasets):
    storage = Storage(tmp_path)
    outcome = ingest_file(storage, CDNOW, shared_datasets / "CDNOW_sample.txt", as_of="1998-06-30")
    assert outcome.status == "validated"
    assert outcome.rows == 6919
    assert (outcome.first_date, outcome.last_date) == ("1997-01-01", "1998-06-30")
    validated = storage.read_partitions("validated", "customers")
    assert len(validated) == 6919  # $0 purchases and exact duplicates are kept (documented)
    assert validated["customer_id"].nunique() == 2357
    assert validated["customer_id"].str.len().eq(5).all()  # leading zeros survive: "00004"
    assert (validated["amount"] == 0).sum() == 8
    content = ["customer_id", "date", "amount"]
    assert validated.duplicated(content, keep=False).sum() == 40
    assert validated.loc[validated["customer_id"] == "00004", "amount"].tolist()[:2] == [
        29.33,
        29.73,
    ]


def test_the_full_cdnow_master_layout_loads_with_its_shipped_config(tmp_path, shared_datasets):
    """CDNOW_master.txt has four columns (id, date, CDs, dollars): the sample without its
    customer index, in the same whitespace layout with CRLF line ends."""
    lines = (shared_datasets / "CDNOW_sample.txt").read_bytes().decode().splitlines()
    master = tmp_path / "CDNOW_master.txt"
    master.write_bytes(
        "".join(
            f" {cid} {day}  {cds}   {dollars}\r\n"
            for cid, _index, day, cds, dollars in (line.split() for line in lines)
        ).encode()
    )
    storage = Storage(tmp_path / "home")
    contract = customers_contract(load_customers_config("cdnow_master"))
    outcome = ingest_file(storage, contract, master, as_of="1998-06-30")
    assert (outcome.status, outcome.rows) == ("validated", 6919)
    validated = storage.read_partitions("validated", "customers")
    assert validated["customer_id"].nunique() == 2357
    sample = read_delivery(shared_datasets / "CDNOW_sample.txt", CDNOW.read_options)
    assert validated["amount"].sum() == pytest.approx(sample["dollars"].astype(float).sum())


def test_a_vendor_file_with_a_banner_and_comments_loads_with_read_options(tmp_path, daily_file):
    path, rows = daily_file
    body = path.read_text().splitlines()
    banner = tmp_path / "with_banner.csv"
    banner.write_text(
        "\n".join(
            [
                "ACME Payments - transaction export",
                "generated 2024-06-28 02:00 UTC; confidential",
                body[0],
                "# rows below are settled transactions",
                *body[1:],
            ]
        )
        + "\n"
    )
    config = tmp_path / "acme.toml"
    shipped = load_customers_config("synthetic")
    mapping = "\n".join(
        f'{field} = "{column}"' for field, column in shipped.columns.model_dump().items() if column
    )
    config.write_text(f'[read]\nskip_rows = 2\ncomment = "#"\n\n[columns]\n{mapping}\n')
    with_options = customers_contract(load_customers_config(config))
    outcome = ingest_file(Storage(tmp_path / "a"), with_options, banner, as_of="2030-01-01")
    assert (outcome.status, outcome.rows) == ("validated", len(rows))
    # The same file without the options: the banner is taken for the header, and the batch
    # is refused (kept in quarantine) as unreadable, not loaded half-read.
    with pytest.raises(ValidationFailed, match=r"malformed CSV .*set \[read\] skip_rows"):
        ingest_file(Storage(tmp_path / "b"), SYNTHETIC, banner, as_of="2030-01-01")


def test_cdnow_duplicates_are_reported_but_tolerated(shared_datasets):
    config = load_customers_config("cdnow")
    raw = read_delivery(shared_datasets / "CDNOW_sample.txt", CDNOW.read_options)
    frame = CDNOW.normalise(raw, source="CDNOW_sample.txt")
    report = validate_frame(
        add_transaction_checks(frame, allow_refunds=config.rules.allow_refunds),
        suite_name=SUITE,
        batch_name="cdnow",
        parameters={"as_of": "1998-06-30"},
    )
    assert report.success
    duplicates = next(
        r for r in report.rules if r.rule == "expect_column_values_to_be_unique(row_fingerprint)"
    )
    assert duplicates.unexpected_count == 40
    assert duplicates.sample_keys[0] == {"customer_id": "01668", "date": "1997-07-31"}


def _checked(rows: pd.DataFrame) -> pd.DataFrame:
    """Return vendor `rows` normalised by the synthetic config, with the suite's check columns."""
    return add_transaction_checks(SYNTHETIC.normalise(rows, source="rows"), allow_refunds=False)


def _purchases(count: int) -> pd.DataFrame:
    """`count` distinct purchases at one time, in the synthetic config's vendor columns."""
    return pd.DataFrame(
        {
            "Customer ID": [f"C{i:03d}" for i in range(count)],
            "Transaction Time": ["2024-03-01T10:00:00"] * count,
            "Amount": [str(10 + i) for i in range(count)],
            "Category": ["books"] * count,
            "Channel": ["web"] * count,
        }
    )


def _duplicates_rule(rows: pd.DataFrame):
    report = validate_frame(
        _checked(rows), suite_name=SUITE, batch_name="b", parameters={"as_of": "2024-03-01"}
    )
    rule = "expect_column_values_to_be_unique(row_fingerprint)"
    return report, next(r for r in report.rules if r.rule == rule)


@pytest.mark.unit
def test_purchases_differing_only_in_category_or_channel_are_not_duplicates():
    rows = _purchases(10)
    rows.loc[1, ["Customer ID", "Amount", "Category"]] = ["C000", "10", "music"]  # basket of 0
    rows.loc[3, ["Customer ID", "Amount", "Channel"]] = ["C002", "12", "store"]  # as 2, in store

    report, duplicates = _duplicates_rule(rows)

    assert _checked(rows)["row_fingerprint"].is_unique
    assert (report.success, duplicates.unexpected_count) == (True, 0)


@pytest.mark.unit
def test_more_than_one_percent_of_exact_copies_rejects_the_batch():
    twice = _purchases(98)
    twice = pd.concat([twice, twice.iloc[:2]], ignore_index=True)  # 4 rows of 100 are copies
    once = _purchases(299)
    once = pd.concat([once, once.iloc[:1]], ignore_index=True)  # 2 rows of 300: tolerated

    rejected, duplicates = _duplicates_rule(twice)
    accepted, tolerated = _duplicates_rule(once)

    assert (rejected.success, duplicates.success, duplicates.unexpected_count) == (False, False, 4)
    assert (accepted.success, tolerated.unexpected_count) == (True, 2)


@pytest.mark.unit
def test_a_time_with_a_zone_lands_on_its_utc_moment_as_its_iso_text_does():
    moment = pd.Timestamp("2024-03-01 23:30", tz="America/New_York")
    as_parquet = _purchases(1).assign(**{"Transaction Time": pd.Series([moment])})
    as_text = as_parquet.assign(**{"Transaction Time": [moment.isoformat()]})

    for rows in (as_parquet, as_text):
        frame = SYNTHETIC.normalise(rows, source="rows")
        assert (frame.loc[0, "timestamp"], frame.loc[0, "date"]) == (
            pd.Timestamp("2024-03-02 04:30"),
            pd.Timestamp("2024-03-02"),
        )


def _write(tmp_path, rows: pd.DataFrame, name: str):
    path = tmp_path / name
    rows.to_csv(path, index=False)
    return path


BAD_BATCHES = {
    "null key": (
        lambda rows: rows.assign(**{"Customer ID": rows["Customer ID"].mask(rows.index < 2, "")}),
        "expect_column_values_to_not_be_null(customer_id)",
        2,
    ),
    "non-finite amount": (
        lambda rows: rows.assign(Amount=rows["Amount"].mask(rows.index == 3, "inf")),
        "expect_column_values_to_be_between(amount)",
        1,
    ),
    "future timestamp": (
        lambda rows: rows.assign(
            **{"Transaction Time": rows["Transaction Time"].mask(rows.index == 0, "2099-01-01")}
        ),
        "expect_column_values_to_be_between(date)",
        1,
    ),
    "unconfigured refund": (
        lambda rows: rows.assign(Amount=rows["Amount"].mask(rows.index == 1, "-12.50")),
        "expect_column_values_to_be_null(disallowed_refund)",
        1,
    ),
    "file exported twice": (
        lambda rows: pd.concat([rows, rows], ignore_index=True),
        "expect_column_values_to_be_unique(row_fingerprint)",
        None,  # every row, counted twice
    ),
}


@pytest.mark.parametrize("defect", list(BAD_BATCHES))
def test_bad_batch_is_quarantined_with_a_report(tmp_path, daily_file, defect):
    path, rows = daily_file
    damage, rule, count = BAD_BATCHES[defect]
    bad = _write(tmp_path, damage(rows.copy()), path.name)
    storage = Storage(tmp_path / "root")
    with pytest.raises(ValidationFailed) as caught:
        ingest_file(storage, SYNTHETIC, bad, as_of=path.stem.removeprefix("customers_"))
    assert rule in str(caught.value)
    folder = storage.root / caught.value.quarantine_path
    report = json.loads((folder / "report.json").read_text())
    failed = {r["rule"]: r for r in report["rules"] if not r["success"]}
    assert list(failed) == [rule]
    assert failed[rule]["unexpected_count"] == (2 * len(rows) if count is None else count)
    assert (folder / path.name).exists()
    assert storage.partition_dates("validated", "customers") == []


def test_refunds_pass_when_the_config_allows_them(tmp_path, daily_file):
    path, rows = daily_file
    config_file = tmp_path / "refunds.toml"
    text = load_customers_config("synthetic").model_dump(exclude={"name", "description"})
    text["rules"]["allow_refunds"] = True
    config_file.write_text(_toml(text))
    contract = customers_contract(load_customers_config(config_file))
    refund = _write(
        tmp_path, rows.assign(Amount=rows["Amount"].mask(rows.index == 1, "-12.5")), "r.csv"
    )
    outcome = ingest_file(Storage(tmp_path / "root"), contract, refund, as_of="2099-01-01")
    assert outcome.status == "validated"
    stored = Storage(tmp_path / "root").read_partitions("validated", "customers")
    assert (stored["amount"] < 0).sum() == 1
    assert not set(CHECK_COLUMNS) & set(stored.columns)  # check columns are never stored


def _toml(data: dict) -> str:
    lines = []
    for table, values in data.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            if value is None:
                continue
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def test_a_file_missing_a_mapped_column_is_quarantined_with_the_reason(tmp_path, daily_file):
    path, rows = daily_file
    bad = _write(tmp_path, rows.drop(columns=["Amount"]), "no_amount.csv")
    storage = Storage(tmp_path / "root")
    with pytest.raises(ValidationFailed, match=r"'Amount' \(-> amount\) not in the file"):
        ingest_file(storage, SYNTHETIC, bad, as_of="2099-01-01")


def test_overlap_safety_and_idempotent_loading(tmp_path, daily_file):
    path, rows = daily_file
    storage = Storage(tmp_path / "root")
    first = ingest_file(storage, SYNTHETIC, path, as_of="2099-01-01")
    again = ingest_file(storage, SYNTHETIC, path, as_of="2099-01-01")
    assert (first.status, again.status) == ("validated", "already_loaded")
    resent = tmp_path / "resent.csv"
    resent.write_text(path.read_text().replace("\n", "\r\n"))  # same rows, other bytes
    with pytest.raises(ValidationFailed, match="duplicate_key_across_batches"):
        ingest_file(storage, SYNTHETIC, resent, as_of="2099-01-01")
    stored = storage.read_partitions("validated", "customers")
    assert len(stored) == len(rows) == first.rows
    assert np.isclose(stored["amount"].sum(), pd.to_numeric(rows["Amount"]).sum())


def test_text_that_is_no_amount_or_time_is_reported_as_delivered(tmp_path, daily_file):
    """Not only "missing": the report shows the text that did not parse, and its row."""
    path, rows = daily_file
    bad = rows.copy()
    bad.loc[0, "Amount"] = "1,234.50"
    bad.loc[1, "Transaction Time"] = "13/01/2024"
    storage = Storage(tmp_path / "root")
    with pytest.raises(ValidationFailed) as caught:
        ingest_file(storage, SYNTHETIC, _write(tmp_path, bad, path.name), as_of=path.stem[-10:])
    report = json.loads((storage.root / caught.value.quarantine_path / "report.json").read_text())
    parse = next(r for r in report["rules"] if r["rule"] == "parseable_values")
    assert parse["sample_rows"] == [0, 1]
    assert parse["sample_values"] == [{"Amount": "1,234.50"}, {"Transaction Time": "13/01/2024"}]
