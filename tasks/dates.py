"""Prefect tasks for the per-date unit of work (every run: nightly, catch-up, backfill): locked
ingest, locked feature update, one date checked, scored and recorded."""

from __future__ import annotations

from finpipe.tasks.steps import TRANSIENT
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from finpipe import date_runs
from finpipe.errors import ConfigError, FinpipeError
from finpipe.features import describe_feature_update
from finpipe.settings import load_settings
from finpipe.storage import Storage
from finpipe.text import counted


def retry_if_a_server_blinked(task, task_run, state) -> bool:
    """Retry only when a server did not answer: the object store (StoreUnavailable) or the
    lock database (LockUnavailable, LockLost: finpipe's transient errors). A bad file, a
    refused write or a busy lock (LockTimeout) fails the same way again, and a bug should fail
    at once."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, FinpipeError) and error.transient


# An ingest is safe to repeat: a file lands once (create-only, named by its content), a batch
# is keyed by that content, and a file whose batch is not `validated` yet is landed and checked
# again. So an object store or a lock database that restarts mid-run (seconds) costs a retry,
# not the run; the history lock is released between attempts. Three retries cover an outage
# of about 40 s.
STORE_RETRY_DELAYS = [2.0, 10.0, 30.0]


@task(
    name="validate-and-publish",
    cache_policy=NO_CACHE,
    retries=len(STORE_RETRY_DELAYS),
    retry_delay_seconds=STORE_RETRY_DELAYS,
    retry_condition_fn=retry_if_a_server_blinked,
)
def ingest_deliveries(
    domain: str,
    paths: list[str],
    as_of: str,
    holder: str,
    lock_timeout: float,
    correction: bool = False,
    leave_later: bool = False,
) -> list[dict]:
    """Land, validate (Great Expectations) and publish each delivered file, under the lock
    (`correction`: the files restate published rows; `finpipe.ingest.ingest_file`;
    `leave_later`: files dated after `as_of` wait for their own run)."""
    logger = get_run_logger()
    settings = load_settings()
    return date_runs.ingest_deliveries(
        Storage(settings.home),
        domain,
        paths,
        as_of=as_of,
        max_file_bytes=settings.max_file_mb * 1024**2,
        holder=holder,
        lock_timeout=lock_timeout,
        progress=logger.info,
        correction=correction,
        leave_later=leave_later,
    )


@task(name="build-features", **TRANSIENT)
def update_features(
    domain: str,
    through: str,
    holder: str,
    lock_timeout: float,
    rebuild: bool = False,
    dates: list[str] | None = None,
) -> dict:
    """Bring every feature partition up to date through `through`, and give each of `dates`
    (the dates the run processes; default `through`) its own, under the history lock."""
    logger = get_run_logger()
    update = date_runs.update_features_through(
        Storage(load_settings().home),
        domain,
        through,
        dates=dates,
        rebuild=rebuild,
        holder=holder,
        lock_timeout=lock_timeout,
        progress=logger.info,
    )
    if update["skipped_features"]:
        logger.warning("features skipped for missing columns: %s", update["skipped_features"])
    if update["unsourced_features"]:  # the source never has these columns: nothing to act on
        logger.info("features not built: %s", update["unsourced_features"])
    logger.info(describe_feature_update(update, dates or [through]))
    return update


@task(name="date", task_run_name="{domain}-{day}", **TRANSIENT)
def process_date(
    domain: str,
    day: str,
    steps: list[str],
    holder: str,
    lock_timeout: float,
    store: str | None = None,
) -> dict:
    """Check, score and record one date under its lock (see finpipe.date_runs.process_date).

    `store`: the run's storage root (`Storage.url`), given where the task may run in another
    process (a Dask worker): one whose own FINPIPE_HOME differs refuses the date instead of
    processing it in another store.
    """
    settings = load_settings()
    storage = Storage(settings.home)
    if store is not None and storage.url != store:
        raise ConfigError(
            f"this worker's FINPIPE_HOME is {storage.url}, the run's is {store}: start every "
            "Dask worker with the run's settings (FINPIPE_HOME and the rest)"
        )
    logger = get_run_logger()
    outcome = date_runs.process_date(
        storage,
        settings,
        domain,
        day,
        steps,
        holder=holder,
        lock_timeout=lock_timeout,
        progress=logger.info,
    )
    logger.info("%s %s: %s, %s", domain, day, outcome.status, counted(outcome.rows, "row"))
    if outcome.predictions and outcome.predictions.get("warning"):
        logger.warning("%s %s: %s", domain, day, outcome.predictions["warning"])
    return outcome.to_dict()
