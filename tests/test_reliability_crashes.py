"""Crash and overlap safety in every domain: SIGKILL at the worst moments, then a re-run gives
what an unbroken run gives; two runs of the same night at once publish it once.

Each step runs in a child process (library calls, no Prefect) with FINPIPE_CRASH_AT naming a
point in the code (finpipe.faults). After each kill we check what a reader would see, then
re-run the step without the fault. The children are forked from one process per domain that
has imported finpipe, MLflow, torch and Great Expectations once (about 11 s a start on a 2-core
machine, and a crash test starts eight); each child is still its own process, killed with
SIGKILL. The two overlapping runs are forked from it too, at the same moment.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from finpipe.date_runs import ingest_deliveries, update_features_through
from finpipe.scoring import PROVENANCE_COLUMNS
from finpipe.settings import Settings
from finpipe.storage import Storage
from tests.conftest import finpipe_home

pytestmark = pytest.mark.slow

LAYERS = ("validated", "features", "predictions", "segments")  # segments: customers only

STEPS = textwrap.dedent(
    """
    import atexit, json, os, signal, sys, time, traceback
    from pathlib import Path
    import mlflow
    from mlflow import MlflowClient
    from finpipe.date_runs import ingest_deliveries, update_features_through
    from finpipe.domains import get_domain
    from finpipe.settings import load_settings
    from finpipe.storage import Storage

    # What every child would import again (2-5 s each): GX, which validation imports on first
    # use; torch's compiler, which an optimizer's first step imports; MLflow's SQL store.
    import great_expectations  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import torch._dynamo  # noqa: F401

    get_domain(sys.argv[1])  # import the domain's code before forking

    def run_plan(name, training, plan):
        settings = load_settings()
        storage = Storage(settings.home)
        domain = get_domain(name)

        def champion():
            mlflow.set_tracking_uri(settings.tracking_uri)
            try:
                model = settings.model_name(name)
                return MlflowClient().get_model_version_by_alias(model, "champion").version
            except Exception:
                return None

        for step, as_of, files, crash in plan:
            if crash:
                print(f"CHAMPION={champion()}", flush=True)
                os.environ["FINPIPE_CRASH_AT"] = crash
            if step == "ingest":  # as a night does: a group of files, one GX run
                ingest_deliveries(storage, name, files, as_of=as_of)
            elif step == "features":
                domain.update_features(storage, as_of)
            elif step == "train":
                outcome = domain.train(storage, settings, as_of, domain.training_config(**training))
                domain.promote(storage, settings, outcome)
            elif step == "score":
                domain.score(storage, settings, as_of)
            os.environ.pop("FINPIPE_CRASH_AT", None)

    def run_overlap(name, as_of, files, go):
        storage = Storage(load_settings().home)
        while not Path(go).exists():  # both runs start their night at the same moment
            time.sleep(0.01)
        said = lambda message: print(message, flush=True)
        outcomes = ingest_deliveries(storage, name, files, as_of=as_of, progress=said)
        update_features_through(storage, name, as_of, progress=said)
        print("OUTCOMES=" + json.dumps([o["status"] for o in outcomes]), flush=True)

    JOBS = {"plan": run_plan, "overlap": run_overlap}

    def start(run):  # a child that runs one job with its own FINPIPE_HOME and output files
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            signal.alarm(600)  # a hung step ends its child, not the test session
            os.environ["FINPIPE_HOME"] = run["home"]
            for fd, path in ((1, run["stdout"]), (2, run["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            JOBS[run["job"]](*run["payload"])
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            atexit._run_exitfuncs()
            os._exit(code)

    # One request a line: its runs, each in a forked child, all at once; the answer is their
    # exit statuses once every one has ended.
    for line in sys.stdin:
        pids = [start(run) for run in json.loads(line)]
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        print(json.dumps({"returncodes": codes}), flush=True)
    """
)


@dataclass
class Deliveries:
    """One domain's synthetic deliveries as two nights: (as-of date, files delivered)."""

    domain: str
    nights: list[tuple[str, list[str]]]
    training: dict = field(default_factory=dict)
    keys: dict[str, list[str]] = field(default_factory=dict)  # layer -> one row per key


def _market(folder: Path) -> Deliveries:
    from finpipe.market.synthetic import (
        MarketSyntheticConfig,
        generate_market_panel,
        write_vendor_files,
    )

    panel = generate_market_panel(MarketSyntheticConfig(tickers=8, days=330, seed=21))
    history, daily = write_vendor_files(panel.prices, folder, daily_files=1)
    history_last = sorted(panel.prices["date"].unique())[-2]
    return Deliveries(
        "market",
        [
            (str(pd.Timestamp(history_last).date()), [str(history)]),
            (daily.stem.removeprefix("market_"), [str(daily)]),
        ],
        training={"models": ["mlp"], "max_epochs": 3, "hidden": 16},
        keys=dict.fromkeys(("validated", "features", "predictions"), ["date", "ticker"]),
    )


def _credit(folder: Path) -> Deliveries:
    from finpipe.credit.synthetic import (
        CreditSyntheticConfig,
        delivery_day,
        generate_loan_book,
        write_deliveries,
    )

    book = generate_loan_book(CreditSyntheticConfig(applications=1500, days=60, seed=21))
    history, night1, night2 = write_deliveries(book.applications, folder, nightly_files=2)
    return Deliveries(
        "credit",
        [
            (delivery_day(night1).isoformat(), [str(history), str(night1)]),
            (delivery_day(night2).isoformat(), [str(night2)]),
        ],
        training={"max_epochs": 4, "hidden": 16, "ig_steps": 4},
        keys={
            "validated": ["date", "loan_id"],
            "features": ["date", "loan_id"],
            "predictions": ["date", "id"],
        },
    )


def _customers(folder: Path) -> Deliveries:
    from finpipe.customers.synthetic import (
        CustomersSyntheticConfig,
        generate_customer_transactions,
        write_vendor_files,
    )

    generated = generate_customer_transactions(
        CustomersSyntheticConfig(customers=300, days=200, seed=21)
    )
    history, night1, night2 = write_vendor_files(generated.transactions, folder, daily_files=2)
    return Deliveries(
        "customers",
        [
            (night1.stem.removeprefix("customers_"), [str(history), str(night1)]),
            (night2.stem.removeprefix("customers_"), [str(night2)]),
        ],
        training={"max_epochs": 20, "k_max": 4, "kmeans_restarts": 2},
        keys={
            "validated": ["date", "customer_id", "timestamp", "amount"],
            "features": ["date", "customer_id"],
            "predictions": ["date", "customer_id"],
            "segments": ["date", "segment"],  # the night's segment profiles
        },
    )


@pytest.fixture(scope="module", params=[_market, _credit, _customers], ids=lambda f: f.__name__[1:])
def deliveries(request, tmp_path_factory) -> Deliveries:
    return request.param(tmp_path_factory.mktemp("drop"))


def _child_env() -> dict[str, str]:
    """This environment less the test session's finpipe and MLflow settings, except the
    promotion floor: the session turns it off for toy models like these (tests/conftest.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINPIPE_", "MLFLOW_"))}
    if "FINPIPE_PROMOTION_FLOOR" in os.environ:
        env["FINPIPE_PROMOTION_FLOOR"] = os.environ["FINPIPE_PROMOTION_FLOOR"]
    return env


@pytest.fixture(scope="module")
def steps(deliveries, tmp_path_factory):
    """The process that forks a child for each run of steps, with the domain's code imported."""
    runner = subprocess.Popen(
        [sys.executable, "-c", STEPS, deliveries.domain],
        env=_child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    runner.logs = tmp_path_factory.mktemp("steps")
    runner.runs = itertools.count()
    yield runner
    runner.stdin.close()
    runner.wait(timeout=60)


def _start(steps, runs: list[tuple[Path, str, list]]) -> list[dict]:
    """Have `steps` fork a child for each (home, job, payload), all at once; `_finish` waits
    for them."""
    request = []
    for home, job, payload in runs:
        number = next(steps.runs)
        out, err = steps.logs / f"{number}.out", steps.logs / f"{number}.err"
        request.append(
            {
                "home": str(home),
                "job": job,
                "payload": payload,
                "stdout": str(out),
                "stderr": str(err),
            }
        )
    steps.stdin.write(json.dumps(request) + "\n")
    steps.stdin.flush()
    return request


def _finish(steps, request: list[dict]) -> list[subprocess.CompletedProcess]:
    """Wait until every child of `request` has ended; their exit statuses and output."""
    answer = steps.stdout.readline()
    assert answer, f"the step runner ended (exit {steps.poll()})"
    return [
        subprocess.CompletedProcess(
            run,
            code,
            stdout=Path(run["stdout"]).read_text(),
            stderr=Path(run["stderr"]).read_text(),
        )
        for run, code in zip(request, json.loads(answer)["returncodes"], strict=True)
    ]


def _run(steps, home, deliveries: Deliveries, plan) -> subprocess.CompletedProcess:
    """Run `plan` in a fresh child process with FINPIPE_HOME=`home`."""
    payload = [deliveries.domain, deliveries.training, plan]
    return _finish(steps, _start(steps, [(home, "plan", payload)]))[0]


def _plan(deliveries: Deliveries, crash_at: dict[int, str]) -> list:
    """Two nights of steps; `crash_at` maps a step's position to the crash point to hit."""
    steps = []
    for as_of, files in deliveries.nights:
        steps += [("ingest", as_of, files), ("features", as_of, []), ("train", as_of, [])]
        steps += [("score", as_of, [])]
    return [[*step, crash_at.get(i)] for i, step in enumerate(steps)]


def _run_until_done(steps, home, deliveries: Deliveries, plan) -> list[str]:
    """Run `plan`; after each kill check what a reader sees, then resume at the killed step."""
    survived = []
    while plan:
        result = _run(steps, home, deliveries, plan)
        if result.returncode == 0:
            break
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        killed_at = next(i for i, step in enumerate(plan) if step[3])
        champion_before = result.stdout.strip().splitlines()[-1].removeprefix("CHAMPION=")
        _assert_consistent(home, deliveries.domain, champion_before)
        survived.append(f"{plan[killed_at][0]}@{plan[killed_at][3]}")
        plan = [[*plan[killed_at][:3], None], *plan[killed_at + 1 :]]
    return survived


def _assert_consistent(home, domain: str, champion_before: str) -> None:
    storage = Storage(home)
    for layer in LAYERS:
        for day in storage.partition_dates(layer, domain):
            assert len(storage.read_partition(layer, domain, day)) > 0  # every file whole
    if champion_before != "None":
        settings = Settings(home=home)
        mlflow.set_tracking_uri(settings.tracking_uri)
        model = settings.model_name(domain)
        now = MlflowClient().get_model_version_by_alias(model, "champion").version
        assert str(now) == champion_before, "champion alias moved or went missing in a crash"


def _run_statuses(home, domain: str) -> list[str]:
    """The status of every MLflow run of `domain`'s experiment in `home`."""
    settings = Settings(home=home)
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name(domain))
    return [run.info.status for run in client.search_runs([experiment.experiment_id])]


def _outputs(home, domain: str) -> dict[str, pd.DataFrame]:
    """Every published row, less what differs between two runs by design (batch ids, the
    model version and run that scored a row, when it was scored)."""
    storage = Storage(home)
    layers = {layer: storage.read_partitions(layer, domain) for layer in LAYERS}
    if len(layers["validated"]):
        layers["validated"] = layers["validated"].drop(columns="batch_id")
    for scored in ("predictions", "segments"):
        if len(layers[scored]):
            layers[scored] = layers[scored].drop(columns=PROVENANCE_COLUMNS, errors="ignore")
    return layers


def _assert_same_outputs(expected_home, actual_home, deliveries: Deliveries, layers) -> None:
    expected = _outputs(expected_home, deliveries.domain)
    actual = _outputs(actual_home, deliveries.domain)
    for layer in layers:
        assert len(expected[layer]) > 0, f"the clean run published no {layer} rows"
        pd.testing.assert_frame_equal(
            expected[layer].reset_index(drop=True),
            actual[layer].reset_index(drop=True),
            obj=layer,
        )
        keys = deliveries.keys[layer]
        assert not actual[layer].duplicated(keys).any(), f"duplicate rows in {layer}"


def test_kills_at_every_crash_point_lose_nothing(tmp_path, deliveries, steps):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert _run_until_done(steps, clean, deliveries, _plan(deliveries, {})) == []
    # The first night's delivery is killed before its last partition: the others published,
    # its batches not yet recorded (credit's and customers' last partition is the second
    # file's, the group validated together with the history).
    first_night = deliveries.nights[0][0]
    partitions = len(
        Storage(clean).partition_dates("validated", deliveries.domain, end=first_night)
    )
    assert partitions > 1
    crashes = {
        0: f"partition-before-publish@{partitions}",  # the first delivery's last partition
        1: "partition-before-publish",  # feature partitions
        2: "model-registered",  # first model registered, no alias yet
        3: "partition-before-publish",  # night 1 predictions
        5: "partition-before-publish",  # night 2 features
        6: "champion-alias",  # night 2 promotion, the first champion in place
    }
    survived = _run_until_done(steps, crashed, deliveries, _plan(deliveries, crashes))
    assert survived == [
        f"ingest@partition-before-publish@{partitions}",
        "features@partition-before-publish",
        "train@model-registered",
        "score@partition-before-publish",
        "features@partition-before-publish",
        "train@champion-alias",
    ]
    _assert_same_outputs(clean, crashed, deliveries, [*deliveries.keys])
    # The MLflow runs the kills left open were closed as KILLED when the domain next trained.
    statuses = _run_statuses(crashed, deliveries.domain)
    assert "RUNNING" not in statuses and "KILLED" in statuses, statuses
    # No half-written file is visible anywhere: only hidden temp files may remain.
    leftovers = [p for p in crashed.rglob("*.tmp") if not p.name.startswith(".")]
    assert leftovers == []


def test_two_runs_of_the_same_night_at_once_publish_it_once(tmp_path, deliveries, steps):
    as_of, files = deliveries.nights[0]
    with finpipe_home(tmp_path / "alone") as settings:
        storage = Storage(settings.home)
        ingest_deliveries(storage, deliveries.domain, files, as_of=as_of)
        update_features_through(storage, deliveries.domain, as_of)

    home, go = tmp_path / "together", tmp_path / "go"
    payload = [deliveries.domain, as_of, files, str(go)]
    request = _start(steps, [(home, "overlap", payload)] * 2)  # two processes, forked at once
    go.touch()
    runs = _finish(steps, request)
    assert [run.returncode for run in runs] == [0, 0], [run.stderr[-3000:] for run in runs]
    statuses = [
        json.loads(line.removeprefix("OUTCOMES="))
        for run in runs
        for line in run.stdout.splitlines()
        if line.startswith("OUTCOMES=")
    ]
    # Each file is validated by exactly one run; the other finds it already loaded.
    for per_file in zip(*statuses, strict=True):
        assert sorted(per_file) == ["already_loaded", "validated"]
    waited = [
        run.stdout for run in runs if f"waiting for the lock on {deliveries.domain}" in run.stdout
    ]
    assert waited, "the runs did not overlap: one should have waited for the other's lock"
    _assert_same_outputs(tmp_path / "alone", home, deliveries, ["validated", "features"])
