"""Walk-forward backtests: windows one at a time against two at a time, and the model against
the planted signal; or one backtest on the real sample prices.

`python -m benchmarks.backtest_windows` (from the repository root; developer tooling) writes a
synthetic market panel with a planted signal into a fresh FINPIPE_HOME (validated partitions,
features, the oracle), then runs the `backtest` flow over its last `--scored` sessions with
`--concurrency 1` and again, under another name so every window trains again, with
`--concurrency 2`. It prints the wall time of each run, their ratio, whether the two gave the
same predictions, and the portfolio figures of the model and the oracle (long-short information
ratio after `--cost-bps`), and writes them to `<workdir>/backtest_windows.json`.

`--real datasets/stocks_ohlcv.csv.gz` instead ingests that file (Great Expectations, as a user
would) and runs one backtest on it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _synthetic_home(home: Path, tickers: int, days: int, seed: int) -> float:
    """Write a planted-signal panel's validated prices, features and oracle; return the oracle
    IC over the whole panel."""
    from finpipe.market.features import update_market_features
    from finpipe.market.synthetic import (
        MarketSyntheticConfig,
        generate_market_panel,
        write_oracle,
    )
    from finpipe.storage import Storage

    panel = generate_market_panel(MarketSyntheticConfig(tickers=tickers, days=days, seed=seed))
    storage = Storage(home)
    for day, rows in panel.prices.groupby("date"):
        storage.write_partition("validated", "market", day, rows)
    write_oracle(storage, panel.expected_return)
    update_market_features(storage, storage.partition_dates("validated", "market")[-1])
    return panel.oracle_ic()


def _real_home(home: Path, path: Path) -> None:
    import datetime as dt

    from finpipe.ingest import ingest_file
    from finpipe.market.pipeline import MARKET_CONTRACT
    from finpipe.storage import Storage

    outcome = ingest_file(Storage(home), MARKET_CONTRACT, path, as_of=dt.date.today())
    print(outcome.message)


def _run(parameters: dict) -> tuple[dict, float]:
    from finpipe.flows.backtest import backtest

    started = time.perf_counter()
    result = backtest(**parameters)
    return result, round(time.perf_counter() - started, 1)


def _figures(result: dict) -> dict:
    rows = {f"{r['signal']}/{r['strategy']}": r for r in result["summary"]}
    keep = ("information_ratio", "annualised_return", "max_drawdown", "mean_turnover")
    out = {key: {k: row.get(k) for k in keep} for key, row in rows.items()}
    out["ic"] = {k: v for k, v in result["metrics"].items() if k.endswith(("/ic", "/rank_ic"))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--tickers", type=int, default=60)
    parser.add_argument("--days", type=int, default=760)
    parser.add_argument("--scored", type=int, default=252, help="sessions scored out of sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain-every", type=int, default=63)
    parser.add_argument("--models", default="mlp")
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--cost-bps", type=float, default=10.0)
    parser.add_argument("--concurrency", default="1,2", help="comma-separated runs")
    parser.add_argument("--real", type=Path, default=None, help="a market file to ingest instead")
    parser.add_argument("--start", default=None, help="with --real: first scored date")
    parser.add_argument("--end", default=None, help="with --real: last scored date")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="finpipe-backtest-bench-"))
    os.environ["FINPIPE_HOME"] = str(workdir / "home")
    os.environ.setdefault("FINPIPE_DROP_ROOTS", json.dumps([str(Path.cwd()), str(workdir)]))
    # Prefect's local server gets longer than its 20 s to start on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from finpipe.settings import load_settings, prepare_environment

    prepare_environment(load_settings())
    from finpipe.flows.deployments import start_prefect_api

    print(f"Prefect's local API up in {start_prefect_api():.1f} s (not timed below)")
    from finpipe.storage import Storage

    home = workdir / "home"
    report: dict = {"workdir": str(workdir), "cpus": os.cpu_count(), "args": vars(args)}
    if args.real:
        _real_home(home, args.real)
    else:
        report["oracle_ic_whole_panel"] = _synthetic_home(home, args.tickers, args.days, args.seed)
    days = Storage(home).partition_dates("validated", "market")
    start = args.start or days[-args.scored].isoformat()
    end = args.end or days[-1].isoformat()
    common = {
        "start": start,
        "end": end,
        "retrain_every": args.retrain_every,
        "models": [m.strip() for m in args.models.split(",")],
        "top_k": args.top_k,
        "cost_bps": args.cost_bps,
        "training": {"max_epochs": args.max_epochs},
    }
    # Untimed: the first flow run of a process pays for imports and first calls.
    _run({**common, "start": days[-5].isoformat(), "name": "warm_up", "concurrency": 1})
    runs = {}
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        name = f"concurrency_{concurrency}"
        result, seconds = _run({**common, "name": name, "concurrency": concurrency})
        runs[name] = {
            "seconds": seconds,
            "windows_seconds": result["windows_seconds"],
            "windows": len(result["windows"]),
            **_figures(result),
        }
        print(f"{name}: {seconds} s, windows {result['windows_seconds']} s")
    report["runs"] = runs
    names = list(runs)
    if len(names) == 2:
        first, second = (runs[n]["windows_seconds"] for n in names)
        report["ratio"] = round(first / second, 2)
        store = Storage(home)
        frames = [store.backtest_store(n).read_partitions("predictions", "market") for n in names]
        report["identical_predictions"] = bool(
            frames[0].drop(columns="retrain_date").equals(frames[1].drop(columns="retrain_date"))
        )
    out = workdir / "backtest_windows.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
