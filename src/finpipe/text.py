"""Small helpers for the sentences finpipe writes to people (messages, summaries, logs)."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """Return "1 date", "2 dates", "1,250 dates": `count` and `noun` agreeing (`plural` when
    the noun does not take an "s")."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def sentence(text: str) -> str:
    """Return `text` ending as a sentence does (a full stop added where it has none), so the
    next sentence can follow it."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."
