"""A run reads delivered files only from under the drop folders (FINPIPE_DROP_ROOTS): the
check on its own, a flow run that names /etc/passwd, and the command line from a folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finpipe.drop_roots import allowed_inputs, fixed_folder, is_inside
from finpipe.errors import ConfigError
from finpipe.settings import Settings


@pytest.fixture
def drop(tmp_path) -> Path:
    """A drop folder with two deliveries, and beside it a folder it must not reach, whose name
    begins with the drop folder's (a check of the path's text would let it through)."""
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "market_2024-01-02.csv").write_text("old")
    (folder / "market_2024-01-03.csv").write_text("new")
    os.utime(folder / "market_2024-01-02.csv", (1_000, 1_000))  # delivered first
    secrets = tmp_path / "drop-private"
    secrets.mkdir()
    (secrets / "key.csv").write_text("secret")
    return folder


def test_files_under_a_drop_folder_pass_in_delivery_order(drop):
    roots = [drop.resolve()]
    assert allowed_inputs([str(drop / "market_*.csv")], roots) == [
        str((drop / "market_2024-01-02.csv").resolve()),
        str((drop / "market_2024-01-03.csv").resolve()),
    ]
    plain = str(drop / "market_2024-01-03.csv")
    assert allowed_inputs([plain], roots) == [plain]
    assert allowed_inputs([], roots) == []
    # A file not delivered yet is not refused here: ingest reports it missing.
    assert is_inside(drop / "market_2024-01-04.csv", roots)


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("/etc/passwd", "is outside"),  # an absolute path elsewhere
        ("{drop}/../drop-private/key.csv", "is outside"),  # `..` climbing out
        ("{drop}-private/key.csv", "is outside"),  # a sibling whose name begins with drop's
        ("{drop}/../drop-private/*.csv", "is outside"),  # a glob outside: not even listed
        ("{drop}/../drop-private/*.none", "is outside"),  # (so matching nothing tells nothing)
        ("{drop}/link.csv", "is outside"),  # a symlink in the drop folder whose target is outside
        ("{drop}/linked/key.csv", "is outside"),  # a symlinked folder whose target is outside
        ("{drop}/linked/*.csv", "is outside"),
        ("{drop}/*.csv", "names a file outside"),  # a glob inside that matches the symlink
    ],
)
def test_a_path_out_of_the_drop_folders_is_refused_naming_only_the_rule(drop, name, rule):
    (drop / "link.csv").symlink_to(drop.parent / "drop-private" / "key.csv")
    (drop / "linked").symlink_to(drop.parent / "drop-private")
    given = name.format(drop=drop)
    roots = [drop.resolve(), (drop.parent / "other").resolve()]
    with pytest.raises(ConfigError) as refused:
        allowed_inputs([str(drop / "market_2024-01-02.csv"), given], roots)
    message = str(refused.value)
    assert message.startswith(f"input {given!r} {rule} the drop folders")
    assert "drop folders (symlinks followed), which are: " in message
    assert f"{roots[0]}, {roots[1]}" in message
    assert "FINPIPE_DROP_ROOTS" in message
    assert "key.csv" not in message.replace(given, "")  # where it leads is not told
    assert "private" not in message.replace(given, "")


def test_no_drop_folder_refuses_every_input(drop):
    with pytest.raises(ConfigError, match="which are: none \\(FINPIPE_DROP_ROOTS is empty\\)"):
        allowed_inputs([str(drop / "market_2024-01-02.csv")], [])


def test_the_fixed_folder_of_a_glob_is_what_precedes_its_first_wildcard():
    assert fixed_folder("/data/drop/market_*.csv") == "/data/drop"
    assert fixed_folder("/data/*/x.csv") == "/data"
    assert fixed_folder("/data/drop/x.csv") == "/data/drop/x.csv"
    assert fixed_folder("*.csv") == "."
    assert fixed_folder("~/drop/[ab].csv") == os.path.expanduser("~/drop")


def test_the_default_drop_folders_are_the_demos_and_the_readmes(tmp_path, monkeypatch):
    monkeypatch.delenv("FINPIPE_DROP_ROOTS", raising=False)
    monkeypatch.chdir(tmp_path)
    settings = Settings(home=tmp_path / "home")
    assert settings.input_roots() == [
        tmp_path.resolve() / "home" / "vendor_drop",
        tmp_path.resolve() / "deliveries",
        tmp_path.resolve() / "datasets",
    ]
    (tmp_path / "real").mkdir()
    (tmp_path / "drop").symlink_to(tmp_path / "real")
    monkeypatch.setenv("FINPIPE_DROP_ROOTS", f'["{tmp_path / "drop"}", "~/x"]')
    assert Settings().input_roots() == [
        tmp_path.resolve() / "real",
        Path(os.path.realpath(Path("~/x").expanduser())),
    ]
    monkeypatch.setenv("FINPIPE_DROP_ROOTS", "[]")
    assert Settings().input_roots() == []


# -- the flows -------------------------------------------------------------------------------
def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def test_a_run_naming_a_file_out_of_the_drop_folders_fails_before_reading_anything(
    home, tmp_path, monkeypatch
):
    from finpipe.flows.backfill import backfill
    from finpipe.flows.nightly import nightly

    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "escape.csv").symlink_to("/etc/passwd")
    monkeypatch.setenv("FINPIPE_DROP_ROOTS", f'["{drop}"]')
    runs = {
        "/etc/passwd": nightly(domain="market", inputs=["/etc/passwd"], return_state=True),
        str(drop / "escape.csv"): backfill(
            start="2024-01-02", end="2024-01-02", inputs=[str(drop / "escape.csv")],
            return_state=True,
        ),
    }  # fmt: skip
    for given, state in runs.items():
        assert state.is_failed()
        with pytest.raises(ConfigError) as refused:
            state.result()
        assert str(refused.value).startswith(f"input {given!r} ")
        assert f"which are: {drop.resolve()}." in str(refused.value)
        assert _task_runs(state.state_details.flow_run_id) == []  # no ingest task started
    assert not [p for p in home.home.rglob("*") if p.is_file() and "prefect" not in p.parts]


def test_the_command_line_loads_a_file_from_deliveries_and_refuses_one_elsewhere(tmp_path):
    from finpipe.market.synthetic import (
        MarketSyntheticConfig,
        generate_market_panel,
        write_vendor_files,
    )

    panel = generate_market_panel(MarketSyntheticConfig(tickers=3, days=305, seed=1))
    day = panel.prices["date"].max().date().isoformat()
    write_vendor_files(panel.prices, tmp_path / "deliveries", daily_files=1)
    env = {"FINPIPE_HOME": str(tmp_path / "home"), "PATH": ""}  # the default drop folders

    def finpipe_run(path: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "finpipe.cli", "run", "backfill", "--start", day]
            + ["--end", day, "--steps", "validate", "--input", path],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )

    loaded = finpipe_run(f"deliveries/market_{day}.csv")  # as the README runs it
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.startswith(f"{day}  completed"), loaded.stdout
    refused = finpipe_run("/etc/passwd")
    assert refused.returncode == 2
    [error] = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "input '/etc/passwd' is outside the drop folders" in error
    assert f"{tmp_path.resolve() / 'deliveries'}" in error
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["run", "backfill", "--start", "2024-01-02", "--end", "2024-01-02", "--input", "/etc/x"],
        ["run", "nightly", "--input", "/etc/x"],
        ["run", "backfill", "--start", "2024-01-02", "--end", "2024-01-02", "--domain", "fx"],
        ["ingest", "market", "{tmp}/prices.csv", "--as-of", "2024-01-31"],
    ],
    ids=["backfill-input", "nightly-input", "unknown-domain", "ingest-rejected"],
)
def test_a_refused_command_says_so_before_importing_the_domains_models(tmp_path, command):
    """A bad parameter or a rejected file costs the user seconds fewer than importing torch,
    MLflow and the domain's pipeline would: neither the refusal nor ingest needs them."""
    (tmp_path / "prices.csv").write_text("date,ticker,close\n2024-01-02,AAA,-5\n")
    command = [part.format(tmp=tmp_path) for part in command]
    script = textwrap.dedent(
        f"""
        import sys
        from finpipe.cli import main
        sys.argv = ["finpipe", *{command!r}]
        try:
            main()
        except SystemExit as done:
            print("exit", done.code)
        heavy = ("torch", "mlflow", "finpipe.market.pipeline", "finpipe.lifecycle")
        print("imported", sorted(name for name in heavy if name in sys.modules))
        """
    )
    refused = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "FINPIPE_HOME": str(tmp_path / "home")},
        cwd=tmp_path,
        timeout=120,
    )
    assert refused.stdout.splitlines() == ["exit 2", "imported []"], refused.stderr[-3000:]
    assert refused.stderr.startswith("error: "), refused.stderr
