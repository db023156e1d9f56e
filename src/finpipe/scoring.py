"""Publishing predictions: every row names the model version and run that produced it."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import pandas as pd

from finpipe.errors import ScoringError
from finpipe.storage import Storage, as_day
from finpipe.text import counted
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
    # The last date the model learnt from (trained or was validated on, or read a label's
    # price from), where its domain records one (`lifecycle.LearntDates`); None: not known.
    learnt_through: str | None = None

    @property
    def in_sample(self) -> bool:
        """True when the model learnt from this date: its predictions are not out-of-sample."""
        return self.learnt_through is not None and self.date <= self.learnt_through

    def to_dict(self) -> dict:
        return asdict(self)


def in_sample_warning(scored: Iterable[ScoringOutcome]) -> str | None:
    """Return what a run that scored these dates warns once, e.g. "12 of 20 dates scored are on
    or before champion v3's learnt_through 2024-03-28: their predictions are in-sample", or
    None when no date is in-sample. A backfill scores past dates with today's champion, which
    may have trained on them: IC measured over those predictions is in-sample fit. The rows do
    not carry it (a new column in the predictions layer would be read as missing from every
    partition written before it); their `model_version` and the model's recorded window do."""
    scored = list(scored)
    inside = Counter(
        (outcome.model_version, outcome.learnt_through) for outcome in scored if outcome.in_sample
    )
    if not inside:
        return None
    if len(inside) == 1:
        [(version, through)] = inside
        whose = f"champion v{version}'s learnt_through {through}"
    else:  # a champion promoted while the run scored
        each = ", ".join(f"v{v}: {n} through {day}" for (v, day), n in sorted(inside.items()))
        whose = f"the learnt_through of the champion that scored them ({each})"
    count = inside.total()
    return (
        f"{count:,} of {counted(len(scored), 'date')} scored {'is' if count == 1 else 'are'} "
        f"on or before {whose}: "
        "their predictions are in-sample (the model's training or validation read those dates), "
        "so an IC or accuracy measured on them is fit, not forecast"
    )


def check_scores(domain: str, scores: pd.DataFrame, keys: list[str]) -> None:
    """Raise ScoringError when a domain's scorer returned rows that cannot be read: a key
    column missing or with missing values, two rows with the same keys, a column named like
    the provenance scoring adds, no prediction column beside the keys, or predictions missing
    on every row. An empty frame passes when it has its key columns (a date with nothing to
    score is published empty, so it is done)."""
    missing = [key for key in keys if key not in scores.columns]
    if missing:
        raise ScoringError(f"the {domain} scorer returned no {', '.join(missing)} column")
    taken = [column for column in PROVENANCE_COLUMNS if column in scores.columns]
    if taken:
        raise ScoringError(
            f"the {domain} scorer returned a column named {taken[0]}, which scoring adds to "
            f"every row (with {', '.join(c for c in PROVENANCE_COLUMNS if c != taken[0])}); "
            "rename it"
        )
    if scores.empty:
        return
    blank = [key for key in keys if scores[key].isna().any()]
    if blank:
        raise ScoringError(f"the {domain} scorer returned rows without their {blank[0]}")
    repeated = scores.duplicated(subset=keys, keep=False)
    if repeated.any():
        first = ", ".join(f"{key}={scores.loc[repeated, key].iloc[0]}" for key in keys)
        raise ScoringError(
            f"the {domain} scorer returned {int(repeated.sum())} rows that share their keys "
            f"({first}, ...): a date's predictions hold one row per key"
        )
    values = [c for c in scores.columns if c not in {*keys, "date", *PROVENANCE_COLUMNS}]
    if not values:
        raise ScoringError(f"the {domain} scorer returned its keys ({', '.join(keys)}) only")
    if scores[values].isna().all(axis=None):
        raise ScoringError(f"the {domain} scorer returned no value in {', '.join(values)}")


def publish_predictions(
    storage: Storage,
    domain: str,
    as_of: dt.date | str,
    scores: pd.DataFrame,
    model: RegisteredModel,
    sort_by: list[str],
) -> ScoringOutcome:
    """Publish `scores` as predictions/<domain>/<as_of> with model provenance, atomically.

    `scores` holds the key and prediction columns; `date`, model name, version, run id and
    `scored_at` are added. Re-scoring a date replaces its partition. Raises ScoringError, with
    nothing published, when `scores` lacks its keys, repeats them or holds no prediction
    (`check_scores`).
    """
    as_of = as_day(as_of)
    check_scores(domain, scores, sort_by)
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
