"""Postgres advisory locks: the lock backend of runs on several machines (`finpipe.locks`).

The resources and the one-lock-at-a-time rule are the file locks' (see `finpipe.locks`); only
where the lock lives changes. Each lock is a session-level `pg_advisory_lock` on a 64-bit hash
of `<domain>/<resource>`, held on a connection of its own for the block, in the database of
`FINPIPE_LOCKS_URL` (one database per storage root: advisory locks are per database).

- Waiting: one `pg_try_advisory_lock` first (so a busy lock is reported at once, naming its
  holder), then a blocking `pg_advisory_lock` bounded by `lock_timeout`: waiters are woken by
  the server in turn, no polling.
- The holder is named in the connection's `application_name` (`<holder> pid=<pid>
  host=<host>`, 63 characters at most), so a waiting run reads who holds the lock from
  `pg_locks` and `pg_stat_activity` (same role, or one with pg_read_all_stats).
- A holder that dies releases its lock: the server ends the session when the connection
  closes (a killed process at once; a lost machine after the server's TCP keepalives give up,
  about a minute with `PostgresServer`'s settings). The session must be a real one: not behind
  a pooler in transaction mode.
- A lock found lost when the block ends (the server restarted, the network dropped the
  session) raises LockLost: another run may have written the same data meanwhile.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from urllib.parse import unquote, urlsplit

from finpipe.errors import FinpipeError

log = logging.getLogger("finpipe.pg_locks")

_APPLICATION_NAME_MAX = 63  # NAMEDATALEN - 1
_MAX_LOCK_TIMEOUT_MS = 2**31 - 1  # lock_timeout is an int of milliseconds
_HOLDER_PATTERN = re.compile(r"^(?P<holder>.*) pid=(?P<pid>\d+) host=(?P<host>\S*)$")
# The session that holds an advisory lock on the 64-bit key (classid: high half, objid: low
# half, objsubid 1 for the bigint form), in this database, with its application_name.
_HOLDER_QUERY = """
SELECT a.application_name, a.pid, a.state_change
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::int8 = %s AND l.objid::int8 = %s
"""


class LockUnavailable(FinpipeError):
    """The lock database cannot be reached: worth retrying once it is back."""

    transient = True


class LockLost(FinpipeError):
    """A held lock was lost before its block ended (the lock database's session closed)."""

    transient = True


def lock_key(domain: str, resource: str) -> int:
    """Return the signed 64-bit advisory-lock key of `<domain>/<resource>` (BLAKE2b)."""
    digest = hashlib.blake2b(f"{domain}/{resource}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def application_name(holder: str, pid: int | None = None, host: str | None = None) -> str:
    """Return `<holder> pid=<pid> host=<host>` in printable ASCII, cut to 63 characters (the
    holder keeps at least 40 of them, the host what is left)."""
    pid = os.getpid() if pid is None else pid
    host = socket.gethostname() if host is None else host
    ascii_only = re.sub(r"[^\x20-\x7e]", "?", holder or f"pid {pid}")
    host = re.sub(r"[^\x21-\x7e]", "?", host)
    suffix = f" pid={pid} host={host}"
    room = max(40, _APPLICATION_NAME_MAX - len(suffix))
    return (ascii_only[:room] + suffix)[:_APPLICATION_NAME_MAX]


def parse_application_name(name: str) -> dict[str, str | int | None]:
    """Return holder, pid and host from an `application_name` this module set."""
    found = _HOLDER_PATTERN.match(name or "")
    if not found:
        return {"holder": name or None, "pid": None, "host": None}
    return {"holder": found["holder"], "pid": int(found["pid"]), "host": found["host"] or None}


def redact(url: str, message: str) -> str:
    """Return `message` with the password of `url` masked (and any `password=...`)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    for secret in filter(None, {password, unquote(password or "")}):
        message = message.replace(secret, "***")
    return _KEY_VALUE_PASSWORD.sub(r"\1***", message)


_KEY_VALUE_PASSWORD = re.compile(r"(password\s*=\s*)\S+", re.IGNORECASE)


def where(url: str) -> str:
    """Return `host:port/database` of `url`, for messages (no user, no password)."""
    try:
        parts = urlsplit(url)
        if parts.hostname:
            return f"{parts.hostname}:{parts.port or 5432}{parts.path}"
    except ValueError:
        pass
    return "the lock database"


def connect(url: str, name: str):
    """Open an autocommit session for one lock, named `name`, that no server-side timeout
    ends while it holds the lock (statement, idle-session timeouts off)."""
    import psycopg

    try:
        return psycopg.connect(
            url,
            autocommit=True,
            application_name=name,
            connect_timeout=10,
            options="-c statement_timeout=0 -c idle_session_timeout=0",
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
    except psycopg.Error as error:
        raise LockUnavailable(
            f"cannot reach the lock database at {where(url)}: "
            f"{redact(url, str(error).strip().splitlines()[0] if str(error) else repr(error))}"
        ) from None


def read_holder(connection, key: int) -> dict | None:
    """Return the holder of advisory lock `key` (holder, pid, host, since), None if free."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    row = connection.execute(_HOLDER_QUERY, (unsigned >> 32, unsigned & 0xFFFF_FFFF)).fetchone()
    if row is None:
        return None
    name, backend_pid, since = row
    found = parse_application_name(name)
    if isinstance(since, dt.datetime):
        found["since"] = since.astimezone(dt.UTC).isoformat(timespec="seconds")
    found["backend_pid"] = backend_pid
    return found


def read_holder_at(url: str, domain: str, resource: str) -> dict | None:
    """Return who holds `resource` of `domain` now in the lock database at `url`."""
    with connect(url, "finpipe lock reader") as connection:
        return read_holder(connection, lock_key(domain, resource))


@contextlib.contextmanager
def hold_advisory(
    url: str,
    domain: str,
    resource: str,
    *,
    holder: str,
    timeout: float,
    on_wait: Callable[[str], None] | None,
    describe: Callable[[dict | None], str],
    timeout_error: Callable[[str, float], Exception],
) -> Iterator[None]:
    """Hold the advisory lock of `resource` of `domain` for the block (see `finpipe.locks.hold`).

    `describe` words a holder record; `timeout_error(message, waited)` builds the error raised
    when the lock is still busy after `timeout` seconds.
    """
    import psycopg

    key = lock_key(domain, resource)
    what = f"{domain} {resource.removeprefix('date=')}"
    started = time.monotonic()
    connection = connect(url, application_name(holder))
    try:
        got = connection.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
        if not got:
            if on_wait is not None:
                on_wait(
                    f"waiting for the lock on {what}: held by {describe(_holder(connection, key))}"
                )
            got = timeout > 0 and _wait(connection, key, timeout)
        if not got:
            waited = time.monotonic() - started
            raise timeout_error(
                f"{what} is locked by {describe(_holder(connection, key))}; gave up after "
                f"{waited:.0f} s. Let that run finish, then run this again (advisory lock "
                f"{domain}/{resource} in {where(url)})",
                waited,
            )
    except psycopg.Error as error:
        connection.close()
        raise LockUnavailable(
            f"the lock database at {where(url)} failed while {what} was being locked: "
            f"{redact(url, str(error).strip())}"
        ) from None
    except BaseException:
        connection.close()
        raise
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        _release(connection, key, url, what, failed)


def _holder(connection, key: int) -> dict | None:
    try:
        return read_holder(connection, key)
    except Exception as error:  # naming the holder is a courtesy: never fail the lock over it
        log.debug("could not read the holder of lock %d: %s", key, error)
        return None


def _wait(connection, key: int, timeout: float) -> bool:
    """Block in `pg_advisory_lock` up to `timeout` seconds; return whether the lock was got."""
    import psycopg

    # lock_timeout holds about 24.8 days at most: a longer (or infinite) timeout waits that long.
    milliseconds = max(1, math.ceil(min(timeout * 1000, _MAX_LOCK_TIMEOUT_MS)))
    connection.execute("SELECT set_config('lock_timeout', %s, false)", (f"{milliseconds}ms",))
    try:
        connection.execute("SELECT pg_advisory_lock(%s)", (key,))
    except psycopg.errors.LockNotAvailable:
        return False
    finally:
        with contextlib.suppress(psycopg.Error):
            connection.execute("SELECT set_config('lock_timeout', '0', false)")
    return True


def _release(connection, key: int, url: str, what: str, failed: bool) -> None:
    """Unlock and close; raise LockLost if the lock was no longer held (unless the block
    already failed: then only log it, and let the block's own error through)."""
    import psycopg

    try:
        released = connection.execute("SELECT pg_advisory_unlock(%s)", (key,)).fetchone()[0]
        cause = "" if released else "the session no longer held it"
    except psycopg.Error as error:
        cause = redact(url, str(error).strip().splitlines()[0] if str(error) else repr(error))
    finally:
        connection.close()
    if not cause:
        return
    message = (
        f"the lock on {what} was lost before the work under it ended ({cause}): another run "
        f"may have written the same data; run this again (lock database {where(url)})"
    )
    if failed:
        log.warning(message)
        return
    raise LockLost(message)
