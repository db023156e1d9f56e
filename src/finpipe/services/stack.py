"""The team stack as plain local processes: `finpipe stack up` / `finpipe stack down`.

One folder holds a whole stack: PostgreSQL (databases for Prefect, MLflow, MLflow's users and
finpipe's locks), an S3 server (SeaweedFS) with the `finpipe` bucket, a Prefect server on
Postgres with basic auth, an MLflow tracking server on Postgres with its artifacts in the
bucket and MLflow's basic-auth app, a Dask scheduler with two single-thread workers (mutual
TLS: finpipe.services.tls), and a Prefect process worker on the `finpipe` pool. Every process
listens on 127.0.0.1 only. `up` registers finpipe's deployments on the pool (`finpipe stack
deploy`, compose's one-shot `deployments` job) and creates the automation that marks flow runs
whose machine died `Crashed` (finpipe.flows.zombies); the processes that run finpipe's steps
(the Prefect worker's flow runs, the Dask workers) read delivered files from the folder's
`drop/` only and keep their local files in `local/<process>`.

Credentials are generated on the first `up` (no password ships with finpipe) and kept in
`stack.env` (mode 0600) in the folder, with every other setting of the stack; `up` prints the
settings clients export with the secrets masked. The same names are the variables of
`deploy/docker-compose.yml`: `SERVICES` below is the one table both follow (a test compares
them), and the stack's env file can serve compose as its `--env-file`.

`down` stops the processes in the reverse order (the Prefect worker before its server) from
the pid files in `pids/`, each checked against the process's start time so a recycled pid is
never signalled. `stop_service`/`start_service` stop and restart one of them (fault tests).

What guards what on the loopback ports: Prefect's API (not the UI's static page, which asks
for the credentials) needs PREFECT_API_AUTH_STRING; MLflow (UI and API) needs the admin's
password; S3 needs the key pair; Postgres a password; the Dask scheduler and workers a
certificate signed by the stack's own CA (in `tls/`; the scheduler would otherwise run any
connected client's code on workers that hold the stack's credentials). The Dask dashboard
(read-only pages) is plain HTTP on 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from finpipe.errors import FinpipeError
from finpipe.services import tls
from finpipe.services.ports import free_ports, port_is_free
from finpipe.services.processes import (
    KILL_WAIT,
    escalation,
    start_time,
    still_running,
    stop_pid,
    stop_process,
)
from finpipe.settings import redact_uri
from finpipe.ui_servers import ServerCommand, mlflow_server_env, wait_until_up

log = logging.getLogger("finpipe.services.stack")

BUCKET = "finpipe"
WORK_POOL = "finpipe"
REGION = "us-east-1"
PREFECT_USER = "finpipe"  # the user half of Prefect's `user:password` auth string
MLFLOW_ADMIN = "admin"
LOCKS_DATABASE = "finpipe"
DATABASES = ("prefect", "mlflow", "mlflow_auth")  # besides LOCKS_DATABASE
DASK_WORKERS = 2
# Flow runs on the stack send a heartbeat this often (Prefect's least); the zombie-run
# automation (finpipe.flows.zombies) ends a run only after several missed beats.
HEARTBEAT_SECONDS = 30


def heartbeat_env(seconds: int = HEARTBEAT_SECONDS) -> dict[str, str]:
    """The setting that makes flow runs send heartbeats every `seconds`."""
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(seconds)}


# What a client (a shell, a flow, a worker) needs to use the stack.
CLIENT_SETTINGS = (
    "FINPIPE_HOME",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "FINPIPE_MLFLOW_TRACKING_URI",
    "FINPIPE_MLFLOW_ARTIFACT_ROOT",
    "PREFECT_API_URL",
    "PREFECT_API_AUTH_STRING",
    "FINPIPE_LOCKS_URL",
    "FINPIPE_DASK_ADDRESS",
    # Every flow run on the stack's API beats this often, so the zombie-run automation (which
    # waits a few beats) never ends a live one (finpipe.flows.zombies).
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY",
    # Dask's own TLS settings: only a process with the stack's certificate reaches the scheduler.
    tls.REQUIRE_ENCRYPTION,
    tls.CA_FILE,
    *tls.role_settings("client"),
)
# The files those settings name: compose mounts them as secrets from the paths in stack.env.
TLS_FILE_SETTINGS = (tls.CA_FILE, *tls.role_settings("client"))
# Values never echoed: masked when printed, replaced by *** in error messages.
SECRET_SETTINGS = frozenset(
    {
        "POSTGRES_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "PREFECT_API_AUTH_STRING",
        "PREFECT_SERVER_API_AUTH_STRING",
    }
)
# Settings that are URLs with a password inside: printed with it masked.
URL_SETTINGS = frozenset(
    {"FINPIPE_LOCKS_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "MLFLOW_BACKEND_STORE_URI"}
)
# The generated credentials; every other value derives from them and the ports. They are
# also the variables deploy/docker-compose.yml requires (`${NAME:?...}`).
GENERATED = (
    "POSTGRES_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "PREFECT_API_AUTH_STRING",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)


@dataclass(frozen=True)
class Service:
    """One service of the team stack, as `finpipe stack` runs it and deploy/docker-compose.yml
    declares it.

    `env`: the settings and credentials the service is given, by variable name: its process
    environment in the stack (for postgres, the password PostgresServer takes) and its
    `environment:` in the compose file. `image_env`: variables only the compose file's image
    reads (the official postgres image's user and database).
    """

    name: str
    env: tuple[str, ...] = ()
    replicas: int = 1
    image_env: tuple[str, ...] = ()


SERVICES: tuple[Service, ...] = (
    Service("postgres", ("POSTGRES_PASSWORD",), image_env=("POSTGRES_USER", "POSTGRES_DB")),
    Service("s3", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
    Service(
        "prefect-server",
        (
            "PREFECT_API_DATABASE_CONNECTION_URL",
            "PREFECT_SERVER_API_AUTH_STRING",
            "PREFECT_UI_API_URL",
        ),
    ),
    Service(
        "mlflow",
        (
            "MLFLOW_BACKEND_STORE_URI",
            "MLFLOW_ARTIFACTS_DESTINATION",
            "MLFLOW_AUTH_CONFIG_PATH",
            "MLFLOW_AUTH_ADMIN_USERNAME",
            "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "MLFLOW_S3_ENDPOINT_URL",
        ),
    ),
    Service(
        "dask-scheduler", (tls.REQUIRE_ENCRYPTION, tls.CA_FILE, *tls.role_settings("scheduler"))
    ),
    Service("dask-worker", (*CLIENT_SETTINGS, *tls.role_settings("worker")), replicas=DASK_WORKERS),
    Service("prefect-worker", CLIENT_SETTINGS),
)
SERVICE_NAMES = tuple(s.name for s in SERVICES)
# One-shot jobs the compose file has besides the services (the stack does their work itself).
COMPOSE_JOBS = {
    "s3-bucket": "creates the bucket (the stack: S3Server.start)",
    "deployments": "registers deploy/prefect.yaml's deployments on the pool (the stack: "
    "`finpipe stack deploy`, which `up` runs)",
}
# Ports of one stack, by name (the S3 server's internal ports are kept under "s3.<name>").
PORT_NAMES = ("postgres", "s3", "prefect", "mlflow", "dask", "dask-dashboard", "prefect-worker")


class StackError(FinpipeError):
    """The team stack cannot be started, reached or stopped."""


def service(name: str) -> Service:
    """The SERVICES entry called `name`."""
    return next(s for s in SERVICES if s.name == name)


def service_env(name: str, values: dict[str, str]) -> dict[str, str]:
    """The settings service `name` is given: exactly its SERVICES variables, from `values`."""
    return {key: values[key] for key in service(name).env}


# -- the folder -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StackFolder:
    """Where one stack keeps its data, settings, logs and pid files."""

    root: Path

    @property
    def env_file(self) -> Path:
        return self.root / "stack.env"

    @property
    def state_file(self) -> Path:
        return self.root / "stack.json"  # ports: no secrets

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def mlflow_auth_config(self) -> Path:
        return self.root / "mlflow-auth.ini"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect-home"

    @property
    def dask_tls(self) -> tls.TLSFiles:
        """The Dask cluster's CA, certificate and key (finpipe.services.tls)."""
        return tls.TLSFiles(self.root / "tls")

    @property
    def drop(self) -> Path:
        """The drop folder: the only place the stack's workers read delivered files from."""
        return self.root / "drop"

    def local_dir(self, name: str) -> Path:
        """FINPIPE_LOCAL_DIR of worker process `name`: its own local disk."""
        return self.root / "local" / name

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


def generate_credentials() -> dict[str, str]:
    """Fresh credentials for a new stack (URL-safe: they go inside URLs unquoted)."""
    return {
        "POSTGRES_PASSWORD": secrets.token_urlsafe(24),
        "AWS_ACCESS_KEY_ID": "FP" + secrets.token_hex(9).upper(),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "PREFECT_API_AUTH_STRING": f"{PREFECT_USER}:{secrets.token_urlsafe(24)}",
        "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
    }


def stack_values(credentials: dict[str, str], ports: dict[str, int], folder: StackFolder):
    """Every variable of the stack by name, from its credentials and ports."""
    host = "127.0.0.1"
    pg = f"{credentials['POSTGRES_PASSWORD']}@{host}:{ports['postgres']}"
    s3 = f"http://{host}:{ports['s3']}"
    prefect = f"http://{host}:{ports['prefect']}/api"
    mlflow = f"http://{host}:{ports['mlflow']}"
    return {
        **credentials,
        # clients
        "FINPIPE_HOME": f"s3://{BUCKET}/data",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": s3,
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "MLFLOW_TRACKING_URI": mlflow,
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
        "FINPIPE_MLFLOW_TRACKING_URI": mlflow,
        "FINPIPE_MLFLOW_ARTIFACT_ROOT": "mlflow-artifacts:/",
        "PREFECT_API_URL": prefect,
        "FINPIPE_LOCKS_URL": f"postgresql://finpipe:{pg}/{LOCKS_DATABASE}",
        "FINPIPE_DASK_ADDRESS": f"tls://{host}:{ports['dask']}",
        **heartbeat_env(),
        **folder.dask_tls.settings("client", "worker", "scheduler"),
        # servers
        "PREFECT_SERVER_API_AUTH_STRING": credentials["PREFECT_API_AUTH_STRING"],
        "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://finpipe:{pg}/prefect",
        "PREFECT_UI_API_URL": prefect,
        "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg://finpipe:{pg}/mlflow",
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
        "MLFLOW_AUTH_CONFIG_PATH": str(folder.mlflow_auth_config),
        "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD": credentials["MLFLOW_TRACKING_PASSWORD"],
    }


def shown(name: str, value: str) -> str:
    """`value` as it may be printed: secrets masked, passwords in URLs masked."""
    if name in SECRET_SETTINGS:
        return "***"
    if name in URL_SETTINGS:
        return redact_uri(value)
    return value


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    path.chmod(0o600)  # an existing file keeps its old mode through O_CREAT


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """The stack's settings as `NAME='value'` lines (shell and compose --env-file), mode 0600:
    clients' settings first, then the servers'."""
    servers = sorted(set(values) - set(CLIENT_SETTINGS))
    lines = ["# finpipe stack: generated by `finpipe stack up`; keep it private (0600).", ""]
    lines += ["# Clients: set -a && . ./stack.env && set +a"]
    lines += [f"{name}='{values[name]}'" for name in CLIENT_SETTINGS]
    lines += ["", "# Servers"]
    lines += [f"{name}='{values[name]}'" for name in servers]
    write_private(path, "\n".join(lines) + "\n")


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of an env file written by `write_env_file`."""
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            values[name] = value.strip("'")
    return values


# How long MLflow's auth app trusts a credential it has checked. Each check is a deliberately
# slow password hash (0.43 s a request on the 2-core test machine under load, where a nightly
# makes hundreds of requests: 50-65 s of logging per model); cached, a request costs the
# database lookup only. The stack runs one MLflow worker, so a password changed through the
# API applies at once; changed in the database directly, after this many seconds.
MLFLOW_AUTH_CACHE_SECONDS = 300


def mlflow_auth_config(values: dict[str, str]) -> str:
    """MLflow's basic-auth configuration: users in their own Postgres database, READ by
    default, checked credentials cached (MLFLOW_AUTH_CACHE_SECONDS); the admin's name and
    password come from the environment, not this file."""
    users_db = values["MLFLOW_BACKEND_STORE_URI"].rsplit("/", 1)[0] + "/mlflow_auth"
    return (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {users_db}\n"
        f"admin_username = {values['MLFLOW_AUTH_ADMIN_USERNAME']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {MLFLOW_AUTH_CACHE_SECONDS}\n"
    )


# -- processes ------------------------------------------------------------------------------
def _scripts() -> Path:
    return Path(sys.executable).parent


def _commands(values: dict[str, str], ports: dict[str, int], folder: StackFolder):
    """The stack's processes besides Postgres and S3, as `finpipe ui` describes a server."""
    host = "127.0.0.1"
    # Besides the SERVICES settings: Prefect's local folder, and the stack's folder, which
    # marks every process of this stack (tests look for leftovers by it).
    plumbing = {"PREFECT_HOME": str(folder.prefect_home), "FINPIPE_STACK_DIR": str(folder.root)}
    scripts = _scripts()

    def runs_flows(name: str) -> dict[str, str]:
        """What a process that runs finpipe's steps gets besides its settings: a local folder
        of its own, and the stack's drop folder as the only one `inputs` may name."""
        return {
            "FINPIPE_LOCAL_DIR": str(folder.local_dir(name)),
            "FINPIPE_DROP_ROOTS": json.dumps([str(folder.drop)]),
        }

    client = {**plumbing, **service_env("prefect-worker", values), **runs_flows("prefect-worker")}
    prefect = ServerCommand(
        name="prefect-server",
        argv=[str(scripts / "prefect"), "server", "start", "--host", host]
        + ["--port", str(ports["prefect"]), "--analytics-off"],
        url=f"http://{host}:{ports['prefect']}",
        health_url=f"http://{host}:{ports['prefect']}/api/health",
        env={**plumbing, **service_env("prefect-server", values)},
    )
    mlflow = ServerCommand(
        name="mlflow",
        argv=[str(scripts / "mlflow"), "server", "--host", host, "--port", str(ports["mlflow"])]
        + ["--workers", "1", "--app-name", "basic-auth"],
        url=f"http://{host}:{ports['mlflow']}",
        health_url=f"http://{host}:{ports['mlflow']}/health",
        env={**plumbing, **service_env("mlflow", values), **mlflow_server_env()},
    )
    scheduler = ServerCommand(
        name="dask-scheduler",
        argv=[str(scripts / "dask"), "scheduler", "--host", host, "--port", str(ports["dask"])]
        + ["--protocol", "tls", "--dashboard-address", f"{host}:{ports['dask-dashboard']}"],
        url=values["FINPIPE_DASK_ADDRESS"],
        health_url=f"http://{host}:{ports['dask-dashboard']}/health",
        env={**plumbing, **service_env("dask-scheduler", values)},
    )
    workers = [
        ServerCommand(
            name=f"dask-worker-{index}",
            argv=[str(scripts / "dask"), "worker", values["FINPIPE_DASK_ADDRESS"]]
            + ["--nthreads", "1", "--nworkers", "1", "--host", host, "--no-dashboard"]
            + ["--name", f"dask-worker-{index}"]
            + ["--local-directory", str(folder.root / "dask" / f"worker-{index}")],
            url=values["FINPIPE_DASK_ADDRESS"],
            health_url="",
            env={
                **plumbing,
                **service_env("dask-worker", values),
                **runs_flows(f"dask-worker-{index}"),
            },
        )
        for index in range(1, DASK_WORKERS + 1)
    ]
    worker = ServerCommand(
        name="prefect-worker",
        argv=[str(scripts / "prefect"), "worker", "start", "--pool", WORK_POOL]
        + ["--type", "process", "--name", "stack-worker", "--with-healthcheck"],
        url=values["PREFECT_API_URL"],
        health_url=f"http://{host}:{ports['prefect-worker']}/health",
        env={
            **client,
            "PREFECT_WORKER_WEBSERVER_HOST": host,
            "PREFECT_WORKER_WEBSERVER_PORT": str(ports["prefect-worker"]),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        },
    )
    return prefect, mlflow, scheduler, workers, worker


def _record_pid(folder: StackFolder, name: str, pid: int) -> None:
    folder.pids.mkdir(parents=True, exist_ok=True)
    (folder.pids / f"{name}.pid").write_text(f"{pid} {start_time(pid) or ''}\n")


def _stop_pid(pid: int, started: str, first: signal.Signals, group: bool, timeout: float):
    """Signal process `pid` (its group if `group`) while it is the one started at `started`;
    escalate to SIGKILL after `timeout` seconds. Return whether it was running."""
    if not still_running(pid, started):
        return False
    alive = functools.partial(still_running, pid, started)
    stop_pid(pid, alive, escalation(first, timeout), f"process {pid}", group=group)
    return True


# Stop order, stage by stage (the processes of a stage stop side by side): the workers first
# (the Prefect worker before its server), then the servers, Postgres last. SeaweedFS takes about
# 15 s to close its filer's streams, so it stops beside the other servers.
STOP_STAGES = (
    ("prefect-worker", *(f"dask-worker-{i}" for i in range(1, DASK_WORKERS + 1))),
    ("dask-scheduler", "mlflow", "prefect-server", "s3"),
    ("postgres",),
)
STOP_ORDER = tuple(name for stage in STOP_STAGES for name in stage)


def running_processes(folder: StackFolder) -> dict[str, int]:
    """The stack's processes that are still running, by name."""
    found = {}
    for name in STOP_ORDER:
        pid_file = folder.pids / f"{name}.pid"
        if pid_file.exists():
            pid, _, started = pid_file.read_text().strip().partition(" ")
            if still_running(int(pid), started):
                found[name] = int(pid)
    return found


def _stop(folder: StackFolder, name: str, say: Callable[[str], None]) -> bool:
    """Stop process `name` of the stack from its pid file; return whether it was running."""
    pid_file = folder.pids / f"{name}.pid"
    if not pid_file.exists():
        return False
    pid, _, started = pid_file.read_text().strip().partition(" ")
    # Postgres: SIGINT to the postmaster alone (fast shutdown); the rest: their group.
    postgres = name == "postgres"
    first = signal.SIGINT if postgres else signal.SIGTERM
    was_running = _stop_pid(int(pid), started, first, group=not postgres, timeout=30.0)
    pid_file.unlink()
    if was_running:
        say(f"stopped {name} (pid {pid})")
    return was_running


def down(root: Path, say: Callable[[str], None] = log.info) -> list[str]:
    """Stop every process of the stack in `root` (the workers first, Postgres last); return
    the names of those that were running."""
    folder = StackFolder(Path(root).absolute())
    stopped = []
    with concurrent.futures.ThreadPoolExecutor(max(len(s) for s in STOP_STAGES)) as pool:
        for stage in STOP_STAGES:
            results = pool.map(lambda name: _stop(folder, name, say), stage)
            stopped += [name for name, was in zip(stage, results, strict=True) if was]
    return stopped


@dataclass(frozen=True)
class ProcessStatus:
    """One process of a stack as `finpipe stack status` shows it."""

    name: str
    pid: int | None  # None: not running
    address: str  # where its server listens ("" for the Dask workers, which have no port)
    answers: bool | None  # its server's check; for a Dask worker, whether it has joined

    @property
    def healthy(self) -> bool:
        return self.pid is not None and self.answers is not False


def status(root: Path, timeout: float = 3.0) -> list[ProcessStatus]:
    """Each process of the stack in `root`, Postgres first: running or not (its pid file and
    start time), and whether its server answers (HTTP health for the Prefect and MLflow
    servers and the Prefect worker; a TCP connection for Postgres, S3 and the Dask
    scheduler's TLS port; for a Dask worker, whether the scheduler lists it)."""
    folder = StackFolder(Path(root).absolute())
    if not folder.state_file.exists():
        raise StackError(f"no stack in {folder.root}: `finpipe stack up --dir {root}` first")
    ports = json.loads(folder.state_file.read_text())["ports"]
    running = running_processes(folder)
    host = "127.0.0.1"
    checks = {
        "postgres": (f"{host}:{ports['postgres']}", None),
        "s3": (f"http://{host}:{ports['s3']}", None),
        "prefect-server": (f"http://{host}:{ports['prefect']}", "/api/health"),
        "mlflow": (f"http://{host}:{ports['mlflow']}", "/health"),
        "dask-scheduler": (f"tls://{host}:{ports['dask']}", None),
        "prefect-worker": (f"http://{host}:{ports['prefect-worker']}", "/health"),
    }
    found = []
    joined: set[str] | None = None  # the Dask workers the scheduler knows, once asked
    for name in (name for stage in reversed(STOP_STAGES) for name in stage):
        address, health = checks.get(name, ("", None))
        answers = None
        if address:
            answers = _answers(address, health, timeout)
        elif name.startswith("dask-worker"):  # no port of its own: has it joined the scheduler?
            if joined is None:
                joined = _dask_workers(folder, checks["dask-scheduler"][0], timeout)
            answers = name in joined
        found.append(ProcessStatus(name, running.get(name), address, answers))
    return found


def _dask_workers(folder: StackFolder, address: str, timeout: float) -> set[str]:
    """The names of the workers the stack's Dask scheduler has (none when it cannot be asked)."""
    from distributed import Client

    try:
        values = read_env_file(folder.env_file)
        with Client(address, timeout=timeout, security=tls.security(values)) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            return {str(worker.get("name")) for worker in workers}
    except (OSError, KeyError):
        return set()


def _answers(address: str, health: str | None, timeout: float) -> bool:
    """Whether the server at `address` answers: 200 from its `health` path, else a TCP accept."""
    import socket
    import urllib.request

    try:
        if health is not None:
            with urllib.request.urlopen(address + health, timeout=timeout) as reply:
                return bool(reply.status == 200)
        host, port = address.rsplit("/", 1)[-1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def stop_service(root: Path, name: str, say: Callable[[str], None] = log.info) -> bool:
    """Stop one process of a running stack (`name` as in STOP_ORDER), e.g. the S3 server for
    a fault test; `start_service` starts it again. Return whether it was running."""
    if name not in STOP_ORDER:
        raise StackError(f"no stack process is called {name!r}: one of {', '.join(STOP_ORDER)}")
    return _stop(StackFolder(Path(root).absolute()), name, say)


def start_service(root: Path, name: str) -> int:
    """Start one stopped process of the stack in `root` again, with the settings and ports it
    had, and wait until it answers; return its pid."""
    folder = StackFolder(Path(root).absolute())
    if name in running_processes(folder):
        raise StackError(f"{name} is running already")
    values = read_env_file(folder.env_file)
    ports = json.loads(folder.state_file.read_text())["ports"]
    if name in ("postgres", "s3"):
        server = dict(zip(("postgres", "s3"), _servers(folder, values, ports), strict=True))[name]
        server.start()
        assert server.pid is not None
        _record_pid(folder, name, server.pid)
        return server.pid
    prefect, mlflow, scheduler, dask_workers, worker = _commands(values, ports, folder)
    commands = {c.name: c for c in (prefect, mlflow, scheduler, *dask_workers, worker)}
    if name not in commands:
        raise StackError(f"no stack process is called {name!r}: one of {', '.join(STOP_ORDER)}")
    command = commands[name]
    process = command.start(folder.log(name))
    _record_pid(folder, name, process.pid)
    if command.health_url:
        _wait(command, process)
    return process.pid


# -- up -------------------------------------------------------------------------------------
def _ports(folder: StackFolder) -> dict[str, int]:
    """The previous ports of this stack where still free, else new free ones."""
    from finpipe.services.s3 import INTERNAL_PORTS

    names = [*PORT_NAMES, *(f"s3.{n}" for n in INTERNAL_PORTS)]
    old: dict[str, int] = {}
    if folder.state_file.exists():
        old = json.loads(folder.state_file.read_text()).get("ports", {})
    kept = {n: p for n, p in old.items() if n in names and port_is_free(p)}
    fresh = iter(free_ports(len(names)))
    ports = {}
    for name in names:
        if name in kept:
            ports[name] = kept[name]
            continue
        port = next(fresh)
        while port in kept.values():
            port = next(fresh)
        ports[name] = port
    return ports


def _credentials(folder: StackFolder) -> dict[str, str]:
    """The credentials of the stack in `folder`: those of its env file, else new ones."""
    if folder.env_file.exists():
        values = read_env_file(folder.env_file)
        missing = [name for name in GENERATED if not values.get(name)]
        if missing:
            raise StackError(f"{folder.env_file} lacks {', '.join(missing)}")
        return {name: values[name] for name in GENERATED}
    return generate_credentials()


@dataclass(frozen=True)
class StackInfo:
    """A running stack: its folder, every variable, the ports and the start time."""

    folder: StackFolder
    values: dict[str, str]
    ports: dict[str, int]
    seconds: float


def up(root: Path, say: Callable[[str], None] = log.info) -> StackInfo:
    """Start the stack in `root` (created if missing) and return once every service answers.

    A failure stops whatever had started. Re-running `up` on a stopped stack's folder keeps
    its data and credentials."""
    began = time.monotonic()
    folder = StackFolder(Path(root).absolute())
    if running := running_processes(folder):
        raise StackError(
            f"a stack is already running in {folder.root} ({', '.join(running)}): "
            "`finpipe stack down` first"
        )
    folder.root.mkdir(parents=True, exist_ok=True)
    folder.root.chmod(0o711)  # Postgres (its own user) must enter; only the owner may list
    for child in (folder.logs, folder.pids, folder.prefect_home, folder.drop):
        child.mkdir(mode=0o700, exist_ok=True)
    credentials = _credentials(folder)
    ports = _ports(folder)
    values = stack_values(credentials, ports, folder)
    write_env_file(folder.env_file, values)
    write_private(folder.mlflow_auth_config, mlflow_auth_config(values))
    tls.ensure_certificates(folder.dask_tls.folder)
    folder.state_file.write_text(json.dumps({"ports": ports}, indent=1) + "\n")
    try:
        _start_all(folder, values, ports, say)
    except BaseException:
        down(folder.root, say=lambda _: None)
        raise
    return StackInfo(folder, values, ports, time.monotonic() - began)


def _servers(folder: StackFolder, values: dict[str, str], ports: dict[str, int]):
    """The stack's Postgres and S3 servers (not started)."""
    from finpipe.services.postgres import PostgresServer
    from finpipe.services.s3 import INTERNAL_PORTS, S3Server

    postgres = PostgresServer(
        folder.root / "postgres",
        ports["postgres"],
        service_env("postgres", values)["POSTGRES_PASSWORD"],
        log_file=folder.log("postgres"),
    )
    s3_env = service_env("s3", values)
    s3 = S3Server(
        folder.root / "s3",
        ports["s3"],
        s3_env["AWS_ACCESS_KEY_ID"],
        s3_env["AWS_SECRET_ACCESS_KEY"],
        BUCKET,
        internal_ports={n: ports[f"s3.{n}"] for n in INTERNAL_PORTS},
        log_file=folder.log("s3"),
    )
    return postgres, s3


def _start_all(
    folder: StackFolder,
    values: dict[str, str],
    ports: dict[str, int],
    say: Callable[[str], None],
) -> None:
    postgres, s3 = _servers(folder, values, ports)
    prefect, mlflow, scheduler, dask_workers, worker = _commands(values, ports, folder)
    launched: dict[str, subprocess.Popen] = {}

    def launch(command: ServerCommand) -> subprocess.Popen:
        process = command.start(folder.log(command.name))
        _record_pid(folder, command.name, process.pid)
        launched[command.name] = process
        return process

    # The scheduler needs nothing; Postgres and S3 start side by side; then the servers.
    launch(scheduler)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        starting: list[concurrent.futures.Future] = [
            pool.submit(postgres.start),
            pool.submit(s3.start),
        ]
        for future in starting:
            try:
                future.result()
            finally:  # recorded even if the other failed, so `down` stops it
                for server, name in ((postgres, "postgres"), (s3, "s3")):
                    if server.pid and not (folder.pids / f"{name}.pid").exists():
                        _record_pid(folder, name, server.pid)
    for database in DATABASES:
        postgres.create_database(database)
    say(f"postgres and s3 up ({time.strftime('%H:%M:%S')})")
    launch(prefect)
    launch(mlflow)
    for dask_worker in dask_workers:
        launch(dask_worker)
    _wait(scheduler, launched[scheduler.name])
    _wait(prefect, launched[prefect.name], timeout=180)
    launch(worker)  # creates the work pool if missing
    # One-shot jobs, while the other servers finish starting: compose's `deployments` job
    # (registers them on the pool once the worker has made it) and the zombie automation.
    jobs = {
        "registering the deployments": _deployments_job(folder),
        "creating the zombie-run automation": _zombies_job(folder, values),
    }
    running = {what: job.start(folder.log(job.name)) for what, job in jobs.items()}
    try:
        _wait(mlflow, launched[mlflow.name], timeout=180)
        _wait_for_dask_workers(values, launched, dask_workers)
        _wait(worker, launched[worker.name])
        for what, job in running.items():
            try:
                code = job.wait(timeout=240)
            except subprocess.TimeoutExpired:
                raise StackError(f"{what} took over 240 s; see its log") from None
            if code != 0:
                raise StackError(f"{what} failed (exit {code}); see its log")
        say("deployments registered on the finpipe pool; zombie-run automation created")
    finally:
        for job in running.values():
            stop_process(job, [(signal.SIGKILL, KILL_WAIT)], "a stack job", group=True)


def _deployments_job(folder: StackFolder) -> ServerCommand:
    """`finpipe stack deploy` on this stack, as a child process (it reads stack.env)."""
    return ServerCommand(
        name="deployments",
        argv=[sys.executable, "-m", "finpipe.cli", "stack", "deploy", "--dir", str(folder.root)],
        url="",
        health_url="",
        env={"PREFECT_HOME": str(folder.prefect_home), "FINPIPE_STACK_DIR": str(folder.root)},
    )


def _zombies_job(folder: StackFolder, values: dict[str, str]) -> ServerCommand:
    """Creates the automation that marks flow runs whose machine died Crashed
    (finpipe.flows.zombies)."""
    return ServerCommand(
        name="zombie-automation",
        argv=[sys.executable, "-m", "finpipe.flows.zombies"],
        url="",
        health_url="",
        env={
            "PREFECT_HOME": str(folder.prefect_home),
            "FINPIPE_STACK_DIR": str(folder.root),
            "PREFECT_API_URL": values["PREFECT_API_URL"],
            "PREFECT_API_AUTH_STRING": values["PREFECT_API_AUTH_STRING"],
        },
    )


def _wait(command: ServerCommand, process: subprocess.Popen, timeout: float = 120.0) -> None:
    try:
        wait_until_up(command, process, timeout=timeout)
    except FinpipeError as error:
        raise StackError(f"{command.name}: {error}; see its log") from None


def _wait_for_dask_workers(values, launched, workers, timeout: float = 120.0) -> None:
    from distributed import Client

    with Client(
        values["FINPIPE_DASK_ADDRESS"], timeout=30, security=tls.security(values)
    ) as client:
        deadline = time.monotonic() + timeout
        while len(client.scheduler_info(n_workers=-1)["workers"]) < len(workers):
            for command in workers:
                if launched[command.name].poll() is not None:
                    raise StackError(f"{command.name} exited at start; see its log")
            if time.monotonic() > deadline:
                raise StackError(f"the Dask workers did not join in {timeout:.0f} s")
            time.sleep(0.3)


def client_settings_lines(values: dict[str, str]) -> Iterable[str]:
    """`export NAME=value` for each client setting, secrets masked."""
    for name in CLIENT_SETTINGS:
        yield f"export {name}={shown(name, values[name])}"
