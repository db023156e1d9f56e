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

import shutil
from dataclasses import dataclass
from pathlib import Path

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
    for folder in sorted(storage.layer_dir(layer, domain).glob(f"{LEGACY_PREFIX}*")):
        day = as_day(folder.name.removeprefix(LEGACY_PREFIX))
        old_file = folder / PARTITION_FILE
        if old_file.exists() and not storage.partition_file(layer, domain, day).exists():
            storage.write_partition(layer, domain, day, pq.read_table(old_file))
        shutil.rmtree(folder)
        moved += 1
    return MigratedLayer(layer, domain, moved)


def migrate_hive_layout(
    root: Path, *, holder: str = "finpipe migrate-storage"
) -> list[MigratedLayer]:
    """Convert every layer of every domain under `root` to bare-day folders; return the layers
    that changed.

    Running it on a converted (or new) store changes nothing.
    """
    root = Path(root)
    domains = sorted(
        {
            folder.name
            for layer in LAYERS
            if (root / layer).is_dir()
            for folder in (root / layer).iterdir()
            if folder.is_dir() and not folder.name.startswith(".")
        }
    )
    storage = Storage(root)
    done = []
    for domain in domains:
        with history_lock(root, check_name(domain), holder=holder):
            for layer in LAYERS:
                if storage.layer_dir(layer, domain).is_dir():
                    done.append(_migrate_layer(storage, layer, domain))
    return [layer for layer in done if layer.partitions]
