"""finpipe on a Prefect server: the four deployments, serving them, and starting the servers.

`build_deployments` defines `nightly` (cron schedule), `backfill`, `train` and `score`;
`finpipe serve` serves them from one process with `prefect.serve`, and deploy/prefect.yaml
declares the same four for `prefect deploy` onto a work pool (tests/test_deployments.py keeps
the two in step). `server_commands` are the commands `finpipe ui` runs: a Prefect server on the
Prefect database under FINPIPE_HOME, and the MLflow UI on finpipe's tracking store.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import prefect
from finpipe.flows.backfill import backfill
from finpipe.flows.nightly import nightly
from finpipe.flows.score import score
from finpipe.flows.train import train
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Schedule
from prefect.types.entrypoint import EntrypointType

from finpipe.domains import get_domain
from finpipe.errors import ConfigError
from finpipe.schedule import ScheduleSettings, check_timezone, load_schedule_settings
from finpipe.settings import TELEMETRY_OFF, Settings

DEPLOYMENT_NAMES = ("nightly", "backfill", "train", "score")
TAGS = ["finpipe"]


def nightly_schedules(schedule: ScheduleSettings) -> list[Schedule]:
    """Return one cron schedule per nightly domain; ConfigError for a bad cron, zone or domain.

    Each schedule carries its domain (and that domain's delivered files, if configured) as
    parameters, so one `nightly` deployment runs every domain at the same hour.
    """
    check_timezone(schedule.timezone)
    nights = []
    for domain in schedule.nightly_domains:
        get_domain(domain)
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


def build_deployments(schedule: ScheduleSettings | None = None) -> list[RunnerDeployment]:
    """Return the nightly, backfill, train and score deployments, ready to serve or apply.

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
                "several dates at a time. Re-running redoes only failed or missing dates."
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
    ]


def serve_deployments(schedule: ScheduleSettings | None = None, *, limit: int | None = 4) -> None:
    """Serve the four deployments from this process until interrupted (`finpipe serve`).

    `limit` caps how many flow runs this process runs at the same time.
    """
    prefect.serve(*build_deployments(schedule), limit=limit)


def check_prefect_server(api_url: str, timeout: float = 10.0) -> None:
    """Raise ConfigError unless a Prefect server answers at `api_url` (e.g. .../api)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as reply:
            if reply.status == 200:
                return
    except OSError:
        pass
    raise ConfigError(
        f"no Prefect server answers at {api_url}: start one with `finpipe ui` (or "
        "`prefect server start`), or point PREFECT_API_URL at your team's server"
    )


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


# -- the servers `finpipe ui` starts -------------------------------------------------------
@dataclass(frozen=True)
class ServerCommand:
    """One server process: its command line, environment additions and where it answers."""

    name: str
    argv: list[str]
    url: str
    health_url: str
    env: dict[str, str] = field(default_factory=dict)

    def start(self, log_file: Path | None = None) -> subprocess.Popen:
        """Start the server as a child process (output to `log_file`, else inherited)."""
        output = open(log_file, "ab") if log_file else None  # noqa: SIM115 (the child owns it)
        return subprocess.Popen(
            self.argv,
            env={**os.environ, **TELEMETRY_OFF, **self.env},
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
        )


def server_commands(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    prefect_home: Path | None = None,
) -> list[ServerCommand]:
    """Return the Prefect server and MLflow UI commands for the stores of `settings`.

    The Prefect server keeps its database in PREFECT_HOME (by default FINPIPE_HOME/prefect,
    where local runs already record their history); the MLflow UI reads finpipe's tracking
    store and artifacts.
    """
    scripts = Path(sys.executable).parent
    prefect_home = prefect_home or Path(os.environ.get("PREFECT_HOME", settings.prefect_home()))
    return [
        ServerCommand(
            name="Prefect",
            argv=[
                str(scripts / "prefect"),
                "server",
                "start",
                "--host",
                host,
                "--port",
                str(prefect_port),
                "--analytics-off",
            ],
            url=f"http://{host}:{prefect_port}",
            health_url=f"http://{host}:{prefect_port}/api/health",
            env={
                "PREFECT_HOME": str(prefect_home),
                # The UI asks the API at PREFECT_UI_API_URL, which otherwise stays on port 4200.
                "PREFECT_SERVER_API_HOST": host,
                "PREFECT_SERVER_API_PORT": str(prefect_port),
                "PREFECT_UI_API_URL": f"http://{host}:{prefect_port}/api",
            },
        ),
        ServerCommand(
            name="MLflow",
            argv=[
                str(scripts / "mlflow"),
                "server",
                "--backend-store-uri",
                settings.tracking_uri,
                "--default-artifact-root",
                settings.artifact_root,
                "--host",
                host,
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
            ],
            url=f"http://{host}:{mlflow_port}",
            health_url=f"http://{host}:{mlflow_port}/health",
        ),
    ]


def wait_until_up(
    command: ServerCommand, process: subprocess.Popen, timeout: float = 120.0
) -> None:
    """Return once `command`'s health URL answers; ConfigError if it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(
                f"the {command.name} server stopped at start (exit status {process.returncode}); "
                f"is port {command.url.rsplit(':', 1)[-1]} already in use?"
            )
        try:
            with urllib.request.urlopen(command.health_url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise ConfigError(f"the {command.name} server did not answer at {command.url} in {timeout} s")


def run_servers(
    commands: list[ServerCommand], say: Callable[[str], None], log_dir: Path | None = None
) -> None:
    """Start every server, report where they answer, and stop them all when one stops, on ^C
    or on SIGTERM (each server runs in its own process group, which is stopped whole)."""

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    processes = []
    try:
        for command in commands:
            log_file = log_dir / f"{command.name.lower()}.log" if log_dir else None
            processes.append(command.start(log_file))
        for command, process in zip(commands, processes, strict=True):
            wait_until_up(command, process)
            say(f"{command.name} UI: {command.url}")
        say(
            f"In another shell: export PREFECT_API_URL={commands[0].url}/api && finpipe serve. "
            "Ctrl-C stops the servers."
        )
        while all(p.poll() is None for p in processes):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        # Stop every server even if ^C or SIGTERM comes again while stopping them.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        interrupted = signal.signal(signal.SIGINT, signal.SIG_IGN)
        for process in processes:
            _signal_group(process, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=10)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, interrupted)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
