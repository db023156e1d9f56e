"""Stopping a server process: a polite signal, a wait, then firmer signals if it hangs.

Every process of the team stack stops the same way, only the signals differ (Postgres: SIGINT
for a fast shutdown, then SIGQUIT; the others: SIGTERM to their process group); the last step
is SIGKILL. `stop_process` stops a child this process started (a `Popen`), `stop_pid` one known
by its process id only (`finpipe stack down` in another process than `stack up`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

log = logging.getLogger("finpipe.services")

KILL_WAIT = 10.0  # seconds a firmer signal is given before the next one

Steps = Sequence[tuple[signal.Signals, float]]


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/`pid`/stat after the command name (which may hold spaces), so
    field N of proc(5) is item N - 3: state, parent, ... CPU ticks at 11-12, start time at 19;
    None if the process is gone or the system has no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid`, which tells it from a later process given the
    same id; None if it is gone, a zombie, or the system has no /proc (then nothing can be
    proven about it)."""
    fields = stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def still_running(pid: int, started: str) -> bool:
    """Whether process `pid` is the one that started at `started` (a `start_time`) and runs;
    False for an unknown start time."""
    return bool(started) and start_time(pid) == started


def escalation(first: signal.Signals, timeout: float, *then: signal.Signals) -> Steps:
    """`first` with `timeout` seconds to exit, then each of `then` and SIGKILL with KILL_WAIT."""
    return [(first, timeout), *((sig, KILL_WAIT) for sig in (*then, signal.SIGKILL))]


def signal_until_gone(
    send: Callable[[signal.Signals], None],
    gone_within: Callable[[float], bool],
    steps: Steps,
    what: str,
) -> bool:
    """Send each signal of `steps` in turn (`send`) and wait up to its seconds for the process
    to be gone (`gone_within`); return whether it went. A process that has already gone when a
    signal is sent (ProcessLookupError) counts as going."""
    for sig, wait in steps:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(sig)
        if gone_within(wait):
            return True
        log.warning("%s ignored %s", what, sig.name)
    return False


def stop_process(
    process: subprocess.Popen, steps: Steps, what: str, *, group: bool = False
) -> bool:
    """Stop child `process` (its whole process group if `group`: it was started with
    `start_new_session=True`) by `steps` and reap it; return whether it has exited."""
    if process.poll() is not None:
        return True

    def send(sig: signal.Signals) -> None:
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)

    def gone_within(seconds: float) -> bool:
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    return signal_until_gone(send, gone_within, steps, what)


def stop_pid(
    pid: int, alive: Callable[[], bool], steps: Steps, what: str, *, group: bool = False
) -> bool:
    """Stop process `pid` (not a child of this one) by `steps`, polling `alive` (which should
    also check that the pid still names the same process); return whether it has gone."""

    def send(sig: signal.Signals) -> None:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)

    def gone_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    return signal_until_gone(send, gone_within, steps, what)


class ChildServer(ABC):
    """Base of a server run as a child of this process (`_process`, set by the subclass's
    `start()`): whether it runs, its pid, `with` (start, then stop), and `_stop_child`."""

    _process: subprocess.Popen | None = None

    @abstractmethod
    def start(self) -> object:
        """Start the server; return what its callers need (e.g. its address)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server (a no-op when it is not running)."""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self.running and self._process else None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _stop_child(self, steps: Steps, what: str, *, group: bool = False) -> bool:
        """Stop the child by `steps` (see `stop_process`), naming it `what` in warnings;
        return whether it was running."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return False
        stop_process(process, steps, f"{what} (pid {process.pid})", group=group)
        return True
