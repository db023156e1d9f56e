"""`python -m benchmarks.process_cpu -- COMMAND...`: where a command's CPU goes, by process kind.

Runs COMMAND and, while it runs, reads /proc four times a second: every process that started
after COMMAND did is counted with the CPU (user + system) it had used when last seen. Unlike
`time`, this includes processes that left COMMAND's tree (a server started with its own
session or through `su`, such as Postgres), so on an otherwise idle machine it is the CPU the
command caused. A process that lives less than a poll may be missed, and one that ends keeps
what it had used at the poll before. Linux only.

Used for the test suite's time (README, "Tests"): `python -m benchmarks.process_cpu --json
cpu.json -- make test` prints the total, the cores' share of the wall time, and the kinds of
process (command lines with numbers and temporary paths blanked) that used the most.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer

from finpipe.services.processes import stat_fields

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
POLL_SECONDS = 0.25


@dataclass
class Process:
    pid: int
    started: int  # clock ticks after boot (field 22 of /proc/<pid>/stat)
    parent: int
    command: str
    cpu_seconds: float


def _stat(pid: str) -> tuple[int, int, float] | None:
    """(start time, parent pid, CPU seconds) of process `pid`, or None if it is gone."""
    fields = stat_fields(int(pid))
    if fields is None:
        return None
    return int(fields[19]), int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS


def _command(pid: str) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _boot_ticks_now() -> int:
    """Clock ticks since boot, on the scale of the start times in /proc/<pid>/stat."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * TICKS)


def poll(seen: dict[tuple[int, int], Process], since: int) -> None:
    """Record every process started at or after `since` ticks, with its CPU so far."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(entry)
        if stat is None or stat[0] < since:
            continue
        started, parent, cpu = stat
        key = (int(entry), started)
        command = _command(entry)  # read again: an exec keeps the pid and changes it
        if key not in seen:
            seen[key] = Process(int(entry), started, parent, command, cpu)
        elif command not in ("", "?"):
            seen[key].command = command
        seen[key].cpu_seconds = max(seen[key].cpu_seconds, cpu)


def kind(command: str) -> str:
    """A process's command line with what differs between runs blanked: temporary paths,
    numbers (ports, pids), the venv's folder."""
    command = re.sub(r"\S*/\.venv/bin/", "", command)
    command = re.sub(r"/tmp/\S+", "TMP", command)
    command = re.sub(r"\d+", "N", command)
    if "exec(eval(sys.stdin.readline()))" in command:
        return "pytest-xdist worker"
    return re.sub(r"\s+", " ", command)[:100]


def by_kind(processes: Iterable[Process]) -> list[tuple[str, int, float]]:
    """(kind, process count, CPU seconds) for each kind, the most CPU first."""
    totals: dict[str, list[float]] = {}
    for process in processes:
        total = totals.setdefault(kind(process.command), [0, 0.0])
        total[0] += 1
        total[1] += process.cpu_seconds
    rows = [(name, int(count), cpu) for name, (count, cpu) in totals.items()]
    return sorted(rows, key=lambda row: -row[2])


def measure(command: list[str]) -> tuple[int, float, list[Process]]:
    """Run `command`, polling /proc; return its exit code, wall seconds and the processes."""
    seen: dict[tuple[int, int], Process] = {}
    since = _boot_ticks_now() - 1
    began = time.monotonic()
    child = subprocess.Popen(command)
    while child.poll() is None:
        poll(seen, since)
        time.sleep(POLL_SECONDS)
    poll(seen, since)
    ours = os.getpid()
    return child.returncode, time.monotonic() - began, [p for p in seen.values() if p.pid != ours]


def report(wall: float, processes: list[Process], top: int = 25) -> str:
    total = sum(p.cpu_seconds for p in processes)
    cores = os.cpu_count() or 1
    lines = [
        f"{len(processes)} processes used {total:.0f} s of CPU in {wall:.0f} s of wall time: "
        f"{total / wall:.2f} cores busy on average of {cores} "
        f"(that CPU on {cores} cores, perfectly packed, takes {total / cores:.0f} s)",
        f"{'CPU s':>8} {'procs':>5}  kind",
    ]
    for name, count, cpu in by_kind(processes)[:top]:
        lines.append(f"{cpu:8.1f} {count:5d}  {name}")
    return "\n".join(lines)


def main(
    command: Annotated[list[str], typer.Argument(help="The command to run and measure.")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write every process found here.")
    ] = None,
    top: Annotated[int, typer.Option(help="Kinds of process to list.")] = 25,
) -> None:
    """Run COMMAND and print the CPU its processes used, by kind of process."""
    code, wall, processes = measure(command)
    print(report(wall, processes, top), file=sys.stderr)
    if json_out is not None:
        json_out.write_text(
            json.dumps({"wall_seconds": wall, "processes": [asdict(p) for p in processes]})
        )
    raise typer.Exit(code)


if __name__ == "__main__":
    typer.run(main)
