"""The customers nightly flow end to end (Prefect, SQLite MLflow, Parquet): synthetic and CDNOW."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from finpipe.customers.features import mix_feature_name
from finpipe.customers.pipeline import plan_customers_demo, write_planted_segments
from finpipe.customers.synthetic import (
    CATEGORIES,
    CustomersSyntheticConfig,
    generate_customer_transactions,
    write_vendor_files,
)
from finpipe.errors import ConfigError, ScoringError, ValidationFailed
from finpipe.storage import Storage
from tests.conftest import finpipe_home
from tests.test_layout_readers import assert_layer_reads_everywhere

pytestmark = pytest.mark.slow

PREDICTION_COLUMNS = [
    "date",
    "customer_id",
    "segment",
    "segment_name",
    "distance_to_centroid",
    "model_name",
    "model_version",
    "run_id",
    "scored_at",
]


def _day(path) -> dt.date:
    return dt.date.fromisoformat(path.stem.removeprefix("customers_"))


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory):
    """Two consecutive nights on a synthetic log with planted segments."""
    from finpipe.flows.nightly import nightly

    root = tmp_path_factory.mktemp("customers")
    generated = generate_customer_transactions(
        CustomersSyntheticConfig(customers=600, days=450, seed=1)
    )
    files = write_vendor_files(generated.transactions, root / "drop", daily_files=2)
    with finpipe_home(root / "home") as settings:
        write_planted_segments(Storage(settings.home), generated.segments)
        first = nightly(
            domain="customers", as_of=_day(files[1]), inputs=[str(files[0]), str(files[1])]
        )
        second = nightly(domain="customers", as_of=_day(files[2]), inputs=[str(files[2])])
        yield settings, files, [first, second], generated


def test_every_layer_is_written(two_nights):
    settings, files, summaries, generated = two_nights
    storage = Storage(settings.home)
    assert (
        len(storage.partition_dates("validated", "customers"))
        == generated.transactions["date"].nunique()
    )
    assert storage.partition_dates("features", "customers") == [_day(files[1]), _day(files[2])]
    predictions = storage.read_partition("predictions", "customers", _day(files[2]))
    assert list(predictions.columns) == PREDICTION_COLUMNS
    snapshot = storage.read_partition("features", "customers", _day(files[2]))
    assert predictions["customer_id"].tolist() == sorted(snapshot["customer_id"])
    assert predictions["segment"].nunique() == summaries[1]["training"]["segments"]
    assert (predictions["distance_to_centroid"] >= 0).all()
    assert (predictions["model_name"] == "finpipe-customers").all()


def test_every_layer_opens_in_pandas_pyarrow_polars_and_duckdb(two_nights):
    settings, *_ = two_nights
    for layer in ("validated", "features", "predictions", "segments"):
        assert_layer_reads_everywhere(Storage(settings.home), layer, "customers")


def test_each_night_publishes_its_segment_profiles_and_every_row_carries_its_name(two_nights):
    settings, files, _, _ = two_nights
    storage = Storage(settings.home)
    nights = [_day(files[1]), _day(files[2])]
    assert storage.partition_dates("segments", "customers") == nights
    for night in nights:
        profiles = storage.read_partition("segments", "customers", night)
        predictions = storage.read_partition("predictions", "customers", night)
        assert profiles["segment_name"].is_unique
        assert (profiles["date"] == pd.Timestamp(night)).all()
        for provenance in ("model_name", "model_version", "run_id"):
            assert set(profiles[provenance]) == set(predictions[provenance]), provenance
        by_id = profiles.set_index("segment")
        assert by_id["customers"].to_dict() == predictions.groupby("segment").size().to_dict()
        named = predictions["segment"].map(by_id["segment_name"])
        assert named.notna().all()
        assert (predictions["segment_name"] == named).all()
        assert {"median_recency_days", "percentile_frequency", "share"} <= set(profiles.columns)
        # the synthetic log delivers a category on every purchase: each segment has a top one
        slugs = {
            mix_feature_name("category", c).removeprefix("category_share_") for c in CATEGORIES
        }
        assert set(profiles["top_category"]) <= slugs
        assert profiles["top_category_share"].between(0, 1, inclusive="right").all()


def test_champion_registered_and_named_on_every_prediction(two_nights):
    settings, files, summaries, _ = two_nights
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient()
    champion = client.get_model_version_by_alias("finpipe-customers", "champion")
    assert summaries[0]["promotion"]["promoted"] is True
    assert summaries[1]["promotion"]["champion_version"] == "1"
    predictions = Storage(settings.home).read_partition("predictions", "customers", _day(files[2]))
    assert set(predictions["model_version"]) == {str(champion.version)}
    assert set(predictions["run_id"]) == {champion.run_id}


def test_the_logged_input_example_names_no_customer_and_the_pyfunc_segments_it(two_nights):
    settings, _, _, generated = two_nights
    mlflow.set_tracking_uri(settings.tracking_uri)
    served = mlflow.pyfunc.load_model("models:/finpipe-customers@champion")
    example = served.input_example
    assert example["customer_id"].tolist() == [f"example-{n}" for n in range(1, 6)]
    assert not set(example["customer_id"]) & set(generated.transactions["customer_id"].astype(str))
    segmented = served.predict(example)
    assert segmented["customer_id"].tolist() == example["customer_id"].tolist()
    assert segmented["segment"].notna().all()
    names = served.metadata.get_input_schema().input_names()
    assert names == list(example.columns)
    logged = MlflowClient().search_logged_models(
        [mlflow.get_experiment_by_name("finpipe-customers").experiment_id]
    )
    assert {m.name for m in logged} == {"customers-autoencoder_kmeans"}


def test_segments_match_the_planted_ones_and_survive_the_retrain(two_nights):
    _, _, summaries, _ = two_nights
    first, second = (s["training"]["metrics"]["autoencoder_kmeans"]["test"] for s in summaries)
    assert first["ari_vs_planted"] >= 0.8
    assert second["ari_vs_planted"] >= 0.8
    assert second["same_segment_vs_champion"] >= 0.9
    assert second["same_segment_vs_previous_night"] >= 0.9
    assert "same_segment_vs_champion" not in first  # nothing to compare the first model with
    # the promotion floor each night states (the suite switches its use off, not its figures)
    floors = [
        {
            k: v
            for k, v in s["training"]["metrics"]["autoencoder_kmeans"]["validation"].items()
            if "_floor_" in k
        }
        for s in summaries
    ]
    assert floors == [
        {"silhouette_floor_minimum": 0.1},
        {"silhouette_floor_minimum": 0.1, "same_segment_vs_champion_floor_stability": 0.6},
    ]


def test_mlflow_has_silhouettes_profiles_and_plots(two_nights):
    settings, _, summaries, _ = two_nights
    run_id = summaries[1]["training"]["run_id"]
    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(run_id)
    for k in range(2, 9):
        assert f"silhouette_k{k}" in run.data.metrics
    for name in ("test_silhouette", "test_davies_bouldin", "test_ari_vs_champion"):
        assert name in run.data.metrics, name
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"segment_profiles.json", "promotion.json", "feature_columns.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {
        "plots/segment_map.png",
        "plots/silhouette_by_k.png",
        "plots/learning_curve.png",
    }
    table = json.loads(
        (settings.home / "mlartifacts" / run_id / "artifacts" / "segment_profiles.json").read_text()
    )
    profiles = pd.DataFrame(table["data"], columns=table["columns"])
    assert profiles["customers"].sum() == summaries[1]["training"]["customers"]
    assert {"median_recency_days", "median_frequency", "median_monetary_total"} <= set(
        profiles.columns
    )
    decision = json.loads(
        (settings.home / "mlartifacts" / run_id / "artifacts" / "promotion.json").read_text()
    )
    assert decision["metric"] == "silhouette"


def test_scoring_copes_with_a_category_nobody_buys_any_more(two_nights, caplog):
    from finpipe.domains import get_domain

    settings, files, _, _ = two_nights
    score_customers = get_domain("customers").score
    storage = Storage(settings.home)
    snapshot = storage.read_partition("features", "customers", _day(files[2]))
    gone = "category_share_travel"
    later = _day(files[2]) + dt.timedelta(days=30)
    storage.write_partition("features", "customers", later, snapshot.drop(columns=[gone]))
    mlflow_log = logging.getLogger("mlflow")
    mlflow_log.addHandler(caplog.handler)  # MLflow's own handler does not propagate
    try:
        with caplog.at_level(logging.WARNING, logger="mlflow"):
            score_customers(storage, settings, later)
        assert not [r.getMessage() for r in caplog.records if r.name.startswith("mlflow")]
        scored = storage.read_partition("predictions", "customers", later)
        zeroed = snapshot.assign(**{gone: 0.0})
        storage.write_partition("features", "customers", later, zeroed)
        score_customers(storage, settings, later)
        expected = storage.read_partition("predictions", "customers", later)
        pd.testing.assert_frame_equal(
            scored.drop(columns="scored_at"), expected.drop(columns="scored_at")
        )
        storage.write_partition("features", "customers", later, snapshot.drop(columns="frequency"))
        with pytest.raises(ScoringError, match="frequency"):
            score_customers(storage, settings, later)
    finally:
        mlflow_log.removeHandler(caplog.handler)
        for layer in ("features", "predictions", "segments"):
            shutil.rmtree(storage.partition_dir(layer, "customers", later), ignore_errors=True)


def test_a_champion_that_cannot_segment_today_still_passes_on_the_ids_its_line_issued(
    two_nights,
):
    """Without the champion's view of today's snapshot the retrain numbers its segments
    afresh, from the champion line's next_id: ids its line retired are not issued again."""
    from types import SimpleNamespace

    from finpipe.customers.config import load_customers_config
    from finpipe.customers.contract import customers_contract
    from finpipe.customers.model import CustomersTrainingConfig
    from finpipe.customers.pipeline import CustomersParts

    settings, files, _, _ = two_nights

    def unreadable(snapshot):
        raise KeyError("frequency")

    champion = SimpleNamespace(
        version="9", model=SimpleNamespace(next_id=7, k=3), predict=unreadable
    )
    config = load_customers_config("synthetic")
    parts = CustomersParts(
        config=config, contract=customers_contract(config), update_features=lambda *a: None
    )
    night = parts.prepare_training(
        Storage(settings.home), _day(files[2]), CustomersTrainingConfig(), lambda: champion
    )
    assert night.champion is None and night.next_id == 7


def test_rerunning_a_date_is_idempotent(two_nights):
    from finpipe.flows.nightly import nightly

    settings, files, _, _ = two_nights
    storage = Storage(settings.home)
    day = _day(files[2])
    before = storage.read_partition("predictions", "customers", day)
    with finpipe_home(settings.home):
        summary = nightly(domain="customers", as_of=day, inputs=[str(files[2])], retrain=False)
    assert summary["ingested"][0]["status"] == "already_loaded"
    after = storage.read_partition("predictions", "customers", day)
    pd.testing.assert_frame_equal(before.drop(columns="scored_at"), after.drop(columns="scored_at"))


def test_bad_batch_is_quarantined_and_nothing_downstream_is_written(two_nights, tmp_path):
    from finpipe.flows.nightly import nightly

    settings, files, _, _ = two_nights
    storage = Storage(settings.home)
    next_day = _day(files[2]) + dt.timedelta(days=1)
    rows = pd.read_csv(files[2], dtype=str)
    rows["Transaction Time"] = f"{next_day} 12:00:00"
    rows.loc[:1, "Customer ID"] = ""
    path = tmp_path / f"customers_{next_day}.csv"
    rows.to_csv(path, index=False)
    layers = {
        layer: storage.partition_dates(layer, "customers")
        for layer in ["validated", "features", "predictions", "segments"]
    }
    with finpipe_home(settings.home), pytest.raises(ValidationFailed) as caught:
        nightly(domain="customers", as_of=next_day, inputs=[str(path)], retrain=False)
    assert "expect_column_values_to_not_be_null(customer_id)" in str(caught.value)
    report = json.loads((settings.home / caught.value.quarantine_path / "report.json").read_text())
    failed = [r for r in report["rules"] if not r["success"]]
    assert [r["unexpected_count"] for r in failed] == [2]
    for layer, dates in layers.items():
        assert storage.partition_dates(layer, "customers") == dates, layer


def test_a_correction_of_an_earlier_day_names_its_scored_snapshot_and_a_backfill_redoes_it(
    two_nights, tmp_path
):
    """A snapshot reads every transaction up to its day: a correction of night 1's day, loaded
    on night 2, rebuilds both snapshots; night 2 is re-scored, night 1 is named stale with the
    backfill that re-scores it, and that backfill does (the restated customer's spend moves)."""
    from finpipe.flows.backfill import backfill
    from finpipe.flows.nightly import nightly

    settings, files, _, _ = two_nights
    home = tmp_path / "home"  # a copy: the module's other tests read the two nights as run
    shutil.copytree(settings.home, home)
    storage = Storage(home)
    first, second = _day(files[1]), _day(files[2])
    restated = pd.read_csv(files[1]).head(1)
    restated["Amount"] = restated["Amount"] * 10
    path = tmp_path / "restated.csv"
    restated.to_csv(path, index=False)
    customer = str(restated["Customer ID"].iloc[0])
    before = storage.read_partition("features", "customers", first)
    with finpipe_home(home):
        summary = nightly(domain="customers", as_of=second, corrections=[str(path)], retrain=False)
        assert summary["features"]["dates_written"] == [first.isoformat(), second.isoformat()]
        assert summary["stale_predictions"] == {
            "dates": [first.isoformat()],
            "removed": [],
            "backfill": f"finpipe run backfill --domain customers --start {first} --end {first}",
        }
        redone = backfill(domain="customers", start=first, end=second)
    statuses = {item["date"]: item["status"] for item in redone["dates"]}
    assert statuses == {first.isoformat(): "completed", second.isoformat(): "done earlier"}
    after = storage.read_partition("features", "customers", first)
    spend = {
        name: frame.loc[frame["customer_id"].astype(str) == customer, "monetary_total"].item()
        for name, frame in (("before", before), ("after", after))
    }
    assert spend["after"] > spend["before"]


def test_a_backfill_over_days_no_night_ran_builds_their_snapshots_and_scores_them(
    two_nights, tmp_path
):
    """Snapshots exist for the nights that ran; a backfill of the three days before the first
    night builds each day's snapshot and scores it with the champion, as those nights would."""
    from finpipe.flows.backfill import backfill
    from finpipe.flows.score import score

    settings, files, _, _ = two_nights
    home = tmp_path / "home"
    shutil.copytree(settings.home, home)
    storage = Storage(home)
    first = _day(files[1])
    earlier = [d for d in storage.partition_dates("validated", "customers") if d < first][-3:]
    assert not set(earlier) & set(storage.partition_dates("features", "customers"))
    with finpipe_home(home):
        summary = backfill(domain="customers", start=earlier[0], end=earlier[-1])
    assert summary["features"]["dates_written"] == [d.isoformat() for d in earlier]
    statuses = {item["date"]: item["status"] for item in summary["dates"]}
    assert {statuses[d.isoformat()] for d in earlier} == {"completed"}
    for day in earlier:
        predictions = storage.read_partition("predictions", "customers", day)
        snapshot = storage.read_partition("features", "customers", day)
        assert sorted(predictions["customer_id"]) == sorted(snapshot["customer_id"])
    # The score flow on one more day no night ran builds that day's snapshot the same way.
    before = [d for d in storage.partition_dates("validated", "customers") if d < earlier[0]]
    with finpipe_home(home):
        scored = score(domain="customers", as_of=before[-1])
    assert scored["status"] == "completed"
    assert storage.partition_rows("predictions", "customers", before[-1]) == len(
        storage.read_partition("features", "customers", before[-1])
    )


def test_a_night_catches_up_a_missed_day_with_that_days_own_snapshot(two_nights, tmp_path):
    """Two more days delivered, the night of the first missed: the next night builds the missed
    day's snapshot as well as its own and scores both, the missed one first."""
    from finpipe.flows.nightly import nightly

    settings, files, _, _ = two_nights
    home = tmp_path / "home"
    shutil.copytree(settings.home, home)
    second = pd.Timestamp(_day(files[2]))
    last = pd.read_csv(files[2])
    days, delivered = [], []
    for offset in (1, 2):  # the next two business days, each the last day's purchases again
        day = second + pd.offsets.BDay(offset)
        rows = last.assign(
            **{"Transaction Time": pd.to_datetime(last["Transaction Time"]) + (day - second)}
        )
        path = tmp_path / f"customers_{day.date()}.csv"
        rows.to_csv(path, index=False, date_format="%Y-%m-%d %H:%M:%S")
        days.append(day.date().isoformat())
        delivered.append(str(path))
    with finpipe_home(home):
        summary = nightly(domain="customers", as_of=days[1], inputs=delivered, retrain=False)
    assert [(item["date"], item["status"]) for item in summary["catch_up"]] == [
        (days[0], "completed")
    ]
    assert summary["features"]["dates_written"] == days
    storage = Storage(home)
    for day in days:
        assert len(storage.read_partition("predictions", "customers", day)) == len(
            storage.read_partition("features", "customers", day)
        )


def test_cdnow_sample_runs_nightly(tmp_path, shared_datasets, monkeypatch):
    from finpipe.flows.nightly import nightly

    monkeypatch.setenv("FINPIPE_CUSTOMERS_CONFIG", "cdnow")
    with finpipe_home(tmp_path / "home") as settings:
        summary = nightly(
            domain="customers",
            as_of=dt.date(1998, 6, 30),
            inputs=[str(shared_datasets / "CDNOW_sample.txt")],
            training={"max_epochs": 40},  # quality is not what this test checks
        )
    assert summary["ingested"][0]["rows"] == 6919
    assert summary["predictions"]["rows"] == 2357  # active_days = 730: the whole cohort
    assert summary["promotion"]["promoted"] is True
    # The cdnow config maps neither column: said as information, no warning.
    assert summary["features"]["skipped_features"] == {}
    assert summary["features"]["unsourced_features"] == {
        "category_share_*": "the source's config maps no category column",
        "channel_share_*": "the source's config maps no channel column",
    }
    predictions = Storage(settings.home).read_partition("predictions", "customers", "1998-06-30")
    assert list(predictions.columns) == PREDICTION_COLUMNS
    client = MlflowClient(settings.tracking_uri)
    champion = client.get_model_version_by_alias("finpipe-customers", "champion")
    assert set(predictions["model_version"]) == {str(champion.version)}
    profiles = Storage(settings.home).read_partition("segments", "customers", "1998-06-30")
    largest = profiles.loc[profiles["customers"].idxmax()]
    # the cohort's one-time buyers, long gone, are most of it (69-71% in every fit seen)
    assert largest["segment_name"] == "lapsed, one-off, low spend"
    assert largest["share"] > 0.5 and largest["median_frequency"] == 1
    test = summary["training"]["metrics"]["autoencoder_kmeans"]["test"]
    assert 2 <= test["segments"] <= 8 and test["silhouette"] > 0


def test_demo_plan_writes_synthetic_deliveries(tmp_path, monkeypatch):
    with finpipe_home(tmp_path / "home") as settings:
        nights = plan_customers_demo(settings, customers=50, days=120, nights=3)
        assert [len(n.inputs) for n in nights] == [2, 1, 1]
        assert nights[0].inputs[0].endswith(".csv.gz")
        assert (settings.home / "reference" / "customers" / "segments.parquet").exists()
        monkeypatch.setenv("FINPIPE_CUSTOMERS_CONFIG", "cdnow")
        from finpipe.settings import load_settings

        with pytest.raises(ConfigError, match="unset FINPIPE_CUSTOMERS_CONFIG"):
            plan_customers_demo(load_settings(), customers=50, days=120)
