"""The `finpipe` command line: generate, ingest, run, demo.

Heavy imports (PyTorch, MLflow, Prefect) happen inside commands so `--help` is instant, and
after `prepare_environment` so Prefect's local state lands under FINPIPE_HOME.
"""

from __future__ import annotations

import datetime as dt
import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from finpipe.errors import ConfigError, FinpipeError
from finpipe.settings import Settings, disable_telemetry, load_settings, prepare_environment
from finpipe.text import counted, sentence

if TYPE_CHECKING:
    from finpipe.storage import Storage

app = typer.Typer(
    help="finpipe: nightly, workflow-orchestrated deep learning on financial data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal's width
)
generate_app = typer.Typer(
    help="Write synthetic data shaped like a vendor's delivery.", rich_markup_mode="markdown"
)
run_app = typer.Typer(help="Run a pipeline flow (through Prefect).", rich_markup_mode="markdown")
app.add_typer(generate_app, name="generate")
app.add_typer(run_app, name="run")


def _settings() -> Settings:
    settings = load_settings()
    prepare_environment(settings)
    return settings


def _read_only_settings() -> Settings:
    """Settings for a command that runs no flow and creates no folder (`status`, `batches`,
    `validated`, `dismiss`): telemetry off, without `prepare_environment`, which creates
    Prefect's folder under the storage root."""
    settings = load_settings()
    disable_telemetry()
    return settings


def _existing_store(settings: Settings) -> Storage:
    """Return the store a read-only command reads; ConfigError when its folder does not exist
    (a mistyped FINPIPE_HOME), rather than an empty answer."""
    from finpipe.storage import Storage

    storage = Storage(settings.home)
    if _missing(storage):
        raise ConfigError(
            f"store {storage.location()} does not exist: is FINPIPE_HOME right? "
            "(`finpipe ingest` creates it)"
        )
    return storage


def _missing(storage: Storage) -> bool:
    """Whether the store is a local folder that does not exist (a mistyped FINPIPE_HOME)."""
    return storage.is_local and not storage.root.exists()


def _echo(message: str) -> None:
    typer.echo(message, err=True)


@generate_app.command("market")
def generate_market(
    out: Annotated[Path, typer.Option(help="Folder to write the delivery files into.")],
    tickers: Annotated[int, typer.Option(min=3, help="Number of tickers.")] = 50,
    # 60 rows of signal history + the 5-day horizon + 2 x 120 rows a late listing keeps
    # (finpipe.market.synthetic's own check, which names the figure too).
    days: Annotated[int, typer.Option(min=305, help="Business days of history.")] = 750,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    daily_files: Annotated[
        int, typer.Option(min=0, help="Deliver the last N dates as one file each.")
    ] = 5,
    defects: Annotated[
        str,
        typer.Option(help="Comma-separated defects to inject, from the list above."),
    ] = "",
    keep_oracle: Annotated[
        bool,
        typer.Option(
            help="Also keep the planted signal in FINPIPE_HOME (see above), so nightly runs "
            "there report the oracle IC beside the models'."
        ),
    ] = True,
) -> None:
    """Generate a synthetic market panel with a planted, documented predictable signal.

    The defects --defects can inject: nan, non_positive_price, duplicate_key, high_below_low,
    stale_price. --keep-oracle keeps the planted signal under FINPIPE_HOME/reference/market.
    """
    from finpipe.market.synthetic import (
        DEFECT_KINDS,
        MarketSyntheticConfig,
        generate_market_panel,
        inject_defects,
        write_oracle,
        write_vendor_files,
    )
    from finpipe.storage import Storage

    kinds = [k.strip() for k in defects.split(",") if k.strip()]
    unknown = [kind for kind in kinds if kind not in DEFECT_KINDS]
    if unknown:
        raise ConfigError(
            f"--defects: no defect {', '.join(map(repr, unknown))}; the defects are "
            + ", ".join(DEFECT_KINDS)
        )
    panel = generate_market_panel(MarketSyntheticConfig(tickers=tickers, days=days, seed=seed))
    prices = panel.prices
    if kinds:
        prices = inject_defects(prices, kinds, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_vendor_files(prices, out, daily_files=daily_files)
    panel.expected_return.to_parquet(out / "oracle.parquet", index=False)
    for path in paths:
        typer.echo(str(path))
    _echo(
        f"{len(prices):,} rows, {tickers} tickers, {prices['date'].nunique()} dates; "
        f"oracle IC (h=5) {panel.oracle_ic(5):.4f}; planted signal in {out / 'oracle.parquet'}"
    )
    if keep_oracle:
        settings = _settings()
        write_oracle(Storage(settings.home), panel.expected_return)
        _echo(f"planted signal kept for oracle-IC reporting in {settings.home} (reference/market)")


@generate_app.command("credit")
def generate_credit(
    out: Annotated[Path, typer.Option(help="Folder to write the delivery files into.")],
    applications: Annotated[
        int, typer.Option(min=2000, help="Loan applications over the whole book.")
    ] = 20_000,
    days: Annotated[int, typer.Option(min=60, help="Calendar days of application history.")] = 730,
    daily_files: Annotated[
        int, typer.Option(min=0, help="Deliver the last N application dates as one file each.")
    ] = 3,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    keep_oracle: Annotated[
        bool,
        typer.Option(
            help="Also keep the true PDs in FINPIPE_HOME (see above), so nightly runs there "
            "report the oracle AUC beside the model's."
        ),
    ] = True,
) -> None:
    """Generate a synthetic loan book (the synthetic loan-book config) with planted true PDs.

    --keep-oracle keeps the true PDs under FINPIPE_HOME/reference/credit.
    """
    from finpipe.credit.pipeline import write_oracle
    from finpipe.credit.synthetic import (
        CreditSyntheticConfig,
        generate_loan_book,
        write_deliveries,
    )
    from finpipe.storage import Storage

    config = CreditSyntheticConfig(applications=applications, days=days, seed=seed)
    book = generate_loan_book(config)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_deliveries(book.applications, out, nightly_files=daily_files)
    truth = book.true_pd.rename(columns={"loan_id": "id"})
    truth.to_parquet(out / "true_pd.parquet", index=False)
    for path in paths:
        typer.echo(str(path))
    labelled = book.applications["defaulted"].notna()
    _echo(
        f"{len(book.applications):,} applications, {int(labelled.sum()):,} with an outcome "
        f"(default rate {book.applications.loc[labelled, 'defaulted'].astype(int).mean():.1%}); "
        f"oracle AUC {book.oracle_auc():.4f}; true PDs in {out / 'true_pd.parquet'}"
    )
    if keep_oracle:
        settings = _settings()
        storage = Storage(settings.home)
        key = write_oracle(storage, truth)
        _echo(f"true PDs kept for oracle-AUC reporting in {storage.location(key)}")


@generate_app.command("customers")
def generate_customers(
    out: Annotated[Path, typer.Option(help="Folder to write the delivery files into.")],
    # metavar N rather than "<int range>": at 80 columns the wider type column squeezed the
    # --no-keep-segments name into "--no-keep-segme…".
    customers: Annotated[
        int, typer.Option(min=50, metavar="N", help="Number of customers.")
    ] = 1500,
    days: Annotated[
        int, typer.Option(min=60, metavar="N", help="Calendar days of transactions.")
    ] = 730,
    daily_files: Annotated[
        int, typer.Option(min=0, metavar="N", help="Deliver the last N days as one file each.")
    ] = 3,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    keep_segments: Annotated[
        bool,
        typer.Option(
            help="Also keep the planted segments in FINPIPE_HOME (see above), so nightly "
            "runs there report the ARI against them."
        ),
    ] = True,
) -> None:
    """Generate a synthetic transaction log with planted segments.

    Shaped by the synthetic customers config. --keep-segments keeps the planted segments under
    FINPIPE_HOME/reference/customers.
    """
    from finpipe.customers.pipeline import write_planted_segments
    from finpipe.customers.synthetic import (
        CustomersSyntheticConfig,
        generate_customer_transactions,
        write_vendor_files,
    )
    from finpipe.storage import Storage

    config = CustomersSyntheticConfig(customers=customers, days=days, seed=seed)
    generated = generate_customer_transactions(config)
    paths = write_vendor_files(generated.transactions, out, daily_files=daily_files)
    generated.segments.to_parquet(out / "planted_segments.parquet", index=False)
    for path in paths:
        typer.echo(str(path))
    sizes = generated.segments["segment"].value_counts().sort_index()
    _echo(
        f"{len(generated.transactions):,} transactions of {customers:,} customers; planted "
        f"segments {', '.join(f'{name} {count}' for name, count in sizes.items())}; "
        f"in {out / 'planted_segments.parquet'}"
    )
    if keep_segments:
        settings = _settings()
        storage = Storage(settings.home)
        key = write_planted_segments(storage, generated.segments)
        _echo(f"planted segments kept for ARI reporting in {storage.location(key)}")


@app.command("ingest")
def ingest(
    domain: Annotated[str, typer.Argument(help="Domain of the files, e.g. market.")],
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Delivered files (CSV, CSV.gz, Parquet). When FINPIPE_DROP_ROOTS is set, only "
            "files under those folders (symlinks followed), as for flow runs; unset, any file "
            "you can read."
        ),
    ],
    as_of: Annotated[
        str | None,
        typer.Option(
            help="Reject rows dated after this day (default: today in FINPIPE_TIMEZONE; not later)."
        ),
    ] = None,
    correction: Annotated[
        bool,
        typer.Option(
            "--correction",
            help="The files are a vendor's corrections: their rows replace the published rows "
            "they restate (same key; credit: every version of the loan, keeping its delivery "
            "days; customers: the customer's transactions at that time stamp), kept in "
            "state/DOMAIN/superseded/, instead of being rejected as repeats; a row with "
            "the column retracted=true removes the published rows it names instead (a date "
            "left with no row leaves the layers). The next run "
            "rebuilds features from the earliest corrected date and names the predictions "
            "scored from data it changed; a backfill over those dates re-scores them.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the files as ingest would (the suite; for a correction, the published "
            "rows it would replace and retract) and say what would happen, writing nothing; "
            "exit status 2 when a file would be rejected. Each file is checked against the "
            "store as it is with the files given before it loaded, as ingest would load them "
            "(the same content, repeated keys, a market day's move from the day before, the "
            "rows an earlier correction restated, added or retracted).",
        ),
    ] = False,
) -> None:
    """Land, validate (Great Expectations) and publish delivered files; quarantine bad ones.

    The person at the terminal chooses the files, so without FINPIPE_DROP_ROOTS any file they
    can read is loaded; a machine that sets FINPIPE_DROP_ROOTS (a team worker) holds this
    command to those folders too, and a file outside them is refused before anything is read.
    """
    from finpipe.domains import domain_contract
    from finpipe.drop_roots import check_command_line_inputs
    from finpipe.errors import InputFileError, ValidationFailed
    from finpipe.ingest import ingest_files
    from finpipe.schedule import load_schedule_settings, newest_day_accepted, today_in
    from finpipe.storage import Storage, as_day

    settings = _settings()
    contract = domain_contract(domain)
    check_command_line_inputs([str(path) for path in paths], settings)
    for path in paths:
        if path.is_dir():
            raise ConfigError(
                f"{path} is a folder, not a file: name the files in it, e.g. {path / '*.csv'}"
            )
    timezone = load_schedule_settings().timezone
    day = newest_day_accepted(as_day(as_of) if as_of else None, timezone)
    today = max(dt.date.today(), dt.datetime.now(dt.UTC).date(), today_in(timezone))
    if day > today:
        raise ConfigError(
            f"--as-of {day} is after today ({today}): a delivery is as of a day that has come, "
            "and rows dated after it are refused as from the future"
        )
    if dry_run:
        _check_files(Storage(settings.home), contract, paths, day, settings, correction)
        return
    from finpipe.locks import history_lock

    # The same lock as the flows' ingest and feature steps: a run never sees half an ingest.
    settled = 0
    with history_lock(settings.home, domain, holder="finpipe ingest", on_wait=_echo):
        try:
            for outcome in ingest_files(
                Storage(settings.home),
                contract,
                paths,
                as_of=day,
                max_file_bytes=settings.max_file_mb * 1024**2,
                correction=correction,
            ):
                typer.echo(outcome.message)
                settled += 1
        except (InputFileError, ValidationFailed) as error:
            # Ingest stops at the first rejected file; say which files that left unloaded.
            if settled + 1 < len(paths):
                error.add_note(_not_loaded(paths[settled], paths[settled + 1 :]))
            raise


def _not_loaded(rejected: Path, after: list[Path]) -> str:
    """Name the files an ingest stopped at `rejected` did not load, and how to finish."""
    names = ", ".join(path.name for path in after[:5])
    if len(after) > 5:
        names += f" and {len(after) - 5:,} more"
    return (
        f"Not loaded: {names} ({counted(len(after), 'file')} after the rejected one). Fix "
        f"{rejected.name} and re-run the same command: files already loaded are skipped."
    )


def _check_files(storage, contract, paths: list[Path], day, settings, correction: bool) -> None:
    """`finpipe ingest --dry-run`: say what ingest would do with each file, writing nothing."""
    from finpipe.errors import ValidationFailed
    from finpipe.ingest import CheckedTogether, check_file

    rejected: list[Path] = []
    together = CheckedTogether()
    for path in paths:
        try:
            outcome = check_file(
                storage,
                contract,
                path,
                as_of=day,
                max_file_bytes=settings.max_file_mb * 1024**2,
                correction=correction,
                together=together,
            )
        except ValidationFailed as error:
            rejected.append(path)
            typer.echo(str(error))
        else:
            typer.echo(outcome.message)
    if rejected:
        stops = (
            f"; ingest stops at the first, {rejected[0].name}, and would not load the files "
            "after it"
            if len(paths) > 1 and rejected[0] != paths[-1]
            else ""
        )
        raise ValidationFailed(
            f"{len(rejected)} of {len(paths)} file(s) would be rejected (above){stops}; nothing "
            "was written"
        )


@app.command("validated")
def validated(
    domain: Annotated[str, typer.Argument(help="Domain whose validated rows to write.")],
    out: Annotated[Path, typer.Option(help="Parquet file to write (replaced if present).")],
    known_at: Annotated[
        str | None,
        typer.Option(
            help="A time (ISO 8601, UTC unless it has an offset, e.g. 2026-03-02T09:00): the "
            "rows as the layer held them then, before any correction validated later. "
            "Default: now."
        ),
    ] = None,
) -> None:
    """Write the validated layer of DOMAIN as it was known at a time (audit).

    One Parquet file: what a model trained or a report ran on then, corrections validated
    since undone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from finpipe.domains import domain_contract
    from finpipe.storage import days_as_dates, write_bytes_atomic
    from finpipe.vintages import utc_time, validated_as_known

    settings = _read_only_settings()
    if out.is_dir():
        raise ConfigError(
            f"--out {out} is a folder: name the Parquet file to write, e.g. "
            f"{out / f'{domain}_validated.parquet'}"
        )
    try:
        when = utc_time(known_at or dt.datetime.now(dt.UTC))
    except ValueError as error:
        raise typer.BadParameter(f"{known_at!r} is not an ISO 8601 time: {error}") from None
    contract = domain_contract(domain)
    storage = _existing_store(settings)
    rows = validated_as_known(storage, contract, when)
    if rows.empty:
        as_known = f" as known at {when.isoformat()}" if known_at else ""
        raise ConfigError(
            f"no validated rows of {domain}{as_known} in {storage.location()}, so no file "
            f"written: `finpipe batches {domain}` lists its delivered files and when each was "
            "validated"
        )
    # Calendar days (date32), as every layer stores them.
    table = days_as_dates(pa.Table.from_pandas(rows, preserve_index=False))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(out, buffer.getvalue())
    typer.echo(f"{len(rows):,} rows of {domain} as known at {when.isoformat()} written to {out}")


@app.command("batches")
def batches(
    domain: Annotated[str, typer.Argument(help="Domain whose delivered files to list.")],
) -> None:
    """List every delivered file of DOMAIN in the order it was settled.

    Each with when (UTC), status (validated, quarantined, or landed while in progress), batch,
    rows, dates and, for a correction, the published rows it replaced and how many of them it
    retracted. A time listed here is one `finpipe validated --known-at` takes, to see the
    layer before or after that batch."""
    import pandas as pd

    from finpipe.domains import check_domain
    from finpipe.vintages import batch_history

    check_domain(domain)  # an unknown name is an error that lists the known ones
    table = batch_history(_existing_store(_read_only_settings()), domain)
    if table.empty:
        typer.echo(f"no delivered file of {domain} yet")
        return

    def count(value: object) -> str:
        return "-" if pd.isna(value) else f"{value:,}"

    shown = table.assign(  # times to the microsecond: what --known-at takes
        when=table["when"].map(lambda t: t.isoformat()),
        rows=table["rows"].map(count),
        replaced=table["replaced"].map(count),
        retracted=table["retracted"].map(count),
        dates=table["first_date"].fillna("-") + " .. " + table["last_date"].fillna("-"),
    ).drop(columns=["first_date", "last_date"])
    typer.echo(shown.to_string(index=False))


@app.command("dismiss")
def dismiss(
    domain: Annotated[str, typer.Argument(help="Domain of the quarantined batch.")],
    batch: Annotated[str, typer.Argument(help="Its batch id (finpipe batches DOMAIN lists it).")],
    reason: Annotated[
        str, typer.Option(help="Why: kept in its record, e.g. 'fixed file sent as x_v2.csv'.")
    ],
) -> None:
    """Dismiss a quarantined batch whose fix came under another name (or that is not wanted):
    `finpipe status` stops listing it and `--check` stops counting it. Its report and copy
    stay in quarantine/, and its record keeps when, and why, it was dismissed."""
    from finpipe.domains import check_domain
    from finpipe.ingest import described_file, dismiss_quarantined

    check_domain(domain)
    storage = _existing_store(_read_only_settings())
    record = dismiss_quarantined(storage, domain, batch, reason)
    typer.echo(f"{batch} ({described_file(record)}) dismissed: {record['dismissed_reason']}")


@app.command("status")
def show_status(
    domains: Annotated[
        list[str] | None,
        typer.Argument(help="Domains to report; default: every registered domain."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead (for monitoring).")
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Exit 1 when something needs work (a quarantined file, a failed, unscored or "
            "stale date, a missing delivery, a registry that does not answer), naming it on "
            "stderr; 0 when nothing does. For cron and monitoring.",
        ),
    ] = False,
) -> None:
    """Say where each domain stands: the morning check, read-only.

    Delivered files (quarantined ones with their rules and report), each layer's first and
    last day, sessions whose delivery has not come, the last scored date and the model that
    scored it, the newest night's segments (customers), dates whose last run failed, sessions
    left unscored, predictions scored from data changed since, and the champion and latest
    challenger in MLflow. Each problem comes with the command that fixes it."""
    import dataclasses
    import json
    import os

    from finpipe.domains import check_domain, domain_names
    from finpipe.errors import TrackingUnavailable
    from finpipe.schedule import load_schedule_settings, today_in
    from finpipe.status import (
        BackfillCap,
        domain_status,
        needs_attention,
        registry_lines,
        status_lines,
    )
    from finpipe.storage import Storage

    chosen = [check_domain(name) for name in domains] if domains else domain_names()
    settings = _read_only_settings()
    # A tracking server that does not answer is said at once, not after MLflow's retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from finpipe.tracking import registry_status

    storage, schedule = Storage(settings.home), load_schedule_settings()
    missing = _missing(storage)
    if not as_json:
        typer.echo(
            f"store {storage.location()}"
            + (" (no such folder: is FINPIPE_HOME right?)" if missing else "")
            + f"\nMLflow {settings.tracking_uri_for_display}\n"
        )
    today = today_in(schedule.timezone)  # a session's delivery comes after it: not today's
    report, attention = [], {}
    for domain in chosen:
        found = domain_status(storage, domain, schedule.calendar(domain), today)
        needs = needs_attention(found)
        try:
            models = registry_status(settings, domain)
        except TrackingUnavailable as error:
            registry: dict = {"error": str(error)}
            lines = [f"  champion     unknown: {error}"]
            needs.append("champion unknown: the MLflow registry could not be read")
        else:
            registry, lines = dataclasses.asdict(models), registry_lines(domain, models)
        if needs:
            attention[domain] = needs
        if as_json:
            report.append({**dataclasses.asdict(found), "registry": registry, "attention": needs})
        else:
            cap = BackfillCap(schedule.calendar(domain), schedule.backfill_max_dates)
            typer.echo("\n".join([domain, *status_lines(found, cap), *lines, ""]))
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    if missing:  # a mistyped FINPIPE_HOME is no all-clear
        attention = {"store": [f"{storage.location()} does not exist"], **attention}
    if check and attention:
        said = "; ".join(f"{domain}: {', '.join(needs)}" for domain, needs in attention.items())
        typer.echo(f"needs attention: {said}", err=True)
        raise typer.Exit(1)


@app.command("migrate-storage")
def migrate_storage() -> None:
    """Convert a store written before 2026-12 to the layout every Parquet reader opens.

    Hive `date=YYYY-MM-DD` folders become bare-day folders, so that pandas, pyarrow, Polars
    and DuckDB open every layer in one call.

    Safe to run again, and on a store that needs nothing: each domain is converted under its
    history lock, one partition at a time, and a stopped conversion is finished by a re-run.
    """
    from finpipe.storage_migration import migrate_hive_layout

    settings = _settings()
    changed = migrate_hive_layout(settings.home)
    for layer in changed:
        typer.echo(f"{layer.layer}/{layer.domain}: {layer.partitions} partitions converted")
    if not changed:
        typer.echo(f"{settings.home}: nothing to convert (already the bare-day layout)")


_TRAINING_OPTION = typer.Option(
    "--training",
    metavar="KEY=VALUE",
    help="A training setting for this run, as the run forms' `training` field takes it "
    "(repeat for more): e.g. --training embargo_days=30; "
    'a value is read as JSON where it is (numbers, true, ["mlp"]), else as text. A key the '
    "domain does not have is refused, naming those it has.",
)


def _training_overrides(pairs: list[str] | None) -> dict:
    """Return the `--training KEY=VALUE` pairs as the `training` parameter's dict."""
    import json

    overrides: dict = {}
    for pair in pairs or []:
        key, equals, text = pair.partition("=")
        if not equals or not key.strip():
            raise typer.BadParameter(
                f"{pair!r} is not KEY=VALUE (e.g. embargo_days=30)", param_hint="--training"
            )
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    return overrides


@run_app.command("nightly")
def run_nightly(
    domain: Annotated[str, typer.Option(help="Pipeline to run.")] = "market",
    as_of: Annotated[
        str | None, typer.Option(help="YYYY-MM-DD; default the latest validated date.")
    ] = None,
    input: Annotated[
        list[Path] | None,
        typer.Option(
            "--input",
            help="A delivered file to load first; only from under the drop roots (see above).",
        ),
    ] = None,
    retrain: Annotated[bool, typer.Option(help="Retrain and run promotion.")] = True,
    catch_up: Annotated[
        bool,
        typer.Option(
            help="First score the sessions missed since the last scored night (and recent "
            "ones left unscored), up to the backfill cap (see above)."
        ),
    ] = True,
    rebuild_features: Annotated[
        bool, typer.Option("--rebuild-features", help="Recompute all features.")
    ] = False,
    models: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated candidates: market mlp, gru, tcn (temporal CNN), lgbm "
            "(LightGBM), ensemble (default mlp, gru, lgbm, ensemble); credit mlp, logistic."
        ),
    ] = None,
    max_epochs: Annotated[int | None, typer.Option(min=1, help="Epoch cap per model.")] = None,
    horizon: Annotated[int | None, typer.Option(min=1, help="Label horizon in days.")] = None,
    history_dates: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Train on the last N dates of the stored history (0: all; default: the "
            "domain's, 756 dates for market).",
        ),
    ] = None,
    history_start: Annotated[
        str | None,
        typer.Option(
            help="YYYY-MM-DD: train on dates from this day on only (market; with "
            "--history-dates, the later start applies)."
        ),
    ] = None,
    training: Annotated[list[str] | None, _TRAINING_OPTION] = None,
) -> None:
    """Run the nightly flow (validate -> features -> train -> promote -> score) via Prefect.

    --input files must lie under FINPIPE_DROP_ROOTS (default FINPIPE_HOME/vendor_drop,
    ./deliveries, ./datasets); --catch-up scores at most FINPIPE_BACKFILL_MAX_DATES sessions.
    """
    settings = _settings()
    from finpipe.domains import check_domain
    from finpipe.drop_roots import allowed_inputs
    from finpipe.planning import training_config
    from finpipe.storage import as_day

    check_domain(domain)  # reject a bad parameter before Prefect starts anything
    allowed_inputs([str(p) for p in input or []], settings.input_roots())
    day = as_day(as_of) if as_of else None
    overrides = _training_overrides(training)
    if models:
        overrides["models"] = [m.strip() for m in models.split(",") if m.strip()]
    if max_epochs:
        overrides["max_epochs"] = max_epochs
    if horizon:
        overrides["horizon"] = horizon
    training_config(domain, overrides)  # a bad model name or value fails here too
    from finpipe.flows.nightly import nightly

    summary = nightly(
        domain=domain,
        as_of=day,
        inputs=[str(p.resolve()) for p in input or []],
        retrain=retrain,
        catch_up=catch_up,
        rebuild_features=rebuild_features,
        training=overrides,
        history_dates=history_dates,
        history_start=as_day(history_start) if history_start else None,
    )
    _print_summary(summary, settings)


@run_app.command("backfill")
def run_backfill(
    start: Annotated[str, typer.Option(help="First date, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option(help="Last date (included), YYYY-MM-DD.")],
    domain: Annotated[str, typer.Option(help="Pipeline to run.")] = "market",
    steps: Annotated[
        str,
        typer.Option(
            help="Per date, comma-separated (default validate, features, score).",
            show_default=False,
        ),
    ] = "validate,features,score",
    retrain: Annotated[bool, typer.Option(help="Retrain once at the end.")] = False,
    concurrency: Annotated[int, typer.Option(min=1, max=16, help="Dates at once.")] = 4,
    force: Annotated[bool, typer.Option(help="Redo dates already completed.")] = False,
    input: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            help="A delivered file or glob to load first; only from under the drop roots "
            "(see above).",
        ),
    ] = None,
    training: Annotated[list[str] | None, _TRAINING_OPTION] = None,
) -> None:
    """Run the backfill flow over a date range; re-running redoes only failed, missing or stale
    dates (data re-delivered or corrected since). --training applies to --retrain's training.

    --input files must lie under FINPIPE_DROP_ROOTS (default FINPIPE_HOME/vendor_drop,
    ./deliveries, ./datasets).
    """
    settings = _settings()
    from finpipe.drop_roots import allowed_inputs
    from finpipe.planning import check_backfill_request, training_config
    from finpipe.schedule import load_schedule_settings, today_in

    schedule = load_schedule_settings()
    request = check_backfill_request(  # bad parameters fail here, before Prefect starts
        domain,
        start,
        end,
        [s.strip() for s in steps.split(",") if s.strip()],
        today=today_in(schedule.timezone),
        max_dates=schedule.backfill_max_dates,
        calendar=schedule.calendar(domain),
    )
    allowed_inputs(input or [], settings.input_roots())
    overrides = _training_overrides(training)
    training_config(domain, overrides)  # a key the domain does not have fails here
    from finpipe.date_runs import BackfillIncomplete
    from finpipe.flows.backfill import backfill

    try:
        summary = backfill(
            domain=domain,
            start=request.start,
            end=request.end,
            steps=request.steps,
            retrain=retrain,
            concurrency=concurrency,
            force=force,
            inputs=list(input or []),
            training=overrides,
        )
    except BackfillIncomplete as incomplete:  # every date's line, then the error's
        _echo_dates([outcome.to_dict() for outcome in incomplete.outcomes])
        raise
    _echo_dates(summary["dates"])


def _echo_dates(dates: list[dict]) -> None:
    for item in dates:
        status, rows = item["status"], item["rows"]
        typer.echo(f"{item['date']}  {status:<12} {rows:>8,} rows  {item['message']}")


@run_app.command("backtest")
def run_backtest(
    start: Annotated[str, typer.Option(help="First date scored out of sample, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option(help="Last date scored (included), YYYY-MM-DD.")],
    name: Annotated[
        str, typer.Option(help="Names the backtest's store, backtests/NAME/, and MLflow run.")
    ] = "default",
    retrain_every: Annotated[
        int, typer.Option(min=1, help="Sessions between retrains (21 monthly, 63 quarterly).")
    ] = 63,
    train_window: Annotated[
        str,
        typer.Option(
            help="Labelled dates each retrain learns from: 'expanding' (all before the "
            "cut-off) or a number N (the last N, rolling)."
        ),
    ] = "expanding",
    models: Annotated[
        str,
        typer.Option(help="Comma-separated: mlp, gru, tcn, lgbm, ensemble (of those listed)."),
    ] = "mlp",
    horizon: Annotated[int, typer.Option(min=1, help="Forward-return horizon in sessions.")] = 5,
    top_k: Annotated[int, typer.Option(min=1, help="Names held on each side.")] = 10,
    n_drop: Annotated[
        int | None,
        typer.Option(
            min=1, help="Names the turnover-limited portfolio replaces a day (default top_k//5)."
        ),
    ] = None,
    cost_bps: Annotated[float, typer.Option(min=0, help="Cost, bps of traded value.")] = 10.0,
    concurrency: Annotated[int, typer.Option(min=1, max=16, help="Windows at once.")] = 2,
    max_epochs: Annotated[int | None, typer.Option(min=1, help="Epoch cap per model.")] = None,
    force: Annotated[bool, typer.Option(help="Redo windows already done.")] = False,
) -> None:
    """Run the backtest flow: walk-forward retrains, out-of-sample scores, portfolio report."""
    _settings()
    from finpipe.backtest import backtest_config
    from finpipe.planning import training_config
    from finpipe.storage import as_day

    window = None if train_window.strip().lower() == "expanding" else train_window.strip()
    if window is not None and not window.isdigit():
        raise typer.BadParameter("use 'expanding' or a whole number", param_hint="--train-window")
    chosen = [m.strip() for m in models.split(",") if m.strip()]
    overrides: dict = {"models": chosen, "horizon": horizon, "history_dates": None}
    if max_epochs:
        overrides["max_epochs"] = max_epochs
    config = backtest_config(  # bad parameters fail here, before Prefect starts
        name=name,
        start=as_day(start),
        end=as_day(end),
        retrain_every=retrain_every,
        train_window=window and int(window),
        top_k=top_k,
        n_drop=n_drop,
        cost_bps=cost_bps,
        training=training_config("market", overrides),
    )
    from finpipe.flows.backtest import backtest

    summary = backtest(
        start=config.start,
        end=config.end,
        name=config.name,
        retrain_every=config.retrain_every,
        train_window=config.train_window,
        models=chosen,
        horizon=horizon,
        top_k=top_k,
        n_drop=n_drop,
        cost_bps=cost_bps,
        concurrency=concurrency,
        training={"max_epochs": max_epochs} if max_epochs else {},
        force=force,
    )
    for item in summary["windows"]:
        typer.echo(
            f"{item['retrain']} to {item['last']}  {item['status']:<12} {item['rows']:>8,} rows"
        )
    for row in summary["summary"]:
        typer.echo(
            f"{row['signal']:<12} {row['strategy']:<18} IR {row['information_ratio']:7.3f}  "
            f"return {row['annualised_return']:8.2%}  max DD {row['max_drawdown']:8.2%}"
        )
    typer.echo(f"MLflow run {summary['run_id']}")


def _print_summary(summary: dict, settings: Settings) -> None:
    predictions = summary["predictions"]
    typer.echo(
        f"{summary['domain']} {summary['as_of']}: {counted(predictions['rows'], 'prediction')} by "
        f"{predictions['model_name']} v{predictions['model_version']} -> {predictions['path']}"
    )
    if summary["promotion"]:
        typer.echo(f"promotion: {summary['promotion']['reason']}")


@app.command("demo")
def demo(
    domains: Annotated[
        str, typer.Option(help="Comma-separated domains to run, in order (default: all).")
    ] = "",
    backtest: Annotated[
        bool, typer.Option(help="After the market nights, a short walk-forward backtest.")
    ] = True,
) -> None:
    """Generate synthetic deliveries, then run the nightly flow for a few dates per domain.

    Then a three-window backtest of the market model, reported in MLflow."""
    settings = _settings()
    from finpipe.domains import domain_names, get_domain
    from finpipe.flows.nightly import nightly

    chosen = [d.strip() for d in domains.split(",") if d.strip()] or domain_names()
    _echo(f"finpipe demo: FINPIPE_HOME={settings.home}")
    for name in chosen:
        spec = get_domain(name)
        if spec.plan_demo is None:
            continue
        nights = spec.plan_demo(settings)
        for number, night in enumerate(nights, start=1):
            _echo(f"--- {name}: night {number}/{len(nights)}, as of {night.as_of}")
            summary = nightly(
                domain=name,
                as_of=dt.date.fromisoformat(night.as_of),
                inputs=night.inputs,
                training=night.training,
            )
            _print_summary(summary, settings)
        if backtest and name == "market":
            _demo_backtest(settings)
        _print_outputs(settings, name)
    bin_dir = Path(sys.executable).parent
    typer.echo(
        "\nOpen the MLflow UI on these runs with:\n"
        f"  {bin_dir / 'mlflow'} ui --backend-store-uri "
        f"{settings.tracking_uri_for_display} --port 5000\n"
        "See where each domain stands (files, layers, dates to redo, champions) with:\n"
        f"  FINPIPE_HOME={settings.home} {bin_dir / 'finpipe'} status"
    )


def _demo_backtest(settings: Settings) -> None:
    """Run the demo's short market backtest (`backtest.demo_backtest_parameters`) and say where
    its report is."""
    from finpipe.backtest import demo_backtest_parameters
    from finpipe.flows.backtest import backtest
    from finpipe.storage import Storage

    storage = Storage(settings.home)
    parameters = demo_backtest_parameters(storage)
    _echo(
        f"--- market: backtest {parameters['name']!r}, {parameters['start']} to "
        f"{parameters['end']}, a retrain every {parameters['retrain_every']} sessions"
    )
    summary = backtest(**parameters)  # type: ignore[arg-type]
    for row in summary["summary"]:
        if row["strategy"] in ("long_short", "benchmark"):
            typer.echo(
                f"{row['signal']:<12} {row['strategy']:<11} IR {row['information_ratio']:7.3f}"
                f"  return {row['annualised_return']:8.2%}  max DD {row['max_drawdown']:8.2%}"
            )
    layer = storage.backtest_store(summary["name"]).layer_key("predictions", "market")
    typer.echo(
        f"backtest report: MLflow run backtest-{summary['name']} (experiment "
        f"{settings.experiment_name('market')}, plots/cumulative_return.png), predictions in "
        f"{storage.backtest_store(summary['name']).location(layer)}"
    )


def _print_outputs(settings: Settings, domain: str) -> None:
    from finpipe.storage import Storage

    storage = Storage(settings.home)
    typer.echo(
        f"\n{domain} outputs:\n"
        f"  validated    {storage.location(storage.layer_key('validated', domain))}\n"
        f"  features     {storage.location(storage.layer_key('features', domain))}\n"
        f"  predictions  {storage.location(storage.layer_key('predictions', domain))}\n"
        f"  data docs    {storage.location(storage.reports_key('data_docs', domain))}\n"
        f"  quarantine   {storage.location(storage.quarantine_key(domain))}\n"
        f"  MLflow       {settings.tracking_uri_for_display} "
        f"(experiment {settings.experiment_name(domain)},"
        f" model {settings.model_name(domain)}@champion)"
    )


@app.command("serve")
def serve(
    api_url: Annotated[
        str | None,
        typer.Option(help="Prefect server API; default $PREFECT_API_URL or the local one."),
    ] = None,
    timezone: Annotated[
        str | None, typer.Option(help="Nightly schedule timezone; default $FINPIPE_TIMEZONE.")
    ] = None,
    cron: Annotated[
        str | None, typer.Option(help="Nightly schedule; default $FINPIPE_NIGHTLY_CRON.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most flow runs at the same time.")] = 4,
) -> None:
    """Serve the nightly, backfill, train, score and backtest deployments (^C stops)."""
    import os

    _settings()
    url = api_url or os.environ.get("PREFECT_API_URL") or "http://127.0.0.1:4200/api"
    os.environ["PREFECT_API_URL"] = url  # before Prefect reads its settings
    from finpipe.flows.deployments import serve_deployments
    from finpipe.schedule import load_schedule_settings
    from finpipe.ui_servers import check_prefect_server

    overrides = {"timezone": timezone, "nightly_cron": cron}
    schedule = load_schedule_settings(**{k: v for k, v in overrides.items() if v})
    check_prefect_server(url)
    _echo(
        f"serving nightly ({schedule.nightly_cron}, {schedule.timezone}), backfill, train, "
        f"score and backtest on {url}"
    )
    serve_deployments(schedule, limit=limit)


@app.command("ui")
def ui(
    host: Annotated[str, typer.Option(help="Address the servers listen on.")] = "127.0.0.1",
    prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow UI port.")] = 5000,
) -> None:
    """Start a Prefect server and the MLflow UI on this FINPIPE_HOME's stores (^C stops both)."""
    settings = _settings()
    from finpipe.ui_servers import run_servers, server_commands

    commands = server_commands(
        settings, host=host, prefect_port=prefect_port, mlflow_port=mlflow_port
    )
    run_servers(commands, say=_echo)


stack_app = typer.Typer(
    help="The team stack as local processes (README, 'Team set-up').", rich_markup_mode="markdown"
)
app.add_typer(stack_app, name="stack")
StackDir = Annotated[
    Path, typer.Option("--dir", help="The stack's folder: data, logs, stack.env (0600).")
]


@stack_app.command("up")
def stack_up(dir: StackDir = Path("finpipe-stack")) -> None:
    """Start the team stack's servers, Dask and a Prefect worker on 127.0.0.1.

    Postgres, S3, Prefect and MLflow servers (with auth); prints the settings clients export
    (secrets only in the 0600 env file)."""
    from finpipe.services.stack import client_settings_lines, up
    from finpipe.settings import disable_telemetry

    disable_telemetry()
    info = up(dir, say=_echo)
    env_file = info.folder.env_file
    ports, values = info.ports, info.values
    typer.echo(
        f"finpipe stack up in {info.seconds:.0f} s ({info.folder.root})\n"
        f"  Prefect UI  http://127.0.0.1:{ports['prefect']}  (user:password in "
        "PREFECT_API_AUTH_STRING)\n"
        f"  MLflow UI   {values['MLFLOW_TRACKING_URI']}  (user "
        f"{values['MLFLOW_TRACKING_USERNAME']}, password in MLFLOW_TRACKING_PASSWORD)\n"
        f"  S3          {values['AWS_ENDPOINT_URL']}  (data in {values['FINPIPE_HOME']})\n"
        f"  Dask        {values['FINPIPE_DASK_ADDRESS']}  (2 workers; mutual TLS, the "
        f"certificate in {info.folder.dask_tls.folder})\n"
        f"  Postgres    127.0.0.1:{ports['postgres']}\n"
        f"Client settings (*** = secret, in {env_file}):\n  "
        + "\n  ".join(client_settings_lines(values))
        + f"\nLoad them all:  set -a && . {env_file} && set +a\n"
        f"Stop:  finpipe stack down --dir {dir}"
    )


@stack_app.command("deploy")
def stack_deploy(dir: StackDir = Path("finpipe-stack")) -> None:
    """Register the deployments on the stack's `finpipe` work pool.

    The nightly, backfill, train, score and backtest deployments (`up` does it; run it again
    after changing the FINPIPE_NIGHTLY_* settings)."""
    import os

    from finpipe.services.stack import WORK_POOL, StackError, StackFolder, read_env_file
    from finpipe.settings import disable_telemetry

    folder = StackFolder(dir.absolute())
    if not folder.env_file.exists():
        raise StackError(f"no stack in {folder.root}: `finpipe stack up --dir {dir}` first")
    values = read_env_file(folder.env_file)
    for name in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING"):
        os.environ[name] = values[name]  # before Prefect reads its settings
    os.environ.setdefault("PREFECT_HOME", str(folder.prefect_home))
    disable_telemetry()
    from finpipe.flows.deployments import apply_deployments

    names = apply_deployments(WORK_POOL)
    typer.echo(f"registered {', '.join(names)} on pool {WORK_POOL} ({values['PREFECT_API_URL']})")


@stack_app.command("status")
def stack_status(dir: StackDir = Path("finpipe-stack")) -> None:
    """Show each process of the stack, running or stopped, and whether its server answers.

    Exit status 1 when one is stopped or does not answer."""
    from finpipe.services.stack import status

    rows = status(dir)
    for row in rows:
        running = f"pid {row.pid}" if row.pid is not None else "stopped"
        answers = {None: "", True: "answers", False: "does not answer"}[row.answers]
        if not row.address and row.answers is not None:  # a Dask worker: has it joined?
            answers = "joined the scheduler" if row.answers else "not joined"
        typer.echo(f"  {row.name:<16}{running:<12}{row.address:<28}{answers}".rstrip())
    unwell = [row.name for row in rows if not row.healthy]
    if unwell:
        typer.echo(f"finpipe stack ({dir}): {', '.join(unwell)} not running or not answering")
        raise typer.Exit(1)
    typer.echo(f"finpipe stack ({dir}): all {len(rows)} processes running and answering")


@stack_app.command("down")
def stack_down(dir: StackDir = Path("finpipe-stack")) -> None:
    """Stop the stack's processes (the Prefect worker first, Postgres last)."""
    from finpipe.services.stack import down

    stopped = down(dir, say=_echo)
    typer.echo(f"finpipe stack down: {len(stopped)} processes stopped ({dir})")


def main() -> None:
    """Entry point: finpipe errors become one clear line and exit status 2, not a traceback."""
    try:
        app()
    except FinpipeError as error:
        # A note (`add_note`) is a sentence a command adds to the library's message.
        notes = getattr(error, "__notes__", [])
        message = " ".join([sentence(str(error)), *notes]) if notes else str(error)
        typer.echo(f"error: {message}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
