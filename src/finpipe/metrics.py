"""Market metrics for cross-sectional return forecasts, with their conventions stated here once.

Conventions:
- The label is a forward h-day return (e.g. `forward_return_5d`), not annualised; so is
  every return-valued metric below.
- IC is computed per date across tickers (cross-sectional), then averaged over dates;
  ICIR is mean/std of those per-date values, NOT annualised (multiply by sqrt(periods per year)
  yourself if you want that, and mind that overlapping h-day labels make the per-date values
  autocorrelated).
- Rows whose prediction or label is missing (NaN/inf) are left out of every metric.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd


def _finite_rows(frame: pd.DataFrame, columns: list[str], numeric: list[str]) -> pd.DataFrame:
    data = frame[columns].copy()
    for column in numeric:
        data[column] = pd.to_numeric(data[column]).astype(np.float64)
    mask = np.ones(len(data), dtype=bool)
    for column in numeric:
        mask &= np.isfinite(data[column].to_numpy())
    return data[mask]


def per_date_ic(
    frame: pd.DataFrame,
    prediction: str = "prediction",
    label: str = "forward_return_5d",
    date: str = "date",
    method: Literal["pearson", "spearman"] = "pearson",
) -> pd.Series:
    """Return the cross-sectional correlation of prediction and label on each date.

    `method="pearson"` is the IC; `"spearman"` (Pearson on per-date ranks, ties averaged) is the
    rank IC. Dates with fewer than 3 names, or where prediction or label is constant, have no
    defined correlation and are dropped. Indexed by date, sorted.
    """
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    data = _finite_rows(frame, [date, prediction, label], [prediction, label])
    x, y = data[prediction], data[label]
    if method == "spearman":
        x = x.groupby(data[date]).rank(method="average")
        y = y.groupby(data[date]).rank(method="average")
    values = pd.DataFrame({"x": x, "y": y})
    by_date = values.groupby(data[date], sort=True)
    dx = values["x"] - by_date["x"].transform("mean")
    dy = values["y"] - by_date["y"].transform("mean")
    sums = pd.DataFrame({"xy": dx * dy, "xx": dx * dx, "yy": dy * dy}).groupby(data[date]).sum()
    extremes = by_date.agg(["min", "max"])
    varies = (extremes[("x", "min")] < extremes[("x", "max")]) & (
        extremes[("y", "min")] < extremes[("y", "max")]
    )
    keep = (by_date.size() >= 3) & varies
    ic = sums["xy"] / np.sqrt(sums["xx"] * sums["yy"])
    ic = ic[keep].clip(-1.0, 1.0)
    ic.index.name = date
    return ic.rename("rank_ic" if method == "spearman" else "ic")


def _information_ratio(values: pd.Series) -> float:
    """mean / std (ddof=1) of per-date values; NaN with fewer than 2 dates or zero spread."""
    if len(values) < 2:
        return float("nan")
    std = float(values.std(ddof=1))
    return float(values.mean()) / std if std > 0 else float("nan")


def market_metrics(
    frame: pd.DataFrame,
    *,
    prediction: str = "prediction",
    label: str = "forward_return_5d",
    date: str = "date",
    ticker: str = "ticker",
    quantiles: int = 5,
    cross_sectional: bool = False,
) -> dict[str, float]:
    """Return the headline metrics of predictions against realised forward returns.

    - `ic`, `rank_ic`: mean over dates of the per-date Pearson / Spearman correlation
      (see `per_date_ic`); `icir`, `rank_icir`: their mean / std over dates, not annualised.
    - `directional_accuracy`: share of rows where sign(prediction) == sign(label), over rows
      with a non-zero label (a zero prediction counts as wrong). With `cross_sectional` (for
      a prediction that scores tickers against each other on a date, such as a per-date
      z-score) the label is its deviation from the date's mean label: whether the ticker beat
      that date's average, which a cross-sectional score calls, not whether the market rose,
      which it cannot.
    - `rmse`: root mean squared error of prediction vs label, in label units.
    - `top_minus_bottom`: each date, the `k = n // quantiles` names with the highest prediction
      (top quantile) and the k lowest (bottom); their mean label difference, averaged over dates.
      An equal-weight long-short forward h-day return, not annualised, no costs. Dates with
      fewer names than `quantiles` have no quantile and are skipped. Ties in prediction are
      broken by ticker, so the result is deterministic.
    - `turnover`: for each pair of consecutive dates with a top quantile, the fraction of the
      later date's top names that were not in the earlier date's top; mean over pairs.
    - `n_dates`, `n_rows`: distinct dates and rows evaluated.
    """
    if quantiles < 2:
        raise ValueError(f"quantiles must be >= 2, got {quantiles}")
    data = _finite_rows(frame, [date, ticker, prediction, label], [prediction, label])
    ic = per_date_ic(data, prediction, label, date, "pearson")
    rank_ic = per_date_ic(data, prediction, label, date, "spearman")

    predicted, realised = data[prediction].to_numpy(), data[label].to_numpy()
    direction = realised
    if cross_sectional:
        direction = realised - data.groupby(date)[label].transform("mean").to_numpy()
    called = direction != 0
    directional_accuracy = (
        float(np.mean(np.sign(predicted[called]) == np.sign(direction[called])))
        if called.any()
        else float("nan")
    )
    rmse = float(np.sqrt(np.mean((predicted - realised) ** 2))) if len(data) else float("nan")

    ordered = data.sort_values([date, prediction, ticker], ascending=[True, False, True])
    position = ordered.groupby(date, sort=False).cumcount().to_numpy()
    names = ordered.groupby(date, sort=False)[prediction].transform("size").to_numpy()
    k = names // quantiles
    top = position < k
    bottom = (position >= names - k) & (k >= 1)
    spread = ordered[top].groupby(date)[label].mean() - ordered[bottom].groupby(date)[label].mean()
    top_minus_bottom = float(spread.mean()) if len(spread) else float("nan")

    top_names = ordered.loc[top, [date, ticker]]
    top_names = top_names.assign(period=pd.factorize(top_names[date], sort=True)[0])
    previous = top_names[["period", ticker]].assign(period=top_names["period"] + 1)
    kept = top_names.merge(previous, on=["period", ticker]).groupby("period").size()
    size = top_names.groupby("period").size()
    changed = 1.0 - kept.reindex(size.index, fill_value=0) / size
    turnover = float(changed.iloc[1:].mean()) if len(changed) > 1 else float("nan")

    return {
        "ic": float(ic.mean()) if len(ic) else float("nan"),
        "icir": _information_ratio(ic),
        "rank_ic": float(rank_ic.mean()) if len(rank_ic) else float("nan"),
        "rank_icir": _information_ratio(rank_ic),
        "directional_accuracy": directional_accuracy,
        "rmse": rmse,
        "top_minus_bottom": top_minus_bottom,
        "turnover": turnover,
        "n_dates": int(data[date].nunique()),
        "n_rows": len(data),
    }
