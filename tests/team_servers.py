"""The team set-up for end-to-end tests: Prefect server, MLflow UI, `finpipe serve`, Prefect runs.

Servers start with the commands `finpipe ui` runs (`server_commands`), on free ports of
127.0.0.1 with the test's own databases, and stop when the block ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from finpipe.flows.deployments import DEPLOYMENT_NAMES

from finpipe.settings import TELEMETRY_OFF, Settings
from finpipe.ui_servers import server_commands, wait_until_up
from tests.servers import free_port, stop


@contextlib.contextmanager
def ui_server(settings: Settings, name: str, workdir: Path) -> Iterator[str]:
    """Run the `Prefect` server or the `MLflow` UI of `finpipe ui`; yield its base URL."""
    ports = {"prefect_port": free_port(), "mlflow_port": free_port()}
    commands = server_commands(settings, prefect_home=workdir / "prefect-server", **ports)
    command = next(c for c in commands if c.name == name)
    log = workdir / f"{name.lower()}-server.log"
    process = command.start(log)
    try:
        try:
            wait_until_up(command, process, timeout=180)
        except Exception as error:
            raise AssertionError(f"{name} did not start ({error}):\n{_tail(log)}") from None
        yield command.url
    finally:
        stop(process)


@contextlib.contextmanager
def finpipe_serve(
    settings: Settings, api_url: str, workdir: Path, env: dict[str, str] | None = None
) -> Iterator[Path]:
    """Run `finpipe serve` until its deployments are registered; yield its log file."""
    from prefect.client.orchestration import SyncPrefectClient

    log = workdir / "finpipe-serve.log"
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "finpipe.cli", "serve", "--api-url", api_url],
            env={
                **os.environ,
                **TELEMETRY_OFF,
                "FINPIPE_HOME": str(settings.home),
                "PREFECT_HOME": str(workdir / "prefect-serve"),
                "PREFECT_LOGGING_LEVEL": "INFO",
                "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # pick runs up at once, not within 10 s
                **(env or {}),
            },
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with SyncPrefectClient(api_url) as client:
            deadline = time.monotonic() + 180
            while len(client.read_deployments()) < len(DEPLOYMENT_NAMES):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"finpipe serve did not start:\n{_tail(log)}")
                time.sleep(0.5)
        yield log
    finally:
        stop(process)


def start_run(api_url: str, deployment: str, parameters: dict) -> str:
    """Create a flow run of `deployment` with `parameters`, as the UI's custom run does."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url) as client:
        found = client.read_deployment_by_name(deployment)
        return str(client.create_flow_run_from_deployment(found.id, parameters=parameters).id)


def wait_for_run(api_url: str, run_id: str, timeout: float = 300):
    """Return the flow run once it reaches a final state; fail after `timeout` seconds."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(0.25)  # a run's end is noticed within a quarter of a second
    raise AssertionError(f"flow run {run_id} not finished after {timeout} s")


def run_artifacts(api_url: str, run_id: str) -> dict[str, object]:
    """Return the flow run's artifacts by key; table data decoded to a list of rows."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with SyncPrefectClient(api_url) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return {
        a.key: json.loads(a.data) if a.type == "table" and isinstance(a.data, str) else a.data
        for a in artifacts
    }


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no output)"
