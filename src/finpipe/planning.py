"""What a night, a backfill, a train or a score run does, decided from facts about the store,
without Prefect or storage calls.

The flows gather the facts (validated dates, dates recorded complete, the domain's calendar,
the settings) and run the plan; every decision about dates and training parameters lives here,
in pure functions a test can call with lists.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ValidationError

from finpipe.calendars import Calendar
from finpipe.domains import check_domain, get_domain
from finpipe.errors import ConfigError
from finpipe.settings import describe_invalid
from finpipe.storage import as_day
from finpipe.text import counted

Step = Literal["validate", "features", "score"]
ALL_STEPS: tuple[Step, ...] = ("validate", "features", "score")
# What a nightly run without an as_of date runs for (the schedule uses the second).
AsOfRule = Literal["latest validated date", "previous business day"]


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
    scored: Sequence[dt.date], as_of: dt.date, calendar: Calendar, *, look_back: int = 0
) -> list[dt.date]:
    """Return the sessions before `as_of` a nightly run has to catch up, in order.

    `scored`: the dates recorded complete with their predictions. Those missed are every
    session after the last scored date before `as_of`, and, of the last `look_back` sessions
    before `as_of`, those after the first scored date that have no such record: a date whose
    catch-up failed, whose delivery came late, or that a backfill recorded without scoring is
    tried again by each night that follows, for `look_back` sessions. With nothing scored yet
    there is nothing to catch up.
    """
    recorded = sorted(day for day in scored if day < as_of)
    if not recorded:
        return []
    before = as_of - dt.timedelta(days=1)
    since_last = calendar.sessions(recorded[-1] + dt.timedelta(days=1), before)
    recent = calendar.sessions(recorded[0], before)[-look_back:] if look_back else []
    done = set(recorded)
    return sorted({day for day in [*recent, *since_last] if day not in done})


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
    scored: Sequence[dt.date],
    calendar: Calendar,
    catch_up: bool,
    max_catch_up: int,
    retrain: bool,
) -> NightPlan:
    """Return the night to run, or raise ConfigError saying what to do instead.

    `validated` holds the dates with validated data up to the run's validation day; with no
    `as_of` the night runs for the latest of them. `scored`: the dates recorded complete with
    their predictions (`missed_sessions`).
    """
    run_day = _day_with_data(domain, as_of, validated, calendar)
    missed = missed_sessions(scored, run_day, calendar, look_back=max_catch_up) if catch_up else []
    if len(missed) > max_catch_up:
        first_run = calendar.sessions(missed[0], missed[-1])[max_catch_up - 1]
        sessions = counted(max_catch_up, "session")
        raise ConfigError(
            f"{len(missed)} sessions of the {calendar.name} calendar before {run_day} have no "
            f"scored night ({missed[0]} .. {missed[-1]}), more than the catch-up cap of "
            f"{max_catch_up}: backfill them first, at most {sessions} a run "
            f"(`finpipe run backfill --domain {domain} --start {missed[0]} --end {first_run}`, "
            "then on from there), or raise FINPIPE_BACKFILL_MAX_DATES; or run this night alone "
            "(`finpipe run nightly --no-catch-up`, or catch_up off in the run form)"
        )
    return NightPlan(domain, run_day, tuple(missed), retrain)


def run_day(
    domain: str, as_of: dt.date | str | None, validated: Sequence[dt.date], calendar: Calendar
) -> dt.date:
    """Return the date a train or score run works on: `as_of`, else the latest validated date.

    `validated` holds the dates with validated data on or before `as_of`. ConfigError when
    there are none, or none on `as_of` itself, as for a night: a model trained "as of" a day
    past its data would be tagged with that day and keep every challenger out until then.
    """
    return _day_with_data(domain, as_day(as_of) if as_of else None, validated, calendar)


def _day_with_data(
    domain: str, as_of: dt.date | None, validated: Sequence[dt.date], calendar: Calendar
) -> dt.date:
    """Return `as_of`, or the latest validated date without one; ConfigError saying what to
    do when there is no validated data, or none for `as_of`."""
    if not validated:
        raise ConfigError(
            f"no validated {domain} data on or before {as_of or 'today'}; "
            f"ingest files first (`finpipe ingest {domain} PATH...`)"
        )
    day = as_of or max(validated)
    if day in set(validated):
        return day
    closed = (
        ""
        if calendar.sessions(day, day)
        else (
            f"; {day} is not a session of the {calendar.name} calendar (a weekend or "
            f"holiday): the session before it is {calendar.previous_session(day)}"
        )
    )
    raise ConfigError(
        f"no validated {domain} data for {day}: its delivery has not been ingested "
        f"(pass it as inputs or run `finpipe ingest {domain} PATH`){closed}"
    )


def training_config(domain: str, overrides: Mapping[str, object]) -> BaseModel:
    """Return the domain's training config with a run's `overrides` (its hyper-parameter
    form), or ConfigError saying which override is wrong: a value the config refuses, or a
    name it does not have (a typo, or `history_dates` for a domain that trains on something
    else), which the config would otherwise drop without a word."""
    try:
        config = get_domain(domain).training_config(**overrides)
    except ValidationError as error:  # one line: each field, its value, what it takes
        raise ConfigError(f"invalid training parameters: {describe_invalid(error)}") from None
    except ValueError as error:
        raise ConfigError(f"invalid training parameters: {error}") from None
    known = type(config).model_fields
    unknown = [name for name in overrides if name not in known]
    if unknown:
        raise ConfigError(
            f"{domain} has no training parameter {unknown[0]!r}; its parameters are "
            + ", ".join(sorted(known))
        )
    return config


# -- the request ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BackfillRequest:
    """A checked backfill: the domain, the range, the steps and the sessions in it."""

    domain: str
    start: dt.date
    end: dt.date
    steps: tuple[Step, ...]
    days: tuple[dt.date, ...]


def check_steps(steps: Iterable[str]) -> tuple[Step, ...]:
    """Return `steps` in pipeline order without repeats; ConfigError for none or unknown ones."""
    chosen = list(steps)
    unknown = [s for s in chosen if s not in ALL_STEPS]
    if unknown:
        raise ConfigError(f"unknown step {unknown[0]!r}: steps are {', '.join(ALL_STEPS)}")
    if not chosen:
        raise ConfigError(f"choose at least one step: {', '.join(ALL_STEPS)}")
    return tuple(s for s in ALL_STEPS if s in chosen)


def check_backfill_request(
    domain: str,
    start: dt.date | str | None,
    end: dt.date | str | None,
    steps: Iterable[str] = ALL_STEPS,
    *,
    today: dt.date,
    max_dates: int,
    calendar: Calendar,
) -> BackfillRequest:
    """Return the backfill to run, or raise ConfigError with what to change, before any work.

    Rejects an unknown domain, a missing date, an end before the start, dates after `today`
    and a range of more than `max_dates` sessions of `calendar` (the domain's delivery days:
    weekends and, for an exchange calendar, its holidays are not in the range).
    """
    check_domain(domain)
    if start is None or end is None:
        raise ConfigError("a backfill needs both a start and an end date (YYYY-MM-DD)")
    first, last = as_day(start), as_day(end)
    if last < first:
        raise ConfigError(
            f"end {last} is before start {first}: the backfill runs from start to end; "
            "swap the two dates"
        )
    if last > today:
        raise ConfigError(
            f"end {last} is in the future (today is {today}): only dates that have happened "
            f"can be backfilled; set end to {today} or earlier"
        )
    chosen = check_steps(steps)
    days = calendar.sessions(first, last)
    if not days:
        raise ConfigError(
            f"{first} to {last} holds no session of the {calendar.name} calendar (weekends and "
            "holidays only): widen the range"
        )
    if len(days) > max_dates:
        raise ConfigError(
            f"{first} to {last} holds {len(days)} sessions of the {calendar.name} calendar, more "
            "than the cap of "
            f"{max_dates} (FINPIPE_BACKFILL_MAX_DATES): split it into smaller backfills "
            "or raise the cap"
        )
    return BackfillRequest(domain, first, last, chosen, tuple(days))
