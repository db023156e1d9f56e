"""The market model: fit on a tiny panel, predict point-in-time, save and load unchanged."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finpipe.market.model import FittedMarketModel, _sorted_panel, fit_market_model
from finpipe.market.pipeline import MarketParts
from finpipe.storage import Storage
from finpipe.tracking import RegisteredModel
from finpipe.training import FeatureScaler, TrainConfig, time_split

FEATURES = ["f0", "f1", "f2"]
HORIZON = 5


def _panel(seed: int = 0, n_dates: int = 40, tickers: str = "ABCDEF") -> pd.DataFrame:
    """A long frame: a new listing (F from date 10, first rows NaN), NaN labels at the end."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2023-01-02", periods=n_dates)
    frame = pd.MultiIndex.from_product([dates, list(tickers)], names=["date", "ticker"]).to_frame(
        index=False
    )
    frame["ticker"] = frame["ticker"].astype("string")
    for column in FEATURES:
        frame[column] = rng.normal(size=len(frame)).astype(np.float32)
    frame["forward_return_5d"] = 0.01 * frame["f0"] + 0.01 * rng.normal(size=len(frame))
    frame["direction_5d"] = (frame["forward_return_5d"] > 0).astype(float)
    frame = frame[(frame["ticker"] != "F") | (frame["date"] >= dates[10])]
    frame.loc[(frame["ticker"] == "F") & (frame["date"] < dates[13]), FEATURES] = np.nan
    frame.loc[frame["date"] > dates[-1 - HORIZON], "forward_return_5d"] = np.nan  # not realised
    return frame.reset_index(drop=True)


def _config(model: str, **overrides) -> TrainConfig:
    params = dict(model=model, hidden=8, layers=2, lookback=4, batch_size=64, max_epochs=2)
    return TrainConfig(**{**params, **overrides})


def _fit(frame: pd.DataFrame, model: str, **kwargs) -> FittedMarketModel:
    split = time_split(frame["date"], embargo=HORIZON)
    return fit_market_model(frame, FEATURES, split, _config(model), horizon=HORIZON, **kwargs)


@pytest.mark.parametrize("model", ["mlp", "gru", "tcn"])
def test_save_load_round_trip_gives_identical_predictions(tmp_path, model):
    frame = _panel()
    fitted = _fit(frame, model)
    fitted.save(tmp_path / "model")
    loaded = FittedMarketModel.load(tmp_path / "model")

    before, after = fitted.predict(frame), loaded.predict(frame)
    pd.testing.assert_frame_equal(before, after)
    assert list(before.columns) == ["date", "ticker", "prediction"]
    assert before["prediction"].dtype == np.float64
    assert len(before) == len(frame) and np.isfinite(before["prediction"]).all()  # NaN features ok
    saved = json.loads((tmp_path / "model" / "model.json").read_text())
    assert saved["feature_columns"] == FEATURES and saved["horizon"] == HORIZON
    assert saved["config"]["model"] == model and len(saved["history"]) == 2
    assert loaded.scaler == fitted.scaler and loaded.config == fitted.config
    assert loaded.learning_rate == fitted.learning_rate == 1e-3  # a few batches: the full rate
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.json", "weights.pt"]
    del saved["learning_rate"]  # a model saved before the applied rate was recorded
    (tmp_path / "model" / "model.json").write_text(json.dumps(saved))
    assert FittedMarketModel.load(tmp_path / "model").learning_rate is None


def test_missing_feature_column_is_named():
    frame = _panel()
    fitted = _fit(frame, "mlp")
    with pytest.raises(ValueError, match=r"\['f1'\] missing"):
        fitted.predict(frame.drop(columns="f1"))
    with pytest.raises(ValueError, match=r"\['f2'\] missing"):
        _fit(frame.drop(columns="f2"), "mlp")


@pytest.mark.parametrize("model", ["mlp", "gru", "tcn"])
def test_prediction_at_t_uses_only_rows_up_to_t(model):
    frame = _panel()
    fitted = _fit(frame, model)
    cutoff = frame["date"].unique()[25]
    later = frame["date"] > cutoff
    changed = frame.copy()
    changed.loc[later, FEATURES] = 50.0  # far beyond anything seen in training

    base, moved = fitted.predict(frame), fitted.predict(changed)
    np.testing.assert_array_equal(base.loc[~later, "prediction"], moved.loc[~later, "prediction"])
    assert (base.loc[later, "prediction"] != moved.loc[later, "prediction"]).all()
    # without the later rows at all, earlier predictions agree too
    truncated = fitted.predict(frame[~later])
    np.testing.assert_allclose(truncated["prediction"], base.loc[~later, "prediction"], atol=1e-9)


@pytest.mark.parametrize("model", ["gru", "tcn"])
def test_prediction_of_one_ticker_ignores_other_tickers(model):
    frame = _panel()
    fitted = _fit(frame, model)
    other = frame["ticker"] != "A"
    changed = frame.copy()
    changed.loc[other, FEATURES] = -50.0

    base, moved = fitted.predict(frame), fitted.predict(changed)
    np.testing.assert_array_equal(base.loc[~other, "prediction"], moved.loc[~other, "prediction"])


def test_nightly_scoring_reads_each_tickers_window_across_a_pause(tmp_path):
    """Scoring a date gives each ticker the window training and the backtest give it: its own
    last `lookback` rows, however many dates back a pause puts them (not zero padding)."""
    frame = _panel()
    dates = frame["date"].unique()
    paused = (frame["ticker"] == "A") & frame["date"].between(dates[-8], dates[-2])
    frame = frame[~paused].reset_index(drop=True)
    fitted = _fit(frame, "gru")
    storage = Storage(tmp_path)
    inputs = frame.drop(columns=["forward_return_5d", "direction_5d"])
    for stamp, rows in inputs.groupby("date"):
        storage.write_partition("features", "market", stamp.date(), rows)
    as_of = pd.Timestamp(dates[-1])

    champion = RegisteredModel("finpipe-market", "1", "run", fitted)
    scored = MarketParts().prepare_scoring(storage, as_of.date())(champion).rows
    expected = fitted.predict(inputs, score_from=as_of)
    expected = expected[expected["date"] == as_of].drop(columns="date")
    pd.testing.assert_frame_equal(
        scored[["ticker", "prediction"]].reset_index(drop=True),
        expected.sort_values("ticker").reset_index(drop=True),
    )


def test_the_logged_pyfunc_scores_its_own_input_example_as_scoring_publishes(tmp_path, caplog):
    """The logged input example holds each of its tickers' last `history_rows` rows (a pause
    included), so MLflow's pyfunc of a GRU, given its own example, scores the last date as
    scoring publishes it; given one date's rows, it says how many dates it needs."""
    import logging

    from finpipe.market.pipeline import input_example

    frame = _panel()
    dates = frame["date"].unique()
    paused = (frame["ticker"] == "A") & frame["date"].between(dates[-4], dates[-2])
    inputs = frame[~paused].drop(columns=["forward_return_5d", "direction_5d"])
    fitted = _fit(frame[~paused], "gru")
    day = pd.Timestamp(dates[-1])
    example = input_example(inputs, FEATURES, day, fitted.history_rows)
    assert len(example) == 5 * 4 and example["ticker"].nunique() == 5  # lookback 4
    assert set(example.loc[example["ticker"] == "A", "date"]) == set(
        inputs.loc[inputs["ticker"] == "A", "date"].iloc[-4:]
    )  # A's own last rows, however far back the pause puts them
    one_row = input_example(inputs, FEATURES, day, 1)  # an MLP's or the trees': one date
    assert len(one_row) == 5 and set(one_row["date"]) == {day}
    served = _logged_and_loaded(tmp_path, fitted, example)
    with caplog.at_level(logging.WARNING, "finpipe.mlflow_model"):
        own = served.predict(served.input_example)
        mine = [r for r in caplog.records if r.name == "finpipe.mlflow_model"]
        assert mine == []  # enough history: no warning
        served.predict(inputs[inputs["date"] == day])
    published = fitted.explain(inputs, score_from=day).set_index("ticker")["prediction"]
    own = own[own["date"] == day].set_index("ticker")["prediction"]
    assert len(own) == 5
    np.testing.assert_allclose(own, published[own.index], rtol=1e-6, atol=1e-9)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "finpipe.mlflow_model"]
    assert "reads the last 4 dates of each ticker's feature rows" in warning
    assert "6 of 6 tickers on" in warning


def test_the_logged_pyfunc_takes_float64_features_as_well_as_the_float32_finpipe_stores(
    tmp_path,
):
    """finpipe stores market features as float32; a user's frame (read from a CSV, computed in
    pandas) is float64. MLflow's pyfunc refuses float64 for a column its signature declares
    float ("Can not safely convert float64 to float32"), so the signature declares double: the
    served model takes either width and predicts as the model does."""
    frame = _panel()
    fitted = _fit(frame, "mlp")
    features = frame.loc[frame["date"] == frame["date"].max(), ["date", "ticker", *FEATURES]]
    assert (features[FEATURES].dtypes == np.float32).all()
    served = _logged_and_loaded(tmp_path, fitted, features)
    expected = fitted.predict(features).reset_index(drop=True)
    expected["date"] = expected["date"].astype("datetime64[ns]")  # MLflow's datetime unit
    wide = features.astype(dict.fromkeys(FEATURES, "float64"))
    pd.testing.assert_frame_equal(served.predict(wide).reset_index(drop=True), expected)
    pd.testing.assert_frame_equal(served.predict(features).reset_index(drop=True), expected)


def _logged_and_loaded(tmp_path, fitted: FittedMarketModel, example: pd.DataFrame):
    """Log `fitted` as finpipe logs a candidate, in an MLflow store under `tmp_path`, and load
    it back with plain `mlflow.pyfunc.load_model`."""
    import mlflow

    from finpipe import tracking

    previous, uri = mlflow.get_tracking_uri(), f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        # its own experiment: the active one may be another test's, in another store
        experiment = mlflow.MlflowClient(uri).create_experiment(
            "pyfunc-example", artifact_location=(tmp_path / "artifacts").as_uri()
        )
        with mlflow.start_run(experiment_id=experiment):
            info = tracking.log_fitted_model(
                fitted,
                name="market-example",
                loader="finpipe.market.model:FittedMarketModel",
                input_example=example,
                output_example=fitted.predict(example),
            )
        return mlflow.pyfunc.load_model(info.model_uri)
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.unit
def test_a_served_model_warns_of_a_ticker_one_row_short_of_its_lookback():
    from finpipe.mlflow_model import short_history

    dates = pd.bdate_range("2024-01-01", periods=4)
    rows = [("A", d) for d in dates] + [("B", d) for d in dates[1:]] + [("C", dates[0])]
    frame = pd.DataFrame(rows, columns=["ticker", "date"])
    said = short_history(frame, 4)
    assert said is not None and "1 of 2 tickers on 2024-01-04 have fewer (e.g. B: 3)" in said
    assert short_history(frame[frame["ticker"] != "B"], 4) is None  # C: not on the latest date
    assert short_history(frame, 3) is None


def test_predict_keeps_input_order_and_index():
    frame = _panel()
    fitted = _fit(frame, "gru")
    shuffled = frame.sample(frac=1.0, random_state=1)

    out = fitted.predict(shuffled)
    assert out.index.equals(shuffled.index)
    pd.testing.assert_frame_equal(out.sort_index(), fitted.predict(frame))
    with pytest.raises(ValueError, match="duplicate"):
        fitted.predict(pd.concat([frame, frame.iloc[:1]]))


def test_scaler_is_fitted_on_train_dates_only():
    frame = _panel()
    split = time_split(frame["date"], embargo=HORIZON)
    after_train = ~frame["date"].isin(split.train_dates)
    distorted = frame.copy()
    distorted.loc[after_train, FEATURES] = distorted.loc[after_train, FEATURES] * 1000 + 7
    # and the labels of every later row: the target's scale must not learn from them either
    distorted.loc[after_train, "forward_return_5d"] = (
        distorted.loc[after_train, "forward_return_5d"] * 5 + 0.05
    )

    fitted = _fit(frame, "mlp")
    refitted = _fit(distorted, "mlp")
    assert refitted.scaler == fitted.scaler
    assert fitted.scaler == FeatureScaler.fit(frame.loc[~after_train, FEATURES])
    train_labels = frame.loc[~after_train, "forward_return_5d"].dropna()
    assert (refitted.target_mean, refitted.target_std) == (
        fitted.target_mean,
        fitted.target_std,
    )
    assert fitted.target_mean == pytest.approx(train_labels.mean(), rel=1e-6)
    assert fitted.target_std == pytest.approx(train_labels.std(ddof=0), rel=1e-6)


def test_embargo_shorter_than_horizon_is_refused():
    frame = _panel()
    split = time_split(frame["date"], embargo=2)
    with pytest.raises(ValueError, match=r"embargo \(2 dates\) is shorter than the label horizon"):
        fit_market_model(frame, FEATURES, split, _config("mlp"), horizon=HORIZON)


def test_cross_sectional_target_is_recorded_and_survives_save(tmp_path):
    frame = _panel()
    fitted = _fit(frame, "mlp", target="cross_sectional_zscore")
    assert (fitted.target, fitted.target_mean, fitted.target_std) == (
        "cross_sectional_zscore",
        0.0,
        1.0,
    )
    fitted.save(tmp_path)
    assert FittedMarketModel.load(tmp_path).target == "cross_sectional_zscore"


def test_a_perfect_cross_sectional_score_has_no_error_and_calls_every_direction():
    """The logged RMSE is against the z-score training uses (ddof 0), and the score's sign
    against whether the ticker beat its date's mean, not the sign of a market-wide move."""
    from finpipe.market.evaluation import window_metrics
    from finpipe.market.model import MarketTrainingConfig, _targets

    rng = np.random.default_rng(0)
    dates = pd.bdate_range("2024-01-01", periods=30)
    scored = pd.MultiIndex.from_product([dates, list("ABCDEFGH")], names=["date", "ticker"])
    scored = scored.to_frame(index=False)
    market = np.repeat(rng.normal(0.004, 0.01, len(dates)), 8)  # every name moves with it
    scored["forward_return_5d"] = market + rng.normal(0, 0.01, len(scored))
    scored["prediction"] = _targets(scored, "forward_return_5d", "cross_sectional_zscore")
    metrics = window_metrics(scored, MarketTrainingConfig())  # target: cross_sectional_zscore
    assert metrics["rmse"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["directional_accuracy"] == 1.0
    # a raw-return target keeps the raw sign: a perfect return forecast calls every move
    returns = scored.assign(prediction=scored["forward_return_5d"])
    raw = window_metrics(returns, MarketTrainingConfig(target="return"))
    assert raw["rmse"] == 0.0 and raw["directional_accuracy"] == 1.0
    assert (
        window_metrics(scored, MarketTrainingConfig(target="return"))["directional_accuracy"] < 0.9
    )  # the z-score's sign is not the raw return's


def _perfect_zscore_window(rows_without_label: int = 0) -> pd.DataFrame:
    from finpipe.market.model import _targets

    rng = np.random.default_rng(1)
    dates = pd.bdate_range("2024-01-01", periods=10)
    scored = pd.MultiIndex.from_product([dates, list("ABCDEF")], names=["date", "ticker"])
    scored = scored.to_frame(index=False)
    scored["forward_return_5d"] = rng.normal(0.003, 0.02, len(scored))
    if rows_without_label:  # the last rows' labels are not realised yet; they are still scored
        scored.loc[scored.index[-rows_without_label:], "forward_return_5d"] = np.nan
    z = _targets(scored, "forward_return_5d", "cross_sectional_zscore")
    scored["prediction"] = np.nan_to_num(z, nan=0.5)
    return scored


def test_the_ensembles_z_scores_are_measured_in_z_units_whatever_the_target():
    from finpipe.market.evaluation import window_metrics
    from finpipe.market.model import MarketTrainingConfig

    metrics = window_metrics(
        _perfect_zscore_window(), MarketTrainingConfig(target="return"), zscore_units=True
    )
    assert metrics["rmse"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["directional_accuracy"] == 1.0


def test_the_z_unit_rmse_leaves_out_rows_whose_label_is_not_known_yet():
    from finpipe.market.evaluation import window_metrics
    from finpipe.market.model import MarketTrainingConfig

    metrics = window_metrics(_perfect_zscore_window(rows_without_label=2), MarketTrainingConfig())
    assert metrics["rmse"] == pytest.approx(0.0, abs=1e-12)


def test_the_per_date_z_scores_read_only_their_own_dates_rows():
    """The cross-sectional target and the ensemble's member z-scores standardise a date by its
    own tickers (mean, ddof-0 std): scaling and shifting every other date's values, earlier
    and later, and adding a ticker on them changes no z-score of the date, which is what a
    hand computation over its rows gives."""
    from finpipe.market.ensemble import cross_sectional_zscore
    from finpipe.market.model import _targets

    frame = _panel(seed=3)
    day = frame["date"].unique()[20]
    others = frame["date"] != day
    moved = frame.copy()
    moved.loc[others, "forward_return_5d"] = moved.loc[others, "forward_return_5d"] * 40 + 1.0
    extra = moved[others].drop_duplicates("date").assign(ticker="NEW", forward_return_5d=9.0)
    moved = pd.concat([moved, extra.astype({"ticker": "string"})], ignore_index=True)
    on_day, moved_on_day = (frame["date"] == day).to_numpy(), (moved["date"] == day).to_numpy()

    values = frame.loc[on_day, "forward_return_5d"].to_numpy()
    by_hand = (values - values.mean()) / values.std(ddof=0)
    target = _targets(frame, "forward_return_5d", "cross_sectional_zscore")
    np.testing.assert_allclose(target[on_day], by_hand, rtol=1e-12)
    moved_target = _targets(moved, "forward_return_5d", "cross_sectional_zscore")
    np.testing.assert_array_equal(moved_target[moved_on_day], target[on_day])

    dates, moved_dates = frame["date"].to_numpy(), moved["date"].to_numpy()
    z, _ = cross_sectional_zscore(frame["forward_return_5d"].to_numpy(), dates)
    moved_z, _ = cross_sectional_zscore(moved["forward_return_5d"].to_numpy(), moved_dates)
    np.testing.assert_allclose(z[on_day], by_hand, rtol=1e-12)
    np.testing.assert_array_equal(moved_z[moved_on_day], z[on_day])


@given(
    rows=st.lists(
        st.tuples(
            st.one_of(st.none(), st.sampled_from(["A", "B", "a", "AB", "b", "10", "9", "Z"])),
            st.one_of(st.none(), st.integers(0, 6)),
        ),
        min_size=1,
        max_size=40,
    ),
    as_category=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_the_panel_order_is_a_stable_sort_by_ticker_text_then_date(rows, as_category):
    """The integer-key sort orders rows as a stable pandas sort of (ticker as text, date) with
    missing keys last, and flags the same duplicates."""
    frame = pd.DataFrame(
        {
            "ticker": pd.array([t for t, _ in rows], dtype="string"),
            "date": pd.to_datetime(
                [
                    None if d is None else pd.Timestamp("2024-01-01") + pd.Timedelta(days=d)
                    for _, d in rows
                ]
            ),
            "f0": np.arange(len(rows), dtype=np.float32),
        }
    )
    if as_category:
        frame["ticker"] = frame["ticker"].astype("category")
    keys = frame[["ticker", "date"]].astype({"ticker": "string"})
    expected = keys.sort_values(["ticker", "date"], kind="mergesort").index.to_numpy()
    scaler = FeatureScaler.fit(frame[["f0"]])
    if keys.duplicated().any():
        with pytest.raises(ValueError, match="duplicate"):
            _sorted_panel(frame, scaler, lookback=2)
        return
    order, panel, positions = _sorted_panel(frame, scaler, lookback=2)
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_array_equal(panel[positions, 0], scaler.transform(frame[["f0"]])[order, 0])
    # Lookback 2: one zero row before each ticker's first row (missing tickers are one group).
    padding = np.setdiff1d(np.arange(len(panel)), positions)
    assert len(padding) == keys["ticker"].nunique(dropna=False)
    assert (panel[padding] == 0).all()
    ordered = keys["ticker"].fillna("\x00").to_numpy(dtype=object)[order]  # "\x00": missing
    firsts = positions[np.r_[True, ordered[1:] != ordered[:-1]]]
    np.testing.assert_array_equal(np.sort(padding), np.sort(firsts - 1))


# -- explanations ----------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mlp", "gru", "tcn"])
def test_attributions_add_up_to_the_gap_to_the_typical_row(model):
    """Integrated gradients over the whole input (a sequence model's lookback window summed per
    feature) add up to prediction(row) - prediction(training-mean input)."""
    frame = _panel()
    fitted = _fit(frame, model)
    last = frame["date"].unique()[-8]
    attributions = fitted.attributions(frame, score_from=last)
    predicted = fitted.predict(frame, score_from=last)
    assert attributions.shape == (len(predicted), len(FEATURES))
    lookback = fitted.history_rows
    shape = (1, lookback, len(FEATURES)) if fitted.config.is_sequence else (1, len(FEATURES))
    with torch.no_grad():
        typical = fitted.net.eval()(torch.zeros(shape)).item() * fitted.target_std
    gap = predicted["prediction"].to_numpy() - (typical + fitted.target_mean)
    np.testing.assert_allclose(attributions.sum(axis=1), gap, atol=5e-3 * np.abs(gap).max())
    precise = fitted.attributions(frame, score_from=last, steps=64)
    np.testing.assert_allclose(precise.sum(axis=1), gap, atol=2e-4 * np.abs(gap).max())


def test_a_feature_the_net_cannot_see_is_never_a_reason():
    frame = _panel()
    fitted = _fit(frame, "gru")
    with torch.no_grad():
        fitted.net.gru.weight_ih_l0[:, FEATURES.index("f1")] = 0.0  # f1 reaches nothing
    explained = fitted.explain(frame, score_from=frame["date"].unique()[-3])
    attributions = fitted.attributions(frame, score_from=frame["date"].unique()[-3])
    assert (attributions[:, FEATURES.index("f1")] == 0.0).all()
    reasons = explained[["reason_1", "reason_2", "reason_3"]]
    assert not reasons.eq("f1").any().any()
    assert reasons[["reason_1", "reason_2"]].notna().all().all()
    assert explained["reason_3"].isna().all()  # only two features move the score
    # reason_k is the k-th largest |attribution|, its signed value the impact.
    impacts = explained[["reason_1_impact", "reason_2_impact"]].to_numpy()
    assert (np.abs(impacts[:, 0]) >= np.abs(impacts[:, 1])).all()
    first = np.abs(attributions).argmax(axis=1)
    assert explained["reason_1"].tolist() == [FEATURES[j] for j in first]
    pd.testing.assert_frame_equal(
        explained[["date", "ticker", "prediction"]],
        fitted.predict(frame, score_from=frame["date"].unique()[-3]),
    )


# -- the ensemble ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def members():
    """An MLP and a GRU fitted on one panel, with their predictions on every row."""
    frame = _panel(n_dates=140)
    split = time_split(frame["date"], embargo=HORIZON)
    fitted = {kind: _fit(frame, kind) for kind in ("mlp", "gru")}
    scored = frame[["date", "ticker", "forward_return_5d"]].assign(
        **{kind: model.predict(frame)["prediction"].to_numpy() for kind, model in fitted.items()}
    )
    return frame, split, fitted, scored


def test_ensemble_scores_the_weighted_sum_of_member_zscores_and_survives_save(tmp_path, members):
    from finpipe.market.ensemble import FittedMarketEnsemble, fit_ensemble

    frame, split, fitted, scored = members
    ensemble = fit_ensemble(
        fitted, scored, split.validation_dates, label="forward_return_5d", horizon=HORIZON
    )
    assert sum(ensemble.weights.values()) == pytest.approx(1.0)
    assert ensemble.combination in ("mean", "stacked") and ensemble.history_rows == 4
    # A naive reference: pandas z-scores per date (ddof 0), weighted.
    by_date = scored.groupby("date")
    expected = sum(
        weight
        * (scored[kind] - by_date[kind].transform("mean"))
        / by_date[kind].transform("std", ddof=0)
        for kind, weight in ensemble.weights.items()
    )
    predicted = ensemble.predict(frame)
    np.testing.assert_allclose(predicted["prediction"], expected, atol=1e-9)

    ensemble.save(tmp_path / "model")
    loaded = FittedMarketEnsemble.load(tmp_path / "model")
    pd.testing.assert_frame_equal(loaded.predict(frame), predicted)
    assert (loaded.weights, loaded.combination) == (ensemble.weights, ensemble.combination)
    assert sorted(p.name for p in (tmp_path / "model" / "members").iterdir()) == ["gru", "mlp"]
    # Its explanations add up, member by member, to the score's gap to the date's typical row.
    last = frame["date"].unique()[-2]
    explained = loaded.explain(frame, score_from=last)
    pd.testing.assert_frame_equal(
        explained[predicted.columns], loaded.predict(frame, score_from=last)
    )
    assert explained["reason_1"].notna().all()


def test_the_members_table_gives_each_candidate_its_own_test_and_validation_ic(members):
    import dataclasses

    from finpipe.market.ensemble import fit_ensemble
    from finpipe.market.evaluation import members_table
    from finpipe.metrics import market_metrics

    frame, split, fitted, scored = members
    label = "forward_return_5d"
    ensemble = fit_ensemble(fitted, scored, split.validation_dates, label=label, horizon=HORIZON)
    # The validation IC the ensemble competes with (cross-fitted), told apart from its plain one.
    ensemble = dataclasses.replace(
        ensemble, selection={**ensemble.selection, "validation_ic": 0.321}
    )
    scored = scored.assign(prediction=ensemble.combine(scored)[0])
    table = members_table(scored, fitted, ensemble, split, label).set_index("candidate")
    assert list(table.index) == ["mlp", "gru", "ensemble"]
    for name, column in (("mlp", "mlp"), ("gru", "gru"), ("ensemble", "prediction")):
        for window, dates in (("validation", split.validation_dates), ("test", split.test_dates)):
            if (name, window) == ("ensemble", "validation"):
                continue
            rows = scored[scored["date"].isin(dates)]
            expected = market_metrics(rows, prediction=column, label=label)["ic"]
            assert table.loc[name, f"{window}_ic"] == pytest.approx(expected), (name, window)
    assert table.loc["ensemble", "validation_ic"] == 0.321


def test_test_window_importance_starts_from_the_models_own_test_ic_across_a_halt(members):
    """The unshuffled IC of the importance table is the model's test IC, also for a ticker
    that skipped the sessions just before the test window (its lookback reaches further back)."""
    from finpipe.market.evaluation import test_window_importance
    from finpipe.market.model import MarketTrainingConfig
    from finpipe.metrics import per_date_ic

    frame, split, fitted, _ = members
    dates = np.sort(frame["date"].unique())
    start = int(dates.searchsorted(split.test_dates[0]))
    halted = (frame["ticker"] == "A") & frame["date"].isin(dates[start - 4 : start])
    frame = frame[~halted].reset_index(drop=True)
    model, config = fitted["gru"], MarketTrainingConfig(lookback=4)  # the GRU's lookback
    table = test_window_importance("gru", model, frame, FEATURES, split, config, {})

    test = frame[frame["date"].isin(split.test_dates)]
    scored = test.assign(prediction=model.predict(frame)["prediction"].to_numpy()[test.index])
    expected = per_date_ic(scored, label=config.label).mean()
    assert table["ic"].tolist() == pytest.approx([expected] * len(FEATURES))


def test_test_window_importance_shuffles_a_feature_across_tickers_within_each_date(members):
    """A feature equal for every ticker on a date is left as it is by a shuffle within dates:
    the model's IC does not move (shuffled across dates, it would)."""
    from finpipe.market.evaluation import test_window_importance
    from finpipe.market.model import MarketTrainingConfig

    frame, split, fitted, _ = members
    frame = frame.assign(f2=frame.groupby("date")["f2"].transform("mean"))
    config = MarketTrainingConfig(lookback=4)
    table = test_window_importance("gru", fitted["gru"], frame, FEATURES, split, config, {})
    same_each_day = table.set_index("feature").loc["f2"]
    assert same_each_day["shuffled_ic"] == same_each_day["ic"]
    assert same_each_day["ic_drop"] == 0.0


def test_ensemble_prediction_at_t_uses_only_rows_up_to_t(members):
    from finpipe.market.ensemble import fit_ensemble

    frame, split, fitted, scored = members
    ensemble = fit_ensemble(
        fitted, scored, split.validation_dates, label="forward_return_5d", horizon=HORIZON
    )
    cutoff = frame["date"].unique()[100]
    later = frame["date"] > cutoff
    changed = frame.copy()
    changed.loc[later, FEATURES] = 50.0
    base, moved = ensemble.predict(frame), ensemble.predict(changed)
    np.testing.assert_array_equal(base.loc[~later, "prediction"], moved.loc[~later, "prediction"])


def test_stacking_is_kept_only_when_it_wins_out_of_sample(members):
    """A member that is pure noise gets (almost) no weight when stacking wins on the
    cross-fitted validation IC; two equally good members keep the plain mean."""
    from finpipe.market.ensemble import fit_ensemble

    _, split, fitted, scored = members
    rng = np.random.default_rng(3)
    label = scored["forward_return_5d"]
    signal = label + 0.002 * rng.normal(size=len(scored))
    noisy = scored.assign(mlp=signal, gru=rng.normal(size=len(scored)))
    stacked = fit_ensemble(
        fitted, noisy, split.validation_dates, label="forward_return_5d", horizon=HORIZON
    )
    assert stacked.combination == "stacked"
    assert stacked.weights["mlp"] > 0.9
    selection = stacked.selection
    assert selection["stacked_crossfit_validation_ic"] > selection["mean_validation_ic"]
    # 21 validation dates are too few to choose on each half (tests/test_market_ensemble.py):
    # the ensemble competes with the mean's IC, the lower one.
    assert selection["validation_ic"] == selection["mean_validation_ic"]

    twins = scored.assign(mlp=signal, gru=signal)  # stacking has nothing to add
    mean = fit_ensemble(
        fitted, twins, split.validation_dates, label="forward_return_5d", horizon=HORIZON
    )
    assert mean.combination == "mean" and mean.weights == {"mlp": 0.5, "gru": 0.5}
    assert mean.selection["validation_ic"] == mean.selection["mean_validation_ic"]


@pytest.mark.unit
def test_each_half_of_the_validation_dates_is_stacked_with_weights_fitted_on_the_other():
    """Cross-fitting: the first half's rows are scored with weights fitted on the second half
    and the reverse, neither fit reading the `horizon` dates next to the other half (whose
    labels overlap it). Each stretch of dates here follows another member exactly, so the
    weights each half is scored with say which dates they came from."""
    from finpipe.market.ensemble import _cross_fitted

    rng = np.random.default_rng(0)
    horizon, per_date = 2, 6
    day = np.repeat(np.arange(20), per_date)
    dates = pd.Timestamp("2024-01-01").to_datetime64() + day.astype("timedelta64[D]")
    z = rng.normal(size=(len(day), 3))
    target = np.where(day < 8, z[:, 0], np.where(day >= 12, z[:, 1], 100 * z[:, 2]))
    # (dates 8-11 are the embargo around the split at date 10: follow member 3, loudly)
    scores = _cross_fitted(z, target, dates, horizon)
    assert scores is not None
    first = day < 10
    np.testing.assert_allclose(scores[first], z[first, 1], atol=1e-9)
    np.testing.assert_allclose(scores[~first], z[~first, 0], atol=1e-9)
    assert _cross_fitted(z[day < 6], target[day < 6], dates[day < 6], horizon) is None


def test_market_candidates_accept_tcn_cnn_and_an_ensemble_of_two_nets():
    from finpipe.market.model import MARKET_MODEL_KINDS, MarketTrainingConfig

    assert MARKET_MODEL_KINDS == ("mlp", "gru", "tcn", "lgbm", "ensemble")  # the backtest uses them
    config = MarketTrainingConfig(models=["mlp", "cnn", "ensemble"])
    assert config.models == ["mlp", "tcn", "ensemble"]
    assert config.train_config("tcn").model == "tcn"
    with pytest.raises(ValueError, match="ensemble combines the nets.*has 1"):
        MarketTrainingConfig(models=["gru", "ensemble"])
    with pytest.raises(ValueError, match=r"\['mlp'\] more than once"):
        MarketTrainingConfig(models=["mlp", "gru", "mlp"])
    with pytest.raises(ValueError, match="ensemble"):  # not a net: no TrainConfig for it
        config.train_config("ensemble")


def test_the_mlp_is_a_seed_average_of_five_nets_by_default():
    """The recipe the peer benchmark measured (README): five MLPs averaged, one GRU."""
    from finpipe.market.model import MarketTrainingConfig
    from finpipe.nets import build_net
    from finpipe.training import SeedAverage

    default = MarketTrainingConfig()
    assert [default.train_config(kind).seeds for kind in ("mlp", "gru", "tcn")] == [5, 1, 1]
    chosen = MarketTrainingConfig(seed_average={"cnn": 3}, seed=4)
    assert chosen.seed_average == {"tcn": 3}
    assert (chosen.train_config("tcn").seeds, chosen.train_config("mlp").seeds) == (3, 1)
    assert isinstance(build_net(chosen.train_config("tcn"), 4), SeedAverage)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        MarketTrainingConfig(seed_average={"gru": 0})


def test_a_kind_of_net_can_have_its_own_learning_rate():
    """learning_rate_by_kind: the GRU at Qlib's rate while the MLP keeps learning_rate."""
    from finpipe.market.model import MarketTrainingConfig

    assert MarketTrainingConfig().train_config("gru").learning_rate == 1e-3
    chosen = MarketTrainingConfig(learning_rate_by_kind={"gru": 2e-4, "cnn": 5e-4})
    assert chosen.learning_rate_by_kind == {"gru": 2e-4, "tcn": 5e-4}
    rates = [chosen.train_config(kind).learning_rate for kind in ("mlp", "gru", "tcn")]
    assert rates == [1e-3, 2e-4, 5e-4]
    with pytest.raises(ValueError, match="greater than 0"):
        MarketTrainingConfig(learning_rate_by_kind={"gru": 0})
    with pytest.raises(ValueError, match="learning_rate_by_kind"):
        MarketTrainingConfig(learning_rate_by_kind={"transformer": 1e-4})


def test_a_large_panel_trains_a_net_at_a_rate_scaled_to_its_full_rate_steps():
    """full_rate_steps_by_kind (default: the GRU's 100) reaches each net's TrainConfig; a panel
    with more batches an epoch than that trains at the scaled rate, and the model says which."""
    from finpipe.market.model import MarketTrainingConfig

    default = MarketTrainingConfig()
    assert [default.train_config(k).full_rate_steps for k in ("mlp", "gru", "tcn")] == [0, 100, 0]
    chosen = MarketTrainingConfig(full_rate_steps_by_kind={"cnn": 50})  # the GRU's then unset
    assert [chosen.train_config(k).full_rate_steps for k in ("gru", "tcn")] == [0, 50]
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        MarketTrainingConfig(full_rate_steps_by_kind={"gru": -1})
    frame = _panel()
    split = time_split(frame["date"], embargo=HORIZON)
    config = _config("mlp", batch_size=16, full_rate_steps=2)  # 26 dates x ~6 rows: 10 steps
    fitted = fit_market_model(frame, FEATURES, split, config, horizon=HORIZON)
    steps = -(-int(frame["date"].isin(split.train_dates).sum()) // 16)
    assert steps > 2 and fitted.learning_rate == pytest.approx(1e-3 * 2 / steps)
