"""Which delivered files a run may read: only files under the drop folders (FINPIPE_DROP_ROOTS).

A run's `inputs` come from a run form, a schedule or the command line, and whoever can start a
run need not be allowed to read every file the worker can. So a path that leaves the drop
folders (an absolute path elsewhere, `..` that climbs out, a symlink whose target lies outside)
is refused before anything is read: symlinks are resolved first, and a glob is checked on its
fixed folder before it is expanded and on every file it matches after. A refusal names the
input as given, the rule and the allowed folders, never what a path resolved to or matched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from itertools import takewhile
from pathlib import Path
from typing import TYPE_CHECKING

from finpipe.date_runs import expand_inputs, is_glob
from finpipe.errors import ConfigError

if TYPE_CHECKING:
    from finpipe.settings import Settings


def is_inside(path: str | Path, roots: Sequence[Path]) -> bool:
    """Return whether `path`, symlinks and `..` resolved, is one of `roots` or under one.

    `roots` are resolved folders (`Settings.input_roots`); a relative `path` is read from the
    working directory, and a path that does not exist yet is judged by the part that does.
    """
    resolved = Path(os.path.realpath(os.path.expanduser(path)))
    return any(resolved.is_relative_to(root) for root in roots)


def fixed_folder(pattern: str) -> str:
    """Return the part of a glob before its first wildcard component (the pattern itself when
    it has none): `/data/drop/market_*.csv` -> `/data/drop`."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = list(takewhile(lambda part: not is_glob(part), parts))
    return str(Path(*fixed)) if fixed else "."


def allowed_inputs(patterns: Iterable[str], roots: Sequence[Path]) -> list[str]:
    """Return the files `patterns` name (globs expanded, oldest first: `expand_inputs`), or
    raise ConfigError when any of them lies outside the drop folders `roots`."""
    patterns = list(patterns)
    for pattern in patterns:  # nothing outside is listed, let alone read
        if not is_inside(fixed_folder(pattern), roots):
            raise _refusal(pattern, roots, "is outside the drop folders")
    for pattern in patterns:  # a symlink under a drop folder may point out of it
        if not all(is_inside(file, roots) for file in expand_inputs([pattern])):
            raise _refusal(pattern, roots, "names a file outside the drop folders")
    return expand_inputs(patterns)


def check_command_line_inputs(paths: Sequence[str], settings: Settings) -> None:
    """Hold the files given to `finpipe ingest` to the drop folders when FINPIPE_DROP_ROOTS is
    set (raise ConfigError, as `allowed_inputs` does); without it, any file may be loaded.

    A flow run's inputs come from whoever can start a run (a UI form), so they are always held
    to the drop folders, defaults included. The command line is run by a person who can read
    those files anyway, on their own machine; but on a machine whose operator set the drop
    folders (a team worker), a command must not read around them.
    """
    if settings.drop_roots is not None:
        allowed_inputs(paths, settings.input_roots())


def _refusal(pattern: str, roots: Sequence[Path], problem: str) -> ConfigError:
    allowed = ", ".join(str(root) for root in roots) or "none (FINPIPE_DROP_ROOTS is empty)"
    return ConfigError(
        f"input {pattern!r} {problem}: a run reads delivered files only from under the drop "
        f"folders (symlinks followed), which are: {allowed}. Put the file in one of them, or "
        "add its folder to FINPIPE_DROP_ROOTS"
    )
