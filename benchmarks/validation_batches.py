"""Validation speed: what finpipe adds around Great Expectations, and a year of daily files.

Two measurements, both sides in this one process on the same synthetic market delivery:

1. One batch: `finpipe.validation.validate_frame` (suite loading, rule selection, the
   counts-only pass, the report) against a bare GX run of the same expectations on the same
   frame (an ephemeral context, one validation definition, `run`), both warmed up first.
   Target: finpipe <= 1.25x bare GX.
2. A year of daily delivery files against the same rows as one file: `finpipe.ingest.
   ingest_files` (what `finpipe ingest` and the flows call: each file landed, recorded and
   published or quarantined on its own; clean runs of files share one GX run) into one fresh
   store, the single file into another; both stores first get the same history file.
   Target: the daily files <= 3x the single file.

Run: `python benchmarks/validation_batches.py [--tickers 50] [--files 250] [--repeats 5]`.
Prints each side's seconds and the ratios; nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

TARGET_BATCH_RATIO = 1.25
TARGET_FILES_RATIO = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickers", type=int, default=50)
    parser.add_argument("--files", type=int, default=250, help="daily delivery files")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per batch side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="finpipe-validation-bench-") as folder:
        work = Path(folder)
        os.environ["FINPIPE_HOME"] = str(work / "unused")
        from finpipe.settings import load_settings, prepare_environment

        prepare_environment(load_settings())
        history, daily, one_file = write_deliveries(work, args.tickers, args.files)
        as_of = pd.Timestamp(daily[-1].stem.removeprefix("market_"))
        batch_figures(one_file, as_of, args.repeats)
        files_figures(work, history, daily, one_file, as_of)


def write_deliveries(work: Path, tickers: int, files: int) -> tuple[Path, list[Path], Path]:
    """Write a synthetic history file, `files` daily files and one file with the daily rows."""
    from finpipe.market.synthetic import (
        MarketSyntheticConfig,
        generate_market_panel,
        write_vendor_files,
    )

    days = max(files + 55, 305)  # the generator needs 305 dates; the rest is history
    panel = generate_market_panel(MarketSyntheticConfig(tickers=tickers, days=days, seed=7))
    history, *daily = write_vendor_files(panel.prices, work / "deliveries", daily_files=files)
    one_file = work / "year" / f"market_{len(daily)}_days.csv"
    one_file.parent.mkdir()
    pd.concat([pd.read_csv(path, dtype=str) for path in daily]).to_csv(one_file, index=False)
    print(f"{tickers} tickers: {len(daily)} daily files, and one file of the same rows")
    return history, daily, one_file


def batch_figures(one_file: Path, as_of: pd.Timestamp, repeats: int) -> None:
    """Print finpipe's validation of one batch against bare GX's on the same frame."""
    from finpipe.ingest import read_delivery
    from finpipe.market.quality import add_market_checks_columns
    from finpipe.market.schema import normalise_market_frame
    from finpipe.validation import expectation_columns, load_suite_spec, validate_frame

    frame = add_market_checks_columns(normalise_market_frame(read_delivery(one_file)))
    spec = load_suite_spec("market_ohlcv")
    kept = [
        entry
        for entry in spec["expectations"]
        if entry["type"] == "expect_column_to_exist"
        or set(expectation_columns(entry)) <= set(frame.columns)
    ]

    def finpipe_run() -> bool:
        report = validate_frame(
            frame, suite_name="market_ohlcv", batch_name="bench", parameters={"as_of": as_of}
        )
        return report.success

    bare = bare_gx(kept, frame, as_of)
    sides = {
        "finpipe validate_frame": finpipe_run,
        "bare GX, BASIC": lambda: bare("BASIC"),
        "bare GX, SUMMARY": lambda: bare("SUMMARY"),
    }
    seconds = {name: median_seconds(run, repeats) for name, run in sides.items()}
    print(f"\n1. one batch of {len(frame):,} rows, {len(kept)} rules (median of {repeats}, warm)")
    for name, value in seconds.items():
        print(f"   {name:<24} {value:8.3f} s")
    for bare_side in ("bare GX, BASIC", "bare GX, SUMMARY"):
        ratio = seconds["finpipe validate_frame"] / seconds[bare_side]
        verdict = "met" if ratio <= TARGET_BATCH_RATIO else "missed"
        print(
            f"   finpipe / {bare_side}: {ratio:.2f}x (target <= {TARGET_BATCH_RATIO}x, {verdict})"
        )


def bare_gx(kept: list[dict], frame: pd.DataFrame, as_of: pd.Timestamp) -> Callable[[str], bool]:
    """Return a function running `kept` on `frame` with plain GX in a result format."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    quiet = DataContextConfig(  # as finpipe's: in memory, no progress bars on the terminal
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    context = gx.get_context(mode="ephemeral", project_config=quiet)
    suite = context.suites.add(
        gx.ExpectationSuite(
            name="bare",
            expectations=[ExpectationConfiguration(**entry).to_domain_obj() for entry in kept],
        )
    )
    asset = context.data_sources.add_pandas("bare").add_dataframe_asset("frames")
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(
            name="bare", data=asset.add_batch_definition_whole_dataframe("whole"), suite=suite
        )
    )

    def run(result_format: str) -> bool:
        result = validation.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters={"as_of": as_of},
            result_format={"result_format": result_format, "partial_unexpected_count": 10},
        )
        return bool(result.success)

    return run


def median_seconds(run: Callable[[], bool], repeats: int) -> float:
    """Return the median wall time of `repeats` calls of `run`, after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def files_figures(
    work: Path, history: Path, daily: list[Path], one_file: Path, as_of: pd.Timestamp
) -> None:
    """Print the ingest of the daily files against the ingest of the one file, wall and CPU
    seconds (CPU is steadier on a shared machine), and the share spent in `validate_frame`."""
    import finpipe.ingest
    from finpipe.market.pipeline import MARKET_CONTRACT
    from finpipe.storage import Storage

    validating = [0.0]
    validate_frame = finpipe.ingest.validate_frame

    def timed_validate_frame(*args, **kwargs):
        start = time.perf_counter()
        try:
            return validate_frame(*args, **kwargs)
        finally:
            validating[0] += time.perf_counter() - start

    finpipe.ingest.validate_frame = timed_validate_frame  # to time it inside ingest_file

    def ingest(name: str, paths: list[Path]) -> dict[str, float]:
        storage = Storage(work / name)
        finpipe.ingest.ingest_file(storage, MARKET_CONTRACT, history, as_of=as_of)
        validating[0] = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        outcomes = list(finpipe.ingest.ingest_files(storage, MARKET_CONTRACT, paths, as_of=as_of))
        return {
            "wall": time.perf_counter() - wall,
            "cpu": time.process_time() - cpu,
            "validate": validating[0],
            "validated": sum(outcome.status == "validated" for outcome in outcomes),
        }

    try:
        sides = {
            f"{len(daily)} files": ingest("daily", daily),
            "one file": ingest("one", [one_file]),
        }
    finally:
        finpipe.ingest.validate_frame = validate_frame
    print(f"\n2. ingest of {len(daily)} daily files against one file of the same rows")
    for name, side in sides.items():
        print(
            f"   {name:<10} {side['wall']:8.2f} s wall, {side['cpu']:8.2f} s CPU, of which "
            f"validate_frame {side['validate']:6.2f} s ({side['validated']:.0f} validated)"
        )
    daily_side, one_side = sides[f"{len(daily)} files"], sides["one file"]
    for clock in ("wall", "cpu"):
        ratio = daily_side[clock] / one_side[clock]
        verdict = "met" if ratio <= TARGET_FILES_RATIO else "missed"
        print(f"   ratio ({clock}): {ratio:.2f}x (target <= {TARGET_FILES_RATIO}x, {verdict})")


if __name__ == "__main__":
    main()
