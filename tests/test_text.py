"""The sentences finpipe writes: counts agree with their nouns ("1 date", "2 dates")."""

from finpipe.flows.summaries import _features_text, _stale_text

from finpipe.features import describe_feature_update
from finpipe.text import counted


def test_a_count_of_one_takes_the_singular_and_others_the_plural():
    assert counted(1, "date") == "1 date"
    assert counted(0, "date") == "0 dates"
    assert counted(1_250, "row") == "1,250 rows"
    assert counted(2, "batch", "batches") == "2 batches"


def test_a_feature_step_with_nothing_to_build_says_the_features_were_current():
    """A backfill over dates whose features were already built logged "features: 0 rows over
    0 dates"; it says they were current for its range instead."""
    nothing = {"rows": 0, "dates_written": [], "dates_removed": []}
    days = ["2024-01-03", "2024-01-02", "2024-01-04"]
    assert describe_feature_update(nothing, days) == (
        "features: already current for 2024-01-02 to 2024-01-04, nothing to build"
    )
    assert describe_feature_update(nothing, ["2024-01-02"]) == (
        "features: already current for 2024-01-02, nothing to build"
    )
    wrote = {"rows": 36, "dates_written": ["2024-01-02"], "dates_removed": []}
    assert describe_feature_update(wrote, days) == "features: 36 rows over 1 date"
    retracted = {"rows": 0, "dates_written": [], "dates_removed": ["2024-01-03"]}
    assert describe_feature_update(retracted, days) == (
        "features: 1 date removed (2024-01-03)"  # it read "0 rows over 0 dates"
    )
    both = {"rows": 36, "dates_written": ["2024-01-02"], "dates_removed": ["2024-01-03"]}
    assert describe_feature_update(both, days) == (
        "features: 36 rows over 1 date; 1 date removed (2024-01-03)"
    )


def test_a_night_with_one_new_date_says_so_in_its_summary():
    features = {"rows": 36, "dates_written": ["2023-10-11"], "seconds": 0.4}
    text = "\n".join(_features_text({**features, "skipped_features": []}))
    assert "36 rows over 1 new date in 0.4 s." in text
    stale = {"dates": ["2023-10-10"], "backfill": None, "removed": []}
    assert _stale_text(stale, loads_files=True).startswith(
        "Predictions of 1 earlier date were scored from data changed since"
    )


def test_a_night_that_rebuilt_dates_does_not_call_them_new():
    """A correction's or a late delivery's dates are built again, not new: 53 rows over 6
    dates that all had features before read '6 rebuilt dates', not '6 new dates'."""
    days = [f"2022-08-0{day}" for day in range(1, 7)]
    features = {"rows": 53, "seconds": 0.4, "skipped_features": []}
    rebuilt = {**features, "dates_written": days, "dates_rebuilt": days}
    assert "53 rows over 6 rebuilt dates in 0.4 s." in _features_text(rebuilt)
    both = {**features, "dates_written": days, "dates_rebuilt": days[:-1]}
    assert "53 rows over 1 new date and 5 rebuilt dates in 0.4 s." in _features_text(both)


def test_features_a_source_never_has_are_said_apart_from_skipped_ones():
    """CDNOW's config maps no category: its shares are 'not built', not 'skipped (missing
    columns)', the line the summary keeps for a column the source should have."""
    unsourced = {"category_share_*": "the source's config maps no category column"}
    features = {"rows": 36, "dates_written": ["1998-06-30"], "seconds": 0.4}
    text = "\n".join(
        _features_text({**features, "skipped_features": {}, "unsourced_features": unsourced})
    )
    assert f"Not built (no such column in the source): {unsourced}" in text
    assert "Skipped" not in text


def test_more_than_ten_stale_dates_name_ten_and_count_the_rest():
    dates = [f"2024-01-{day:02d}" for day in range(2, 17)]
    text = _stale_text({"dates": dates, "backfill": None, "removed": []}, loads_files=True)
    assert "of 15 earlier dates were scored" in text
    assert ", ".join(dates[:10]) + " and 5 more." in text


def test_each_runs_stale_predictions_say_where_the_changed_data_came_from():
    """A train or score run loads no file: the data its feature step rebuilt from came before
    it (a `finpipe ingest --correction`, a late file), not "data this run changed"; a nightly
    or a backfill may have loaded it itself, or a run before it did."""
    from finpipe.flows.summaries import (
        backfill_description,
        score_markdown,
        summary_markdown,
        train_markdown,
    )

    stale = {
        "dates": ["2024-01-02", "2024-01-03"],
        "removed": [],
        "backfill": "finpipe run backfill --domain market --start 2024-01-02 --end 2024-01-03",
    }
    training = {"run_id": "r", "candidate": "mlp", "challenger_version": 2, "metrics": {}}
    predictions = {"rows": 8, "model_name": "finpipe-market", "model_version": 1, "path": "p"}
    before = (
        "Predictions of 2 earlier dates were scored from data changed since (a correction, a "
        "retraction or a late delivery, loaded before this run, e.g. by `finpipe ingest "
        "--correction`), whose features this run brought up to date: 2024-01-02, 2024-01-03."
    )
    loaded = (
        "Predictions of 2 earlier dates were scored from data changed since (a correction, a "
        "retraction or a late delivery, loaded by this run or before it), whose features this "
        "run brought up to date: 2024-01-02, 2024-01-03."
    )
    texts = {
        "train": train_markdown("market", "2024-01-04", training, None, stale),
        "score": score_markdown("market", "2024-01-04", predictions, stale),
        "nightly": summary_markdown({**_night([], "2024-01-04"), "stale_predictions": stale}),
        "backfill": backfill_description("market", "2024-01-04", "2024-01-05", [], stale),
    }
    for run, text in texts.items():
        assert (before if run in ("train", "score") else loaded) in text, run
        assert "this run changed" not in text, run


def test_the_metrics_table_puts_each_value_under_its_own_header():
    from finpipe.flows.summaries import metrics_table

    table = metrics_table(
        {
            "mlp": {"test": {"ic": 0.051, "oracle_ic": 0.11, "rank_ic": 0.047, "rmse": 0.98}},
            "lgbm": {"test": {"rank_ic": 0.03, "ic": 0.032, "rmse": 1.02}},  # no oracle here
        }
    )
    assert table == [
        "| model | test ic | test oracle_ic | test rank_ic | test rmse |",
        "|---|---|---|---|---|",
        "| mlp | 0.051 | 0.11 | 0.047 | 0.98 |",
        "| lgbm | 0.032 |  | 0.03 | 1.02 |",
    ]


def _night(ingested: list[dict], as_of: str) -> dict:
    """A market night's summary as the nightly flow builds it, with `ingested` as its files."""
    return {
        "domain": "market",
        "as_of": as_of,
        "ingested": ingested,
        "features": {
            "rows": 8,
            "dates_written": [as_of],
            "seconds": 0.1,
            "skipped_features": {},
        },
        "training": None,
        "promotion": None,
        "predictions": {
            "rows": 8,
            "date": as_of,
            "model_name": "finpipe-market",
            "model_version": 1,
            "path": "p",
        },
    }


def test_the_nights_summary_lists_each_accepted_files_data_quality_warnings():
    from finpipe.flows.summaries import summary_markdown

    warned = "close moved more than 40% from the previous close: a split? (2 rows)"
    ingested = [
        {
            "source": "/drop/market_2024-01-02.csv",
            "status": "validated",
            "rows": 8,
            "dates": 1,
            "warnings": [warned],
        },
        {"source": "/drop/market_2024-01-03.csv", "status": "validated", "rows": 8, "dates": 1},
    ]
    text = summary_markdown(_night(ingested, "2024-01-02"))
    assert "**Data-quality warnings** (recorded; the data was accepted):" in text
    assert f"- market_2024-01-02.csv: {warned}" in text
    assert "market_2024-01-03.csv:" not in text


def test_the_nights_file_table_shows_no_zero_for_a_file_it_did_not_load():
    """A file loaded before keeps its rows (its batch record) but not its date count, and one
    left for a later run was not read: '-' there, not '0 dates' or '0 rows'."""
    from finpipe.flows.summaries import summary_markdown

    ingested = [
        {"source": "/drop/market_2024-01-03.csv", "status": "validated", "rows": 8, "dates": 1},
        # what a file loaded before holds: its batch record's rows, no count of dates
        {
            "source": "/drop/market_2024-01-02.csv",
            "status": "already_loaded",
            "rows": 8,
            "dates": 0,
        },
        {"source": "/drop/market_2024-01-04.csv", "status": "later", "rows": 0, "dates": 0},
    ]
    text = summary_markdown(_night(ingested, "2024-01-03"))
    assert "| market_2024-01-03.csv | validated | 8 | 1 |" in text
    assert "| market_2024-01-02.csv | already_loaded | 8 | - |" in text
    assert "| market_2024-01-04.csv | later | - | - |" in text
