"""Data Docs offline in a real browser: headless Chromium with no way to the network opens a
rejected batch's site from disk; its index lists the validation run and its pages are styled.

Chromium's proxy is a closed port on 127.0.0.1, so any http(s) request fails and goes nowhere,
and the DevTools protocol records every request the pages make: all must be local files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.servers import stop
from tests.test_validation import check, clean_bars

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OFFLINE_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--proxy-server=127.0.0.1:9",  # the discard port, closed: nothing is fetched from outside
]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The Data Docs site of a rejected market batch (a missing close)."""
    if CHROMIUM is None:
        pytest.skip(
            "Debian's chromium is missing: `make venv` installs it (apt-get install chromium)"
        )
    folder = tmp_path_factory.mktemp("docs")
    bars = clean_bars()
    bars.loc[3, "close"] = np.nan
    assert check(bars, data_docs_dir=folder).success is False
    return folder


class OfflinePage:
    """One tab of an offline headless Chromium, driven over the DevTools protocol, recording
    the URL of every request its pages make and every load that failed."""

    def __init__(self, workdir: Path) -> None:
        self.profile = workdir / f"chromium-{uuid.uuid4().hex}"
        self.requests: list[str] = []
        self.failures: list[dict] = []
        self._numbers = iter(range(1, 1_000_000))

    def __enter__(self) -> OfflinePage:
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [CHROMIUM, *OFFLINE_FLAGS, f"--user-data-dir={self.profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and active.read_text().strip()):
            assert self.process.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)
        port = int(active.read_text().split()[0])
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT"
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            target = json.loads(reply.read())
        self.socket = connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.call("Network.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=900,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        self.socket.close()
        stop(self.process)

    def call(self, method: str, **params) -> dict:
        number = next(self._numbers)
        self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("method") == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])
            elif message.get("method") == "Network.loadingFailed":
                self.failures.append(message["params"])
            elif message.get("id") == number:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def open(self, page: Path, ready: str) -> None:
        """Load `page` and wait until the JavaScript expression `ready` is true, the document
        has loaded and its fonts are in."""
        self.call("Page.navigate", url=page.as_uri())
        deadline = time.monotonic() + 30
        while not self.evaluate(f"document.readyState === 'complete' && Boolean({ready})"):
            assert time.monotonic() < deadline, f"{page.name}: never got {ready}"
            time.sleep(0.05)
        self.evaluate("document.fonts.ready.then(() => true)")


def test_an_offline_browser_lists_the_rejected_batch_and_styles_its_pages(site, tmp_path):
    (validation,) = (site / "validations").rglob("*.html")
    with OfflinePage(tmp_path) as browser:
        # The index's table of runs is empty in its HTML: bootstrap-table fills it from JSON.
        runs = "#Validation-Results table tbody tr"
        browser.open(site / "index.html", ready=f"document.querySelector('{runs} td')")
        rows = browser.evaluate(f"[...document.querySelectorAll('{runs}')].map(r => r.innerText)")
        index_navbar = browser.evaluate(
            "getComputedStyle(document.querySelector('nav.navbar')).display"
        )

        browser.open(validation, ready="document.querySelector('.bootstrap-table')")
        fonts = browser.evaluate(
            "[...document.fonts].filter(f => f.status === 'loaded').map(f => f.family)"
        )
        failed_icon = browser.evaluate(
            "getComputedStyle(document.querySelector('i.fa-times'), '::before').fontFamily"
        )
        page_padding = browser.evaluate(
            "getComputedStyle(document.querySelector('.container-fluid')).paddingLeft"
        )

    # The validation run is listed: one row, with the batch's run name and suite.
    assert len(rows) == 1 and "test-batch" in rows[0] and "market_ohlcv" in rows[0]
    # Bootstrap's styles apply (.navbar is a flex box; .pl-5 is 3rem) and Font Awesome's font
    # draws the failed rule's icon.
    assert index_navbar == "flex"
    assert page_padding == "48px"
    assert "Font Awesome 6 Free" in fonts and "Font Awesome 6 Free" in failed_icon
    # Every request was for a local file (or an image inlined in a stylesheet), and loaded.
    local = ("file://", "data:")
    assert [url for url in browser.requests if not url.startswith(local)] == []
    assert any(url.endswith("/static/vendor/jquery/jquery.min.js") for url in browser.requests)
    assert browser.failures == []
