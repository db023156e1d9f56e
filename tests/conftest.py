"""Shared fixtures (a temporary FINPIPE_HOME per test, offline settings, the sample data) and
the test tiers: which tier each test belongs to and which tests run one at a time under xdist."""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
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


# Prefect's local (ephemeral) mode keeps its SQLite database under PREFECT_HOME. Each test
# process (the session, or each pytest-xdist worker, named by PYTEST_XDIST_WORKER) gets its own
# throwaway folder holding PREFECT_HOME and a default FINPIPE_HOME, set before Prefect is first
# imported: workers inherit the controller's environment, so an inherited value is replaced,
# never shared. A developer's own PREFECT_HOME, FINPIPE_HOME or PREFECT_API_URL is not used
# either: tests never write into a real store or talk to a real server. The folder is removed
# when its process exits (not by a forked crash-test child, which inherits this exit hook).
_SCRATCH = tempfile.mkdtemp(
    prefix=f"finpipe-tests-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-"
)
atexit.register(_remove_in_owner, os.getpid(), _SCRATCH)
os.environ["PREFECT_HOME"] = os.path.join(_SCRATCH, "prefect")
os.environ["FINPIPE_HOME"] = os.path.join(_SCRATCH, "home")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Two xdist workers on two cores: one intra-op thread each (set before torch is imported, and
# inherited by the children tests start), instead of two workers x two threads waiting on
# each other. The suite's nets are small, so one thread is also the faster choice per worker.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# The local API server gets a minute to start (default 20 s): on a busy 2-core CI machine the
# first flow run of the session has timed out waiting for it.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
# The plumbing tests train toy models (2 epochs, 8 units) that the promotion quality floor
# rightly refuses; it is tested on its own in test_quality_floor.py, with it on.
os.environ["FINPIPE_PROMOTION_FLOOR"] = "false"
# Runs may read delivered files only from drop folders (FINPIPE_DROP_ROOTS): the tests deliver
# from their temporary folders and the sample data sets; tests of the rule set their own.
os.environ["FINPIPE_DROP_ROOTS"] = json.dumps([tempfile.gettempdir(), str(REPO_ROOT / "datasets")])
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("FINPIPE_MLFLOW_TRACKING_URI", None)
os.environ.pop("FINPIPE_LOCKS_URL", None)  # file locks unless a test asks for Postgres


@contextlib.contextmanager
def finpipe_home(path: Path):
    """Point finpipe (storage and MLflow) at `path` for the duration of the block."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINPIPE_HOME", str(path))
        from finpipe.settings import load_settings

        yield load_settings()


@pytest.fixture
def today_elsewhere(monkeypatch):
    """Set FINPIPE_TIMEZONE to a zone whose date is not UTC's now (a day ahead from 10:00 UTC,
    a day behind until 12:00) and return today's date there."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    now = dt.datetime.now(dt.UTC)
    zone = "Pacific/Kiritimati" if now.hour >= 11 else "Etc/GMT+12"
    monkeypatch.setenv("FINPIPE_TIMEZONE", zone)
    day = dt.datetime.now(ZoneInfo(zone)).date()
    assert day != now.date()
    return day


@pytest.fixture
def expectations_folder(tmp_path, monkeypatch) -> Path:
    """Return a folder that stands in for finpipe's `expectations/` package: the suite files a
    test writes there are the ones finpipe loads (the shipped ones are not)."""
    import importlib.resources

    folder = tmp_path / "expectations"
    folder.mkdir()
    shipped = importlib.resources.files
    monkeypatch.setattr(
        importlib.resources,
        "files",
        lambda package: folder if package == "finpipe.expectations" else shipped(package),
    )
    return folder


@pytest.fixture
def disk_full_after_one_partition(monkeypatch) -> Callable[[], list]:
    """Return a function that makes `Storage.write_partition` write one partition, then raise
    OSError("disk full") (a publish cut short), and returns the list of days it wrote.
    `monkeypatch.undo()` ends it."""
    from finpipe.storage import Storage

    def cut_short() -> list:
        writes: list = []
        real_write = Storage.write_partition

        def write_once(self, layer, domain, day, rows):
            if writes:
                raise OSError("disk full")
            writes.append(day)
            return real_write(self, layer, domain, day, rows)

        monkeypatch.setattr(Storage, "write_partition", write_once)
        return writes

    return cut_short


@pytest.fixture
def delivered(tmp_path):
    """A market store with a history file and three daily files published (as of 2030-01-01):
    the store, the files and the vendor frame (tests of corrections and retractions)."""
    import pandas as pd

    from finpipe.domains import get_domain
    from finpipe.ingest import ingest_file
    from finpipe.market.synthetic import (
        MarketSyntheticConfig,
        generate_market_panel,
        write_vendor_files,
    )
    from finpipe.storage import Storage

    panel = generate_market_panel(
        MarketSyntheticConfig(
            tickers=4, days=305, seed=3, listing_fraction=0.0, delisting_fraction=0.0
        )
    )
    files = write_vendor_files(panel.prices, tmp_path / "drop", daily_files=3)
    storage = Storage(tmp_path / "home")
    for path in files:
        ingest_file(storage, get_domain("market").contract, path, as_of="2030-01-01")
    vendor = pd.concat([pd.read_csv(path) for path in files], ignore_index=True)
    return storage, files, vendor


@pytest.fixture
def home(tmp_path):
    """A fresh FINPIPE_HOME for one test; yields its Settings."""
    with finpipe_home(tmp_path / "home") as settings:
        yield settings


# The session's servers below are each used by the tests of one xdist group (the team stack by
# `serial-team`, the others by `serial`). Each stops when the last test of that group in this
# process has run (`_GroupServers`), not when the process ends: a stopped stack does not idle
# beside the rest of the run, and its shutdown does not add to the end of the run. The team
# stack stops in the background while the next tests run: its shutdown is mostly a wait
# (SeaweedFS's filer gives its gRPC streams 15 s), and a failed stop fails the session's last
# test instead. `_GroupServers.done` says when a group is over.
class _GroupServers:
    """Servers started for a group of tests, stopped when the group's last test ends."""

    def __init__(self) -> None:
        self.running: dict[str | None, contextlib.ExitStack] = {}
        self.fixtures: dict[str, str | None] = {}  # fixture -> the group it was started for
        self.stopped: set[str | None] = set()
        self.group: str | None = None  # the group of the test being set up
        self.background: set[str | None] = set()  # groups whose servers stop in a thread
        self.stopping: list[concurrent.futures.Future[None]] = []

    def start(
        self,
        fixture: str,
        server: contextlib.AbstractContextManager,
        *,
        stop_in_background: bool = False,
    ):
        """Enter `server`, the value of `fixture`, for the current test's group; return what it
        yields. With `stop_in_background`, the group's end starts its stop and moves on."""
        self.fixtures[fixture] = self.group
        value = self.running.setdefault(self.group, contextlib.ExitStack()).enter_context(server)
        if stop_in_background:
            self.background.add(self.group)
        return value

    def check(self, item: pytest.Item) -> None:
        """Fail `item` if it uses a server that its group's end has stopped."""
        for fixture in getattr(item, "fixturenames", ()):
            if fixture in self.fixtures and self.fixtures[fixture] in self.stopped:
                pytest.fail(
                    f"{fixture} was stopped when the tests of xdist group "
                    f"{self.fixtures[fixture]!r} ended: put this test in that group "
                    "(SERIALISED, SERIAL_GROUPS in tests/conftest.py)",
                    pytrace=False,
                )

    def stop(self, group: str | None, *, wait: bool = False) -> None:
        """Stop the servers of `group`: at once, or in a thread if they stop in the background
        (unless `wait`)."""
        self.stopped.add(group)
        exits = self.running.pop(group, None)
        if exits is None:
            return
        if group in self.background and not wait:
            stopping: concurrent.futures.Future[None] = concurrent.futures.Future()
            self.stopping.append(stopping)
            threading.Thread(
                target=_resolve, args=(stopping, exits.close), name=f"stop-{group}"
            ).start()
        else:
            exits.close()

    def stop_all(self) -> None:
        """Stop every server still running and wait for those stopping in the background;
        raise what a background stop raised."""
        for group in list(self.running):
            self.stop(group, wait=True)
        stopping, self.stopping = self.stopping, []
        for future in stopping:
            future.result()

    def setup(self, item: pytest.Item) -> None:
        """Before `item`'s fixtures are set up: servers it starts belong to its group."""
        self.group = _group_of(item)
        self.check(item)

    def teardown(self, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        """After `item`'s own fixtures are torn down: stop its group's servers if it was the
        group's last test here."""
        if self.done(item, nextitem):
            self.stop(_group_of(item))

    @staticmethod
    def done(item: pytest.Item, nextitem: pytest.Item | None) -> bool:
        """Whether `item` is the last test of its xdist group that this process runs. Under
        `--dist loadgroup` a group's tests reach one worker in one batch, in a row; in one
        process they follow the session's order; other xdist modes give no such promise."""
        group = _group_of(item)
        if group is None or (nextitem is not None and _group_of(nextitem) == group):
            return False
        if "PYTEST_XDIST_WORKER" in os.environ:
            # A worker's own `dist` option reads "no" (xdist rewrites it for its workers); the
            # mode it runs under is in `loadgroup`, which xdist sets from the controller's.
            return bool(item.config.getoption("loadgroup", default=False))
        later = item.session.items[item.session.items.index(item) + 1 :]
        return all(_group_of(other) != group for other in later)


def _resolve(future: concurrent.futures.Future[None], work: Callable[[], object]) -> None:
    """Run `work`; settle `future` with its outcome."""
    try:
        work()
    except BaseException as error:  # reported by stop_all, on the session's last test
        future.set_exception(error)
    else:
        future.set_result(None)


_GROUP_SERVERS = _GroupServers()


def _group_of(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("xdist_group")
    return str(marker.args[0]) if marker is not None and marker.args else None


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for its group's tests (tests/team_fixtures.py); tests that
    use it are e2e and serialised, so under xdist it runs on that one worker."""
    from tests.team_fixtures import running_postgres

    yield _GROUP_SERVERS.start("postgres", running_postgres())
    _GROUP_SERVERS.stop_all()


@pytest.fixture(scope="session")
def s3_server():
    """One real S3 server (SeaweedFS, as in the team stack) for its group's tests
    (tests/team_fixtures.py); tests that use it are e2e and serialised, so under xdist it runs
    on that one worker."""
    from tests.team_fixtures import running_s3

    yield _GROUP_SERVERS.start("s3_server", running_s3())
    _GROUP_SERVERS.stop_all()


@pytest.fixture(scope="session")
def team_stack():
    """One whole `finpipe stack` (Postgres, S3, Prefect and MLflow servers with auth, Dask, a
    Prefect worker) for its group's tests (tests/team_fixtures.py); they are e2e and
    serialised. It stops in the background after the group's last test; if a process of it
    is left, the session's last test fails."""
    from tests.team_fixtures import running_stack

    yield _GROUP_SERVERS.start("team_stack", running_stack(), stop_in_background=True)
    _GROUP_SERVERS.stop_all()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """One Prefect server (the command `finpipe ui` runs, its own temporary database) for its
    group's tests that need only its API; yields the API URL. Its users are e2e and
    serialised (test_deployments, test_backfill_dask), so under xdist it runs on that one
    worker: one server start instead of one per module."""
    from finpipe.settings import load_settings
    from tests.team_servers import ui_server

    root = tmp_path_factory.mktemp("prefect-api")
    url = _GROUP_SERVERS.start("prefect_api", ui_server(load_settings(), "Prefect", root))
    yield f"{url}/api"
    _GROUP_SERVERS.stop_all()


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


# -- Tiers ----------------------------------------------------------------------------------
# Every test belongs to exactly one tier, given here and not in the test files:
#   unit  in one process, on data built in the test: no Prefect flow or task run, no MLflow
#         store, no child process, no server. `make test-fast`: seconds.
#   flow  real Prefect local mode, real MLflow on SQLite, Great Expectations ingest of small
#         histories into a temporary FINPIPE_HOME, model fits on small panels, the finpipe CLI
#         or a clean interpreter in a child process. `make test-flow`: a few minutes.
#   e2e   real servers on ports (Prefect server, MLflow server, `finpipe serve` and `ui`), the
#         browser, the SIGKILL crash matrix, the benchmark harness, the wheel in a fresh venv.
# `make test` runs all three. A test marked `slow` is never unit (the table's unit becomes
# flow for it), and every e2e test is also marked `slow`, so `-m "not slow"` keeps meaning
# "no servers and no long runs". A test that carries a tier marker itself keeps it.
UNIT, FLOW, E2E = "unit", "flow", "e2e"
TIERS = (UNIT, FLOW, E2E)


@dataclass(frozen=True)
class ModuleTiers:
    """The tier of a test module's tests: `default`, unless the test's function name (`by_name`,
    parameters left off) or, failing that, a fixture it uses (`by_fixture`) names another."""

    default: str
    by_name: Mapping[str, str] = field(default_factory=dict)
    by_fixture: Mapping[str, str] = field(default_factory=dict)

    def tier_of(self, item: pytest.Item) -> str:
        """Return the tier of `item`, a test of this module."""
        name = getattr(item, "originalname", item.name)
        if name in self.by_name:
            return self.by_name[name]
        used = getattr(item, "fixturenames", ())
        return next((t for f, t in self.by_fixture.items() if f in used), self.default)


# Test module (path under tests/) -> its tiers. A module missing here fails collection.
_CHILD_PROCESS = FLOW  # a test that starts the CLI or a clean interpreter in a child process
TIER_TABLE: dict[str, ModuleTiers] = {
    # Pure functions, configs, storage and GX rules on frames built in the test.
    "test_credit_config.py": ModuleTiers(UNIT),
    "test_credit_outcomes.py": ModuleTiers(UNIT),  # late outcomes on Parquet in a tmp store
    "test_customers_features.py": ModuleTiers(UNIT),
    "test_customers_profiles.py": ModuleTiers(UNIT),
    "test_input_examples.py": ModuleTiers(UNIT),
    "test_market_features.py": ModuleTiers(UNIT),
    "test_market_model.py": ModuleTiers(
        UNIT,  # a logged pyfunc in an MLflow store, reloaded: seconds
        by_name={
            "test_the_logged_pyfunc_scores_its_own_input_example_as_scoring_publishes": FLOW,
            "test_the_logged_pyfunc_takes_float64_features_as_well_as_the_float32_finpipe_stores": (
                FLOW
            ),
        },
    ),
    "test_market_boosted.py": ModuleTiers(UNIT),  # LightGBM on 12 tickers: milliseconds a fit
    "test_market_ensemble.py": ModuleTiers(UNIT),  # ensemble weights on member scores built there
    "test_market_synthetic.py": ModuleTiers(UNIT),
    "test_metrics.py": ModuleTiers(UNIT),
    "test_attribution.py": ModuleTiers(UNIT),
    "test_portfolio.py": ModuleTiers(UNIT),
    "test_portfolio_qlib.py": ModuleTiers(UNIT),  # vs Qlib risk_analysis; skips without pyqlib
    "test_backtest.py": ModuleTiers(UNIT),  # walk-forward windows: 2-epoch fits on 8 tickers
    "test_reliability_gates.py": ModuleTiers(UNIT),
    "test_repository.py": ModuleTiers(UNIT),
    "test_storage.py": ModuleTiers(UNIT),
    "test_features_shared.py": ModuleTiers(UNIT),
    "test_delivered_days.py": ModuleTiers(UNIT),
    "test_layout_readers.py": ModuleTiers(UNIT),  # four readers and the migration on tmp files
    "test_training.py": ModuleTiers(
        UNIT,
        by_name={  # fits that take seconds each
            "test_mlp_learns_a_linear_signal_to_a_clearly_positive_ic": FLOW,
            "test_same_seed_gives_identical_weights_and_history": FLOW,
            "test_early_stopping_stops_after_patience_and_restores_the_best_epoch": FLOW,
            "test_gru_and_cnn_train_on_windows_from_a_panel": FLOW,
            "test_a_seed_average_is_the_mean_of_the_nets_each_seed_trains_alone": FLOW,
        },
    ),
    # GX on frames built in the test; on the real sample data set it takes seconds.
    "test_validation.py": ModuleTiers(UNIT, by_fixture={"shared_datasets": FLOW}),
    "test_docs_assets.py": ModuleTiers(UNIT),  # Data Docs sites of frames built in the test
    "test_status.py": ModuleTiers(
        UNIT,  # a store built in the test; the command's registry part reads MLflow
        by_name={
            "test_the_command_reads_the_registry_and_says_why_the_champion_was_promoted": FLOW,
            "test_a_tracking_server_that_does_not_answer_leaves_the_store_part_said": FLOW,
            "test_a_registry_that_refuses_the_request_is_not_said_to_have_no_champion": FLOW,
            "test_the_command_reads_a_store_without_importing_a_domains_models": FLOW,
        },
    ),
    "test_reliability_security.py": ModuleTiers(
        UNIT, by_name={"test_cli_rejects_traversal_in_domain_before_any_work": _CHILD_PROCESS}
    ),
    "test_settings.py": ModuleTiers(
        UNIT,
        by_name={
            "test_allocator_keeps_freed_blocks_for_reuse_unless_turned_off": _CHILD_PROCESS,
            "test_importing_every_finpipe_module_leaves_the_environment_unchanged": _CHILD_PROCESS,
            "test_every_flow_switches_telemetry_off_as_it_starts": _CHILD_PROCESS,
            "test_a_domains_code_imports_no_plotting_or_tree_library_until_it_draws_or_fits": (
                _CHILD_PROCESS
            ),
            "test_prepare_environment_turns_telemetry_off_unless_the_user_chose": _CHILD_PROCESS,
        },
    ),
    "test_cli.py": ModuleTiers(
        UNIT,
        by_name={
            "test_ingest_error_is_one_line_and_exit_status_2": _CHILD_PROCESS,
            "test_unknown_domain_is_refused": _CHILD_PROCESS,
            "test_a_rejected_file_names_the_files_after_it_that_were_not_loaded": _CHILD_PROCESS,
            "test_a_bad_setting_is_one_line_and_exit_status_2": _CHILD_PROCESS,
            "test_a_non_json_setting_or_a_file_as_home_is_one_line_and_exit_status_2": (
                _CHILD_PROCESS
            ),
        },
    ),
    # Unit planning and locks; the flows on a prepared history (`market`) are flow.
    "test_backfill.py": ModuleTiers(
        UNIT,
        by_name={
            "test_the_new_commands_have_help": _CHILD_PROCESS,
            "test_command_errors_are_one_line_and_exit_status_2": _CHILD_PROCESS,
        },
        by_fixture={"market": FLOW},
    ),
    "test_drop_roots.py": ModuleTiers(
        UNIT,
        by_name={
            "test_a_run_naming_a_file_out_of_the_drop_folders_fails_before_reading_anything": FLOW,
            "test_the_command_line_loads_a_file_from_deliveries_and_refuses_one_elsewhere": (
                _CHILD_PROCESS
            ),
            "test_a_refused_command_says_so_before_importing_the_domains_models": _CHILD_PROCESS,
        },
    ),
    "test_planning.py": ModuleTiers(UNIT),
    "test_text.py": ModuleTiers(UNIT),
    "test_domain_seam.py": ModuleTiers(
        UNIT,
        by_name={
            "test_an_installed_domain_is_known_to_the_command_line_and_the_run_forms": (
                _CHILD_PROCESS
            )
        },
    ),
    # Model fits on small panels (the fitted model is module-wide).
    "test_credit_model.py": ModuleTiers(UNIT, by_fixture={"fitted": FLOW}),
    "test_customers_model.py": ModuleTiers(UNIT, by_fixture={"two_days": FLOW}),
    # GX ingest of small histories into a temporary store.
    "test_corrections.py": ModuleTiers(FLOW),  # vendor corrections through ingest
    "test_vintages.py": ModuleTiers(FLOW),  # the validated layer as known at a time
    "test_retractions.py": ModuleTiers(FLOW),  # a correction's retracted rows
    "test_dry_run.py": ModuleTiers(FLOW),  # finpipe ingest --dry-run
    "test_corrections_credit_customers.py": ModuleTiers(
        FLOW,  # loans' and transactions' corrections through ingest; the rest are pure
        by_name={
            "test_restate_loans_adds_new_loans_and_replaces_a_version_of_the_same_day": UNIT,
            "test_a_loan_correction_changes_no_outcome_known_before_it_and_restates_every_record": (
                UNIT
            ),
            "test_a_book_without_dates_or_ids_refuses_a_correction_before_it_lands": UNIT,
        },
    ),
    "test_credit_ingest.py": ModuleTiers(FLOW),
    "test_customers_ingest.py": ModuleTiers(FLOW),
    "test_reliability_bad_input.py": ModuleTiers(FLOW),
    "test_market_pipeline.py": ModuleTiers(
        FLOW,
        by_name={
            "test_a_champion_is_never_judged_on_test_dates_it_learnt_from": UNIT,
            (
                "test_a_champion_saved_before_its_window_was_recorded_is_judged_on_every_test_date"
            ): UNIT,
            "test_no_test_date_left_to_compare_on_means_no_promotion": UNIT,
            "test_the_promotion_reason_says_on_how_many_test_dates_both_models_were_judged": UNIT,
            "test_with_unchanged_settings_the_next_night_leaves_no_test_date_out": UNIT,
        },
    ),
    "test_market_ingest.py": ModuleTiers(FLOW),
    "test_ingest_groups.py": ModuleTiers(FLOW),
    "test_quality_floor.py": ModuleTiers(
        UNIT,
        by_name={
            "test_a_first_model_with_a_negative_validation_ic_is_refused_and_scoring_says_so": FLOW
        },
    ),
    # Real Prefect local mode and MLflow on SQLite.
    "test_nightly_flow.py": ModuleTiers(FLOW),
    "test_credit_pipeline.py": ModuleTiers(FLOW),
    "test_customers_flow.py": ModuleTiers(FLOW),
    "test_fourth_domain.py": ModuleTiers(FLOW),
    "test_demo.py": ModuleTiers(FLOW),  # `finpipe demo --domains market` small, and its backtest
    "test_backtest_flow.py": ModuleTiers(FLOW),  # one 3-window backtest and its re-run
    # Real servers, the browser, SIGKILLed children, the benchmark harness, the wheel.
    "test_deployments.py": ModuleTiers(E2E),
    "test_storage_backends.py": ModuleTiers(E2E),  # local disk and a real S3 server
    "test_stack.py": ModuleTiers(UNIT, by_fixture={"team_stack": E2E}),  # compose file: unit
    "test_team_stack_acceptance.py": ModuleTiers(E2E),  # issue #25's acceptance on the stack
    "test_ui_browser.py": ModuleTiers(E2E),
    "test_data_docs_browser.py": ModuleTiers(E2E),
    "test_reliability_dependencies.py": ModuleTiers(E2E),
    "test_reliability_crashes.py": ModuleTiers(E2E),
    "test_backtest_crash.py": ModuleTiers(E2E),  # a backtest SIGKILLed mid-window, re-run
    "test_bench_smoke.py": ModuleTiers(E2E),
    "test_packaging.py": ModuleTiers(E2E),
    "test_backfill_dask.py": ModuleTiers(E2E),  # dask scheduler + 2 workers, Prefect server
    "test_locks.py": ModuleTiers(UNIT),  # file locks in a tmp folder
    "test_pg_locks.py": ModuleTiers(E2E),  # a real PostgreSQL server, SIGKILLed lock holders
    "test_service_processes.py": ModuleTiers(_CHILD_PROCESS),  # stopping real children
    "test_group_servers.py": ModuleTiers(_CHILD_PROCESS),  # the suite's group servers, inner runs
    "test_ingest_retries.py": ModuleTiers(FLOW),  # the ingest task's retries, Prefect local
    "test_cli_drop_roots.py": ModuleTiers(FLOW),  # `finpipe ingest` and FINPIPE_DROP_ROOTS
    "test_zombie_runs.py": ModuleTiers(FLOW),  # heartbeats, the automation on Prefect's API
    "test_abandoned_runs.py": ModuleTiers(FLOW),  # MLflow runs a killed process left RUNNING
}

# Tests that run one at a time, all on one xdist worker (`--dist loadgroup`): they start real
# servers on ports, SIGKILL children or drive a browser, and time out on a loaded machine.
# Module -> the test function names to serialise, or None for every test of the module.
SERIAL_GROUP = "serial"
SERIALISED: dict[str, frozenset[str] | None] = {
    "test_deployments.py": None,
    "test_storage_backends.py": None,
    "test_stack.py": None,
    "test_team_stack_acceptance.py": None,
    "test_ui_browser.py": None,
    "test_data_docs_browser.py": None,
    "test_reliability_dependencies.py": None,
    "test_reliability_crashes.py": None,
    "test_backtest_crash.py": None,
    "test_backfill_dask.py": None,
    "test_pg_locks.py": None,
}
# The crash matrix is serialised in a group of its own, which runs beside the server group on
# the other worker: it SIGKILLs only its own children and opens no port. One group for both
# made them the run's critical path (about 275 s of a 301 s run, one after another).
# The team stack's tests (one stack for the session) are a third group for the same reason:
# about four minutes of deployment runs that would otherwise queue behind the server group.
SERIAL_GROUPS: dict[str, str] = {
    "test_reliability_crashes.py": "serial-crashes",
    "test_backtest_crash.py": "serial-crashes",
    "test_stack.py": "serial-team",
    "test_team_stack_acceptance.py": "serial-team",
}


# The order tests start in (xdist hands them out in this order with --no-loadscope-reorder):
# the serial group, then the single tests that take minutes (`START_EARLY`), then the e2e, flow
# and unit modules, a module's tests together so its module-wide fixtures are built once. The
# long tests start first, so none of them ends the run alone on one worker while the other waits.
START_EARLY: dict[str, frozenset[str]] = {
    "test_market_pipeline.py": frozenset({"test_models_reach_half_the_oracle_ic"}),
}
_START_ORDER = {SERIAL_GROUP: 0, "early": 1, E2E: 2, FLOW: 3, UNIT: 4}


_UNTIERED = pytest.StashKey[str]()


def _module_key(item: pytest.Item) -> str:
    return item.path.relative_to(Path(__file__).parent).as_posix()


def _keeps_module_fixtures_together(item: pytest.Item) -> bool:
    """Whether `item` uses a module-wide fixture of its own module (a prepared history, a trained
    model): all such tests then run on one worker, which builds the fixture once."""
    module_id = item.nodeid.split("::")[0]
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(
        d.scope != "function" and d.baseid == module_id
        for defs in definitions.values()
        for d in defs
    )


def _tier_of(item: pytest.Item, module: str) -> str | None:
    """Return the tier of `item` (its own marker, else the table's), or None if it has none."""
    own = {m.name for m in item.iter_markers() if m.name in TIERS}
    if len(own) > 1:
        raise pytest.UsageError(f"{item.nodeid} carries more than one tier: {sorted(own)}")
    if own:
        return own.pop()
    if module not in TIER_TABLE:
        return None
    tier = TIER_TABLE[module].tier_of(item)
    if tier == UNIT and item.get_closest_marker("slow") is not None:
        tier = FLOW
    item.add_marker(tier)
    return tier


def _serialised(item: pytest.Item, module: str) -> bool:
    names = SERIALISED.get(module, frozenset())
    return names is None or getattr(item, "originalname", item.name) in names


def _untiered_error(items: list[pytest.Item], untiered: set[str]) -> None:
    """Fail the run over test modules that have no tier."""
    message = (
        "no test tier for "
        + ", ".join(sorted(untiered))
        + ": add each module to TIER_TABLE in tests/conftest.py (unit, flow or e2e; see the"
        " README's Tests section), or mark its tests with @pytest.mark.unit/flow/e2e"
    )
    if "PYTEST_XDIST_WORKER" not in os.environ:
        raise pytest.UsageError(message)
    # An xdist worker's collection error reaches the terminal without its message: each
    # untiered test errors instead, selected by every tier so that no `-m` skips it.
    for item in items:
        if _module_key(item) in untiered:
            item.stash[_UNTIERED] = message
            for tier in TIERS:
                item.add_marker(tier)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test its tier marker (and `slow` for e2e) and its xdist group; start the
    long tiers first."""
    untiered: set[str] = set()
    rank: dict[str, int] = {}
    for item in items:
        module = _module_key(item)
        tier = _tier_of(item, module)
        if tier is None:
            untiered.add(module)
            rank[module] = 0
            continue
        if tier == E2E and item.get_closest_marker("slow") is None:
            item.add_marker("slow")
        serialised = _serialised(item, module)
        if serialised:
            item.add_marker(pytest.mark.xdist_group(SERIAL_GROUPS.get(module, SERIAL_GROUP)))
        elif _keeps_module_fixtures_together(item):
            item.add_marker(pytest.mark.xdist_group(module))
        order = _START_ORDER[SERIAL_GROUP if serialised else tier]
        rank[module] = min(rank.get(module, order), order)
        if getattr(item, "originalname", item.name) in START_EARLY.get(module, ()):
            rank[item.nodeid] = _START_ORDER["early"]
    if untiered:
        _untiered_error(items, untiered)
    # Stable: the file's order within a module.
    items.sort(key=lambda item: rank.get(item.nodeid, rank[_module_key(item)]))


class _XdistGroupSuffix:
    """Under `--dist loadgroup`, names each grouped test `<nodeid>@<group>` as xdist does.

    xdist 3.8 does it by writing `item._nodeid`, which pytest 9.2 no longer reads (its node ids
    are structured: pytest-dev/pytest-xdist#1386, fix pending in #1388), so the groups were
    silently ignored and the serial tests ran side by side. A no-op where xdist's suffix took.
    """

    @pytest.hookimpl(trylast=True)  # after xdist's own hook has had its go
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]):
        if not config.getoption("loadgroup", default=False):
            return
        try:
            from _pytest.nodeid import NodeId
        except ImportError:  # pytest before 9.2: xdist's own suffix works
            return
        for item in items:
            groups = sorted({str(m.args[0]) for m in item.iter_markers("xdist_group") if m.args})
            if groups and "@" not in item.nodeid:
                # The suffix goes on the last name, parameters included: `test[x]@group`.
                *parents, name = item._id.names
                params = "" if item._id.params is None else f"[{item._id.params}]"
                suffixed = f"{name}{params}@{'_'.join(groups)}"
                item._id = NodeId(path=item._id.path, names=(*parents, suffixed))


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_XdistGroupSuffix(), "finpipe-xdist-group-suffix")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Error a test that has no tier (under xdist; see pytest_collection_modifyitems)."""
    _GROUP_SERVERS.setup(item)
    if _UNTIERED in item.stash:
        pytest.fail(item.stash[_UNTIERED], pytrace=False)


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the servers of `item`'s group if it was the group's last test here."""
    _GROUP_SERVERS.teardown(item, nextitem)
