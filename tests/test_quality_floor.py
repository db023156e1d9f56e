"""No model becomes champion, first or not, unless it beats naive baselines on validation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from finpipe.credit.metrics import auc_standard_error
from finpipe.credit.pipeline import chance_auc_floor, state_auc_floor
from finpipe.domains import get_domain
from finpipe.errors import ScoringError
from finpipe.ingest import ingest_file
from finpipe.lifecycle import Candidate, floor_refusal
from finpipe.market.evaluation import naive_ic_floor
from finpipe.market.synthetic import (
    MarketSyntheticConfig,
    generate_market_panel,
    write_vendor_files,
)
from finpipe.storage import Storage
from finpipe.tracking import QUALITY_FLOOR_TAG, current_alias_version, version_tags

FAST = {"max_epochs": 4, "hidden": 16, "lookback": 10, "batch_size": 256, "models": ["mlp"]}


def test_the_floor_is_every_stated_component_and_none_means_no_floor():
    validation = {"ic": 0.03, "ic_floor_standard_error": 0.02, "ic_floor_reversal": 0.05}
    assert floor_refusal(validation, "mlp") == (
        "mlp: validation ic 0.0300 does not beat reversal 0.0500"
    )
    assert floor_refusal({**validation, "ic": 0.06}, "mlp") is None
    assert floor_refusal({"ic": -0.5}, "mlp") is None  # a domain without a floor
    equal = {"auc": 0.7, "auc_floor_logistic": 0.7}
    assert floor_refusal(equal, "mlp") is not None  # strictly above, not equal
    # any validation metric may carry a floor: customers' silhouette and segment stability
    segments = {
        "silhouette": 0.35,
        "silhouette_floor_minimum": 0.1,
        "same_segment_vs_champion": 0.55,
        "same_segment_vs_champion_floor_stability": 0.6,
    }
    assert floor_refusal(segments, "autoencoder_kmeans") == (
        "autoencoder_kmeans: validation same_segment_vs_champion 0.5500 does not beat "
        "stability 0.6000"
    )


def test_the_market_floor_is_one_standard_error_and_the_naive_signals_ics_by_hand():
    rng = np.random.default_rng(3)
    dates = pd.bdate_range("2024-01-01", periods=12)
    frame = pd.DataFrame({"date": np.repeat(dates, 15)})
    for column in ("return_5d", "return_20d", "prediction"):
        frame[column] = rng.normal(size=len(frame))
    frame["label"] = (
        -0.5 * frame["return_5d"] + 0.2 * frame["prediction"] + rng.normal(size=len(frame))
    )

    def daily_ic(signal: pd.Series) -> np.ndarray:
        by_date = frame.assign(signal=signal).groupby("date")
        return np.array([np.corrcoef(g["signal"], g["label"])[0, 1] for _, g in by_date])

    floor = naive_ic_floor(frame, frame, "label")
    model = daily_ic(frame["prediction"])
    assert floor["ic_floor_standard_error"] == pytest.approx(
        np.std(model, ddof=1) / math.sqrt(12), rel=1e-9
    )
    reversal = daily_ic(-frame["return_5d"]).mean()  # minus the trailing 5-day return
    assert reversal > 0.2
    assert floor["ic_floor_reversal"] == pytest.approx(reversal, rel=1e-9)
    momentum = daily_ic(frame["return_20d"]).mean()
    assert floor["ic_floor_momentum"] == pytest.approx(momentum, rel=1e-9)


def test_the_market_floors_standard_error_needs_only_two_validation_dates():
    rng = np.random.default_rng(4)
    frame = pd.DataFrame({"date": np.repeat(pd.bdate_range("2024-01-01", periods=2), 10)})
    frame["prediction"], frame["label"] = rng.normal(size=(2, len(frame)))
    daily = [np.corrcoef(g["prediction"], g["label"])[0, 1] for _, g in frame.groupby("date")]
    floor = naive_ic_floor(frame, frame, "label")
    assert floor["ic_floor_standard_error"] == pytest.approx(
        np.std(daily, ddof=1) / math.sqrt(2), rel=1e-9
    )


def test_a_first_model_with_a_negative_validation_ic_is_refused_and_scoring_says_so(home):
    """A panel with no planted signal (seed 2): the MLP's validation IC is negative."""
    home = home.model_copy(update={"promotion_floor": True})  # the suite turns it off
    panel = generate_market_panel(
        MarketSyntheticConfig(tickers=20, days=320, seed=2, signal_strength=0.0)
    )
    [history] = write_vendor_files(panel.prices, home.home / "drop", daily_files=0)
    storage, market = Storage(home.home), get_domain("market")
    ingest_file(storage, market.contract, history, as_of="2030-01-01")
    as_of = storage.partition_dates("validated", "market")[-1]
    market.update_features(storage, as_of, rebuild=False, progress=None)

    outcome = market.train(storage, home, as_of, market.training_config(**FAST))
    validation = outcome.metrics["mlp"]["validation"]
    assert validation["ic"] < 0
    decision = market.promote(storage, home, outcome)

    assert not decision.promoted
    assert "refused by the quality floor" in decision.reason
    assert f"validation ic {validation['ic']:.4f} does not beat standard error" in decision.reason
    assert current_alias_version(home, "market", "champion") is None
    refusal = version_tags(home, "market", outcome.challenger_version)[QUALITY_FLOOR_TAG]
    assert refusal.startswith("mlp: validation ic")
    with pytest.raises(ScoringError, match="refused by the quality floor") as caught:
        market.score(storage, home, as_of)
    assert "nothing is scored" in str(caught.value)
    assert storage.partition_dates("predictions", "market") == []


def test_the_auc_standard_error_matches_a_bootstrap():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(300), np.zeros(700)]
    scores = labels * 1.0 + rng.normal(size=1000)
    auc = roc_auc_score(labels, scores)
    boot = []
    for _ in range(400):
        pick = rng.integers(0, 1000, 1000)
        if 0 < labels[pick].sum() < 1000:
            boot.append(roc_auc_score(labels[pick], scores[pick]))
    formula = auc_standard_error(auc, 300, 700)
    assert formula == pytest.approx(np.std(boot, ddof=1), rel=0.2)
    # Hanley & McNeil's own example shape: AUC 0.8 with 50 per class
    assert auc_standard_error(0.8, 50, 50) == pytest.approx(0.0445, abs=5e-4)
    assert math.isnan(auc_standard_error(0.8, 0, 50))


def test_a_network_below_the_logistic_baseline_less_its_error_is_refused():
    def candidate(auc: float) -> Candidate:
        validation = {"auc": auc, "default_rate": 0.3, "n": 1000.0}
        return Candidate(
            model=None, loader="", input_example=None, windows={"validation": validation}
        )  # type: ignore[arg-type]

    fitted = {"mlp": candidate(0.70), "logistic": candidate(0.72)}
    figures = state_auc_floor(fitted)
    floor = figures["validation_auc_floor_logistic_baseline"]
    assert floor == pytest.approx(0.72 - auc_standard_error(0.72, 300, 700))
    assert 0.70 < floor < 0.72
    assert "does not beat logistic baseline" in floor_refusal(
        fitted["mlp"].windows["validation"], "mlp"
    )
    assert floor_refusal(fitted["logistic"].windows["validation"], "logistic") is None
    close = {"mlp": candidate(0.71), "logistic": candidate(0.72)}
    state_auc_floor(close)  # within one standard error of the baseline: good enough
    assert floor_refusal(close["mlp"].windows["validation"], "mlp") is None
    assert state_auc_floor({"mlp": candidate(0.7)}) == {}  # no baseline tonight, no floor


def test_a_credit_model_no_better_than_a_coin_flip_is_refused():
    """The baseline bar alone could never refuse: the candidate chosen has the best validation
    AUC, at least the baseline's. The chance bar refuses a first model that learnt nothing,
    whichever candidates ran (`models: ["mlp"]` states no baseline at all)."""
    window = {"default_rate": 0.3, "n": 1000.0}
    floor = chance_auc_floor(window)["auc_floor_chance"]
    assert floor == pytest.approx(0.5 + auc_standard_error(0.5, 300, 700))
    assert 0.51 < floor < 0.54
    said = floor_refusal({"auc": 0.515, **window, **chance_auc_floor(window)}, "mlp")
    assert said == f"mlp: validation auc 0.5150 does not beat chance {floor:.4f}"
    assert floor_refusal({"auc": 0.62, **window, **chance_auc_floor(window)}, "mlp") is None
    assert chance_auc_floor({"default_rate": 0.0, "n": 1000.0}) == {}  # one class: no AUC


def test_customers_floor_a_silhouette_and_once_there_is_a_champion_the_customers_kept():
    from types import SimpleNamespace

    from finpipe.customers.model import CustomersTrainingConfig
    from finpipe.customers.pipeline import CustomersNight

    night = SimpleNamespace(
        config=CustomersTrainingConfig(silhouette_floor=0.1, stability_floor=0.6)
    )
    assert CustomersNight.floors(night, {"silhouette": 0.3}) == {"silhouette_floor_minimum": 0.1}
    retrain = {"silhouette": 0.35, "same_segment_vs_champion": 0.3}
    floors = CustomersNight.floors(night, retrain)
    assert floors == {
        "silhouette_floor_minimum": 0.1,
        "same_segment_vs_champion_floor_stability": 0.6,
    }
    assert floor_refusal({**retrain, **floors}, "autoencoder_kmeans") == (
        "autoencoder_kmeans: validation same_segment_vs_champion 0.3000 does not beat "
        "stability 0.6000"
    )
