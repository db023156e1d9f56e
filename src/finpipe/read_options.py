"""How a delivered text file is read when it is not a comma-separated file with a header: the
`[read]` table every domain config (credit loan books, customers transaction logs) accepts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ReadOptions(BaseModel):
    """How to read a delivered CSV when it is not comma-separated with a header row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sep: str = Field(",", description="Field separator; a regex such as '\\s+' for whitespace.")
    header: bool = Field(True, description="Whether the first row names the columns.")
    names: list[str] | None = Field(None, description="Column names when there is no header.")
    skip_rows: int = Field(
        0, ge=0, description="Lines to skip at the top of the file (a vendor's banner)."
    )
    comment: str | None = Field(
        None,
        min_length=1,
        max_length=1,
        description="A character that starts a comment: the rest of its line is ignored, and "
        "a line that starts with it is skipped (e.g. '#').",
    )

    @model_validator(mode="after")
    def _names_without_header(self) -> ReadOptions:
        if not self.header and not self.names:
            raise ValueError("[read] header = false needs names = [...] for the columns")
        return self

    def pandas_options(self) -> dict[str, Any] | None:
        """Return `pandas.read_csv` keyword arguments, or None for the default CSV reading."""
        if self == ReadOptions():
            return None
        options: dict[str, Any] = {"sep": self.sep}
        if not self.header:
            options["header"] = None
        if self.names is not None:
            options["names"] = list(self.names)
            if self.header:
                options["header"] = 0  # the names replace the header row's, which is not data
        if self.skip_rows:
            options["skiprows"] = self.skip_rows
        if self.comment is not None:
            options["comment"] = self.comment
        return options
