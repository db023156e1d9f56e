"""Point-in-time behavioural features: one snapshot row per active customer as of a day t.

A snapshot at t reads transactions dated on or before t only; `build_customer_features` drops
anything later itself, so handing it more history cannot leak the future. Rows are ordered by
(customer, day, timestamp, amount) before any sum, so a snapshot is bit-for-bit the same whatever
order or extra (later) rows the input had.

Conventions, stated once here (days are calendar days; t is the snapshot day):
- active customer: first purchase on or before t and last purchase at most `active_days`
  before t; only active customers get a row;
- `recency_days` = t - last purchase day; `tenure_days` = t - first purchase day;
- `frequency` = purchases up to t; `purchase_days` = distinct days with a purchase;
- a purchase is a transaction with an amount >= 0 ($0 ones are visits that add no spend); a
  refund (a negative amount, where the config allows them) is no purchase: it counts in no
  date, count or share below, only in the money ones, from which its amount is taken off;
- `monetary_total` = sum of amounts up to t (refunds subtract); `monetary_mean` = it divided by
  `frequency`;
- `interpurchase_mean_days`, `interpurchase_std_days`: gaps between consecutive distinct
  purchase days; mean needs 2 purchase days, std (ddof=1) needs 3, else NaN;
- `spend_90d`, `frequency_90d`: amount and purchases in the 90 days ending at t, (t-90, t];
- `spend_trend` = (spend in (t-90, t] - spend in (t-180, t-90]) / (|both| summed), in [-1, 1];
  0 when both are 0 (no change);
- `category_share_<name>`, `channel_share_<name>`: share of the customer's purchases up to t
  in each category / channel seen in the data up to t (0 where none), a missing value counted
  as "unknown"; none of a column's shares when no purchase up to t has a value in it (a column
  first delivered later changes nothing at t). Names are lower-cased, non-alphanumerics turned
  into "_".
Columns in `LOG_SCALED` are heavy-tailed counts, days and money: the model reads them through
sign(x) * log1p(|x|) before standardising.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Collection, Mapping

import numpy as np
import pandas as pd

from finpipe.customers.schema import DOMAIN, OPTIONAL_COLUMNS
from finpipe.features import (
    FeatureUpdate,
    history_fingerprints,
    record_inputs,
    recorded_inputs,
)
from finpipe.ingest import BATCH_COLUMN
from finpipe.storage import Storage, as_day

TREND_DAYS = 90
NS_PER_DAY = 86_400 * 10**9
BASE_FEATURES = (
    "recency_days",
    "tenure_days",
    "frequency",
    "purchase_days",
    "monetary_total",
    "monetary_mean",
    "interpurchase_mean_days",
    "interpurchase_std_days",
    "spend_90d",
    "frequency_90d",
    "spend_trend",
)
LOG_SCALED = tuple(f for f in BASE_FEATURES if f != "spend_trend")
MIX_COLUMNS = ("category", "channel")
MIX_PREFIXES = tuple(f"{column}_share_" for column in MIX_COLUMNS)
_SLUG = re.compile(r"[^0-9a-z]+")


def mix_feature_name(column: str, value: str) -> str:
    """Return the feature name of a category/channel value, e.g. `category_share_home_garden`."""
    slug = _SLUG.sub("_", str(value).strip().lower()).strip("_") or "blank"
    return f"{column}_share_{slug}"


def is_mix_feature(name: str) -> bool:
    return name.startswith(MIX_PREFIXES)


def build_customer_features(
    transactions: pd.DataFrame, as_of: dt.date | str | pd.Timestamp, *, active_days: int
) -> pd.DataFrame:
    """Return the snapshot at `as_of`: `date`, `customer_id` and the features, one row per
    active customer, sorted by customer_id.

    `transactions` has customer_id, date, amount and optionally timestamp, category, channel;
    rows dated after `as_of` are ignored. Counts are float64 like every feature, so snapshots
    of different days share one schema.
    """
    t = pd.Timestamp(as_of).normalize()
    keep = (transactions["date"] <= t) & transactions["customer_id"].notna()
    # (a row without a customer counts for nobody)
    rows = transactions if keep.all() else transactions.loc[keep]
    refund = rows["amount"].to_numpy(dtype="float64", na_value=np.nan) < 0
    if refund.any():
        return _with_refunds(rows, refund, t, active_days)
    return _snapshot(rows, t, active_days)


def _with_refunds(
    rows: pd.DataFrame, refund: np.ndarray, t: pd.Timestamp, active_days: int
) -> pd.DataFrame:
    """Return the snapshot of `rows` that hold refunds: everything from the purchases alone
    (a customer who only refunded is not active), then the money features from all rows."""
    snapshot = _snapshot(rows.loc[~refund], t, active_days)
    every = _snapshot(rows, t, active_days=np.iinfo(np.int64).max).set_index("customer_id")
    money = every.loc[snapshot["customer_id"], ["monetary_total", "spend_90d", "spend_trend"]]
    for column in money.columns:
        snapshot[column] = money[column].to_numpy()
    snapshot["monetary_mean"] = snapshot["monetary_total"] / snapshot["frequency"]
    return snapshot


def _snapshot(rows: pd.DataFrame, t: pd.Timestamp, active_days: int) -> pd.DataFrame:
    """`build_customer_features` of rows dated on or before t, each with a customer."""
    # Customers as integer codes in id order: every aggregate below keys on them, which is far
    # cheaper than hashing the id strings again for each feature.
    codes, ids = pd.factorize(rows["customer_id"].astype("string"), sort=True)
    customers = len(ids)
    day = _day_numbers(rows["date"])
    # One key for (customer, day): rows by customer, then day, time and amount (sums run in
    # this order), missing values last. Only the columns summed or dated are reordered.
    span = int(day.max() - day.min()) + 1 if len(day) else 1
    customer_day = codes.astype(np.int64) * span + (day - (day.min() if len(day) else 0))
    stamps = _sort_key(rows["timestamp"]) if "timestamp" in rows.columns else None
    order = _row_order(customer_day, day, stamps, _sort_key(rows["amount"]))
    customer, day, customer_day = codes[order], day[order], customer_day[order]
    amount = pd.Series(rows["amount"].to_numpy(dtype="float64", na_value=np.nan)[order])
    by_customer = amount.groupby(customer, sort=True)

    # Every code in [0, customers) has rows, sorted: each customer's rows are one run.
    starts = np.searchsorted(customer, np.arange(customers))
    ends = np.searchsorted(customer, np.arange(customers), side="right") - 1
    today = _day_numbers(pd.Series([t]))[0]
    frame = pd.DataFrame(index=pd.RangeIndex(customers))
    frame["recency_days"] = (today - day[ends]).astype("float64")
    frame["tenure_days"] = (today - day[starts]).astype("float64")
    frame["frequency"] = (ends - starts + 1).astype("float64")
    frame["monetary_total"] = by_customer.sum()
    frame["monetary_mean"] = frame["monetary_total"] / frame["frequency"]
    frame = frame.join(_interpurchase(customer, day, customer_day, customers))

    age = today - day
    recent, previous = age < TREND_DAYS, (age >= TREND_DAYS) & (age < 2 * TREND_DAYS)
    frame["spend_90d"] = amount.where(recent, 0.0).groupby(customer, sort=True).sum()
    frame["frequency_90d"] = np.bincount(customer, weights=recent, minlength=customers)
    spend_before = amount.where(previous, 0.0).groupby(customer, sort=True).sum()
    change = frame["spend_90d"] - spend_before
    scale = frame["spend_90d"].abs() + spend_before.abs()
    frame["spend_trend"] = (change / scale.where(scale > 0)).fillna(0.0)

    for column in MIX_COLUMNS:
        # Shares are counts: the rows' order does not matter. A column without a value up to
        # t was not delivered yet (read beside later days that have it, it is empty here): no
        # shares, not an "unknown" share of 1.0 that only later deliveries would have implied.
        if column in rows.columns and rows[column].notna().any():
            frame = frame.join(_mix(codes, customers, rows[column]))
    frame = frame[frame["recency_days"] <= active_days]
    frame = frame[[*BASE_FEATURES, *[c for c in frame.columns if is_mix_feature(c)]]]
    frame = frame.astype("float64")
    frame.index = pd.Index(np.asarray(ids, dtype=object)[frame.index.to_numpy()], dtype="string")
    frame = frame.rename_axis("customer_id").reset_index()
    frame.insert(0, "date", pd.Series(t, index=frame.index, dtype="datetime64[ns]"))
    return frame


def _day_numbers(dates: pd.Series) -> np.ndarray:
    """Return the calendar days of `dates` (no missing ones) as int64 days since 1970-01-01."""
    stamps = dates.astype("datetime64[ns]").to_numpy().view(np.int64)
    return stamps // NS_PER_DAY


def _row_order(
    customer_day: np.ndarray, day: np.ndarray, stamps: np.ndarray | None, amount: np.ndarray
) -> np.ndarray:
    """Return the stable order of rows by (customer_day, stamps, amount), as `np.lexsort`.

    A full lexsort spends most of its time on the amounts, which only break ties. When every
    timestamp falls on its row's day (always, once validated) the rows are sorted on one key,
    (customer, day, second of the day), and only the rows that tie on it are sorted again by
    timestamp and amount: the same order, in about a third of the time.
    """
    key = customer_day
    if stamps is not None:
        second = (stamps - day * NS_PER_DAY) // 10**9
        if len(second) and not ((second >= 0) & (second < 86_400)).all():
            return np.lexsort([amount, stamps, customer_day])  # the last key is the primary one
        key = customer_day * 86_400 + second
    order = np.argsort(key, kind="stable")
    ranked = key[order]
    same = ranked[1:] == ranked[:-1]
    tied = np.zeros(len(key), dtype=bool)
    tied[1:] |= same
    tied[:-1] |= same
    if tied.any():
        at = np.flatnonzero(tied)
        rows = order[at]
        keys = [amount[rows], *([] if stamps is None else [stamps[rows]]), ranked[at]]
        order[at] = rows[np.lexsort(keys)]  # each run of ties stays in place, sorted within
    return order


def _sort_key(values: pd.Series) -> np.ndarray:
    """Return `values` as numbers that sort as pandas sorts them, missing values last."""
    if pd.api.types.is_datetime64_any_dtype(values):
        stamps = values.astype("datetime64[ns]").to_numpy()
        return np.where(np.isnat(stamps), np.iinfo(np.int64).max, stamps.view(np.int64))
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def _interpurchase(
    customer: np.ndarray, day: np.ndarray, customer_day: np.ndarray, customers: int
) -> pd.DataFrame:
    """Return purchase_days and the mean/std of gaps between consecutive distinct purchase days.

    The arrays are the rows sorted by (customer, day); `customer_day` is one key for the pair.
    """
    distinct = np.ones(len(day), dtype=bool)
    distinct[1:] = customer_day[1:] != customer_day[:-1]
    owner, purchase_day = customer[distinct], day[distinct]
    gap = np.empty(len(purchase_day), dtype="float64")
    gap[1:] = np.diff(purchase_day)
    gap[np.searchsorted(owner, np.arange(customers))] = np.nan  # a customer's first day
    gaps = pd.Series(gap).groupby(owner, sort=True)
    return pd.DataFrame(
        {
            "purchase_days": np.bincount(owner, minlength=customers).astype("float64"),
            "interpurchase_mean_days": gaps.mean(),
            "interpurchase_std_days": gaps.std(ddof=1),
        }
    )


def _mix(customer: np.ndarray, customers: int, values: pd.Series) -> pd.DataFrame:
    """Return each customer's share of transactions per value of a category-like column.

    `customer` holds each row's customer code in [0, customers); the result is indexed by code.
    """
    text = values.astype("string").fillna("unknown")
    columns, labels = pd.factorize(text, sort=True)
    names = [mix_feature_name(str(values.name), label) for label in labels]
    # A customers x values count matrix from one bincount (a crosstab aggregates each cell in
    # Python: seconds for a few hundred thousand customers).
    cells = np.bincount(customer * len(names) + columns, minlength=customers * len(names))
    counts = pd.DataFrame(cells.reshape(customers, len(names)).astype("float64"), columns=names)
    if len(set(names)) < len(names):  # two values with one feature name ("A b", "a_b") add up
        counts = counts.T.groupby(level=0).sum().T
    shares = counts.div(counts.sum(axis=1), axis=0)
    return shares[sorted(shares.columns)]


def snapshots_needing_update(
    storage: Storage,
    as_of: dt.date,
    validated: Mapping[dt.date, str],
    rebuild: bool = False,
    also: Collection[dt.date] = (),
) -> list[dt.date]:
    """Return the snapshot days up to `as_of` to (re)compute, given the fingerprints of the
    validated partitions now (`Storage.partition_fingerprints`).

    `as_of` itself when its snapshot is missing, and every snapshot up to it built from other
    validated data than the partitions on or before its day hold now: a correction or a late
    delivery of day d changes the history of every snapshot from d on (their fingerprints
    differ, `finpipe.features`), so each is rebuilt and the predictions scored from it are
    named stale. With `rebuild`, every existing snapshot too. And each of `also` (earlier
    dates a run processes: a backfill's, a night's catch-up) that has transactions and no
    snapshot: snapshots are built for the nights that run, not for every delivered day.
    """
    existing = storage.partition_dates("features", DOMAIN, end=as_of)
    missing = {as_of, *(day for day in also if day in validated and day <= as_of)}
    if rebuild:
        return sorted({*existing, *missing})
    built_from = recorded_inputs(storage, DOMAIN)
    now = history_fingerprints(validated, existing)
    stale = [day for day in existing if built_from.get(day.isoformat()) != now[day]]
    return sorted({*stale, *(missing - set(existing))})


def update_customer_features(
    storage: Storage,
    as_of: dt.date | str,
    *,
    active_days: int,
    rebuild: bool = False,
    progress: Callable[[str], None] | None = None,
    also: Collection[dt.date] = (),
    mapped: Collection[str] = OPTIONAL_COLUMNS,
) -> FeatureUpdate:
    """Compute and publish the feature snapshot as of `as_of` and those of `also` that have
    transactions and none (`snapshots_needing_update`), and rebuild the older ones whose
    history changed since they were built (every older one with `rebuild`), from one read
    of the history.

    A snapshot at t reads every validated transaction dated on or before t: lifetime features
    (tenure, frequency) need the whole history.

    The category and channel shares of a history without that column are not built: reported
    as `unsourced_features` when the column is not among `mapped` (the contract fields the
    source's config maps: it never delivers it, nothing to act on), as `skipped_features` (a
    warning) when it is. A delivery that lacks a mapped column is refused at ingest, so a
    column the source has delivered does not silently go missing here.
    """
    started = time.perf_counter()
    as_of = as_day(as_of)
    update = FeatureUpdate()
    # Fingerprint the history before reading it: if it changes underneath, the snapshot's
    # record is stale (and it is rebuilt next time) rather than wrongly fresh.
    validated = storage.partition_fingerprints("validated", DOMAIN)
    todo = snapshots_needing_update(storage, as_of, validated, rebuild, also)
    if not todo:
        return update
    built_from = history_fingerprints(validated, todo)
    history = storage.read_partitions("validated", DOMAIN, end=max(todo))
    history = history.drop(columns=[BATCH_COLUMN], errors="ignore")
    for column in OPTIONAL_COLUMNS:
        if column in history.columns:
            continue
        if column in mapped:
            update.skipped_features[f"{column}_share_*"] = f"no {column} column delivered"
        else:
            update.unsourced_features[f"{column}_share_*"] = (
                f"the source's config maps no {column} column"
            )
    existing = set(storage.partition_dates("features", DOMAIN))
    for day in todo:
        snapshot = build_customer_features(history, day, active_days=active_days)
        storage.write_partition("features", DOMAIN, day, snapshot)
        record_inputs(storage, DOMAIN, {day.isoformat(): built_from[day]})
        update.add(day, len(snapshot), rebuilt=day in existing)
        if progress:
            progress(f"features: snapshot {day} with {len(snapshot):,} active customers")
    update.seconds = round(time.perf_counter() - started, 3)
    return update
