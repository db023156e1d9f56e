"""Synthetic transactions with planted customer segments (the ground truth) and real-world shape.

Each customer belongs to one planted segment, which fixes how often they buy, how much, where
and in which categories, and when they start and stop:

| segment    | share | days between buys | median amount | first purchase | churn                |
| ---------- | ----- | ----------------- | ------------- | -------------- | -------------------- |
| loyal      | 0.20  | 6                 | $55           | first 35%      | never                |
| regular    | 0.30  | 24                | $35           | first 45%      | never                |
| big_ticket | 0.15  | 75                | $320          | first 45%      | never                |
| newcomer   | 0.15  | 12                | $45           | last 80 days   | never                |
| lapsed     | 0.20  | 20                | $40           | first 30%      | 120-330 d before end |

(days between buys: the segment's mean; first purchase: a share of the generated period from
its start, or days before its end.)

Realism: amounts are log-normal (sigma 0.6-0.9) with a 2% chance of a Pareto(alpha 1.5)
"splurge" multiplier, so spend is heavy-tailed; gaps between purchases are Gamma(shape 2)
with a per-customer rate multiplier (log-normal, sigma 0.3), so customers of one segment differ;
churn is an event at a random day for lapsed customers, after which they never buy again.
Categories and channels are drawn per transaction from each customer's own Dirichlet mix
around the segment's profile.

Planted labels describe the customers at the end of the generated period (a lapsed customer
looked like a regular before churning); compare them with snapshots near that end.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from finpipe.customers.config import load_customers_config
from finpipe.customers.schema import DOMAIN
from finpipe.domains import DemoNight, demo_nights
from finpipe.errors import ConfigError
from finpipe.settings import Settings
from finpipe.storage import Storage

CATEGORIES = ("groceries", "fashion", "electronics", "home & garden", "travel")
CHANNELS = ("web", "app", "store")

log = logging.getLogger("finpipe.customers")
PLANTED = "segments"  # reference/customers/segments.parquet: a synthetic log's truth


@dataclass(frozen=True)
class PlantedSegment:
    """How customers of one planted segment behave."""

    name: str
    share: float
    mean_gap_days: float
    median_amount: float
    amount_sigma: float
    category_profile: tuple[float, ...]  # Dirichlet concentration over CATEGORIES
    channel_profile: tuple[float, ...]  # over CHANNELS
    start: tuple[float, float]  # first purchase, as fractions of the period (0 = first day)
    churn_days_before_end: tuple[int, int] | None = None


SEGMENTS = (
    PlantedSegment("loyal", 0.20, 6, 55, 0.6, (12, 3, 1, 3, 0.5), (2, 6, 4), (0.0, 0.35)),
    PlantedSegment("regular", 0.30, 24, 35, 0.7, (4, 6, 1.5, 4, 0.5), (5, 2, 5), (0.0, 0.45)),
    PlantedSegment("big_ticket", 0.15, 75, 320, 0.9, (0.5, 2, 8, 3, 7), (7, 1, 3), (0.0, 0.45)),
    PlantedSegment("newcomer", 0.15, 12, 45, 0.7, (4, 8, 2, 1, 1), (3, 9, 1), (-80, 0)),
    PlantedSegment("lapsed", 0.20, 20, 40, 0.7, (5, 5, 2, 3, 1), (4, 3, 5), (0.0, 0.3), (120, 330)),
)


@dataclass(frozen=True)
class CustomersSyntheticConfig:
    """Size and seed of a synthetic transaction log."""

    customers: int = 1500
    days: int = 730
    end: dt.date = dt.date(2024, 6, 28)
    seed: int = 0
    segments: tuple[PlantedSegment, ...] = field(default=SEGMENTS)


@dataclass(frozen=True)
class SyntheticCustomers:
    """Generated transactions (contract column names) and each customer's planted segment."""

    transactions: pd.DataFrame  # customer_id, timestamp, date, amount, category, channel
    segments: pd.DataFrame  # customer_id, segment (name), segment_number


def generate_customer_transactions(config: CustomersSyntheticConfig) -> SyntheticCustomers:
    """Return a seeded transaction log with planted segments (same config, same frame)."""
    rng = np.random.default_rng(config.seed)
    start_day = pd.Timestamp(config.end) - pd.Timedelta(days=config.days - 1)
    shares = np.array([s.share for s in config.segments])
    labels = rng.choice(len(config.segments), size=config.customers, p=shares / shares.sum())
    width = len(str(config.customers))
    parts = []
    for number in range(config.customers):
        segment = config.segments[labels[number]]
        parts.append(
            _customer_transactions(rng, segment, f"C{number:0{width}d}", config.days, start_day)
        )
    transactions = pd.concat(parts, ignore_index=True)
    transactions = transactions.sort_values(["timestamp", "customer_id"], kind="mergesort")
    truth = pd.DataFrame(
        {
            "customer_id": pd.array(
                [f"C{n:0{width}d}" for n in range(config.customers)], dtype="string"
            ),
            "segment": [config.segments[i].name for i in labels],
            "segment_number": labels.astype("int64"),
        }
    )
    return SyntheticCustomers(transactions.reset_index(drop=True), truth)


def _customer_transactions(
    rng: np.random.Generator, segment: PlantedSegment, customer: str, days: int, first: pd.Timestamp
) -> pd.DataFrame:
    lo, hi = segment.start
    # A negative range is days before the end, a positive one a share of the period.
    begin = max(0.0, days - 1 + rng.uniform(lo, hi)) if lo < 0 else rng.uniform(lo, hi) * days
    stop = float(days)
    if segment.churn_days_before_end is not None:
        # A short log may end before the churn window: the customer still buys once.
        stop = max(days - rng.uniform(*segment.churn_days_before_end), begin + 1.0)
    mean_gap = segment.mean_gap_days * rng.lognormal(0.0, 0.3)
    # Enough Gamma(2) gaps to cover the customer's life; cut at the stop day.
    n = int((stop - begin) / mean_gap * 2) + 4
    moments = begin + np.concatenate([[0.0], np.cumsum(rng.gamma(2.0, mean_gap / 2.0, n))])
    moments = moments[moments < stop]
    count = len(moments)
    amount = segment.median_amount * rng.lognormal(0.0, segment.amount_sigma, count)
    splurge = rng.random(count) < 0.02
    amount[splurge] *= 1.0 + rng.pareto(1.5, splurge.sum())
    category_mix = rng.dirichlet(segment.category_profile)
    channel_mix = rng.dirichlet(segment.channel_profile)
    day = np.floor(moments).astype(int)
    seconds = rng.integers(8 * 3600, 22 * 3600, count)
    timestamp = first + pd.to_timedelta(day, unit="D") + pd.to_timedelta(seconds, unit="s")
    return pd.DataFrame(
        {
            "customer_id": pd.array([customer] * count, dtype="string"),
            "timestamp": timestamp.astype("datetime64[ns]"),
            "date": timestamp.normalize().astype("datetime64[ns]"),
            "amount": np.round(amount, 2),
            "category": pd.array(rng.choice(CATEGORIES, count, p=category_mix), dtype="string"),
            "channel": pd.array(rng.choice(CHANNELS, count, p=channel_mix), dtype="string"),
        }
    )


VENDOR_COLUMNS = {  # contract column -> the name in the files (see configs/synthetic.toml)
    "customer_id": "Customer ID",
    "timestamp": "Transaction Time",
    "amount": "Amount",
    "category": "Category",
    "channel": "Channel",
}


def write_vendor_files(
    transactions: pd.DataFrame, folder: Path, daily_files: int = 3
) -> list[Path]:
    """Write the log as a vendor would: one history CSV.gz, then one CSV per last day.

    Returns the paths in delivery order: `customers_history_<first>_<last>.csv.gz`, then
    `customers_<day>.csv` for each of the last `daily_files` days that have transactions.
    Columns are named as in `configs/synthetic.toml`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    days = sorted(transactions["date"].unique())
    daily = [pd.Timestamp(d) for d in days[-daily_files:]] if daily_files else []
    history = transactions[~transactions["date"].isin(daily)]
    out = history[list(VENDOR_COLUMNS)].rename(columns=VENDOR_COLUMNS)
    first, last = history["date"].min().date(), history["date"].max().date()
    path = folder / f"customers_history_{first}_{last}.csv.gz"
    out.to_csv(path, index=False, date_format="%Y-%m-%d %H:%M:%S")
    paths = [path]
    for day in daily:
        rows = transactions[transactions["date"] == day]
        path = folder / f"customers_{day.date()}.csv"
        rows[list(VENDOR_COLUMNS)].rename(columns=VENDOR_COLUMNS).to_csv(
            path, index=False, date_format="%Y-%m-%d %H:%M:%S"
        )
        paths.append(path)
    return paths


# -- the planted segments and the demo ------------------------------------------------------
def write_planted_segments(storage: Storage, planted: pd.DataFrame) -> str:
    """Keep a synthetic log's planted segments (`SyntheticCustomers.segments`: customer_id,
    segment, segment_number) beside the data, for ARI-vs-truth reporting."""
    return storage.write_reference(DOMAIN, PLANTED, planted)


def plan_customers_demo(
    settings: Settings, *, customers: int = 1500, days: int = 730, nights: int = 3, seed: int = 7
) -> list[DemoNight]:
    """Write a synthetic transaction log as vendor files (a history file, then `nights` daily
    files) and its planted segments; return the nights the demo runs (`demo_nights`)."""
    mapping = load_customers_config(settings.customers_config).columns.delivered()
    if mapping != VENDOR_COLUMNS:
        raise ConfigError(
            f"finpipe demo writes synthetic transaction files, which customers config "
            f"{settings.customers_config!r} does not describe; unset FINPIPE_CUSTOMERS_CONFIG "
            "(or set it to synthetic) to run the demo"
        )
    generated = generate_customer_transactions(
        CustomersSyntheticConfig(customers=customers, days=days, seed=seed)
    )
    drop = settings.local_home / "vendor_drop" / DOMAIN
    files = write_vendor_files(generated.transactions, drop, daily_files=nights)
    write_planted_segments(Storage(settings.home), generated.segments)
    log.info("generated %s transactions in %s", len(generated.transactions), drop)
    return demo_nights(files, lambda daily: daily.stem.removeprefix("customers_"))
