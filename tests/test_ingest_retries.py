"""The ingest task (tasks/dates.py) retries a server that did not answer (the object store, the
lock database), and nothing else.

Real Prefect (local mode) runs the real `validate-and-publish` task on two market deliveries in
a local store; the store's publish step is made to fail once mid-ingest, after the files have
landed and their batches are recorded `landed`: with StoreUnavailable (what finpipe raises when
an S3 server does not answer), LockUnavailable or LockLost (the lock database went away) the
task's retry finishes the ingest with the data a clean run writes; with any other error (a
refused write, a lock busy past its timeout, a bug) the task fails at its first attempt.
"""

from __future__ import annotations

import re

import pandas as pd
import pytest
from finpipe.tasks.dates import STORE_RETRY_DELAYS, ingest_deliveries
from prefect import flow

from finpipe.errors import StorageError, StoreUnavailable
from finpipe.locks import LockTimeout
from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    write_vendor_files,
)
from finpipe.pg_locks import LockLost, LockUnavailable
from finpipe.storage import Storage


@pytest.fixture(scope="module")
def deliveries(tmp_path_factory) -> list[str]:
    """The last two daily files of a small synthetic market (3 tickers)."""
    panel = generate_market_panel(MarketSyntheticConfig(tickers=3, days=305, seed=3))
    files = write_vendor_files(panel.prices, tmp_path_factory.mktemp("drop"), daily_files=2)
    return [str(path) for path in files[-2:]]


@flow(name="ingest-under-test")
def ingest_flow(paths: list[str], as_of: str) -> list[dict]:
    return ingest_deliveries("market", paths, as_of, "ingest-under-test", 10.0)


def _fail_first_publish(monkeypatch, error: Exception) -> list[str]:
    """Make the first publish of a validated partition raise `error`; return the list the
    publishes are recorded in (the failed one included)."""
    calls: list[str] = []
    publish = Storage.write_partition

    def flaky(self, layer, domain, day, frame, *args, **kwargs):
        calls.append(f"{layer}/{day}")
        if layer == "validated" and len(calls) == 1:
            raise error
        return publish(self, layer, domain, day, frame, *args, **kwargs)

    monkeypatch.setattr(Storage, "write_partition", flaky)
    return calls


def _task_run(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        (run,) = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return run


def _validated(storage: Storage) -> pd.DataFrame:
    days = storage.partition_dates("validated", "market")
    frames = [storage.read_partition("validated", "market", day) for day in days]
    return pd.concat(frames, ignore_index=True).sort_values(["date", "ticker"], ignore_index=True)


@pytest.mark.parametrize(
    "error",
    [
        StoreUnavailable("publishing market: the object store did not answer"),
        LockUnavailable("cannot reach the lock database at 127.0.0.1:5432/finpipe"),
        LockLost("the history lock of market was lost: the lock database closed its session"),
    ],
    ids=["object-store", "lock-database-down", "lock-lost"],
)
def test_a_server_that_did_not_answer_mid_ingest_is_retried_to_a_clean_result(
    home, deliveries, monkeypatch, tmp_path, error
):
    as_of = "2099-01-01"
    calls = _fail_first_publish(monkeypatch, error)
    state = ingest_flow(deliveries, as_of, return_state=True)
    assert state.is_completed(), state.message
    outcomes = state.result()
    assert [o["status"] for o in outcomes] == ["validated", "validated"]
    task = _task_run(state.state_details.flow_run_id)
    assert task.run_count == 2 and task.state.is_completed()  # one retry, by Prefect
    assert calls[0].startswith("validated/") and calls.count(calls[0]) == 2

    storage = Storage(home.home)
    # Landed once per file (create-only), one `validated` batch record per file, and the
    # same validated rows as a clean ingest into a second store.
    assert len(storage.list_files(storage.landing_key("market"))) == len(deliveries)
    assert {r["status"] for r in storage.batch_records("market")} == {"validated"}
    monkeypatch.undo()
    clean = Storage(tmp_path / "clean")
    from finpipe.date_runs import ingest_deliveries as ingest_plainly

    ingest_plainly(clean, "market", deliveries, as_of=as_of)
    pd.testing.assert_frame_equal(_validated(storage), _validated(clean))


@pytest.mark.parametrize(
    "error",
    [
        StorageError("publishing market: HTTP 403 (Access Denied)"),
        LockTimeout("market history is locked by another run; gave up after 10 s"),
        RuntimeError("a bug"),
    ],
    ids=["refused-write", "busy-lock", "bug"],
)
def test_any_other_error_fails_the_ingest_at_its_first_attempt(
    home, deliveries, monkeypatch, error
):
    calls = _fail_first_publish(monkeypatch, error)
    state = ingest_flow(deliveries, "2099-01-01", return_state=True)
    assert state.is_failed()
    with pytest.raises(type(error), match=re.escape(str(error))):
        state.result()
    task = _task_run(state.state_details.flow_run_id)
    assert task.run_count == 1 and task.state.is_failed()
    assert len([c for c in calls if c.startswith("validated/")]) == 1


def test_the_retries_cover_a_restarting_object_store():
    assert ingest_deliveries.retries == len(STORE_RETRY_DELAYS) >= 2
    assert sum(STORE_RETRY_DELAYS) >= 30  # a SeaweedFS restart takes seconds
