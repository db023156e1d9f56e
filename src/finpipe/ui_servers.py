"""The servers `finpipe ui` starts (a Prefect server and the MLflow UI on finpipe's stores) and
the check `finpipe serve` makes that a Prefect server answers: plain processes and HTTP health
checks, no Prefect import."""

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

from finpipe.errors import ConfigError
from finpipe.settings import TELEMETRY_OFF, Settings


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


# -- the servers `finpipe ui` starts -------------------------------------------------------
def mlflow_server_env() -> dict[str, str]:
    """What an MLflow server of finpipe's gets in its environment: no job execution.

    MLflow 3's server runs GenAI jobs (judges, prompt optimisation, trace roll-ups) in a job
    runner and seven Huey consumers, each its own Python process importing MLflow: about 16 s
    of CPU at start and eight processes that finpipe never gives work to. A user who sets
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION keeps their choice.
    """
    return {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get(
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"
        )
    }


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
            env=mlflow_server_env(),
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
