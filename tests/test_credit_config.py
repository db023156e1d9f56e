"""The loan-book config and the suite built from it: clear errors, the rules a reviewer expects."""

from __future__ import annotations

import copy
import json
import tomllib

import pytest

from finpipe.credit.config import example_path, load_loan_book, parse_loan_book
from finpipe.credit.schema import build_credit_suite
from finpipe.errors import ConfigError
from finpipe.validation import rule_id


def synthetic_document() -> dict:
    return tomllib.loads(example_path("synthetic").read_text())


def test_shipped_examples_load_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synthetic = load_loan_book(None)
    german = load_loan_book("germancredit")
    assert (synthetic.name, synthetic.is_dated, synthetic.columns.id) == (
        "synthetic",
        True,
        "loan_id",
    )
    assert synthetic.feature_columns[:2] == ["age", "income"]
    assert (german.is_dated, german.columns.id_from_row_number) == (False, True)
    assert len(german.numeric_columns) == 7 and len(german.categorical_columns) == 13
    assert german.label.allowed == ["bad", "good"]
    assert german.scoring.population == "latest_snapshot"


def test_settings_name_the_config(tmp_path, monkeypatch):
    from finpipe.credit.pipeline import active_loan_book
    from finpipe.settings import load_settings

    monkeypatch.setenv("FINPIPE_CREDIT_CONFIG", "germancredit")
    assert active_loan_book(load_settings()).name == "germancredit"
    path = tmp_path / "book.toml"
    path.write_text(example_path("synthetic").read_text().replace('"synthetic"', '"mine"', 1))
    monkeypatch.setenv("FINPIPE_CREDIT_CONFIG", str(path))
    book = active_loan_book(load_settings())
    assert (book.name, book.source) == ("mine", str(path))


def test_unknown_config_names_the_examples():
    with pytest.raises(ConfigError, match="synthetic, germancredit"):
        load_loan_book("no_such_book")


def test_missing_default_label_values_say_what_to_write():
    document = synthetic_document()
    del document["label"]["default"]
    with pytest.raises(ConfigError) as caught:
        parse_loan_book(document, source="book.toml")
    message = str(caught.value)
    assert message.startswith("book.toml: [label] default is missing")
    assert 'default = ["bad"]' in message


def test_missing_label_table_is_reported():
    document = synthetic_document()
    del document["label"]
    with pytest.raises(ConfigError, match=r"\[label\] table is missing"):
        parse_loan_book(document)


def test_label_values_are_text_and_must_not_overlap():
    document = synthetic_document()
    document["label"] = {"default": [1], "non_default": [0]}
    assert parse_loan_book(document).label.allowed == ["1", "0"]
    document["label"] = {"default": ["1"], "non_default": ["1", "0"]}
    with pytest.raises(ConfigError, match=r"values \['1'\] are listed as both"):
        parse_loan_book(document)


def test_misspelt_key_is_named():
    document = synthetic_document()
    document["columns"]["lable"] = document["columns"].pop("label")
    with pytest.raises(ConfigError) as caught:
        parse_loan_book(document)
    assert "unknown key 'columns.lable'" in str(caught.value)
    assert "columns.label is required" in str(caught.value)


def test_a_column_in_two_roles_is_refused():
    document = synthetic_document()
    document["categorical"]["columns"].append("age")
    with pytest.raises(ConfigError, match=r"\['age'\] appear in more than one role"):
        parse_loan_book(document)


@pytest.mark.parametrize(
    ("grades", "message"),
    [
        (
            [{"grade": "A", "max_pd": 0.1}, {"grade": "B", "max_pd": 0.5}],
            "must end at max_pd = 1.0",
        ),
        (
            [
                {"grade": "A", "max_pd": 0.5},
                {"grade": "B", "max_pd": 0.2},
                {"grade": "C", "max_pd": 1},
            ],
            "must increase",
        ),
        ([{"grade": "A", "max_pd": 0.5}, {"grade": "A", "max_pd": 1.0}], "names repeat"),
    ],
)
def test_grade_bands_must_cover_every_pd_once(grades, message):
    document = synthetic_document()
    document["grades"] = grades
    with pytest.raises(ConfigError, match=message):
        parse_loan_book(document)


def test_outcome_window_is_days_on_a_dated_book():
    document = synthetic_document()
    assert parse_loan_book(document).label.outcome_window_days == 0  # default: no window
    document["label"]["outcome_window_days"] = 365
    assert parse_loan_book(document).label.outcome_window_days == 365
    document["label"]["outcome_window_days"] = -1
    with pytest.raises(ConfigError, match="label.outcome_window_days: Input should be greater"):
        parse_loan_book(document)
    german = tomllib.loads(example_path("germancredit").read_text())
    german["label"]["outcome_window_days"] = 30
    with pytest.raises(ConfigError, match="outcome_window_days needs an application date"):
        parse_loan_book(german)


def test_a_column_named_like_the_delivery_day_is_refused():
    document = synthetic_document()
    document["numeric"]["delivered_on"] = {"min": 0}
    with pytest.raises(ConfigError, match="'delivered_on' clashes with the delivery day"):
        parse_loan_book(document)


def test_numeric_range_must_be_ordered():
    document = synthetic_document()
    document["numeric"]["age"] = {"min": 90, "max": 18}
    with pytest.raises(ConfigError, match="numeric.age: min 90.0 is above max 18.0"):
        parse_loan_book(document)


def test_suite_is_built_from_the_config_plus_the_user_file():
    book = load_loan_book("synthetic")
    suite = build_credit_suite(book, {"region": ["east", "north"]})
    rules = {rule_id(e): e for e in suite["expectations"]}
    assert suite["name"] == "credit_synthetic"
    assert suite["meta"]["key_columns"] == ["date", "loan_id", "delivered_on"]
    assert "expect_column_values_to_be_unique(loan_id)" in rules
    assert rules["expect_column_values_to_be_in_set(defaulted)"]["kwargs"]["value_set"] == [
        "1",
        "0",
    ]
    assert rules["expect_column_values_to_be_between(utilisation)"]["kwargs"] == {
        "column": "utilisation",
        "min_value": 0,
        "max_value": 1.5,
    }
    assert "expect_column_values_to_not_be_null(age)" in rules  # required = true
    assert "expect_column_values_to_not_be_null(income)" not in rules  # missing allowed
    seen = rules["expect_column_values_to_be_in_set(region)"]["kwargs"]
    assert seen == {"column": "region", "value_set": ["east", "north"], "mostly": 0.0}
    assert "expect_column_values_to_be_in_set(purpose)" not in rules  # nothing seen yet
    user = rules["expect_column_values_to_match_regex(loan_id)"]  # expectations/credit_synthetic
    assert user["meta"]["origin"] == "expectations/credit_synthetic.json"


def test_user_rule_replaces_the_built_rule_with_the_same_id():
    book = load_loan_book("germancredit")
    entries = build_credit_suite(book)["expectations"]
    row_count = [e for e in entries if rule_id(e) == "expect_table_row_count_to_be_between()"]
    assert [e["kwargs"] for e in row_count] == [{"min_value": 100}]  # the user's, and only it
    assert row_count[0]["meta"]["origin"] == "expectations/credit_germancredit.json"


def test_a_user_file_with_two_rules_of_one_id_is_a_config_error(expectations_folder):
    between = "expect_column_values_to_be_between"
    user = {
        "name": "credit_synthetic",
        "expectations": [  # a floor and a ceiling on age as two rules: both named between(age)
            {"type": between, "kwargs": {"column": "age", "min_value": 21}},
            {"type": between, "kwargs": {"column": "age", "max_value": 70}},
        ],
    }
    (expectations_folder / "credit_synthetic.json").write_text(json.dumps(user))
    with pytest.raises(ConfigError, match=r"credit_synthetic.json has several expectations named"):
        build_credit_suite(load_loan_book("synthetic"))


def test_user_rule_on_an_unknown_column_is_a_config_error(monkeypatch):
    import finpipe.credit.schema as schema

    original = schema.load_suite_spec

    def with_typo(name):
        spec = copy.deepcopy(original(name))
        spec["expectations"][0]["kwargs"]["column"] = "loan_idd"
        return spec

    monkeypatch.setattr(schema, "load_suite_spec", with_typo)
    with pytest.raises(ConfigError) as caught:
        build_credit_suite(load_loan_book("synthetic"))
    assert "credit_synthetic.json" in str(caught.value)
    assert "unknown column(s) ['loan_idd']" in str(caught.value)


def test_named_extra_suite_must_exist():
    document = synthetic_document()
    document["extra_expectations"] = "credit_nope"
    book = parse_loan_book(document, source="book.toml")
    with pytest.raises(ConfigError, match="expectations/credit_nope.json does not exist"):
        build_credit_suite(book)


def test_the_feature_definition_follows_the_columns_and_labels_features_read_only():
    """What the credit features are computed with: a new column or label value changes it (the
    next feature step rebuilds every date), a grade band or the scoring rule does not."""
    from finpipe.credit.features import credit_feature_definition

    document = synthetic_document()
    base = credit_feature_definition(parse_loan_book(document))
    assert base["numeric"][:2] == ["age", "income"] and base["id"] == "loan_id"
    regraded = copy.deepcopy(document)
    regraded["grades"][0]["max_pd"] = 0.011
    assert credit_feature_definition(parse_loan_book(regraded)) == base
    fewer = copy.deepcopy(document)
    del fewer["numeric"]["income"]
    assert credit_feature_definition(parse_loan_book(fewer))["numeric"][:1] == ["age"]
    assert credit_feature_definition(parse_loan_book(fewer)) != base


def test_a_rejected_loan_books_message_points_at_its_config_not_a_suite_file():
    from finpipe.validation import suite_location

    book = load_loan_book("synthetic")
    spec = build_credit_suite(book)
    assert suite_location(book.suite_name, spec) == (
        f"the loan-book config {book.source} (or expectations/credit_synthetic.json, for a rule "
        "added there)"
    )
