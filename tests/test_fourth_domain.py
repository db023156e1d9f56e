"""The domain seam is real: a toy regression domain, defined here and nowhere else, registers
itself and runs through the real nightly flow (Prefect local mode, MLflow SQLite, Parquet)
with no edit to the flows, tasks, settings or CLI."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from pydantic import BaseModel, Field

from finpipe import lifecycle, tracking
from finpipe.domains import (
    ChallengerOutcome,
    DemoNight,
    get_domain,
    register_domain,
    unregister_domain,
)
from finpipe.errors import ModelRejected
from finpipe.features import FeatureUpdate, update_day_features
from finpipe.ingest import RawContract
from finpipe.lifecycle import Candidate, EpochLogger, ModelScore, Predict, Predictions, RunRecord
from finpipe.settings import Settings
from finpipe.storage import Storage
from finpipe.tracking import RegisteredModel
from tests.conftest import finpipe_home

pytestmark = [pytest.mark.flow, pytest.mark.slow]

NAME = "toy"
KEYS = ["date", "id"]


# -- the toy domain: y = 2x + 1 + noise, one row per id and business day --------------------
def _normalise(frame: pd.DataFrame, source: str = "") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "date": pd.to_datetime(frame["date"], errors="coerce"),
            "id": frame["id"].astype(str),
            "x": pd.to_numeric(frame["x"], errors="coerce"),
            "y": pd.to_numeric(frame["y"], errors="coerce"),
        }
    )


def _suite(storage: Storage) -> dict:
    """The toy's suite, built in memory (`RawContract.suite_spec`): a domain defined outside
    finpipe has no file in finpipe's `expectations/`. `meta.domain` names it in messages."""
    rules = [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": column}}
        for column in ("date", "id", "x")
    ]
    return {"name": "toy_rows", "meta": {"domain": NAME}, "expectations": rules}


def _features(validated: pd.DataFrame) -> pd.DataFrame:
    """A toy feature row is its validated row: it depends on its own day only."""
    return validated[[*KEYS, "x", "y"]]


CONTRACT = RawContract(
    domain=NAME,
    suite="toy_rows",
    key_columns=("date", "id"),
    date_column="date",
    normalise=_normalise,
    suite_spec=_suite,
)


class ToyConfig(BaseModel):
    models: list[str] = Field(default_factory=lambda: ["ols", "mean"])
    promotion_metric: str = "r2"


@dataclass
class ToyOutcome(ChallengerOutcome):
    test_start: str
    test_end: str


class ToyModel:
    """y = a + b x, saved as JSON (b = 0: the mean baseline)."""

    def __init__(self, intercept: float, slope: float) -> None:
        self.intercept, self.slope = intercept, slope

    @classmethod
    def fit(cls, kind: str, rows: pd.DataFrame) -> ToyModel:
        if kind == "mean":
            return cls(float(rows["y"].mean()), 0.0)
        slope, intercept = np.polyfit(rows["x"], rows["y"], 1)
        return cls(float(intercept), float(slope))

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        values = self.intercept + self.slope * frame["x"].to_numpy(dtype=float)
        return frame[KEYS].assign(prediction=values).reset_index(drop=True)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "toy.json").write_text(json.dumps([self.intercept, self.slope]))

    @classmethod
    def load(cls, directory: Path) -> ToyModel:
        return cls(*json.loads((directory / "toy.json").read_text()))


def _r2(rows: pd.DataFrame, predicted: pd.DataFrame) -> float:
    y, p = rows["y"].to_numpy(), predicted["prediction"].to_numpy()
    return float(1 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2))


@dataclass
class ToyNight:
    frame: pd.DataFrame
    windows: dict[str, pd.DataFrame]
    config: ToyConfig

    @property
    def promotion_metric(self) -> str:
        return self.config.promotion_metric

    def context(self) -> RunRecord:
        return RunRecord(params={"rows": len(self.frame)})

    def candidates(self) -> list[str]:
        return list(self.config.models)

    def fit(self, kind: str, on_epoch: EpochLogger, say: Callable[[str], None]) -> Candidate:
        model = ToyModel.fit(kind, self.windows["train"])
        scores = {
            window: {"r2": _r2(rows, model.predict(rows))}
            for window, rows in self.windows.items()
            if window != "train"
        }
        test = self.windows["test"]
        return Candidate(
            model=model,
            loader=f"{__name__}:ToyModel",
            input_example=test[[*KEYS, "x"]].head(3),
            windows=scores,
            record=RunRecord(params={"kind": kind}),
            test_predictions=model.predict(test)["prediction"].to_numpy(),
        )

    def conclude(self, fitted: Mapping[str, Candidate], say: Callable[[str], None]) -> RunRecord:
        return RunRecord()

    def outcome(self, challenger: ChallengerOutcome) -> ToyOutcome:
        test = self.windows["test"]["date"]
        return ToyOutcome(
            **challenger.to_dict(),
            test_start=str(test.min().date()),
            test_end=str(test.max().date()),
        )


@dataclass(frozen=True)
class ToyParts:
    name: str = NAME
    contract: RawContract = CONTRACT
    training_config: type[ToyConfig] = ToyConfig
    training_outcome: type[ToyOutcome] = ToyOutcome
    selection_metric: str = "r2"
    nested_runs: bool = True
    scores_history: bool = False

    @property
    def feature_definition(self) -> dict[str, object]:
        return {}

    def update_features(
        self,
        storage: Storage,
        as_of: dt.date,
        *,
        rebuild: bool,
        progress: Callable[[str], None] | None,
        also: Collection[dt.date] = (),
    ) -> FeatureUpdate:
        # Features of a day from that day's rows only: the shared step builds new dates,
        # rebuilds those a correction restated and removes those it retracted whole; every
        # validated date has features after it, so `also` asks for none more.
        return update_day_features(
            storage, NAME, as_of, _features, rebuild=rebuild, progress=progress
        )

    def prepare_training(
        self,
        storage: Storage,
        as_of: dt.date,
        config: ToyConfig,
        champion: Callable[[], RegisteredModel | None],
    ) -> ToyNight:
        frame = storage.read_partitions("features", NAME, end=as_of)
        days = np.sort(frame["date"].unique())
        cut = [days[int(len(days) * 0.6)], days[int(len(days) * 0.8)]]
        windows = {
            "train": frame[frame["date"] < cut[0]],
            "validation": frame[(frame["date"] >= cut[0]) & (frame["date"] < cut[1])],
            "test": frame[frame["date"] >= cut[1]],
        }
        return ToyNight(frame, windows, config)

    def promotion_scorer(
        self,
        storage: Storage,
        outcome: ToyOutcome,
        champion: Callable[[], RegisteredModel | None],
    ) -> ModelScore:
        test = storage.read_partitions("features", NAME, outcome.test_start, outcome.test_end)
        return lambda model: _r2(test, model.predict(test))

    def prepare_scoring(self, storage: Storage, as_of: dt.date) -> Predict:
        rows = storage.read_partition("features", NAME, as_of)
        return lambda model: Predictions(model.predict(rows)[["id", "prediction"]], ["id"])

    def plan_demo(self, settings: Settings) -> list[DemoNight]:
        return []


# -- the test --------------------------------------------------------------------------------
def _deliveries(folder: Path) -> list[Path]:
    """A history file of 40 business days and two daily files, 20 ids a day."""
    rng = np.random.default_rng(0)
    days = pd.bdate_range("2024-01-01", periods=42)
    frame = pd.DataFrame(
        [(day.date().isoformat(), f"id{i:02d}") for day in days for i in range(20)],
        columns=["date", "id"],
    )
    frame["x"] = rng.normal(size=len(frame))
    frame["y"] = 2 * frame["x"] + 1 + rng.normal(scale=0.3, size=len(frame))
    folder.mkdir(parents=True)
    files = []
    for name, part in [
        ("toy_history.csv", frame[frame["date"] < days[40].date().isoformat()]),
        (f"toy_{days[40].date()}.csv", frame[frame["date"] == days[40].date().isoformat()]),
        (f"toy_{days[41].date()}.csv", frame[frame["date"] == days[41].date().isoformat()]),
    ]:
        part.to_csv(folder / name, index=False)
        files.append(folder / name)
    return files


@pytest.fixture
def toy_domain():
    register_domain(lifecycle.bind(ToyParts()))
    yield get_domain(NAME)
    unregister_domain(NAME)


def test_a_fourth_domain_runs_through_the_real_nightly_flow(tmp_path, toy_domain):
    from finpipe.flows.nightly import nightly

    files = _deliveries(tmp_path / "drop")
    first_day, second_day = (dt.date.fromisoformat(f.stem.removeprefix("toy_")) for f in files[1:])
    with finpipe_home(tmp_path / "home") as settings:
        first = nightly(domain=NAME, as_of=first_day, inputs=[str(files[0]), str(files[1])])
        second = nightly(domain=NAME, as_of=second_day, inputs=[str(files[2])])
        # A retrain of the first night, after the second's: its test window is data the
        # champion (trained as of the second day) may have learnt from, so it is not promoted.
        # It starts while an ingest holds the history lock: it reads (and stamps the time its
        # data was known at) once the ingest has published.
        home = Storage(settings.home)
        with _history_held_for(home, seconds=0.5) as released:
            again = toy_domain.train(home, settings, first_day)
        rerun = toy_domain.promote(home, settings, again)
        # A chosen candidate whose test predictions are constant is never registered.
        with pytest.raises(ModelRejected, match="mean: predictions are constant"):
            toy_domain.train(
                home, settings, second_day, toy_domain.training_config(models=["mean"])
            )

    storage = Storage(settings.home)
    assert storage.partition_dates("predictions", NAME) == [first_day, second_day]
    predictions = storage.read_partition("predictions", NAME, second_day)
    assert list(predictions.columns) == [
        "date",
        "id",
        "prediction",
        "model_name",
        "model_version",
        "run_id",
        "scored_at",
    ]
    assert len(predictions) == 20 and predictions["id"].is_unique
    x = storage.read_partition("features", NAME, second_day).set_index("id")["x"]
    fitted = 1 + 2 * x.reindex(predictions["id"]).to_numpy()
    assert np.allclose(predictions["prediction"], fitted, atol=0.2)  # the OLS line, not the mean

    assert first["training"]["candidate"] == "ols"
    assert first["promotion"]["promoted"] is True
    assert second["promotion"]["champion_version"] == first["training"]["challenger_version"]
    champion_version = str(second["training"]["challenger_version"])
    assert second["promotion"]["promoted"] is True, second["promotion"]["reason"]
    assert (rerun.promoted, rerun.champion_version) == (False, champion_version)
    assert rerun.reason.startswith(
        f"champion v{champion_version} was trained as of {second_day}, after challenger "
        f"v{again.challenger_version}'s {first_day}"
    )
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient()
    champion = client.get_model_version_by_alias("finpipe-toy", "champion")
    assert set(predictions["model_version"]) == {str(champion.version)}
    assert set(predictions["run_id"]) == {champion.run_id}
    experiment = client.get_experiment_by_name("finpipe-toy")
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(r.data.tags["mlflow.runName"] for r in runs)
    nights = [f"nightly-{first_day}", f"nightly-{first_day}", f"nightly-{second_day}"]
    refused = [f"nightly-{second_day}", "mean"]  # the refused night's runs stay: it failed
    assert names == sorted(["mean", "mean", "mean", "ols", "ols", "ols", *nights, *refused])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    last = max(parents, key=lambda r: r.info.start_time)
    assert last.data.tags["mlflow.runName"] == f"nightly-{second_day}"
    assert last.info.status == "FAILED"
    ols = next(r for r in runs if r.data.tags["mlflow.runName"] == "ols")
    assert {"validation_r2", "test_r2"} <= set(ols.data.metrics)
    # The registry records each decision on its version; the data's moment is after the lock.
    assert champion.tags["promotion"] == "promoted"
    kept = client.get_model_version("finpipe-toy", again.challenger_version)
    assert kept.tags["promotion"] == "kept"
    assert champion.tags["promotion_reason"] == second["promotion"]["reason"]
    assert kept.tags["promotion_reason"] == rerun.reason
    versions = client.search_model_versions("name = 'finpipe-toy'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]  # none for the constant one
    assert str(client.get_model_version_by_alias("finpipe-toy", "challenger").version) == "3"
    known_at = client.get_run(again.run_id).data.tags[tracking.DATA_KNOWN_AT_TAG]
    assert dt.datetime.fromisoformat(known_at) >= released[0]


@contextmanager
def _history_held_for(storage: Storage, seconds: float) -> Iterator[list[dt.datetime]]:
    """Hold the toy domain's history lock from another thread for `seconds`, as an ingest
    would; yield a list that gets the moment it was released."""
    from finpipe.locks import history_lock

    held, released = threading.Event(), []

    def ingest() -> None:
        with history_lock(storage.url, NAME, holder="an ingest", timeout=10):
            held.set()
            time.sleep(seconds)
            released.append(dt.datetime.now(dt.UTC))

    thread = threading.Thread(target=ingest)
    thread.start()
    held.wait(10)
    try:
        yield released
    finally:
        thread.join()


def test_a_correction_reaches_the_toy_domains_features_and_predictions(tmp_path, toy_domain):
    """A vendor correction that restates a row of a scored date and retracts an earlier date
    whole: the backfill that loads it scores the restated row from its new value, and the
    retracted date's features are gone (they would train the next night otherwise)."""
    from finpipe.flows.backfill import backfill
    from finpipe.flows.nightly import nightly

    files = _deliveries(tmp_path / "drop")
    first_day = dt.date.fromisoformat(files[1].stem.removeprefix("toy_"))
    retracted_day = pd.bdate_range(end=first_day, periods=2)[0].date()
    fix = tmp_path / "drop" / "toy_fix.csv"
    restated = [(first_day.isoformat(), "id00", 10.0, 21.0, "false")]
    retracted = [(retracted_day.isoformat(), f"id{i:02d}", None, None, "true") for i in range(20)]
    columns = ["date", "id", "x", "y", "retracted"]
    pd.DataFrame([*restated, *retracted], columns=columns).to_csv(fix, index=False)
    with finpipe_home(tmp_path / "home") as settings:
        nightly(domain=NAME, as_of=first_day, inputs=[str(files[0]), str(files[1])])
        result = backfill(domain=NAME, start=retracted_day, end=first_day, corrections=(str(fix),))

    storage = Storage(settings.home)
    assert result["features"]["dates_written"] == [first_day.isoformat()]
    assert result["features"]["dates_removed"] == [retracted_day.isoformat()]
    assert [(d["date"], d["status"]) for d in result["dates"]] == [
        (retracted_day.isoformat(), "no data"),
        (first_day.isoformat(), "completed"),
    ]
    assert retracted_day not in storage.partition_dates("features", NAME)
    features = storage.read_partition("features", NAME, first_day).set_index("id")
    assert (features.loc["id00", "x"], features.loc["id00", "y"]) == (10.0, 21.0)
    predictions = storage.read_partition("predictions", NAME, first_day).set_index("id")
    assert len(predictions) == 20
    assert predictions.loc["id00", "prediction"] == pytest.approx(21.0, abs=0.5)  # 1 + 2 * 10


def test_training_reads_its_data_under_the_history_lock(tmp_path, toy_domain, monkeypatch):
    """An ingest or a feature update (which hold the domain's history lock) cannot land halfway
    through the read of a training set: training holds the lock while it reads."""

    from finpipe.errors import NothingToTrain
    from finpipe.locks import LockTimeout, history_lock

    seen: list[str] = []

    def prepare_training(self, storage, as_of, config, champion):
        def try_the_lock() -> None:  # as a concurrent ingest would, from another thread
            try:
                with history_lock(storage.url, NAME, holder="an ingest", timeout=0):
                    seen.append("free")
            except LockTimeout as busy:
                seen.append(str(busy))

        other = threading.Thread(target=try_the_lock)
        other.start()
        other.join()
        raise NothingToTrain("read")

    monkeypatch.setattr(ToyParts, "prepare_training", prepare_training)
    with finpipe_home(tmp_path / "home") as settings, pytest.raises(NothingToTrain):
        toy_domain.train(Storage(settings.home), settings, "2024-03-01", holder="a retrain")
    assert len(seen) == 1 and "a retrain" in seen[0], seen
