"""The train flow: bring features up to date, retrain, run champion/challenger promotion."""

from __future__ import annotations

import datetime as dt
from typing import Any

from finpipe.flows.parameters import DomainName, HistoryDates, training_overrides
from finpipe.flows.run_setup import set_up_run, warn_of_stale_predictions, with_run_id_suffix
from finpipe.flows.summaries import artifact_key, train_markdown
from finpipe.tasks.dates import update_features
from finpipe.tasks.steps import promote as promote_task
from finpipe.tasks.steps import train as train_task
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from finpipe.planning import run_day, training_config


def _run_name() -> str:
    """Name a run after its domain and date (`latest` without one), then the end of its run
    id (`with_run_id_suffix`): two train runs of one date stay apart in the Prefect UI."""
    parameters = flow_run.parameters
    domain, as_of = parameters.get("domain", "market"), parameters.get("as_of") or "latest"
    return with_run_id_suffix(f"train-{domain}-{as_of}")


@flow(name="train", flow_run_name=_run_name, log_prints=True)
def train(
    domain: DomainName = "market",
    as_of: dt.date | None = None,
    training: dict[str, Any] | None = None,
    history_dates: HistoryDates = None,
    history_start: dt.date | None = None,
    promote: bool = True,
) -> dict:
    """Retrain the domain's models as of a date and, if asked, promote a better challenger.

    Args:
        domain: Which domain: market, credit, customers or another registered domain.
        as_of: Train on data known at this date; empty means the latest validated date.
        training: Hyper-parameter overrides, e.g. {"max_epochs": 10, "models": ["mlp"]}
            (market candidates: mlp, gru, tcn, lgbm, ensemble).
        history_dates: Train on the last N dates of the stored history; 0 means all of it,
            empty the domain's default (market: the last 756 dates, three years).
        history_start: Train on dates from this day on only (market); with history_dates as
            well, the later start applies. Empty: no start date.
        promote: Compare the new model with the champion on the same test window and make it
            champion if it is better; off, it stays registered as challenger only.
    """
    run = set_up_run("train", domain)
    config = training_config(domain, training_overrides(training, history_dates, history_start))
    run_date = run_day(domain, as_of, run.validated_dates(end=as_of), run.calendar).isoformat()
    features = update_features(domain, run_date, run.holder, run.lock_timeout)
    outcome = train_task(domain, run_date, config)
    decision = promote_task(domain, outcome) if promote else None
    if decision:
        get_run_logger().info(decision["reason"])
    stale = warn_of_stale_predictions(run, features)
    create_markdown_artifact(
        key=artifact_key("train", domain),
        markdown=train_markdown(domain, run_date, outcome, decision, stale),
    )
    return {
        "domain": domain,
        "as_of": run_date,
        "training": outcome,
        "promotion": decision,
        "stale_predictions": stale,
    }
