"""MLflow runs a killed process left RUNNING (finpipe.tracking.close_abandoned_runs): closed as
KILLED when the domain next sets up tracking, and only those whose owner is provably gone.

The SIGKILL case end to end (a night killed mid-training, then re-run) is in
test_reliability_crashes.py; here each kind of owner is set up by hand on a real MLflow store.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from mlflow import MlflowClient

from finpipe import tracking
from finpipe.services.processes import start_time


def _gone_process_owner() -> str:
    """The owner tag of a process that ran on this host and has been killed since."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = start_time(child.pid)
    assert started is not None
    child.kill()
    child.wait()
    return f"{socket.gethostname()} {child.pid} {started}"


def test_only_runs_whose_process_is_gone_are_closed_as_killed(home):
    experiment = tracking.use_tracking(home, "market")
    client = MlflowClient()
    here, me = socket.gethostname(), os.getpid()

    def running(owner: str | None) -> str:
        tags = {} if owner is None else {tracking.OWNER_TAG: owner}
        return client.create_run(experiment, tags=tags).info.run_id

    gone = running(_gone_process_owner())
    reused = running(f"{here} {me} 1")  # this process's id, but not the process that ran it
    alive = running(tracking.owner_tags()[tracking.OWNER_TAG])
    elsewhere = running(f"another-host {me} {start_time(me)}")
    unknown_start = running(f"{here} 999999 -")  # no /proc where it ran: nothing provable
    untagged = running(None)  # an older finpipe's run, or another tool's
    finished = running(_gone_process_owner())
    client.set_terminated(finished, status="FINISHED")

    assert tracking.use_tracking(home, "market") == experiment  # what every training does

    status = {run: client.get_run(run).info.status for run in (gone, reused, alive, elsewhere)}
    status |= {run: client.get_run(run).info.status for run in (unknown_start, untagged)}
    status[finished] = client.get_run(finished).info.status
    assert status == {
        gone: "KILLED",
        reused: "KILLED",
        alive: "RUNNING",
        elsewhere: "RUNNING",
        unknown_start: "RUNNING",
        untagged: "RUNNING",
        finished: "FINISHED",
    }
    reason = client.get_run(gone).data.tags[tracking.CLOSED_TAG]
    assert f"(pid {_pid(client, gone)} on {here}) had gone" in reason
    assert tracking.CLOSED_TAG not in client.get_run(alive).data.tags
    assert tracking.close_abandoned_runs(experiment) == []  # nothing left to close


def test_every_run_finpipe_starts_names_its_owner(home):
    tracking.use_tracking(home, "market")
    with tracking.run("night") as parent, tracking.child_run("mlp", parent) as child:
        pass
    client = MlflowClient()
    owner = tracking.owner_tags()[tracking.OWNER_TAG]
    for run in (parent, child):
        assert client.get_run(run).data.tags[tracking.OWNER_TAG] == owner
    host, pid, started = owner.split(" ")
    assert (host, int(pid), started) == (socket.gethostname(), os.getpid(), start_time(os.getpid()))


def _pid(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).data.tags[tracking.OWNER_TAG].split(" ")[1]
