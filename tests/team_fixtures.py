"""The team stack's pieces for tests: one real PostgreSQL server per test session.

`tests/conftest.py` exposes it as the session fixture `postgres` (a running PostgresServer);
each test module that needs a database of its own makes one with `new_database`. The server
runs without fsync (a test cluster is thrown away), on a free port of 127.0.0.1, with a
random password, in a throwaway folder the `postgres` user can reach when tests run as root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from finpipe.services.postgres import PostgresServer
from tests.servers import free_port

# Durability is worthless in a test cluster and costs seconds on a busy disk.
TEST_CONFIG = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
_numbers = itertools.count(1)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a fresh PostgreSQL cluster; stop it and remove its folder when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix="finpipe-pg-"))
    folder.chmod(0o755)  # the `postgres` user runs the server when tests run as root
    server = PostgresServer(
        folder / "data", free_port(), secrets.token_urlsafe(18), config=TEST_CONFIG
    )
    try:
        with server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def new_database(server: PostgresServer, purpose: str) -> str:
    """Create a database of its own for one test module or test; return its `postgresql://` URL."""
    name = f"{purpose}_{os.getpid()}_{next(_numbers)}"
    server.create_database(name)
    return server.dsn(name)


@dataclasses.dataclass(frozen=True)
class TeamStack:
    """A running `finpipe stack`: its folder, every variable of its env file, how long `up`
    took and what it printed."""

    root: Path
    values: dict[str, str]
    up_seconds: float
    up_output: str

    def client_environment(self) -> dict[str, str]:
        """The settings a client of the stack exports (stack.env's first block)."""
        from finpipe.services.stack import CLIENT_SETTINGS

        return {name: self.values[name] for name in CLIENT_SETTINGS}

    def secrets(self) -> dict[str, str]:
        """The stack's generated secrets by name (the password half of Prefect's auth string)."""
        from finpipe.services.stack import GENERATED

        found = {name: self.values[name] for name in GENERATED if name != "AWS_ACCESS_KEY_ID"}
        found["PREFECT_API_AUTH_STRING"] = found["PREFECT_API_AUTH_STRING"].split(":", 1)[1]
        return found


def stack_processes(root: Path) -> dict[int, str]:
    """Every live process started for the stack in `root` (FINPIPE_STACK_DIR in its
    environment, or the folder on its command line): pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"FINPIPE_STACK_DIR={root}".encode() in environment or f"{root}/" in command:
            found[int(entry.name)] = command
    return found


@contextlib.contextmanager
def running_stack() -> Iterator[TeamStack]:
    """`finpipe stack up` in a throwaway folder (the CLI in a child process, as a user runs
    it); `finpipe stack down` when the block ends, failing if a process of it is left."""
    from finpipe.services.stack import StackFolder, read_env_file

    root = Path(tempfile.mkdtemp(prefix="finpipe-stack-"))
    command = [sys.executable, "-m", "finpipe.cli", "stack"]
    began = time.monotonic()
    up = subprocess.run(
        [*command, "up", "--dir", str(root)], capture_output=True, text=True, timeout=300
    )
    seconds = time.monotonic() - began
    try:
        if up.returncode != 0:
            raise RuntimeError(f"finpipe stack up failed:\n{up.stdout}\n{up.stderr}")
        values = read_env_file(StackFolder(root).env_file)
        yield TeamStack(root, values, seconds, up.stdout + up.stderr)
    finally:
        down = subprocess.run(
            [*command, "down", "--dir", str(root)], capture_output=True, text=True, timeout=180
        )
        left = stack_processes(root)
        for pid in left:  # never leave a server behind, even when the check below fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        shutil.rmtree(root, ignore_errors=True)
        if down.returncode != 0 or left:
            raise RuntimeError(
                f"finpipe stack down left {sorted(left.values())} (exit {down.returncode}):\n"
                f"{down.stdout}\n{down.stderr}"
            )
