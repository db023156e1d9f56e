"""Crash safety: SIGKILL at the worst moments, then a re-run gives what an unbroken run gives.

Each step runs in a child process (library calls, no Prefect) with FINPIPE_CRASH_AT naming a
point in the code (finpipe.faults). After each kill we check what a reader would see, then
re-run the step without the fault.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    write_vendor_files,
)
from finpipe.settings import Settings
from finpipe.storage import Storage

pytestmark = pytest.mark.slow

STEPS = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import mlflow
    from mlflow import MlflowClient
    from finpipe.settings import load_settings
    from finpipe.storage import Storage
    from finpipe.ingest import ingest_file
    from finpipe.market import pipeline as m

    settings = load_settings()
    storage = Storage(settings.home)

    def champion():
        mlflow.set_tracking_uri(settings.tracking_uri)
        try:
            return MlflowClient().get_model_version_by_alias("finpipe-market", "champion").version
        except Exception:
            return None

    for step, as_of, files, crash in json.loads(sys.argv[1]):
        if crash:
            print(f"CHAMPION={champion()}", flush=True)
            os.environ["FINPIPE_CRASH_AT"] = crash
        if step == "ingest":
            for f in files:
                ingest_file(storage, m.MARKET_CONTRACT, Path(f), as_of="2099-01-01")
        elif step == "features":
            m.update_market_features(storage, as_of)
        elif step == "train":
            config = m.MarketTrainingConfig(models=["mlp"], max_epochs=3, hidden=16)
            outcome = m.train_market(storage, settings, as_of, config)
            m.promote_market(storage, settings, outcome)
        elif step == "score":
            m.score_market(storage, settings, as_of)
        os.environ.pop("FINPIPE_CRASH_AT", None)
    """
)


def _run(home, plan) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINPIPE_", "MLFLOW_"))}
    env["FINPIPE_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-c", STEPS, json.dumps(plan)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def deliveries(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drop")
    panel = generate_market_panel(MarketSyntheticConfig(tickers=8, days=330, seed=21))
    files = write_vendor_files(panel.prices, folder, daily_files=1)
    history_last = sorted(panel.prices["date"].unique())[-2]
    return files, [str(pd.Timestamp(history_last).date()), files[1].stem.removeprefix("market_")]


def _plan(deliveries, crash_at: dict[int, str]) -> list:
    """Two nights of steps; `crash_at` maps a step's position to the crash point to hit."""
    files, (night1, night2) = deliveries
    steps = [
        ("ingest", "", [str(files[0])]),
        ("features", night1, []),
        ("train", night1, []),
        ("score", night1, []),
        ("ingest", "", [str(files[1])]),
        ("features", night2, []),
        ("train", night2, []),
        ("score", night2, []),
    ]
    return [[*step, crash_at.get(i)] for i, step in enumerate(steps)]


def _run_until_done(home, plan) -> list[str]:
    """Run `plan`; after each kill check what a reader sees, then resume at the killed step."""
    survived = []
    while plan:
        result = _run(home, plan)
        if result.returncode == 0:
            break
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        killed_at = next(i for i, step in enumerate(plan) if step[3])
        champion_before = result.stdout.strip().splitlines()[-1].removeprefix("CHAMPION=")
        _assert_consistent(home, None if champion_before == "None" else champion_before)
        survived.append(f"{plan[killed_at][0]}@{plan[killed_at][3]}")
        plan = [[*plan[killed_at][:3], None], *plan[killed_at + 1 :]]
    return survived


def _assert_consistent(home, champion_before: str | None) -> None:
    storage = Storage(home)
    for layer in ("validated", "features", "predictions"):
        for day in storage.partition_dates(layer, "market"):
            assert len(storage.read_partition(layer, "market", day)) > 0  # every file whole
    if champion_before is not None:
        mlflow.set_tracking_uri(Settings(home=home).tracking_uri)
        now = MlflowClient().get_model_version_by_alias("finpipe-market", "champion").version
        assert str(now) == champion_before, "champion alias moved or went missing in a crash"


def _outputs(home) -> dict[str, pd.DataFrame]:
    storage = Storage(home)
    predictions = storage.read_partitions("predictions", "market")
    return {
        "validated": storage.read_partitions("validated", "market").drop(columns="batch_id"),
        "features": storage.read_partitions("features", "market"),
        "predictions": predictions[["date", "ticker", "prediction"]],
    }


def test_kills_at_every_crash_point_lose_nothing(tmp_path, deliveries):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert _run_until_done(clean, _plan(deliveries, {})) == []
    crashes = {
        0: "partition-before-publish",  # validated partitions of the history file
        1: "partition-before-publish",  # feature partitions
        2: "model-registered",  # first model registered, no alias yet
        5: "partition-before-publish",  # night 2 features
        6: "champion-alias",  # night 2 promotion, champion v1 in place
    }
    survived = _run_until_done(crashed, _plan(deliveries, crashes))
    assert survived == [
        "ingest@partition-before-publish",
        "features@partition-before-publish",
        "train@model-registered",
        "features@partition-before-publish",
        "train@champion-alias",
    ]
    expected, actual = _outputs(clean), _outputs(crashed)
    for layer in expected:
        pd.testing.assert_frame_equal(
            expected[layer].reset_index(drop=True),
            actual[layer].reset_index(drop=True),
            obj=layer,
        )
        key = ["date", "ticker"]
        assert not actual[layer].duplicated(key).any(), f"duplicate rows in {layer}"
    # No half-written file is visible anywhere: only hidden temp files may remain.
    leftovers = [p for p in crashed.rglob("*.tmp") if not p.name.startswith(".")]
    assert leftovers == []
