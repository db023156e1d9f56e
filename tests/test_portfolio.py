"""Portfolio evaluation against naive references on hand-built and planted-signal series."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from finpipe.portfolio import (
    daily_returns,
    ic_by_year,
    information_coefficients,
    long_only,
    long_short,
    return_by_decile,
    risk_figures,
    run_portfolio,
    summarise,
    topk_dropout_holdings,
)

DATES = pd.bdate_range("2024-01-01", periods=6)


def _returns(values: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame(values, index=DATES[: len(next(iter(values.values())))])


def _planted(tickers: int = 80, days: int = 260, seed: int = 0):
    """Predictions whose signal at t is the return earned at t+2 (the trade's), plus noise."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2021-01-04", periods=days)
    names = [f"T{i:03d}" for i in range(tickers)]
    signal = rng.normal(size=(days, tickers))
    returns = pd.DataFrame(0.01 * rng.normal(size=(days, tickers)), index=dates, columns=names)
    returns.iloc[2:] += 0.004 * signal[:-2]
    oracle = pd.DataFrame(signal, index=dates, columns=names).stack().rename("prediction")
    noise = pd.DataFrame(rng.normal(size=(days, tickers)), index=dates, columns=names)
    random = noise.stack().rename("prediction")
    as_long = lambda s: s.rename_axis(["date", "ticker"]).reset_index()  # noqa: E731
    return returns, as_long(oracle), as_long(random)


def test_returns_come_from_adjusted_closes_per_ticker():
    prices = pd.DataFrame(
        {
            "date": list(DATES[:3]) * 2,
            "ticker": ["A"] * 3 + ["B"] * 3,
            "adj_close": [10.0, 11.0, 9.9, 20.0, 20.0, 30.0],
        }
    )
    returns = daily_returns(prices)
    assert returns["A"].iloc[1:].round(6).tolist() == [0.1, -0.1]
    assert returns["B"].iloc[1:].tolist() == [0.0, 0.5]
    assert returns.iloc[0].isna().all()


def test_a_session_without_adj_close_moves_by_its_close_once_with_a_fallback():
    nan = float("nan")
    prices = pd.DataFrame(
        {
            "date": list(DATES[:4]) * 2,
            "ticker": ["A"] * 4 + ["B"] * 4,
            "adj_close": [5.0, nan, 6.0, 6.6, nan, nan, nan, nan],  # B never has one
            "close": [10.0, 11.0, 12.0, 13.2, 20.0, 22.0, 22.0, 11.0],
        }
    )
    returns = daily_returns(prices, "adj_close", fallback="close")
    assert returns["A"].iloc[1:].round(6).tolist() == [0.1, round(12 / 11 - 1, 6), 0.1]
    assert returns["B"].iloc[1:].round(6).tolist() == [0.1, 0.0, -0.5]
    without = daily_returns(prices, "adj_close")  # the move across A's gap, B not at all
    assert without["A"].iloc[1:].round(6).tolist()[1:] == [0.2, 0.1]
    assert without["B"].isna().all()


def test_a_signal_trades_the_next_session_and_earns_the_one_after():
    returns = _returns({"A": [0.0, 0.5, 0.02, -0.01, 0.03, 0.0], "B": [0.0] * 6})
    weights = {DATES[0]: pd.Series({"A": 1.0})}
    result = run_portfolio(weights, returns, cost_bps=0.0)
    # signal on day 0, filled at day 1's close: day 1's +50% is not earned, day 2's 2% is.
    assert result.gross.to_dict() == {DATES[2]: pytest.approx(0.02)}
    # a signal too late to earn anything is ignored
    assert run_portfolio({DATES[4]: pd.Series({"A": 1.0})}, returns, cost_bps=0).gross.empty


def test_costs_are_basis_points_of_traded_value_and_strictly_lower_returns():
    returns = _returns({"A": [0.01] * 6, "B": [0.02] * 6})
    weights = {DATES[0]: pd.Series({"A": 1.0}), DATES[1]: pd.Series({"B": 1.0})}
    free = run_portfolio(weights, returns, cost_bps=0.0)
    costly = run_portfolio(weights, returns, cost_bps=10.0)
    # day 2: buy A (traded 1.0); day 3: sell the drifted A (1.01 of a book worth 1.009 after
    # its cost) and buy B
    drifted_a = 1.01 / (1.01 - 10e-4)
    assert costly.net.iloc[0] == pytest.approx(free.net.iloc[0] - 10e-4 * 1.0)
    assert costly.net.iloc[1] == pytest.approx(free.net.iloc[1] - 10e-4 * (drifted_a + 1.0))
    assert (costly.net < free.net).all()
    assert costly.turnover.tolist() == pytest.approx([0.5, (drifted_a + 1.0) / 2])


def test_weights_drift_with_their_returns_and_rebalancing_back_is_traded_and_costed():
    """An equal-weight book whose first name gains 10% a session holds 0.55 / 1.05 of it the
    next morning: setting it back to a half trades 2 x 0.05 / 1.05 of the book, and pays for it
    (a book that paid costs is worth 1 + its net return: 2 x 0.025 / (1 + net) of it)."""
    returns = _returns({"A": [0.1] * 6, "B": [0.0] * 6})
    weights = {d: pd.Series({"A": 0.5, "B": 0.5}) for d in DATES[:4]}
    free = run_portfolio(weights, returns, cost_bps=0.0)
    costly = run_portfolio(weights, returns, cost_bps=10.0)
    drift = 0.55 / 1.05 - 0.5
    assert free.turnover.tolist() == pytest.approx([0.5, drift, drift, drift])
    assert free.gross.tolist() == pytest.approx([0.05] * 4)
    worth = 1.0 + costly.net.iloc[:-1]
    assert costly.turnover.tolist() == pytest.approx([0.5, *(0.025 / worth)])
    paid = (free.net - costly.net).tolist()
    assert paid == pytest.approx([10e-4 * 1.0, *(10e-4 * 0.05 / worth)])
    short_b = {d: pd.Series({"A": 0.5, "B": -0.5}) for d in DATES[:4]}  # a short drifts too
    assert run_portfolio(short_b, returns, cost_bps=0.0).turnover.tolist() == pytest.approx(
        [0.5, drift, drift, drift]
    )


def test_a_long_short_book_drifts_as_a_fraction_of_its_value_not_of_its_gross():
    """Long A, short B, half each: A gains 10% and B falls 10%, so the book is worth 1.1 less
    the 0.001 it paid to trade, 1.099, and holds 0.55 / 1.099 of A and -0.45 / 1.099 of B.
    Setting both back to a half trades 0.1 / 1.099 of the book (rescaling the drifted legs to
    a gross of 1 made it 0.1)."""
    returns = _returns({"A": [0.1] * 6, "B": [-0.1] * 6})
    weights = {d: pd.Series({"A": 0.5, "B": -0.5}) for d in DATES[:2]}
    result = run_portfolio(weights, returns, cost_bps=10.0)
    assert result.gross.tolist() == pytest.approx([0.1, 0.1])
    assert result.turnover.tolist() == pytest.approx([0.5, 0.1 / 1.099 / 2])
    assert (result.gross - result.net).tolist() == pytest.approx([10e-4, 10e-4 * 0.1 / 1.099])


def test_a_session_without_a_signal_holds_the_book_instead_of_dropping_its_return():
    """No predictions on the third session (a missing feature date): the book bought before
    it is still held, so the session two after earns A's 4%, at no cost."""
    returns = _returns({"A": [np.nan, 0.01, 0.02, 0.03, 0.04, 0.05], "B": [0.0] * 6})
    weights = {d: pd.Series({"A": 1.0}) for i, d in enumerate(DATES[:4]) if i != 2}
    result = run_portfolio(weights, returns, cost_bps=0.0)
    earned = dict(zip(DATES[2:], [0.02, 0.03, 0.04, 0.05], strict=True))
    assert result.gross.to_dict() == pytest.approx(earned)
    assert result.turnover.tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    costly = run_portfolio(weights, returns, cost_bps=10.0)
    assert costly.turnover.loc[DATES[4]] == 0.0
    assert costly.net.loc[DATES[4]] == costly.gross.loc[DATES[4]]


def test_a_name_delisted_while_held_is_sold_at_its_last_price_and_counted():
    """A's last price is on the third session. Held into the fourth, its half earns nothing
    (it left at its last price). The rebalance on the fourth cannot trade it: it is sold,
    its half goes to B, the rest of its side, and the sale is counted. Before, the book kept
    buying A back to half its value and earned nothing on it, a session after session of
    half the book in a name that no longer traded, and said nothing."""
    returns = _returns({"A": [0.0, 0.0, 0.1, np.nan, np.nan, np.nan], "B": [0.01] * 6})
    weights = {d: pd.Series({"A": 0.5, "B": 0.5}) for d in DATES[:4]}
    result = run_portfolio(weights, returns, cost_bps=0.0)
    assert result.gross.tolist() == pytest.approx([0.5 * 0.1 + 0.005, 0.005, 0.01, 0.01])
    sold_a, bought_b = 0.5 / 1.005, 1.0 - 0.5 * 1.01 / 1.005  # as drifted by the fourth
    assert result.turnover.iloc[2] == pytest.approx((sold_a + bought_b) / 2)
    assert result.delisted_exits == 1
    assert summarise({"long_only": result})["delisted_exits"].tolist() == [1]


def test_a_name_delisted_between_signals_is_sold_into_cash_until_the_next():
    """No signal on the second and third dates: the book holds what it bought. A stops
    trading after the third session: on the fourth it is sold at its last price (traded and
    counted) and its proceeds stay in cash, earning nothing, until the next signal says where
    to put them (before, it stayed in the book unsold and uncounted)."""
    returns = _returns({"A": [0.0, 0.0, 0.1, np.nan, np.nan, np.nan], "B": [0.01] * 6})
    weights = {DATES[0]: pd.Series({"A": 0.5, "B": 0.5}), DATES[3]: pd.Series({"B": 1.0})}
    result = run_portfolio(weights, returns, cost_bps=0.0)
    a, b = 0.55 / 1.055, 0.505 / 1.055  # the book after the first session
    second = b * 0.01  # A earns nothing: it left at its last price
    a, b = a / (1 + second), b * 1.01 / (1 + second)
    assert result.gross.tolist() == pytest.approx([0.055, second, b * 0.01, 0.01])
    assert result.turnover.tolist()[1:3] == pytest.approx([0.0, a / 2])  # A sold, B kept
    assert result.delisted_exits == 1


def test_long_short_matches_a_naive_loop():
    returns, oracle, _ = _planted(tickers=20, days=40)
    result = long_short(oracle, returns, k=3, cost_bps=0.0)
    scores = oracle.pivot(index="date", columns="ticker", values="prediction")
    expected = {}
    for i in range(len(scores) - 2):
        row = scores.iloc[i].sort_values()
        shorts, longs = list(row.index[:3]), list(row.index[-3:])
        earned = returns.iloc[i + 2]
        expected[returns.index[i + 2]] = earned[longs].mean() - earned[shorts].mean()
    pd.testing.assert_series_equal(result.gross, pd.Series(expected), check_names=False)


def test_a_halted_name_earns_the_move_across_its_halt_on_its_first_session_back():
    """A held name with no price for two sessions reopens 50% lower: the book loses it on that
    session, not nothing (the move across the halt was dropped before)."""
    dates = pd.bdate_range("2024-01-01", periods=7)
    closes = {"A": [100, 100, 100, None, None, 50, 50], "B": [10, 10, 10, 10, 10, 10, 10]}
    prices = pd.DataFrame(
        [
            (d, t, c)
            for t, cs in closes.items()
            for d, c in zip(dates, cs, strict=True)
            if c is not None
        ],
        columns=["date", "ticker", "adj_close"],
    )
    returns = daily_returns(prices)
    assert returns["A"].tolist()[1:] == pytest.approx(
        [0.0, 0.0, np.nan, np.nan, -0.5, 0.0], nan_ok=True
    )
    # A ranked first every day: long A, traded at t+1, earning from t+2.
    predictions = pd.DataFrame(
        [(d, t, 1.0 if t == "A" else 0.0) for d in dates for t in closes],
        columns=["date", "ticker", "prediction"],
    )
    book = long_only(predictions, returns, k=1, cost_bps=0.0)
    assert book.gross.sum() == pytest.approx(-0.5)
    assert book.gross.loc[dates[5]] == pytest.approx(-0.5)


def test_a_name_halted_while_held_cannot_be_sold_before_it_trades_again():
    """As the pipeline scores it, a halted name has no feature row, so no prediction, while it
    is halted. It cannot be sold then: the book keeps it, the rest of the long side shrinks to
    make room, and the session it reopens 50% lower costs the book half of that (it was sold
    during the halt at its last price before, and the loss never showed)."""
    dates = pd.bdate_range("2024-01-01", periods=8)
    closes = {"A": [100, 100, 100, None, None, 50, 50, 50], "B": [10] * 8, "C": [10] * 8}
    prices = pd.DataFrame(
        [(d, t, c) for t, cs in closes.items() for d, c in zip(dates, cs, strict=True) if c],
        columns=["date", "ticker", "adj_close"],
    )
    score = {"A": 3.0, "B": 2.0, "C": 1.0}
    predictions = prices.loc[prices["date"] <= dates[5], ["date", "ticker"]].assign(
        prediction=lambda rows: rows["ticker"].map(score)
    )
    book = long_only(predictions, daily_returns(prices), k=2, cost_bps=0.0)
    # A and B from dates[2]; A kept through its halt (B and C share the other half from
    # dates[5]); A sold on reopening, at dates[5]'s close, and bought back for C a day later
    assert book.gross.tolist() == pytest.approx([0.0, 0.0, 0.0, -0.25, 0.0, 0.0])
    assert book.turnover.tolist() == pytest.approx([0.5, 0.0, 0.0, 0.25, 1 / 3, 0.5])


def test_the_drawdown_of_a_book_that_loses_from_its_first_day_counts_from_its_start():
    assert risk_figures(pd.Series([-0.10, 0.0, 0.01, -0.005])).max_drawdown == pytest.approx(-0.10)
    assert risk_figures(pd.Series([-0.05] * 10)).max_drawdown == pytest.approx(-0.50)


def test_risk_figures_follow_qlibs_sum_mode_and_a_hand_computed_drawdown():
    daily = pd.Series([0.01, -0.02, 0.03, -0.04, 0.01, 0.02])
    figures = risk_figures(daily)
    mean, std = np.mean(daily), np.std(daily, ddof=1)
    assert figures.annualised_return == pytest.approx(mean * 252)
    assert figures.annualised_volatility == pytest.approx(std * math.sqrt(252))
    assert figures.information_ratio == pytest.approx(mean / std * math.sqrt(252))
    # cumulative 0.01, -0.01, 0.02, -0.02, -0.01, 0.01: the worst fall from a peak is 0.02 -> -0.02
    assert figures.max_drawdown == pytest.approx(-0.04)
    assert figures.hit_rate == pytest.approx(4 / 6)


def test_the_oracle_earns_and_a_random_signal_loses_its_costs():
    returns, oracle, random = _planted()
    results = {
        "oracle": long_short(oracle, returns, k=10, cost_bps=10.0),
        "random": long_short(random, returns, k=10, cost_bps=10.0),
        "random, free": long_short(random, returns, k=10, cost_bps=0.0),
    }
    table = summarise(results).set_index("strategy")
    assert table.loc["oracle", "information_ratio"] > 5
    # without costs a random book earns about nothing; with them, about its costs less
    free = results["random, free"].net
    assert abs(free.mean()) < 3 * free.std(ddof=1) / math.sqrt(len(free))
    cost = (results["random"].gross - results["random"].net).mean()
    assert results["random"].net.mean() == pytest.approx(free.mean() - cost)
    assert cost > 0


def test_long_only_beats_its_universe_and_the_dropout_limits_turnover():
    returns, oracle, _ = _planted()
    daily = long_only(oracle, returns, k=10, cost_bps=0.0)
    assert risk_figures(daily.excess()).information_ratio > 3
    limited = long_only(oracle, returns, k=10, cost_bps=0.0, n_drop=2)
    # after the first day (the book bought from cash: 0.5), 2 of 10 names a day is 0.2 of the
    # book, plus what re-weighting the drifted names back to equal weight trades
    assert limited.turnover.iloc[0] == pytest.approx(0.5)
    assert limited.turnover.iloc[1:].max() < 0.25
    assert limited.turnover.mean() < daily.turnover.mean()
    holdings = topk_dropout_holdings(
        oracle.pivot(index="date", columns="ticker", values="prediction"), k=10, n_drop=2
    )
    days = list(holdings.values())
    assert all(len(held) == 10 for held in days)
    assert max(len(set(b) - set(a)) for a, b in zip(days, days[1:], strict=False)) <= 2


def test_dropout_refills_the_slot_of_a_delisted_name():
    scores = pd.DataFrame(
        {"A": [3.0, np.nan], "B": [2.0, 2.0], "C": [1.0, 1.0], "D": [0.0, 0.5]}, index=DATES[:2]
    )
    holdings = topk_dropout_holdings(scores, k=2, n_drop=0)
    assert holdings[DATES[0]] == ["A", "B"]
    assert holdings[DATES[1]] == ["B", "C"]  # A is gone; its slot goes to the best new name


def test_ic_and_deciles_against_scipy_and_a_planted_signal():
    returns, oracle, _ = _planted(tickers=50, days=30)
    forward = returns.shift(-2).stack().rename("forward_return")
    forward = forward.rename_axis(["date", "ticker"]).reset_index()
    daily = information_coefficients(oracle, forward)
    first = oracle[oracle["date"] == daily["date"].iloc[0]].merge(forward, on=["date", "ticker"])
    assert daily["ic"].iloc[0] == pytest.approx(
        stats.pearsonr(first["prediction"], first["forward_return"])[0]
    )
    assert daily["rank_ic"].iloc[0] == pytest.approx(
        stats.spearmanr(first["prediction"], first["forward_return"])[0]
    )
    yearly = ic_by_year(daily)
    assert yearly["year"].tolist() == [2021]
    assert yearly["icir"].iloc[0] == pytest.approx(daily["ic"].mean() / daily["ic"].std(ddof=1))
    deciles = return_by_decile(oracle, forward)
    assert list(deciles.index) == list(range(1, 11))
    assert deciles.iloc[-1] > deciles.iloc[0]


def test_a_name_without_a_price_on_the_trading_session_is_not_bought_whatever_comes_later():
    """D, scored best on the day of its last price, cannot be bought at the next close, which
    it lacks, whether it trades again later (a halt) or never (a delisting): what the book
    earns on the session after cannot depend on prices that come after it (a delisted D was
    bought and held half the book earning nothing, a halted one was left out)."""
    dates = pd.bdate_range("2024-01-01", periods=7)
    delisted = {"D": [10, 10, None, None, None, None, None], "B": [10, 10, 10, 11, 11, 11, 11]}
    halted = {**delisted, "D": [10, 10, None, None, None, 12, 12]}
    predictions = pd.DataFrame({"date": dates[1], "ticker": ["D", "B"], "prediction": [2.0, 1.0]})
    earned = {}
    for name, closes in {"delisted": delisted, "halted": halted}.items():
        prices = pd.DataFrame(
            [(d, t, c) for t, cs in closes.items() for d, c in zip(dates, cs, strict=True) if c],
            columns=["date", "ticker", "adj_close"],
        )
        book = long_only(predictions, daily_returns(prices), k=2, cost_bps=0.0)
        earned[name] = book.gross.loc[dates[3]]
    assert earned == pytest.approx({"delisted": 0.1, "halted": 0.1})


def test_costs_are_paid_out_of_the_book_so_the_next_session_sells_what_paid_them():
    """A book buys A from cash at 100 bps and A gains 10%: it holds 1.1 of A, has paid 0.01,
    and is worth 1.09, so A is 1.1 / 1.09 of it (the cost was borrowed from cash). Holding all
    of A again the next session sells 0.01 / 1.09 of the book, and pays for that too (drift
    over 1 + gross made A exactly the whole book, and the cost vanished from the weights)."""
    returns = _returns({"A": [0.1] * 6})
    weights = {d: pd.Series({"A": 1.0}) for d in DATES[:2]}
    result = run_portfolio(weights, returns, cost_bps=100.0)
    sold = 1.1 / 1.09 - 1.0
    assert result.gross.tolist() == pytest.approx([0.1, 0.1])
    assert result.turnover.tolist() == pytest.approx([0.5, sold / 2])
    assert result.net.tolist() == pytest.approx([0.1 - 0.01, 0.1 - 0.01 * sold])


def test_a_book_worth_nothing_after_a_session_holds_nothing_and_earns_nothing_after():
    """Short B at half the book and B rises 250%: the session loses 1.25 of the book, more than
    it is worth. The book is wiped out on that session: it keeps that loss, trades nothing and
    earns nothing afterwards, and the result says when (before, it went on trading weights
    that were no longer fractions of anything)."""
    returns = _returns({"A": [0.0, 0.0, 0.0, 0.1, 0.1, 0.1], "B": [0.0, 0.0, 2.5, 0.0, -0.1, 0.0]})
    weights = {d: pd.Series({"A": 0.5, "B": -0.5}) for d in DATES[:4]}
    result = run_portfolio(weights, returns, cost_bps=10.0)
    assert result.wiped_out == DATES[2]
    assert result.gross.tolist() == pytest.approx([-1.25, 0.0, 0.0, 0.0])
    assert result.net.tolist() == pytest.approx([-1.25 - 10e-4, 0.0, 0.0, 0.0])
    assert result.turnover.tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    assert summarise({"ruined": result})["wiped_out"].tolist() == [DATES[2].date().isoformat()]
    survivor = run_portfolio(weights, returns.assign(B=0.0), cost_bps=10.0)
    assert survivor.wiped_out is None
    assert summarise({"kept": survivor})["wiped_out"].tolist() == [None]


def test_deciles_skip_a_date_with_fewer_names_than_deciles():
    """Ten names give one name a decile; three cannot fill ten deciles (they fell in deciles 4,
    7 and 10 and pulled those means towards that date's returns), so their date is left out,
    as `metrics.market_metrics` leaves out a date with fewer names than quantiles."""
    full = pd.DataFrame(
        {"date": DATES[0], "ticker": list("ABCDEFGHIJ"), "prediction": np.arange(10.0)}
    )
    few = pd.DataFrame({"date": DATES[1], "ticker": list("ABC"), "prediction": [0.0, 1.0, 2.0]})
    predictions = pd.concat([full, few], ignore_index=True)
    forward = predictions[["date", "ticker"]].assign(
        forward_return=np.r_[np.arange(1, 11) / 100, [1.0, 1.0, 1.0]]
    )
    deciles = return_by_decile(predictions, forward)
    assert deciles.to_dict() == pytest.approx({d: d / 100 for d in range(1, 11)})
    only_few = return_by_decile(few, forward)
    assert list(only_few.index) == list(range(1, 11)) and only_few.isna().all()


def test_a_long_short_book_with_fewer_than_2k_names_splits_them_without_overlap():
    """Three names and k = 2: the best two and the worst two share B, which netted to nothing,
    leaving a book long A and short C at a half each instead of the whole book a side. Each
    side takes k names or half the names, whichever is fewer: long A and short C at 1 each,
    as `long_only` holds every name at 1/n when there are fewer than k."""
    returns = _returns(
        {"A": [0.0, 0.0, 0.02, 0, 0, 0], "B": [0.0] * 6, "C": [0.0, 0.0, -0.01, 0, 0, 0]}
    )
    predictions = pd.DataFrame(
        {"date": DATES[0], "ticker": list("ABC"), "prediction": [3.0, 2.0, 1.0]}
    )
    result = long_short(predictions, returns, k=2, cost_bps=0.0)
    assert result.gross.tolist() == pytest.approx([0.03])
    assert result.turnover.tolist() == pytest.approx([1.0])


def test_a_long_short_book_never_holds_a_name_on_both_sides_when_scores_tie():
    """B and C tie in the middle of four names, k = 2: the best two were A and B (ties by
    ticker) and the worst two D and B (ties by ticker again, from the other end), so B netted
    to nothing and C was never shorted. One ordering gives long A and B, short C and D."""
    returns = _returns(
        {
            "A": [0.0] * 6,
            "B": [0.0, 0.0, 0.02, 0, 0, 0],
            "C": [0.0, 0.0, -0.02, 0, 0, 0],
            "D": [0.0] * 6,
        }
    )
    predictions = pd.DataFrame(
        {"date": DATES[0], "ticker": list("ABCD"), "prediction": [3.0, 1.0, 1.0, 0.0]}
    )
    result = long_short(predictions, returns, k=2, cost_bps=0.0)
    assert result.gross.tolist() == pytest.approx([0.02])
    assert result.turnover.tolist() == pytest.approx([1.0])


def test_the_decile_plot_draws_the_decile_table_every_date_counting_once():
    """The nightly's decile plot (`plots.return_by_decile`) and the backtest's decile table
    give each date one vote: a date of 30 names whose returns are all 0.03 weighs as much as
    one of 10 whose returns rise with the prediction, so decile 1 is (0.0 + 0.03) / 2. The
    plot pooled the rows (that decile (0.0 + 3 x 0.03) / 4) and kept a date of 3 names that
    the table leaves out."""
    from finpipe import plots

    small = pd.DataFrame(
        {"date": DATES[0], "ticker": list("ABCDEFGHIJ"), "prediction": np.arange(10.0)}
    ).assign(label=lambda f: f["prediction"] / 100)
    large = pd.DataFrame(
        {"date": DATES[1], "ticker": [f"T{i}" for i in range(30)], "prediction": np.arange(30.0)}
    ).assign(label=0.03)
    few = pd.DataFrame({"date": DATES[2], "ticker": list("XYZ"), "prediction": [1.0, 2, 3]})
    frame = pd.concat([small, large, few.assign(label=-1.0)], ignore_index=True)
    forward = frame[["date", "ticker", "label"]].rename(columns={"label": "forward_return"})
    table = return_by_decile(frame[["date", "ticker", "prediction"]], forward)
    figure = plots.return_by_decile(frame, "prediction", "label", "deciles")
    drawn = [bar.get_height() for bar in figure.axes[0].patches]
    plots.close(figure)
    assert drawn == pytest.approx(table.tolist())
    assert drawn == pytest.approx([(d / 100 + 0.03) / 2 for d in range(10)])
