"""A backfill's plan on an object store: which of its dates are done, read in one go.

Both sides in this one process, on the same store: a local SeaweedFS (the team stack's S3
server) holding `--days` market dates, each with its validated, feature and prediction
partitions and a completion record. The reference asks `finpipe.date_runs.is_done` date by
date (a read of the record, a HEAD of the predictions and two of the partitions: four
requests a date); `done_dates`, which `plan_backfill` uses, lists each layer once and reads
the records several at once. Both must find the same dates done. On a local folder
`done_dates` is `is_done` date by date (a stat and a hash cost less than a pool's start).

Run: `python -m benchmarks.backfill_plan [--days 250] [--repeats 3]`. Prints each side's
best seconds and the ratio, and writes `benchmarks/results/backfill_plan.md` with its
provenance line (`--no-record`: print only).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd

from benchmarks.provenance import provenance

RESULTS = Path(__file__).resolve().parent / "results" / "backfill_plan.md"
STEPS = ["validate", "features", "score"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=250, help="dates in the store and the plan")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    parser.add_argument("--no-record", action="store_true", help="print, write no result file")
    args = parser.parse_args()
    from finpipe.services.ports import free_ports
    from finpipe.services.s3 import S3Server

    folder = Path(tempfile.mkdtemp(prefix="finpipe-plan-bench-"))
    key, secret = "finpipe-bench", secrets.token_urlsafe(18)
    server = S3Server(folder / "data", free_ports(1)[0], key, secret, bucket="finpipe-bench")
    try:
        server.start()
        os.environ.update(
            AWS_ENDPOINT_URL=server.endpoint_url,
            AWS_ACCESS_KEY_ID=key,
            AWS_SECRET_ACCESS_KEY=secret,
            AWS_DEFAULT_REGION="us-east-1",
        )
        lines = measure(f"s3://finpipe-bench/{uuid.uuid4().hex[:8]}", args.days, args.repeats)
    finally:
        server.stop(timeout=2)
        shutil.rmtree(folder, ignore_errors=True)
    print("\n".join(lines))
    if not args.no_record:
        command = f"python -m benchmarks.backfill_plan --days {args.days} --repeats {args.repeats}"
        RESULTS.write_text(
            "# A backfill's plan on an object store\n\n"
            + provenance(command)
            + "\n\n"
            + "\n".join(lines)
            + "\n"
        )
        print(f"written to {RESULTS}")


def measure(home: str, days: int, repeats: int) -> list[str]:
    """Fill a store at `home` with `days` scored dates; time both sides; return the lines."""
    from finpipe.date_runs import completion_key, done_dates, is_done, partition_fingerprint
    from finpipe.storage import Storage

    store = Storage(home)
    dates = list(pd.bdate_range("2023-01-02", periods=days).date)
    for day in dates:
        for layer in ("validated", "features", "predictions"):
            store.write_partition(layer, "market", day, pd.DataFrame({"date": [day], "x": [1.0]}))
        inputs = partition_fingerprint(store, "market", day)
        record = {"status": "completed", "steps": STEPS, "inputs": inputs}
        store.write_json(completion_key(store, "market", day), record)
    by_date, in_one_go = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        one_by_one = {day for day in dates if is_done(store, "market", day, STEPS)}
        by_date.append(time.perf_counter() - start)
        start = time.perf_counter()
        batched = done_dates(store, "market", dates, STEPS)
        in_one_go.append(time.perf_counter() - start)
        if batched != one_by_one or len(batched) != days:
            raise AssertionError(f"the sides disagree: {len(batched)} and {len(one_by_one)} done")
    reference, finpipe = min(by_date), min(in_one_go)
    return [
        f"{days} dates, all done, on a local SeaweedFS (best of {repeats}):",
        "",
        "| side | seconds |",
        "| --- | --- |",
        f"| `is_done` date by date (reference) | {reference:.2f} |",
        f"| `done_dates` (what `plan_backfill` uses) | {finpipe:.2f} |",
        f"| ratio | {finpipe / reference:.2f}x ({reference / finpipe:.1f}x faster) |",
    ]


if __name__ == "__main__":
    main()
