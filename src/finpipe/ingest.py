"""Ingest: land a delivered file, validate it with Great Expectations, publish or quarantine.

Generic over domains: a domain supplies a `RawContract` (how to normalise its files, which
suite checks them, what its keys are). Every file is identified by the SHA-256 of its bytes,
so the same delivery is loaded once however often it is offered.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import re
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from finpipe.delivered_days import ERROR_MARKERS, missing_marked
from finpipe.errors import ConfigError, InputFileError, ValidationFailed
from finpipe.storage import Storage, as_day, file_sha256
from finpipe.text import counted, sentence
from finpipe.validation import (
    ValidationReport,
    describe_rule_break,
    load_suite_spec,
    rejecting_rules,
    validate_frame,
)

BATCH_COLUMN = "batch_id"


@dataclass(frozen=True)
class RawContract:
    """What a domain tells the ingest machinery about its raw files."""

    domain: str
    suite: str
    key_columns: tuple[str, ...]
    date_column: str
    normalise: Callable[..., pd.DataFrame]
    # Adds derived columns the suite checks (e.g. a daily return that needs the last accepted
    # price); receives the normalised batch and the validated layer it will be published to.
    add_check_columns: Callable[[pd.DataFrame, PublishedRows], pd.DataFrame] | None = None
    # Extra `pandas.read_csv` options for sources that are not comma-separated with a header,
    # e.g. {"sep": r"\s+", "header": None, "names": [...]}; None reads the default CSV.
    read_options: Mapping[str, Any] | None = None
    # Builds the suite in memory (e.g. from a user's config and the data accepted so far)
    # instead of reading expectations/<suite>.json; receives the storage it will publish to.
    suite_spec: Callable[[Storage], dict] | None = None
    # True when `normalise` also takes the run's as-of day (`as_of=`): cross-sectional data
    # without a date column is dated by the day it is ingested.
    normalise_takes_as_of: bool = False
    # The columns that name the published rows a correction row restates (`ingest_file`'s
    # `correction`): the rows with the same values are replaced; None: the key columns.
    correction_keys: tuple[str, ...] | None = None
    # Builds the rows a correction publishes from the published rows it replaces and its own
    # validated rows (e.g. versions of a record that keep their delivery days); None: its rows.
    restate: Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame] | None = None
    # Why this source's rows cannot be corrected (a correction is refused before it lands, with
    # this as the reason); None: corrections are taken.
    refuses_corrections: str | None = None
    # The columns a delivery may leave out, with their dtype: a partition published from rows
    # without one that the layer holds gets it, empty, so every date reads with one schema
    # (Polars and DuckDB refuse a folder whose files lack a column the first one has).
    optional_columns: Mapping[str, str] = field(default_factory=dict)

    def restated_by(self) -> list[str]:
        """Return the columns that name the rows a correction restates."""
        return list(self.correction_keys or self.key_columns)

    def sort_columns(self) -> list[str]:
        """Return the columns a partition's rows are sorted by: the date, then the other keys."""
        return [self.date_column, *[k for k in self.key_columns if k != self.date_column]]


@dataclass
class IngestOutcome:
    """What happened to one delivered file."""

    source: str
    sha256: str
    batch_id: str
    status: str  # "validated", "already_loaded", "quarantined" or "later" (`not_yet_due`)
    rows: int = 0
    first_date: str | None = None
    last_date: str | None = None
    dates: int = 0
    landed_path: str | None = None
    quarantine_path: str | None = None
    data_docs: str | None = None
    message: str = ""
    rules_failed: list[str] = field(default_factory=list)
    # Warning rules the accepted batch broke, one sentence each (also in its batch record).
    warnings: list[str] = field(default_factory=list)
    # A correction: how many published rows it replaced (None: an ordinary delivery), and how
    # many of those its retracted rows removed (`RETRACTED_COLUMN`).
    corrected_rows: int | None = None
    retracted_rows: int | None = None
    # The dates a correction retracted every row of: their partitions are removed (ISO days).
    removed_dates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def read_delivery(path: Path, read_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Return the raw rows of a delivered CSV (plain or gzip) or Parquet file.

    `read_options` are extra `pandas.read_csv` keyword arguments (separator, header, names)
    for CSV-like files; Parquet ignores them.

    Raises InputFileError naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputFileError(f"{path}: file is empty (0 bytes); ask the vendor to re-deliver")
    suffixes = "".join(path.suffixes).lower()
    try:
        if suffixes.endswith(".parquet") or suffixes.endswith(".pq"):
            return pd.read_parquet(path)
        # Text as delivered, only an empty field or a spreadsheet's error value missing: a
        # ticker `NA` or a category `None` is a value. A number, date, label or flag column
        # reads the other `MISSING_MARKERS` as missing too.
        options = {
            "keep_default_na": False,
            "na_values": ["", *ERROR_MARKERS],
            **(read_options or {}),
        }
        frame = pd.read_csv(path, compression="infer", encoding="utf-8", dtype=str, **options)
    except pd.errors.EmptyDataError:
        raise InputFileError(f"{path}: no header and no rows; the file is empty") from None
    except UnicodeDecodeError as error:
        raise InputFileError(
            f"{path}: not UTF-8 text (byte {error.object[error.start : error.start + 1]!r} at "
            f"offset {error.start}); re-export the file as UTF-8"
        ) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise InputFileError(f"{path}: compressed data is truncated or corrupt ({error})") from None
    except (pa.ArrowInvalid, OSError) as error:
        raise InputFileError(f"{path}: cannot be read ({error})") from None
    except pd.errors.ParserError as error:
        raise InputFileError(
            f"{path}: malformed CSV ({str(error).strip()}); if the file opens with banner lines "
            "or has comment lines, set [read] skip_rows or comment in the domain's config"
        ) from None
    if (
        not read_options
        and len(frame.columns) == 1
        and any(sep in str(frame.columns[0]) for sep in ";\t|")
    ):
        raise InputFileError(
            f"{path}: one column named {frame.columns[0]!r}: the file is not comma-separated; "
            "deliver CSV with ',' as the delimiter"
        )
    repeated = _repeated_headers([str(column) for column in frame.columns])
    if repeated:
        raise InputFileError(
            f"{path}: column(s) {repeated} appear more than once in the header; deliver each "
            "column once (which copy holds the right values cannot be told)"
        )
    return frame


def _repeated_headers(columns: list[str]) -> list[str]:
    """Return the header names pandas read more than once (it renames copies `name.1`)."""
    names = set(columns)
    copies = (re.fullmatch(r"(.+)\.\d+", column) for column in columns)
    return sorted({match[1] for match in copies if match and match[1] in names})


DEFAULT_MAX_FILE_BYTES = 2 * 1024**3


def ingest_file(
    storage: Storage,
    contract: RawContract,
    path: Path,
    *,
    as_of: dt.date | str,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    correction: bool = False,
) -> IngestOutcome:
    """Land, validate and publish one delivered file; return what happened.

    A file already loaded (same bytes) is skipped. A file that fails validation is copied to
    quarantine/ with its report and ValidationFailed is raised; nothing is published from it.

    A row whose key another batch already published is a rule break (the file is quarantined)
    unless `correction`: then the file is a vendor's correction, and its rows replace the
    published rows they restate (same values in `RawContract.restated_by()`: the key columns
    unless the domain names others; `RawContract.restate` may build what is published from
    both); rows that restate nothing are added. A correction's row flagged true in the column
    `retracted` (`RETRACTED_COLUMN`) removes the published rows it restates and publishes
    nothing: only its `restated_by()` columns are read, and each must name a published row. The
    rows it replaces are kept, once, in `state/<domain>/superseded/<batch>.parquet` before any
    partition changes.
    """
    path = Path(path)
    _refuse_before_reading(contract, path, max_file_bytes, correction)
    domain = contract.domain
    sha = file_sha256(path)
    batch_id = _batch_id(sha)
    previous = storage.read_batch_record(domain, sha)
    if previous is not None and previous["status"] == "validated":
        return _already_loaded(path, sha, previous)
    landed = storage.land_file(domain, path, sha)
    record: dict[str, Any] = {
        "sha256": sha,
        "batch_id": batch_id,
        "source": str(path),
        "landed_path": storage.location(landed),
        "landed_at": _now(),
        "status": "landed",
    }
    earlier = _earlier_sources(previous, path)
    if earlier:  # the same bytes delivered under another name before, not loaded then
        record[EARLIER_SOURCES] = earlier
    storage.write_batch_record(domain, record)
    # The landed copy is read on a local store; on an object store, the delivered file it
    # was copied from (the same bytes: its name is their hash).
    readable = storage.local_path(landed) if storage.is_local else path
    # Data Docs are built on a local disk and stored in the reports (uploaded at the end of
    # the block on an object store), whether the batch is published or quarantined.
    docs_key = storage.reports_key("data_docs", domain, batch_id)
    with storage.local_folder(docs_key) as docs_dir:
        try:
            checked = _check(
                storage, contract, path, readable, as_of, batch_id, docs_dir, correction
            )
        except _Rejected as rejected:
            _quarantine(storage, contract, record, landed, rejected)
        outcome = _publish_checked(storage, contract, path, checked, record, correction)
        outcome.landed_path = storage.location(landed)
        if docs_dir.exists():
            outcome.data_docs = storage.location(f"{docs_key}/index.html")
    return outcome


_ACCEPTED_EARLIER = "already accepted from an earlier batch"


def _batch_id(sha: str) -> str:
    """Return the batch id of a delivered file, from its content's SHA-256."""
    return f"b{sha[:12]}"


class PublishedRows(Protocol):
    """What a delivery is checked against: the validated layer's dates and rows (a contract's
    check columns, `RawContract.add_check_columns`; the rows a correction replaces). A
    `Storage`, or in a dry run `CheckedTogether.published`."""

    def partition_dates(
        self, layer: str, domain: str, *, end: dt.date | None = None
    ) -> list[dt.date]: ...

    def read_partitions(
        self, layer: str, domain: str, *, days: list[dt.date], columns: list[str] | None = None
    ) -> pd.DataFrame: ...


@dataclass
class CheckedTogether:
    """What the files checked before this one in the same dry run would publish: ingest loads
    them first, so a later file is checked against the layer as they leave it: their content
    and keys (the same file twice, a key two files deliver), their rows for its check columns
    (market's move from the last accepted price) and, for a correction, the rows it replaces
    and retracts (a row an earlier correction restated, added or retracted)."""

    names: dict[str, str] = field(default_factory=dict)  # sha256 -> the first file's name
    # The validated partitions the files checked so far would leave (empty: a date removed),
    # once the files still pending (sha256, what was checked) are merged in.
    partitions: dict[dt.date, pd.DataFrame] = field(default_factory=dict)
    pending: list[tuple[str, _Checked]] = field(default_factory=list)

    def whose(self, batches: Iterable[str]) -> str:
        """Say where the published rows of `batches` come from: files checked above, or
        batches already accepted."""
        named = {_batch_id(sha): name for sha, name in self.names.items()}
        batches = set(batches)
        above = [named[batch] for batch in sorted(batches) if batch in named]
        if not above:
            return _ACCEPTED_EARLIER
        said = f"of {', '.join(above)}, checked above (ingest loads it first)"
        return said + (f", or {_ACCEPTED_EARLIER}" if len(above) < len(batches) else "")

    def add(self, name: str, sha: str, checked: _Checked) -> None:
        """Note a file that passed. The partitions it would leave are merged in when a later
        file asks (`published`), so the last file of a run, often a long history, costs no
        merge."""
        self.names[sha] = name
        self.pending.append((sha, checked))

    def published(self, storage: Storage, contract: RawContract) -> PublishedRows:
        """Return the validated layer of `storage` as it would be once the files checked
        before are loaded."""
        layer = _Overlay(storage, contract, self.partitions)
        for sha, checked in self.pending:
            correction = checked.replaced is not None
            merged = _merged_partitions(
                contract,
                _rows_to_publish(contract, checked),
                _batch_id(sha),
                existing=set(layer.partition_dates("validated", contract.domain)),
                read=lambda day: layer.read_partitions("validated", contract.domain, days=[day]),
                replace_keys=contract.restated_by() if correction else None,
                retract=checked.retracted,
            )
            self.partitions.update(dict(merged))
        self.pending.clear()
        return layer


@dataclass(frozen=True)
class _Overlay:
    """A store's validated layer of one domain with some dates' partitions replaced by the
    rows they would hold (`partitions`; an empty frame: the date would be removed)."""

    storage: Storage
    contract: RawContract
    partitions: Mapping[dt.date, pd.DataFrame]

    def _overlaid(self, layer: str, domain: str) -> bool:
        return bool(self.partitions) and (layer, domain) == ("validated", self.contract.domain)

    def partition_dates(
        self, layer: str, domain: str, *, end: dt.date | None = None
    ) -> list[dt.date]:
        stored = self.storage.partition_dates(layer, domain, end=end)
        if not self._overlaid(layer, domain):
            return stored
        days = {*stored, *(day for day in self.partitions if end is None or day <= end)}
        return sorted(d for d in days if d not in self.partitions or not self.partitions[d].empty)

    def read_partitions(
        self, layer: str, domain: str, *, days: list[dt.date], columns: list[str] | None = None
    ) -> pd.DataFrame:
        if not self._overlaid(layer, domain):
            return self.storage.read_partitions(layer, domain, days=days, columns=columns)
        missing = [day for day in days if day not in self.partitions]
        stored = set(self.storage.partition_dates(layer, domain)) if missing else set()
        from_store = [day for day in missing if day in stored]
        overlaid = [self.partitions.get(day) for day in days]
        parts = [
            rows if columns is None else rows[list(columns)]
            for rows in overlaid
            if rows is not None and not rows.empty
        ]
        if from_store or not parts:  # (an empty read would make every column `object`)
            parts.insert(
                0, self.storage.read_partitions(layer, domain, days=from_store, columns=columns)
            )
        frame = pd.concat(parts, ignore_index=True)
        if len(parts) > 1 and self.contract.date_column in frame.columns:
            frame = frame.sort_values(self.contract.date_column, kind="stable", ignore_index=True)
        return frame


def check_file(
    storage: Storage,
    contract: RawContract,
    path: Path,
    *,
    as_of: dt.date | str,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    correction: bool = False,
    together: CheckedTogether | None = None,
) -> IngestOutcome:
    """Return what `ingest_file` would do with `path`, writing nothing to the store: status
    `already_loaded`, or `checked` with the rows and dates it would publish and, for a
    correction, the published rows it would replace and retract. Raises ValidationFailed (with
    no quarantine path) for a file it would quarantine, with the same rules and message.

    The file is checked against the store as it is and, with `together` (updated here), the
    files checked before it in the same run (`CheckedTogether`).
    """
    path = Path(path)
    _refuse_before_reading(contract, path, max_file_bytes, correction)
    sha = file_sha256(path)
    previous = storage.read_batch_record(contract.domain, sha)
    if previous is not None and previous["status"] == "validated":
        return _already_loaded(path, sha, previous)
    batch_id = _batch_id(sha)
    if together is not None and sha in together.names:
        return IngestOutcome(
            source=str(path),
            sha256=sha,
            batch_id=batch_id,
            status="already_loaded",
            message=f"{path.name}: the same content as {together.names[sha]}, checked above; "
            "ingest would skip it",
        )
    try:  # no Data Docs: they would be written somewhere
        checked = _check(storage, contract, path, path, as_of, batch_id, None, correction, together)
    except _Rejected as rejected:
        raise ValidationFailed(
            f"{path.name} would be rejected (rules failed: {_failed_rules(rejected.report)})."
            f" {sentence(rejected.message)} Nothing was written."
        ) from None
    if together is not None:
        together.add(path.name, sha, checked)
    date_col = contract.date_column
    delivered = _days_of(_rows_to_publish(contract, checked), date_col)
    retracted_days = _days_of(checked.retracted, date_col) if checked.retracted is not None else []
    dates = sorted({*delivered, *retracted_days})
    replaced, retracted = checked.replaced_counts()
    clause = ""
    if correction:
        removed = f", {retracted:,} of them retracted" if retracted else ""
        replacing = counted(replaced, "published row")
        clause = f" (a correction: {replacing} would be replaced{removed})"
        clause += _removed_clause(checked.emptied, would=True)
    warnings = [describe_rule_break(rule) for rule in checked.report.warnings()]
    return IngestOutcome(
        source=str(path),
        sha256=sha,
        batch_id=batch_id,
        status="checked",
        rows=len(checked.frame),
        first_date=dates[0].isoformat() if dates else None,
        last_date=dates[-1].isoformat() if dates else None,
        dates=len(delivered),
        message=f"{path.name}: {counted(len(checked.frame), 'row')} over "
        f"{counted(len(delivered), 'date')} would be published{clause}"
        + (f" with {counted(len(warnings), 'warning')}: {' '.join(warnings)}" if warnings else "")
        + "; nothing written",
        warnings=warnings,
        corrected_rows=replaced if correction else None,
        retracted_rows=retracted if correction else None,
        removed_dates=[day.isoformat() for day in checked.emptied],
    )


def _refuse_before_reading(
    contract: RawContract, path: Path, max_file_bytes: int, correction: bool
) -> None:
    """Raise InputFileError for a file that is not loaded at all: missing, a correction of a
    source that takes none, or too big."""
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if correction and contract.refuses_corrections:
        raise InputFileError(f"{path}: not loaded as a correction: {contract.refuses_corrections}")
    size = path.stat().st_size
    if size > max_file_bytes:
        # Refused before landing: a batch is validated in memory, and copying a file that
        # cannot be loaded into landing/ or quarantine/ would only fill the disk.
        raise InputFileError(
            f"{path}: {size / 1024**2:,.0f} MiB is over the {max_file_bytes / 1024**2:,.0f} MiB "
            "limit for one delivery; split it (e.g. one file per month) or raise "
            "FINPIPE_MAX_FILE_MB"
        )


# A batch record's earlier deliveries under other names ({"source", "landed_at"} each): the
# same bytes came as these files before, and were not loaded then.
EARLIER_SOURCES = "earlier_sources"


def _earlier_sources(previous: dict | None, path: Path) -> list[dict]:
    """Return the deliveries of the same bytes under other file names before `path`, oldest
    first, each with when it landed, for a file whose earlier delivery was not loaded
    (quarantined, or cut short): one record per content keeps every delivery's name, so no
    rejected file drops out of sight."""
    if previous is None:
        return []
    last = {"source": previous.get("source", ""), "landed_at": previous.get("landed_at", "")}
    earlier: dict[str, dict] = {}
    for delivery in [*previous.get(EARLIER_SOURCES, []), last]:
        name = Path(str(delivery.get("source", ""))).name
        if name and name != path.name:
            earlier[name] = delivery  # a name delivered twice: its later landing
    return list(earlier.values())


def delivered_files(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Return (file name, when it landed) of each delivery a batch record's bytes came as:
    the last, then the earlier ones (`EARLIER_SOURCES`)."""
    deliveries = [record, *record.get(EARLIER_SOURCES, [])]
    return [(Path(str(d.get("source", ""))).name, str(d.get("landed_at", ""))) for d in deliveries]


def described_file(record: Mapping[str, Any]) -> str:
    """Return a batch's file as a listing names it: 'b.csv', or 'b.csv (also delivered as
    a.csv)' when the same bytes came under another name before."""
    last, *earlier = [name for name, _ in delivered_files(record)]
    return f"{last} (also delivered as {', '.join(earlier)})" if earlier else last


def dismiss_quarantined(storage: Storage, domain: str, batch_id: str, reason: str) -> dict:
    """Mark quarantined batch `batch_id` of `domain` dismissed with `reason` (its fix came
    under another name, or it is not wanted) and return its record: `finpipe status` stops
    listing it, and its report and quarantined copy stay. ConfigError for a batch that is not
    quarantined, naming those that are. A later delivery of the same bytes is a new verdict."""
    if not reason.strip():
        raise ConfigError("say why the batch is dismissed (--reason): the record keeps it")
    records = storage.batch_records(domain)
    record = next((r for r in records if r.get("batch_id") == batch_id), None)
    if record is None or record.get("status") != "quarantined":
        waiting = [r["batch_id"] for r in records if r.get("status") == "quarantined"]
        whose = f"is {record.get('status')}" if record else "is no batch"
        raise ConfigError(
            f"{batch_id} {whose} of {domain}: only a quarantined batch is dismissed; the "
            f"quarantined ones are {', '.join(waiting) or 'none'} (finpipe batches {domain})"
        )
    record.update(dismissed_at=_now(), dismissed_reason=reason.strip())
    storage.write_batch_record(domain, record)
    return record


def _already_loaded(path: Path, sha: str, previous: dict) -> IngestOutcome:
    return IngestOutcome(
        source=str(path),
        sha256=sha,
        batch_id=_batch_id(sha),
        status="already_loaded",
        rows=previous.get("rows", 0),
        first_date=previous.get("first_date"),
        last_date=previous.get("last_date"),
        landed_path=previous.get("landed_path"),
        message=f"{path.name}: already loaded on {previous.get('validated_at')}"
        + _as_another(path, previous)
        + "; skipped",
    )


def _as_another(path: Path, previous: dict) -> str:
    """' as market_0.csv (the same bytes)' when the loaded file had another name, else ''."""
    name = Path(str(previous.get("source", ""))).name
    return f" as {name} (the same bytes)" if name and name != path.name else ""


class _Rejected(Exception):
    """A delivery that breaks a rule: its report, its Data Docs folder if built, why, and the
    rows the suite checked (None: the file was refused before, e.g. unreadable)."""

    def __init__(
        self, report: dict, docs: Path | None, message: str, rows: pd.DataFrame | None = None
    ) -> None:
        super().__init__(message)
        self.report, self.docs, self.message, self.rows = report, docs, message, rows


@dataclass
class _Checked:
    """A delivery that passed: the rows to publish, the keys of the rows it retracts, its
    report and, for a correction, the published rows it replaces (`kept`: as first kept by
    a run of it cut short) and the dates it leaves with no row (`emptied`)."""

    frame: pd.DataFrame
    retracted: pd.DataFrame | None
    report: ValidationReport
    replaced: pd.DataFrame | None = None
    restating: pd.DataFrame | None = None
    kept: bool = False
    emptied: list[dt.date] = field(default_factory=list)

    def replaced_counts(self) -> tuple[int, int]:
        """Return how many published rows it replaces, and how many of those it retracts."""
        if self.replaced is None or self.restating is None:
            return 0, 0
        return len(self.replaced), len(self.replaced) - len(self.restating)


def _check(
    storage,
    contract,
    path: Path,
    readable: Path,
    as_of,
    batch_id: str,
    docs_dir: Path | None,
    correction,
    together: CheckedTogether | None = None,
) -> _Checked:
    """Read, validate and (a correction) match delivered file `path` (read from `readable`)
    against the store; return what would be published, or raise _Rejected. Writes nothing but
    the Data Docs in `docs_dir` (None: none are built). With `together` (a dry run), the file
    is checked against the layer the files checked before it would leave."""
    layer = storage if together is None else together.published(storage, contract)
    try:
        raw = read_delivery(readable, contract.read_options)
        flags = _retraction_flags(raw, path.name)
        normalised = _normalised(contract, raw, path.name, as_of)
    except InputFileError as error:  # named as delivered, not as the landed copy read
        message = str(error).replace(str(readable), path.name)
        rule = {"rule": "readable_file", "success": False, "message": message}
        raise _Rejected(_report_of(contract, batch_id, path, rule), None, message) from None
    if flags is not None and flags.any() and not correction:
        refused = _flagged_rule(flags, path.name)
        raise _Rejected(_report_of(contract, batch_id, path, refused), None, refused["message"])
    frame, retracted = _split_retracted(normalised, flags, contract.restated_by())
    if frame.empty and retracted is not None:  # retractions only: no row for the suite
        report = ValidationReport(contract.suite, f"{batch_id}:{path.name}", True, 0, [], [])
    else:
        name = f"{batch_id}:{path.name}"
        report = _validate(storage, contract, frame, as_of, name, docs_dir, layer)
        if flags is not None and flags.any():  # the suite numbered the rows left: the file's
            report = report.renumbered(np.flatnonzero(~flags.to_numpy()))
    report_dict = report.to_dict()
    report_dict["source"] = str(path)
    docs = docs_dir if docs_dir is not None and docs_dir.exists() else None
    repeated = (
        None
        if correction
        else _keys_from_other_batches(
            layer, contract, frame, batch_id, together.whose if together else None
        )
    )
    for extra in (_parse_error_rule(frame), repeated):
        if extra is not None:
            report_dict["success"] = False
            report_dict.setdefault("rules", []).append(extra)
    if not report_dict["success"]:
        extras = [_rule_sentence(extra) for extra in report_dict["rules"][len(report.rules) :]]
        message = report.summary(extras) if not report.success else " ".join(extras)
        raise _Rejected(report_dict, docs, message, frame)
    checked = _Checked(frame, retracted, report)
    if correction:
        key = _superseded_key(storage, contract, batch_id)
        checked.kept = storage.exists(key)  # a re-run: partitions may already hold it
        replaced = _replaced_rows(storage, layer, contract, key, frame, retracted, batch_id)
        problem = (
            None if checked.kept else _retraction_problem(contract, frame, replaced, retracted)
        )
        if problem is not None:
            report_dict.update(success=False)
            report_dict.setdefault("rules", []).append(problem)
            raise _Rejected(report_dict, docs, problem["message"], frame)
        checked.replaced = replaced
        checked.restating = _without(replaced, retracted, contract.restated_by())
        checked.emptied = _emptied_dates(layer, contract, checked)
    return checked


def _report_of(contract, batch_id: str, path: Path, rule: dict) -> dict:
    """Return the report of a file refused before its suite ran, for the broken `rule`."""
    return {
        "suite": contract.suite,
        "batch": batch_id,
        "source": str(path),
        "success": False,
        "rules": [rule],
    }


def _publish_checked(storage, contract, path: Path, checked: _Checked, record: dict, correction):
    """Publish a checked delivery (a correction: keeping what it replaces first), note it in
    its batch `record`; return its outcome (the landing and Data Docs locations left out)."""
    corrected = ""
    batch_id = record["batch_id"]
    if checked.replaced is not None and checked.restating is not None:
        key = _superseded_key(storage, contract, batch_id)
        corrected = _keep_superseded_rows(
            storage, key, checked.replaced, record, checked.kept, len(checked.restating)
        )
    rows = _rows_to_publish(contract, checked)
    replace_keys = contract.restated_by() if correction else None
    published = _publish(
        storage, contract, rows, batch_id, replace_keys=replace_keys, retract=checked.retracted
    )
    dates = sorted(published)  # a retracted row's too: the dates the batch changed
    warnings = [describe_rule_break(rule) for rule in checked.report.warnings()]
    frame = checked.frame
    delivered = _days_of(rows, contract.date_column)  # the dates of the rows it publishes
    record.update(
        status="validated",
        validated_at=_now(),
        rows=len(frame),
        first_date=dates[0].isoformat() if dates else None,
        last_date=dates[-1].isoformat() if dates else None,
        warnings=warnings,
    )
    if checked.emptied:
        record["removed_dates"] = [day.isoformat() for day in checked.emptied]
        corrected += _removed_clause(checked.emptied)
    storage.write_batch_record(contract.domain, record)
    return IngestOutcome(
        source=str(path),
        sha256=record["sha256"],
        batch_id=batch_id,
        status="validated",
        rows=len(frame),
        first_date=record["first_date"],
        last_date=record["last_date"],
        dates=len(delivered),
        message=f"{path.name}: {counted(len(frame), 'row')} over {counted(len(delivered), 'date')} "
        "validated"
        + corrected
        + (f" with {counted(len(warnings), 'warning')}: {' '.join(warnings)}" if warnings else ""),
        warnings=warnings,
        corrected_rows=record.get("corrected_rows") if correction else None,
        retracted_rows=record.get("retracted_rows") if correction else None,
        removed_dates=record.get("removed_dates", []),
    )


def _days_of(rows: pd.DataFrame, date_column: str) -> list[dt.date]:
    """Return the distinct days of `rows`, in order: the M of a delivery's "N rows over M
    dates" (a correction's retracted rows publish no row, so their days are not among them;
    the batch record's first and last dates, the dates it changed, include them)."""
    return sorted({pd.Timestamp(day).date() for day in rows[date_column].dropna()})


def _removed_clause(emptied: list[dt.date], would: bool = False) -> str:
    """The outcome message's clause for the dates a correction removes ("" for none; `would`:
    a dry run's)."""
    if not emptied:
        return ""
    named = ", ".join(day.isoformat() for day in emptied[:5])
    more = f" and {len(emptied) - 5} more" if len(emptied) > 5 else ""
    return (
        f"; every row of {named}{more} retracted: {'would be ' if would else ''}removed from "
        "the validated layer "
        "(the feature step removes its features and rebuilds those that depended on it)"
    )


def _validate(storage, contract, frame, as_of, batch_name: str, docs_dir: Path | None, published):
    """Return the suite's report on `frame` (Data Docs in `docs_dir`; None: none); its check
    columns read `published`."""
    if contract.add_check_columns is not None:
        checked = contract.add_check_columns(frame, published)
    else:
        checked = frame
    spec = None
    if contract.suite_spec is not None:  # named after its domain where it does not say
        spec = contract.suite_spec(storage)
        spec = {**spec, "meta": {"domain": contract.domain, **(spec.get("meta") or {})}}
    return validate_frame(
        checked,
        suite_name=contract.suite,
        suite_spec=spec,
        batch_name=batch_name,
        parameters={"as_of": pd.Timestamp(as_day(as_of))},
        data_docs_dir=docs_dir,
    )


SUPERSEDED = "superseded"


def _superseded_key(storage, contract, batch_id: str) -> str:
    return storage.state_key(contract.domain, SUPERSEDED, f"{batch_id}.parquet")


def _replaced_rows(
    storage, layer: PublishedRows, contract, key: str, frame, retracted, batch_id: str
) -> pd.DataFrame:
    """Return the published rows correction `frame` and its `retracted` rows replace (other
    batches' rows they restate: `RawContract.restated_by`): the first copy kept at `key` when
    there is one (a re-run after a crash), else read from the partitions of `layer`."""
    if storage.exists(key):
        return pd.read_parquet(io.BytesIO(storage.read_bytes(key)))
    keys = contract.restated_by()
    named = frame if retracted is None else pd.concat([frame[keys], retracted], ignore_index=True)
    return _rows_of_other_batches(layer, contract, named, {batch_id}, keys=keys)


def _rows_to_publish(contract, checked: _Checked) -> pd.DataFrame:
    """Return the rows a checked delivery publishes: its own, restated by the contract where
    it keeps something of the rows they replace (credit: a loan's delivery days)."""
    if checked.restating is None or contract.restate is None:
        return checked.frame
    return contract.restate(checked.restating.drop(columns=[BATCH_COLUMN]), checked.frame)


def _keep_superseded_rows(
    storage, key: str, replaced: pd.DataFrame, record: dict, kept: bool, restated: int
) -> str:
    """Keep the rows a correction replaces in state/<domain>/superseded/<batch>.parquet (`key`),
    create-only: a re-run after a crash (`kept`) goes on from the first, complete copy. Note
    them in `record` (`restated` of them restated, the others retracted); return the message's
    clause."""
    if replaced.empty:
        record.update(corrected_rows=0, retracted_rows=0)
        return " (a correction that replaces no published row)"
    if not kept:
        buffer = io.BytesIO()
        replaced.to_parquet(buffer, index=False)
        storage.create_bytes(key, buffer.getvalue())
    batches = sorted(set(replaced[BATCH_COLUMN]))
    retracted = len(replaced) - restated
    record.update(
        corrected_rows=len(replaced),
        retracted_rows=retracted,
        corrected_batches=batches,
        superseded=storage.location(key),
    )
    removed = f", {retracted:,} of them retracted" if retracted else ""
    return (
        f" (a correction: {counted(len(replaced), 'published row')} of {', '.join(batches)} "
        f"replaced{removed}, kept in {storage.location(key)})"
    )


# --- retractions: a correction's rows that remove the published rows they name ---------------

# A correction's column that flags a row as retracted (true/false, 1/0, yes/no; empty: false).
RETRACTED_COLUMN = "retracted"
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


def _retraction_flags(raw: pd.DataFrame, source: str) -> pd.Series | None:
    """Return the delivered file's `retracted` flags by row (None when it has no such column;
    the name is matched ignoring case and spaces). Raises InputFileError for a value that is
    not a yes or a no."""
    named = [c for c in raw.columns if str(c).strip().lower() == RETRACTED_COLUMN]
    if not named:
        return None
    if len(named) > 1:
        raise InputFileError(f"{source}: the column {RETRACTED_COLUMN!r} appears twice")
    text = missing_marked(raw[named[0]]).astype("string").str.strip().str.lower().fillna("")
    unknown = ~text.isin(_TRUE | _FALSE)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise InputFileError(
            f"{source}: column {RETRACTED_COLUMN!r} has {int(unknown.sum())} value(s) that are "
            f"neither true nor false, e.g. row {row}: {raw[named[0]].iloc[row]!r}; use true/false"
            " (or 1/0, yes/no; empty or NA is false)"
        )
    return pd.Series(text.isin(_TRUE).to_numpy(), index=raw.index)


def _flagged_rule(flags: pd.Series, source: str) -> dict:
    """Return the failed rule of an ordinary delivery with rows flagged retracted."""
    rows = [int(i) for i in np.flatnonzero(flags.to_numpy())]
    return {
        "rule": "retraction_outside_correction",
        "success": False,
        "columns": [RETRACTED_COLUMN],
        "unexpected_count": len(rows),
        "sample_rows": rows[:10],
        "sample_values": [{RETRACTED_COLUMN: "true"}] * min(len(rows), 10),
        "message": (
            f"{source} flags {len(rows):,} row(s) retracted: only a correction retracts "
            "published rows, so load it as one (finpipe ingest --correction, or the flows' "
            "corrections)"
        ),
    }


def _split_retracted(
    frame: pd.DataFrame, flags: pd.Series | None, keys: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Return the normalised rows to validate and publish, and the `keys` of the retracted
    ones (None when none is). Values that did not parse keep the rows of the file."""
    if flags is None or not flags.any():
        return frame, None
    retracting = flags.to_numpy()
    kept = frame.loc[~retracting].reset_index(drop=True)
    problems = frame.attrs.get("parse_errors") or {}
    errors = {c: v[~retracting] for c, v in problems.items()}
    kept.attrs["parse_errors"] = {c: v for c, v in errors.items() if v.notna().any()}
    return kept, frame.loc[retracting, keys]  # indexed by the row in the file


def _matches(rows: pd.DataFrame, named: pd.DataFrame, keys: list[str]) -> np.ndarray:
    """Return which of `rows` have the `keys` of a row of `named`."""
    found = rows[keys].merge(named[keys].drop_duplicates(), how="left", indicator=True)
    return (found["_merge"] == "both").to_numpy()


def _without(replaced: pd.DataFrame, retracted: pd.DataFrame | None, keys: list[str]):
    """Return the replaced rows a correction restates: those its retracted rows do not name."""
    if retracted is None or replaced.empty:
        return replaced
    return replaced[~_matches(replaced, retracted, keys)]


def _emptied_dates(layer: PublishedRows, contract, checked: _Checked) -> list[dt.date]:
    """Return the dates checked correction retracts every published row of (their partitions
    go), counting a date whose partition a first try cut short already removed."""
    if checked.retracted is None or checked.replaced is None or checked.restating is None:
        return []
    date_col = contract.date_column
    restated = checked.restating.index
    removed = checked.replaced.drop(index=restated)[date_col].value_counts()
    publishing = set(checked.frame[date_col])
    present = set(layer.partition_dates("validated", contract.domain))
    emptied = []
    for stamp, count in removed.items():
        day = pd.Timestamp(stamp).date()
        if stamp not in publishing and (
            day not in present
            or len(
                layer.read_partitions("validated", contract.domain, days=[day], columns=[date_col])
            )
            == count
        ):
            emptied.append(day)
    return sorted(emptied)


def _retraction_problem(contract, frame, replaced, retracted) -> dict | None:
    """Return a failed-rule entry when a retracted row of correction `frame` names no published
    row or is also restated by the correction; else None."""
    if retracted is None:
        return None
    keys = contract.restated_by()
    both = _matches(retracted, frame, keys) if not frame.empty else np.zeros(len(retracted), bool)
    if both.any():
        return _rows_rule(
            "retracted_and_restated",
            retracted[both],
            "are both retracted and restated by the same correction (send either)",
        )
    found = (
        _matches(retracted, replaced, keys)
        if not replaced.empty
        else np.zeros(len(retracted), bool)
    )
    if not found.all():
        return _rows_rule(
            "retraction_names_no_published_row",
            retracted[~found],
            f"are retracted but name no published row by {keys}",
        )
    return None


def _rows_rule(rule: str, rows: pd.DataFrame, what: str) -> dict:
    """Return the failed rule `rule` of a correction's retracted `rows` (indexed by their row in
    the file), which `what` describes."""
    sample = rows.head(10)
    first = {k: _value_text(v) for k, v in sample.iloc[0].items()}
    return {
        "rule": rule,
        "success": False,
        "columns": list(rows.columns),
        "unexpected_count": len(rows),
        "sample_rows": [int(i) for i in sample.index],
        "sample_values": [
            {k: _value_text(v) for k, v in row.items()} for row in sample.to_dict("records")
        ],
        "message": (
            f"{len(rows):,} row(s) {what}, e.g. row {sample.index[0]}: {first}; "
            "nothing was retracted."
        ),
    }


# --- many files: one GX run per group of clean deliveries ------------------------------------

# At most this many rows are validated in one GX run (a group of files is held in memory).
GROUP_ROW_LIMIT = 2_000_000
# Rules on single rows (or on keys being unique across rows): when no row of a group of files
# breaks one, no row of any file in it does, so a clean group is a clean verdict for each file.
_ROW_RULE_PREFIXES = (
    "expect_column_values_to_",
    "expect_column_pair_values_",
    "expect_multicolumn_",
    "expect_compound_columns_to_be_unique",
    "expect_select_column_values_to_be_unique_within_record",
)
_ROW_COUNT_RULE = "expect_table_row_count_to_be_between"


@dataclass(frozen=True)
class _Delivery:
    """A delivered file read for a group: where it is, its hash and its normalised rows."""

    path: Path
    sha256: str
    frame: pd.DataFrame
    earlier: list[dict] = field(default_factory=list)  # EARLIER_SOURCES of its record

    @property
    def batch_id(self) -> str:
        return _batch_id(self.sha256)


def not_yet_due(
    storage: Storage,
    contract: RawContract,
    paths: Iterable[str | Path],
    as_of: dt.date | str,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> tuple[list[Path], list[IngestOutcome]]:
    """Split delivered files into those a run as of `as_of` loads and those every row of which
    is dated after it: a later session's delivery, already in the drop folder when a night runs
    late (its glob matches it), which its suite would refuse as rows from the future. Those
    are left where they are, untouched, for the run of their own date, each with an outcome
    of status `later`. A file already loaded, over `max_file_bytes` or that cannot be read
    (ingest then says why, without reading it whole) is loaded as usual; so is one with any
    row dated on or before `as_of`. A new file is read twice: here, then by ingest."""
    as_of = as_day(as_of)
    due, later = [], []
    for path in map(Path, paths):
        sha = file_sha256(path) if path.is_file() else ""
        record = storage.read_batch_record(contract.domain, sha) if sha else None
        loaded = record is not None and record["status"] == "validated"
        readable = sha and not loaded and path.stat().st_size <= max_file_bytes
        first = _first_day(contract, path, as_of) if readable else None
        if first is None or first <= as_of:
            due.append(path)
            continue
        message = (
            f"{path.name}: every row is dated {first} or later, after {as_of}: left for the run "
            "of its own date"
        )
        later.append(IngestOutcome(str(path), sha, _batch_id(sha), "later", message=message))
    return due, later


def _normalised(
    contract: RawContract, raw: pd.DataFrame, name: str, as_of: dt.date | str
) -> pd.DataFrame:
    """Return delivered file `name`'s rows (`raw`, as read) as its contract types them, on
    `as_of` for a contract that dates rows by the day they are loaded."""
    dated = {"as_of": as_day(as_of)} if contract.normalise_takes_as_of else {}
    return contract.normalise(raw, source=name, **dated)


def _first_day(contract: RawContract, path: Path, as_of: dt.date) -> dt.date | None:
    """Return the earliest date of a delivered file's rows as ingest reads them as of `as_of`
    (a book without a date column dates its rows the day they are loaded); None when it cannot
    be read or holds no dated row."""
    try:
        frame = _normalised(contract, read_delivery(path, contract.read_options), path.name, as_of)
        days = pd.to_datetime(frame[contract.date_column], errors="coerce").dropna()
    except (InputFileError, KeyError, ValueError, TypeError):
        return None
    return days.min().date() if len(days) else None


def ingest_files(
    storage: Storage,
    contract: RawContract,
    paths: Iterable[str | Path],
    *,
    as_of: dt.date | str,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    group_row_limit: int = GROUP_ROW_LIMIT,
    correction: bool = False,
) -> Iterator[IngestOutcome]:
    """Ingest delivered files in order, yielding each file's outcome as `ingest_file` would.

    Each file keeps its own verdict, batch record and quarantine, and the first rejected file
    stops the run (ValidationFailed, the files before it published), exactly as calling
    `ingest_file` on each in turn. What is shared is Great Expectations' fixed cost per run:
    consecutive readable files with the same columns are validated together in one GX run.
    A group in which no row breaks any rule (errors and warnings alike) and no key repeats is
    published as it stands, since every rule it runs is a rule on rows (`_groupable`); a group
    with anything to report is split in two and each half tried in turn, down to single files,
    which take `ingest_file`'s path and get its exact report. Suites built from the data
    accepted so far (`suite_spec`) validate file by file, and so do corrections (`correction`:
    see `ingest_file`), each in turn, so a later file corrects an earlier one.
    """
    if correction:
        for path in map(Path, paths):
            yield ingest_file(
                storage, contract, path, as_of=as_of, max_file_bytes=max_file_bytes, correction=True
            )
        return
    spec = None if contract.suite_spec is not None else load_suite_spec(contract.suite)
    group: list[_Delivery] = []
    rows = 0
    for path in map(Path, paths):
        delivery = _read_for_group(storage, contract, spec, path, as_of, max_file_bytes)
        fits = (
            delivery is not None
            and rows + len(delivery.frame) <= group_row_limit
            and (not group or _same_columns(group[0].frame, delivery.frame))
        )
        if not fits:
            yield from _ingest_group(storage, contract, group, as_of, max_file_bytes)
            group, rows = [], 0
        if delivery is None:
            yield ingest_file(storage, contract, path, as_of=as_of, max_file_bytes=max_file_bytes)
        else:
            group.append(delivery)
            rows += len(delivery.frame)
    yield from _ingest_group(storage, contract, group, as_of, max_file_bytes)


def _read_for_group(storage, contract, spec, path, as_of, max_file_bytes) -> _Delivery | None:
    """Return the file read for a group, or None when it takes the single-file path: its suite
    cannot be run on a group, it is missing, too big, already loaded, unreadable, has values
    that do not parse, flags rows retracted (refused there), or a row count its suite's minimum
    rejects."""
    if spec is None or not path.exists() or path.stat().st_size > max_file_bytes:
        return None
    sha = file_sha256(path)
    previous = storage.read_batch_record(contract.domain, sha)
    if previous is not None and previous["status"] == "validated":
        return None
    try:
        raw = read_delivery(path, contract.read_options)
        flags = _retraction_flags(raw, path.name)
        frame = _normalised(contract, raw, path.name, as_of)
    except InputFileError:
        return None
    if flags is not None and flags.any():  # refused on the single-file path, with its report
        return None
    if frame.attrs.get("parse_errors") or not _groupable(spec["expectations"], len(frame)):
        return None
    return _Delivery(path, sha, frame, _earlier_sources(previous, path))


def _groupable(expectations: Sequence[dict], rows: int) -> bool:
    """Return whether a file of `rows` rows can share a GX run: every rule is on rows, but for
    a row count whose minimum the file already meets (a group's maximum bounds each file's)."""
    for entry in expectations:
        kind = entry["type"]
        if kind == _ROW_COUNT_RULE:
            least = entry.get("kwargs", {}).get("min_value")
            if least is not None and not (isinstance(least, int) and rows >= least):
                return False
        elif kind != "expect_column_to_exist" and not kind.startswith(_ROW_RULE_PREFIXES):
            return False
    return True


def _same_columns(first: pd.DataFrame, other: pd.DataFrame) -> bool:
    """Whether two files have the same columns and types (then their rows stack unchanged)."""
    return first.dtypes.to_dict() == other.dtypes.to_dict() and list(first) == list(other)


def _ingest_group(storage, contract, group, as_of, max_file_bytes) -> Iterator[IngestOutcome]:
    """Publish a clean group at once; split one with anything to report (see ingest_files)."""
    if len(group) == 1:
        path = group[0].path
        yield ingest_file(storage, contract, path, as_of=as_of, max_file_bytes=max_file_bytes)
    elif group:
        rows = pd.concat([delivery.frame for delivery in group], ignore_index=True)
        docs = _validate_group(storage, contract, group, rows, as_of)
        if docs is not None:
            yield from _publish_group(storage, contract, group, rows, docs)
        else:
            half = len(group) // 2
            yield from _ingest_group(storage, contract, group[:half], as_of, max_file_bytes)
            yield from _ingest_group(storage, contract, group[half:], as_of, max_file_bytes)


def _validate_group(storage, contract, group, rows, as_of) -> str | None:
    """Return the key of the Data Docs of a group's GX run when nothing in it is to report."""
    batches = {delivery.batch_id for delivery in group}
    keys = list(contract.key_columns)
    if rows.duplicated(keys).any() or _keys_from_other_batches(storage, contract, rows, batches):
        return None
    checked = (
        rows if contract.add_check_columns is None else contract.add_check_columns(rows, storage)
    )
    name = f"{group[0].batch_id}..{group[-1].batch_id}"  # the first and last file's batches
    docs_key = storage.reports_key("data_docs", contract.domain, f"g{len(group)}-{name}")
    with storage.local_folder(docs_key) as docs_dir:  # kept only when the group is clean
        report = validate_frame(
            checked,
            suite_name=contract.suite,
            batch_name=f"{name}:{len(group)} files",
            parameters={"as_of": pd.Timestamp(as_day(as_of))},
            data_docs_dir=docs_dir,
        )
        if report.success and all(r.success and not r.unexpected_count for r in report.rules):
            return docs_key
        shutil.rmtree(docs_dir, ignore_errors=True)
    return None


def _publish_group(storage, contract, group, rows, docs_key) -> Iterator[IngestOutcome]:
    """Land each file of a clean group, publish all its rows, then record each file validated.

    No `landed` record is written first: a crash before the `validated` ones leaves landed
    copies that the next run lands again (same content, same name) and publishes again in
    place of this batch's rows, as it does for a file recorded `landed`.
    """
    records = []
    for delivery in group:
        landed = storage.land_file(contract.domain, delivery.path, delivery.sha256)
        record: dict[str, Any] = {
            "sha256": delivery.sha256,
            "batch_id": delivery.batch_id,
            "source": str(delivery.path),
            "landed_path": storage.location(landed),
            "landed_at": _now(),
        }
        if delivery.earlier:
            record[EARLIER_SOURCES] = delivery.earlier
        records.append(record)
    sizes = [len(delivery.frame) for delivery in group]
    batch_ids = np.repeat([delivery.batch_id for delivery in group], sizes)
    _publish(storage, contract, rows.assign(**{BATCH_COLUMN: batch_ids}), None)
    for delivery, record in zip(group, records, strict=True):
        stamps = delivery.frame[contract.date_column].dropna().unique()
        dates = sorted(pd.Timestamp(stamp).date() for stamp in stamps)
        record.update(
            status="validated",
            validated_at=_now(),
            rows=len(delivery.frame),
            first_date=dates[0].isoformat() if dates else None,
            last_date=dates[-1].isoformat() if dates else None,
            warnings=[],
            validated_with=f"{len(group)} files in one GX run ({docs_key.rsplit('/', 1)[-1]})",
        )
        storage.write_batch_record(contract.domain, record)
        yield IngestOutcome(
            source=str(delivery.path),
            sha256=delivery.sha256,
            batch_id=delivery.batch_id,
            status="validated",
            rows=len(delivery.frame),
            first_date=record["first_date"],
            last_date=record["last_date"],
            dates=len(dates),
            landed_path=record["landed_path"],
            data_docs=storage.location(f"{docs_key}/index.html"),
            message=f"{delivery.path.name}: {counted(len(delivery.frame), 'row')} over "
            f"{counted(len(dates), 'date')} validated (one GX run for {len(group)} files)",
        )


def _quarantine(storage, contract, record, landed, rejected: _Rejected) -> NoReturn:
    """Keep the rejected batch in quarantine/ with its report, note in its record the rows the
    suite checked and their first and last dates (what `finpipe batches` lists; none for a file
    refused before, e.g. unreadable), and raise ValidationFailed saying why."""
    report = rejected.report
    folder = storage.quarantine_batch(
        contract.domain,
        record["batch_id"],
        landed,
        report,
        rejected.docs,
        file_name=Path(record["source"]).name,
    )
    where = storage.location(folder)
    if rejected.rows is not None:
        days = _days_of(rejected.rows, contract.date_column)
        record.update(
            rows=len(rejected.rows),
            first_date=days[0].isoformat() if days else None,
            last_date=days[-1].isoformat() if days else None,
        )
    record.update(status="quarantined", quarantined_at=_now(), quarantine_path=where)
    storage.write_batch_record(contract.domain, record)
    raise ValidationFailed(
        f"{Path(record['source']).name} rejected (rules failed: {_failed_rules(report)}). "
        f"{sentence(rejected.message)} Batch kept in {where} with report.json; accepted data is "
        "untouched.",
        quarantine_path=where,
    )


def _failed_rules(report: dict) -> str:
    """Return the names of the rules that reject the batch (failed, not warnings), joined."""
    return ", ".join(rejecting_rules(report))


def _parse_error_rule(frame: pd.DataFrame) -> dict | None:
    """Return a failed-rule entry for values that did not parse (text in a number column...)."""
    problems = frame.attrs.get("parse_errors") or {}
    if not problems:
        return None
    table = pd.DataFrame(problems)
    bad = table.notna().any(axis=1)
    rows = table[bad].head(10)
    return {
        "rule": "parseable_values",
        "success": False,
        "columns": sorted(problems),
        "unexpected_count": int(bad.sum()),
        "sample_rows": [int(i) for i in rows.index],
        "sample_values": [
            {c: str(v) for c, v in row.items() if pd.notna(v)} for _, row in rows.iterrows()
        ],
        "message": "have values that are not valid for their column (a number, a date, a ticker)",
    }


def _rows_of_other_batches(
    storage,
    contract,
    frame,
    own: set[str],
    columns: list[str] | None = None,
    keys: list[str] | None = None,
) -> pd.DataFrame:
    """Return the published rows (`columns` of them, the keys included; all by default) of
    batches other than `own` whose `keys` (the contract's key columns by default) `frame`
    repeats."""
    keys = keys or list(contract.key_columns)
    date_col = contract.date_column
    days = sorted({d.date() for d in frame[date_col].dropna().unique()})
    existing_days = set(storage.partition_dates("validated", contract.domain))
    overlap_days = [d for d in days if d in existing_days]
    if not overlap_days:
        return pd.DataFrame(columns=columns or [*keys, BATCH_COLUMN])
    existing = storage.read_partitions(
        "validated", contract.domain, days=overlap_days, columns=columns
    )
    existing = existing[~existing[BATCH_COLUMN].isin(own)]
    return existing.merge(frame[keys].drop_duplicates(), on=keys, how="inner")


def _keys_from_other_batches(
    layer: PublishedRows,
    contract,
    frame,
    batch_id: str | set[str],
    whose: Callable[[Iterable[str]], str] | None = None,
) -> dict | None:
    """Return a failed-rule entry if the batch repeats keys another batch already published
    (`batch_id`: the batch, or the set of batches of a group of files); `whose` says where the
    repeated rows' batches come from (default: accepted earlier)."""
    own = {batch_id} if isinstance(batch_id, str) else batch_id
    keys = list(contract.key_columns)
    existing = _rows_of_other_batches(layer, contract, frame, own, [*keys, BATCH_COLUMN])
    if existing.empty:
        return None
    said = whose(existing[BATCH_COLUMN]) if whose is not None else _ACCEPTED_EARLIER
    return _repeated_keys_rule(frame, existing, keys, said)


def _repeated_keys_rule(frame, earlier, keys: list[str], whose: str) -> dict | None:
    """Return the failed rule `duplicate_key_across_batches` for the rows of `frame` whose
    `keys` `earlier` holds (`whose` says where those come from), or None when none does."""
    clash = frame[keys].reset_index().merge(earlier[keys], on=keys, how="inner")
    if clash.empty:
        return None
    sample = clash.head(10)
    return {
        "rule": "duplicate_key_across_batches",
        "success": False,
        "columns": keys,
        "unexpected_count": int(len(clash)),
        "sample_rows": [int(i) for i in sample["index"]],
        "sample_values": [
            {k: _value_text(v) for k, v in row.items()} for row in sample[keys].to_dict("records")
        ],
        "message": f"repeat keys {whose}",
    }


def _value_text(value: object) -> str:
    """Return a sample value as a report shows it: a day as 2013-01-02, not as a time stamp at
    midnight."""
    if isinstance(value, pd.Timestamp) and value == value.normalize():
        return value.date().isoformat()
    return str(value)


def _rule_sentence(rule: dict) -> str:
    """Return the message's sentence for a failed rule ingest adds to the suite's."""
    return (
        f"Rule {rule['rule']}: {rule['unexpected_count']:,} row(s) {rule['message']}, "
        f"e.g. row {rule['sample_rows'][0]}: {rule['sample_values'][0]}."
    )


def _publish(
    storage,
    contract,
    frame,
    batch_id: str | None,
    replace_keys: list[str] | None = None,
    retract: pd.DataFrame | None = None,
) -> list[dt.date]:
    """Merge the batch into its date partitions (replacing this batch's earlier rows, and with
    `replace_keys` any other batch's rows with the same values in those columns: a correction,
    whose `retract` rows remove the rows with their values in those columns).

    `batch_id` None: `frame` already carries each row's batch (a group of files published at
    once), and the earlier rows of every one of those batches are replaced.
    """
    existing = storage.partition_dates("validated", contract.domain)
    merged = _merged_partitions(
        contract,
        frame,
        batch_id,
        existing=set(existing),
        read=lambda day: storage.read_partition("validated", contract.domain, day),
        replace_keys=replace_keys,
        retract=retract,
    )
    layout = _layer_columns(storage, contract, existing)
    days = []
    for day, rows in merged:
        if rows.empty:  # every row retracted (or already, on a re-run): the date goes
            storage.delete_partition("validated", contract.domain, day)
        else:
            storage.write_partition(
                "validated",
                contract.domain,
                day,
                _laid_out(rows, layout, contract.optional_columns),
            )
        days.append(day)
    return days


def _layer_columns(storage, contract, existing: list[dt.date]) -> list[str]:
    """Return the validated layer's columns as its newest partition holds them, in order, when
    the contract has optional columns (a delivery without them must not narrow the layer); the
    first partition's, where it holds optional columns the newest lacks (a newest partition
    published without them before the history that has them, or before they were padded)."""
    if not contract.optional_columns or not existing:
        return []
    newest = storage.partition_columns("validated", contract.domain, existing[-1])
    if len(existing) == 1:
        return newest
    first = storage.partition_columns("validated", contract.domain, existing[0])
    if all(c in newest for c in first if c in contract.optional_columns):
        return newest
    return first + [c for c in newest if c not in first]


def _laid_out(rows: pd.DataFrame, layout: list[str], optional: Mapping[str, str]) -> pd.DataFrame:
    """Return `rows` with each optional column of `layout` they lack (empty, of its dtype),
    their columns in `layout`'s order, any others after."""
    absent = [c for c in layout if c in optional and c not in rows.columns]
    if not absent:
        return rows
    rows = rows.assign(
        **{c: pd.Series(np.nan, index=rows.index, dtype=optional[c]) for c in absent}
    )
    return rows[[c for c in layout if c in rows.columns] + [c for c in rows if c not in layout]]


def _merged_partitions(
    contract,
    frame: pd.DataFrame,
    batch_id: str | None,
    *,
    existing: set[dt.date],
    read: Callable[[dt.date], pd.DataFrame],
    replace_keys: list[str] | None,
    retract: pd.DataFrame | None,
) -> Iterator[tuple[dt.date, pd.DataFrame]]:
    """Yield, for each date the batch touches, the rows its validated partition holds once
    the batch is merged in (`_publish`; `existing`: the dates with a partition, which `read`
    returns), sorted; an empty frame: every row retracted, the date goes."""
    if batch_id is not None:
        frame = frame.assign(**{BATCH_COLUMN: batch_id})
    batches = {batch_id} if batch_id is not None else set(frame[BATCH_COLUMN])
    date_col = contract.date_column
    by_day = dict(iter(frame.groupby(date_col, sort=True)))
    removed = dict(iter(retract.groupby(date_col))) if retract is not None else {}
    for stamp in sorted(set(by_day) | set(removed)):
        rows = by_day.get(stamp, frame.iloc[:0])
        day = pd.Timestamp(stamp).date()
        if day in existing:
            current = read(day)
            current = current[~current[BATCH_COLUMN].isin(batches)]
            for named in (rows, removed.get(stamp)):
                if replace_keys and named is not None and not named.empty:
                    current = current[~_matches(current, named, replace_keys)]
            rows = pd.concat([current, rows], ignore_index=True)
        yield (
            day,
            rows.sort_values(contract.sort_columns(), kind="stable") if not rows.empty else rows,
        )


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
