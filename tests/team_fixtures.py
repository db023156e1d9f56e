"""The team stack's pieces for tests: one real PostgreSQL server and one S3 server per session.

`tests/conftest.py` exposes them as the session fixtures `postgres` (a running PostgresServer)
and `s3_server` (an S3Endpoint; each test module or test makes a bucket with `new_bucket`);
each test module that needs a database of its own makes one with `new_database`. PostgreSQL
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
from finpipe.services.s3 import S3Server
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
class S3Endpoint:
    """A running S3-compatible server: its address and the AWS variables that reach it."""

    url: str
    access_key: str
    secret_key: str = dataclasses.field(repr=False)
    region: str = "us-east-1"

    def environment(self) -> dict[str, str]:
        """The standard AWS variables finpipe, boto3 and pyarrow read."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        """A boto3 client of the server, for a test to look at the bucket itself."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def new_bucket(self, purpose: str) -> str:
        """Create a bucket of its own for one test module or test; return its name."""
        name = f"{purpose}-{os.getpid()}-{next(_numbers)}".replace("_", "-").lower()
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in `bucket` under `prefix`, sorted."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(entry["Key"] for page in pages for entry in page.get("Contents", ()))


@contextlib.contextmanager
def running_s3() -> Iterator[S3Endpoint]:
    """Start the team stack's S3 server (SeaweedFS, `finpipe.services.s3`) on free ports of
    127.0.0.1 with a random secret; stop it and remove its folder when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix="finpipe-s3-"))
    endpoint_key, secret = "finpipe-test", secrets.token_urlsafe(18)
    server = S3Server(folder / "data", free_port(), endpoint_key, secret, bucket="finpipe-tests")
    try:
        server.start()
        yield S3Endpoint(server.endpoint_url, endpoint_key, secret)
    finally:
        # Its data is thrown away: no need to wait out a SIGTERM the filer may sit on (15 s).
        server.stop(timeout=2)
        shutil.rmtree(folder, ignore_errors=True)


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
