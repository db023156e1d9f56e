"""A regular (non-editable) install gives a working `finpipe`.

The wheel is built from a copy of the sources (setuptools writes build/ and egg-info next to
what it builds), installed into a fresh venv that borrows the heavy dependencies from the
project's venv through a `.pth` line, and run from there. The project venv's editable finpipe
is never imported: its finder is installed by a `.pth` file that only a site folder runs, and
the borrowed folder is added as a plain path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, check=False, **kwargs
    )
    assert completed.returncode == 0, (
        f"{command} exited {completed.returncode}:\n{completed.stdout}\n{completed.stderr}"
    )
    return completed


def _source_folders() -> dict[str, Path]:
    """Return package name -> source folder, as `[tool.setuptools]` maps them."""
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def _shipped_sources() -> set[str]:
    """Return the wheel paths every source file of the mapped folders should have: each
    module and each data file (configs, expectation suites) a command reads at run time."""
    expected = set()
    for name, folder in _source_folders().items():
        for path in folder.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                expected.add("/".join([*name.split("."), *path.relative_to(folder).parts]))
    return expected


def _copy_sources(destination: Path) -> Path:
    """Copy what the build reads (pyproject, README, LICENSE and the mapped folders) into
    `destination`."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, destination / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in {p.relative_to(ROOT).parts[0] for p in _source_folders().values()}:
        shutil.copytree(ROOT / folder, destination / folder, ignore=ignore)
    return destination


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = _copy_sources(root / "source")
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", root / "dist", source]
    )  # fmt: skip
    (root / "build.log").write_text(built.stdout + built.stderr)
    (path,) = (root / "dist").glob("finpipe-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    # The heavy dependencies (torch, Prefect, MLflow, GX) come from the project venv, after
    # the fresh venv's own site-packages on sys.path.
    (Path(site.stdout.strip()) / "borrowed_dependencies.pth").write_text(
        sysconfig.get_path("purelib") + "\n"
    )
    # Without PYTHONPATH: a checkout on it (its finpipe.egg-info) reads to pip as finpipe
    # already installed, and the wheel would not be.
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         wheel],
        env=_without_pythonpath(),
    )  # fmt: skip
    return venv


def _without_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _fresh_env(home: Path) -> dict[str, str]:
    env = {
        k: v for k, v in _without_pythonpath().items() if not k.startswith(("FINPIPE_", "PREFECT_"))
    }
    return {**env, "FINPIPE_HOME": str(home)}


@pytest.mark.slow
def test_the_wheel_ships_every_module_and_data_file(wheel):
    shipped = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_shipped_sources() - shipped)
    assert not missing, f"left out of the wheel (add them to [tool.setuptools]): {missing}"
    assert "finpipe/expectations/market_ohlcv.json" in shipped
    assert "finpipe/credit/configs/synthetic.toml" in shipped
    assert not [name for name in shipped if name.startswith(("benchmarks/", "tests/"))]
    # The licence the metadata names (Apache-2.0), as a file in the wheel.
    assert "finpipe-0.1.0.dist-info/licenses/LICENSE" in shipped
    metadata = zipfile.ZipFile(wheel).read("finpipe-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata


@pytest.mark.slow
@pytest.mark.slow
def test_the_build_installs_every_data_folder_as_configured(wheel):
    """setuptools warns of a data folder Python could import but `packages` does not list: it
    installs such files by a fallback it says it may drop."""
    log = (wheel.parents[1] / "build.log").read_text()
    assert "absent from the `packages` configuration" not in log, log


def test_the_installed_cli_runs_from_a_fresh_venv(fresh_venv, tmp_path):
    env = _fresh_env(tmp_path / "home")
    where = _run(
        [fresh_venv / "bin" / "python", "-c", "import finpipe; print(finpipe.__file__)"],
        cwd=tmp_path,
        env=env,
    )
    assert Path(where.stdout.strip()).is_relative_to(fresh_venv), where.stdout

    finpipe = fresh_venv / "bin" / "finpipe"
    usage = _run([finpipe, "--help"], cwd=tmp_path, env=env).stdout
    for command in ("generate", "ingest", "run", "demo"):
        assert command in usage
    assert "bench" not in usage

    out = tmp_path / "delivery"
    listed = _run(
        [finpipe, "generate", "market", "--out", out, "--tickers", "3", "--days", "320",
         "--daily-files", "2"],
        cwd=tmp_path,
        env=env,
    ).stdout.split()  # fmt: skip
    assert len(listed) == 3 and all(Path(p).is_file() for p in listed)
    assert (out / "oracle.parquet").is_file()

    # Ingest reads the market suite shipped as package data and publishes a validated partition.
    ingested = _run(
        [finpipe, "ingest", "market", listed[-1], "--as-of", "2025-06-30"], cwd=tmp_path, env=env
    )
    assert "rows over 1 date validated" in ingested.stdout, ingested.stdout + ingested.stderr
    assert list((tmp_path / "home" / "validated" / "market").rglob("*.parquet"))
