"""The team stack's pieces for tests: one real PostgreSQL server per test session.

`tests/conftest.py` exposes it as the session fixture `postgres` (a running PostgresServer);
each test module that needs a database of its own makes one with `new_database`. The server
runs without fsync (a test cluster is thrown away), on a free port of 127.0.0.1, with a
random password, in a throwaway folder the `postgres` user can reach when tests run as root.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import tempfile
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
