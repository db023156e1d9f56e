"""Parameter types the flows share, as the Prefect UI's run forms show them."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import Field

from finpipe.domains import domain_names

# A drop-down of the domains known when the flows are imported: the built-ins and those of
# installed packages (entry points in `finpipe.domains`), in every process, so the form a
# deployment registers and the flow runs it starts agree. A domain registered in code later in
# the same process still runs there, and `get_domain` refuses an unknown name with the list of
# known ones.
DomainName = Annotated[str, Field(json_schema_extra={"enum": domain_names()})]

HistoryDates = Annotated[int | None, Field(ge=0)]


def training_overrides(
    training: dict[str, Any] | None,
    history_dates: int | None,
    history_start: dt.date | None = None,
) -> dict:
    """The training overrides a run asks for: `training` plus the history window, where
    `history_dates` 0 means all of the stored history and None leaves the domain's default,
    and `history_start` (a first date) bounds it from the start."""
    overrides = dict(training or {})
    if history_dates is not None:
        overrides["history_dates"] = history_dates or None
    if history_start is not None:
        overrides["history_start"] = history_start
    return overrides
