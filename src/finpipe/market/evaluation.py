"""How a market candidate is measured on the night's windows, beside `finpipe.metrics`.

Its metrics by window (RMSE in the units it was trained on), the validation IC it must beat
(`naive_ic_floor`), permutation importance on the test window, its figures, the ensemble's
members side by side and the planted signal's IC when a synthetic oracle is present.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from finpipe import plots
from finpipe.attribution import Shuffle, permutation_importance
from finpipe.market.boosted import FittedMarketBoostedTrees
from finpipe.market.candidates import MarketMember
from finpipe.market.ensemble import FittedMarketEnsemble
from finpipe.market.features import KEY_COLUMNS
from finpipe.market.model import ENSEMBLE, MarketTrainingConfig, _targets
from finpipe.market.schema import DOMAIN
from finpipe.market.synthetic import ORACLE
from finpipe.metrics import market_metrics, per_date_ic
from finpipe.storage import Storage
from finpipe.training import TimeSplit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MarketModel = MarketMember | FittedMarketEnsemble
IMPORTANCE_TABLE = "importance/permutation_importance.json"
# Each candidate's predictions on each shuffle of the importance window, by kind.
ShuffledPredictions = dict[str, dict[Shuffle | None, np.ndarray]]


def window_metrics(
    scored: pd.DataFrame, config: MarketTrainingConfig, *, zscore_units: bool = False
) -> dict[str, float]:
    """Return market metrics in the units the model was trained on (z units for the ensemble,
    whose scores are cross-sectional z-scores whatever the target).

    For a cross-sectional z-score, RMSE is against the label's per-date z-score exactly as
    training computes it (`_targets`, ddof 0), and directional accuracy compares the score's
    sign with whether the ticker beat its date's mean label (`market_metrics`'
    `cross_sectional`), not with the sign of the raw return.
    """
    cross_sectional = config.target == "cross_sectional_zscore" or zscore_units
    metrics = market_metrics(scored, label=config.label, cross_sectional=cross_sectional)
    if cross_sectional:
        z = _targets(scored, config.label, "cross_sectional_zscore")
        error = scored["prediction"].to_numpy(dtype=float) - z
        metrics["rmse"] = float(np.sqrt(np.nanmean(error**2)))
    return metrics


def naive_ic_floor(validation: pd.DataFrame, window: pd.DataFrame, label: str) -> dict[str, float]:
    """The validation IC a candidate must beat to become champion (`lifecycle.floor_refusal`):
    one standard error of its own mean daily IC above zero (`validation`: its scored rows),
    and the IC of two naive signals on the same window (`window`: its feature rows): momentum
    (the trailing 20-day return) and short-term reversal (minus the trailing 5-day return)."""
    daily = per_date_ic(validation, "prediction", label)
    floor = {
        "ic_floor_standard_error": float(daily.std(ddof=1) / np.sqrt(len(daily)))
        if len(daily) > 1
        else float("inf")
    }
    signals = {}
    if "return_20d" in window:
        signals["momentum"] = window["return_20d"]
    if "return_5d" in window:
        signals["reversal"] = -window["return_5d"]
    for name, signal in signals.items():
        naive = window[["date", label]].assign(prediction=signal)
        floor[f"ic_floor_{name}"] = float(per_date_ic(naive, "prediction", label).mean())
    return floor


def test_window_importance(
    kind: str,
    model: MarketModel,
    frame: pd.DataFrame,
    features: list[str],
    split: TimeSplit,
    config: MarketTrainingConfig,
    shuffled: ShuffledPredictions,
) -> pd.DataFrame:
    """Permutation importance of each feature on the test window: the drop in the model's
    mean daily IC when the feature is shuffled across tickers within each date (in every
    row the model reads, lookback history included), one seeded shuffle per feature.

    Every candidate of the night is scored on the same shuffles, and its predictions on them
    are kept in `shuffled`: the ensemble combines its members' instead of predicting again.
    """
    label, test_dates = config.label, split.test_dates
    dates = pd.DatetimeIndex(np.sort(frame["date"].unique()))
    # Windows count a ticker's rows, not dates: twice the night's longest lookback in
    # dates leaves room for a ticker's missing days.
    first = max(0, int(dates.searchsorted(test_dates[0])) - 2 * config.lookback)
    rows = frame["date"].between(dates[first], test_dates[-1])
    window = frame.loc[rows, [*KEY_COLUMNS, *features, label]]
    labels = window.loc[window["date"] >= test_dates[0], ["date", label]]
    saved = shuffled.setdefault(kind, {})

    def predict(frame: pd.DataFrame, shuffle: Shuffle | None) -> np.ndarray:
        if isinstance(model, FittedMarketEnsemble):
            members = [shuffled.get(k, {}).get(shuffle) for k in model.members]
            if all(values is not None for values in members):
                scored = labels.assign(**dict(zip(model.members, members, strict=True)))
                return model.combine(scored)[0]
        predicted = model.predict(frame.drop(columns=label), score_from=test_dates[0])
        return predicted["prediction"].to_numpy()  # the rows of `labels`, in order

    def test_ic(frame: pd.DataFrame, shuffle: Shuffle | None) -> float:
        saved[shuffle] = predict(frame, shuffle)
        daily = per_date_ic(labels.assign(prediction=saved[shuffle]), label=label)
        return float(daily.mean())

    return permutation_importance(
        test_ic, window, model.feature_columns, within="date", seed=config.seed
    ).rename(columns={"importance": "ic_drop", "score": "shuffled_ic", "baseline": "ic"})


def members_table(
    scored: pd.DataFrame,
    members: Mapping[str, MarketMember],
    ensemble: FittedMarketEnsemble,
    split: TimeSplit,
    label: str,
) -> pd.DataFrame:
    """Each member's weight and validation/test IC and rank IC, then the ensemble's (the
    validation IC each competes with: cross-fitted for the boosted trees and a stacked
    ensemble)."""
    rows = []
    for name in [*members, ENSEMBLE]:
        column = "prediction" if name == ENSEMBLE else name
        row: dict[str, object] = {
            "candidate": name,
            "weight": 1.0 if name == ENSEMBLE else ensemble.weights[name],
        }
        for window, dates in (("validation", split.validation_dates), ("test", split.test_dates)):
            rows_in = scored[scored["date"].isin(dates)]
            values = market_metrics(rows_in, prediction=column, label=label)
            row[f"{window}_ic"], row[f"{window}_rank_ic"] = values["ic"], values["rank_ic"]
        rows.append(row)
    table = pd.DataFrame(rows)
    # The validation IC each competes with: cross-fitted for the trees and a stacked ensemble.
    competing = {
        name: m.selection for name, m in members.items() if isinstance(m, FittedMarketBoostedTrees)
    }
    competing[ENSEMBLE] = ensemble.selection
    for name, selection in competing.items():
        if "validation_ic" in selection:
            table.loc[table["candidate"] == name, "validation_ic"] = selection["validation_ic"]
    return table


def candidate_figures(
    test: pd.DataFrame, label: str, kind: str, importance: pd.DataFrame
) -> dict[str, Figure]:
    """A candidate's importance, test IC by date and test label by prediction decile."""
    return {
        "plots/feature_importance.png": plots.feature_importance(
            dict(zip(importance["feature"], importance["ic_drop"], strict=True)),
            f"{kind}: permutation importance (test window)",
            xlabel="drop in mean daily IC when shuffled across tickers",
        ),
        "plots/ic_by_date.png": plots.ic_by_date(
            per_date_ic(test, label=label), f"{kind}: test IC by date"
        ),
        "plots/return_by_decile.png": plots.return_by_decile(
            test, "prediction", label, f"{kind}: test {label} by prediction decile"
        ),
    }


def oracle_ic(storage: Storage, test_window: pd.DataFrame, label: str) -> float | None:
    """Return the planted signal's IC on the test window, when a synthetic oracle is present."""
    # Only the test window's rows: the oracle covers the whole history.
    first, last = test_window["date"].min(), test_window["date"].max()
    oracle = storage.read_reference(
        DOMAIN, ORACLE, filters=[("date", ">=", first), ("date", "<=", last)]
    )
    if oracle is None:
        return None
    joined = test_window[[*KEY_COLUMNS, label]].merge(oracle, on=KEY_COLUMNS)
    if joined.empty:
        return None
    joined = joined.rename(columns={"expected_forward_return": "prediction"})
    return float(market_metrics(joined, label=label)["ic"])
