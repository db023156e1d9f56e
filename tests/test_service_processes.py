"""Stopping a stack process (finpipe.services.processes): the first signal, then escalation.

Real child processes: a Python child that ignores the first signal must be escalated to the
next one; a cooperative one stops at the first, with no warning.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from finpipe.services.processes import ChildServer, escalation, stop_pid, stop_process

# The child says it is ready once its handlers are in place, so no signal comes too early.
IGNORES = """
import signal, sys, time
for name in sys.argv[1:]:
    signal.signal(getattr(signal, name), signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


def _child(*ignored: str, group: bool = False) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", IGNORES, *ignored],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=group,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def test_a_child_that_ignores_the_first_signals_is_escalated_to_the_last(caplog):
    process = _child("SIGINT", "SIGQUIT")
    steps = [(signal.SIGINT, 0.3), (signal.SIGQUIT, 0.3), (signal.SIGKILL, 5.0)]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="finpipe.services"):
        assert stop_process(process, steps, "stubborn") is True
    assert process.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 4
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["stubborn ignored SIGINT", "stubborn ignored SIGQUIT"]


def test_a_cooperative_child_stops_at_the_first_signal_without_a_warning(caplog):
    process = _child()
    with caplog.at_level(logging.WARNING, logger="finpipe.services"):
        assert stop_process(process, escalation(signal.SIGTERM, 5.0), "polite") is True
    assert process.returncode == -signal.SIGTERM
    assert caplog.records == []


def test_a_group_stop_reaches_the_grandchildren(tmp_path: Path):
    # A shell that starts a `sleep` in the background: SIGTERM to the group stops both.
    pid_file = tmp_path / "sleep.pid"
    shell = subprocess.Popen(
        ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], start_new_session=True
    )
    deadline = time.monotonic() + 5
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert stop_process(shell, escalation(signal.SIGTERM, 5.0), "shell", group=True)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{grandchild}").exists() and _state(grandchild) not in ("Z", "X"):
        assert time.monotonic() < deadline, "the grandchild outlived its group's stop"
        time.sleep(0.05)


def test_stop_pid_escalates_by_polling_and_a_stopped_process_is_not_signalled_again():
    process = _child("SIGTERM")
    steps = [(signal.SIGTERM, 0.3), (signal.SIGKILL, 5.0)]
    assert stop_pid(process.pid, lambda: process.poll() is None, steps, "by pid") is True
    assert process.returncode == -signal.SIGKILL
    # Already gone: every step finds it gone at once (no signal to a reused pid matters here).
    assert stop_pid(process.pid, lambda: False, steps, "gone") is True


def test_a_child_server_stops_once_and_reports_whether_it_ran():
    class Sleeper(ChildServer):
        def start(self):
            self._process = _child()
            return self

        def stop(self):
            self.stopped = self._stop_child(escalation(signal.SIGTERM, 5.0), "sleeper")

    with Sleeper() as server:
        assert server.running and server.pid
        process = server._process
    assert server.stopped is True and not server.running and server.pid is None
    assert process is not None and process.returncode == -signal.SIGTERM
    server.stop()
    assert server.stopped is False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def test_a_recorded_process_is_told_from_a_later_one_by_its_start_time():
    """A pid recorded by `finpipe stack` or an MLflow run's owner may be reused after a crash:
    the kernel's start time tells the two apart, so an unrelated process is never stopped."""
    from finpipe.services.processes import start_time, still_running

    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    time.sleep(0.3)  # start times count clock ticks (1/100 s)
    second = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = start_time(first.pid), start_time(second.pid)
        assert None not in started and started[0] != started[1]
        assert still_running(second.pid, started[1])
        assert not still_running(second.pid, started[0])  # the same pid, another process
        assert not still_running(second.pid, "")
    finally:
        for child in (first, second):
            child.kill()
            child.wait()
    assert start_time(first.pid) is None
