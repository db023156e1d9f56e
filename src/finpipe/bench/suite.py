"""The benchmark runner: sizes, repetitions, finpipe/reference pairs, results and targets.

Every measurement runs in a fresh Python process (`finpipe.bench.stages`), so a stage's peak
resident memory is its own and no stage inherits another's caches or heap. A figure is the
median over repetitions; a ratio is finpipe / reference taken pair by pair (the two sides of a
pair run back to back on the same data), then the median of those ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finpipe.errors import ConfigError

# S = 500 tickers x 2,520 trading days (10 years) ~ 1.26M rows. Larger sizes grow the universe
# and the history by the same factor (4S = 1,000 x 5,040; 16S = 2,000 x 10,080): a nightly job
# meets both, and only a shape that grows both shows whether memory follows the cross-section
# and the block being worked on rather than the stored history.
SIZE_SCALE = {"S": 1, "4S": 2, "16S": 4}
STAGE_ORDER = ("validation", "features", "training", "orchestration", "scoring")
TRAINED_MODELS = ("mlp", "gru")

TARGETS = {
    "features": 1.0,
    "training": 1.15,
    "scoring": 1.25,
    "orchestration": 1.10,
    "validation": 3.0,
    "memory_growth": 4.0,
}


@dataclass
class BenchConfig:
    """What `finpipe bench` measures and where it writes."""

    sizes: list[str] = field(default_factory=lambda: ["S", "4S", "16S"])
    repetitions: list[int] = field(default_factory=lambda: [3])
    stages: list[str] = field(default_factory=lambda: list(STAGE_ORDER))
    base_tickers: int = 500
    base_days: int = 2520
    seed: int = 0
    train_epochs: int = 1
    nightly_epochs: int = 2
    torch_threads: int = 1
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "finpipe-bench")
    out: Path | None = Path("benchmarks/results")

    def __post_init__(self) -> None:
        unknown = [s for s in self.sizes if s not in SIZE_SCALE]
        if unknown:
            raise ConfigError(f"unknown size(s) {unknown}; choose from {list(SIZE_SCALE)}")
        bad = [s for s in self.stages if s not in STAGE_ORDER]
        if bad:
            raise ConfigError(f"unknown stage(s) {bad}; choose from {list(STAGE_ORDER)}")
        if len(self.repetitions) not in (1, len(self.sizes)) or min(self.repetitions) < 1:
            raise ConfigError(
                f"repetitions: give one count (>= 1) or one per size ({len(self.sizes)}), "
                f"got {self.repetitions}"
            )
        if "scoring" in self.stages and "orchestration" not in self.stages:
            raise ConfigError(
                "the scoring stage scores with the champion the orchestration stage trains"
            )

    def shape(self, size: str) -> tuple[int, int]:
        """Return (tickers, days) of a size."""
        scale = SIZE_SCALE[size]
        return self.base_tickers * scale, self.base_days * scale

    def repetitions_for(self, size: str) -> int:
        if len(self.repetitions) == 1:
            return self.repetitions[0]
        return self.repetitions[self.sizes.index(size)]


class StageFailed(RuntimeError):
    pass


def run_child(request: dict, log_file: Path) -> dict:
    """Run one stage measurement in a fresh process; return its BENCH-RESULT payload."""
    env = {
        **os.environ,
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PYTHONWARNINGS": "ignore",
        # Prefect gives its temporary local API server 20 s to start; a busy machine needs more.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    env.pop("FINPIPE_MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_HOME", None)
    completed = subprocess.run(
        [sys.executable, "-m", "finpipe.bench.stages", json.dumps(request)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    with open(log_file, "a") as log:
        log.write(f"\n==== {json.dumps(request)} (exit {completed.returncode})\n")
        log.write(completed.stdout[-20000:])
        log.write(completed.stderr[-20000:])
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            return json.loads(line.removeprefix("BENCH-RESULT "))
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
    raise StageFailed(
        f"{request['stage']} failed (exit {completed.returncode}): {' | '.join(tail)}"
    )


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def _record(stage, size, rows, pairs, *, repetitions, extra=None) -> dict:
    """Return a results record from (finpipe result, reference result) pairs."""
    finpipe_s = [p[0]["seconds"] for p in pairs]
    reference_s = [p[1]["seconds"] for p in pairs]
    ratios = [f / r for f, r in zip(finpipe_s, reference_s, strict=True) if r]
    f_rows = pairs[0][0].get("rows") or 0
    r_rows = pairs[0][1].get("rows") or 0
    median_f, median_r = _median(finpipe_s), _median(reference_s)
    return {
        "stage": stage,
        "size": size,
        "size_rows": rows,
        "repetitions": repetitions,
        "finpipe_s": median_f,
        "reference_s": median_r,
        "ratio": _median(ratios),
        "finpipe_rows_per_s": round(f_rows / median_f) if median_f else None,
        "reference_rows_per_s": round(r_rows / median_r) if median_r else None,
        "peak_rss_mb": max(p[0]["peak_rss_mb"] for p in pairs),
        "reference_peak_rss_mb": max(p[1].get("peak_rss_mb") or 0 for p in pairs) or None,
        "finpipe_runs_s": [round(v, 4) for v in finpipe_s],
        "reference_runs_s": [round(v, 4) for v in reference_s],
        **(extra or {}),
    }


def run_benchmarks(config: BenchConfig, say: Callable[[str], None] = print) -> list[dict]:
    """Run every selected stage at every size; return the records (also written to `out`)."""
    # Sizes not run this time keep their earlier records: `--sizes 16S` updates 16S alone.
    records: list[dict] = [
        r for r in _earlier_records(config.out) if r.get("size") not in config.sizes
    ]
    config.workdir.mkdir(parents=True, exist_ok=True)
    log_file = config.workdir / "bench.log"
    started = time.perf_counter()
    for size in config.sizes:
        tickers, days = config.shape(size)
        work = config.workdir / size
        reps = config.repetitions_for(size)
        say(f"[{size}] {tickers} tickers x {days} days: preparing")

        def child(stage: str, work=work, **options) -> dict:
            request = {"stage": stage, "work": str(work), "threads": config.torch_threads}
            return run_child({**request, **options}, log_file)

        prepared = child(
            "prepare",
            tickers=tickers,
            days=days,
            seed=config.seed,
            build_features="features" not in config.stages,
        )
        rows = prepared["rows"]
        records.append(
            {
                "stage": "prepare",
                "size": size,
                "size_rows": rows,
                "repetitions": 1,
                "finpipe_s": round(prepared["seconds"], 4),
                "reference_s": None,
                "ratio": None,
                "peak_rss_mb": prepared["peak_rss_mb"],
                "details": prepared["details"],
            }
        )
        for stage in STAGE_ORDER:
            if stage not in config.stages:
                continue
            try:
                new = _measure(stage, size, rows, reps, config, child, say)
            except StageFailed as error:
                say(f"[{size}] {stage}: FAILED {error}")
                new = [{"stage": stage, "size": size, "size_rows": rows, "error": str(error)}]
            records.extend(new)
            if config.out is not None:
                write_results(records, config, config.out, time.perf_counter() - started)
    if config.out is not None:
        write_results(records, config, config.out, time.perf_counter() - started)
    return records


def _earlier_records(out: Path | None) -> list[dict]:
    path = None if out is None else out / "latest.json"
    if path is None or not path.exists():
        return []
    try:
        return [r for r in json.loads(path.read_text()) if isinstance(r, dict)]
    except json.JSONDecodeError:
        return []


def _measure(stage, size, rows, reps, config, child, say) -> list[dict]:
    if stage == "training":
        out = []
        for model in TRAINED_MODELS:
            pairs = []
            for rep in range(reps):
                result = child("training", model=model, epochs=config.train_epochs)
                pairs.append(
                    (
                        result,
                        {"seconds": result["reference_seconds"], "rows": result["rows"]},
                    )
                )
                say(_progress(f"training_{model}", size, rep, reps, pairs[-1]))
            record = _record(
                f"training_{model}", size, rows, pairs, repetitions=reps,
                extra={"unit": "samples", "details": pairs[-1][0]["details"]},
            )  # fmt: skip
            record["reference_peak_rss_mb"] = None  # same process as finpipe's loop
            out.append(record)
        return out
    sides = ("prefect", "direct") if stage == "orchestration" else ("finpipe", "reference")
    options = {"epochs": config.nightly_epochs} if stage == "orchestration" else {}
    pairs = []
    for rep in range(reps):
        pair = tuple(child(stage, side=side, **options) for side in sides)
        pairs.append(pair)
        say(_progress(stage, size, rep, reps, pair))
    extra: dict = {"unit": "rows"}
    if stage == "validation":
        ours, theirs = pairs[0][0]["details"]["unexpected"], pairs[0][1]["details"]["unexpected"]
        differing = {
            rule: (ours.get(rule), theirs.get(rule))
            for rule in set(ours) | set(theirs)
            if ours.get(rule) != theirs.get(rule)
        }
        extra["details"] = {
            "same_verdicts": not differing,
            "differing_rules": differing,
            "unexpected": {rule: count for rule, count in ours.items() if count},
            "finpipe_suite_without_docs_s": _median(
                [p[0]["details"]["suite_without_docs_s"] for p in pairs]
            ),
            "note": "finpipe = GX suite + Data Docs page per delivery file, as ingest runs it",
        }
    elif stage == "features":
        extra["details"] = pairs[0][1]["details"]
    elif stage == "scoring":
        extra["details"] = {
            "nights": pairs[0][0]["details"]["nights"],
            "model": pairs[0][1]["details"]["model"],
            "finpipe_first_night_s": _median([p[0]["details"]["first_night_s"] for p in pairs]),
        }
    elif stage == "orchestration":
        extra["unit"] = "predictions"
        extra["details"] = {
            "quality": pairs[-1][0]["details"]["quality"],
            "direct_quality": pairs[-1][1]["details"]["quality"],
            "nightly_max_epochs": config.nightly_epochs,
            "note": "finpipe_s = the Prefect flow, reference_s = the same library calls direct",
        }
    return [_record(stage, size, rows, pairs, repetitions=reps, extra=extra)]


def _progress(stage, size, rep, reps, pair) -> str:
    ours, theirs = pair[0]["seconds"], pair[1]["seconds"]
    return (
        f"[{size}] {stage} {rep + 1}/{reps}: finpipe {ours:.2f} s, reference {theirs:.2f} s, "
        f"ratio {ours / theirs:.2f}, peak RSS {pair[0]['peak_rss_mb']:.0f} MB"
    )


# -- reporting ---------------------------------------------------------------------------------


def check_targets(records: list[dict]) -> list[dict]:
    """Return each target with the figure it was judged on and whether it holds."""
    measured = [r for r in records if "error" not in r]
    checks = []

    def largest(stage_prefix: str) -> list[dict]:
        chosen = [r for r in measured if r["stage"].startswith(stage_prefix)]
        if not chosen:
            return []
        top = max(r["size_rows"] for r in chosen)
        return [r for r in chosen if r["size_rows"] == top]

    for record in largest("features"):
        checks.append(
            _check(
                f"feature build at {record['size']}: ratio <= 1.0",
                record["ratio"],
                TARGETS["features"],
            )
        )
    for record in measured:
        if record["stage"].startswith("training_"):
            checks.append(
                _check(
                    f"{record['stage']} at {record['size']}: ratio <= 1.15",
                    record["ratio"],
                    TARGETS["training"],
                )
            )
        if record["stage"] in ("scoring", "validation"):
            bound = TARGETS[record["stage"]]
            checks.append(
                _check(
                    f"{record['stage']} at {record['size']}: ratio <= {bound}",
                    record["ratio"],
                    bound,
                )
            )
    for record in largest("orchestration"):
        checks.append(
            _check(
                f"Prefect overhead at {record['size']}: ratio <= 1.10",
                record["ratio"],
                TARGETS["orchestration"],
            )
        )
    stages = sorted({r["stage"] for r in measured if r["stage"] != "prepare"})
    for stage in stages:
        by_size = {r["size"]: r["peak_rss_mb"] for r in measured if r["stage"] == stage}
        if "S" in by_size and len(by_size) > 1:
            top = max(by_size, key=lambda s: SIZE_SCALE[s])
            growth = by_size[top] / by_size["S"]
            checks.append(
                _check(
                    f"{stage} peak RSS {top} / S <= 4", round(growth, 2), TARGETS["memory_growth"]
                )
            )
    return checks  # fmt: skip


def _check(target: str, figure: float | None, bound: float) -> dict:
    return {"target": target, "figure": figure, "holds": figure is not None and figure <= bound}


def quality_rows(records: list[dict]) -> list[dict]:
    """Return test IC / oracle IC per model and size, from the orchestration runs."""
    rows = []
    for record in records:
        if record.get("stage") != "orchestration" or "details" not in record:
            continue
        for model, figures in record["details"]["quality"].items():
            rows.append({"size": record["size"], "model": model, **figures})
    return rows


def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def results_table(records: list[dict]) -> str:
    """Return the records as a markdown table."""
    head = (
        "| stage | size | rows | finpipe s | reference s | ratio | finpipe rows/s | "
        "reference rows/s | peak RSS MB | reference RSS MB |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in records:
        if "error" in r:
            lines.append(
                f"| {r['stage']} | {r['size']} | {_fmt(r['size_rows'])} | "
                f"FAILED: {r['error'][:80]} |||||||"
            )
            continue
        lines.append(
            f"| {r['stage']} | {r['size']} | {_fmt(r['size_rows'])} | {_fmt(r['finpipe_s'])} | "
            f"{_fmt(r['reference_s'])} | {_fmt(r['ratio'])} | "
            f"{_fmt(r.get('finpipe_rows_per_s'))} | "
            f"{_fmt(r.get('reference_rows_per_s'))} | {_fmt(r['peak_rss_mb'], 0)} | "
            f"{_fmt(r.get('reference_peak_rss_mb'), 0)} |"
        )  # fmt: skip
    return "\n".join(lines)


def write_results(
    records: list[dict], config: BenchConfig, out: Path, seconds: float, note: str = ""
) -> None:
    """Write `latest.json` (the records) and `latest.md` (tables and targets) into `out`.

    `note` (markdown) goes under the header: how the figures were gathered when that was more
    than one command."""
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: SIZE_SCALE.get(r.get("size"), 99))  # stable
    (out / "latest.json").write_text(json.dumps(records, indent=2, default=str) + "\n")
    checks = check_targets(records)
    quality = quality_rows(records)
    lines = [
        "# finpipe benchmark results",
        "",
        f"`finpipe bench --sizes {','.join(config.sizes)} --repetitions "
        f"{','.join(map(str, config.repetitions))}` on {os.cpu_count()} CPU cores; "
        f"S = {config.base_tickers} tickers x {config.base_days} days; torch threads "
        f"{config.torch_threads}; training {config.train_epochs} epoch(s) per repetition; "
        f"nightly runs max_epochs={config.nightly_epochs}; {seconds / 60:.1f} min in all.",
        "Figures are medians over repetitions; ratio = finpipe / reference, pair by pair "
        "(orchestration: Prefect flow / direct calls). Training rows are samples (x epochs).",
        *(["", note] if note else []),
        "",
        results_table(records),
        "",
        "## Targets",
        "",
        "| target | figure | holds |",
        "|---|---|---|",
        *(
            f"| {c['target']} | {_fmt(c['figure'])} | {'yes' if c['holds'] else 'NO'} |"
            for c in checks
        ),
        "",
        "## Model quality (planted-signal panel, test window of the nightly retrain)",
        "",
        "| size | model | test IC | oracle IC | IC / oracle |",
        "|---|---|---|---|---|",
        *(
            f"| {q['size']} | {q['model']} | {_fmt(q['test_ic'], 4)} | {_fmt(q['oracle_ic'], 4)} | "
            f"{_fmt(q['ic_to_oracle'], 2)} |"
            for q in quality
        ),
        "",
    ]  # fmt: skip
    (out / "latest.md").write_text("\n".join(lines))
