"""Prefect tasks for the per-date unit of work (every run: nightly, catch-up, backfill): locked
ingest, locked feature update, one date checked, scored and recorded."""

from __future__ import annotations

from finpipe.tasks.steps import TRANSIENT
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from finpipe import date_runs
from finpipe.settings import load_settings
from finpipe.storage import Storage


@task(name="validate-and-publish", cache_policy=NO_CACHE)
def ingest_deliveries(
    domain: str, paths: list[str], as_of: str, holder: str, lock_timeout: float
) -> list[dict]:
    """Land, validate (Great Expectations) and publish each delivered file, under the lock."""
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
    )


@task(name="build-features", **TRANSIENT)
def update_features(
    domain: str, through: str, holder: str, lock_timeout: float, rebuild: bool = False
) -> dict:
    """Bring every feature partition up to date through `through`, under the history lock."""
    logger = get_run_logger()
    update = date_runs.update_features_through(
        Storage(load_settings().home),
        domain,
        through,
        rebuild=rebuild,
        holder=holder,
        lock_timeout=lock_timeout,
        progress=logger.info,
    )
    if update["skipped_features"]:
        logger.warning("features skipped for missing columns: %s", update["skipped_features"])
    logger.info("features: %d rows over %d dates", update["rows"], len(update["dates_written"]))
    return update


@task(name="date", task_run_name="{domain}-{day}", **TRANSIENT)
def process_date(domain: str, day: str, steps: list[str], holder: str, lock_timeout: float) -> dict:
    """Check, score and record one date under its lock (see finpipe.date_runs.process_date)."""
    logger = get_run_logger()
    settings = load_settings()
    outcome = date_runs.process_date(
        Storage(settings.home),
        settings,
        domain,
        day,
        steps,
        holder=holder,
        lock_timeout=lock_timeout,
        progress=logger.info,
    )
    logger.info("%s %s: %s, %d rows", domain, day, outcome.status, outcome.rows)
    if outcome.predictions and outcome.predictions.get("warning"):
        logger.warning("%s %s: %s", domain, day, outcome.predictions["warning"])
    return outcome.to_dict()
