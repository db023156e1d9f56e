"""Which days a domain expects data for: an exchange's trading sessions, or business days.

A nightly run processes the last session before its scheduled time, a catch-up scores the
sessions a run missed, and a backfill walks the sessions of its range. For the market domain a
session is a trading day of the exchange named in settings (default NYSE, `XNYS`), from the
maintained `exchange-calendars` package, so exchange holidays are neither run nor reported as
missing data. Other domains (loan books, transaction logs) keep Monday-to-Friday business days
unless settings name a calendar for them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import pandas as pd

from finpipe.errors import ConfigError
from finpipe.storage import as_day

BUSINESS_DAYS = "business-day"
DEFAULT_CALENDARS = {"market": "XNYS"}
# An exchange calendar is built once per process from 1990 to a few years ahead (about 0.2 s
# for NYSE), or further when a date asks for it.
_FIRST_YEAR = 1990
_YEARS_AHEAD = 2


class Calendar(Protocol):
    """The days on which a domain's data is delivered."""

    @property
    def name(self) -> str:
        """How settings and messages name the calendar ('XNYS', 'business-day')."""
        ...

    def sessions(self, start: dt.date, end: dt.date) -> list[dt.date]:
        """Every session from `start` to `end`, both included, in order."""
        ...

    def previous_session(self, day: dt.date) -> dt.date:
        """The last session strictly before `day`."""
        ...


@dataclass(frozen=True)
class BusinessDays:
    """Monday to Friday; a public holiday is a day whose delivery is simply absent."""

    name: str = BUSINESS_DAYS

    def sessions(self, start: dt.date, end: dt.date) -> list[dt.date]:
        count = (end - start).days + 1
        days = (start + dt.timedelta(days=i) for i in range(max(count, 0)))
        return [day for day in days if day.weekday() < 5]

    def previous_session(self, day: dt.date) -> dt.date:
        day -= dt.timedelta(days=1)
        while day.weekday() >= 5:
            day -= dt.timedelta(days=1)
        return day


@dataclass(frozen=True)
class ExchangeCalendar:
    """The trading sessions of one exchange (an ISO 10383 MIC such as XNYS or XLON)."""

    name: str

    def sessions(self, start: dt.date, end: dt.date) -> list[dt.date]:
        if end < start:
            return []
        exchange = _exchange(self.name, _through_year(end))
        first = max(pd.Timestamp(self._check(start)), exchange.first_session)
        found = exchange.sessions_in_range(first, pd.Timestamp(end))
        return [stamp.date() for stamp in found]

    def previous_session(self, day: dt.date) -> dt.date:
        earlier = pd.Timestamp(self._check(day - dt.timedelta(days=1)))
        exchange = _exchange(self.name, _through_year(day))
        if earlier < exchange.first_session:
            raise ConfigError(
                f"there is no session of the {self.name} calendar before {day}: finpipe's "
                f"{self.name} calendar starts with its first session of {_FIRST_YEAR}"
            )
        return exchange.date_to_session(earlier, direction="previous").date()

    def _check(self, day: dt.date) -> dt.date:
        if day.year < _FIRST_YEAR:
            raise ConfigError(
                f"{day} is before {_FIRST_YEAR}, where finpipe's {self.name} calendar starts"
            )
        return day


def _through_year(day: dt.date) -> int:
    """The last year an exchange calendar is built for: `day`'s, or a few years from now."""
    return max(day.year, dt.date.today().year + _YEARS_AHEAD)


@lru_cache(maxsize=16)
def _exchange(code: str, through_year: int):  # exchange_calendars.ExchangeCalendar
    import exchange_calendars  # on first use: finpipe --help does not pay for it

    try:
        return exchange_calendars.get_calendar(
            code, start=f"{_FIRST_YEAR}-01-01", end=f"{through_year}-12-31"
        )
    except exchange_calendars.errors.InvalidCalendarName:
        raise ConfigError(
            f"unknown calendar {code!r}: use 'business days' or an exchange code that "
            "exchange-calendars knows, such as 'XNYS' (NYSE), 'XLON' (London) or 'XTKS' (Tokyo)"
        ) from None


def calendar_named(name: str) -> Calendar:
    """Return the calendar `name`: 'business days' (Monday to Friday), or an exchange code
    such as 'XNYS'."""
    if name.strip().lower() in {BUSINESS_DAYS, "business days", "weekdays"}:
        return BusinessDays()
    calendar = ExchangeCalendar(name.strip().upper())
    _exchange(calendar.name, _through_year(dt.date.today()))  # an unknown code fails here
    return calendar


def calendar_for(domain: str, calendars: dict[str, str]) -> Calendar:
    """Return the calendar settings give `domain` (business days when they name none)."""
    return calendar_named(calendars.get(domain, "business days"))


def sessions_between(calendar: Calendar, start: dt.date | str, end: dt.date | str) -> list[dt.date]:
    """`calendar.sessions` of two dates given as dates or ISO strings."""
    return calendar.sessions(as_day(start), as_day(end))
