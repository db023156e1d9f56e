"""The market model: fit on a tiny panel, predict point-in-time, save and load unchanged."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finpipe.market.model import FittedMarketModel, _sorted_panel, fit_market_model
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
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.json", "weights.pt"]


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

    fitted = _fit(frame, "mlp")
    refitted = _fit(distorted, "mlp")
    assert refitted.scaler == fitted.scaler
    assert fitted.scaler == FeatureScaler.fit(frame.loc[~after_train, FEATURES])
    assert refitted.target_mean == fitted.target_mean  # the target scale too


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
