"""Walk-forward backtest engine: the plan, point in time, resumability (finpipe.backtest).

Small synthetic panels, one or two epochs: the properties, not the model's skill, are tested.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
import torch

from finpipe import backtest as bt
from finpipe import plots
from finpipe.errors import ConfigError
from finpipe.market.features import build_market_features, build_market_labels
from finpipe.market.synthetic import MarketSyntheticConfig, generate_market_panel
from finpipe.storage import Storage

TINY = {
    "models": ["mlp", "gru", "ensemble"],
    "max_epochs": 2,
    "hidden": 8,
    "lookback": 5,
    "history_dates": None,
}
HORIZON = 5


@pytest.fixture(scope="module")
def panel():
    """Prices and features of 8 tickers over 305 sessions, and the session list."""
    prices = generate_market_panel(MarketSyntheticConfig(tickers=8, days=305, seed=4)).prices
    features = build_market_features(prices)
    days = sorted(features["date"].dt.date.unique())
    return prices, features, days


def _config(days, **changes) -> bt.BacktestConfig:
    values = {
        "name": "unit",
        "start": days[220],
        "end": days[-1],
        "retrain_every": 30,
        "top_k": 2,
        "training": {**TINY, "horizon": HORIZON},
    }
    return bt.backtest_config(**{**values, **changes})


def _inputs(window, days, features, prices, config):
    reads = bt.window_reads(window, days, config)
    wanted = pd.to_datetime(list(reads.features))
    return (
        features[features["date"].isin(wanted)],
        prices[prices["date"].isin(pd.to_datetime(list(reads.prices)))],
    )


# -- the plan ------------------------------------------------------------------------------
def test_windows_retrain_every_n_sessions_and_score_up_to_the_next_retrain():
    days = [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(10)]
    windows = bt.plan_windows(days, 4)
    assert [(w.retrain, w.last) for w in windows] == [
        (days[0], days[3]),
        (days[4], days[7]),
        (days[8], days[9]),
    ]
    with pytest.raises(ConfigError, match="no sessions"):
        bt.plan_windows([], 4)


def test_a_rolling_window_reads_its_dates_plus_the_embargo_and_lookback(panel):
    _, _, days = panel
    config = _config(days, train_window=60)
    window = bt.plan_windows([d for d in days if d >= config.start], 30)[1]
    reads = bt.window_reads(window, days, config)
    first = days.index(window.retrain) - (60 + HORIZON + TINY["lookback"])
    assert reads.prices == tuple(days[first : days.index(window.retrain)])
    assert reads.features == reads.prices + tuple(
        d for d in days if window.retrain <= d <= window.last
    )
    expanding = bt.window_reads(window, days, _config(days))
    assert expanding.prices[0] == days[0]


def test_bad_parameters_are_config_errors_naming_them(panel):
    _, _, days = panel
    with pytest.raises(ConfigError, match="before start"):
        _config(days, end=days[0])
    with pytest.raises(ConfigError, match="backtest name"):
        _config(days, name="../x")
    with pytest.raises(ConfigError, match="models"):
        _config(days, training={"models": ["xgboost"]})


def test_a_backtest_past_the_data_is_refused_naming_where_the_data_ends():
    """Windows past the last validated date once trained copies of the last model and
    reported "completed, 0 rows"."""
    last = dt.date(2022, 4, 1)
    bt.check_within_data(last, last)
    with pytest.raises(ConfigError, match="after the last date with validated market data, "):
        bt.check_within_data(dt.date(2022, 5, 31), last)
    with pytest.raises(ConfigError, match="ingest the history first"):
        bt.check_within_data(last, None)


# -- point in time -------------------------------------------------------------------------
def test_no_window_trains_on_a_label_realised_on_or_after_its_retrain_date(panel):
    prices, features, days = panel
    config = _config(days)
    full = build_market_labels(prices, HORIZON)
    for window in bt.plan_windows([d for d in days if d >= config.start], 30):
        # all of the data, not only what `window_reads` picks: the engine's own guard is tested
        frame = bt.training_frame(window, features, prices, config)
        split = bt.window_split(frame, window, config)
        cut = days.index(window.retrain)
        labelled = frame.loc[frame[config.label].notna(), "date"].dt.date
        # the last label the window knows looks h sessions ahead and ends before the cut-off
        assert days.index(labelled.max()) == cut - HORIZON - 1
        assert split.validation_dates[-1].date() == days[cut - HORIZON - 1]
        gap = days.index(split.validation_dates[0].date()) - days.index(
            split.train_dates[-1].date()
        )
        assert gap == HORIZON + 1  # embargo of h dates between train and validation
        # the labels it knows are the true ones (not merely cut short)
        known = frame.dropna(subset=[config.label]).merge(full, on=["date", "ticker"])
        assert np.allclose(known[config.label + "_x"], known[config.label + "_y"])


def _perturb_from(prices: pd.DataFrame, day: dt.date) -> pd.DataFrame:
    """Prices with every row dated on or after `day` changed (a different future)."""
    changed = prices.copy()
    later = changed["date"] >= pd.Timestamp(day)
    factor = np.exp(np.random.default_rng(1).normal(0, 0.05, int(later.sum())).cumsum() / 10)
    for column in ("open", "high", "low", "close", "adj_close"):
        changed.loc[later, column] = changed.loc[later, column] * factor
    changed.loc[later, "volume"] = changed.loc[later, "volume"] * 3
    return changed


def test_data_after_a_cut_off_changes_neither_the_window_model_nor_earlier_predictions(panel):
    prices, features, days = panel
    config = _config(days)
    first, second = bt.plan_windows([d for d in days if d >= config.start], 30)[:2]
    changed = _perturb_from(prices, second.retrain)
    changed_features = build_market_features(changed)
    assert not changed_features[changed_features["date"] >= pd.Timestamp(second.retrain)].equals(
        features[features["date"] >= pd.Timestamp(second.retrain)]
    )
    fits = {}
    for label, (p, f) in {
        "original": (prices, features),
        "changed": (changed, changed_features),
    }.items():
        fits[label] = {
            w: bt.fit_window(w, f, p, config)
            for w in (first, second)  # all of the data
        }
    # the first window scores only dates before the second's cut-off: identical predictions
    pd.testing.assert_frame_equal(
        fits["original"][first].predictions, fits["changed"][first].predictions
    )
    # the second window's models learnt from data before its cut-off only: identical weights
    for kind in ("mlp", "gru"):
        before = fits["original"][second].models[kind].net.state_dict()
        after = fits["changed"][second].models[kind].net.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    # ... and were selected on the same validation labels
    assert fits["original"][second].validation == fits["changed"][second].validation
    # ... while what it scores (dated after the cut-off) did change
    assert not np.allclose(
        fits["original"][second].predictions["prediction"],
        fits["changed"][second].predictions["prediction"],
    )


def test_the_trees_report_their_cross_fitted_validation_ic_as_the_nightly_does(panel):
    """Their kept round was chosen on the window's validation dates; the IC a window logs for
    them is the cross-fitted one, and the ensemble is weighted on their cross-fitted
    predictions (finpipe.market.ensemble), as a nightly's."""
    prices, features, days = panel
    config = _config(days, training={**TINY, "models": ["mlp", "lgbm"], "horizon": HORIZON})
    window = bt.plan_windows([d for d in days if d >= config.start], 30)[0]
    fit = bt.fit_window(window, *_inputs(window, days, features, prices, config), config)
    trees = fit.models["lgbm"].selection
    assert trees["validation_ic"] != trees["best_round_validation_ic"]
    assert fit.validation["lgbm"]["ic"] == trees["validation_ic"]


def test_every_window_model_records_the_last_date_it_learnt_from(panel, tmp_path):
    """As every nightly model does (`finpipe.market.pipeline.learnt_through`): a window's
    models learnt from prices through the session before its retrain date (the last
    validation label's), and say so in the folder they are saved to, so a backtest model
    promoted or compared later is never judged on those dates. They recorded nothing."""
    prices, features, days = panel
    config = _config(
        days, training={**TINY, "models": ["mlp", "lgbm", "ensemble"], "horizon": HORIZON}
    )
    window = bt.plan_windows([d for d in days if d >= config.start], 30)[1]
    fit = bt.fit_window(window, *_inputs(window, days, features, prices, config), config)
    day_before = str(days[days.index(window.retrain) - 1])
    for kind, model in fit.models.items():
        model.save(tmp_path / kind)
        assert type(model).load(tmp_path / kind).learnt_through == day_before, kind
    assert fit.learnt_through == day_before  # the window's record and runs say it too


# -- resumable windows on a store ------------------------------------------------------------
@pytest.fixture(scope="module")
def stored(panel, tmp_path_factory):
    """A store with the panel's validated prices and features, every window run once."""
    prices, features, days = panel
    storage = Storage(tmp_path_factory.mktemp("backtest") / "home")
    for day, rows in prices.groupby("date"):
        storage.write_partition("validated", "market", day, rows)
    for day, rows in features.groupby("date"):
        storage.write_partition("features", "market", day, rows)
    # the boosted trees take the nets' path through every window (finpipe.market.candidates)
    config = _config(days, training={**TINY, "models": ["mlp", "lgbm"], "horizon": HORIZON})
    sessions = [d for d in days if config.start <= d <= config.end]
    outcomes = [
        bt.run_window(storage, config, planned)
        for planned in bt.plan_backtest(storage, config, sessions)
    ]
    return storage, config, sessions, outcomes


def test_windows_write_their_own_layer_readable_as_one_dataset(stored, panel):
    storage, config, sessions, outcomes = stored
    days = panel[2]
    assert [o.status for o in outcomes] == ["completed"] * 3
    folder = storage.location("backtests/unit/predictions/market")
    read = pd.read_parquet(folder)
    assert sorted(pd.to_datetime(read["date"]).dt.date.unique()) == sessions
    assert set(read["model"]) == {"mlp", "lgbm"}
    assert read.groupby("date")["ticker"].nunique().min() >= 6
    assert storage.partition_dates("predictions", "market") == []  # never the nightly's layer
    store = storage.backtest_store(config.name)
    for window in bt.plan_windows(sessions, config.retrain_every):  # as its models record
        through = bt.read_window_record(store, window)["learnt_through"]
        assert through == str(days[days.index(window.retrain) - 1])


def test_a_rerun_redoes_only_missing_or_stale_windows_with_identical_predictions(stored):
    storage, config, sessions, _ = stored
    store = storage.backtest_store(config.name)
    assert [p.done for p in bt.plan_backtest(storage, config, sessions)] == [True] * 3
    before = store.read_partitions("predictions", "market")
    second = bt.plan_windows(sessions, config.retrain_every)[1]
    store.delete_folder(store.state_key("market", "windows"))  # as after a crash, all lost...
    for planned in bt.plan_backtest(storage, config, sessions)[:1] + [
        bt.plan_backtest(storage, config, sessions)[2]
    ]:
        bt.run_window(storage, config, planned)  # ... and two of them redone since
    plan = bt.plan_backtest(storage, config, sessions)
    assert [p.window for p in plan if not p.done] == [second]
    bt.run_window(storage, config, plan[1])
    pd.testing.assert_frame_equal(store.read_partitions("predictions", "market"), before)
    # a changed feature partition read by the last window makes only that window stale
    last = sessions[-1]
    rows = storage.read_partition("features", "market", last)
    storage.write_partition("features", "market", last, rows.assign(return_5d=0.0))
    assert [p.done for p in bt.plan_backtest(storage, config, sessions)] == [True, True, False]
    # other training parameters make every window stale; portfolio parameters none
    assert not any(
        p.done
        for p in bt.plan_backtest(
            storage, config.model_copy(update={"train_window": 100}), sessions
        )
    )
    storage.write_partition("features", "market", last, rows)
    cheaper = config.model_copy(update={"cost_bps": 0.0, "top_k": 3})
    assert all(p.done for p in bt.plan_backtest(storage, cheaper, sessions))


def test_the_report_trades_every_model_and_the_oracle_and_costs_lower_returns(stored, panel):
    storage, config, _, _ = stored
    predictions, prices, _ = bt.read_backtest(storage, config)
    oracle = generate_market_panel(MarketSyntheticConfig(tickers=8, days=305, seed=4))
    report = bt.evaluate(predictions, prices, config, oracle.expected_return)
    strategies = set(zip(report.summary["signal"], report.summary["strategy"], strict=True))
    for signal in ("mlp", "oracle"):
        assert {(signal, s) for s in bt.STRATEGIES} <= strategies
    assert ("equal_weight", "benchmark") in strategies
    free = bt.evaluate(predictions, prices, config.model_copy(update={"cost_bps": 0.0}))
    costly = report.results["mlp"]["long_short"].net
    assert (free.results["mlp"]["long_short"].net - costly).min() > 0
    metrics = report.metrics()
    daily = report.daily_ic.query("signal == 'mlp'")
    assert metrics["mlp/ic"] == pytest.approx(daily["ic"].mean())
    assert metrics["mlp/rank_ic"] == pytest.approx(daily["rank_ic"].mean())
    assert metrics["mlp/icir"] == pytest.approx(daily["ic"].mean() / daily["ic"].std(ddof=1))
    assert metrics["mlp/rank_ic"] != metrics["mlp/ic"]
    # the oracle is measured on the rows the models scored only, not on the whole panel it
    # came with: a ticker left unscored on a date is out of its book that date too
    signals = bt.signals_of(predictions, oracle.expected_return)
    assert set(signals["oracle"]["date"]) == set(predictions["date"])
    assert oracle.expected_return["date"].nunique() > predictions["date"].nunique()
    first = predictions["date"].min()
    unscored = predictions["ticker"].iloc[0]
    fewer = predictions[(predictions["date"] != first) | (predictions["ticker"] != unscored)]
    fewer_oracle = bt.signals_of(fewer, oracle.expected_return)["oracle"]
    on_first = fewer_oracle.loc[fewer_oracle["date"] == first, "ticker"]
    assert unscored not in set(on_first) and len(on_first) > 0
    # the limited book replaces at most `replacements` names a day: not the plain top k
    limited, plain = (report.results["mlp"][s].gross for s in ("long_only_limited", "long_only"))
    assert config.replacements < config.top_k and not limited.equals(plain)
    markdown = bt.report_markdown(config, report, [])
    assert "| oracle | long_short |" in markdown and "## IC by year" in markdown
    # drawn one at a time, as the flow logs them: a report never holds its figures all open
    # (pyplot warns past 20, two a signal) and closing each frees it
    import matplotlib.pyplot as plt

    open_before, paths = len(plt.get_fignums()), []
    for path, figure in report.figures():
        assert len(plt.get_fignums()) == open_before + 1
        paths.append(path)
        plots.close(figure)
    assert {"plots/cumulative_return.png", "plots/drawdown.png"} <= set(paths)
    assert {f"plots/ic_{signal}.png" for signal in report.results} <= set(paths)


def test_the_run_summary_says_when_a_book_was_wiped_out():
    """A long-short book whose short leg more than doubles loses all its value: the Prefect
    summary's portfolio table names that session (it showed only the figures, which after it
    average a flat 0 in, so a ruined book read as an ordinary, poor strategy)."""
    from types import SimpleNamespace

    from finpipe import portfolio

    dates = pd.bdate_range("2024-01-01", periods=5)
    returns = pd.DataFrame({"A": [0.0, 0.0, 0.0, 0.1, 0.1], "B": [0.0, 0.0, 2.5, 0.0, 0.0]})
    weights = {d: pd.Series({"A": 0.5, "B": -0.5}) for d in dates[:3]}
    ruined = portfolio.run_portfolio(weights, returns.set_axis(dates), cost_bps=0.0)
    kept = portfolio.run_portfolio(weights, returns.assign(B=0.0).set_axis(dates), cost_bps=0.0)
    summary = portfolio.summarise({"long_short": ruined, "long_only": kept}).assign(signal="mlp")
    lines = bt._report_tables(SimpleNamespace(summary=summary, ic_by_year=pd.DataFrame()))
    header, _, *table = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:6]
    ]
    rows = {cells[1]: cells for cells in table}
    column = header.index("wiped out")
    assert rows["long_short"][column] == "2024-01-03"
    assert rows["long_only"][column] == ""


def test_the_command_line_documents_every_parameter_of_the_flow():
    from finpipe.flows.backtest import backtest
    from typer.testing import CliRunner

    from finpipe.cli import app

    result = CliRunner().invoke(app, ["run", "backtest", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    flow_parameters = set(backtest.parameters.properties) - {"training"}  # --max-epochs for it
    for name in flow_parameters:
        assert f"--{name.replace('_', '-')}" in result.output, name
    assert "--max-epochs" in result.output and "expanding" in result.output


def test_a_training_override_the_backtest_sets_itself_is_refused_not_replaced():
    merged = bt.backtest_training({"max_epochs": 3}, ["mlp", "gru"], 5)
    assert merged == {
        "max_epochs": 3,
        "models": ["mlp", "gru"],
        "horizon": 5,
        "history_dates": None,
    }
    with pytest.raises(ConfigError, match="training sets models, horizon, which the backtest sets"):
        bt.backtest_training({"models": ["tcn"], "horizon": 10}, ["mlp"], 5)


def test_a_ticker_without_adj_close_is_traded_on_its_close_as_its_label_reads_it():
    """Beside tickers with adj_close, one delivered with close alone: its label and its
    portfolio return both come from the close, so a model that ranks it first earns its move."""
    days = pd.bdate_range("2024-01-01", periods=12)
    rows = []
    for step, day in enumerate(days):
        rows += [
            {"date": day, "ticker": "AAA", "close": 10.0, "adj_close": 10.0},
            {"date": day, "ticker": "BBB", "close": 10.0 * 1.1**step, "adj_close": np.nan},
            {"date": day, "ticker": "CCC", "close": 20.0, "adj_close": 20.0},
        ]
    prices = pd.DataFrame(rows).astype({"ticker": "string"})
    ranks = {"AAA": 0.0, "BBB": 1.0, "CCC": 0.5}
    predictions = pd.DataFrame(
        [
            {"date": day, "ticker": t, "prediction": score, "model": "m"}
            for day in days[:8]
            for t, score in ranks.items()
        ]
    ).astype({"ticker": "string"})
    config = bt.BacktestConfig(
        start=days[0].date(), end=days[7].date(), top_k=1, cost_bps=0.0,
        training={"horizon": 1},
    )  # fmt: skip
    report = bt.evaluate(predictions, prices, config)
    gross = report.results["m"]["long_only"].gross
    assert len(gross) > 0 and gross.mean() > 0.05  # BBB's 10% a day, less the universe's
    assert report.metrics()["m/ic"] > 0
