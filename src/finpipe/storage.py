"""Storage layout and the only code that reads or writes pipeline data.

Layout under the root (see DESIGN.md):

    landing/<domain>/<batch>__<file>          files as delivered, never modified or deleted
    quarantine/<domain>/<batch>/              rejected batch + report.json + data_docs/
    validated/<domain>/YYYY-MM-DD/            rows that passed validation (Parquet)
    features/<domain>/YYYY-MM-DD/             feature rows (Parquet)
    predictions/<domain>/YYYY-MM-DD/          scores with model name, version, run id
    segments/<domain>/YYYY-MM-DD/             the scoring model's segment profiles (customers)
    reports/                                  validation Data Docs, run summaries
    state/<domain>/batches/<sha256>.json      what ingest has seen, by content hash

A partition is one Parquet file, `part-0.parquet`, published with an atomic rename: a reader
sees the old file or the new one, never half of one, and writing the same date twice replaces
the file rather than adding a second one. Temporary files start with "." so dataset readers
(pyarrow, Spark, DuckDB) skip them.

Every file carries its day in a `date` column typed as a calendar date (Arrow date32), and the
folder is named by the bare day. A `date=YYYY-MM-DD` (hive) folder name would say the same
thing with a second type: hive readers infer a string from the path, and pandas and pyarrow then
refuse to merge it with the file's column. With the day in the file only, `pd.read_parquet`,
`pyarrow.dataset`, Polars and DuckDB all open a whole layer in one call and agree that `date` is
a date. Stores written with the old `date=` folders are converted by `finpipe migrate-storage`.
Inside finpipe, `date` is read back as a pandas datetime64[ns] column, as it was written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def _days_as_dates(table: pa.Table) -> pa.Table:
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


class Storage:
    """The pipeline's data root (a local folder) and its layout."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- paths ---------------------------------------------------------------------------
    def layer_dir(self, layer: str, domain: str) -> Path:
        if layer not in LAYERS:
            raise ConfigError(f"unknown storage layer {layer!r}; expected one of {LAYERS}")
        return self.root / layer / check_name(domain)

    def partition_dir(self, layer: str, domain: str, day: dt.date | str) -> Path:
        return self.layer_dir(layer, domain) / as_day(day).isoformat()

    def partition_file(self, layer: str, domain: str, day: dt.date | str) -> Path:
        return self.partition_dir(layer, domain, day) / PARTITION_FILE

    def _partition_files(self, layer: str, domain: str, days: Iterable[dt.date]) -> list[str]:
        """`partition_file` of each day as a string, built without a Path per day (a nightly
        credit scan names 730 of them)."""
        base = os.fspath(self.layer_dir(layer, domain))
        return [_file_in(base, as_day(day)) for day in days]

    def landing_dir(self, domain: str) -> Path:
        return self.root / "landing" / check_name(domain)

    def quarantine_dir(self, domain: str) -> Path:
        return self.root / "quarantine" / check_name(domain)

    def reports_dir(self) -> Path:
        return self.root / "reports"

    def state_dir(self, domain: str) -> Path:
        return self.root / "state" / check_name(domain)

    # -- partitions ----------------------------------------------------------------------
    def write_partition(
        self, layer: str, domain: str, day: dt.date | str, frame: pd.DataFrame | pa.Table
    ) -> Path:
        """Publish `frame` as the whole partition for `day`, atomically; return its file path.

        Writing the same day again replaces the partition (idempotent), never appends. An Arrow
        table (e.g. a slice of a block converted once) is written as it is.
        """
        target = self.partition_file(layer, domain, day)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{PARTITION_FILE}.{uuid.uuid4().hex}.tmp")
        if isinstance(frame, pa.Table):
            table = frame
        else:
            table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
        table = _days_as_dates(table)
        published = False
        try:
            # Dictionary-encode only non-float columns: on float columns a dictionary page
            # rarely pays (few repeats) and costs about a third of the write time.
            dictionary = [f.name for f in table.schema if not pa.types.is_floating(f.type)]
            # An open file as the sink: a path would make pyarrow resolve a filesystem (and
            # stat the path) for every partition, which shows in a write of thousands.
            with pa.OSFile(str(tmp), "wb") as sink:
                pq.write_table(table, sink, compression="zstd", use_dictionary=dictionary)
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
        return target

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
        base = os.fspath(self.layer_dir(layer, domain))
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            return []
        lo = as_day(start) if start is not None else dt.date.min
        hi = as_day(end) if end is not None else dt.date.max
        named = []
        for name in names:
            if not _DAY_FOLDER.match(name):
                if name.startswith(LEGACY_PREFIX):
                    raise StorageError(
                        f"{base} holds {name!r}, a folder of the old hive layout; run "
                        "`finpipe migrate-storage` once to convert the store to bare-day folders"
                    )
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
        files = self._partition_files(layer, domain, chosen)
        if not files:
            return pd.DataFrame(columns=list(columns) if columns else None)
        wanted = list(columns) if columns else None

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

    def read_partition(self, layer: str, domain: str, day: dt.date | str) -> pd.DataFrame:
        """Return one partition's rows; FileNotFoundError if it was never published."""
        return _to_frame(pq.read_table(self.partition_file(layer, domain, day)))

    # -- landing and quarantine ----------------------------------------------------------
    def land_file(self, domain: str, source: Path, sha256: str) -> Path:
        """Copy a delivered file into landing/ under its content hash; return the landed path.

        The copy is atomic and never overwritten: the same content lands once.
        """
        name = _SAFE_FILE.sub("_", Path(source).name).lstrip(".") or "file"
        target = self.landing_dir(domain) / f"{sha256[:12]}__{name}"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def quarantine_batch(
        self,
        domain: str,
        batch_id: str,
        landed_file: Path,
        report: dict,
        data_docs: Path | None = None,
        file_name: str | None = None,
    ) -> Path:
        """Keep a rejected batch with its report under quarantine/; return the folder.

        Built in a hidden staging folder, then renamed into place, so a reader never sees a
        quarantine entry without its report.
        """
        final = self.quarantine_dir(domain) / check_name(batch_id, "batch id")
        staging = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        staging.mkdir(parents=True)
        try:
            name = _SAFE_FILE.sub("_", file_name or Path(landed_file).name).lstrip(".") or "file"
            shutil.copyfile(landed_file, staging / name)
            write_json_atomic(staging / "report.json", report)
            if data_docs is not None and Path(data_docs).exists():
                shutil.copytree(data_docs, staging / "data_docs")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return final

    # -- ingest state --------------------------------------------------------------------
    def batch_record_path(self, domain: str, sha256: str) -> Path:
        return self.state_dir(domain) / "batches" / f"{sha256}.json"

    def read_batch_record(self, domain: str, sha256: str) -> dict | None:
        path = self.batch_record_path(domain, sha256)
        return json.loads(path.read_text()) if path.exists() else None

    def write_batch_record(self, domain: str, record: dict) -> None:
        write_json_atomic(self.batch_record_path(domain, record["sha256"]), record)

    def batch_records(self, domain: str) -> list[dict]:
        folder = self.state_dir(domain) / "batches"
        if not folder.exists():
            return []
        records = [json.loads(p.read_text()) for p in folder.glob("*.json")]
        return sorted(records, key=lambda r: (r.get("landed_at", ""), r["sha256"]))

    # -- reference data ------------------------------------------------------------------
    def reference_file(self, domain: str, name: str) -> Path:
        """reference/<domain>/<name>.parquet: data kept beside a domain's layers for reporting
        only, e.g. a synthetic data set's planted truth (never read by training or scoring)."""
        return self.root / "reference" / check_name(domain) / f"{check_name(name, 'name')}.parquet"

    def write_reference(self, domain: str, name: str, frame: pd.DataFrame) -> Path:
        """Keep `frame` as the domain's reference `name`, replaced atomically; return its path."""
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
        path = self.reference_file(domain, name)
        write_bytes_atomic(path, sink.getvalue().to_pybytes())
        return path

    def read_reference(
        self, domain: str, name: str, filters: list[tuple[str, str, object]] | None = None
    ) -> pd.DataFrame | None:
        """Return the domain's reference `name` (the rows pyarrow `filters` keep), or None when
        it was never written."""
        path = self.reference_file(domain, name)
        return pd.read_parquet(path, filters=filters) if path.exists() else None
