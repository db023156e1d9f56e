"""Synthetic loan books with a known, planted, non-linear PD function, so the oracle AUC is known.

Each row is one application (columns as in `configs/synthetic.toml`): id `loan_id`, an
`application_date` spread evenly over `days` calendar days, seven numeric and four categorical
attributes, and the outcome `defaulted` ("1" default, "0" repaid, empty when the outcome is not
known yet: the applications of the last `open_days` days).

The true log-odds of default (`true_log_odds`) is

    -2.9
    + 3.0 * max(utilisation - 0.6, 0) / 0.4               planted driver: a hinge, 0 below 60%
    + 1.2 * tanh(3 * (debt_to_income - 0.45))              saturating
    + 0.45 * min(delinquencies_2y, 4) * (1 + (utilisation > 0.5))   an interaction
    + 0.6 * ((age - 45) / 15) ** 2 - 0.3                   U-shaped in age
    - 0.35 * ln(income / 40,000)   (income missing: + 0.5 instead)
    - 0.004 * min(months_employed, 120)
    + employment_type: unemployed 1.0, self_employed 0.4, contractor 0.3, retired 0, salaried -0.1
    + purpose: business 0.5, debt_consolidation 0.2, education 0.1, other 0,
      car -0.2, home_improvement -0.2
    + housing: rent 0.25, mortgage 0, own -0.2
    (region and loan_amount carry no risk: features a model should learn to ignore)

and `defaulted` ~ Bernoulli(sigmoid(log-odds)). With the default config 11.5% of labelled
applications default (seeds 0-9: 11.0% to 12.0%). The oracle AUC, the true PD ranked against
the drawn outcomes, is 0.795 for seed 0 and 0.792 on average over seeds 0-9 (0.782 to 0.807);
no model can beat it on average. `utilisation` is the planted driver reason codes should find:
above 0.87 it alone adds 2.0 to the log-odds (1.2% of applications).

`shift` moves the population (not the PD function) for drift tests: utilisation and
debt-to-income up, income down, more renters, by an amount proportional to `shift`.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from finpipe.credit.config import LoanBookConfig
from finpipe.credit.schema import DOMAIN
from finpipe.domains import DemoNight, demo_nights
from finpipe.settings import Settings
from finpipe.storage import Storage, write_bytes_atomic

EMPLOYMENT = {
    "salaried": (0.60, -0.1),
    "self_employed": (0.15, 0.4),
    "contractor": (0.10, 0.3),
    "retired": (0.08, 0.0),
    "unemployed": (0.07, 1.0),
}
PURPOSE = {
    "debt_consolidation": (0.30, 0.2),
    "car": (0.20, -0.2),
    "home_improvement": (0.18, -0.2),
    "education": (0.10, 0.1),
    "business": (0.10, 0.5),
    "other": (0.12, 0.0),
}
HOUSING = {"own": (0.30, -0.2), "mortgage": (0.40, 0.0), "rent": (0.30, 0.25)}
REGIONS = ("north", "south", "east", "west", "central")
INTERCEPT = -2.9
DRIVER = "utilisation"
COLUMNS = [
    "loan_id",
    "application_date",
    "age",
    "income",
    "debt_to_income",
    "utilisation",
    "months_employed",
    "delinquencies_2y",
    "loan_amount",
    "employment_type",
    "purpose",
    "region",
    "housing",
    "defaulted",
]

log = logging.getLogger("finpipe.credit")
ORACLE = "oracle"  # reference/credit/oracle.parquet: a synthetic book's true PDs


@dataclass(frozen=True)
class CreditSyntheticConfig:
    """Size and shape of a synthetic loan book (same config and seed, same book)."""

    applications: int = 20_000  # rows, one application each
    start: str = "2022-01-03"  # the first application date
    days: int = 730  # calendar days the application dates are drawn from
    open_days: int = 30  # the last days' applications have no outcome yet
    income_missing: float = 0.06  # share of applications without an income
    shift: float = 0.0  # population drift (module docstring); 0: none
    seed: int = 0


@dataclass(frozen=True)
class LoanBook:
    """A synthetic book: the delivered rows plus the planted truth behind them."""

    applications: pd.DataFrame  # delivery columns (COLUMNS), typed; defaulted "1"/"0"/None
    true_pd: pd.DataFrame  # loan_id, application_date, true_pd, true_log_odds, driver_log_odds

    def oracle_auc(self, ids=None) -> float:
        """AUC of the true PD against the drawn outcomes (labelled rows, or those of `ids`)."""
        joined = self.applications[["loan_id", "defaulted"]].merge(self.true_pd, on="loan_id")
        joined = joined[joined["defaulted"].notna()]
        if ids is not None:
            joined = joined[joined["loan_id"].isin(set(ids))]
        return float(roc_auc_score(joined["defaulted"].astype(int), joined["true_pd"]))


def true_log_odds(book: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Return (log-odds of default, the planted driver's part of it) of each application."""
    u = book["utilisation"].to_numpy(float)
    driver = 3.0 * np.maximum(u - 0.6, 0.0) / 0.4
    income = book["income"].to_numpy(float)
    income_term = np.where(np.isnan(income), 0.5, -0.35 * np.log(np.maximum(income, 1.0) / 40_000))
    delinquencies = np.minimum(book["delinquencies_2y"].to_numpy(float), 4)
    z = (
        INTERCEPT
        + driver
        + 1.2 * np.tanh(3 * (book["debt_to_income"].to_numpy(float) - 0.45))
        + 0.45 * delinquencies * (1 + (u > 0.5))
        + 0.6 * ((book["age"].to_numpy(float) - 45) / 15) ** 2
        - 0.3
        + income_term
        - 0.004 * np.minimum(book["months_employed"].to_numpy(float), 120)
        + book["employment_type"].map({k: v[1] for k, v in EMPLOYMENT.items()}).to_numpy(float)
        + book["purpose"].map({k: v[1] for k, v in PURPOSE.items()}).to_numpy(float)
        + book["housing"].map({k: v[1] for k, v in HOUSING.items()}).to_numpy(float)
    )
    return z, driver


def generate_loan_book(config: CreditSyntheticConfig | None = None) -> LoanBook:
    """Return a synthetic loan book drawn from the documented PD function."""
    config = config or CreditSyntheticConfig()
    rng = np.random.default_rng(config.seed)
    n, s = config.applications, config.shift
    start = pd.Timestamp(config.start)
    offsets = np.sort(rng.integers(0, config.days, n))
    dates = start + pd.to_timedelta(offsets, unit="D")

    def choose(table: dict, tilt: dict | None = None) -> np.ndarray:
        weights = np.array([v[0] for v in table.values()])
        if tilt:
            weights = weights * np.array([np.exp(s * tilt.get(k, 0.0)) for k in table])
        return rng.choice(list(table), size=n, p=weights / weights.sum())

    income = np.round(np.exp(rng.normal(10.6 - 0.25 * s, 0.5, n)), -2)
    income[rng.random(n) < config.income_missing] = np.nan
    book = pd.DataFrame(
        {
            "loan_id": [f"L{config.seed:02d}{i:07d}" for i in range(n)],
            "application_date": dates.astype("datetime64[ns]"),
            "age": rng.integers(21, 76, n).astype(float),
            "income": income,
            "debt_to_income": np.round(np.minimum(rng.beta(2 + s, 5, n) * 1.2, 5.0), 4),
            "utilisation": np.round(rng.beta(1.5 + 1.5 * s, 2.5, n), 4),
            "months_employed": np.minimum(np.round(rng.exponential(60, n)), 480).astype(float),
            "delinquencies_2y": rng.poisson(0.3, n).astype(float),
            "loan_amount": np.round(np.exp(rng.normal(9.3, 0.7, n)), -1),
            "employment_type": choose(EMPLOYMENT),
            "purpose": choose(PURPOSE),
            "region": rng.choice(REGIONS, size=n),
            "housing": choose(HOUSING, {"rent": 1.0}),
        }
    )
    log_odds, driver = true_log_odds(book)
    pd_true = 1.0 / (1.0 + np.exp(-log_odds))
    outcome = (rng.random(n) < pd_true).astype(int).astype(str).astype(object)
    still_open = offsets >= config.days - config.open_days
    outcome[still_open] = None
    book["defaulted"] = pd.array(outcome, dtype="string")
    truth = pd.DataFrame(
        {
            "loan_id": book["loan_id"],
            "application_date": book["application_date"],
            "true_pd": pd_true,
            "true_log_odds": log_odds,
            "driver_log_odds": driver,
        }
    )
    return LoanBook(applications=book[COLUMNS], true_pd=truth)


def write_deliveries(book: pd.DataFrame, folder: Path, nightly_files: int = 3) -> list[Path]:
    """Write the book as a lender would deliver it; return [history, night 1, night 2, ...].

    The last `nightly_files` application dates each become `credit_<date>.csv` (that day's
    new applications, outcome empty); everything before is `credit_history_<first>_<last>.csv`.
    """
    folder = Path(folder)
    dates = sorted(book["application_date"].unique())
    nightly = dates[-nightly_files:] if nightly_files else []
    history = book[~book["application_date"].isin(nightly)]
    first, last = (
        pd.Timestamp(history["application_date"].min()).date(),
        pd.Timestamp(history["application_date"].max()).date(),
    )
    paths = [_write_csv(history, folder / f"credit_history_{first}_{last}.csv")]
    for day in nightly:
        rows = book[book["application_date"] == day].assign(defaulted=pd.NA)
        paths.append(_write_csv(rows, folder / f"credit_{pd.Timestamp(day).date()}.csv"))
    return paths


def _write_csv(rows: pd.DataFrame, path: Path) -> Path:
    out = rows.assign(application_date=rows["application_date"].dt.strftime("%Y-%m-%d"))
    write_bytes_atomic(path, out.to_csv(index=False).encode())
    return path


def delivery_day(path: Path) -> dt.date:
    """Return the date of a nightly file written by `write_deliveries`."""
    return dt.date.fromisoformat(Path(path).stem.removeprefix("credit_"))


# -- the true PDs and the demo ----------------------------------------------------------
def write_oracle(storage: Storage, truth: pd.DataFrame) -> str:
    """Keep a synthetic book's true PDs (id, true_pd) beside the data, for oracle-AUC reporting."""
    return storage.write_reference(DOMAIN, ORACLE, truth)


def plan_credit_demo(
    settings: Settings,
    *,
    book: LoanBookConfig,
    applications: int = 30_000,
    nights: int = 3,
    seed: int = 7,
) -> list[DemoNight]:
    """Write a synthetic loan book as a lender's deliveries (a history file, then `nights` days
    of new applications) and its true PDs; return the nights the demo runs (`demo_nights`).

    Runs only with the synthetic loan-book config (the files follow it).
    """
    if book.name != "synthetic":
        log.warning(
            "credit demo skipped: it needs the synthetic loan-book config, not %s", book.source
        )
        return []
    generated = generate_loan_book(CreditSyntheticConfig(applications=applications, seed=seed))
    drop = settings.local_home / "vendor_drop" / DOMAIN
    files = write_deliveries(generated.applications, drop, nightly_files=nights)
    write_oracle(Storage(settings.home), generated.true_pd.rename(columns={"loan_id": "id"}))
    return demo_nights(files, lambda daily: delivery_day(daily).isoformat())
