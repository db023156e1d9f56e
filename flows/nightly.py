"""The nightly flow: validate -> features -> train -> promote -> score, for one as-of date.

When earlier nights were missed (recorded completions stop before the as-of date), the run
first catches up: every missed session is scored, in date order, before retraining.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from finpipe.flows.parameters import DomainName, HistoryDates, training_overrides
from finpipe.tasks.dates import ingest_deliveries, process_date, update_features
from finpipe.tasks.steps import promote, train
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from finpipe.date_runs import (
    BackfillIncomplete,
    DateFailed,
    DateOutcome,
    completed_dates,
    expand_inputs,
    failure_summary,
)
from finpipe.domains import get_domain
from finpipe.errors import ConfigError
from finpipe.planning import ALL_STEPS, plan_night, scheduled_day
from finpipe.schedule import check_timezone, load_schedule_settings
from finpipe.settings import load_settings, prepare_environment
from finpipe.storage import Storage, as_day

AsOfRule = Literal["latest validated date", "previous business day"]


def _run_name() -> str:
    """Name a run after its domain and date, resolving the scheduled `previous business day`."""
    parameters = flow_run.parameters
    domain = parameters.get("domain", "market")
    as_of = parameters.get("as_of")
    if as_of is None and parameters.get("default_as_of") == "previous business day":
        as_of = _scheduled_as_of(parameters.get("calendar_timezone"), domain)
    return f"nightly-{domain}-{as_of or 'latest'}"


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
    retrain: bool = True,
    rebuild_features: bool = False,
    training: dict[str, Any] | None = None,
    history_dates: HistoryDates = None,
    catch_up: bool = True,
    default_as_of: AsOfRule = "latest validated date",
    calendar_timezone: str | None = None,
) -> dict:
    """Run one night of the pipeline and publish a markdown summary artifact.

    Args:
        domain: Which domain's pipeline to run: market, credit, customers or another
            registered domain.
        as_of: Date to run for; empty means `default_as_of`.
        inputs: Delivered files to validate and load first (CSV, CSV.gz or Parquet paths, or
            globs such as /data/drop/market_*.csv: files already loaded are skipped).
        retrain: Retrain and run champion/challenger promotion before scoring.
        rebuild_features: Recompute every feature partition instead of only new dates.
        training: Hyper-parameter overrides, e.g. {"max_epochs": 10, "models": ["mlp"]}.
        history_dates: Train on the last N dates of the stored history; 0 means all of it,
            empty the domain's default (market: the last 756 dates, three years).
        catch_up: First score every session missed since the last completed night.
        default_as_of: The date to run for when as_of is empty: the latest validated date,
            or the session before the run's scheduled time (what the schedule uses). Sessions
            follow the domain's calendar (FINPIPE_CALENDARS: NYSE for market, so a night
            after an exchange holiday runs for the session before it; business days else).
        calendar_timezone: Timezone the scheduled time is read in; empty means
            FINPIPE_TIMEZONE.
    """
    prepare_environment(load_settings())  # telemetry off before GX or MLflow loads
    logger = get_run_logger()
    spec = get_domain(domain)
    try:
        config = spec.training_config(**training_overrides(training, history_dates))
    except ValueError as error:
        raise ConfigError(f"invalid training parameters: {error}") from None
    schedule = load_schedule_settings()
    calendar = schedule.calendar(domain)
    if as_of is None and default_as_of == "previous business day":
        as_of = _scheduled_as_of(calendar_timezone, domain)
    holder = flow_run.name or f"nightly-{domain}"
    wait = schedule.lock_timeout_seconds
    validate_as_of = as_day(as_of) if as_of else dt.datetime.now(dt.UTC).date()
    files = expand_inputs(inputs or [])
    ingested = (
        ingest_deliveries(domain, files, validate_as_of.isoformat(), holder, wait) if files else []
    )
    storage = Storage(load_settings().home)
    plan = plan_night(
        domain,
        as_of=as_day(as_of) if as_of else None,
        validated=storage.partition_dates("validated", domain, end=validate_as_of),
        completed=completed_dates(storage, domain),
        calendar=calendar,
        catch_up=catch_up,
        max_catch_up=schedule.backfill_max_dates,
        retrain=retrain,
    )
    run_date = plan.run_day.isoformat()
    logger.info("nightly %s for %s", domain, run_date)
    features = update_features(domain, run_date, holder, wait, rebuild_features)
    caught_up = []
    for day in plan.catch_up:  # in date order, with the champion those nights would have used
        logger.info("catching up %s %s", domain, day)
        caught_up.append(_date_outcome(domain, day.isoformat(), holder, wait))
    training_outcome = decision = None
    if plan.retrain:
        training_outcome = train(domain, run_date, config)
        decision = promote(domain, training_outcome)
    tonight = process_date(domain, run_date, list(ALL_STEPS), holder, wait)
    summary = {
        "domain": domain,
        "as_of": run_date,
        "ingested": ingested,
        "features": features,
        "catch_up": [outcome.to_dict() for outcome in caught_up],
        "training": training_outcome,
        "promotion": decision,
        "predictions": tonight["predictions"],
    }
    create_markdown_artifact(
        key=f"nightly-{domain}-summary",
        markdown=summary_markdown(summary),
        description=f"finpipe nightly {domain} {run_date}",
    )
    failures = failure_summary(caught_up)
    if failures:
        raise BackfillIncomplete(f"{run_date} is done, but catching up: {failures}")
    return summary


def _date_outcome(domain: str, day: str, holder: str, wait: float) -> DateOutcome:
    """Return a missed date's outcome; a failure is reported, not allowed to stop the night."""
    try:
        return DateOutcome(**process_date(domain, day, list(ALL_STEPS), holder, wait))
    except DateFailed as failed:
        return failed.outcome


def summary_markdown(summary: dict) -> str:
    """Return the run summary as markdown for the Prefect UI."""
    lines = [f"# finpipe nightly: {summary['domain']} as of {summary['as_of']}", ""]
    lines += ["## Validation", "| file | status | rows | dates |", "|---|---|---|---|"]
    for item in summary["ingested"] or []:
        name = item["source"].rsplit("/", 1)[-1]
        lines.append(f"| {name} | {item['status']} | {item['rows']:,} | {item['dates']} |")
    if not summary["ingested"]:
        lines.append("| (no new files) | | | |")
    noted = [
        (item["source"].rsplit("/", 1)[-1], warning)
        for item in summary["ingested"] or []
        for warning in item.get("warnings") or []
    ]
    if noted:
        lines += ["", "**Data-quality warnings** (recorded; the data was accepted):", ""]
        lines += [f"- {name}: {warning}" for name, warning in noted]
    caught_up = summary.get("catch_up") or []
    if caught_up:
        lines += ["", "## Catch-up (missed nights)", "| date | status | rows | message |"]
        lines.append("|---|---|---|---|")
        for item in caught_up:
            lines.append(
                f"| {item['date']} | {item['status']} | {item['rows']:,} | {item['message']} |"
            )
    features = summary["features"]
    lines += [
        "",
        "## Features",
        f"{features['rows']:,} rows over {len(features['dates_written'])} new dates "
        f"in {features['seconds']} s.",
    ]
    if features["skipped_features"]:
        lines.append(f"Skipped (missing columns): {features['skipped_features']}")
    training = summary["training"]
    if training:
        lines += [
            "",
            "## Training",
            f"MLflow run `{training['run_id']}`; candidate **{training['candidate']}** "
            f"registered as version {training['challenger_version']}.",
            "",
            *metrics_table(training["metrics"]),
        ]
    decision = summary["promotion"]
    if decision:
        lines += ["", "## Promotion", decision["reason"]]
    predictions = summary["predictions"]
    lines += [
        "",
        "## Predictions",
        f"{predictions['rows']:,} rows for {predictions['date']} by {predictions['model_name']} "
        f"v{predictions['model_version']} in `{predictions['path']}`.",
    ]
    return "\n".join(lines)


def metrics_table(metrics: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Return a markdown table: one row per model, test metrics (validation IC-like first)."""
    names = sorted({key for result in metrics.values() for key in result.get("test", {})})
    lines = ["| model | " + " | ".join(f"test {n}" for n in names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for kind, result in metrics.items():
        cells = [_number(result.get("test", {}).get(name)) for name in names]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def _number(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
