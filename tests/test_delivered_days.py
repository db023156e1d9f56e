"""Delivered dates read one way per column: day/month order is proven by the column or set,
never guessed value by value, and a time zone never moves the day as written."""

from __future__ import annotations

import pandas as pd
import pytest

from finpipe.delivered_days import parse_days, strip_zone


def _read(values: list[str | None], order="auto") -> tuple[list[str | None], list[str | None]]:
    text, _ = strip_zone(pd.Series(values, dtype="string").str.strip())
    days, problems = parse_days(text, order)
    shown = [None if pd.isna(day) else day.strftime("%Y-%m-%d") for day in days]
    return shown, [None if pd.isna(problem) else problem for problem in problems]


def test_a_day_first_column_reads_every_value_day_first():
    # pandas' format="mixed" read 08/01 as 1 August and 13/01 as 13 January in one file.
    days, problems = _read(["08/01/2024", "12/01/2024", "13/01/2024"])
    assert days == ["2024-01-08", "2024-01-12", "2024-01-13"]
    assert problems == [None, None, None]


def test_a_month_first_column_reads_every_value_month_first():
    days, _ = _read(["01/08/2024", "01/13/2024"])
    assert days == ["2024-01-08", "2024-01-13"]


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (["08/01/2024", "09/01/2024"], "ambiguous: every day and month is at most 12"),
        (["13/01/2024", "01/13/2024"], "mixes day-first and month-first dates"),
    ],
)
def test_a_column_that_cannot_tell_its_order_is_refused_row_by_row(values, reason):
    days, problems = _read(values)
    assert days == [None, None]
    for value, problem in zip(values, problems, strict=True):
        assert problem.startswith(value) and reason in problem
        assert "FINPIPE_DATE_ORDER" in problem


def test_a_set_order_reads_an_ambiguous_column():
    assert _read(["08/01/2024", "09/01/2024"], "dmy")[0] == ["2024-01-08", "2024-01-09"]
    assert _read(["08/01/2024", "09/01/2024"], "mdy")[0] == ["2024-08-01", "2024-09-01"]
    # A set order refuses what it cannot read rather than swapping day and month.
    assert _read(["13/01/2024"], "mdy") == ([None], ["13/01/2024"])


@pytest.mark.parametrize(
    "stamp",
    [
        "2024-01-02 21:00:00 UTC",
        "2024-01-02 21:00 GMT",
        "2024-01-02T16:00:00+05",
        "2024-01-02T23:30:00z",
        "2024-01-02T23:30:00Z",
        "2024-01-02T23:30:00-05:00",
        "2024-01-02T00:30:00.123+0200",
    ],
)
def test_an_offset_or_zone_name_is_dropped_and_the_day_kept_as_written(stamp):
    assert _read([stamp]) == (["2024-01-02"], [None])


def test_other_forms_read_value_by_value_and_what_is_no_date_is_named():
    days, problems = _read(["2024-01-08", "9 Jan 2024", "January 10, 2024", "45000", "", None])
    assert days == ["2024-01-08", "2024-01-09", "2024-01-10", None, None, None]
    assert problems == [None, None, None, "45000", None, None]  # blanks are missing, not bad


def test_a_date_that_does_not_exist_is_named():
    assert _read(["31/02/2024", "15/01/2024"]) == ([None, "2024-01-15"], ["31/02/2024", None])


def test_two_digit_years_follow_the_same_order_as_the_column():
    # Once read value by value: 08/01/24 became 1 August beside 13 January.
    assert _read(["08/01/24", "09/01/24", "13/01/24"])[0] == [
        "2024-01-08",
        "2024-01-09",
        "2024-01-13",
    ]
    assert _read(["08/01/24"], "dmy")[0] == ["2024-01-08"]
    assert _read(["12/31/99", "01/02/68"])[0] == ["1999-12-31", "2068-01-02"]  # as %y reads


def test_a_column_of_one_odd_value_among_iso_dates_reads_each_distinct_value_once():
    values = ["2024-01-08"] * 3 + ["n/a", "2024-01-09", None]
    days, problems = _read(values)
    assert days == ["2024-01-08"] * 3 + [None, "2024-01-09", None]
    assert problems == [None] * 3 + ["n/a", None, None]


def test_tickers_with_characters_no_screen_shows_are_refused():
    from finpipe.market.schema import _tickers

    names = ["AAPL", "AAPL\u00ad", "AAPL\u034f", "AAPL\u180e", "AB\u00a0C", " brk.b ", "7203.T", ""]
    tickers, problems = _tickers(pd.Series(names, dtype="string"))
    assert tickers.tolist() == ["AAPL", pd.NA, pd.NA, pd.NA, pd.NA, "BRK.B", "7203.T", pd.NA]
    assert problems.notna().tolist() == [False, True, True, True, True, False, False, False]


def test_a_two_digit_year_reads_as_strptime_reads_it_69_to_99_in_the_1900s():
    days, _ = _read(["13/02/68", "13/02/69", "13/02/99", "13/02/00"])
    assert days == ["2068-02-13", "1969-02-13", "1999-02-13", "2000-02-13"]


def test_a_value_that_is_also_a_missing_marker_is_kept_where_text_is_a_value(tmp_path):
    """`NA` is a ticker on the TSX and `None` a category; in a number, a date or a label it
    means missing, and is no parse failure there."""
    from finpipe.credit.config import load_loan_book
    from finpipe.credit.schema import normalise_credit_frame
    from finpipe.ingest import _retraction_flags, read_delivery
    from finpipe.market.schema import PARSE_ERRORS, normalise_market_frame

    prices = tmp_path / "market.csv"
    prices.write_text(
        "date,ticker,close,adj_close,volume,retracted\n"
        "2024-01-08,NA,10.5,null,N/A,NA\n"
        "2024-01-08,NULL,11.0,,NaN,true\n"
        "NA,AAA,12.0,12.0,100,\n"
        "2024-01-08, #N/A N/A ,13.0,13.0,100,null\n"  # a terminal's error value: no ticker
    )
    raw = read_delivery(prices)
    assert raw["ticker"].tolist()[:3] == ["NA", "NULL", "AAA"]
    assert _retraction_flags(raw, "market.csv").tolist() == [False, True, False, False]
    raw = raw.drop(columns="retracted")
    assert raw["adj_close"][0] == "null" and pd.isna(raw["adj_close"][1])  # only a blank is
    market = normalise_market_frame(raw)
    assert market["ticker"].tolist()[:3] == ["NA", "NULL", "AAA"]
    assert pd.isna(market["ticker"][3])  # the not-null rule then rejects the file
    assert market["adj_close"].isna().tolist() == [True, True, False, False]
    assert market["volume"].isna().tolist() == [True, True, False, False]
    assert pd.isna(market["date"][2])
    assert market.attrs[PARSE_ERRORS] == {}  # missing, not unparseable

    book = load_loan_book("synthetic")
    loans = tmp_path / "loans.csv"
    columns = list(book.delivered_columns)
    values = {column: "1" for column in columns}
    values |= {book.columns.id: "NA", book.columns.label: "NA", book.columns.date: "2024-01-08"}
    categorical, numeric = book.categorical_columns[0], book.numeric_columns[0]
    values |= {categorical: "None", numeric: "null"}
    loans.write_text(",".join(columns) + "\n" + ",".join(values[c] for c in columns) + "\n")
    credit = normalise_credit_frame(read_delivery(loans), book=book)
    assert credit[book.columns.id].tolist() == ["NA"]
    assert credit[categorical].tolist() == ["None"]
    assert credit[book.columns.label].isna().all()  # no outcome yet
    assert credit[numeric].isna().all()
    assert credit.attrs[PARSE_ERRORS] == {}
