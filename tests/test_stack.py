"""`finpipe stack` and deploy/docker-compose.yml: one table of services and settings, and the
stack's security (credentials required, generated, and never echoed).

The compose checks are unit tests on the file; the others run on the session's real stack
(`team_stack`, tests/team_fixtures.py), started with the CLI as a user starts it.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import operator
import re
import socket
import ssl
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from finpipe.errors import ConfigError
from finpipe.services import stack, tls
from finpipe.settings import TELEMETRY_OFF, Settings
from finpipe.ui_servers import mlflow_server_env, server_commands

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _environment(service: dict) -> set[str]:
    """The settings a compose service is given, less the defaults every finpipe process or
    every MLflow server gets (telemetry off, no job runner)."""
    return set(service.get("environment") or {}) - set(TELEMETRY_OFF) - set(mlflow_server_env())


# -- the compose file and the stack agree ------------------------------------------------
def test_compose_has_the_stacks_services_and_only_its_listed_jobs_besides(compose):
    services = set(compose["services"])
    assert set(stack.SERVICE_NAMES) <= services, "a stack service is missing from compose"
    assert services - set(stack.SERVICE_NAMES) == set(stack.COMPOSE_JOBS)
    workers = compose["services"]["dask-worker"]
    assert workers["deploy"]["replicas"] == stack.service("dask-worker").replicas == 2


def test_each_compose_service_is_given_the_stacks_settings_by_the_same_names(compose):
    for entry in stack.SERVICES:
        given = _environment(compose["services"][entry.name])
        assert given == set(entry.env) | set(entry.image_env), entry.name
    assert set(compose["x-client-settings"]) == set(stack.CLIENT_SETTINGS)


def test_compose_is_a_valid_compose_file_whose_every_reference_is_declared(compose):
    """What `docker compose config` checks before anything runs, without Docker (none here):
    the file parses as the Compose Specification (the compose_spec parser, strict about
    unknown keys and wrong values; YAML has resolved the `<<` merges already), every secret,
    config, named volume and dependency a service names is declared, and every variable it
    interpolates is one `finpipe stack up` writes to stack.env."""
    from compose_spec import PyCompose

    PyCompose.from_json(json.dumps(compose))
    declared = {kind: set(compose.get(kind) or {}) for kind in ("secrets", "configs", "volumes")}
    for name, service in compose["services"].items():
        for kind in ("secrets", "configs"):
            used = {e if isinstance(e, str) else e["source"] for e in service.get(kind, [])}
            assert used <= declared[kind], f"{name}: {kind} {used - declared[kind]}"
        sources = [v.split(":")[0] for v in service.get("volumes", []) if isinstance(v, str)]
        named = {source for source in sources if not source.startswith((".", "/"))}
        assert named <= declared["volumes"], f"{name}: volumes {named - declared['volumes']}"
        assert set(service.get("depends_on") or []) <= set(compose["services"]), name
    folder = stack.StackFolder(Path("/stack"))
    values = stack.stack_values(
        stack.generate_credentials(), dict.fromkeys(stack.PORT_NAMES, 1), folder
    )
    interpolated = set(re.findall(r"\$\{(\w+)", (DEPLOY / "docker-compose.yml").read_text()))
    assert interpolated <= set(values), interpolated - set(values)


def test_compose_ships_no_password_and_publishes_on_loopback_only(compose):
    text = (DEPLOY / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    # The variables `finpipe stack up` generates, and the paths of the Dask TLS files it writes.
    assert required == set(stack.GENERATED) | set(stack.TLS_FILE_SETTINGS)
    assert not re.search(r"\$\{\w+:?-", text), "a variable with a default value"
    for name in stack.SECRET_SETTINGS:
        for service in compose["services"].values():
            value = (service.get("environment") or {}).get(name)
            assert value is None or value.startswith("${"), f"{name} has a literal value"
    for name, service in compose["services"].items():
        for published in service.get("ports", []):
            assert str(published).startswith("127.0.0.1:"), f"{name} publishes {published}"


def test_every_mlflow_server_starts_without_the_genai_job_runner(compose, tmp_path, monkeypatch):
    """`finpipe ui`, `finpipe stack` and compose start MLflow with job execution off, unless
    the user's environment turns it on."""
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    folder = stack.StackFolder(tmp_path)
    ports = dict.fromkeys(stack.PORT_NAMES, 1234)
    values = stack.stack_values(stack.generate_credentials(), ports, folder)
    _, stack_mlflow, *_ = stack._commands(values, ports, folder)
    assert stack_mlflow.name == "mlflow"
    (ui_mlflow,) = [c for c in server_commands(Settings(home=tmp_path)) if c.name == "MLflow"]
    compose_env = compose["services"]["mlflow"]["environment"]
    for env in (stack_mlflow.env, ui_mlflow.env, compose_env):
        assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    (ui_mlflow,) = [c for c in server_commands(Settings(home=tmp_path)) if c.name == "MLflow"]
    assert ui_mlflow.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"


def test_compose_creates_the_stacks_databases():
    created = re.findall(r"CREATE DATABASE (\w+)", (DEPLOY / "postgres-init.sql").read_text())
    assert set(created) == set(stack.DATABASES)


# -- settings and the env file --------------------------------------------------------------
def test_each_new_stack_gets_its_own_credentials_and_a_private_env_file(tmp_path):
    first, second = stack.generate_credentials(), stack.generate_credentials()
    assert set(first) == set(stack.GENERATED)
    assert all(len(value) >= 18 and value != second[name] for name, value in first.items())
    folder = stack.StackFolder(tmp_path)
    ports = dict.fromkeys(stack.PORT_NAMES, 1234)
    values = stack.stack_values(first, ports, folder)
    stack.write_env_file(folder.env_file, values)
    assert stat.S_IMODE(folder.env_file.stat().st_mode) == 0o600
    assert stack.read_env_file(folder.env_file) == values
    printed = "\n".join(stack.client_settings_lines(values))
    for name in set(stack.GENERATED) - {"AWS_ACCESS_KEY_ID"}:  # the key id is not secret
        assert first[name].split(":")[-1] not in printed, name
    assert "export PREFECT_API_URL=http://127.0.0.1:1234/api" in printed
    assert "export FINPIPE_LOCKS_URL=postgresql://***@127.0.0.1:1234/finpipe" in printed


# -- Dask's mutual TLS ---------------------------------------------------------------------
def test_a_stack_gets_a_dask_ca_of_its_own_and_a_certificate_it_signed(tmp_path):
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    files = tls.ensure_certificates(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    key = load_pem_private_key(files.key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.folder.stat().st_mode) == 0o700
    # Kept while valid (a second `up` keeps the cluster's identity); renewed near its end.
    first = files.cert.read_bytes()
    assert tls.ensure_certificates(files.folder).cert.read_bytes() == first
    near_end = cert.not_valid_after_utc - tls.RENEW_WITHIN + dt.timedelta(hours=1)
    renewed = tls.ensure_certificates(files.folder, now=near_end)
    assert renewed.cert.read_bytes() != first
    assert tls.expires(renewed.cert) > cert.not_valid_after_utc
    # Another stack's CA did not sign this one.
    other = x509.load_pem_x509_certificate(
        tls.ensure_certificates(tmp_path / "other").ca.read_bytes()
    )
    with pytest.raises((InvalidSignature, ValueError)):
        cert.verify_directly_issued_by(other)


def test_a_tls_scheduler_without_a_client_certificate_is_a_config_error(
    tmp_path, monkeypatch, caplog
):
    files = tls.TLSFiles(tmp_path / "tls")
    for name in files.settings("client"):
        monkeypatch.delenv(name, raising=False)
    assert tls.client_security("tcp://127.0.0.1:8786") is None
    with pytest.raises(ConfigError, match=r"DASK_DISTRIBUTED__COMM__TLS__CA_FILE.*stack\.env"):
        tls.client_security("tls://127.0.0.1:8786")
    for name, value in files.settings("client").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"dask\.pem does not exist: copy the stack's tls/"):
        tls.client_security("tls://127.0.0.1:8786")
    tls.ensure_certificates(files.folder)
    security = tls.client_security("tls://127.0.0.1:8786")
    assert security is not None and security.require_encryption
    assert (security.tls_ca_file, security.tls_client_cert) == (str(files.ca), str(files.cert))
    # What a backfill's dates run on: prefect-dask's runner, connecting with that certificate.
    from finpipe.flows.run_setup import date_runner

    runner = date_runner(Settings(home=tmp_path, dask_address="tls://127.0.0.1:8786"), 2)
    assert runner.client_kwargs["security"].tls_client_key == str(files.key)
    # An expired certificate is named, not left to a failed handshake; one about to expire warns.
    end = tls.expires(files.cert)
    with pytest.raises(ConfigError, match=r"expired on .*`finpipe stack up` makes a new one"):
        tls.check_client_certificate(files.cert, now=end + dt.timedelta(seconds=1))
    tls.log.addHandler(caplog.handler)  # whatever propagation a Prefect logging set-up left
    try:
        tls.check_client_certificate(files.cert, now=end - tls.RENEW_WITHIN - dt.timedelta(days=1))
        assert not caplog.records
        tls.check_client_certificate(files.cert, now=end - dt.timedelta(days=1))
    finally:
        tls.log.removeHandler(caplog.handler)
    assert f"expires on {end:%Y-%m-%d}" in caplog.text


def test_the_stacks_dask_runs_code_only_for_a_holder_of_its_certificate(team_stack, tmp_path):
    """The scheduler refuses plain TCP, a TLS client with no certificate and one whose
    certificate another CA signed; the stack's own certificate runs a task."""
    from distributed import Client, Security

    values = team_stack.values
    address = values["FINPIPE_DASK_ADDRESS"]
    assert address.startswith("tls://")
    with Client(address, timeout=30, security=tls.security(values)) as client:
        assert client.submit(operator.add, 1, 1).result(timeout=60) == 2
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    with pytest.raises(OSError):
        Client(address.replace("tls://", "tcp://"), timeout=10)
    stranger = tls.ensure_certificates(tmp_path / "stranger")
    trusting = Security(
        tls_ca_file=values[tls.CA_FILE],
        tls_client_cert=str(stranger.cert),
        tls_client_key=str(stranger.key),
        require_encryption=True,
    )
    with pytest.raises(OSError):
        Client(address, timeout=10, security=trusting)
    # A bare TLS client that trusts the stack's CA but shows no certificate: the handshake
    # completes on its side (TLS 1.3), then the scheduler's alert ends the connection.
    context = ssl.create_default_context(cafile=values[tls.CA_FILE])
    context.check_hostname = False
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw) as connection,
        pytest.raises(ssl.SSLError, match="CERTIFICATE"),
    ):
        connection.recv(1)


# -- finpipe stack status --------------------------------------------------------------------
def _status_command(root: Path):
    from typer.testing import CliRunner

    from finpipe.cli import app

    return CliRunner().invoke(app, ["stack", "status", "--dir", str(root)], terminal_width=200)


def test_server_ports_are_drawn_below_the_range_outgoing_connections_take(monkeypatch):
    """A port from the kernel's ephemeral range can be taken by any client's connection between
    the probe and the server's bind (it happened to `finpipe ui`'s MLflow server in CI)."""
    from finpipe.services import ports

    start = ports.ephemeral_start()
    drawn = ports.free_ports(12)
    assert len(set(drawn)) == 12
    assert all(ports.LISTEN_FROM <= port < start for port in drawn), (drawn, start)
    assert all(ports.port_is_free(port) for port in drawn)
    with socket.socket() as taken:  # a port in use is never handed out
        taken.bind(("127.0.0.1", drawn[0]))
        taken.listen()
        assert not ports.port_is_free(drawn[0])
        monkeypatch.setattr(ports, "_DRAW", _Always(drawn[0], drawn[1]))
        assert ports.free_ports(1) == [drawn[1]]
    # No room below the range (a system that starts it low): any free port the kernel gives.
    monkeypatch.setattr(ports, "ephemeral_start", lambda: ports.LISTEN_FROM + 10)
    assert ports.port_is_free(ports.free_ports(1)[0])


class _Always:
    """Stands in for the port draw: the given ports, in order."""

    def __init__(self, *order: int) -> None:
        self.order = list(order)

    def sample(self, population, k):
        return self.order


def test_status_of_a_stopped_stack_lists_every_process_stopped_and_exits_1(tmp_path):
    from finpipe.services.ports import free_ports
    from finpipe.services.s3 import INTERNAL_PORTS

    result = _status_command(tmp_path / "none")
    assert isinstance(result.exception, stack.StackError), result.output
    assert "no stack in" in str(result.exception)
    folder = stack.StackFolder(tmp_path / "stack")
    names = [*stack.PORT_NAMES, *(f"s3.{n}" for n in INTERNAL_PORTS)]
    ports = dict(zip(names, free_ports(len(names)), strict=True))  # nothing listens there
    folder.root.mkdir()
    folder.state_file.write_text(json.dumps({"ports": ports}))
    result = _status_command(folder.root)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == [
        name for stage in reversed(stack.STOP_STAGES) for name in stage
    ]
    assert all("stopped" in line for line in lines[:-1])
    assert f"127.0.0.1:{ports['mlflow']}" in result.output and "does not answer" in result.output
    assert lines[-1].endswith("not running or not answering")


# -- the running stack ----------------------------------------------------------------------
def _status(url: str, auth: str | None = None, body: dict | None = None) -> int:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_stack_starts_within_a_minute_or_so_and_prints_no_secret(team_stack):
    print(f"finpipe stack up: {team_stack.up_seconds:.1f} s")
    assert team_stack.up_seconds < 120
    for name, secret in team_stack.secrets().items():
        assert secret not in team_stack.up_output, f"{name} echoed by stack up"
    assert f"export PREFECT_API_URL={team_stack.values['PREFECT_API_URL']}" in team_stack.up_output
    env_file = stack.StackFolder(team_stack.root).env_file
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600


def test_prefect_api_refuses_calls_without_the_auth_string(team_stack):
    api = team_stack.values["PREFECT_API_URL"]
    good = team_stack.values["PREFECT_API_AUTH_STRING"]
    pools = f"{api}/work_pools/filter"
    assert _status(pools, body={}) == 401
    assert _status(pools, auth="finpipe:wrong-password", body={}) == 401
    assert _status(pools, auth=good, body={}) == 200
    assert _status(f"{api}/work_pools/{stack.WORK_POOL}", auth=good) == 200  # made by the worker


def test_mlflow_refuses_calls_without_the_admin_password(team_stack):
    search = f"{team_stack.values['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
    search += "?max_results=1"
    user = team_stack.values["MLFLOW_TRACKING_USERNAME"]
    assert _status(search) == 401
    assert _status(search, auth=f"{user}:wrong-password") == 401
    assert _status(search, auth=f"{user}:{team_stack.values['MLFLOW_TRACKING_PASSWORD']}") == 200


def test_each_stack_process_is_given_its_services_settings(team_stack):
    """The running processes follow SERVICES: each has exactly the values the table names."""
    folder = stack.StackFolder(team_stack.root)
    running = stack.running_processes(folder)
    assert set(running) == set(stack.STOP_ORDER)
    for name, pid in running.items():
        if name == "postgres":  # given its password as an argument: checked by logging in
            continue
        service = "dask-worker" if name.startswith("dask-worker") else name
        environment = dict(
            item.split("=", 1)
            for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
            if "=" in item
        )
        expected = stack.service_env(service, team_stack.values)
        assert {k: environment.get(k) for k in expected} == expected, name


def test_the_stacks_mlflow_server_runs_no_job_runner(team_stack):
    """One web process under `mlflow server`: no job runner and no Huey consumers (eight
    processes, about 16 s of CPU at start, with job execution on)."""
    import psutil

    pid = stack.running_processes(stack.StackFolder(team_stack.root))["mlflow"]
    children = [" ".join(p.cmdline()) for p in psutil.Process(pid).children(recursive=True)]
    assert children, "mlflow server started no web process"
    assert not [c for c in children if "huey" in c or "_job_runner" in c], children


# The S3 server's restart (objects kept, create-only writes, keys checked) is tested in
# test_team_stack_acceptance.py on the restart its night-3 fault test makes: one restart of
# the session's stack instead of two (15-20 s each, most of it SeaweedFS's filer stopping).


def test_status_shows_every_process_of_the_running_stack_up_and_answering(team_stack):
    result = _status_command(team_stack.root)
    assert result.exit_code == 0, result.output
    for name in stack.STOP_ORDER:
        [line] = [line for line in result.output.splitlines() if line.split()[0] == name]
        assert " pid " in f" {line} ", line
        assert "does not answer" not in line, line
    assert result.output.count(" answers") == 6
    assert result.output.count("joined the scheduler") == 2  # the Dask workers
    assert "all 8 processes running and answering" in result.output


def test_the_stacks_logs_hold_no_credential(team_stack):
    """After the refused and accepted calls above, no log of the stack holds a secret."""
    logs = sorted(stack.StackFolder(team_stack.root).logs.glob("*.log"))
    assert len(logs) >= len(stack.STOP_ORDER)
    for log in logs:
        text = log.read_text(errors="replace")
        for name, secret in team_stack.secrets().items():
            assert secret not in text, f"{name} in {log.name}"
