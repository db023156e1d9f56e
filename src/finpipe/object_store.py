"""The connection to an S3-compatible object store, for `finpipe.storage`.

Settings come from the standard AWS variables, so that one set serves boto3, pyarrow and MLflow:
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION` and `AWS_ENDPOINT_URL` (the
address of a server other than Amazon's, e.g. `http://127.0.0.1:9000`; its scheme chooses http
or https). Listings go through pyarrow's `S3FileSystem`; every object is read with one
`GetObject` and written with one `PutObject` through boto3, which also sends the create-only
condition (`If-None-Match: *`) that pyarrow has no way to send, and lists the objects' ETags (an
object's content fingerprint). One request per read matters: pyarrow reads a Parquet object in
several (its size, the footer, the column chunks), and a partition replaced in between would be
read as a mix of two files.

Connections are made once per process and set of credentials: a boto3 client takes a fifth of
a second to build, and both clients are safe to share between threads.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from finpipe.errors import ConfigError, StorageError, StoreUnavailable

ENV_NAMES = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
_T = TypeVar("_T")
# A create-only write that meets another one in flight gets 409; it is sent again this often.
_CONFLICT_RETRIES = 5


@dataclass(frozen=True)
class S3Connection:
    """pyarrow's file system and a boto3 client for one endpoint and set of credentials."""

    fs: pafs.S3FileSystem
    client: Any  # botocore's S3 client (its type is generated at run time)
    endpoint: str

    def put(self, bucket: str, key: str, body: bytes | IO[bytes], *, create_only: bool) -> bool:
        """Store `body` as one object; return False when `create_only` and it already exists.

        A single PUT is atomic: readers see the old object or the new one, never a part.
        """
        condition = {"IfNoneMatch": "*"} if create_only else {}
        for attempt in range(_CONFLICT_RETRIES):
            if attempt and hasattr(body, "seek"):
                body.seek(0)
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=body, **condition)
                return True
            except Exception as error:
                status = _status(error)
                if create_only and status == 412:  # PreconditionFailed: it exists
                    return False
                if not (create_only and status == 409) or attempt + 1 == _CONFLICT_RETRIES:
                    raise as_storage_error(error, f"cannot write s3://{bucket}/{key}") from error
                time.sleep(0.05 * 2**attempt)  # another create of the key is in flight
        return False  # pragma: no cover (the loop returns or raises)

    def bucket_exists(self, bucket: str) -> bool:
        """Whether `bucket` exists (one HEAD request; a bucket these credentials may not see
        counts as existing: its reads say why they fail)."""
        try:
            self.client.head_bucket(Bucket=bucket)
        except Exception as error:
            if _status(error) == 404:
                return False
            if _status(error) == 403:
                return True
            raise as_storage_error(error, f"cannot reach s3://{bucket}") from error
        return True

    def get(self, bucket: str, key: str) -> bytes:
        """Return an object's bytes from one GET; FileNotFoundError when there is no such key.

        One request, so the bytes are one version of the object. A pyarrow read is several
        (the size, then byte ranges: the footer, the columns), and an object replaced between
        two of them would give a mix of two files.
        """
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
            return bytes(response["Body"].read())
        except Exception as error:
            if _status(error) == 404:
                raise FileNotFoundError(f"s3://{bucket}/{key}: no such object") from None
            raise as_storage_error(error, f"cannot read s3://{bucket}/{key}") from error

    def copy(self, bucket: str, source: str, target: str) -> None:
        """Copy one object to another key of the bucket, on the server."""
        call(
            lambda: self.client.copy_object(
                Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": source}
            ),
            f"cannot copy s3://{bucket}/{source}",
        )

    def etags(self, bucket: str, prefix: str) -> Iterator[tuple[str, str]]:
        """Yield (key, ETag) of every object whose key starts with `prefix` (one request per
        thousand objects)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        try:
            for page in pages:
                for entry in page.get("Contents", ()):
                    yield entry["Key"], entry["ETag"].strip('"')
        except Exception as error:
            raise as_storage_error(error, f"cannot list s3://{bucket}/{prefix}") from error

    def etag(self, bucket: str, key: str) -> str | None:
        """Return the ETag of one object, or None when there is no such object."""
        try:
            return str(self.client.head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')
        except Exception as error:
            if _status(error) == 404:
                return None
            raise as_storage_error(error, f"cannot read s3://{bucket}/{key}") from error

    def delete(self, bucket: str, keys: list[str]) -> None:
        """Delete objects (a thousand per request)."""
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": key} for key in keys[start : start + 1000]]
            try:
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
            except Exception as error:
                raise as_storage_error(error, f"cannot delete under s3://{bucket}") from error


def connect() -> S3Connection:
    """Return the connection the AWS variables describe now (made once per distinct set)."""
    return _connect(*(os.environ.get(name, "") for name in ENV_NAMES))


@functools.lru_cache(maxsize=8)
def _connect(endpoint: str, region: str, key_id: str, secret: str) -> S3Connection:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError(
            "an s3:// FINPIPE_HOME needs boto3: pip install 'finpipe[team]'"
        ) from None
    options: dict[str, Any] = {"region": region or "us-east-1"}
    if key_id and secret:
        options.update(access_key=key_id, secret_key=secret)
    if endpoint:
        if "://" not in endpoint:
            raise ConfigError(
                f"AWS_ENDPOINT_URL={endpoint!r} needs its scheme: http://{endpoint} or "
                f"https://{endpoint}"
            )
        parts = urlsplit(endpoint)
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    fs = pafs.S3FileSystem(connect_timeout=5, request_timeout=60, **options)
    client = boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=region or "us-east-1",
        aws_access_key_id=key_id or None,
        aws_secret_access_key=secret or None,
        config=Config(
            retries={"max_attempts": 4, "mode": "standard"},
            max_pool_connections=16,
            connect_timeout=5,
            read_timeout=60,
        ),
    )
    return S3Connection(fs, client, endpoint or "Amazon S3")


def call(action: Callable[[], _T], what: str) -> _T:
    """Run one request, turning its failure into StorageError (StoreUnavailable when the server
    cannot be reached: worth retrying)."""
    try:
        return action()
    except Exception as error:
        raise as_storage_error(error, what) from error


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def as_storage_error(error: Exception, what: str) -> StorageError:
    """Name what failed and why, without the request's headers (which carry the signature)."""
    if isinstance(error, StorageError):
        return error
    name = type(error).__name__
    unreachable = name in {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
    } or (isinstance(error, OSError) and _unreachable_message(str(error)))
    if unreachable:
        return StoreUnavailable(f"{what}: the object store did not answer ({name}); retry later")
    status = _status(error)
    reason = f"HTTP {status}" if status else name
    if not status and isinstance(error, OSError) and str(error).strip():
        # pyarrow's own words, e.g. "AWS Error SIGNATURE_DOES_NOT_MATCH ... check your key"
        reason = f"{name}: {str(error).strip().splitlines()[0][:300]}"
    detail = getattr(error, "response", {}).get("Error", {}).get("Message") if status else None
    return StorageError(f"{what}: {reason}{f' ({detail})' if detail else ''}")


def _unreachable_message(message: str) -> bool:
    lowered = message.lower()
    return any(
        marker in lowered
        for marker in ("couldn't connect", "connection refused", "curlcode: 7", "timed out")
    )
