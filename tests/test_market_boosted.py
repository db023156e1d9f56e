"""The market's gradient-boosted baseline (finpipe.market.boosted): fit on train dates only,
early stopping on validation IC, exact attributions, the model folder, the ensemble member."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from finpipe.market.boosted import (
    IC_EVERY,
    FittedMarketBoostedTrees,
    _DailyScore,
    fit_boosted_trees,
    validation_halves,
)
from finpipe.market.candidates import BOOSTED_LOADER, fit_member, member_loader, member_params
from finpipe.market.ensemble import FittedMarketEnsemble, fit_ensemble
from finpipe.market.model import (
    DEFAULT_MODELS,
    BoostedTreesConfig,
    MarketTrainingConfig,
)
from finpipe.metrics import per_date_ic
from finpipe.training import time_split

FEATURES = ["f0", "f1", "f2"]
HORIZON = 5
SMALL = BoostedTreesConfig(num_leaves=4, min_leaf_fraction=0.02, max_rounds=60, patience=10)


def _panel(seed: int = 0, n_dates: int = 80, tickers: int = 12) -> pd.DataFrame:
    """f0 carries the signal; NaN features on one ticker's first rows; unrealised labels last."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2023-01-02", periods=n_dates)
    names = [f"T{k:02d}" for k in range(tickers)]
    frame = pd.MultiIndex.from_product([dates, names], names=["date", "ticker"]).to_frame(
        index=False
    )
    for column in FEATURES:
        frame[column] = rng.normal(size=len(frame)).astype(np.float32)
    frame["forward_return_5d"] = 0.01 * frame["f0"] + 0.01 * rng.normal(size=len(frame))
    frame.loc[(frame["ticker"] == "T00") & (frame["date"] < dates[5]), FEATURES] = np.nan
    frame.loc[frame["date"] > dates[-1 - HORIZON], "forward_return_5d"] = np.nan
    return frame


@pytest.fixture(scope="module")
def fitted() -> tuple[pd.DataFrame, FittedMarketBoostedTrees]:
    frame = _panel()
    split = time_split(frame.loc[frame["forward_return_5d"].notna(), "date"], embargo=HORIZON)
    return frame, fit_boosted_trees(frame, FEATURES, split, SMALL, horizon=HORIZON, seed=1)


def test_the_trees_learn_the_planted_feature_and_keep_the_best_validation_round(fitted):
    frame, model = fitted
    predicted = model.predict(frame)
    assert list(predicted.columns) == ["date", "ticker", "prediction"]
    assert predicted.index.equals(frame.index) and np.isfinite(predicted["prediction"]).all()
    scored = frame.assign(prediction=predicted["prediction"])
    assert per_date_ic(scored).mean() > 0.5  # the signal's own IC is about 0.7
    ics = np.array([h["validation_ic"] for h in model.history])
    evaluated = np.flatnonzero(np.isfinite(ics)) + 1  # every IC_EVERY rounds, and the last
    every = min(IC_EVERY, SMALL.patience)
    assert evaluated[-1] == len(model.history) and all(evaluated[:-1] % every == 0)
    # the kept round is the whole window's best until `patience` rounds pass without a higher
    # one; training may go on after it while a half of the window is still improving
    assert model.best_epoch == int(np.nanargmax(ics[: model.best_epoch + SMALL.patience])) + 1
    assert model.selection["best_round_validation_ic"] == ics[model.best_epoch - 1]
    assert all(np.isfinite([h["train_loss"] for h in model.history]))
    # the IC early stopping kept (validation predictions summed tree by tree) is the kept
    # model's own validation IC (Pearson per date: the z-scored target's or the raw label's)
    split = time_split(frame.loc[frame["forward_return_5d"].notna(), "date"], embargo=HORIZON)
    kept = per_date_ic(scored[scored["date"].isin(split.validation_dates)]).mean()
    assert ics[model.best_epoch - 1] == pytest.approx(kept, abs=1e-9)
    assert model.settings["min_data_in_leaf"] == max(20, int(0.02 * 12 * 54))  # share of rows


def _stopped_at(ics: list[float], every: int, patience: int) -> int:
    """The round early stopping keeps from ICs evaluated every `every` rounds: the best until
    `patience` rounds pass without a higher one."""
    best, best_ic = 0, -np.inf
    for k, ic in enumerate(ics):
        rounds = (k + 1) * every
        if ic > best_ic:
            best, best_ic = rounds, ic
        elif rounds - best >= patience:
            break
    return best


def test_the_reported_validation_ic_scores_each_half_at_the_round_the_other_half_chose():
    """The validation IC the trees report (the night's selection and floor) is cross-fitted:
    no validation date is scored at a round chosen on it."""
    frame = _panel(4, n_dates=160)
    split = time_split(frame.loc[frame["forward_return_5d"].notna(), "date"], embargo=HORIZON)
    model = fit_boosted_trees(frame, FEATURES, split, SMALL, horizon=HORIZON)
    rows = frame[frame["date"].isin(split.validation_dates)]
    # the kept booster holds the kept rounds only: the same trees again, every round kept
    every_round = SMALL.model_copy(update={"max_rounds": len(model.history), "patience": 1000})
    trees = fit_boosted_trees(frame, FEATURES, split, every_round, horizon=HORIZON).booster
    daily = {}  # by round: the IC of each validation date, in date order
    for rounds in range(IC_EVERY, len(model.history) + 1, IC_EVERY):
        predicted = trees.predict(rows[FEATURES].to_numpy(np.float64), num_iteration=rounds)
        ics = per_date_ic(rows.assign(prediction=predicted))  # no IC where predictions tie
        daily[rounds] = ics.reindex(split.validation_dates).to_numpy()
    halves = validation_halves(len(split.validation_dates), HORIZON)
    # 23 dates: halves of 11 and 12, each chosen on the other less its 5 dates next to it
    assert [len(h) for pair in halves for h in pair] == [7, 11, 6, 12]
    scored = []
    for chosen_on, dates in halves:
        mean_ics = [np.nanmean(values[chosen_on]) for values in daily.values()]
        chosen = _stopped_at(mean_ics, IC_EVERY, SMALL.patience)
        scored.append(daily[chosen][dates])
    expected = float(np.nanmean(np.concatenate(scored)))
    assert model.selection["validation_ic"] == pytest.approx(expected, abs=1e-9)
    whole = [np.nanmean(values) for values in daily.values()]
    assert model.best_epoch == _stopped_at(whole, IC_EVERY, SMALL.patience)
    # The predictions behind that IC, which an ensemble of the trees is weighted on.
    cross = rows[["date", "ticker", "forward_return_5d"]].merge(
        model.cross_fitted_validation, on=["date", "ticker"]
    )
    assert len(cross) == rows["forward_return_5d"].notna().sum()
    assert per_date_ic(cross).mean() == pytest.approx(expected, abs=1e-9)


def test_on_pure_noise_the_reported_validation_ic_is_not_biased_upward():
    """The kept round's validation IC is the highest of many, so above zero on labels of pure
    noise; the cross-fitted one the trees report centres on zero (60 panels, 2 s)."""
    kept, reported = [], []
    for seed in range(1000, 1060):
        frame = _panel(seed, n_dates=200, tickers=20)
        noise = np.random.default_rng(10**6 + seed).normal(0, 0.01, len(frame))
        frame["forward_return_5d"] = frame["forward_return_5d"].where(
            frame["forward_return_5d"].isna(), noise
        )
        split = time_split(frame.loc[frame["forward_return_5d"].notna(), "date"], embargo=HORIZON)
        model = fit_boosted_trees(frame, FEATURES, split, BoostedTreesConfig(), horizon=HORIZON)
        kept.append(model.selection["best_round_validation_ic"])
        reported.append(model.selection["validation_ic"])
    excess = np.subtract(kept, reported)
    assert abs(np.mean(reported)) < 2 * np.std(reported, ddof=1) / np.sqrt(len(reported))
    assert np.mean(excess) > 5 * np.std(excess, ddof=1) / np.sqrt(len(excess))  # about +0.02


def test_test_dates_and_later_labels_change_nothing():
    """Point in time: labels and features after the validation window never reach the fit."""
    frame = _panel()
    split = time_split(frame.loc[frame["forward_return_5d"].notna(), "date"], embargo=HORIZON)
    changed = frame.copy()
    after = changed["date"] > split.validation_dates[-1]
    rng = np.random.default_rng(5)
    changed.loc[after, "forward_return_5d"] = rng.normal(size=int(after.sum()))
    changed.loc[after, FEATURES] = rng.normal(size=(int(after.sum()), len(FEATURES))).astype(
        np.float32
    )
    first = fit_boosted_trees(frame, FEATURES, split, SMALL, horizon=HORIZON)
    second = fit_boosted_trees(changed, FEATURES, split, SMALL, horizon=HORIZON)
    before = ~after.to_numpy()
    np.testing.assert_array_equal(
        first.predict(frame)["prediction"].to_numpy()[before],
        second.predict(changed)["prediction"].to_numpy()[before],
    )
    with pytest.raises(ValueError, match="embargo"):
        fit_boosted_trees(frame, FEATURES, time_split(frame["date"], embargo=2), SMALL, horizon=5)


def test_attributions_add_up_to_the_prediction_less_the_expected_value(fitted):
    frame, model = fitted
    start = frame["date"].iloc[-1]
    contributions = model.attributions(frame, score_from=start)
    predicted = model.predict(frame, score_from=start)
    expected_value = model.booster.predict(
        frame.loc[predicted.index, FEATURES].to_numpy(np.float64),
        num_iteration=model.best_epoch,
        pred_contrib=True,
    )[:, -1]
    np.testing.assert_allclose(
        contributions.sum(axis=1) + expected_value, predicted["prediction"], rtol=1e-9, atol=1e-12
    )
    explained = model.explain(frame, score_from=start)
    assert len(explained) == 12 and set(explained["reason_1"].dropna()) <= set(FEATURES)
    assert (explained["reason_1"] == "f0").mean() > 0.5  # the planted feature moves scores most


def test_a_fit_that_reaches_max_rounds_predicts_and_explains_with_the_kept_round(tmp_path):
    """Training grows every round before early stopping settles: LightGBM sets no best
    iteration, yet the trees predict and explain as the saved model (kept rounds only) does."""
    frame = _panel(4, n_dates=160)
    split = time_split(frame.loc[frame["forward_return_5d"].notna(), "date"], embargo=HORIZON)
    unsettled = SMALL.model_copy(update={"patience": 1000})
    model = fit_boosted_trees(frame, FEATURES, split, unsettled, horizon=HORIZON)
    assert model.best_epoch < model.booster.current_iteration() == SMALL.max_rounds
    model.save(tmp_path / "lgbm")
    saved = FittedMarketBoostedTrees.load(tmp_path / "lgbm")

    start = frame["date"].iloc[-1]
    predicted = model.predict(frame, score_from=start)
    pd.testing.assert_frame_equal(predicted, saved.predict(frame, score_from=start))
    expected_value = saved.booster.predict(
        frame.loc[predicted.index, FEATURES].to_numpy(np.float64), pred_contrib=True
    )[:, -1]
    np.testing.assert_allclose(
        model.attributions(frame, score_from=start).sum(axis=1) + expected_value,
        predicted["prediction"],
        rtol=1e-9,
        atol=1e-12,
    )


def test_the_model_folder_round_trips_and_names_what_is_missing(fitted, tmp_path):
    frame, model = fitted
    model.save(tmp_path / "lgbm")
    assert sorted(p.name for p in (tmp_path / "lgbm").iterdir()) == ["booster.txt", "model.json"]
    loaded = FittedMarketBoostedTrees.load(tmp_path / "lgbm")
    pd.testing.assert_frame_equal(loaded.predict(frame), model.predict(frame))
    saved = json.loads((tmp_path / "lgbm" / "model.json").read_text())
    assert saved["feature_columns"] == FEATURES and saved["best_epoch"] == model.best_epoch
    assert loaded.selection == model.selection and set(model.selection) == {
        "best_round_validation_ic",
        "validation_ic",
    }
    (tmp_path / "lgbm" / "booster.txt").unlink()
    with pytest.raises(FileNotFoundError, match="booster.txt"):
        FittedMarketBoostedTrees.load(tmp_path / "lgbm")


def test_the_daily_score_is_the_mean_per_date_ic_and_the_squared_error():
    rng = np.random.default_rng(2)
    dates = np.repeat(pd.bdate_range("2024-01-01", periods=6).to_numpy(), 9)
    targets, predictions = rng.normal(size=54), rng.normal(size=54)
    (name, ic, higher), (_, loss, lower) = _DailyScore(dates, targets).metrics(predictions)
    frame = pd.DataFrame({"date": dates, "prediction": predictions, "forward_return_5d": targets})
    assert (name, higher, lower) == ("ic", True, False)
    assert ic == pytest.approx(per_date_ic(frame).mean(), rel=1e-12)
    assert loss == pytest.approx(np.mean((predictions - targets) ** 2), rel=1e-12)


def test_lgbm_is_a_default_candidate_and_an_ensemble_member(tmp_path):
    assert DEFAULT_MODELS == ("mlp", "gru", "lgbm", "ensemble")
    config = MarketTrainingConfig(
        models=["mlp", "lgbm", "ensemble"], hidden=8, max_epochs=2, seed_average={},
        boosted_trees=SMALL,
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown model kind 'lgbm'"):
        config.train_config("lgbm")  # not a net
    assert member_loader("lgbm") == BOOSTED_LOADER
    assert member_params("lgbm", config)["num_leaves"] == 4
    frame = _panel(3)
    split = time_split(frame.loc[frame["forward_return_5d"].notna(), "date"], embargo=HORIZON)
    members = {kind: fit_member(kind, frame, FEATURES, split, config) for kind in ("mlp", "lgbm")}
    assert isinstance(members["lgbm"], FittedMarketBoostedTrees)
    scored = frame.copy()
    for kind, member in members.items():
        scored[kind] = member.predict(frame)["prediction"]
    ensemble = fit_ensemble(
        members, scored, split.validation_dates, label="forward_return_5d", horizon=HORIZON
    )
    ensemble.save(tmp_path / "ensemble")
    loaded = FittedMarketEnsemble.load(tmp_path / "ensemble")
    assert isinstance(loaded.members["lgbm"], FittedMarketBoostedTrees)
    pd.testing.assert_frame_equal(loaded.predict(frame), ensemble.predict(frame))
    explained = loaded.explain(frame, score_from=frame["date"].iloc[-1])
    assert explained["reason_1"].notna().all()


def test_fit_member_hands_the_nights_seed_horizon_and_label_to_the_trees():
    config = MarketTrainingConfig(models=["lgbm"], horizon=10, seed=7, boosted_trees=SMALL)
    frame = _panel(3).assign(forward_return_10d=lambda f: f["forward_return_5d"])
    split = time_split(frame.loc[frame["forward_return_10d"].notna(), "date"], embargo=10)
    trees = fit_member("lgbm", frame, FEATURES, split, config)
    assert (trees.horizon, trees.label, trees.settings["seed"]) == (10, "forward_return_10d", 7)
    assert member_params("lgbm", config)["seed"] == 7  # the params its run logs


def test_every_ensemble_of_the_trees_is_weighted_on_their_cross_fitted_validation_predictions():
    """`fit_ensemble` itself puts the trees' cross-fitted predictions in place of their kept
    round's on the validation dates, so the nightly, the walk-forward backtest and the peer
    benchmark, which all hand it the kept round's, weight the same ensemble."""
    config = MarketTrainingConfig(models=["mlp", "lgbm"], hidden=8, max_epochs=2, seed_average={})
    config = config.model_copy(update={"boosted_trees": SMALL})
    frame = _panel(5, n_dates=120)
    split = time_split(frame.loc[frame["forward_return_5d"].notna(), "date"], embargo=HORIZON)
    members = {kind: fit_member(kind, frame, FEATURES, split, config) for kind in ("mlp", "lgbm")}
    trees = members["lgbm"]
    assert isinstance(trees, FittedMarketBoostedTrees) and trees.cross_fitted_validation is not None
    kept = frame[["date", "ticker", "forward_return_5d"]].assign(
        **{kind: member.predict(frame)["prediction"] for kind, member in members.items()}
    )
    by_hand = kept.merge(trees.cross_fitted_validation, on=["date", "ticker"], how="left")
    by_hand["lgbm"] = by_hand.pop("prediction").fillna(by_hand["lgbm"])
    on_validation = by_hand["date"].isin(split.validation_dates)
    assert not np.allclose(by_hand.loc[on_validation, "lgbm"], kept.loc[on_validation, "lgbm"])

    def fitted(scored, members=members):
        ensemble = fit_ensemble(
            members, scored, split.validation_dates, label="forward_return_5d", horizon=HORIZON
        )
        return ensemble.weights, ensemble.selection

    assert fitted(kept) == fitted(by_hand)
    unaware = {**members, "lgbm": dataclasses.replace(trees, cross_fitted_validation=None)}
    assert fitted(kept, unaware) != fitted(kept)  # the kept round's would weight another one
