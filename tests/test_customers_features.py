"""Customer snapshots: hand-checked values, the point-in-time property, incremental updates."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import finpipe.customers
from finpipe.customers.features import (
    BASE_FEATURES,
    NS_PER_DAY,
    _row_order,
    build_customer_features,
)
from finpipe.customers.pipeline import update_customer_features
from finpipe.storage import Storage


def _transactions(rows: list[tuple]) -> pd.DataFrame:
    customer, day, amount, category = zip(*rows, strict=True)
    frame = pd.DataFrame(
        {
            "customer_id": pd.array(customer, dtype="string"),
            "date": pd.to_datetime(list(day)).astype("datetime64[ns]"),
            "amount": np.array(amount, dtype=float),
            "category": pd.array(category, dtype="string"),
        }
    )
    return frame.assign(timestamp=frame["date"])


TINY = _transactions(
    [
        ("a", "2024-01-01", 10.0, "x"),
        ("a", "2024-02-01", 20.0, "y"),
        ("a", "2024-03-31", 30.0, "x"),
        ("b", "2023-12-01", 5.0, "Home & Garden"),
        ("b", "2024-03-01", 0.0, None),  # a $0 purchase still counts as a visit
        ("c", "2024-05-01", 99.0, "x"),  # after the snapshot day: must not exist yet
        ("d", "2022-01-10", 40.0, "y"),  # last purchase > 365 days before: not active
    ]
)


def test_snapshot_values_by_hand():
    snapshot = build_customer_features(TINY, "2024-04-01", active_days=365)
    assert snapshot["customer_id"].tolist() == ["a", "b"]
    assert (snapshot["date"] == pd.Timestamp("2024-04-01")).all()
    a, b = (snapshot.iloc[i] for i in range(2))
    # a: purchases on days 91, 60 and 1 before 2024-04-01.
    assert (a["recency_days"], a["tenure_days"]) == (1.0, 91.0)
    assert (a["frequency"], a["purchase_days"]) == (3.0, 3.0)
    assert (a["monetary_total"], a["monetary_mean"]) == (60.0, 20.0)
    assert a["interpurchase_mean_days"] == 45.0  # gaps of 31 and 59 days
    assert a["interpurchase_std_days"] == pytest.approx(np.std([31, 59], ddof=1))
    assert (a["spend_90d"], a["frequency_90d"]) == (50.0, 2.0)
    assert a["spend_trend"] == pytest.approx((50 - 10) / (50 + 10))
    assert a["category_share_x"] == pytest.approx(2 / 3)
    assert a["category_share_y"] == pytest.approx(1 / 3)
    # b: 5.0 on day 122, 0.0 on day 31; one gap only, so no spread of gaps.
    assert (b["recency_days"], b["frequency"], b["monetary_total"]) == (31.0, 2.0, 5.0)
    assert np.isnan(b["interpurchase_std_days"]) and b["interpurchase_mean_days"] == 91.0
    assert (b["spend_90d"], b["frequency_90d"], b["spend_trend"]) == (0.0, 1.0, -1.0)
    assert b["category_share_home_garden"] == 0.5 and b["category_share_unknown"] == 0.5
    assert list(snapshot.columns[:2]) == ["date", "customer_id"]
    assert list(snapshot.columns[2 : 2 + len(BASE_FEATURES)]) == list(BASE_FEATURES)
    assert set(snapshot.dtypes.iloc[2:].astype(str)) == {"float64"}


def test_the_windows_edges_by_hand():
    """The 90-day window is (t-90, t], the one before it (t-180, t-90]; a customer whose last
    purchase is exactly `active_days` before t is active, one a day earlier is not."""
    t = pd.Timestamp("2024-04-01")
    ago = [0, 89, 90, 179, 180]
    rows = [("e", t - pd.Timedelta(days=d), 2.0**i, "x") for i, d in enumerate(ago)]
    rows += [
        ("f", t - pd.Timedelta(days=365), 1.0, "x"),
        ("g", t - pd.Timedelta(days=366), 1.0, "x"),
    ]
    snapshot = build_customer_features(_transactions(rows), t, active_days=365)
    snapshot = snapshot.set_index("customer_id")
    assert snapshot.index.tolist() == ["e", "f"]
    e = snapshot.loc["e"]
    assert (e["spend_90d"], e["frequency_90d"]) == (1.0 + 2.0, 2.0)  # 0 and 89 days ago
    assert e["spend_trend"] == pytest.approx((3.0 - (4.0 + 8.0)) / (3.0 + 12.0))  # 90, 179
    assert (e["recency_days"], e["tenure_days"], e["frequency"]) == (0.0, 180.0, 5.0)
    assert snapshot.loc["f", "recency_days"] == 365.0


def test_values_sharing_a_feature_name_add_up_and_rows_without_a_customer_count_for_nobody():
    rows = _transactions(
        [
            ("a", "2024-03-01", 10.0, "Home & Garden"),
            ("a", "2024-03-02", 10.0, "home garden"),  # the same slug: one feature
            ("a", "2024-03-03", 10.0, "x"),
            (None, "2024-03-03", 99.0, "x"),  # no customer: in nobody's counts or shares
            ("b", "2024-03-04", 10.0, None),
        ]
    )
    snapshot = build_customer_features(rows, "2024-04-01", active_days=365).set_index("customer_id")
    assert snapshot.index.tolist() == ["a", "b"]
    assert snapshot.loc["a", "category_share_home_garden"] == pytest.approx(2 / 3)
    assert snapshot.loc["a", "category_share_x"] == pytest.approx(1 / 3)
    assert snapshot.loc["a", "frequency"] == 3.0 and snapshot.loc["a", "monetary_total"] == 30.0
    assert snapshot.loc["b", "category_share_unknown"] == 1.0
    assert snapshot.loc["b", "category_share_x"] == 0.0


def test_a_refund_takes_off_spend_and_is_no_purchase():
    """A customer who bought once 300 days ago and returned it today is still a lapsed one-off
    buyer with no spend left, not a recent two-time buyer; one who only refunded is not active."""
    rows = _transactions(
        [
            ("a", "2024-01-01", 100.0, "x"),
            ("a", "2024-10-27", -100.0, "y"),  # the refund
            ("b", "2024-01-01", 100.0, "x"),
            ("c", "2024-10-01", -5.0, "x"),  # a refund of a purchase before the data starts
        ]
    )
    snapshot = build_customer_features(rows, "2024-10-27", active_days=365)
    snapshot = snapshot.set_index("customer_id")
    assert snapshot.index.tolist() == ["a", "b"]
    a = snapshot.loc["a"]
    assert (a["recency_days"], a["tenure_days"]) == (300.0, 300.0)
    assert (a["frequency"], a["purchase_days"], a["frequency_90d"]) == (1.0, 1.0, 0.0)
    assert np.isnan(a["interpurchase_mean_days"])
    assert (a["monetary_total"], a["monetary_mean"]) == (0.0, 0.0)
    assert (a["spend_90d"], a["spend_trend"]) == (-100.0, -1.0)
    assert a["category_share_x"] == 1.0 and "category_share_y" not in snapshot.columns
    # b has no refund: its row is the one a snapshot without a's and c's rows gives
    alone = build_customer_features(rows.iloc[[2]], "2024-10-27", active_days=365)
    pd.testing.assert_series_equal(snapshot.loc["b"], alone.set_index("customer_id").loc["b"])


def test_active_window_decides_who_is_scored():
    wide = build_customer_features(TINY, "2024-04-01", active_days=900)
    assert wide["customer_id"].tolist() == ["a", "b", "d"]


def test_future_transactions_change_nothing_at_t():
    t = "2024-04-01"
    known = TINY[TINY["date"] <= pd.Timestamp(t)]
    later = _transactions(
        [("a", "2024-04-02", 1e6, "z"), ("b", "2024-06-01", 3.0, "x"), ("e", "2024-04-05", 1, "y")]
    )
    pd.testing.assert_frame_equal(
        build_customer_features(known, t, active_days=365),
        build_customer_features(pd.concat([TINY, later]), t, active_days=365),
    )


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), cut=st.integers(5, 170), active_days=st.integers(20, 200))
def test_point_in_time_property(seed, cut, active_days):
    """Snapshot at t from the whole log == snapshot at t from the log as it was known at t,
    whatever the row order: later rows (and the order they arrive in) cannot leak into t."""
    rng = np.random.default_rng(seed)
    n = 300
    log = pd.DataFrame(
        {
            "customer_id": pd.array(rng.choice([f"c{i}" for i in range(25)], n), dtype="string"),
            "date": (
                pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 200, n), unit="D")
            ).astype("datetime64[ns]"),
            "amount": np.round(rng.lognormal(3.0, 1.0, n), 2),
            "category": pd.array(rng.choice(["a", "b", "c"], n), dtype="string"),
        }
    )
    log["timestamp"] = log["date"] + pd.to_timedelta(rng.integers(0, 86_400, n), unit="s")
    t = pd.Timestamp("2024-01-01") + pd.Timedelta(days=cut)
    known_then = log[log["date"] <= t]
    # Categories first seen after t must not appear as columns at t either.
    expected = build_customer_features(known_then, t, active_days=active_days)
    shuffled = log.sample(frac=1.0, random_state=seed)
    got = build_customer_features(shuffled, t, active_days=active_days)
    pd.testing.assert_frame_equal(expected, got)


@pytest.mark.parametrize("column", ["category", "channel"])
def test_a_mix_column_first_delivered_after_t_changes_nothing_at_t(tmp_path, column):
    """A source that starts delivering a channel (or category) column later: read together
    with the new days, the earlier rows hold it empty. The snapshot at t must not grow a
    `<column>_share_unknown` of 1.0 for everyone that it did not have when built on its own
    night, or a catch-up or rebuild would give t a column that only later data implied."""
    t = pd.Timestamp("2024-03-31")  # a day with transactions: a catch-up builds it
    known = TINY[TINY["date"] <= t].drop(columns=["category"])
    later = _transactions([("a", "2024-04-02", 5.0, "web"), ("e", "2024-04-03", 7.0, "app")])
    later = later.rename(columns={"category": column})
    on_its_night = build_customer_features(known, t, active_days=365)
    assert not [c for c in on_its_night.columns if c.startswith(f"{column}_share_")]
    pd.testing.assert_frame_equal(
        build_customer_features(pd.concat([known, later]), t, active_days=365), on_its_night
    )

    # The same through the nightly step: a catch-up builds t and a later day from one read.
    storage = Storage(tmp_path)
    _publish_days(storage, pd.concat([known, later]))
    update_customer_features(storage, "2024-04-03", active_days=365, also=[t.date()])
    pd.testing.assert_frame_equal(
        storage.read_partition("features", "customers", t.date()), on_its_night
    )
    after = storage.read_partition("features", "customers", dt.date(2024, 4, 3))
    assert after.set_index("customer_id").loc["e", f"{column}_share_app"] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(0, 400),
    with_stamps=st.booleans(),
    missing_stamps=st.booleans(),
    off_day=st.sampled_from([0.0, 0.0, 0.05]),
)
def test_the_row_order_is_a_lexsort_of_customer_day_time_and_amount(
    seed, rows, with_stamps, missing_stamps, off_day
):
    """The fast order (one key, then only the ties) is exactly `np.lexsort`'s, ties included:
    few customers, days, seconds and amounts so that rows tie on every key; missing amounts
    and times; and, some of the time, timestamps off their row's day (the lexsort path)."""
    rng = np.random.default_rng(seed)
    day = rng.integers(19_700, 19_705, rows)
    customer_day = rng.integers(0, 4, rows) * 5 + (day - 19_700)
    amount = rng.choice([1.0, 2.5, np.nan, 0.0], rows)
    stamps = None
    if with_stamps:
        stamps = day * NS_PER_DAY + rng.choice([0, 10**9, 10**9 + 7, 3_600 * 10**9], rows)
        if missing_stamps:
            stamps[rng.random(rows) < 0.05] = np.iinfo(np.int64).max  # NaT sorts last
        shifted = rng.random(rows) < off_day
        stamps[shifted] += rng.choice([-NS_PER_DAY, NS_PER_DAY], int(shifted.sum()))
    expected = np.lexsort([amount, *([] if stamps is None else [stamps]), customer_day])
    got = _row_order(customer_day, day, stamps, amount)
    np.testing.assert_array_equal(got, expected)


def test_a_timestamp_on_the_next_midnight_is_off_its_day():
    """The boundary of the fast order: a stamp exactly one day after its row's day must not
    tie with the next (customer, day) key's midnight rows."""
    day = np.array([19_700, 19_701])
    stamps = np.array([19_701, 19_701]) * NS_PER_DAY
    got = _row_order(np.array([0, 1]), day, stamps, np.array([2.0, 1.0]))
    np.testing.assert_array_equal(got, [0, 1])


def _publish_days(storage: Storage, log: pd.DataFrame) -> None:
    for day, rows in log.groupby("date"):
        storage.write_partition("validated", "customers", day.date(), rows)


def test_snapshot_update_is_idempotent_and_refreshes_after_late_data(tmp_path):
    storage = Storage(tmp_path)
    _publish_days(storage, TINY[TINY["date"] <= pd.Timestamp("2024-03-31")])
    first = update_customer_features(storage, "2024-04-01", active_days=365)
    assert first.dates_written == ["2024-04-01"] and first.rows == 2
    assert first.dates_rebuilt == []  # a new snapshot
    snapshot = storage.read_partition("features", "customers", "2024-04-01")
    again = update_customer_features(storage, "2024-04-01", active_days=365)
    assert again.dates_written == []  # nothing new: nothing rewritten
    # A late delivery for an earlier day makes the snapshot stale; it is rebuilt from it.
    late = _transactions([("e", "2024-03-15", 12.0, "x")])
    storage.write_partition("validated", "customers", dt.date(2024, 3, 15), late)
    refreshed = update_customer_features(storage, "2024-04-01", active_days=365)
    assert refreshed.dates_written == refreshed.dates_rebuilt == ["2024-04-01"]  # built again
    after = storage.read_partition("features", "customers", "2024-04-01")
    assert after["customer_id"].tolist() == ["a", "b", "e"]
    pd.testing.assert_frame_equal(
        after[after["customer_id"] != "e"].reset_index(drop=True),
        snapshot,
    )
    rebuilt = update_customer_features(storage, "2024-04-01", active_days=365, rebuild=True)
    assert rebuilt.dates_written == ["2024-04-01"]
    pd.testing.assert_frame_equal(
        storage.read_partition("features", "customers", "2024-04-01"), after
    )


def test_a_changed_active_days_rebuilds_every_snapshot_with_it(tmp_path, monkeypatch):
    """The feature settings are recorded with the snapshots: changing them rebuilds every one,
    so no layer mixes snapshots of two definitions (d, last seen 812 days before, joins)."""
    from finpipe.date_runs import update_features_through

    storage = Storage(tmp_path / "home")
    _publish_days(storage, TINY[TINY["date"] <= pd.Timestamp("2024-03-31")])
    monkeypatch.setenv("FINPIPE_CUSTOMERS_CONFIG", "synthetic")  # active_days = 365
    for day in ("2024-03-01", "2024-04-01"):
        assert update_features_through(storage, "customers", day)["dates_written"] == [day]
    assert update_features_through(storage, "customers", "2024-04-01")["dates_written"] == []

    synthetic = Path(finpipe.customers.__file__).parent / "configs" / "synthetic.toml"
    longer = tmp_path / "longer.toml"
    text = synthetic.read_text()
    assert "active_days = 365" in text
    longer.write_text(text.replace("active_days = 365", "active_days = 1000"))
    monkeypatch.setenv("FINPIPE_CUSTOMERS_CONFIG", str(longer))
    said: list[str] = []
    update = update_features_through(storage, "customers", "2024-04-01", progress=said.append)
    assert update["rebuilt_because"] == "active_days: 365 -> 1000"
    assert update["dates_written"] == ["2024-03-01", "2024-04-01"]
    assert "rebuilding every date" in said[0]
    for day in ("2024-03-01", "2024-04-01"):
        snapshot = storage.read_partition("features", "customers", day)
        assert "d" in set(snapshot["customer_id"])
        expected = build_customer_features(TINY, dt.date.fromisoformat(day), active_days=1000)
        pd.testing.assert_frame_equal(snapshot, expected)
    again = update_features_through(storage, "customers", "2024-04-01")
    assert (again["dates_written"], again["rebuilt_because"]) == ([], None)


def test_the_dates_a_run_processes_get_a_snapshot_each_when_they_have_data(tmp_path, monkeypatch):
    """Snapshots are built for the nights that run; a backfill over days never run (`dates`)
    gets each validated day's own, as if each night had run (a day without transactions gets
    none: it is not scored), and asking again builds nothing."""
    from finpipe.date_runs import update_features_through

    storage = Storage(tmp_path / "home")
    _publish_days(storage, TINY[TINY["date"] <= pd.Timestamp("2024-03-31")])
    monkeypatch.setenv("FINPIPE_CUSTOMERS_CONFIG", "synthetic")
    night = update_features_through(storage, "customers", "2024-04-01")
    assert night["dates_written"] == ["2024-04-01"]
    days = ["2024-01-01", "2024-02-01", "2024-03-01"]
    asked = [*days, "2024-01-15"]  # no transaction that day
    ranged = update_features_through(storage, "customers", "2024-03-01", dates=asked)
    assert ranged["dates_written"] == days
    for day in days:
        expected = build_customer_features(TINY, dt.date.fromisoformat(day), active_days=365)
        pd.testing.assert_frame_equal(
            storage.read_partition("features", "customers", day), expected
        )
    again = update_features_through(storage, "customers", "2024-03-01", dates=asked)
    assert again["dates_written"] == []


@settings(max_examples=10, deadline=None)  # 0.6 s an example: ten nights of snapshots
@given(
    seed=st.integers(0, 10_000),
    late_day=st.integers(5, 12),
    late_by=st.integers(1, 4),
    corrected_on=st.integers(5, 14),
)
def test_nightly_snapshots_after_late_and_corrected_days_equal_fresh_ones(
    seed, late_day, late_by, corrected_on
):
    """Ten nights, one day delivered `late_by` nights late and one published day corrected on
    a later night: every snapshot the nights left equals one built from the final history."""
    import tempfile

    rng = np.random.default_rng(seed)
    n = 90
    start = pd.Timestamp("2024-03-01")
    log = pd.DataFrame(
        {
            "customer_id": pd.array(rng.choice([f"c{i}" for i in range(12)], n), dtype="string"),
            "date": (start + pd.to_timedelta(rng.integers(0, 15, n), unit="D")).astype(
                "datetime64[ns]"
            ),
            "amount": np.round(rng.lognormal(3.0, 1.0, n), 2),
            "category": pd.array(rng.choice(["a", "b"], n), dtype="string"),
        }
    )
    log["timestamp"] = log["date"] + pd.to_timedelta(rng.integers(0, 86_400, n), unit="s")
    days = {int((d - start).days): rows for d, rows in log.groupby("date")}
    delivered_on = {d: max(d, 5) for d in days}
    if late_day in days:
        delivered_on[late_day] = min(late_day + late_by, 14)
    with tempfile.TemporaryDirectory() as folder:
        storage = Storage(folder)
        for night in range(5, 15):
            for d, rows in days.items():
                if delivered_on[d] == night:
                    day = (start + pd.Timedelta(days=d)).date()
                    storage.write_partition("validated", "customers", day, rows)
            published = storage.partition_dates("validated", "customers")
            if night == corrected_on and published:
                fixed = storage.read_partition("validated", "customers", published[0])
                fixed.loc[0, "amount"] = fixed.loc[0, "amount"] * 2
                storage.write_partition("validated", "customers", published[0], fixed)
            as_of = (start + pd.Timedelta(days=night)).date()
            update_customer_features(storage, as_of, active_days=30)
        history = storage.read_partitions("validated", "customers")
        for day in storage.partition_dates("features", "customers"):
            pd.testing.assert_frame_equal(
                storage.read_partition("features", "customers", day),
                build_customer_features(history, day, active_days=30),
            )


@pytest.mark.parametrize(
    ("config", "warned", "said"),
    [
        # CDNOW's config maps no category or channel: nothing to act on, said as information.
        ("cdnow", {}, {"category", "channel"}),
        # The synthetic config maps both: a history without them is worth a warning.
        ("synthetic", {"category", "channel"}, {}),
    ],
)
def test_shares_of_a_column_the_config_never_maps_are_no_warning(tmp_path, config, warned, said):
    """Every CDNOW night warned 'features skipped for missing columns' for category and
    channel, which its config never maps: a warning nobody can act on. Only a column the
    config maps and the history lacks is skipped with a warning."""
    from finpipe.customers.config import load_customers_config
    from finpipe.customers.pipeline import build_customers_domain

    storage = Storage(tmp_path)
    _publish_days(storage, TINY.drop(columns=["category"]))
    domain = build_customers_domain(load_customers_config(config))
    update = domain.update_features(storage, "2024-04-01")
    assert update.dates_written == ["2024-04-01"]
    assert {name.split("_share")[0] for name in update.skipped_features} == set(warned)
    assert {name.split("_share")[0] for name in update.unsourced_features} == set(said)
    if said:
        assert update.unsourced_features["category_share_*"] == (
            "the source's config maps no category column"
        )
