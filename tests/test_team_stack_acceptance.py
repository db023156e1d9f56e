"""Issue #25's acceptance on the running team stack (`team_stack`: `finpipe stack up`, one per
session): the deployments run by Prefect workers against Postgres-backed Prefect and MLflow
servers, the data in the stack's S3 bucket, the dates of a backfill on its two Dask workers.

The module shares one set of deployment runs between its tests, in two phases:

1. The stack's own worker runs night 1 of market, credit and customers (training and
   promotion in the MLflow server), three runs whose `inputs` leave the drop folder and a bad
   market delivery, all at once.
2. The stack's worker stops; two "hosts" (`prefect worker` processes with a new, empty
   FINPIPE_LOCAL_DIR each, one work queue each) run night 2 of every domain, the market night
   on both hosts at once, and beside them a backfill on the Dask workers; then a backfill on
   one host, SIGKILLed with its flow run midway, is run again on the other; then night 3 with
   the S3 server stopped and restarted under it (the stack's one S3 restart of the session:
   the checks that objects outlive it are made on it too; a restart costs 15-20 s).

The last test scans every log, artifact and MLflow parameter those runs left for the stack's
secrets. The stack's worker is started again when the module ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from finpipe.credit.synthetic import CreditSyntheticConfig, generate_loan_book, write_deliveries
from finpipe.customers.synthetic import (
    CustomersSyntheticConfig,
    generate_customer_transactions,
)
from finpipe.customers.synthetic import write_vendor_files as write_customer_files
from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    inject_defects,
    write_vendor_files,
)
from finpipe.services import stack, tls
from finpipe.settings import TELEMETRY_OFF
from finpipe.storage import Storage, file_sha256
from tests.team_fixtures import TeamStack

pytestmark = pytest.mark.slow

DOMAINS = ("market", "credit", "customers")
# The smallest data and fits each domain's own flow tests use, smaller where the point here is
# the plumbing (the quality floor is off in tests: FINPIPE_PROMOTION_FLOOR=false).
TRAINING = {
    "market": {"max_epochs": 2, "models": ["mlp"], "hidden": 8},
    "credit": {"max_epochs": 3, "hidden": 8},
    "customers": {"max_epochs": 10, "k_max": 4, "kmeans_restarts": 2},
}
BACKFILL_DATES = 12  # the backfill on the stack's Dask workers
KILLED_DATES = 20  # the backfill killed midway and run again
RUN_TIMEOUT = 600.0
PREFECT = str(Path(sys.executable).with_name("prefect"))


# -- the stack as a client sees it ----------------------------------------------------------
@dataclass
class Team:
    """The running stack, its clients and the deliveries in its drop folder."""

    stack: TeamStack
    workdir: Path
    deliveries: dict[str, list[Path]]  # per domain: history, night 1, night 2 (, night 3)
    days: dict[str, list[dt.date]]  # per domain: the as-of day of night 1, 2 (, 3)
    market_history: list[dt.date]  # the sessions of the market history file
    bad_delivery: Path
    refused_inputs: dict[str, str]  # how an input leaves the drop folder -> the input
    runs: dict[str, str] = field(default_factory=dict)  # label -> flow run id

    @property
    def values(self) -> dict[str, str]:
        return self.stack.values

    @property
    def drop(self) -> Path:
        return stack.StackFolder(self.stack.root).drop

    @property
    def api(self) -> str:
        return self.values["PREFECT_API_URL"]

    def prefect(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api, auth_string=self.values["PREFECT_API_AUTH_STRING"])

    def s3(self, secret: str | None = None, **options):
        """A boto3 client of the stack's S3 server (`secret`: another secret key; `options`:
        boto3.client's)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.values["AWS_ENDPOINT_URL"],
            region_name=self.values["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.values["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=secret or self.values["AWS_SECRET_ACCESS_KEY"],
            **options,
        )

    def keys(self, prefix: str) -> list[str]:
        """Every object key of the stack's bucket under `prefix`."""
        pages = self.s3().get_paginator("list_objects_v2")
        found = pages.paginate(Bucket=stack.BUCKET, Prefix=prefix)
        return sorted(entry["Key"] for page in found for entry in page.get("Contents", ()))

    def store(self) -> Storage:
        return Storage(self.values["FINPIPE_HOME"])

    def start(self, label: str, deployment: str, parameters: dict, queue: str | None = None):
        """Create a run of `deployment` as the UI's custom-run form does; remember it by label."""
        with self.prefect() as client:
            found = client.read_deployment_by_name(deployment)
            run = client.create_flow_run_from_deployment(
                found.id, parameters=parameters, work_queue_name=queue
            )
        self.runs[label] = str(run.id)
        return str(run.id)

    def wait(self, *labels: str, timeout: float = RUN_TIMEOUT) -> dict[str, object]:
        """Wait for the runs called `labels` to reach a final state; return them by label."""
        done: dict[str, object] = {}
        deadline = time.monotonic() + timeout
        with self.prefect() as client:
            while len(done) < len(labels):
                for label in labels:
                    if label not in done:
                        run = client.read_flow_run(self.runs[label])
                        if run.state is not None and run.state.is_final():
                            done[label] = run
                if time.monotonic() > deadline:
                    late = sorted(set(labels) - set(done))
                    raise AssertionError(f"runs {late} not finished in {timeout:.0f} s")
                time.sleep(0.25)  # each phase waits on its runs: notice their end at once
        return done

    def logs(self, label: str) -> str:
        """The run's log lines, as the Prefect UI shows them."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        with self.prefect() as client:
            lines = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[self.runs[label]]))
            )
        return "\n".join(line.message for line in lines)

    def artifacts(self, label: str) -> dict[str, str]:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with self.prefect() as client:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[self.runs[label]])
                )
            )
        return {a.key: str(a.data) for a in found}


def _as_of(path: Path) -> dt.date:
    return dt.date.fromisoformat(path.name.split(".")[0].rsplit("_", 1)[1])


def _deliveries(drop: Path) -> dict:
    """The three domains' deliveries in the stack's drop folder: a history and three nights
    of market, a history and two nights of credit and customers; a bad market file."""
    panel = generate_market_panel(MarketSyntheticConfig(tickers=4, days=305, seed=4))
    market = write_vendor_files(panel.prices, drop / "market", daily_files=4)
    book = generate_loan_book(CreditSyntheticConfig(applications=5000, days=150, seed=5))
    credit = write_deliveries(book.applications, drop / "credit", nightly_files=2)
    log = generate_customer_transactions(CustomersSyntheticConfig(customers=600, days=450, seed=1))
    customers = write_customer_files(log.transactions, drop / "customers", daily_files=2)
    # The fourth market night, delivered with a non-positive price.
    rows = pd.read_csv(market[4]).rename(columns={"Adj Close": "adj_close"})
    bad = inject_defects(rows.rename(columns=str.lower), ["non_positive_price"], rows_per_defect=1)
    bad_delivery = drop / "market-bad" / market[4].name
    bad_delivery.parent.mkdir()
    bad.rename(columns={"adj_close": "Adj Close"}).to_csv(bad_delivery, index=False)
    history = sorted(pd.read_csv(market[0], usecols=["Date"])["Date"].unique())
    return {
        "deliveries": {"market": market[:4], "credit": credit, "customers": customers},
        "market_history": [dt.date.fromisoformat(day) for day in history],
        "bad_delivery": bad_delivery,
    }


@pytest.fixture(scope="module")
def team(team_stack, tmp_path_factory) -> Iterator[Team]:
    """The stack, its deliveries in the drop folder, and this process as one of its clients
    (AWS and MLflow credentials in the environment); the nightly schedule paused."""
    workdir = tmp_path_factory.mktemp("team")
    folder = stack.StackFolder(team_stack.root)
    data = _deliveries(folder.drop)
    # Three ways out of the drop folder, each towards the stack's own secrets.
    link = folder.drop / "market" / "market_2030-01-02.csv"
    link.symlink_to(folder.env_file)
    refused = {
        "absolute": "/etc/passwd",
        "dot-dot": f"{folder.drop}/market/../../stack.env",
        "symlink": str(link),
    }
    days = {
        domain: [_as_of(path) for path in files[1:]] for domain, files in data["deliveries"].items()
    }
    team = Team(team_stack, workdir, refused_inputs=refused, days=days, **data)
    client_env = {
        name: team_stack.values[name]
        for name in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
        )
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in client_env.items():
            patch.setenv(name, value)
        _pause_schedules(team)
        yield team


def _pause_schedules(team: Team) -> None:
    """Deactivate the nightly's cron schedule: a session running at 02:00 would otherwise get
    a scheduled night besides the module's own."""
    with team.prefect() as client:
        nightly = client.read_deployment_by_name("nightly/nightly")
        for schedule in nightly.schedules:
            client.update_deployment_schedule(nightly.id, schedule.id, active=False)


def test_stack_up_registered_the_deployments_on_its_work_pool(team):
    from finpipe.flows.deployments import DEPLOYMENT_NAMES

    with team.prefect() as client:
        deployments = client.read_deployments()
    assert sorted(d.name for d in deployments) == sorted(DEPLOYMENT_NAMES)
    assert {d.work_pool_name for d in deployments} == {stack.WORK_POOL}
    # Module paths: the workers import finpipe's flows, whatever their working directory.
    assert all(d.entrypoint.startswith("finpipe.flows.") for d in deployments)


# -- phase 1: the stack's own worker ------------------------------------------------------
@pytest.fixture(scope="module")
def first_nights(team, hosts) -> dict[str, object]:
    """Night 1 of each domain, the refused inputs and the bad delivery, all at once on the
    stack's worker (the hosts start meanwhile). Returns the finished runs by label."""
    for domain in DOMAINS:
        history, night, *_ = team.deliveries[domain]
        parameters = {
            "domain": domain,
            "as_of": team.days[domain][0].isoformat(),
            "inputs": [str(history), str(night)],
            "training": TRAINING[domain],
        }
        team.start(f"night-1-{domain}", "nightly/nightly", parameters)
    for how, path in team.refused_inputs.items():
        team.start(f"refused-{how}", "nightly/nightly", {"domain": "market", "inputs": [path]})
    team.start(
        "bad-delivery",
        "nightly/nightly",
        {"domain": "market", "inputs": [str(team.bad_delivery)], "retrain": False},
    )
    return team.wait(*team.runs)


def test_each_domains_night_runs_on_the_stacks_worker_and_writes_every_layer_to_the_bucket(
    team, first_nights
):
    for domain in DOMAINS:
        run = first_nights[f"night-1-{domain}"]
        assert run.state.is_completed(), f"{domain}: {run.state.message}"
        summary = team.artifacts(f"night-1-{domain}")[f"nightly-{domain}-summary"]
        assert "| validated |" in summary and "## Promotion" in summary, summary
    prefix = team.values["FINPIPE_HOME"].removeprefix(f"s3://{stack.BUCKET}/")
    keys = team.keys(f"{prefix}/")
    areas = {"/".join(key.split("/")[1:3]) for key in keys}
    for domain in DOMAINS:
        layers = ["landing", "validated", "features", "predictions", "state"]
        layers += ["segments"] if domain == "customers" else []
        assert {f"{layer}/{domain}" for layer in layers} <= areas, domain
    assert any(key.startswith(f"{prefix}/reports/data_docs/") for key in keys)
    store = team.store()
    for domain in DOMAINS:
        night = team.days[domain][0]
        assert night in store.partition_dates("predictions", domain)
        assert not store.read_partition("predictions", domain, night).empty
        assert store.read_json(f"state/{domain}/completed/{night}.json")["status"] == "completed"
    # The history's sessions all validated, with their features, in the bucket.
    assert set(team.market_history) <= set(store.partition_dates("features", "market"))


def test_models_are_registered_and_promoted_in_the_mlflow_server_with_artifacts_in_the_bucket(
    team, first_nights
):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=team.values["MLFLOW_TRACKING_URI"])
    for domain in DOMAINS:
        champion = client.get_model_version_by_alias(f"finpipe-{domain}", "champion")
        assert champion.version == "1", domain
        # The server keeps the model's files in the bucket (its artifacts destination), not on
        # any machine's disk; clients reach them through the server.
        model_id = champion.source.removeprefix("models:/")
        location = client.get_logged_model(model_id).artifact_location
        assert location == f"mlflow-artifacts:/models/{model_id}/artifacts", location
        files = team.keys(f"mlflow/models/{model_id}/artifacts/")
        assert f"mlflow/models/{model_id}/artifacts/MLmodel" in files, files
        folder = f"mlflow/models/{model_id}/artifacts/artifacts/model/"  # finpipe's model folder
        assert f"{folder}model.json" in files, files
        assert client.get_run(champion.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
        predictions = team.store().read_partition("predictions", domain, team.days[domain][0])
        assert set(predictions["model_version"]) == {"1"}
        assert set(predictions["run_id"]) == {champion.run_id}


def test_a_backfill_fans_its_dates_out_over_the_stacks_two_dask_workers(team, second_nights):
    run = second_nights["dask-backfill"]
    assert run.state.is_completed(), run.state.message
    per_worker = second_nights["dask-tasks"]
    assert len(per_worker) == stack.DASK_WORKERS
    assert min(per_worker.values()) >= 1 and sum(per_worker.values()) == BACKFILL_DATES, per_worker
    table = json.loads(team.artifacts("dask-backfill")["backfill-market"])
    assert [row["status"] for row in table] == ["completed"] * BACKFILL_DATES


def test_inputs_outside_the_drop_folder_fail_before_anything_is_read(team, first_nights):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    for how, path in team.refused_inputs.items():
        run = first_nights[f"refused-{how}"]
        assert run.state.is_failed(), how
        message = run.state.message or ""
        assert f"input {path!r} is outside the drop folders" in message, message
        assert str(team.drop) in message  # the folders that are allowed
        assert "stack.env" not in message.replace(path, ""), "named where the input led"
        with team.prefect() as client:
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            )
        assert tasks == [], f"{how}: {[t.name for t in tasks]} ran before the refusal"
    landed = " ".join(team.keys("data/landing/"))
    assert "passwd" not in landed and "stack.env" not in landed and "2030-01-02" not in landed


def test_a_bad_delivery_is_quarantined_in_the_bucket_with_its_report(team, first_nights):
    run = first_nights["bad-delivery"]
    assert run.state.is_failed()
    assert "quarantine" in (run.state.message or ""), run.state.message
    folder = f"quarantine/market/b{file_sha256(team.bad_delivery)[:12]}"
    held = team.keys(f"data/{folder}/")
    assert f"data/{folder}/{team.bad_delivery.name}" in held
    assert f"data/{folder}/data_docs/index.html" in held
    report = team.store().read_json(f"{folder}/report.json")
    assert report["success"] is False
    assert any(not rule["success"] for rule in report["rules"])
    bad_day = _as_of(team.bad_delivery)
    assert bad_day not in team.store().partition_dates("validated", "market")


# -- phase 2: two more hosts, each with an empty local disk -------------------------------
@dataclass
class Host:
    """A `prefect worker` standing for another machine: its work queue, its local disk."""

    name: str
    process: subprocess.Popen
    local_dir: Path
    log: Path

    def processes(self) -> list[int]:
        """The worker and the flow runs it started (they share its FINPIPE_LOCAL_DIR)."""
        marker = f"FINPIPE_LOCAL_DIR={self.local_dir}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
        return found

    def kill(self) -> list[int]:
        """SIGKILL the worker and every flow run it runs, as a machine that dies."""
        killed = self.processes()
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        return killed


@contextlib.contextmanager
def _host(team: Team, name: str) -> Iterator[Host]:
    """Start a Prefect worker on the stack's pool, on work queue `name` (created here), with
    only the stack's client settings and an empty local folder of its own."""
    from prefect.exceptions import ObjectAlreadyExists

    with team.prefect() as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_queue(name=name, work_pool_name=stack.WORK_POOL)
    root = team.workdir / name
    local = root / "local"
    root.mkdir()
    log = root / "worker.log"
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        **team.stack.client_environment(),
        "FINPIPE_LOCAL_DIR": str(local),
        "FINPIPE_DROP_ROOTS": json.dumps([str(team.drop)]),
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    argv = [PREFECT, "worker", "start", "--pool", stack.WORK_POOL, "--work-queue", name]
    argv += ["--name", name, "--type", "process"]
    with open(log, "ab") as output:
        process = subprocess.Popen(
            argv, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    host = Host(name, process, local, log)
    try:
        yield host
    finally:
        host.kill()


def _wait_for_workers(team: Team, hosts: list[Host], timeout: float = 120) -> None:
    """Wait until every host's worker has reported to the server (it polls its queue)."""
    deadline = time.monotonic() + timeout
    with team.prefect() as client:
        while True:
            online = {w.name for w in client.read_workers_for_work_pool(stack.WORK_POOL)}
            if {host.name for host in hosts} <= online:
                return
            for host in hosts:
                assert host.process.poll() is None, host.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"workers online: {online}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def hosts(team) -> Iterator[dict[str, Host]]:
    """Hosts `host-a` and `host-b`, idle until runs are put on their queues; the stack's
    worker (which `second_nights` stops: it would take those runs too) running again after."""
    try:
        with _host(team, "host-a") as a, _host(team, "host-b") as b:
            yield {"a": a, "b": b}
    finally:
        if "prefect-worker" not in stack.running_processes(stack.StackFolder(team.stack.root)):
            stack.start_service(team.stack.root, "prefect-worker")


@pytest.fixture(scope="module")
def second_nights(team, hosts, first_nights) -> dict[str, object]:
    """With the stack's worker stopped: night 2 of each domain scored with the champions (no
    retrain) by the new hosts, the market night on both at once; beside them on host-a, a
    backfill of BACKFILL_DATES sessions on the Dask workers (nothing else uses Dask then)."""
    from benchmarks.dask_backfill import tasks_run_per_worker

    stack.stop_service(team.stack.root, "prefect-worker")
    _wait_for_workers(team, list(hosts.values()))
    security = tls.security(team.values)
    before = tasks_run_per_worker(team.values["FINPIPE_DASK_ADDRESS"], security)
    dates = team.market_history[-(BACKFILL_DATES + KILLED_DATES) : -KILLED_DATES]
    backfill = {"domain": "market", "start": str(dates[0]), "end": str(dates[-1])}
    team.start("dask-backfill", "backfill/backfill", {**backfill, "concurrency": 2}, "host-a")
    for domain, queue in zip(DOMAINS, ("host-a", "host-b", "host-a"), strict=True):
        night = team.deliveries[domain][2]
        parameters = {
            "domain": domain,
            "as_of": team.days[domain][1].isoformat(),
            "inputs": [str(night)],
            "retrain": False,
        }
        team.start(f"night-2-{domain}", "nightly/nightly", parameters, queue=queue)
        if domain == "market":
            team.start("night-2-market-again", "nightly/nightly", parameters, queue="host-b")
    runs = team.wait(*(f"night-2-{d}" for d in DOMAINS), "night-2-market-again", "dask-backfill")
    after = tasks_run_per_worker(team.values["FINPIPE_DASK_ADDRESS"], security)
    runs["dask-tasks"] = {name: after[name] - before.get(name, 0) for name in after}
    return runs


def test_hosts_with_empty_disks_score_the_next_night_from_the_stack_alone(
    team, hosts, second_nights
):
    for label in [f"night-2-{domain}" for domain in DOMAINS] + ["night-2-market-again"]:
        run = second_nights[label]
        assert run.state.is_completed(), f"{label}: {run.state.message}"
    store = team.store()
    for domain in DOMAINS:
        night = team.days[domain][1]
        predictions = store.read_partition("predictions", domain, night)
        assert not predictions.empty and set(predictions["model_version"]) == {"1"}, domain
    # Both hosts ran flow runs, and nothing of the store landed on their disks.
    for host in hosts.values():
        kept = {p.relative_to(host.local_dir).parts[0] for p in host.local_dir.rglob("*")}
        assert kept <= {"prefect"}, f"{host.name} kept {kept} locally"


def test_two_hosts_running_the_same_night_validate_each_file_once_and_publish_it_once(
    team, second_nights, tmp_path
):
    from finpipe.date_runs import ingest_deliveries, update_features_through

    runs = [second_nights["night-2-market"], second_nights["night-2-market-again"]]
    assert {run.work_queue_name for run in runs} == {"host-a", "host-b"}
    assert runs[0].start_time < runs[1].end_time and runs[1].start_time < runs[0].end_time
    night = team.days["market"][1]
    statuses = []
    for label in ("night-2-market", "night-2-market-again"):
        summary = team.artifacts(label)["nightly-market-summary"]
        statuses += [s for s in ("| validated |", "| already_loaded |") if s in summary]
    assert sorted(statuses) == ["| already_loaded |", "| validated |"], statuses
    # The data is a single run's: the same deliveries loaded by one run on a local disk.
    alone = Storage(tmp_path / "alone")
    ingest_deliveries(alone, "market", map(str, team.deliveries["market"][:3]), as_of=night)
    update_features_through(alone, "market", night)
    store = team.store()
    for layer in ("validated", "features"):
        pd.testing.assert_frame_equal(
            store.read_partitions(layer, "market", end=night),
            alone.read_partitions(layer, "market"),
        )
    # One predictions object, one row per ticker; the night's file landed once.
    delivered = pd.read_csv(team.deliveries["market"][2])
    assert team.keys(f"data/predictions/market/{night}/") == [
        f"data/predictions/market/{night}/part-0.parquet"
    ]
    predictions = store.read_partition("predictions", "market", night)
    assert sorted(predictions["ticker"]) == sorted(delivered["Ticker"])
    name = team.deliveries["market"][2].name
    assert len([k for k in team.keys("data/landing/market/") if k.endswith(name)]) == 1


def _advisory_locks(team: Team) -> list[tuple]:
    """The advisory locks held in the stack's lock database, with their holders' names."""
    import psycopg

    with psycopg.connect(team.values["FINPIPE_LOCKS_URL"]) as connection:
        return connection.execute(
            "select a.application_name from pg_locks l join pg_stat_activity a "
            "on a.pid = l.pid where l.locktype = 'advisory' and l.granted"
        ).fetchall()


@pytest.fixture(scope="module")
def killed_backfill(team, hosts, second_nights) -> dict[str, object]:
    """A backfill on host-b, SIGKILLed with its flow run once some dates are done; the same
    backfill run again on host-a."""
    dates = team.market_history[-KILLED_DATES:]
    parameters = {
        "domain": "market",
        "start": str(dates[0]),
        "end": str(dates[-1]),
        "concurrency": 1,
    }
    team.start("killed-backfill", "backfill/backfill", parameters, queue="host-b")
    store = team.store()
    deadline = time.monotonic() + RUN_TIMEOUT
    done_before_kill: list[dt.date] = []
    while len(done_before_kill) < 2:
        assert time.monotonic() < deadline, "the backfill never got going"
        done_before_kill = [d for d in dates if store.exists(f"state/market/completed/{d}.json")]
        time.sleep(0.2)
    killed = hosts["b"].kill()
    # The killed process's locks go as Postgres sees its connections close; a date already
    # running on a Dask worker finishes first (its client's death cancels only those waiting).
    freed_after = time.monotonic()
    while (locks_after_kill := _advisory_locks(team)) and time.monotonic() - freed_after < 60:
        time.sleep(0.2)
    team.start("backfill-again", "backfill/backfill", parameters, queue="host-a")
    again = team.wait("backfill-again")["backfill-again"]
    return {
        "dates": dates,
        "done_before_kill": done_before_kill,
        "killed": killed,
        "locks_after_kill": locks_after_kill,
        "again": again,
        "locks_after": _advisory_locks(team),
    }


def test_a_host_killed_mid_backfill_loses_nothing_and_the_rerun_completes_with_locks_free(
    team, killed_backfill
):
    result = killed_backfill
    assert len(result["killed"]) >= 2  # the worker and its flow run
    assert len(result["done_before_kill"]) < KILLED_DATES, "killed too late to test anything"
    assert result["locks_after_kill"] == [], result["locks_after_kill"]
    assert result["again"].state.is_completed(), result["again"].state.message
    assert result["locks_after"] == []
    table = json.loads(team.artifacts("backfill-again")["backfill-market"])
    statuses = {row["date"]: row["status"] for row in table}
    assert set(statuses.values()) <= {"completed", "done earlier"}
    assert all(statuses[str(d)] == "done earlier" for d in result["done_before_kill"])
    for day in result["dates"]:  # one object per date, one row per ticker
        assert team.keys(f"data/predictions/market/{day}/") == [
            f"data/predictions/market/{day}/part-0.parquet"
        ]
        predictions = team.store().read_partition("predictions", "market", day)
        assert not predictions["ticker"].duplicated().any() and len(predictions) == 4


def test_both_backfills_publish_what_the_same_backfill_on_local_disk_does(
    team, first_nights, killed_backfill, tmp_path, monkeypatch
):
    """The dates of both backfills, backfilled again on a local folder (thread pool, file
    locks) from the bucket's validated partitions, give identical predictions."""
    from finpipe.flows.backfill import backfill
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    home = tmp_path / "home"
    s3 = team.s3()
    for key in team.keys("data/validated/market/"):
        target = home / key.removeprefix("data/")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(stack.BUCKET, key, str(target))
    monkeypatch.setenv("FINPIPE_HOME", str(home))
    monkeypatch.setenv("FINPIPE_MLFLOW_TRACKING_URI", team.values["MLFLOW_TRACKING_URI"])
    for name in ("FINPIPE_LOCKS_URL", "FINPIPE_DASK_ADDRESS", "FINPIPE_LOCAL_DIR"):
        monkeypatch.delenv(name, raising=False)
    dates = team.market_history[-(BACKFILL_DATES + KILLED_DATES) :]
    with temporary_settings(
        {PREFECT_API_URL: team.api, PREFECT_API_AUTH_STRING: team.values["PREFECT_API_AUTH_STRING"]}
    ):
        summary = backfill(domain="market", start=dates[0], end=dates[-1], concurrency=2)
    assert {d["status"] for d in summary["dates"]} == {"completed"}
    local, bucket = Storage(home), team.store()
    for day in dates:
        expected = local.read_partition("predictions", "market", day).drop(columns="scored_at")
        published = bucket.read_partition("predictions", "market", day).drop(columns="scored_at")
        pd.testing.assert_frame_equal(published, expected)


RESTART_KEY = "tests/restart.txt"  # an object written before the S3 server's restart


def _no_retries(team: Team):
    from botocore.config import Config

    return team.s3(config=Config(retries={"max_attempts": 1}))


@pytest.fixture(scope="module")
def s3_restarted(team, hosts, killed_backfill) -> dict[str, object]:
    """Night 3 of market on host-a, the S3 server stopped once the night's file has landed in
    the bucket (the run is validating it) and started again two seconds after it has gone;
    the night run again if it failed. Besides, an object written create-only before the
    restart, what a request got while the server was down, and the object read after."""
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = _no_retries(team)
    s3.put_object(Bucket=stack.BUCKET, Key=RESTART_KEY, Body=b"once", IfNoneMatch="*")
    night = team.deliveries["market"][3]
    parameters = {
        "domain": "market",
        "as_of": team.days["market"][2].isoformat(),
        "inputs": [str(night)],
        "retrain": False,
    }
    team.start("night-3", "nightly/nightly", parameters, queue="host-a")
    landed = f"data/landing/market/{file_sha256(night)[:12]}__{night.name}"
    deadline = time.monotonic() + RUN_TIMEOUT
    with team.prefect() as client:
        while not team.keys(landed):
            run = client.read_flow_run(team.runs["night-3"])
            assert not run.state.is_final(), f"night 3 ended first: {run.state.message}"
            assert time.monotonic() < deadline, "the night's file never landed"
            time.sleep(0.1)
    stopped = stack.stop_service(team.stack.root, "s3")  # refuses requests from the signal on
    try:
        s3.head_object(Bucket=stack.BUCKET, Key=RESTART_KEY)
        while_stopped: Exception | None = None
    except (BotoCoreError, ClientError) as error:
        while_stopped = error
    time.sleep(2)
    stack.start_service(team.stack.root, "s3")
    kept = s3.get_object(Bucket=stack.BUCKET, Key=RESTART_KEY)["Body"].read()
    first = team.wait("night-3")["night-3"]
    result = {"stopped": stopped, "first": first, "again": None}
    result |= {"while_stopped": while_stopped, "kept": kept}
    if not first.state.is_completed():
        team.start("night-3-again", "nightly/nightly", parameters, queue="host-a")
        result["again"] = team.wait("night-3-again")["night-3-again"]
    return result


def test_the_s3_server_restarted_mid_night_is_retried_or_fails_cleanly_and_the_rerun_completes(
    team, s3_restarted
):
    assert s3_restarted["stopped"]
    first, again = s3_restarted["first"], s3_restarted["again"]
    if again is not None:
        # Failed (not crashed), saying where it could not read or write; the re-run completes.
        assert first.state.is_failed(), f"{first.state.type}: {first.state.message}"
        assert f"{team.values['FINPIPE_HOME']}/" in (first.state.message or "")
        assert again.state.is_completed(), again.state.message
    else:
        assert first.state.is_completed()
    night = team.days["market"][2]
    delivered = pd.read_csv(team.deliveries["market"][3])
    assert len(team.store().read_partition("validated", "market", night)) == len(delivered)
    predictions = team.store().read_partition("predictions", "market", night)
    assert sorted(predictions["ticker"]) == sorted(delivered["Ticker"])
    assert team.keys(f"data/predictions/market/{night}/") == [
        f"data/predictions/market/{night}/part-0.parquet"
    ]


def test_the_s3_server_keeps_objects_across_a_restart_and_writes_create_only(team, s3_restarted):
    """The stack's S3 checks keys, honours If-None-Match and survives a restart, which fault
    tests make with stop_service/start_service (the restart under night 3, above)."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    assert s3_restarted["stopped"]
    assert isinstance(s3_restarted["while_stopped"], EndpointConnectionError), s3_restarted
    assert s3_restarted["kept"] == b"once"
    assert "s3" in stack.running_processes(stack.StackFolder(team.stack.root))
    client = _no_retries(team)
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=stack.BUCKET, Key=RESTART_KEY, Body=b"twice", IfNoneMatch="*")
    assert client.get_object(Bucket=stack.BUCKET, Key=RESTART_KEY)["Body"].read() == b"once"
    stranger = team.s3(secret="not-the-secret")
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        stranger.get_object(Bucket=stack.BUCKET, Key=RESTART_KEY)


def test_no_credential_in_logs_artifacts_errors_or_mlflow_params(team, s3_restarted, hosts):
    """After every run above: the stack's logs, the hosts' logs, every run's log lines, state
    message and artifacts in Prefect, and every MLflow run's params and tags."""
    from mlflow import MlflowClient

    texts: dict[str, str] = {}
    for log in stack.StackFolder(team.stack.root).logs.glob("*.log"):
        texts[f"stack log {log.name}"] = log.read_text(errors="replace")
    for host in hosts.values():
        texts[f"{host.name} log"] = host.log.read_text(errors="replace")
    with team.prefect() as client:
        for label, run_id in team.runs.items():
            run = client.read_flow_run(run_id)
            texts[f"{label} state"] = f"{run.state.message} {run.parameters}"
        artifacts = client.read_artifacts()
    for label in team.runs:
        texts[f"{label} logs"] = team.logs(label)
    texts["artifacts"] = "\n".join(f"{a.key} {a.description} {a.data}" for a in artifacts)
    mlflow = MlflowClient(tracking_uri=team.values["MLFLOW_TRACKING_URI"])
    experiments = mlflow.search_experiments()
    runs = mlflow.search_runs([e.experiment_id for e in experiments])
    texts["mlflow"] = "\n".join(f"{run.data.params} {run.data.tags}" for run in runs)
    assert len(runs) >= len(DOMAINS) and len(artifacts) >= len(DOMAINS)
    assert sum(len(text) for text in texts.values()) > 10_000  # there was something to scan
    for name, secret in team.stack.secrets().items():
        leaked = [where for where, text in texts.items() if secret in text]
        assert not leaked, f"{name} found in {leaked}"
