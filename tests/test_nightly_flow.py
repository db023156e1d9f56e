"""The nightly flow end to end: real Prefect (local mode), real SQLite MLflow, real Parquet."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from finpipe import tracking
from finpipe.domains import get_domain
from finpipe.errors import ValidationFailed
from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    inject_defects,
    write_vendor_files,
)
from finpipe.storage import Storage
from finpipe.vintages import validated_as_known
from tests.conftest import finpipe_home
from tests.test_layout_readers import assert_layer_reads_everywhere

pytestmark = pytest.mark.slow

MODELS = ["mlp", "gru", "ensemble"]  # the temporal CNN takes the GRU's path (test_market_model)
FAST = {"max_epochs": 4, "hidden": 16, "lookback": 10, "batch_size": 256, "models": MODELS}
REASONS = ["reason_1", "reason_1_impact", "reason_2", "reason_2_impact", "reason_3"]


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory):
    """Two consecutive nights on a small synthetic panel; yields (settings, files, summaries)."""
    from finpipe.flows.nightly import nightly

    root = tmp_path_factory.mktemp("nightly")
    panel = generate_market_panel(MarketSyntheticConfig(tickers=12, days=320, seed=3))
    files = write_vendor_files(panel.prices, root / "drop", daily_files=2)
    with finpipe_home(root / "home") as settings:
        first = nightly(
            domain="market",
            as_of=_day(files[1]),
            inputs=[str(files[0]), str(files[1])],
            training=FAST,
        )
        second = nightly(
            domain="market", as_of=_day(files[2]), inputs=[str(files[2])], training=FAST
        )
        yield settings, files, [first, second], panel


def _day(path) -> dt.date:
    return dt.date.fromisoformat(path.stem.removeprefix("market_"))


def test_every_layer_is_written(two_nights):
    settings, files, summaries, panel = two_nights
    storage = Storage(settings.home)
    dates = sorted(panel.prices["date"].unique())
    assert len(storage.partition_dates("validated", "market")) == len(dates)
    assert len(storage.partition_dates("features", "market")) == len(dates)
    assert storage.partition_dates("predictions", "market") == [_day(files[1]), _day(files[2])]
    predictions = storage.read_partition("predictions", "market", _day(files[2]))
    assert list(predictions.columns) == [
        "date",
        "ticker",
        "prediction",
        *REASONS,
        "reason_3_impact",
        "model_name",
        "model_version",
        "run_id",
        "scored_at",
    ]
    tickers_that_day = panel.prices.loc[panel.prices["date"] == pd.Timestamp(_day(files[2]))]
    assert len(predictions) == tickers_that_day["ticker"].nunique()
    assert predictions["prediction"].notna().all()
    assert (predictions["model_name"] == "finpipe-market").all()
    # Each row's three features that moved its score most, largest first, named as features.
    features = set(storage.read_partition("features", "market", _day(files[2])).columns)
    reasons = predictions[["reason_1", "reason_2", "reason_3"]]
    assert reasons.notna().all().all() and set(reasons.stack()) <= features
    assert (reasons.nunique(axis=1) == 3).all()
    impacts = predictions[["reason_1_impact", "reason_2_impact", "reason_3_impact"]].abs()
    assert (impacts["reason_1_impact"] >= impacts["reason_2_impact"]).all()
    assert (impacts["reason_2_impact"] >= impacts["reason_3_impact"]).all()
    assert summaries[1]["predictions"]["rows"] == len(predictions)


def test_every_layer_opens_in_pandas_pyarrow_polars_and_duckdb(two_nights):
    settings, *_ = two_nights
    for layer in ("validated", "features", "predictions"):
        assert_layer_reads_everywhere(Storage(settings.home), layer, "market")


def test_each_logged_model_is_named_and_tagged_by_domain_candidate_and_night(two_nights):
    settings, files, _, _ = two_nights
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("finpipe-market").experiment_id
    logged = client.search_logged_models([experiment])
    assert sorted(m.name for m in logged) == sorted(f"market-{kind}" for kind in MODELS * 2)
    nights = {_day(files[1]).isoformat(), _day(files[2]).isoformat()}
    runs = {r.info.run_id: r for r in client.search_runs([experiment])}
    for model in logged:
        kind = model.name.removeprefix("market-")
        assert model.tags[tracking.DOMAIN_TAG] == "market"
        assert model.tags[tracking.CANDIDATE_TAG] == kind
        assert runs[model.source_run_id].info.run_name == kind
        parent = runs[runs[model.source_run_id].data.tags["mlflow.parentRunId"]]
        assert model.tags[tracking.AS_OF_TAG] == parent.data.params["as_of"]
    assert {m.tags[tracking.AS_OF_TAG] for m in logged} == nights
    gru = client.search_logged_models(
        [experiment], filter_string=f"tags.`{tracking.CANDIDATE_TAG}` = 'gru'"
    )
    assert [m.name for m in gru] == ["market-gru", "market-gru"]
    # The champion's version points at one of them, and its run finds it by name.
    champion = client.get_model_version_by_alias("finpipe-market", "champion")
    chosen = client.get_logged_model(champion.source.removeprefix("models:/"))
    assert chosen.source_run_id == champion.run_id
    by_name = mlflow.pyfunc.load_model(f"runs:/{champion.run_id}/{chosen.name}")
    assert by_name.metadata.model_id == chosen.model_id


def test_mlflow_has_runs_metrics_plots_and_a_champion(two_nights):
    settings, files, summaries, _ = two_nights
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("finpipe-market")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlflow.runName", "").startswith("nightly-")]
    children = [r for r in runs if r.data.tags.get("mlflow.runName") in set(MODELS)]
    assert len(parents) == 2 and len(children) == 2 * len(MODELS)
    # Each night's run says when it read its data: the validated layer as known then ends on
    # that night's day (the first night's run saw none of the second night's delivery).
    storage, market = Storage(settings.home), get_domain("market").contract
    for parent in parents:
        seen = validated_as_known(storage, market, parent.data.tags[tracking.DATA_KNOWN_AT_TAG])
        assert seen["date"].max() == pd.Timestamp(parent.data.params["as_of"])
        # ... and which Prefect run trained (a local run: no deployment).
        made_by = {k: v for k, v in parent.data.tags.items() if k.startswith("prefect.")}
        assert set(made_by) == {"prefect.flow", "prefect.flow_run", "prefect.flow_run_id"}
        assert made_by["prefect.flow"] == "nightly"
        assert made_by["prefect.flow_run"].startswith("nightly-market-")
    child = next(r for r in children if r.data.tags["mlflow.runName"] == "gru")
    for metric in [
        "test_ic",
        "test_rank_ic",
        "test_icir",
        "test_directional_accuracy",
        "test_rmse",
        "test_top_minus_bottom",
        "validation_ic",
    ]:
        assert metric in child.data.metrics, metric
    history = client.get_metric_history(child.info.run_id, "validation_loss")
    assert len(history) >= 2
    # one point per epoch, at its epoch (the UI's loss-by-epoch chart)
    assert sorted(point.step for point in history) == list(range(1, len(history) + 1))
    plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
    assert plots == {
        "plots/learning_curve.png",
        "plots/ic_by_date.png",
        "plots/return_by_decile.png",
        "plots/feature_importance.png",
    }
    importance = _table(client, child, "importance/permutation_importance.json")
    assert set(importance["feature"]) == set(
        json.loads(_artifact(client, parents[0], "feature_columns.json"))["feature_columns"]
    )
    np.testing.assert_allclose(importance["ic_drop"], importance["ic"] - importance["shuffled_ic"])
    assert importance["ic"].nunique() == 1 and importance["ic"].iloc[0] == pytest.approx(
        child.data.metrics["test_ic"]
    )
    # The ensemble's run: each member's IC beside its own, the model saved as one folder.
    ensemble = next(r for r in children if r.data.tags["mlflow.runName"] == "ensemble")
    members = _table(client, ensemble, "ensemble/members.json").set_index("candidate")
    assert list(members.index) == MODELS
    assert members["weight"].drop("ensemble").sum() == pytest.approx(1.0)
    siblings = {
        r.data.tags["mlflow.runName"]: r
        for r in children
        if r.data.tags.get("mlflow.parentRunId") == ensemble.data.tags["mlflow.parentRunId"]
    }
    for kind in ("mlp", "gru"):
        assert members.loc[kind, "test_ic"] == pytest.approx(siblings[kind].data.metrics["test_ic"])
        assert ensemble.data.metrics[f"member_{kind}_test_ic"] == pytest.approx(
            members.loc[kind, "test_ic"]
        )
    assert members.loc["ensemble", "test_ic"] == pytest.approx(ensemble.data.metrics["test_ic"])
    assert ensemble.data.params["combination"] in ("mean", "stacked")
    assert "plots/feature_importance.png" in {
        a.path for a in client.list_artifacts(ensemble.info.run_id, "plots")
    }
    folder = "market-ensemble/artifacts/model"  # the logged model's name, then its folder
    model_files = {a.path for a in client.list_artifacts(ensemble.info.run_id, folder)}
    assert f"{folder}/members" in model_files
    parent = parents[0]
    candidates = _table(client, parent, "candidates.json")
    assert candidates["candidate"].tolist() == MODELS
    assert parent.inputs.dataset_inputs, "feature data is logged as a run input"
    champion = client.get_model_version_by_alias("finpipe-market", "champion")
    predictions = Storage(settings.home).read_partition("predictions", "market", _day(files[2]))
    assert set(predictions["model_version"]) == {str(champion.version)}
    assert set(predictions["run_id"]) == {champion.run_id}
    decision = json.loads(
        (settings.home / "mlartifacts")
        .joinpath(parent.info.run_id, "artifacts", "promotion.json")
        .read_text()
    )
    assert decision["metric"] == "ic"


def _artifact(client, run, path) -> str:
    folder = client.download_artifacts(run.info.run_id, path)
    return open(folder).read()


def _table(client, run, path) -> pd.DataFrame:
    """An MLflow table artifact (`mlflow.log_table`'s JSON) as a frame."""
    data = json.loads(_artifact(client, run, path))
    return pd.DataFrame(data["data"], columns=data["columns"])


def test_first_model_is_promoted_and_decision_recorded(two_nights):
    _, _, summaries, _ = two_nights
    first, second = summaries
    assert first["promotion"]["promoted"] is True
    assert first["promotion"]["champion_version"] is None
    assert second["promotion"]["champion_version"] == first["promotion"]["challenger_version"]
    assert second["promotion"]["champion_score"] is not None


def test_rerunning_a_date_is_idempotent(two_nights):
    from finpipe.flows.nightly import nightly

    settings, files, _, _ = two_nights
    storage = Storage(settings.home)
    day = _day(files[2])
    before = storage.read_partition("predictions", "market", day)
    features_before = storage.read_partition("features", "market", day)
    with finpipe_home(settings.home):
        summary = nightly(domain="market", as_of=day, inputs=[str(files[2])], retrain=False)
    assert summary["ingested"][0]["status"] == "already_loaded"
    after = storage.read_partition("predictions", "market", day)
    pd.testing.assert_frame_equal(before.drop(columns="scored_at"), after.drop(columns="scored_at"))
    assert not after.duplicated(["date", "ticker"]).any()
    pd.testing.assert_frame_equal(
        features_before, storage.read_partition("features", "market", day)
    )
    validated = storage.read_partitions("validated", "market")
    assert not validated.duplicated(["date", "ticker"]).any()


def test_bad_batch_is_quarantined_and_nothing_downstream_is_written(two_nights, tmp_path):
    from finpipe.flows.nightly import nightly

    settings, files, _, panel = two_nights
    storage = Storage(settings.home)
    last = pd.Timestamp(_day(files[2]))
    next_day = (last + pd.offsets.BDay(1)).date()
    rows = panel.prices[panel.prices["date"] == last].assign(date=pd.Timestamp(next_day))
    bad = inject_defects(rows, ["non_positive_price"], rows_per_defect=2, seed=1)
    path = tmp_path / f"market_{next_day}.csv"
    bad.rename(columns={"adj_close": "Adj Close"}).to_csv(path, index=False)
    layers = {
        layer: storage.partition_dates(layer, "market")
        for layer in ["validated", "features", "predictions"]
    }
    with finpipe_home(settings.home), pytest.raises(ValidationFailed) as caught:
        nightly(domain="market", as_of=next_day, inputs=[str(path)], retrain=False)
    message = str(caught.value)
    assert path.name in message and "rules failed" in message
    folder = caught.value.quarantine_path
    report = json.loads((settings.home / folder / "report.json").read_text())
    failed = [r for r in report["rules"] if not r["success"]]
    assert failed and failed[0]["unexpected_count"] >= 2
    assert (settings.home / folder / path.name).exists()
    for layer, dates in layers.items():
        assert storage.partition_dates(layer, "market") == dates, layer


def test_worse_model_does_not_replace_the_champion(two_nights):
    """A challenger that is the champion with its sign flipped scores -IC on the same window.

    If the champion's IC is negative on this small panel, its mirror image is better and wins
    (that is the gate working too); then the original, now the worse model, is offered back
    and must lose. Either way the last decision is a worse model meeting a better champion.
    """
    from finpipe import tracking
    from finpipe.market.pipeline import DOMAIN, TrainingOutcome, promote_market

    settings, files, summaries, _ = two_nights
    storage = Storage(settings.home)
    outcome = summaries[1]["training"]
    example = storage.read_partition("features", "market", _day(files[2]))
    original = tracking.load_model_version(settings, DOMAIN).model

    def offer(fitted):
        with (
            mlflow.start_run(run_id=outcome["run_id"]),
            mlflow.start_run(run_name="offered", nested=True),
        ):
            info = tracking.log_fitted_model(
                fitted,
                name="market-offered",
                loader=f"{type(fitted).__module__}:{type(fitted).__name__}",
                input_example=example.head(3),
                output_example=fitted.predict(example.head(3)),
            )
        version = mlflow.register_model(info.model_uri, "finpipe-market").version
        challenger = TrainingOutcome(**{**outcome, "challenger_version": str(version)})
        return str(version), promote_market(storage, settings, challenger)

    champion_before = tracking.current_alias_version(settings, DOMAIN)
    version, decision = offer(_sign_flipped(original))
    assert np.isclose(decision.challenger_score, -decision.champion_score, atol=1e-6)
    if decision.promoted:
        assert decision.challenger_score > decision.champion_score
        assert tracking.current_alias_version(settings, DOMAIN) == version
        champion_before = version
        version, decision = offer(original)
    assert decision.promoted is False
    assert decision.challenger_score < decision.champion_score
    assert tracking.current_alias_version(settings, DOMAIN) == champion_before


def _sign_flipped(fitted):
    """The model with its output negated: each net's head, or every member of an ensemble
    (z-scores are odd in the prediction, so the weighted sum flips too)."""
    import copy

    import torch

    flipped = copy.deepcopy(fitted)
    nets = (
        [m.net for m in flipped.members.values()] if hasattr(flipped, "members") else [flipped.net]
    )
    for net in nets:
        last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(-1)
            last.bias.mul_(-1)
    return flipped


def test_scoring_refuses_features_that_do_not_match_the_champion(two_nights, tmp_path):
    from finpipe.errors import ScoringError
    from finpipe.market.pipeline import score_market
    from finpipe.settings import Settings

    settings, files, _, _ = two_nights
    copy = tmp_path / "home"  # a copy: the shared fixture's storage stays as it was
    shutil.copytree(settings.home, copy)
    storage, day = Storage(copy), _day(files[2])
    frame = storage.read_partition("features", "market", day).drop(columns=["return_5d"])
    storage.write_partition("features", "market", day, frame)
    before = storage.read_partition("predictions", "market", day)
    with pytest.raises(ScoringError, match=r"lack \[.return_5d.\].*rebuild features or retrain"):
        score_market(storage, Settings(home=copy), day)
    pd.testing.assert_frame_equal(storage.read_partition("predictions", "market", day), before)


def test_a_day_delivered_without_volume_is_refused_with_the_correction_that_fixes_it(
    two_nights, tmp_path
):
    from finpipe.errors import ScoringError
    from finpipe.market.pipeline import score_market
    from finpipe.settings import Settings

    settings, files, _, _ = two_nights
    copy = tmp_path / "home"
    shutil.copytree(settings.home, copy)
    storage, day = Storage(copy), _day(files[2])
    for layer, column in [("validated", "volume"), ("features", "volume_z_20d")]:
        frame = storage.read_partition(layer, "market", day).assign(**{column: np.nan})
        storage.write_partition(layer, "market", day, frame)
    with pytest.raises(ScoringError) as refused:
        score_market(storage, Settings(home=copy), day)
    assert "lack ['volume_z_20d']" in str(refused.value)
    assert f"({day} has no volume): deliver the day with them" in str(refused.value)
    assert "--correction" in str(refused.value)
    # today's delivery has its volume, but six of the 20 days its window reads do not
    earlier = storage.partition_dates("validated", "market", end=day)[-8:-2]
    for when, volume in [(day, 1e6), *[(gone, np.nan) for gone in earlier]]:
        frame = storage.read_partition("validated", "market", when).assign(volume=volume)
        storage.write_partition("validated", "market", when, frame)
    with pytest.raises(ScoringError) as refused:
        score_market(storage, Settings(home=copy), day)
    named = "; ".join(f"{gone} has no volume" for gone in earlier)
    assert f"({named}): deliver those days with them" in str(refused.value)


def test_the_champion_serves_through_mlflow_pyfunc_as_finpipe_scores_it(two_nights):
    """finpipe scores with the model folder its pyfunc wraps; a user of plain MLflow
    (`mlflow.pyfunc.load_model`) gets the same predictions from the same registered version."""
    from finpipe import tracking

    settings, files, _, _ = two_nights
    storage, day = Storage(settings.home), _day(files[2])
    mlflow.set_tracking_uri(settings.tracking_uri)
    served = mlflow.pyfunc.load_model("models:/finpipe-market@champion")
    champion = tracking.load_model_version(settings, "market")
    assert type(champion.model).__name__ in ("FittedMarketModel", "FittedMarketEnsemble")
    assert served.metadata.run_id == champion.run_id
    window = champion.model.history_rows + 1
    days = storage.partition_dates("features", "market", end=day, last=window)
    features = storage.read_partitions("features", "market", days=days)
    expected = champion.predict(features)
    assert expected["prediction"].notna().all() and expected["prediction"].std() > 0
    pd.testing.assert_frame_equal(served.predict(features), expected)


def test_a_registered_model_naming_a_foreign_loader_is_refused(two_nights, tmp_path):
    """Scoring imports only finpipe's model classes, whatever a version's MLmodel names."""
    from finpipe import tracking
    from finpipe.errors import ScoringError

    settings, files, _, _ = two_nights
    fitted = tracking.load_model_version(settings, "market").model
    example = Storage(settings.home).read_partition("features", "market", _day(files[2])).head(3)
    try:
        with finpipe_home(tmp_path / "other") as other:
            tracking.use_tracking(other, "market")
            with mlflow.start_run():
                tracking.log_fitted_model(
                    fitted,
                    name="market-mlp",
                    loader="finpipe.market.model:FittedMarketModel",
                    input_example=example,
                    output_example=fitted.predict(example),
                    registered_model_name="finpipe-market",
                )
            mlmodels = list((tmp_path / "other" / "mlartifacts").rglob("MLmodel"))
            assert len(mlmodels) == 1
            text = mlmodels[0].read_text()
            assert "loader: finpipe.market.model:FittedMarketModel" in text
            mlmodels[0].write_text(text.replace("loader: finpipe.market.model:", "loader: os:"))
            with pytest.raises(
                ScoringError, match="names loader 'os:.*loads only its own classes and those of"
            ):
                tracking.load_model_version(other, "market", version="1")
    finally:
        mlflow.set_tracking_uri(settings.tracking_uri)


def test_run_summary_is_a_prefect_markdown_artifact(two_nights):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, files, summaries, _ = two_nights
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["nightly-market-summary"]))
        )
    day = _day(files[2]).isoformat()
    # Night 2's own run (the idempotency test re-runs that date later without training).
    night2 = [a for a in artifacts if f"as of {day}" in a.data and "## Training" in a.data]
    latest = max(night2, key=lambda a: a.created)
    assert latest.type == "markdown"
    text = latest.data
    assert f"# finpipe nightly: market as of {day}" in text
    assert f"| {files[2].name} | validated |" in text
    assert "| mlp |" in text and "| gru |" in text and "test rank_ic" in text
    assert summaries[1]["promotion"]["reason"] in text
    assert f"{summaries[1]['predictions']['rows']:,} rows for {day}" in text


def test_a_history_start_date_bounds_the_training_window(two_nights):
    """`history_start` (the nightly's and train's form field, `--history-start`) keeps the
    dates before it out of training; with `history_dates`, the later start applies."""
    from finpipe.flows.parameters import training_overrides

    from finpipe.market.pipeline import MarketParts
    from finpipe.planning import training_config

    settings, files, _, _ = two_nights
    storage = Storage(settings.home)
    as_of = _day(files[-1])
    days = storage.partition_dates("features", "market", end=as_of)
    start = days[len(days) // 2]
    market = MarketParts()

    def first_trained(history_dates, history_start):
        overrides = training_overrides({}, history_dates, history_start)
        config = training_config("market", overrides)
        night = market.prepare_training(storage, as_of, config, lambda: None)
        return night.frame["date"].min().date()

    assert first_trained(0, None) == days[0]
    assert first_trained(0, start) == start
    assert first_trained(len(days) // 4, start) > start  # the later of the two starts
    assert first_trained(len(days), start) == start
