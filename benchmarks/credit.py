"""The credit domain's benchmark stages, each run in a fresh process by `benchmarks.stages`.

A size is a synthetic loan book (`finpipe.credit.synthetic`, the shipped `synthetic` loan-book
config) of `applications` rows over two years; the last application day is the night. Stages:

- validation: the loan book's GX suite (built from the config and the categories accepted so
  far, as ingest builds it) with its Data Docs page, per history batch, vs the same rules in
  pandas (`pandas_suite_rules`);
- training: `train_classifier` (finpipe's PD training loop) vs a bare PyTorch loop on the same
  tensors, net, seed and batches, for the network and its logistic baseline;
- orchestration: the nightly flow under Prefect vs the same library calls;
- scoring: `score_credit` for the last nights vs a pyarrow read + the same net's PD, grade and
  reason codes + a pyarrow write.

There is no feature race: credit features are the validated row with its types fixed
(`build_credit_features`), with no computation a reference could do differently.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path

from benchmarks import workspace
from benchmarks.workspace import prepared, timed, use_home

DOMAIN = "credit"
HISTORY_FILE_DAYS = 91  # one history batch per quarter
SCORED_NIGHTS = 5
TRAINED_MODELS = ("mlp", "logistic")


def _domain():
    from finpipe.domains import get_domain

    return get_domain(DOMAIN)


def _book(settings):
    from finpipe.credit.pipeline import active_loan_book

    return active_loan_book(settings)


# -- prepare -------------------------------------------------------------------------------


def prepare(work: Path, applications: int, seed: int) -> dict:
    """Generate the loan book, write its deliveries, publish the history and its features up to
    the eve (untimed set-up).

    The history is published with ingest's partition writer without the GX gate; the
    validation stage measures the suite on the same batches on its own.
    """
    facts = workspace.reuse_prepared(work, applications=applications, seed=seed)
    if facts is not None:
        return workspace.prepare_record(facts)
    from finpipe.credit.pipeline import write_oracle
    from finpipe.credit.synthetic import CreditSyntheticConfig, generate_loan_book
    from finpipe.ingest import _publish

    _, storage = use_home(work)
    spec = _domain()
    started = time.perf_counter()
    book = generate_loan_book(CreditSyntheticConfig(applications=applications, seed=seed))
    generated = time.perf_counter() - started
    write_oracle(storage, book.true_pd.rename(columns={"loan_id": "id"}))
    rows = book.applications
    day = rows["application_date"]
    night = day.max()
    history = rows[day < night]
    first = day.min()
    for number, start in enumerate(range(0, (night - first).days, HISTORY_FILE_DAYS)):
        low = first + dt.timedelta(days=start)
        chunk = history[(history["application_date"] >= low)]
        chunk = chunk[chunk["application_date"] < low + dt.timedelta(days=HISTORY_FILE_DAYS)]
        batch = spec.contract.normalise(chunk.reset_index(drop=True), as_of=night.date())
        batch.attrs = {}
        batch.to_parquet(work / "deliveries" / f"history_{number:04d}.parquet", index=False)
        _publish(storage, spec.contract, batch, f"bhistory{number:04d}")
    tonight = rows[day == night].assign(defaulted=None)
    tonight = tonight.assign(application_date=tonight["application_date"].dt.strftime("%Y-%m-%d"))
    tonight.to_csv(work / "deliveries" / f"{DOMAIN}_{night.date()}.csv", index=False)
    eve = history["application_date"].max().date()
    spec.update_features(storage, eve)
    facts = {
        "domain": DOMAIN,
        "applications": applications,
        "seed": seed,
        "rows": len(rows),
        "history_rows": len(history),
        "night_rows": len(tonight),
        "unlabelled_rows": int(rows["defaulted"].isna().sum()),
        "oracle_auc": round(book.oracle_auc(), 4),
        "eve": eve.isoformat(),
        "night": night.date().isoformat(),
        "generate_s": round(generated, 3),
        "prepare_s": round(time.perf_counter() - started, 3),
    }
    return workspace.write_prepared(work, facts)


# -- validation ----------------------------------------------------------------------------


def validation(work: Path, side: str) -> dict:
    """Validate every history batch: the GX suite (finpipe) or the same rules in pandas."""
    return workspace.validate_history(work, DOMAIN, side)


# -- training ------------------------------------------------------------------------------


def training(work: Path, model: str, epochs: int) -> dict:
    """Time finpipe's PD training loop and a bare PyTorch loop on the same tensors and net.

    The tensors are those `train_credit` builds from the labelled rows up to the eve (its
    out-of-time split, scaler and vocabulary fitted on the training rows); both loops run
    `epochs` epochs with no early stop.
    """
    import numpy as np
    import torch

    from benchmarks.domain_references import bare_classifier_loop
    from finpipe.credit.features import LABEL
    from finpipe.credit.model import Inputs, Vocabulary, build_net, train_classifier
    from finpipe.credit.pipeline import load_training_frame, split_book_rows
    from finpipe.training import FeatureScaler

    settings, storage = use_home(work)
    book = _book(settings)
    eve = dt.date.fromisoformat(prepared(work)["eve"])
    config = _domain().training_config(max_epochs=epochs, patience=epochs + 1)
    classifier = config.classifier_config(model)
    frame = load_training_frame(storage, book, eve)
    split = split_book_rows(frame, book, config)
    numeric = frame[book.numeric_columns].astype("float64")
    scaler = FeatureScaler.fit(numeric.loc[split.train])
    vocabulary = Vocabulary.fit(
        frame.loc[split.train], book.categorical_columns, classifier.min_category_count
    )
    architecture = classifier.architecture(len(book.numeric_columns), vocabulary.sizes)

    def inputs(mask) -> Inputs:
        return Inputs(
            numeric=torch.from_numpy(scaler.transform(numeric.loc[mask])),
            missing=torch.from_numpy(numeric.loc[mask].isna().to_numpy(np.float32)),
            categories=torch.from_numpy(vocabulary.transform(frame.loc[mask])),
            labels=torch.as_tensor(frame.loc[mask, LABEL].to_numpy(), dtype=torch.float32),
        )

    train, validation = inputs(split.train), inputs(split.validation)

    def parts(data: Inputs):
        return data.numeric, data.missing, data.categories, data.labels

    def bare(net, data: Inputs, epochs: int):
        return bare_classifier_loop(
            net, parts(data), parts(validation), batch_size=classifier.batch_size, epochs=epochs,
            learning_rate=classifier.learning_rate, weight_decay=classifier.weight_decay,
            unknown_rate=classifier.unknown_rate, seed=classifier.seed,
        )  # fmt: skip

    # Warm-up, untimed: torch sets up kernels and allocators on first use.
    few = train.rows(torch.arange(min(len(train), 4 * classifier.batch_size)))
    one_epoch = dataclasses.replace(classifier, max_epochs=1)
    train_classifier(build_net(architecture, classifier.seed), few, validation, one_epoch)
    bare(build_net(architecture, classifier.seed), few, 1)

    finpipe_s, (_, history, _) = timed(
        train_classifier, build_net(architecture, classifier.seed), train, validation, classifier
    )
    reference_s, bare_losses = timed(bare, build_net(architecture, classifier.seed), train, epochs)
    return workspace.training_record(
        finpipe_s, reference_s, len(train), len(validation), epochs, history, bare_losses
    )


# -- orchestration -------------------------------------------------------------------------


def orchestration(work: Path, side: str, epochs: int) -> dict:
    """Run one night through the Prefect flow or as direct calls; return seconds and quality
    (test AUC of each model against the oracle AUC of the planted PDs on the same rows)."""
    seconds, metrics, rows, setup = workspace.run_night(work, DOMAIN, side, {"max_epochs": epochs})
    quality = {}
    for kind, result in metrics.items():
        auc, oracle = result["test"].get("auc"), result["test"].get("oracle_auc")
        quality[kind] = {
            "test_auc": auc,
            "oracle_auc": oracle,
            "auc_to_oracle": auc / oracle if auc is not None and oracle else None,
        }
    details = {"quality": quality, "epochs": epochs, **setup}
    return {"seconds": seconds, "rows": rows, "details": details}


# -- scoring -------------------------------------------------------------------------------


def scoring(work: Path, side: str) -> dict:
    """Score the applications still open on each of the last SCORED_NIGHTS feature dates, as
    nightly runs would: finpipe's scoring step, or the bare path (see `bare_credit_scoring`).

    Both sides start in a fresh process and pay their first model load once: finpipe's cached
    registered version, the bare path's net loaded before its night loop.
    """
    settings, storage = use_home(work)
    night = dt.date.fromisoformat(prepared(work)["night"])
    workspace.require_champion(settings, DOMAIN)  # tracking store open, as in a nightly run
    dated = storage.partition_dates("features", DOMAIN, end=night)
    nights = dated[-SCORED_NIGHTS:]
    if side == "finpipe":
        return workspace.time_finpipe_scoring(_domain().score, storage, settings, nights)
    from benchmarks.domain_references import bare_credit_scoring, load_credit_net

    def score_night(model, day: dt.date, out_file: Path):
        files = [storage.partition_file("features", DOMAIN, d) for d in dated if d <= day]
        return bare_credit_scoring(model, files, out_file)

    return workspace.time_bare_scoring(
        work, settings, storage, DOMAIN, nights, load_credit_net, score_night, _agreement
    )


def _agreement(finpipe_file: Path, bare_dir: Path, night: dt.date) -> dict:
    """Return how finpipe's and the bare path's predictions for `night` agree."""
    import numpy as np

    ours, theirs = workspace.night_predictions(finpipe_file, bare_dir, night, "id")
    if len(ours) != len(theirs) or not (ours["id"].to_numpy() == theirs["id"].to_numpy()).all():
        return {"equal": False, "rows": [len(ours), len(theirs)], "reason": "different rows"}
    pd_diff = float(np.abs(ours["pd"].to_numpy() - theirs["pd"].to_numpy()).max(initial=0.0))
    same = {
        column: float((ours[column].astype(str) == theirs[column].astype(str)).mean())
        for column in ("grade", "reason_1")
    }
    return {
        "equal": pd_diff < 1e-6 and same["grade"] == 1.0,
        "rows": len(ours),
        "max_abs_pd_diff": pd_diff,
        "same_grade": same["grade"],
        "same_reason_1": same["reason_1"],
    }


STAGES = workspace.stage_table(prepare, validation, training, orchestration, scoring)
