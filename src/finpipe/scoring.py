"""Publishing predictions: every row names the model version and run that produced it."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

import pandas as pd

from finpipe.storage import Storage, as_day
from finpipe.tracking import RegisteredModel

PROVENANCE_COLUMNS = ["model_name", "model_version", "run_id", "scored_at"]


@dataclass
class ScoringOutcome:
    """What a scoring step wrote."""

    date: str
    rows: int
    model_name: str
    model_version: str
    run_id: str
    path: str
    warning: str = ""  # why nothing was scored, when `rows` is 0

    def to_dict(self) -> dict:
        return asdict(self)


def publish_predictions(
    storage: Storage,
    domain: str,
    as_of: dt.date | str,
    scores: pd.DataFrame,
    model: RegisteredModel,
    sort_by: list[str],
) -> ScoringOutcome:
    """Publish `scores` as predictions/<domain>/date=as_of with model provenance, atomically.

    `scores` holds the key and prediction columns; `date`, model name, version, run id and
    `scored_at` are added. Re-scoring a date replaces its partition.
    """
    as_of = as_day(as_of)
    out = scores.drop(columns=["date"], errors="ignore").assign(
        date=pd.Timestamp(as_of),
        model_name=model.name,
        model_version=model.version,
        run_id=model.run_id,
        scored_at=pd.Timestamp.now(tz="UTC"),
    )
    value_columns = [c for c in scores.columns if c != "date"]
    out = out[["date", *value_columns, *PROVENANCE_COLUMNS]]
    out = out.sort_values(sort_by, kind="stable").reset_index(drop=True)
    key = storage.write_partition("predictions", domain, as_of, out)
    return ScoringOutcome(
        date=as_of.isoformat(),
        rows=len(out),
        model_name=model.name,
        model_version=model.version,
        run_id=model.run_id,
        path=storage.location(key.rsplit("/", 1)[0]),
    )
