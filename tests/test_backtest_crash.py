"""A backtest killed mid-window, then run again: the same predictions and metrics as a run never
interrupted, and no half-written window visible in between.

The backtest is driven as the `backtest` flow drives it, with library calls and no Prefect (as
the crash matrix, tests/test_reliability_crashes.py, drives the nightly): the parent MLflow run,
the plan, each window not done (`run_window`: fit, log the nested run, publish the partitions,
then the record), the evaluation. The killed run is a child process: FINPIPE_CRASH_AT
(`finpipe.faults`) SIGKILLs it at `partition-before-publish`, set as the second window writes
its fourth date (a temporary file written and synced, not yet renamed). The re-run and an
uninterrupted run on a copy of the same store run in the test's process.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from finpipe.market.features import update_market_features
from finpipe.market.synthetic import MarketSyntheticConfig, generate_market_panel
from finpipe.storage import Storage
from tests.conftest import REPO_ROOT, finpipe_home

pytestmark = pytest.mark.slow

NAME = "crash"
RETRAIN_EVERY = 20
CRASH_AT_WRITE = RETRAIN_EVERY + 4  # the second window's fourth partition
TRAINING = {"models": ["mlp"], "max_epochs": 2, "hidden": 8, "seed_average": {"mlp": 1}}


def _config(start: dt.date, end: dt.date):
    from finpipe.backtest import backtest_config
    from finpipe.planning import training_config

    return backtest_config(
        name=NAME,
        start=start,
        end=end,
        retrain_every=RETRAIN_EVERY,
        top_k=2,
        cost_bps=10.0,
        training=training_config("market", {**TRAINING, "history_dates": None}),
    )


def drive(home: str, start: str, end: str, crash_at_write: int = 0) -> dict:
    """Run the backtest in `home` as the flow does (one window at a time); with
    `crash_at_write`, SIGKILL this process in the middle of that partition write."""
    from finpipe import backtest as bt
    from finpipe.settings import load_settings
    from finpipe.training import torch_threads

    os.environ["FINPIPE_HOME"] = home  # importing tests.conftest set a scratch one
    settings = load_settings()
    storage = Storage(settings.home)
    config = _config(dt.date.fromisoformat(start), dt.date.fromisoformat(end))
    sessions = storage.partition_dates("features", "market", config.start, config.end)
    if crash_at_write:
        write, writes = Storage.write_partition, [0]

        def counted(self, *args, **kwargs):
            writes[0] += 1
            if writes[0] == crash_at_write:
                os.environ["FINPIPE_CRASH_AT"] = "partition-before-publish"
            return write(self, *args, **kwargs)

        Storage.write_partition = counted  # type: ignore[method-assign]
    plan = bt.plan_backtest(storage, config, sessions)
    statuses = []
    with bt.backtest_run(settings, config) as parent_run_id, torch_threads(1):
        for planned in plan:
            if planned.done:
                statuses.append("done earlier")
                continue
            bt.run_window(storage, config, planned, parent_run_id=parent_run_id)
            statuses.append("completed")
        report = bt.evaluate_backtest(storage, config)
    return {"statuses": statuses, "metrics": report.metrics(), "sessions": len(sessions)}


def _predictions(home: Path) -> pd.DataFrame:
    store = Storage(home).backtest_store(NAME)
    return store.read_partitions("predictions", "market").reset_index(drop=True)


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    """A stored history of 8 tickers (validated prices and features), copied twice: the home
    that is crashed and re-run, and the home of the uninterrupted run. Returns both homes and
    the backtest's first and last dates (three windows of 20 sessions)."""
    root = tmp_path_factory.mktemp("backtest_crash")
    prices = generate_market_panel(MarketSyntheticConfig(tickers=8, days=320, seed=6)).prices
    prepared = root / "prepared"
    storage = Storage(prepared)
    for day, rows in prices.groupby("date"):
        storage.write_partition("validated", "market", day, rows)
    update_market_features(storage, storage.partition_dates("validated", "market")[-1])
    days = storage.partition_dates("features", "market")
    start, end = days[-3 * RETRAIN_EVERY], days[-1]
    crashed, clean = root / "crashed", root / "clean"
    shutil.copytree(prepared, crashed)
    shutil.copytree(prepared, clean)
    return crashed, clean, start.isoformat(), end.isoformat()


def test_a_backtest_killed_mid_window_reruns_to_what_an_uninterrupted_run_gives(homes):
    from finpipe import backtest as bt

    crashed, clean, start, end = homes
    code = "from tests.test_backtest_crash import drive; "
    code += f"drive({str(crashed)!r}, {start!r}, {end!r}, {CRASH_AT_WRITE})"
    # The child's scratch folder (tests.conftest makes one) under the test's: a SIGKILLed
    # process leaves it behind.
    scratch = crashed.parent / "child-tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    env.pop("FINPIPE_CRASH_AT", None)
    child = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]

    # What a reader sees after the kill: the first window whole and recorded; of the second,
    # only whole partitions (three dates) and no record, so the plan redoes it.
    store = Storage(crashed).backtest_store(NAME)
    seen = _predictions(crashed)
    assert seen["date"].nunique() == CRASH_AT_WRITE - 1
    # The file being written when killed is left as a hidden temporary file, which no reader
    # takes for a partition (only the rename publishes one).
    folder = Path(store.location("predictions/market"))
    [leftover] = folder.rglob(".*.tmp")
    published = set(pd.to_datetime(seen["date"]).dt.date)
    assert dt.date.fromisoformat(leftover.parent.name) not in published
    assert not (leftover.parent / "part-0.parquet").exists()
    with finpipe_home(crashed):
        config = _config(dt.date.fromisoformat(start), dt.date.fromisoformat(end))
        sessions = Storage(crashed).partition_dates("features", "market", start, end)
        plan = bt.plan_backtest(Storage(crashed), config, sessions)
        assert [p.done for p in plan] == [True, False, False]
        assert bt.read_window_record(store, plan[1].window) is None

        rerun = drive(str(crashed), start, end)
    with finpipe_home(clean):
        uninterrupted = drive(str(clean), start, end)

    assert rerun["statuses"] == ["done earlier", "completed", "completed"]
    assert uninterrupted["statuses"] == ["completed"] * 3
    assert rerun["sessions"] == 3 * RETRAIN_EVERY
    pd.testing.assert_frame_equal(_predictions(crashed), _predictions(clean))
    # The dates a reader saw after the kill were already whole: the uninterrupted run's rows.
    whole = _predictions(clean)
    whole = whole[whole["date"].isin(seen["date"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(seen, whole)
    assert rerun["metrics"] == uninterrupted["metrics"]
    assert {"mlp/long_short/information_ratio", "mlp/ic"} <= set(rerun["metrics"])
