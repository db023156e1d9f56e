"""Figures logged to MLflow: each function takes plain data and returns a matplotlib Figure.

pyplot is imported on a figure's first use, on the headless backend (batch jobs have no
display): a process that draws nothing (scoring, a command that refuses, a Dask worker) does not
pay its 0.4 s import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from finpipe import portfolio

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def subplots(*args: Any, **kwargs: Any) -> tuple[Figure, Any]:
    """Return pyplot's `subplots(*args, **kwargs)` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def learning_curve(history: list[dict], title: str) -> Figure:
    """Return train and validation loss by epoch, with the best epoch marked."""
    fig, ax = subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["validation_loss"] for h in history], label="validation")
    if history:
        best = min(history, key=lambda h: h["validation_loss"])
        ax.axvline(best["epoch"], color="grey", linestyle=":", label=f"best epoch {best['epoch']}")
    ax.set(xlabel="epoch", ylabel="loss (MSE)", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def ic_by_date(per_date_ic: pd.Series, title: str, window: int = 20) -> Figure:
    """Return the per-date information coefficient with its rolling mean."""
    fig, ax = subplots(figsize=(7, 3.5))
    ax.bar(per_date_ic.index, per_date_ic.values, width=1.0, color="#9ecae1", label="IC")
    ax.plot(
        per_date_ic.index,
        per_date_ic.rolling(window, min_periods=1).mean(),
        color="#08519c",
        label=f"{window}-date mean",
    )
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set(ylabel="IC (Pearson, cross-section)", title=title)
    ax.legend(loc="upper left")  # a fixed place: "best" searches every point of the lines
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def return_by_decile(
    frame: pd.DataFrame, prediction: str, label: str, title: str, buckets: int = 10
) -> Figure:
    """Return mean `label` by prediction decile (1 = lowest prediction), as the backtest's
    decile table defines it (`finpipe.portfolio.return_by_decile`): deciles within each date,
    each date's decile means averaged so every date counts once, a date with fewer names than
    deciles left out. `frame` has date, ticker and the two columns."""
    rows = frame[["date", "ticker", prediction, label]]
    means = portfolio.return_by_decile(
        rows[["date", "ticker", prediction]].rename(columns={prediction: "prediction"}),
        rows[["date", "ticker", label]].rename(columns={label: "forward_return"}),
        buckets,
    )
    return decile_bars(means, title, ylabel=f"mean {label}")


def cumulative_returns(panels: Mapping[str, Mapping[str, pd.Series]], title: str) -> Figure:
    """Return one panel per entry of `panels`, each line the cumulative sum of a daily return
    series (arithmetic, as `finpipe.portfolio` annualises)."""
    fig, axes = subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    for ax, (name, lines) in zip(axes[:, 0], panels.items(), strict=True):
        for label, daily in lines.items():
            ax.plot(daily.index, daily.cumsum().values, label=label)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set(ylabel="cumulative return", title=name)
        ax.legend(fontsize="small", loc="upper left")
    fig.suptitle(title)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def drawdowns(lines: Mapping[str, pd.Series], title: str) -> Figure:
    """Return each daily return series' drawdown: its cumulative sum below the running peak
    (`finpipe.portfolio.running_peak`, the start included)."""
    fig, ax = subplots(figsize=(8, 3.2))
    for label, daily in lines.items():
        cumulative = daily.cumsum()
        ax.plot(daily.index, (cumulative - portfolio.running_peak(cumulative)).values, label=label)
    ax.set(ylabel="drawdown", title=title)
    ax.legend(fontsize="small", loc="lower left")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def decile_bars(means: pd.Series, title: str, ylabel: str = "mean forward return") -> Figure:
    """Return a bar per decile (the index, 1 = lowest predictions) of `means`."""
    fig, ax = subplots(figsize=(6, 3.5))
    colours = ["#d73027" if v < 0 else "#1a9850" for v in means.values]
    ax.bar(means.index, means.values, color=colours)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set(xlabel="prediction decile", ylabel=ylabel, title=title)
    fig.tight_layout()
    return fig


def feature_importance(importance: Mapping[str, float], title: str, xlabel: str) -> Figure:
    """Return a horizontal bar per feature of `importance` (feature -> value), largest on top."""
    names = sorted(importance, key=lambda name: importance[name])
    fig, ax = subplots(figsize=(6, 0.3 * len(names) + 1.2))
    values = [importance[n] for n in names]
    ax.barh(names, values, color=["#4575b4" if v >= 0 else "#d73027" for v in values])
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set(xlabel=xlabel, title=title)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    """Free a figure's memory once logged."""
    import matplotlib.pyplot as plt

    plt.close(fig)
