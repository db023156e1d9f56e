"""A market backfill on two Dask workers against the same backfill on the flow's thread pool.

`python -m benchmarks.dask_backfill` (from the repository root; developer tooling; needs
`finpipe[team]`) prepares a synthetic market history with a champion, copies it into two
stores, starts a Prefect server, then backfills the last `--dates` sessions (validate, features,
score) on a pool of `--workers` threads in the flow's process and through prefect-dask's
DaskTaskRunner on a `dask scheduler` with `--workers` x `dask worker --nthreads 1` on 127.0.0.1
(FINPIPE_DASK_ADDRESS), each twice (new, then again with force: warm workers). It prints the
wall times, the Dask/threads ratios and whether every date's predictions are identical, and
writes them to `<workdir>/dask_backfill.json`.

`tests/test_backfill_dask.py` runs the same cluster (`dask_cluster`) on a smaller history.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from finpipe.services.ports import free_ports

TINY = {"max_epochs": 2, "models": ["mlp"], "hidden": 8}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as output:
        return subprocess.Popen(
            argv, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(process: subprocess.Popen) -> None:
    """Stop a process and its children (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextlib.contextmanager
def dask_cluster(workers: int, env: dict[str, str], logs: Path) -> Iterator[str]:
    """Run `dask scheduler` and `workers` x `dask worker --nthreads 1` on 127.0.0.1 with the
    environment `env` (the workers run finpipe's tasks: FINPIPE_HOME, PREFECT_API_URL); yield
    the scheduler's address once every worker has joined."""
    from distributed import Client

    dask = str(Path(sys.executable).with_name("dask"))
    address = f"tcp://127.0.0.1:{free_port()}"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--host", "127.0.0.1", "--no-dashboard"]
    processes = [
        _start(
            [dask, "scheduler", "--port", address.rsplit(":", 1)[1], *common],
            env,
            logs / "scheduler.log",
        )
    ]
    try:
        for number in range(workers):
            argv = [dask, "worker", address, "--nthreads", "1", "--name", f"w{number}", *common]
            processes.append(_start(argv, env, logs / f"worker-{number}.log"))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(workers, timeout=180)
        yield address
    finally:
        for process in reversed(processes):
            _stop(process)


def tasks_run_per_worker(address: str, security=None) -> dict[str, int]:
    """Return how many tasks each worker of the cluster at `address` has executed
    (`security`: a distributed.Security for a TLS cluster such as the team stack's)."""
    from distributed import Client

    with Client(address, timeout="60s", security=security) as client:
        return client.run(lambda dask_worker: dask_worker.state.executed_count)


@contextlib.contextmanager
def prefect_server(settings, workdir: Path) -> Iterator[str]:
    """Run the Prefect server `finpipe ui` starts, on a free port; yield its API URL."""
    from finpipe.ui_servers import server_commands, wait_until_up

    commands = server_commands(
        settings,
        prefect_home=workdir / "prefect-server",
        prefect_port=free_port(),
        mlflow_port=free_port(),
    )
    command = next(c for c in commands if c.name == "Prefect")
    process = command.start(workdir / "prefect-server.log")
    try:
        wait_until_up(command, process, timeout=180)
        yield f"{command.url}/api"
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # the runs' last log lines, before the server goes
        _stop(process)


def prepare_market(root: Path, *, tickers: int, seed: int = 11) -> Path:
    """Write a validated market history with its features and a (toy) champion under
    `root/base`; return that FINPIPE_HOME."""
    from finpipe.ingest import ingest_file
    from finpipe.market.pipeline import (
        MARKET_CONTRACT,
        MarketTrainingConfig,
        promote_market,
        train_market,
        update_market_features,
    )
    from finpipe.market.synthetic import (
        MarketSyntheticConfig,
        generate_market_panel,
        write_vendor_files,
    )
    from finpipe.settings import load_settings
    from finpipe.storage import Storage

    panel = generate_market_panel(MarketSyntheticConfig(tickers=tickers, days=305, seed=seed))
    files = write_vendor_files(panel.prices, root / "drop", daily_files=1)
    home = root / "base"
    previous = os.environ.get("FINPIPE_HOME")
    os.environ["FINPIPE_HOME"] = str(home)
    try:
        settings = load_settings()
        storage = Storage(settings.home)
        ingest_file(storage, MARKET_CONTRACT, files[0], as_of=dt.date.today())
        last = storage.partition_dates("validated", "market")[-1]
        update_market_features(storage, last)
        outcome = train_market(storage, settings, last, MarketTrainingConfig(**TINY))
        promote_market(storage, settings, outcome)
    finally:
        if previous is None:
            os.environ.pop("FINPIPE_HOME", None)
        else:
            os.environ["FINPIPE_HOME"] = previous
    return home


def predictions_by_date(home: Path, days: list[dt.date]) -> dict[dt.date, object]:
    """Return each date's published predictions, without the time they were written."""
    from finpipe.storage import Storage

    storage = Storage(home)
    return {
        day: storage.read_partition("predictions", "market", day).drop(columns="scored_at")
        for day in days
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dates", type=int, default=20, help="sessions to backfill")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers and pool threads")
    parser.add_argument("--tickers", type=int, default=50, help="synthetic market tickers")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker and per pool thread
    from finpipe.settings import load_settings, prepare_environment

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="finpipe-dask-"))
    prepare_environment(load_settings())
    started = time.perf_counter()
    base = prepare_market(workdir, tickers=args.tickers)
    print(f"prepared {args.tickers} tickers in {time.perf_counter() - started:.0f} s")
    from finpipe.storage import Storage

    days = Storage(base).partition_dates("validated", "market")[-args.dates :]
    homes = {side: workdir / side for side in ("threads", "dask")}
    for home in homes.values():
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(base, home)
    result = run_both(homes, days, workers=args.workers, workdir=workdir)
    (workdir / "dask_backfill.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


def run_both(homes: dict[str, Path], days: list[dt.date], *, workers: int, workdir: Path) -> dict:
    """Backfill `days` in `homes["threads"]` on the thread pool, then in `homes["dask"]` on a
    Dask cluster of `workers`, each twice: first as a new backfill (the Dask workers start
    cold: imports, the champion's first load), then again with force (warm); return the wall
    times, the Dask/threads ratios and whether the predictions are identical."""
    from finpipe.flows.backfill import backfill
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from finpipe.settings import load_settings

    def timed(force: bool) -> float:
        started = time.perf_counter()
        backfill(start=days[0], end=days[-1], concurrency=workers, force=force)
        return round(time.perf_counter() - started, 2)

    with (
        prefect_server(load_settings(), workdir) as api,
        temporary_settings({PREFECT_API_URL: api}),
    ):
        os.environ["FINPIPE_HOME"] = str(homes["threads"])
        seconds = {"threads": {"first": timed(False), "again": timed(True)}}
        env = {**os.environ, "FINPIPE_HOME": str(homes["dask"]), "PREFECT_API_URL": api}
        with dask_cluster(workers, env, workdir / "dask-logs") as address:
            os.environ.update(FINPIPE_HOME=str(homes["dask"]), FINPIPE_DASK_ADDRESS=address)
            try:
                seconds["dask"] = {"first": timed(False), "again": timed(True)}
                per_worker = tasks_run_per_worker(address)
            finally:
                os.environ.pop("FINPIPE_DASK_ADDRESS", None)
    threads, dask = (predictions_by_date(homes[s], days) for s in ("threads", "dask"))
    return {
        "dates": len(days),
        "workers": workers,
        "seconds": seconds,
        "dask_over_threads": {
            run: round(seconds["dask"][run] / seconds["threads"][run], 2)
            for run in ("first", "again")
        },
        "tasks_per_worker": per_worker,
        "identical_predictions": all(threads[d].equals(dask[d]) for d in days),
    }


if __name__ == "__main__":
    main()
