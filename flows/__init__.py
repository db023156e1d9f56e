"""Prefect flows composing the tasks in `finpipe.tasks`: nightly (and, later, backfill)."""
