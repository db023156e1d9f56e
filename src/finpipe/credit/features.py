"""Credit features: fit-free transforms of validated loan rows, and the loans as known at a day.

A feature partition holds `date`, the id, the configured numeric columns (float64), the
categorical columns (text), `default_flag` (1.0 default, 0.0 no default, missing for
applications still to be scored), `delivered_on` and `outcome_update` (the row is a later
delivery of its loan). Nothing here is fitted: scalers and category vocabularies are fitted on
the training rows and shipped with the model (finpipe.credit.model).

Late outcomes, point in time. A loan is its (date, id); each delivery of it is a version,
stamped `delivered_on` (the delivery's as-of day). Its first delivery is its record from its
own date on: its attributes as applied and, when it came with one, its outcome (history). A
later delivery is an outcome update, known from the day it was delivered; its other columns
are not used. `loans_as_known(rows, id, t)` is the book as known at t: one row per loan, the
first delivery's attributes, the latest outcome delivered on or before t (an empty label in a
later delivery changes nothing). Feature partitions keep only the versions that change a
loan's outcome, so re-delivering a whole book adds no rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from finpipe.credit.config import DATE_COLUMN, DELIVERED_ON, LoanBookConfig
from finpipe.credit.schema import DOMAIN
from finpipe.errors import ConfigError, NothingToTrain, ScoringError
from finpipe.features import FeatureUpdate, update_day_features
from finpipe.storage import Storage

LABEL = "default_flag"
# True on a later delivery of a loan (its outcome arriving), False on its first delivery: lets
# scoring read the open applications and the outcome updates in one filtered scan.
OUTCOME_UPDATE = "outcome_update"


def build_credit_features(validated: pd.DataFrame, book: LoanBookConfig) -> pd.DataFrame:
    """Return the model-input rows of validated loan-book rows (same order), less the later
    deliveries of a loan that do not change its outcome (see `outcome_changes`).

    Rows validated before `delivered_on` was recorded count as delivered on their own date.
    """
    needed = [DATE_COLUMN, book.columns.id, book.columns.label, *book.feature_columns]
    absent = [c for c in needed if c not in validated.columns]
    if absent:
        raise ConfigError(
            f"validated credit data lacks {absent} that the loan-book config {book.source} "
            "names: it was ingested under another config. Keep one loan book per FINPIPE_HOME "
            "(or rebuild by ingesting again into a fresh one)."
        )
    out = validated[[DATE_COLUMN, book.columns.id]].copy()
    for column in book.numeric_columns:
        out[column] = pd.to_numeric(validated[column], errors="coerce").astype("float64")
    for column in book.categorical_columns:
        out[column] = validated[column].astype("string")
    out[LABEL] = default_flag(validated[book.columns.label], book)
    delivered = validated.get(DELIVERED_ON, pd.Series(pd.NaT, index=validated.index))
    out[DELIVERED_ON] = delivered.fillna(validated[DATE_COLUMN]).astype("datetime64[ns]")
    out = out[outcome_changes(out, book.columns.id)]
    ordered = out.sort_values([DATE_COLUMN, book.columns.id, DELIVERED_ON], kind="stable")
    out[OUTCOME_UPDATE] = ordered.duplicated([DATE_COLUMN, book.columns.id]).reindex(out.index)
    return out.reset_index(drop=True)


def credit_feature_definition(book: LoanBookConfig) -> dict[str, object]:
    """Return what `build_credit_features` reads from the loan book: a change rebuilds every
    date's features (`finpipe.features.definition_change`)."""
    return {
        "id": book.columns.id,
        "label": book.columns.label,
        "numeric": list(book.numeric_columns),
        "categorical": list(book.categorical_columns),
        "default_values": list(book.label.default),
        "non_default_values": list(book.label.non_default),
    }


def outcome_changes(rows: pd.DataFrame, id_column: str) -> np.ndarray:
    """Return which rows to keep: each loan's first delivery, and every later delivery whose
    label is not empty and differs from the loan's label before it (a boolean mask in the
    order of `rows`)."""
    keys = [DATE_COLUMN, id_column]
    ordered = rows[[*keys, DELIVERED_ON, LABEL]].sort_values([*keys, DELIVERED_ON], kind="stable")
    groups = [ordered[DATE_COLUMN], ordered[id_column]]
    first = ~ordered.duplicated(keys).to_numpy()
    known_before = ordered[LABEL].groupby(groups).ffill().groupby(groups).shift()
    label = ordered[LABEL]
    news = label.notna() & ~(label == known_before).fillna(False)
    keep = pd.Series(first | news.to_numpy(), index=ordered.index)
    return keep.reindex(rows.index).to_numpy()


def loans_as_known(rows: pd.DataFrame, id_column: str, as_of: dt.date) -> pd.DataFrame:
    """Return one row per loan of `rows` (every version of each loan), as known at `as_of`.

    Attributes come from the loan's first delivery; `default_flag` is the latest outcome among
    its first delivery and the later ones delivered on or before `as_of` (missing if none), and
    `delivered_on` the day that outcome was delivered (the first delivery's day if none). Rows
    come out sorted by (date, id).
    """
    keys = [DATE_COLUMN, id_column]
    if DELIVERED_ON not in rows:  # features built before deliveries were recorded
        rows = rows.assign(**{DELIVERED_ON: rows[DATE_COLUMN]})
    rows = rows.sort_values([*keys, DELIVERED_ON], kind="stable")
    first = ~rows.duplicated(keys)
    known = rows[first | (rows[DELIVERED_ON] <= pd.Timestamp(as_of))]
    outcomes = known.loc[known[LABEL].notna(), [*keys, LABEL, DELIVERED_ON]]
    outcomes = outcomes.drop_duplicates(keys, keep="last")
    loans = (
        rows[first]
        .drop(columns=[LABEL])
        .merge(outcomes, on=keys, how="left", suffixes=("", "_outcome"))
    )
    outcome_day = loans.pop(f"{DELIVERED_ON}_outcome")
    loans[DELIVERED_ON] = outcome_day.fillna(loans[DELIVERED_ON])
    return loans[list(rows.columns)].reset_index(drop=True)


def matured(loans: pd.DataFrame, as_of: dt.date, window_days: int) -> pd.Series:
    """Return which loans' outcome windows have passed at `as_of`: date + window <= as_of."""
    return loans[DATE_COLUMN] + pd.Timedelta(days=window_days) <= pd.Timestamp(as_of)


def default_flag(labels: pd.Series, book: LoanBookConfig) -> np.ndarray:
    """Return 1.0 for default values, 0.0 for non-default values, NaN for empty labels."""
    text = labels.astype("string").str.strip()
    flag = np.full(len(text), np.nan)
    flag[text.isin(book.label.default).fillna(False).to_numpy(dtype=bool)] = 1.0
    flag[text.isin(book.label.non_default).fillna(False).to_numpy(dtype=bool)] = 0.0
    return flag


def update_credit_features(
    storage: Storage,
    as_of: dt.date | str,
    *,
    book: LoanBookConfig,
    rebuild: bool = False,
    block_dates: int = 100,
    progress: Callable[[str], None] | None = None,
    also: Collection[dt.date] = (),
) -> FeatureUpdate:
    """Publish the feature partition of every validated date up to `as_of` that lacks one or
    was built from another version of its validated partition (all of them with `rebuild`),
    and remove those of dates a correction retracted whole (`update_day_features`). Every
    validated date has features after it, so `also` asks for none more.

    A credit row's features depend on that row only, so each date is computed on its own.
    """

    def build(validated: pd.DataFrame) -> pd.DataFrame:
        features = build_credit_features(validated, book)
        order = [DATE_COLUMN, book.columns.id, DELIVERED_ON]
        return features.sort_values(order, kind="stable")

    return update_day_features(
        storage,
        DOMAIN,
        as_of,
        build,
        rebuild=rebuild,
        progress=progress,
        date_column=DATE_COLUMN,
        block_dates=block_dates,
    )


# -- which feature rows a night trains on and scores -----------------------------------------
def load_training_frame(storage: Storage, book: LoanBookConfig, as_of: dt.date) -> pd.DataFrame:
    """Return the loans to train on at `as_of`, as known then (`loans_as_known`), sorted by
    (date, id): those with an outcome whose window has passed (`[label] outcome_window_days`).

    Dated books: every date up to `as_of`; cross-sectional books: the latest snapshot only.
    Raises NothingToTrain, saying why, when no loan qualifies.
    """
    days = storage.partition_dates("features", DOMAIN, end=as_of)
    if not days:
        raise ScoringError(f"no credit feature partitions up to {as_of}; run the features step")
    if not book.is_dated:
        days = days[-1:]
    loans = loans_as_known(
        storage.read_partitions("features", DOMAIN, days=days), book.columns.id, as_of
    )
    labelled = loans[loans[LABEL].notna()]
    window = book.label.outcome_window_days
    frame = labelled[matured(labelled, as_of, window)].reset_index(drop=True)
    if frame.empty:
        raise NothingToTrain(nothing_to_train_reason(loans, as_of, window))
    return frame


def nothing_to_train_reason(loans: pd.DataFrame, as_of: dt.date, window_days: int) -> str:
    """Say why no loan of `loans` (as known at `as_of`) can train: no outcomes yet, or none
    whose window has passed (and when the first one will)."""
    labelled = loans[loans[LABEL].notna()]
    if labelled.empty:
        return (
            f"nothing to train on at {as_of}: none of the {len(loans):,} loans up to that day "
            "has a known outcome yet; deliver outcomes (the same date and id with the label "
            "filled) or train later"
        )
    first = (labelled[DATE_COLUMN].min() + pd.Timedelta(days=window_days)).date()
    return (
        f"nothing matured to train on at {as_of}: {len(labelled):,} loans have an outcome, but "
        f"none is {window_days} days past its application date ([label] "
        f"outcome_window_days); the first matures on {first}"
    )


def scoring_population(storage: Storage, book: LoanBookConfig, as_of: dt.date) -> pd.DataFrame:
    """Return the feature rows to score at `as_of` under `[scoring] population`, as known then.

    unlabelled: every loan dated up to `as_of` without an outcome delivered by then;
    latest_snapshot: every loan of the latest feature date on or before `as_of`. A
    cross-sectional book's population is always of its latest snapshot (`_scored_days`).
    """
    days = _scored_days(storage, book, as_of)
    if not days:
        raise ScoringError(f"no credit feature partitions up to {as_of}; run the features step")
    if book.scoring.population == "latest_snapshot":
        latest = storage.read_partitions("features", DOMAIN, days=days[-1:])
        return loans_as_known(latest, book.columns.id, as_of)
    keys = [DATE_COLUMN, book.columns.id]
    # One scan: the first deliveries without an outcome, and the outcome updates (later
    # deliveries without news are not kept, so every update carries an outcome). A loan
    # whose outcome was delivered by `as_of` is left out.
    rows = storage.read_partitions(
        "features",
        DOMAIN,
        days=days,
        where=pc.field(LABEL).is_null(nan_is_null=True) | pc.field(OUTCOME_UPDATE),
    )
    update = rows[OUTCOME_UPDATE].to_numpy(dtype=bool)
    unlabelled = rows[~update]
    closed = rows.loc[update & (rows[DELIVERED_ON] <= pd.Timestamp(as_of)).to_numpy(), keys]
    still_open = unlabelled.merge(closed.drop_duplicates(), on=keys, how="left", indicator=True)
    return unlabelled[(still_open["_merge"] == "left_only").to_numpy()].reset_index(drop=True)


def _scored_days(storage: Storage, book: LoanBookConfig, as_of: dt.date) -> list[dt.date]:
    """Return the feature dates the population at `as_of` is read from: every date up to it,
    or for a cross-sectional book only the latest, since each of its deliveries is a snapshot
    of the whole book (an earlier snapshot's open loans are in the latest one, or closed)."""
    days = storage.partition_dates("features", DOMAIN, end=as_of)
    return days if book.is_dated else days[-1:]


def nothing_to_score_reason(storage: Storage, book: LoanBookConfig, as_of: dt.date) -> str:
    """Say why the population at `as_of` is empty: no applications at all, none dated that
    day, or every one has its outcome."""
    if book.scoring.population == "latest_snapshot":
        return f"the latest credit snapshot on or before {as_of} holds no loans"
    keys = [DATE_COLUMN, book.columns.id]
    days = _scored_days(storage, book, as_of)
    loans = storage.read_partitions("features", DOMAIN, days=days, columns=keys)
    loans = loans.drop_duplicates(keys)
    if loans.empty:
        return f"nothing to score on {as_of}: no applications up to that day"
    dated = loans[DATE_COLUMN] == pd.Timestamp(as_of)
    new = f"{dated.sum():,} new applications" if dated.any() else "no new applications"
    return (
        f"nothing to score on {as_of}: {new} dated that day, and every one of the "
        f"{len(loans):,} loans up to it has its outcome"
    )
