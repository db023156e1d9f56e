"""The UIs in a real browser: `finpipe ui` serves Prefect and MLflow, headless Chromium reads them.

Screenshots go to the test's temporary folder; with FINPIPE_UPDATE_SCREENSHOTS=1 (`make
screenshots`) they also replace the ones the README shows, in docs/screenshots/.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from finpipe import tracking
from finpipe.ingest import ingest_file
from finpipe.market.pipeline import (
    MARKET_CONTRACT,
    MarketTrainingConfig,
    promote_market,
    train_market,
    update_market_features,
)
from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    write_vendor_files,
)
from finpipe.settings import TELEMETRY_OFF, Settings
from finpipe.storage import Storage
from tests.conftest import REPO_ROOT, finpipe_home
from tests.servers import free_port, stop

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, and quiet on a closed network: no background fetches, updates, sync or QUIC.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]
README_SHOTS = REPO_ROOT / "docs" / "screenshots"


@dataclass
class UIs:
    settings: Settings
    prefect: str
    mlflow: str
    workdir: Path


@pytest.fixture(scope="module")
def uis(tmp_path_factory):
    """A trained market experiment, `finpipe ui` on it, deploy/prefect.yaml deployed to it."""
    if CHROMIUM is None:
        pytest.skip(
            "Debian's chromium is missing: `make venv` installs it (apt-get install chromium)"
        )
    root = tmp_path_factory.mktemp("ui")
    panel = generate_market_panel(MarketSyntheticConfig(tickers=6, days=305, seed=9))
    files = write_vendor_files(panel.prices, root / "drop", daily_files=1)
    with finpipe_home(root / "home") as settings:
        tracking.use_tracking(settings, "market")  # the store exists before the UI opens it
        prefect_port, mlflow_port = free_port(), free_port()
        prefect, mlflow = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
        log = root / "finpipe-ui.log"
        with open(log, "ab") as output:
            ui = subprocess.Popen(
                [sys.executable, "-m", "finpipe.cli", "ui"]
                + ["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
                env={
                    **os.environ,
                    **TELEMETRY_OFF,
                    "FINPIPE_HOME": str(settings.home),
                    "PREFECT_HOME": str(root / "prefect-server"),
                },
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            # While the servers start: a validated history and a trained, promoted model.
            storage = Storage(settings.home)
            ingest_file(storage, MARKET_CONTRACT, files[0], as_of=dt.date.today())
            last = storage.partition_dates("validated", "market")[-1]
            update_market_features(storage, last)
            config = MarketTrainingConfig(max_epochs=2, models=["mlp"], hidden=8)
            promote_market(storage, settings, train_market(storage, settings, last, config))
            _wait_for(f"{prefect}/api/health", f"{mlflow}/health", process=ui, log=log)
            _prefect_deploy(f"{prefect}/api", root)
            yield UIs(settings, prefect, mlflow, root)
        finally:
            if ui.poll() is None:
                os.killpg(ui.pid, signal.SIGINT)  # what ^C does: `finpipe ui` stops both
                with contextlib.suppress(subprocess.TimeoutExpired):
                    ui.wait(timeout=60)
            stop(ui)
            for url in (prefect, mlflow):  # and they are gone, not orphaned
                with pytest.raises(OSError):
                    urllib.request.urlopen(url, timeout=2)


def _wait_for(*urls: str, process: subprocess.Popen, log: Path) -> None:
    """Wait until every URL answers (the servers are up), or fail with the command's output."""
    deadline = time.monotonic() + 240
    for url in urls:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"finpipe ui did not serve {url}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def _prefect_deploy(api_url: str, workdir: Path) -> None:
    """Register the deployments of deploy/prefect.yaml as a team would: `prefect deploy`."""
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(workdir / "prefect-cli"),
    }
    prefect = str(Path(sys.executable).with_name("prefect"))
    for command in (
        [prefect, "work-pool", "create", "finpipe", "--type", "process"],
        [prefect, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--all"],
    ):
        done = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


class Chromium:
    """Headless Chromium driven over the DevTools protocol (`websockets` comes with Prefect).

    Waits on conditions, not on time: a page counts as loaded when every expected text is in
    it and no CSS animation or transition is still running (both UIs fade pages in).
    """

    def __init__(self, workdir: Path) -> None:
        self.profile = workdir / f"chromium-{uuid.uuid4().hex}"  # a fresh profile
        self.process: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> Chromium:
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and active.read_text().strip()):
            assert self.process.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        self.port = int(active.read_text().split()[0])
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            stop(self.process)

    def open(self, url: str, size: tuple[int, int], expect: list[str], screenshot: Path) -> str:
        """Load `url` at `size`, wait for it, save a PNG screenshot; return the page's text."""
        from websockets.sync.client import connect

        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT"
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            target = json.loads(reply.read())
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as socket:
            calls = iter(range(1, 1_000_000))

            def call(method: str, **params) -> dict:
                number = next(calls)
                socket.send(json.dumps({"id": number, "method": method, "params": params}))
                while True:
                    message = json.loads(socket.recv(timeout=60))
                    if message.get("id") == number:
                        assert "error" not in message, message
                        return message["result"]

            def evaluate(expression: str):
                return call("Runtime.evaluate", expression=expression, returnByValue=True)[
                    "result"
                ].get("value")

            width, height = size
            call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                 deviceScaleFactor=1, mobile=False)  # fmt: skip
            call("Page.navigate", url=url)
            deadline = time.monotonic() + 120
            text = ""
            while time.monotonic() < deadline:
                text = evaluate("document.body ? document.body.innerText : ''") or ""
                moving = evaluate(
                    "document.getAnimations().filter(a => a.playState === 'running').length"
                )
                shown = " ".join(text.split())  # as the tests read it: one space between words
                if all(item in shown for item in expect) and moving == 0:
                    break
                time.sleep(0.25)
            shot = call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return " ".join(text.split())


def _rendered(screenshot: Path) -> bool:
    """Return whether the page right of the navigation is drawn in full contrast.

    A page caught blank or mid fade-in shows only greys; a drawn one has near-white and
    near-black pixels (text on its background).
    """
    import numpy as np
    from PIL import Image

    gray = np.asarray(Image.open(screenshot).convert("L"), dtype=float)
    content = gray[:, gray.shape[1] // 5 :]
    return float(np.percentile(content, 99.9) - np.percentile(content, 0.1)) > 120


def _keep(screenshot: Path, *, in_readme: bool = True) -> None:
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _rendered(screenshot), f"{screenshot.name} is blank or still fading in"
    if in_readme and os.environ.get("FINPIPE_UPDATE_SCREENSHOTS") == "1":
        README_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, README_SHOTS / screenshot.name)


def test_prefect_ui_shows_the_backfill_deployment_and_its_run_form(uis):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(f"{uis.prefect}/api") as client:
        deployment = client.read_deployment_by_name("backfill/backfill")
    page = f"{uis.prefect}/deployments/deployment/{deployment.id}"
    entrypoint = "finpipe.flows.backfill:backfill"
    shot = uis.workdir / "prefect-backfill-deployment.png"
    with Chromium(uis.workdir) as browser:
        # The flow's name comes from a request of its own, after the page: wait for it too.
        header = "Deployments backfill Flow backfill Work Pool finpipe"
        text = browser.open(page, (1400, 900), [entrypoint, header], shot)
        assert header in text, text
        assert entrypoint in text and "finpipe" in text
        _keep(shot, in_readme=False)

        form = uis.workdir / "prefect-backfill-run-form.png"
        described = "Last date of the range, included; today at the latest."
        text = browser.open(f"{page}/run", (1400, 1900), [described], form)
    assert "Deployments backfill Run" in text, text
    for field in ("start", "end", "steps", "concurrency", "retrain", "force", described):
        assert field in text, field
    _keep(form)


def test_prefect_ui_shows_the_backtest_run_form_with_every_parameter_described(uis):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(f"{uis.prefect}/api") as client:
        deployment = client.read_deployment_by_name("backtest/backtest")
    page = f"{uis.prefect}/deployments/deployment/{deployment.id}"
    form = uis.workdir / "prefect-backtest-run-form.png"
    # Descriptions come from the flow's docstring (one line each there, so one text here).
    described = [
        "Names held on each side of the portfolios.",
        "Trading cost in basis points of traded value.",
        "How many windows train at the same time.",
        "Last date scored, included.",
        "Names the backtest: its store backtests/NAME/ and MLflow run backtest-NAME.",
    ]
    with Chromium(uis.workdir) as browser:
        text = browser.open(f"{page}/run", (1400, 2600), described, form)
    assert "Deployments backtest Run" in text, text
    fields = ("start", "end", "name", "retrain_every", "train_window", "models", "horizon")
    fields += ("top_k", "n_drop", "cost_bps", "concurrency", "training", "force")
    for field in (*fields, *described):
        assert field in text, field
    assert "Sessions of the market calendar between retrains" in text
    _keep(form, in_readme=False)


def test_mlflow_ui_shows_the_market_experiment(uis):
    from mlflow import MlflowClient

    client = MlflowClient(uis.settings.tracking_uri)
    experiment = client.get_experiment_by_name("finpipe-market")
    runs = client.search_runs([experiment.experiment_id])
    [run] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the nightly run
    page = f"{uis.mlflow}/#/experiments/{experiment.experiment_id}/runs"
    shot = uis.workdir / "mlflow-market-experiment.png"
    run_name = run.data.tags["mlflow.runName"]
    with Chromium(uis.workdir) as browser:
        text = browser.open(page, (1600, 900), ["finpipe-market", run_name], shot)
    assert "finpipe-market" in text and run_name in text, text
    _keep(shot)


def test_prefect_deploy_registers_what_finpipe_serve_serves(uis):
    from finpipe.flows.deployments import DEPLOYMENT_NAMES, build_deployments
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.flows import load_flow_from_entrypoint

    from finpipe.schedule import ScheduleSettings

    defaults = {name: field.default for name, field in ScheduleSettings.model_fields.items()}
    served = {d.name: d for d in build_deployments(ScheduleSettings(**defaults))}
    assert sorted(served) == sorted(DEPLOYMENT_NAMES)
    with SyncPrefectClient(f"{uis.prefect}/api") as client:
        for name, expected in served.items():
            deployed = client.read_deployment_by_name(f"{name}/{name}")
            assert deployed.work_pool_name == "finpipe"
            assert (
                load_flow_from_entrypoint(deployed.entrypoint).fn
                is load_flow_from_entrypoint(expected.entrypoint).fn
            )
            assert deployed.parameters == expected.parameters
            schedules = [
                (s.schedule.cron, s.schedule.timezone, s.parameters) for s in deployed.schedules
            ]
            assert schedules == [
                (s.schedule.cron, s.schedule.timezone, s.parameters) for s in expected.schedules
            ]
