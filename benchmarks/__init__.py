"""Benchmarks: finpipe's stages against the references a user could pick, side by side.

`python -m benchmarks` (see `suite.run_benchmarks`) generates synthetic panels at sizes S, 4S
and 16S, times each stage against its reference on the same data in the same run, reads every
stage's peak memory from a fresh process, and writes `benchmarks/results/latest.{json,md}`.

Developer tooling, not part of the installed finpipe: run it from the repository root.
"""
