"""The nightly flow: validate -> features -> train -> promote -> score, for one as-of date.

When earlier nights were missed (recorded completions stop before the as-of date), the run
first catches up: every missed session is scored, in date order, before retraining. Which
date, which missed sessions and whether to retrain are decided in `finpipe.planning`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

from finpipe.flows.parameters import DomainName, HistoryDates, training_overrides
from finpipe.flows.run_setup import (
    RunSetup,
    ingest_inputs,
    set_up_run,
    summary_if_ingest_fails,
    warn_of_stale_predictions,
)
from finpipe.flows.summaries import artifact_key, summary_markdown
from finpipe.tasks.dates import process_date, update_features
from finpipe.tasks.steps import promote, train
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from finpipe.date_runs import (
    BackfillIncomplete,
    DateFailed,
    DateOutcome,
    completed_dates,
    failure_summary,
    is_done,
    read_completion,
)
from finpipe.errors import FinpipeError
from finpipe.planning import (
    ALL_STEPS,
    AsOfRule,
    NightPlan,
    plan_night,
    scheduled_day,
    training_config,
)
from finpipe.schedule import check_timezone, load_schedule_settings, newest_day_accepted
from finpipe.storage import as_day

__all__ = ["nightly", "summary_markdown"]


def _run_name() -> str:
    """Name a run after its domain and date, resolving the scheduled `previous business day`.

    A setting that cannot resolve it (an unknown timezone or calendar) leaves the date out:
    the flow itself then fails with the one-line error, where raising here crashed the run
    before it started."""
    parameters = flow_run.parameters
    domain = parameters.get("domain", "market")
    as_of = parameters.get("as_of")
    if as_of is None and parameters.get("default_as_of") == "previous business day":
        try:
            as_of = _scheduled_as_of(parameters.get("calendar_timezone"), domain)
        except FinpipeError:
            as_of = "scheduled"
    return _night_name(domain, as_of or "latest")


def _night_name(domain: str, as_of: object) -> str:
    """Return a night's run name, which its completion records keep as their holder."""
    return f"nightly-{domain}-{as_of}"


def _scheduled_as_of(calendar_timezone: str | None, domain: str) -> dt.date:
    schedule = load_schedule_settings()
    moment = flow_run.scheduled_start_time or dt.datetime.now(dt.UTC)
    timezone = check_timezone(calendar_timezone or schedule.timezone)
    return scheduled_day(moment, timezone, schedule.calendar(domain))


@flow(name="nightly", flow_run_name=_run_name, log_prints=True)
def nightly(
    domain: DomainName = "market",
    as_of: dt.date | None = None,
    inputs: list[str] | None = None,
    corrections: list[str] | None = None,
    retrain: bool = True,
    rebuild_features: bool = False,
    training: dict[str, Any] | None = None,
    history_dates: HistoryDates = None,
    history_start: dt.date | None = None,
    catch_up: bool = True,
    default_as_of: AsOfRule = "latest validated date",
    calendar_timezone: str | None = None,
) -> dict:
    """Run one night of the pipeline and publish a markdown summary artifact.

    Args:
        domain: Which domain's pipeline to run: market, credit, customers or another
            registered domain.
        as_of: Date to run for; empty means `default_as_of` (and files' rows are accepted up
            to today in calendar_timezone).
        inputs: Delivered files to validate and load first (CSV, CSV.gz or Parquet paths, or
            globs such as /data/drop/market_*.csv: files already loaded are skipped).
        corrections: Files restating rows already loaded (paths or globs), loaded after the
            inputs: their rows replace the published rows they restate (same key; a loan's
            every version, a customer's transactions at a time stamp), and a row flagged
            retracted=true removes them; features are rebuilt from the earliest corrected date,
            and the summary names the past predictions scored from data they changed, with
            the backfill that re-scores them.
        retrain: Retrain and run champion/challenger promotion before scoring.
        rebuild_features: Recompute every feature partition instead of only new dates.
        training: Hyper-parameter overrides, e.g. {"max_epochs": 10, "models": ["mlp"]}
            (market candidates: mlp, gru, tcn, lgbm, ensemble).
        history_dates: Train on the last N dates of the stored history; 0 means all of it,
            empty the domain's default (market: the last 756 dates, three years).
        history_start: Train on dates from this day on only (market); with history_dates as
            well, the later start applies. Empty: no start date.
        catch_up: First score every session missed since the last scored night, and retry
            recent sessions left unscored (a failed catch-up, a late delivery, a backfill
            without the score step) within the backfill cap.
        default_as_of: The date to run for when as_of is empty: the latest validated date,
            or the session before the run's scheduled time (what the schedule uses). Sessions
            follow the domain's calendar (FINPIPE_CALENDARS: NYSE for market, so a night
            after an exchange holiday runs for the session before it; business days else).
        calendar_timezone: Timezone the scheduled time is read in; empty means
            FINPIPE_TIMEZONE.
    """
    run = set_up_run("nightly", domain, inputs or [], corrections=corrections or [])
    config = training_config(domain, training_overrides(training, history_dates, history_start))
    scheduled = as_of is None and default_as_of == "previous business day"
    if scheduled:
        as_of = _scheduled_as_of(calendar_timezone, domain)
    timezone = calendar_timezone or run.schedule.timezone
    validate_day = newest_day_accepted(as_day(as_of) if as_of else None, timezone)
    with summary_if_ingest_fails(
        run,
        key=artifact_key("nightly", domain, "summary"),
        title=f"finpipe nightly: {domain} as of {as_of or 'latest'}",
        not_run="Nothing after it ran: no features, catch-up, training, promotion or scoring "
        "for this night; the published predictions and the champion are as they were.",
    ):
        ingested = ingest_inputs(run, validate_day)
    plan = _plan(run, as_of, validate_day, catch_up=catch_up, retrain=retrain)
    run_date = plan.run_day.isoformat()
    run = _named_after_its_day(run, plan.run_day)
    # (its catch-up too: the night that ran it tried those dates from the same data; a date
    # that stays unscored, e.g. one never delivered, would otherwise rerun every such night)
    if scheduled and _night_ran(run, plan.run_day):
        return _ran_already(domain, run_date, ingested)
    get_run_logger().info("nightly %s for %s", domain, run_date)
    nights = [*(day.isoformat() for day in plan.catch_up), run_date]
    features = update_features(
        domain, run_date, run.holder, run.lock_timeout, rebuild_features, dates=nights
    )
    # In date order, each with the champion that night would have used, before retraining.
    caught_up = [_caught_up(run, missed) for missed in plan.catch_up]
    training_outcome = (
        train(domain, run_date, config, skip_if_nothing=True) if plan.retrain else None
    )
    decision = promote(domain, training_outcome) if training_outcome else None
    tonight = process_date(domain, run_date, list(ALL_STEPS), run.holder, run.lock_timeout)
    summary = {
        "domain": domain,
        "as_of": run_date,
        "ingested": ingested,
        "features": features,
        "catch_up": [outcome.to_dict() for outcome in caught_up],
        "training": training_outcome,
        "promotion": decision,
        "predictions": tonight["predictions"],
        "stale_predictions": warn_of_stale_predictions(run, features),
    }
    create_markdown_artifact(
        key=artifact_key("nightly", domain, "summary"),
        markdown=summary_markdown(summary),
        description=f"finpipe nightly {domain} {run_date}",
    )
    failures = failure_summary(
        caught_up, redo="the next night tries them again (they stay among its catch-up dates)"
    )
    if failures:
        raise BackfillIncomplete(f"{run_date} is done, but catching up: {failures}")
    return summary


def _plan(
    run: RunSetup, as_of: dt.date | None, validate_day: dt.date, *, catch_up: bool, retrain: bool
) -> NightPlan:
    """Plan the night (`finpipe.planning.plan_night`) from what the store holds."""
    return plan_night(
        run.domain,
        as_of=as_day(as_of) if as_of else None,
        validated=run.validated_dates(end=validate_day),
        scored=completed_dates(run.storage, run.domain, scored=True),
        calendar=run.calendar,
        catch_up=catch_up,
        max_catch_up=run.schedule.backfill_max_dates,
        retrain=retrain,
    )


def _named_after_its_day(run: RunSetup, day: dt.date) -> RunSetup:
    """Return `run` named after the day it runs for, as a night given that day is: a night
    started without one (`nightly-<domain>-latest`) is renamed in Prefect, and its completion
    records keep the dated name, so the scheduled night of that day finds it ran."""
    if run.holder != _night_name(run.domain, "latest") or flow_run.id is None:
        return run
    from prefect.client.orchestration import get_client

    name = _night_name(run.domain, day)
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name)
    return replace(run, holder=name)


def _night_ran(run: RunSetup, day: dt.date) -> bool:
    """Return whether the night of `day` itself (not a backfill, nor a later night's catch-up)
    completed it with every step, from the data it has now."""
    record = read_completion(run.storage, run.domain, day) or {}
    ran_it = record.get("holder") == _night_name(run.domain, day)
    return ran_it and is_done(run.storage, run.domain, day, ALL_STEPS)


def _ran_already(domain: str, run_date: str, ingested: list[dict]) -> dict:
    """Return (and publish) the summary of a scheduled night whose session was run and scored
    already from the same data: the morning after a weekday exchange holiday maps to the
    session before the holiday, as the morning before did. Not retrained or scored again."""
    skipped = (
        f"The night of {run_date} ran already, from the same data (the schedule's previous "
        "session is the one the last scheduled night ran: the day between was not a session). "
        "Nothing was retrained, scored or caught up again; run it with as_of set to redo it."
    )
    get_run_logger().info(skipped)
    summary = {"domain": domain, "as_of": run_date, "ingested": ingested, "skipped": skipped}
    create_markdown_artifact(
        key=artifact_key("nightly", domain, "summary"),
        markdown=summary_markdown(summary),
        description=f"finpipe nightly {domain} {run_date}",
    )
    return summary


def _caught_up(run: RunSetup, day: dt.date) -> DateOutcome:
    """Return a missed date's outcome; a failure is reported, not allowed to stop the night."""
    get_run_logger().info("catching up %s %s", run.domain, day)
    steps, holder, wait = list(ALL_STEPS), run.holder, run.lock_timeout
    try:
        return DateOutcome(**process_date(run.domain, day.isoformat(), steps, holder, wait))
    except DateFailed as failed:
        return failed.outcome
