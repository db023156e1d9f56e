"""One benchmark measurement, run in a fresh process so its peak memory is its own.

`python -m benchmarks.stages '<json>'` runs `run_stage(**json)` and prints one line
`BENCH-RESULT {...}` with the seconds measured, the rows processed, the process's peak resident
memory and stage-specific details. The runner (`benchmarks.suite`) starts these processes;
nothing here decides how often or on what.

Layout of a size's work folder (written by the `prepare` stage):

    deliveries/history_NNNN.parquet   the panel before the night, one file per 252 dates
    deliveries/market_<night>.csv     the night's vendor file (the orchestration stage loads it)
    home/                             FINPIPE_HOME: validated partitions up to the eve, oracle
    prepared.json                     the panel's shape, night date, row counts
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import sys
import time
from pathlib import Path

from benchmarks import workspace
from benchmarks.workspace import peak_rss_mb, prepared, use_home

HISTORY_FILE_DATES = 252  # one delivery file per trading year
# Samples per training epoch timed: a throughput needs no more, and a full GRU epoch at 4S is
# minutes per side on 2 cores. Both loops get the same evenly spread subset of the window.
TRAINING_SAMPLES = 150_000
ORCHESTRATION_CONFIG = {"models": ["mlp", "gru"]}


# -- prepare -------------------------------------------------------------------------------------


def prepare(work: Path, tickers: int, days: int, seed: int, build_features: bool) -> dict:
    """Generate the panel, write its deliveries and publish the validated history (untimed set-up).

    The history is published through ingest's own partition writer without the GX gate: the
    synthetic panel's heavy tails break the 1.0 log-return bound on a few rows at these sizes,
    and the validation stage measures the suite on the same files separately.
    """
    from finpipe.ingest import _publish
    from finpipe.market.pipeline import MARKET_CONTRACT, update_market_features, write_oracle
    from finpipe.market.schema import normalise_market_frame
    from finpipe.market.synthetic import (
        MarketSyntheticConfig,
        _to_vendor_frame,
        generate_market_panel,
    )

    # The same panel already laid out is reused (a re-run of some stages).
    facts = workspace.reuse_prepared(work, tickers=tickers, days=days, seed=seed)
    if facts is not None:
        _, storage = use_home(work)
        if build_features:
            update_market_features(storage, dt.date.fromisoformat(facts["eve"]))
        return workspace.prepare_record(facts)
    deliveries = work / "deliveries"
    _, storage = use_home(work)
    started = time.perf_counter()
    panel = generate_market_panel(MarketSyntheticConfig(tickers=tickers, days=days, seed=seed))
    generated = time.perf_counter() - started
    prices = panel.prices
    write_oracle(storage, panel.expected_return)
    rows = len(prices)
    del panel
    dates = prices["date"].unique()
    night = dates[-1]
    day = prices["date"].to_numpy()
    for number, first in enumerate(range(0, len(dates) - 1, HISTORY_FILE_DATES)):
        last = dates[min(first + HISTORY_FILE_DATES, len(dates) - 1) - 1]
        chunk = prices[(day >= dates[first]) & (day <= last)].reset_index(drop=True)
        chunk.to_parquet(deliveries / f"history_{number:04d}.parquet", index=False)
        _publish(storage, MARKET_CONTRACT, normalise_market_frame(chunk), f"bhistory{number:04d}")
    night_rows = prices[day == night]
    night_day = dt.date.fromisoformat(str(night)[:10])
    _to_vendor_frame(night_rows).to_csv(deliveries / f"market_{night_day}.csv", index=False)
    eve = dt.date.fromisoformat(str(dates[-2])[:10])
    if build_features:
        update_market_features(storage, eve)
    facts = {
        "tickers": tickers,
        "days": days,
        "seed": seed,
        "rows": rows,
        "history_rows": rows - len(night_rows),
        "night_rows": len(night_rows),
        "eve": eve.isoformat(),
        "night": night_day.isoformat(),
        "generate_s": round(generated, 3),
        "prepare_s": round(time.perf_counter() - started, 3),
    }
    return workspace.write_prepared(work, facts)


# -- validation ----------------------------------------------------------------------------------


def validation(work: Path, side: str) -> dict:
    """Validate every history delivery: the GX suite (finpipe) or the same rules in pandas.

    Both sides see the same normalised batches with the derived return column; the rule-by-rule
    unexpected counts come back so the runner can check both sides reached the same verdicts.
    """
    import pandas as pd

    from benchmarks.references import pandas_market_rules
    from finpipe.market.quality import add_market_checks_columns
    from finpipe.market.schema import normalise_market_frame
    from finpipe.validation import validate_frame

    _, storage = use_home(work)
    as_of = pd.Timestamp(prepared(work)["night"])
    files = sorted((work / "deliveries").glob("history_*.parquet"))
    docs = work / "docs"
    if side == "finpipe":  # the GX context is created once per process: not the suite's cost
        warm = add_market_checks_columns(normalise_market_frame(pd.read_parquet(files[0]).head(50)))
        validate_frame(
            warm, suite_name="market_ohlcv", batch_name="warm-up", parameters={"as_of": as_of}
        )
    seconds, suite_only, rows, verdicts = 0.0, 0.0, 0, {}
    for path in files:
        batch = add_market_checks_columns(normalise_market_frame(pd.read_parquet(path)), None)
        if side == "finpipe":  # the suite alone, without rendering its Data Docs page
            started = time.perf_counter()
            validate_frame(
                batch, suite_name="market_ohlcv", batch_name=path.stem, parameters={"as_of": as_of}
            )
            suite_only += time.perf_counter() - started
        started = time.perf_counter()
        if side == "finpipe":
            report = validate_frame(
                batch,
                suite_name="market_ohlcv",
                batch_name=path.stem,
                parameters={"as_of": as_of},
                # As ingest runs it: the Data Docs site, one per delivery, is part of the gate.
                data_docs_dir=docs / path.stem,
            )
            counts = {rule.rule: rule.unexpected_count for rule in report.rules}
        else:
            counts = pandas_market_rules(batch, as_of)
        seconds += time.perf_counter() - started
        rows += len(batch)
        for rule, count in counts.items():
            verdicts[rule] = verdicts.get(rule, 0) + int(count)
    details = {
        "unexpected": verdicts,
        "suite_without_docs_s": round(suite_only, 4),
        "batches": len(files),
    }
    if side == "finpipe":
        one_row = add_market_checks_columns(
            normalise_market_frame(pd.read_parquet(files[0]).head(1)), None
        )
        details["gx_batch_floor"] = workspace.gx_batch_floor(
            lambda docs: validate_frame(
                one_row,
                suite_name="market_ohlcv",
                batch_name="one-row",
                parameters={"as_of": as_of},
                data_docs_dir=docs,
            ),
            work / "floor_docs",
        )
    return {"seconds": seconds, "rows": rows, "details": details}


# -- features ------------------------------------------------------------------------------------


def features(work: Path, side: str) -> dict:
    """Build every feature partition from the validated store: finpipe, or the Polars reference."""
    _, storage = use_home(work)
    eve = dt.date.fromisoformat(prepared(work)["eve"])
    if side == "finpipe":
        from finpipe.market.pipeline import update_market_features

        started = time.perf_counter()
        update = update_market_features(storage, eve, rebuild=True)
        return {"seconds": time.perf_counter() - started, "rows": update.rows}
    from benchmarks.references import compare_feature_outputs, polars_market_features

    out = work / "polars_features"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    rows = polars_market_features(storage.layer_dir("validated", "market"), out)
    seconds = time.perf_counter() - started
    dates = storage.partition_dates("features", "market", end=eve)
    check = compare_feature_outputs(
        storage.layer_dir("features", "market"), out, dates[:80] + dates[-80:]
    )
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "rows": rows, "details": {"agreement": check}}


# -- training ------------------------------------------------------------------------------------


def training(work: Path, model: str, epochs: int) -> dict:
    """Time finpipe's training loop and a bare PyTorch loop on the same tensors and net.

    The tensors are those `train_market` builds (the default training window up to the eve),
    the net is built from the same seed, and both run `epochs` epochs with no early stop over
    at most TRAINING_SAMPLES of its samples.
    """
    import torch

    from benchmarks.references import bare_training_loop
    from finpipe.market.model import training_samples
    from finpipe.market.pipeline import (
        MarketTrainingConfig,
        feature_columns_of,
        load_training_frame,
    )
    from finpipe.nets import build_net
    from finpipe.training import (
        Batches,
        TrainConfig,
        applied_learning_rate,
        time_split,
        train_regressor,
    )

    _, storage = use_home(work)
    eve = dt.date.fromisoformat(prepared(work)["eve"])
    # One net on each side (no seed averaging): the loop is raced, not the recipe.
    config = MarketTrainingConfig(max_epochs=epochs, patience=epochs + 1, seed_average={})
    frame = _training_window(storage, eve, config, load_training_frame)
    labelled = frame.loc[frame[config.label].notna(), "date"].unique()
    split = time_split(sorted(labelled), embargo=config.horizon)
    train_config = config.train_config(model)
    samples = training_samples(
        frame,
        feature_columns_of(frame),
        split,
        train_config,
        label=config.label,
        target=config.target,
    )
    del frame
    train, validation = samples.train, samples.validation
    rows = train.rows if train.rows is not None else torch.arange(len(train))
    if len(train) > TRAINING_SAMPLES:  # the same evenly spread subset for both loops
        keep = torch.linspace(0, len(train) - 1, TRAINING_SAMPLES).long()
        rows = rows[keep]
        train = Batches(train.features, train.targets[keep], rows, train.lookback)
    validation_rows = (
        validation.rows if validation.rows is not None else torch.arange(len(validation))
    )

    def bare(net, rows, targets, epochs):
        # The rate finpipe's loop applies for this many steps an epoch (a GRU's is scaled
        # down on a large panel): the same optimisation on both sides.
        steps = math.ceil(len(rows) / train_config.batch_size)
        rate = applied_learning_rate(
            train_config.learning_rate, steps, train_config.full_rate_steps
        )
        return bare_training_loop(
            net, train.features, rows, targets, validation_rows, validation.targets,
            lookback=train.lookback, batch_size=train_config.batch_size, epochs=epochs,
            learning_rate=rate, weight_decay=train_config.weight_decay, seed=train_config.seed,
        )  # fmt: skip

    # Warm-up, untimed: torch sets up kernels and allocators on first use.
    few = slice(0, 4 * train_config.batch_size)
    warm = Batches(train.features, train.targets[few], rows[few], train.lookback)
    warm_config = TrainConfig(**{**train_config.to_params(), "max_epochs": 1})
    train_regressor(build_net(train_config, len(samples.feature_columns)), warm, warm, warm_config)
    bare(build_net(train_config, len(samples.feature_columns)), rows[few], train.targets[few], 1)

    net = build_net(train_config, len(samples.feature_columns))
    started = time.perf_counter()
    result = train_regressor(net, train, samples.validation, train_config)
    finpipe_s = time.perf_counter() - started
    bare_net = build_net(train_config, len(samples.feature_columns))
    started = time.perf_counter()
    bare_losses = bare(bare_net, rows, train.targets, epochs)
    reference_s = time.perf_counter() - started
    return workspace.training_record(
        finpipe_s, reference_s, len(train), len(validation), epochs, result.history, bare_losses,
        train_samples_available=len(samples.train),
    )  # fmt: skip


def _training_window(storage, as_of, config, load_training_frame):
    """Return the frame `train_market` trains on: the last `history_dates` dates up to `as_of`."""
    import numpy as np

    frame = load_training_frame(storage, as_of, config.horizon, history_dates=config.history_dates)
    if config.history_dates:
        keep = np.sort(frame["date"].unique())[-config.history_dates :]
        frame = frame[frame["date"].isin(keep)].reset_index(drop=True)
    return frame


# -- orchestration -------------------------------------------------------------------------------


def orchestration(work: Path, side: str, epochs: int) -> dict:
    """Run one night (load the night's file, features, train, promote, score): through the
    Prefect flow, or as the same library calls made directly. Returns seconds and quality."""
    training = {**ORCHESTRATION_CONFIG, "max_epochs": epochs}
    # Market's reset clears only the Data Docs under reports/, as it always has.
    seconds, outcome_metrics, rows, setup = workspace.run_night(
        work, "market", side, training, reports="reports/data_docs"
    )
    quality = {
        kind: {
            "test_ic": result["test"].get("ic"),
            "oracle_ic": result["test"].get("oracle_ic"),
            "ic_to_oracle": (
                result["test"]["ic"] / result["test"]["oracle_ic"]
                if result["test"].get("oracle_ic")
                else None
            ),
        }
        for kind, result in outcome_metrics.items()
    }
    details = {"quality": quality, "epochs": epochs, **setup}
    return {"seconds": seconds, "rows": rows, "details": details}


# -- scoring -------------------------------------------------------------------------------------


SCORED_NIGHTS = 10


def scoring(work: Path, side: str) -> dict:
    """Score the last SCORED_NIGHTS dates one night at a time, as nightly runs (or a replay)
    would: finpipe's scoring step, or a pyarrow read + the bare net + a pyarrow write.

    Both sides start in a fresh process, so each pays its first model load once: MLflow's
    registry and artifacts for finpipe, `torch.load` of the same weights for the reference. The
    tracking store is open before the clock starts (see `workspace.require_champion`).
    """
    settings, storage = use_home(work)
    night = dt.date.fromisoformat(prepared(work)["night"])
    workspace.require_champion(settings, "market")
    dated = storage.partition_dates("features", "market", end=night)
    nights = dated[-SCORED_NIGHTS:]
    if side == "finpipe":
        from finpipe.market.pipeline import score_market

        return workspace.time_finpipe_scoring(score_market, storage, settings, nights)
    from benchmarks.references import bare_scoring, load_bare_model

    model_dir = workspace.champion_folder(settings, "market")
    meta = json.loads((model_dir / "model.json").read_text())
    lookback = meta["config"]["lookback"] if meta["config"]["model"] != "mlp" else 1
    rows = 0
    started, collections = workspace.settled_clock()
    model = load_bare_model(model_dir)  # once, as a script scoring several nights would
    for day in nights:
        position = dated.index(day)
        days = dated[max(0, position - lookback) : position + 1]
        files = [storage.partition_file("features", "market", d) for d in days]
        out = work / "bare_predictions" / f"date={day}" / "part-0.parquet"
        rows += bare_scoring(model, files, day, out).num_rows
    details = {"nights": len(nights), "model": meta["config"]["model"]}
    details["full_gc_passes"] = workspace.full_collections() - collections
    return {"seconds": time.perf_counter() - started, "rows": rows, "details": details}


STAGES = workspace.stage_table(prepare, validation, features, training, orchestration, scoring)


def run_stage(
    stage: str, work: str, threads: int | None = None, domain: str = "market", **options
) -> dict:
    """Run one stage measurement and return its result with this process's peak memory.

    `domain` picks the stage table: market's above, or `benchmarks.credit` /
    `benchmarks.customers` (their `STAGES`)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    stages = STAGES if domain == "market" else _domain_stages(domain)
    result = stages[stage](Path(work), **options)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _domain_stages(domain: str) -> dict:
    import importlib

    if domain not in ("credit", "customers"):
        raise ValueError(f"no benchmark stages for domain {domain!r}")
    return importlib.import_module(f"benchmarks.{domain}").STAGES


USAGE = """usage: python -m benchmarks.stages '{"stage": ..., "work": ..., ...}'

One measurement in this fresh process, as `python -m benchmarks` runs it (not a command for
people: use `python -m benchmarks --help`). The argument is the JSON request; the result is
printed on a line starting BENCH-RESULT."""


def main() -> None:
    arguments = sys.argv[1:]
    if len(arguments) != 1 or arguments[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if arguments in (["-h"], ["--help"]) else 2)
    try:
        request = json.loads(arguments[0])
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: the request is not JSON ({error})\n{USAGE}") from None
    result = run_stage(**request)
    print("BENCH-RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
