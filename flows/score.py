"""The score flow: publish one date's predictions with the current champion."""

from __future__ import annotations

import datetime as dt

from finpipe.flows.parameters import DomainName
from finpipe.flows.run_setup import set_up_run, warn_of_stale_predictions, with_run_id_suffix
from finpipe.flows.summaries import artifact_key, score_markdown
from finpipe.tasks.dates import process_date, update_features
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from finpipe.planning import ALL_STEPS, run_day
from finpipe.scoring import ScoringOutcome, in_sample_warning


def _run_name() -> str:
    """Name a run after its domain and date (`latest` without one), then the end of its run
    id (`with_run_id_suffix`): two score runs of one date stay apart in the Prefect UI."""
    parameters = flow_run.parameters
    domain, as_of = parameters.get("domain", "market"), parameters.get("as_of") or "latest"
    return with_run_id_suffix(f"score-{domain}-{as_of}")


@flow(name="score", flow_run_name=_run_name, log_prints=True)
def score(domain: DomainName = "market", as_of: dt.date | None = None) -> dict:
    """Score one date with the champion and publish its predictions partition.

    Args:
        domain: Which domain: market, credit, customers or another registered domain.
        as_of: Date to score; empty means the latest validated date.
    """
    run = set_up_run("score", domain)
    run_date = run_day(domain, as_of, run.validated_dates(end=as_of), run.calendar).isoformat()
    features = update_features(domain, run_date, run.holder, run.lock_timeout)
    outcome = process_date(domain, run_date, list(ALL_STEPS), run.holder, run.lock_timeout)
    stale = warn_of_stale_predictions(run, features)
    in_sample = in_sample_warning([ScoringOutcome(**outcome["predictions"])])
    if in_sample:
        get_run_logger().warning(in_sample)
    create_markdown_artifact(
        key=artifact_key("score", domain),
        markdown=score_markdown(domain, run_date, outcome["predictions"], stale, in_sample),
    )
    return {**outcome, "stale_predictions": stale, "in_sample": in_sample}
