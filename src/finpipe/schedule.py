"""When the nightly runs and how much a backfill may take on: the schedule settings, the
timezone they are read in, and each domain's calendar of delivery days."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from finpipe.calendars import DEFAULT_CALENDARS, Calendar, calendar_for
from finpipe.errors import ConfigError
from finpipe.locks import DEFAULT_TIMEOUT_SECONDS
from finpipe.settings import describe_undecodable


class ScheduleSettings(BaseSettings):
    """When the nightly deployment runs and how much a backfill may take on.

    Each field reads `FINPIPE_<NAME>` from the environment (e.g. `FINPIPE_TIMEZONE`).
    """

    model_config = SettingsConfigDict(env_prefix="FINPIPE_", extra="ignore")

    timezone: str = Field(
        default="UTC",
        description="IANA timezone of the nightly schedule and of the business calendar.",
    )
    nightly_cron: str = Field(
        default="0 2 * * 1-5", description="When the nightly deployment runs: 02:00 on weekdays."
    )
    nightly_domains: list[str] = Field(
        default_factory=lambda: ["market"],
        examples=[["market", "credit"]],
        description='Domains the nightly deployment runs, one schedule each (JSON: ["market"]).',
    )
    nightly_inputs: dict[str, list[str]] = Field(
        default_factory=dict,
        examples=[{"market": ["/data/drop/market_*.csv"]}],
        description="Per domain, the delivered files (paths or globs) every scheduled night "
        'loads, e.g. {"market": ["/data/drop/market_*.csv"]}; files already loaded are skipped.',
    )
    calendars: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_CALENDARS),
        examples=[{"market": "XNYS"}],
        description="Per domain, the calendar of its delivery days: an exchange code that "
        "exchange-calendars knows (XNYS, XLON, ...) or 'business days' (Monday to Friday, the "
        'default for a domain not named), e.g. {"market": "XNYS"}.',
    )
    backfill_max_dates: int = Field(
        default=260,
        ge=1,
        description="Most sessions one backfill (or one nightly catch-up) may cover.",
    )
    lock_timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS,
        ge=0,
        description="How long a run waits for a date or history lock another run holds.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        check_timezone(value)
        return value

    def calendar(self, domain: str) -> Calendar:
        """The calendar of `domain`'s delivery days."""
        return calendar_for(domain, self.calendars)


def load_schedule_settings(**overrides: Any) -> ScheduleSettings:
    """Return schedule settings from the environment (and `overrides`); ConfigError if bad."""
    try:
        return ScheduleSettings(**overrides)
    except ValidationError as error:
        problems = "; ".join(
            f"FINPIPE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"invalid schedule settings: {problems}") from None
    except SettingsError as error:  # a variable that is not the JSON its field takes
        problem = describe_undecodable(error, ScheduleSettings)
        raise ConfigError(f"invalid schedule settings: {problem}") from None


def check_timezone(name: str) -> ZoneInfo:
    """Return the IANA timezone `name`; ConfigError with an example when it is unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"unknown timezone {name!r}: use an IANA name such as 'UTC', 'Europe/London' "
            "or 'America/New_York'"
        ) from None


def today_in(timezone: str) -> dt.date:
    """Return today's date in `timezone`."""
    return dt.datetime.now(check_timezone(timezone)).date()


def newest_day_accepted(as_of: dt.date | None, timezone: str) -> dt.date:
    """Return the newest day whose rows a run accepts: its as-of, or without one today in
    `timezone`, where the schedule is read (FINPIPE_TIMEZONE). A Sydney desk's morning file
    is dated today there; by the UTC date, still yesterday, its rows were from the future."""
    return as_of if as_of is not None else today_in(timezone)
