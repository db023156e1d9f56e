"""The suite's own plumbing: a server started for an xdist group's tests stops when the group's
last test ends (`_GroupServers` in tests/conftest.py), in the run modes `make test` uses.

Each case runs a small inner pytest session in a child process whose conftest drives the real
`_GroupServers` the way tests/conftest.py does, and reads back the order of events.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

INNER_CONFTEST = """
import contextlib, os
from pathlib import Path
import pytest
from tests.conftest import _GroupServers

SERVERS = _GroupServers()

def said(line):
    with Path(os.environ["GROUP_LOG"]).open("a") as log:
        log.write(line + "\\n")

@contextlib.contextmanager
def server():
    said("start")
    yield "up"
    if os.environ.get("STOP_FAILS"):
        raise RuntimeError("the server left a process behind")
    said("stop")

@pytest.fixture(scope="session")
def srv():
    background = bool(os.environ.get("STOP_IN_BACKGROUND"))
    yield SERVERS.start("srv", server(), stop_in_background=background)
    SERVERS.stop_all()

def pytest_configure(config):  # known without xdist too
    config.addinivalue_line("markers", "xdist_group(name): tests run on one worker")

def pytest_runtest_setup(item):
    SERVERS.setup(item)

@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    SERVERS.teardown(item, nextitem)
"""

INNER_TESTS = """
import pytest
from conftest import said

@pytest.mark.xdist_group("servers")
def test_a(srv):
    said("a")

@pytest.mark.xdist_group("servers")
def test_b(srv):
    said("b")

def test_c():
    said("c")

def test_d():
    said("d")
"""

LATE_USER = """

def test_e(srv):  # outside the group, after its end: told to join the group
    said("e")
"""


def _inner_run(
    tmp_path, *arguments: str, tests: str = INNER_TESTS, **environment: str
) -> tuple[list[str], str]:
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(tests)
    log = tmp_path / "events.log"
    # The inner session is its own: not an xdist worker of this one, without its options.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    # Its own temporary folder: in the shared one, a new session first deletes the older
    # sessions' folders beyond the last three (a whole earlier run's, GBs: 45 s of this test).
    basetemp = f"--basetemp={tmp_path / 'inner-tmp'}"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", basetemp, *arguments],
        cwd=tmp_path,
        env={**inherited, **environment, "GROUP_LOG": str(log), "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert log.exists(), f"the inner session ran no test:\n{output}"
    return log.read_text().split(), output


@pytest.mark.parametrize(
    "mode",
    [
        # What `make test` runs: a worker's `dist` option reads "no", and the old check of it
        # left every group's servers running until the worker exited.
        ["-n", "1", "--dist", "loadgroup", "--no-loadscope-reorder"],
        ["-p", "no:xdist"],  # one process: `pytest tests/test_x.py` while developing
    ],
    ids=["xdist-loadgroup", "one-process"],
)
def test_a_groups_server_stops_after_its_last_test_before_the_next_one(tmp_path, mode):
    events, output = _inner_run(tmp_path, *mode)
    assert "4 passed" in output, output
    assert events == ["start", "a", "b", "stop", "c", "d"], output


def test_other_xdist_modes_keep_the_server_to_the_end(tmp_path):
    """Under `--dist load` a group's tests need not run in a row: nothing stops early."""
    events, output = _inner_run(tmp_path, "-n", "1", "--dist", "load")
    assert "4 passed" in output, output
    assert events[-1] == "stop" and sorted(events[1:-1]) == ["a", "b", "c", "d"], output


def test_a_test_outside_the_group_that_needs_its_stopped_server_errors_with_the_fix(tmp_path):
    events, output = _inner_run(tmp_path, "-p", "no:xdist", tests=INNER_TESTS + LATE_USER)
    assert "4 passed" in output and "1 error" in output, output
    assert "srv was stopped when the tests of xdist group 'servers' ended" in output, output
    assert "put this test in that group" in output, output
    assert "e" not in events, events


def test_a_server_stopping_in_the_background_stops_and_its_failure_fails_the_run(tmp_path):
    """The team stack stops in a thread while the next tests run; the session waits for it at
    its end, and a stop that failed (a process left) fails the session's last test."""
    events, output = _inner_run(tmp_path, "-p", "no:xdist", STOP_IN_BACKGROUND="1")
    assert "4 passed" in output and "error" not in output, output
    assert events[:3] == ["start", "a", "b"] and sorted(events[3:]) == ["c", "d", "stop"], output

    events, output = _inner_run(tmp_path, "-p", "no:xdist", STOP_IN_BACKGROUND="1", STOP_FAILS="1")
    assert "4 passed, 1 error" in output, output
    assert "ERROR at teardown of test_d" in output, output
    assert "the server left a process behind" in output, output
