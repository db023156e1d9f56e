"""Credit deliveries through the shared ingest path: typed, validated, published or quarantined."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from finpipe.credit.config import load_loan_book
from finpipe.credit.contract import credit_contract, credit_suite
from finpipe.credit.schema import normalise_credit_frame
from finpipe.credit.synthetic import CreditSyntheticConfig, generate_loan_book, write_deliveries
from finpipe.errors import ValidationFailed
from finpipe.ingest import ingest_file, read_delivery
from finpipe.storage import Storage
from finpipe.validation import validate_frame

AS_OF = "2099-01-01"


@pytest.fixture(scope="module")
def book():
    return load_loan_book("synthetic")


@pytest.fixture(scope="module")
def deliveries(tmp_path_factory):
    book = generate_loan_book(CreditSyntheticConfig(applications=1500, days=60, seed=3))
    folder = tmp_path_factory.mktemp("drop")
    return book, write_deliveries(book.applications, folder, nightly_files=2)


def _ingest(storage: Storage, book, path, as_of=AS_OF):
    return ingest_file(storage, credit_contract(book), path, as_of=as_of)


def test_history_is_typed_and_published_by_application_date(tmp_path, book, deliveries):
    generated, files = deliveries
    storage = Storage(tmp_path)
    outcome = _ingest(storage, book, files[0])
    applications = generated.applications
    nightly = sorted(applications["application_date"].unique())[-2:]
    history = applications[~applications["application_date"].isin(nightly)]
    assert (outcome.status, outcome.rows) == ("validated", len(history))
    assert outcome.dates == history["application_date"].nunique()
    validated = storage.read_partitions("validated", "credit")
    assert list(validated.columns[:3]) == ["date", "loan_id", "defaulted"]
    assert validated["utilisation"].dtype == "float64"
    assert validated["defaulted"].isna().sum() == history["defaulted"].isna().sum() > 0
    assert validated["income"].isna().sum() == history["income"].isna().sum() > 0


def test_nightly_files_are_new_applications_without_an_outcome_even_when_it_is_known(tmp_path):
    book = generate_loan_book(CreditSyntheticConfig(applications=300, days=20, open_days=0))
    assert book.applications["defaulted"].notna().all()  # every outcome drawn
    files = write_deliveries(book.applications, tmp_path, nightly_files=2)
    for path in files[1:]:
        nightly = pd.read_csv(path, dtype=str, keep_default_na=False)
        assert len(nightly) > 0 and (nightly["defaulted"] == "").all(), path.name
    history = pd.read_csv(files[0], dtype=str, keep_default_na=False)
    assert (history["defaulted"] != "").all()


def _bad_copy(path, tmp_path, change) -> object:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(frame)
    out = tmp_path / f"bad_{path.name}"
    frame.to_csv(out, index=False)
    return out


def _set(column, value, row=3):
    def change(frame):
        frame.loc[row, column] = value

    return change


def _duplicate_id(frame):
    frame.loc[5, "loan_id"] = frame.loc[4, "loan_id"]


@pytest.mark.parametrize(
    ("change", "rule", "sample"),
    [
        (_duplicate_id, "expect_column_values_to_be_unique(loan_id)", None),
        (_set("defaulted", "maybe"), "expect_column_values_to_be_in_set(defaulted)", "maybe"),
        (_set("utilisation", "7.5"), "expect_column_values_to_be_between(utilisation)", 7.5),
        (_set("age", ""), "expect_column_values_to_not_be_null(age)", None),
        (_set("application_date", "2100-01-05"), "expect_column_values_to_be_between(date)", None),
    ],
    ids=[
        "duplicate_id",
        "label_outside_values",
        "numeric_out_of_range",
        "required_missing",
        "dated_after_as_of",
    ],
)
def test_bad_batch_is_quarantined_with_a_report(tmp_path, book, deliveries, change, rule, sample):
    _, files = deliveries
    storage = Storage(tmp_path / "root")
    path = _bad_copy(files[0], tmp_path, change)
    with pytest.raises(ValidationFailed) as caught:
        _ingest(storage, book, path)
    assert rule in str(caught.value) and path.name in str(caught.value)
    folder = tmp_path / "root" / caught.value.quarantine_path
    report = json.loads((folder / "report.json").read_text())
    failed = {r["rule"]: r for r in report["rules"] if not r["success"]}
    assert list(failed) == [rule]
    assert failed[rule]["unexpected_count"] == (2 if "unique" in rule else 1)
    if sample is not None:
        assert failed[rule]["sample_values"][0] == sample
    assert (folder / path.name).exists() and (folder / "data_docs" / "index.html").exists()
    assert storage.partition_dates("validated", "credit") == []


def test_missing_column_is_quarantined_naming_the_config_and_a_close_match(
    tmp_path, book, deliveries
):
    _, files = deliveries
    frame = pd.read_csv(files[0], dtype=str).rename(columns={"debt_to_income": "debt_income"})
    path = tmp_path / "renamed.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(ValidationFailed) as caught:
        _ingest(Storage(tmp_path / "root"), book, path)
    message = str(caught.value)
    assert "'debt_to_income' (did you mean 'debt_income'?)" in message
    assert "synthetic.toml" in message and "readable_file" in message
    report = json.loads(
        (tmp_path / "root" / caught.value.quarantine_path / "report.json").read_text()
    )
    assert report["rules"][0]["rule"] == "readable_file"


def test_text_in_a_numeric_column_names_the_row_and_value(tmp_path, book, deliveries):
    _, files = deliveries
    path = _bad_copy(files[0], tmp_path, _set("income", "52,000", row=7))
    with pytest.raises(ValidationFailed) as caught:
        _ingest(Storage(tmp_path / "root"), book, path)
    assert "parseable_values" in str(caught.value)
    report = json.loads(
        (tmp_path / "root" / caught.value.quarantine_path / "report.json").read_text()
    )
    rule = next(r for r in report["rules"] if r["rule"] == "parseable_values")
    assert (rule["unexpected_count"], rule["sample_rows"]) == (1, [7])
    assert rule["sample_values"] == [{"income": "52,000"}]


def test_unseen_category_is_reported_but_accepted(tmp_path, book, deliveries):
    _, files = deliveries
    storage = Storage(tmp_path)
    _ingest(storage, book, files[0])
    night = _bad_copy(files[1], tmp_path, _set("purpose", "crypto", row=0))
    frame = normalise_credit_frame(read_delivery(night), book=book)
    report = validate_frame(
        frame,
        suite_name=book.suite_name,
        suite_spec=credit_suite(storage, book=book),
        batch_name="night",
        parameters={"as_of": AS_OF},
    )
    rule = next(r for r in report.rules if r.rule == "expect_column_values_to_be_in_set(purpose)")
    assert report.success and rule.success
    assert (rule.unexpected_count, rule.sample_values) == (1, ["crypto"])
    assert _ingest(storage, book, night).status == "validated"


def test_same_applications_in_another_file_are_rejected(tmp_path, book, deliveries):
    _, files = deliveries
    storage = Storage(tmp_path)
    first = _ingest(storage, book, files[1])
    resent = tmp_path / "resent.csv"
    resent.write_text(files[1].read_text().replace("\n", "\r\n"))  # same rows, other bytes
    with pytest.raises(ValidationFailed, match="duplicate_key_across_batches"):
        _ingest(storage, book, resent)
    assert len(storage.read_partitions("validated", "credit")) == first.rows


def test_cross_sectional_sample_is_dated_by_the_ingest_day(tmp_path, shared_datasets):
    book = load_loan_book("germancredit")
    storage = Storage(tmp_path)
    path = shared_datasets / "germancredit.csv"
    outcome = _ingest(storage, book, path, as_of="2024-03-01")
    assert (outcome.status, outcome.rows) == ("validated", 1000)
    assert (outcome.first_date, outcome.last_date) == ("2024-03-01", "2024-03-01")
    validated = storage.read_partition("validated", "credit", "2024-03-01")
    assert validated["loan_id"].tolist()[:3] == ["1", "10", "100"]  # sorted as text
    assert sorted(validated["loan_id"].astype(int)) == list(range(1, 1001))
    assert (validated["creditability"] == "bad").sum() == 300
    again = _ingest(storage, book, path, as_of="2024-03-02")
    assert again.status == "already_loaded"


def test_a_loan_book_export_with_a_banner_reads_with_the_configs_read_table(
    tmp_path, shared_datasets
):
    """A semicolon export with two banner lines and a comment: one `[read]` table reads it."""
    frame = pd.read_csv(shared_datasets / "germancredit.csv", dtype=str)
    body = frame.to_csv(sep=";", index=False).splitlines()
    export = tmp_path / "export.txt"
    banner = ["Bank XYZ - loan book export", "run 2024-03-01 06:00; internal use only"]
    export.write_text("\n".join([*banner, body[0], "# 1,000 loans", *body[1:]]) + "\n")
    shipped = (shared_datasets.parent / "src/finpipe/credit/configs/germancredit.toml").read_text()
    config = tmp_path / "xyz.toml"
    config.write_text(
        shipped.replace('name = "germancredit"', 'name = "xyz"')
        + '\n[read]\nsep = ";"\nskip_rows = 2\ncomment = "#"\n'
    )
    book = load_loan_book(config)
    assert book.read.pandas_options() == {"sep": ";", "skiprows": 2, "comment": "#"}
    outcome = _ingest(Storage(tmp_path / "home"), book, export, as_of="2024-03-01")
    assert (outcome.status, outcome.rows) == ("validated", 1000)


def test_unparseable_date_fails_the_date_rules_with_the_raw_text(tmp_path, book, deliveries):
    _, files = deliveries
    path = _bad_copy(files[0], tmp_path, _set("application_date", "2022-13-45", row=2))
    with pytest.raises(ValidationFailed) as caught:
        _ingest(Storage(tmp_path / "root"), book, path)
    report = json.loads(
        (tmp_path / "root" / caught.value.quarantine_path / "report.json").read_text()
    )
    failed = {r["rule"]: r for r in report["rules"] if not r["success"]}
    assert set(failed) == {"expect_column_values_to_not_be_null(date)", "parseable_values"}
    assert failed["parseable_values"]["sample_values"] == [{"application_date": "2022-13-45"}]
    # One paragraph: every broken rule (finpipe's own after the suite's), then what to do,
    # then where the Data Docs are.
    message = str(caught.value)
    order = ("expect_column_values_to_not_be_null(date):", "Rule parseable_values:", "Fix the")
    assert [message.index(part) for part in order] == sorted(message.index(p) for p in order)
    assert message.index("Details: ") > message.index("Fix the")


def test_day_first_application_dates_read_day_first_in_every_row(tmp_path, book, deliveries):
    """A European export proves its order with one day above 12: every row reads that way
    (value by value, 02/01/2024 once became 1 February beside 13 January)."""
    _, files = deliveries
    frame = pd.read_csv(files[0], dtype=str, keep_default_na=False).head(3)
    frame["application_date"] = ["02/01/2024", "13/01/2024", "14/01/2024"]
    path = tmp_path / "european.csv"
    frame.to_csv(path, index=False)
    storage = Storage(tmp_path / "root")
    _ingest(storage, book, path, as_of="2024-01-31")
    validated = storage.read_partitions("validated", "credit").sort_values("date")
    assert validated["date"].dt.strftime("%Y-%m-%d").tolist() == [
        "2024-01-02",
        "2024-01-13",
        "2024-01-14",
    ]
