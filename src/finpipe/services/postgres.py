"""A real PostgreSQL server run as a plain local process: the database of the team stack.

`PostgresServer(data_dir, port, password)` creates a cluster in `data_dir` the first time
(`initdb`, superuser `finpipe` with that password, SCRAM authentication), starts `postgres`
listening on 127.0.0.1 only, with its unix socket inside `data_dir`, and waits until it accepts
connections; `stop()` asks for a fast shutdown (SIGINT) and waits. Use it as a context manager:

    with PostgresServer(Path("/srv/finpipe/pg"), 5433, password) as pg:
        pg.create_database("mlflow")
        url = pg.dsn("mlflow", driver="postgresql+psycopg2")

Postgres refuses to run as root: when this process is root, `initdb` and `postgres` run as
the `postgres` user on a data folder owned by it (the folder and its parents must be
reachable by that user). The binaries are Debian's `postgresql-15` (`/usr/lib/postgresql/15/bin`,
or `initdb` and `postgres` on PATH). The password never appears in logs, errors or `repr`.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from finpipe.errors import FinpipeError
from finpipe.services.processes import ChildServer, escalation

log = logging.getLogger("finpipe.services.postgres")

SUPERUSER = "finpipe"
DEFAULT_DATABASE = "finpipe"
SYSTEM_USER = "postgres"  # who runs the server when this process is root
BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"),)
# A dead client machine (not just a dead process) is noticed within about a minute, so an
# advisory lock its run held is released: keepalive after 30 s idle, 3 probes 10 s apart.
SERVER_DEFAULTS = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}
_SOCKET_PATH_MAX = 100  # unix socket paths are limited to 107 bytes (`.s.PGSQL.<port>` included)


class PostgresError(FinpipeError):
    """The local PostgreSQL server cannot be installed, started or reached."""


def find_bin_dir(bin_dir: Path | None = None) -> Path:
    """Return the folder holding `initdb` and `postgres`; raise PostgresError if none does."""
    candidates = [Path(bin_dir)] if bin_dir else list(BIN_DIRS)
    if bin_dir is None and (on_path := shutil.which("postgres")):
        candidates.append(Path(os.path.realpath(on_path)).parent)
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return folder
    where = ", ".join(str(c) for c in candidates)
    raise PostgresError(
        f"PostgreSQL 15 is not installed (no initdb and postgres in {where} or on PATH): "
        "install it with `apt-get install postgresql-15` (Debian/Ubuntu), or pass bin_dir"
    )


class PostgresServer(ChildServer):
    """One PostgreSQL cluster in `data_dir`, served on 127.0.0.1:`port` (see the module doc)."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        password: str,
        *,
        bin_dir: Path | None = None,
        log_file: Path | None = None,
        config: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        if not password:
            raise ValueError("PostgresServer needs a non-empty password for its superuser")
        self.data_dir = Path(data_dir).absolute()
        self.port = int(port)
        self.host = "127.0.0.1"
        self.user = SUPERUSER
        self._password = password
        self._bin_dir = bin_dir
        self.log_file = (
            Path(log_file) if log_file else self.data_dir.with_name(f"{self.data_dir.name}.log")
        )
        self.config = {**SERVER_DEFAULTS, **(config or {})}
        self.start_timeout = start_timeout
        self._process: subprocess.Popen | None = None

    def __repr__(self) -> str:  # no password
        state = "running" if self.running else "stopped"
        return f"PostgresServer({str(self.data_dir)!r}, port={self.port}, {state})"

    # -- addresses ---------------------------------------------------------------------------
    def dsn(self, database: str = DEFAULT_DATABASE, driver: str = "postgresql") -> str:
        """Return the URL of `database` for `driver`, e.g. `postgresql+asyncpg` (Prefect),
        `postgresql+psycopg2` (MLflow) or plain `postgresql` (psycopg, finpipe's locks).

        It carries the password: pass it to the process that connects, never to a log.
        """
        secret = quote(self._password, safe="")
        return f"{driver}://{self.user}:{secret}@{self.host}:{self.port}/{quote(database)}"

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> PostgresServer:
        """Create the cluster if `data_dir` is empty, start the server, wait until it answers,
        and create the `finpipe` database if it is missing."""
        if self.running:
            return self
        bin_dir = find_bin_dir(self._bin_dir)
        as_root = os.geteuid() == 0
        self._prepare_data_dir(as_root)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, as_root)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for name, value in self._server_settings().items():
            argv += ["-c", f"{name}={value}"]
        with open(self.log_file, "ab") as output:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is the caller's to handle
                **_run_as_postgres(as_root),
            )
        log.info(
            "PostgreSQL starting on %s:%d (pid %d, data %s)",
            self.host,
            self.port,
            self._process.pid,
            self.data_dir,
        )
        try:
            self._wait_until_ready()
            self.create_database(DEFAULT_DATABASE)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: open sessions are ended, then a clean checkpoint); wait for
        it, escalating to an immediate shutdown (SIGQUIT) and then SIGKILL if it hangs."""
        if self._stop_child(escalation(signal.SIGINT, timeout, signal.SIGQUIT), "PostgreSQL"):
            log.info("PostgreSQL on port %d stopped", self.port)

    # -- databases ---------------------------------------------------------------------------
    def connect(self, database: str = "postgres", **options):
        """Return a psycopg connection (autocommit) to `database` as the superuser."""
        psycopg = _psycopg()
        try:
            return psycopg.connect(self.dsn(database), autocommit=True, **options)
        except psycopg.OperationalError as error:
            raise PostgresError(
                f"cannot connect to PostgreSQL on {self.host}:{self.port} as {self.user}: "
                f"{_first_line(error)}"
            ) from None

    def create_database(self, name: str) -> None:
        """Create database `name` owned by the superuser, unless it exists."""
        from psycopg import sql

        with self.connect(connect_timeout=10) as connection:
            found = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if found.fetchone() is None:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                log.info("created database %s", name)

    # -- internals ---------------------------------------------------------------------------
    def _server_settings(self) -> dict[str, str]:
        socket_dir = str(self.data_dir)
        if len(f"{socket_dir}/.s.PGSQL.{self.port}") > _SOCKET_PATH_MAX:
            socket_dir = ""  # too long for a unix socket: TCP only (all finpipe uses)
        return {
            "listen_addresses": self.host,
            "unix_socket_directories": socket_dir,
            **self.config,
        }

    def _prepare_data_dir(self, as_root: bool) -> None:
        folder = self.data_dir
        if folder.exists() and any(folder.iterdir()) and not (folder / "PG_VERSION").exists():
            raise PostgresError(
                f"{folder} is neither empty nor a PostgreSQL data folder: give PostgresServer "
                "an empty (or new) folder"
            )
        folder.mkdir(parents=True, exist_ok=True)
        if not as_root:
            return
        account = pwd.getpwnam(SYSTEM_USER) if _has_user(SYSTEM_USER) else None
        if account is None:
            raise PostgresError(
                f"running as root, PostgreSQL needs the `{SYSTEM_USER}` user to run as: "
                "install postgresql-15 (it creates the user) or run finpipe as another user"
            )
        if folder.stat().st_uid != account.pw_uid:
            if (folder / "PG_VERSION").exists():
                raise PostgresError(
                    f"{folder} holds a cluster not owned by {SYSTEM_USER}: chown -R it to "
                    f"{SYSTEM_USER} or start from an empty folder"
                )
            os.chown(folder, account.pw_uid, account.pw_gid)
        reachable = subprocess.run(
            ["test", "-r", str(folder), "-a", "-w", str(folder), "-a", "-x", str(folder)],
            check=False,
            **_run_as_postgres(True),
        )
        if reachable.returncode != 0:
            raise PostgresError(
                f"the {SYSTEM_USER} user cannot reach {folder}: one of its parent folders is "
                f"closed to other users (e.g. mode 0700); put the data folder where "
                f"{SYSTEM_USER} can enter every parent (chmod o+x on them)"
            )

    def _initdb(self, bin_dir: Path, as_root: bool) -> None:
        with tempfile.TemporaryDirectory(prefix="finpipe-pg-") as scratch:
            pwfile = Path(scratch) / "password"
            pwfile.write_text(self._password + "\n")
            pwfile.chmod(0o600)
            if as_root:
                account = pwd.getpwnam(SYSTEM_USER)
                for path in (Path(scratch), pwfile):
                    os.chown(path, account.pw_uid, account.pw_gid)
            argv = [
                str(bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ]
            log.info("initdb %s (superuser %s)", self.data_dir, self.user)
            done = subprocess.run(
                argv, capture_output=True, text=True, check=False, **_run_as_postgres(as_root)
            )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).replace(self._password, "***")
            raise PostgresError(f"initdb failed in {self.data_dir}:\n{output[-2000:]}")

    def _wait_until_ready(self) -> None:
        psycopg = _psycopg()
        deadline = time.monotonic() + self.start_timeout
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                raise PostgresError(
                    f"PostgreSQL exited while starting on port {self.port}:\n{self._log_tail()}"
                )
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as error:
                if "password authentication failed" in str(error):
                    raise PostgresError(
                        f"PostgreSQL in {self.data_dir} refused the password for {self.user}: "
                        "the folder was created with another password"
                    ) from None
                if time.monotonic() > deadline:
                    raise PostgresError(
                        f"PostgreSQL did not accept connections on port {self.port} within "
                        f"{self.start_timeout:.0f} s:\n{self._log_tail()}"
                    ) from None
            time.sleep(0.2)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]).replace(self._password, "***")


def _run_as_postgres(as_root: bool) -> dict:
    """Popen/run options that drop root to the `postgres` user (no extra groups)."""
    if not as_root:
        return {}
    account = pwd.getpwnam(SYSTEM_USER)
    return {
        "user": account.pw_uid,
        "group": account.pw_gid,
        "extra_groups": [],
        "env": {**os.environ, "HOME": account.pw_dir, "USER": SYSTEM_USER},
        "cwd": "/",
    }


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise PostgresError(
            "the team stack needs psycopg 3: pip install 'finpipe[team]' (or 'psycopg[binary]')"
        ) from None
    return psycopg


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
