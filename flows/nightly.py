"""The nightly flow: validate -> features -> train -> promote -> score, for one as-of date."""

from __future__ import annotations

import datetime as dt
from typing import Any

from finpipe.tasks.steps import build_features, ingest_files, promote, score, train
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from finpipe.domains import get_domain
from finpipe.errors import ConfigError
from finpipe.settings import load_settings
from finpipe.storage import Storage, as_day


@flow(name="nightly", flow_run_name="nightly-{domain}-{as_of}", log_prints=True)
def nightly(
    domain: str = "market",
    as_of: dt.date | None = None,
    inputs: list[str] | None = None,
    retrain: bool = True,
    rebuild_features: bool = False,
    training: dict[str, Any] | None = None,
) -> dict:
    """Run one night of the pipeline and publish a markdown summary artifact.

    Args:
        domain: Which pipeline to run (market; credit and customers as they are added).
        as_of: Business date to run for; default the latest validated date.
        inputs: Delivered files to validate and load first (CSV, CSV.gz or Parquet paths).
        retrain: Retrain and run champion/challenger promotion before scoring.
        rebuild_features: Recompute every feature partition instead of only new dates.
        training: Hyper-parameter overrides, e.g. {"max_epochs": 10, "models": ["mlp"]}.
    """
    logger = get_run_logger()
    spec = get_domain(domain)
    try:
        config = spec.training_config(**(training or {}))
    except ValueError as error:
        raise ConfigError(f"invalid training parameters: {error}") from None
    validate_as_of = as_day(as_of) if as_of else dt.datetime.now(dt.UTC).date()
    ingested = ingest_files(domain, list(inputs), validate_as_of.isoformat()) if inputs else []
    storage = Storage(load_settings().home)
    available = storage.partition_dates("validated", domain, end=validate_as_of)
    if not available:
        raise ConfigError(
            f"no validated {domain} data on or before {validate_as_of}; "
            f"ingest files first (`finpipe ingest {domain} PATH...`)"
        )
    run_date = (as_day(as_of) if as_of else available[-1]).isoformat()
    logger.info("nightly %s for %s", domain, run_date)
    features = build_features(domain, run_date, rebuild_features)
    training_outcome = decision = None
    if retrain:
        training_outcome = train(domain, run_date, config)
        decision = promote(domain, training_outcome)
    predictions = score(domain, run_date)
    summary = {
        "domain": domain,
        "as_of": run_date,
        "ingested": ingested,
        "features": features,
        "training": training_outcome,
        "promotion": decision,
        "predictions": predictions,
    }
    create_markdown_artifact(
        key=f"nightly-{domain}-summary",
        markdown=summary_markdown(summary),
        description=f"finpipe nightly {domain} {run_date}",
    )
    return summary


def summary_markdown(summary: dict) -> str:
    """Return the run summary as markdown for the Prefect UI."""
    lines = [f"# finpipe nightly: {summary['domain']} as of {summary['as_of']}", ""]
    lines += ["## Validation", "| file | status | rows | dates |", "|---|---|---|---|"]
    for item in summary["ingested"] or []:
        name = item["source"].rsplit("/", 1)[-1]
        lines.append(f"| {name} | {item['status']} | {item['rows']:,} | {item['dates']} |")
    if not summary["ingested"]:
        lines.append("| (no new files) | | | |")
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
