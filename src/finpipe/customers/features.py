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
    order = [c for c in ("customer_id", "timestamp", "date", "amount") if c in rows.columns]
    rows = rows.sort_values(order, kind="mergesort").reset_index(drop=True)
    customer = rows["customer_id"].astype("string")
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
            frame = frame.join(_mix(customer, rows[column]))
    frame = frame[frame["recency_days"] <= active_days]
    frame = frame[[*BASE_FEATURES, *[c for c in frame.columns if is_mix_feature(c)]]]
    frame = frame.astype("float64").rename_axis("customer_id").reset_index()
    frame["customer_id"] = frame["customer_id"].astype("string")
    frame.insert(0, "date", pd.Series(t, index=frame.index, dtype="datetime64[ns]"))
    return frame


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


def _mix(customer: pd.Series, values: pd.Series) -> pd.DataFrame:
    """Return each customer's share of transactions per value of a category-like column."""
    text = values.astype("string").fillna("unknown")
    names = text.map({v: mix_feature_name(str(values.name), v) for v in text.unique()})
    counts = pd.crosstab(customer.to_numpy(), names.to_numpy()).astype("float64")
    counts.index = counts.index.astype("string")
    shares = counts.div(counts.sum(axis=1), axis=0)
    return shares[sorted(shares.columns)]
