"""Shared fixtures: a temporary FINPIPE_HOME per test, offline settings, the shared sample data."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Quiet and offline before any of Prefect, MLflow or GX is imported by a test module.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _remove_in_owner(pid: int, folder: str) -> None:
    """Remove `folder` if this is still process `pid`, the one that made it."""
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """Folder of the real sample data sets shipped in the repository (`datasets/`)."""
    folder = REPO_ROOT / "datasets"
    if not (folder / "stocks_ohlcv.csv.gz").exists():
        pytest.fail(f"sample data not found in {folder}: the checkout is incomplete")
    return folder


# Prefect's local (ephemeral) mode keeps its database under PREFECT_HOME: one throwaway folder
# for the whole test session, set before Prefect is first imported, removed when the session's
# process exits (not by a forked crash-test child, which inherits this exit hook).
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="finpipe-prefect-")
    atexit.register(_remove_in_owner, os.getpid(), os.environ["PREFECT_HOME"])
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The local API server gets a minute to start (default 20 s): on a busy 2-core CI machine the
# first flow run of the session has timed out waiting for it.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("FINPIPE_MLFLOW_TRACKING_URI", None)


@contextlib.contextmanager
def finpipe_home(path: Path):
    """Point finpipe (storage and MLflow) at `path` for the duration of the block."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINPIPE_HOME", str(path))
        from finpipe.settings import load_settings

        yield load_settings()


@pytest.fixture
def home(tmp_path):
    """A fresh FINPIPE_HOME for one test; yields its Settings."""
    with finpipe_home(tmp_path / "home") as settings:
        yield settings


@pytest.fixture(autouse=True)
def seeded_global_rngs():
    """Seed torch's and numpy's global RNGs before every test, so a test that builds a net with
    default initialisation sees the same weights whatever ran before it in the session."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(0)
