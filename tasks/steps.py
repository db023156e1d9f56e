"""Training and promotion as Prefect tasks, generic over domains, and `TRANSIENT`, the retry
policy every task shares. The per-date steps (ingest, features, score): `tasks/dates.py`."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

from finpipe.domains import get_domain
from finpipe.errors import FinpipeError, NothingToTrain
from finpipe.schedule import load_schedule_settings
from finpipe.settings import load_settings
from finpipe.storage import Storage

# Errors of the code, not of a server or the network: the same inputs fail the same way again
# (a domain's KeyError, a TypeError). ValueError is not among them: pyarrow's ArrowInvalid and
# requests' JSONDecodeError are ValueErrors, and a reply cut short raises them.
_DETERMINISTIC = (
    LookupError, TypeError, AttributeError, NameError, AssertionError, ImportError,
    NotImplementedError, ArithmeticError,
)  # fmt: skip


def retry_if_transient(task, task_run, state) -> bool:
    """Retry I/O, connection and server faults: a finpipe error only if it is transient, and
    never an error of the code (`_DETERMINISTIC`), which would fail again after fitting every
    candidate again."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, FinpipeError):
        return error.transient
    return not isinstance(error, _DETERMINISTIC)


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


@task(name="train", **TRANSIENT)
def train(domain: str, as_of: str, config, *, skip_if_nothing: bool = False) -> dict | None:
    """Train the domain's models, log them to MLflow and register the best as challenger.

    With `skip_if_nothing` (the nightly), a date with nothing to train on (NothingToTrain,
    e.g. no loan's outcome window has passed yet) is a warning and None, not a failure.
    """
    logger = get_run_logger()
    settings = load_settings()
    try:
        outcome = get_domain(domain).train(
            Storage(settings.home),
            settings,
            as_of,
            config,
            progress=logger.info,
            tags=_trained_by(),
            holder=flow_run.name or f"train-{domain}",
            lock_timeout=load_schedule_settings().lock_timeout_seconds,
        )
    except NothingToTrain as nothing:
        if not skip_if_nothing:
            raise
        logger.warning(
            "No retrain for %s %s: %s Scoring uses the champion.", domain, as_of, nothing
        )
        return None
    return outcome.to_dict()


def _trained_by() -> dict[str, str]:
    """The tags that lead from an MLflow training run back to the Prefect run that made it:
    its flow (nightly, train, backfill), flow run and deployment (none for a local run)."""
    made_by = {
        "prefect.flow": flow_run.flow_name,
        "prefect.flow_run": flow_run.name,
        "prefect.flow_run_id": flow_run.id,
        "prefect.deployment": deployment.name,
    }
    return {key: str(value) for key, value in made_by.items() if value}


@task(name="promote", **TRANSIENT)
def promote(domain: str, training: dict) -> dict:
    """Compare challenger and champion on the same test window; move `champion` if better."""
    logger = get_run_logger()
    settings = load_settings()
    spec = get_domain(domain)
    outcome = spec.training_outcome(**training)
    decision = spec.promote(
        Storage(settings.home),
        settings,
        outcome,
        lock_timeout=load_schedule_settings().lock_timeout_seconds,
        progress=logger.info,
    )
    logger.info(decision.reason)
    return decision.to_dict()
