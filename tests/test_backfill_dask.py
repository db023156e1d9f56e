"""A backfill fanned out over a real Dask cluster (FINPIPE_DASK_ADDRESS): `dask scheduler` and
two `dask worker --nthreads 1` on 127.0.0.1, the session's real Prefect server, prefect-dask's
DaskTaskRunner; the same backfill on the thread pool publishes the same predictions."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest

from benchmarks.dask_backfill import (
    dask_cluster,
    predictions_by_date,
    prepare_market,
    tasks_run_per_worker,
)
from finpipe.date_runs import read_completion
from finpipe.storage import Storage
from tests.conftest import finpipe_home

DATES = 10


@pytest.mark.timeout(900)
def test_a_backfill_on_two_dask_workers_publishes_what_the_thread_pool_does(
    tmp_path, monkeypatch, prefect_api
):
    from finpipe.flows.backfill import backfill
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    base = prepare_market(tmp_path, tickers=6)
    days = Storage(base).partition_dates("validated", "market")[-DATES:]
    homes = {side: tmp_path / side for side in ("threads", "dask")}
    for home in homes.values():
        shutil.copytree(base, home)

    api = prefect_api  # the session's Prefect server
    with finpipe_home(homes["threads"]), temporary_settings({PREFECT_API_URL: api}):
        threads = backfill(start=days[0], end=days[-1], concurrency=2)
        monkeypatch.setenv("FINPIPE_HOME", str(homes["dask"]))
        workers = {**os.environ, "PREFECT_API_URL": api}  # FINPIPE_HOME: the same store
        with dask_cluster(2, workers, tmp_path / "dask-logs") as address:
            monkeypatch.setenv("FINPIPE_DASK_ADDRESS", address)
            on_dask = backfill(start=days[0], end=days[-1], concurrency=2)
            per_worker = tasks_run_per_worker(address)
        APILogWorker.drain_all(timeout=5)  # the runs' last log lines, while the API is set

    # Every date ran on the cluster, spread over both workers, none in the flow's process.
    assert sorted(per_worker.values())[0] >= 1 and sum(per_worker.values()) == DATES, per_worker
    for summary in (threads, on_dask):
        assert [d["date"] for d in summary["dates"]] == [d.isoformat() for d in days]
        assert {d["status"] for d in summary["dates"]} == {"completed"}
    assert read_completion(Storage(homes["dask"]), "market", days[-1])["holder"].startswith(
        "backfill-market-"
    )
    expected = predictions_by_date(homes["threads"], days)
    published = predictions_by_date(homes["dask"], days)
    for day in days:
        assert not expected[day].empty
        pd.testing.assert_frame_equal(published[day], expected[day])
