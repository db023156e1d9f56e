"""Point-in-time behavioural features: one snapshot row per active customer as of a day t.

A snapshot at t reads transactions dated on or before t only; `build_customer_features` drops
anything later itself, so handing it more history cannot leak the future. Rows are ordered by
(customer, timestamp, amount) before any sum, so a snapshot is bit-for-bit the same whatever
order or extra (later) rows the input had.

Conventions, stated once here (days are calendar days; t is the snapshot day):
- active customer: first purchase on or before t and last purchase at most `active_days`
  before t; only active customers get a row;
- `recency_days` = t - last purchase day; `tenure_days` = t - first purchase day;
- `frequency` = transactions up to t; `purchase_days` = distinct days with a transaction;
- `monetary_total` = sum of amounts up to t (refunds, if allowed, subtract);
  `monetary_mean` = its mean per transaction;
- `interpurchase_mean_days`, `interpurchase_std_days`: gaps between consecutive distinct
  purchase days; mean needs 2 purchase days, std (ddof=1) needs 3, else NaN;
- `spend_90d`, `frequency_90d`: amount and count in the 90 days ending at t, (t-90, t];
- `spend_trend` = (spend in (t-90, t] - spend in (t-180, t-90]) / (|both| summed), in [-1, 1];
  0 when both are 0 (no change);
- `category_share_<name>`, `channel_share_<name>`: share of the customer's transactions up to t
  in each category / channel seen in the data up to t (0 where none). Names are lower-cased,
  non-alphanumerics turned into "_".
Columns in `LOG_SCALED` are heavy-tailed counts, days and money: the model reads them through
sign(x) * log1p(|x|) before standardising.
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pandas as pd

TREND_DAYS = 90
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
    rows = transactions.loc[transactions["date"] <= t]
    rows = rows.loc[rows["customer_id"].notna()]  # a row without a customer counts for nobody
    # Customers as integer codes in id order: every groupby below keys on them, which is far
    # cheaper than hashing the id strings again for each feature.
    codes, ids = pd.factorize(rows["customer_id"].astype("string"), sort=True)
    # Rows by customer, then time and amount (sums run in this order); missing values last.
    keys = [_sort_key(rows[c]) for c in ("amount", "date", "timestamp") if c in rows.columns]
    order = np.lexsort([*keys, codes])  # the last key is the primary one; stable
    rows = rows.take(order).reset_index(drop=True)
    customer = pd.Series(codes[order], name="customer_code")
    day = rows["date"].astype("datetime64[ns]")
    amount = rows["amount"].astype("float64")
    by_customer = amount.groupby(customer, sort=True)

    first, last = day.groupby(customer, sort=True).agg(["min", "max"]).T.to_numpy()
    frame = pd.DataFrame(index=by_customer.size().index)
    frame["recency_days"] = (t - pd.DatetimeIndex(last)).days.astype("float64")
    frame["tenure_days"] = (t - pd.DatetimeIndex(first)).days.astype("float64")
    frame["frequency"] = by_customer.size().astype("float64")
    frame["monetary_total"] = by_customer.sum()
    frame["monetary_mean"] = frame["monetary_total"] / frame["frequency"]
    frame = frame.join(_interpurchase(customer, day))

    age = (t - day).dt.days
    recent, previous = age < TREND_DAYS, (age >= TREND_DAYS) & (age < 2 * TREND_DAYS)
    frame["spend_90d"] = amount.where(recent, 0.0).groupby(customer, sort=True).sum()
    frame["frequency_90d"] = recent.astype("float64").groupby(customer, sort=True).sum()
    spend_before = amount.where(previous, 0.0).groupby(customer, sort=True).sum()
    change = frame["spend_90d"] - spend_before
    scale = frame["spend_90d"].abs() + spend_before.abs()
    frame["spend_trend"] = (change / scale.where(scale > 0)).fillna(0.0)

    for column in MIX_COLUMNS:
        if column in rows.columns:
            frame = frame.join(_mix(customer.to_numpy(), len(ids), rows[column]))
    frame = frame[frame["recency_days"] <= active_days]
    frame = frame[[*BASE_FEATURES, *[c for c in frame.columns if is_mix_feature(c)]]]
    frame = frame.astype("float64")
    frame.index = pd.Index(np.asarray(ids, dtype=object)[frame.index.to_numpy()], dtype="string")
    frame = frame.rename_axis("customer_id").reset_index()
    frame.insert(0, "date", pd.Series(t, index=frame.index, dtype="datetime64[ns]"))
    return frame


def _sort_key(values: pd.Series) -> np.ndarray:
    """Return `values` as numbers that sort as pandas sorts them, missing values last."""
    if pd.api.types.is_datetime64_any_dtype(values):
        stamps = values.astype("datetime64[ns]").to_numpy()
        return np.where(np.isnat(stamps), np.iinfo(np.int64).max, stamps.view(np.int64))
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def _interpurchase(customer: pd.Series, day: pd.Series) -> pd.DataFrame:
    """Return purchase_days and the mean/std of gaps between consecutive distinct purchase days."""
    days = pd.DataFrame({"customer_id": customer, "date": day}).drop_duplicates()
    gap = days.groupby("customer_id", sort=True)["date"].diff().dt.days.astype("float64")
    gaps = gap.groupby(days["customer_id"], sort=True)
    return pd.DataFrame(
        {
            "purchase_days": days.groupby("customer_id", sort=True).size().astype("float64"),
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
