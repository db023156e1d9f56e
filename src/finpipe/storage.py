"""Storage layout and the only code that reads or writes pipeline data.

The root is a local folder (the default) or an object-store URI, `s3://bucket/prefix`, whose
server and credentials come from the standard AWS variables (`finpipe.object_store`). Callers
name what they read and write by string keys relative to the root (`partition_key`,
`landing_key`, ...) and never build paths themselves; `location(key)` says where a key is, for
messages and for tools outside finpipe. Layout under the root (see DESIGN.md):

    landing/<domain>/<batch>__<file>          files as delivered, never modified or deleted
    quarantine/<domain>/<batch>/              rejected batch + report.json + data_docs/
    validated/<domain>/YYYY-MM-DD/            rows that passed validation (Parquet)
    features/<domain>/YYYY-MM-DD/             feature rows (Parquet)
    predictions/<domain>/YYYY-MM-DD/          scores with model name, version, run id
    segments/<domain>/YYYY-MM-DD/             the scoring model's segment profiles (customers)
    reference/<domain>/<name>.parquet         data kept for reporting only (planted truths)
    backtests/<name>/...                      a walk-forward backtest's own store, same layout
    reports/                                  validation Data Docs, run summaries
    state/<domain>/batches/<sha256>.json      what ingest has seen, by content hash
    state/<domain>/superseded/<batch>.parquet published rows a correction replaced

A partition is one Parquet file, `part-0.parquet`, published whole: a reader sees the old file
or the new one, never half of one, and writing the same date twice replaces the file rather
than adding a second one. On a local disk it is written to a temporary sibling, fsynced and
renamed into place (temporary files start with "." so dataset readers skip them); on an object
store it is one PUT, which is atomic. A delivered file lands once: its key is named by its
content hash and written create-only (a hard link on disk, `If-None-Match: *` on S3), so a
second copy never replaces the first.

Every file carries its day in a `date` column typed as a calendar date (Arrow date32), and the
folder is named by the bare day. A `date=YYYY-MM-DD` (hive) folder name would say the same
thing with a second type: hive readers infer a string from the path, and pandas and pyarrow then
refuse to merge it with the file's column. With the day in the file only, `pd.read_parquet`,
`pyarrow.dataset`, Polars and DuckDB all open a whole layer in one call and agree that `date` is
a date. Stores written with the old `date=` folders are converted by `finpipe migrate-storage`.
Inside finpipe, `date` is read back as a pandas datetime64[ns] column, as it was written.

A partition's fingerprint (`fingerprint`, `partition_fingerprints`) identifies its content: the
SHA-256 of the file on disk, the ETag (an MD5 of the bytes of a single PUT) on S3. Completion
records and feature updates compare fingerprints, never modification times, to tell whether
data changed since something was computed from it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from finpipe.errors import ConfigError, StorageError
from finpipe.faults import crash_point

LAYERS = ("validated", "features", "predictions", "segments")
PARTITION_FILE = "part-0.parquet"
DAY_COLUMN = "date"
LEGACY_PREFIX = "date="  # the hive folder names of stores written before the bare-day layout
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_DAY_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SAFE_FILE = re.compile(r"[^A-Za-z0-9._-]+")
# A stored file name's longest form: with the landing hash and a temporary name's wrapper
# it stays well under the 255 bytes a file name may have.
_LONGEST_NAME = 150


def _stored_name(name: str) -> str:
    """Return `name` as finpipe stores a delivered file: safe characters only, and a name
    longer than 150 characters shortened in its middle (its start and its suffixes kept)."""
    safe = _SAFE_FILE.sub("_", name).lstrip(".") or "file"
    if len(safe) <= _LONGEST_NAME:
        return safe
    suffixes = "".join(Path(safe).suffixes[-2:])[:20]
    return f"{safe[: _LONGEST_NAME - len(suffixes) - 1]}~{suffixes}"


_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.IGNORECASE)
BATCHES = "batches"
# Reads of many small objects wait on the network, not the CPU: more of them at once.
_REMOTE_READERS = 16


def is_store_url(root: object) -> bool:
    """Whether `root` names an object store (`scheme://...`) rather than a local folder."""
    return isinstance(root, str) and _URL.match(root) is not None


def check_name(value: str, what: str = "domain") -> str:
    """Return `value` if it is a safe path component (lower-case word), else raise ConfigError."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"invalid {what} {value!r}: use lower-case letters, digits and '_' "
            "(no path separators or '..')"
        )
    return value


def as_day(value: dt.date | dt.datetime | pd.Timestamp | str) -> dt.date:
    """Return a calendar day from a date, timestamp or ISO string; ConfigError if unparseable."""
    if isinstance(value, str):  # first: listings parse thousands of folder names
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            raise ConfigError(f"invalid date {value!r}: expected YYYY-MM-DD") from None
    if isinstance(value, pd.Timestamp):
        return value.date()
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise ConfigError(f"invalid date {value!r}: expected YYYY-MM-DD") from None


def _file_in(layer_dir: str, day: dt.date) -> str:
    """The partition file of `day` under a layer folder, as a string (no Path per day)."""
    return f"{layer_dir}/{day.isoformat()}/{PARTITION_FILE}"


def days_as_dates(table: pa.Table) -> pa.Table:
    """Return `table` with its `date` column stored as calendar days (date32), not timestamps."""
    index = table.schema.get_field_index(DAY_COLUMN)
    if index < 0 or not pa.types.is_timestamp(table.schema.field(index).type):
        return table
    column = table.column(index)
    if column.type.tz is not None:
        raise StorageError(f"the {DAY_COLUMN!r} column must be a calendar day, not {column.type}")
    return table.set_column(index, DAY_COLUMN, column.cast(pa.date32()))


def _days_as_timestamps(table: pa.Table) -> pa.Table:
    """Return `table` with a date32 `date` column as timestamp[ns]: finpipe's frames keep the
    pandas datetime64[ns] they were written with."""
    index = table.schema.get_field_index(DAY_COLUMN)
    if index < 0 or not pa.types.is_date(table.schema.field(index).type):
        return table
    return table.set_column(index, DAY_COLUMN, table.column(index).cast(pa.timestamp("ns")))


def _to_frame(table: pa.Table) -> pd.DataFrame:
    """A table read from a partition as the frame finpipe wrote."""
    return _days_as_timestamps(table).to_pandas()


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` via a temporary sibling and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a written file's data to disk before it is renamed into place."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _scan(files: list[str], columns: list[str] | None, where: pc.Expression) -> pd.DataFrame:
    """Return the rows `where` selects from `files`, with the schema unified over every file.

    Arrow's dataset scanner filters each file in its own threads, without a Python call per
    file. Reading every file's schema costs about 70 us a file (a twentieth of a nightly credit
    scan of 730 partitions), so `read_partitions` comes here only when neither end file holds
    a wanted column (see `_schema_for`).
    """
    factory = pads.FileSystemDatasetFactory(
        pafs.LocalFileSystem(), files, pads.ParquetFileFormat(), pads.FileSystemFactoryOptions()
    )
    unified = factory.inspect(promote_options="permissive")
    chosen = None if columns is None else [c for c in columns if c in unified.names]
    return _to_frame(factory.finish(unified).to_table(columns=chosen, filter=where))


def _schema_for(first: str, last: str, columns: list[str] | None) -> pa.Schema | None:
    """Return the schema of `columns` (every column when None) as the first and last files
    hold them (types promoted across the two), or None when neither has one of them.

    Every file is then read as that schema: a file without a column gives nulls, a narrower
    type (int, null) is widened, one that cannot be cast safely is an error. None sends the
    caller back to reading every file's own schema, which finds a column wherever it is.
    """
    schemas = [pq.read_schema(first), pq.read_schema(last)]
    unified = pa.unify_schemas(schemas, promote_options="permissive")
    if columns is None:
        return pa.schema(list(unified), metadata=schemas[-1].metadata)
    if any(c not in unified.names for c in columns):
        return None
    return pa.schema([unified.field(c) for c in columns], metadata=schemas[-1].metadata)


def write_json_atomic(path: Path, payload: object) -> None:
    """Write `payload` as indented JSON, atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str)
    write_bytes_atomic(path, text.encode())


def _json_bytes(payload: object) -> bytes:
    return json.dumps(payload, indent=2, sort_keys=True, default=str).encode()


def _create_file(path: Path, write: Any) -> bool:
    """Create `path` from `write(handle)` unless it exists; return whether this call made it.

    Written to a temporary sibling, fsynced, then hard-linked into place: the link fails if
    the name exists, so a file is never replaced, and a reader never sees half of it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


class Storage:
    """The pipeline's data root, a local folder or an object store, and its layout.

    `Storage(path)` is a local folder; `Storage("s3://bucket/prefix")` keeps the same layout
    under that prefix of the bucket. Everything is addressed by string keys relative to the root.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        text = os.fspath(root)
        matched = _URL.match(text)
        if matched is None:
            self.is_local = True
            self._base = os.path.abspath(text)
            self.url = self._base
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self._bucket = self._prefix = ""
            return
        scheme, rest = matched.group(1).lower(), matched.group(2).strip("/")
        if scheme != "s3":
            raise ConfigError(
                f"FINPIPE_HOME {text!r}: unsupported store {scheme}://; use a local folder or "
                "s3://bucket/prefix (any S3-compatible server, via AWS_ENDPOINT_URL)"
            )
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ConfigError(f"FINPIPE_HOME {text!r}: name the bucket, as s3://bucket/prefix")
        from finpipe.object_store import connect

        self.is_local = False
        self._bucket, self._prefix = bucket, prefix.strip("/")
        self._base = rest
        self.url = f"s3://{rest}"
        self._s3 = connect()
        self.fs = self._s3.fs
        self._bucket_seen = False

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def _check_bucket(self) -> None:
        """Raise ConfigError when the bucket does not exist: a listing finds nothing in a
        missing bucket as in an empty folder, and a typo in the bucket's name would read as an
        empty store (every date "no data", runs that succeed). Asked once per Storage."""
        if self._bucket_seen:
            return
        if not self._s3.bucket_exists(self._bucket):
            raise ConfigError(
                f"FINPIPE_HOME {self.url}: the bucket {self._bucket!r} does not exist on "
                f"{self._s3.endpoint}; fix its name, or create it (`finpipe stack up` creates "
                "the team's)"
            )
        self._bucket_seen = True

    # -- keys ----------------------------------------------------------------------------
    @staticmethod
    def layer_key(layer: str, domain: str) -> str:
        if layer not in LAYERS:
            raise ConfigError(f"unknown storage layer {layer!r}; expected one of {LAYERS}")
        return f"{layer}/{check_name(domain)}"

    def partition_key(self, layer: str, domain: str, day: dt.date | str) -> str:
        """The key of a partition's file: `<layer>/<domain>/<YYYY-MM-DD>/part-0.parquet`."""
        return _file_in(self.layer_key(layer, domain), as_day(day))

    @staticmethod
    def landing_key(domain: str) -> str:
        return f"landing/{check_name(domain)}"

    @staticmethod
    def quarantine_key(domain: str, batch_id: str | None = None) -> str:
        folder = f"quarantine/{check_name(domain)}"
        return folder if batch_id is None else f"{folder}/{check_name(batch_id, 'batch id')}"

    @classmethod
    def quarantine_report_key(cls, domain: str, batch_id: str) -> str:
        """`quarantine/<domain>/<batch>/report.json`: the report kept beside a rejected file."""
        return f"{cls.quarantine_key(domain, batch_id)}/report.json"

    @staticmethod
    def reports_key(*parts: str) -> str:
        """`reports/<parts...>`: each part one safe file or folder name."""
        return "/".join(["reports", *(_safe_part(part) for part in parts)])

    @staticmethod
    def state_key(domain: str, *parts: str) -> str:
        """`state/<domain>/<parts...>`: what the pipeline records about a domain's runs."""
        return "/".join(["state", check_name(domain), *(_safe_part(part) for part in parts)])

    def batch_record_key(self, domain: str, sha256: str) -> str:
        return self.state_key(domain, BATCHES, f"{sha256}.json")

    @staticmethod
    def reference_key(domain: str, name: str) -> str:
        """reference/<domain>/<name>.parquet: data kept beside a domain's layers for reporting
        only, e.g. a synthetic data set's planted truth (never read by training or scoring)."""
        return f"reference/{check_name(domain)}/{check_name(name, 'name')}.parquet"

    def backtest_store(self, name: str) -> Storage:
        """The store of backtest `name`: a Storage rooted at `backtests/<name>/` under this
        root, with the same layout (`predictions/<domain>/YYYY-MM-DD/`, `state/<domain>/`), so
        a backtest's outputs never mix with the nightly's (`finpipe.backtest`)."""
        return Storage(self.location(f"backtests/{check_name(name, 'backtest name')}"))

    def location(self, key: str = "") -> str:
        """Where `key` is, for messages and for tools outside finpipe: a local path, or an
        `s3://bucket/prefix/key` URI."""
        if self.is_local:
            return os.path.join(self._base, key) if key else self._base
        return f"{self.url}/{key}" if key else self.url

    def local_path(self, key: str = "") -> Path:
        """The file or folder of `key` on a local store (for tools that open files directly);
        StorageError on an object store, which has no such path."""
        if not self.is_local:
            raise StorageError(
                f"{self.location(key)} is in an object store: there is no local path; read it "
                "through finpipe.storage.Storage"
            )
        return Path(self._base, key) if key else Path(self._base)

    def _path(self, key: str) -> str:
        """`key` as a path of `self.fs`."""
        return f"{self._base}/{key}" if key else self._base

    def _object(self, key: str) -> str:
        """`key` as an object key of the bucket."""
        return f"{self._prefix}/{key}" if self._prefix else key

    # Folders of a local store, for tests, benchmarks and tools that read files directly.
    @property
    def root(self) -> Path:
        return self.local_path()

    def layer_dir(self, layer: str, domain: str) -> Path:
        return self.local_path(self.layer_key(layer, domain))

    def partition_dir(self, layer: str, domain: str, day: dt.date | str) -> Path:
        return self.partition_file(layer, domain, day).parent

    def partition_file(self, layer: str, domain: str, day: dt.date | str) -> Path:
        return self.local_path(self.partition_key(layer, domain, day))

    def landing_dir(self, domain: str) -> Path:
        return self.local_path(self.landing_key(domain))

    def quarantine_dir(self, domain: str) -> Path:
        return self.local_path(self.quarantine_key(domain))

    def reports_dir(self) -> Path:
        return self.local_path(self.reports_key())

    def state_dir(self, domain: str) -> Path:
        return self.local_path(self.state_key(domain))

    # -- objects -------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        """Whether a file (object) is stored under `key`."""
        if self.is_local:
            return os.path.isfile(self._path(key))
        info = self._remote(lambda: self.fs.get_file_info(self._path(key)), key)
        return info.type == pafs.FileType.File

    def read_bytes(self, key: str) -> bytes:
        """Return the bytes stored under `key`; FileNotFoundError when there are none."""
        if self.is_local:
            with open(self._path(key), "rb") as handle:
                return handle.read()
        return self._s3.get(self._bucket, self._object(key))

    def write_bytes(self, key: str, payload: bytes) -> None:
        """Store `payload` under `key`, replacing what was there, atomically."""
        if self.is_local:
            write_bytes_atomic(Path(self._path(key)), payload)
        else:
            self._s3.put(self._bucket, self._object(key), payload, create_only=False)

    def create_bytes(self, key: str, payload: bytes) -> bool:
        """Store `payload` under `key` unless something is there; return whether it was stored.

        Create-only, also between machines: the store itself refuses the second writer.
        """
        if self.is_local:
            return _create_file(Path(self._path(key)), lambda handle: handle.write(payload))
        return self._s3.put(self._bucket, self._object(key), payload, create_only=True)

    def read_json(self, key: str) -> Any:
        """Return the JSON stored under `key`, or None when there is none."""
        try:
            return json.loads(self.read_bytes(key))
        except FileNotFoundError:
            return None

    def write_json(self, key: str, payload: object) -> None:
        """Store `payload` as indented JSON under `key`, atomically."""
        self.write_bytes(key, _json_bytes(payload))

    def list_names(self, key: str) -> list[str]:
        """Return the names directly under the folder `key` (files and folders; none if absent)."""
        if self.is_local:
            try:
                return os.listdir(self._path(key))
            except (FileNotFoundError, NotADirectoryError):
                return []
        selector = pafs.FileSelector(self._path(key), recursive=False, allow_not_found=True)
        infos = self._remote(lambda: self.fs.get_file_info(selector), key)
        if not infos:
            self._check_bucket()
        return [info.base_name for info in infos]

    def list_files(self, key: str) -> list[str]:
        """Return the keys of every file under the folder `key`, at any depth, sorted."""
        base = self._path(key)
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self._remote(lambda: self.fs.get_file_info(selector), key)
        if not infos and not self.is_local:
            self._check_bucket()
        cut = len(self._base) + 1
        return sorted(i.path[cut:] for i in infos if i.type == pafs.FileType.File)

    def delete_folder(self, key: str) -> None:
        """Remove the folder `key` and everything under it (nothing if absent)."""
        if self.is_local:
            shutil.rmtree(self._path(key), ignore_errors=True)
            return
        keys = [self._object(k) for k in self.list_files(key)]
        self._s3.delete(self._bucket, keys)

    def upload_folder(self, folder: Path, key: str) -> None:
        """Store every file of the local `folder` under `key`, replacing what was there."""
        if self.is_local:
            target = Path(self._path(key))
            if target == Path(folder).resolve():
                return
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(folder, target)
            return
        self.delete_folder(key)
        files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file()]

        def put(path: Path) -> None:
            name = path.relative_to(folder).as_posix()
            self.write_bytes(f"{key}/{name}", path.read_bytes())

        with ThreadPoolExecutor(max_workers=_REMOTE_READERS) as pool:
            list(pool.map(put, files))

    @contextlib.contextmanager
    def local_folder(self, key: str) -> Iterator[Path]:
        """A local folder for what must be built on a disk (Great Expectations' Data Docs),
        stored under `key` when the block ends, whether it ends well or not.

        On a local store it is the store's own folder; on an object store a temporary folder,
        uploaded (if anything was built in it) and removed.
        """
        if self.is_local:
            yield Path(self._path(key))
            return
        scratch = Path(tempfile.mkdtemp(prefix="finpipe-build-"))
        folder = scratch / "out"
        try:
            yield folder
        finally:
            try:
                if folder.is_dir() and any(folder.iterdir()):
                    self.upload_folder(folder, key)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

    def fingerprint(self, key: str) -> str | None:
        """Return the content fingerprint of the file under `key` (see the module docstring),
        or None when there is none."""
        if self.is_local:
            path = Path(self._path(key))
            return file_sha256(path) if path.is_file() else None
        return self._s3.etag(self._bucket, self._object(key))

    def partition_fingerprints(
        self, layer: str, domain: str, days: Iterable[dt.date] | None = None
    ) -> dict[dt.date, str]:
        """Return the fingerprint of each published partition (of `days` only, when given):
        one listing on an object store, the files' hashes on disk."""
        wanted = None if days is None else set(days)
        if self.is_local:
            chosen = self.partition_dates(layer, domain) if wanted is None else sorted(wanted)
            files = dict(zip(chosen, self._partition_files(layer, domain, chosen), strict=True))

            def digest(day: dt.date) -> tuple[dt.date, str | None]:
                try:
                    return day, file_sha256(Path(files[day]))
                except FileNotFoundError:
                    return day, None

            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
                found = dict(pool.map(digest, chosen))
            return {day: sha for day, sha in found.items() if sha is not None}
        prefix = self._object(self.layer_key(layer, domain)) + "/"
        out = {}
        for key, etag in self._s3.etags(self._bucket, prefix):
            folder, _, name = key[len(prefix) :].partition("/")
            if name == PARTITION_FILE and _DAY_FOLDER.match(folder):
                day = as_day(folder)
                if wanted is None or day in wanted:
                    out[day] = etag
        return out

    def _remote(self, action: Any, key: str) -> Any:
        """Run a pyarrow request on the object store; a failure other than a missing key
        becomes StorageError naming `key` (StoreUnavailable when the server did not answer)."""
        if self.is_local:
            return action()
        from finpipe.object_store import as_storage_error

        try:
            return action()
        except FileNotFoundError:
            raise
        except OSError as error:
            raise as_storage_error(error, f"cannot read {self.location(key)}") from error

    # -- partitions ----------------------------------------------------------------------
    def _partition_files(self, layer: str, domain: str, days: Iterable[dt.date]) -> list[str]:
        """The file system path of each day's partition, built without a Path per day (a
        nightly credit scan names 730 of them)."""
        base = self._path(self.layer_key(layer, domain))
        return [_file_in(base, as_day(day)) for day in days]

    def write_partition(
        self, layer: str, domain: str, day: dt.date | str, frame: pd.DataFrame | pa.Table
    ) -> str:
        """Publish `frame` as the whole partition for `day`, atomically; return its key.

        Writing the same day again replaces the partition (idempotent), never appends. An Arrow
        table (e.g. a slice of a block converted once) is written as it is.
        """
        key = self.partition_key(layer, domain, day)
        if isinstance(frame, pa.Table):
            table = frame
        else:
            table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
        table = days_as_dates(table)
        # Dictionary-encode only non-float columns: on float columns a dictionary page rarely
        # pays (few repeats) and costs about a third of the write time.
        dictionary = [f.name for f in table.schema if not pa.types.is_floating(f.type)]
        options: dict[str, Any] = {"compression": "zstd", "use_dictionary": dictionary}
        if not self.is_local:
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, **options)
            crash_point("partition-before-publish")
            self._s3.put(
                self._bucket, self._object(key), sink.getvalue().to_pybytes(), create_only=False
            )
            return key
        target = Path(self._path(key))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{PARTITION_FILE}.{uuid.uuid4().hex}.tmp")
        published = False
        try:
            # An open file as the sink: a path would make pyarrow resolve a filesystem (and
            # stat the path) for every partition, which shows in a write of thousands.
            with pa.OSFile(str(tmp), "wb") as sink:
                pq.write_table(table, sink, **options)
            _fsync(tmp)
            crash_point("partition-before-publish")
            os.replace(tmp, target)
            published = True
        except OSError as error:
            raise StorageError(
                f"cannot write partition {target}: {error.strerror or error}; "
                "nothing was published for this date"
            ) from error
        finally:
            if not published:
                tmp.unlink(missing_ok=True)
        return key

    def delete_partition(self, layer: str, domain: str, day: dt.date | str) -> bool:
        """Remove the partition of `day`, atomically (its one file goes in one step); return
        whether there was one. A date with no partition reads as never published."""
        key = self.partition_key(layer, domain, day)
        if not self.is_local:
            there = self.exists(key)
            if there:
                self._s3.delete(self._bucket, [self._object(key)])
            return there
        target = Path(self._path(key))
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):  # a leftover folder is not a partition
            target.parent.rmdir()
        return True

    def partition_dates(
        self,
        layer: str,
        domain: str,
        start: dt.date | str | None = None,
        end: dt.date | str | None = None,
        *,
        last: int | None = None,
    ) -> list[dt.date]:
        """Return the sorted days that have a published partition in [start, end] (only the
        `last` latest of them when given: scoring needs a few dates, not a stat of them all)."""
        lo = as_day(start) if start is not None else dt.date.min
        hi = as_day(end) if end is not None else dt.date.max
        if not self.is_local:
            published = [d for d in self._published_days(layer, domain) if lo <= d <= hi]
            return published[-last:] if last else published
        base = self._path(self.layer_key(layer, domain))
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            return []
        named = []
        for name in names:
            if not _DAY_FOLDER.match(name):
                _refuse_legacy(base, name)
                continue  # temporary and foreign entries are not partitions
            day = as_day(name)
            if lo <= day <= hi:
                named.append(day)
        named.sort(reverse=True)
        # Newest first, each file named only when it is looked at: a scoring night wants the
        # last 21 of thousands, and naming them all cost as much as listing the folder.
        days = []
        for day in named:
            if os.path.exists(_file_in(base, day)):
                days.append(day)  # a folder without its file is not published
                if last is not None and len(days) == last:
                    break
        return days[::-1]

    def _published_days(self, layer: str, domain: str) -> list[dt.date]:
        """The days with a partition object, from one (paged) listing of the layer."""
        key = self.layer_key(layer, domain)
        days = []
        for found in self.list_files(key):
            folder, _, name = found[len(key) + 1 :].partition("/")
            if not _DAY_FOLDER.match(folder):
                _refuse_legacy(self.location(key), folder)
            elif name == PARTITION_FILE:
                days.append(as_day(folder))
        return sorted(days)

    def read_partitions(
        self,
        layer: str,
        domain: str,
        start: dt.date | str | None = None,
        end: dt.date | str | None = None,
        columns: Iterable[str] | None = None,
        days: Iterable[dt.date] | None = None,
        where: pc.Expression | None = None,
    ) -> pd.DataFrame:
        """Return the rows of every partition in [start, end] (or of `days`), as one frame.

        `where` (a pyarrow expression) keeps only the rows it selects, filtered as the files
        are scanned, before anything is converted to pandas.
        """
        chosen = list(days) if days is not None else self.partition_dates(layer, domain, start, end)
        if not chosen:
            return pd.DataFrame(columns=list(columns) if columns else None)
        wanted = list(columns) if columns else None
        if not self.is_local:
            keys = [self.partition_key(layer, domain, day) for day in chosen]
            return _to_frame(self._read_objects(keys, wanted, where))
        files = self._partition_files(layer, domain, chosen)

        def read(file: str) -> pa.Table:
            # Small files: one plain read each, no read-ahead buffers or threads of its own,
            # opened directly rather than through a filesystem resolved per path.
            with pa.OSFile(file) as source:
                parquet = pq.ParquetFile(source, pre_buffer=False)
                held = parquet.schema_arrow.names  # a column a file lacks comes back null
                chosen = None if wanted is None else [c for c in wanted if c in held]
                return parquet.read(columns=chosen, use_threads=False)

        # A filtered scan, or chosen columns of many files: one call into Arrow, which reads
        # (and filters) the files in its threads, typed as the first and last files hold them.
        if where is not None or (wanted is not None and len(files) > 1):
            schema = _schema_for(files[0], files[-1], wanted)
            if schema is not None:
                dataset = pads.dataset(files, schema=schema, format="parquet")
                return _to_frame(dataset.to_table(filter=where))
            if where is not None:
                return _scan(files, wanted, where)
        # One file per date: a few threads read them (decoding releases the GIL), and the
        # tables are stacked with their schemas unified, as a dataset scan would.
        if len(files) == 1:
            tables = [read(files[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
                tables = list(pool.map(read, files))
        return _to_frame(pa.concat_tables(tables, promote_options="permissive"))

    def _read_objects(
        self, keys: list[str], wanted: list[str] | None, where: pc.Expression | None
    ) -> pa.Table:
        """The rows of Parquet objects, each read in one GET (see `object_store`), stacked with
        their schemas unified (a column an object lacks is null), filtered by `where`."""

        def read(key: str) -> pa.Table:
            parquet = pq.ParquetFile(pa.BufferReader(self.read_bytes(key)))
            held = parquet.schema_arrow.names
            chosen = None if wanted is None or where is not None else wanted
            return parquet.read(
                columns=None if chosen is None else [c for c in chosen if c in held]
            )

        with ThreadPoolExecutor(max_workers=min(_REMOTE_READERS, len(keys))) as pool:
            tables = list(pool.map(read, keys))
        table = pa.concat_tables(tables, promote_options="permissive")
        if where is not None:
            table = table.filter(where)
        if wanted is not None:
            table = table.select([c for c in wanted if c in table.column_names])
        return table

    def read_partition(self, layer: str, domain: str, day: dt.date | str) -> pd.DataFrame:
        """Return one partition's rows; FileNotFoundError if it was never published."""
        key = self.partition_key(layer, domain, day)
        if self.is_local:
            # One open file: read by path, pyarrow opens it twice (schema, then rows), and a
            # partition replaced in between would be read as the old footer over new bytes.
            with pa.OSFile(self._path(key)) as source:
                return _to_frame(pq.read_table(source))
        return _to_frame(pq.read_table(pa.BufferReader(self.read_bytes(key))))

    def partition_rows(self, layer: str, domain: str, day: dt.date | str) -> int:
        """Return the row count of a published partition, from its Parquet footer."""
        key = self.partition_key(layer, domain, day)
        if self.is_local:
            return pq.ParquetFile(self._path(key)).metadata.num_rows
        return pq.ParquetFile(pa.BufferReader(self.read_bytes(key))).metadata.num_rows

    def partition_columns(self, layer: str, domain: str, day: dt.date | str) -> list[str]:
        """Return the column names of a published partition, in order, from its footer."""
        key = self.partition_key(layer, domain, day)
        if self.is_local:
            return pq.read_schema(self._path(key)).names
        return pq.read_schema(pa.BufferReader(self.read_bytes(key))).names

    # -- landing and quarantine ----------------------------------------------------------
    def land_file(self, domain: str, source: Path, sha256: str) -> str:
        """Copy a delivered file into landing/ under its content hash; return its key.

        Create-only: a file lands once, and a later copy under the same name (the same
        content) never replaces it, on one machine or several.
        """
        key = f"{self.landing_key(domain)}/{sha256[:12]}__{_stored_name(Path(source).name)}"
        if self.exists(key):
            return key
        if self.is_local:
            with open(source, "rb") as original:
                _create_file(
                    Path(self._path(key)), lambda handle: shutil.copyfileobj(original, handle)
                )
        else:
            with open(source, "rb") as original:
                self._s3.put(self._bucket, self._object(key), original, create_only=True)
        return key

    def quarantine_batch(
        self,
        domain: str,
        batch_id: str,
        landed: str,
        report: dict,
        data_docs: Path | None = None,
        file_name: str | None = None,
    ) -> str:
        """Keep a rejected batch (the landed file of key `landed`) with its report and Data
        Docs under quarantine/; return the folder's key.

        A reader never sees a quarantine entry without its report: on disk it is built in a
        hidden staging folder and renamed into place; on an object store its report is the
        last object written.
        """
        key = self.quarantine_key(domain, batch_id)
        name = _stored_name(file_name or Path(landed).name)
        if not self.is_local:
            # Over an earlier entry of the batch, its report stays until the new one replaces
            # it (the last object written): never an entry without a report, even if killed.
            self._s3.copy(self._bucket, self._object(landed), self._object(f"{key}/{name}"))
            docs = data_docs is not None and Path(data_docs).exists()
            if data_docs is not None and docs:
                self.upload_folder(Path(data_docs), f"{key}/data_docs")
            self.write_json(f"{key}/report.json", report)
            # then what the earlier entry left: its copy under another name, its Data Docs
            kept = {f"{key}/{name}", f"{key}/report.json"}
            stale = [
                found
                for found in self.list_files(key)
                if found not in kept and not (docs and found.startswith(f"{key}/data_docs/"))
            ]
            if stale:
                self._s3.delete(self._bucket, [self._object(found) for found in stale])
            return key
        final = Path(self._path(key))
        staging = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        staging.mkdir(parents=True)
        try:
            shutil.copyfile(self._path(landed), staging / name)
            write_json_atomic(staging / "report.json", report)
            if data_docs is not None and Path(data_docs).exists():
                from finpipe.docs_assets import copy_site  # the assets are links, not copies

                copy_site(Path(data_docs), staging / "data_docs")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return key

    # -- ingest state --------------------------------------------------------------------
    def read_batch_record(self, domain: str, sha256: str) -> dict | None:
        return self.read_json(self.batch_record_key(domain, sha256))

    def write_batch_record(self, domain: str, record: dict) -> None:
        """Store a delivered file's record, replacing its earlier state (landed, then validated
        or quarantined) in one atomic write."""
        self.write_json(self.batch_record_key(domain, record["sha256"]), record)

    def batch_records(self, domain: str) -> list[dict]:
        keys = [k for k in self.list_files(self.state_key(domain, BATCHES)) if k.endswith(".json")]
        records = [self.read_json(key) for key in keys]
        return sorted(
            (r for r in records if r is not None),
            key=lambda r: (r.get("landed_at", ""), r["sha256"]),
        )

    # -- reference data ------------------------------------------------------------------
    def write_reference(self, domain: str, name: str, frame: pd.DataFrame) -> str:
        """Keep `frame` as the domain's reference `name`, replaced atomically; return its key."""
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
        key = self.reference_key(domain, name)
        self.write_bytes(key, sink.getvalue().to_pybytes())
        return key

    def read_reference(
        self, domain: str, name: str, filters: list[tuple[str, str, object]] | None = None
    ) -> pd.DataFrame | None:
        """Return the domain's reference `name` (the rows pyarrow `filters` keep), or None when
        it was never written."""
        key = self.reference_key(domain, name)
        if self.is_local:
            path = self._path(key)
            return pd.read_parquet(path, filters=filters) if os.path.exists(path) else None
        try:
            source = pa.BufferReader(self.read_bytes(key))
        except FileNotFoundError:
            return None
        return pq.read_table(source, filters=filters).to_pandas()


def _refuse_legacy(where: str, name: str) -> None:
    """Raise StorageError if `name`, an entry of a layer, is a folder of the old hive layout."""
    if name.startswith(LEGACY_PREFIX):
        raise StorageError(
            f"{where} holds {name!r}, a folder of the old hive layout; run "
            "`finpipe migrate-storage` once to convert the store to bare-day folders"
        )


def _safe_part(part: str) -> str:
    """Return `part` if it is one safe file or folder name (no separators, no '..')."""
    if not part or part in {".", ".."} or "/" in part or "\\" in part or "\x00" in part:
        raise ConfigError(f"invalid storage name {part!r}: one file or folder name expected")
    return part
