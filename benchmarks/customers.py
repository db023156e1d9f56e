"""The customers domain's benchmark stages, each run in a fresh process by `benchmarks.stages`.

A size is a synthetic transaction log (`finpipe.customers.synthetic`, planted segments, the
shipped `synthetic` source config) of `customers` customers over two years (about 36
transactions per customer); its last day is the night. Stages:

- validation: the reviewed `customers_transactions` GX suite with its Data Docs page, per
  history batch, vs the same rules in pandas (`pandas_suite_rules`);
- features: the RFM snapshot at the eve, `update_customer_features` vs Polars
  (`polars_customer_features`), outputs compared value by value;
- training: finpipe's loop (`train_regressor`) on the segment autoencoder vs the bare PyTorch
  loop of `benchmarks.references` on the same scaled snapshot;
- orchestration: the nightly flow under Prefect vs the same library calls;
- scoring: `score_customers` for the eve and the night vs a pyarrow read + the same encoder +
  nearest centroid + a pyarrow write.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from benchmarks import workspace
from benchmarks.workspace import prepared, timed, use_home

DOMAIN = "customers"
HISTORY_FILE_DAYS = 91  # one history batch per quarter
TRAINED_MODELS = ("autoencoder",)


def _domain():
    from finpipe.domains import get_domain

    return get_domain(DOMAIN)


# -- prepare -------------------------------------------------------------------------------


def prepare(work: Path, customers: int, seed: int) -> dict:
    """Generate the log, write its deliveries, publish the history and the snapshot at the eve
    (untimed set-up). The history is published without the GX gate, as for market and credit.
    """
    facts = workspace.reuse_prepared(work, customers=customers, seed=seed)
    if facts is not None:
        return workspace.prepare_record(facts)
    from finpipe.customers.pipeline import write_planted_segments
    from finpipe.customers.synthetic import (
        VENDOR_COLUMNS,
        CustomersSyntheticConfig,
        generate_customer_transactions,
    )
    from finpipe.ingest import _publish

    _, storage = use_home(work)
    spec = _domain()
    started = time.perf_counter()
    generated = generate_customer_transactions(
        CustomersSyntheticConfig(customers=customers, seed=seed)
    )
    seconds = time.perf_counter() - started
    write_planted_segments(storage, generated.segments)
    rows = generated.transactions
    vendor = rows[list(VENDOR_COLUMNS)].rename(columns=VENDOR_COLUMNS)
    day = rows["date"]
    night = day.max()
    first = day.min()
    for number, start in enumerate(range(0, (night - first).days, HISTORY_FILE_DAYS)):
        low = first + dt.timedelta(days=start)
        inside = (day >= low) & (day < min(low + dt.timedelta(days=HISTORY_FILE_DAYS), night))
        batch = spec.contract.normalise(vendor[inside.to_numpy()].reset_index(drop=True))
        batch.to_parquet(work / "deliveries" / f"history_{number:04d}.parquet", index=False)
        _publish(storage, spec.contract, batch, f"bhistory{number:04d}")
    tonight = vendor[(day == night).to_numpy()]
    tonight.to_csv(
        work / "deliveries" / f"{DOMAIN}_{night.date()}.csv",
        index=False,
        date_format="%Y-%m-%d %H:%M:%S",
    )
    eve = day[day < night].max().date()
    snapshot = spec.update_features(storage, eve)
    facts = {
        "domain": DOMAIN,
        "customers": customers,
        "seed": seed,
        "rows": len(rows),
        "history_rows": int((day < night).sum()),
        "night_rows": len(tonight),
        "active_customers_at_eve": snapshot.rows,
        "eve": eve.isoformat(),
        "night": night.date().isoformat(),
        "generate_s": round(seconds, 3),
        "prepare_s": round(time.perf_counter() - started, 3),
    }
    return workspace.write_prepared(work, facts)


# -- validation ----------------------------------------------------------------------------


def validation(work: Path, side: str) -> dict:
    """Validate every history batch: the GX suite (finpipe) or the same rules in pandas."""
    return workspace.validate_history(work, DOMAIN, side)


# -- features ------------------------------------------------------------------------------


def features(work: Path, side: str) -> dict:
    """Build the snapshot at the eve from the validated history: finpipe or Polars.

    Rows are the transactions the snapshot reads (the whole history up to the eve).
    """
    import pandas as pd

    from finpipe.customers.config import load_customers_config

    settings, storage = use_home(work)
    facts = prepared(work)
    eve = dt.date.fromisoformat(facts["eve"])
    if side == "finpipe":
        spent, update = timed(_domain().update_features, storage, eve, rebuild=True)
        details = {"customers": update.rows}
        return {"seconds": spent, "rows": facts["history_rows"], "details": details}
    from benchmarks.domain_references import compare_snapshots, polars_customer_features

    active_days = load_customers_config(settings.customers_config).features.active_days
    out = work / "polars_snapshot.parquet"
    spent, customers = timed(
        polars_customer_features,
        storage.layer_dir("validated", DOMAIN),
        pd.Timestamp(eve),
        active_days,
        out,
    )
    check = compare_snapshots(storage.partition_file("features", DOMAIN, eve), out)
    out.unlink()
    details = {"customers": customers, "agreement": check}
    return {"seconds": spent, "rows": facts["history_rows"], "details": details}


# -- training ------------------------------------------------------------------------------


def training(work: Path, model: str, epochs: int) -> dict:
    """Time finpipe's training loop and a bare PyTorch loop on the segment autoencoder.

    The tensors are those `fit_segment_model` builds from the snapshot at the eve (customer
    sets by id hash, log + block scaling fitted on the training customers); both loops run
    `epochs` epochs with no early stop.
    """
    import numpy as np
    import torch

    from benchmarks.references import bare_training_loop
    from finpipe.customers.features import LOG_SCALED
    from finpipe.customers.model import (
        build_autoencoder,
        fit_block_scaler,
        model_inputs,
        snapshot_feature_columns,
    )
    from finpipe.training import Batches, TrainConfig, sets_by_id, train_regressor

    settings, storage = use_home(work)
    eve = dt.date.fromisoformat(prepared(work)["eve"])
    config = _domain().training_config(max_epochs=epochs, patience=epochs + 1)
    snapshot = storage.read_partition("features", DOMAIN, eve)
    sets = sets_by_id(snapshot["customer_id"], config.validation_fraction, config.test_fraction)
    train_mask, validation_mask = sets == "train", sets == "validation"
    columns = snapshot_feature_columns(snapshot, train_mask)
    inputs = model_inputs(snapshot, columns, [c for c in LOG_SCALED if c in columns])
    scaled = torch.from_numpy(fit_block_scaler(inputs.loc[train_mask]).transform(inputs))
    train_rows = torch.from_numpy(np.flatnonzero(train_mask))
    validation_rows = torch.from_numpy(np.flatnonzero(validation_mask))
    train, validation = scaled[train_rows], scaled[validation_rows]
    architecture = {
        "hidden": config.hidden,
        "layers": config.layers,
        "embedding_dim": config.embedding_dim,
    }
    train_config = config.train_config()

    def net():
        return build_autoencoder(len(columns), architecture, config.seed)

    def bare(model, rows, epochs):
        return bare_training_loop(
            model, scaled, rows, scaled[rows], validation_rows, validation, lookback=0,
            batch_size=train_config.batch_size, epochs=epochs,
            learning_rate=train_config.learning_rate, weight_decay=train_config.weight_decay,
            seed=train_config.seed,
        )  # fmt: skip

    # Warm-up, untimed: torch sets up kernels and allocators on first use.
    few = train_rows[: 4 * train_config.batch_size]
    warm_config = TrainConfig(**{**train_config.to_params(), "max_epochs": 1})
    warm = Batches(scaled[few], scaled[few])
    train_regressor(net(), warm, Batches(validation, validation), warm_config)
    bare(net(), few, 1)

    finpipe_s, result = timed(
        train_regressor, net(), Batches(train, train), Batches(validation, validation), train_config
    )
    reference_s, bare_losses = timed(bare, net(), train_rows, epochs)
    return workspace.training_record(
        finpipe_s, reference_s, len(train), len(validation), epochs, result.history, bare_losses
    )


# -- orchestration -------------------------------------------------------------------------


def orchestration(work: Path, side: str, epochs: int) -> dict:
    """Run one night through the Prefect flow or as direct calls; return seconds and quality
    (the test customers' ARI against the planted segments, silhouette, segments found)."""
    seconds, metrics, rows, setup = workspace.run_night(work, DOMAIN, side, {"max_epochs": epochs})
    quality = {
        kind: {
            "test_ari_vs_planted": result["test"].get("ari_vs_planted"),
            "test_silhouette": result["test"].get("silhouette"),
            "segments": result["test"].get("segments"),
        }
        for kind, result in metrics.items()
    }
    details = {"quality": quality, "epochs": epochs, **setup}
    return {"seconds": seconds, "rows": rows, "details": details}


# -- scoring -------------------------------------------------------------------------------


def scoring(work: Path, side: str) -> dict:
    """Segment the snapshots of the eve and the night with the champion: finpipe's scoring
    step, or the bare path (see `bare_segment_scoring`). Both pay their first model load once:
    finpipe's cached registered version, the bare path's encoder loaded before its night loop.
    """
    settings, storage = use_home(work)
    night = dt.date.fromisoformat(prepared(work)["night"])
    workspace.require_champion(settings, DOMAIN)  # tracking store open, as in a nightly run
    nights = storage.partition_dates("features", DOMAIN, end=night)[-2:]
    if side == "finpipe":
        return workspace.time_finpipe_scoring(_domain().score, storage, settings, nights)
    from benchmarks.domain_references import bare_segment_scoring, load_segment_net

    def score_night(model, day: dt.date, out_file: Path):
        snapshot = storage.partition_file("features", DOMAIN, day)
        return bare_segment_scoring(model, snapshot, out_file)

    return workspace.time_bare_scoring(
        work, settings, storage, DOMAIN, nights, load_segment_net, score_night, _agreement
    )


def _agreement(finpipe_file: Path, bare_dir: Path, night: dt.date) -> dict:
    """Return how finpipe's and the bare path's segments for `night` agree."""
    import numpy as np

    ours, theirs = workspace.night_predictions(finpipe_file, bare_dir, night, "customer_id")
    same_rows = len(ours) == len(theirs) and bool(
        (ours["customer_id"].astype(str).to_numpy() == theirs["customer_id"].to_numpy()).all()
    )
    if not same_rows:
        return {"equal": False, "rows": [len(ours), len(theirs)], "reason": "different rows"}
    same_segment = float((ours["segment"].to_numpy() == theirs["segment"].to_numpy()).mean())
    distance = np.abs(ours["distance_to_centroid"] - theirs["distance_to_centroid"]).max()
    return {
        "equal": same_segment == 1.0 and float(distance) < 1e-5,
        "rows": len(ours),
        "same_segment": same_segment,
        "max_abs_distance_diff": float(distance),
    }


STAGES = workspace.stage_table(prepare, validation, features, training, orchestration, scoring)
