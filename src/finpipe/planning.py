"""What a night does, decided from facts about the store, without Prefect or storage calls.

The nightly flow gathers the facts (validated dates, dates recorded complete, the domain's
calendar, the settings) and runs the plan; every decision about dates lives here, in pure
functions a test can call with lists.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from finpipe.calendars import Calendar
from finpipe.errors import ConfigError


def scheduled_day(moment: dt.datetime, timezone: ZoneInfo, calendar: Calendar) -> dt.date:
    """Return the session a run scheduled at `moment` processes: the last session before the
    calendar day of `moment` in `timezone` (a naive `moment` is UTC).

    A nightly at 02:00 on a Monday processes the Friday before; on the morning after an
    exchange holiday, the session before the holiday.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return calendar.previous_session(moment.astimezone(timezone).date())


def missed_sessions(
    completed: Sequence[dt.date], as_of: dt.date, calendar: Calendar
) -> list[dt.date]:
    """Return the sessions a nightly run missed before `as_of`, in order.

    Those are the sessions after the last date recorded complete (before `as_of`) that have no
    completed record. With nothing recorded yet there is nothing to catch up.
    """
    recorded = sorted(day for day in completed if day < as_of)
    if not recorded:
        return []
    done = set(recorded)
    gap = calendar.sessions(recorded[-1] + dt.timedelta(days=1), as_of - dt.timedelta(days=1))
    return [day for day in gap if day not in done]


@dataclass(frozen=True)
class NightPlan:
    """What one nightly run does: catch up the missed sessions in order, retrain (or not),
    then validate, build features and score `run_day`."""

    domain: str
    run_day: dt.date
    catch_up: tuple[dt.date, ...]
    retrain: bool


def plan_night(
    domain: str,
    *,
    as_of: dt.date | None,
    validated: Sequence[dt.date],
    completed: Sequence[dt.date],
    calendar: Calendar,
    catch_up: bool,
    max_catch_up: int,
    retrain: bool,
) -> NightPlan:
    """Return the night to run, or raise ConfigError saying what to do instead.

    `validated` holds the dates with validated data up to the run's validation day; with no
    `as_of` the night runs for the latest of them.
    """
    if not validated:
        raise ConfigError(
            f"no validated {domain} data on or before {as_of or 'today'}; "
            f"ingest files first (`finpipe ingest {domain} PATH...`)"
        )
    run_day = as_of or max(validated)
    if run_day not in set(validated):
        closed = (
            ""
            if calendar.sessions(run_day, run_day)
            else (
                f"; {run_day} is not a session of the {calendar.name} calendar (a weekend or "
                f"holiday): the session before it is {calendar.previous_session(run_day)}"
            )
        )
        raise ConfigError(
            f"no validated {domain} data for {run_day}: its delivery has not been ingested "
            f"(pass it as inputs or run `finpipe ingest {domain} PATH`){closed}"
        )
    missed = missed_sessions(completed, run_day, calendar) if catch_up else []
    if len(missed) > max_catch_up:
        raise ConfigError(
            f"{len(missed)} sessions of the {calendar.name} calendar missed since "
            f"{missed[0] - dt.timedelta(days=1)}, more than the catch-up cap of {max_catch_up}: "
            f"run a backfill from {missed[0]} to {missed[-1]} first, or run this night with "
            "catch_up off"
        )
    return NightPlan(domain, run_day, tuple(missed), retrain)
