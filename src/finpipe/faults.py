"""Fault injection for crash tests: `FINPIPE_CRASH_AT=<point>` kills the process there.

The named points sit at the moments a crash would hurt most (between writing and publishing
a partition, between registering a model and moving an alias). `<point>@<n>` kills at the
n-th time this process reaches the point instead of the first: in the middle of a write of
many partitions, after some are published. In normal runs the variable is unset and
`crash_point` is a dictionary lookup.
"""

from __future__ import annotations

import collections
import os
import signal

CRASH_POINTS = (
    "partition-before-publish",  # temp Parquet file written and synced, not yet renamed
    "model-registered",  # new model version registered, `challenger` alias not yet set
    "champion-alias",  # promotion decided, `champion` alias not yet moved
)

_reached: collections.Counter[str] = collections.Counter()  # arrivals while the point is armed


def crash_point(name: str) -> None:
    """SIGKILL this process if FINPIPE_CRASH_AT names `name` (what an OOM kill would do), at
    its first arrival here or, for `name@n`, its n-th."""
    armed = os.environ.get("FINPIPE_CRASH_AT")
    if not armed:
        return
    point, _, nth = armed.partition("@")
    if point != name:
        return
    _reached[armed] += 1
    if _reached[armed] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
