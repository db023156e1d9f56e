"""Every setting in one place: typed, described, overridable by environment variables."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from finpipe.errors import ConfigError, FinpipeError

# Offline hygiene: Prefect, MLflow and GX phone home unless told not to. Set when the CLI or a
# flow starts (`prepare_environment`), never on import, and only where the user has not chosen
# otherwise.
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    # Not telemetry, but noise in batch logs: MLflow's per-download progress bars.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def disable_telemetry() -> None:
    """Switch off Prefect, MLflow and Great Expectations telemetry unless the user set it."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    if "mlflow" in sys.modules:
        # MLflow decides on telemetry when it is imported; one imported earlier decides again.
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()


# An object-store root: `s3://bucket/prefix` (see finpipe.storage).
StoreUrl = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9+.-]*://.")]


def default_local_home(store_url: str) -> Path:
    """The local folder kept for an object-store root: under the user's cache folder, named
    after the bucket and prefix (`~/.cache/finpipe/s3/<bucket>/<prefix>`)."""
    scheme, _, rest = store_url.partition("://")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "finpipe" / scheme.lower() / Path(*[p for p in rest.split("/") if p])


# Settings whose values an error message never shows.
SECRET_FIELDS = frozenset({"locks_url"})


def _is_postgres_url(url: str) -> bool:
    """Whether `url` is a postgresql:// URL that every parser reads alike: one `@` at most
    (libpq splits `user:p@ss@host` at the first, Python at the last). Any host form libpq
    takes goes: none (its default socket), `?host=/var/run/postgresql`, several hosts."""
    scheme, _, rest = url.partition("://")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    return scheme.lower() in {"postgresql", "postgres"} and netloc.count("@") <= 1


# How numeric dates such as 08/01/2024 read (finpipe.delivered_days).
DateOrder = Literal["auto", "dmy", "mdy"]


class Settings(BaseSettings):
    """Where finpipe keeps its data and which MLflow names it uses.

    Each field reads `FINPIPE_<NAME>` from the environment (e.g. `FINPIPE_HOME`).
    """

    model_config = SettingsConfigDict(env_prefix="FINPIPE_", extra="ignore")

    home: StoreUrl | Path = Field(
        default=Path.home() / ".finpipe",
        union_mode="left_to_right",
        description="Storage root: landing, quarantine, validated, features, predictions, "
        "reports. A local folder, or an object store `s3://bucket/prefix` (server and "
        "credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_DEFAULT_REGION; runs then need FINPIPE_LOCKS_URL).",
    )
    local_dir: Path | None = Field(
        default=None,
        description="Where what must stay on a local disk lives when the storage root is an "
        "object store: MLflow's SQLite file and artifacts (unless a tracking server is set), "
        "Prefect's local state, generated deliveries. Default ~/.cache/finpipe/s3/<bucket>/"
        "<prefix>; with a local root, the root itself.",
    )
    # Only FINPIPE_MLFLOW_TRACKING_URI: MLflow's own `set_tracking_uri` writes
    # MLFLOW_TRACKING_URI into the process environment, so reading it back here would let one
    # run's URI leak into the next storage root.
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; default a SQLite file under the storage root.",
    )
    mlflow_artifact_root: str | None = Field(
        default=None,
        description="Where new experiments keep artifacts; default `mlartifacts/` under the root.",
    )
    experiment_prefix: str = Field(
        default="finpipe", description="MLflow experiment name is `<prefix>-<domain>`."
    )
    model_prefix: str = Field(
        default="finpipe", description="Registered model name is `<prefix>-<domain>`."
    )
    credit_config: Path | None = Field(
        default=None,
        description="Loan-book config of the credit domain: a TOML file, or the name of a "
        "shipped example (`synthetic`, `germancredit`); default the synthetic example.",
    )
    customers_config: str = Field(
        default="synthetic",
        description="Column mapping of the customers domain's transaction files: a shipped "
        "config name (`synthetic`, `cdnow`) or the path of a TOML file.",
    )

    max_file_mb: int = Field(
        default=2048, ge=1, description="Largest delivery file ingest accepts, in MiB."
    )
    promotion_floor: bool = Field(
        default=True,
        description="No model becomes champion, first or not, unless it beats the naive "
        "baselines its domain states on the validation window (market: one standard error "
        "above zero IC, and the momentum and reversal signals' IC). Off only for plumbing "
        "tests with toy models: a refused challenger is still registered for inspection.",
    )
    market_close_is_adjusted: bool = Field(
        default=False,
        description="The market files' close is already split- and dividend-adjusted: a "
        "file without adj_close is checked as adjusted prices are (large moves are warnings, "
        "not suspected splits). Leave it off for raw exchange closes.",
    )
    date_order: DateOrder = Field(
        default="auto",
        description="How the market and credit files' numeric dates (08/01/2024) read: dmy "
        "(8 January), mdy (1 August) or auto, the order each file's own dates prove (a number "
        "above 12); a file whose dates prove neither, or both, is refused with the rows named. "
        "ISO dates (2024-01-08) always read as they are.",
    )
    locks_url: SecretStr = Field(
        default=SecretStr(""),
        description="Where runs take their locks: empty, OS file locks under the storage root "
        "(processes on one machine); a `postgresql://user:password@host:port/database` URL, "
        "Postgres advisory locks in that database (runs on several machines; finpipe.pg_locks).",
    )

    @field_validator("home", "local_dir", "credit_config", "customers_config", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        # `FINPIPE_HOME=` would otherwise read as Path(""), the working directory.
        if isinstance(value, str) and not value.strip():
            field_name = info.field_name or ""
            return cls.model_fields[field_name].get_default(call_default_factory=True)
        return value

    @field_validator("home")
    @classmethod
    def _store_url_has_no_empty_folder(cls, home: str | Path) -> str | Path:
        if isinstance(home, str) and "//" in home.partition("://")[2].rstrip("/"):
            raise ValueError("should name a bucket and folders without an empty one (`//`)")
        return home

    @field_validator("locks_url")
    @classmethod
    def _locks_url_is_a_postgres_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if url and not _is_postgres_url(url):
            raise ValueError(
                "should be a postgresql://user:password@host:port/database URL, with @ : / "
                "? # % in the password percent-encoded (@ as %40); the key=value form is not "
                "accepted, because finpipe could not keep its password out of messages"
            )
        return value

    malloc_tuning: bool = Field(
        default=True,
        description="Keep freed memory for reuse instead of unmapping large arrays on every "
        "free (glibc only); see `tune_allocator`.",
    )
    drop_roots: list[Path] | None = Field(
        default=None,
        examples=[["/data/drop"]],
        description="Folders a run's `inputs` may name files in (JSON list, e.g. "
        '["/data/drop"]); a file outside them, symlinks followed, is refused before anything '
        "is read. Unset: `vendor_drop/` under the storage root (where `finpipe demo` writes) "
        "and `deliveries/` and `datasets/` under the working directory. `finpipe ingest PATH` "
        "is held to them only where this is set.",
    )
    dask_address: str = Field(
        default="",
        description="Dask scheduler a backfill's dates run on, e.g. tcp://10.0.0.5:8786, or "
        "tls://... with Dask's TLS settings (DASK_DISTRIBUTED__COMM__TLS__*, as the team "
        "stack's stack.env sets them) naming the client certificate (needs finpipe[team]; "
        "every worker needs the same FINPIPE_ settings and storage root). Empty: a thread "
        "pool in the flow's own process.",
    )

    def model_post_init(self, __context: object) -> None:
        if isinstance(self.home, Path):
            self.home = self.home.expanduser().resolve()
        else:
            self.home = self.home.rstrip("/")

    @property
    def home_is_local(self) -> bool:
        """True when the storage root is a local folder (not an object store)."""
        return isinstance(self.home, Path)

    @property
    def local_home(self) -> Path:
        """The local folder for what stays on this machine: the storage root when it is a
        folder, else `local_dir` (default under the user's cache folder)."""
        if isinstance(self.home, Path):
            return self.home
        return (self.local_dir or default_local_home(self.home)).expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI in force (SQLite under the storage root unless set)."""
        return self.mlflow_tracking_uri or f"sqlite:///{self.local_home / 'mlflow.db'}"

    @property
    def tracking_uri_for_display(self) -> str:
        """The tracking URI with any user:password part masked, safe for logs and errors."""
        return redact_uri(self.tracking_uri)

    @property
    def tracking_is_local(self) -> bool:
        """True when MLflow runs in-process on a local database or folder (no server)."""
        return self.tracking_uri.startswith(("sqlite:", "file:", "/"))

    @property
    def artifact_root(self) -> str:
        """Artifact location for experiments finpipe creates."""
        return self.mlflow_artifact_root or (self.local_home / "mlartifacts").as_uri()

    def experiment_name(self, domain: str) -> str:
        return f"{self.experiment_prefix}-{domain}"

    def model_name(self, domain: str) -> str:
        return f"{self.model_prefix}-{domain}"

    def prefect_home(self) -> Path:
        """Prefect's local state (ephemeral-mode database) kept beside the data."""
        return self.local_home / "prefect"

    def input_roots(self) -> list[Path]:
        """The drop folders `inputs` must lie under, symlinks resolved (`drop_roots`)."""
        roots = self.drop_roots
        if roots is None:
            roots = [self.local_home / "vendor_drop", Path("deliveries"), Path("datasets")]
        return [Path(os.path.realpath(root.expanduser())) for root in roots]


def redact_uri(uri: str) -> str:
    """Return `uri` with credentials (`user:secret@`) and query secrets replaced by ***."""
    masked = re.sub(r"(?<=://)[^/@\s]+@", "***@", uri)
    return re.sub(r"(?i)((?:token|password|secret|key)=)[^&\s]+", r"\1***", masked)


def load_settings() -> Settings:
    """Return settings read from the environment now (cheap; call at the edges, pass down);
    ConfigError naming each bad variable, its value and what it takes, or a local folder
    setting that names a file."""
    try:
        settings = Settings()
    except ValidationError as error:
        raise ConfigError(f"invalid settings: {describe_invalid(error, 'FINPIPE_')}") from None
    except SettingsError as error:
        raise ConfigError(f"invalid settings: {describe_undecodable(error, Settings)}") from None
    variable = "FINPIPE_HOME" if settings.home_is_local else "FINPIPE_LOCAL_DIR"
    _check_is_a_folder(variable, settings.local_home)
    return settings


def _check_is_a_folder(variable: str, folder: Path) -> None:
    """Raise ConfigError when `folder`, or the nearest of its parents that exists, is not a
    folder: every command would otherwise fail with an OS error on a path below it."""
    existing = next((path for path in (folder, *folder.parents) if os.path.exists(path)), None)
    if existing is None or os.path.isdir(existing):
        return
    where = "a file" if existing == folder else f"under a file ({existing})"
    raise ConfigError(
        f"{variable}={folder} is {where}, not a folder: set {variable} to a folder (finpipe "
        "creates it if it does not exist)"
    )


# What pydantic says of a value, where the environment needs more than its words.
_ENVIRONMENT_ALLOWS = {
    "bool_parsing": "should be true or false (also 1/0, yes/no, on/off)",
    "list_type": 'should be a JSON list, e.g. ["/data/drop"]',
}


def describe_invalid(error: ValidationError, env_prefix: str | None = None) -> str:
    """Return pydantic's `error` as one line, a problem per bad field: the field (the
    environment variable `env_prefix` + NAME when given), the value and what is allowed.

    A rule across fields (e.g. an end before a start) is its message alone: its value would
    be every field."""
    problems = []
    for problem in error.errors():
        allowed = problem["msg"].removeprefix("Value error, ").replace("Input should", "should")
        path = [str(part) for part in problem["loc"] if not isinstance(part, int)]
        if not path:
            problems.append(allowed)
            continue
        field = ".".join(path)
        if env_prefix is not None:
            field = (env_prefix + field).upper()
            allowed = _ENVIRONMENT_ALLOWS.get(problem["type"], allowed)
        shown = "'***'" if path[-1] in SECRET_FIELDS else repr(problem["input"])
        problems.append(f"{field}={shown}: {allowed}")
    return "; ".join(problems)


# pydantic-settings names the field whose environment variable is not JSON only in its message.
_UNDECODABLE_FIELD = re.compile(r'field "(?P<field>\w+)"')


def describe_undecodable(error: SettingsError, settings_cls: type[BaseSettings]) -> str:
    """Return pydantic-settings' `error` for an environment variable that is not the JSON
    its field takes as one line: the variable, its value and an example of what it takes (the
    field's first `examples` entry)."""
    found = _UNDECODABLE_FIELD.search(str(error))
    if found is None or found["field"] not in settings_cls.model_fields:
        return str(error)
    field_name = found["field"]
    variable = (settings_cls.model_config.get("env_prefix", "") + field_name).upper()
    # pydantic-settings reads variable names in any case (case_sensitive is off).
    value = next((v for k, v in os.environ.items() if k.upper() == variable), "")
    shown = "'***'" if field_name in SECRET_FIELDS else repr(value)
    examples = settings_cls.model_fields[field_name].examples or []
    if not examples or not isinstance(examples[0], list | dict):
        return f"{variable}={shown}: should be JSON"
    example = examples[0]
    shape = "a JSON list" if isinstance(example, list) else "a JSON object"
    return f"{variable}={shown}: should be {shape}, e.g. {json.dumps(example)}"


_PREFECT_STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
# How long a run waits for Prefect's local API server to answer, unless the user chose.
PREFECT_STARTUP_TIMEOUT_SECONDS = 60


def prepare_environment(settings: Settings) -> None:
    """Set the process up for a pipeline run: telemetry off, the allocator tuned (unless
    FINPIPE_MALLOC_TUNING=0), Prefect's local state under the storage root unless the user set
    PREFECT_HOME, a minute for Prefect's local API server to start unless the user set its
    timeout, MLflow's and Alembic's logs at WARNING.

    Importing finpipe changes none of this: the CLI calls it first thing, before Prefect is
    imported, and every flow as it starts (a deployment's process has Prefect imported already,
    with its own settings, but nothing yet of GX or MLflow).
    """
    disable_telemetry()
    for library in ("mlflow", "alembic"):  # per-run INFO lines that bury the pipeline's own
        logging.getLogger(library).setLevel(logging.WARNING)
    if settings.malloc_tuning:
        tune_allocator()
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home()))
    # Prefect's local mode opens a SQLite file there and cannot create the folder itself.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    # Prefect's default of 20 s is not enough on a busy 2-core machine: a first `finpipe demo`
    # there stopped with "Timed out while attempting to connect to ephemeral Prefect API server".
    os.environ.setdefault(_PREFECT_STARTUP_TIMEOUT, str(PREFECT_STARTUP_TIMEOUT_SECONDS))


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def tune_allocator() -> bool:
    """Let glibc keep freed memory for reuse; return whether the setting took.

    The pipeline works in blocks: each feature block allocates arrays of tens of MB and frees
    them before the next block allocates the same sizes again. By default glibc maps every such
    array afresh and unmaps it on free, so each block page-faults its memory back in: at 16S
    that was about a quarter of the feature build's CPU, in the kernel. Raising the mmap and
    trim thresholds to 1 GiB serves those arrays from the heap, where freed blocks are reused.
    The peak barely moves, since the blocks keep their size (16S features: 1,693 MB before,
    1,727 MB after); memory is handed back when the process ends. A no-op (False) where the C
    library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


class _WithoutTraceback(logging.Filter):
    """Drop the traceback from a record of a FinpipeError: its message says what is wrong and
    what to do, and Prefect logs a failed run's exception with twenty lines of its own frames
    above it. Any other exception (a bug) keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FinpipeError):
            record.exc_info = record.exc_text = None
        return True


_WITHOUT_TRACEBACK = _WithoutTraceback()


def untraced_finpipe_errors() -> None:
    """Log a flow or task run that fails with a FinpipeError as one line (in the terminal and
    in the Prefect UI), not with the traceback Prefect adds; idempotent."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if _WITHOUT_TRACEBACK not in logger.filters:
            logger.addFilter(_WITHOUT_TRACEBACK)
