"""The loan-book config: which columns of the user's file are the id, date, label and features.

One TOML file describes a loan book, so a user points finpipe at their own data without code:

    name = "germancredit"                  # the suite is `credit_<name>`
    [columns]
    id = "loan_id"                         # id_from_row_number = true when the file has none
    date = "application_date"              # optional: cross-sectional data gets the ingest day
    label = "creditability"
    [label]
    default = ["bad"]                      # label values that mean default
    non_default = ["good"]                 # empty label = an application to score
    outcome_window_days = 365              # train on a loan once its window has passed
    [numeric]
    age_in_years = { min = 18, max = 100 } # ranges the suite checks
    credit_amount = { min = 1, display = "amount" }  # reasons show 12,500, not 1.25e+04
    [categorical]
    columns = ["purpose", "housing"]
    [[grades]]                             # risk grades by PD band, upper bounds increasing
    grade = "A"
    max_pd = 0.05
    [scoring]
    population = "unlabelled"              # or "latest_snapshot"

Examples ship inside the package (`finpipe/credit/configs/*.toml`) so they resolve from any
working directory; `Settings.credit_config` (FINPIPE_CREDIT_CONFIG) names a file or an example.
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import ErrorDetails

from finpipe.errors import ConfigError
from finpipe.read_options import ReadOptions

EXAMPLES = ("synthetic", "germancredit")
DEFAULT_EXAMPLE = "synthetic"
DATE_COLUMN = "date"  # the canonical name of the date column in validated and feature data
# The as-of day of the delivery that brought a row (validated and feature data): a later
# delivery of the same (date, id) is a new version of that loan, e.g. its outcome arriving.
DELIVERED_ON = "delivered_on"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Columns(_Strict):
    """Which delivered columns play the id, date and label roles."""

    id: str = Field(description="Loan or application id, unique per delivery.")
    date: str | None = Field(
        None,
        description="Application or snapshot date; omit for cross-sectional data, whose rows "
        "are then dated by the ingest (as-of) day.",
    )
    label: str = Field(description="Outcome column; empty for applications still to score.")
    id_from_row_number: bool = Field(
        False,
        description="The file has no id column: number rows 1..N in file order (ids are then "
        "only meaningful within one delivery).",
    )


class Label(_Strict):
    """Which label values mean default and which mean no default, and when they are final."""

    default: list[str] = Field(min_length=1, description="Label values that mean default.")
    non_default: list[str] = Field(min_length=1, description="Label values that mean no default.")
    outcome_window_days: int = Field(
        0,
        ge=0,
        description="Days after its application date before a loan's outcome counts for "
        "training: a loan applied on d trains at t only when d + window <= t (and its outcome "
        "is known at t). 0: every loan with a known outcome trains. Dated books only.",
    )

    @model_validator(mode="before")
    @classmethod
    def _as_text(cls, data: object) -> object:
        # TOML `default = [1]` and a CSV's "1" must agree: values compare as text.
        if isinstance(data, dict):
            return {
                k: [str(v) for v in value] if isinstance(value, list) else value
                for k, value in data.items()
            }
        return data

    @model_validator(mode="after")
    def _disjoint(self) -> Label:
        both = sorted(set(self.default) & set(self.non_default))
        if both:
            raise ValueError(f"values {both} are listed as both default and non_default")
        return self

    @property
    def allowed(self) -> list[str]:
        return [*self.default, *self.non_default]


ValueDisplay = Literal["number", "amount", "percent"]


class NumericColumn(_Strict):
    """A numeric attribute and the range the suite enforces (missing values are allowed)."""

    min: float | None = None
    max: float | None = None
    required: bool = Field(False, description="Reject rows where the value is missing.")
    display: ValueDisplay = Field(
        "number",
        description="How reason codes show the applicant's value: number (up to four "
        "significant digits, never an exponent), amount (thousands separators, whole units "
        "from 100 up) or percent (a ratio, 0.87 shown as 87%).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> NumericColumn:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class Categorical(_Strict):
    columns: list[str] = Field(default_factory=list)


class GradeBand(_Strict):
    grade: str
    max_pd: float = Field(gt=0.0, le=1.0, description="Upper PD bound of the grade (inclusive).")


class Scoring(_Strict):
    population: Literal["unlabelled", "latest_snapshot"] = Field(
        "unlabelled",
        description="unlabelled: every row without an outcome up to the as-of date (open "
        "applications; of the latest snapshot only for a book without a date column); "
        "latest_snapshot: every row of the latest delivery date on or before the as-of date "
        "(a whole book re-scored, e.g. for monitoring).",
    )


class LoanBookConfig(_Strict):
    """A user's loan book: its columns, label values, ranges, risk grades and scoring rule."""

    name: str = Field(description="Lower-case word; the GX suite is `credit_<name>`.")
    description: str = ""
    read: ReadOptions = Field(
        default_factory=ReadOptions,
        description="How the files are read when they are not comma-separated with a header "
        "(separator, banner lines to skip, comment character).",
    )
    columns: Columns
    label: Label
    numeric: dict[str, NumericColumn] = Field(default_factory=dict)
    categorical: Categorical = Field(default_factory=Categorical)
    grades: list[GradeBand] = Field(min_length=1)
    scoring: Scoring = Field(default_factory=Scoring)
    extra_expectations: str | None = Field(
        None,
        description="Suite in expectations/ whose rules are added to the config-built ones; "
        "default `credit_<name>` when that file exists.",
    )
    _source: str = PrivateAttr(default="<config>")

    @model_validator(mode="after")
    def _consistent(self) -> LoanBookConfig:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use lower-case letters, digits and '_'")
        roles = [self.columns.id, self.columns.label, *self.numeric, *self.categorical.columns]
        repeated = sorted({c for c in roles if roles.count(c) > 1})
        if repeated:
            raise ValueError(
                f"column(s) {repeated} appear in more than one role (id, label, numeric, "
                "categorical); give each column one role"
            )
        if not self.feature_columns:
            raise ValueError("no feature columns: list some under [numeric] or [categorical]")
        if self.label.outcome_window_days and not self.is_dated:
            raise ValueError(
                "label.outcome_window_days needs an application date: set [columns] date, or "
                "remove the window (a cross-sectional book has no application dates)"
            )
        named = (self.columns.id, self.columns.label, *self.feature_columns)
        if DELIVERED_ON in (*named, self.columns.date):
            raise ValueError(
                f"a column named {DELIVERED_ON!r} clashes with the delivery day finpipe records "
                "on every row; rename it in the file"
            )
        named_date = DATE_COLUMN in named
        if named_date and self.columns.date != DATE_COLUMN:
            raise ValueError(
                f"a column named {DATE_COLUMN!r} that is not the date column clashes with "
                "the partition date; rename it in the file"
            )
        bounds = [band.max_pd for band in self.grades]
        if any(b >= a for a, b in zip(bounds[1:], bounds[:-1], strict=True)):
            raise ValueError(f"grades: max_pd must increase from grade to grade, got {bounds}")
        if bounds[-1] != 1.0:
            raise ValueError(
                f"grades: the last grade must end at max_pd = 1.0 so every PD gets a grade, "
                f"got {bounds[-1]}"
            )
        names = [band.grade for band in self.grades]
        if len(set(names)) != len(names):
            raise ValueError(f"grades: names repeat in {names}")
        return self

    # -- derived -------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """Where this config was read from (for messages)."""
        return self._source

    @property
    def suite_name(self) -> str:
        return f"credit_{self.name}"

    @property
    def is_dated(self) -> bool:
        return self.columns.date is not None

    @property
    def numeric_columns(self) -> list[str]:
        return list(self.numeric)

    @property
    def categorical_columns(self) -> list[str]:
        return list(self.categorical.columns)

    @property
    def feature_columns(self) -> list[str]:
        return [*self.numeric_columns, *self.categorical_columns]

    @property
    def delivered_columns(self) -> list[str]:
        """Columns a delivery must carry (the id only when it is not generated)."""
        columns = [] if self.columns.id_from_row_number else [self.columns.id]
        if self.columns.date is not None:
            columns.append(self.columns.date)
        return [*columns, self.columns.label, *self.feature_columns]


def example_path(name: str) -> Path:
    """Return the path of a shipped example config (`synthetic`, `germancredit`)."""
    if name not in EXAMPLES:
        raise ConfigError(f"no example loan-book config {name!r}; examples: {', '.join(EXAMPLES)}")
    return Path(str(importlib.resources.files("finpipe.credit") / "configs" / f"{name}.toml"))


def load_loan_book(location: Path | str | None = None) -> LoanBookConfig:
    """Return the loan-book config at `location`: a TOML path, an example name, or None (the
    synthetic example).

    Raises ConfigError naming the file, the key and what to write there.
    """
    if location is None or str(location) == "":
        path = example_path(DEFAULT_EXAMPLE)
    elif Path(location).is_file():
        path = Path(location)
    elif str(location) in EXAMPLES:
        path = example_path(str(location))
    else:
        raise ConfigError(
            f"credit config {str(location)!r} not found: set FINPIPE_CREDIT_CONFIG to a TOML "
            f"file or to one of the shipped examples ({', '.join(EXAMPLES)})"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error}); fix the file") from None
    return parse_loan_book(data, source=str(path))


def parse_loan_book(data: dict, *, source: str = "<config>") -> LoanBookConfig:
    """Return the config described by `data` (a parsed TOML document); ConfigError if wrong."""
    try:
        config = LoanBookConfig.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(_describe(e) for e in error.errors())
        raise ConfigError(f"{source}: {problems}") from None
    config._source = source
    return config


def _describe(error: ErrorDetails) -> str:
    """One readable sentence for one pydantic error, with the TOML key it is about."""
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    kind = error["type"]
    if where in ("label.default", "label") and kind == "missing":
        return (
            f"[label] {where.removeprefix('label').lstrip('.') or 'table'} is missing: say which "
            'label value(s) mean default, e.g. default = ["bad"] and non_default = ["good"]'
        )
    if where.startswith("label.") and kind in ("missing", "too_short"):
        field = where.split(".")[1]
        return f'[label] {field} is missing or empty: list its label values, e.g. {field} = ["x"]'
    if kind == "extra_forbidden":
        return f"unknown key {where!r} (check its spelling against the documented keys)"
    if kind == "missing":
        return f"{where} is required"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"
