"""The backfill flow: a range of dates, each an independent unit, run in parallel and resumable.

The dates run on a thread pool in the flow's process, or on a Dask cluster when
FINPIPE_DASK_ADDRESS names its scheduler (`run_setup.date_runner`).
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Annotated, Any

from finpipe.flows.parameters import DomainName
from finpipe.flows.run_setup import (
    RunSetup,
    check_dask_scheduler,
    date_runner,
    ingest_inputs,
    set_up_run,
    summary_if_ingest_fails,
    warn_of_stale_predictions,
    with_run_id_suffix,
)
from finpipe.flows.summaries import artifact_key, backfill_description
from finpipe.tasks.dates import process_date, update_features
from finpipe.tasks.steps import promote, train
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from pydantic import Field

from finpipe.date_runs import (
    BackfillIncomplete,
    BackfillPlan,
    DateFailed,
    DateOutcome,
    failure_summary,
    outcome_from_record,
    plan_backfill,
    read_completion,
)
from finpipe.errors import ConfigError
from finpipe.locks import DEFAULT_TIMEOUT_SECONDS
from finpipe.planning import (
    ALL_STEPS,
    BackfillRequest,
    Step,
    check_backfill_request,
    training_config,
)
from finpipe.schedule import today_in
from finpipe.scoring import ScoringOutcome, in_sample_warning


def _run_name() -> str:
    """Name a run after its domain and range, then the last six characters of its run id:
    two backfills of one range (a re-run, a second form submitted) stay apart in the Prefect
    UI and in a waiting run's "held by" message, and the suffix is the end of the run's URL."""
    parameters = flow_run.parameters
    domain, start, end = parameters.get("domain", "market"), parameters["start"], parameters["end"]
    return with_run_id_suffix(f"backfill-{domain}-{start}-to-{end}")


@flow(name="backfill", flow_run_name=_run_name, log_prints=True)
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
    corrections: tuple[str, ...] = (),
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
        corrections: Files restating rows already loaded (paths or globs): their rows replace
            the published rows they restate (same key; a loan's every version, a customer's
            transactions at a time stamp), and a row flagged retracted=true removes them; the
            dates they change, and the later ones whose features change with them, are redone.
        training: Hyper-parameter overrides for the retrain, e.g. {"max_epochs": 10}.
        lock_timeout_seconds: How long a date waits while another run holds it (seconds).
    """
    run = set_up_run(
        "backfill", domain, inputs, corrections=corrections, lock_timeout=lock_timeout_seconds
    )
    today = today_in(run.schedule.timezone)
    request = _checked_request(run, start, end, steps, today)
    config = training_config(domain, dict(training))
    check_dask_scheduler(run.settings.dask_address)  # before any work, not after the features
    with summary_if_ingest_fails(
        run,
        key=artifact_key("backfill", domain),
        title=f"finpipe backfill: {domain} {request.start} to {request.end}",
        not_run="Nothing after it ran: no date of the range was processed (features, "
        "scores) and nothing was retrained; run the same backfill again once it is fixed.",
    ):
        ingested = ingest_inputs(run, today)
    features = None
    if "features" in request.steps:
        # Before planning: a date whose features this rebuilds (data re-delivered or corrected
        # on a day before it) no longer matches its completion record, so it is redone.
        features = update_features(
            domain,
            request.end.isoformat(),
            run.holder,
            run.lock_timeout,
            dates=[day.isoformat() for day in request.days],
        )
    plan = plan_backfill(run.storage, request, force=force)
    logger = get_run_logger()
    logger.info(
        "backfill %s %s to %s: %d dates to process, %d already done",
        *(domain, request.start, request.end, len(plan.todo), len(plan.done)),
    )
    results = _run_dates(run, request, plan, concurrency)
    if results and all(outcome.status == "no data" for outcome in results):
        logger.warning(_nothing_to_process(run, request))
    # After the dates ran: those in the range were re-scored, unless the steps left out score.
    stale = warn_of_stale_predictions(run, features)
    in_sample = in_sample_warning(
        ScoringOutcome(**outcome.predictions) for outcome in results if outcome.predictions
    )
    if in_sample:
        logger.warning(in_sample)
    failures = failure_summary(
        results, redo="fix the cause and run the same backfill again to redo only these"
    )
    training_outcome = decision = None
    if retrain and failures is None:
        training_outcome = train(domain, _retrain_day(run, request).isoformat(), config)
        decision = promote(domain, training_outcome)
    elif retrain:
        logger.warning("retrain skipped: some dates failed")
    create_table_artifact(
        key=artifact_key("backfill", domain),
        table=[outcome.table_row() for outcome in results],
        description=backfill_description(
            domain, str(request.start), str(request.end), results, stale, in_sample
        ),
    )
    if failures:
        raise BackfillIncomplete(failures, results)
    return {
        "domain": domain,
        "start": request.start.isoformat(),
        "end": request.end.isoformat(),
        "steps": list(request.steps),
        "ingested": ingested,
        "features": features,
        "dates": [outcome.to_dict() for outcome in results],
        "training": training_outcome,
        "promotion": decision,
        "stale_predictions": stale,
        "in_sample": in_sample,
    }


def _checked_request(
    run: RunSetup, start: dt.date, end: dt.date, steps: tuple[Step, ...], today: dt.date
) -> BackfillRequest:
    """The backfill's dates and steps, checked against today, the cap and the calendar."""
    return check_backfill_request(
        run.domain,
        start,
        end,
        steps,
        today=today,
        max_dates=run.schedule.backfill_max_dates,
        calendar=run.calendar,
    )


def _run_dates(
    run: RunSetup, request: BackfillRequest, plan: BackfillPlan, concurrency: int
) -> list[DateOutcome]:
    """Process the plan's dates, at most `concurrency` at a time, on the date runner; return
    every date's outcome in date order, the dates done earlier included."""
    outcomes = {
        day: outcome_from_record(read_completion(run.storage, run.domain, day)) for day in plan.done
    }
    slots = threading.BoundedSemaphore(concurrency)  # a Dask cluster may have more threads
    futures: dict[dt.date, PrefectFuture] = {}
    with date_runner(run.settings, concurrency) as runner:
        for day in plan.todo:
            slots.acquire()
            futures[day] = runner.submit(
                process_date,
                {
                    "domain": run.domain,
                    "day": day.isoformat(),
                    "steps": list(request.steps),
                    "holder": run.holder,
                    "lock_timeout": run.lock_timeout,
                    "store": run.storage.url,
                },
            )
            futures[day].add_done_callback(lambda _: slots.release())
        for day, future in futures.items():
            outcomes[day] = _outcome_of(day, future)
    return [outcomes[day] for day in sorted(outcomes)]


def _nothing_to_process(run: RunSetup, request: BackfillRequest) -> str:
    """What a backfill none of whose dates has data says: which dates the store does hold."""
    held = run.validated_dates(end=None)
    where = f"{held[0]} to {held[-1]}" if held else "no date at all: load deliveries first"
    return (
        f"no date from {request.start} to {request.end} has validated {run.domain} data, so "
        f"nothing was processed; the store holds {where} (a mistyped range? deliveries not "
        "loaded yet: pass them as inputs)"
    )


def _retrain_day(run: RunSetup, request: BackfillRequest) -> dt.date:
    """The last date with features up to the backfill's end: what the retrain learns as of."""
    trained_through = run.storage.partition_dates("features", run.domain, end=request.end)
    if not trained_through:
        raise ConfigError(f"no {run.domain} features up to {request.end}: nothing to retrain on")
    return trained_through[-1]


def _outcome_of(day: dt.date, future) -> DateOutcome:
    """Return a date's outcome from its task, failed ones included (they never stop the rest)."""
    try:
        return DateOutcome(**future.result())
    except DateFailed as failed:
        return failed.outcome
    except Exception as error:  # not a finpipe error: recorded as failed, reported, re-runnable
        return DateOutcome(day.isoformat(), "failed", message=f"{type(error).__name__}: {error}")
