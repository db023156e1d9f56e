"""Where a data source keeps the customers contract's columns: a reviewed TOML file per source.

Two ship with finpipe (`synthetic`, `cdnow`, in `finpipe/customers/configs/`); a user points
`FINPIPE_CUSTOMERS_CONFIG` at their own file. A config says how to read the delivered files
(`[read]`), which delivered column is each contract field (`[columns]`), how to parse dates
(`[parse]`), the data-quality choices (`[rules]`) and the activity window (`[features]`).
"""

from __future__ import annotations

import importlib.resources
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from finpipe.errors import ConfigError
from finpipe.read_options import ReadOptions

SHIPPED_PACKAGE = "finpipe.customers"  # configs/*.toml, shipped as package data


class ColumnMapping(BaseModel):
    """Contract field -> delivered column name. `timestamp` or `date` is required, not both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    customer_id: str = Field(description="The customer's identifier.")
    amount: str = Field(description="Transaction amount in the account currency.")
    timestamp: str | None = Field(None, description="When the transaction happened.")
    date: str | None = Field(None, description="The transaction day, when no time is delivered.")
    category: str | None = Field(None, description="Product or merchant category (optional).")
    channel: str | None = Field(None, description="Sales channel, e.g. web/store (optional).")

    @model_validator(mode="after")
    def _one_time_column(self) -> ColumnMapping:
        if (self.timestamp is None) == (self.date is None):
            raise ValueError("[columns] needs exactly one of timestamp = ... or date = ...")
        return self

    @property
    def time_column(self) -> str:
        return self.timestamp or self.date  # type: ignore[return-value]

    def delivered(self) -> dict[str, str]:
        """Return contract field -> delivered column, for the fields this source has."""
        fields = ("customer_id", "timestamp", "date", "amount", "category", "channel")
        return {f: getattr(self, f) for f in fields if getattr(self, f) is not None}


class ParseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    date_format: str | None = Field(
        None, description="strftime format of the time column, e.g. '%Y%m%d'; default: ISO 8601."
    )


class QualityRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_refunds: bool = Field(
        False, description="Accept negative amounts (refunds); otherwise they quarantine a batch."
    )


class FeatureOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    active_days: int = Field(
        365,
        ge=1,
        description="A customer is active (scored) while their last purchase is "
        "at most this many days before the as-of date.",
    )


class CustomersConfig(BaseModel):
    """One data source's customers config, as read from its TOML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The config's name (file stem).")
    description: str = ""
    read: ReadOptions = Field(default_factory=ReadOptions)
    columns: ColumnMapping
    parse: ParseOptions = Field(default_factory=ParseOptions)
    rules: QualityRules = Field(default_factory=QualityRules)
    features: FeatureOptions = Field(default_factory=FeatureOptions)


def shipped_config_names() -> list[str]:
    """Return the names of the configs that ship with finpipe (e.g. cdnow, synthetic)."""
    folder = importlib.resources.files(SHIPPED_PACKAGE) / "configs"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def load_customers_config(name_or_path: str | Path) -> CustomersConfig:
    """Return the config called `name_or_path` (a shipped name) or stored at that TOML path.

    Raises ConfigError naming the file and the problem (unknown name, bad TOML, bad field).
    """
    text, where, stem = _config_text(str(name_or_path))
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{where} is not valid TOML ({error}); fix the file") from None
    source = raw.pop("source", {}) or {}
    try:
        return CustomersConfig(name=stem, description=source.get("description", ""), **raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"{where}: {problems}") from None


def _config_text(name_or_path: str) -> tuple[str, str, str]:
    """Return (TOML text, where it came from for messages, config name)."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(
                f"customers config {path} not found; set FINPIPE_CUSTOMERS_CONFIG to a TOML file "
                f"or one of {shipped_config_names()}"
            )
        return path.read_text(encoding="utf-8"), str(path), path.stem
    resource = importlib.resources.files(SHIPPED_PACKAGE) / "configs" / f"{name_or_path}.toml"
    if not resource.is_file():
        raise ConfigError(
            f"unknown customers config {name_or_path!r}: use one of {shipped_config_names()} "
            "or a path to a .toml file (FINPIPE_CUSTOMERS_CONFIG)"
        )
    return resource.read_text(encoding="utf-8"), f"customers config {name_or_path!r}", name_or_path
