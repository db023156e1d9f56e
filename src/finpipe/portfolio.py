"""How a market signal would have traded: daily portfolios, costs, and the metrics a quant reads.

Conventions, stated once here and used by every function below:

- **Timing.** A prediction for date t uses data up to the close of t. It is traded at the close
  of the next session, t+1 (no same-day fill), and the position earns the close-to-close return
  from t+1 to t+2. A portfolio's return is therefore dated t+2, two sessions after its signal.
- **Returns** are simple close-to-close returns of the adjusted close, per ticker and session.
- **Drift.** Weights are fractions of the book's value, its cash included. Between rebalances
  they drift with their returns: after a session that earned R net of its costs, a name's
  weight w becomes w (1 + r) / (1 + R). The costs are paid out of the book's cash, so the book
  is worth 1 + R, not 1 + gross, and the next rebalance sells what paid them (as Qlib's
  `Position` takes cost and trade out of cash and weighs each stock against stocks plus cash).
  A session with no signal (no predictions that date) keeps the drifted book: nothing trades
  but the sale of a name that stopped trading (below).
- **Ruin.** A book worth nothing or less after a session (its shorts more than doubled,
  say) is wiped out on that session: its return keeps the whole loss, below -100%
  if so, and from the next session it holds nothing, trades nothing and earns 0, its
  benchmark still running. `PortfolioResult.wiped_out` names the session; `summarise` shows it.
- **Delistings and halts.** A held name that has no price on a day earns 0 that day. One that
  stopped trading (no price on this session or any later one: delisted) leaves the portfolio
  at its last price: it earns nothing after it, and on the first session without a price it
  is sold, the sale traded and costed like any other. On a rebalance the proceeds go to the
  other names of its side, as the new weights say; on a session without a signal they stay in
  cash until the next. `PortfolioResult.delisted_exits` counts these sales, `summarise` shows
  them. A name without a price on the session a trade is due is not bought, halted or
  delisted alike. One held and halted (a price on a later session: the price history stands
  in for the exchange's notice, public when it comes) cannot be sold either: it keeps its
  weight, the other names of its side (long or short) share what the side's target leaves,
  and it earns, on its first session back, the whole move from its last price before the
  halt. Nothing is dropped from the history, so there is no survivorship bias.
- **Costs** are `cost_bps` basis points of traded value: each day's cost is
  `cost_bps / 10_000 * sum(|w_new - w_old|)` over every name, charged on the day the new
  weights start earning.
- **Turnover** of a day is `sum(|w_new - w_old|) / 2`: the fraction of the book replaced (1.0
  for a full swap of a long-only book).
- **Annualisation** follows Qlib's `risk_analysis` in its default ("sum") mode: arithmetic, 252
  sessions a year. Annualised return = mean daily return x 252; volatility = standard deviation
  (ddof 1) x sqrt(252); information ratio = mean / std x sqrt(252) (a Sharpe ratio with a zero
  risk-free rate when the returns are not relative to a benchmark); maximum drawdown = the
  lowest point of the cumulative (summed) return below its running peak, the start (0)
  included, so a book that loses from its first day draws down from its starting capital.
  (Qlib's `risk_analysis(r, freq="day")` annualises over 238 sessions; finpipe's figures equal
  `risk_analysis(r, N=252, freq=None, mode="sum")`, whose drawdown peaks from the first day's
  return instead: equal once a zero-return day leads the series, tests/test_portfolio_qlib.py.)
- **IC** of a date is the Pearson correlation across tickers of the prediction with the return
  it predicts (the forward return the label uses); rank IC uses ranks (Spearman). ICIR is mean
  IC / standard deviation of IC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

SESSIONS_PER_YEAR = 252


def daily_returns(
    prices: pd.DataFrame, price_column: str = "adj_close", fallback: str | None = None
) -> pd.DataFrame:
    """Return a (date x ticker) frame of close-to-close simple returns from long-format
    `prices` (date, ticker, `price_column`), each from the ticker's previous priced session:
    its first session and the sessions it has no price on have no return (NaN), and its first
    session after a gap (a halt) has the whole move across it.

    With `fallback` (a column such as the unadjusted close), a session whose move
    `price_column` does not give, its price or the previous session's being empty (a vendor
    left adj_close out), takes its move in `fallback`, so no session's move is lost or
    counted twice."""
    keep = [price_column] if fallback is None else [price_column, fallback]
    priced = prices.dropna(subset=keep, how="all").sort_values(["ticker", "date"], kind="stable")
    if fallback is None:
        priced = priced.dropna(subset=[price_column])
    by_ticker = priced.groupby("ticker", sort=False)
    ret = priced[price_column] / by_ticker[price_column].shift(1) - 1.0
    if fallback is not None:
        ret = ret.fillna(priced[fallback] / by_ticker[fallback].shift(1) - 1.0)
    wide = priced.assign(ret=ret).pivot(index="date", columns="ticker", values="ret")
    return wide.reindex(
        index=np.sort(prices["date"].unique()), columns=np.sort(prices["ticker"].unique())
    ).rename_axis(index="date", columns="ticker")


def _wide_scores(predictions: pd.DataFrame) -> pd.DataFrame:
    return predictions.pivot(index="date", columns="ticker", values="prediction").sort_index()


def top_k_weights(scores: pd.Series, k: int) -> pd.Series:
    """Equal weights 1/k on the k best-scored names (all of them, at 1/n, if fewer)."""
    ranked = scores.dropna().sort_values(ascending=False, kind="mergesort")
    chosen = ranked.index[: min(k, len(ranked))]
    return pd.Series(1.0 / len(chosen), index=chosen) if len(chosen) else pd.Series(dtype=float)


def topk_dropout_holdings(
    scores: pd.DataFrame, k: int, n_drop: int
) -> dict[pd.Timestamp, list[str]]:
    """Return the names held after each date's trades under a turnover limit (Qlib's
    TopkDropout idea): hold k names; each date, the `n_drop` best-scored names not held are
    candidates, and of the held names plus those candidates the k best-scored are kept, so at
    most `n_drop` names are replaced a day. A held name without a score (delisted) is sold
    first and its slot refilled."""
    held: list[str] = []
    out: dict[pd.Timestamp, list[str]] = {}
    for date, row in scores.iterrows():
        today = row.dropna()
        kept = [name for name in held if name in today.index]
        outside = today.drop(kept).sort_values(ascending=False, kind="mergesort")
        vacancies = k - len(kept)
        candidates = list(outside.index[: n_drop + max(vacancies, 0)])
        pool = today[kept + candidates].sort_values(ascending=False, kind="mergesort")
        held = list(pool.index[:k])
        out[date] = held
    return out


@dataclass(frozen=True)
class PortfolioResult:
    """Daily series of one strategy, dated by the session the return was earned."""

    gross: pd.Series  # return before costs
    net: pd.Series  # return after costs
    turnover: pd.Series  # fraction of the book replaced when these weights were set
    benchmark: pd.Series | None  # the equal-weight universe's return, same dates
    wiped_out: pd.Timestamp | None = None  # the session the book lost all its value, if any
    delisted_exits: int = 0  # held names sold at their last price because they stopped trading

    def excess(self) -> pd.Series:
        """Net return minus the benchmark's (the net return itself without a benchmark)."""
        return self.net if self.benchmark is None else self.net - self.benchmark


def run_portfolio(
    weights_by_date: Mapping[pd.Timestamp, pd.Series],
    returns: pd.DataFrame,
    *,
    cost_bps: float,
    benchmark: bool = False,
) -> PortfolioResult:
    """Return the daily result of holding `weights_by_date` (weights decided at each signal
    date t) under the module's timing, cost and delisting conventions.

    `returns` is the (date x ticker) frame of `daily_returns`. Weights of signal date t earn
    the return of the session two after t; signals too late to earn a return are ignored, and
    a session between the first and the last signal without one holds the drifted book. A book
    wiped out (worth nothing after a session) earns 0 on every session after.
    """
    sessions = list(returns.index)
    position = {date: i for i, date in enumerate(sessions)}
    signals = {position[d]: w for d, w in weights_by_date.items() if d in position}
    priced = returns.notna()
    priced_later = priced.iloc[::-1].cummax().iloc[::-1]  # a price on this session or after
    previous = pd.Series(dtype=float)
    gross, net, turnover, universe = {}, {}, {}, {}
    wiped_out: pd.Timestamp | None = None
    delisted_exits = 0
    last = min(max(signals, default=-1), len(sessions) - 3)  # the last signal that earns
    for index in range(min(signals, default=0), last + 1):
        earned = sessions[index + 2]
        day = returns.loc[earned]
        universe[earned] = float(day.dropna().mean()) if day.notna().any() else 0.0
        if wiped_out is not None:
            gross[earned] = net[earned] = turnover[earned] = 0.0
            continue
        unpriced = ~priced.iloc[index + 1]
        halted = unpriced & priced_later.iloc[index + 1]
        # held names that stopped trading: sold at their last price, and counted
        gone = previous.index[
            (previous != 0) & (unpriced & ~halted).reindex(previous.index, fill_value=False)
        ]
        delisted_exits += len(gone)
        # a session without a signal keeps the drifted book, the proceeds of a sale in cash
        target = signals.get(index, previous.drop(gone))
        weights = _tradable(target, previous, halted.index[halted], unpriced.index[unpriced])
        traded = weights.sub(previous, fill_value=0.0).abs().sum()
        # no price this session (halted, or delisted since the last trade): earns nothing
        held = day.reindex(weights.index).fillna(0.0)
        gross[earned] = float((weights * held).sum())
        net[earned] = gross[earned] - cost_bps / 10_000.0 * float(traded)
        turnover[earned] = float(traded) / 2.0
        # weights drift with their returns, as fractions of the book's value after the costs
        # it paid, until the next rebalance sets them again
        value = 1.0 + net[earned]
        if value <= 0:
            wiped_out = earned
        previous = weights * (1.0 + held) / value if value > 0 else pd.Series(dtype=float)
    as_series = lambda values: pd.Series(values, dtype=float).sort_index()  # noqa: E731
    return PortfolioResult(
        gross=as_series(gross),
        net=as_series(net),
        turnover=as_series(turnover),
        benchmark=as_series(universe) if benchmark else None,
        wiped_out=wiped_out,
        delisted_exits=delisted_exits,
    )


def _tradable(
    target: pd.Series, previous: pd.Series, halted: pd.Index, unpriced: pd.Index
) -> pd.Series:
    """Return the weights a book holds after trading towards `target` when the names in `halted`
    cannot trade: each keeps its weight in `previous` (none if not held), and the other names
    of its side (long or short) are scaled to what the side's target leaves. Any other name of
    `unpriced` (no price on the session) is not bought, whether or not it trades again later,
    and one held (delisted: no price again) is sold at its last price, its weight going to
    the rest of its side."""
    stuck = previous.reindex(halted).dropna()
    stuck = stuck[stuck != 0]
    free = target.drop(unpriced, errors="ignore")  # `halted` is part of `unpriced`
    if stuck.empty and len(free) == len(target):
        return target
    sides = [free[free == 0], stuck]
    for sign in (1.0, -1.0):
        side = free[np.sign(free) == sign]
        room = target[np.sign(target) == sign].sum() - stuck[np.sign(stuck) == sign].sum()
        total = side.sum()
        sides.append(side * max(room / total, 0.0) if total != 0 else side)
    return pd.concat(sides)


def long_short(
    predictions: pd.DataFrame, returns: pd.DataFrame, *, k: int, cost_bps: float
) -> PortfolioResult:
    """Long the k best-scored names and short the k worst, equal weight (1/k a side), daily.

    Both sides come from one ordering, best first, ties broken by ticker (as
    `metrics.market_metrics` does), so they never share a name: a shared name nets to nothing
    and shrinks both sides. A date with fewer than 2k scored names takes half of them a side
    (the middle one of an odd count left out), each side still the whole book."""
    scores = _wide_scores(predictions)
    weights = {}
    for date, row in scores.iterrows():
        ordered = row.dropna().sort_values(ascending=False, kind="mergesort").index
        side = min(k, len(ordered) // 2)
        longs = pd.Series(1.0 / side, index=ordered[:side]) if side else pd.Series(dtype=float)
        shorts = -longs.set_axis(ordered[len(ordered) - side :])
        weights[date] = pd.concat([longs, shorts])
    return run_portfolio(weights, returns, cost_bps=cost_bps)


def long_only(
    predictions: pd.DataFrame,
    returns: pd.DataFrame,
    *,
    k: int,
    cost_bps: float,
    n_drop: int | None = None,
) -> PortfolioResult:
    """Long the k best-scored names, equal weight, against the equal-weight universe; with
    `n_drop`, at most that many names are replaced a day (`topk_dropout_holdings`)."""
    scores = _wide_scores(predictions)
    if n_drop is None:
        weights = {date: top_k_weights(row, k) for date, row in scores.iterrows()}
    else:
        weights = {
            date: pd.Series(1.0 / len(names), index=names) if names else pd.Series(dtype=float)
            for date, names in topk_dropout_holdings(scores, k, n_drop).items()
        }
    return run_portfolio(weights, returns, cost_bps=cost_bps, benchmark=True)


@dataclass(frozen=True)
class RiskFigures:
    """Qlib-style risk analysis of a daily return series (see the module's conventions)."""

    annualised_return: float
    annualised_volatility: float
    information_ratio: float
    max_drawdown: float
    hit_rate: float
    sessions: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def running_peak(cumulative: pd.Series) -> pd.Series:
    """Return the highest point a cumulative (summed) return has reached so far, its start (0)
    included: the peak a drawdown is measured from."""
    return cumulative.cummax().clip(lower=0.0)


def risk_figures(daily: pd.Series) -> RiskFigures:
    """Annualised return and volatility, information ratio, maximum drawdown and hit rate."""
    values = daily.dropna().astype(float)
    if len(values) < 2:
        nan = float("nan")
        return RiskFigures(nan, nan, nan, nan, nan, len(values))
    mean, std = float(values.mean()), float(values.std(ddof=1))
    cumulative = values.cumsum()
    drawdown = float((cumulative - running_peak(cumulative)).min())
    return RiskFigures(
        annualised_return=mean * SESSIONS_PER_YEAR,
        annualised_volatility=std * math.sqrt(SESSIONS_PER_YEAR),
        information_ratio=mean / std * math.sqrt(SESSIONS_PER_YEAR) if std > 0 else float("nan"),
        max_drawdown=min(drawdown, 0.0),
        hit_rate=float((values > 0).mean()),
        sessions=len(values),
    )


def information_coefficients(
    predictions: pd.DataFrame, forward_returns: pd.DataFrame
) -> pd.DataFrame:
    """Per date: IC, rank IC and the number of names, from long-format `predictions` (date,
    ticker, prediction) and `forward_returns` (date, ticker, forward_return: the return the
    prediction of that date is about)."""
    joined = predictions.merge(forward_returns, on=["date", "ticker"]).dropna(
        subset=["prediction", "forward_return"]
    )
    rows = []
    for date, day in joined.groupby("date", sort=True):
        if len(day) < 3:
            continue
        ic = day["prediction"].corr(day["forward_return"])
        rank_ic = day["prediction"].rank().corr(day["forward_return"].rank())
        rows.append({"date": date, "ic": ic, "rank_ic": rank_ic, "names": len(day)})
    return pd.DataFrame(rows, columns=["date", "ic", "rank_ic", "names"])


def ic_by_year(daily_ic: pd.DataFrame) -> pd.DataFrame:
    """Mean IC, mean rank IC and ICIR (mean / std of the daily IC) per calendar year."""
    by_year = daily_ic.assign(year=pd.to_datetime(daily_ic["date"]).dt.year).groupby("year")
    summary = by_year.agg(ic=("ic", "mean"), rank_ic=("rank_ic", "mean"), dates=("ic", "size"))
    summary["icir"] = by_year["ic"].mean() / by_year["ic"].std(ddof=1)
    return summary.reset_index()


def return_by_decile(
    predictions: pd.DataFrame, forward_returns: pd.DataFrame, deciles: int = 10
) -> pd.Series:
    """Mean forward return of each prediction decile (1 = lowest predictions), averaged over
    dates so every date counts once. A date with fewer names than `deciles` cannot fill every
    decile and is left out (as `metrics.market_metrics` leaves out a date with fewer names
    than quantiles); a decile no date fills is NaN."""
    joined = predictions.merge(forward_returns, on=["date", "ticker"]).dropna(
        subset=["prediction", "forward_return"]
    )

    def per_date(day: pd.DataFrame) -> pd.Series:
        ranks = day["prediction"].rank(method="first")
        bucket = np.ceil(ranks / len(day) * deciles).astype(int).clip(1, deciles)
        return day["forward_return"].groupby(bucket).mean()

    table = pd.DataFrame(
        {date: per_date(day) for date, day in joined.groupby("date") if len(day) >= deciles}
    ).T
    means = table.mean().reindex(range(1, deciles + 1)).astype(float)
    return means.rename_axis("decile").rename("mean_forward_return")


def summarise(results: Mapping[str, PortfolioResult]) -> pd.DataFrame:
    """One row per strategy: its net risk figures, mean turnover, the date it was wiped out
    (None if never), the held names it sold because they stopped trading, and (with a
    benchmark) the risk figures of its excess return over the benchmark."""
    rows = []
    for name, result in results.items():
        row: dict[str, object] = {"strategy": name, **risk_figures(result.net).to_dict()}
        row["mean_turnover"] = float(result.turnover.mean()) if len(result.turnover) else 0.0
        ruin = result.wiped_out
        row["wiped_out"] = None if ruin is None else ruin.date().isoformat()
        row["delisted_exits"] = result.delisted_exits
        if result.benchmark is not None:
            excess = risk_figures(result.excess())
            row["excess_return"] = excess.annualised_return
            row["excess_information_ratio"] = excess.information_ratio
        rows.append(row)
    return pd.DataFrame(rows)
