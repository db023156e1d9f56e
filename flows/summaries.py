"""The flows' run summaries as the Prefect UI shows them: markdown for nightly, train and
score, the per-date status table's description for backfill."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from finpipe.date_runs import DateOutcome
from finpipe.text import counted, sentence


def artifact_key(*parts: str) -> str:
    """Return a Prefect artifact key from `parts` ("nightly", domain, "summary"): Prefect takes
    lower-case letters, digits and dashes only, and a domain's name may hold '_'."""
    return "-".join(parts).replace("_", "-").lower()


def _features_text(features: dict) -> list[str]:
    rebuilt = len(features.get("dates_rebuilt") or [])
    new = len(features["dates_written"]) - rebuilt
    dates = [counted(new, "new date")] if new or not rebuilt else []
    dates += [counted(rebuilt, "rebuilt date")] if rebuilt else []
    lines = [
        "",
        "## Features",
        f"{counted(features['rows'], 'row')} over {' and '.join(dates)} in "
        f"{features['seconds']} s.",
    ]
    if features.get("dates_removed"):
        lines.append(f"Removed with their date: {', '.join(features['dates_removed'])}.")
    if features.get("rebuilt_because"):
        lines.append(
            "Every date rebuilt: the settings the features are computed with changed since "
            f"they were built ({features['rebuilt_because']})."
        )
    if features["skipped_features"]:
        lines.append(f"Skipped (missing columns): {features['skipped_features']}")
    if features.get("unsourced_features"):
        lines.append(f"Not built (no such column in the source): {features['unsourced_features']}")
    return lines


def summary_markdown(summary: dict) -> str:
    """Return the run summary as markdown for the Prefect UI."""
    lines = [f"# finpipe nightly: {summary['domain']} as of {summary['as_of']}", ""]
    if summary.get("skipped"):
        return "\n".join([*lines, summary["skipped"]])
    lines += ["## Validation", "| file | status | rows | dates |", "|---|---|---|---|"]
    for item in summary["ingested"] or []:
        name = item["source"].rsplit("/", 1)[-1]
        lines.append(f"| {name} | {item['status']} | {_file_figures(item)} |")
    if not summary["ingested"]:
        lines.append("| (no new files) | | | |")
    noted = [
        (item["source"].rsplit("/", 1)[-1], warning)
        for item in summary["ingested"] or []
        for warning in item.get("warnings") or []
    ]
    if noted:
        lines += ["", "**Data-quality warnings** (recorded; the data was accepted):", ""]
        lines += [f"- {name}: {warning}" for name, warning in noted]
    corrections = [
        item for item in summary["ingested"] or [] if item.get("corrected_rows") is not None
    ]
    if corrections:
        lines += ["", "**Corrections** (published rows replaced; the replaced rows are kept):", ""]
        lines += [
            f"- {item['source'].rsplit('/', 1)[-1]}: "
            f"{counted(item['corrected_rows'], 'published row')} replaced by {item['rows']:,} "
            "delivered"
            + (f", {item['retracted_rows']:,} retracted" if item.get("retracted_rows") else "")
            + (
                f"; dates removed (every row retracted): {', '.join(item['removed_dates'])}"
                if item.get("removed_dates")
                else ""
            )
            for item in corrections
        ]
    caught_up = summary.get("catch_up") or []
    if caught_up:
        lines += ["", "## Catch-up (missed nights)", "| date | status | rows | message |"]
        lines.append("|---|---|---|---|")
        for item in caught_up:
            lines.append(
                f"| {item['date']} | {item['status']} | {item['rows']:,} | {item['message']} |"
            )
    lines += _features_text(summary["features"])
    training = summary["training"]
    if training:
        lines += [
            "",
            "## Training",
            f"MLflow run `{training['run_id']}`; candidate **{training['candidate']}** "
            f"registered as version {training['challenger_version']}.",
            "",
            *metrics_table(training["metrics"]),
        ]
    decision = summary["promotion"]
    if decision:
        lines += ["", "## Promotion", decision["reason"]]
    predictions = summary["predictions"]
    lines += [
        "",
        "## Predictions",
        f"{predictions['rows']:,} rows for {predictions['date']} by {predictions['model_name']} "
        f"v{predictions['model_version']} in `{predictions['path']}`.",
    ]
    stale = summary.get("stale_predictions")
    if stale:
        lines += ["", "## Stale predictions", _stale_text(stale, loads_files=True)]
    return "\n".join(lines)


def ingest_failed_markdown(
    title: str, domain: str, error: str, quarantined: dict | None, not_run: str
) -> str:
    """Return the summary of a run that ingest stopped (`error`, its one-line message): the
    file quarantined (`quarantined`, see `finpipe.status.quarantined_batch`; None for a file
    refused before landing, e.g. too big, or a store or lock that failed), each rule it broke
    with a row, where its report is, the commands to inspect it, and the steps that did not
    run."""
    lines = [f"# {title}", "", f"**Failed at ingest.** {not_run}", ""]
    if quarantined:
        dates = (
            f"{quarantined['first_date']} .. {quarantined['last_date']}"
            if quarantined.get("first_date")
            else "-"
        )
        rows = "-" if quarantined.get("rows") is None else f"{quarantined['rows']:,}"
        lines += [
            "## Quarantined",
            "| file | batch | rows | dates |",
            "|---|---|---|---|",
            f"| {quarantined['file']} | {quarantined['batch_id']} | {rows} | {dates} |",
            "",
            "Rules broken:",
            "",
            *(
                f"- {rule}"
                for rule in quarantined["rules"]
                or ["see the report" if quarantined["report"] else "not recorded (no report)"]
            ),
            "",
            (
                f"Report (each rule, its unexpected count, sample rows and their keys): "
                f"`{quarantined['report']}`; the file as delivered beside it in "
                if quarantined["report"]
                else "No report was found in the quarantine folder; the file as delivered is in "
            )
            + f"`{quarantined['folder']}`"
            + (f"; Data Docs: `{quarantined['data_docs']}`" if quarantined.get("data_docs") else "")
            + ".",
            "",
            "Nothing from this file was published and accepted data is untouched. The files "
            "this run loaded before it stay published; those after it were not loaded.",
            "",
            "## To inspect and redo",
            f"- `finpipe batches {domain}` lists every delivered file with its verdict, rows and "
            f"dates; `finpipe status {domain}` the quarantined ones with their rules and report.",
            "- Deliver the fixed file and run again with the same inputs (files already loaded "
            f"are skipped); if its fix came under another name, `finpipe dismiss {domain} "
            f'{quarantined["batch_id"]} --reason "..."`.',
            "",
        ]
    lines += ["## Error", "", "```", error, "```"]
    return "\n".join(lines)


def _file_figures(item: dict) -> str:
    """A file's rows and dates cells: '-' for a figure its outcome does not hold, not 0 (a file
    left for a later run was not read; one loaded before keeps its row count only)."""
    rows = f"{item['rows']:,}" if item["status"] in ("validated", "already_loaded") else "-"
    dates = f"{item['dates']:,}" if item["status"] == "validated" else "-"
    return f"{rows} | {dates}"


def _stale_text(stale: dict, *, loads_files: bool) -> str:
    """Say which earlier dates' predictions were scored from data changed since, whose
    features this run brought up to date, and what to run. Where the change came from depends
    on the run: a nightly or a backfill (`loads_files`) may have loaded it itself, or a run or
    a `finpipe ingest` before it did; a train or score run loads no file, so it came before."""
    dates = stale["dates"]
    named = ", ".join(dates[:10]) + (f" and {len(dates) - 10} more" if len(dates) > 10 else "")
    loaded = (
        "loaded by this run or before it"
        if loads_files
        else "loaded before this run, e.g. by `finpipe ingest --correction`"
    )
    text = (
        f"Predictions of {counted(len(dates), 'earlier date')} were scored from data changed "
        f"since (a correction, a retraction or a late delivery, {loaded}), whose features "
        f"this run brought up to date: {named}."
    )
    if stale["backfill"]:
        text += (
            f" Re-score them with `{stale['backfill']}` (or the backfill deployment over "
            "those dates): it redoes only the stale ones."
        )
    if stale["removed"]:
        text += (
            f" {', '.join(stale['removed'])}: every row retracted, so nothing can score it "
            "again; its predictions stay as they were published."
        )
    return text


def metrics_table(metrics: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Return a markdown table: one row per model, test metrics (validation IC-like first)."""
    names = sorted({key for result in metrics.values() for key in result.get("test", {})})
    lines = ["| model | " + " | ".join(f"test {n}" for n in names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for kind, result in metrics.items():
        cells = [_number(result.get("test", {}).get(name)) for name in names]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def _number(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def train_markdown(
    domain: str, as_of: str, training: dict, decision: dict | None, stale: dict | None = None
) -> str:
    """Return the train run's summary: the MLflow run, the candidate, metrics, promotion, and
    the earlier predictions scored from data changed before it (`stale`)."""
    lines = [
        f"# finpipe train: {domain} as of {as_of}",
        "",
        f"MLflow run `{training['run_id']}`; candidate **{training['candidate']}** registered "
        f"as version {training['challenger_version']}.",
        "",
        *metrics_table(training["metrics"]),
    ]
    if decision:
        lines += ["", "## Promotion", decision["reason"]]
    if stale:
        lines += ["", "## Stale predictions", _stale_text(stale, loads_files=False)]
    return "\n".join(lines)


def score_markdown(
    domain: str,
    as_of: str,
    predictions: dict,
    stale: dict | None = None,
    in_sample: str | None = None,
) -> str:
    """Return the score run's summary: how many rows, by which model, where, whether the model
    learnt from the date (`in_sample`, `scoring.in_sample_warning`), and the earlier
    predictions scored from data changed before it (`stale`)."""
    text = (
        f"# finpipe score: {domain} {as_of}\n\n{predictions['rows']:,} rows by "
        f"{predictions['model_name']} v{predictions['model_version']} in `{predictions['path']}`."
    )
    text += f"\n\n**In-sample:** {sentence(in_sample)}" if in_sample else ""
    return text + (
        f"\n\n## Stale predictions\n{_stale_text(stale, loads_files=False)}" if stale else ""
    )


def backfill_description(
    domain: str,
    start: str,
    end: str,
    results: Iterable[DateOutcome],
    stale: dict | None = None,
    in_sample: str | None = None,
) -> str:
    """Return the backfill table's description: the range, how many dates ended how, how many
    were scored in-sample (`in_sample`, `scoring.in_sample_warning`), and the predictions
    outside it scored from data it changed."""
    counts = Counter(outcome.status for outcome in results)
    text = f"finpipe backfill {domain} {start} to {end}: " + ", ".join(
        f"{n} {s}" for s, n in counts.items()
    )
    text += f". {in_sample}" if in_sample else ""
    return text + (f". {_stale_text(stale, loads_files=True)}" if stale else "")
