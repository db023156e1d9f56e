"""What every domain's feature step shares: its report, the staleness test, the block writer.

A domain's features module builds feature frames from validated rows; the pipeline step decides
which dates need (re)building and publishes one partition per date through the helpers here, so
every domain's features layer is written and reported the same way.
"""

from __future__ import annotations

import datetime as dt
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from finpipe.storage import Storage


@dataclass
class FeatureUpdate:
    """What a feature step wrote (the fields the nightly summary reads)."""

    dates_written: list[str] = field(default_factory=list)
    rows: int = 0
    skipped_features: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def add(self, day: dt.date, rows: int) -> None:
        """Record one published partition."""
        self.dates_written.append(day.isoformat())
        self.rows += rows


def features_are_stale(storage: Storage, domain: str, day: dt.date) -> bool:
    """True when `day`'s validated partition was published after its feature partition."""
    validated = storage.partition_file("validated", domain, day).stat().st_mtime_ns
    return validated > storage.partition_file("features", domain, day).stat().st_mtime_ns


def write_feature_partitions(
    storage: Storage, domain: str, features: pd.DataFrame, date_column: str = "date"
) -> list[tuple[dt.date, int]]:
    """Publish one partition per date of `features` (sorted by date); return (day, rows) pairs.

    The block is converted to Arrow once and each date is a zero-copy slice of it; the files
    are written by a few threads (Parquet encoding and compression release the GIL). Each
    partition is still published atomically on its own, in the storage's usual way.
    """
    if features.empty:
        return []
    table = pa.Table.from_pandas(features.reset_index(drop=True), preserve_index=False)
    stamps = features[date_column].to_numpy()
    starts = np.flatnonzero(np.r_[True, stamps[1:] != stamps[:-1]])
    lengths = np.diff(np.r_[starts, len(stamps)])
    days = [pd.Timestamp(stamps[i]).date() for i in starts]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        writes = [
            pool.submit(storage.write_partition, "features", domain, day, table.slice(i, n))
            for day, i, n in zip(days, starts.tolist(), lengths.tolist(), strict=True)
        ]
        for write in writes:
            write.result()  # re-raises the first failure
    return list(zip(days, lengths.tolist(), strict=True))
