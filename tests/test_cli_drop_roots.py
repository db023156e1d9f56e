"""`finpipe ingest PATH` and the drop folders: held to FINPIPE_DROP_ROOTS when it is set (a
team worker's machine), free to load any readable file when it is not (a person's own files).

The command runs in this process (typer's runner) on a real market delivery, with GX.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finpipe.cli import app
from finpipe.errors import ConfigError
from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    write_vendor_files,
)
from finpipe.settings import Settings
from finpipe.storage import Storage

runner = CliRunner()


@pytest.fixture(scope="module")
def delivery(tmp_path_factory) -> Path:
    """One daily market file (3 tickers), outside every drop folder."""
    panel = generate_market_panel(MarketSyntheticConfig(tickers=3, days=305, seed=5))
    files = write_vendor_files(panel.prices, tmp_path_factory.mktemp("vendor"), daily_files=1)
    return files[-1]


def _ingest(path: Path):
    return runner.invoke(app, ["ingest", "market", str(path), "--as-of", "2025-06-30"])


def _landed(home) -> list[str]:
    storage = Storage(home.home)
    return storage.list_files(storage.landing_key("market"))


def test_with_drop_roots_set_a_file_outside_them_is_refused_before_anything_is_read(
    home, delivery, tmp_path, monkeypatch
):
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "escape.csv").symlink_to(delivery)  # inside by name, outside by target
    monkeypatch.setenv("FINPIPE_DROP_ROOTS", f'["{drop}"]')
    for given in (delivery, drop / "escape.csv", drop / ".." / delivery.name):
        result = _ingest(given)
        assert result.exit_code != 0
        assert isinstance(result.exception, ConfigError), result.output
        assert str(result.exception).startswith(f"input {str(given)!r} ")
        assert f"which are: {drop.resolve()}." in str(result.exception)
    assert _landed(home) == []

    inside = drop / delivery.name
    shutil.copy(delivery, inside)
    result = _ingest(inside)
    assert result.exit_code == 0, result.output
    assert "validated" in result.output
    assert len(_landed(home)) == 1


def test_without_drop_roots_the_command_line_loads_a_file_from_anywhere(
    home, delivery, monkeypatch
):
    monkeypatch.delenv("FINPIPE_DROP_ROOTS", raising=False)  # the tests' session sets it
    defaults = Settings().input_roots()
    assert not any(delivery.resolve().is_relative_to(root) for root in defaults)
    result = _ingest(delivery)
    assert result.exit_code == 0, result.output
    assert len(_landed(home)) == 1


def test_the_help_says_when_the_drop_folders_apply():
    result = runner.invoke(app, ["ingest", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "FINPIPE_DROP_ROOTS is set" in " ".join(result.output.split())
