"""The validated layer as it was known at a time: the vintage an audit or a re-run asks for.

The validated layer holds the latest vintage of every row: a vendor's correction replaces the
rows it restates (`finpipe.ingest`, `correction`). Nothing is lost: each row carries its batch,
each batch record says when it was validated (`validated_at`, UTC), and the rows a correction
replaced are kept in `state/<domain>/superseded/<batch>.parquet`. So the layer as known at T is
the rows of the batches validated by T, plus the rows that corrections validated after T have
since replaced (those were published at T, unless their own batch came later still). A batch
with no validated record (a publish cut short, re-run later) was not known, and neither were
its rows in the partitions it did rewrite.
"""

from __future__ import annotations

import datetime as dt
import io

import pandas as pd

from finpipe.ingest import BATCH_COLUMN, SUPERSEDED, RawContract, described_file
from finpipe.storage import Storage


def validated_as_known(
    storage: Storage, contract: RawContract, known_at: dt.datetime | str
) -> pd.DataFrame:
    """Return the validated rows of `contract`'s domain as the layer held them at `known_at`
    (UTC when it has no time zone), sorted as the layer is: by date, then the other keys."""
    domain, when = contract.domain, utc_time(known_at)
    known = {
        record["batch_id"]
        for record in storage.batch_records(domain)
        if record.get("status") == "validated"
        and record.get("validated_at")
        and utc_time(record["validated_at"]) <= when
    }
    layer = storage.read_partitions("validated", domain)
    undone = [
        pd.read_parquet(io.BytesIO(storage.read_bytes(key)))
        for key in sorted(storage.list_files(storage.state_key(domain, SUPERSEDED)))
        if key.rsplit("/", 1)[-1].removesuffix(".parquet") not in known
    ]  # the rows replaced by corrections not validated at `known_at`
    keys = contract.sort_columns()
    if undone:
        restored = pd.concat(undone, ignore_index=True)
        if BATCH_COLUMN not in layer.columns:  # no partition left: corrections retracted all
            layer = restored.iloc[:0]
        # A correction cut short replaced some partitions only: the rest still hold its rows.
        present = restored[[*keys, BATCH_COLUMN]].merge(
            layer[[*keys, BATCH_COLUMN]].drop_duplicates(), how="left", indicator=True
        )
        restored = restored[(present["_merge"] == "left_only").to_numpy()]
        layer = pd.concat([layer, restored], ignore_index=True)
    if BATCH_COLUMN not in layer.columns:  # nothing published
        return layer
    layer = layer[layer[BATCH_COLUMN].isin(known).to_numpy()]
    return layer.sort_values(keys, kind="stable").reset_index(drop=True)


def batch_history(storage: Storage, domain: str) -> pd.DataFrame:
    """Return every delivered file of `domain` in the order its fate was settled: one row per
    batch with `when` (validated, quarantined or, for a batch still in progress, landed; UTC),
    `status`, `batch`, `file`, `rows`, `first_date`, `last_date`, `replaced` (published rows
    a correction replaced; missing for an ordinary delivery) and `retracted` (those of them its
    retracted rows removed). The times are what `validated_as_known` takes."""
    rows = []
    for record in storage.batch_records(domain):
        status = record.get("status", "")
        when = record.get(f"{status}_at") or record.get("landed_at")
        rows.append(
            {
                "when": utc_time(when) if when else pd.NaT,
                "status": "quarantined, dismissed" if record.get("dismissed_at") else status,
                "batch": record.get("batch_id", ""),
                "file": described_file(record),
                "rows": record.get("rows"),
                "first_date": record.get("first_date"),
                "last_date": record.get("last_date"),
                "replaced": record.get("corrected_rows"),
                "retracted": record.get("retracted_rows"),
            }
        )
    counts = ["rows", "replaced", "retracted"]
    columns = ["when", "status", "batch", "file", "rows", "first_date", "last_date", *counts[1:]]
    table = pd.DataFrame(rows, columns=columns).astype(dict.fromkeys(counts, "Int64"))
    return table.sort_values(["when", "batch"], kind="stable").reset_index(drop=True)


def utc_time(value: dt.datetime | str) -> dt.datetime:
    """Return `value` (a datetime or ISO 8601 text) in UTC; a time without a zone is UTC."""
    stamp = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return stamp.replace(tzinfo=dt.UTC) if stamp.tzinfo is None else stamp.astimezone(dt.UTC)
