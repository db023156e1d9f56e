"""Mutual TLS for the team stack's Dask cluster: a certificate authority of the stack's own and
one certificate it signs, which the scheduler, the workers and every client present.

Dask's scheduler runs whatever a connected client sends it on the workers, and the workers hold
the stack's credentials. With TLS required (Dask's `require-encryption`), the scheduler and the
workers accept a connection only from a peer whose certificate the stack's CA signed, so the
certificate and its key are what let a process in: the stack keeps them in `tls/` (the key
mode 0600) and names them in `stack.env` through Dask's own settings
(`DASK_DISTRIBUTED__COMM__TLS__*`), which every Dask process reads. Dask checks the chain, not
the host name (its contexts set `check_hostname` off: a cluster of its own with IP addresses).

The CA's private key is not kept: it signs the one certificate and is dropped, so a copy of
`tls/` lets a host join the cluster but never lets anyone mint another identity. `finpipe stack
up` makes a new pair when there is none or when the certificate expires within RENEW_WITHIN.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finpipe.errors import ConfigError

if TYPE_CHECKING:
    from distributed import Security

log = logging.getLogger("finpipe.services.tls")

VALID_FOR = dt.timedelta(days=365)
RENEW_WITHIN = dt.timedelta(days=14)

# Dask's settings as environment variables (dask.config reads DASK_A__B__C as a.b.c).
REQUIRE_ENCRYPTION = "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"
CA_FILE = "DASK_DISTRIBUTED__COMM__TLS__CA_FILE"


def role_settings(role: str) -> tuple[str, str]:
    """The certificate and key settings of a Dask role: scheduler, worker or client."""
    prefix = f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}__"
    return prefix + "CERT", prefix + "KEY"


@dataclass(frozen=True)
class TLSFiles:
    """The PEM files of a stack's Dask TLS, in `folder`."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.folder / "dask.pem"

    @property
    def key(self) -> Path:
        return self.folder / "dask-key.pem"

    def settings(self, *roles: str) -> dict[str, str]:
        """Dask's settings that make `roles` use these files, TLS required."""
        values = {REQUIRE_ENCRYPTION: "True", CA_FILE: str(self.ca)}
        for role in roles:
            cert, key = role_settings(role)
            values |= {cert: str(self.cert), key: str(self.key)}
        return values


def expires(cert: Path) -> dt.datetime:
    """When the certificate in PEM file `cert` stops being valid (UTC)."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc


def ensure_certificates(folder: Path, now: dt.datetime | None = None) -> TLSFiles:
    """Return the TLS files in `folder`, made anew when missing or expiring within
    RENEW_WITHIN of `now`; `folder` is created readable by its owner only."""
    files = TLSFiles(Path(folder))
    now = now or dt.datetime.now(dt.UTC)
    present = all(path.exists() for path in (files.ca, files.cert, files.key))
    if present and expires(files.cert) - now > RENEW_WITHIN:
        return files
    files.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca, cert, key = _issue(now)
    _write(files.key, key, mode=0o600)
    _write(files.cert, cert, mode=0o644)
    _write(files.ca, ca, mode=0o644)
    return files


def _issue(now: dt.datetime) -> tuple[bytes, bytes, bytes]:
    """A new CA certificate, a certificate it signed for 127.0.0.1/localhost (server and client
    use), and that certificate's key, as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def builder(subject: x509.Name, public_key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(name("finpipe stack CA"))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # clocks a little apart
            .not_valid_after(now + VALID_FOR)
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder(name("finpipe stack CA"), ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    addresses = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        builder(name("finpipe dask"), key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(addresses), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data`, created with `mode` (never readable by others on the way)."""
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    partial.chmod(mode)
    partial.replace(path)


def client_security(address: str) -> Security | None:
    """The Dask security a client of the scheduler at `address` connects with: None for a
    `tcp://` address; for `tls://`, the CA and client certificate of Dask's settings (the
    environment first, then Dask's configuration files). A `tls://` address without them is a
    ConfigError saying what to set."""
    if not address.startswith("tls://"):
        return None
    import dask.config

    cert_setting, key_setting = role_settings("client")
    config_keys = {
        CA_FILE: "distributed.comm.tls.ca-file",
        cert_setting: "distributed.comm.tls.client.cert",
        key_setting: "distributed.comm.tls.client.key",
    }
    found = {
        env: os.environ.get(env) or dask.config.get(key, None) for env, key in config_keys.items()
    }
    missing = [env for env, value in found.items() if not value]
    if missing:
        raise ConfigError(
            f"the Dask scheduler {address} requires TLS but {', '.join(missing)} "
            "is not set: export the DASK_DISTRIBUTED__COMM__* lines of the stack's stack.env "
            "(the files are in its tls/ folder)"
        )
    check_client_certificate(Path(found[cert_setting]))
    return security(found)


def check_client_certificate(cert: Path, now: dt.datetime | None = None) -> None:
    """Fail on an expired client certificate (Dask would only say the handshake failed) and
    warn when it expires within RENEW_WITHIN."""
    if not cert.is_file():
        raise ConfigError(
            f"the Dask client certificate {cert} does not exist: copy the stack's tls/"
        )
    now = now or dt.datetime.now(dt.UTC)
    end = expires(cert)
    renew = (
        "`finpipe stack down` then `finpipe stack up` makes a new one (copy tls/ to hosts again)"
    )
    if end <= now:
        raise ConfigError(f"the Dask client certificate {cert} expired on {end:%Y-%m-%d}: {renew}")
    if end - now <= RENEW_WITHIN:
        log.warning(
            "the Dask client certificate %s expires on %s: %s", cert, f"{end:%Y-%m-%d}", renew
        )


def security(settings: Mapping[str, str]) -> Security:
    """A Dask client's security from Dask's TLS settings by variable name (the CA file and
    the client's certificate and key: a stack's `stack.env` values, for one), TLS required."""
    from distributed import Security

    cert, key = role_settings("client")
    return Security(
        tls_ca_file=settings[CA_FILE],
        tls_client_cert=settings[cert],
        tls_client_key=settings[key],
        require_encryption=True,
    )
