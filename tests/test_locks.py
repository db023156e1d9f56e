"""The lock rules both backends share, on file locks (no server): one lock at a time per run
and thread. test_pg_locks.py runs the same checks on PostgreSQL advisory locks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from finpipe.locks import LockOrderError, held_locks, history_lock, partition_lock

DAY = "2024-01-02"


def check_one_lock_at_a_time(root: Path, locks_url: str) -> None:
    """A run that holds a lock and asks to wait for a second one in the same thread is refused
    at once (two runs doing it in opposite orders would deadlock); trying without waiting, or
    another run in the thread, is allowed."""
    with partition_lock(root, "market", DAY, holder="nightly", locks_url=locks_url):
        assert held_locks("nightly") == (f"market/date={DAY}",)
        started = time.monotonic()
        with (
            pytest.raises(LockOrderError, match="nightly holds the lock on market/date="),
            history_lock(root, "market", holder="nightly", timeout=5, locks_url=locks_url),
        ):
            pass
        assert time.monotonic() - started < 1  # refused at once, not after a wait
        # Trying (never waiting) for another resource cannot deadlock: allowed.
        with history_lock(root, "market", holder="nightly", timeout=0, locks_url=locks_url):
            assert len(held_locks("nightly")) == 2
        # Another run in this thread (a test standing in for one) may wait as usual.
        with history_lock(root, "market", holder="backfill", timeout=5, locks_url=locks_url):
            assert held_locks("backfill") == ("market/history",)
            assert len(held_locks()) == 2
    assert held_locks() == ()


def test_one_lock_at_a_time_on_file_locks(tmp_path):
    check_one_lock_at_a_time(tmp_path, "")
