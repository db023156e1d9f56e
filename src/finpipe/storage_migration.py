"""Converting a store written with hive `date=YYYY-MM-DD` folders to the bare-day layout.

Until 2026-12 a partition lived in `<layer>/<domain>/date=YYYY-MM-DD/part-0.parquet` and its
file held the day as a timestamp. Hive readers took the day from the folder name as a string as
well, and pandas and pyarrow refused to merge the two types, so no layer opened as a dataset
(see `finpipe.storage`). Each old partition is published again through `Storage.write_partition`
(the same atomic, fsynced path as every write, which stores `date` as a calendar day) in its
bare-day folder, and only then is the old folder removed. A conversion stopped half way leaves
the day in both layouts; running it again keeps the bare-day copy (already complete: it is
published atomically) and removes the old one. Each domain is converted under its history lock,
as ingest and feature updates take it, so a run of that domain waits rather than reading a
half-converted layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from finpipe.locks import history_lock
from finpipe.storage import LAYERS, LEGACY_PREFIX, PARTITION_FILE, Storage, as_day, check_name


@dataclass(frozen=True)
class MigratedLayer:
    """What the conversion did to one layer of one domain."""

    layer: str
    domain: str
    partitions: int  # old folders converted (published again in bare-day folders, removed)


def _migrate_layer(storage: Storage, layer: str, domain: str) -> MigratedLayer:
    moved = 0
    layer_key = storage.layer_key(layer, domain)
    for name in sorted(storage.list_names(layer_key)):
        if not name.startswith(LEGACY_PREFIX):
            continue
        day = as_day(name.removeprefix(LEGACY_PREFIX))
        old_file = f"{layer_key}/{name}/{PARTITION_FILE}"
        if storage.exists(old_file) and not storage.exists(
            storage.partition_key(layer, domain, day)
        ):
            table = pq.read_table(pa.BufferReader(storage.read_bytes(old_file)))
            storage.write_partition(layer, domain, day, table)
        storage.delete_folder(f"{layer_key}/{name}")
        moved += 1
    return MigratedLayer(layer, domain, moved)


def migrate_hive_layout(
    root: str | os.PathLike[str], *, holder: str = "finpipe migrate-storage"
) -> list[MigratedLayer]:
    """Convert every layer of every domain under `root` (a folder or an object-store URI) to
    bare-day folders; return the layers that changed.

    Running it on a converted (or new) store changes nothing.
    """
    storage = Storage(root)
    domains = sorted(
        {
            name
            for layer in LAYERS
            for name in storage.list_names(layer)
            if not name.startswith(".") and storage.list_names(f"{layer}/{name}")
        }
    )
    done = []
    for domain in domains:
        with history_lock(storage.url, check_name(domain), holder=holder):
            for layer in LAYERS:
                if storage.list_names(storage.layer_key(layer, domain)):
                    done.append(_migrate_layer(storage, layer, domain))
    return [layer for layer in done if layer.partitions]
