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

File locks coordinate processes that share one filesystem. Runs on several machines (workers
on several hosts, data in object storage) use Postgres advisory locks instead: set
`FINPIPE_LOCKS_URL` to a `postgresql://` database (`finpipe.pg_locks`); empty keeps the file
locks. The resources, the holder named to a waiting run, the timeout and the one-at-a-time rule
are the same on both, and `hold`, `partition_lock` and `history_lock` pick the backend.

The one-at-a-time rule is enforced per thread and run: while a thread holds a lock for a run
(its `holder`), asking to wait for another for the same run raises LockOrderError at once.
Trying one with `timeout=0` is allowed (it never waits, so it cannot deadlock), and so is a
lock for another holder: a test or a notebook standing in for a second run.
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

from finpipe.errors import ConfigError, FinpipeError
from finpipe.storage import as_day, check_name, is_store_url, write_json_atomic

HISTORY = "history"
CHAMPION = "champion"  # the registered model's champion alias: one promotion at a time
DEFAULT_TIMEOUT_SECONDS = 3600.0


class LockOrderError(FinpipeError):
    """A thread holding a lock for a run asked to wait for a second one for the same run: a bug
    in the caller (it could deadlock), never retried."""


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


def check_resource(resource: str) -> str:
    """Return `resource` if it is one finpipe locks (`history`, `champion` or a date's); else
    ValueError."""
    if resource not in (HISTORY, CHAMPION) and not resource.startswith("date="):
        raise ValueError(
            f"unknown lock resource {resource!r}; use {HISTORY!r}, {CHAMPION!r} or date_resource()"
        )
    return resource


def lock_path(root: Path | str, domain: str, resource: str) -> Path:
    """Return the lock file of `resource` in `domain` under the storage root (a local folder)."""
    check_lock_backend(root, "")
    return Path(root) / "state" / "locks" / check_name(domain) / f"{check_resource(resource)}.lock"


def check_lock_backend(root: Path | str, locks_url: str) -> None:
    """Raise ConfigError when the storage root is an object store and no lock database is set:
    file locks hold only between processes on one machine, and a store in a bucket is for
    several."""
    if is_store_url(root) and not locks_url:
        raise ConfigError(
            f"FINPIPE_HOME is an object store ({root}), and file locks only work between "
            "processes on one machine: set FINPIPE_LOCKS_URL to a postgresql:// database so "
            "that runs on every machine take Postgres advisory locks"
        )


def configured_locks_url() -> str:
    """Return FINPIPE_LOCKS_URL as set now: empty for file locks, else the lock database."""
    from finpipe.settings import load_settings

    return load_settings().locks_url.get_secret_value()


def held_locks(holder: str | None = None) -> tuple[str, ...]:
    """Return the locks this thread holds now (for `holder`, or for any run when None), as
    `<domain>/<resource>`, oldest first."""
    held: list[tuple[str, str]] = getattr(_held, "locks", [])
    return tuple(name for name, by in held if holder is None or by == holder)


_held = threading.local()


def _holder_path(lock_file: Path) -> Path:
    return lock_file.with_name(f"{lock_file.stem}.holder.json")


def read_holder(
    root: Path | str, domain: str, resource: str, *, locks_url: str | None = None
) -> dict | None:
    """Return who holds (or last held) `resource`: holder, pid, host, since; None if unknown.

    With advisory locks (`locks_url`, default FINPIPE_LOCKS_URL) only a current holder is known.
    """
    url = configured_locks_url() if locks_url is None else locks_url
    if url:
        from finpipe.pg_locks import read_holder_at

        return read_holder_at(url, check_name(domain), check_resource(resource))
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
    root: Path | str,
    domain: str,
    resource: str,
    *,
    holder: str = "",
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    on_wait: Callable[[str], None] | None = None,
    locks_url: str | None = None,
) -> Iterator[None]:
    """Hold the lock on `resource` of `domain` for the block; wait up to `timeout` seconds for it.

    `holder` names this run to a waiting one. `on_wait` receives one message when the lock is
    busy and this run starts waiting. Raises LockTimeout, naming the holder, if the lock is
    still busy after `timeout` seconds (0: try once, never wait). `locks_url` chooses the
    backend (default FINPIPE_LOCKS_URL): empty, a file lock under `root`; a `postgresql://`
    URL, an advisory lock in that database. Raises LockOrderError if this thread already holds
    a lock for the same `holder` and `timeout` is not 0.
    """
    name = f"{check_name(domain)}/{check_resource(resource)}"
    holding = held_locks(holder)
    if holding and timeout > 0:
        raise LockOrderError(
            f"{holder or 'this run'} holds the lock on {holding[-1]} and asked to wait for "
            f"{name} in the same thread: hold one lock at a time (release the first), or only "
            "try the second (timeout=0)"
        )
    url = configured_locks_url() if locks_url is None else locks_url
    check_lock_backend(root, url)
    if url:
        from finpipe.pg_locks import hold_advisory

        backend = hold_advisory(
            url,
            domain,
            resource,
            holder=holder,
            timeout=timeout,
            on_wait=on_wait,
            describe=describe_holder,
            timeout_error=LockTimeout,
        )
    else:
        backend = _hold_file(root, domain, resource, holder, timeout, on_wait)
    with backend:
        held = _held.__dict__.setdefault("locks", [])
        held.append((name, holder))
        try:
            yield
        finally:
            held.remove((name, holder))


@contextmanager
def _hold_file(
    root: Path | str,
    domain: str,
    resource: str,
    holder: str,
    timeout: float,
    on_wait: Callable[[str], None] | None,
) -> Iterator[None]:
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
    root: Path | str, domain: str, day: dt.date | str, **options
) -> AbstractContextManager[None]:
    """Hold the lock of one date of `domain` (see `hold` for the options)."""
    return hold(root, domain, date_resource(day), **options)


def history_lock(root: Path | str, domain: str, **options) -> AbstractContextManager[None]:
    """Hold the lock of `domain`'s validated data and features (see `hold` for the options)."""
    return hold(root, domain, HISTORY, **options)


def champion_lock(root: Path | str, domain: str, **options) -> AbstractContextManager[None]:
    """Hold the lock of `domain`'s champion alias (see `hold` for the options): a promotion
    reads the champion, scores it against the challenger and moves the alias under it, so a
    second promotion compares its challenger with the champion the first one left."""
    return hold(root, domain, CHAMPION, **options)
