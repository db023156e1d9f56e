"""What every flow does first: the process set up, the settings read, the domain and the
delivered files checked, and the run named as a lock holder; and where a backfill's dates run."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from finpipe.flows.summaries import ingest_failed_markdown
from finpipe.tasks.dates import ingest_deliveries
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from finpipe.calendars import Calendar
from finpipe.date_runs import expand_inputs, is_glob, stale_predictions
from finpipe.domains import get_domain
from finpipe.drop_roots import allowed_inputs
from finpipe.errors import ConfigError, FinpipeError
from finpipe.locks import check_lock_backend
from finpipe.schedule import ScheduleSettings, load_schedule_settings
from finpipe.services.tls import client_security
from finpipe.settings import (
    Settings,
    load_settings,
    prepare_environment,
    untraced_finpipe_errors,
)
from finpipe.status import quarantined_batch
from finpipe.storage import Storage
from finpipe.text import counted


@dataclass(frozen=True)
class RunSetup:
    """A flow run's settings, store, checked input files and name as a lock holder."""

    domain: str
    settings: Settings
    schedule: ScheduleSettings
    storage: Storage
    inputs: tuple[str, ...]
    holder: str
    lock_timeout: float
    corrections: tuple[str, ...] = ()  # files that restate published rows (ingest_file)

    @property
    def calendar(self) -> Calendar:
        """The calendar of the domain's delivery days."""
        return self.schedule.calendar(self.domain)

    def validated_dates(self, end: dt.date | None) -> list[dt.date]:
        """The dates with validated data on or before `end` (all of them for None)."""
        return self.storage.partition_dates("validated", self.domain, end=end)


def set_up_run(
    kind: str,
    domain: str,
    inputs: Iterable[str] = (),
    *,
    corrections: Iterable[str] = (),
    lock_timeout: float | None = None,
) -> RunSetup:
    """Set the process up (telemetry off before GX or MLflow loads), then check the domain,
    that `inputs` and `corrections` lie under the drop folders and that a store in a bucket has
    a lock database (FINPIPE_LOCKS_URL), before anything is read; ConfigError if not.

    `lock_timeout` is how long the run waits for a lock another run holds (default the
    FINPIPE_LOCK_TIMEOUT_SECONDS setting).
    """
    settings = load_settings()
    prepare_environment(settings)
    untraced_finpipe_errors()
    get_domain(domain)
    check_lock_backend(settings.home, settings.locks_url.get_secret_value())
    schedule = load_schedule_settings()
    inputs, corrections = list(inputs), list(corrections)
    _say_empty_globs([*inputs, *corrections])
    return RunSetup(
        domain=domain,
        settings=settings,
        schedule=schedule,
        storage=Storage(settings.home),
        inputs=tuple(allowed_inputs(inputs, settings.input_roots())),
        corrections=tuple(allowed_inputs(corrections, settings.input_roots())),
        holder=flow_run.name or f"{kind}-{domain}",
        lock_timeout=schedule.lock_timeout_seconds if lock_timeout is None else lock_timeout,
    )


def with_run_id_suffix(name: str) -> str:
    """Return `name` followed by the last six characters of this flow run's id (the end of
    its URL in the Prefect UI; `name` alone outside a run): repeated runs with the same
    parameters (a re-run, a form submitted twice) stay apart in the UI and as lock holders.
    Not for a name another run looks for: the nightly's says which night ran a date."""
    return f"{name}-{flow_run.id[-6:]}" if flow_run.id else name


def _say_empty_globs(patterns: list[str]) -> None:
    """Warn of each glob among a run's inputs that matches no file (a plain path that is
    missing is ingest's error): a misspelt pattern otherwise loads nothing, silently."""
    for pattern in patterns:
        if is_glob(pattern) and not expand_inputs([pattern]):
            get_run_logger().warning("inputs: %s matches no file; nothing loaded from it", pattern)


def ingest_inputs(run: RunSetup, as_of: dt.date) -> list[dict]:
    """Land, validate and publish the run's delivered files, then its corrections (their rows
    replacing the published rows they restate: `finpipe.ingest.ingest_file`); none: nothing
    to do. A delivered file every row of which is dated after `as_of` (a later session's,
    found by a late run's glob) is left for its own run, not refused as from the future."""
    outcomes = []
    for paths, correction in ((run.inputs, False), (run.corrections, True)):
        if paths:
            outcomes += ingest_deliveries(
                run.domain,
                list(paths),
                as_of.isoformat(),
                run.holder,
                run.lock_timeout,
                correction=correction,
                leave_later=not correction,
            )
    return outcomes


@contextmanager
def summary_if_ingest_fails(run: RunSetup, *, key: str, title: str, not_run: str) -> Iterator[None]:
    """Publish the run's summary artifact (`key`, headed `title`) when the ingest inside the
    block stops the run, then let the error fail it: a night whose delivery was quarantined
    shows in the Prefect UI which file, which rules on which rows, where the report is and
    what did not run (`not_run`), not only a failed state. The error is re-raised unchanged."""
    try:
        yield
    except FinpipeError as error:
        try:
            folder = getattr(error, "quarantine_path", None)
            quarantined = quarantined_batch(run.storage, run.domain, folder)
            create_markdown_artifact(
                key=key,
                markdown=ingest_failed_markdown(
                    title, run.domain, str(error), quarantined, not_run
                ),
                description=f"{title}: failed at ingest"
                + (f", {quarantined['file']} quarantined" if quarantined else ""),
            )
        except Exception as summary_error:  # the ingest's error is the one the run reports
            get_run_logger().warning(
                "the failed run's summary was not published: %s", summary_error
            )
        raise


def check_dask_scheduler(address: str, timeout: float = 5.0) -> None:
    """Raise ConfigError naming FINPIPE_DASK_ADDRESS when no scheduler answers at `address`
    (empty: threads, nothing to check): a connection that times out later is a long
    traceback after the run's first steps are done."""
    if not address:
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
        if not host or not port:
            raise ValueError("no host:port")
        socket.create_connection((host, port), timeout=timeout).close()
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"FINPIPE_DASK_ADDRESS={address}: no Dask scheduler answers there ({error}); start "
            "it (`finpipe stack up` starts the team's) or unset FINPIPE_DASK_ADDRESS to run the "
            "dates on threads"
        ) from None


def date_runner(settings: Settings, concurrency: int) -> TaskRunner:
    """Return the task runner a backfill's dates run on: prefect-dask's on the Dask scheduler
    at FINPIPE_DASK_ADDRESS, else a pool of `concurrency` threads in this process."""
    if not settings.dask_address:
        return ThreadPoolTaskRunner(max_workers=concurrency)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(
            "FINPIPE_DASK_ADDRESS is set but prefect-dask is not installed: "
            "pip install 'finpipe[team]' (or unset FINPIPE_DASK_ADDRESS to use threads)"
        ) from None
    # A tls:// scheduler (the team stack's) takes the client certificate Dask's settings name.
    security = client_security(settings.dask_address)
    client_kwargs = {} if security is None else {"security": security}
    return DaskTaskRunner(address=settings.dask_address, client_kwargs=client_kwargs)


def warn_of_stale_predictions(run: RunSetup, features: dict | None) -> dict | None:
    """Return `finpipe.date_runs.stale_predictions` for the features this run rebuilt or
    removed, warning in the run's log when there are any (None: none, or no feature step)."""
    if not features:
        return None
    stale = stale_predictions(run.storage, run.domain, features)
    if stale:
        dates = stale["dates"]
        named = ", ".join(dates[:10]) + (", ..." if len(dates) > 10 else "")
        get_run_logger().warning(
            "%s %s predictions scored from data since changed (%s); %s",
            counted(len(dates), "date"),
            "has" if len(dates) == 1 else "have",
            named,
            f"re-score them: {stale['backfill']}" if stale["backfill"] else "retracted whole",
        )
    return stale
