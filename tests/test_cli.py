"""The command line: every command has --help; finpipe errors are one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from finpipe.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["generate"],
        ["generate", "market"],
        ["generate", "credit"],
        ["generate", "customers"],
        ["ingest"],
        ["run"],
        ["run", "nightly"],
        ["demo"],
    ],
)
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output


def test_the_nightly_help_names_every_market_candidate():
    result = runner.invoke(app, ["run", "nightly", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "market mlp, gru, tcn (temporal CNN), lgbm (LightGBM), ensemble" in text


def test_generate_writes_vendor_files_and_the_oracle(tmp_path, home):
    out = tmp_path / "drop"
    args = ["--tickers", "5", "--days", "320", "--daily-files", "2", "--out", str(out)]
    result = runner.invoke(app, ["generate", "market", *args])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names[0].startswith("market_20") and names[-1] == "oracle.parquet"
    assert len([n for n in names if n.endswith(".csv")]) == 2
    header = pd.read_csv(out / names[0], nrows=1).columns.tolist()
    assert header == ["Date", "Ticker", "Open", "High", "Low", "Close", "Adj Close", "Volume"]
    # The planted signal also reaches the store the nightly reads its oracle IC from.
    from finpipe.market.synthetic import ORACLE
    from finpipe.storage import Storage

    kept = Storage(home.home).read_reference("market", ORACLE)
    assert kept is not None and len(kept) == 5 * 320
    pd.testing.assert_frame_equal(kept, pd.read_parquet(out / "oracle.parquet"))
    other = ["--tickers", "5", "--days", "320", "--seed", "1", "--no-keep-oracle"]
    again = runner.invoke(app, ["generate", "market", "--out", str(tmp_path / "b"), *other])
    assert again.exit_code == 0, again.output
    assert Storage(home.home).read_reference("market", ORACLE).equals(kept)  # left alone


def test_generate_credit_writes_a_loan_book_the_synthetic_config_accepts(tmp_path, home):
    out = tmp_path / "drop"
    args = ["generate", "credit", "--applications", "2000", "--days", "120", "--out", str(out)]
    result = runner.invoke(app, [*args, "--daily-files", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    printed = result.stdout.split()
    assert [Path(p).name.startswith("credit_history_") for p in printed] == [True, False, False]
    history, *nights = (pd.read_csv(p, dtype={"defaulted": "string"}) for p in printed)
    assert len(history) + sum(len(n) for n in nights) == 2000
    assert all(n["defaulted"].isna().all() for n in nights)  # applications still to be scored
    assert set(history["defaulted"].dropna()) == {"0", "1"}
    truth = pd.read_parquet(out / "true_pd.parquet")
    assert len(truth) == 2000 and truth["true_pd"].between(0, 1).all()
    kept = home.home / "reference" / "credit"
    assert pd.read_parquet(next(kept.iterdir())).equals(truth)

    last_night = Path(printed[-1]).stem.removeprefix("credit_")
    ingested = runner.invoke(app, ["ingest", "credit", *printed, "--as-of", last_night])
    assert ingested.exit_code == 0, ingested.output
    assert ingested.stdout.count("validated") == 3


def test_generate_customers_writes_files_the_synthetic_config_accepts(tmp_path, home):
    out = tmp_path / "drop"
    args = ["generate", "customers", "--customers", "60", "--days", "90", "--out", str(out)]
    result = runner.invoke(app, [*args, "--no-keep-segments"])
    assert result.exit_code == 0, result.output
    printed = result.stdout.split()
    assert Path(printed[0]).name.startswith("customers_history_") and len(printed) == 4
    planted = pd.read_parquet(out / "planted_segments.parquet")
    assert len(planted) == 60 and planted["customer_id"].is_unique
    assert not (home.home / "reference").exists()  # --no-keep-segments

    last_day = Path(printed[-1]).stem.removeprefix("customers_")
    ingested = runner.invoke(app, ["ingest", "customers", *printed, "--as-of", last_day])
    assert ingested.exit_code == 0, ingested.output
    assert ingested.stdout.count("validated") == 4


def test_ingest_error_is_one_line_and_exit_status_2(tmp_path):
    bad = tmp_path / "prices.csv"
    bad.write_text("date,ticker,close\n2024-01-02,AAA,-5\n")
    env_home = tmp_path / "home"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finpipe.cli",
            "ingest",
            "market",
            str(bad),
            "--as-of",
            "2024-01-31",
        ],
        capture_output=True,
        text=True,
        env={"FINPIPE_HOME": str(env_home), "PATH": ""},
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "prices.csv rejected" in lines[0] and "ticker=AAA" in lines[0]
    assert (env_home / "quarantine" / "market").is_dir()


def test_unknown_domain_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "finpipe.cli", "ingest", "bonds", str(tmp_path / "x.csv")],
        capture_output=True,
        text=True,
        env={"FINPIPE_HOME": str(tmp_path), "PATH": ""},
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown domain 'bonds'; known domains: market" in result.stderr
