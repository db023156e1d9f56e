"""The repository is self-contained: what the product, its tests and its examples read lives in
its own tree, with the licence notes of anything taken from elsewhere."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from tests.conftest import REPO_ROOT

SAMPLES = {
    "stocks_ohlcv.csv.gz": "Date,Open,High,Low,Close,Volume,Adj Close",
    "germancredit.csv": "creditability",
    "CDNOW_sample.txt": None,  # whitespace separated, no header
}
# Not the project's own files: the virtualenv, caches, build outputs, git's store.
_SKIPPED = {".venv", ".git", ".pytest_cache", ".ruff_cache", ".hypothesis", "build", "__pycache__"}
_OUTSIDE = re.compile(r"\.\./shared|shared/datasets")


def _project_text_files() -> list[Path]:
    files = []
    for path in REPO_ROOT.rglob("*"):
        parts = set(path.relative_to(REPO_ROOT).parts)
        if parts & _SKIPPED or any(part.endswith(".egg-info") for part in parts):
            continue
        if path.is_file() and path.suffix in {".py", ".md", ".toml", ".json", ".yaml", ".yml", ""}:
            files.append(path)
    return files


def test_sample_data_ships_in_the_repository_with_its_licences():
    folder = REPO_ROOT / "datasets"
    for name, header in SAMPLES.items():
        path = folder / name
        assert path.stat().st_size > 100_000, name
        if header is not None:
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt") as handle:
                assert header in handle.readline(), name
    notes = (folder / "README.md").read_text()
    for needed in ["CC BY 4.0", "public domain", "Fader", "Hofmann", "MIT", *SAMPLES]:
        assert needed in notes, f"datasets/README.md does not mention {needed!r}"


def test_nothing_in_the_project_reads_a_folder_outside_its_tree():
    """A user's clone has no `../shared`: no code, config, test or doc may point there."""
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for path in _project_text_files()
        if path.name != "test_repository.py"
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if _OUTSIDE.search(line)
    ]
    assert offenders == []


def test_the_library_does_not_import_the_orchestrator():
    """Prefect lives in flows/ and tasks/; src/finpipe runs without it (a library a notebook,
    a test or another orchestrator can call)."""
    importing = re.compile(r"^\s*(import prefect|from prefect[\s.])", re.MULTILINE)
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in sorted((REPO_ROOT / "src" / "finpipe").rglob("*.py"))
        if importing.search(path.read_text())
    ]
    assert offenders == [], f"these library modules import prefect: {offenders}"
