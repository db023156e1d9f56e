"""The sentences finpipe writes: counts agree with their nouns ("1 date", "2 dates")."""

from finpipe.flows.summaries import _features_text, _stale_text

from finpipe.text import counted


def test_a_count_of_one_takes_the_singular_and_others_the_plural():
    assert counted(1, "date") == "1 date"
    assert counted(0, "date") == "0 dates"
    assert counted(1_250, "row") == "1,250 rows"
    assert counted(2, "batch", "batches") == "2 batches"


def test_a_night_with_one_new_date_says_so_in_its_summary():
    features = {"rows": 36, "dates_written": ["2023-10-11"], "seconds": 0.4}
    text = "\n".join(_features_text({**features, "skipped_features": []}))
    assert "36 rows over 1 new date in 0.4 s." in text
    stale = _stale_text({"dates": ["2023-10-10"], "backfill": None, "removed": []})
    assert stale.startswith("Predictions of 1 earlier date were scored from data this run")
