"""What every domain's feature step shares: its report, the staleness test, the block writer.

A domain's features module builds feature frames from validated rows; the pipeline step decides
which dates need (re)building and publishes one partition per date through the helpers here, so
every domain's features layer is written and reported the same way.
"""

from __future__ import annotations

import datetime as dt
import os
from concurrent.futures import Future, ThreadPoolExecutor
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


class PartitionWriter:
    """Publishes blocks of feature rows, one partition per date, while the caller builds more.

    A block is converted to Arrow once and each date is a zero-copy slice of it; a few threads
    write the files (Parquet encoding, compression and fsync release the GIL). `publish`
    returns once the block is queued, after waiting for the block before it, so at most two
    blocks are held and building block n + 1 overlaps writing block n. Leaving the `with`
    waits for every write and re-raises the first failure; partitions written by then stay
    published (each is whole), and an incremental re-run recomputes from the first gap.
    """

    def __init__(
        self, storage: Storage, domain: str, update: FeatureUpdate, date_column: str = "date"
    ) -> None:
        self._storage, self._domain, self._update = storage, domain, update
        self._date_column = date_column
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        self._pending: list[tuple[dt.date, int, Future]] = []
        self.written: list[tuple[str, int]] = []

    def __enter__(self) -> PartitionWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._settle()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def publish(self, features: pd.DataFrame) -> None:
        """Queue one partition per date of `features` (sorted by date)."""
        self._settle()
        if features.empty:
            return
        table = pa.Table.from_pandas(features.reset_index(drop=True), preserve_index=False)
        stamps = features[self._date_column].to_numpy()
        starts = np.flatnonzero(np.r_[True, stamps[1:] != stamps[:-1]])
        lengths = np.diff(np.r_[starts, len(stamps)])
        for i, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            day = pd.Timestamp(stamps[i]).date()
            write = self._pool.submit(
                self._storage.write_partition, "features", self._domain, day, table.slice(i, n)
            )
            self._pending.append((day, n, write))

    def _settle(self) -> None:
        """Wait for the queued writes, recording each published date; re-raise a failure."""
        pending, self._pending = self._pending, []
        for day, rows, write in pending:
            write.result()
            self._update.add(day, rows)
            self.written.append((day.isoformat(), rows))
