"""Backfills, resume, catch-up and locks: the library on its own, and real flows in Prefect's
local mode on a tiny synthetic panel with a real (SQLite) MLflow champion."""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import shutil
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from finpipe.calendars import BusinessDays, calendar_named
from finpipe.date_runs import (
    BackfillIncomplete,
    BackfillPlan,
    DateFailed,
    DateOutcome,
    corrections_through,
    expand_inputs,
    is_done,
    missed_dates,
    plan_backfill,
    process_date,
    read_completion,
    stale_predictions,
    stale_scored_dates,
    update_features_through,
)
from finpipe.domains import get_domain, register_domain
from finpipe.errors import ConfigError, FinpipeError, ScoringError, StoreUnavailable
from finpipe.ingest import SUPERSEDED, ingest_file
from finpipe.locks import LockTimeout, history_lock, partition_lock
from finpipe.market.pipeline import (
    MARKET_CONTRACT,
    MarketTrainingConfig,
    promote_market,
    train_market,
    update_market_features,
)
from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    write_vendor_files,
)
from finpipe.planning import (
    ALL_STEPS,
    BackfillRequest,
    check_backfill_request,
    missed_sessions,
    plan_night,
    scheduled_day,
)
from finpipe.scoring import ScoringOutcome, in_sample_warning
from finpipe.storage import Storage, as_day
from tests.conftest import finpipe_home

TINY = {"max_epochs": 2, "models": ["mlp"], "hidden": 8}
TODAY = dt.date(2026, 11, 25)
WEEKDAYS = BusinessDays()
NYSE = calendar_named("XNYS")  # the market domain's default calendar


def _sessions(start, end) -> list[dt.date]:
    """NYSE sessions from `start` to `end`: the dates a market backfill or catch-up covers."""
    return NYSE.sessions(as_day(start), as_day(end))


# -- the calendar and the request --------------------------------------------------------
def test_business_days_skip_weekends_and_the_nightly_runs_for_the_day_before():
    assert WEEKDAYS.sessions(dt.date(2024, 3, 8), dt.date(2024, 3, 12)) == [
        dt.date(2024, 3, 8),
        dt.date(2024, 3, 11),
        dt.date(2024, 3, 12),
    ]
    monday_2am_london = dt.datetime(2024, 3, 11, 2, 0, tzinfo=dt.UTC)
    london, new_york = ZoneInfo("Europe/London"), ZoneInfo("America/New_York")
    assert scheduled_day(monday_2am_london, london, WEEKDAYS) == dt.date(2024, 3, 8)
    # 01:00 UTC on a Tuesday is still Monday evening in New York: the day before is Friday.
    tuesday_1am_utc = dt.datetime(2024, 3, 12, 1, 0, tzinfo=dt.UTC)
    assert scheduled_day(tuesday_1am_utc, new_york, WEEKDAYS) == dt.date(2024, 3, 8)
    assert scheduled_day(tuesday_1am_utc, ZoneInfo("UTC"), WEEKDAYS) == dt.date(2024, 3, 11)


def test_the_exchange_calendar_skips_holidays_in_requests_catch_up_and_schedules():
    # Thanksgiving (Thu 2024-11-28) and Christmas are NYSE holidays, not business days off.
    request = check_backfill_request(
        "market", "2024-11-27", "2024-12-02", today=TODAY, max_dates=20, calendar=NYSE
    )
    assert request.days == (dt.date(2024, 11, 27), dt.date(2024, 11, 29), dt.date(2024, 12, 2))
    with pytest.raises(ConfigError, match="holds no session of the XNYS calendar"):
        check_backfill_request(
            "market", "2024-12-25", "2024-12-25", today=TODAY, max_dates=20, calendar=NYSE
        )
    # Independence Day (Thu 2024-07-04): not missed by a night that ran on the 2nd.
    completed = [dt.date(2024, 7, 1), dt.date(2024, 7, 2)]
    assert missed_sessions(completed, dt.date(2024, 7, 8), NYSE) == [
        dt.date(2024, 7, 3),
        dt.date(2024, 7, 5),
    ]
    assert dt.date(2024, 7, 4) in missed_sessions(completed, dt.date(2024, 7, 8), WEEKDAYS)
    # The morning after the holiday, the scheduled night runs for the session before it.
    friday_2am_london = dt.datetime(2024, 7, 5, 2, 0, tzinfo=dt.UTC)
    london = ZoneInfo("Europe/London")
    assert scheduled_day(friday_2am_london, london, NYSE) == dt.date(2024, 7, 3)
    assert scheduled_day(friday_2am_london, london, WEEKDAYS) == dt.date(2024, 7, 4)
    with pytest.raises(ConfigError, match="unknown calendar 'XXXX'"):
        calendar_named("XXXX")


def test_the_exchange_calendar_starts_at_its_first_session_of_1990_and_refuses_earlier_days():
    # 1 January 1990 is a holiday before the calendar's first session: the range starts after.
    assert NYSE.sessions(dt.date(1990, 1, 1), dt.date(1990, 1, 3)) == [
        dt.date(1990, 1, 2),
        dt.date(1990, 1, 3),
    ]
    assert NYSE.previous_session(dt.date(1990, 1, 3)) == dt.date(1990, 1, 2)
    with pytest.raises(ConfigError, match="1989-12-29 is before 1990"):
        NYSE.sessions(dt.date(1989, 12, 29), dt.date(1990, 1, 3))
    with pytest.raises(ConfigError, match="no session of the XNYS calendar before 1990-01-02"):
        NYSE.previous_session(dt.date(1990, 1, 2))


def test_calendar_names_are_read_whatever_their_case_and_spacing():
    assert calendar_named(" xnys ").name == "XNYS"
    assert calendar_named(" Business Days ") == WEEKDAYS
    assert calendar_named("business-day") == WEEKDAYS


def test_the_corrections_fingerprint_counts_kept_copies_up_to_the_day_reading_each_once(tmp_path):
    """Credit's record fingerprints the corrections of rows dated up to a date (their kept
    copies); a backfill asks for every date, so each copy is read once, not once a date."""
    reads = []

    class CountingReads(Storage):
        def read_bytes(self, key: str) -> bytes:
            reads.append(key.rsplit("/", 1)[-1])
            return super().read_bytes(key)

    storage = CountingReads(tmp_path / "home")

    def keep(batch: str, day: str) -> None:
        rows = pd.DataFrame({"date": [pd.Timestamp(day)], "loan_id": ["L1"]})
        buffer = io.BytesIO()
        rows.to_parquet(buffer, index=False)
        key = storage.state_key("credit", SUPERSEDED, f"{batch}.parquet")
        storage.create_bytes(key, buffer.getvalue())

    none = corrections_through(storage, "credit", dt.date(2024, 1, 10))
    keep("b1", "2024-01-05")
    keep("b2", "2024-01-20")
    through_10th = corrections_through(storage, "credit", dt.date(2024, 1, 10))
    assert through_10th != none
    assert corrections_through(storage, "credit", dt.date(2024, 1, 4)) == none
    assert corrections_through(storage, "credit", dt.date(2024, 1, 20)) not in (none, through_10th)
    assert sorted(reads) == ["b1.parquet", "b2.parquet"]


# -- one date's record, scored by a stand-in for the champion ------------------------------
DAY = dt.date(2024, 1, 2)
VALIDATE_FEATURES = ["validate", "features"]


def _deliver(storage: Storage, day: dt.date, close: float) -> None:
    """Publish `day`'s validated and feature partitions (what its record fingerprints)."""
    rows = pd.DataFrame(
        {"date": [pd.Timestamp(day)] * 2, "ticker": ["A", "B"], "close": [close, close + 1]}
    )
    storage.write_partition("validated", "market", day, rows)
    storage.write_partition("features", "market", day, rows.assign(momentum=1.0))


@pytest.fixture
def one_date(tmp_path):
    """A store holding DAY's partitions, and the market domain scoring with a stand-in that
    publishes one prediction (or raises `one_date.error` when a test sets it)."""
    market = get_domain("market")
    date = SimpleNamespace(error=None)

    def score(storage: Storage, settings, as_of) -> ScoringOutcome:
        if date.error is not None:
            raise date.error
        day = as_day(as_of)
        rows = pd.DataFrame({"date": [pd.Timestamp(day)], "ticker": ["A"], "prediction": [0.1]})
        storage.write_partition("predictions", "market", day, rows)
        return ScoringOutcome(day.isoformat(), 1, "market", "1", "run-1", "predictions/market")

    register_domain(replace(market, score=score))
    try:
        with finpipe_home(tmp_path / "home") as settings:
            date.settings, date.storage = settings, Storage(settings.home)
            _deliver(date.storage, DAY, close=10.0)
            yield date
    finally:
        register_domain(market)


def test_predictions_scored_from_superseded_data_stay_stale_until_a_run_scores_them_again(
    one_date,
):
    """A backfill without the score step records the date from its new data; the predictions
    it leaves published were scored from the old, so it and every later run name them."""
    storage, settings = one_date.storage, one_date.settings
    process_date(storage, settings, "market", DAY, ALL_STEPS)
    _deliver(storage, DAY, close=12.0)  # restated after it was scored
    process_date(storage, settings, "market", DAY, VALIDATE_FEATURES)
    # Asked after the dates ran, as the backfill flow asks.
    assert stale_predictions(storage, "market", {"dates_written": ["2024-01-02"]}) == {
        "dates": ["2024-01-02"],
        "removed": [],
        "backfill": "finpipe run backfill --domain market --start 2024-01-02 --end 2024-01-02",
    }
    process_date(storage, settings, "market", DAY, VALIDATE_FEATURES)  # a later run
    assert stale_scored_dates(storage, "market", [DAY]) == ([DAY], [])
    one_date.error = ScoringError("no champion")
    with pytest.raises(DateFailed):
        process_date(storage, settings, "market", DAY, ALL_STEPS)
    assert stale_scored_dates(storage, "market", [DAY]) == ([DAY], [])
    one_date.error = None
    process_date(storage, settings, "market", DAY, ALL_STEPS)
    assert stale_scored_dates(storage, "market", [DAY]) == ([], [])


def test_a_run_without_the_score_step_keeps_the_scoring_only_while_the_data_is_the_same(one_date):
    storage, settings = one_date.storage, one_date.settings
    process_date(storage, settings, "market", DAY, ALL_STEPS)
    process_date(storage, settings, "market", DAY, ["validate"])
    assert read_completion(storage, "market", DAY)["steps"] == list(ALL_STEPS)
    _deliver(storage, DAY, close=12.0)  # a re-delivery
    process_date(storage, settings, "market", DAY, VALIDATE_FEATURES)
    assert read_completion(storage, "market", DAY)["steps"] == VALIDATE_FEATURES
    assert is_done(storage, "market", DAY, VALIDATE_FEATURES)
    assert not is_done(storage, "market", DAY, ALL_STEPS)


@pytest.mark.parametrize(
    "error, raised",
    [
        (ScoringError("no champion"), DateFailed),
        (StoreUnavailable("store blinked"), StoreUnavailable),
    ],
)
def test_a_failed_re_run_is_recorded_failed_and_a_transient_error_propagates_as_itself(
    one_date, error, raised
):
    storage, settings = one_date.storage, one_date.settings
    process_date(storage, settings, "market", DAY, ALL_STEPS)
    one_date.error = error
    with pytest.raises(FinpipeError) as caught:
        process_date(storage, settings, "market", DAY, ALL_STEPS)
    assert type(caught.value) is raised
    record = read_completion(storage, "market", DAY)
    assert (record["status"], record.get("error")) == ("failed", str(error))
    assert not is_done(storage, "market", DAY, ALL_STEPS)


def test_a_forced_plan_redoes_the_dates_done_from_the_same_data(one_date):
    storage = one_date.storage
    process_date(storage, one_date.settings, "market", DAY, ALL_STEPS)
    request = BackfillRequest("market", DAY, DAY, ALL_STEPS, (DAY,))
    assert plan_backfill(storage, request) == BackfillPlan(todo=(), done=(DAY,))
    assert plan_backfill(storage, request, force=True) == BackfillPlan(todo=(DAY,), done=())


def test_files_a_glob_names_come_oldest_first_whatever_their_names(tmp_path):
    for name, mtime in (("fix_b.csv", 1_000), ("fix_a.csv", 2_000), ("fix_c.csv", 2_000)):
        (tmp_path / name).write_text("Date\n")
        os.utime(tmp_path / name, (mtime, mtime))
    found = expand_inputs([str(tmp_path / "fix_*.csv")])
    assert [Path(path).name for path in found] == ["fix_b.csv", "fix_a.csv", "fix_c.csv"]


def test_features_through_an_early_date_are_brought_up_to_the_last_date_as_a_rebuild(tmp_path):
    """A restated day changes every later date's features (their windows reach back): an
    update through a date before the last one rebuilds them all, as a clean rebuild would."""
    prices = generate_market_panel(MarketSyntheticConfig(tickers=3, days=305, seed=3)).prices
    storage, fresh = Storage(tmp_path / "home"), Storage(tmp_path / "fresh")
    for day, rows in prices.groupby("date"):
        storage.write_partition("validated", "market", day, rows)
    days = storage.partition_dates("validated", "market")
    update_market_features(storage, days[-1])
    restated = storage.read_partition("validated", "market", days[-40])
    prices_of = [c for c in ("open", "high", "low", "close", "adj_close") if c in restated]
    restated[prices_of] *= 1.05
    storage.write_partition("validated", "market", days[-40], restated)
    update = update_features_through(storage, "market", days[-35], dates=[days[-35]])
    assert as_day(update["dates_written"][-1]) == days[-1]
    shutil.copytree(storage.root / "validated", fresh.root / "validated")
    update_market_features(fresh, days[-1], rebuild=True)
    pd.testing.assert_frame_equal(
        storage.read_partition("features", "market", days[-10]),
        fresh.read_partition("features", "market", days[-10]),
    )


@pytest.mark.flow  # one backfill flow run, its dates and training stood in for
@pytest.mark.parametrize("failed, trained_as_of", [(False, ["2024-01-05"]), (True, [])])
def test_a_backfills_retrain_learns_as_of_its_end_and_is_skipped_when_a_date_failed(
    tmp_path, monkeypatch, failed, trained_as_of
):
    import finpipe.flows.backfill as flow

    trained: list[str] = []
    monkeypatch.setattr(flow, "train", lambda domain, as_of, config: trained.append(as_of))
    monkeypatch.setattr(flow, "promote", lambda domain, outcome: {"promoted": False})
    monkeypatch.setattr(
        flow,
        "_run_dates",
        lambda run, request, plan, concurrency: [
            DateOutcome(day.isoformat(), "failed" if failed and i == 0 else "completed")
            for i, day in enumerate(request.days)
        ],
    )
    with finpipe_home(tmp_path / "home") as settings:
        storage = Storage(settings.home)
        for day in pd.bdate_range("2024-01-02", "2024-03-28"):  # features well past the end
            rows = pd.DataFrame({"date": [day], "ticker": ["A"]})
            storage.write_partition("features", "market", day.date(), rows)
        state = flow.backfill(
            start=dt.date(2024, 1, 2),
            end=dt.date(2024, 1, 5),
            steps=("validate",),
            retrain=True,
            return_state=True,
        )
    assert state.is_failed() is failed
    assert trained == trained_as_of


def test_the_night_plan_runs_the_latest_date_and_catches_up_in_order():
    validated = [dt.date(2024, 7, d) for d in (1, 2, 3, 5, 8)]
    plan = plan_night(
        "market",
        as_of=None,
        validated=validated,
        scored=[dt.date(2024, 7, 2)],
        calendar=NYSE,
        catch_up=True,
        max_catch_up=5,
        retrain=True,
    )
    assert plan.run_day == dt.date(2024, 7, 8)
    assert plan.catch_up == (dt.date(2024, 7, 3), dt.date(2024, 7, 5))
    quiet = plan_night(
        "market",
        as_of=dt.date(2024, 7, 5),
        validated=validated,
        scored=[dt.date(2024, 7, 2)],
        calendar=NYSE,
        catch_up=False,
        max_catch_up=5,
        retrain=False,
    )
    assert (quiet.run_day, quiet.catch_up, quiet.retrain) == (dt.date(2024, 7, 5), (), False)


def test_a_session_left_unscored_behind_the_last_night_is_caught_up_within_the_cap():
    """A catch-up date that failed, a late delivery, a backfill without the score step: the
    next nights try it again (it once fell behind the last scored date and stayed unscored)."""
    scored = [dt.date(2024, 7, d) for d in (1, 2, 5)]  # the 3rd was never scored
    assert missed_sessions(scored, dt.date(2024, 7, 9), NYSE) == [dt.date(2024, 7, 8)]
    assert missed_sessions(scored, dt.date(2024, 7, 9), NYSE, look_back=5) == [
        dt.date(2024, 7, 3),
        dt.date(2024, 7, 8),
    ]
    # Only within the last `look_back` sessions, and not before the first scored night.
    assert missed_sessions(scored, dt.date(2024, 7, 9), NYSE, look_back=2) == [dt.date(2024, 7, 8)]
    assert missed_sessions([dt.date(2024, 7, 5)], dt.date(2024, 7, 8), NYSE, look_back=5) == []


def test_a_dask_scheduler_that_does_not_answer_is_named_before_any_work():
    import socket

    from finpipe.flows.run_setup import check_dask_scheduler

    check_dask_scheduler("")  # threads: nothing to check
    with socket.create_server(("127.0.0.1", 0)) as listening:
        check_dask_scheduler(f"tcp://127.0.0.1:{listening.getsockname()[1]}")
        closed = listening.getsockname()[1]
    for address in (f"tcp://127.0.0.1:{closed}", f"127.0.0.1:{closed}", "tcp://nohost"):
        with pytest.raises(ConfigError, match=f"FINPIPE_DASK_ADDRESS={address}: no Dask sched"):
            check_dask_scheduler(address, timeout=2)


def test_a_worker_with_another_store_refuses_the_date_instead_of_writing_there(
    tmp_path, monkeypatch
):
    """A Dask worker started with another FINPIPE_HOME once processed the run's dates in its
    own store ("no data" for each, or predictions written to the wrong one)."""
    from finpipe.tasks.dates import process_date as date_task

    monkeypatch.setenv("FINPIPE_HOME", str(tmp_path / "elsewhere"))
    run_store = Storage(tmp_path / "home").url
    with pytest.raises(ConfigError, match="this worker's FINPIPE_HOME is .*elsewhere, the run"):
        date_task.fn("market", "2024-01-02", ["validate"], "test", 1.0, store=run_store)


@pytest.mark.parametrize(
    ("as_of", "validated", "cap", "message"),
    [
        (None, [], 5, "no validated market data on or before today; ingest files first"),
        ("2024-07-09", ["2024-07-08"], 5, "no validated market data for 2024-07-09"),
        (
            "2024-07-04",
            ["2024-07-03"],
            5,
            "2024-07-04 is not a session of the XNYS calendar (a weekend or holiday): "
            "the session before it is 2024-07-03",
        ),
        (
            "2024-07-08",
            ["2024-07-08"],
            1,
            "2 sessions of the XNYS calendar before 2024-07-08 have no scored night "
            "(2024-07-03 .. 2024-07-05), more than the catch-up cap of 1: backfill them first, "
            "at most 1 session a run (`finpipe run backfill --domain market --start 2024-07-03 "
            "--end 2024-07-03`",
        ),
    ],
)
def test_a_night_that_cannot_run_says_what_to_do(as_of, validated, cap, message):
    with pytest.raises(ConfigError) as caught:
        plan_night(
            "market",
            as_of=as_day(as_of) if as_of else None,
            validated=[as_day(day) for day in validated],
            scored=[dt.date(2024, 7, 2)],
            calendar=NYSE,
            catch_up=True,
            max_catch_up=cap,
            retrain=True,
        )
    assert message in str(caught.value)


def test_the_training_history_is_a_run_parameter_with_a_stated_cap():
    from finpipe.flows.nightly import nightly
    from finpipe.flows.parameters import training_overrides
    from finpipe.flows.train import train
    from prefect.utilities.callables import parameter_schema

    from finpipe.market.model import MarketTrainingConfig

    assert training_overrides({"models": ["mlp"]}, 300) == {"models": ["mlp"], "history_dates": 300}
    assert training_overrides(None, 0) == {"history_dates": None}  # 0: all of the history
    assert training_overrides({"max_epochs": 3}, None) == {"max_epochs": 3}
    assert MarketTrainingConfig().history_dates == 756  # the cap the README states
    assert MarketTrainingConfig(**training_overrides(None, 0)).history_dates is None
    for flow in (nightly, train):
        field = parameter_schema(flow.fn).model_dump()["properties"]["history_dates"]
        assert "0 means all" in " ".join(field["description"].split()), flow.name
        training = parameter_schema(flow.fn).model_dump()["properties"]["training"]
        assert "mlp, gru, tcn, lgbm, ensemble" in training["description"], flow.name


def test_every_run_form_offers_the_registered_domains_as_a_drop_down():
    from finpipe.flows.backfill import backfill
    from finpipe.flows.nightly import nightly
    from finpipe.flows.score import score
    from finpipe.flows.train import train
    from prefect.utilities.callables import parameter_schema

    for flow in (nightly, backfill, train, score):
        field = parameter_schema(flow.fn).model_dump()["properties"]["domain"]
        assert field["enum"] == ["market", "credit", "customers"], flow.name
        assert field["default"] == "market"
        assert "as they are added" not in field.get("description", ""), flow.name


@pytest.mark.parametrize(
    ("domain", "start", "end", "steps", "message"),
    [
        ("bonds", "2024-01-02", "2024-01-05", ALL_STEPS, "unknown domain 'bonds'; known domains:"),
        ("market", "2024-02-01", "2024-01-02", ALL_STEPS, "end 2024-01-02 is before start"),
        ("market", "2026-11-20", "2026-12-01", ALL_STEPS, "end 2026-12-01 is in the future"),
        ("market", "2024-01-01", "2024-01-31", ALL_STEPS, "holds 23 sessions of the business-day"),
        ("market", "2024-01-06", "2024-01-07", ALL_STEPS, "holds no session of the business-day"),
        ("market", "2024-01-02", "2024-01-05", ["score", "publish"], "unknown step 'publish'"),
        ("market", "2024-01-02", "2024-01-05", [], "choose at least one step"),
        ("market", "2024-01-02", "2024-13-05", ALL_STEPS, "invalid date '2024-13-05'"),
    ],
)
def test_bad_requests_say_what_to_change(domain, start, end, steps, message):
    with pytest.raises(ConfigError) as caught:
        check_backfill_request(
            domain, start, end, steps, today=TODAY, max_dates=20, calendar=WEEKDAYS
        )
    assert message in str(caught.value)


def test_a_good_request_lists_its_business_days_and_orders_its_steps():
    request = check_backfill_request(
        "market",
        "2024-03-08",
        "2024-03-11",
        ["score", "validate"],
        today=TODAY,
        max_dates=2,
        calendar=WEEKDAYS,
    )
    assert request.days == (dt.date(2024, 3, 8), dt.date(2024, 3, 11))
    assert request.steps == ("validate", "score")


# -- locks ---------------------------------------------------------------------------------
def test_a_date_lock_excludes_other_runs_and_names_its_holder(tmp_path):
    events: list[str] = []
    waiting, held = threading.Event(), threading.Event()

    def nightly():
        with partition_lock(tmp_path, "market", "2024-01-02", holder="nightly-market-2024-01-02"):
            events.append("nightly writes")
            held.set()
            waiting.wait(timeout=30)
            events.append("nightly done")

    thread = threading.Thread(target=nightly)
    thread.start()
    held.wait(timeout=30)
    busy = "market 2024-01-02 is locked by nightly-market-2024-01-02"
    with (
        pytest.raises(LockTimeout, match=busy),
        partition_lock(tmp_path, "market", "2024-01-02", timeout=0.1),
    ):
        pass

    def start_waiting(message: str) -> None:
        events.append(message)
        waiting.set()

    with partition_lock(tmp_path, "market", "2024-01-02", holder="backfill", on_wait=start_waiting):
        events.append("backfill writes")
    thread.join()
    assert events[0] == "nightly writes"
    assert events[1].startswith(
        "waiting for the lock on market 2024-01-02: held by nightly-market-2024-01-02 (pid "
    )
    assert events[2:] == ["nightly done", "backfill writes"]
    # Another date and the history are other resources: free while the date is held.
    with (
        partition_lock(tmp_path, "market", "2024-01-02", holder="x"),
        partition_lock(tmp_path, "market", "2024-01-03", timeout=0),
        history_lock(tmp_path, "market", timeout=0),
    ):
        pass


# -- real flows on a tiny panel ------------------------------------------------------------
@dataclass
class Base:
    home: Path
    files: list[Path]
    prices: pd.DataFrame


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    """Validated history, its features and a champion; each test works on a copy."""
    root = tmp_path_factory.mktemp("backfill")
    panel = generate_market_panel(MarketSyntheticConfig(tickers=6, days=305, seed=11))
    files = write_vendor_files(panel.prices, root / "drop", daily_files=3)
    with finpipe_home(root / "base") as settings:
        storage = Storage(settings.home)
        ingest_file(storage, MARKET_CONTRACT, files[0], as_of=TODAY)
        last = storage.partition_dates("validated", "market")[-1]
        update_market_features(storage, last)
        outcome = train_market(storage, settings, last, MarketTrainingConfig(**TINY))
        promote_market(storage, settings, outcome)
    return Base(root / "base", files, panel.prices)


@pytest.fixture
def market(base, tmp_path):
    """A copy of the base home (its MLflow store still reads the base's model artifacts)."""
    shutil.copytree(base.home, tmp_path / "home")
    with finpipe_home(tmp_path / "home") as settings:
        yield settings


def _day(path: Path) -> dt.date:
    return dt.date.fromisoformat(path.stem.removeprefix("market_"))


def _artifact_rows(flow_run_id) -> dict[str, dict]:
    """Return the backfill's per-date status table, by date."""
    import json

    artifact = _artifact(flow_run_id, "backfill-market")
    assert artifact.type == "table"
    return {row["date"]: row for row in json.loads(artifact.data)}


def _artifact(flow_run_id, key: str):
    """Return the artifact `key` the flow run published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=[key]),
            )
        )
    return artifact


@pytest.mark.slow
def test_bad_parameters_are_refused_before_any_work(market, monkeypatch):
    from finpipe.flows.backfill import backfill

    monkeypatch.setenv("FINPIPE_BACKFILL_MAX_DATES", "3")
    storage = Storage(market.home)
    before = sorted(p.relative_to(market.home) for p in market.home.rglob("*") if p.is_file())
    cases = [
        ({"domain": "bonds", "start": "2022-01-03", "end": "2022-01-04"}, "unknown domain"),
        ({"start": "2022-02-01", "end": "2022-01-03"}, "is before start"),
        ({"start": "2022-01-03", "end": dt.date.today() + dt.timedelta(days=7)}, "future"),
        ({"start": "2022-01-03", "end": "2022-01-07"}, "more than the cap of 3"),
    ]
    for parameters, message in cases:
        with pytest.raises(ConfigError, match=message):
            backfill(**parameters)
    after = sorted(p.relative_to(market.home) for p in market.home.rglob("*") if p.is_file())
    assert after == before
    assert not storage.state_dir("market").joinpath("completed").exists()


@pytest.mark.slow
def test_a_backfill_of_dates_without_data_says_which_dates_the_store_holds(market, caplog):
    """A mistyped range (the year before the data) processes nothing: the run still completes,
    and its log says so and which dates there are, instead of a table of "no data" only."""
    from finpipe.flows.backfill import backfill

    storage = Storage(market.home)
    history = storage.partition_dates("validated", "market")
    days = _sessions(history[0] - dt.timedelta(days=370), history[0] - dt.timedelta(days=366))
    prefect_log = logging.getLogger("prefect.flow_runs")
    prefect_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="prefect.flow_runs"):
            summary = backfill(start=days[0], end=days[-1])
    finally:
        prefect_log.removeHandler(caplog.handler)
    assert {item["status"] for item in summary["dates"]} == {"no data"}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        f"no date from {days[0]} to {days[-1]} has validated market data, so nothing was "
        f"processed; the store holds {history[0]} to {history[-1]}"
    ) in "\n".join(warned)


@pytest.mark.slow
def test_a_backfill_inside_the_champions_training_window_says_its_predictions_are_in_sample(
    market, caplog
):
    """Today's champion learnt from the past dates a backfill scores: the run warns once with
    how many, and its summary says so, so an IC computed over them is not taken for a forecast.
    The predictions layer keeps its columns (a new one would read as missing from older
    partitions); the rows' model version leads to the model's recorded `learnt_through`."""
    from finpipe.flows.backfill import backfill
    from finpipe.flows.score import score

    from finpipe import tracking

    storage = Storage(market.home)
    champion = tracking.load_model_version(market, "market")
    through = dt.date.fromisoformat(champion.model.learnt_through)
    history = storage.partition_dates("validated", "market")
    days = [day for day in history if day <= through][-3:] + [
        day for day in history if day > through
    ][:1]
    prefect_log = logging.getLogger("prefect.flow_runs")
    prefect_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="prefect.flow_runs"):
            state = backfill(start=days[0], end=days[-1], concurrency=1, return_state=True)
    finally:
        prefect_log.removeHandler(caplog.handler)
    expected = (
        f"3 of 4 dates scored are on or before champion v{champion.version}'s learnt_through "
        f"{through}: their predictions are in-sample"
    )
    # one record reaches caplog twice where Prefect's logger also propagates to the root
    records = {id(r): r for r in caplog.records}.values()
    warned = [r.getMessage() for r in records if "in-sample" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(expected)
    result = state.result()
    assert result["in_sample"] == warned[0]
    assert [item["predictions"]["learnt_through"] for item in result["dates"]] == [
        through.isoformat()
    ] * 4
    description = _artifact(state.state_details.flow_run_id, "backfill-market").description
    assert f"4 completed. {expected}" in description
    for day in days:
        columns = storage.read_partition("predictions", "market", day).columns
        assert "in_sample" not in columns and "learnt_through" not in columns
    # Scoring one date says it too.
    state = score(as_of=days[0], return_state=True)
    one = (
        f"1 of 1 date scored is on or before champion v{champion.version}'s learnt_through "
        f"{through}: their predictions are in-sample"
    )
    assert state.result()["in_sample"].startswith(one)
    assert f"**In-sample:** {one}" in _markdown_artifact(
        state.state_details.flow_run_id, "score-market"
    )


def test_the_in_sample_warning_counts_each_champions_dates_and_is_silent_out_of_sample():
    def scored(day: str, version: str, through: str | None) -> ScoringOutcome:
        return ScoringOutcome(day, 5, "finpipe-market", version, "run", "path", "", through)

    assert in_sample_warning([scored("2024-04-01", "3", "2024-03-28")]) is None
    assert in_sample_warning([scored("2024-03-01", "3", None)]) is None  # nothing recorded
    both = in_sample_warning(
        [
            scored("2024-03-27", "3", "2024-03-28"),
            scored("2024-03-28", "3", "2024-03-28"),
            scored("2024-03-29", "4", "2024-03-29"),
            scored("2024-04-01", "4", "2024-03-29"),
        ]
    )
    assert both is not None and both.startswith(
        "3 of 4 dates scored are on or before the learnt_through of the champion that scored "
        "them (v3: 2 through 2024-03-28, v4: 1 through 2024-03-29): their predictions are "
        "in-sample"
    )


@pytest.mark.slow
def test_two_backfills_of_one_range_are_told_apart_by_their_run_names(tmp_path):
    """Each run is named after its domain and range, then the end of its run id: a second
    backfill of the same range gets a name of its own in the Prefect UI."""
    from finpipe.flows.backfill import backfill
    from prefect.client.orchestration import get_client

    start, end = dt.date(2024, 1, 2), dt.date(2024, 1, 3)
    with finpipe_home(tmp_path / "home"):
        states = [backfill(start=start, end=end, return_state=True) for _ in range(2)]
    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(state.state_details.flow_run_id) for state in states]
    for run in runs:
        assert run.name == f"backfill-market-{start}-to-{end}-{str(run.id)[-6:]}"
    assert runs[0].name != runs[1].name


@pytest.mark.slow
def test_a_partly_failed_backfill_redoes_only_what_failed_and_ends_as_a_clean_run(
    market, base, tmp_path
):
    from finpipe.flows.backfill import backfill

    storage = Storage(market.home)
    history = storage.partition_dates("validated", "market")
    start, end = history[-4], _day(base.files[1])  # end: a delivery not ingested yet
    days = _sessions(start, end)
    blocked = history[-2]

    # First run: another run holds one date for longer than this run waits.
    with partition_lock(market.home, "market", blocked, holder="a long nightly"):
        state = backfill(
            start=start, end=end, concurrency=2, lock_timeout_seconds=0.5, return_state=True
        )
    assert state.is_failed()
    with pytest.raises(BackfillIncomplete, match=f"1 of {len(days)} dates failed: {blocked}"):
        state.result()
    rows = _artifact_rows(state.state_details.flow_run_id)
    assert list(rows) == [d.isoformat() for d in days]
    expected = {
        d.isoformat(): "failed" if d == blocked else "completed" if d in history else "no data"
        for d in days
    }
    assert {d: row["status"] for d, row in rows.items()} == expected
    assert "locked by a long nightly" in rows[blocked.isoformat()]["message"]
    done_first = [d for d in days if expected[d.isoformat()] == "completed"]
    records = {d: read_completion(storage, "market", d) for d in done_first}
    assert not storage.partition_file("predictions", "market", blocked).exists()

    # The missing delivery arrives; the same backfill again redoes only the two open dates.
    ingest_file(storage, MARKET_CONTRACT, base.files[1], as_of=TODAY)
    summary = backfill(start=start, end=end, concurrency=2)
    statuses = {item["date"]: item["status"] for item in summary["dates"]}
    assert statuses == {
        d.isoformat(): "done earlier" if d in done_first else "completed" for d in days
    }
    assert {d: read_completion(storage, "market", d) for d in done_first} == records
    assert all(is_done(storage, "market", d, ALL_STEPS) for d in days)

    # Same outputs as a clean run: recompute every date, and rebuild features from scratch.
    resumed = {d: _outputs(storage, d) for d in days}
    backfill(start=start, end=end, force=True)
    fresh = Storage(tmp_path / "rebuild")
    shutil.copytree(storage.root / "validated", fresh.root / "validated")
    update_market_features(fresh, end, rebuild=True)
    for day in days:
        predictions, features = resumed[day]
        clean_predictions, clean_features = _outputs(storage, day)
        pd.testing.assert_frame_equal(predictions, clean_predictions)
        pd.testing.assert_frame_equal(features, clean_features)
        pd.testing.assert_frame_equal(features, fresh.read_partition("features", "market", day))


def _restated(base: Base, day: dt.date, folder: Path) -> tuple[pd.DataFrame, Path]:
    """The history file's rows of `day` with every price 2% higher (a vendor's restatement),
    written to a correction file in `folder`; return the rows and the file."""
    vendor = pd.read_csv(base.files[0])
    rows = vendor[vendor["Date"] == day.isoformat()].copy()
    prices = ["Open", "High", "Low", "Close", "Adj Close"]
    rows[prices] = (rows[prices] * 1.02).round(4)
    path = folder / f"market_{day}_restated.csv"
    rows.to_csv(path, index=False)
    return rows, path


@pytest.mark.slow
def test_a_backfill_with_a_correction_redoes_the_corrected_day_and_every_later_one(
    market, base, tmp_path
):
    """A day restated inside a backfilled range: the same backfill with the correction redoes
    that day and the later ones (their features change with it: windows reach back), not the
    earlier ones, and ends with what a clean run on the corrected data publishes."""
    from finpipe.flows.backfill import backfill

    storage = Storage(market.home)
    history = storage.partition_dates("validated", "market")
    start, end = history[-6], history[-1]
    days = _sessions(start, end)
    backfill(start=start, end=end, concurrency=2)
    corrected = history[-4]
    _, path = _restated(base, corrected, tmp_path)

    summary = backfill(start=start, end=end, concurrency=2, corrections=(str(path),))
    [ingested] = summary["ingested"]
    assert ingested["status"] == "validated" and "a correction" in ingested["message"]
    statuses = {item["date"]: item["status"] for item in summary["dates"]}
    assert statuses == {
        d.isoformat(): "done earlier" if d < corrected else "completed" for d in days
    }
    assert summary["stale_predictions"] is None  # every date it changed was in its range
    resumed = {d: _outputs(storage, d) for d in days}
    backfill(start=start, end=end, force=True)
    for day in days:
        for got, clean in zip(resumed[day], _outputs(storage, day), strict=True):
            pd.testing.assert_frame_equal(got, clean)

    # Restated again, backfilled over the last two days only: the earlier scored days whose
    # data it changed are named, with the backfill that re-scores them.
    again = pd.read_csv(path)
    again[["Open", "High", "Low", "Close", "Adj Close"]] *= 1.01
    again.to_csv(tmp_path / "again.csv", index=False)
    summary = backfill(start=history[-2], end=end, corrections=(str(tmp_path / "again.csv"),))
    stale = summary["stale_predictions"]
    assert stale["dates"] == [d.isoformat() for d in history[-4:-2]]
    assert stale["backfill"] == (
        f"finpipe run backfill --domain market --start {history[-4]} --end {history[-3]}"
    )


@pytest.mark.slow
def test_the_backfill_the_status_names_after_a_correction_leaves_nothing_stale(
    market, base, tmp_path
):
    """`finpipe ingest --correction` between nights: the status names the corrected day stale
    and one backfill to run, through the newest predictions, which re-scores the later days
    whose features read the corrected one (a backfill of that day alone left them stale)."""
    from finpipe.flows.backfill import backfill

    from finpipe.status import domain_status, status_lines

    storage = Storage(market.home)
    history = storage.partition_dates("validated", "market")
    update_market_features(storage, history[-1])
    for day in history[-4:]:
        assert process_date(storage, market, "market", day).status == "completed"
    corrected = history[-4]
    _, path = _restated(base, corrected, tmp_path)
    ingest_file(storage, MARKET_CONTRACT, path, as_of=TODAY, correction=True)

    status = domain_status(storage, "market", NYSE)
    assert status.stale == [corrected]  # its later days' features are not rebuilt yet
    [command] = [line for line in status_lines(status) if "re-score:" in line]
    start, end = command.split("--start ")[1].split(" --end ")
    assert (start, end) == (str(corrected), str(history[-1]))
    summary = backfill(start=dt.date.fromisoformat(start), end=dt.date.fromisoformat(end))
    assert summary["stale_predictions"] is None
    assert {item["date"]: item["status"] for item in summary["dates"]} == {
        day.isoformat(): "completed" for day in history[-4:]
    }
    after = domain_status(storage, "market", NYSE)
    assert (after.stale, after.unscored, after.failed) == ([], [], [])


@pytest.mark.slow
def test_the_train_and_score_flows_name_the_predictions_a_correction_left_stale(
    market, base, tmp_path
):
    """`finpipe ingest --correction` between nights, then the train or the score deployment:
    its feature step rebuilds from the corrected day, and, as the nightly does, its summary
    names the earlier predictions scored from the data that changed, with the backfill that
    re-scores them (the date a score run scores again is not among them)."""
    from finpipe.flows.score import score
    from finpipe.flows.train import train

    storage = Storage(market.home)
    history = storage.partition_dates("validated", "market")
    update_market_features(storage, history[-1])
    for day in history[-4:]:
        assert process_date(storage, market, "market", day).status == "completed"
    rows, path = _restated(base, history[-4], tmp_path)
    ingest_file(storage, MARKET_CONTRACT, path, as_of=TODAY, correction=True)

    state = train(as_of=history[-1], training=TINY, promote=False, return_state=True)
    stale = state.result()["stale_predictions"]
    assert stale == {
        "dates": [day.isoformat() for day in history[-4:]],
        "removed": [],
        "backfill": f"finpipe run backfill --domain market --start {history[-4]} "
        f"--end {history[-1]}",
    }
    text = _markdown_artifact(state.state_details.flow_run_id, "train-market")
    assert "## Stale predictions\nPredictions of 4 earlier dates were scored from data" in text
    assert f"Re-score them with `{stale['backfill']}`" in text

    again = rows.copy()
    again[["Open", "High", "Low", "Close", "Adj Close"]] *= 1.01
    again.to_csv(tmp_path / "again.csv", index=False)
    ingest_file(storage, MARKET_CONTRACT, tmp_path / "again.csv", as_of=TODAY, correction=True)
    state = score(as_of=history[-1], return_state=True)
    scored = state.result()
    assert scored["status"] == "completed"
    assert scored["stale_predictions"]["dates"] == [day.isoformat() for day in history[-4:-1]]
    text = _markdown_artifact(state.state_details.flow_run_id, "score-market")
    assert "## Stale predictions\nPredictions of 3 earlier dates were scored from data" in text
    assert f"`finpipe run backfill --domain market --start {history[-4]} --end {history[-2]}`" in (
        text
    )


def _markdown_artifact(flow_run_id, key: str) -> str:
    """Return the text of the markdown artifact `key` the flow run published."""
    return _artifact(flow_run_id, key).data


@pytest.mark.slow
def test_a_nightly_loads_its_corrections_after_its_inputs_and_rebuilds_from_them(
    market, base, tmp_path
):
    from finpipe.flows.nightly import nightly

    storage = Storage(market.home)
    history = storage.partition_dates("validated", "market")
    update_market_features(storage, history[-1])
    for day in history[-9:-4]:  # scored before the correction arrives
        assert process_date(storage, market, "market", day).status == "completed"
    corrected, retracted_on, whole = history[-5], history[-6], history[-8]
    rows, path = _restated(base, corrected, tmp_path)
    # The same correction retracts one bar of the day before (its key only, flagged), and
    # every bar of a session the vendor should not have delivered.
    ticker = storage.read_partition("validated", "market", retracted_on)["ticker"].iloc[0]
    bar = pd.DataFrame({"Date": [retracted_on.isoformat()], "Ticker": [ticker]})
    session = storage.read_partition("validated", "market", whole)["ticker"]
    gone = pd.DataFrame({"Date": whole.isoformat(), "Ticker": session})
    both = pd.concat([rows.assign(Retracted="false"), bar.assign(Retracted="true")])
    pd.concat([both, gone.assign(Retracted="true")]).to_csv(path, index=False)
    retracted = 1 + len(session)
    tonight = _day(base.files[1])

    summary = nightly(
        as_of=tonight, inputs=[str(base.files[1])], corrections=[str(path)], retrain=False
    )
    first, second = summary["ingested"]
    assert (first["source"], first["status"]) == (str(base.files[1]), "validated")
    assert second["source"] == str(path) and "a correction" in second["message"]
    assert (first["corrected_rows"], second["corrected_rows"]) == (None, len(rows) + retracted)
    assert second["retracted_rows"] == retracted
    assert second["removed_dates"] == [whole.isoformat()]
    text = _summary_text(summary)
    assert (
        f"- {path.name}: {len(rows) + retracted} published rows replaced by {len(rows)} "
        f"delivered, {retracted} retracted; dates removed (every row retracted): {whole}"
    ) in text
    assert f"Removed with their date: {whole}." in text
    assert summary["features"]["dates_written"][0] == history[-7].isoformat()
    assert summary["features"]["dates_removed"] == [whole.isoformat()]
    for layer in ("validated", "features"):
        assert whole not in storage.partition_dates(layer, "market")
    # The predictions scored from what changed are named, with the backfill that re-scores
    # them: the removed date, the day after it (its lookback), the retraction's, the restated.
    stale = summary["stale_predictions"]
    assert stale["dates"] == [d.isoformat() for d in history[-8:-4]]
    assert stale["removed"] == [whole.isoformat()]
    assert stale["backfill"] == (
        f"finpipe run backfill --domain market --start {history[-7]} --end {history[-5]}"
    )
    assert f"`{stale['backfill']}`" in text and "## Stale predictions" in text
    assert is_done(storage, "market", history[-9], ALL_STEPS)
    assert not any(is_done(storage, "market", day, ALL_STEPS) for day in history[-8:-4])
    published = storage.read_partition("validated", "market", corrected)
    assert sorted(published["close"]) == pytest.approx(sorted(rows["Close"]))
    assert ticker not in set(storage.read_partition("validated", "market", retracted_on)["ticker"])
    assert ticker not in set(storage.read_partition("features", "market", retracted_on)["ticker"])
    assert summary["predictions"]["rows"] > 0
    # The removed date's outcome says which correction retracted it, not "a holiday".
    outcome = process_date(storage, market, "market", whole)
    assert outcome.status == "no data"
    assert f"retracted whole by {path.name} (batch {second['batch_id']}, validated " in (
        outcome.message
    )
    # Whichever steps run: a date without data is "no data", not a failure.
    alone = process_date(storage, market, "market", whole, ["score"])
    assert (alone.status, alone.message) == ("no data", outcome.message)


def _outputs(storage: Storage, day: dt.date) -> tuple[pd.DataFrame, pd.DataFrame]:
    predictions = storage.read_partition("predictions", "market", day).drop(columns="scored_at")
    return predictions, storage.read_partition("features", "market", day)


@pytest.mark.slow
def test_a_record_goes_stale_when_its_data_is_republished(market):
    storage = Storage(market.home)
    day = storage.partition_dates("validated", "market")[-1]
    outcome = process_date(storage, market, "market", day, ALL_STEPS, holder="test")
    assert outcome.status == "completed" and outcome.model_version == "1"
    assert read_completion(storage, "market", day)["holder"] == "test"
    assert is_done(storage, "market", day, ALL_STEPS)
    assert not is_done(storage, "market", day, [*ALL_STEPS, "retrain"])
    scored = storage.read_partition("predictions", "market", day)
    storage.delete_partition("predictions", "market", day)  # someone cleaned the layer
    assert not is_done(storage, "market", day, ALL_STEPS)
    assert is_done(storage, "market", day, ["validate", "features"])
    storage.write_partition("predictions", "market", day, scored)
    assert is_done(storage, "market", day, ALL_STEPS)
    rows = storage.read_partition("validated", "market", day)
    storage.write_partition("validated", "market", day, rows.iloc[1:])  # a re-delivery
    assert not is_done(storage, "market", day, ALL_STEPS)


@pytest.mark.slow
def test_a_session_without_data_is_no_data_whichever_steps_run(market, base):
    """Not a failure (it was one without the validate step, and left a failed record)."""
    storage = Storage(market.home)
    undelivered = _day(base.files[1])
    for steps in (["validate", "features"], ["features"], ["features", "score"]):
        outcome = process_date(storage, market, "market", undelivered, steps, holder="test")
        assert (outcome.status, outcome.message.split(":")[0]) == (
            "no data",
            f"no validated market data for {undelivered}",
        )
    assert read_completion(storage, "market", undelivered) is None


@pytest.mark.slow
def test_the_next_nightly_catches_up_missed_nights_in_order(market, base):
    from finpipe.flows.nightly import nightly

    storage = Storage(market.home)
    last_history = storage.partition_dates("validated", "market")[-1]
    nightly(as_of=last_history, retrain=False)
    assert missed_dates(storage, "market", _day(base.files[3]), NYSE) == _sessions(
        last_history + dt.timedelta(days=1), _day(base.files[3]) - dt.timedelta(days=1)
    )
    # Two nights were missed; the third gets all three deliveries.
    tonight = _day(base.files[3])
    summary = nightly(as_of=tonight, inputs=[str(f) for f in base.files[1:]], retrain=False)
    missed = [_day(f) for f in base.files[1:3]]
    assert [(c["date"], c["status"]) for c in summary["catch_up"]] == [
        (d.isoformat(), "completed") for d in missed
    ]
    published = [storage.partition_file("predictions", "market", d) for d in [*missed, tonight]]
    stamps = [p.stat().st_mtime_ns for p in published]
    assert stamps == sorted(stamps)
    assert summary["predictions"]["date"] == tonight.isoformat()
    assert missed_dates(storage, "market", tonight, NYSE) == []
    assert "## Catch-up (missed nights)" in _summary_text(summary)


@pytest.mark.slow
def test_a_late_night_leaves_the_next_sessions_files_for_their_own_nights(market, base):
    """The night of day 1 runs late (serve was down, or a Retry), when days 2 and 3 have
    landed too: its glob matched them, and their rows, after its as-of, were quarantined as
    from the future and the night failed."""
    from finpipe.flows.nightly import nightly

    storage = Storage(market.home)
    glob = str(base.files[1].parent / "market_2*.csv")  # the daily files, not the history
    days = [_day(f) for f in base.files[1:]]
    first = nightly(as_of=days[0], inputs=[glob], retrain=False, catch_up=False)
    assert [(Path(i["source"]).name, i["status"]) for i in first["ingested"]] == [
        (base.files[2].name, "later"), (base.files[3].name, "later"),
        (base.files[1].name, "validated"),
    ]  # fmt: skip
    assert (
        f"every row is dated {days[1]} or later, after {days[0]}"
        in (first["ingested"][0]["message"])
    )
    assert not storage.list_files("quarantine/market")
    assert storage.partition_dates("validated", "market")[-1] == days[0]
    second = nightly(as_of=days[1], inputs=[glob], retrain=False, catch_up=False)
    statuses = {Path(i["source"]).name: i["status"] for i in second["ingested"]}
    assert statuses == {
        base.files[1].name: "already_loaded",
        base.files[2].name: "validated",
        base.files[3].name: "later",
    }
    assert second["predictions"]["date"] == days[1].isoformat()


@pytest.mark.slow
def test_a_night_without_as_of_takes_todays_file_where_its_schedule_is_read_and_its_name(
    market, base, tmp_path, today_elsewhere
):
    """A Sydney desk's morning night with FINPIPE_TIMEZONE=Australia/Sydney: by the UTC date,
    still yesterday there, its file was dated a day later than the night's as-of and left for
    the next night. Today is read in the schedule's timezone, as a backfill reads it."""
    from finpipe.flows.nightly import nightly

    day = today_elsewhere
    files = []
    for source, delivered in zip(base.files[1:3], (day, day + dt.timedelta(days=1)), strict=True):
        rows = pd.read_csv(source)  # the sessions after the stored history, dated there
        rows["Date"] = delivered.isoformat()
        files.append(tmp_path / f"market_{delivered}.csv")
        rows.to_csv(files[-1], index=False)

    state = nightly(
        inputs=[str(f) for f in files], retrain=False, catch_up=False, return_state=True
    )

    summary = state.result()
    statuses = {Path(i["source"]).name: i["status"] for i in summary["ingested"]}
    assert statuses == {files[0].name: "validated", files[1].name: "later"}
    assert summary["predictions"]["date"] == day.isoformat()
    # Started without a date (nightly-market-latest), it is named after the day it ran, in
    # Prefect and in its completion record, as a night given that day is.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        name = client.read_flow_run(state.state_details.flow_run_id).name
    assert name == f"nightly-market-{day}"
    assert read_completion(Storage(market.home), "market", day)["holder"] == name


@pytest.mark.slow
def test_a_night_catches_up_an_unscored_backfill_date_and_retries_a_failed_one(
    market, base, monkeypatch
):
    from finpipe.flows.backfill import backfill
    from finpipe.flows.nightly import nightly

    storage = Storage(market.home)
    last_history = storage.partition_dates("validated", "market")[-1]
    nightly(as_of=last_history, retrain=False)
    unscored, locked, tonight = (_day(f) for f in base.files[1:4])
    deliveries = [str(f) for f in base.files[1:4]]
    backfill(start=unscored, end=unscored, steps=["validate", "features"], inputs=deliveries)
    assert missed_dates(storage, "market", tonight, NYSE) == [unscored, locked]
    monkeypatch.setenv("FINPIPE_LOCK_TIMEOUT_SECONDS", "1")
    with (
        partition_lock(market.home, "market", locked.isoformat(), holder="another run"),
        pytest.raises(BackfillIncomplete, match="the next night tries them again"),
    ):
        nightly(as_of=tonight, retrain=False)
    assert storage.exists(storage.partition_key("predictions", "market", unscored))
    # The failed date is behind tonight's scored night now, and still caught up.
    assert missed_dates(storage, "market", tonight, NYSE, look_back=5) == [locked]
    summary = nightly(as_of=tonight, retrain=False)
    assert [(c["date"], c["status"]) for c in summary["catch_up"]] == [
        (locked.isoformat(), "completed")
    ]
    assert missed_dates(storage, "market", tonight, NYSE, look_back=5) == []


@pytest.mark.slow
def test_a_scheduled_night_runs_for_the_previous_business_day(market):
    from finpipe.flows.nightly import nightly

    utc = ZoneInfo("UTC")
    before = scheduled_day(dt.datetime.now(dt.UTC), utc, NYSE)  # run now, not scheduled
    with pytest.raises(ConfigError) as caught:
        nightly(default_as_of="previous business day", calendar_timezone="UTC", retrain=False)
    after = scheduled_day(dt.datetime.now(dt.UTC), utc, NYSE)  # (midnight may pass)
    assert any(
        f"no validated market data for {day}: its delivery has not been ingested"
        in str(caught.value)
        for day in {before, after}
    )


@pytest.mark.slow
def test_the_scheduled_night_after_a_weekday_holiday_does_not_redo_the_session(market, monkeypatch):
    """Mon 2022-01-17 (a holiday) 02:00 and Tue 02:00 both map to Fri 14th: the second
    scheduled night once retrained and re-scored the same session from the same data."""
    from finpipe.flows import nightly as night

    assert {
        scheduled_day(dt.datetime(2022, 1, day, 7, 0, tzinfo=dt.UTC), ZoneInfo("UTC"), NYSE)
        for day in (17, 18)
    } == {dt.date(2022, 1, 14)}
    storage = Storage(market.home)
    last = storage.partition_dates("validated", "market")[-1]
    monkeypatch.setattr(night, "_scheduled_as_of", lambda timezone, domain: last)
    first = night.nightly(default_as_of="previous business day", retrain=False)
    assert "skipped" not in first and first["predictions"]["date"] == last.isoformat()
    scored = storage.partition_file("predictions", "market", last).stat().st_mtime_ns
    again = night.nightly(default_as_of="previous business day", retrain=False)
    assert again["skipped"].startswith(f"The night of {last} ran already, from the same data")
    assert storage.partition_file("predictions", "market", last).stat().st_mtime_ns == scored
    # Asked for by date, it runs.
    assert "skipped" not in night.nightly(as_of=last, retrain=False)
    # A session a backfill scored is not a night that ran: its scheduled night (late, or
    # retried after the backfill) still runs, retraining and catching up as nights do.
    from finpipe.flows.backfill import backfill

    earlier = storage.partition_dates("validated", "market")[-2]
    backfill(start=earlier, end=earlier, force=True)
    monkeypatch.setattr(night, "_scheduled_as_of", lambda timezone, domain: earlier)
    assert "skipped" not in night.nightly(default_as_of="previous business day", retrain=False)
    # Nor is a session a later night's catch-up scored (its record names that night).
    run = SimpleNamespace(storage=storage, domain="market")
    assert night._night_ran(run, earlier)
    later_night = night._night_name("market", last)
    process_date(storage, market, "market", earlier, ALL_STEPS, holder=later_night)
    assert not night._night_ran(run, earlier)


@pytest.mark.slow
def test_a_backfill_with_a_failed_date_prints_every_dates_line_then_the_error(market, base):
    """`finpipe run backfill` once printed only the error when a date failed."""
    from typer.testing import CliRunner

    from finpipe.cli import app

    storage = Storage(market.home)
    done = storage.partition_dates("validated", "market")[-1]  # it has features
    ingest_file(storage, MARKET_CONTRACT, base.files[1], as_of=TODAY)  # this one has none
    unbuilt = _day(base.files[1])
    arguments = ["run", "backfill", "--start", str(done), "--end", str(unbuilt), "--no-retrain"]
    result = CliRunner().invoke(app, [*arguments, "--steps", "score"])
    # (`finpipe.cli.main` turns the error into its one line and exit status 2)
    assert isinstance(result.exception, BackfillIncomplete), result.output
    lines = [line for line in result.output.splitlines() if line[:4].isdigit()]
    assert lines[0].startswith(f"{done}  completed")
    assert lines[1].startswith(f"{unbuilt}  failed") and "add the features step" in lines[1]


def _summary_text(summary: dict) -> str:
    from finpipe.flows.nightly import summary_markdown

    return summary_markdown(summary)


@pytest.mark.slow
def test_a_backfill_waits_while_another_run_holds_its_date(market):
    from finpipe.flows.backfill import backfill

    storage = Storage(market.home)
    day = storage.partition_dates("validated", "market")[-1]
    results: dict = {}
    waits = _LockWaits()
    task_logger = logging.getLogger("prefect.task_runs")
    level = task_logger.level
    task_logger.setLevel(logging.INFO)
    task_logger.addHandler(waits)
    try:
        with partition_lock(market.home, "market", day, holder="the nightly"):
            thread = threading.Thread(
                target=lambda: results.update(
                    summary=backfill(start=day, end=day, steps=["validate", "score"])
                )
            )
            thread.start()
            assert waits.seen.wait(timeout=120), "the backfill never reached the date's lock"
            # Blocked on the lock: nothing of that date is published while the nightly holds it.
            assert not storage.partition_file("predictions", "market", day).exists()
        thread.join(timeout=120)
    finally:
        task_logger.removeHandler(waits)
        task_logger.setLevel(level)
    assert waits.messages[0].startswith(
        f"waiting for the lock on market {day}: held by the nightly"
    )
    [outcome] = results["summary"]["dates"]
    assert outcome["status"] == "completed"
    assert storage.partition_file("predictions", "market", day).exists()
    assert read_completion(storage, "market", day)["holder"].startswith("backfill-market-")


class _LockWaits(logging.Handler):
    """Collects the "waiting for the lock" messages a run logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("waiting for the lock"):
            self.messages.append(message)
            self.seen.set()


# -- the command line ----------------------------------------------------------------------
@pytest.mark.parametrize("command", [["serve"], ["ui"], ["run", "backfill"]])
def test_the_new_commands_have_help(command):
    from typer.testing import CliRunner

    from finpipe.cli import app

    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["run", "backfill", "--start", "2024-02-01", "--end", "2024-01-02"], "is before start"),
        (["serve", "--api-url", "http://127.0.0.1:9/api"], "no Prefect server answers at"),
    ],
)
def test_command_errors_are_one_line_and_exit_status_2(arguments, message, tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "finpipe.cli", *arguments],
        capture_output=True,
        text=True,
        env={"FINPIPE_HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect")},
        timeout=180,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_bad_timezone_in_the_run_form_leaves_the_run_to_fail_with_its_error(monkeypatch):
    """Naming the run resolved the scheduled date before the flow started: an unknown
    timezone there crashed the run ("Process exited with status code: 1") with tracebacks."""

    from finpipe.flows import nightly as night

    parameters = {"domain": "market", "default_as_of": "previous business day"}
    monkeypatch.setattr(
        night,
        "flow_run",
        SimpleNamespace(
            parameters={**parameters, "calendar_timezone": "Mars/Base"},
            scheduled_start_time=dt.datetime(2024, 7, 9, 6, 0, tzinfo=dt.UTC),
        ),
    )
    assert night._run_name() == "nightly-market-scheduled"
    with pytest.raises(ConfigError, match="Mars/Base"):  # what the flow body then raises
        night._scheduled_as_of("Mars/Base", "market")
    night.flow_run.parameters["calendar_timezone"] = "UTC"
    assert night._run_name() == "nightly-market-2024-07-08"


@pytest.mark.parametrize(
    ("flow", "parameters", "names"),
    [
        (
            "train",
            {"domain": "credit"},
            ["train-credit-latest-3f9c2a", "train-credit-latest-7d1e04"],
        ),
        (
            "score",
            {"as_of": dt.date(2024, 3, 28)},
            ["score-market-2024-03-28-3f9c2a", "score-market-2024-03-28-7d1e04"],
        ),
        (
            "backtest",
            {"name": "demo", "start": dt.date(2024, 1, 2), "end": dt.date(2024, 3, 28)},
            ["backtest-demo-2024-01-02-to-2024-03-28-3f9c2a"]
            + ["backtest-demo-2024-01-02-to-2024-03-28-7d1e04"],
        ),
        # A night's name says which night ran a session (`_night_ran` looks for it): kept.
        (
            "nightly",
            {"as_of": dt.date(2024, 3, 28)},
            ["nightly-market-2024-03-28", "nightly-market-2024-03-28"],
        ),
    ],
)
def test_two_runs_with_the_same_parameters_are_told_apart_by_their_names(
    monkeypatch, flow, parameters, names
):
    """Two train (score, backtest) runs of one date or range, e.g. a re-run, read
    `train-market-latest` twice in the Prefect UI: as a backfill's, each name ends with the
    last six characters of its run id."""
    import importlib

    from prefect.runtime import flow_run

    module = importlib.import_module(f"finpipe.flows.{flow}")
    monkeypatch.setattr(flow_run, "parameters", parameters, raising=False)
    named = []
    for run_id in ("0f6e2c1a-93b4-4c55-8d0e-5e7a1b3f9c2a", "a41c7b20-6d0e-4f31-9b8a-2c9e5f7d1e04"):
        monkeypatch.setattr(flow_run, "id", run_id, raising=False)
        named.append(module._run_name())
    assert named == names


def test_serve_refuses_nightly_settings_every_night_would_fail_on(tmp_path, monkeypatch):
    from finpipe.flows.deployments import nightly_schedules

    from finpipe.schedule import ScheduleSettings

    monkeypatch.setenv("FINPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FINPIPE_DROP_ROOTS", f'["{tmp_path / "drop"}"]')
    good = {"nightly_domains": ["market"], "timezone": "UTC"}
    assert len(nightly_schedules(ScheduleSettings(**good))) == 1
    for bad, said in (
        ({"calendars": {"market": "XNYZ"}}, "unknown calendar 'XNYZ'"),
        ({"nightly_inputs": {"markt": [str(tmp_path / "drop/*.csv")]}}, "names 'markt', which"),
        ({"nightly_inputs": {"market": ["/etc/*.conf"]}}, "outside the drop folders"),
    ):
        with pytest.raises(ConfigError, match=said):
            nightly_schedules(ScheduleSettings(**good, **bad))


def test_a_run_leaves_only_readable_files_dated_after_it_for_later(tmp_path):
    from finpipe.ingest import not_yet_due

    storage = Storage(tmp_path / "home")
    later = tmp_path / "market_2024-07-09.csv"
    later.write_text("Date,Ticker,Close\n2024-07-09,AAA,10\n2024-07-09,BBB,11\n")
    mixed = tmp_path / "market_2024-07-08.csv"
    mixed.write_text("Date,Ticker,Close\n2024-07-08,AAA,10\n2024-07-09,AAA,11\n")
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"\x00\x01 not a csv")
    due, left = not_yet_due(storage, MARKET_CONTRACT, [later, mixed, broken], "2024-07-08")
    assert due == [mixed, broken] and [Path(o.source) for o in left] == [later]
    assert left[0].status == "later" and left[0].sha256 and left[0].rows == 0
    # Over the size limit it is not read here: ingest refuses it, as without `leave_later`.
    due, left = not_yet_due(storage, MARKET_CONTRACT, [later], "2024-07-08", max_file_bytes=10)
    assert due == [later] and left == []


def test_a_glob_that_matches_no_file_is_said(tmp_path, monkeypatch):

    from finpipe.flows import run_setup

    warned = []
    logger = SimpleNamespace(warning=lambda message, *args: warned.append(message % args))
    monkeypatch.setattr(run_setup, "get_run_logger", lambda: logger)
    (tmp_path / "market_2024-07-08.csv").write_text("x")
    run_setup._say_empty_globs(
        [str(tmp_path / "market_*.csv"), str(tmp_path / "markte_*.csv"), str(tmp_path / "a.csv")]
    )
    assert warned == [
        f"inputs: {tmp_path / 'markte_*.csv'} matches no file; nothing loaded from it"
    ]
