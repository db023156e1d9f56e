"""The backfill flow: a range of dates, each an independent unit, run in parallel and resumable."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Annotated, Any

from finpipe.flows.parameters import DomainName
from finpipe.tasks.dates import ingest_deliveries, process_date, update_features
from finpipe.tasks.steps import promote, train
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from finpipe.date_runs import (
    BackfillIncomplete,
    DateFailed,
    DateOutcome,
    expand_inputs,
    failure_summary,
    outcome_from_record,
    plan_backfill,
    read_completion,
)
from finpipe.domains import get_domain
from finpipe.errors import ConfigError
from finpipe.locks import DEFAULT_TIMEOUT_SECONDS
from finpipe.planning import ALL_STEPS, Step, check_backfill_request
from finpipe.schedule import load_schedule_settings, today_in
from finpipe.settings import load_settings, prepare_environment
from finpipe.storage import Storage


@flow(name="backfill", flow_run_name="backfill-{domain}-{start}-to-{end}", log_prints=True)
def backfill(
    domain: DomainName = "market",
    *,
    start: dt.date,
    end: dt.date,
    steps: tuple[Step, ...] = ALL_STEPS,
    retrain: bool = False,
    concurrency: Annotated[int, Field(ge=1, le=16)] = 4,
    force: bool = False,
    inputs: tuple[str, ...] = (),
    training: dict[str, Any] = {},  # noqa: B006 (never mutated; the form shows an empty object)
    lock_timeout_seconds: Annotated[float, Field(ge=0)] = DEFAULT_TIMEOUT_SECONDS,
) -> dict:
    """Process every session of the domain's calendar from start to end; redo only what is not done.

    Each date is checked, scored and recorded on its own, several at a time; one date failing
    does not stop the others. A table of dates with status, rows and duration is published as
    an artifact. Running the same backfill again redoes only failed, missing or stale dates.

    Args:
        domain: Which domain's pipeline: market, credit, customers or another registered
            domain. Its dates are the sessions of its calendar (FINPIPE_CALENDARS: NYSE for
            market, so exchange holidays are skipped; business days else).
        start: First date of the range (YYYY-MM-DD).
        end: Last date of the range, included; today at the latest.
        steps: What each date gets: validate (require validated data), features (bring
            features up to date), score (publish predictions with the champion).
        retrain: Retrain once at the end, as of the last date with features, then run
            champion/challenger promotion.
        concurrency: How many dates are processed at the same time.
        force: Redo every date, even those already completed from the same data.
        inputs: Delivered files (paths or globs) to validate and load before the dates run.
        training: Hyper-parameter overrides for the retrain, e.g. {"max_epochs": 10}.
        lock_timeout_seconds: How long a date waits while another run holds it (seconds).
    """
    prepare_environment(load_settings())  # telemetry off before GX or MLflow loads
    logger = get_run_logger()
    schedule = load_schedule_settings()
    request = check_backfill_request(
        domain,
        start,
        end,
        steps,
        today=today_in(schedule.timezone),
        max_dates=schedule.backfill_max_dates,
        calendar=schedule.calendar(domain),
    )
    spec = get_domain(domain)
    try:
        config = spec.training_config(**dict(training))
    except ValueError as error:
        raise ConfigError(f"invalid training parameters: {error}") from None
    files = expand_inputs(inputs)
    wait = lock_timeout_seconds  # the same for the history lock (ingest, features) and dates
    holder = flow_run.name or "backfill"
    storage = Storage(load_settings().home)

    ingested = (
        ingest_deliveries(domain, files, today_in(schedule.timezone).isoformat(), holder, wait)
        if files
        else []
    )
    plan = plan_backfill(storage, request, force=force)
    logger.info(
        "backfill %s %s to %s: %d dates to process, %d already done",
        domain,
        request.start,
        request.end,
        len(plan.todo),
        len(plan.done),
    )
    features = None
    if "features" in request.steps and (plan.todo or retrain):
        features = update_features(domain, request.end.isoformat(), holder, wait)

    outcomes = {d: outcome_from_record(read_completion(storage, domain, d)) for d in plan.done}
    with ThreadPoolTaskRunner(max_workers=concurrency) as runner:
        futures = {
            day: runner.submit(
                process_date,
                {
                    "domain": domain,
                    "day": day.isoformat(),
                    "steps": list(request.steps),
                    "holder": holder,
                    "lock_timeout": wait,
                },
            )
            for day in plan.todo
        }
        for day, future in futures.items():
            outcomes[day] = _outcome_of(day, future)
    results = [outcomes[day] for day in sorted(outcomes)]

    training_outcome = decision = None
    failures = failure_summary(results)
    if retrain and failures is None:
        trained_through = storage.partition_dates("features", domain, end=request.end)
        if not trained_through:
            raise ConfigError(f"no {domain} features up to {request.end}: nothing to retrain on")
        training_outcome = train(domain, trained_through[-1].isoformat(), config)
        decision = promote(domain, training_outcome)
    elif retrain:
        logger.warning("retrain skipped: some dates failed")

    create_table_artifact(
        key=f"backfill-{domain}",
        table=[outcome.table_row() for outcome in results],
        description=f"finpipe backfill {domain} {request.start} to {request.end}: "
        + ", ".join(f"{n} {s}" for s, n in Counter(o.status for o in results).items()),
    )
    summary = {
        "domain": domain,
        "start": request.start.isoformat(),
        "end": request.end.isoformat(),
        "steps": list(request.steps),
        "ingested": ingested,
        "features": features,
        "dates": [outcome.to_dict() for outcome in results],
        "training": training_outcome,
        "promotion": decision,
    }
    if failures:
        raise BackfillIncomplete(failures)
    return summary


def _outcome_of(day: dt.date, future) -> DateOutcome:
    """Return a date's outcome from its task, failed ones included (they never stop the rest)."""
    try:
        return DateOutcome(**future.result())
    except DateFailed as failed:
        return failed.outcome
    except Exception as error:  # not a finpipe error: recorded as failed, reported, re-runnable
        return DateOutcome(day.isoformat(), "failed", message=f"{type(error).__name__}: {error}")
