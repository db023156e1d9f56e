"""The pipeline steps as Prefect tasks, generic over domains."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from finpipe.domains import get_domain
from finpipe.errors import FinpipeError
from finpipe.ingest import ingest_file
from finpipe.settings import load_settings
from finpipe.storage import Storage


def retry_if_transient(task, task_run, state) -> bool:
    """Retry I/O and connection faults; a finpipe error is retried only if it is transient."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, FinpipeError) or error.transient


# Idempotency lives in storage (content hashes, partitions replaced whole), not in Prefect's
# result cache, so a re-run from the UI always recomputes and tells the truth: NO_CACHE.
TRANSIENT = dict(
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)


def _storage() -> Storage:
    return Storage(load_settings().home)


@task(name="validate-and-publish", cache_policy=NO_CACHE)
def ingest_files(domain: str, paths: list[str], as_of: str) -> list[dict]:
    """Land, validate (Great Expectations) and publish each delivered file, in order."""
    logger = get_run_logger()
    contract = get_domain(domain).contract
    outcomes = []
    settings = load_settings()
    for path in paths:
        outcome = ingest_file(
            Storage(settings.home),
            contract,
            Path(path),
            as_of=as_of,
            max_file_bytes=settings.max_file_mb * 1024**2,
        )
        logger.info(outcome.message)
        outcomes.append(outcome.to_dict())
    return outcomes


@task(name="build-features", **TRANSIENT)
def build_features(domain: str, as_of: str, rebuild: bool = False) -> dict:
    """Compute and publish feature partitions for every date that needs them."""
    logger = get_run_logger()
    update = get_domain(domain).update_features(
        _storage(), as_of, rebuild=rebuild, progress=logger.info
    )
    if update.skipped_features:
        logger.warning("features skipped for missing columns: %s", update.skipped_features)
    logger.info("features: %d rows over %d dates", update.rows, len(update.dates_written))
    return update.to_dict()


@task(name="train", **TRANSIENT)
def train(domain: str, as_of: str, config) -> dict:
    """Train the domain's models, log them to MLflow and register the best as challenger."""
    logger = get_run_logger()
    settings = load_settings()
    outcome = get_domain(domain).train(
        Storage(settings.home), settings, as_of, config, progress=logger.info
    )
    return outcome.to_dict()


@task(name="promote", **TRANSIENT)
def promote(domain: str, training: dict) -> dict:
    """Compare challenger and champion on the same test window; move `champion` if better."""
    logger = get_run_logger()
    settings = load_settings()
    spec = get_domain(domain)
    outcome = spec.training_outcome(**training)
    decision = spec.promote(Storage(settings.home), settings, outcome)
    logger.info(decision.reason)
    return decision.to_dict()


@task(name="score", **TRANSIENT)
def score(domain: str, as_of: str) -> dict:
    """Score the as-of date with the champion and publish the predictions partition."""
    logger = get_run_logger()
    settings = load_settings()
    outcome = get_domain(domain).score(Storage(settings.home), settings, as_of)
    logger.info(
        "predictions: %d rows for %s by %s v%s",
        outcome.rows,
        outcome.date,
        outcome.model_name,
        outcome.model_version,
    )
    return outcome.to_dict()
