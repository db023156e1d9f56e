"""finpipe's portfolio figures against Qlib's `risk_analysis` on the same daily return series.

The conventions checked (`finpipe.portfolio`'s docstring states them): Qlib's "sum" mode, that
is arithmetic (returns summed, not compounded: annualised return = mean x N, maximum drawdown
of the summed curve below its running peak, which finpipe starts at 0), N = 252 sessions a
year, standard deviation with ddof 1, information ratio = mean / std x sqrt(N). Qlib's own
default for `freq="day"` is N = 238 (China's trading year), so N is passed explicitly. Qlib
reports the daily std, not an annualised volatility: finpipe's volatility is that std x
sqrt(252).

pyqlib is not a dev dependency (the `bench` extra installs it): the module skips without it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from finpipe.portfolio import SESSIONS_PER_YEAR, long_short, risk_figures

evaluate = pytest.importorskip("qlib.contrib.evaluate", reason="pyqlib (the bench extra)")


def _series() -> dict[str, pd.Series]:
    """Hand-built daily returns: a drift with noise and a crash, an alternating series, and a
    long-short book traded by finpipe on a planted signal (with a delisting's NaN left in)."""
    rng = np.random.default_rng(11)
    dates = pd.bdate_range("2021-01-04", periods=300)
    drift = pd.Series(0.0004 + 0.01 * rng.standard_normal(300), index=dates)
    drift.iloc[150:160] -= 0.03  # a ten-day fall: the drawdown is there, not at the noise
    alternating = pd.Series(np.tile([0.02, -0.015, 0.005, -0.01], 25), index=dates[:100])

    names = [f"T{i:02d}" for i in range(20)]
    signal = pd.DataFrame(rng.standard_normal((300, 20)), index=dates, columns=names)
    returns = pd.DataFrame(0.01 * rng.standard_normal((300, 20)), index=dates, columns=names)
    returns.iloc[2:] += 0.003 * signal.iloc[:-2].to_numpy()
    returns.iloc[200:, 0] = np.nan  # T00 delisted
    predictions = signal.stack().rename("prediction").rename_axis(["date", "ticker"])
    book = long_short(predictions.reset_index(), returns, k=4, cost_bps=10.0).net
    return {"drift": drift, "alternating": alternating, "long_short": book}


@pytest.mark.parametrize("name", ["drift", "alternating", "long_short"])
def test_finpipe_figures_equal_qlibs_risk_analysis_in_sum_mode_over_252_days(name):
    daily = _series()[name]
    ours = risk_figures(daily)
    theirs = evaluate.risk_analysis(daily, N=SESSIONS_PER_YEAR, freq=None, mode="sum")["risk"]
    assert ours.sessions == daily.notna().sum() and ours.sessions >= 100
    assert ours.annualised_return == pytest.approx(theirs["annualized_return"], rel=1e-12)
    assert ours.annualised_volatility == pytest.approx(theirs["std"] * math.sqrt(252), rel=1e-12)
    assert ours.information_ratio == pytest.approx(theirs["information_ratio"], rel=1e-12)
    # Qlib's drawdown peaks from the first day's return, finpipe's from the start (0): equal
    # once a zero-return day leads the series.
    start = pd.Series([0.0], index=[daily.index[0] - pd.Timedelta(days=1)])
    led = evaluate.risk_analysis(pd.concat([start, daily]), N=252, freq=None, mode="sum")["risk"]
    assert ours.max_drawdown == pytest.approx(led["max_drawdown"], rel=1e-12)
    assert ours.max_drawdown <= theirs["max_drawdown"] < 0


def test_the_conventions_are_not_qlibs_compounded_mode_nor_its_238_day_default():
    """The two conventions finpipe does not follow give other figures on the same series, so
    the test above tells them apart."""
    daily = _series()["drift"]
    ours = risk_figures(daily)
    compounded = evaluate.risk_analysis(daily, N=252, freq=None, mode="product")["risk"]
    assert ours.annualised_return != pytest.approx(compounded["annualized_return"], rel=1e-3)
    assert ours.max_drawdown != pytest.approx(compounded["max_drawdown"], rel=1e-3)
    qlib_day = evaluate.risk_analysis(daily, freq="day")["risk"]  # N = 238
    assert ours.annualised_return == pytest.approx(qlib_day["annualized_return"] * 252 / 238)
    assert ours.information_ratio == pytest.approx(
        qlib_day["information_ratio"] * math.sqrt(252 / 238)
    )
