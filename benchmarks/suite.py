"""The benchmark runner: sizes, repetitions, finpipe/reference pairs, results and targets.

Every measurement runs in a fresh Python process (`benchmarks.stages`), so a stage's peak
resident memory is its own and no stage inherits another's caches or heap. A figure is the
median over repetitions; a ratio is finpipe / reference taken pair by pair (the two sides of a
pair run back to back on the same data), then the median of those ratios.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.provenance import provenance
from finpipe.errors import ConfigError

# S = 500 tickers x 2,520 trading days (10 years) ~ 1.26M rows. Larger sizes grow the universe
# and the history by the same factor (4S = 1,000 x 5,040; 16S = 2,000 x 10,080): a nightly job
# meets both, and only a shape that grows both shows whether memory follows the cross-section
# and the block being worked on rather than the stored history.
SIZE_SCALE = {"S": 1, "4S": 2, "16S": 4}
STAGE_ORDER = ("validation", "features", "training", "orchestration", "scoring")
# Credit and customers sizes grow the rows (applications, customers) by 1, 4 and 16; their
# history spans two years at every size.
ROW_SCALE = {"S": 1, "4S": 4, "16S": 16}
DOMAINS = ("market", "credit", "customers")
# Credit has no feature race: its features are the validated row with types fixed.
DOMAIN_STAGES = {
    "market": STAGE_ORDER,
    "credit": ("validation", "training", "orchestration", "scoring"),
    "customers": STAGE_ORDER,
}
TRAINED_MODELS = {
    "market": ("mlp", "gru"),
    "credit": ("mlp", "logistic"),
    "customers": ("autoencoder",),
}

REPO_ROOT = Path(__file__).resolve().parents[1]

# In a size's folder: the orchestration run whose champion a later scoring-only run scores.
ORCHESTRATED_FILE = "orchestrated.json"

TARGETS = {
    "features": 1.0,
    "training": 1.15,
    "scoring": 1.25,
    "orchestration": 1.10,
    "validation": 3.0,
    "memory_growth": 4.0,
}


# The options besides domains, sizes, stages and repetitions that change what a record measures.
MEASURE_OPTIONS = (
    "base_tickers", "base_days", "base_applications", "base_customers", "train_epochs",
    "nightly_epochs", "torch_threads",
)  # fmt: skip


@dataclass
class BenchConfig:
    """What `python -m benchmarks` measures and where it writes."""

    domains: list[str] = field(default_factory=lambda: ["market"])
    sizes: list[str] = field(default_factory=lambda: ["S", "4S", "16S"])
    repetitions: list[int] = field(default_factory=lambda: [3])
    stages: list[str] = field(default_factory=lambda: list(STAGE_ORDER))
    base_tickers: int = 500
    base_days: int = 2520
    base_applications: int = 50_000  # credit rows at size S
    base_customers: int = 2_500  # customers at size S (about 36 transactions each)
    seed: int = 0
    train_epochs: int = 1
    nightly_epochs: int = 2
    # An epoch over a loan book or a customers snapshot takes a tenth of a second or less at
    # S: time several, and let the nightly autoencoder train long enough to find the planted
    # segments.
    credit_train_epochs: int = 5
    customers_train_epochs: int = 10
    customers_nightly_epochs: int = 30
    torch_threads: int = 1
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "finpipe-bench")
    out: Path | None = REPO_ROOT / "benchmarks" / "results"

    def __post_init__(self) -> None:
        strange = [d for d in self.domains if d not in DOMAINS]
        if strange or not self.domains:
            raise ConfigError(f"unknown domain(s) {strange}; choose from {list(DOMAINS)} or all")
        unknown = [s for s in self.sizes if s not in SIZE_SCALE]
        if unknown:
            raise ConfigError(f"unknown size(s) {unknown}; choose from {list(SIZE_SCALE)}")
        bad = [s for s in self.stages if s not in STAGE_ORDER]
        if bad:
            raise ConfigError(f"unknown stage(s) {bad}; choose from {list(STAGE_ORDER)}")
        empty = [name for name in ("sizes", "stages", "repetitions") if not getattr(self, name)]
        if empty:
            raise ConfigError(f"nothing to measure: no {' and no '.join(empty)} given")
        if len(self.repetitions) not in (1, len(self.sizes)) or min(self.repetitions) < 1:
            raise ConfigError(
                f"repetitions: give one count (>= 1) or one per size ({len(self.sizes)}), "
                f"got {self.repetitions}"
            )

    def folder(self, domain: str, size: str) -> Path:
        """Return the folder a domain's data set at `size` is prepared in."""
        # Market keeps its folders at the top of the workdir (a re-run reuses its prepared panel).
        return self.workdir / size if domain == "market" else self.workdir / domain / size

    def scores_an_earlier_champion(self) -> bool:
        """Return whether scoring runs without orchestration: it then scores the champion an
        earlier run's orchestration left in each size's folder (every domain has both stages)."""
        return "scoring" in self.stages and "orchestration" not in self.stages

    def shape(self, size: str) -> tuple[int, int]:
        """Return (tickers, days) of a size."""
        scale = SIZE_SCALE[size]
        return self.base_tickers * scale, self.base_days * scale

    def prepare_options(self, domain: str, size: str) -> dict:
        """Return the `prepare` stage's options for a domain and size (its data set's shape)."""
        if domain == "market":
            tickers, days = self.shape(size)
            return {
                "tickers": tickers,
                "days": days,
                "build_features": "features" not in self.stages,
            }
        if domain == "credit":
            return {"applications": self.base_applications * ROW_SCALE[size]}
        return {"customers": self.base_customers * ROW_SCALE[size]}

    def epochs(self, domain: str, stage: str) -> int:
        """Return the epochs of a training timing or the max_epochs of a nightly run."""
        if stage != "training":
            return self.customers_nightly_epochs if domain == "customers" else self.nightly_epochs
        return {
            "market": self.train_epochs,
            "credit": self.credit_train_epochs,
            "customers": self.customers_train_epochs,
        }[domain]

    def base(self, domain: str) -> dict[str, int]:
        """Return what size S is for `domain` in this run (every record carries it)."""
        if domain == "market":
            return {"tickers": self.base_tickers, "days": self.base_days}
        if domain == "credit":
            return {"applications": self.base_applications}
        return {"customers": self.base_customers}

    def command(self) -> str:
        """Return this run's command line, as the results' provenance names it (the options
        that change what is measured, where they differ from their defaults)."""
        changed = [
            f"--{name.replace('_', '-')} {getattr(self, name)}"
            for name in MEASURE_OPTIONS
            if getattr(self, name) != getattr(BenchConfig, name)
        ]
        return " ".join(
            [
                "python -m benchmarks",
                f"--domain {','.join(self.domains)}",
                f"--sizes {','.join(self.sizes)}",
                f"--repetitions {','.join(map(str, self.repetitions))}",
                *filter(None, [_stages_option(self).strip()]),
                *changed,
            ]
        )

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
    # `benchmarks` is a folder of the repository, not an installed package: the child finds it
    # from any working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.stages", json.dumps(request)],
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


def stage_family(record: dict) -> str:
    """Return the `--stages` name a record belongs to: `training_gru` -> `training`."""
    return str(record.get("stage", "")).split("_")[0]


def record_domain(record: dict) -> str:
    """Return a record's domain; records written before there were several are market's."""
    return record.get("domain", "market")


def record_base(record: dict) -> dict[str, int]:
    """Return what size S was when `record` was measured; records written before each record
    said so were all measured at the default shapes."""
    return record.get("base") or BenchConfig().base(record_domain(record))


def _describe(base: dict[str, int]) -> str:
    return " x ".join(f"{value:,} {name}" for name, value in base.items())


def _record(stage, size, rows, pairs, *, repetitions, domain="market", extra=None) -> dict:
    """Return a results record from (finpipe result, reference result) pairs."""
    finpipe_s = [p[0]["seconds"] for p in pairs]
    reference_s = [p[1]["seconds"] for p in pairs]
    ratios = [f / r for f, r in zip(finpipe_s, reference_s, strict=True) if r]
    f_rows = pairs[0][0].get("rows") or 0
    r_rows = pairs[0][1].get("rows") or 0
    median_f, median_r = _median(finpipe_s), _median(reference_s)
    return {
        "domain": domain,
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
    """Run every selected stage of every selected domain at every size; return the records
    (also written to `out`)."""
    # Domains, sizes and stages not run this time keep their earlier records: `--sizes 16S`
    # updates 16S alone, `--domain credit` leaves market's and customers' records as they were,
    # `--stages validation` replaces the validation records (and prepare's) only.
    records: list[dict] = [
        r
        for r in _earlier_records(config.out)
        if record_domain(r) not in config.domains
        or r.get("size") not in config.sizes
        or (r.get("stage") != "prepare" and stage_family(r) not in config.stages)
    ]
    _check_same_shapes(records, config)
    if config.scores_an_earlier_champion():  # before any work: every folder needs a champion
        for domain in config.domains:
            for size in config.sizes:
                orchestrated(config.folder(domain, size))
    config.workdir.mkdir(parents=True, exist_ok=True)
    log_file = config.workdir / "bench.log"
    started = time.perf_counter()
    line = provenance(config.command())
    for domain in config.domains:
        for size in config.sizes:
            new = _run_size(domain, size, config, log_file, say, records, started, line)
            records.extend(new)
    records = ordered_records(records)
    if config.out is not None:
        write_results(records, config, config.out, time.perf_counter() - started)
    return records


def _check_same_shapes(kept: list[dict], config: BenchConfig) -> None:
    """Refuse a run whose size S differs from that of the records it would sit beside in
    `out` (one results file, one shape per domain: a ratio or a memory growth across
    sizes is only read on one shape)."""
    for domain in config.domains:
        theirs = {json.dumps(record_base(r)) for r in kept if record_domain(r) == domain}
        ours = config.base(domain)
        if theirs - {json.dumps(ours)}:
            shapes = "; ".join(_describe(json.loads(base)) for base in sorted(theirs))
            raise ConfigError(
                f"{config.out} holds {domain} records measured with S = {shapes}; this run's "
                f"S is {_describe(ours)}. Pass --out to write this run elsewhere (or the same "
                "base options to measure that shape)"
            )


def ordered_records(records: list[dict]) -> list[dict]:
    """Return `records` by domain, size and stage (the models of a training stage keep their
    order), as the results files list them."""
    return sorted(
        records,
        key=lambda r: (_domain_order(r), SIZE_SCALE.get(r.get("size"), 99), _stage_order(r)),
    )


def _run_size(domain, size, config, log_file, say, records, started, line) -> list[dict]:
    """Prepare one domain's data set at one size, then measure each stage; return the records,
    each stamped with the shape of S and the run's provenance `line` (written to `out` after
    each stage, with `records`, so a long run reports as it goes)."""
    stamp = {"base": config.base(domain), "provenance": line}
    work = config.folder(domain, size)
    reps = config.repetitions_for(size)
    label = size if domain == "market" else f"{domain} {size}"
    options = config.prepare_options(domain, size)
    shape = ", ".join(f"{k} {v:,}" for k, v in options.items() if not isinstance(v, bool))
    say(f"[{label}] {shape}: preparing")

    def child(stage: str, **stage_options) -> dict:
        request = {"stage": stage, "work": str(work), "threads": config.torch_threads}
        if domain != "market":
            request["domain"] = domain
        return run_child({**request, **stage_options}, log_file)

    prepared = child("prepare", seed=config.seed, **options)
    rows = prepared["rows"]
    if config.scores_an_earlier_champion():
        orchestrated(work)  # a folder prepared again (another shape) has lost its champion
    new = [
        {
            "domain": domain,
            "stage": "prepare",
            "size": size,
            "size_rows": rows,
            "repetitions": 1,
            "finpipe_s": round(prepared["seconds"], 4),
            "reference_s": None,
            "ratio": None,
            # A reused folder reports the memory of the run that prepared it, not of the reuse;
            # one prepared before that was recorded reports none rather than the reuse's.
            "peak_rss_mb": prepared["details"].get("prepare_peak_rss_mb"),
            "details": prepared["details"],
            **stamp,
        }
    ]
    for stage in DOMAIN_STAGES[domain]:
        if stage not in config.stages:
            continue
        try:
            measured = _measure(domain, stage, size, rows, reps, config, child, say, work)
        except StageFailed as error:
            say(f"[{label}] {stage}: FAILED {error}")
            measured = [
                {"domain": domain, "stage": stage, "size": size, "size_rows": rows,
                 "error": str(error)}
            ]  # fmt: skip
        new.extend({**record, **stamp} for record in measured)
        if config.out is not None:
            write_results(records + new, config, config.out, time.perf_counter() - started)
    return new


def _earlier_records(out: Path | None) -> list[dict]:
    path = None if out is None else out / "latest.json"
    if path is None or not path.exists():
        return []
    try:
        return [r for r in json.loads(path.read_text()) if isinstance(r, dict)]
    except json.JSONDecodeError:
        return []


def orchestrated(work: Path) -> dict:
    """Return the facts of the orchestration run whose champion is in the size folder `work`.

    Raises ConfigError when no orchestration stage finished there: the scoring stage scores
    the champion that stage trains and promotes.
    """
    facts = _orchestration_facts(work)
    if facts is None:
        raise ConfigError(
            f"no champion to score in {work}: the scoring stage scores the model the "
            "orchestration stage trains and promotes there. Add orchestration to --stages, or "
            "pass the --workdir of a run that had it (with the same sizes and shape)"
        )
    return facts


def _orchestration_facts(work: Path) -> dict | None:
    path = work / ORCHESTRATED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _measure(domain, stage, size, rows, reps, config, child, say, work) -> list[dict]:
    label = size if domain == "market" else f"{domain} {size}"
    if stage == "training":
        out = []
        for model in TRAINED_MODELS[domain]:
            pairs = []
            for rep in range(reps):
                result = child("training", model=model, epochs=config.epochs(domain, stage))
                pairs.append(
                    (
                        result,
                        {"seconds": result["reference_seconds"], "rows": result["rows"]},
                    )
                )
                say(_progress(f"training_{model}", label, rep, reps, pairs[-1]))
            details = {
                **pairs[-1][0]["details"],
                "same_losses": all(same_losses(p[0]["details"]) for p in pairs),
            }
            record = _record(
                f"training_{model}", size, rows, pairs, repetitions=reps, domain=domain,
                extra={"unit": "samples", "details": details},
            )  # fmt: skip
            record["reference_peak_rss_mb"] = None  # same process as finpipe's loop
            out.append(record)
        return out
    sides = ("prefect", "direct") if stage == "orchestration" else ("finpipe", "reference")
    options = {"epochs": config.epochs(domain, stage)} if stage == "orchestration" else {}
    if stage == "orchestration":  # its nights replace the champion: it is known again at the end
        (work / ORCHESTRATED_FILE).unlink(missing_ok=True)
    pairs = []
    for rep in range(reps):
        pair = tuple(child(stage, side=side, **options) for side in sides)
        pairs.append(pair)
        say(_progress(stage, label, rep, reps, pair))
    extra: dict = {"unit": "rows"}
    if stage == "validation":
        extra["details"] = _verdicts(pairs)
    elif stage == "features":
        extra["details"] = pairs[0][1]["details"]
        if domain == "customers":
            extra["unit"] = "transactions read"
    elif stage == "scoring":
        theirs = pairs[0][1]["details"]
        extra["details"] = {
            "nights": pairs[0][0]["details"]["nights"],
            **({"model": theirs["model"]} if "model" in theirs else {}),
            **({"agreement": theirs["agreement"]} if "agreement" in theirs else {}),
            "finpipe_first_night_s": _median([p[0]["details"]["first_night_s"] for p in pairs]),
            "champion": _orchestration_facts(work),
        }
    elif stage == "orchestration":
        extra["unit"] = "predictions"
        extra["details"] = {
            "quality": pairs[-1][0]["details"]["quality"],
            "direct_quality": pairs[-1][1]["details"]["quality"],
            "nightly_max_epochs": config.epochs(domain, stage),
            "note": "finpipe_s = the Prefect flow, reference_s = the same library calls direct",
        }
        starts = [p[0]["details"].get("prefect_server_start_s") for p in pairs]
        if None not in starts:  # Prefect's API was started before the clock: show its cost
            extra["details"]["prefect_server_start_s"] = _median(starts)
        # The last night run (the direct side of the last pair) left the champion scoring uses.
        facts = {
            "orchestrated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "nightly_max_epochs": config.epochs(domain, stage),
            "repetitions": reps,
        }
        (work / ORCHESTRATED_FILE).write_text(json.dumps(facts, indent=2))
    return [_record(stage, size, rows, pairs, repetitions=reps, domain=domain, extra=extra)]


def same_losses(details: dict) -> bool:
    """Return whether finpipe's loop and the bare loop reached the same validation loss every
    epoch (same net, seed, data and learning rate: the race is the loop's overhead alone)."""
    ours, theirs = details["finpipe_validation_loss"], details["bare_validation_loss"]
    return len(ours) == len(theirs) and all(
        math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(ours, theirs, strict=True)
    )


def same_work(record: dict) -> bool | None:
    """Return whether both sides of `record` did the same work, as far as its stage checks
    it (the same losses in training, verdicts in validation, outputs in features and credit's
    and customers' scoring); None where the stage checks nothing."""
    details = record.get("details") or {}
    losses = "finpipe_validation_loss" in details and "bare_validation_loss" in details
    checks = [
        details.get("same_losses", same_losses(details) if losses else None),
        details.get("same_verdicts"),
        (details.get("agreement") or {}).get("equal"),
    ]
    known = [check for check in checks if check is not None]
    return all(check is True for check in known) if known else None


def like_for_like(record: dict) -> bool:
    """Return whether no check of `record`'s stage found the two sides doing different work."""
    return same_work(record) is not False


def _verdicts(pairs) -> dict:
    """Return whether both sides of the validation race reached the same verdicts, rule by rule
    (unexpected rows, and pass/fail where the side reports it)."""
    ours, theirs = pairs[0][0]["details"], pairs[0][1]["details"]
    differing = {}
    for key in ("unexpected", "success"):
        mine, other = ours.get(key, {}), theirs.get(key, {})
        differing.update(
            {
                f"{rule} [{key}]": (mine.get(rule), other.get(rule))
                for rule in set(mine) | set(other)
                if mine.get(rule) != other.get(rule)
            }
        )
    return {
        "same_verdicts": not differing,
        "differing_rules": differing,
        "unexpected": {rule: count for rule, count in ours["unexpected"].items() if count},
        "failed_rules": sorted(r for r, ok in ours.get("success", {}).items() if not ok),
        "finpipe_suite_without_docs_s": _median(
            [p[0]["details"]["suite_without_docs_s"] for p in pairs]
        ),
        **_gx_floor(pairs),
        "note": "finpipe = GX suite + its own Data Docs site per delivery file, as ingest runs it",
    }


def _gx_floor(pairs) -> dict:
    """Return GX's per-batch floor (a one-row batch's suite + Data Docs page) and what it alone
    would make of the ratio: batches x floor / the reference's seconds, pair by pair."""
    floors = [p[0]["details"].get("gx_batch_floor") for p in pairs]
    if None in floors:  # records from before the floor was measured
        return {}
    batches = pairs[0][0]["details"]["batches"]
    return {
        "batches": batches,
        "gx_batch_floor_s": _median([f["with_docs_s"] for f in floors]),
        "gx_batch_floor_without_docs_s": _median([f["without_docs_s"] for f in floors]),
        "gx_floor_ratio": round(
            _median(
                [
                    batches * f["with_docs_s"] / p[1]["seconds"]
                    for f, p in zip(floors, pairs, strict=True)
                ]
            ),
            2,
        ),
        "gx_floor_one_row_passed": all(f["one_row_passed"] for f in floors),
    }


def _progress(stage, size, rep, reps, pair) -> str:
    ours, theirs = pair[0]["seconds"], pair[1]["seconds"]
    return (
        f"[{size}] {stage} {rep + 1}/{reps}: finpipe {ours:.2f} s, reference {theirs:.2f} s, "
        f"ratio {ours / theirs:.2f}, peak RSS {pair[0]['peak_rss_mb']:.0f} MB"
    )


# -- reporting ---------------------------------------------------------------------------------


def check_targets(records: list[dict]) -> list[dict]:
    """Return each target with the figure it was judged on and whether it holds, per domain.

    The same bounds apply to every domain; a domain's targets are judged on its own records
    (market's read as before, the others' texts start with the domain).
    """
    checks = []
    for domain in DOMAINS:
        mine = [r for r in records if record_domain(r) == domain and "error" not in r]
        prefix = "" if domain == "market" else f"{domain}: "
        checks.extend({**c, "domain": domain} for c in _domain_checks(mine, prefix))
    return checks


def _domain_checks(measured: list[dict], prefix: str) -> list[dict]:
    checks = []

    def largest(stage_prefix: str) -> list[dict]:
        chosen = [r for r in measured if r["stage"].startswith(stage_prefix)]
        if not chosen:
            return []
        top = max(r["size_rows"] for r in chosen)
        return [r for r in chosen if r["size_rows"] == top]

    # Market's and customers' feature references are both Polars: one target.
    for record in largest("features"):
        what = "feature build" if not prefix else "feature snapshot vs Polars"
        checks.append(
            _check(
                f"{prefix}{what} at {record['size']}: ratio <= 1.0",
                record["ratio"],
                TARGETS["features"],
                record,
            )
        )
    for record in measured:
        if record["stage"].startswith("training_"):
            checks.append(
                _check(
                    f"{prefix}{record['stage']} at {record['size']}: ratio <= 1.15",
                    record["ratio"],
                    TARGETS["training"],
                    record,
                )
            )
        if record["stage"] in ("scoring", "validation"):
            bound = TARGETS[record["stage"]]
            checks.append(
                _check(
                    f"{prefix}{record['stage']} at {record['size']}: ratio <= {bound}",
                    record["ratio"],
                    bound,
                    record,
                )
            )
    for record in largest("orchestration"):
        checks.append(
            _check(
                f"{prefix}Prefect overhead at {record['size']}: ratio <= 1.10",
                record["ratio"],
                TARGETS["orchestration"],
                record,
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
                    f"{prefix}{stage} peak RSS {top} / S <= 4",
                    round(growth, 2),
                    TARGETS["memory_growth"],
                )
            )
    return checks


def _check(target: str, figure: float | None, bound: float, record: dict | None = None) -> dict:
    """Judge `figure` against `bound`; a ratio of a race whose sides did different work
    (`record` not like for like) holds nothing, whatever its figure."""
    if record is not None and not like_for_like(record):
        return {"target": f"{target} (sides did different work: see details)", "figure": figure,
                "holds": False}  # fmt: skip
    return {"target": target, "figure": figure, "holds": figure is not None and figure <= bound}


def quality_rows(records: list[dict]) -> list[dict]:
    """Return the nightly retrain's model quality per domain, model and size, from the
    orchestration runs: market test IC / oracle IC, credit test AUC / oracle AUC, customers
    test ARI against the planted segments."""
    rows = []
    for record in records:
        if record.get("stage") != "orchestration" or "details" not in record:
            continue
        for model, figures in record["details"]["quality"].items():
            rows.append(
                {"domain": record_domain(record), "size": record["size"], "model": model,
                 **figures}
            )  # fmt: skip
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
        "| stage | size | rows | finpipe s | reference s | ratio | same work | finpipe rows/s | "
        "reference rows/s | peak RSS MB | reference RSS MB |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in records:
        if "error" in r:
            lines.append(
                f"| {r['stage']} | {r['size']} | {_fmt(r['size_rows'])} | "
                f"FAILED: {r['error'][:80]} ||||||||"
            )
            continue
        lines.append(
            f"| {r['stage']} | {r['size']} | {_fmt(r['size_rows'])} | {_fmt(r['finpipe_s'])} | "
            f"{_fmt(r['reference_s'])} | {_fmt(r['ratio'])} | {_same_work(r)} | "
            f"{_fmt(r.get('finpipe_rows_per_s'))} | "
            f"{_fmt(r.get('reference_rows_per_s'))} | {_fmt(r['peak_rss_mb'], 0)} | "
            f"{_fmt(r.get('reference_peak_rss_mb'), 0)} |"
        )  # fmt: skip
    return "\n".join(lines)


def _same_work(record: dict) -> str:
    return {True: "yes", False: "NO", None: "-"}[same_work(record)]


def write_results(
    records: list[dict], config: BenchConfig, out: Path, seconds: float | None, note: str = ""
) -> None:
    """Write `latest.json` (the records) and `latest.md` (tables and targets, one section per
    domain) into `out`.

    `note` (markdown) goes under the header: how the figures were gathered when that was more
    than one command. `seconds`: the run's length (None: the files are written again from
    the records, nothing measured)."""
    out.mkdir(parents=True, exist_ok=True)
    records = ordered_records(records)
    (out / "latest.json").write_text(json.dumps(records, indent=2, default=str) + "\n")
    checks = check_targets(records)
    quality = quality_rows(records)
    present = [d for d in DOMAINS if any(record_domain(r) == d for r in records)]
    lines = [
        "# finpipe benchmark results",
        "",
        (
            "Written again from `latest.json`, measuring nothing."
            if seconds is None
            else f"This run: {os.cpu_count()} CPU cores, torch threads "
            f"{config.torch_threads}, {seconds / 60:.1f} min in all."
        )
        + " Records of domains, sizes and stages not in a run are kept from earlier runs. "
        "Each record comes from one of these runs:",
        "",
        *_provenance_lines(records),
        "",
        "Figures are medians over repetitions; ratio = finpipe / reference, pair by pair "
        "(orchestration: Prefect flow / direct calls). Training rows are samples (x epochs). "
        "`same work` says whether both sides reached the same losses, verdicts or outputs; a "
        "ratio of sides that did not holds no target.",
        *(["", note] if note else []),
    ]
    for domain in present:
        mine = [r for r in records if record_domain(r) == domain]
        header = _domain_header(domain, record_base(mine[0]), config, _nightly_epochs(mine))
        lines += ["", f"## {domain}", "", header, "", results_table(mine)]
    lines += ["", "## Targets", ""]
    for domain in present:
        lines += [
            f"### {domain}",
            "",
            "| target | figure | holds |",
            "|---|---|---|",
            *(
                f"| {c['target']} | {_fmt(c['figure'])} | {'yes' if c['holds'] else 'NO'} |"
                for c in checks
                if c["domain"] == domain
            ),
            "",
        ]
    lines += _validation_floor_lines(records)
    lines += ["## Model quality (test window of the nightly retrain)", ""]
    for domain in present:
        lines += [*_quality_table(domain, [q for q in quality if q["domain"] == domain]), ""]
    (out / "latest.md").write_text("\n".join(lines))


EARLIER_RUNS = "earlier-runs.md"  # in `out`: the runs of the records that carry no provenance


def _provenance_lines(records: list[dict]) -> list[str]:
    """Return one bullet per run the records come from (its provenance line and the domains,
    sizes and stages it measured), then one for the records from before each carried one."""
    runs: dict[str, list[str]] = {}
    for record in records:
        what = f"{record_domain(record)} {record['size']} {record['stage']}"
        runs.setdefault(record.get("provenance", ""), []).append(what)
    lines = [
        f"- {line} Records: {', '.join(dict.fromkeys(what))}."
        for line, what in runs.items()
        if line
    ]
    if "" in runs:
        lines.append(
            f"- {len(runs[''])} records measured before each record carried its provenance: "
            f"[{EARLIER_RUNS}]({EARLIER_RUNS}) says which runs they come from."
        )
    return lines


def _validation_floor_lines(records: list[dict]) -> list[str]:
    """Return the table of GX's per-batch floor beside each validation ratio (none before the
    floor was measured)."""
    rows = [
        r for r in records
        if r["stage"] == "validation" and "gx_floor_ratio" in (r.get("details") or {})
    ]  # fmt: skip
    if not rows:
        return []
    return [
        "## Validation: GX's fixed cost per batch",
        "",
        "The floor is the suite and a Data Docs site on a one-row batch (median of 5), paid "
        "by every delivery whatever its size; floor ratio = batches x floor / the pandas "
        "rules' time. A validation ratio cannot go below its floor ratio by any speed-up of "
        "the rules' own row work.",
        "",
        "| domain | size | batches | floor s (with docs / without) | floor ratio | ratio |",
        "|---|---|---|---|---|---|",
        *(
            f"| {record_domain(r)} | {r['size']} | {r['details']['batches']} | "
            f"{_fmt(r['details']['gx_batch_floor_s'], 3)} / "
            f"{_fmt(r['details']['gx_batch_floor_without_docs_s'], 3)} | "
            f"{_fmt(r['details']['gx_floor_ratio'])} | {_fmt(r['ratio'])} |"
            for r in rows
        ),
        "",
    ]


def _stages_option(config: BenchConfig) -> str:
    """Return ` --stages ...` when the run measured only some stages, else nothing."""
    if list(config.stages) == list(STAGE_ORDER):
        return ""
    return f" --stages {','.join(config.stages)}"


def _stage_order(record: dict) -> int:
    family = stage_family(record)
    order = ("prepare", *STAGE_ORDER)
    return order.index(family) if family in order else len(order)


def _domain_order(record: dict) -> int:
    domain = record_domain(record)
    return DOMAINS.index(domain) if domain in DOMAINS else len(DOMAINS)


def _nightly_epochs(records: list[dict]) -> str | None:
    """Return the max_epochs the domain's orchestration records were run with ("1, 2" when
    they differ); None when they do not say. A run of another domain keeps these records, so
    its own setting would misstate them."""
    epochs = sorted(
        {
            r["details"]["nightly_max_epochs"]
            for r in records
            if r["stage"] == "orchestration" and "nightly_max_epochs" in (r.get("details") or {})
        }
    )
    return ", ".join(map(str, epochs)) if epochs else None


def _domain_header(
    domain: str, base: dict[str, int], config: BenchConfig, nightly: str | None = None
) -> str:
    """Return one line saying what size S is (`base`, as the records say) and how the domain's
    models were trained (`nightly`: the nightly runs' max_epochs as recorded, else this run's
    setting)."""
    if domain == "market":
        return (
            f"S = {base['tickers']} tickers x {base['days']} days (4S, 16S: both x2, "
            f"x4); training {config.train_epochs} epoch(s) per repetition; nightly runs "
            f"max_epochs={nightly or config.nightly_epochs}."
        )
    if domain == "credit":
        return (
            f"S = {base['applications']:,} loan applications over two years (4S, 16S: x4, "
            f"x16); training {config.credit_train_epochs} epochs per repetition; nightly runs "
            f"max_epochs={nightly or config.nightly_epochs} (mlp and logistic)."
        )
    return (
        f"S = {base['customers']:,} customers over two years, about 36 transactions each "
        f"(4S, 16S: x4, x16); training {config.customers_train_epochs} epochs per repetition; "
        f"nightly runs max_epochs={nightly or config.customers_nightly_epochs}. Feature rows are "
        "the transactions the snapshot reads; its reference is Polars."
    )


def _quality_table(domain: str, rows: list[dict]) -> list[str]:
    if domain == "market":
        return [
            "### market (planted-signal panel)",
            "",
            "| size | model | test IC | oracle IC | IC / oracle |",
            "|---|---|---|---|---|",
            *(
                f"| {q['size']} | {q['model']} | {_fmt(q.get('test_ic'), 4)} | "
                f"{_fmt(q.get('oracle_ic'), 4)} | {_fmt(q.get('ic_to_oracle'), 2)} |"
                for q in rows
            ),
        ]
    if domain == "credit":
        return [
            "### credit (planted PD function; oracle = AUC of the true PDs on the test rows)",
            "",
            "| size | model | test AUC | oracle AUC | AUC / oracle |",
            "|---|---|---|---|---|",
            *(
                f"| {q['size']} | {q['model']} | {_fmt(q.get('test_auc'), 4)} | "
                f"{_fmt(q.get('oracle_auc'), 4)} | {_fmt(q.get('auc_to_oracle'), 2)} |"
                for q in rows
            ),
        ]
    return [
        "### customers (planted segments; ARI 1 = the planted segments exactly)",
        "",
        "| size | model | test ARI vs planted | test silhouette | segments |",
        "|---|---|---|---|---|",
        *(
            f"| {q['size']} | {q['model']} | {_fmt(q.get('test_ari_vs_planted'), 3)} | "
            f"{_fmt(q.get('test_silhouette'), 3)} | {_fmt(q.get('segments'))} |"
            for q in rows
        ),
    ]
