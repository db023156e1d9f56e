"""The unit of work of every run: one date checked, scored and recorded under its lock, and the
completion record that says which dates are done (what backfills and catch-up redo).

A date is one unit of work: check that it has validated data and features, score it with the
champion, then record it complete, all while holding that date's lock (`finpipe.locks`).
Features are not computed date by date: features at t are built from every earlier validated
row, so a late delivery for one date changes every later date. They are brought up to date once,
in date order, by the domain's own incremental update (the one the nightly uses, identical to a
full rebuild) before the dates fan out.

Completion is recorded per date in `state/<domain>/completed/<YYYY-MM-DD>.json`, written
atomically after the date's outputs are published: status, the steps done, rows written, the
model version, the run that did it, and the fingerprints (`Storage.fingerprint`: SHA-256 on
disk, ETag on S3) of the validated and feature partitions it was computed from. A date is done
when its record says `completed`, covers the steps asked for, and those partitions still have
the recorded fingerprints. A failed date (recorded `failed`), a date never run, and a date whose
data was republished since are redone; nothing else is. That is what makes a re-run of a partly
failed backfill produce what a clean run would.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeGuard

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from finpipe.calendars import Calendar
from finpipe.domains import domain_contract, domain_scores_history, get_domain
from finpipe.errors import FinpipeError, ScoringError
from finpipe.features import definition_change, record_definition
from finpipe.ingest import SUPERSEDED, ingest_files, not_yet_due
from finpipe.locks import DEFAULT_TIMEOUT_SECONDS, history_lock, partition_lock
from finpipe.planning import ALL_STEPS, BackfillRequest, check_steps, missed_sessions
from finpipe.settings import Settings
from finpipe.storage import Storage, as_day

log = logging.getLogger("finpipe.date_runs")

Status = Literal["completed", "failed", "no data", "done earlier"]


# -- completion records --------------------------------------------------------------------
COMPLETED = "completed"


def completion_key(storage: Storage, domain: str, day: dt.date | str) -> str:
    """Return the key of the completion record of `day`."""
    return storage.state_key(domain, COMPLETED, f"{as_day(day).isoformat()}.json")


def read_completion(storage: Storage, domain: str, day: dt.date | str) -> dict | None:
    """Return the completion record of `day`, or None if the date was never attempted."""
    return storage.read_json(completion_key(storage, domain, day))


# The key of a completion record's inputs that fingerprints corrections (`corrections_through`).
CORRECTIONS = "corrections"
# The key of a completion record that keeps the inputs its date's predictions were scored from.
SCORED_INPUTS = "scored_inputs"


def partition_fingerprint(storage: Storage, domain: str, day: dt.date) -> dict[str, str | None]:
    """Return the fingerprint of the date's validated and feature partitions (None where
    absent) and, for a domain that scores from earlier dates' rows too (`Domain.scores_history`:
    credit's open loans), one of the corrections of rows dated up to it (`corrections_through`).

    Partitions are written deterministically, so rewriting the same rows keeps the fingerprint
    and only a real change of the data makes a recorded date stale.
    """
    inputs = {
        layer: storage.fingerprint(storage.partition_key(layer, domain, day))
        for layer in ("validated", "features")
    }
    if domain_scores_history(domain):
        inputs[CORRECTIONS] = corrections_through(storage, domain, day)
    return inputs


# At most this many dates, asking date by date costs an object store fewer requests than
# listing a layer (a thousand keys a page) would.
_FEW = 8


def partition_fingerprints(
    storage: Storage, domain: str, days: Iterable[dt.date | str]
) -> dict[dt.date, dict[str, str | None]]:
    """Return `partition_fingerprint` of each of `days`, keyed by date, read in one go: one
    listing per layer on an object store (a request per date and layer otherwise), the files
    hashed in parallel on disk, and the corrections listed once."""
    chosen = sorted({as_day(day) for day in days})
    if len(chosen) <= _FEW:
        return {day: partition_fingerprint(storage, domain, day) for day in chosen}
    found = {
        layer: storage.partition_fingerprints(layer, domain, chosen)
        for layer in ("validated", "features")
    }
    out: dict[dt.date, dict[str, str | None]] = {
        day: {layer: found[layer].get(day) for layer in found} for day in chosen
    }
    if chosen and domain_scores_history(domain):
        kept = _corrections(storage, domain)
        for day in chosen:
            out[day][CORRECTIONS] = _corrections_digest(kept, day)
    return out


def corrections_through(storage: Storage, domain: str, day: dt.date) -> str:
    """Return a fingerprint of the corrections that replaced or retracted published rows dated
    on or before `day` (their kept copies, `state/<domain>/superseded/`).

    What a credit date scores is the loans known by then: a later delivery (a loan's outcome)
    does not change it, a correction of any earlier day's loan does. Corrections are few, so
    this reads a handful of small files where hashing every earlier partition would not do.
    """
    return _corrections_digest(_corrections(storage, domain), day)


def _corrections(storage: Storage, domain: str) -> list[tuple[str, dt.date | None]]:
    """Every kept copy of corrected rows (its key, in order) with its earliest date."""
    date_column = domain_contract(domain).date_column
    keys = sorted(storage.list_files(storage.state_key(domain, SUPERSEDED)))
    return [(key, _earliest_date(storage, key, date_column)) for key in keys]


def _corrections_digest(kept: list[tuple[str, dt.date | None]], day: dt.date) -> str:
    digest = hashlib.sha256()
    for key, first in kept:
        if first is not None and first <= day:
            digest.update(f"{key.rsplit('/', 1)[-1]}\n".encode())
    return digest.hexdigest()


# A kept copy is created once under its batch's key and never changes, so its earliest date is
# read once per process: a backfill asks for every date, each reading every kept copy.
_EARLIEST: dict[tuple[str, str], dt.date | None] = {}


def _earliest_date(storage: Storage, key: str, date_column: str) -> dt.date | None:
    """Return the earliest date of the rows kept at `key` (None if it holds no row)."""
    remembered = (storage.url, key)
    if remembered not in _EARLIEST:
        rows = pq.read_table(pa.BufferReader(storage.read_bytes(key)), columns=[date_column])
        first = pc.min(rows.column(date_column)).as_py()
        _EARLIEST[remembered] = None if first is None else as_day(first)
    return _EARLIEST[remembered]


def is_done(storage: Storage, domain: str, day: dt.date, steps: Iterable[str]) -> bool:
    """Return whether `day` was completed with `steps` from the data it has now: its record
    says `completed` and covers the steps, its predictions are there if `score` is among them,
    and its validated and feature partitions have the fingerprints it recorded."""
    record = read_completion(storage, domain, day)
    if not _covers(record, set(steps)):
        return False
    if "score" in steps and not storage.exists(storage.partition_key("predictions", domain, day)):
        return False
    return record.get("inputs") == partition_fingerprint(storage, domain, day)


def done_dates(
    storage: Storage, domain: str, days: Iterable[dt.date], steps: Iterable[str]
) -> set[dt.date]:
    """Return those of `days` that `is_done` says are done; on an object store with a listing
    of each layer where asking date by date would be a request for each, and the records read
    several at once (a backfill's plan of 250 dates: 4x faster on a local SeaweedFS)."""
    wanted, chosen = set(steps), sorted({as_day(day) for day in days})
    if storage.is_local or len(chosen) <= _FEW:  # cheaper than a pool's start or a listing
        return {day for day in chosen if is_done(storage, domain, day, wanted)}
    with ThreadPoolExecutor(max_workers=8) as pool:  # the records: a request each
        read = pool.map(lambda day: read_completion(storage, domain, day), chosen)
        records = dict(zip(chosen, read, strict=True))
    covered = {day: record for day, record in records.items() if _covers(record, wanted)}
    if covered and "score" in wanted:
        first, last = min(covered), max(covered)
        predicted = set(storage.partition_dates("predictions", domain, first, last))
        covered = {day: record for day, record in covered.items() if day in predicted}
    now = partition_fingerprints(storage, domain, covered)
    return {day for day, record in covered.items() if record.get("inputs") == now[day]}


def _covers(record: dict | None, steps: set[str]) -> TypeGuard[dict]:
    """Whether a completion record says `completed` with every one of `steps`."""
    return (
        record is not None
        and record.get("status") == "completed"
        and steps <= set(record.get("steps", []))
    )


def stale_scored_dates(
    storage: Storage, domain: str, days: Iterable[dt.date | str], *, redefined: bool = False
) -> tuple[list[dt.date], list[dt.date]]:
    """Of `days`, return those whose published predictions were scored from data that has
    changed since (a correction, a retraction, a late delivery: the inputs they were scored
    from, `scored_inputs`, differ from the partitions now), and of those, the ones whose
    validated data is gone (a date retracted whole, which nothing can score again). A
    backfill re-scores the others.
    `redefined`: the features were rebuilt under changed settings, so for a domain that scores
    history too a change of a date's own partitions makes it stale, not only a correction."""
    stale, gone = [], []
    changed = sorted({as_day(d) for d in days})
    history = domain_scores_history(domain)
    if changed and history:  # every later scoring read them
        changed = sorted(
            {*changed, *(d for d in completed_dates(storage, domain) if d > changed[0])}
        )
    if len(changed) > _FEW:  # one listing, where a check of each date would be a request each
        predicted = set(storage.partition_dates("predictions", domain, changed[0], changed[-1]))
        changed = [day for day in changed if day in predicted]
    else:
        changed = [
            d for d in changed if storage.exists(storage.partition_key("predictions", domain, d))
        ]
    fingerprints = partition_fingerprints(storage, domain, changed)
    for day in changed:
        then = scored_inputs(read_completion(storage, domain, day) or {})
        if then is None:
            continue
        now = fingerprints[day]
        if not history or redefined:
            changed_since = then != now
        elif CORRECTIONS in then:  # later deliveries do not change what it scored
            changed_since = then[CORRECTIONS] != now[CORRECTIONS] or now["validated"] is None
        else:  # recorded before corrections were tracked: unknown, not called stale
            changed_since = False
        if changed_since:
            stale.append(day)
            if now["validated"] is None:
                gone.append(day)
    return stale, gone


def scored_inputs(record: dict) -> dict | None:
    """Return the fingerprint of the inputs a date's published predictions were scored from
    (`partition_fingerprint` when they were), None if the record says it was never scored.

    A run without the score step keeps it (`SCORED_INPUTS`): the predictions it leaves
    published were scored from those inputs, not from the ones it recorded, so they stay
    stale until a run scores the date again."""
    if SCORED_INPUTS in record:
        return record[SCORED_INPUTS] or {}
    if record.get("status") == "completed" and "score" in record.get("steps", []):
        return record.get("inputs") or {}  # written before SCORED_INPUTS was kept
    return None


def stale_predictions(storage: Storage, domain: str, features: dict) -> dict | None:
    """Return what a run says of the earlier predictions its data changed (the features it
    rebuilt or removed, `FeatureUpdate.to_dict()`): the stale dates, those of them retracted
    whole, and the backfill that re-scores the others; None when there are none."""
    changed = [*features["dates_written"], *features.get("dates_removed", [])]
    redefined = features.get("rebuilt_because") is not None
    stale, gone = stale_scored_dates(storage, domain, changed, redefined=redefined)
    if not stale:
        return None
    rescore = [day for day in stale if day not in gone]
    command = (
        f"finpipe run backfill --domain {domain} --start {rescore[0]} --end {rescore[-1]}"
        if rescore
        else None
    )
    return {
        "dates": [day.isoformat() for day in stale],
        "removed": [day.isoformat() for day in gone],
        "backfill": command,
    }


def completed_dates(storage: Storage, domain: str, *, scored: bool = False) -> list[dt.date]:
    """Return the dates recorded `completed` (with the score step among their steps, when
    `scored`: a backfill of validate and features alone leaves a date unscored), in order."""
    return [
        day
        for day, record in completion_records(storage, domain).items()
        if record.get("status") == "completed"
        and (not scored or "score" in record.get("steps", []))
    ]


def completion_records(storage: Storage, domain: str) -> dict[dt.date, dict]:
    """Return the completion record of every date a run attempted, in date order."""
    records = {}
    for key in storage.list_files(storage.state_key(domain, COMPLETED)):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".json"):
            records[as_day(name.removesuffix(".json"))] = storage.read_json(key) or {}
    return dict(sorted(records.items()))


def _write_record(storage: Storage, domain: str, day: dt.date, record: dict) -> None:
    storage.write_json(
        completion_key(storage, domain, day),
        {
            "domain": domain,
            "date": day.isoformat(),
            **record,
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )


# -- planning ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackfillPlan:
    """The dates a backfill will process and the ones already done from current data."""

    todo: tuple[dt.date, ...]
    done: tuple[dt.date, ...]


def plan_backfill(
    storage: Storage, request: BackfillRequest, *, force: bool = False
) -> BackfillPlan:
    """Split the request's dates into those to process and those already done (`is_done`)."""
    if force:
        return BackfillPlan(todo=request.days, done=())
    finished = done_dates(storage, request.domain, request.days, request.steps)
    done = tuple(d for d in request.days if d in finished)
    return BackfillPlan(todo=tuple(d for d in request.days if d not in done), done=done)


def missed_dates(
    storage: Storage, domain: str, as_of: dt.date | str, calendar: Calendar, look_back: int = 0
) -> list[dt.date]:
    """Return the sessions a nightly run catches up before `as_of` (`planning.missed_sessions`
    of the dates recorded scored, looking back `look_back` sessions for earlier gaps)."""
    scored = completed_dates(storage, domain, scored=True)
    return missed_sessions(scored, as_day(as_of), calendar, look_back=look_back)


# -- the unit of work ----------------------------------------------------------------------
@dataclass
class DateOutcome:
    """What happened to one date."""

    date: str
    status: Status
    rows: int = 0
    seconds: float = 0.0
    model_version: str | None = None
    message: str = ""
    predictions: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def table_row(self) -> dict:
        """Return the row of the per-date status table."""
        return {
            "date": self.date,
            "status": self.status,
            "rows": self.rows,
            "seconds": self.seconds,
            "model version": self.model_version or "",
            "message": self.message,
        }


class DateFailed(FinpipeError):
    """One date of a backfill failed; `outcome` says how long it ran and why."""

    def __init__(self, outcome: DateOutcome) -> None:
        super().__init__(f"{outcome.date}: {outcome.message}")
        self.outcome = outcome

    def __reduce__(self):  # keep the outcome when Prefect pickles a task's exception
        return (type(self), (self.outcome,))


class BackfillIncomplete(FinpipeError):
    """Some dates of a backfill failed; the others are done and recorded. `outcomes`: every
    date's, in order (what the command line prints before the error)."""

    def __init__(self, message: str, outcomes: Iterable[DateOutcome] = ()) -> None:
        super().__init__(message)
        self.outcomes = list(outcomes)

    def __reduce__(self):  # keep the outcomes when Prefect pickles the flow's exception
        return (type(self), (str(self), self.outcomes))


def outcome_from_record(record: dict) -> DateOutcome:
    """Return a `done earlier` outcome for a date a previous run completed."""
    return DateOutcome(
        date=record["date"],
        status="done earlier",
        rows=record.get("rows", 0),
        seconds=record.get("seconds", 0.0),
        model_version=record.get("model_version"),
        message=f"completed {record.get('finished_at')} by {record.get('holder')}",
    )


def process_date(
    storage: Storage,
    settings: Settings,
    domain: str,
    day: dt.date | str,
    steps: Iterable[str] = ALL_STEPS,
    *,
    holder: str = "",
    lock_timeout: float = DEFAULT_TIMEOUT_SECONDS,
    progress: Callable[[str], None] | None = None,
) -> DateOutcome:
    """Check, score and record one date under its lock; return what happened.

    `validate` requires a validated partition (without one the date is `no data`: a holiday
    or a delivery not ingested yet); `features` and `score` require its feature partition
    (see `update_features_through`); `score` publishes its predictions with the champion. The
    completion record is written last. A finpipe error (no champion, lock busy, ...) is
    recorded as `failed` and raised as DateFailed carrying the outcome; transient errors (a
    tracking server that blinked, I/O) propagate unchanged so an orchestrator may retry them.
    """
    day, chosen = as_day(day), check_steps(steps)
    started = time.perf_counter()
    try:
        with partition_lock(
            storage.url, domain, day, holder=holder, timeout=lock_timeout, on_wait=progress
        ):
            try:
                return _process_locked(storage, settings, domain, day, chosen, holder, started)
            except Exception as error:
                scored_from = scored_inputs(read_completion(storage, domain, day) or {})
                _write_record(
                    storage,
                    domain,
                    day,
                    {
                        "status": "failed",
                        "steps": list(chosen),
                        "error": str(error),
                        "holder": holder,
                        "seconds": _since(started),
                        **({} if scored_from is None else {SCORED_INPUTS: scored_from}),
                    },
                )
                raise
    except FinpipeError as error:
        if error.transient:  # e.g. the tracking server blinked: let the orchestrator retry
            raise
        outcome = DateOutcome(
            day.isoformat(), "failed", seconds=_since(started), message=str(error)
        )
        raise DateFailed(outcome) from error


def _process_locked(storage, settings, domain, day, steps, holder, started) -> DateOutcome:
    # Hash the inputs before reading them: if they change underneath, the record is stale
    # (and the date is redone next time) rather than wrongly fresh.
    inputs = partition_fingerprint(storage, domain, day)
    retracted = retraction_of(storage, domain, day) if inputs["validated"] is None else None
    # No data whichever steps run: a backfill of features alone over a holiday is not failed.
    if inputs["validated"] is None and ("validate" in steps or inputs["features"] is None):
        return DateOutcome(
            day.isoformat(),
            "no data",
            seconds=_since(started),
            message=f"no validated {domain} data for {day}: "
            + (
                f"{retracted}; its predictions, if any, stay as published"
                if retracted
                else "a holiday, or a delivery not ingested yet (ingest it and re-run; only "
                "such dates are redone)"
            ),
        )
    rows = 0
    if inputs["validated"] is not None and "validate" in steps:
        rows = storage.partition_rows("validated", domain, day)
    if inputs["features"] is None and ("features" in steps or "score" in steps):
        # (a date with neither validated data nor features is "no data" above)
        if "features" in steps:
            cause = "the feature update did not write it; see the build-features task's log"
        else:
            cause = "add the features step"
        raise ScoringError(f"no {domain} features for {day}: {cause}")
    if inputs["features"] is not None and "features" in steps:
        rows = storage.partition_rows("features", domain, day)
    model_version = run_id = predictions = None
    if "score" in steps:
        scored = get_domain(domain).score(storage, settings, day)
        rows, model_version, run_id = scored.rows, scored.model_version, scored.run_id
        predictions = scored.to_dict()
    previous = read_completion(storage, domain, day) or {}
    done_steps = set(steps)
    if previous.get("status") == "completed" and previous.get("inputs") == inputs:
        # Still fresh: what it recorded stays true (e.g. the scoring of a validate-only re-run).
        done_steps |= set(previous.get("steps", []))
        if "score" not in steps:
            model_version, run_id = previous.get("model_version"), previous.get("run_id")
    # The predictions left published were scored from these inputs (None: never scored).
    scored_from = inputs if "score" in steps else scored_inputs(previous)
    seconds = _since(started)
    _write_record(
        storage,
        domain,
        day,
        {
            "status": "completed",
            "steps": [s for s in ALL_STEPS if s in done_steps],
            "rows": rows,
            "model_version": model_version,
            "run_id": run_id,
            "holder": holder,
            "pid": os.getpid(),
            "seconds": seconds,
            "inputs": inputs,
            **({} if scored_from is None else {SCORED_INPUTS: scored_from}),
        },
    )
    return DateOutcome(
        day.isoformat(),
        "completed",
        rows=rows,
        seconds=seconds,
        model_version=model_version,
        predictions=predictions,
    )


def retraction_of(storage: Storage, domain: str, day: dt.date) -> str | None:
    """Say which correction retracted every row of `day` (the latest that did: the batch records'
    `removed_dates`), e.g. "retracted whole by fix.csv (batch b1f2…, validated <time>)"; None
    when none did."""
    records = storage.batch_records(domain)
    removed = [r for r in records if day.isoformat() in r.get("removed_dates", [])]
    if not removed:
        return None
    last = max(removed, key=lambda record: record.get("validated_at", ""))
    name = Path(last.get("source", "")).name or "a correction"
    return f"retracted whole by {name} (batch {last['batch_id']}, validated {last['validated_at']})"


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


# -- steps over the whole history, under the history lock ----------------------------------
def update_features_through(
    storage: Storage,
    domain: str,
    through: dt.date | str,
    *,
    dates: Iterable[dt.date | str] | None = None,
    rebuild: bool = False,
    holder: str = "",
    lock_timeout: float = DEFAULT_TIMEOUT_SECONDS,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Bring features up to date through `through` (or later), under the history lock, and
    make sure each of `dates` (the dates the run will process; default `through`) that has
    validated data has features too.

    The update runs to the later of `through` and the last date that already has features:
    a date delivered late makes every later feature stale, and stopping at `through` would
    leave later ones stale but looking fresh. A domain that builds features only for the
    nights it runs (customers' snapshots) builds those of the dates no night ran (a
    backfill's sessions, a night's catch-up) in the same step (`FeatureStep`'s `also`).
    Every date is rebuilt when the settings the domain's features are computed with changed
    since they were built (`definition_change`: a loan book's columns, customers' active
    days), so no layer mixes two definitions.
    Returns the domain's FeatureUpdate as a dict.
    """
    through = as_day(through)
    registered = get_domain(domain)
    with history_lock(storage.url, domain, holder=holder, timeout=lock_timeout, on_wait=progress):
        existing = storage.partition_dates("features", domain)
        as_of = max(through, existing[-1]) if existing else through
        changed = definition_change(storage, domain, registered.feature_definition)
        if changed and progress:
            progress(
                f"features: defined differently since they were built ({changed}); "
                "rebuilding every date"
            )
        update = registered.update_features(
            storage,
            as_of,
            rebuild=rebuild or changed is not None,
            progress=progress,
            also={as_day(day) for day in dates} if dates is not None else {through},
        )
        record_definition(storage, domain, registered.feature_definition)
    update.rebuilt_because = changed
    return update.to_dict()


def is_glob(pattern: str) -> bool:
    """Return whether `pattern` holds a wildcard (`*`, `?` or `[`)."""
    return any(c in pattern for c in "*?[")


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Return the delivered files named by `patterns`, oldest first.

    A pattern with `*`, `?` or `[` is a glob (e.g. `/data/drop/market_*.csv`) and may match
    nothing; a plain path is kept as given (ingest reports it if it is missing). Files are
    ordered by modification time, then name: the order they were delivered in.
    """
    found: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if is_glob(pattern):
            found.extend(Path(p).resolve() for p in glob.glob(pattern))
        else:
            found.append(Path(pattern))
    unique = list(dict.fromkeys(found))
    return [str(p) for p in sorted(unique, key=lambda p: (_mtime(p), p.name))]


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else float("inf")


def ingest_deliveries(
    storage: Storage,
    domain: str,
    paths: Iterable[str],
    *,
    as_of: dt.date | str,
    max_file_bytes: int | None = None,
    holder: str = "",
    lock_timeout: float = DEFAULT_TIMEOUT_SECONDS,
    progress: Callable[[str], None] | None = None,
    correction: bool = False,
    leave_later: bool = False,
) -> list[dict]:
    """Land, validate and publish delivered files in order, under the history lock
    (`correction`: they restate published rows, see `finpipe.ingest.ingest_file`).
    `leave_later`: a file every row of which is dated after `as_of` is left for the run of its
    own date (`finpipe.ingest.not_yet_due`), as a run's glob of the drop folder finds the
    next session's file when the run is late.

    Returns one IngestOutcome dict per file; ValidationFailed stops at the first bad file
    (it is quarantined, nothing from it is published).
    """
    limit: dict[str, Any] = {"max_file_bytes": max_file_bytes} if max_file_bytes else {}
    say = progress or log.info
    contract = get_domain(domain).contract
    outcomes = []
    due: list[str | Path] = list(paths)
    if leave_later:
        ready, later = not_yet_due(storage, contract, due, as_of, **limit)
        due = list(ready)
        for outcome in later:
            say(outcome.message)
            outcomes.append(outcome.to_dict())
    with history_lock(storage.url, domain, holder=holder, timeout=lock_timeout, on_wait=say):
        for outcome in ingest_files(
            storage, contract, due, as_of=as_of, correction=correction, **limit
        ):
            say(outcome.message)
            outcomes.append(outcome.to_dict())
    return outcomes


def failure_summary(outcomes: Iterable[DateOutcome], *, redo: str) -> str | None:
    """Return one message naming every failed date and how they are redone (`redo`), or None
    when none failed."""
    outcomes = list(outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
    if not failed:
        return None
    details = "; ".join(f"{o.date}: {o.message}" for o in failed[:5])
    more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
    return (
        f"{len(failed)} of {len(outcomes)} dates failed: {details}{more}. The other dates are "
        f"done and recorded; {redo}."
    )
