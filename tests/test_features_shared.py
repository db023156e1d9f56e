"""What finpipe gives a domain of its own: the per-day feature step (`update_day_features`),
which follows a vendor's corrections, and quarantine messages that name where the domain's
suite really is (`RawContract.suite_spec`), not a file in finpipe's `expectations/`."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from finpipe.features import update_day_features
from finpipe.storage import Storage
from finpipe.validation import ValidationReport, validate_frame

DOMAIN = "toy"
DAYS = [dt.date(2024, 1, 2), dt.date(2024, 1, 3), dt.date(2024, 1, 4)]


def _rows(day: dt.date, x: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {"date": pd.Timestamp(day), "id": [f"id{i}" for i in range(len(x))], "x": x}
    )


def _double(validated: pd.DataFrame) -> pd.DataFrame:
    """A per-day feature: each row's own x, doubled."""
    return validated[["date", "id"]].assign(x2=2 * validated["x"])


def test_the_day_step_rebuilds_a_restated_day_and_removes_a_retracted_one(tmp_path):
    """After a correction, the incremental step equals a rebuild from scratch."""
    storage = Storage(tmp_path)
    for n, day in enumerate(DAYS):
        storage.write_partition("validated", DOMAIN, day, _rows(day, [n, n + 0.5]))
    said: list[str] = []
    first = update_day_features(storage, DOMAIN, DAYS[-1], _double, progress=said.append)
    assert first.dates_written == [d.isoformat() for d in DAYS] and first.rows == 6
    assert said == ["features: 3/3 dates built"]

    # A correction restates a row of the last day and retracts the first day whole.
    storage.write_partition("validated", DOMAIN, DAYS[2], _rows(DAYS[2], [7.0, 2.5]))
    storage.delete_partition("validated", DOMAIN, DAYS[0])
    update = update_day_features(storage, DOMAIN, DAYS[-1], _double)

    assert (update.dates_written, update.dates_removed) == (
        [DAYS[2].isoformat()],
        [DAYS[0].isoformat()],
    )
    assert storage.partition_dates("features", DOMAIN) == DAYS[1:]
    assert storage.read_partition("features", DOMAIN, DAYS[2])["x2"].tolist() == [14.0, 5.0]
    incremental = storage.read_partitions("features", DOMAIN)
    rebuilt = update_day_features(storage, DOMAIN, DAYS[-1], _double, rebuild=True)
    assert rebuilt.dates_written == [d.isoformat() for d in DAYS[1:]]
    pd.testing.assert_frame_equal(incremental, storage.read_partitions("features", DOMAIN))
    assert update_day_features(storage, DOMAIN, DAYS[-1], _double).dates_written == []


@pytest.mark.parametrize(
    ("meta", "location"),
    [
        ({"domain": DOMAIN}, "the toy domain's suite 'toy_rows' (its contract's suite_spec)"),
        ({}, "the suite 'toy_rows' (its contract's suite_spec)"),
        ({"domain": DOMAIN, "defined_in": "the config toy.toml"}, "the config toy.toml"),
    ],
)
def test_a_suite_spec_domains_message_names_its_suite_not_a_file(meta, location):
    """A domain's suite given by its contract (`suite_spec`) is named as such, with the domain
    its `meta.domain` says, in the quarantine's message."""
    rule = {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "x"}}
    spec = {"name": "toy_rows", "meta": meta, "expectations": [rule]}
    frame = pd.DataFrame({"id": ["a", "b"], "x": [1.0, None]})
    report = validate_frame(frame, suite_name="toy_rows", batch_name="b1", suite_spec=spec)

    summary = report.summary()
    assert summary.endswith(
        "Fix the source data and deliver it again, or, if the data is right, "
        f"review the rule in {location}."
    )
    assert "expectations/toy_rows.json" not in summary
    # The quarantine keeps it: a report read back says the same.
    assert ValidationReport.from_dict(report.to_dict()).summary() == summary
