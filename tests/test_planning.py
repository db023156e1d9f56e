"""The decisions the train and score flows take, as pure functions (the night's and the
backfill's are in test_backfill.py): which date a run works on, which training config."""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

import pytest

from finpipe.calendars import calendar_named
from finpipe.errors import ConfigError
from finpipe.market.model import MarketTrainingConfig
from finpipe.planning import (
    check_backfill_request,
    missed_sessions,
    plan_night,
    run_day,
    scheduled_day,
    training_config,
)
from finpipe.schedule import load_schedule_settings, today_in

VALIDATED = [dt.date(2024, 7, 1), dt.date(2024, 7, 2), dt.date(2024, 7, 3)]
NYSE = calendar_named("XNYS")


def test_a_run_works_on_its_date_or_the_latest_validated_one():
    assert run_day("market", None, VALIDATED, NYSE) == dt.date(2024, 7, 3)
    assert run_day("market", None, list(reversed(VALIDATED)), NYSE) == dt.date(2024, 7, 3)
    assert run_day("market", "2024-07-02", VALIDATED, NYSE) == dt.date(2024, 7, 2)


@pytest.mark.parametrize(
    ("as_of", "validated", "message"),
    [
        (None, [], "no validated credit data on or before today"),
        (dt.date(2024, 7, 5), [], "no validated credit data on or before 2024-07-05"),
        # A typo for 2024: a champion tagged as of 2034 would keep every challenger out.
        (dt.date(2034, 7, 5), VALIDATED, "no validated credit data for 2034-07-05"),
        (
            dt.date(2024, 7, 4),
            VALIDATED,
            "2024-07-04 is not a session of the XNYS calendar (a weekend or holiday): the "
            "session before it is 2024-07-03",
        ),
    ],
)
def test_a_run_without_validated_data_for_its_day_says_so(as_of, validated, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_day("credit", as_of, validated, NYSE)


def test_a_runs_training_overrides_give_the_domains_config():
    config = training_config("market", {"max_epochs": 3, "models": ["mlp"]})
    assert isinstance(config, MarketTrainingConfig)
    assert (config.max_epochs, config.models) == (3, ["mlp"])
    assert training_config("market", {}) == MarketTrainingConfig()


def test_a_bad_training_override_is_a_config_error_naming_it():
    with pytest.raises(ConfigError) as raised:
        training_config("market", {"max_epochs": 0, "models": ["foo"]})
    assert str(raised.value) == (  # one line: each field, its value and what it takes
        "invalid training parameters: models='foo': should be 'mlp', 'gru', 'tcn', 'lgbm' or "
        "'ensemble'; max_epochs=0: should be greater than or equal to 1"
    )
    with pytest.raises(ConfigError, match="unknown domain 'bonds'"):
        training_config("bonds", {})


@pytest.mark.parametrize(
    ("domain", "override"),
    [
        ("market", "max_epoch"),  # a typo
        ("credit", "history_dates"),  # a market parameter
        ("customers", "history_start"),
    ],
)
def test_a_training_override_the_domain_does_not_have_is_refused_not_dropped(domain, override):
    with pytest.raises(ConfigError, match=f"{domain} has no training parameter '{override}'"):
        training_config(domain, {override: 3})


NEW_YORK = ZoneInfo("America/New_York")


def test_the_scheduled_day_follows_the_zones_calendar_day_in_summer_time_and_the_default_calendar():
    """Market's calendar is NYSE unless FINPIPE_CALENDARS says otherwise: the night after
    Independence Day runs for the session before it. The local day is read with the offset in
    force (EDT in July): 00:30 in New York is already the next day there, 04:30 UTC."""
    market = load_schedule_settings().calendar("market")
    assert market.name == "XNYS"
    july_10_utc = dt.datetime(2024, 7, 10, tzinfo=dt.UTC)
    assert scheduled_day(july_10_utc.replace(hour=4, minute=30), NEW_YORK, market) == dt.date(
        2024, 7, 9
    )  # 00:30 EDT
    assert scheduled_day(july_10_utc.replace(hour=3, minute=30), NEW_YORK, market) == dt.date(
        2024, 7, 8
    )  # 23:30 EDT
    friday = dt.datetime(2024, 7, 5, 6, 0, tzinfo=dt.UTC)
    assert scheduled_day(friday, NEW_YORK, market) == dt.date(2024, 7, 3)


def test_today_is_the_date_in_the_zone_asked_for():
    """25 hours apart: Kiritimati (UTC+14) and Pago Pago (UTC-11) never share a date."""
    dates = {}
    for zone in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):
        before = dt.datetime.now(ZoneInfo(zone)).date()
        dates[zone] = today_in(zone)
        assert dates[zone] in {before, dt.datetime.now(ZoneInfo(zone)).date()}
    assert dates["Pacific/Kiritimati"] > dates["Pacific/Pago_Pago"]


@pytest.mark.parametrize("zone", ["Mars/Olympus", "", "../etc/localtime", "/etc/localtime"])
def test_an_unknown_or_malformed_timezone_is_a_config_error_with_an_example(zone):
    with pytest.raises(ConfigError, match="unknown timezone .*'America/New_York'"):
        load_schedule_settings(timezone=zone)
    with pytest.raises(ConfigError, match="unknown timezone"):
        today_in(zone)


def test_a_backfill_cap_below_one_session_is_refused_naming_its_variable():
    with pytest.raises(ConfigError, match="FINPIPE_BACKFILL_MAX_DATES"):
        load_schedule_settings(backfill_max_dates=0)


# NYSE sessions of July 2024 (the 4th a holiday): 1, 2, 3, 5, 8, 9, 10, 11, 12, 15.
JULY = NYSE.sessions(dt.date(2024, 7, 1), dt.date(2024, 7, 31))


def test_the_look_back_retries_the_newest_sessions_left_unscored():
    """A catch-up that failed on 10 July, in a long history: the next nights retry it while
    it is among their last `look_back` sessions, and the oldest sessions are not what counts."""
    history = NYSE.sessions(dt.date(2023, 1, 3), dt.date(2024, 7, 12))
    scored = [day for day in history if day != dt.date(2024, 7, 10)]
    assert missed_sessions(scored, dt.date(2024, 7, 15), NYSE, look_back=5) == [
        dt.date(2024, 7, 10)
    ]
    later = [*scored, *NYSE.sessions(dt.date(2024, 7, 15), dt.date(2024, 7, 18))]
    # 10 July is the 7th session before the 19th: within a look-back of 7, not of 6
    assert missed_sessions(later, dt.date(2024, 7, 19), NYSE, look_back=7) == [dt.date(2024, 7, 10)]
    assert missed_sessions(later, dt.date(2024, 7, 19), NYSE, look_back=6) == []


def _night(as_of, scored, cap):
    return plan_night(
        "market",
        as_of=as_of,
        validated=JULY,
        scored=scored,
        calendar=NYSE,
        catch_up=True,
        max_catch_up=cap,
        retrain=False,
    )


def test_a_night_catches_up_as_many_sessions_as_the_cap_and_refuses_one_more():
    scored = [dt.date(2024, 7, 1), dt.date(2024, 7, 2)]
    plan = _night(dt.date(2024, 7, 8), scored, cap=2)
    assert plan.catch_up == (dt.date(2024, 7, 3), dt.date(2024, 7, 5))
    with pytest.raises(ConfigError, match="3 sessions .* more than the catch-up cap of 2"):
        _night(dt.date(2024, 7, 9), scored, cap=2)


def test_a_night_run_again_counts_its_gap_from_the_last_night_before_it():
    """Re-running the scored night of 15 July after a gap since 1 July: the gap is 8 sessions,
    over the cap, whatever the 15th's own record says."""
    scored = [dt.date(2024, 7, 1), dt.date(2024, 7, 15)]
    with pytest.raises(ConfigError, match=r"8 sessions .*\(2024-07-02 \.\. 2024-07-12\)"):
        _night(dt.date(2024, 7, 15), scored, cap=3)


def test_a_backfill_may_end_today_and_not_after():
    today = dt.date(2024, 7, 8)
    request = check_backfill_request(
        "market", "2024-07-03", today, today=today, max_dates=10, calendar=NYSE
    )
    assert request.days == (dt.date(2024, 7, 3), dt.date(2024, 7, 5), today)
    with pytest.raises(ConfigError, match="end 2024-07-09 is in the future"):
        check_backfill_request(
            "market", "2024-07-03", "2024-07-09", today=today, max_dates=10, calendar=NYSE
        )
