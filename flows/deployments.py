"""finpipe on a Prefect server: the five deployments, serving them, and starting the servers.

`build_deployments` defines `nightly` (cron schedule), `backfill`, `train`, `score` and
`backtest`; `finpipe serve` serves them from one process with `prefect.serve`, and
deploy/prefect.yaml declares the same five for `prefect deploy` onto a work pool
(tests/test_deployments.py keeps the two in step). `server_commands` are the commands
`finpipe ui` runs: a Prefect server on the Prefect database under FINPIPE_HOME, and the MLflow
UI on finpipe's tracking store.
"""

from __future__ import annotations

import time

import prefect
from finpipe.flows.backfill import backfill
from finpipe.flows.backtest import backtest
from finpipe.flows.nightly import nightly
from finpipe.flows.score import score
from finpipe.flows.train import train
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Schedule
from prefect.types.entrypoint import EntrypointType

from finpipe.domains import get_domain
from finpipe.drop_roots import allowed_inputs
from finpipe.errors import ConfigError
from finpipe.schedule import ScheduleSettings, check_timezone, load_schedule_settings
from finpipe.settings import load_settings

DEPLOYMENT_NAMES = ("nightly", "backfill", "train", "score", "backtest")
TAGS = ["finpipe"]


def nightly_schedules(schedule: ScheduleSettings) -> list[Schedule]:
    """Return one cron schedule per nightly domain; ConfigError for a bad cron, zone, domain,
    calendar or delivered files (what every night would otherwise fail on, at 02:00).

    Each schedule carries its domain (and that domain's delivered files, if configured) as
    parameters, so one `nightly` deployment runs every domain at the same hour.
    """
    check_timezone(schedule.timezone)
    _check_nightly_inputs(schedule)
    nights = []
    for domain in schedule.nightly_domains:
        get_domain(domain)
        schedule.calendar(domain)  # an unknown exchange code
        parameters = {"domain": domain}
        if domain in schedule.nightly_inputs:
            parameters["inputs"] = schedule.nightly_inputs[domain]
        nights.append(parameters)
    try:
        return [
            Cron(schedule.nightly_cron, timezone=schedule.timezone, parameters=parameters)
            for parameters in nights
        ]
    except ValueError as error:
        raise ConfigError(
            f"invalid nightly cron {schedule.nightly_cron!r} ({error}); e.g. '0 2 * * 1-5' "
            "is 02:00 Monday to Friday"
        ) from None


def _check_nightly_inputs(schedule: ScheduleSettings) -> None:
    """Raise ConfigError when FINPIPE_NIGHTLY_INPUTS names a domain no night runs (a typo
    would drop its files silently) or a file outside the drop folders (refused every night)."""
    strays = sorted(set(schedule.nightly_inputs) - set(schedule.nightly_domains))
    if strays:
        raise ConfigError(
            f"FINPIPE_NIGHTLY_INPUTS names {', '.join(map(repr, strays))}, which no night runs "
            f"(FINPIPE_NIGHTLY_DOMAINS: {', '.join(schedule.nightly_domains)})"
        )
    roots = load_settings().input_roots()
    for patterns in schedule.nightly_inputs.values():
        allowed_inputs(patterns, roots)


def build_deployments(schedule: ScheduleSettings | None = None) -> list[RunnerDeployment]:
    """Return the nightly, backfill, train, score and backtest deployments, ready to serve or
    apply.

    Entrypoints are module paths (`finpipe.flows.backfill.backfill`), so any process with
    finpipe installed can run them whatever its working directory.
    """
    schedule = schedule or load_schedule_settings()
    common = {"tags": TAGS, "entrypoint_type": EntrypointType.MODULE_PATH}
    return [
        nightly.to_deployment(
            name="nightly",
            schedules=nightly_schedules(schedule),
            parameters={
                "default_as_of": "previous business day",
                "calendar_timezone": schedule.timezone,
            },
            description=(
                f"Validate, build features, retrain, promote and score, at "
                f"'{schedule.nightly_cron}' ({schedule.timezone}), as of the previous session "
                "of the domain's calendar (NYSE for market); catches up missed nights first."
            ),
            **common,
        ),
        backfill.to_deployment(
            name="backfill",
            description=(
                "Process a date range (validate, features, score; optional retrain at the end), "
                "several dates at a time. Re-running redoes only failed, missing or stale dates "
                "(data re-delivered or corrected since)."
            ),
            **common,
        ),
        train.to_deployment(
            name="train",
            description="Retrain as of a date and promote the new model if it beats the champion.",
            **common,
        ),
        score.to_deployment(
            name="score",
            description="Score one date with the champion and publish its predictions.",
            **common,
        ),
        backtest.to_deployment(
            name="backtest",
            description=(
                "Walk-forward backtest of the market models: retrain on schedule through a past "
                "range, score each window out of sample, report the portfolios. Re-running "
                "redoes only failed, missing or stale windows."
            ),
            **common,
        ),
    ]


def serve_deployments(schedule: ScheduleSettings | None = None, *, limit: int | None = 4) -> None:
    """Serve the five deployments from this process until interrupted (`finpipe serve`).

    `limit` caps how many flow runs this process runs at the same time.
    """
    prefect.serve(*build_deployments(schedule), limit=limit)


def apply_deployments(
    work_pool: str, schedule: ScheduleSettings | None = None, *, wait_seconds: float = 120.0
) -> list[str]:
    """Register the five deployments on the work pool `work_pool` of the Prefect server at
    PREFECT_API_URL, for workers to run (what `prefect deploy --prefect-file
    deploy/prefect.yaml --all` does, without the repository's file); return their names.

    The pool is made by the first `prefect worker start --pool <name>`: this waits up to
    `wait_seconds` for it (the team stack starts both at once), then raises ConfigError.
    Registering again updates them in place.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + wait_seconds
    with get_client(sync_client=True) as client:
        while True:
            try:
                client.read_work_pool(work_pool)
                break
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"work pool {work_pool!r} does not exist on {client.api_url}: start a "
                        f"worker (`prefect worker start --pool {work_pool}`) or create it "
                        f"(`prefect work-pool create {work_pool} --type process`)"
                    ) from None
                time.sleep(0.5)
    deployments = build_deployments(schedule)
    for deployment in deployments:
        deployment.apply(work_pool_name=work_pool)
    return [deployment.name for deployment in deployments]


def start_prefect_api() -> float:
    """Make sure this process's Prefect API answers (in Prefect's local mode that starts the
    temporary server); return the seconds it took. Raises ConfigError when it does not answer.
    """
    from prefect.client.orchestration import get_client

    started = time.perf_counter()
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise ConfigError(f"Prefect's API does not answer at {client.api_url}: {failure}")
    return time.perf_counter() - started
