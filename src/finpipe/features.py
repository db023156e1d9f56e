"""What every domain's feature step shares: its report, the staleness test, the block writer.

A domain's features module builds feature frames from validated rows; the pipeline step decides
which dates need (re)building and publishes one partition per date through the helpers here, so
every domain's features layer is written and reported the same way. A domain whose feature rows
depend on their own day's validated rows only (credit, the toy domain of the tests) needs no
more than `update_day_features`; one whose features read earlier days decides itself which
days a change reaches: market's lookbacks with `stale_feature_days`, `orphaned_feature_days`,
`remove_feature_days` and `PartitionWriter`, customers' snapshots of the whole history with
`history_fingerprints` and `record_inputs`.

Staleness is told by content, not by clocks: `state/<domain>/features_built_from.json` records,
for each feature partition, the fingerprint (`Storage.partition_fingerprints`) of the validated
data it was built from, written once the partition is published (under the history lock in the
flows). A day whose validated partition no longer has that fingerprint, or that has no record
(a store written before the record existed, or a write cut short), is stale and rebuilt.
Modification times would not do: on an object store they have a resolution of one second and
come from the server's clock, and a copied store keeps its bytes but not its times.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from finpipe.storage import Storage, as_day
from finpipe.text import counted


@dataclass
class FeatureUpdate:
    """What a feature step wrote (the fields the nightly summary reads)."""

    dates_written: list[str] = field(default_factory=list)
    rows: int = 0
    # Features not built for a column the source should have and the data lacks: a warning.
    skipped_features: dict[str, str] = field(default_factory=dict)
    # Features not built because the source's config maps no column for their input (an
    # optional column it never delivers): expected every night, said as information.
    unsourced_features: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    # Feature partitions removed with their date (a correction retracted all its rows).
    dates_removed: list[str] = field(default_factory=list)
    # The change of settings that made the step rebuild every date (`definition_change`).
    rebuilt_because: str | None = None
    # Of `dates_written`, those that had features before the step (built again: their data
    # was corrected or delivered late, or the settings changed), not new dates.
    dates_rebuilt: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def add(self, day: dt.date, rows: int, *, rebuilt: bool = False) -> None:
        """Record one published partition (`rebuilt`: the date had features before)."""
        self.dates_written.append(day.isoformat())
        self.rows += rows
        if rebuilt:
            self.dates_rebuilt.append(day.isoformat())


def describe_feature_update(update: Mapping, dates: list[str]) -> str:
    """Return the feature step's log line for `update` (a `FeatureUpdate.to_dict()`): the rows
    over the dates it wrote and the dates whose features it removed (a correction retracted
    all their rows), or, when it did neither, that the features were already current for
    `dates` (the run's dates, ISO) rather than "0 rows over 0 dates"."""
    written, removed = update["dates_written"], update.get("dates_removed") or []
    said = (
        [f"{counted(update['rows'], 'row')} over {counted(len(written), 'date')}"]
        if written
        else []
    )
    if removed:
        said.append(f"{counted(len(removed), 'date')} removed ({', '.join(sorted(removed))})")
    if said:
        return "features: " + "; ".join(said)
    first, last = min(dates), max(dates)
    span = first if first == last else f"{first} to {last}"
    return f"features: already current for {span}, nothing to build"


BUILT_FROM = "features_built_from.json"


def recorded_inputs(storage: Storage, domain: str) -> dict[str, str]:
    """Return, by ISO day, the fingerprint of the validated data each feature partition was
    built from (see the module docstring)."""
    return storage.read_json(storage.state_key(domain, BUILT_FROM)) or {}


def record_inputs(storage: Storage, domain: str, built: Mapping[str, str]) -> None:
    """Add `built` (ISO day -> fingerprint of what its features were built from) to the record."""
    if not built:
        return
    recorded = recorded_inputs(storage, domain)
    recorded.update(built)
    storage.write_json(storage.state_key(domain, BUILT_FROM), dict(sorted(recorded.items())))


DEFINED_BY = "features_defined_by.json"


def definition_change(
    storage: Storage, domain: str, definition: Mapping[str, object]
) -> str | None:
    """Say how `definition` (the settings a domain's features are computed with,
    `DomainParts.feature_definition`) differs from the one the published features were built
    with, e.g. "active_days: 365 -> 180"; None when it is the same, when no feature partition
    is published yet, or when none was recorded (features built before this record)."""
    recorded = storage.read_json(storage.state_key(domain, DEFINED_BY))
    current = json.loads(json.dumps(definition))  # as stored: lists, not tuples
    if recorded is None or recorded == current:
        return None
    if not storage.partition_dates("features", domain, last=1):
        return None
    return "; ".join(
        f"{key}: {recorded.get(key)!r} -> {current.get(key)!r}"
        for key in sorted({*recorded, *current})
        if recorded.get(key) != current.get(key)
    )


def record_definition(storage: Storage, domain: str, definition: Mapping[str, object]) -> None:
    """Note `definition` as the one the published features are built with."""
    storage.write_json(storage.state_key(domain, DEFINED_BY), dict(definition))


def stale_feature_days(
    storage: Storage, domain: str, days: Iterable[dt.date] | None = None
) -> set[dt.date]:
    """Return the validated days (of `days`, when given) whose features were not built from
    the validated partition they have now."""
    validated = storage.partition_fingerprints("validated", domain, days)
    recorded = recorded_inputs(storage, domain)
    return {day for day, print_ in validated.items() if recorded.get(day.isoformat()) != print_}


def orphaned_feature_days(
    storage: Storage, domain: str, end: dt.date | None = None
) -> list[dt.date]:
    """Return the days (up to `end`) with a feature partition but no validated one: dates a
    correction retracted whole. Their features go last (`remove_feature_days`), after the
    features that depended on them are rebuilt, so a step cut short finds them again."""
    validated = set(storage.partition_dates("validated", domain, end=end))
    return [d for d in storage.partition_dates("features", domain, end=end) if d not in validated]


def remove_feature_days(
    storage: Storage, domain: str, days: Iterable[dt.date], update: FeatureUpdate
) -> None:
    """Remove the feature partitions of `days` and their built-from records; note them."""
    days = sorted(days)
    if not days:
        return
    for day in days:
        storage.delete_partition("features", domain, day)
        update.dates_removed.append(day.isoformat())
    gone = {day.isoformat() for day in days}
    recorded = recorded_inputs(storage, domain)
    kept = {d: p for d, p in recorded.items() if d not in gone}
    if kept != recorded:
        storage.write_json(storage.state_key(domain, BUILT_FROM), kept)


def history_fingerprints(
    validated: Mapping[dt.date, str], days: Iterable[dt.date]
) -> dict[dt.date, str]:
    """Return, for each of `days`, one fingerprint of every validated partition on or before
    it: what a snapshot built from the whole history up to a day (customers) depends on. One
    pass over the partitions, a running digest copied at each day."""
    digest, out = hashlib.sha256(), {}
    published = sorted(validated)
    position = 0
    for day in sorted(set(days)):
        while position < len(published) and published[position] <= day:
            earlier = published[position]
            digest.update(f"{earlier.isoformat()} {validated[earlier]}\n".encode())
            position += 1
        out[day] = digest.copy().hexdigest()
    return out


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
        self._existing = set(storage.partition_dates("features", domain))  # before it writes
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
        # What each partition was built from, once all are published: a day left out (a
        # write that failed) counts as stale and is built again.
        days = [dt.date.fromisoformat(day) for day, _ in self.written]
        validated = self._storage.partition_fingerprints("validated", self._domain, days)
        built = {day.isoformat(): print_ for day, print_ in validated.items()}
        record_inputs(self._storage, self._domain, built)

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
            self._update.add(day, rows, rebuilt=day in self._existing)
            self.written.append((day.isoformat(), rows))


def update_day_features(
    storage: Storage,
    domain: str,
    as_of: dt.date | str,
    build: Callable[[pd.DataFrame], pd.DataFrame],
    *,
    rebuild: bool = False,
    progress: Callable[[str], None] | None = None,
    date_column: str = "date",
    block_dates: int = 100,
) -> FeatureUpdate:
    """Publish the feature partition of every validated date of `domain` up to `as_of` that
    lacks one or was built from another version of its validated partition (a correction
    restated it: `stale_feature_days`), all of them with `rebuild`; then remove the features
    of dates a correction retracted whole (`orphaned_feature_days`). Every validated date has
    features after it, so a backfill's or catch-up's `also` asks for none more.

    For domains whose feature rows depend on their own day's validated rows only: `build`
    takes the validated rows of a block of dates (`block_dates` at a time) and returns their
    feature rows, with `date_column`; rows come out sorted by it, stably, so a `build` that
    sorts within a date keeps that order.
    """
    started = time.perf_counter()
    as_of = as_day(as_of)
    update = FeatureUpdate()
    done = set(storage.partition_dates("features", domain, end=as_of))
    validated = storage.partition_dates("validated", domain, end=as_of)
    stale = set() if rebuild else stale_feature_days(storage, domain, validated)
    todo = [day for day in validated if rebuild or day not in done or day in stale]
    with PartitionWriter(storage, domain, update, date_column) as writer:
        for start in range(0, len(todo), block_dates):
            block = todo[start : start + block_dates]
            features = build(storage.read_partitions("validated", domain, days=block))
            writer.publish(features.sort_values(date_column, kind="stable"))
            if progress:
                progress(f"features: {start + len(block)}/{len(todo)} dates built")
    # Last, so a step cut short before it finds them again: their rows must not train or score.
    remove_feature_days(storage, domain, orphaned_feature_days(storage, domain, as_of), update)
    update.seconds = round(time.perf_counter() - started, 3)
    return update
