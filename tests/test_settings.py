"""Settings: one place, environment overrides, telemetry off by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from finpipe.errors import ConfigError
from finpipe.settings import TELEMETRY_OFF, Settings, describe_invalid, load_settings


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


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        (
            "FINPIPE_MAX_FILE_MB",
            "0",
            "FINPIPE_MAX_FILE_MB='0': should be greater than or equal to 1",
        ),
        (
            "FINPIPE_PROMOTION_FLOOR",
            "maybe",
            "FINPIPE_PROMOTION_FLOOR='maybe': should be true or false (also 1/0, yes/no, on/off)",
        ),
        (
            "FINPIPE_DROP_ROOTS",
            "/tmp/x",
            """FINPIPE_DROP_ROOTS='/tmp/x': should be a JSON list, e.g. ["/data/drop"]""",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable_its_value_and_what_it_takes(
    monkeypatch, name, value, says
):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert str(raised.value) == f"invalid settings: {says}"


def test_several_bad_settings_are_each_named(monkeypatch):
    monkeypatch.setenv("FINPIPE_MAX_FILE_MB", "x")
    monkeypatch.setenv("FINPIPE_MALLOC_TUNING", "maybe")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    assert "\n" not in message
    assert "FINPIPE_MAX_FILE_MB='x': should be a valid integer" in message
    assert "; FINPIPE_MALLOC_TUNING='maybe': should be true or false" in message


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("FINPIPE_CALENDARS", "notjson", """should be a JSON object, e.g. {"market": "XNYS"}"""),
        (
            "FINPIPE_NIGHTLY_DOMAINS",
            "market,credit",
            """should be a JSON list, e.g. ["market", "credit"]""",
        ),
        (
            "FINPIPE_NIGHTLY_INPUTS",
            "/data/drop/market_*.csv",
            """should be a JSON object, e.g. {"market": ["/data/drop/market_*.csv"]}""",
        ),
    ],
)
def test_a_schedule_setting_that_is_not_json_is_one_line_with_an_example(
    monkeypatch, name, value, says
):
    from finpipe.schedule import load_schedule_settings

    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_schedule_settings()
    assert str(raised.value) == f"invalid schedule settings: {name}={value!r}: {says}"


def test_a_home_that_is_a_file_is_refused_in_one_line(monkeypatch, tmp_path):
    file = tmp_path / "home"
    file.write_text("")
    monkeypatch.setenv("FINPIPE_HOME", str(file))
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert str(raised.value) == (
        f"FINPIPE_HOME={file} is a file, not a folder: set FINPIPE_HOME to a folder (finpipe "
        "creates it if it does not exist)"
    )
    monkeypatch.setenv("FINPIPE_HOME", str(file / "finpipe"))
    with pytest.raises(ConfigError, match=r"is under a file \(.*home\), not a folder"):
        load_settings()
    monkeypatch.setenv("FINPIPE_HOME", "s3://bucket/fp")
    monkeypatch.setenv("FINPIPE_LOCAL_DIR", str(file))
    with pytest.raises(ConfigError, match=f"^FINPIPE_LOCAL_DIR={file} is a file, not a folder"):
        load_settings()
    assert file.read_text() == ""


def test_an_empty_path_setting_is_unset_not_the_working_directory(monkeypatch, tmp_path):
    """`FINPIPE_HOME=` is the documented default, ~/.finpipe, as if it were not set."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    for name in ("FINPIPE_HOME", "FINPIPE_LOCAL_DIR", "FINPIPE_CREDIT_CONFIG"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("FINPIPE_CUSTOMERS_CONFIG", " ")
    settings = load_settings()
    assert settings.home == (Path.home() / ".finpipe").resolve()
    assert (settings.local_dir, settings.credit_config) == (None, None)
    assert settings.customers_config == "synthetic"
    assert list(tmp_path.iterdir()) == []


def test_a_bad_run_parameter_reads_as_field_value_and_what_is_allowed():
    import datetime as dt

    from pydantic import ValidationError

    from finpipe.backtest import BacktestConfig
    from finpipe.domains import get_domain

    with pytest.raises(ValidationError) as models:
        get_domain("market").training_config(models=["mlp", "foo"])
    assert describe_invalid(models.value) == (
        "models='foo': should be 'mlp', 'gru', 'tcn', 'lgbm' or 'ensemble'"
    )
    with pytest.raises(ValidationError) as dates:
        BacktestConfig.model_validate({"start": dt.date(2023, 10, 13), "end": dt.date(2023, 10, 1)})
    assert describe_invalid(dates.value) == "end 2023-10-01 is before start 2023-10-13"


# Imports every finpipe module (library, tasks, flows) and prints the variables that changed.
# Libraries that set variables of their own on import (scikit-learn's OpenMP switches, the
# jemalloc options of Polars and MLflow, MLflow's telemetry session) are imported first, so only
# finpipe's own changes show.
_IMPORT_EVERY_MODULE = """
import importlib, json, os, pkgutil
for library in ("sklearn", "polars", "mlflow"):
    try:
        importlib.import_module(library)
    except ImportError:
        pass
before = dict(os.environ)
names = []
for package in ("finpipe", "finpipe.tasks", "finpipe.flows"):
    module = importlib.import_module(package)
    names.append(package)
    names += [m.name for m in pkgutil.walk_packages(module.__path__, package + ".")]
for name in names:
    importlib.import_module(name)
after = dict(os.environ)
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
print(json.dumps({"modules": names, "changed": changed}))
"""


def _clean_environment(tmp_path) -> dict[str, str]:
    """Return a minimal environment: no telemetry switches, a throwaway home and storage root."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "FINPIPE_HOME": str(tmp_path / "finpipe"),
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }


def _run_clean(script: str, tmp_path) -> dict:
    """Run `script` in a fresh interpreter with a clean environment; return the JSON object
    its last output line prints."""
    run = subprocess.run(
        [sys.executable, "-c", script],
        env=_clean_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_importing_every_finpipe_module_leaves_the_environment_unchanged(tmp_path):
    result = _run_clean(_IMPORT_EVERY_MODULE, tmp_path)
    assert {"finpipe.validation", "finpipe.gx_runtime", "finpipe.flows.nightly"} <= set(
        result["modules"]
    )
    assert result["changed"] == []


_START_EVERY_FLOW = """
import datetime as dt, json, os
from finpipe.flows.backfill import backfill
from finpipe.flows.backtest import backtest
from finpipe.flows.nightly import nightly
from finpipe.flows.score import score
from finpipe.flows.train import train
from finpipe.settings import TELEMETRY_OFF

clean = dict(os.environ)
started = {}
day = dt.date(2024, 1, 2)
market, dates = {"domain": "market"}, {"start": day, "end": day}
flows = ((nightly, market), (train, market), (score, market), (backfill, {**market, **dates}),
         (backtest, dates))
for flow, kwargs in flows:
    os.environ.clear()
    os.environ.update(clean)
    try:  # outside a Prefect run, on an empty store: each stops early, the set-up done first
        flow.fn(**kwargs)
    except Exception:
        pass
    started[flow.name] = {name: os.environ.get(name) for name in TELEMETRY_OFF}
print(json.dumps(started))
"""


def test_every_flow_switches_telemetry_off_as_it_starts(tmp_path):
    started = _run_clean(_START_EVERY_FLOW, tmp_path)
    assert sorted(started) == ["backfill", "backtest", "nightly", "score", "train"]
    for flow, variables in started.items():
        assert variables == TELEMETRY_OFF, flow


_IMPORT_THE_DOMAINS_THEN_DRAW = """
import json, sys
from finpipe.domains import get_domain
for name in ("market", "credit", "customers"):
    get_domain(name)
drawn_after = ("lightgbm", "matplotlib.pyplot", "sklearn.calibration")
before = sorted(name for name in drawn_after if name in sys.modules)
import matplotlib
matplotlib.use("svg")  # another backend chosen before finpipe draws: it draws on Agg
from finpipe.plots import close, learning_curve
figure = learning_curve([{"epoch": 1, "train_loss": 1.0, "validation_loss": 1.2}], "loss")
print(json.dumps({"before": before, "backend": matplotlib.get_backend().lower(),
                  "drawn": type(figure).__name__}))
close(figure)
"""


def test_a_domains_code_imports_no_plotting_or_tree_library_until_it_draws_or_fits(tmp_path):
    """A scoring run, a Dask worker and a command that refuses import a domain's pipeline but
    draw nothing and fit no trees: pyplot, LightGBM and sklearn's calibration (about 1.2 s of
    each process's start) wait for first use, and a figure is then drawn headless."""
    result = _run_clean(_IMPORT_THE_DOMAINS_THEN_DRAW, tmp_path)
    assert result == {"before": [], "backend": "agg", "drawn": "Figure"}


_PREPARE_AFTER_MLFLOW = """
import json, os
import mlflow  # imported before the set-up: MLflow has started its telemetry client
from mlflow.telemetry import get_telemetry_client
from finpipe.settings import load_settings, prepare_environment

had_client = get_telemetry_client() is not None
prepare_environment(load_settings())
print(json.dumps({
    "had_client": had_client,
    "client": get_telemetry_client() is not None,
    "environment": {name: os.environ.get(name) for name in
                    ("DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "GX_ANALYTICS_ENABLED")},
}))
"""


def test_prepare_environment_turns_telemetry_off_unless_the_user_chose(tmp_path):
    env = {**_clean_environment(tmp_path), "DO_NOT_TRACK": "0"}  # the user's choice stays
    run = subprocess.run(
        [sys.executable, "-c", _PREPARE_AFTER_MLFLOW],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["environment"] == {
        "DO_NOT_TRACK": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GX_ANALYTICS_ENABLED": "false",
    }
    assert (result["had_client"], result["client"]) == (True, False)


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


def test_a_users_own_prefect_home_is_kept(monkeypatch, tmp_path):
    from finpipe.settings import prepare_environment

    monkeypatch.setenv("FINPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FINPIPE_MALLOC_TUNING", "0")
    for name in TELEMETRY_OFF:  # so that the test's end restores whatever they were
        monkeypatch.setenv(name, os.environ.get(name, TELEMETRY_OFF[name]))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "mine"))
    prepare_environment(Settings())
    assert os.environ["PREFECT_HOME"] == str(tmp_path / "mine") and (tmp_path / "mine").is_dir()
    monkeypatch.delenv("PREFECT_HOME")
    prepare_environment(Settings())
    assert os.environ["PREFECT_HOME"] == str(tmp_path / "home" / "prefect")


def test_prefect_gets_a_minute_to_start_its_local_server_unless_the_user_chose(
    monkeypatch, tmp_path
):
    """Prefect's 20 s default timed a first `finpipe demo` out on a busy 2-core machine; the
    README's settings table states the default finpipe gives it."""
    from pathlib import Path

    from finpipe.settings import PREFECT_STARTUP_TIMEOUT_SECONDS, prepare_environment

    monkeypatch.setenv("FINPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FINPIPE_MALLOC_TUNING", "0")
    for name in TELEMETRY_OFF:  # so that the test's end restores whatever they were
        monkeypatch.setenv(name, os.environ.get(name, TELEMETRY_OFF[name]))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    timeout = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    monkeypatch.delenv(timeout, raising=False)
    prepare_environment(Settings())
    assert os.environ[timeout] == "60"
    monkeypatch.setenv(timeout, "300")
    prepare_environment(Settings())
    assert os.environ[timeout] == "300"
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"| `{timeout}` | `{PREFECT_STARTUP_TIMEOUT_SECONDS}` " in readme


def test_the_defaults_are_the_ones_the_readme_states(monkeypatch, tmp_path):
    """Each plain default in the README's settings table is the code's."""
    from pathlib import Path

    monkeypatch.setenv("FINPIPE_HOME", str(tmp_path))
    for name in list(os.environ):
        if name.startswith("FINPIPE_") and name != "FINPIPE_HOME":
            monkeypatch.delenv(name)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    stated = {}
    for line in readme.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:3]]
        if len(cells) == 2 and cells[0].startswith("`FINPIPE_") and cells[1].startswith("`"):
            stated[cells[0].strip("`")] = cells[1].strip("`")
    settings = Settings()
    plain = {
        "FINPIPE_MAX_FILE_MB": settings.max_file_mb,
        "FINPIPE_PROMOTION_FLOOR": settings.promotion_floor,
        "FINPIPE_DATE_ORDER": settings.date_order,
        "FINPIPE_MARKET_CLOSE_IS_ADJUSTED": settings.market_close_is_adjusted,
        "FINPIPE_MALLOC_TUNING": settings.malloc_tuning,
        "FINPIPE_EXPERIMENT_PREFIX": settings.experiment_prefix,
        "FINPIPE_MODEL_PREFIX": settings.model_prefix,
        "FINPIPE_CUSTOMERS_CONFIG": settings.customers_config,
    }
    for name, value in plain.items():
        said = stated[name]
        if isinstance(value, bool):
            assert said in ({"true", "1"} if value else {"false", "0"}), name
        else:
            assert said == str(value).lower(), name


def test_an_object_store_home_keeps_local_state_where_finpipe_local_dir_says(monkeypatch, tmp_path):
    monkeypatch.setenv("FINPIPE_HOME", "s3://team-bucket/fp")
    monkeypatch.setenv("FINPIPE_LOCAL_DIR", str(tmp_path / "local"))
    settings = Settings()
    assert settings.local_home == tmp_path / "local"
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'local' / 'mlflow.db'}"
    monkeypatch.delenv("FINPIPE_LOCAL_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    default = Settings().local_home
    assert default == tmp_path / "user" / ".cache" / "finpipe" / "s3" / "team-bucket" / "fp"
