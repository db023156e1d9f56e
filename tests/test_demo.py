"""`finpipe demo` end to end for the market domain, on a smaller panel than the README's demo
(8 tickers, one night, a 2-epoch MLP): the nightly, then the short backtest the demo adds, with
its report in MLflow and its predictions in their own layer."""

from __future__ import annotations

import dataclasses

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from finpipe.backtest import DEMO_NAME
from finpipe.storage import Storage

pytestmark = pytest.mark.slow

NIGHT = {"models": ["mlp"], "max_epochs": 2, "hidden": 8, "seed_average": {"mlp": 1}}


def test_the_market_demo_runs_a_short_backtest_and_says_where_its_report_is(home, monkeypatch):
    from finpipe.cli import app
    from finpipe.market import pipeline
    from finpipe.market.synthetic import plan_market_demo

    def small(settings):
        nights = plan_market_demo(settings, tickers=8, days=320, nights=1)
        return [dataclasses.replace(night, training=NIGHT) for night in nights]

    monkeypatch.setattr(pipeline, "plan_market_demo", small)
    result = CliRunner().invoke(app, ["demo", "--domains", "market"])
    assert result.exit_code == 0, result.output

    storage = Storage(home.home)
    layer = storage.backtest_store(DEMO_NAME)
    scored = layer.partition_dates("predictions", "market")
    features = storage.partition_dates("features", "market")
    assert scored == features[-60:]  # the last 60 sessions, out of sample
    assert len(storage.partition_dates("predictions", "market")) == 1  # the nightly's, apart
    where = layer.location(layer.layer_key("predictions", "market"))
    assert f"MLflow run backtest-{DEMO_NAME} (experiment finpipe-market" in result.stdout
    assert where in result.stdout
    assert f"FINPIPE_HOME={home.home} " in result.stdout  # then the command that says status
    assert result.stdout.rstrip().endswith("/finpipe status")

    mlflow.set_tracking_uri(home.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("finpipe-market")
    [parent] = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.runName = 'backtest-{DEMO_NAME}'"
    )
    assert parent.info.status == "FINISHED"
    windows = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in windows) == [
        f"mlp-{features[i]}" for i in (-60, -40, -20)
    ]
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/cumulative_return.png" in plots
    assert "mlp/long_short/information_ratio" in parent.data.metrics
