"""Free TCP ports on 127.0.0.1 for local servers (the team stack's, `finpipe ui`'s, the tests').

A port is chosen below the range the kernel hands to outgoing connections (Linux's
`ip_local_port_range`, 32768-60999 by default). A port from that range, free when probed, can
be taken by any client's connection before the server binds it: `finpipe ui`'s MLflow server,
which binds seconds after its port was chosen, once lost its port that way in a test run.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

# Listening ports are drawn from [LISTEN_FROM, the ephemeral range's start).
LISTEN_FROM = 20000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DRAWS = 200  # ports tried before asking the kernel for any free one
# Not the global `random`: tests seed it, and two processes seeded alike would draw alike.
_DRAW = random.SystemRandom()


def ephemeral_start() -> int:
    """Return the first port the kernel may give an outgoing connection (32768 if unknown)."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> list[int]:
    """Return `count` distinct ports that nothing listens on right now, below the ephemeral
    range where it leaves room (all held while probing, so none is handed out twice)."""
    end = ephemeral_start()
    candidates = range(LISTEN_FROM, end) if end - LISTEN_FROM >= 1000 else range(0)
    with contextlib.ExitStack() as stack:
        held: list[socket.socket] = []
        for port in _DRAW.sample(candidates, min(_DRAWS, len(candidates))):
            if len(held) == count:
                break
            probe = stack.enter_context(socket.socket())
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            held.append(probe)
        while len(held) < count:  # no room below the range: any port the kernel gives
            probe = stack.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            held.append(probe)
        return [probe.getsockname()[1] for probe in held]


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` now."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
