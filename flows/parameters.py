"""Parameter types the flows share, as the Prefect UI's run forms show them."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from finpipe.domains import domain_names


class _DomainChoices:
    """Make the run forms' `domain` a drop-down of the domains known when the form is built
    (Prefect builds a deployment's parameter schema as it serves or deploys it): the
    built-ins and those of installed packages (entry points in `finpipe.domains`), and any
    registered in code by then. Read then, not when this module is imported, so a domain
    package may import it, and one registered later in the process is in the form too;
    `get_domain` refuses an unknown name with the list of known ones."""

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema["enum"] = domain_names()
        return schema


DomainName = Annotated[str, _DomainChoices()]

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
