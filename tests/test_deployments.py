"""The deployments on a real Prefect server: `finpipe serve`, UI-style custom runs, the schedule.

The session's Prefect server (`prefect_api`, temporary database) and one `finpipe serve` process
for the module; runs are created through the Prefect client exactly as the UI's custom-run form
does (the deployment's `create_flow_run` endpoint with JSON parameters), and executed by the
served process.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from finpipe.flows.deployments import start_prefect_api
from prefect.settings import PREFECT_API_URL, temporary_settings

from finpipe import tracking
from finpipe.calendars import calendar_named
from finpipe.date_runs import is_done, read_completion
from finpipe.errors import ConfigError
from finpipe.ingest import ingest_file
from finpipe.locks import date_resource, read_holder
from finpipe.market.pipeline import MARKET_CONTRACT, update_market_features
from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    write_vendor_files,
)
from finpipe.planning import ALL_STEPS
from finpipe.settings import Settings
from finpipe.storage import Storage
from tests.conftest import finpipe_home
from tests.team_servers import finpipe_serve, run_artifacts, start_run, wait_for_run

pytestmark = pytest.mark.slow

TINY = {"max_epochs": 2, "models": ["mlp"], "hidden": 8}
TIMEZONE = "America/New_York"


@dataclass
class Team:
    settings: Settings
    api: str
    files: list[Path]
    prices: pd.DataFrame
    train_run: object
    bad_run_id: str


@pytest.fixture(scope="module")
def team(tmp_path_factory, prefect_api):
    """Validated history, the session's Prefect server, `finpipe serve`, and a champion from
    `train`."""
    root = tmp_path_factory.mktemp("team")
    panel = generate_market_panel(MarketSyntheticConfig(tickers=6, days=305, seed=5))
    files = write_vendor_files(panel.prices, root / "drop", daily_files=1)
    api = prefect_api
    with finpipe_home(root / "home") as settings:
        ingest_file(Storage(settings.home), MARKET_CONTRACT, files[0], as_of=dt.date.today())
        with finpipe_serve(settings, api, root, env={"FINPIPE_TIMEZONE": TIMEZONE}):
            train_id = start_run(api, "train/train", {"training": TINY})
            # Runs beside the training; test_bad_parameters_... looks at it.
            bad_run_id = start_run(
                api, "backfill/backfill", {"start": "2022-02-01", "end": "2022-01-03"}
            )
            train_run = wait_for_run(api, train_id)
            yield Team(settings, api, files, panel.prices, train_run, bad_run_id)


def _day(path: Path) -> dt.date:
    return dt.date.fromisoformat(path.stem.removeprefix("market_"))


def _tickers(prices: pd.DataFrame, day: dt.date) -> list[str]:
    return sorted(prices.loc[prices["date"] == pd.Timestamp(day), "ticker"])


def test_train_deployment_registers_the_first_champion(team):
    assert team.train_run.state.is_completed(), team.train_run.state.message
    assert tracking.current_alias_version(team.settings, "market") == "1"


def test_backfill_custom_run_writes_a_partition_and_a_status_row_per_date(team):
    storage = Storage(team.settings.home)
    dates = storage.partition_dates("validated", "market")[-5:]
    start, end = dates[0].isoformat(), dates[-1].isoformat()
    run_id = start_run(
        team.api,
        "backfill/backfill",
        {"domain": "market", "start": start, "end": end, "concurrency": 2},
    )
    run = wait_for_run(team.api, run_id)
    assert run.state.is_completed(), run.state.message
    assert run.name == f"backfill-market-{start}-to-{end}-{str(run.id)[-6:]}"
    days = calendar_named("XNYS").sessions(dates[0], dates[-1])
    for day in days:
        predictions = storage.read_partition("predictions", "market", day)
        assert sorted(predictions["ticker"]) == _tickers(team.prices, day)
        assert set(predictions["model_version"]) == {"1"}
    table = run_artifacts(team.api, run_id)["backfill-market"]
    assert [row["date"] for row in table] == [d.isoformat() for d in days]
    assert {row["status"] for row in table} == {"completed"}
    assert [row["rows"] for row in table] == [len(_tickers(team.prices, d)) for d in days]
    assert all(row["seconds"] > 0 and row["model version"] == "1" for row in table)


def test_nightly_schedule_is_what_the_server_reports(team):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with SyncPrefectClient(team.api) as client:
        deployment = client.read_deployment_by_name("nightly/nightly")
        upcoming = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])
            ),
            limit=10,
        )
    [schedule] = deployment.schedules
    assert schedule.active
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * 1-5", TIMEZONE)
    assert schedule.parameters == {"domain": "market"}
    assert deployment.parameters == {
        "default_as_of": "previous business day",
        "calendar_timezone": TIMEZONE,
    }
    scheduled = [r for r in upcoming if r.state.is_scheduled()]
    assert len(scheduled) >= 3
    for run in scheduled:
        local = run.expected_start_time.astimezone(ZoneInfo(TIMEZONE))
        assert (local.hour, local.minute) == (2, 0) and local.weekday() < 5
        assert run.parameters["domain"] == "market"
        assert run.parameters["default_as_of"] == "previous business day"


def test_backfill_form_is_typed_and_described(team):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(team.api) as client:
        form = client.read_deployment_by_name("backfill/backfill").parameter_openapi_schema
    fields = form["properties"]
    assert form["required"] == ["start", "end"]
    assert fields["start"]["format"] == fields["end"]["format"] == "date"
    assert fields["steps"]["items"]["enum"] == list(ALL_STEPS)
    assert fields["steps"]["default"] == list(ALL_STEPS)
    assert (fields["concurrency"]["minimum"], fields["concurrency"]["maximum"]) == (1, 16)
    assert fields["retrain"]["default"] is False
    assert fields["end"]["description"] == "Last date of the range, included; today at the latest."
    assert fields["domain"]["enum"] == ["market", "credit", "customers"]
    assert "another registered domain" in " ".join(fields["domain"]["description"].split())
    assert "their rows replace the published rows they restate" in " ".join(
        fields["corrections"]["description"].split()
    )


def test_backtest_form_is_typed_and_described(team):
    from prefect.client.orchestration import SyncPrefectClient

    from finpipe.market.model import MARKET_MODEL_KINDS

    with SyncPrefectClient(team.api) as client:
        form = client.read_deployment_by_name("backtest/backtest").parameter_openapi_schema
    fields = form["properties"]
    assert form["required"] == ["start", "end"]
    assert fields["start"]["format"] == fields["end"]["format"] == "date"
    assert fields["models"]["items"]["enum"] == list(MARKET_MODEL_KINDS)
    assert fields["models"]["default"] == ["mlp"]
    assert (fields["retrain_every"]["minimum"], fields["retrain_every"]["default"]) == (1, 63)
    assert (fields["concurrency"]["minimum"], fields["concurrency"]["maximum"]) == (1, 16)
    assert fields["cost_bps"]["default"] == 10.0 and fields["top_k"]["default"] == 10
    assert "expanding" in fields["train_window"]["description"]
    assert fields["name"]["pattern"] == "^[a-z][a-z0-9_]{0,63}$"


def test_bad_parameters_are_refused_before_any_work(team):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import PrefectHTTPStatusError

    with pytest.raises(PrefectHTTPStatusError, match="concurrency"):  # the form's own check
        start_run(
            team.api,
            "backfill/backfill",
            {"start": "2022-01-03", "end": "2022-01-04", "concurrency": 99},
        )
    run = wait_for_run(team.api, team.bad_run_id)  # started by the fixture
    assert run.state.is_failed()
    assert "end 2022-01-03 is before start 2022-02-01" in run.state.message
    with SyncPrefectClient(team.api) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    assert tasks == []


def test_nightly_and_backfill_started_at_once_do_not_interleave(team, tmp_path):
    """Two runs deliver half of the same new date each, then build and score it, at once.

    Without the locks, the two read-merge-write ingests of one validated partition can lose
    one half; with them, every ticker arrives and the last scorer sees all of them.
    """
    day = _day(team.files[1])
    delivered = pd.read_csv(team.files[1])
    halves = []
    for name, rows in (("a", delivered.iloc[::2]), ("b", delivered.iloc[1::2])):
        halves.append(tmp_path / f"market_{day}_{name}.csv")
        rows.to_csv(halves[-1], index=False)
    nightly_id = start_run(
        team.api,
        "nightly/nightly",
        {"as_of": day.isoformat(), "inputs": [str(halves[0])], "retrain": False},
    )
    backfill_id = start_run(
        team.api,
        "backfill/backfill",
        {"start": day.isoformat(), "end": day.isoformat(), "inputs": [str(halves[1])]},
    )
    runs = [wait_for_run(team.api, nightly_id), wait_for_run(team.api, backfill_id)]
    assert all(run.state.is_completed() for run in runs), [r.state.message for r in runs]

    storage = Storage(team.settings.home)
    everyone = _tickers(team.prices, day)
    assert sorted(storage.read_partition("validated", "market", day)["ticker"]) == everyone
    predictions = storage.read_partition("predictions", "market", day)
    assert sorted(predictions["ticker"]) == everyone
    assert is_done(storage, "market", day, ALL_STEPS)
    assert read_completion(storage, "market", day)["holder"] in {run.name for run in runs}
    for resource in ("history", date_resource(day)):
        assert read_holder(team.settings.home, "market", resource)["holder"] in {
            run.name for run in runs
        }
    # The features of that date are what a full rebuild from the same validated data gives.
    fresh = Storage(tmp_path / "rebuild")
    shutil.copytree(storage.root / "validated", fresh.root / "validated")
    update_market_features(fresh, day, rebuild=True)
    pd.testing.assert_frame_equal(
        storage.read_partition("features", "market", day),
        fresh.read_partition("features", "market", day),
    )


def test_start_prefect_api_finds_the_server_and_names_one_that_does_not_answer(team):
    with temporary_settings({PREFECT_API_URL: team.api}):
        assert 0 < start_prefect_api() < 30
    nowhere = {PREFECT_API_URL: "http://127.0.0.1:9/api"}  # nothing listens on port 9
    with temporary_settings(nowhere), pytest.raises(ConfigError, match=r"127\.0\.0\.1:9"):
        start_prefect_api()
