"""A tracking server that goes away mid-run, and secrets that must never reach the logs."""

from __future__ import annotations

import datetime as dt

import pytest
from mlflow import MlflowClient

from finpipe.errors import TrackingUnavailable
from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    write_vendor_files,
)
from finpipe.storage import Storage
from tests.servers import MlflowServer

pytestmark = pytest.mark.slow

SECRET = "S3CRET-T0KEN-4f9a"
TINY = {"max_epochs": 2, "models": ["mlp"], "hidden": 8}


def _day(path) -> dt.date:
    return dt.date.fromisoformat(path.stem.removeprefix("market_"))


def test_tracking_server_down_mid_run_fails_clearly_and_changes_nothing(
    tmp_path, monkeypatch, capfd, caplog
):
    from finpipe.flows.nightly import nightly

    panel = generate_market_panel(MarketSyntheticConfig(tickers=6, days=320, seed=4))
    files = write_vendor_files(panel.prices, tmp_path / "drop", daily_files=2)
    home = tmp_path / "home"
    monkeypatch.setenv("FINPIPE_HOME", str(home))
    # Credentials come from the environment, as MLflow reads them; never from code or config.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "finpipe")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

    with MlflowServer(tmp_path / "mlflow") as server:
        monkeypatch.setenv("FINPIPE_MLFLOW_TRACKING_URI", server.url)
        first = nightly(
            domain="market",
            as_of=_day(files[1]),
            inputs=[str(files[0]), str(files[1])],
            training=TINY,
        )
        assert first["promotion"]["promoted"] is True
        port = server.port

    # The server is gone when night 2 reaches training (validation and features run first).
    # A URI carrying credentials must show up masked in the error.
    monkeypatch.setenv("FINPIPE_MLFLOW_TRACKING_URI", f"http://finpipe:{SECRET}@127.0.0.1:{port}")
    with pytest.raises(TrackingUnavailable, match=r"http://\*\*\*@127\.0\.0\.1:\d+ is unreachable"):
        nightly(domain="market", as_of=_day(files[2]), inputs=[str(files[2])], training=TINY)
    storage = Storage(home)
    assert _day(files[2]) in storage.partition_dates("features", "market")
    assert _day(files[2]) not in storage.partition_dates("predictions", "market")

    # What the server would serve again is what its store holds: read the store itself
    # rather than start the server a second time (about 8 s on an idle machine).
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("finpipe-market", "champion")
    assert str(champion.version) == first["promotion"]["challenger_version"]
    assert len(client.search_model_versions("name='finpipe-market'")) == 1

    captured = capfd.readouterr()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert SECRET not in captured.out + captured.err + logged
