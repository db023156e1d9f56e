"""Settings: one place, environment overrides, telemetry off by default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


_FREE_A_LARGE_ARRAY = """
import os
import numpy as np
from finpipe.settings import load_settings, prepare_environment

def resident_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

prepare_environment(load_settings())
block = np.ones((64 << 20) // 8)  # 64 MiB, touched
held = resident_bytes()
del block
print(held - resident_bytes())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator is tuned on Linux only")
@pytest.mark.parametrize("tuning", ["1", "0"])
def test_allocator_keeps_freed_blocks_for_reuse_unless_turned_off(tmp_path, tuning):
    env = {**os.environ, "FINPIPE_HOME": str(tmp_path), "FINPIPE_MALLOC_TUNING": tuning}
    run = subprocess.run(
        [sys.executable, "-c", _FREE_A_LARGE_ARRAY], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    released_mib = int(run.stdout.strip()) / 2**20
    if tuning == "1":  # kept in the heap for the next block's arrays
        assert released_mib < 8
    else:  # glibc's default: a 64 MiB array is unmapped on free
        assert released_mib > 56
