"""The command line: every command has --help; finpipe errors are one line and exit 2."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from finpipe.cli import app
from finpipe.errors import ConfigError

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
        ["status"],
        ["dismiss"],
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
    # The option a refused catch-up names (more missed sessions than the cap).
    assert "--catch-up --no-catch-up" in text


def _command_paths(command, path=()):
    """Yield the argument path of `command` and of every sub-command under it."""
    yield list(path)
    for name, sub in getattr(command, "commands", {}).items():  # groups only
        yield from _command_paths(sub, (*path, name))


def test_no_help_text_is_cut_at_80_columns():
    """Piped output, `less` and CI logs render help 80 columns wide, where rich cuts a word
    longer than its option-table cell with "…" (it cut defect names, setting names, option
    names and the default model list): every command's help is whole at that width."""
    import typer

    cut = {}
    for path in _command_paths(typer.main.get_command(app)):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert max(map(len, lines)) == 80, f"{path} was not rendered 80 columns wide"
        if "…" in result.output:
            cut[" ".join(path)] = [line for line in lines if "…" in line]
    assert cut == {}


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


def _finpipe(tmp_path, *args: str, **environment: str) -> subprocess.CompletedProcess:
    """Run `finpipe ARGS` in a child process (the console entry point's error handling)."""
    return subprocess.run(
        [sys.executable, "-m", "finpipe.cli", *args],
        capture_output=True,
        text=True,
        env={"FINPIPE_HOME": str(tmp_path / "home"), "PATH": "", **environment},
        timeout=120,
    )


def test_a_rejected_file_names_the_files_after_it_that_were_not_loaded(tmp_path):
    rejected = tmp_path / "a.csv"
    rejected.write_text("date,ticker,close\n2024-01-02,AAA,-5\n")
    later = [tmp_path / "b.csv", tmp_path / "c.csv"]
    for path in later:
        path.write_text("date,ticker,close\n2024-01-03,AAA,5\n")
    paths = [str(p) for p in (rejected, *later)]
    result = _finpipe(tmp_path, "ingest", "market", *paths, "--as-of", "2024-01-31")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "a.csv rejected" in line
    assert line.endswith(
        " Not loaded: b.csv, c.csv (2 files after the rejected one). Fix a.csv and re-run "
        "the same command: files already loaded are skipped."
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [("FINPIPE_MAX_FILE_MB", "0"), ("FINPIPE_PROMOTION_FLOOR", "maybe")],
)
def test_a_bad_setting_is_one_line_and_exit_status_2(tmp_path, name, value):
    result = _finpipe(tmp_path, "batches", "market", **{name: value})
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: invalid settings: {name}={value!r}: should be ")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "name", "value", "says"),
    [
        (
            ["status"],
            "FINPIPE_CALENDARS",
            "notjson",
            """invalid schedule settings: FINPIPE_CALENDARS='notjson': should be a JSON """
            """object, e.g. {"market": "XNYS"}""",
        ),
        (["status"], "FINPIPE_HOME", "{file}", "FINPIPE_HOME={file} is a file, not a folder: "),
        (["ingest", "market", "x.csv"], "FINPIPE_HOME", "{file}", "FINPIPE_HOME={file} is a "),
    ],
)
def test_a_non_json_setting_or_a_file_as_home_is_one_line_and_exit_status_2(
    tmp_path, command, name, value, says
):
    file = tmp_path / "file"
    file.write_text("")
    result = _finpipe(tmp_path, *command, **{name: value.replace("{file}", str(file))})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: " + says.replace("{file}", str(file)))
    assert len(result.stderr.splitlines()) == 1


def test_a_folder_given_to_ingest_is_refused_with_a_glob_to_use(tmp_path, home):
    folder = tmp_path / "deliveries"
    folder.mkdir()
    result = runner.invoke(app, ["ingest", "market", str(folder)])
    assert isinstance(result.exception, ConfigError), result.output
    assert str(result.exception) == (
        f"{folder} is a folder, not a file: name the files in it, e.g. {folder}/*.csv"
    )


def test_an_as_of_after_today_is_refused_before_anything_is_read(tmp_path, home):
    """Rows dated after the as-of day are refused as from the future: an as-of that has not
    come yet (a typo, 2204 for 2024) would let them in."""
    delivery = tmp_path / "market.csv"
    delivery.write_text("date,ticker,close\n2204-01-02,AAA,1.0\n")
    tomorrow = dt.date.today() + dt.timedelta(days=2)
    for dry_run in ([], ["--dry-run"]):
        result = runner.invoke(
            app, ["ingest", "market", str(delivery), "--as-of", str(tomorrow), *dry_run]
        )
        assert isinstance(result.exception, ConfigError), result.output
        assert str(result.exception).startswith(f"--as-of {tomorrow} is after today (")
    assert not (home.home / "landing").exists()


def test_without_as_of_rows_are_accepted_up_to_today_where_the_schedule_is_read(
    tmp_path, home, today_elsewhere
):
    """A Sydney desk (FINPIPE_TIMEZONE=Australia/Sydney) ingesting its morning file: by the
    UTC date, still yesterday there, every row was from the future. The nightly flow reads
    the same day (`newest_day_accepted`)."""
    from finpipe.storage import Storage

    day = today_elsewhere
    for delivered in (day, day + dt.timedelta(days=1)):  # today there, then tomorrow there
        delivery = tmp_path / f"market_{delivered}.csv"
        delivery.write_text(f"date,ticker,close\n{delivered},AAA,1.0\n{delivered},BBB,2.0\n")
        runner.invoke(app, ["ingest", "market", str(delivery)])
    assert Storage(home.home).partition_dates("validated", "market") == [day]


def test_validated_refuses_an_existing_folder_as_out(tmp_path, home):
    result = runner.invoke(app, ["validated", "market", "--out", str(tmp_path)])
    assert isinstance(result.exception, ConfigError), result.output
    assert str(result.exception).startswith(f"--out {tmp_path} is a folder: name the Parquet")


def test_validated_writes_the_date_column_as_calendar_days(delivered, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage, files, _ = delivered
    monkeypatch.setenv("FINPIPE_HOME", str(tmp_path / "home"))
    out = tmp_path / "validated.parquet"
    result = runner.invoke(app, ["validated", "market", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.schema.field("date").type == pa.date32()
    assert table.num_rows == len(storage.read_partitions("validated", "market"))


def test_validated_of_an_empty_layer_is_refused_and_writes_no_file(tmp_path, home):
    home.home.mkdir()
    out = tmp_path / "validated.parquet"
    result = runner.invoke(app, ["validated", "market", "--out", str(out)])
    assert isinstance(result.exception, ConfigError), result.output
    assert str(result.exception) == (
        f"no validated rows of market in {home.home}, so no file written: `finpipe batches "
        "market` lists its delivered files and when each was validated"
    )
    then = ["--known-at", "2026-03-02T09:00"]
    result = runner.invoke(app, ["validated", "market", *then, "--out", str(out)])
    assert isinstance(result.exception, ConfigError), result.output
    assert str(result.exception).startswith(
        "no validated rows of market as known at 2026-03-02T09:00:00+00:00 in "
    )
    assert not out.exists()


def test_batches_and_validated_of_a_home_that_does_not_exist_create_nothing(tmp_path, monkeypatch):
    home = tmp_path / "typo" / "home"
    monkeypatch.setenv("FINPIPE_HOME", str(home))
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    out = tmp_path / "validated.parquet"
    for command in (["batches", "market"], ["validated", "market", "--out", str(out)]):
        result = runner.invoke(app, command)
        assert isinstance(result.exception, ConfigError), result.output
        assert str(result.exception) == (
            f"store {home} does not exist: is FINPIPE_HOME right? (`finpipe ingest` creates it)"
        )
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_defect_is_refused_with_the_defects_there_are(tmp_path):
    result = runner.invoke(app, ["generate", "market", "--out", str(tmp_path), "--defects", "foo"])
    assert isinstance(result.exception, ConfigError), result.output
    assert str(result.exception) == (
        "--defects: no defect 'foo'; the defects are nan, non_positive_price, duplicate_key, "
        "high_below_low, stale_price"
    )
    assert not any(tmp_path.iterdir())  # refused before anything is generated


def test_a_bad_model_name_is_refused_before_prefect_starts(home, monkeypatch):
    import finpipe.flows.nightly

    def nightly(**_: object) -> None:
        raise AssertionError("the flow ran")

    monkeypatch.setattr(finpipe.flows.nightly, "nightly", nightly)
    result = runner.invoke(app, ["run", "nightly", "--domain", "market", "--models", "foo"])
    assert isinstance(result.exception, ConfigError), result.output
    assert "'foo'" in str(result.exception)


def test_the_summary_counts_predictions_with_thousands_separators(capsys, home):
    from finpipe.cli import _print_summary

    predictions = {"rows": 1138, "model_name": "finpipe-credit", "model_version": 3, "path": "p"}
    _print_summary(
        {"domain": "credit", "as_of": "2023-12-31", "predictions": predictions, "promotion": None},
        home,
    )
    assert capsys.readouterr().out == (
        "credit 2023-12-31: 1,138 predictions by finpipe-credit v3 -> p\n"
    )


@pytest.mark.parametrize(
    ("dates", "said"),
    [
        (["2024-01-02"], "1 date has"),
        (["2024-01-02", "2024-01-03"], "2 dates have"),
    ],
)
def test_the_stale_predictions_warning_agrees_with_its_count(monkeypatch, dates, said):
    """Read through a handler of the test's own: the first import of Prefect (this test, run
    alone) configures logging and drops pytest's capture handler from the root logger."""
    import logging
    from types import SimpleNamespace

    from finpipe.flows import run_setup

    lines: list[str] = []
    logger = logging.getLogger("finpipe.test.stale")
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    stale = {"dates": dates, "backfill": "finpipe run backfill ..."}
    monkeypatch.setattr(run_setup, "stale_predictions", lambda *_: stale)
    monkeypatch.setattr(run_setup, "get_run_logger", lambda: logger)
    run = SimpleNamespace(storage=None, domain="market")
    try:
        assert run_setup.warn_of_stale_predictions(run, {"rebuilt": dates}) == stale
    finally:
        logger.removeHandler(handler)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{said} predictions scored from data since changed (")


def test_a_run_failing_with_a_finpipe_error_is_logged_without_a_traceback():
    """Prefect logs a failed run's exception with its traceback; a FinpipeError's own message
    is the whole story, so only a bug's traceback is kept."""
    import io
    import logging

    from finpipe.errors import ConfigError
    from finpipe.settings import untraced_finpipe_errors

    untraced_finpipe_errors()
    untraced_finpipe_errors()  # twice: one filter
    logger = logging.getLogger("prefect.flow_runs")
    assert [type(f).__name__ for f in logger.filters].count("_WithoutTraceback") == 1
    written = io.StringIO()
    saved = logger.handlers, logger.propagate
    # Only this handler: there is no run to send the records to Prefect's API for.
    logger.handlers, logger.propagate = [logging.StreamHandler(written)], False
    try:
        for error in (ConfigError("no validated market data"), KeyError("momentum")):
            try:
                raise error
            except Exception:
                logger.error("Encountered exception during execution", exc_info=True)
    finally:
        logger.handlers, logger.propagate = saved
    lines = written.getvalue().splitlines()
    assert lines[0] == "Encountered exception during execution"
    assert lines[1] == "Encountered exception during execution"  # the ConfigError: one line
    assert lines[2] == "Traceback (most recent call last):"  # the KeyError's


class _Recorded(Exception):
    """Raised by a stand-in for a flow (or `serve_deployments`): what the command passed."""


def _recorder(monkeypatch, module, name: str) -> None:
    def record(*args, **kwargs):
        raise _Recorded(args, kwargs)

    monkeypatch.setattr(module, name, record)


def _passed(arguments: list[str]) -> tuple:
    result = runner.invoke(app, arguments)
    assert isinstance(result.exception, _Recorded), result.output
    return result.exception.args


def test_run_nightly_passes_every_option_to_the_flow(home, monkeypatch):
    import finpipe.flows.nightly

    _recorder(monkeypatch, finpipe.flows.nightly, "nightly")
    options = ["--as-of", "2024-01-05", "--no-retrain", "--no-catch-up", "--rebuild-features"]
    options += ["--models", "mlp", "--max-epochs", "3", "--horizon", "10"]
    options += ["--history-dates", "100", "--history-start", "2023-01-02"]
    options += [
        "--training",
        "embargo=7",
        "--training",
        "promotion_metric=rank_ic",
    ]  # text: not JSON
    _, passed = _passed(["run", "nightly", "--domain", "market", *options])
    assert passed == {
        "domain": "market",
        "as_of": dt.date(2024, 1, 5),
        "inputs": [],
        "retrain": False,
        "catch_up": False,
        "rebuild_features": True,
        "training": {
            "embargo": 7,
            "promotion_metric": "rank_ic",
            "models": ["mlp"],
            "max_epochs": 3,
            "horizon": 10,
        },
        "history_dates": 100,
        "history_start": dt.date(2023, 1, 2),
    }
    _, defaults = _passed(["run", "nightly", "--domain", "credit"])
    assert (defaults["retrain"], defaults["catch_up"], defaults["rebuild_features"]) == (
        True,
        True,
        False,
    )


@pytest.mark.parametrize(
    ("training", "refused"),
    [
        ("embargo_days", "'embargo_days' is not KEY=VALUE (e.g. embargo_days=30)"),
        ("=3", "'=3' is not KEY=VALUE"),
        ("embargo=3", "credit has no training parameter 'embargo'; its parameters are "),
        ("embargo_days=soon", "invalid training parameters: embargo_days='soon': should be "),
    ],
)
def test_a_training_setting_the_domain_does_not_take_is_refused_before_the_flow(
    home, monkeypatch, training, refused
):
    import finpipe.flows.backfill
    import finpipe.flows.nightly

    _recorder(monkeypatch, finpipe.flows.nightly, "nightly")
    _recorder(monkeypatch, finpipe.flows.backfill, "backfill")
    range_ = ["--start", "2024-01-02", "--end", "2024-01-05"]
    for command in (["nightly"], ["backfill", *range_]):
        result = runner.invoke(app, ["run", *command, "--domain", "credit", "--training", training])
        assert not isinstance(result.exception, _Recorded), result.output
        said = " ".join((str(result.exception or "") + result.output).replace("│", " ").split())
        assert refused in said


def test_run_backfill_and_backtest_pass_every_option_to_their_flows(home, monkeypatch):
    import finpipe.flows.backfill
    import finpipe.flows.backtest

    _recorder(monkeypatch, finpipe.flows.backfill, "backfill")
    _recorder(monkeypatch, finpipe.flows.backtest, "backtest")
    range_ = ["--start", "2024-01-02", "--end", "2024-01-05"]
    backfill = ["--steps", "validate,features", "--retrain", "--concurrency", "3", "--force"]
    backfill += ["--training", "embargo_days=30", "--training", 'models=["logistic"]']
    _, passed = _passed(["run", "backfill", *range_, "--domain", "credit", *backfill])
    assert passed == {
        "domain": "credit",
        "start": dt.date(2024, 1, 2),
        "end": dt.date(2024, 1, 5),
        "steps": ("validate", "features"),
        "retrain": True,
        "concurrency": 3,
        "force": True,
        "inputs": [],
        "training": {"embargo_days": 30, "models": ["logistic"]},
    }
    backtest = ["--name", "q", "--retrain-every", "21", "--train-window", "100"]
    backtest += ["--models", "mlp,gru", "--horizon", "3", "--top-k", "4", "--n-drop", "2"]
    backtest += ["--cost-bps", "5", "--concurrency", "1", "--max-epochs", "2", "--force"]
    _, passed = _passed(["run", "backtest", *range_, *backtest])
    assert passed == {
        "start": dt.date(2024, 1, 2),
        "end": dt.date(2024, 1, 5),
        "name": "q",
        "retrain_every": 21,
        "train_window": 100,
        "models": ["mlp", "gru"],
        "horizon": 3,
        "top_k": 4,
        "n_drop": 2,
        "cost_bps": 5.0,
        "concurrency": 1,
        "training": {"max_epochs": 2},
        "force": True,
    }


def test_serve_passes_its_schedule_and_limit_to_the_deployments(home, monkeypatch):
    import finpipe.flows.deployments

    import finpipe.ui_servers

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # serve sets it: restored
    monkeypatch.setattr(finpipe.ui_servers, "check_prefect_server", lambda url: None)
    _recorder(monkeypatch, finpipe.flows.deployments, "serve_deployments")
    options = ["--timezone", "Europe/London", "--cron", "30 6 * * 1-5", "--limit", "1"]
    (schedule,), passed = _passed(["serve", *options])
    assert (schedule.timezone, schedule.nightly_cron, passed) == (
        "Europe/London",
        "30 6 * * 1-5",
        {"limit": 1},
    )
    (schedule,), passed = _passed(["serve"])
    assert (schedule.timezone, schedule.nightly_cron, passed) == (
        "UTC",
        "0 2 * * 1-5",
        {"limit": 4},
    )


def test_ingest_holds_files_to_the_size_limit_setting_and_names_no_file_after_the_last(
    tmp_path, home, monkeypatch
):
    """FINPIPE_MAX_FILE_MB reaches the command's ingest (not only its dry run); a rejected
    file with none after it gets no "Not loaded" note."""
    monkeypatch.setenv("FINPIPE_MAX_FILE_MB", "1")
    big = tmp_path / "market_2024-01-02.csv"
    row = "2024-01-02,AAA,10,11,9,10,10,1000\n"
    big.write_text("date,ticker,open,high,low,close,adj_close,volume\n" + row * 40_000)
    assert big.stat().st_size > 1.2 * 1024**2
    result = runner.invoke(app, ["ingest", "market", str(big)])
    assert result.exception is not None, result.output
    assert "MiB is over the 1 MiB limit" in str(result.exception)
    assert not getattr(result.exception, "__notes__", [])
    assert not (home.home / "validated").exists()
