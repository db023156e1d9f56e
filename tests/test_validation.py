"""Tests for the data-quality gate: the market suite's rules, skipping, reports and Data Docs."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from finpipe.errors import ConfigError
from finpipe.market.quality import MARKET_CHECK_COLUMNS, add_market_checks_columns
from finpipe.market.schema import normalise_market_frame, price_column
from finpipe.validation import ValidationReport, load_suite_spec, rule_id, validate_frame

SUITE = "market_ohlcv"
AS_OF = "2024-01-08"
UNADJUSTED_RULE = "expect_column_values_to_be_between(abs_log_return_1d_unadjusted)"
RETURN_RULE = "expect_column_values_to_be_between(abs_log_return_1d)"


def clean_bars() -> pd.DataFrame:
    """Two tickers over five days, rows in date-major order (AAA, BBB, AAA, BBB, ...)."""
    days = pd.to_datetime(["2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05", "2024-01-08"])
    closes = {"AAA": [10.0, 10.5, 10.2, 10.8, 11.0], "BBB": [20.0, 19.5, 20.4, 20.1, 20.6]}
    rows = []
    for i, day in enumerate(days):
        for ticker, series in closes.items():
            close = series[i]
            open_ = close - 0.1
            rows.append(
                {
                    "date": day,
                    "ticker": ticker,
                    "close": close,
                    "open": open_,
                    "high": close + 0.3,
                    "low": open_ - 0.3,
                    "volume": 1000.0,
                    "adj_close": close / 2,
                }
            )
    frame = pd.DataFrame(rows)
    frame["date"] = frame["date"].astype("datetime64[ns]")
    frame["ticker"] = frame["ticker"].astype("string")
    return frame


def check(frame: pd.DataFrame, **kwargs) -> ValidationReport:
    """Validate `frame` plus its market check columns against the market suite."""
    kwargs.setdefault("parameters", {"as_of": AS_OF})
    return validate_frame(
        add_market_checks_columns(frame), suite_name=SUITE, batch_name="test-batch", **kwargs
    )


def failed(report: ValidationReport) -> dict:
    return {rule.rule: rule for rule in report.failures()}


def test_clean_frame_passes_and_skips_only_the_unadjusted_split_rule():
    report = check(clean_bars())

    assert report.success is True
    assert report.failures() == []
    assert report.row_count == 10
    assert len(report.rules) == 31  # 30 errors and the large-move warning
    assert [s["rule"] for s in report.skipped] == [UNADJUSTED_RULE]
    assert report.skipped[0]["missing_columns"] == ["abs_log_return_1d_unadjusted"]
    assert report.skipped[0]["derived"] is True  # the file lacks nothing: not "absent"
    assert (
        report.summary() == "Batch 'test-batch' passed suite 'market_ohlcv' (31 rules on 10 rows)."
    )
    without_volume = check(clean_bars().drop(columns="volume"))
    assert "(29 rules on 10 rows, 2 skipped for absent columns)" in without_volume.summary()


def test_nan_close_fails_only_the_not_null_rule():
    frame = clean_bars()
    frame.loc[4, "close"] = np.nan

    report = check(frame)

    assert report.success is False
    assert list(failed(report)) == ["expect_column_values_to_not_be_null(close)"]
    rule = failed(report)["expect_column_values_to_not_be_null(close)"]
    assert (rule.unexpected_count, rule.sample_rows, rule.sample_values) == (1, [4], [None])
    assert rule.sample_keys == [{"date": "2024-01-04", "ticker": "AAA"}]
    assert rule.unexpected_percent == pytest.approx(10.0)


def test_a_rules_share_counts_every_row_not_only_the_non_empty_ones():
    frame = clean_bars()
    frame["volume"] = np.nan  # no volumes delivered, but for two rows, one of them negative
    frame.loc[[2, 3], "volume"] = [1000.0, -5.0]

    rule = failed(check(frame))["expect_column_values_to_be_between(volume)"]

    assert rule.unexpected_count == 1
    assert rule.unexpected_percent == pytest.approx(10.0)  # 1 of 10 rows, not 1 of 2 values


def test_zero_close_fails_the_positive_price_and_low_rules():
    frame = clean_bars()
    frame.loc[5, "close"] = 0.0  # BBB on 2024-01-04; strict: zero is not a price

    report = check(frame)

    assert sorted(failed(report)) == [
        "expect_column_pair_values_a_to_be_greater_than_b(close, low)",
        "expect_column_values_to_be_between(close)",
    ]
    positive = failed(report)["expect_column_values_to_be_between(close)"]
    assert (positive.unexpected_count, positive.sample_rows, positive.sample_values) == (
        1,
        [5],
        [0.0],
    )
    above_low = failed(report)["expect_column_pair_values_a_to_be_greater_than_b(close, low)"]
    assert above_low.sample_rows == [5]
    assert above_low.sample_values == [[0.0, pytest.approx(20.0)]]


def test_high_below_low_fails_the_three_high_rules_on_that_row():
    frame = clean_bars()
    frame.loc[6, "high"] = 5.0  # AAA on 2024-01-05: open 10.7, low 10.4, close 10.8

    report = check(frame)

    assert sorted(failed(report)) == [
        "expect_column_pair_values_a_to_be_greater_than_b(high, close)",
        "expect_column_pair_values_a_to_be_greater_than_b(high, low)",
        "expect_column_pair_values_a_to_be_greater_than_b(high, open)",
    ]
    rule = failed(report)["expect_column_pair_values_a_to_be_greater_than_b(high, low)"]
    assert rule.unexpected_count == 1
    assert rule.sample_rows == [6]
    assert rule.sample_values == [[5.0, pytest.approx(10.4)]]
    assert rule.details["kwargs"]["or_equal"] is True


def test_duplicate_date_ticker_reports_every_copy():
    frame = clean_bars()
    frame = pd.concat([frame, frame.iloc[[2]]])  # AAA 2024-01-03 again; index label 2 repeats

    report = check(frame)

    assert list(failed(report)) == ["expect_compound_columns_to_be_unique(date, ticker)"]
    rule = failed(report)["expect_compound_columns_to_be_unique(date, ticker)"]
    assert (rule.unexpected_count, rule.sample_rows) == (2, [2, 10])
    assert rule.sample_values == [{"date": "2024-01-03", "ticker": "AAA"}] * 2


def test_date_after_as_of_fails_with_the_parameter_resolved():
    frame = clean_bars()
    frame.loc[9, "date"] = pd.Timestamp("2024-01-09")  # BBB's last bar, one day after as-of

    report = check(frame)

    assert list(failed(report)) == ["expect_column_values_to_be_between(date)"]
    rule = failed(report)["expect_column_values_to_be_between(date)"]
    assert (rule.unexpected_count, rule.sample_rows, rule.sample_values) == (
        1,
        [9],
        ["2024-01-09"],
    )
    assert rule.details["kwargs"]["max_value"] == "2024-01-08"
    assert report.parameters == {"as_of": "2024-01-08"}


def test_bad_tick_times_ten_fails_the_return_bound_on_the_tick_and_the_day_after():
    frame = clean_bars()
    prices = ["close", "open", "high", "low", "adj_close"]
    frame.loc[4, prices] = frame.loc[4, prices] * 10  # AAA on 2024-01-04

    report = check(frame)

    assert list(failed(report)) == [RETURN_RULE]
    rule = failed(report)[RETURN_RULE]
    assert (rule.unexpected_count, rule.sample_rows) == (2, [4, 6])
    assert rule.sample_values == [
        pytest.approx(math.log(102.0 / 10.5)),
        pytest.approx(math.log(102.0 / 10.8)),
    ]


def test_previous_close_catches_a_bad_first_row_of_the_batch():
    batch = clean_bars().query("ticker == 'AAA'").reset_index(drop=True).drop(columns="adj_close")
    previous_close = pd.DataFrame(
        {
            "ticker": ["AAA", "AAA", "BBB"],
            "date": pd.to_datetime(["2023-12-29", "2024-01-02", "2023-12-29"]),
            "price": [1.0, 999.0, 20.0],  # the 2024-01-02 row is not before the batch: ignored
        }
    )

    checked = add_market_checks_columns(batch, previous_close)

    assert checked["abs_log_return_1d"].round(6).tolist() == [
        round(math.log(10.0), 6),
        round(math.log(10.5 / 10.0), 6),
        round(abs(math.log(10.2 / 10.5)), 6),
        round(math.log(10.8 / 10.2), 6),
        round(math.log(11.0 / 10.8), 6),
    ]
    assert checked["abs_log_return_1d_unadjusted"].equals(checked["abs_log_return_1d"])
    assert set(MARKET_CHECK_COLUMNS) <= set(checked.columns)


def test_returns_follow_each_tickers_dates_whatever_the_row_order():
    frame = clean_bars()
    shuffled = frame.sample(frac=1.0, random_state=3)  # rows of a ticker no longer in date order

    def returns(bars: pd.DataFrame) -> pd.Series:
        checked = add_market_checks_columns(bars)
        return checked.set_index(["date", "ticker"])["abs_log_return_1d"].sort_index()

    pd.testing.assert_series_equal(returns(shuffled), returns(frame))
    assert check(shuffled).success is True


def test_a_zero_close_without_adj_close_breaks_only_the_price_rules():
    frame = clean_bars().drop(columns="adj_close")
    frame.loc[4, "close"] = 0.0  # AAA on 2024-01-04; its return and the next day's have no price

    report = check(frame)

    checked = add_market_checks_columns(frame)
    assert checked.loc[[4, 6], "abs_log_return_1d"].isna().all()
    assert sorted(failed(report)) == [
        "expect_column_pair_values_a_to_be_greater_than_b(close, low)",
        "expect_column_values_to_be_between(close)",
    ]


def test_previous_close_is_the_latest_price_before_the_day_not_a_closer_later_one():
    batch = pd.DataFrame(
        {
            "date": pd.to_datetime(["2024-01-03", "2024-01-08"]).astype("datetime64[ns]"),
            "ticker": pd.array(["AAA", "BBB"], dtype="string"),
            "close": [10.2, 20.0],
        }
    )
    previous_close = pd.DataFrame(
        {
            "ticker": ["AAA", "AAA", "BBB"],
            "date": pd.to_datetime(["2023-12-29", "2024-01-04", "2024-01-05"]),
            "price": [10.0, 30.0, 20.0],  # AAA's 2024-01-04 is nearer 2024-01-03, but after it
        }
    )

    checked = add_market_checks_columns(batch, previous_close)

    assert checked["abs_log_return_1d"].tolist() == pytest.approx([math.log(10.2 / 10.0), 0.0])


def test_an_empty_adj_close_column_is_return_checked_on_close():
    csv = (
        "Date,Ticker,Close,Adj Close\n"
        "2024-01-02,AAA,10.1,\n2024-01-03,AAA,10.2,\n2024-01-04,AAA,102.0,\n"
    )
    frame = normalise_market_frame(pd.read_csv(io.StringIO(csv)))

    report = check(frame)

    assert sorted(failed(report)) == [RETURN_RULE, UNADJUSTED_RULE]
    assert failed(report)[UNADJUSTED_RULE].sample_rows == [2]
    assert price_column(frame) == "close"  # the prices features and earlier days are read on


def test_a_ticker_delivered_without_adj_close_is_return_checked_on_its_close():
    csv = (
        "Date,Ticker,Close,Adj Close\n"
        "2024-01-02,AAA,10.1,5.05\n2024-01-02,BBB,20.1,\n"
        "2024-01-03,AAA,10.2,5.10\n2024-01-03,BBB,201.0,\n"  # BBB: a x10 tick in close
        "2024-01-04,AAA,10.3,5.15\n2024-01-04,BBB,20.3,\n"
    )
    frame = normalise_market_frame(pd.read_csv(io.StringIO(csv)))

    report = check(frame)

    assert sorted(failed(report)) == [RETURN_RULE, UNADJUSTED_RULE]
    split = failed(report)[UNADJUSTED_RULE]
    assert split.sample_rows == [3, 5]
    assert split.sample_keys[0] == {"date": "2024-01-03", "ticker": "BBB"}
    assert split.sample_values[0] == pytest.approx(math.log(201.0 / 20.1))
    # AAA stays on adj_close; BBB's first row is not compared with an adjusted earlier price
    adjusted_before = pd.DataFrame(
        {"ticker": ["AAA", "BBB"], "date": pd.to_datetime(["2023-12-29"] * 2), "price": [5.0, 10.0]}
    )
    checked = add_market_checks_columns(frame, adjusted_before)
    assert checked.loc[0, "abs_log_return_1d"] == pytest.approx(math.log(5.05 / 5.0))
    assert checked.loc[[0, 1], "abs_log_return_1d_unadjusted"].isna().all()


def test_market_checks_keep_row_order_and_prefer_adj_close():
    frame = clean_bars()
    frame.loc[3, "close"] = 1000.0  # an unadjusted jump that adj_close does not show

    checked = add_market_checks_columns(frame)

    assert list(checked.index) == list(frame.index)
    assert "abs_log_return_1d_unadjusted" not in checked.columns
    assert math.isnan(checked.loc[0, "abs_log_return_1d"])  # no previous close for AAA
    assert checked.loc[3, "abs_log_return_1d"] == pytest.approx(abs(math.log(19.5 / 20.0)))


def test_absent_optional_columns_are_skipped_and_the_batch_passes():
    frame = clean_bars()[["date", "ticker", "close"]]

    report = check(frame)

    assert report.success is True
    assert sorted(s["rule"] for s in report.skipped) == sorted(
        [f"expect_column_values_to_be_of_type({c})" for c in ("open", "high", "low")]
        + [f"expect_column_values_to_be_of_type({c})" for c in ("adj_close", "volume")]
        + [f"expect_column_values_to_be_between({c})" for c in ("open", "high", "low")]
        + [f"expect_column_values_to_be_between({c})" for c in ("adj_close", "volume")]
        + [
            f"expect_column_pair_values_a_to_be_greater_than_b({a}, {b})"
            for a, b in [("high", "low"), ("high", "open"), ("high", "close")]
            + [("open", "low"), ("close", "low")]
        ]
    )
    assert UNADJUSTED_RULE in {rule.rule for rule in report.rules}  # returns come from close


def test_missing_required_column_fails_its_existence_rule():
    frame = clean_bars().drop(columns="close")

    report = check(frame)

    assert sorted(failed(report)) == [
        "expect_column_to_exist(abs_log_return_1d)",
        "expect_column_to_exist(close)",
    ]
    assert "expect_column_values_to_not_be_null(close)" in {s["rule"] for s in report.skipped}
    assert "expect_column_to_exist(close) failed" in report.summary()


def test_summary_names_the_rule_a_row_and_a_value():
    frame = clean_bars()
    frame.loc[4, "close"] = np.nan
    frame.loc[5, "volume"] = -3.0

    summary = check(frame).summary()

    assert summary.startswith("Batch 'test-batch' FAILED suite 'market_ohlcv'")
    assert ": 2 rules broken." in summary
    also = check(frame).summary(["parseable_values: 1 row, e.g. row 2 value 'x'."])
    assert ": 3 rules broken." in also  # a rule ingest checks outside the suite counts too
    assert (
        "expect_column_values_to_not_be_null(close): 1 unexpected row(s) (10%), "
        "e.g. row 4 (date=2024-01-04, ticker=AAA) value null (missing)."
    ) in summary
    assert "expect_column_values_to_be_between(volume): 1 unexpected row(s) (10%), " in summary
    assert "row 5 (date=2024-01-04, ticker=BBB) value -3." in summary
    assert "expectations/market_ohlcv.json" in summary


def test_report_to_dict_is_strict_json():
    frame = clean_bars()
    frame.loc[4, "close"] = np.nan

    payload = json.loads(json.dumps(check(frame).to_dict(), allow_nan=False))

    assert payload["suite"] == SUITE
    assert payload["success"] is False
    not_null = next(r for r in payload["rules"] if r["rule"].endswith("not_be_null(close)"))
    assert not_null["sample_values"] == [None]
    assert ValidationReport.from_dict(payload).to_dict() == payload


def test_infinities_are_written_as_text_and_the_report_stays_strict_json():
    frame = clean_bars()
    frame.loc[3, "high"] = math.inf
    frame.loc[5, "low"] = -math.inf

    report = check(frame)

    json.dumps(report.to_dict(), allow_nan=False)  # raises on a bare Infinity
    assert failed(report)["expect_column_values_to_be_between(high)"].sample_values == ["inf"]
    assert failed(report)["expect_column_values_to_be_between(low)"].sample_values == ["-inf"]


def test_empty_batch_fails_the_row_count_rule():
    report = check(clean_bars().iloc[0:0])

    assert [rule.rule for rule in report.failures()] == ["expect_table_row_count_to_be_between()"]
    assert report.failures()[0].details["observed_value"] == 0
    assert "expect_table_row_count_to_be_between() failed (observed: 0)" in report.summary()


def test_sample_with_adj_close_passes(shared_datasets):
    sample = normalise_market_frame(pd.read_csv(shared_datasets / "stocks_ohlcv.csv.gz"))

    report = check(sample, parameters={"as_of": "2013-03-01"})

    assert report.success is True
    assert report.row_count == 12_154
    assert [s["rule"] for s in report.skipped] == [UNADJUSTED_RULE]


def test_a_large_real_move_is_a_warning_and_the_batch_is_accepted():
    jump = clean_bars()
    earnings = (jump["ticker"] == "AAA") & (jump["date"] >= "2024-01-05")
    jump.loc[earnings, ["adj_close", "close", "open", "high", "low"]] *= 1.52  # +52% overnight
    report = check(jump)
    assert report.success is True and report.failures() == []
    [warning] = report.warnings()
    assert (warning.rule, warning.severity) == ("large_move_1d(abs_log_return_1d)", "warning")
    assert warning.unexpected_count == 1
    assert warning.sample_keys == [{"date": "2024-01-05", "ticker": "AAA"}]
    assert "1 warning, data accepted: large_move_1d(abs_log_return_1d): 1 unexpected" in (
        report.summary()
    )
    # a bad tick (x10) is still an error, with what to do about it
    tick = clean_bars()
    tick.loc[(tick["ticker"] == "AAA") & (tick["date"] == "2024-01-04"), "adj_close"] *= 10
    bad = check(tick)
    assert list(failed(bad)) == [RETURN_RULE]
    assert "deliver adj_close" in bad.summary()
    # the same day's warning is listed, but not as accepted data: the batch is rejected
    assert [w.rule for w in bad.warnings()] == ["large_move_1d(abs_log_return_1d)"]
    assert "1 warning, which alone would not reject it: large_move_1d" in bad.summary()
    assert "data accepted" not in bad.summary()


def test_a_close_declared_adjusted_is_checked_as_adjusted_prices_are(shared_datasets):
    sample = normalise_market_frame(pd.read_csv(shared_datasets / "stocks_ohlcv.csv.gz"))
    closes = sample.drop(columns="adj_close")
    report = validate_frame(
        add_market_checks_columns(closes, close_is_adjusted=True),
        suite_name=SUITE,
        batch_name="declared",
        parameters={"as_of": "2013-03-01"},
    )
    # no suspected splits: the four days beyond 0.35 are warnings, and the batch is accepted
    assert report.success is True
    [warning] = report.warnings()
    assert warning.unexpected_count == 4
    assert UNADJUSTED_RULE in [s["rule"] for s in report.skipped]


def test_a_severity_the_gate_does_not_know_is_refused(tmp_path):
    spec = load_suite_spec(SUITE)
    spec["expectations"][0]["meta"]["severity"] = "info"
    with pytest.raises(ConfigError, match="has severity 'info'; use 'error'"):
        validate_frame(
            add_market_checks_columns(clean_bars()),
            suite_name=SUITE,
            batch_name="b",
            parameters={"as_of": AS_OF},
            suite_spec=spec,
        )


def test_sample_without_adj_close_fails_on_the_split_dates(shared_datasets, tmp_path):
    sample = normalise_market_frame(pd.read_csv(shared_datasets / "stocks_ohlcv.csv.gz"))
    unadjusted = sample.drop(columns="adj_close")

    report = check(unadjusted, parameters={"as_of": "2013-03-01"}, data_docs_dir=tmp_path)

    assert list(failed(report)) == [UNADJUSTED_RULE]
    rule = failed(report)[UNADJUSTED_RULE]
    assert rule.unexpected_count == 4
    assert {(k["ticker"], k["date"]) for k in rule.sample_keys} == {
        ("AAPL", "2000-06-21"),  # 2:1 split
        ("MSFT", "2003-02-18"),  # 2:1 split
        ("AAPL", "2005-02-28"),  # 2:1 split
        ("AAPL", "2000-09-29"),  # real -52% crash: undecidable without adj_close
    }
    dates = unadjusted.loc[rule.sample_rows, "date"].dt.strftime("%Y-%m-%d")
    assert set(dates) == {"2000-06-21", "2003-02-18", "2005-02-28", "2000-09-29"}
    assert "date=2000-06-21, ticker=AAPL" in report.summary()
    # what to do: deliver adj_close, or declare that close is already adjusted
    assert "deliver adj_close" in report.summary()
    assert "FINPIPE_MARKET_CLOSE_IS_ADJUSTED=true" in report.summary()

    # Data Docs: a local site whose index and validation page show the failed rule.
    assert report.data_docs == str(tmp_path.resolve() / "index.html")
    assert SUITE in (tmp_path / "index.html").read_text(encoding="utf-8")
    pages = list((tmp_path / "validations" / SUITE).rglob("*.html"))
    assert len(pages) == 1
    page = pages[0].read_text(encoding="utf-8")
    assert "abs_log_return_1d_unadjusted" in page
    assert "4 unexpected values found" in page
    assert (tmp_path / "expectations" / f"{SUITE}.html").is_file()


def test_suite_spec_is_a_gx_suite_with_the_return_bounds():
    spec = load_suite_spec(SUITE)

    assert spec["name"] == SUITE
    assert spec["meta"]["key_columns"] == ["date", "ticker"]
    bounds = {
        (e["kwargs"]["column"], e["meta"].get("severity", "error")): e["kwargs"]["max_value"]
        for e in spec["expectations"]
        if e["type"] == "expect_column_values_to_be_between"
        and e["kwargs"]["column"].startswith("abs_log_return")
    }
    assert bounds == {
        ("abs_log_return_1d", "error"): 1.0,  # a bad tick
        ("abs_log_return_1d", "warning"): 0.35,  # a large real move: recorded, accepted
        ("abs_log_return_1d_unadjusted", "error"): 0.35,  # a split in unadjusted closes
    }
    assert all({"type", "kwargs"} <= set(e) for e in spec["expectations"])


def test_unknown_suite_names_the_available_ones():
    with pytest.raises(ConfigError, match=r"no expectation suite 'credit'.*'market_ohlcv'"):
        load_suite_spec("credit")


def test_two_rules_with_one_id_are_refused_naming_the_id(expectations_folder):
    between = "expect_column_values_to_be_between"
    spec = {
        "name": "twice",
        "expectations": [
            {"type": between, "kwargs": {"column": "x", "min_value": 0}},
            {"type": between, "kwargs": {"column": "x", "max_value": 10}},
        ],
    }
    (expectations_folder / "twice.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=re.escape(f"named ['{between}(x)']; merge them")):
        load_suite_spec("twice")
    assert [rule_id(e) for e in spec["expectations"]] == [f"{between}(x)"] * 2


def test_missing_suite_parameter_says_what_to_pass():
    with pytest.raises(ConfigError, match=r"needs parameter\(s\) \['as_of'\]"):
        check(clean_bars(), parameters={})


@pytest.fixture
def gx_passes(monkeypatch) -> list[tuple[str, str]]:
    """Record each GX run validate_frame makes: ("suite" or the rule's type, result format)."""
    from great_expectations.core.validation_definition import ValidationDefinition
    from great_expectations.datasource.fluent.interfaces import Batch

    passes: list[tuple[str, str]] = []
    suite_run, batch_validate = ValidationDefinition.run, Batch.validate

    def recording_run(self, **kwargs):
        passes.append(("suite", kwargs["result_format"]["result_format"]))
        return suite_run(self, **kwargs)

    def recording_validate(self, expect, **kwargs):
        passes.append((expect.expectation_type, kwargs["result_format"]["result_format"]))
        return batch_validate(self, expect, **kwargs)

    monkeypatch.setattr(ValidationDefinition, "run", recording_run)
    monkeypatch.setattr(Batch, "validate", recording_validate)
    return passes


def test_a_clean_batch_takes_one_counts_only_pass_and_loses_nothing(gx_passes, monkeypatch):
    quick = check(clean_bars())
    assert gx_passes == [("suite", "BASIC")]

    gx_passes.clear()
    monkeypatch.setattr("finpipe.gx_runtime._needs_samples", lambda outcome: True)
    detailed = check(clean_bars())

    assert gx_passes[0] == ("suite", "BASIC")
    assert len(gx_passes) == 1 + 31 and {f for _, f in gx_passes[1:]} == {"SUMMARY"}
    assert quick.success is True
    assert quick.to_dict() == detailed.to_dict()


def test_only_the_rules_that_saw_unexpected_rows_run_again_for_samples(gx_passes, tmp_path):
    frame = clean_bars()
    frame.loc[4, "close"] = np.nan
    frame.loc[6, "volume"] = -5.0

    report = check(frame, data_docs_dir=tmp_path)

    assert gx_passes == [
        ("suite", "BASIC"),
        ("expect_column_values_to_not_be_null", "SUMMARY"),
        ("expect_column_values_to_be_between", "SUMMARY"),
    ]
    not_null = failed(report)["expect_column_values_to_not_be_null(close)"]
    assert (not_null.sample_rows, not_null.sample_keys) == (
        [4],
        [{"date": "2024-01-04", "ticker": "AAA"}],
    )
    assert failed(report)["expect_column_values_to_be_between(volume)"].sample_rows == [6]
    assert [rule.rule for rule in report.rules][:4] == [  # still in suite order
        "expect_column_to_exist(date)",
        "expect_column_to_exist(ticker)",
        "expect_column_to_exist(close)",
        "expect_column_to_exist(abs_log_return_1d)",
    ]
    # The Data Docs page renders the detailed results: the unexpected values' table.
    (page,) = (tmp_path / "validations").rglob("*.html")
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.read_text()))
    assert "Unexpected Value Count -5.0 1" in text


def test_a_rule_passing_under_mostly_still_reports_its_unexpected_rows(gx_passes):
    spec = {
        "name": "mostly_probe",
        "expectations": [
            {
                "type": "expect_column_values_to_be_between",
                "kwargs": {"column": "x", "min_value": 0, "mostly": 0.5},
            }
        ],
    }
    frame = pd.DataFrame({"x": [1.0, 2.0, -1.0, 3.0]})

    report = validate_frame(frame, suite_name="mostly_probe", batch_name="b", suite_spec=spec)

    assert report.success is True
    assert gx_passes == [("suite", "BASIC"), ("expect_column_values_to_be_between", "SUMMARY")]
    (rule,) = report.rules
    assert (rule.success, rule.unexpected_count, rule.sample_rows) == (True, 1, [2])
    assert rule.sample_values == [-1.0]


def test_data_docs_index_lists_the_newest_batches_of_its_folder_and_keeps_every_page(
    tmp_path, monkeypatch
):
    from finpipe.gx_runtime import _gx_runtime

    monkeypatch.setattr("finpipe.gx_runtime.DOCS_INDEX_RESULTS", 2)
    shared, own = tmp_path / "shared", tmp_path / "own"
    for name in ("first-batch", "second-batch", "third-batch"):
        validate_frame(
            add_market_checks_columns(clean_bars()),
            suite_name=SUITE,
            batch_name=name,
            parameters={"as_of": AS_OF},
            data_docs_dir=shared,
        )

    index = (shared / "index.html").read_text(encoding="utf-8")
    assert "second-batch" in index and "third-batch" in index
    assert "first-batch" not in index  # beyond the newest 2: off the index, page kept
    pages = sorted(p.parent.parent.name for p in (shared / "validations").rglob("*.html"))
    assert pages == ["first-batch", "second-batch", "third-batch"]
    assert (shared / "static" / "images" / "favicon.ico").is_file()
    assert len(_gx_runtime().context.validation_results_store.list_keys()) == 2

    check(clean_bars(), data_docs_dir=own)  # another folder: its index lists its own batch

    index = (own / "index.html").read_text(encoding="utf-8")
    assert "test-batch" in index and "third-batch" not in index
    assert (own / "expectations" / f"{SUITE}.html").is_file()
    assert len(_gx_runtime().context.validation_results_store.list_keys()) == 1


def test_a_new_docs_folder_reuses_the_compiled_page_templates(tmp_path, monkeypatch):
    import jinja2

    check(clean_bars(), data_docs_dir=tmp_path / "first")
    compiled: list[str | None] = []
    original = jinja2.Environment.compile

    def recording_compile(self, source, name=None, filename=None, raw=False, defer_init=False):
        compiled.append(name)
        return original(self, source, name, filename, raw, defer_init)

    monkeypatch.setattr(jinja2.Environment, "compile", recording_compile)

    check(clean_bars(), data_docs_dir=tmp_path / "second")

    assert compiled == []  # GX's builder for the new folder found every template compiled
    assert (tmp_path / "second" / "expectations" / f"{SUITE}.html").is_file()
    page = next((tmp_path / "second" / "validations").rglob("*.html")).read_text(encoding="utf-8")
    assert "test-batch" in page and "abs_log_return_1d" in page


def test_an_expectation_gx_cannot_build_names_the_rule_and_the_file():
    spec = {
        "name": "bad_probe",
        "expectations": [
            {
                "type": "expect_column_values_to_be_between",
                "kwargs": {"column": "x", "min_value": 0},
            },
            {"type": "expect_column_values_to_be_purple", "kwargs": {"column": "x"}},
        ],
    }
    frame = pd.DataFrame({"x": [1.0]})

    # A suite given by a contract's suite_spec is named as such: it is no file in expectations/.
    message = (
        r"the suite 'bad_probe' \(its contract's suite_spec\): "
        r"expect_column_values_to_be_purple\(x\) is not a valid"
    )
    with pytest.raises(ConfigError, match=message):
        validate_frame(frame, suite_name="bad_probe", batch_name="b", suite_spec=spec)
