"""Ingest: land a delivered file, validate it with Great Expectations, publish or quarantine.

Generic over domains: a domain supplies a `RawContract` (how to normalise its files, which
suite checks them, what its keys are). Every file is identified by the SHA-256 of its bytes,
so the same delivery is loaded once however often it is offered.
"""

from __future__ import annotations

import datetime as dt
import gzip
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from finpipe.errors import InputFileError, ValidationFailed
from finpipe.storage import Storage, as_day, file_sha256
from finpipe.validation import describe_rule_break, validate_frame

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
    # price); receives the normalised batch and the storage it will be published to.
    add_check_columns: Callable[[pd.DataFrame, Storage], pd.DataFrame] | None = None
    # Extra `pandas.read_csv` options for sources that are not comma-separated with a header,
    # e.g. {"sep": r"\s+", "header": None, "names": [...]}; None reads the default CSV.
    read_options: Mapping[str, Any] | None = None
    # Builds the suite in memory (e.g. from a user's config and the data accepted so far)
    # instead of reading expectations/<suite>.json; receives the storage it will publish to.
    suite_spec: Callable[[Storage], dict] | None = None
    # True when `normalise` also takes the run's as-of day (`as_of=`): cross-sectional data
    # without a date column is dated by the day it is ingested.
    normalise_takes_as_of: bool = False


@dataclass
class IngestOutcome:
    """What happened to one delivered file."""

    source: str
    sha256: str
    batch_id: str
    status: str  # "validated", "already_loaded" or "quarantined"
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
        frame = pd.read_csv(
            path, compression="infer", encoding="utf-8", dtype=str, **(read_options or {})
        )
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
    return frame


DEFAULT_MAX_FILE_BYTES = 2 * 1024**3


def ingest_file(
    storage: Storage,
    contract: RawContract,
    path: Path,
    *,
    as_of: dt.date | str,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> IngestOutcome:
    """Land, validate and publish one delivered file; return what happened.

    A file already loaded (same bytes) is skipped. A file that fails validation is copied to
    quarantine/ with its report and ValidationFailed is raised; nothing is published from it.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size > max_file_bytes:
        # Refused before landing: a batch is validated in memory, and copying a file that
        # cannot be loaded into landing/ or quarantine/ would only fill the disk.
        raise InputFileError(
            f"{path}: {size / 1024**2:,.0f} MiB is over the {max_file_bytes / 1024**2:,.0f} MiB "
            "limit for one delivery; split it (e.g. one file per month) or raise "
            "FINPIPE_MAX_FILE_MB"
        )
    domain = contract.domain
    sha = file_sha256(path)
    batch_id = f"b{sha[:12]}"
    previous = storage.read_batch_record(domain, sha)
    if previous is not None and previous["status"] == "validated":
        return IngestOutcome(
            source=str(path),
            sha256=sha,
            batch_id=batch_id,
            status="already_loaded",
            rows=previous.get("rows", 0),
            first_date=previous.get("first_date"),
            last_date=previous.get("last_date"),
            landed_path=previous.get("landed_path"),
            message=f"{path.name}: already loaded on {previous.get('validated_at')}; skipped",
        )
    landed = storage.land_file(domain, path, sha)
    record: dict[str, Any] = {
        "sha256": sha,
        "batch_id": batch_id,
        "source": str(path),
        "landed_path": str(landed),
        "landed_at": _now(),
        "status": "landed",
    }
    storage.write_batch_record(domain, record)

    docs_dir = storage.reports_dir() / "data_docs" / domain / batch_id
    try:
        dated = {"as_of": as_day(as_of)} if contract.normalise_takes_as_of else {}
        raw = read_delivery(landed, contract.read_options)
        frame = contract.normalise(raw, source=path.name, **dated)
    except InputFileError as error:
        unreadable = {
            "suite": contract.suite,
            "batch": batch_id,
            "source": str(path),
            "success": False,
            "rules": [{"rule": "readable_file", "success": False, "message": str(error)}],
        }
        _quarantine(storage, contract, record, landed, unreadable, None, str(error))
    if contract.add_check_columns is not None:
        checked = contract.add_check_columns(frame, storage)
    else:
        checked = frame
    report = validate_frame(
        checked,
        suite_name=contract.suite,
        suite_spec=contract.suite_spec(storage) if contract.suite_spec is not None else None,
        batch_name=f"{batch_id}:{path.name}",
        parameters={"as_of": pd.Timestamp(as_day(as_of))},
        data_docs_dir=docs_dir,
    )
    report_dict = report.to_dict()
    report_dict["source"] = str(path)
    for extra in (
        _parse_error_rule(frame),
        _keys_from_other_batches(storage, contract, frame, batch_id),
    ):
        if extra is not None:
            report_dict["success"] = False
            report_dict.setdefault("rules", []).append(extra)
    if not report_dict["success"]:
        message = report.summary() if not report.success else ""
        for extra in report_dict["rules"][len(report.rules) :]:
            message += (
                f" Rule {extra['rule']}: {extra['unexpected_count']} rows {extra['message']}, "
                f"e.g. row {extra['sample_rows'][0]}: {extra['sample_values'][0]}."
            )
        _quarantine(
            storage,
            contract,
            record,
            landed,
            report_dict,
            docs_dir if docs_dir.exists() else None,
            message.strip(),
        )

    published = _publish(storage, contract, frame, batch_id)
    dates = sorted(published)
    warnings = [describe_rule_break(rule) for rule in report.warnings()]
    record.update(
        status="validated",
        validated_at=_now(),
        rows=len(frame),
        first_date=dates[0].isoformat() if dates else None,
        last_date=dates[-1].isoformat() if dates else None,
        warnings=warnings,
    )
    storage.write_batch_record(domain, record)
    return IngestOutcome(
        source=str(path),
        sha256=sha,
        batch_id=batch_id,
        status="validated",
        rows=len(frame),
        first_date=record["first_date"],
        last_date=record["last_date"],
        dates=len(dates),
        landed_path=str(landed),
        data_docs=str(docs_dir / "index.html") if docs_dir.exists() else None,
        message=f"{path.name}: {len(frame):,} rows over {len(dates)} dates validated"
        + (f" with {len(warnings)} warning(s): {' '.join(warnings)}" if warnings else ""),
        warnings=warnings,
    )


def _quarantine(storage, contract, record, landed, report, docs_dir, message) -> None:
    folder = storage.quarantine_batch(
        contract.domain,
        record["batch_id"],
        landed,
        report,
        docs_dir,
        file_name=Path(record["source"]).name,
    )
    record.update(status="quarantined", quarantined_at=_now(), quarantine_path=str(folder))
    storage.write_batch_record(contract.domain, record)
    failed = [r.get("rule") for r in report.get("rules", []) if not r.get("success", True)]
    raise ValidationFailed(
        f"{Path(record['source']).name} rejected (rules failed: {', '.join(map(str, failed))}). "
        f"{message} Batch kept in {folder} with report.json; accepted data is untouched.",
        quarantine_path=str(folder),
    )


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
        "message": "have values that are not valid for their column (numbers, dates)",
    }


def _keys_from_other_batches(storage, contract, frame, batch_id) -> dict | None:
    """Return a failed-rule entry if the batch repeats keys another batch already published."""
    date_col = contract.date_column
    days = sorted({d.date() for d in frame[date_col].dropna().unique()})
    existing_days = set(storage.partition_dates("validated", contract.domain))
    overlap_days = [d for d in days if d in existing_days]
    if not overlap_days:
        return None
    existing = storage.read_partitions(
        "validated",
        contract.domain,
        days=overlap_days,
        columns=[*contract.key_columns, BATCH_COLUMN],
    )
    existing = existing[existing[BATCH_COLUMN] != batch_id]
    if existing.empty:
        return None
    keys = list(contract.key_columns)
    clash = frame.reset_index().merge(existing[keys], on=keys, how="inner")
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
            {k: str(v) for k, v in row.items()} for row in sample[keys].to_dict("records")
        ],
        "message": "repeat keys already accepted from an earlier batch",
    }


def _publish(storage, contract, frame, batch_id) -> list[dt.date]:
    """Merge the batch into its date partitions (replacing this batch's earlier rows)."""
    frame = frame.assign(**{BATCH_COLUMN: batch_id})
    date_col = contract.date_column
    sort_cols = [date_col, *[k for k in contract.key_columns if k != date_col]]
    days = []
    existing_days = set(storage.partition_dates("validated", contract.domain))
    for stamp, rows in frame.groupby(date_col, sort=True):
        day = pd.Timestamp(stamp).date()
        if day in existing_days:
            current = storage.read_partition("validated", contract.domain, day)
            current = current[current[BATCH_COLUMN] != batch_id]
            rows = pd.concat([current, rows], ignore_index=True)
        rows = rows.sort_values(sort_cols, kind="stable")
        storage.write_partition("validated", contract.domain, day, rows)
        days.append(day)
    return days


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
