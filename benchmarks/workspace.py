"""A size's work folder (any domain): its home, its facts, its nightly run, its models, and the
pieces every domain's benchmark stages share (result records, the timed scoring loops).

Layout (written by the domain's `prepare` stage, `benchmarks.credit` or `.customers`):

    deliveries/history_NNNN.parquet   normalised history batches (the validation stage's input)
    deliveries/<domain>_<night>.csv   the night's vendor file (the orchestration stage loads it)
    home/                             FINPIPE_HOME: validated history up to the eve, features
                                      at the eve, the synthetic truth under reference/
    prepared.json                     sizes, dates and row counts

The market's layout (`benchmarks.stages`) differs only in its deliveries. Every domain
runs its nightly step the same way: through the Prefect flow or as the same
library calls made directly, from the same reset state (`run_night`).
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

# The synthetic data sets follow the shipped example configs; pin them so a user's own
# FINPIPE_CREDIT_CONFIG / FINPIPE_CUSTOMERS_CONFIG does not leak into the benchmark.
SYNTHETIC_CONFIGS = {"FINPIPE_CREDIT_CONFIG": "synthetic", "FINPIPE_CUSTOMERS_CONFIG": "synthetic"}


def home(work: Path) -> Path:
    return work / "home"


def use_home(work: Path):
    """Point finpipe (and Prefect's local state) at the size's home; return (settings, storage)."""
    os.environ["FINPIPE_HOME"] = str(home(work))
    # The night's vendor file is the flow's input: its folder is the drop folder.
    os.environ["FINPIPE_DROP_ROOTS"] = json.dumps([str(work / "deliveries")])
    os.environ.update(SYNTHETIC_CONFIGS)
    from finpipe.settings import load_settings, prepare_environment
    from finpipe.storage import Storage

    settings = load_settings()
    prepare_environment(settings)
    return settings, Storage(settings.home)


def prepared(work: Path) -> dict:
    return json.loads((work / "prepared.json").read_text())


def reuse_prepared(work: Path, **shape) -> dict | None:
    """Return the facts of a folder already prepared with the same `shape`, else clear it."""
    done = work / "prepared.json"
    if done.exists():
        facts = json.loads(done.read_text())
        if all(facts.get(key) == value for key, value in shape.items()):
            return facts
    if work.exists():
        shutil.rmtree(work)
    (work / "deliveries").mkdir(parents=True)
    return None


def peak_rss_mb() -> float:
    """Return the peak resident memory of this process (and of any child it waited for), MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024.0, 1)  # Linux reports KiB


def write_prepared(work: Path, facts: dict) -> dict:
    """Save a prepared folder's facts, with the preparing process's peak memory so far, which
    a later run that reuses the folder reports as the prepare stage's."""
    facts = {**facts, "prepare_peak_rss_mb": peak_rss_mb()}
    (work / "prepared.json").write_text(json.dumps(facts, indent=2))
    return prepare_record(facts)


def prepare_record(facts: dict) -> dict:
    """Return the prepare stage's result for a size's facts (set-up seconds, rows, the facts)."""
    return {"seconds": facts["prepare_s"], "rows": facts["rows"], "details": facts}


def stage_table(*stages: Callable) -> dict[str, Callable]:
    """Return a domain's stage table: each stage function under its own name."""
    return {stage.__name__: stage for stage in stages}


def reset_night(work: Path, domain: str, reports: str = "reports") -> None:
    """Put the home back to the eve of the night: drop everything a nightly run adds (under
    `reports`, the reports folder it writes to)."""
    root = home(work)
    night = prepared(work)["night"]
    for relative in ("mlflow.db", "mlartifacts", "landing", "state", "quarantine", "predictions"):
        target = root / relative
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    shutil.rmtree(root / reports, ignore_errors=True)
    from finpipe.storage import Storage

    for layer in ("validated", "features"):
        shutil.rmtree(Storage(root).partition_dir(layer, domain, night), ignore_errors=True)


def run_night(
    work: Path, domain: str, side: str, training: dict, reports: str = "reports"
) -> tuple[float, object, int, dict]:
    """Run one night (load the night's file, features, train, promote, score) through the
    Prefect flow (`side="prefect"`) or as the same library calls made directly, after
    `reset_night(work, domain, reports)`.

    The Prefect side starts its API server (Prefect's local mode) before the clock, as a
    deployment's runs find `prefect server` already up: the flow's overhead is measured, and
    the server's start-up is reported beside it, not hidden.

    Returns (seconds, the training outcome's metrics, predictions written, set-up facts).
    """
    reset_night(work, domain, reports)
    settings, storage = use_home(work)
    night = dt.date.fromisoformat(prepared(work)["night"])
    delivery = next((work / "deliveries").glob(f"{domain}_{night}.csv"))
    from finpipe.domains import get_domain

    spec = get_domain(domain)  # both sides start with the domain's modules imported
    if side == "prefect":
        from finpipe.flows.deployments import start_prefect_api
        from finpipe.flows.nightly import nightly

        setup = {"prefect_server_start_s": round(start_prefect_api(), 3)}
        started = time.perf_counter()
        summary = nightly(domain=domain, as_of=night, inputs=[str(delivery)], training=training)
        seconds = time.perf_counter() - started
        return seconds, summary["training"]["metrics"], summary["predictions"]["rows"], setup
    from finpipe.ingest import ingest_file

    started = time.perf_counter()
    ingest_file(storage, spec.contract, delivery, as_of=night)
    spec.update_features(storage, night)
    outcome = spec.train(storage, settings, night, spec.training_config(**training))
    spec.promote(storage, settings, outcome)
    scored = spec.score(storage, settings, night)
    seconds = time.perf_counter() - started
    return seconds, outcome.metrics, scored.rows, {}


def validate_history(work: Path, domain: str, side: str) -> dict:
    """Validate every history batch of `domain` with its contract's suite (GX + Data Docs, as
    ingest runs it) or with `pandas_suite_rules`; return seconds, rows and the verdicts."""
    import pandas as pd

    from benchmarks.domain_references import pandas_suite_rules
    from finpipe.domains import get_domain
    from finpipe.validation import load_suite_spec, validate_frame

    _, storage = use_home(work)
    contract = get_domain(domain).contract
    as_of = pd.Timestamp(prepared(work)["night"])
    # As ingest builds it; for credit from the categories accepted so far (the whole history).
    suite = contract.suite_spec(storage) if contract.suite_spec else load_suite_spec(contract.suite)

    def checked(path: Path) -> pd.DataFrame:
        frame = pd.read_parquet(path)
        return contract.add_check_columns(frame, storage) if contract.add_check_columns else frame

    def gx(batch, name, docs=None):
        return validate_frame(
            batch,
            suite_name=contract.suite,
            suite_spec=suite,
            batch_name=name,
            parameters={"as_of": as_of},
            data_docs_dir=docs,
        )

    files = sorted((work / "deliveries").glob("history_*.parquet"))
    if side == "finpipe":  # the GX context is created once per process: not the suite's cost
        gx(checked(files[0]).head(50), "warm-up")
    seconds, suite_only, rows, verdicts = 0.0, 0.0, 0, {}
    for path in files:
        batch = checked(path)
        if side == "finpipe":
            suite_only += timed(gx, batch, path.stem)[0]
            # As ingest runs it: its own Data Docs site per delivery.
            spent, report = timed(gx, batch, path.stem, work / "docs" / path.stem)
            found = {
                r.rule: {"unexpected": r.unexpected_count, "success": r.success}
                for r in report.rules
            }
        else:
            spent, found = timed(pandas_suite_rules, batch, suite, as_of)
        seconds += spent
        rows += len(batch)
        for rule, verdict in found.items():
            total = verdicts.setdefault(rule, {"unexpected": 0, "success": True})
            total["unexpected"] += int(verdict["unexpected"])
            total["success"] &= bool(verdict["success"])
    details = {
        "unexpected": {rule: v["unexpected"] for rule, v in verdicts.items()},
        "success": {rule: v["success"] for rule, v in verdicts.items()},
        "suite_without_docs_s": round(suite_only, 4),
        "batches": len(files),
    }
    if side == "finpipe":
        one_row = checked(files[0]).head(1)
        details["gx_batch_floor"] = gx_batch_floor(
            lambda docs: gx(one_row, "one-row", docs), work / "floor_docs"
        )
    return {"seconds": seconds, "rows": rows, "details": details}


def require_champion(settings, domain: str) -> str:
    """Return the domain's champion version; RuntimeError when there is none.

    Scoring stages call it on both sides before the clock starts. It opens the tracking store
    and reads the registered model, as a nightly run has by the time it scores (it logged,
    registered and promoted first), so finpipe's timing holds its model load and scoring, not
    MLflow's one-off set-up per process: the imports of the store and of `mlflow.pyfunc`
    (about 0.35 s once torch is loaded) and SQLAlchemy's first query plans.
    """
    import mlflow.pyfunc  # noqa: F401  (imported lazily by MLflow otherwise)
    from mlflow import MlflowClient

    from finpipe import tracking

    champion = tracking.current_alias_version(settings, domain)
    if champion is None:
        raise RuntimeError(f"no {domain} champion: run the orchestration stage first")
    MlflowClient().get_registered_model(settings.model_name(domain))
    return champion


def champion_folder(settings, domain: str) -> Path:
    """Return the saved model folder (weights.pt, model.json) of the domain's champion."""
    from mlflow import MlflowClient

    champion = require_champion(settings, domain)
    version = MlflowClient().get_model_version(settings.model_name(domain), champion)
    model_id = version.source.rstrip("/").split("/")[-1]  # MLflow 3: models:/m-<id>
    for match in sorted((settings.local_home / "mlartifacts").glob("**/model.json")):
        if model_id in match.parts or version.run_id in match.parts:
            return match.parent
    raise RuntimeError(f"no saved model folder for {version.source} under {settings.home}")


def gx_batch_floor(run_suite: Callable[..., object], docs: Path, repeats: int = 5) -> dict:
    """Return GX's cost of one batch with (almost) no rows: median seconds of `run_suite(site)`
    (the suite and a new Data Docs site under `docs`, as the stage times each delivery) and of
    `run_suite(None)`.

    `run_suite` validates a one-row batch. Each delivery pays this floor whatever its size, so
    batches x floor is a time no speed-up of the rules' own row work could go below; the runner
    sets it beside the pandas reference's time (`gx_floor_ratio`).
    """
    with_docs, without_docs, passed = [], [], True
    for k in range(repeats):
        spent, report = timed(run_suite, docs / f"one-row-{k}")
        with_docs.append(spent)
        passed &= bool(report.success)
        without_docs.append(timed(run_suite, None)[0])
    shutil.rmtree(docs, ignore_errors=True)
    return {
        "with_docs_s": round(sorted(with_docs)[repeats // 2], 4),
        "without_docs_s": round(sorted(without_docs)[repeats // 2], 4),
        "one_row_passed": passed,  # a failing row would add GX's sample re-run to the floor
    }


def timed(function: Callable, *args, **kwargs) -> tuple[float, object]:
    """Return (seconds, result) of one call."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def training_record(
    finpipe_s: float,
    reference_s: float,
    train_samples: int,
    validation_samples: int,
    epochs: int,
    finpipe_history: list[dict],
    bare_losses: list[float],
    **details,
) -> dict:
    """Return the training stage's result: both loops' seconds, the samples seen and both
    validation-loss curves (`details` go in after the training sample count)."""
    import torch

    return {
        "seconds": finpipe_s,
        "reference_seconds": reference_s,
        "rows": train_samples * epochs,
        "details": {
            "train_samples": train_samples,
            **details,
            "validation_samples": validation_samples,
            "epochs": epochs,
            "torch_threads": torch.get_num_threads(),
            "finpipe_validation_loss": [round(h["validation_loss"], 6) for h in finpipe_history],
            "bare_validation_loss": [round(v, 6) for v in bare_losses],
        },
    }


def full_collections() -> int:
    return gc.get_stats()[2]["collections"]


def settled_clock() -> tuple[float, int]:
    """Collect garbage, then return (perf_counter, full collections so far).

    Scoring windows are short (0.02-7 s) and a full collection of a process's import-time
    objects (about 0.23 s for finpipe's 536k tracked objects) lands in one or not at random.
    Both sides start from a collected heap, as `timeit` does by disabling collection; the full
    collections inside the window are still counted and reported (`full_gc_passes`).
    """
    gc.collect()
    return time.perf_counter(), full_collections()


def time_finpipe_scoring(score: Callable, storage, settings, nights: list[dt.date]) -> dict:
    """Time `score(storage, settings, day)` (a domain's scoring step) over `nights`, one night
    at a time as nightly runs would; return the scoring stage's result."""
    rows, laps = 0, []
    started, collections = settled_clock()
    for day in nights:
        rows += score(storage, settings, day).rows
        laps.append(time.perf_counter() - started)
    details = {
        "nights": len(nights),
        "first_night_s": round(laps[0], 4),
        "full_gc_passes": full_collections() - collections,
    }
    return {"seconds": laps[-1], "rows": rows, "details": details}


def time_bare_scoring(
    work: Path,
    settings,
    storage,
    domain: str,
    nights: list[dt.date],
    load: Callable[[Path], object],
    score_night: Callable[[object, dt.date, Path], object],
    agreement: Callable[[Path, Path, dt.date], dict],
) -> dict:
    """Time a bare scoring path over `nights`: `load(champion folder)` once, as a script scoring
    several nights would, then `score_night(model, day, out_file)` (a pyarrow table) per night.

    Returns the scoring stage's result with `agreement(finpipe's predictions file, the bare
    predictions folder, the prepared night)`.
    """
    night = dt.date.fromisoformat(prepared(work)["night"])
    model_dir = champion_folder(settings, domain)
    out = work / "bare_predictions"
    shutil.rmtree(out, ignore_errors=True)
    rows = 0
    started, collections = settled_clock()
    model = load(model_dir)
    for day in nights:
        rows += score_night(model, day, out / f"date={day}.parquet").num_rows
    seconds = time.perf_counter() - started
    passes = full_collections() - collections
    check = agreement(storage.partition_file("predictions", domain, night), out, night)
    return {
        "seconds": seconds,
        "rows": rows,
        "details": {"nights": len(nights), "agreement": check, "full_gc_passes": passes},
    }


def night_predictions(finpipe_file: Path, bare_dir: Path, night: dt.date, key: str):
    """Return (finpipe's, the bare path's) predictions for `night`, both sorted by `key`."""
    import pandas as pd

    ours = pd.read_parquet(finpipe_file).sort_values(key).reset_index(drop=True)
    theirs = pd.read_parquet(bare_dir / f"date={night}.parquet").sort_values(key)
    return ours, theirs.reset_index(drop=True)
