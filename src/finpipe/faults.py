"""Fault injection for crash tests: `FINPIPE_CRASH_AT=<point>` kills the process there.

The named points sit at the moments a crash would hurt most (between writing and publishing
a partition, between registering a model and moving an alias). In normal runs the variable is
unset and `crash_point` is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_POINTS = (
    "partition-before-publish",  # temp Parquet file written and synced, not yet renamed
    "model-registered",  # new model version registered, `challenger` alias not yet set
    "champion-alias",  # promotion decided, `champion` alias not yet moved
)


def crash_point(name: str) -> None:
    """SIGKILL this process if FINPIPE_CRASH_AT names `name` (what an OOM kill would do)."""
    if os.environ.get("FINPIPE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
