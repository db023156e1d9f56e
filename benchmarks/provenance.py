"""Where a benchmark figure comes from: when, with which command, at which commit."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """Return HEAD's short hash, with " with uncommitted changes" when tracked files differ
    from it ("unknown" outside a git checkout)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no")
    return head + (" with uncommitted changes" if changed else "")


def provenance(command: str) -> str:
    """One line: when, with which command, at which commit (and whether the tree was dirty)."""
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"Measured {when} with `{command}` at commit {commit()}."
