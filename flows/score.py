"""The score flow: publish one date's predictions with the current champion."""

from __future__ import annotations

import datetime as dt

from finpipe.flows.parameters import DomainName
from finpipe.tasks.dates import process_date, update_features
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from finpipe.domains import get_domain
from finpipe.errors import ConfigError
from finpipe.planning import ALL_STEPS
from finpipe.schedule import load_schedule_settings
from finpipe.settings import load_settings, prepare_environment
from finpipe.storage import Storage, as_day


def _run_name() -> str:
    parameters = flow_run.parameters
    return f"score-{parameters.get('domain', 'market')}-{parameters.get('as_of') or 'latest'}"


@flow(name="score", flow_run_name=_run_name, log_prints=True)
def score(domain: DomainName = "market", as_of: dt.date | None = None) -> dict:
    """Score one date with the champion and publish its predictions partition.

    Args:
        domain: Which domain: market, credit, customers or another registered domain.
        as_of: Date to score; empty means the latest validated date.
    """
    prepare_environment(load_settings())  # telemetry off before GX or MLflow loads
    get_domain(domain)
    storage = Storage(load_settings().home)
    available = storage.partition_dates("validated", domain, end=as_of)
    if not available:
        raise ConfigError(f"no validated {domain} data on or before {as_of or 'today'}")
    run_date = (as_day(as_of) if as_of else available[-1]).isoformat()
    holder = flow_run.name or f"score-{domain}"
    wait = load_schedule_settings().lock_timeout_seconds
    update_features(domain, run_date, holder, wait)
    outcome = process_date(domain, run_date, list(ALL_STEPS), holder, wait)
    predictions = outcome["predictions"]
    create_markdown_artifact(
        key=f"score-{domain}",
        markdown=f"# finpipe score: {domain} {run_date}\n\n{predictions['rows']:,} rows by "
        f"{predictions['model_name']} v{predictions['model_version']} in `{predictions['path']}`.",
    )
    return outcome
