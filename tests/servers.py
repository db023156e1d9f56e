"""Real servers for end-to-end tests, on 127.0.0.1, started and stopped by the test itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from finpipe.services.ports import free_ports
from finpipe.ui_servers import mlflow_server_env

QUIET = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now, outside the range
    outgoing connections take ports from (`finpipe.services.ports`)."""
    return free_ports(1)[0]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 90.0) -> None:
    """Poll `url` until it answers 200; fail with the server's output if it dies or hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {_output(process)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"server at {url} did not answer in {timeout:.0f} s: {_output(process)}")


def stop(process: subprocess.Popen) -> None:
    """Stop a server and every process it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _output(process: subprocess.Popen) -> str:
    if process.stdout is None:
        return ""
    try:
        return process.stdout.read()[-2000:]
    except ValueError:
        return ""


class MlflowServer:
    """`mlflow server` on SQLite + a local artifact folder; a context manager."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **QUIET, **mlflow_server_env()},  # as finpipe starts one
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        wait_until_up(f"{self.url}/health", self.process)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            stop(self.process)
