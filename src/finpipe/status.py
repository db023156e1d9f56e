"""Where a domain stands in the store: what `finpipe status` prints for the morning check.

Read-only: the delivered files and their fate, the span of each layer (and the newest night
of a segments layer, customers'), the sessions scored or not, the dates whose last run failed
and the predictions scored from data changed since. The champion's side (MLflow's registry)
is `finpipe.tracking.registry_status`.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from finpipe.calendars import Calendar
from finpipe.date_runs import completion_records, stale_scored_dates
from finpipe.ingest import delivered_files, described_file
from finpipe.storage import Storage
from finpipe.text import counted
from finpipe.validation import ValidationReport, describe_rule_break, rejecting_rules

if TYPE_CHECKING:
    from finpipe.tracking import RegistryStatus, VersionStatus

LAYERS = ("validated", "features", "predictions")
SEGMENTS = "segments"  # the layer a segmenting domain publishes with its predictions
# Of a long list (quarantined files, failed or unscored dates), the newest this many are named.
NAMED = 3


@dataclass(frozen=True)
class LayerSpan:
    """The published partitions of one layer: how many days, the first and the last."""

    days: int
    first: dt.date | None
    last: dt.date | None


@dataclass(frozen=True)
class QuarantinedFile:
    """A delivered file ingest rejected: when, which rules, and where its report is."""

    file: str
    when: str
    rules: str
    report: str


@dataclass(frozen=True)
class DateRecord:
    """The last run of one date, from its completion record."""

    date: dt.date
    status: str
    finished_at: str
    holder: str
    model_version: str | None
    error: str


@dataclass(frozen=True)
class SegmentRow:
    """One segment of a night's segments table: its id, name, customers and share of them."""

    segment: int
    name: str
    customers: int
    share: float


@dataclass(frozen=True)
class SegmentsNight:
    """The newest partition of a domain's segments layer (customers' profiles, published by
    each scoring night with its predictions): the model that made it and its segments."""

    date: dt.date
    model_version: str
    segments: list[SegmentRow]  # largest first


@dataclass(frozen=True)
class DomainStatus:
    """What `domain_status` found; every list is in date order."""

    domain: str
    files: dict[str, int]  # delivered files by status: validated, quarantined, landed
    # The newest NAMED quarantined files no later file of the same name replaced, oldest first.
    quarantined: list[QuarantinedFile]
    redelivered: int  # quarantined files a later file of the same name was validated for
    layers: dict[str, LayerSpan]
    newest_scored: DateRecord | None  # the latest date recorded completed with its scores
    failed: list[DateRecord]  # dates whose last run failed
    unscored: list[dt.date]  # sessions with validated data and no scored run since scoring began
    no_data: list[dt.date]  # sessions without validated data in the same span
    stale: list[dt.date]  # predictions scored from data changed since (see stale_scored_dates)
    gone: list[dt.date]  # of those, dates retracted whole: nothing can score them again
    # Sessions after the newest validated day through the last one before `today`.
    awaiting: list[dt.date] = field(default_factory=list)
    waiting: int = 0  # quarantined files no later file of the same name replaced, all of them
    dismissed: int = 0  # quarantined files dismissed (`finpipe dismiss`): no longer waiting
    # Of `gone`, those whose features are still published, with predictions after them: the
    # features of those later dates read them until a run rebuilds the layer, so they are to
    # re-score.
    unrebuilt: list[dt.date] = field(default_factory=list)
    # The newest segments night, for a domain that publishes a segments layer (customers).
    segments: SegmentsNight | None = None


def domain_status(
    storage: Storage, domain: str, calendar: Calendar, today: dt.date | None = None
) -> DomainStatus:
    """Return where `domain` stands in `storage`, its sessions read from `calendar`; with
    `today`, the sessions before it whose delivery has not been validated yet, too."""
    records = storage.batch_records(domain)
    published = {layer: storage.partition_dates(layer, domain) for layer in LAYERS}
    segment_days = storage.partition_dates(SEGMENTS, domain)
    if segment_days:  # shown only for a domain that has the layer
        published[SEGMENTS] = segment_days
    dates = _date_records(storage, domain)
    scored = [r for r in dates if r.status == "completed" and r.model_version is not None]
    unscored: list[dt.date] = []
    no_data: list[dt.date] = []
    if scored and published["validated"]:
        validated, done = set(published["validated"]), {r.date for r in scored}
        for day in calendar.sessions(scored[0].date, published["validated"][-1]):
            if day not in done:
                (unscored if day in validated else no_data).append(day)
    stale, gone = stale_scored_dates(storage, domain, published["predictions"])
    awaiting = []
    if today is not None and published["validated"]:
        after = published["validated"][-1] + dt.timedelta(days=1)
        awaiting = calendar.sessions(after, today - dt.timedelta(days=1))
    open_files, redelivered, dismissed = _quarantined_files(records)
    return DomainStatus(
        domain=domain,
        files=dict(Counter(record.get("status", "") for record in records)),
        quarantined=[_quarantined(storage, domain, record) for record in open_files[-NAMED:]],
        redelivered=redelivered,
        layers={layer: _span(days) for layer, days in published.items()},
        newest_scored=scored[-1] if scored else None,
        failed=[r for r in dates if r.status == "failed"],
        unscored=unscored,
        no_data=no_data,
        stale=stale,
        gone=gone,
        awaiting=awaiting,
        waiting=len(open_files),
        dismissed=dismissed,
        unrebuilt=[
            day
            for day in gone
            if day in set(published["features"]) and day < published["predictions"][-1]
        ],
        segments=_segments_night(storage, domain, segment_days[-1]) if segment_days else None,
    )


def _segments_night(storage: Storage, domain: str, day: dt.date) -> SegmentsNight:
    """Return the segments table of `day` as the status shows it, largest segment first."""
    table = storage.read_partition(SEGMENTS, domain, day).sort_values(
        ["customers", "segment"], ascending=[False, True]
    )
    return SegmentsNight(
        date=day,
        model_version=str(table["model_version"].iloc[0]),
        segments=[
            SegmentRow(
                int(row.segment), str(row.segment_name), int(row.customers), float(row.share)
            )
            for row in table.itertuples()
        ],
    )


def segments_out_of_step(status: DomainStatus) -> bool:
    """Whether the newest segments night is not the newest predictions' night: a scoring run
    stopped between the two (segments are published first), or predictions were published
    without them (before the layer existed). Either way a campaign reading that night's
    predictions and profiles reads two different nights."""
    newest = status.layers["predictions"].last
    return status.segments is not None and newest is not None and status.segments.date != newest


def needs_attention(status: DomainStatus) -> list[str]:
    """Return what in `status` needs someone's work, one short phrase each ('1 date failed'),
    empty when nothing does: what `finpipe status --check` exits 1 on. Sessions without data
    (holidays) and dates retracted whole (nothing can score them) need nobody."""
    files = status.files
    unsettled = sum(n for name, n in files.items() if name not in ("validated", "quarantined"))
    rescore = [day for day in status.stale if day not in status.gone]
    found = [
        (status.waiting, "quarantined file", "waiting for a fixed delivery"),
        (unsettled, "delivered file", "in progress or interrupted"),
        (len(status.awaiting), "session", "awaiting a delivery"),
        (len(status.failed), "date", "failed"),
        (len(status.unscored), "session", "not scored"),
        (len(rescore), "date", "scored from data changed since"),
        (len(status.unrebuilt), "date", "retracted whole that later dates' features still read"),
        (int(segments_out_of_step(status)), "segments layer", "out of step with the predictions"),
    ]
    return [f"{counted(count, noun)} {what}" for count, noun, what in found if count]


def _span(days: list[dt.date]) -> LayerSpan:
    return LayerSpan(len(days), days[0] if days else None, days[-1] if days else None)


def _date_records(storage: Storage, domain: str) -> list[DateRecord]:
    """The completion record of every date a run attempted, in date order."""
    return [
        DateRecord(
            date=day,
            status=str(record.get("status", "")),
            finished_at=str(record.get("finished_at", "")),
            holder=str(record.get("holder", "")),
            # a run without the score step leaves no version of its own
            model_version=record.get("model_version")
            if "score" in record.get("steps", [])
            else None,
            error=str(record.get("error", "")),
        )
        for day, record in completion_records(storage, domain).items()
    ]


def _quarantined_files(records: list[dict]) -> tuple[list[dict], int, int]:
    """Split the quarantined files' records (in landing order) into those still waiting for a
    fixed delivery and the count of those a later file of the same name was validated for
    (what a vendor's re-sent file is), then the count of those dismissed (`finpipe dismiss`)."""
    fixed: dict[str, str] = {}  # file name: when its latest validated delivery landed
    for record in records:
        if record.get("status") == "validated":
            for name, landed in delivered_files(record):
                fixed[name] = max(fixed.get(name, ""), landed)
    waiting, redelivered, dismissed = [], 0, 0
    for record in records:
        if record.get("status") != "quarantined":
            continue
        if all(fixed.get(name, "") > landed for name, landed in delivered_files(record)):
            redelivered += 1  # every name it came under was delivered again and validated
        elif record.get("dismissed_at"):
            dismissed += 1
        else:
            waiting.append(record)
    return waiting, redelivered, dismissed


def _quarantined(storage: Storage, domain: str, record: dict) -> QuarantinedFile:
    """A quarantined file's line, its rules read from the report kept beside it."""
    when = record.get("quarantined_at")
    batch = record.get("batch_id")
    key = storage.quarantine_report_key(domain, batch) if batch else None
    report = storage.read_json(key) if key else None
    if report is None:
        rules, where = "unknown: its report is missing", "missing"
    else:
        named = dict.fromkeys(rejecting_rules(report))  # the report's order, once each
        rules, where = ", ".join(named) or "see the report", storage.location(str(key))
    return QuarantinedFile(
        file=described_file(record),
        when=dt.datetime.fromisoformat(when).isoformat(timespec="seconds") if when else "-",
        rules=rules,
        report=where,
    )


def quarantined_batch(storage: Storage, domain: str, folder: str | None) -> dict | None:
    """Return what the store keeps of the batch quarantined in `folder` (a ValidationFailed's
    `quarantine_path`), for a failed run's summary: its file, batch id, rows, first and last
    date, each broken rule in one sentence with a sample row, and where its folder, report
    (None when missing) and Data Docs are; None when nothing was quarantined there."""
    records = storage.batch_records(domain) if folder else []
    record = next((r for r in records if r.get("quarantine_path") == folder), None)
    if record is None:
        return None
    key = storage.quarantine_report_key(domain, record["batch_id"])
    report = storage.read_json(key)
    failures = ValidationReport.from_dict(report).failures() if report else []
    return {
        "file": described_file(record),
        "batch_id": record["batch_id"],
        "rows": record.get("rows"),
        "first_date": record.get("first_date"),
        "last_date": record.get("last_date"),
        "folder": folder,
        "report": storage.location(key) if report else None,
        "data_docs": (report or {}).get("data_docs"),
        "rules": [describe_rule_break(rule) for rule in failures],
    }


@dataclass(frozen=True)
class BackfillCap:
    """The domain's calendar and `FINPIPE_BACKFILL_MAX_DATES`: a range holding more sessions
    is refused by `finpipe run backfill`, so the status names several backfills instead."""

    calendar: Calendar
    max_dates: int


def status_lines(status: DomainStatus, cap: BackfillCap | None = None) -> list[str]:
    """Return the store's part of `finpipe status` for one domain: one line a fact, and under
    a fact that needs doing, the command that does it (within `cap`, when given)."""
    lines = [_files_line(status)]
    for found in status.quarantined:
        lines.append(f"  quarantined  {found.file} at {found.when}")
        lines.append(f"               rules: {found.rules}")
        lines.append(f"               report: {found.report}")
    earlier = status.waiting - len(status.quarantined)
    if earlier > 0:
        lines.append(
            f"  quarantined  and {counted(earlier, 'earlier file')} (finpipe batches "
            f"{status.domain} lists them; each report is in quarantine/{status.domain}/<batch>/)"
        )
    for layer, span in status.layers.items():
        shown = f"{span.first} .. {span.last}, {counted(span.days, 'day')}" if span.days else "-"
        lines.append(f"  {layer:<12} {shown}")
        if layer == "validated" and status.awaiting:
            lines.append(
                f"  awaiting     {counted(len(status.awaiting), 'session')} since, "
                f"{status.awaiting[0]} .. {status.awaiting[-1]}: no delivery validated yet"
            )
    lines += _segments_lines(status)
    if status.newest_scored is not None:
        newest = status.newest_scored
        lines.append(
            f"  last scored  {newest.date} by model v{newest.model_version}, "
            f"finished {newest.finished_at} ({newest.holder or 'no holder recorded'})"
        )
    else:
        # `run nightly` alone runs market: the hint names the domain it is about.
        lines.append(
            f"  last scored  - (no date scored yet: finpipe run nightly --domain {status.domain})"
        )
    lines += _dates_lines(status, cap)
    return lines


def _segments_lines(status: DomainStatus) -> list[str]:
    """The newest segments night: one line a segment (id, name, customers, share), and a
    warning with the command that re-scores when the predictions' newest night is another.
    A night with predictions and no segments is completed from unchanged data, which a plain
    backfill skips (`date_runs.done_dates` does not read the segments layer): its command
    forces it."""
    night = status.segments
    if night is None:
        return []
    lines = [
        f"               {night.date}: {counted(len(night.segments), 'segment')} "
        f"by model v{night.model_version}, largest first"
    ]
    lines += [
        f"               {row.segment:>3}  {row.name} ({row.customers:,}, {row.share:.0%})"
        for row in night.segments
    ]
    newest = status.layers["predictions"].last
    if segments_out_of_step(status) and newest is not None:
        later = max(night.date, newest)
        missing = "predictions" if night.date > newest else "segments table"
        lines.append(
            f"  out of step  newest segments {night.date}, newest predictions {newest}: "
            f"{later} has no {missing}"
        )
        lines += _backfill_lines(
            "re-score", status.domain, later, later, None, force=missing == "segments table"
        )
    return lines


def _files_line(status: DomainStatus) -> str:
    files = status.files
    if not files:
        return "  files        none delivered yet (finpipe ingest, or a run's --input)"
    parts = [f"{files[name]:,} {name}" for name in ("validated", "quarantined") if name in files]
    settled = []
    if status.redelivered:
        settled.append(f"{status.redelivered:,} of them since delivered again and validated")
    if status.dismissed:
        settled.append(f"{status.dismissed:,} dismissed")
    if settled:
        parts[-1] += f" ({', '.join(settled)})"
    others = sum(n for name, n in files.items() if name not in ("validated", "quarantined"))
    if others:
        parts.append(f"{others:,} in progress or interrupted (re-run ingest to settle them)")
    return f"  files        {counted(sum(files.values()), 'delivered file')}: {', '.join(parts)}"


def _dates_lines(status: DomainStatus, cap: BackfillCap | None) -> list[str]:
    lines = []
    domain = status.domain
    if status.failed:
        failed = [d.date for d in status.failed]
        lines.append(f"  failed       {_named(failed)}: last error")
        lines.append(f"               {status.failed[-1].date}: {status.failed[-1].error}")
        lines += _backfill_lines("re-run", domain, failed[0], failed[-1], cap)
    if status.unscored:
        lines.append(
            f"  not scored   {_named(status.unscored)} (sessions with validated data since "
            "scoring began)"
        )
        lines += _backfill_lines("score them", domain, status.unscored[0], status.unscored[-1], cap)
    if status.no_data:
        lines.append(
            f"  no data      {_named(status.no_data)} (sessions without validated rows: a "
            "holiday, or a delivery not ingested yet or quarantined)"
        )
    if status.stale:
        lines.append(
            f"  stale        {_named(status.stale)}: predictions scored from data corrected, "
            "retracted or delivered late since"
        )
        # Through the newest predictions: a later date's features may read a changed day (a
        # lookback, a snapshot of history); the backfill rebuilds them first, then redoes each
        # date whose inputs changed and skips the others.
        newest = status.layers["predictions"].last
        rescore = [day for day in status.stale if day not in status.gone]
        starts = rescore[:1] + status.unrebuilt[:1]
        if starts and newest is not None:
            lines += _backfill_lines("re-score", domain, min(starts), newest, cap)
            lines.append(
                "               (through the newest predictions: later dates whose features "
                "read a changed day are redone too)"
            )
        if status.gone:
            lines.append(
                f"               {_named(status.gone)}: retracted whole, so nothing can "
                "score them again; their predictions stay as published"
            )
    if status.newest_scored is not None and not (status.failed or status.unscored or status.stale):
        sessions = "session with validated data" if status.no_data else "session"
        lines.append(f"  dates        every {sessions} since scoring began is scored and current")
    return lines


def _named(days) -> str:
    """'3 dates: 2024-01-02, 2024-01-03, 2024-01-04', the newest NAMED of a longer list."""
    days = sorted(days)
    shown = ", ".join(str(day) for day in days[-NAMED:])
    return f"{counted(len(days), 'date')}: {'..., ' if len(days) > NAMED else ''}{shown}"


def _backfill_lines(
    label: str,
    domain: str,
    first: dt.date,
    last: dt.date,
    cap: BackfillCap | None,
    *,
    force: bool = False,
) -> list[str]:
    """The backfill command(s) redoing `first` through `last`: one, or with `cap` one per
    run of at most `cap.max_dates` sessions, since a longer range is refused; with `force`,
    dates a plain backfill counts as done are redone too."""
    ranges, note = [(first, last)], []
    if cap is not None:
        sessions = cap.calendar.sessions(first, last)
        if len(sessions) > cap.max_dates:
            starts = sessions[:: cap.max_dates]
            ends = [*(day - dt.timedelta(days=1) for day in starts[1:]), last]
            ranges = list(zip([first, *starts[1:]], ends, strict=True))
            note = [
                f"               ({len(ranges)} backfills in order: one holds at most "
                f"{cap.max_dates} sessions, FINPIPE_BACKFILL_MAX_DATES)"
            ]
    commands = [
        f"finpipe run backfill --domain {domain} --start {start} --end {end}"
        + (" --force" if force else "")
        for start, end in ranges
    ]
    lines = [f"               {label}: {commands[0]}"]
    lines += [" " * (17 + len(label)) + command for command in commands[1:]]
    return lines + note


def registry_lines(domain: str, registry: RegistryStatus) -> list[str]:
    """Return the registry's part of `finpipe status` for one domain: its champion, its latest
    challenger where that is another version, and the reason each promotion gave."""
    champion, challenger = registry.champion, registry.challenger
    if champion is None:
        lines = [
            f"  champion     none yet in {registry.model} (finpipe run nightly --domain "
            f"{domain} trains and promotes one)"
        ]
    else:
        lines = [f"  champion     {_version(champion)}"]
        if champion.reason:
            lines.append(f"               {champion.reason}")
    if challenger is None or (champion is not None and challenger.version == champion.version):
        return lines
    if challenger.refused and not challenger.reason:
        fate = f"refused by the quality floor ({challenger.refused})"
    elif challenger.promotion is None:
        fate = "not compared yet: its night stopped before promotion (re-run it)"
    else:
        fate = challenger.reason or "not promoted (the promotion.json of its run says why)"
    lines.append(f"  challenger   {_version(challenger)}")
    lines.append(f"               {fate}")
    return lines


def _version(found: VersionStatus) -> str:
    trained = f"trained as of {found.as_of}" if found.as_of else "as-of date not recorded"
    return f"v{found.version}, {trained}, registered {found.registered_at}"
