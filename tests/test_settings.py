"""Settings: one place, environment overrides, telemetry off by default."""

from __future__ import annotations

import os

from finpipe.settings import TELEMETRY_OFF, Settings


def test_defaults_live_under_the_storage_root(monkeypatch, tmp_path):
    monkeypatch.setenv("FINPIPE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")  # MLflow's own
    settings = Settings()
    assert settings.home == tmp_path
    assert settings.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert settings.artifact_root == (tmp_path / "mlartifacts").as_uri()
    assert settings.experiment_name("market") == "finpipe-market"
    assert settings.model_name("credit") == "finpipe-credit"


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("FINPIPE_HOME", str(tmp_path / "x" / ".." / "y"))
    monkeypatch.setenv("FINPIPE_MLFLOW_TRACKING_URI", "http://127.0.0.1:5555")
    monkeypatch.setenv("FINPIPE_MODEL_PREFIX", "desk7")
    settings = Settings()
    assert settings.home == tmp_path / "y"
    assert settings.tracking_uri == "http://127.0.0.1:5555"
    assert settings.model_name("market") == "desk7-market"


def test_telemetry_is_off_once_finpipe_is_imported():
    import finpipe  # noqa: F401

    for name in TELEMETRY_OFF:
        assert name in os.environ
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"].lower() in {"true", "1"}
    assert os.environ["GX_ANALYTICS_ENABLED"].lower() in {"false", "0"}
