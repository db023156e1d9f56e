"""Cross-machine locks on a real PostgreSQL server (finpipe.pg_locks behind finpipe.locks), and
the server process itself (finpipe.services.postgres)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from finpipe import pg_locks
from finpipe.locks import (
    LockTimeout,
    date_resource,
    held_locks,
    history_lock,
    partition_lock,
    read_holder,
)
from finpipe.pg_locks import LockLost, LockUnavailable, application_name, lock_key
from finpipe.services.postgres import PostgresError, PostgresServer
from tests.servers import free_port
from tests.team_fixtures import new_database
from tests.test_locks import check_one_lock_at_a_time

# A wait that never times out (a lock_timeout that did not apply) fails the test, not the run.
pytestmark = pytest.mark.timeout(300)

DAY = "2024-01-02"
# A run in another process: takes the date lock of market DAY, says so, holds it until its
# stdin closes (or it is killed).
HOLDER_SCRIPT = """
import sys
from finpipe.locks import partition_lock

with partition_lock(sys.argv[1], "market", sys.argv[2], holder=sys.argv[3], timeout=30):
    print("held", flush=True)
    sys.stdin.read()
print("released", flush=True)
"""


@pytest.fixture(scope="module")
def locks_url(postgres) -> str:
    return new_database(postgres, "locks")


@pytest.fixture
def team_locks(locks_url, monkeypatch) -> str:
    """FINPIPE_LOCKS_URL set to the test database: every lock of the test is an advisory lock."""
    monkeypatch.setenv("FINPIPE_LOCKS_URL", locks_url)
    return locks_url


class Holder:
    """A lock holder in a child process, as a run on another machine would be."""

    def __init__(self, root: Path, url: str, name: str, day: str = DAY) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER_SCRIPT, str(root), day, name],
            env={**os.environ, "FINPIPE_LOCKS_URL": url},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline() if self.process.stdout else ""
        if line.strip() != "held":
            self.process.kill()
            raise AssertionError(f"holder did not take the lock: {self.process.stderr.read()}")

    def release(self) -> str:
        out, _ = self.process.communicate(input="", timeout=30)
        return out.strip()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()


@pytest.fixture
def holders():
    started: list[Holder] = []
    yield lambda *args, **kw: started.append(Holder(*args, **kw)) or started[-1]
    for holder in started:
        holder.close()


def _advisory_locks(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as connection:
        return connection.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()[0]


def test_the_server_listens_on_loopback_only_behind_its_password(postgres, tmp_path):
    with postgres.connect() as connection:
        assert connection.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        assert connection.execute("SHOW unix_socket_directories").fetchone()[0] in {
            str(postgres.data_dir),
            "",  # a path too long for a socket: TCP only
        }
        assert connection.execute("SHOW password_encryption").fetchone()[0] == "scram-sha-256"
    if os.geteuid() == 0:  # Postgres refuses root: the server runs as the postgres user
        status = Path(f"/proc/{postgres.pid}/status").read_text()
        uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        assert uid == str(Path(postgres.data_dir).stat().st_uid) != "0"
    secret = postgres.dsn().split(":")[2].split("@")[0]
    wrong = postgres.dsn().replace(f":{secret}@", ":not-the-password@")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)
    assert postgres.dsn("mlflow", driver="postgresql+psycopg2").startswith(
        "postgresql+psycopg2://finpipe:"
    )
    assert postgres.dsn().endswith(f"@127.0.0.1:{postgres.port}/finpipe")
    # The password shows nowhere but in the DSN: not in repr, the server log or an error.
    assert secret not in repr(postgres)
    assert secret not in postgres.log_file.read_text()
    stranger = PostgresServer(postgres.data_dir, postgres.port, "wrong-" + secret)
    with pytest.raises(PostgresError) as refused:
        stranger.connect()
    assert secret not in str(refused.value)


def test_a_second_process_waits_then_times_out_naming_the_holder(team_locks, tmp_path, holders):
    holder = holders(tmp_path, team_locks, "nightly-market-2024-01-02")
    waits: list[str] = []
    started = time.monotonic()
    with (
        pytest.raises(LockTimeout) as timed_out,
        partition_lock(tmp_path, "market", DAY, timeout=0.5, on_wait=waits.append),
    ):
        pass
    waited = time.monotonic() - started
    host = socket.gethostname()
    named = f"nightly-market-2024-01-02 (pid {holder.process.pid} on {host[:20]}"
    assert waits == [f"waiting for the lock on market {DAY}: held by {waits[0].split('by ')[1]}"]
    assert named in waits[0]
    assert str(timed_out.value).startswith(f"market {DAY} is locked by {named}")
    assert 0.5 <= timed_out.value.waited_seconds <= waited < 5
    assert read_holder(tmp_path, "market", date_resource(DAY))["pid"] == holder.process.pid
    # Nothing was written under the storage root: the lock lives in the database.
    assert not (tmp_path / "state").exists()
    # Another date and the history are other resources: free while the date is held.
    with partition_lock(tmp_path, "market", "2024-01-03", timeout=0):
        pass
    with history_lock(tmp_path, "market", timeout=0):
        pass
    # A waiter with time to spare gets the lock as soon as the holder lets go.
    with _released_soon(holder):
        started = time.monotonic()
        with partition_lock(tmp_path, "market", DAY, timeout=30, holder="backfill"):
            got_after = time.monotonic() - started
            assert read_holder(tmp_path, "market", date_resource(DAY))["holder"] == "backfill"
    assert got_after < 5
    assert _advisory_locks(team_locks) == 0


@contextlib.contextmanager
def _released_soon(holder: Holder):
    """Release `holder` 0.3 s into the block, from a thread, while the test waits for the lock."""
    outcome: list[str] = []
    timer = threading.Timer(0.3, lambda: outcome.append(holder.release()))
    timer.start()
    yield
    timer.join(timeout=30)
    assert outcome == ["released"]


def test_a_killed_holder_frees_its_lock_at_once(team_locks, tmp_path, holders):
    holder = holders(tmp_path, team_locks, "a nightly about to die")
    with (
        pytest.raises(LockTimeout, match="locked by a nightly about to die"),
        partition_lock(tmp_path, "market", DAY, timeout=0),
    ):
        pass
    holder.kill()
    started = time.monotonic()
    with partition_lock(tmp_path, "market", DAY, timeout=10, holder="the re-run"):
        freed_after = time.monotonic() - started
    assert freed_after < 2, f"the lock took {freed_after:.1f} s to come free"


def test_one_lock_at_a_time_on_postgres(locks_url, tmp_path):
    check_one_lock_at_a_time(tmp_path, locks_url)


def test_the_setting_selects_the_backend(locks_url, tmp_path, monkeypatch):
    monkeypatch.setenv("FINPIPE_LOCKS_URL", "")
    with partition_lock(tmp_path, "credit", DAY, holder="file run"):
        assert (tmp_path / "state" / "locks" / "credit" / f"date={DAY}.lock").exists()
        assert _advisory_locks(locks_url) == 0
    monkeypatch.setenv("FINPIPE_LOCKS_URL", locks_url)
    with partition_lock(tmp_path / "other", "credit", DAY, holder="team run"):
        assert not (tmp_path / "other").exists()
        assert _advisory_locks(locks_url) == 1
        assert read_holder(tmp_path, "credit", date_resource(DAY))["holder"] == "team run"
    assert _advisory_locks(locks_url) == 0


def test_a_lock_lost_while_held_is_reported_and_credentials_stay_out_of_errors(
    postgres, locks_url, tmp_path
):
    with (
        pytest.raises(LockLost, match="lost before the work under it ended"),
        partition_lock(tmp_path, "market", DAY, holder="short-lived", locks_url=locks_url),
        postgres.connect() as admin,  # the session dies under the holder
    ):
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name("short-lived"),),
        )
    assert held_locks() == ()
    secret = locks_url.split(":")[2].split("@")[0]
    closed = locks_url.replace(f":{postgres.port}/", f":{free_port()}/")
    with (
        pytest.raises(LockUnavailable, match="cannot reach the lock database") as unreachable,
        partition_lock(tmp_path, "market", DAY, locks_url=closed),
    ):
        pass
    assert secret not in str(unreachable.value)


def test_holder_names_fit_postgres_and_keys_are_stable():
    name = application_name("nightly-market-2024-01-02", pid=123456, host="h" * 80)
    assert len(name) == 63 and name.startswith("nightly-market-2024-01-02 pid=123456 host=hhh")
    cut = application_name("x" * 80, pid=123456, host="a-rather-long-host-name.example.internal")
    assert (
        len(cut) == 63
        and cut.endswith(" pid=123456 host=a-rath")
        and cut.startswith("x" * 40 + " ")
    )
    assert application_name("é" * 100, pid=1, host="x").startswith("?" * 40)
    # A run that gives no name is named by its pid, as the file locks name it.
    assert application_name("", pid=7, host="x") == "pid 7 pid=7 host=x"
    assert lock_key("market", "history") == lock_key("market", "history")
    assert lock_key("market", "history") != lock_key("credit", "history")
    assert -(2**63) <= lock_key("market", f"date={DAY}") < 2**63


@pytest.fixture
def lock_sessions(monkeypatch) -> list[psycopg.Connection]:
    """Every session `finpipe.pg_locks` opens for a lock, in order, as the test can reach it."""
    opened: list[psycopg.Connection] = []
    real_connect = pg_locks.connect

    def connect(url: str, name: str) -> psycopg.Connection:
        opened.append(real_connect(url, name))
        return opened[-1]

    monkeypatch.setattr(pg_locks, "connect", connect)
    return opened


def _wait_until_queued(url: str, waiters: int, unless: Callable[[], bool] = bool) -> None:
    """Return once `waiters` sessions are queued (not granted) on an advisory lock, or at once
    when `unless()` says a waiter already gave up."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not unless():
        with psycopg.connect(url, autocommit=True) as connection:
            queued = connection.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()[0]
        if queued >= waiters:
            return
        time.sleep(0.05)
    if not unless():
        raise AssertionError(f"{waiters} waiter(s) never queued on the lock")


def test_a_lock_its_session_no_longer_holds_at_the_end_of_the_block_is_reported_lost(
    locks_url, tmp_path, lock_sessions
):
    """The session is still open but lost the lock (as behind a pooler that reset it)."""
    with (
        pytest.raises(LockLost, match="the session no longer held it"),
        partition_lock(tmp_path, "market", DAY, holder="reset", locks_url=locks_url),
    ):
        lock_sessions[-1].execute("SELECT pg_advisory_unlock_all()")
    assert held_locks() == () and lock_sessions[-1].closed


def test_a_failing_block_whose_lock_was_lost_raises_its_own_error_and_logs_the_loss(
    locks_url, tmp_path, lock_sessions, caplog
):
    with (
        pytest.raises(ValueError, match="the work failed"),
        partition_lock(tmp_path, "market", DAY, holder="failing", locks_url=locks_url),
    ):
        lock_sessions[-1].execute("SELECT pg_advisory_unlock_all()")
        raise ValueError("the work failed")
    assert "lost before the work under it ended" in caplog.text
    assert held_locks() == ()


def test_a_run_that_gives_up_waiting_closes_its_session(
    team_locks, tmp_path, holders, lock_sessions
):
    holders(tmp_path, team_locks, "the holder")
    with pytest.raises(LockTimeout), partition_lock(tmp_path, "market", DAY, timeout=0):
        pass
    assert lock_sessions[0].closed


def test_the_holder_named_is_the_session_holding_the_lock_not_one_queued_for_it(
    team_locks, tmp_path, holders
):
    holders(tmp_path, team_locks, "the holder")
    key = lock_key("market", date_resource(DAY))
    waiters = [
        psycopg.connect(team_locks, autocommit=True, application_name=f"queued {n}")
        for n in range(3)
    ]

    def queue(waiter: psycopg.Connection) -> None:
        with contextlib.suppress(psycopg.errors.QueryCanceled):
            waiter.execute("SELECT pg_advisory_lock(%s)", (key,))

    threads = [threading.Thread(target=queue, args=(waiter,)) for waiter in waiters]
    for thread in threads:
        thread.start()
    try:
        _wait_until_queued(team_locks, len(waiters))
        assert read_holder(tmp_path, "market", date_resource(DAY))["holder"] == "the holder"
        # Postgres happens to list the granted row first: the query itself must skip the
        # queued sessions, whatever order pg_locks returns its rows in.
        unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
        with psycopg.connect(team_locks, autocommit=True) as reader:
            rows = reader.execute(
                pg_locks._HOLDER_QUERY, (unsigned >> 32, unsigned & 0xFFFF_FFFF)
            ).fetchall()
        assert [pg_locks.parse_application_name(row[0])["holder"] for row in rows] == ["the holder"]
    finally:
        for thread, waiter in zip(threads, waiters, strict=True):
            waiter.cancel()
            thread.join(timeout=30)
            waiter.close()


def test_a_lock_held_in_another_stores_lock_database_is_not_held_in_this_one(
    postgres, locks_url, tmp_path
):
    other = new_database(postgres, "otherlocks")
    with partition_lock(tmp_path / "other", "market", DAY, holder="other store", locks_url=other):
        assert read_holder(tmp_path, "market", date_resource(DAY), locks_url=locks_url) is None
        with partition_lock(tmp_path, "market", DAY, holder="this store", locks_url=locks_url):
            holder = read_holder(tmp_path, "market", date_resource(DAY), locks_url=locks_url)
            assert holder["holder"] == "this store"


def test_server_side_statement_timeouts_do_not_cut_a_wait_short(postgres, tmp_path, holders):
    """A lock database whose default statement_timeout is shorter than the wait: the waiter
    still waits its own timeout, then times out naming the holder (not LockUnavailable)."""
    url = new_database(postgres, "strict")
    with postgres.connect() as admin:
        admin.execute(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET statement_timeout = '50ms'")
    holders(tmp_path, url, "slow nightly")
    with (
        pytest.raises(LockTimeout, match="locked by slow nightly"),
        partition_lock(tmp_path, "market", DAY, timeout=0.5, locks_url=url),
    ):
        pass


def test_timeouts_beyond_postgres_lock_timeout_range_wait_for_the_lock(
    team_locks, tmp_path, holders
):
    """A timeout longer than Postgres' lock_timeout can hold (about 24.8 days), or infinite
    (FINPIPE_LOCK_TIMEOUT_SECONDS=inf, which the file locks take as 'wait for ever'), waits
    for the holder like any other."""
    holder = holders(tmp_path, team_locks, "the holder")
    outcomes: list[str] = []

    def wait(timeout: float) -> None:
        try:
            with partition_lock(tmp_path, "market", DAY, timeout=timeout, holder=f"{timeout}"):
                outcomes.append(f"got it after waiting up to {timeout}")
        except Exception as error:  # noqa: BLE001 - reported below
            outcomes.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=wait, args=(t,)) for t in (1e7, float("inf"))]
    for thread in threads:
        thread.start()
    _wait_until_queued(team_locks, 2, unless=lambda: bool(outcomes))
    assert holder.release() == "released"
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == [
        "got it after waiting up to 10000000.0",
        "got it after waiting up to inf",
    ]
