"""The market nightly and a backfill on the team stack against embedded defaults, side by side
in one run (issue #25's targets).

`python -m benchmarks.team_stack` (from the repository root; developer tooling; needs
`finpipe[team]`, Postgres and SeaweedFS as `finpipe stack up` does):

1. Prepares a market folder as `python -m benchmarks` does (`benchmarks.stages.prepare`:
   validated history and features up to the eve, the night's vendor file), starts
   `finpipe stack up` in the work folder and copies the history and its features into the
   stack's bucket, at the stack's FINPIPE_HOME (untimed).
2. Runs the nightly flow (load the night's file, features, train mlp and gru for `--epochs`,
   promote, score) `--pairs` times on each side, in alternating order, each in a fresh
   process: on embedded defaults (a local folder, MLflow on SQLite, Prefect's local mode) and
   on the stack (the data in its S3 bucket, the MLflow server with artifacts in the bucket,
   the Prefect server, Postgres locks). Before its clock, each side starts or reaches its
   Prefect API and opens its tracking store with the experiment (as `benchmarks`'
   orchestration stage does); each night starts from the same eve (the night's outputs
   removed; the models registered before stay, on both sides, so every pair after the first
   promotes against a champion). The quality floor is off on both sides: the work measured is
   the same whether a 1-epoch model would pass it or not.
3. Backfills the last `--dates` sessions before the night, or before today (validate,
   features, score) on the stack's store, through the stack's two Dask workers and on a pool
   of two threads in the flow's process, each twice (new, then again with force: warm Dask
   workers).

It prints the seconds and ratios and writes them to `<workdir>/team_stack.json`; `--out`
also writes them as JSON there (e.g. benchmarks/results/team_stack.json).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.provenance import provenance

SIDES = ("embedded", "stack")
ROOT = Path(__file__).resolve().parents[1]


def stack_environment(stack_dir: Path, work: Path) -> dict[str, str]:
    """The settings of a client of the stack in `stack_dir` running the benchmark's night."""
    from finpipe.services.stack import CLIENT_SETTINGS, StackFolder, read_env_file

    values = read_env_file(StackFolder(stack_dir).env_file)
    return {
        **{name: values[name] for name in CLIENT_SETTINGS},
        "FINPIPE_LOCAL_DIR": str(work / "stack-local"),
        "PREFECT_HOME": str(work / "stack-local" / "prefect"),
    }


def side_environment(side: str, work: Path, stack_dir: Path) -> dict[str, str]:
    """The environment of one side's process: the embedded defaults, or the stack's settings."""
    from benchmarks.workspace import SYNTHETIC_CONFIGS, home
    from finpipe.services.stack import CLIENT_SETTINGS

    env = {name: value for name, value in os.environ.items() if name not in CLIENT_SETTINGS}
    env.pop("FINPIPE_LOCAL_DIR", None)
    env.update(SYNTHETIC_CONFIGS)
    env.update(
        # One torch thread: on a shared machine two threads wait on each other whenever
        # another process takes a core (single nights ran 4x slower on either side).
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        FINPIPE_PROMOTION_FLOOR="false",
        FINPIPE_DROP_ROOTS=json.dumps([str(work / "deliveries")]),
        PYTHONPATH=str(ROOT),
    )
    if side == "embedded":
        env.update(FINPIPE_HOME=str(home(work)), PREFECT_HOME=str(work / "prefect"))
    else:
        env.update(stack_environment(stack_dir, work))
    return env


# -- one measurement, in its own process -----------------------------------------------------
def reset_night(night: dt.date) -> None:
    """Put this process's store back to the eve: the night's outputs removed, the record of
    what the features were built from as it was at the eve."""
    from finpipe.features import BUILT_FROM
    from finpipe.settings import load_settings
    from finpipe.storage import Storage

    storage = Storage(load_settings().home)
    built_from = storage.read_json(storage.state_key("market", BUILT_FROM))
    for key in ("landing", "state", "quarantine", "predictions", "reports"):
        storage.delete_folder(key)
    for layer in ("validated", "features"):
        storage.delete_folder(storage.partition_key(layer, "market", night).rsplit("/", 1)[0])
    built_from.pop(night.isoformat(), None)
    storage.write_json(storage.state_key("market", BUILT_FROM), built_from)


def run_night(work: Path, epochs: int) -> dict:
    """Run the night through the nightly flow in this process; return its seconds and rows."""
    from finpipe.flows.deployments import start_prefect_api
    from finpipe.flows.nightly import nightly

    from benchmarks.workspace import prepared
    from finpipe import tracking
    from finpipe.settings import load_settings, prepare_environment

    night = dt.date.fromisoformat(prepared(work)["night"])
    settings = load_settings()
    prepare_environment(settings)
    reset_night(night)
    delivery = work / "deliveries" / f"market_{night}.csv"
    prefect_api_s = start_prefect_api()
    tracking.use_tracking(settings, "market")  # the tracking store open, as in `benchmarks`
    cpu, started = _cpu_seconds(), time.perf_counter()
    summary = nightly(
        domain="market",
        as_of=night,
        inputs=[str(delivery)],
        training={"models": ["mlp", "gru"], "max_epochs": epochs},
    )
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 2),
        "cpu_s": round(_cpu_seconds() - cpu, 2),
        "rows": summary["predictions"]["rows"],
        "model_version": summary["predictions"]["model_version"],
        "prefect_api_s": round(prefect_api_s, 2),
    }


def _cpu_seconds() -> float:
    """CPU seconds this process has used (every thread)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stack_cpu_seconds(stack_dir: Path) -> float:
    """CPU seconds used so far by the stack's processes and their children (the MLflow
    server's workers, Postgres's backends)."""
    from finpipe.services.stack import StackFolder, running_processes

    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
                ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    chosen = set(running_processes(StackFolder(stack_dir)).values())
    while True:
        more = {pid for pid, parent in parents.items() if parent in chosen} - chosen
        if not more:
            break
        chosen |= more
    return sum(ticks.get(pid, 0) for pid in chosen) / os.sysconf("SC_CLK_TCK")


def run_backfill(days: list[str], force: bool) -> dict:
    """Backfill `days` in this process's store (on Dask when FINPIPE_DASK_ADDRESS is set)."""
    from finpipe.flows.backfill import backfill

    from finpipe.settings import load_settings, prepare_environment
    from finpipe.storage import Storage

    settings = load_settings()
    prepare_environment(settings)
    started = time.perf_counter()
    summary = backfill(start=days[0], end=days[-1], concurrency=2, force=force)
    seconds = time.perf_counter() - started
    statuses = sorted({d["status"] for d in summary["dates"]})
    storage = Storage(settings.home)
    predictions = {
        day: storage.read_partition("predictions", "market", day)
        .drop(columns="scored_at")
        .to_json(orient="split", double_precision=15)
        for day in days
    }
    return {"seconds": round(seconds, 2), "statuses": statuses, "predictions": predictions}


def in_process(env: dict[str, str], *arguments: str) -> dict:
    """Run `python -m benchmarks.team_stack --one ...` with `env`; return what it measured."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.team_stack", "--one", *arguments],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{arguments} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the run ---------------------------------------------------------------------------------
def copy_to_stack(work: Path, stack_dir: Path) -> float:
    """Copy the prepared history and its features into the stack's store; return seconds."""
    from benchmarks.workspace import home
    from finpipe.features import BUILT_FROM, record_inputs
    from finpipe.settings import load_settings
    from finpipe.storage import Storage

    started = time.perf_counter()
    local = Storage(home(work))
    with environment(stack_environment(stack_dir, work)):
        storage = Storage(load_settings().home)
        for key in ("validated/market", "features/market", "reference/market"):
            storage.upload_folder(local.local_path(key), key)
        # What the features were built from, in the store's own fingerprints (ETags on S3).
        storage.delete_folder(storage.state_key("market"))
        built = local.read_json(local.state_key("market", BUILT_FROM)) or {}
        fingerprints = storage.partition_fingerprints("validated", "market")
        record_inputs(
            storage, "market", {day: fingerprints[dt.date.fromisoformat(day)] for day in built}
        )
    return time.perf_counter() - started


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set `values` in this process's environment for the block, then restore it."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def nights(work: Path, stack_dir: Path, pairs: int, epochs: int) -> dict:
    """`pairs` pairs of nights, embedded and stack, alternating which goes first."""
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for pair in range(pairs):
        order = SIDES if pair % 2 == 0 else SIDES[::-1]
        for side in order:
            env = side_environment(side, work, stack_dir)
            load, servers = os.getloadavg()[0], stack_cpu_seconds(stack_dir)
            measured = in_process(env, "night", str(work), str(epochs))
            measured["stack_servers_cpu_s"] = round(stack_cpu_seconds(stack_dir) - servers, 2)
            measured["load_before"] = round(load, 2)
            runs[side].append(measured)
            print(f"pair {pair + 1} {side}: {json.dumps(measured)}", flush=True)
    pairs_of = list(zip(runs["embedded"], runs["stack"], strict=True))
    ratios = [round(s["seconds"] / e["seconds"], 2) for e, s in pairs_of]
    # CPU: the night's own process, plus on the stack the servers' work for it (beyond what
    # they use idle, which the embedded night's interval shows).
    cpu_ratios = [
        round((s["cpu_s"] + s["stack_servers_cpu_s"] - e["stack_servers_cpu_s"]) / e["cpu_s"], 2)
        for e, s in pairs_of
    ]
    return {
        "runs": runs,
        "stack_over_embedded": ratios,
        "median_ratio": _median(ratios),
        "cpu_stack_over_embedded": cpu_ratios,
        "median_cpu_ratio": _median(cpu_ratios),
    }


def backfills(work: Path, stack_dir: Path, dates: int) -> dict:
    """The last `dates` sessions before the night, on the stack's store: two threads, then
    the stack's two Dask workers; each new, then again with force."""
    from benchmarks.workspace import prepared
    from finpipe.storage import Storage

    night = dt.date.fromisoformat(prepared(work)["night"])
    env = side_environment("stack", work, stack_dir)
    with environment(env):
        store_days = Storage(env["FINPIPE_HOME"]).partition_dates("features", "market")
    # A backfill ends today at the latest (a panel of S's length runs into the future).
    last = min(night, dt.date.today())
    days = [d.isoformat() for d in store_days if d < last][-dates:]
    seconds: dict[str, dict[str, float]] = {}
    published = {}
    for runner in ("threads", "dask"):
        side_env = dict(env)
        if runner == "threads":
            side_env.pop("FINPIPE_DASK_ADDRESS")
        in_process(side_env, "forget", str(work))  # no date done yet: a new backfill
        first = in_process(side_env, "backfill", ",".join(days), "new")
        again = in_process(side_env, "backfill", ",".join(days), "force")
        seconds[runner] = {"first": first["seconds"], "again": again["seconds"]}
        published[runner] = first["predictions"]
        print(f"backfill on {runner}: {seconds[runner]}", flush=True)
    return {
        "dates": len(days),
        "seconds": seconds,
        "dask_over_threads": {
            run: round(seconds["dask"][run] / seconds["threads"][run], 2)
            for run in ("first", "again")
        },
        "identical_predictions": published["threads"] == published["dask"],
    }


def forget_dates() -> None:
    """Remove the store's completion records and predictions (a backfill then redoes all)."""
    from finpipe.settings import load_settings
    from finpipe.storage import Storage

    storage = Storage(load_settings().home)
    storage.delete_folder(storage.state_key("market", "completed"))
    storage.delete_folder("predictions/market")


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def one(arguments: list[str]) -> None:
    """A measurement in this fresh process (`--one night|backfill|forget ...`)."""
    kind = arguments[0]
    if kind == "night":
        result = run_night(Path(arguments[1]), int(arguments[2]))
    elif kind == "backfill":
        result = run_backfill(arguments[1].split(","), force=arguments[2] == "force")
    else:
        forget_dates()
        result = {}
    print(json.dumps(result, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--tickers", type=int, default=500, help="S: 500 (see README)")
    parser.add_argument("--days", type=int, default=2520, help="S: 2,520 sessions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=3, help="nights on each side")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per model each night")
    parser.add_argument("--dates", type=int, default=20, help="sessions the backfills cover")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--parts", default="nightly,backfill", help="what to measure: nightly, backfill or both"
    )
    args = parser.parse_args()
    if args.one:
        one(args.one)
        return
    from benchmarks.stages import prepare
    from benchmarks.workspace import home
    from finpipe.services import stack

    workdir = args.workdir
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="finpipe-team-bench-"))
        workdir.chmod(0o711)  # mkdtemp's 0700 keeps out Postgres, which runs as its own user
    work, stack_dir = workdir / "market", workdir / "stack"
    began = time.perf_counter()
    facts = prepare(work, args.tickers, args.days, args.seed, build_features=True)
    print(f"prepared {args.tickers} x {args.days} in {time.perf_counter() - began:.0f} s")
    # Both sides start without models: a new stack, and no tracking store left on disk.
    shutil.rmtree(home(work) / "mlartifacts", ignore_errors=True)
    (home(work) / "mlflow.db").unlink(missing_ok=True)
    shutil.rmtree(stack_dir, ignore_errors=True)
    info = stack.up(stack_dir, say=print)
    try:
        copied = copy_to_stack(work, stack_dir)
        print(f"copied the history into the bucket in {copied:.0f} s", flush=True)
        command = f"python -m benchmarks.team_stack {shlex.join(sys.argv[1:])}".strip()
        result: dict[str, object] = {
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "provenance": provenance(command),
            "size": {"tickers": args.tickers, "days": args.days, "rows": facts.get("rows")},
            "epochs": args.epochs,
            "stack_up_s": round(info.seconds, 1),
            "copy_to_stack_s": round(copied, 1),
            "load_average": os.getloadavg(),
        }
        parts = args.parts.split(",")
        if "nightly" in parts:
            result["nightly"] = nights(work, stack_dir, args.pairs, args.epochs)
        if "backfill" in parts:
            if "nightly" not in parts:  # the backfills score with a champion: one night, untimed
                env = side_environment("stack", work, stack_dir)
                in_process(env, "night", str(work), str(args.epochs))
            result["backfill"] = backfills(work, stack_dir, args.dates)
    finally:
        stack.down(stack_dir, say=print)
    text = json.dumps(result, indent=2, default=str)
    (workdir / "team_stack.json").write_text(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
