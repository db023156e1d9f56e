"""Credit features: one row per loan or application, fit-free transforms of its validated row.

A feature partition holds `date`, the id, the configured numeric columns (float64), the
categorical columns (text) and `default_flag`: 1.0 default, 0.0 no default, missing for
applications still to be scored. Nothing here is fitted: scalers and category vocabularies are
fitted on the training rows and shipped with the model (finpipe.credit.model).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from finpipe.credit.config import DATE_COLUMN, LoanBookConfig
from finpipe.credit.schema import DOMAIN
from finpipe.errors import ConfigError, ScoringError
from finpipe.features import FeatureUpdate, PartitionWriter, features_are_stale
from finpipe.storage import Storage, as_day

LABEL = "default_flag"


def build_credit_features(validated: pd.DataFrame, book: LoanBookConfig) -> pd.DataFrame:
    """Return the model-input rows of validated loan-book rows (same order)."""
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
    return out.reset_index(drop=True)


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
) -> FeatureUpdate:
    """Publish the feature partition of every validated date up to `as_of` that lacks one or
    is older than its validated partition (all of them with `rebuild`).

    A credit row's features depend on that row only, so each date is computed on its own.
    """
    started = time.perf_counter()
    as_of = as_day(as_of)
    update = FeatureUpdate()
    done = set(storage.partition_dates("features", DOMAIN, end=as_of))
    todo = [
        day
        for day in storage.partition_dates("validated", DOMAIN, end=as_of)
        if rebuild or day not in done or features_are_stale(storage, DOMAIN, day)
    ]
    with PartitionWriter(storage, DOMAIN, update, DATE_COLUMN) as writer:
        for start in range(0, len(todo), block_dates):
            block = todo[start : start + block_dates]
            validated = storage.read_partitions("validated", DOMAIN, days=block)
            features = build_credit_features(validated, book)
            writer.publish(features.sort_values([DATE_COLUMN, book.columns.id], kind="stable"))
            if progress:
                progress(f"features: {start + len(block)}/{len(todo)} dates built")
    update.seconds = round(time.perf_counter() - started, 3)
    return update


# -- which feature rows a night trains on and scores -----------------------------------------
def load_training_frame(storage: Storage, book: LoanBookConfig, as_of: dt.date) -> pd.DataFrame:
    """Return the labelled feature rows known at `as_of`, sorted by (date, id).

    Dated books: every date up to `as_of`; cross-sectional books: the latest snapshot only.
    """
    days = storage.partition_dates("features", DOMAIN, end=as_of)
    if not days:
        raise ScoringError(f"no credit feature partitions up to {as_of}; run the features step")
    if not book.is_dated:
        days = days[-1:]
    frame = storage.read_partitions("features", DOMAIN, days=days)
    frame = frame[frame[LABEL].notna()]
    return frame.sort_values([DATE_COLUMN, book.columns.id], kind="stable").reset_index(drop=True)


def scoring_population(storage: Storage, book: LoanBookConfig, as_of: dt.date) -> pd.DataFrame:
    """Return the feature rows to score at `as_of` under `[scoring] population`.

    unlabelled: every row without an outcome dated up to `as_of`; latest_snapshot: every row of
    the latest feature date on or before `as_of`.
    """
    days = storage.partition_dates("features", DOMAIN, end=as_of)
    if not days:
        raise ScoringError(f"no credit feature partitions up to {as_of}; run the features step")
    if book.scoring.population == "latest_snapshot":
        return storage.read_partitions("features", DOMAIN, days=days[-1:]).reset_index(drop=True)
    unlabelled = pc.field(LABEL).is_null(nan_is_null=True)
    return storage.read_partitions("features", DOMAIN, days=days, where=unlabelled)
