"""Locks that stop two runs from writing the same data at once (on one machine).

Two kinds of resource per domain:

- a date (`date=YYYY-MM-DD`): held while a run scores that date and records it complete, so a
  nightly run and a backfill (or two backfills) never interleave writes to one date;
- the domain's history (`history`): held while validated data or features change (ingest,
  feature updates). Features at t are computed from every earlier validated row, so a late
  delivery for one date changes the features of all later dates: the whole layer is one
  resource, not one per date.

A lock is an OS file lock (flock) on `state/locks/<domain>/<resource>.lock` under the storage
root. Every writer on the machine honours it, whether it runs under Prefect, the CLI or plain
Python, and the kernel releases it when its holder dies, so a crash never leaves a stale lock.
Beside it, `<resource>.holder.json` names the latest holder (run name, pid, host, since): what
a waiting run reports. Hold one lock at a time (never ask for a second while holding one): then
two runs can never deadlock.

File locks coordinate processes that share one filesystem. Runs on several machines against
object storage need a shared lock service instead (a Prefect global concurrency limit, or the
database); the resources and the one-at-a-time rule stay the same.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from finpipe.errors import FinpipeError
from finpipe.storage import as_day, check_name, write_json_atomic

HISTORY = "history"
DEFAULT_TIMEOUT_SECONDS = 3600.0


class LockTimeout(FinpipeError):
    """Another run held a lock for longer than this run was willing to wait."""

    def __init__(self, message: str, waited_seconds: float = 0.0) -> None:
        super().__init__(message)
        self.waited_seconds = waited_seconds

    def __reduce__(self):  # picklable with its figure, as Prefect may pickle task errors
        return (type(self), (str(self), self.waited_seconds))


def date_resource(day: dt.date | str) -> str:
    """Return the lock resource name of one date, e.g. `date=2024-01-02`."""
    return f"date={as_day(day).isoformat()}"


def lock_path(root: Path, domain: str, resource: str) -> Path:
    """Return the lock file of `resource` in `domain` under the storage root."""
    if resource != HISTORY and not resource.startswith("date="):
        raise ValueError(f"unknown lock resource {resource!r}; use {HISTORY!r} or date_resource()")
    return Path(root) / "state" / "locks" / check_name(domain) / f"{resource}.lock"


def _holder_path(lock_file: Path) -> Path:
    return lock_file.with_name(f"{lock_file.stem}.holder.json")


def read_holder(root: Path, domain: str, resource: str) -> dict | None:
    """Return who holds (or last held) `resource`: holder, pid, host, since; None if unknown."""
    try:
        return json.loads(_holder_path(lock_path(root, domain, resource)).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def describe_holder(holder: dict | None) -> str:
    """Return a holder record as words for a log line or an error message."""
    if not holder:
        return "another run"
    return (
        f"{holder.get('holder') or 'a run'} (pid {holder.get('pid')} on {holder.get('host')}, "
        f"since {holder.get('since')})"
    )


@contextmanager
def hold(
    root: Path,
    domain: str,
    resource: str,
    *,
    holder: str = "",
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the lock on `resource` of `domain` for the block; wait up to `timeout` seconds for it.

    `holder` names this run in the holder file (what a waiting run reports). `on_wait` receives
    one message when the lock is busy and this run starts waiting. Raises LockTimeout, naming
    the holder, if the lock is still busy after `timeout` seconds.
    """
    path = lock_path(root, domain, resource)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    what = f"{domain} {resource.removeprefix('date=')}"
    started = time.monotonic()
    try:
        lock.acquire(blocking=False)
    except Timeout:
        busy = describe_holder(read_holder(root, domain, resource))
        if on_wait is not None:
            on_wait(f"waiting for the lock on {what}: held by {busy}")
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            waited = time.monotonic() - started
            raise LockTimeout(
                f"{what} is locked by {describe_holder(read_holder(root, domain, resource))}; "
                f"gave up after {waited:.0f} s. Let that run finish, then run this again "
                f"(lock file {path})",
                waited_seconds=waited,
            ) from None
    try:
        write_json_atomic(
            _holder_path(path),
            {
                "holder": holder or f"pid {os.getpid()}",
                "pid": os.getpid(),
                "thread": threading.current_thread().name,
                "host": socket.gethostname(),
                "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
        )
    except BaseException:
        lock.release()
        raise
    try:
        yield
    finally:
        lock.release()


def partition_lock(
    root: Path, domain: str, day: dt.date | str, **options
) -> AbstractContextManager[None]:
    """Hold the lock of one date of `domain` (see `hold` for the options)."""
    return hold(root, domain, date_resource(day), **options)


def history_lock(root: Path, domain: str, **options) -> AbstractContextManager[None]:
    """Hold the lock of `domain`'s validated data and features (see `hold` for the options)."""
    return hold(root, domain, HISTORY, **options)
