"""How stable customer segments are from one night to the next on the real CDNOW sample.

`python -m benchmarks.customers_stability` (from the repository root; developer tooling)
splits `datasets/CDNOW_sample.txt` into nightly deliveries (everything up to the first night,
then each night's new rows), runs the customers nightly flow (validate, features, retrain,
promote, score) night after night in a fresh FINPIPE_HOME with the `cdnow` config and the
default training settings, and reports for every retrain:

- `same_segment_vs_champion` on the held-out test customers: the share the retrained model puts
  in the segment id the champion gives them on the same snapshot (the synthetic figure of the
  README is this one);
- the same against last night's published predictions (`same_segment_vs_previous_night`);
- from the two nights' published predictions, over every customer scored both nights: the share
  that kept its segment id and its segment name (`night_to_night_agreement`).

The nights are business days (the customers calendar); weekend rows arrive with Monday's file.
Results go to `<workdir>/stability.json` and a table on stdout.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

SAMPLE = Path("datasets/CDNOW_sample.txt")
app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)


def split_deliveries(sample: Path, nights: list[dt.date], folder: Path) -> list[Path]:
    """Write one delivery per night, lines verbatim: the first holds every row up to the first
    night, each later one the rows dated after the night before, up to its own."""
    lines = sample.read_text().splitlines(keepends=True)
    day = [dt.datetime.strptime(line.split()[2], "%Y%m%d").date() for line in lines]
    folder.mkdir(parents=True, exist_ok=True)
    files, previous = [], dt.date.min
    for night in nights:
        path = folder / f"cdnow_{night}.txt"
        path.write_text(
            "".join(li for li, d in zip(lines, day, strict=True) if previous < d <= night)
        )
        files.append(path)
        previous = night
    return files


def business_nights(last: dt.date, count: int) -> list[dt.date]:
    days = pd.bdate_range(end=last, periods=count)
    return [d.date() for d in days]


@app.command()
def main(
    last: Annotated[str, typer.Option(help="The last night (YYYY-MM-DD).")] = "1998-06-30",
    nights: Annotated[int, typer.Option(min=2, help="Consecutive business nights.")] = 10,
    workdir: Annotated[Path | None, typer.Option(help="Scratch folder (default: temp).")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Override the epoch cap.")] = None,
) -> None:
    """Run the customers nightly on consecutive CDNOW nights; report segment stability."""
    work = workdir or Path(tempfile.gettempdir()) / "finpipe-cdnow-stability"
    shutil.rmtree(work, ignore_errors=True)
    dates = business_nights(dt.date.fromisoformat(last), nights)
    files = split_deliveries(SAMPLE, dates, work / "deliveries")
    os.environ.update(
        FINPIPE_HOME=str(work / "home"),
        FINPIPE_CUSTOMERS_CONFIG="cdnow",
        FINPIPE_DROP_ROOTS=json.dumps([str(work / "deliveries")]),
    )
    from finpipe.flows.nightly import nightly

    from finpipe.customers.metrics import night_to_night_agreement
    from finpipe.settings import load_settings, prepare_environment
    from finpipe.storage import Storage

    settings = load_settings()
    prepare_environment(settings)
    storage = Storage(settings.home)
    records, before = [], None
    for night, delivery in zip(dates, files, strict=True):
        training = {"max_epochs": max_epochs} if max_epochs else None
        summary = nightly(
            domain="customers", as_of=night, inputs=[str(delivery)], training=training
        )
        test = summary["training"]["metrics"]["autoencoder_kmeans"]["test"]
        scored = storage.read_partition("predictions", "customers", night)
        profiles = storage.read_partition("segments", "customers", night)
        record = {
            "night": night.isoformat(),
            "new_rows": summary["ingested"][0]["rows"],
            "customers": len(scored),
            "segments_fitted": int(test["segments"]),
            "promoted": bool(summary["promotion"]["promoted"]),
            "scored_by": f"v{profiles['model_version'].iloc[0]}",
            "test_same_segment_vs_champion": test.get("same_segment_vs_champion"),
            "test_same_segment_vs_previous_night": test.get("same_segment_vs_previous_night"),
            "names": dict(zip(profiles["segment"].tolist(), profiles["segment_name"], strict=True)),
        }
        if before is not None:
            agreement = night_to_night_agreement(before, scored)
            record |= {f"published_{k}": v for k, v in agreement.items()}
        records.append(record)
        before = scored
        typer.echo(json.dumps(record))
    result = {"sample": str(SAMPLE), "nights": records, "summary": _summary(records)}
    (work / "stability.json").write_text(json.dumps(result, indent=2))
    typer.echo(json.dumps(result["summary"], indent=2))
    typer.echo(f"written: {work / 'stability.json'}")


def _summary(records: list[dict]) -> dict:
    """Min, median and max of each stability figure over the nights that have it."""
    out = {}
    for key in (
        "test_same_segment_vs_champion",
        "test_same_segment_vs_previous_night",
        "published_same_segment",
        "published_same_name",
    ):
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            out[key] = {
                "nights": len(values),
                "min": round(min(values), 4),
                "median": round(statistics.median(values), 4),
                "max": round(max(values), 4),
            }
    return out


if __name__ == "__main__":
    app()
