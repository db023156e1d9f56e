"""The `backtest` flow end to end: Prefect local mode, MLflow on SQLite, a small stored history.

One backtest (3 windows, two at a time) and its re-run with the same parameters, shared by the
module's tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from finpipe.market.features import update_market_features
from finpipe.market.synthetic import MarketSyntheticConfig, generate_market_panel
from finpipe.settings import Settings
from finpipe.storage import Storage
from tests.conftest import finpipe_home

pytestmark = pytest.mark.slow

PARAMETERS = {
    "name": "flow_test",
    "retrain_every": 25,
    "models": ["mlp"],
    "top_k": 2,
    "cost_bps": 10.0,
    "concurrency": 2,
    "training": {"max_epochs": 2, "hidden": 8},
}


@dataclass
class Ran:
    settings: Settings
    first: dict
    second: dict
    flow_run_ids: list
    sessions: list
    files_before_rerun: dict


def _files(folder) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    from finpipe.flows.backtest import backtest

    root = tmp_path_factory.mktemp("backtest_flow")
    prices = generate_market_panel(MarketSyntheticConfig(tickers=8, days=320, seed=6)).prices
    with finpipe_home(root / "home") as settings:
        storage = Storage(settings.home)
        for day, rows in prices.groupby("date"):
            storage.write_partition("validated", "market", day, rows)
        last = storage.partition_dates("validated", "market")[-1]
        update_market_features(storage, last)
        days = storage.partition_dates("features", "market")
        start, end = days[250], days[-1]
        states = [backtest(start=start, end=end, **PARAMETERS, return_state=True)]
        store = storage.backtest_store("flow_test")
        before = _files(store.local_path())
        states.append(backtest(start=start, end=end, **PARAMETERS, return_state=True))
        yield Ran(
            settings,
            states[0].result(),
            states[1].result(),
            [s.state_details.flow_run_id for s in states],
            [d for d in days if start <= d <= end],
            before,
        )


def test_every_window_is_scored_out_of_sample_into_the_backtest_layer(ran):
    assert [w["status"] for w in ran.first["windows"]] == ["completed"] * 3
    storage = Storage(ran.settings.home)
    read = pd.read_parquet(storage.location("backtests/flow_test/predictions/market"))
    assert sorted(pd.to_datetime(read["date"]).dt.date.unique()) == ran.sessions
    retrains = sorted(pd.to_datetime(read["retrain_date"]).dt.date.unique())
    assert retrains == [ran.sessions[0], ran.sessions[25], ran.sessions[50]]
    assert storage.partition_dates("predictions", "market") == []


def test_each_window_model_is_a_nested_unregistered_run_under_the_backtest_run(ran):
    mlflow.set_tracking_uri(ran.settings.tracking_uri)
    client = MlflowClient()
    parent = client.get_run(ran.first["run_id"])
    assert parent.info.run_name == "backtest-flow_test"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    names = sorted(r.info.run_name for r in children)
    assert names == [f"mlp-{ran.sessions[i]}" for i in (0, 25, 50)]
    assert all("validation_ic" in r.data.metrics for r in children)
    logged = client.search_logged_models([parent.info.experiment_id])
    assert sorted(m.source_run_id for m in logged) == sorted(r.info.run_id for r in children)
    # Named by domain and candidate, tagged with the backtest and the window it was fitted for.
    assert {m.name for m in logged} == {"market-mlp"}
    windows = {r.info.run_id: r.data.params["retrain_date"] for r in children}
    for model in logged:
        assert model.tags["finpipe.domain"] == "market" and model.tags["finpipe.candidate"] == "mlp"
        assert model.tags["finpipe.backtest"] == "flow_test"
        assert model.tags["retrain_date"] == windows[model.source_run_id]
    assert client.search_registered_models() == []  # never registered, never promoted
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/cumulative_return.png", "plots/drawdown.png", "plots/ic_mlp.png"} <= plots
    assert {"plots/deciles_mlp.png"} <= plots
    assert parent.data.metrics["mlp/long_short/information_ratio"] == pytest.approx(
        ran.first["metrics"]["mlp/long_short/information_ratio"]
    )


def test_the_run_publishes_the_portfolio_table_as_a_markdown_artifact(ran):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[ran.flow_run_ids[0]])
            )
        )
    assert artifact.key == "backtest-flow-test" and artifact.type == "markdown"
    text = json.loads(artifact.data) if artifact.data.startswith('"') else artifact.data
    assert "| mlp | long_short |" in text and "| equal_weight | benchmark |" in text
    assert text.count("| completed |") == 3


def test_a_rerun_with_the_same_parameters_redoes_nothing_and_reports_the_same(ran):
    assert [w["status"] for w in ran.second["windows"]] == ["done earlier"] * 3
    # The re-run's own MLflow run leads to the windows' model runs, nested under the first.
    mlflow.set_tracking_uri(ran.settings.tracking_uri)
    client = MlflowClient()
    first, second = (client.get_run(r["run_id"]) for r in (ran.first, ran.second))
    path = client.download_artifacts(second.info.run_id, "tables/windows.json")
    table = json.loads(Path(path).read_text())
    windows = pd.DataFrame(table["data"], columns=table["columns"])
    assert windows["status"].tolist() == ["done earlier"] * 3
    parents = {client.get_run(run).data.tags["mlflow.parentRunId"] for run in windows["run"]}
    assert parents == {first.info.run_id}
    store = Storage(ran.settings.home).backtest_store("flow_test")
    assert _files(store.local_path()) == ran.files_before_rerun  # not one file rewritten
    assert ran.second["metrics"] == ran.first["metrics"]
    pd.testing.assert_frame_equal(
        pd.DataFrame(ran.second["summary"]), pd.DataFrame(ran.first["summary"])
    )


def test_a_forced_rerun_plans_every_window_to_be_redone(ran, monkeypatch):
    """The windows are done from the same data and parameters: only force redoes them (the
    run is stopped once planned, before it trains anything)."""
    import finpipe.flows.backtest as flow

    from finpipe.backtest import plan_backtest

    class Planned(Exception):
        pass

    planned = []

    def plan_and_stop(storage, config, sessions, force=False):
        planned.append([window.done for window in plan_backtest(storage, config, sessions)])
        planned.append(
            [window.done for window in plan_backtest(storage, config, sessions, force=force)]
        )
        raise Planned

    monkeypatch.setattr(flow, "plan_backtest", plan_and_stop)
    start, end = ran.sessions[0], ran.sessions[-1]
    with finpipe_home(ran.settings.home), pytest.raises(Planned):
        flow.backtest(start=start, end=end, **PARAMETERS, force=True)
    assert planned == [[True] * 3, [False] * 3]
