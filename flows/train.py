"""The train flow: bring features up to date, retrain, run champion/challenger promotion."""

from __future__ import annotations

import datetime as dt
from typing import Any

from finpipe.flows.nightly import metrics_table
from finpipe.flows.parameters import DomainName, HistoryDates, training_overrides
from finpipe.tasks.dates import update_features
from finpipe.tasks.steps import promote as promote_task
from finpipe.tasks.steps import train as train_task
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from finpipe.domains import get_domain
from finpipe.errors import ConfigError
from finpipe.schedule import load_schedule_settings
from finpipe.settings import load_settings, prepare_environment
from finpipe.storage import Storage, as_day


def _run_name() -> str:
    parameters = flow_run.parameters
    return f"train-{parameters.get('domain', 'market')}-{parameters.get('as_of') or 'latest'}"


@flow(name="train", flow_run_name=_run_name, log_prints=True)
def train(
    domain: DomainName = "market",
    as_of: dt.date | None = None,
    training: dict[str, Any] | None = None,
    history_dates: HistoryDates = None,
    promote: bool = True,
) -> dict:
    """Retrain the domain's models as of a date and, if asked, promote a better challenger.

    Args:
        domain: Which domain: market, credit, customers or another registered domain.
        as_of: Train on data known at this date; empty means the latest validated date.
        training: Hyper-parameter overrides, e.g. {"max_epochs": 10, "models": ["mlp"]}.
        history_dates: Train on the last N dates of the stored history; 0 means all of it,
            empty the domain's default (market: the last 756 dates, three years).
        promote: Compare the new model with the champion on the same test window and make it
            champion if it is better; off, it stays registered as challenger only.
    """
    prepare_environment(load_settings())  # telemetry off before GX or MLflow loads
    logger = get_run_logger()
    spec = get_domain(domain)
    try:
        config = spec.training_config(**training_overrides(training, history_dates))
    except ValueError as error:
        raise ConfigError(f"invalid training parameters: {error}") from None
    storage = Storage(load_settings().home)
    available = storage.partition_dates("validated", domain, end=as_of)
    if not available:
        raise ConfigError(f"no validated {domain} data on or before {as_of or 'today'}")
    run_date = (as_day(as_of) if as_of else available[-1]).isoformat()
    holder = flow_run.name or f"train-{domain}"
    update_features(domain, run_date, holder, load_schedule_settings().lock_timeout_seconds)
    outcome = train_task(domain, run_date, config)
    decision = promote_task(domain, outcome) if promote else None
    lines = [
        f"# finpipe train: {domain} as of {run_date}",
        "",
        f"MLflow run `{outcome['run_id']}`; candidate **{outcome['candidate']}** registered as "
        f"version {outcome['challenger_version']}.",
        "",
        *metrics_table(outcome["metrics"]),
    ]
    if decision:
        lines += ["", "## Promotion", decision["reason"]]
        logger.info(decision["reason"])
    create_markdown_artifact(key=f"train-{domain}", markdown="\n".join(lines))
    return {"domain": domain, "as_of": run_date, "training": outcome, "promotion": decision}
