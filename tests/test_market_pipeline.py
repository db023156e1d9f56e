"""Market pipeline steps through real storage: ingest, incremental features, labels, quality."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from finpipe import plots
from finpipe.errors import InputFileError, ValidationFailed
from finpipe.ingest import ingest_file
from finpipe.market import pipeline as market_pipeline
from finpipe.market.ensemble import fit_ensemble
from finpipe.market.features import build_market_features
from finpipe.market.pipeline import (
    MARKET_CONTRACT,
    MarketNight,
    MarketParts,
    MarketTrainingConfig,
    load_training_frame,
    train_market,
    update_market_features,
    write_oracle,
)
from finpipe.market.schema import normalise_market_frame
from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    write_vendor_files,
)
from finpipe.metrics import market_metrics
from finpipe.promotion import decide_promotion
from finpipe.storage import Storage
from finpipe.tracking import RegisteredModel
from finpipe.training import time_split
from tests.test_market_boosted import FEATURES, HORIZON, SMALL, _panel


@pytest.fixture(scope="module")
def delivery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drop")
    panel = generate_market_panel(MarketSyntheticConfig(tickers=15, days=320, seed=11))
    return panel, write_vendor_files(panel.prices, folder, daily_files=4)


def _ingest(storage: Storage, path) -> object:
    return ingest_file(storage, MARKET_CONTRACT, path, as_of="2099-01-01")


def test_incremental_nightly_features_equal_a_full_rebuild(tmp_path, delivery):
    _, files = delivery
    nightly, full = Storage(tmp_path / "nightly"), Storage(tmp_path / "full")
    _ingest(nightly, files[0])
    update_market_features(nightly, "2099-01-01")
    for daily in files[1:]:  # one new date per night, computed from its lookback only
        _ingest(nightly, daily)
        update = update_market_features(nightly, "2099-01-01")
        assert update.dates_written == [daily.stem.removeprefix("market_")]
        assert update.dates_rebuilt == []  # a new date, not one built again
    for path in files:
        _ingest(full, path)
    update_market_features(full, "2099-01-01", rebuild=True, block_dates=37)
    pd.testing.assert_frame_equal(
        nightly.read_partitions("features", "market"), full.read_partitions("features", "market")
    )
    again = update_market_features(nightly, "2099-01-01", rebuild=True, block_dates=37)
    assert again.dates_rebuilt == again.dates_written != []  # each had features before


def _paused_store(tmp_path, delivery, first: int, last: int):
    """A validated store of the panel with its first ticker not trading from session `first`
    to `last`; the store, the prices in it and the panel's sessions."""
    panel, _ = delivery
    prices = normalise_market_frame(panel.prices)
    dates = np.sort(prices["date"].unique())
    paused = prices["ticker"] == prices["ticker"].iloc[0]
    prices = prices[~(paused & prices["date"].between(dates[first], dates[last]))]
    storage = Storage(tmp_path)
    for stamp, rows in prices.groupby("date"):
        storage.write_partition("validated", "market", stamp.date(), rows)
    return storage, prices.reset_index(drop=True), dates


def test_blocks_carry_each_tickers_lookback_across_a_long_pause(tmp_path, delivery):
    """A ticker that stops trading for longer than a block still gets its features from its
    own last rows: block-by-block output equals the features of the whole panel at once."""
    storage, prices, _ = _paused_store(tmp_path, delivery, 120, 219)
    update_market_features(storage, "2099-01-01", rebuild=True, block_dates=23)
    expected = build_market_features(prices)
    actual = storage.read_partitions("features", "market")
    pd.testing.assert_frame_equal(actual, expected.reset_index(drop=True), check_dtype=False)


def test_a_nightly_after_a_long_pause_reads_back_to_the_tickers_last_rows(tmp_path, delivery):
    """A ticker that resumes after a pause longer than the nightly's read window gets the
    features a rebuild gives it, not NaN for want of its rows from before the pause."""
    storage, prices, dates = _paused_store(tmp_path, delivery, 100, 249)
    update_market_features(storage, pd.Timestamp(dates[259]).date())
    update = update_market_features(storage, pd.Timestamp(dates[279]).date())
    assert len(update.dates_written) == 20
    expected = build_market_features(prices[prices["date"] <= dates[279]])
    pd.testing.assert_frame_equal(
        storage.read_partitions("features", "market"),
        expected.reset_index(drop=True),
        check_dtype=False,
    )


def test_same_file_twice_is_loaded_once(tmp_path, delivery):
    _, files = delivery
    storage = Storage(tmp_path)
    first = _ingest(storage, files[1])
    second = _ingest(storage, files[1])
    assert (first.status, second.status) == ("validated", "already_loaded")
    assert len(storage.read_partitions("validated", "market")) == first.rows
    assert len(list(storage.landing_dir("market").iterdir())) == 1


def test_same_keys_in_another_file_are_rejected(tmp_path, delivery):
    _, files = delivery
    storage = Storage(tmp_path)
    _ingest(storage, files[1])
    copy = tmp_path / "resent.csv"
    copy.write_text(files[1].read_text().replace("\n", "\r\n"))  # same rows, other bytes
    with pytest.raises(ValidationFailed, match="duplicate_key_across_batches") as caught:
        _ingest(storage, copy)
    assert re.search(r"e\.g\. row 0: \{'date': '\d{4}-\d{2}-\d{2}', 'ticker'", str(caught.value))
    assert len(storage.read_partitions("validated", "market")) == _rows(files[1])


def _rows(path) -> int:
    return len(pd.read_csv(path))


def test_labels_never_reach_past_the_as_of_date(tmp_path, delivery):
    panel, files = delivery
    storage = Storage(tmp_path)
    for path in files:
        _ingest(storage, path)
    dates = sorted(panel.prices["date"].unique())
    as_of = pd.Timestamp(dates[-10]).date()
    update_market_features(storage, as_of)
    frame = load_training_frame(storage, as_of, horizon=5)
    assert frame["date"].max() == pd.Timestamp(as_of)
    labelled = frame.loc[frame["forward_return_5d"].notna(), "date"].max()
    assert labelled == pd.Timestamp(dates[-15])  # t + 5 rows <= as_of


def test_real_sample_ingests_with_adjusted_close(tmp_path, shared_datasets):
    storage = Storage(tmp_path)
    outcome = _ingest(storage, shared_datasets / "stocks_ohlcv.csv.gz")
    assert outcome.status == "validated"
    assert outcome.rows == 12154
    assert (outcome.first_date, outcome.last_date) == ("2000-03-01", "2013-03-01")
    update = update_market_features(storage, "2013-03-01")
    features = storage.read_partitions("features", "market", start="2000-06-21", end="2000-06-21")
    # The unadjusted 2:1 split of 2000-06-21 is not learned as a -50% day.
    aapl = features.set_index("ticker").loc["AAPL"]
    assert abs(aapl["return_1d"]) < 0.1
    assert update.rows == 12154


def test_real_sample_without_adjusted_close_is_quarantined_at_the_splits(tmp_path, shared_datasets):
    raw = pd.read_csv(shared_datasets / "stocks_ohlcv.csv.gz").drop(columns=["Adj Close"])
    path = tmp_path / "unadjusted.csv"
    raw.to_csv(path, index=False)
    storage = Storage(tmp_path / "root")
    with pytest.raises(ValidationFailed) as caught:
        _ingest(storage, path)
    assert "abs_log_return_1d_unadjusted" in str(caught.value)
    assert storage.partition_dates("validated", "market") == []
    quarantined = list(storage.quarantine_dir("market").iterdir())
    assert len(quarantined) == 1 and (quarantined[0] / "report.json").exists()
    assert (quarantined[0] / "data_docs" / "index.html").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"date;ticker;close\n2024-01-02;A;1\n", "not comma-separated"),
        (b"date,ticker\n2024-01-02,A\n", "missing required column"),
        (b"date,ticker,close\n2024-01-02,A,1\n\xff\xfe,B,2\n", "not UTF-8"),
    ],
)
def test_unreadable_files_are_quarantined_with_a_clear_message(tmp_path, content, message):
    path = tmp_path / "delivery.csv"
    path.write_bytes(content)
    storage = Storage(tmp_path / "root")
    with pytest.raises(ValidationFailed, match=message) as caught:
        _ingest(storage, path)
    assert "delivery.csv" in str(caught.value)
    assert (tmp_path / "root" / caught.value.quarantine_path / "report.json").exists()


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputFileError, match="no such file"):
        _ingest(Storage(tmp_path), tmp_path / "nope.csv")


@pytest.mark.slow
def test_models_reach_half_the_oracle_ic(tmp_path, home):
    """On the planted-signal panel the nets' test IC is at least half the oracle's."""
    panel = generate_market_panel(MarketSyntheticConfig(tickers=40, days=700, seed=7))
    files = write_vendor_files(panel.prices, tmp_path / "drop", daily_files=0)
    storage = Storage(home.home)
    write_oracle(storage, panel.expected_return)
    _ingest(storage, files[0])
    as_of = panel.prices["date"].max().date()
    update_market_features(storage, as_of)
    # Six epochs: the GRU's best validation epoch was 1-4 on panel seeds 7-9 (with 12 allowed,
    # seed 7 trained on to epoch 9 for nothing); the five-net MLP still reaches 0.69 and 0.67 of
    # the oracle's test IC on seeds 7 and 8 (0.93 with 12 epochs on seed 7), the GRU 1.14, 0.84.
    outcome = train_market(
        storage, home, as_of, MarketTrainingConfig(models=["mlp", "gru"], max_epochs=6)
    )
    for kind in ("mlp", "gru"):
        test = outcome.metrics[kind]["test"]
        assert test["oracle_ic"] > 0.08
        assert test["ic"] >= 0.5 * test["oracle_ic"], (kind, test["ic"], test["oracle_ic"])
    assert np.isfinite(outcome.metrics["mlp"]["test"]["rmse"])
    # The last labelled date is 5 rows before as_of: the test window ends there.
    assert dt.date.fromisoformat(outcome.test_end) < as_of
    # Each net's run records the rate it trained at: 37 batches an epoch, under the GRU's 100.
    import mlflow

    client = mlflow.MlflowClient(home.tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("finpipe-market").experiment_id],
        f"tags.mlflow.parentRunId = '{outcome.run_id}'",
    )
    rates = {run.info.run_name: run.data.metrics.get("learning_rate_applied") for run in runs}
    assert rates == {"mlp": 1e-3, "gru": 1e-3}, rates


def test_the_boosted_trees_are_registered_promoted_and_score_with_reasons(home, delivery):
    """lgbm, the gradient-boosted baseline, takes the nets' path: a run with its settings and
    importance, the registry, the promotion gate, scoring with reason codes, plain pyfunc."""
    import mlflow

    from finpipe import tracking
    from finpipe.market.boosted import FittedMarketBoostedTrees
    from finpipe.market.model import BoostedTreesConfig
    from finpipe.market.pipeline import promote_market, score_market

    panel, files = delivery
    storage = Storage(home.home)
    for path in files:
        _ingest(storage, path)
    as_of = panel.prices["date"].max().date()
    update_market_features(storage, as_of)
    trees = BoostedTreesConfig(num_leaves=4, min_leaf_fraction=0.02, max_rounds=80, patience=20)
    config = MarketTrainingConfig(models=["lgbm"], boosted_trees=trees)
    outcome = train_market(storage, home, as_of, config)
    assert outcome.candidate == "lgbm" and np.isfinite(outcome.metrics["lgbm"]["test"]["ic"])
    validation = outcome.metrics["lgbm"]["validation"]  # the floor it sets for every candidate
    assert validation["ic_floor_boosted_trees"] == pytest.approx(
        validation["ic"] - validation["ic_floor_standard_error"]
    )
    assert promote_market(storage, home, outcome).promoted  # the first champion

    scored = score_market(storage, home, as_of)
    predictions = storage.read_partition("predictions", "market", as_of)
    assert scored.rows == len(predictions) == panel.prices["date"].eq(pd.Timestamp(as_of)).sum()
    assert predictions[["prediction", "reason_1", "reason_2", "reason_3"]].notna().all().all()
    champion = tracking.load_model_version(home, "market")
    assert isinstance(champion.model, FittedMarketBoostedTrees)
    features = storage.read_partition("features", "market", as_of)
    mlflow.set_tracking_uri(home.tracking_uri)
    served = mlflow.pyfunc.load_model("models:/finpipe-market@champion")
    pd.testing.assert_frame_equal(served.predict(features), champion.predict(features))
    run = mlflow.get_run(champion.run_id)
    assert run.data.params["num_leaves"] == "4" and "best_epoch" in run.data.metrics
    assert "plots/feature_importance.png" in {
        a.path for a in mlflow.MlflowClient().list_artifacts(champion.run_id, "plots")
    }


def _fit(night: MarketNight, kind: str, say=lambda _: None):
    """Fit candidate `kind` as a run does, and close the figures its record holds: the
    lifecycle closes them once logged, and pyplot keeps the figures of a test that never logs
    them for the rest of its worker (it warned of more than 20 open)."""
    candidate = night.fit(kind, lambda *_, **__: None, say)
    for figure in candidate.record.figures.values():
        plots.close(figure)
    return candidate


def _mlp_trees_and_stack(tmp_path, *, n_dates: int, max_epochs: int, say=lambda _: None):
    """Fit an MLP, the trees and their stacked ensemble on a small panel; return the panel, its
    split, the night and its candidates by kind."""
    frame = _panel(3, n_dates=n_dates)
    split = time_split(frame.loc[frame["forward_return_5d"].notna(), "date"], embargo=HORIZON)
    config = MarketTrainingConfig(
        models=["mlp", "lgbm", "ensemble"], hidden=8, max_epochs=max_epochs, seed_average={},
        boosted_trees=SMALL,
    )  # fmt: skip
    night = MarketNight(
        Storage(tmp_path), dt.date(2024, 1, 1), config, frame, FEATURES, split, HORIZON
    )
    fitted = {kind: _fit(night, kind, say) for kind in night.candidates()}
    return frame, split, night, fitted


def test_the_trees_and_a_stacked_ensemble_compete_with_their_cross_fitted_validation_ic(tmp_path):
    """The validation IC a candidate is selected and floored on: the trees' kept round and the
    stack's weights were chosen on the validation window, so theirs is the cross-fitted one."""
    frame, split, night, fitted = _mlp_trees_and_stack(tmp_path, n_dates=160, max_epochs=2)

    trees, ensemble = night.nets["lgbm"].selection, fitted["ensemble"].model
    assert trees["validation_ic"] != trees["best_round_validation_ic"]
    assert fitted["lgbm"].windows["validation"]["ic"] == trees["validation_ic"]
    assert ensemble.combination == "stacked"  # weights fitted on the validation window
    assert fitted["ensemble"].windows["validation"]["ic"] == ensemble.selection["validation_ic"]
    # The ensemble is weighted on the trees' cross-fitted validation predictions, not on the
    # kept round's (which were chosen on those dates): its mean's IC is theirs and the MLP's.
    cross = night.nets["lgbm"].cross_fitted_validation
    validation = frame[frame["date"].isin(split.validation_dates)]
    honest = validation[["date", "ticker", "forward_return_5d"]].merge(cross, on=["date", "ticker"])
    honest = honest.rename(columns={"prediction": "lgbm"}).merge(
        pd.DataFrame(
            {"date": frame["date"], "ticker": frame["ticker"], "mlp": night.predictions["mlp"]}
        ),
        on=["date", "ticker"],
    )
    members = {"mlp": night.nets["mlp"], "lgbm": night.nets["lgbm"]}
    again = fit_ensemble(
        members, honest, split.validation_dates, label="forward_return_5d", horizon=HORIZON
    )
    assert ensemble.selection == pytest.approx(again.selection, nan_ok=True)
    assert len(cross) == validation["forward_return_5d"].notna().sum()


def test_the_ensembles_training_line_names_its_members_and_not_itself(tmp_path):
    """The line a run logs for the ensemble gives its own ICs, then each member's test IC:
    the members it combined, not the ensemble a second time."""
    said: list[str] = []
    _mlp_trees_and_stack(tmp_path, n_dates=160, max_epochs=2, say=said.append)

    line = said[-1]
    assert line.startswith("ensemble (stacked of mlp, lgbm): validation IC ")
    members = line.split("; members' test IC ")[1].split(", ")
    assert [member.split(" ")[0] for member in members] == ["mlp", "lgbm"]


@pytest.mark.parametrize(("embargo", "effective"), [(20, 20), (2, HORIZON), (None, HORIZON)])
def test_the_split_embargo_is_the_configured_one_and_at_least_the_horizon(
    tmp_path, monkeypatch, embargo, effective
):
    frame = _panel(0, n_dates=300)
    monkeypatch.setattr(market_pipeline, "load_training_frame", lambda *_, **__: frame)
    config = MarketTrainingConfig(embargo=embargo)
    assert config.horizon == HORIZON

    night = MarketParts().prepare_training(
        Storage(tmp_path), dt.date(2024, 3, 1), config, lambda: None
    )

    assert night.split.embargo == night.embargo == effective
    dates = np.sort(frame["date"].unique())
    train_end, validation_start = dates.searchsorted(
        [night.split.train_dates[-1], night.split.validation_dates[0]]
    )
    assert validation_start - train_end - 1 == effective  # dates dropped between the windows


def test_the_training_line_counts_the_labelled_rows_of_the_train_dates(tmp_path):
    """'training lgbm on N rows' counts what the candidate fits on: the labelled rows of the
    train dates, not the whole panel with its validation, test and unlabelled rows."""
    frame = _panel(3, n_dates=120)
    gone = (frame["ticker"] == "T01") & (frame["date"] >= frame["date"].unique()[30])
    frame.loc[gone, "forward_return_5d"] = np.nan  # delisted: no forward return from there
    split = time_split(frame.loc[frame["forward_return_5d"].notna(), "date"], embargo=HORIZON)
    config = MarketTrainingConfig(models=["lgbm"], boosted_trees=SMALL)
    night = MarketNight(
        Storage(tmp_path), dt.date(2024, 1, 1), config, frame, FEATURES, split, HORIZON
    )
    said: list[str] = []

    _fit(night, "lgbm", said.append)

    in_train = frame["date"].isin(split.train_dates) & frame["forward_return_5d"].notna()
    assert 0 < in_train.sum() < frame["date"].isin(split.train_dates).sum() < len(frame)
    assert night.train_rows == in_train.sum()  # the outcome's train_rows too
    dates = len(split.train_dates)
    assert (
        said[0] == f"training lgbm on {in_train.sum():,} rows over {dates} train dates, 3 features"
    )


def test_the_training_line_says_when_more_nets_train_after_the_one_whose_epochs_it_logs(
    tmp_path,
):
    """A seed-averaged MLP logs only its first net's epochs: the line before says how many nets
    train, so the silence while the others do does not read as a hang (five in the demo)."""
    frame = _panel(3, n_dates=120)
    split = time_split(frame.loc[frame["forward_return_5d"].notna(), "date"], embargo=HORIZON)
    config = MarketTrainingConfig(
        models=["mlp"], hidden=8, max_epochs=1, seed=3, seed_average={"mlp": 2}
    )
    night = MarketNight(
        Storage(tmp_path), dt.date(2024, 1, 1), config, frame, FEATURES, split, HORIZON
    )
    said: list[str] = []

    _fit(night, "mlp", said.append)

    assert said[0].startswith(
        "training mlp (2 nets from seeds 3-4, averaged; epoch lines are the first's) on "
    )


def _promotion_case(champion_through: str | None, monkeypatch):
    """A panel, tonight's outcome with 30% test dates, and a scorer of it whose champion
    memorised the label on every date up to `champion_through` (0.05 validation and test
    dates when it was fitted) and reads the planted f0 after; the challenger reads f0."""
    frame = _panel(0, n_dates=200).assign(direction_5d=np.nan)
    monkeypatch.setattr(market_pipeline, "load_training_frame", lambda *_, **__: frame)
    labelled = frame.loc[frame["forward_return_5d"].notna(), "date"]
    tonight = time_split(labelled, validation_fraction=0.15, test_fraction=0.3, embargo=HORIZON)
    test = tonight.test_dates
    labels = frame.set_index(["date", "ticker"])["forward_return_5d"]
    outcome = market_pipeline.TrainingOutcome(
        run_id="r", as_of=str(frame["date"].max().date()), candidate="mlp",
        challenger_version="2", promotion_metric="ic", metrics={}, seconds=0.0,
        horizon=HORIZON, label="forward_return_5d", test_start=str(test[0].date()),
        test_end=str(test[-1].date()), train_rows=0, first_date="", last_date="",
    )  # fmt: skip

    def model(version: str, through: str | None, memorised: bool) -> RegisteredModel:
        def predict(rows: pd.DataFrame) -> pd.DataFrame:
            learnt = rows["date"] <= pd.Timestamp(through or "1900-01-01")
            label = labels.reindex(pd.MultiIndex.from_frame(rows[["date", "ticker"]])).to_numpy()
            prediction = np.where(learnt & memorised, label, rows["f0"])
            return rows[["date", "ticker"]].assign(prediction=prediction)

        return RegisteredModel(
            "m", version, "r", SimpleNamespace(predict=predict, learnt_through=through)
        )

    champion = model("1", champion_through, memorised=True)
    score = MarketParts().promotion_scorer(None, outcome, lambda: champion)
    return frame, test, score, champion, model("2", None, memorised=False)


def _ic_on(frame: pd.DataFrame, dates: pd.DatetimeIndex) -> float:
    rows = frame[frame["date"].isin(dates)].rename(columns={"f0": "prediction"})
    return market_metrics(rows, label="forward_return_5d")["ic"]


def _through_a_champion_fitted_on_5pct_windows() -> pd.Timestamp:
    """The last date whose price a champion fitted with 5% validation and 5% test dates learnt
    from: `horizon` sessions past its last validation date."""
    frame = _panel(0, n_dates=200)
    labelled = frame.loc[frame["forward_return_5d"].notna(), "date"]
    fitted = time_split(labelled, validation_fraction=0.05, test_fraction=0.05, embargo=HORIZON)
    sessions = pd.DatetimeIndex(np.sort(frame["date"].unique()))
    return sessions[sessions.get_loc(fitted.validation_dates[-1]) + HORIZON]


def test_a_champion_is_never_judged_on_test_dates_it_learnt_from(monkeypatch, caplog):
    """A champion fitted with 5% validation and 5% test dates trained or was validated on most
    of tonight's 30% test window; its labels read prices `horizon` sessions past its last
    validation date. Those dates are left out for both models, with a warning counting them."""
    through = _through_a_champion_fitted_on_5pct_windows()
    frame, test, score, champion, challenger = _promotion_case(str(through.date()), monkeypatch)
    with caplog.at_level(logging.WARNING, logger="finpipe.market"):
        scores = score(champion), score(challenger)

    unseen = test[test > through]
    assert 0 < len(unseen) < len(test) // 2  # the settings change the leak needs
    assert scores == pytest.approx((_ic_on(frame, unseen), _ic_on(frame, unseen)))
    assert f"{len(test) - len(unseen)} of {len(test)} test dates left out" in caplog.text
    reason = "champion v1 trained or was validated on them (its labels read prices through {day}"
    assert reason.format(day=through.date()) in caplog.text


def test_a_champion_saved_before_its_window_was_recorded_is_judged_on_every_test_date(
    monkeypatch, caplog
):
    """Compared on all of them, with a warning (it may have trained on some)."""
    frame, test, score, _, challenger = _promotion_case(None, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="finpipe.market"):
        assert score(challenger) == pytest.approx(_ic_on(frame, test))
    assert f"it is compared on all {len(test)} test dates, some of which" in caplog.text


def test_no_test_date_left_to_compare_on_means_no_promotion(monkeypatch, caplog):
    """A champion that learnt from every test date leaves nothing to compare on."""
    last_date = str(_panel(0, n_dates=200)["date"].max().date())
    _, _, score, champion, challenger = _promotion_case(last_date, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="finpipe.market"):
        challenger_score, champion_score = score(challenger), score(champion)
    assert np.isnan(challenger_score) and np.isnan(champion_score)
    assert "none is left, so the challenger cannot be measured and is not promoted" in caplog.text
    decision = decide_promotion(
        metric="ic", challenger_version="2", challenger_score=challenger_score,
        champion_version="1", champion_score=champion_score,
    )  # fmt: skip
    assert not decision.promoted


def test_the_promotion_reason_says_on_how_many_test_dates_both_models_were_judged(monkeypatch):
    """The count of dates left out reached only the domain's log, not the decision's reason
    that MLflow and the run's summary show: that said "on the same test window"."""
    through = _through_a_champion_fitted_on_5pct_windows()
    _, test, score, champion, challenger = _promotion_case(str(through.date()), monkeypatch)
    decision = decide_promotion(
        metric="ic", challenger_version="2", challenger_score=score(challenger),
        champion_version="1", champion_score=score(champion), compared_on=score.compared_on(),
    )  # fmt: skip
    unseen = int((test > through).sum())
    assert (unseen, len(test)) == (10, 58)
    assert decision.reason.endswith(
        "on the same 10 of 58 test dates (48 left out: champion v1 learnt from them)"
    )
    _, _, score, _, challenger = _promotion_case(None, monkeypatch)  # nothing left out
    score(challenger)
    assert score.compared_on().describe("1") == "58 test dates"


def test_each_candidate_records_the_last_date_its_labels_read_and_keeps_it_when_saved(tmp_path):
    """The h-th session after the last validation date, for the nets, the trees and their
    ensemble; a folder saved before finpipe recorded it reads as None."""
    frame, split, _, candidates = _mlp_trees_and_stack(tmp_path, n_dates=120, max_epochs=1)
    fitted = {kind: candidate.model for kind, candidate in candidates.items()}
    sessions = pd.DatetimeIndex(np.sort(frame["date"].unique()))
    expected = str(sessions[sessions.get_loc(split.validation_dates[-1]) + HORIZON].date())
    assert expected < str(split.test_dates[0].date())  # the embargo keeps it off the test window
    for kind, model in fitted.items():
        assert model.learnt_through == expected, kind
        model.save(tmp_path / kind)
        assert type(model).load(tmp_path / kind).learnt_through == expected, kind
    metadata = tmp_path / "lgbm" / "model.json"
    saved = json.loads(metadata.read_text())
    del saved["learnt_through"]
    metadata.write_text(json.dumps(saved))
    assert type(fitted["lgbm"]).load(tmp_path / "lgbm").learnt_through is None


@pytest.mark.parametrize("history_dates", [None, 150])
def test_with_unchanged_settings_the_next_night_leaves_no_test_date_out(
    tmp_path, monkeypatch, history_dates
):
    """Promotion compares on the whole test window, as before, when the split settings stay:
    the previous night's candidates learnt nothing past the start of tonight's test dates."""
    panel = _panel(0, n_dates=260)
    sessions = np.sort(panel["date"].unique())
    config = MarketTrainingConfig(history_dates=history_dates)
    nights = []
    for last in (sessions[-2], sessions[-1]):
        frame = panel[panel["date"] <= last].reset_index(drop=True)
        frame.loc[
            frame["date"] > np.sort(frame["date"].unique())[-1 - HORIZON], "forward_return_5d"
        ] = np.nan
        monkeypatch.setattr(market_pipeline, "load_training_frame", lambda *_, f=frame, **__: f)
        nights.append(
            MarketParts().prepare_training(
                Storage(tmp_path), pd.Timestamp(last).date(), config, lambda: None
            )
        )
    yesterday, tonight = nights
    assert yesterday.learnt_through() < str(tonight.split.test_dates[0].date())
